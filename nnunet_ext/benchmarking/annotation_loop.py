"""``nnunet-ext benchmark annotate``: are the slices ``nnunet-ext suggest`` picks worth more than evenly spaced or
random ones, at the same number of annotated slices?

A simulated annotation loop per seed, on the benchmark's data (its recipes or ``--dense``; test volumes as the
benchmark holds them out), along axis 0 as the benchmark annotates:

1. ``start``: ``--start`` N evenly spaced annotated slices per training case (the benchmark's ``slices:N``
   dataset); stock nnU-Net is trained on it and scored;
2. ``nnunet-ext suggest`` on that model (through the real command) picks K = ``--add`` x (training cases)
   unannotated slices over all cases, as many in a case as its ranking gives;
3. three datasets with the same total of annotated slices: start + the suggested slices (``suggested``), start +
   ``--add`` slices per case, each at the middle of the longest run of unannotated slices (``even``), start +
   ``--add`` random unannotated slices per case drawn with the seed (``random``);
4. stock nnU-Net trained from scratch on each, with the same budget, and scored like a benchmark run.

Everything lives under ``--out`` in the benchmark's layout (``accuracy.BenchmarkFolder``): datasets are written
and preprocessed once, runs under ``runs/slices<N>/seed<S>/<arm>``, the suggestions in the suggested arm's folder;
finished runs are read back, a failing one is recorded in its ``error.txt``. ``results.md`` and ``summary.csv``
are rewritten after every seed.
"""

import csv
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nnunet_ext.annotation_axis import ANNOTATED_SLICES_KEY, DATASET_JSON_KEY
from nnunet_ext.benchmarking.accuracy import (
    DEFAULT_SEEDS,
    FOLD,
    MAIN_COLUMNS,
    REFERENCE,
    SEED_P_NOTE,
    SUMMARY_METRICS,
    BenchmarkFolder,
    BenchmarkSettings,
    add_data_arguments,
    add_training_arguments,
    classes_of,
    common_settings,
    fmt,
    fmt_mean_std,
    fmt_paired,
    mean_std,
    metric_of,
    paired_difference,
    prepare_dataset,
    prepare_keyed_dataset,
    record_failure,
    train_and_score,
    write_rows,
)
from nnunet_ext.benchmarking.commands import run_logged
from nnunet_ext.benchmarking.recipes import DENSE, RECIPES, Sparsity, training_slice_counts
from nnunet_ext.datasets.sparsify import DENSE_FOLDER, label_shape, reannotate_dataset
from nnunet_ext.errors import UserError
from nnunet_ext.evaluation import MEAN
from nnunet_ext.slice_suggestion import SUGGESTIONS_CSV

START, SUGGESTED, EVEN, RANDOM = "start", "suggested", "even", "random"
ADDED_ARMS = (SUGGESTED, EVEN, RANDOM)
ARMS = (START, *ADDED_ARMS)
KIND = "annotate"
ANNOTATION_AXIS = 0  # the axis the benchmark's datasets are annotated along (sparsify's and synth's default)
DEFAULT_START, DEFAULT_ADD, DEFAULT_MIN_GAP = 3, 2, 1
STOCK_SCORES = ("entropy", "mirror")  # `suggest`'s scores for a one-network checkpoint such as stock nnU-Net's
SUGGESTIONS_FOLDER = "suggestions"
RESULT = "result.json"
SUMMARY_COLUMNS = ("arm", "seed", "dataset", "annotated_count", "class", *(c for c, _, _ in SUMMARY_METRICS),
                   "minutes")

Plan = dict[str, list[int]]  # case -> annotated slice indices along the annotation axis


@dataclass(frozen=True)
class AnnotationLoop:
    """The loop's own settings: ``start`` slices per case, then ``add`` more per case in every other arm."""

    start: int = DEFAULT_START
    add: int = DEFAULT_ADD
    score: str = "entropy"
    min_gap: int = DEFAULT_MIN_GAP

    def __post_init__(self) -> None:
        for option, value, least in (("--start", self.start, 1), ("--add", self.add, 1),
                                     ("--min-gap", self.min_gap, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise UserError(f"invalid {option} {value!r}: give {least} or more slices")
        if self.score not in STOCK_SCORES:
            raise UserError(f"invalid --score {self.score!r}: the loop trains stock nnU-Net, whose checkpoint holds "
                            f"one network; choose {' or '.join(STOCK_SCORES)}")

    @property
    def sparsity(self) -> Sparsity:
        return Sparsity(n_slices=self.start)

    def study(self) -> dict:
        """What a resumed ``--out`` folder must share besides the benchmark settings."""
        return {"kind": KIND, "start": self.start, "add": self.add, "score": self.score, "min_gap": self.min_gap}


# --------------------------------------------------------------------------------------------- choosing slices


def largest_gap_midpoint(length: int, annotated: Iterable[int]) -> int:
    """The middle slice (the lower one of two) of the longest run of unannotated slices among ``length``; the
    first such run on ties. Runs before the first and after the last annotated slice count too."""
    taken = set(annotated)
    best_first, best_size, run_first = 0, 0, None
    for index in range(length + 1):
        if index < length and index not in taken:
            run_first = index if run_first is None else run_first
            continue
        if run_first is not None and index - run_first > best_size:
            best_first, best_size = run_first, index - run_first
        run_first = None
    if best_size == 0:
        raise UserError(f"all {length} slices are annotated: there is no gap to fill; lower --start or --add")
    return best_first + (best_size - 1) // 2


def fill_largest_gaps(length: int, annotated: Iterable[int], count: int) -> list[int]:
    """``count`` slices to add, each the midpoint of the then largest gap (``largest_gap_midpoint``), sorted."""
    chosen = []
    for _ in range(count):
        chosen.append(largest_gap_midpoint(length, [*annotated, *chosen]))
    return sorted(chosen)


def random_unannotated(length: int, annotated: Iterable[int], count: int, seed: int, case_index: int) -> list[int]:
    """``count`` distinct unannotated slices drawn with ``np.random.default_rng([seed, case_index])``, sorted."""
    taken = set(annotated)
    free = [index for index in range(length) if index not in taken]
    if count > len(free):
        raise UserError(f"{count} random slices asked, {len(free)} of {length} are unannotated: lower --add")
    picked = np.random.default_rng([seed, case_index]).choice(len(free), size=count, replace=False)
    return sorted(free[i] for i in picked)


def read_suggestions(path: Path, cases: Sequence[str], axis: int = ANNOTATION_AXIS) -> Plan:
    """The slices of ``suggestions.csv`` per case, sorted; every case of ``cases`` is listed (empty: none there)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    chosen = {case: [] for case in cases}
    for row in rows:
        if row["case"] not in chosen:
            raise UserError(f"{path} suggests a slice of {row['case']!r}, which is not a training case ("
                            f"{', '.join(cases)}): delete the file and rerun to suggest again")
        if int(row["axis"]) != axis:
            raise UserError(f"{path} suggests slices along axis {row['axis']}, the datasets are annotated along axis "
                            f"{axis}: delete the file and rerun to suggest again")
        chosen[row["case"]].append(int(row["slice"]))
    return {case: sorted(slices) for case, slices in chosen.items()}


def with_added(start: Mapping[str, Sequence[int]], added: Mapping[str, Sequence[int]]) -> Plan:
    """Per case the start slices and the added ones, sorted; an added slice must be new and added once."""
    unknown = sorted(set(added) - set(start))
    if unknown:
        raise UserError(f"slices were added to {unknown[0]!r}, which is not a training case")
    plan = {}
    for case, slices in start.items():
        extra = list(added.get(case, ()))
        repeated = sorted(i for i in set(extra) if extra.count(i) > 1 or i in slices)
        if repeated:
            raise UserError(f"slice {repeated[0]} of {case} is added twice or was annotated already")
        plan[case] = sorted([*slices, *extra])
    return plan


def annotation_count(plan: Mapping[str, Sequence[int]]) -> int:
    """Annotated slices over all cases."""
    return sum(len(slices) for slices in plan.values())


def check_equal_count(arm: str, plan: Mapping[str, Sequence[int]], expected: int) -> None:
    """The arms are compared at one annotation count: UserError when ``arm``'s plan has another."""
    count = annotation_count(plan)
    if count != expected:
        raise UserError(f"the {arm} arm annotates {count} slices, the comparison needs {expected} in every arm")


def check_slice_counts(counts: Mapping[str, int], loop: AnnotationLoop) -> None:
    """Every training volume must have room for --start + --add slices (checked before anything is written)."""
    volume, fewest = min(counts.items(), key=lambda item: item[1])
    if loop.start + loop.add > fewest:
        raise UserError(f"{volume} has {fewest} slices along axis {ANNOTATION_AXIS}: --start {loop.start} + --add "
                        f"{loop.add} = {loop.start + loop.add} annotated slices per case do not fit; lower --start or "
                        f"--add")


# --------------------------------------------------------------------------------------------- the loop


def arm_folder(root: Path, loop: AnnotationLoop, seed: int, arm: str) -> Path:
    """One arm's run folder, in the benchmark's layout (``runs/<sparsity>/seed<S>/<arm>``)."""
    return Path(root) / "runs" / loop.sparsity.label / f"seed{seed}" / arm


def dataset_plan(raw: Path) -> tuple[Plan, dict[str, int]]:
    """(annotated slices per case, slices per case along the annotation axis) of a sparse dataset."""
    document = json.loads((raw / "dataset.json").read_text())
    plan = {case: sorted(int(i) for i in slices) for case, slices in document[ANNOTATED_SLICES_KEY].items()}
    counts = {case: label_shape(raw / DENSE_FOLDER / f"{case}{document['file_ending']}")[document[DATASET_JSON_KEY]]
              for case in plan}
    return plan, counts


def run_suggest(folder: BenchmarkFolder, raw: Path, loop: AnnotationLoop, seed: int, k: int, out: Path) -> None:
    """``nnunet-ext suggest -n K`` with this seed's start model (stock nnU-Net, fold all), into ``out``."""
    s = folder.settings
    out.parent.mkdir(parents=True, exist_ok=True)
    run_logged(f"suggest seed {seed}", [sys.executable, "-m", "nnunet_ext.cli", "suggest", "-d", raw.name,
                                        "-c", s.configuration, "-tr", s.bench_name(REFERENCE), "-p",
                                        s.plans_identifier, "-f", FOLD, "-n", str(k), "--min-gap", str(loop.min_gap),
                                        "--score", loop.score, "--out", str(out), "-device", s.device],
               folder.seed_environment(seed), out.parent / "suggest.log", leave=False)


def suggested_slices(folder: BenchmarkFolder, raw: Path, loop: AnnotationLoop, seed: int, start: Plan) -> Plan:
    """The K = --add x cases slices suggest picks per case; suggest runs once per seed (its CSV is read back)."""
    k = loop.add * len(start)
    out = arm_folder(folder.root, loop, seed, SUGGESTED) / SUGGESTIONS_FOLDER
    if not (out / SUGGESTIONS_CSV).is_file():
        run_suggest(folder, raw, loop, seed, k, out)
    chosen = read_suggestions(out / SUGGESTIONS_CSV, sorted(start))
    if annotation_count(chosen) != k:
        raise UserError(f"suggest found {annotation_count(chosen)} of {k} slices farther than --min-gap "
                        f"{loop.min_gap} from annotated and other suggested ones: rerun with a lower --min-gap or "
                        f"--add and a new --out")
    return chosen


def added_slices(arm: str, start: Plan, counts: Mapping[str, int], loop: AnnotationLoop, seed: int) -> Plan:
    """The slices the even or random arm adds to each case."""
    if arm == EVEN:
        return {case: fill_largest_gaps(counts[case], start[case], loop.add) for case in start}
    # The case's place in sorted order picks its random stream: reproducible, and different between cases.
    return {case: random_unannotated(counts[case], start[case], loop.add, seed, index)
            for index, case in enumerate(sorted(start))}


def prepare_arm_dataset(folder: BenchmarkFolder, start_raw: Path, loop: AnnotationLoop, seed: int, arm: str,
                        plan: Plan) -> Path:
    """The raw folder of an arm's dataset (the start dataset with ``plan``), written and preprocessed once."""
    s = folder.settings
    # The even slices follow from the start dataset alone; suggested (the model) and random (the draw) need the seed.
    per_seed = arm != EVEN or RECIPES[s.recipe].per_seed
    key = f"{s.recipe}_{loop.sparsity.label}_{arm}" + (f"_seed{seed}" if per_seed else "")

    def write(dataset_id: int, name: str) -> Path:
        return reannotate_dataset(start_raw, folder.raw, dataset_id, name, plan)

    description = (f"{s.recipe}, {loop.sparsity.description} + {loop.add} {arm} per case"
                   + (f", seed {seed}" if per_seed else ""))
    return prepare_keyed_dataset(folder, key, write, description, {"arm": arm, "seed": seed})


def train_arm(folder: BenchmarkFolder, raw: Path, loop: AnnotationLoop, seed: int, arm: str, start: Plan) -> dict:
    """Stock nnU-Net trained and scored on an arm's dataset; its result carries the arm's slices."""
    plan, counts = dataset_plan(raw)
    labels = {"sparsity": loop.sparsity.label, "arm": arm, "annotated_count": annotation_count(plan),
              "annotated": plan, "added": {case: sorted(set(plan[case]) - set(start[case])) for case in plan},
              "slice_counts": counts}
    run = arm_folder(folder.root, loop, seed, arm)
    result = train_and_score(folder, raw, seed, REFERENCE, run, labels)
    (run / "error.txt").unlink(missing_ok=True)
    return result


def run_added_arm(folder: BenchmarkFolder, start_raw: Path, loop: AnnotationLoop, seed: int, arm: str,
                  start: Plan, counts: Mapping[str, int]) -> None:
    """One arm that adds slices to the start dataset: its slices, its dataset, its run."""
    added = (suggested_slices(folder, start_raw, loop, seed, start) if arm == SUGGESTED else
             added_slices(arm, start, counts, loop, seed))
    plan = with_added(start, added)
    check_equal_count(arm, plan, annotation_count(start) + loop.add * len(start))
    train_arm(folder, prepare_arm_dataset(folder, start_raw, loop, seed, arm, plan), loop, seed, arm, start)


def run_seed(folder: BenchmarkFolder, loop: AnnotationLoop, seed: int) -> None:
    """One seed's loop; finished runs are skipped, a failure is recorded in its run folder and the others go on."""
    def finished(arm: str) -> bool:
        return (arm_folder(folder.root, loop, seed, arm) / RESULT).is_file()

    def failed(arm: str, stage: str, error: Exception) -> None:
        record_failure(arm_folder(folder.root, loop, seed, arm), f"{arm} seed {seed}", stage, error)

    if all(finished(arm) for arm in ARMS):
        return
    try:
        start_raw = prepare_dataset(folder, loop.sparsity, seed)
        start, counts = dataset_plan(start_raw)
        if not finished(START):
            train_arm(folder, start_raw, loop, seed, START, start)
    except Exception as error:  # every other arm builds on the start model and dataset
        for arm in ARMS:
            if not finished(arm):
                failed(arm, "the start run", error)
        return
    for arm in ADDED_ARMS:
        if finished(arm):
            continue
        try:
            run_added_arm(folder, start_raw, loop, seed, arm, start, counts)
        except Exception as error:
            failed(arm, "the run", error)


def run_annotation_loop(out: Path, settings: BenchmarkSettings, loop: AnnotationLoop) -> dict:
    """Every seed's loop not finished yet, then the summary; returns it (``write_annotation_summary``)."""
    folder = BenchmarkFolder(out, settings, study=loop.study())
    folder.write_trainer_module([REFERENCE])
    print(f"annotation loop in {folder.root}: {loop.start} evenly spaced slices per case, then {loop.add} more per "
          f"case suggested ({loop.score}), evenly spaced or random; seeds {', '.join(map(str, settings.seeds))}, "
          f"{settings.epochs} epochs x {settings.iterations} iterations, plans {settings.plans_identifier}, device "
          f"{settings.device}")
    with tqdm(total=len(settings.seeds), desc="annotation loop seeds", unit="seed") as bar:
        for seed in settings.seeds:
            run_seed(folder, loop, seed)
            summary = write_annotation_summary(folder.root, settings, loop)  # readable after every seed
            bar.update(1)
    print(summary["markdown"])
    return summary


# --------------------------------------------------------------------------------------------- summary


def load_arm_results(root: Path, settings: BenchmarkSettings, loop: AnnotationLoop) -> tuple[list[dict], list[dict]]:
    """(results, failures) of the runs the settings ask for, by seed then arm."""
    results, failures = [], []
    for seed, arm in product(settings.seeds, ARMS):
        run = arm_folder(root, loop, seed, arm)
        if (run / RESULT).is_file():
            results.append(json.loads((run / RESULT).read_text()))
        elif (run / "error.txt").is_file():
            failures.append({"arm": arm, "seed": seed, "error": (run / "error.txt").read_text().splitlines()[0]})
    return results, failures


def summary_rows(results: list[dict]) -> list[dict]:
    """A row per run and class (the class mean first), for summary.csv."""
    return [{"arm": r["arm"], "seed": r["seed"], "dataset": r["dataset"], "annotated_count": r["annotated_count"],
             "class": name, **{column: metric_of(r, where, name) for column, where, _ in SUMMARY_METRICS},
             "minutes": r["minutes"]}
            for r in results for name in [MEAN, *classes_of(r)]]


def _count_cell(counts: list[int]) -> str:
    """The annotated-slice count of an arm's runs: one number when the seeds agree."""
    if len(set(counts)) == 1:
        return str(counts[0])
    mean, std, _ = mean_std([float(c) for c in counts])
    return f"{mean:.1f} ± {std:.1f}"


def _arm_table(results: list[dict]) -> list[str]:
    lines = ["| arm | runs | annotated slices | Dice test volumes | Dice unannotated slices | Dice annotated slices "
             "| minutes |", "|---" * 7 + "|"]
    for arm in ARMS:
        mine = [r for r in results if r["arm"] == arm]
        if not mine:
            continue
        cells = [_count_cell([r["annotated_count"] for r in mine])]
        cells += [fmt_mean_std([metric_of(r, where) for r in mine])
                  for column, where, _ in SUMMARY_METRICS if column in MAIN_COLUMNS]
        cells.append(fmt(mean_std([r["minutes"] for r in mine])[0], 1))
        lines.append(f"| {arm} | {len(mine)} | " + " | ".join(cells) + " |")
    return lines + [""]


def _paired_table(results: list[dict], loop: AnnotationLoop) -> list[str]:
    """suggested − even and suggested − random on the same (seed, case) pairs."""
    as_trainers = [{**r, "trainer": r["arm"]} for r in results]  # paired_difference pairs runs by "trainer"
    lines = ["## Suggested against evenly spaced and random slices", "",
             "Δ = suggested − the other arm on the same (seed, test volume) and (seed, training case) pairs: mean ± "
             f"std, wins/pairs, Wilcoxon p (≥ 6 pairs); {SEED_P_NOTE}.", "",
             "| comparison | Δ Dice test volumes | Δ Dice unannotated slices |", "|---|---|---|"]
    for other in (EVEN, RANDOM):
        cells = [fmt_paired(paired_difference(as_trainers, SUGGESTED, loop.sparsity.label, part, other))
                 for part in ("test", "train")]
        lines.append(f"| {SUGGESTED} − {other} | " + " | ".join(cells) + " |")
    return lines + [""]


PER_SEED_METRICS = [where for column, where, _ in SUMMARY_METRICS if column in ("test_dice", "unannotated_dice")]


def _per_seed_table(results: list[dict], settings: BenchmarkSettings) -> list[str]:
    """Each seed's Dice per arm: shows whether one seed carries the mean difference."""
    arms = [arm for arm in ARMS if any(r["arm"] == arm for r in results)]
    lines = ["## Per seed", "", "Dice on the test volumes / on the unannotated slices of the training volumes.", "",
             "| seed | " + " | ".join(arms) + " |", "|---" * (1 + len(arms)) + "|"]
    for seed in settings.seeds:
        runs = {r["arm"]: r for r in results if r["seed"] == seed}
        if runs:
            cells = [" / ".join(fmt(metric_of(runs[arm], where)) for where in PER_SEED_METRICS) if arm in runs
                     else "—" for arm in arms]
            lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return lines + [""]


def _indices(slices: Sequence[int]) -> str:
    return ", ".join(map(str, slices)) or "—"


def _slice_tables(results: list[dict], settings: BenchmarkSettings) -> list[str]:
    """Per seed and case: the start slices and the slices each arm added (where suggest put them)."""
    lines = ["## Annotated slices per case", "",
             f"Slice indices along axis {ANNOTATION_AXIS}: the start slices every arm has, and the slices each arm "
             "adds to them.", ""]
    for seed in settings.seeds:
        runs = {r["arm"]: r for r in results if r["seed"] == seed}
        if not runs:
            continue
        any_run = next(iter(runs.values()))
        start = {case: sorted(set(kept) - set(any_run["added"][case])) for case, kept in any_run["annotated"].items()}
        arms = [arm for arm in ADDED_ARMS if arm in runs]
        lines += [f"Seed {seed}:", "", "| case | slices | start | " + " | ".join(f"+ {arm}" for arm in arms) + " |",
                  "|---" * (3 + len(arms)) + "|"]
        for case, kept in start.items():
            cells = [case, str(any_run["slice_counts"][case]), _indices(kept),
                     *(_indices(runs[arm]["added"][case]) for arm in arms)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def annotation_markdown(results: list[dict], failures: list[dict], settings: BenchmarkSettings,
                        loop: AnnotationLoop) -> str:
    s = settings
    cases = len(results[0]["annotated"]) if results else None
    total = f" ({loop.add * cases} over {cases} training cases)" if cases else ""
    lines = [f"# nnunet-ext benchmark annotate: {s.recipe}" + (f" ({Path(s.data).name})" if s.recipe == DENSE else ""),
             "", f"Start: {loop.start} evenly spaced annotated slices per training case along axis {ANNOTATION_AXIS}. "
             f"Every other arm adds {loop.add} slices per case{total} to them: **suggested** — the slices `nnunet-ext "
             f"suggest` ranks highest with the start model ({loop.score} score, --min-gap {loop.min_gap}), as many in "
             f"a case as its ranking gives; **even** — per case the middle of the longest run of unannotated slices, "
             f"repeatedly; **random** — per case unannotated slices drawn with the seed. Each arm is stock "
             f"nnU-Net trained from scratch: {s.epochs} epochs x {s.iterations} iterations, plans "
             f"`{s.plans_identifier}` ({s.configuration}), device {s.device}, seeds {', '.join(map(str, s.seeds))}. "
             f"Dice = mean over foreground classes; mean ± std over seeds; minutes = wall time per run.", "",
             "The arms annotate different slices, so their unannotated-slice Dice is measured on different slice "
             "sets; the Dice on the held-out test volumes, the same for every arm, is the fair comparison.", "",
             *_arm_table(results), *_paired_table(results, loop), *_per_seed_table(results, s),
             *_slice_tables(results, s)]
    if failures:
        lines += ["## Failed runs", ""] + [f"- {f['arm']} seed {f['seed']}: {f['error']}" for f in failures] + [""]
    return "\n".join(lines)


def write_annotation_summary(root: Path, settings: BenchmarkSettings, loop: AnnotationLoop) -> dict:
    """summary.csv and results.md from the finished runs; returns {"rows", "markdown", "failures"}."""
    root = Path(root)
    results, failures = load_arm_results(root, settings, loop)
    rows = summary_rows(results)
    write_rows(root / "summary.csv", list(SUMMARY_COLUMNS), rows)
    markdown = annotation_markdown(results, failures, settings, loop)
    (root / "results.md").write_text(markdown)
    return {"rows": rows, "markdown": markdown, "failures": failures}


# --------------------------------------------------------------------------------------------- CLI


def run_cli(args) -> None:
    loop = AnnotationLoop(args.start, args.add, args.score, args.min_gap)
    settings = BenchmarkSettings(**common_settings(args), trainers=[], sparsities=[f"slices:{loop.start}"],
                                 seeds=args.seeds, epochs=args.epochs, reference_2d=False)
    check_slice_counts(training_slice_counts(settings.recipe, settings.data, settings.test_cases), loop)
    if not settings.budget_measured and args.epochs is None:
        print(f"note: no converged budget is known for this dataset, so every arm trains {settings.epochs} x "
              f"{settings.iterations}; measure one with `nnunet-ext benchmark converge` and pass --epochs/--iterations",
              file=sys.stderr)
    summary = run_annotation_loop(Path(args.out), settings, loop)
    if summary["failures"]:
        raise UserError(f"{len(summary['failures'])} of {len(settings.seeds) * len(ARMS)} runs failed (listed in "
                        f"{Path(args.out) / 'results.md'}, each error in its run folder's error.txt): fix the cause "
                        f"and rerun the same command, which retries only them")


def register_cli(modes) -> None:
    """``nnunet-ext benchmark annotate``: a simulated annotation loop, suggested vs evenly spaced vs random."""
    parser = modes.add_parser(
        KIND, help="simulated annotation loop: suggested vs evenly spaced vs random slices at equal count",
        description="Start from --start evenly spaced annotated slices per training case, train stock nnU-Net, let "
                    "`nnunet-ext suggest` pick --add x (training cases) more slices, and compare retraining on them "
                    "with as many evenly spaced or random slices: Dice per arm over seeds, paired differences, the "
                    "chosen slices (results.md, summary.csv).")
    parser.add_argument("--out", default="nnunet_ext_annotate", help="study folder: created, or resumed")
    add_data_arguments(parser)
    parser.add_argument("--start", type=int, default=DEFAULT_START,
                        help=f"evenly spaced annotated slices per training case to start from (default "
                             f"{DEFAULT_START})")
    parser.add_argument("--add", type=int, default=DEFAULT_ADD,
                        help=f"slices added per training case; suggest picks this many x the cases over all cases "
                             f"(default {DEFAULT_ADD})")
    parser.add_argument("--score", choices=STOCK_SCORES, default="entropy",
                        help="suggest's uncertainty score (default entropy)")
    parser.add_argument("--min-gap", type=int, default=DEFAULT_MIN_GAP,
                        help="suggest's --min-gap: no suggestion within this many slices of an annotated or another "
                             f"suggested slice (default {DEFAULT_MIN_GAP})")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS), help="seeds (default 0 1 2)")
    parser.add_argument("--epochs", type=int, help="training epochs (default: the recipe's measured budget)")
    add_training_arguments(parser)
    parser.set_defaults(func=run_cli)
