"""``nnunet-ext benchmark``: trainers against stock nnU-Net on the same sparse labels, over sparsities and seeds.

For each sparsity level and seed a sparse dataset is written (``nnunet_ext.benchmark_data``), planned and
preprocessed once with ``nnUNetv2_plan_and_preprocess`` (plus ``nnunet-ext plans tiny`` for the CPU plans). Each
trainer, stock ``nnUNetTrainer`` always first, is then trained through the real ``nnUNetv2_train`` on fold ``all``
with one budget for all (a generated ``<Trainer>_bench<E>x<I>`` variant), and scored:

- on the training volumes, whose unannotated slices are the gaps a method must bridge: nnU-Net's own final
  validation of fold ``all`` predicts every training case, scored against ``labelsTr_dense`` with the sparse
  ``labelsTr`` giving the Dice on annotated slices (did training converge?), on unannotated slices, and by
  distance to the nearest annotated slice;
- on the held-out test volumes: ``nnUNetv2_predict`` on ``imagesTs``, scored against the dense ``labelsTs``.

Everything lives under ``--out`` (own nnU-Net folders); a finished run is never redone, an interrupted one
continues (``--c``), and a failing run is reported without stopping the others. The summary (``summary.csv``,
``results.md``, ``dice_vs_sparsity.png``, ``dice_vs_distance.png``) is rewritten after every run.
"""

import csv
import json
import math
import os
import re
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nnunet_ext.benchmark_data import RECIPES, Sparsity, write_dense, write_sparse_dataset
from nnunet_ext.demo import EPOCH_LINE, PREDICT_LINE, demo_environment, nnunet_command, run_logged
from nnunet_ext.demo import training_environment
from nnunet_ext.errors import UserError
from nnunet_ext.evaluation import MEAN, evaluate_folder, write_results
from nnunet_ext.nnunet_paths import EXT_TRAINER_VAR
from nnunet_ext.plans import TINY_PLANS

REFERENCE = "nnUNetTrainer"
SETTINGS_FILE = "benchmark.json"
TRAINER_MODULE = "nnunet_ext_benchmark_trainers"
FOLD = "all"
FIRST_DATASET_ID = 100
# The flagship, with the EMA decay of short budgets (MeanTeacherTrainer_ema99); with stock, the default fits an hour
# of a 2-core CPU on the synth recipe.
DEFAULT_TRAINERS = ("MeanTeacherContinuityTrainer_ema99",)
# Settings a resumed benchmark must share with the runs already in its folder.
FIXED_SETTINGS = ("recipe", "data", "epochs", "iterations", "plans", "configuration", "device")


@dataclass
class BenchmarkSettings:
    recipe: str = "synth"
    data: str | None = None
    trainers: list[str] = field(default_factory=lambda: list(DEFAULT_TRAINERS))
    sparsities: list[str] | None = None  # None: the recipe's defaults
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: int = 50
    iterations: int = 50
    plans: str = "tiny"  # "tiny": derive nnUNetPlans_tiny; else an existing plans identifier, e.g. nnUNetPlans
    configuration: str = "3d_fullres"
    device: str = "cpu"
    topology: bool = True

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise UserError(f"unknown recipe {self.recipe!r}: choose one of {', '.join(RECIPES)}")
        recipe = RECIPES[self.recipe]
        if recipe.needs_data and self.data is None:
            raise UserError(f"the {self.recipe} recipe needs its data folder: pass --data ../shared/data/{self.recipe}")
        if self.data is not None:
            self.data = str(Path(self.data).resolve())
        self.sparsities = list(self.sparsities or recipe.default_sparsities)
        for level in self.sparsities:
            Sparsity.parse(level)  # a bad level fails before anything runs
        for name, value in (("--epochs", self.epochs), ("--iterations", self.iterations)):
            if value < 1:
                raise UserError(f"invalid {name} {value}: give a positive number")
        if len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            raise UserError(f"invalid --seeds {self.seeds}: give distinct non-negative integers, e.g. 0 1 2")
        self.trainers = self._with_prerequisites([REFERENCE] + [t for t in dict.fromkeys(self.trainers)
                                                                if t != REFERENCE])

    def _with_prerequisites(self, arms: list[str]) -> list[str]:
        """``arms`` checked, each pseudo-label trainer preceded by the stock arm of its source configuration."""
        from nnunet_ext.speed import find_trainer_class
        from nnunet_ext.trainers.pseudo_label import PseudoLabelWeightedTrainer

        ordered = []
        for arm in arms:
            trainer, configuration = self.split_arm(arm)
            if configuration == "" or "@" in configuration:
                raise UserError(f"invalid trainer {arm!r}: write TRAINER or TRAINER@CONFIGURATION, e.g. "
                                f"nnUNetTrainer@2d")
            # An unknown name fails here, not inside nnU-Net's trainer search.
            trainer_class = find_trainer_class(trainer, search_ext_folders=False)
            if issubclass(trainer_class, PseudoLabelWeightedTrainer):
                source = f"{REFERENCE}@{trainer_class.pseudo_label_source}"
                if source not in ordered:
                    ordered.append(source)
            if arm not in ordered:
                ordered.append(arm)
        return ordered

    def split_arm(self, arm: str) -> tuple[str, str]:
        """``TRAINER@CONFIGURATION`` (or ``TRAINER``: the benchmark's configuration) -> (trainer, configuration)."""
        trainer, _, configuration = arm.partition("@")
        return trainer, (configuration if _ else self.configuration)

    @property
    def configurations(self) -> list[str]:
        """Every configuration an arm trains, the benchmark's own first."""
        return list(dict.fromkeys([self.configuration] + [self.split_arm(a)[1] for a in self.trainers]))

    @property
    def sparsity_levels(self) -> list[Sparsity]:
        return [Sparsity.parse(s) for s in self.sparsities]

    @property
    def plans_identifier(self) -> str:
        return TINY_PLANS if self.plans == "tiny" else self.plans

    def bench_name(self, arm: str) -> str:
        """The generated budget variant of an arm's trainer, which its runs train."""
        return f"{self.split_arm(arm)[0]}_bench{self.epochs}x{self.iterations}"


# --------------------------------------------------------------------------------------------- folder and state


class BenchmarkFolder:
    """The ``--out`` folder: settings, dataset ids, nnU-Net folders, generated trainers, runs and summary."""

    def __init__(self, root: Path, settings: BenchmarkSettings):
        self.root = Path(root).expanduser().resolve()
        self.settings = settings
        self.state = self._load_or_create()
        self.env = demo_environment(self.root)
        self.env[EXT_TRAINER_VAR] = os.pathsep.join([str(self.trainer_folder), self.env[EXT_TRAINER_VAR]])

    def _load_or_create(self) -> dict:
        settings_file = self.root / SETTINGS_FILE
        fixed = {key: getattr(self.settings, key) for key in FIXED_SETTINGS}
        if settings_file.is_file():
            state = json.loads(settings_file.read_text())
            differing = [f"{k}: {state['fixed'].get(k)!r} there, {v!r} now" for k, v in fixed.items()
                         if state["fixed"].get(k) != v]
            if differing:
                raise UserError(f"{self.root} holds a benchmark with other settings ({'; '.join(differing)}): "
                                f"rerun with those settings to resume it, or pass a new --out")
            return state
        if self.root.exists() and any(self.root.iterdir()):
            raise UserError(f"{self.root} exists and is not a benchmark folder: pass --out with a new or empty "
                            f"folder")
        self.root.mkdir(parents=True, exist_ok=True)
        state = {"fixed": fixed, "datasets": {}}
        self._save(state)
        return state

    def _save(self, state: dict) -> None:
        tmp = self.root / f".{SETTINGS_FILE}.tmp"
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, self.root / SETTINGS_FILE)

    @property
    def raw(self) -> Path:
        return self.root / "nnUNet_raw"

    @property
    def trainer_folder(self) -> Path:
        return self.root / "trainers"

    def dataset_id(self, key: str) -> int:
        """A stable dataset id per dataset key, allocated on first use."""
        datasets = self.state["datasets"]
        if key not in datasets:
            datasets[key] = FIRST_DATASET_ID + len(datasets)
            self._save(self.state)
        return datasets[key]

    def run_folder(self, sparsity: Sparsity, seed: int, trainer: str) -> Path:
        return self.root / "runs" / sparsity.label / f"seed{seed}" / trainer

    def results(self, seed: int) -> Path:
        """One seed's nnUNet_results: seeds may share a dataset, and each must train its own models."""
        return self.root / "nnUNet_results" / f"seed{seed}"

    def seed_environment(self, seed: int) -> dict:
        return dict(self.env, nnUNet_results=str(self.results(seed)))

    def write_trainer_module(self, trainers: list[str]) -> None:
        """The budget variants nnU-Net finds through ``nnUNet_extTrainer`` (this folder comes first)."""
        s = self.settings
        lines = [f'"""Generated by nnunet-ext benchmark: the compared trainers on one budget ({s.epochs} epochs x '
                 f'{s.iterations} iterations)."""', "",
                 "from nnunet_ext.speed import find_trainer_class",
                 "from nnunet_ext.trainers.budget import budget_variant", ""]
        val_iterations = max(1, math.ceil(s.iterations / 10))
        for trainer in dict.fromkeys(s.split_arm(arm)[0] for arm in trainers):
            lines.append(f"{s.bench_name(trainer)} = budget_variant(find_trainer_class({trainer!r}, "
                         f"search_ext_folders=False), {s.bench_name(trainer)!r}, {s.epochs}, {s.iterations}, "
                         f"{val_iterations}, __name__)")
        self.trainer_folder.mkdir(exist_ok=True)
        (self.trainer_folder / f"{TRAINER_MODULE}.py").write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------- datasets


def _nproc(env: dict) -> str:
    return env.get("nnUNet_def_n_proc", "1")


def prepare_dataset(folder: BenchmarkFolder, sparsity: Sparsity, seed: int) -> Path:
    """The raw folder of the sparse dataset for (sparsity, seed), written and preprocessed once."""
    s = folder.settings
    per_seed = RECIPES[s.recipe].per_seed
    key = f"{s.recipe}_{sparsity.label}" + (f"_seed{seed}" if per_seed else "")
    dataset_id = folder.dataset_id(key)
    marker = folder.root / "prepared" / f"{key}.json"
    if marker.is_file():
        prepared = json.loads(marker.read_text())
        missing = [c for c in s.configurations if c not in prepared["configurations"]]
        if missing:  # an arm of another configuration joined the benchmark
            run_logged(f"preprocess {dataset_id}", [nnunet_command("nnUNetv2_preprocess"), "-d", str(dataset_id),
                                                    "-c", *missing, "-np", *[_nproc(folder.env)] * len(missing)],
                       folder.env, folder.root / "logs" / f"preprocess_{key}.log", leave=False)
            prepared["configurations"] += missing
            marker.write_text(json.dumps(prepared) + "\n")
        return folder.raw / prepared["dataset"]
    dense = None
    if RECIPES[s.recipe].needs_data:
        dense_key = f"{s.recipe}_dense"
        dense = _existing_dataset(folder.raw, folder.dataset_id(dense_key))
        if dense is None:
            dense = write_dense(s.recipe, Path(s.data), folder.raw, folder.dataset_id(dense_key), _name(dense_key))
    for base in (folder.raw, folder.root / "nnUNet_preprocessed"):  # left by an interrupted preparation
        stale = _existing_dataset(base, dataset_id)
        if stale is not None:
            shutil.rmtree(stale)
    tqdm.write(f"dataset {dataset_id}: {s.recipe}, {sparsity.description}" + (f", seed {seed}" if per_seed else ""))
    raw = write_sparse_dataset(s.recipe, folder.raw, dataset_id, _name(key), sparsity, seed, dense)
    logs = folder.root / "logs"
    nproc = _nproc(folder.env)
    run_logged(f"plan_and_preprocess {dataset_id}",
               [nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", *s.configurations,
                "-np", *[nproc] * len(s.configurations), "-npfp", nproc, "--verify_dataset_integrity"],
               folder.env, logs / f"plan_and_preprocess_{key}.log", leave=False)
    if s.plans == "tiny":
        run_logged(f"plans tiny {dataset_id}", [sys.executable, "-m", "nnunet_ext.cli", "plans", "tiny", "-d",
                                                str(dataset_id)], folder.env, logs / f"plans_tiny_{key}.log",
                   leave=False)
    marker.parent.mkdir(exist_ok=True)
    marker.write_text(json.dumps({"dataset": raw.name, "sparsity": sparsity.label, "seed": seed,
                                  "configurations": s.configurations}) + "\n")
    return raw


def _name(key: str) -> str:
    """A dataset name from a key: ``synth_every4_seed0`` -> ``SynthEvery4Seed0``."""
    return re.sub(r"[^A-Za-z0-9]", "", key.title())


def _existing_dataset(base: Path, dataset_id: int) -> Path | None:
    found = sorted(base.glob(f"Dataset{dataset_id:03d}_*")) if base.is_dir() else []
    return found[0] if found else None


# --------------------------------------------------------------------------------------------- one run


def _fold_folder(folder: BenchmarkFolder, raw: Path, arm: str, seed: int) -> Path:
    s = folder.settings
    return (folder.results(seed) / raw.name /
            f"{s.bench_name(arm)}__{s.plans_identifier}__{s.split_arm(arm)[1]}" / f"fold_{FOLD}")


def _dataset_id(raw: Path) -> str:
    return raw.name[len("Dataset"):len("Dataset") + 3]


def ensure_pseudolabels(folder: BenchmarkFolder, raw: Path, arm: str, seed: int, log: Path) -> None:
    """Pseudo-labels for a pseudo-label arm, from the stock arm of its source configuration (trained before it)."""
    from nnunet_ext.speed import find_trainer_class
    from nnunet_ext.trainers.pseudo_label import PseudoLabelWeightedTrainer

    s = folder.settings
    trainer, configuration = s.split_arm(arm)
    trainer_class = find_trainer_class(trainer, search_ext_folders=False)
    if not issubclass(trainer_class, PseudoLabelWeightedTrainer):
        return
    source = f"{REFERENCE}@{trainer_class.pseudo_label_source}"
    run_logged(f"pseudolabels {arm}", [sys.executable, "-m", "nnunet_ext.cli", "pseudolabels", "-d", _dataset_id(raw),
                                       "--from", trainer_class.pseudo_label_source, "-tr", s.bench_name(source),
                                       "-p", s.plans_identifier, "-f", FOLD, "--to", configuration,
                                       "-device", s.device], folder.seed_environment(seed), log, leave=False)


def run_one(folder: BenchmarkFolder, raw: Path, sparsity: Sparsity, seed: int, trainer: str) -> dict:
    """Train, predict and score one arm (``trainer``) on one dataset; returns (and writes) the run's result."""
    s = folder.settings
    run = folder.run_folder(sparsity, seed, trainer)
    run.mkdir(parents=True, exist_ok=True)
    started = time.time()
    dataset_id = _dataset_id(raw)
    name, configuration = s.bench_name(trainer), s.split_arm(trainer)[1]
    fold = _fold_folder(folder, raw, trainer, seed)
    env = folder.seed_environment(seed)
    if not (fold / "checkpoint_final.pth").is_file() or not (fold / "validation" / "summary.json").is_file():
        resume = ["--c"] if (fold / "checkpoint_latest.pth").is_file() else []
        if not resume:
            ensure_pseudolabels(folder, raw, trainer, seed, run / "pseudolabels.log")
        run_logged(f"train {trainer}", [nnunet_command("nnUNetv2_train"), dataset_id, configuration, FOLD,
                                        "-tr", name, "-p", s.plans_identifier, "-device", s.device, *resume],
                   training_environment(env), run / "train.log", progress=EPOCH_LINE, total=s.epochs,
                   leave=False)
    test_predictions = run / "test_predictions"
    shutil.rmtree(test_predictions, ignore_errors=True)
    cases = len(list((raw / "labelsTs").iterdir()))
    run_logged(f"predict {trainer}", [nnunet_command("nnUNetv2_predict"), "-i", str(raw / "imagesTs"), "-o",
                                      str(test_predictions), "-d", dataset_id, "-c", configuration, "-f", FOLD,
                                      "-tr", name, "-p", s.plans_identifier, "-device", s.device,
                                      "-npp", "0", "-nps", "0"],
               env, run / "predict.log", progress=PREDICT_LINE, total=cases, leave=False)
    test = evaluate_folder(test_predictions, raw / "labelsTs", topology=s.topology)
    train = evaluate_folder(fold / "validation", raw / "labelsTr_dense", annotated_dir=raw / "labelsTr",
                            topology=False)
    write_results(test, run / "evaluation_test")
    write_results(train, run / "evaluation_train")
    result = {"trainer": trainer, "trained_as": name, "configuration": configuration,
              "sparsity": sparsity.label, "seed": seed,
              "dataset": raw.name, "epochs": s.epochs, "iterations": s.iterations, "plans": s.plans_identifier,
              "minutes": (time.time() - started) / 60,
              "test": {"aggregate": test["aggregate"],
                       "cases": {c: m[MEAN]["dice"] for c, m in test["cases"].items()}},
              "train": {"aggregate": train["aggregate"],
                        "cases": {c: m[MEAN]["dice_unannotated"] for c, m in train["cases"].items()}}}
    _write_json(run / "result.json", result)
    return result


def _write_json(path: Path, content: dict) -> None:
    from nnunet_ext.evaluation import _json_ready

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_json_ready(content), indent=2) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------- the whole benchmark


def run_benchmark(out: Path, settings: BenchmarkSettings) -> dict:
    """Run every (sparsity, seed, trainer) not finished yet, then write the summary; returns it."""
    folder = BenchmarkFolder(out, settings)
    folder.write_trainer_module(settings.trainers)
    runs = list(product(settings.sparsity_levels, settings.seeds, settings.trainers))
    print(f"benchmark in {folder.root}: {len(settings.trainers)} trainers x {len(settings.sparsities)} sparsities x "
          f"{len(settings.seeds)} seeds, {settings.epochs} epochs x {settings.iterations} iterations, "
          f"plans {settings.plans_identifier}, device {settings.device}")
    with tqdm(total=len(runs), desc="benchmark runs", unit="run") as bar:
        for (sparsity, seed), group in _grouped(runs):
            pending = [t for t in group if not (folder.run_folder(sparsity, seed, t) / "result.json").is_file()]
            bar.update(len(group) - len(pending))
            if not pending:
                continue
            try:
                raw = prepare_dataset(folder, sparsity, seed)
            except Exception as error:  # every run on this dataset fails alike; the others go on
                for trainer in pending:
                    _record_failure(folder, sparsity, seed, trainer, "preparing the dataset", error)
                bar.update(len(pending))
                continue
            for trainer in pending:
                bar.set_postfix_str(f"{trainer} {sparsity.label} seed {seed}")
                try:
                    run_one(folder, raw, sparsity, seed, trainer)
                    (folder.run_folder(sparsity, seed, trainer) / "error.txt").unlink(missing_ok=True)
                except Exception as error:
                    _record_failure(folder, sparsity, seed, trainer, "the run", error)
                bar.update(1)
                write_summary(folder.root, settings)
    summary = write_summary(folder.root, settings)
    print(summary["markdown"])
    return summary


def _grouped(runs):
    groups = {}
    for sparsity, seed, trainer in runs:
        groups.setdefault((sparsity, seed), []).append(trainer)
    return groups.items()


def _record_failure(folder: BenchmarkFolder, sparsity: Sparsity, seed: int, trainer: str, stage: str,
                    error: Exception) -> None:
    run = folder.run_folder(sparsity, seed, trainer)
    run.mkdir(parents=True, exist_ok=True)
    message = " ".join(str(error).split()) or type(error).__name__
    detail = "" if isinstance(error, UserError) else "".join(traceback.format_exception(error))
    (run / "error.txt").write_text(f"{stage} failed: {message}\n{detail}")
    tqdm.write(f"FAILED {trainer} {sparsity.label} seed {seed}: {stage} failed: {message}")


# --------------------------------------------------------------------------------------------- summary


# (column, where in result.json, what it is)
SUMMARY_METRICS = (
    ("test_dice", ("test", "dice"), "Dice on the held-out test volumes"),
    ("test_slice_dice", ("test", "slice_dice"), "mean 2D Dice over the test volumes' slices"),
    ("test_cldice", ("test", "cldice"), "clDice on the test volumes"),
    ("unannotated_dice", ("train", "dice_unannotated"), "Dice on the training volumes' unannotated slices"),
    ("annotated_dice", ("train", "dice_annotated"), "Dice on the training volumes' annotated slices"),
)


def _metric(result: dict, where: tuple[str, str], name: str = MEAN) -> float:
    value = result[where[0]]["aggregate"][name].get(where[1])
    return float("nan") if value is None else float(value)


def load_results(root: Path, settings: BenchmarkSettings) -> tuple[list[dict], list[dict]]:
    """(results, failures) of the runs this benchmark's settings ask for."""
    results, failures = [], []
    folder_runs = Path(root) / "runs"
    for sparsity, seed, trainer in product(settings.sparsity_levels, settings.seeds, settings.trainers):
        run = folder_runs / sparsity.label / f"seed{seed}" / trainer
        if (run / "result.json").is_file():
            results.append(json.loads((run / "result.json").read_text()))
        elif (run / "error.txt").is_file():
            failures.append({"trainer": trainer, "sparsity": sparsity.label, "seed": seed,
                             "error": (run / "error.txt").read_text().splitlines()[0]})
    return results, failures


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """Mean and sample standard deviation (NaN for a single value) of the finite values, and their count."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return float("nan"), float("nan"), 0
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else float("nan")
    return float(np.mean(finite)), std, len(finite)


def paired_difference(results: list[dict], trainer: str, sparsity: str, part: str) -> dict:
    """``trainer`` minus stock on the same (seed, case) pairs, from each run's per-case Dice of ``part``.

    Returns ``{"mean", "std", "n", "wins", "p"}``; ``p`` is the two-sided Wilcoxon signed-rank p-value (NaN below
    6 pairs, where it cannot reach 0.05).
    """
    def per_case(name):
        return {(r["seed"], case): value for r in results if r["trainer"] == name and r["sparsity"] == sparsity
                for case, value in r[part]["cases"].items() if value is not None and not math.isnan(value)}

    ours, stock = per_case(trainer), per_case(REFERENCE)
    differences = [ours[k] - stock[k] for k in sorted(set(ours) & set(stock))]
    mean, std, n = mean_std(differences)
    p = float("nan")
    if n >= 6 and any(d != 0 for d in differences):
        from scipy.stats import wilcoxon

        p = float(wilcoxon(differences).pvalue)
    return {"mean": mean, "std": std, "n": n, "wins": sum(d > 0 for d in differences), "p": p}


def _fmt(value: float, digits: int = 3, signed: bool = False) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _fmt_mean_std(values: list[float]) -> str:
    mean, std, n = mean_std(values)
    return "n/a" if n == 0 else f"{_fmt(mean)} ± {_fmt(std)}" if n > 1 else _fmt(mean)


def _fmt_paired(d: dict) -> str:
    if d["n"] == 0:
        return "n/a"
    p = "" if math.isnan(d["p"]) else f", p={d['p']:.2g}"
    return f"{_fmt(d['mean'], signed=True)} ± {_fmt(d['std'])} (wins {d['wins']}/{d['n']}{p})"


def write_summary(root: Path, settings: BenchmarkSettings) -> dict:
    """summary.csv, results.md and the plots from the finished runs; returns {"rows", "markdown"}."""
    root = Path(root)
    results, failures = load_results(root, settings)
    rows = [{"trainer": r["trainer"], "sparsity": r["sparsity"], "seed": r["seed"], "dataset": r["dataset"],
             **{column: _metric(r, where) for column, where, _ in SUMMARY_METRICS}, "minutes": r["minutes"]}
            for r in results]
    with open(root / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["trainer", "sparsity", "seed", "dataset",
                                               *(c for c, _, _ in SUMMARY_METRICS), "minutes"])
        writer.writeheader()
        writer.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()} for row in rows)
    markdown = _markdown(results, failures, settings)
    (root / "results.md").write_text(markdown)
    if results:
        _plot(results, settings, root)
    return {"rows": rows, "markdown": markdown, "failures": failures}


def _markdown(results: list[dict], failures: list[dict], settings: BenchmarkSettings) -> str:
    s = settings
    lines = [f"# nnunet-ext benchmark: {s.recipe}", "",
             f"{s.epochs} epochs x {s.iterations} iterations per run, plans `{s.plans_identifier}` "
             f"({s.configuration}), device {s.device}, seeds {', '.join(map(str, s.seeds))}. Dice = mean over "
             f"foreground classes; mean ± std over seeds. Δ = trainer − nnUNetTrainer on the same (seed, case) "
             f"pairs: mean ± std, wins, Wilcoxon p (≥ 6 pairs).", ""]
    header = ("| trainer | runs | Dice test volumes | Dice unannotated slices | Dice annotated slices | "
              "Δ Dice test | Δ Dice unannotated |")
    for sparsity in s.sparsity_levels:
        lines += [f"## {sparsity.description} (`{sparsity.label}`)", "", header, "|---|---|---|---|---|---|---|"]
        for trainer in s.trainers:
            mine = [r for r in results if r["trainer"] == trainer and r["sparsity"] == sparsity.label]
            if not mine:
                continue
            cells = [_fmt_mean_std([_metric(r, where) for r in mine])
                     for column, where, _ in SUMMARY_METRICS if column in ("test_dice", "unannotated_dice",
                                                                           "annotated_dice")]
            deltas = (["—", "—"] if trainer == REFERENCE else
                      [_fmt_paired(paired_difference(results, trainer, sparsity.label, part))
                       for part in ("test", "train")])
            lines.append(f"| {trainer} | {len(mine)} | " + " | ".join(cells + deltas) + " |")
        lines.append("")
    if failures:
        lines += ["## Failed runs", ""] + [f"- {f['trainer']} {f['sparsity']} seed {f['seed']}: {f['error']}"
                                           for f in failures] + [""]
    return "\n".join(lines)


def _plot(results: list[dict], settings: BenchmarkSettings, root: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    labels = [sp.label for sp in settings.sparsity_levels]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, (column, where, title) in zip(axes, (SUMMARY_METRICS[0], SUMMARY_METRICS[3])):
        for trainer in settings.trainers:
            stats = [mean_std([_metric(r, where) for r in results
                               if r["trainer"] == trainer and r["sparsity"] == label]) for label in labels]
            ax.errorbar(range(len(labels)), [m for m, _, _ in stats], yerr=[0 if math.isnan(e) else e
                                                                            for _, e, _ in stats],
                        marker="o", capsize=3, label=trainer)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("sparsity")
    axes[0].set_ylabel("Dice (mean over seeds)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "dice_vs_sparsity.png", dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(labels), figsize=(5.5 * len(labels), 4), squeeze=False, sharey=True)
    for ax, label in zip(axes[0], labels):
        for trainer in settings.trainers:
            curves = [r["train"]["aggregate"][MEAN].get("dice_by_distance", {}) for r in results
                      if r["trainer"] == trainer and r["sparsity"] == label]
            distances = sorted({int(d) for curve in curves for d in curve})
            if not distances:
                continue
            stats = [mean_std([_none_to_nan(c.get(d, c.get(str(d)))) for c in curves]) for d in distances]
            ax.errorbar(distances, [m for m, _, _ in stats], yerr=[0 if math.isnan(e) else e for _, e, _ in stats],
                        marker="o", capsize=3, label=trainer)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{label}: training volumes", fontsize=10)
        ax.set_xlabel("slices to the nearest annotated slice")
    axes[0, 0].set_ylabel("Dice (mean over seeds)")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "dice_vs_distance.png", dpi=100)
    plt.close(fig)


def _none_to_nan(value) -> float:
    return float("nan") if value is None else float(value)


# --------------------------------------------------------------------------------------------- CLI


def run_cli(args) -> None:
    settings = BenchmarkSettings(recipe=args.recipe, data=args.data, trainers=args.trainers,
                                 sparsities=args.sparsity, seeds=args.seeds, epochs=args.epochs,
                                 iterations=args.iterations, plans=args.plans, configuration=args.configuration,
                                 device=args.device, topology=not args.no_topology)
    run_benchmark(Path(args.out), settings)


def add_arguments(parser) -> None:
    """The options of ``nnunet-ext benchmark`` (the accuracy runs)."""
    defaults = BenchmarkSettings()
    parser.add_argument("--out", default="nnunet_ext_benchmark",
                        help="benchmark folder: created, or resumed when it holds this benchmark")
    parser.add_argument("--recipe", default=defaults.recipe, choices=sorted(RECIPES), help="dataset recipe")
    parser.add_argument("--data", help="the recipe's data folder (vesselnn, gala_fibsem), e.g. ../shared/data/vesselnn")
    parser.add_argument("--trainers", nargs="+", default=list(DEFAULT_TRAINERS), metavar="TRAINER",
                        help=f"trainers compared with {REFERENCE} (default: {' '.join(DEFAULT_TRAINERS)})")
    parser.add_argument("--sparsity", nargs="+", metavar="LEVEL",
                        help="every:K or slices:N levels (default per recipe: synth every:4 every:8)")
    parser.add_argument("--seeds", nargs="+", type=int, default=defaults.seeds, help="seeds (default 0 1 2)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help=f"default {defaults.epochs}")
    parser.add_argument("--iterations", type=int, default=defaults.iterations,
                        help=f"training iterations per epoch (default {defaults.iterations})")
    parser.add_argument("--plans", default=defaults.plans,
                        help="tiny (CPU-sized, derived) or an existing plans identifier such as nnUNetPlans (GPU)")
    parser.add_argument("-c", "--configuration", default=defaults.configuration)
    parser.add_argument("--device", default=defaults.device, choices=("cpu", "cuda", "mps"))
    parser.add_argument("--no-topology", action="store_true", help="skip clDice and Betti errors")
    parser.set_defaults(func=run_cli)
