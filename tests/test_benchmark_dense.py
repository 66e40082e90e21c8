"""``nnunet-ext benchmark --dense``, ``benchmark converge``, input validation and exit codes, results.md tables."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

import nnunet_ext.benchmarking.accuracy as benchmark
from nnunet_ext.benchmarking.accuracy import BenchmarkSettings, run_benchmark, run_convergence
from nnunet_ext.benchmarking.recipes import dense_test_split, held_out_cases, write_dense
from nnunet_ext.cli import main
from nnunet_ext.datasets.raw_dataset import dataset_json, write_image
from nnunet_ext.errors import UserError

CASES = [f"cell_{i:03d}" for i in range(4)]
SHAPE = (12, 24, 24)


def write_dense_tiff_dataset(folder: Path, cases=CASES, shape=SHAPE, test_volumes: int = 0) -> Path:
    """A dense TIFF dataset: 2 channels, background + 2 classes (a slab of class 1, a ball of class 2)."""
    rng = np.random.default_rng(0)
    for sub in ("imagesTr", "labelsTr") + (("imagesTs", "labelsTs") if test_volumes else ()):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    z, y, x = np.indices(shape)
    names = [(case, "Tr") for case in cases] + [(f"test_{i}", "Ts") for i in range(test_volumes)]
    for index, (case, split) in enumerate(names):
        label = np.zeros(shape, np.uint8)
        label[:, 4 + index:10 + index, :] = 1
        label[(z - 6) ** 2 + (y - 16) ** 2 + (x - 14 + index) ** 2 <= 16] = 2
        for channel in (0, 1):
            signal = (label == channel + 1) * 200.0 + (label > 0) * 50.0
            image = (signal + rng.normal(0, 10, shape)).astype(np.float32)
            write_image(image, folder / f"images{split}" / case, (2.0, 1.0, 1.0), "tif", channel=channel)
        write_image(label, folder / f"labels{split}" / case, (2.0, 1.0, 1.0), "tif")
    document = dataset_json("Cells", {0: "nucleus stain", 1: "membrane stain"},
                            {"background": 0, "membrane": 1, "nucleus": 2}, len(cases), "tif")
    (folder / "dataset.json").write_text(json.dumps(document))
    return folder


@pytest.mark.parametrize("count, expected", [
    (None, ["c", "f"]),  # every third case
    (1, ["g"]),  # 7 / 1: the last
    (3, ["b", "d", "g"]),  # steps of 7 / 3 = 2.33: indices 1, 3, 6
])
def test_held_out_cases(count, expected):
    assert held_out_cases(list("gfedcba"), count) == expected


def test_held_out_cases_keep_one_to_train_on():
    assert held_out_cases(["a", "b"], None) == ["b"]  # fewer than three cases: the last one
    with pytest.raises(UserError, match="hold out 1 to 1"):
        held_out_cases(["a", "b"], 2)


def test_dense_test_split(tmp_path):
    source = write_dense_tiff_dataset(tmp_path / "Dataset001_Cells")
    document, ending, train, held = dense_test_split(source, None)
    assert (ending, train, held) == (".tif", ["cell_000", "cell_001", "cell_003"], ["cell_002"])
    assert dense_test_split(source, 2)[2:] == (["cell_000", "cell_002"], ["cell_001", "cell_003"])
    with_tests = write_dense_tiff_dataset(tmp_path / "Dataset002_Cells", test_volumes=1)
    assert dense_test_split(with_tests, None)[2:] == (CASES, [])
    with pytest.raises(UserError, match="drop --test-cases"):
        dense_test_split(with_tests, 1)


def test_a_sparse_dataset_is_refused_as_dense(tmp_path):
    source = write_dense_tiff_dataset(tmp_path / "Dataset001_Cells")
    document = json.loads((source / "dataset.json").read_text())
    (source / "dataset.json").write_text(json.dumps({**document, "labels": {**document["labels"], "ignore": 3}}))
    with pytest.raises(UserError, match="not dense"):
        BenchmarkSettings(recipe="dense", data=str(source))


def test_the_dense_copy_holds_out_test_volumes_with_their_spacing_files(tmp_path):
    source = write_dense_tiff_dataset(tmp_path / "source" / "Dataset001_Cells")
    folder = write_dense("dense", source, tmp_path / "raw", 100, "DenseCopy")
    assert sorted(p.name for p in (folder / "imagesTs").iterdir()) == ["cell_002.json", "cell_002_0000.tif",
                                                                       "cell_002_0001.tif"]
    assert sorted(p.name for p in (folder / "labelsTs").iterdir()) == ["cell_002.json", "cell_002.tif"]
    assert len(list((folder / "labelsTr").glob("*.tif"))) == 3
    document = json.loads((folder / "dataset.json").read_text())
    assert document["numTraining"] == 3 and document["overwrite_image_reader_writer"] == "Tiff3DIO"
    np.testing.assert_array_equal(tifffile.imread(folder / "labelsTs" / "cell_002.tif"),
                                  tifffile.imread(source / "labelsTr" / "cell_002.tif"))


def _cli_out(tmp_path, *arguments):
    return main(["benchmark", "--out", str(tmp_path / "bench"), *arguments])


def test_a_missing_data_folder_fails_before_anything_is_written(tmp_path, capsys):
    assert _cli_out(tmp_path, "--recipe", "vesselnn", "--data", str(tmp_path / "nonexistent")) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "is not a folder" in error[0]
    assert not (tmp_path / "bench").exists()


def test_an_hdf5_file_without_the_key_fails_before_anything_is_written(tmp_path, capsys):
    import h5py

    for name in ("train-image.h5", "train-gt.lzf.h5"):
        with h5py.File(tmp_path / name, "w") as f:
            f["volume"] = np.zeros((2, 2, 2), np.uint8)
    assert _cli_out(tmp_path, "--recipe", "gala_fibsem", "--data", str(tmp_path)) == 2
    assert "no dataset 'stack' (found: volume)" in capsys.readouterr().err
    assert not (tmp_path / "bench").exists()


def test_an_out_folder_below_a_file_is_refused_before_anything_runs(tmp_path, capsys):
    (tmp_path / "file").write_text("keep")
    assert main(["benchmark", "--out", str(tmp_path / "file" / "bench"), "--no-2d"]) == 2
    assert "is not a folder but a file" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "keep"


def test_dense_and_recipe_exclude_each_other(tmp_path, capsys):
    assert _cli_out(tmp_path, "--dense", str(tmp_path), "--recipe", "synth") == 2
    assert "--dense replaces --recipe" in capsys.readouterr().err


def test_a_benchmark_whose_runs_all_fail_exits_non_zero(tmp_path, monkeypatch, capsys):
    def failing_run(folder, raw, sparsity, seed, trainer):
        raise RuntimeError("training crashed")

    monkeypatch.setattr(benchmark, "prepare_dataset", lambda folder, sparsity, seed: tmp_path / "raw")
    monkeypatch.setattr(benchmark, "run_one", failing_run)
    assert _cli_out(tmp_path, "--trainers", "MeanTeacherTrainer", "--sparsity", "every:4", "--seeds", "0",
                    "--no-2d") == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("nnunet-ext: error: 2 of 2 runs failed")
    assert "## Failed runs" in (tmp_path / "bench" / "results.md").read_text()


def two_class_result(trainer, seed, membrane, nucleus, minutes=2.0):
    """A run's result with per-class Dice; the class mean is their mean, the distance curve falls with it."""
    def aggregate(part):
        classes = {"membrane": {"dice": membrane, "dice_unannotated": membrane, "dice_annotated": 1.0},
                   "nucleus": {"dice": nucleus, "dice_unannotated": nucleus, "dice_annotated": 1.0}}
        mean = (membrane + nucleus) / 2
        return {**classes, "mean": {"dice": mean, "dice_unannotated": mean, "dice_annotated": 1.0,
                                    **({"dice_by_distance": {"0": 1.0, "1": mean}} if part == "train" else {})}}

    return {"trainer": trainer, "sparsity": "every4", "seed": seed, "dataset": "Dataset100_X", "minutes": minutes,
            "test": {"aggregate": aggregate("test"), "cases": {"t0": (membrane + nucleus) / 2}},
            "train": {"aggregate": aggregate("train"), "cases": {"c0": (membrane + nucleus) / 2}}}


def test_results_name_the_better_stock_configuration_per_class_and_by_distance(tmp_path, monkeypatch):
    dice = {"nnUNetTrainer": (0.6, 0.4), "nnUNetTrainer@2d": (0.7, 0.5), "nnUNetTrainer@attention": (0.6, 0.6),
            "MeanTeacherTrainer@attention": (0.8, 0.6)}

    def fake_run(folder, raw, sparsity, seed, trainer):
        r = two_class_result(trainer, seed, *dice[trainer])
        benchmark._write_json(folder.run_folder(sparsity, seed, trainer) / "result.json", r)
        return r

    monkeypatch.setattr(benchmark, "prepare_dataset", lambda folder, sparsity, seed: tmp_path / "raw")
    monkeypatch.setattr(benchmark, "run_one", fake_run)
    settings = BenchmarkSettings(trainers=["MeanTeacherTrainer@attention"], sparsities=["every:4"], seeds=[0])
    summary = run_benchmark(tmp_path / "bench", settings)
    markdown = (tmp_path / "bench" / "results.md").read_text()
    # Stock 2d (mean 0.6) beats stock 3d_fullres (0.5) on the unannotated slices.
    assert "Better stock configuration: `nnUNetTrainer@2d` (Dice unannotated slices 0.600, test volumes 0.600); " \
           "`nnUNetTrainer` (Dice unannotated slices 0.500" in markdown
    assert "`nnUNetTrainer@2d` − `nnUNetTrainer` on the same pairs: Dice unannotated slices +0.100 ± n/a (wins 1/1), " \
           "test volumes +0.100 ± n/a (wins 1/1)." in markdown
    # Mean Teacher on attention plans is paired with stock on attention plans: 0.7 - 0.6.
    assert "| MeanTeacherTrainer@attention | 1 | 0.700 | 0.700 | 1.000 | 2.0 | `nnUNetTrainer@attention` | " \
           "+0.100 ± n/a (wins 1/1)" in markdown
    assert "| nnUNetTrainer@attention | 1 | 0.600 | 0.600 | 1.000 | 2.0 | `nnUNetTrainer` | +0.100" in markdown
    assert "| arm | membrane | nucleus | mean |" in markdown
    assert "| MeanTeacherTrainer@attention | 0.800 / 0.800 | 0.600 / 0.600 | 0.700 / 0.700 |" in markdown
    assert "| arm | 0 | 1 |" in markdown and "| nnUNetTrainer@2d | 1.000 | 0.600 |" in markdown
    rows = list(csv.DictReader(open(tmp_path / "bench" / "summary.csv")))
    mine = {r["class"]: r for r in rows if r["trainer"] == "MeanTeacherTrainer@attention"}
    assert float(mine["nucleus"]["test_dice"]) == 0.6 and float(mine["mean"]["test_dice"]) == 0.7
    assert mine["mean"]["reference"] == "nnUNetTrainer@attention"
    assert len(summary["rows"]) == 4 * 3


def test_the_better_stock_line_shows_when_the_test_volumes_rank_the_other_way(tmp_path, monkeypatch):
    # (unannotated, test) Dice per seed: 2d leads on the unannotated slices, 3d_fullres on the test volumes.
    dice = {("nnUNetTrainer", 0): (0.70, 0.66), ("nnUNetTrainer", 1): (0.70, 0.66),
            ("nnUNetTrainer@2d", 0): (0.71, 0.60), ("nnUNetTrainer@2d", 1): (0.73, 0.62)}

    def fake_run(folder, raw, sparsity, seed, trainer):
        unannotated, test = dice[trainer, seed]
        r = {"trainer": trainer, "sparsity": sparsity.label, "seed": seed, "dataset": "Dataset100_X", "minutes": 1.0,
             "test": {"aggregate": {"mean": {"dice": test}}, "cases": {"t0": test}},
             "train": {"aggregate": {"mean": {"dice_unannotated": unannotated, "dice_annotated": 0.9}},
                       "cases": {"c0": unannotated}}}
        benchmark._write_json(folder.run_folder(sparsity, seed, trainer) / "result.json", r)
        return r

    monkeypatch.setattr(benchmark, "prepare_dataset", lambda folder, sparsity, seed: tmp_path / "raw")
    monkeypatch.setattr(benchmark, "run_one", fake_run)
    run_benchmark(tmp_path / "bench", BenchmarkSettings(trainers=[], sparsities=["every:4"], seeds=[0, 1]))
    markdown = (tmp_path / "bench" / "results.md").read_text()
    assert "Better stock configuration: `nnUNetTrainer@2d` (Dice unannotated slices 0.720, test volumes 0.610)" \
        in markdown
    # Differences +0.01 and +0.03 (std 0.014) on the unannotated slices, -0.06 and -0.04 on the test volumes.
    assert "`nnUNetTrainer@2d` − `nnUNetTrainer` on the same pairs: Dice unannotated slices +0.020 ± 0.014 " \
           "(wins 2/2), test volumes -0.050 ± 0.014 (wins 0/2)." in markdown


def test_convergence_stops_at_the_first_budget_that_gains_too_little(tmp_path, monkeypatch):
    annotated = {10: 0.80, 20: 0.85, 40: 0.853, 80: 0.86}
    trained = []

    def fake_run(folder, raw, sparsity, seed, trainer):
        epochs = folder.settings.epochs
        trained.append(epochs)
        aggregate = {"mean": {"dice": 0.5, "dice_unannotated": annotated[epochs] - 0.1,
                              "dice_annotated": annotated[epochs]}}
        r = {"trainer": trainer, "sparsity": sparsity.label, "seed": seed, "dataset": "Dataset100_X",
             "minutes": epochs / 10, "test": {"aggregate": aggregate}, "train": {"aggregate": aggregate}}
        benchmark._write_json(folder.run_folder(sparsity, seed, trainer) / "result.json", r)
        return r

    monkeypatch.setattr(benchmark, "prepare_dataset", lambda folder, sparsity, seed: tmp_path / "raw")
    monkeypatch.setattr(benchmark, "run_one", fake_run)
    settings = BenchmarkSettings(trainers=[], reference_2d=False, iterations=5)
    study = run_convergence(tmp_path / "conv", settings, [40, 10, 20, 80])
    # Gains: 20 over 10 +0.05, 40 over 20 +0.003 < 0.005: converged at 40; 80 is not trained.
    assert trained == [10, 20, 40] and study["converged_epochs"] == 40
    markdown = (tmp_path / "conv" / "converge.md").read_text()
    assert "| 40 x 5 | 200 | 0.853 | +0.003 | 0.753 | 0.500 | 4.0 |" in markdown
    assert "Converged at **40 epochs x 5 iterations** (200 steps)" in markdown
    assert (tmp_path / "conv" / "converge.png").is_file()
    assert (tmp_path / "conv" / "runs" / "every4" / "seed0" / "nnUNetTrainer_bench20x5" / "result.json").is_file()

    trained.clear()
    assert run_convergence(tmp_path / "conv", settings, [10, 20, 40, 80], stop_when_converged=False)[
        "converged_epochs"] == 40
    assert trained == [80]  # the finished budgets are read back


@pytest.mark.integration
def test_a_dense_tiff_benchmark_with_attention_2d_ensemble_and_pseudo_label_arms(tmp_path, benchmark_shell):
    """One benchmark through the real nnU-Net commands (one run, as each costs minutes of nnU-Net start-up): --dense
    on a 2-channel, 2-class TIFF dataset without test volumes; stock 3d_fullres and 2d, nnU-Net's ensemble of both,
    stock and Mean Teacher on attention plans, and Castelli et al.'s 2D-to-3D pseudo-label arm through
    `nnunet-ext pseudolabels`."""
    source = write_dense_tiff_dataset(tmp_path / "Dataset001_Cells")
    out = tmp_path / "bench"
    command = ["benchmark", "--dense", str(source), "--out", str(out), "--trainers", "MeanTeacherTrainer@attention",
               "PseudoLabelWeightedTrainer", "nnUNetTrainer@2d+3d_fullres", "--sparsity", "every:4", "--seeds", "0", "--epochs", "1",
               "--iterations", "2", "--attention-stages", "1", "--no-topology"]
    assert main(command) == 0
    arms = ("nnUNetTrainer", "nnUNetTrainer@2d", "nnUNetTrainer@attention", "MeanTeacherTrainer@attention",
            "PseudoLabelWeightedTrainer", "nnUNetTrainer@2d+3d_fullres")
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert {(r["trainer"], r["class"]) for r in rows} == {
        (arm, name) for arm in arms for name in ("mean", "membrane", "nucleus")}
    for row in rows:
        for column in ("test_dice", "unannotated_dice", "annotated_dice"):
            assert 0.0 <= float(row[column]) <= 1.0
    assert {r["reference"] for r in rows if r["trainer"] == "MeanTeacherTrainer@attention"} == \
        {"nnUNetTrainer@attention"}
    markdown = (out / "results.md").read_text()
    assert "| arm | membrane | nucleus | mean |" in markdown
    assert "| MeanTeacherTrainer@attention | 1 |" in markdown and "`nnUNetTrainer@attention` | " in markdown
    assert "| nnUNetTrainer@2d | 1 |" in markdown and "| PseudoLabelWeightedTrainer | 1 |" in markdown

    runs = out / "runs" / "every4" / "seed0"
    attention = json.loads((runs / "MeanTeacherTrainer@attention" / "result.json").read_text())
    assert attention["plans"] == "nnUNetPlans_tiny_axialattn" and set(attention["test"]["cases"]) == {"cell_002"}
    assert set(attention["train"]["cases"]) == {"cell_000", "cell_001", "cell_003"}  # fold all validates every case
    plans = json.loads(next((out / "nnUNet_preprocessed").glob("Dataset*/nnUNetPlans_tiny_axialattn.json"))
                       .read_text())
    assert plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"].endswith(
        "AxialAttentionPlainConvUNet")
    assert (runs / "MeanTeacherTrainer@attention" / "test_predictions" / "cell_002.tif").is_file()
    two_d = json.loads((runs / "nnUNetTrainer@2d" / "result.json").read_text())
    assert two_d["configuration"] == "2d" and set(two_d["test"]["cases"]) == {"cell_002"}

    pseudo = runs / "PseudoLabelWeightedTrainer" / "result.json"
    saved = json.loads(pseudo.read_text())
    assert saved["trained_as"] == "PseudoLabelWeightedTrainer_bench1x2" and saved["configuration"] == "3d_fullres"
    results = out / "nnUNet_results" / "seed0"
    assert next(results.glob("Dataset*/PseudoLabelWeightedTrainer_bench1x2__nnUNetPlans_tiny__3d_fullres/fold_all/"
                             "checkpoint_final.pth"))
    assert next(results.glob("Dataset*/nnUNetTrainer_bench1x2__nnUNetPlans_tiny__2d/fold_all/checkpoint_final.pth"))
    record = json.loads(next((out / "nnUNet_preprocessed").glob(
        "Dataset*/*_3d_fullres_pseudolabels/fold_all/pseudolabels.json")).read_text())
    assert "nnUNetTrainer_bench1x2" in json.dumps(record["source"])

    # The ensemble arm trains nothing: it is the argmax of the mean of its two members' probabilities.
    ensemble = runs / "nnUNetTrainer@2d+3d_fullres"
    saved = json.loads((ensemble / "result.json").read_text())
    assert saved["trained_as"] == ["nnUNetTrainer_bench1x2"] * 2 and saved["configuration"] == "2d+3d_fullres"
    assert set(saved["train"]["cases"]) == {"cell_000", "cell_001", "cell_003"}
    for name, case in (("test_predictions", "cell_002"), ("train_predictions", "cell_001")):
        members = [np.load(ensemble / "members" / member / name / f"{case}.npz")["probabilities"]
                   for member in ("nnUNetTrainer@2d", "nnUNetTrainer")]
        assert not np.allclose(members[0], members[1])  # two different models
        mean = (members[0] + members[1]) / 2
        assert np.array_equal(tifffile.imread(ensemble / name / f"{case}.tif"), mean.argmax(0))

    modified = pseudo.stat().st_mtime_ns
    assert main(command) == 0  # everything finished: nothing is redone
    assert pseudo.stat().st_mtime_ns == modified


def test_a_dense_dataset_gets_default_levels_and_the_fallback_budget(tmp_path):
    source = write_dense_tiff_dataset(tmp_path / "Dataset001_Cells")
    settings = BenchmarkSettings(recipe="dense", data=str(source))
    assert settings.sparsities == ["every:4", "every:8"] and not settings.budget_measured
    assert (settings.epochs, settings.iterations) == (benchmark.FALLBACK_EPOCHS, benchmark.FALLBACK_ITERATIONS)
