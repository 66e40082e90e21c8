"""``nnunet-ext benchmark annotate``: the slice rules, the bookkeeping at equal counts, re-annotated datasets, the
results table, bad input, the loop's orchestration with nnU-Net replaced by fakes, and one run through the real
commands (integration)."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile

import nnunet_ext.benchmarking.accuracy as benchmark
import nnunet_ext.benchmarking.annotation_loop as loop_module
from nnunet_ext.benchmarking import recipes
from nnunet_ext.benchmarking.accuracy import BenchmarkSettings
from nnunet_ext.benchmarking.annotation_loop import (
    ARMS,
    EVEN,
    RANDOM,
    SUGGESTED,
    AnnotationLoop,
    added_slices,
    annotation_count,
    check_equal_count,
    check_slice_counts,
    fill_largest_gaps,
    random_unannotated,
    read_suggestions,
    with_added,
    write_annotation_summary,
)
from nnunet_ext.cli import main
from nnunet_ext.datasets import sparsify as sparsify_module
from nnunet_ext.datasets.raw_dataset import dataset_json, write_image
from nnunet_ext.datasets.sparsify import reannotate_dataset, sparsify_dataset
from nnunet_ext.errors import UserError
from nnunet_ext.slice_suggestion import annotated_slices_of_label

CASES = [f"cell_{i:03d}" for i in range(4)]  # the dense recipe holds out every third: cell_002
TRAINING = ["cell_000", "cell_001", "cell_003"]
SHAPE = (12, 16, 16)


def write_dense_dataset(folder: Path, shape=SHAPE, file_format: str = "nifti", lengths: dict | None = None) -> Path:
    """A dense one-class dataset: a ball that moves along z from case to case; ``lengths`` overrides a case's
    slice count."""
    rng = np.random.default_rng(0)
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for index, case in enumerate(CASES):
        case_shape = ((lengths or {}).get(case, shape[0]), *shape[1:])
        z, y, x = np.indices(case_shape)
        label = ((z - 3 - index) ** 2 + (y - 8) ** 2 + (x - 8) ** 2 <= 9).astype(np.uint8)
        image = (label * 200.0 + rng.normal(0, 10, case_shape)).astype(np.float32)
        write_image(image, folder / "imagesTr" / case, (2.0, 1.0, 1.0), file_format, channel=0)
        write_image(label, folder / "labelsTr" / case, (2.0, 1.0, 1.0), file_format)
    document = dataset_json("Cells", {0: "stain"}, {"background": 0, "cell": 1}, len(CASES), file_format)
    (folder / "dataset.json").write_text(json.dumps(document))
    return folder


@pytest.fixture
def no_verify(monkeypatch):
    """nnU-Net's integrity check spawns a process per dataset; the integration test runs it."""
    monkeypatch.setattr(sparsify_module, "verify_raw_dataset", lambda folder, *a, **k: None)
    monkeypatch.setattr(recipes, "verify_raw_dataset", lambda folder, *a, **k: None)


def read_label(path: Path) -> np.ndarray:
    if path.name.endswith(".tif"):
        return tifffile.imread(path)
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def labelled_slices(raw: Path, case: str) -> list[int]:
    """The slices along axis 0 of a case's labelsTr that hold anything but the ignore label."""
    document = json.loads((raw / "dataset.json").read_text())
    label = read_label(raw / "labelsTr" / f"{case}{document['file_ending']}")
    return annotated_slices_of_label(label, 0, document["labels"]["ignore"])


# ---- choosing slices


@pytest.mark.parametrize("length, annotated, count, expected", [
    # Runs of unannotated slices 1..5 and 7..11, both 5 long: the first wins, its middle is 3. Then 1-2 and 4-5
    # (2 long) and 7..11 (5): the middle of 7..11 is 9.
    (12, [0, 6], 2, [3, 9]),
    # Runs 0..2 (3), 4..8 (5), 10..11 (2): the middle of 4..8 is 6. Then 0..2 (3) beats 4-5, 7-8, 10-11 (2): 1.
    (12, [3, 9], 2, [1, 6]),
    # One run 1..4 (4 long): its two middle slices are 2 and 3, the lower one is taken.
    (6, [0, 5], 1, [2]),
    # Nothing annotated: the whole volume 0..4 is the gap, middle 2.
    (5, [], 1, [2]),
    # The run after the last annotated slice counts: 3 is the only unannotated slice.
    (4, [0, 1, 2], 1, [3]),
])
def test_the_largest_gap_is_filled_at_its_middle(length, annotated, count, expected):
    assert fill_largest_gaps(length, annotated, count) == expected


def test_a_fully_annotated_case_has_no_gap_to_fill():
    with pytest.raises(UserError, match="all 3 slices are annotated"):
        fill_largest_gaps(3, [0, 1, 2], 1)


def test_random_slices_are_unannotated_distinct_and_reproducible():
    annotated = [4, 12, 20]
    draws = {seed: random_unannotated(24, annotated, 5, seed, case_index=0) for seed in range(5)}
    for drawn in draws.values():
        assert len(drawn) == len(set(drawn)) == 5 and drawn == sorted(drawn)
        assert not set(drawn) & set(annotated) and all(0 <= i < 24 for i in drawn)
    assert random_unannotated(24, annotated, 5, 3, case_index=0) == draws[3]  # the same seed draws the same
    assert len({tuple(drawn) for drawn in draws.values()}) > 1  # the seed changes the draw
    # Asking for every unannotated slice returns all of them: 0, 2 and 4 of 0..4 without 1 and 3.
    assert random_unannotated(5, [1, 3], 3, 0, 0) == [0, 2, 4]
    with pytest.raises(UserError, match="4 random slices asked, 3 of 5 are unannotated"):
        random_unannotated(5, [1, 3], 4, 0, 0)


def test_even_and_random_arms_add_the_same_count_per_case():
    loop = AnnotationLoop(start=2, add=2)
    start, counts = {"a": [3, 9], "b": [2, 7]}, {"a": 12, "b": 10}
    even = added_slices(EVEN, start, counts, loop, seed=0)
    # a: as in the hand example above, 6 then 1. b (10 slices, annotated 2 and 7): runs 0-1 (2), 3..6 (4), 8-9 (2):
    # middle of 3..6 is 4; then 0-1, 5-6, 8-9 (2 each) and 3 (1): the first, 0-1, gives 0.
    assert even == {"a": [1, 6], "b": [0, 4]}
    random = added_slices(RANDOM, start, counts, loop, seed=0)
    assert {case: len(slices) for case, slices in random.items()} == {"a": 2, "b": 2}
    for added in (even, random):
        assert annotation_count(with_added(start, added)) == 4 + 2 * 2


def test_the_union_keeps_start_and_added_slices_at_the_expected_count():
    start = {"a": [3, 9], "b": [3, 9]}
    plan = with_added(start, {"a": [6, 1]})  # suggest may put every slice into one case
    assert plan == {"a": [1, 3, 6, 9], "b": [3, 9]}
    assert annotation_count(plan) == 6
    check_equal_count(SUGGESTED, plan, 6)
    with pytest.raises(UserError, match="the suggested arm annotates 6 slices, the comparison needs 7"):
        check_equal_count(SUGGESTED, plan, 7)
    with pytest.raises(UserError, match="slice 3 of a is added twice or was annotated already"):
        with_added(start, {"a": [3]})
    with pytest.raises(UserError, match="slice 5 of b is added twice"):
        with_added(start, {"b": [5, 5]})
    with pytest.raises(UserError, match="'c', which is not a training case"):
        with_added(start, {"c": [0]})


def test_suggestions_csv_is_read_into_slices_per_case(tmp_path):
    from nnunet_ext.slice_suggestion import SUGGESTIONS_CSV, Suggestion
    from nnunet_ext.suggest import write_csv

    path = tmp_path / SUGGESTIONS_CSV
    write_csv(path, [Suggestion("b", 7, 0.9), Suggestion("a", 5, 0.8), Suggestion("b", 2, 0.5)], 0, "entropy")
    assert read_suggestions(path, ["a", "b", "c"]) == {"a": [5], "b": [2, 7], "c": []}
    with pytest.raises(UserError, match="'b', which is not a training case"):
        read_suggestions(path, ["a"])
    write_csv(path, [Suggestion("a", 5, 0.8)], 1, "entropy")
    with pytest.raises(UserError, match="along axis 1, the datasets are annotated along axis 0"):
        read_suggestions(path, ["a"])


# ---- re-annotated datasets


@pytest.mark.parametrize("file_format", ["nifti", "tif"])
def test_a_reannotated_dataset_keeps_exactly_the_planned_slices(tmp_path, no_verify, file_format):
    source = write_dense_dataset(tmp_path / "Dataset001_Cells", file_format=file_format)
    start = sparsify_dataset(source, tmp_path / "raw", 10, "Start", n_slices=2)
    plan = {"cell_000": [0, 3, 9], "cell_001": [3, 9], "cell_002": [3, 9, 11], "cell_003": [3, 5, 9]}
    raw = reannotate_dataset(start, tmp_path / "raw", 11, "Again", plan)
    document = json.loads((raw / "dataset.json").read_text())
    assert document["annotated_slices"] == plan and document["annotation_axis"] == 0
    ending = document["file_ending"]
    for case, kept in plan.items():
        assert labelled_slices(raw, case) == kept
        dense = read_label(raw / "labelsTr_dense" / f"{case}{ending}")
        sparse = read_label(raw / "labelsTr" / f"{case}{ending}")
        np.testing.assert_array_equal(sparse[kept], dense[kept])  # the kept slices carry the dense truth
        np.testing.assert_array_equal(dense, read_label(source / "labelsTr" / f"{case}{ending}"))
    assert sorted(p.name for p in (raw / "imagesTr").iterdir()) == sorted(p.name for p in
                                                                          (start / "imagesTr").iterdir())


@pytest.mark.parametrize("plan, message", [
    ({"cell_000": [3]}, "give slices for every training case"),
    ({case: [3, 12] for case in CASES}, r"give distinct indices in 0..11"),
    ({case: [3, 3] for case in CASES}, r"give distinct indices in 0..11"),
    ({case: [] for case in CASES}, "at least one"),
])
def test_a_bad_slice_plan_writes_nothing(tmp_path, no_verify, plan, message):
    start = sparsify_dataset(write_dense_dataset(tmp_path / "Dataset001_Cells"), tmp_path / "raw", 10, "Start",
                             n_slices=2)
    with pytest.raises(UserError, match=message):
        reannotate_dataset(start, tmp_path / "raw", 11, "Again", plan)
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["Dataset010_Start"]


# ---- results table


START_PLAN = {"a": [3, 9], "b": [3, 9]}
ADDED = {"start": {"a": [], "b": []}, SUGGESTED: {"a": [1, 6], "b": []}, EVEN: {"a": [6], "b": [6]},
         RANDOM: {"a": [0], "b": [11]}}
# Per arm and seed: test-volume Dice of t0 and t1, unannotated-slice Dice of the one training case c0.
DICE = {("start", 0): ((0.50, 0.60), 0.50), ("start", 1): ((0.40, 0.60), 0.40),
        (SUGGESTED, 0): ((0.70, 0.80), 0.70), (SUGGESTED, 1): ((0.60, 0.60), 0.50),
        (EVEN, 0): ((0.60, 0.70), 0.60), (EVEN, 1): ((0.50, 0.70), 0.55),
        (RANDOM, 0): ((0.55, 0.75), 0.65), (RANDOM, 1): ((0.60, 0.50), 0.45)}


def fake_result(arm: str, seed: int) -> dict:
    (t0, t1), unannotated = DICE[arm, seed]
    plan = with_added(START_PLAN, ADDED[arm])

    def aggregate(dice, unannotated_dice):
        return {"mean": {"dice": dice, "dice_unannotated": unannotated_dice, "dice_annotated": 1.0}}

    return {"trainer": "nnUNetTrainer", "sparsity": "slices2", "arm": arm, "seed": seed, "minutes": 2.0,
            "dataset": f"Dataset100_{arm}{seed}", "annotated_count": annotation_count(plan), "annotated": plan,
            "added": ADDED[arm], "slice_counts": {"a": 12, "b": 12},
            "test": {"aggregate": aggregate((t0 + t1) / 2, None), "cases": {"t0": t0, "t1": t1}},
            "train": {"aggregate": aggregate(None, unannotated), "cases": {"c0": unannotated}}}


def write_result(root: Path, result: dict) -> None:
    run = root / "runs" / "slices2" / f"seed{result['seed']}" / result["arm"]
    run.mkdir(parents=True, exist_ok=True)
    (run / "result.json").write_text(json.dumps(result))


def test_the_results_table_by_hand(tmp_path):
    for arm in ARMS:
        for seed in (0, 1):
            write_result(tmp_path, fake_result(arm, seed))
    settings = BenchmarkSettings(trainers=[], sparsities=["slices:2"], seeds=[0, 1], reference_2d=False)
    summary = write_annotation_summary(tmp_path, settings, AnnotationLoop(start=2, add=1))
    markdown = (tmp_path / "results.md").read_text()
    # Test Dice per seed = mean of t0 and t1. start 0.55, 0.50: mean 0.525, sample std 0.05 / sqrt(2) = 0.035;
    # unannotated 0.5, 0.4: 0.450 ± 0.071. suggested 0.75, 0.60: 0.675 ± 0.106; unannotated 0.7, 0.5: 0.600 ± 0.141.
    # even 0.65, 0.60: 0.625 ± 0.035; 0.6, 0.55: 0.575 ± 0.035. random 0.65, 0.55: 0.600 ± 0.071; 0.65, 0.45:
    # 0.550 ± 0.141. Counts: start 2 + 2 slices, the others 2 more.
    assert "| start | 2 | 4 | 0.525 ± 0.035 | 0.450 ± 0.071 | 1.000 ± 0.000 | 2.0 |" in markdown
    assert "| suggested | 2 | 6 | 0.675 ± 0.106 | 0.600 ± 0.141 | 1.000 ± 0.000 | 2.0 |" in markdown
    assert "| even | 2 | 6 | 0.625 ± 0.035 | 0.575 ± 0.035 | 1.000 ± 0.000 | 2.0 |" in markdown
    assert "| random | 2 | 6 | 0.600 ± 0.071 | 0.550 ± 0.141 | 1.000 ± 0.000 | 2.0 |" in markdown
    # suggested − even, test pairs (seed, case): +0.1, +0.1, +0.1, -0.1: mean 0.05, deviations 0.05 x 3 and -0.15,
    # squares sum to 0.03, / 3 -> std 0.1; 3 wins of 4. Unannotated: +0.1, -0.05: mean 0.025, std
    # sqrt(2 x 0.075^2) = 0.106; 1 win of 2.
    assert "| suggested − even | +0.050 ± 0.100 (wins 3/4) | +0.025 ± 0.106 (wins 1/2) |" in markdown
    # suggested − random, test: +0.15, +0.05, 0, +0.1: mean 0.075, squares of the deviations sum to 0.0125, / 3 ->
    # std 0.065; 0 is no win. Unannotated: +0.05, +0.05: mean 0.05, std 0.
    assert "| suggested − random | +0.075 ± 0.065 (wins 3/4) | +0.050 ± 0.000 (wins 2/2) |" in markdown
    assert "test volumes, the same for every arm, is the fair comparison" in markdown
    # Per seed, test = mean of t0 and t1 / unannotated = c0, in the order start, suggested, even, random.
    assert "| seed | start | suggested | even | random |" in markdown
    assert "| 0 | 0.550 / 0.500 | 0.750 / 0.700 | 0.650 / 0.600 | 0.650 / 0.650 |" in markdown
    assert "| 1 | 0.500 / 0.400 | 0.600 / 0.500 | 0.600 / 0.550 | 0.550 / 0.450 |" in markdown
    assert "| case | slices | start | + suggested | + even | + random |" in markdown
    assert "| a | 12 | 3, 9 | 1, 6 | 6 | 0 |" in markdown and "| b | 12 | 3, 9 | — | 6 | 11 |" in markdown
    assert markdown.count("Seed 0:") == 1 and markdown.count("Seed 1:") == 1
    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert len(rows) == len(summary["rows"]) == 8  # one per run: the fake runs have no per-class Dice
    row = next(r for r in rows if r["arm"] == SUGGESTED and r["seed"] == "0")
    assert (row["annotated_count"], float(row["test_dice"]), float(row["unannotated_dice"])) == ("6", 0.75, 0.7)


# ---- bad input


def _annotate(tmp_path, *arguments) -> int:
    return main(["benchmark", "annotate", "--out", str(tmp_path / "loop"), *arguments])


@pytest.mark.parametrize("arguments, message", [
    (["--start", "0"], "invalid --start 0: give 1 or more slices"),
    (["--add", "0"], "invalid --add 0: give 1 or more slices"),
    (["--min-gap", "-1"], "invalid --min-gap -1: give 0 or more slices"),
])
def test_bad_counts_are_one_error_line_and_write_nothing(tmp_path, capsys, arguments, message):
    assert _annotate(tmp_path, *arguments) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"nnunet-ext: error: {message}"]
    assert not (tmp_path / "loop").exists()


def test_more_slices_than_a_case_has_is_one_error_line_and_writes_nothing(tmp_path, capsys):
    # cell_003 has 10 slices, the others 12; the held-out cell_002 is no training case.
    source = write_dense_dataset(tmp_path / "Dataset001_Cells", lengths={"cell_003": 10})
    assert _annotate(tmp_path, "--dense", str(source), "--start", "8", "--add", "3") == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == ["nnunet-ext: error: cell_003 has 10 slices along axis 0: --start 8 + --add 3 = 11 annotated "
                     "slices per case do not fit; lower --start or --add"]
    assert not (tmp_path / "loop").exists()


def test_the_models_score_is_refused_for_stock_nnunet():
    with pytest.raises(UserError, match="choose entropy or mirror"):
        AnnotationLoop(score="models")


def test_slice_counts_of_a_recipe_are_checked_before_writing():
    check_slice_counts({"x": 5, "y": 4}, AnnotationLoop(start=2, add=2))  # 2 + 2 fit into 4
    with pytest.raises(UserError, match="y has 4 slices along axis 0: --start 3 \\+ --add 2 = 5"):
        check_slice_counts({"x": 5, "y": 4}, AnnotationLoop(start=3, add=2))
    assert set(recipes.training_slice_counts("synth", None).values()) == {recipes.SYNTH_CASES["shape"][0]}


DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not (DATA / "vesselnn").is_dir(), reason="../shared/data/vesselnn is not available")
def test_vesselnn_slice_counts_are_those_of_its_training_volumes():
    counts = recipes.training_slice_counts("vesselnn", DATA / "vesselnn")
    # 9 volumes, every third one a test volume (test_benchmark.test_vesselnn_recipe lists them).
    assert len(counts) == 6 and not {"burgess2014_noisySparseVessels", "poon2015_BBB_noLeakage",
                                     "santos2015_mixedSizelowContrastVessels"} & set(counts)
    assert counts["burgess2014_lowerRes_hiSNR"] == 26  # its label volume, as the recipe writes it


@pytest.mark.skipif(not (DATA / "gala_fibsem").is_dir(), reason="../shared/data/gala_fibsem is not available")
def test_gala_slice_counts_are_those_of_its_training_tiles():
    # 4 tiles along x of the 50-slice volume, the last one held out (test_benchmark.test_gala_recipe).
    assert recipes.training_slice_counts("gala_fibsem", DATA / "gala_fibsem") == {
        "gala_000": 50, "gala_001": 50, "gala_002": 50}


# ---- the loop with nnU-Net replaced by fakes


class FakeNnunet:
    """Stands in for preprocessing, training and suggest: datasets are written (no planning), runs write results."""

    def __init__(self, suggestions: dict[int, list[tuple[str, int]]]):
        self.suggestions = suggestions
        self.trained, self.suggested = [], []
        self.fail = set()

    def prepare_keyed_dataset(self, folder, key, write, description, record):
        dataset_id = folder.dataset_id(key)
        found = sorted(folder.raw.glob(f"Dataset{dataset_id:03d}_*")) if folder.raw.is_dir() else []
        return found[0] if found else write(dataset_id, "".join(c for c in key.title() if c.isalnum()))

    def train_and_score(self, folder, raw, seed, trainer, run, labels):
        self.trained.append((labels["arm"], seed))
        if (labels["arm"], seed) in self.fail:
            raise RuntimeError("training crashed")
        aggregate = {"mean": {"dice": 0.5, "dice_unannotated": 0.5, "dice_annotated": 1.0}}
        result = {"trainer": trainer, **labels, "seed": seed, "dataset": raw.name, "minutes": 1.0,
                  "test": {"aggregate": aggregate, "cases": {"cell_002": 0.5}},
                  "train": {"aggregate": aggregate, "cases": {"cell_000": 0.5}}}
        run.mkdir(parents=True, exist_ok=True)
        (run / "result.json").write_text(json.dumps(result))
        return result

    def run_suggest(self, folder, raw, loop, seed, k, out):
        self.suggested.append((seed, k))
        out.mkdir(parents=True)
        with open(out / "suggestions.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["rank", "case", "axis", "slice", "score", "score_name"])
            for rank, (case, index) in enumerate(self.suggestions[seed], 1):
                writer.writerow([rank, case, 0, index, 1.0 / rank, "entropy"])


@pytest.fixture
def fake_nnunet(monkeypatch, no_verify):
    # Start slices of 12 with --start 2: floor((2i + 1) x 12 / 4) = 3 and 9. K = 1 x 3 training cases.
    fake = FakeNnunet({0: [("cell_000", 0), ("cell_000", 6), ("cell_001", 11)],
                       1: [("cell_003", 5), ("cell_001", 0), ("cell_000", 11)]})
    for module in (benchmark, loop_module):  # prepare_dataset (accuracy) and the arms' datasets (annotation_loop)
        monkeypatch.setattr(module, "prepare_keyed_dataset", fake.prepare_keyed_dataset)
    monkeypatch.setattr(loop_module, "train_and_score", fake.train_and_score)
    monkeypatch.setattr(loop_module, "run_suggest", fake.run_suggest)
    return fake


def test_the_loop_builds_each_arm_at_equal_count_and_resumes(tmp_path, fake_nnunet, capsys):
    source = write_dense_dataset(tmp_path / "Dataset001_Cells")
    command = ["--dense", str(source), "--start", "2", "--add", "1", "--seeds", "0", "1"]
    assert _annotate(tmp_path, *command) == 0
    out = tmp_path / "loop"
    assert fake_nnunet.suggested == [(0, 3), (1, 3)]
    assert sorted(fake_nnunet.trained) == sorted((arm, seed) for arm in ARMS for seed in (0, 1))

    def raw_of(arm, seed):
        result = json.loads((out / "runs" / "slices2" / f"seed{seed}" / arm / "result.json").read_text())
        return out / "nnUNet_raw" / result["dataset"], result

    start = {case: [3, 9] for case in TRAINING}
    expected = {(SUGGESTED, 0): {"cell_000": [0, 3, 6, 9], "cell_001": [3, 9, 11], "cell_003": [3, 9]},
                (SUGGESTED, 1): {"cell_000": [3, 9, 11], "cell_001": [0, 3, 9], "cell_003": [3, 5, 9]},
                # Runs 0..2 (3), 4..8 (5), 10..11 (2): the middle of 4..8 is 6.
                (EVEN, 0): {case: [3, 6, 9] for case in TRAINING}}
    for seed in (0, 1):
        for arm in ARMS:
            raw, result = raw_of(arm, seed)
            plan = json.loads((raw / "dataset.json").read_text())["annotated_slices"]
            assert sorted(plan) == TRAINING and result["annotated"] == plan
            assert annotation_count(plan) == result["annotated_count"] == (6 if arm == "start" else 9)
            assert all(set(start[case]) <= set(plan[case]) for case in TRAINING)
            if (arm, seed) in expected:
                assert plan == expected[arm, seed]
            for case in TRAINING:
                assert labelled_slices(raw, case) == plan[case]
    assert raw_of(EVEN, 0)[0] == raw_of(EVEN, 1)[0]  # the even slices do not depend on the seed
    assert raw_of(RANDOM, 0)[0] != raw_of(RANDOM, 1)[0] and raw_of(SUGGESTED, 0)[0] != raw_of(SUGGESTED, 1)[0]
    assert "| cell_000 | 12 | 3, 9 | 0, 6 | 6 |" in (out / "results.md").read_text()

    fake_nnunet.trained.clear()
    fake_nnunet.suggested.clear()
    assert _annotate(tmp_path, *command) == 0  # everything finished: read back
    assert fake_nnunet.trained == [] and fake_nnunet.suggested == []

    capsys.readouterr()
    assert _annotate(tmp_path, *command[:3], "3", *command[4:]) == 2
    assert "other settings (start: 2 there, 3 now)" in capsys.readouterr().err


def test_a_failed_run_exits_non_zero_and_only_it_is_retried(tmp_path, fake_nnunet, capsys):
    source = write_dense_dataset(tmp_path / "Dataset001_Cells")
    command = ["--dense", str(source), "--start", "2", "--add", "1", "--seeds", "0", "1"]
    fake_nnunet.fail = {(RANDOM, 1)}
    assert _annotate(tmp_path, *command) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("nnunet-ext: error: 1 of 8 runs failed")
    markdown = (tmp_path / "loop" / "results.md").read_text()
    assert "- random seed 1: the run failed: training crashed" in markdown

    fake_nnunet.fail, fake_nnunet.trained = set(), []
    assert _annotate(tmp_path, *command) == 0
    assert fake_nnunet.trained == [(RANDOM, 1)]
    assert "Failed runs" not in (tmp_path / "loop" / "results.md").read_text()


def test_a_failed_start_run_fails_every_arm_of_its_seed(tmp_path, fake_nnunet, capsys):
    source = write_dense_dataset(tmp_path / "Dataset001_Cells")
    fake_nnunet.fail = {("start", 0)}
    assert _annotate(tmp_path, "--dense", str(source), "--start", "2", "--add", "1", "--seeds", "0") == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("nnunet-ext: error: 4 of 4 runs failed")
    assert fake_nnunet.trained == [("start", 0)] and fake_nnunet.suggested == []
    markdown = (tmp_path / "loop" / "results.md").read_text()
    assert all(f"- {arm} seed 0: the start run failed: training crashed" in markdown for arm in ARMS)


# ---- through the real commands


@pytest.mark.integration
def test_the_annotation_loop_through_the_real_commands(tmp_path, monkeypatch, benchmark_shell):
    """`benchmark annotate` on a tiny dense dataset: planning, training, prediction and `nnunet-ext suggest`
    through the real commands; one seed, one epoch. Only the start and suggested arms run (each run costs about a
    minute of nnU-Net start-ups): the even and random arms write and train their datasets through the same code,
    and the fake-nnU-Net test above covers their slices."""
    monkeypatch.setattr(loop_module, "ADDED_ARMS", (SUGGESTED,))
    monkeypatch.setattr(loop_module, "ARMS", ("start", SUGGESTED))
    source = write_dense_dataset(tmp_path / "Dataset001_Cells")
    out = tmp_path / "loop"
    command = ["benchmark", "annotate", "--dense", str(source), "--out", str(out), "--start", "2", "--add", "1",
               "--seeds", "0", "--epochs", "1", "--iterations", "2", "--no-topology"]
    assert main(command) == 0

    rows = list(csv.DictReader(open(out / "summary.csv")))
    arms = ("start", SUGGESTED)
    assert {(r["arm"], r["class"]) for r in rows} == {(arm, name) for arm in arms for name in ("mean", "cell")}
    # 3 training cases (cell_002 is held out) x 2 start slices; the suggested arm adds 1 x 3.
    assert {r["arm"]: r["annotated_count"] for r in rows} == {"start": "6", SUGGESTED: "9"}
    for row in rows:
        for column in ("test_dice", "unannotated_dice", "annotated_dice"):
            assert 0.0 <= float(row[column]) <= 1.0
    markdown = (out / "results.md").read_text()
    assert "| start | 1 | 6 |" in markdown and "| suggested | 1 | 9 |" in markdown
    assert "| suggested − even | n/a | n/a |" in markdown  # no even run to pair with
    assert "| cell_000 | 12 | 3, 9 | " in markdown

    runs = out / "runs" / "slices2" / "seed0"
    suggestions = list(csv.DictReader(open(runs / SUGGESTED / "suggestions" / "suggestions.csv")))
    assert len(suggestions) == 3 and {row["score_name"] for row in suggestions} == {"entropy"}
    suggested = {case: sorted(int(r["slice"]) for r in suggestions if r["case"] == case) for case in TRAINING}
    for arm in arms:
        result = json.loads((runs / arm / "result.json").read_text())
        raw = out / "nnUNet_raw" / result["dataset"]
        plan = json.loads((raw / "dataset.json").read_text())["annotated_slices"]
        assert annotation_count(plan) == (6 if arm == "start" else 9)
        assert set(result["test"]["cases"]) == {"cell_002"} and set(result["train"]["cases"]) == set(TRAINING)
        for case in TRAINING:
            assert labelled_slices(raw, case) == plan[case]
            assert {3, 9} <= set(plan[case])
            if arm == SUGGESTED:
                assert sorted(set(plan[case]) - {3, 9}) == suggested[case]

    finished = (runs / SUGGESTED / "result.json").stat().st_mtime_ns
    assert main(command) == 0  # everything finished: nothing is redone
    assert (runs / SUGGESTED / "result.json").stat().st_mtime_ns == finished
