"""``nnunet-ext benchmark``: trainers against stock nnU-Net on the same sparse labels, over sparsities and seeds.

For each sparsity level and seed a sparse dataset is written (``nnunet_ext.benchmarking.recipes``), planned and
preprocessed once with ``nnUNetv2_plan_and_preprocess`` (plus ``nnunet-ext plans tiny`` for the CPU plans). Each
trainer, stock ``nnUNetTrainer`` always first, is then trained through the real ``nnUNetv2_train`` on fold ``all``
with one budget for all (a generated ``<Trainer>_bench<E>x<I>`` variant), and scored:

- on the training volumes, whose unannotated slices are the gaps a method must bridge: nnU-Net's own final
  validation of fold ``all`` predicts every training case, scored against ``labelsTr_dense`` with the sparse
  ``labelsTr`` giving the Dice on annotated slices (did training converge?), on unannotated slices, and by
  distance to the nearest annotated slice;
- on the held-out test volumes: ``nnUNetv2_predict`` on ``imagesTs``, scored against the dense ``labelsTs``.

An ensemble arm (``nnUNetTrainer@2d+3d_fullres``) trains nothing: ``nnUNetv2_ensemble`` averages its member arms'
probabilities on the test and on the training volumes, as nnU-Net's find_best_configuration may recommend.

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
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from itertools import product
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nnunet_ext.benchmarking.commands import (
    EPOCH_LINE,
    PREDICT_LINE,
    nnunet_command,
    nnunet_environment,
    run_logged,
    training_environment,
)
from nnunet_ext.benchmarking.recipes import (
    BUILT_IN_RECIPES,
    DENSE,
    RECIPES,
    Sparsity,
    check_data,
    write_dense,
    write_sparse_dataset,
)
from nnunet_ext.datasets.raw_dataset import check_output_folder
from nnunet_ext.errors import UserError, replace_text
from nnunet_ext.evaluation import MEAN, evaluate_folder, write_results
from nnunet_ext.nnunet_paths import EXT_TRAINER_VAR
from nnunet_ext.plans import ATTENTION_SUFFIX, TINY_PLANS

REFERENCE = "nnUNetTrainer"
SETTINGS_FILE = "benchmark.json"
TRAINER_MODULE = "nnunet_ext_benchmark_trainers"
FOLD = "all"
FIRST_DATASET_ID = 100
# The flagship, with the EMA decay of short budgets (MeanTeacherTrainer_ema99).
DEFAULT_TRAINERS = ("MeanTeacherContinuityTrainer_ema99",)
DEFAULT_SEEDS = (0, 1, 2)
# Budget of recipes whose converged budget has not been measured (--dense datasets): run `benchmark converge`.
FALLBACK_EPOCHS, FALLBACK_ITERATIONS = 50, 50
ATTENTION = "attention"  # the arm's plans: `nnunet-ext plans attention` of the benchmark's base plans
CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")
ENSEMBLE = "+"  # TRAINER@2d+3d_fullres: nnUNetv2_ensemble of the trainer's models of these configurations
# Settings a resumed benchmark must share with the runs already in its folder.
FIXED_SETTINGS = ("recipe", "data", "test_cases", "epochs", "iterations", "plans", "configuration",
                  "attention_stages", "device")


@dataclass(frozen=True)
class Arm:
    """One benchmark arm: a trainer on a configuration and a plans ("" = the benchmark's base plans)."""

    trainer: str
    configuration: str
    plans: str


@dataclass
class BenchmarkSettings:
    recipe: str = "synth"
    data: str | None = None  # the recipe's data folder; for the dense recipe the dataset folder
    trainers: list[str] = field(default_factory=lambda: list(DEFAULT_TRAINERS))
    sparsities: list[str] | None = None  # None: the recipe's defaults
    seeds: list[int] = field(default_factory=lambda: list(DEFAULT_SEEDS))
    epochs: int | None = None  # None: the recipe's measured budget (FALLBACK_* where not measured)
    iterations: int | None = None
    plans: str = "tiny"  # "tiny": derive nnUNetPlans_tiny; else an existing plans identifier, e.g. nnUNetPlans
    configuration: str = "3d_fullres"
    device: str = "cpu"
    topology: bool = True
    test_cases: int | None = None  # dense recipe without labelsTs: cases held out (None: every third)
    attention_stages: int = 2  # `plans attention --stages` of the @attention arms
    reference_2d: bool = True  # stock nnU-Net's 2d configuration as a reference arm

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise UserError(f"unknown recipe {self.recipe!r}: choose one of {', '.join(BUILT_IN_RECIPES)}, or pass "
                            f"--dense DATASET")
        recipe = RECIPES[self.recipe]
        if recipe.needs_data and self.data is None:
            raise UserError(f"the {self.recipe} recipe needs its data folder: pass --data with the folder of the "
                            f"{self.recipe} files")
        if self.data is not None:
            self.data = str(Path(self.data).resolve())
        self.sparsities = list(self.sparsities or recipe.default_sparsities)
        for level in self.sparsities:
            Sparsity.parse(level)  # a bad level fails before anything runs
        if self.epochs is None:
            self.epochs = recipe.budget_epochs or FALLBACK_EPOCHS
        if self.iterations is None:
            self.iterations = recipe.budget_iterations or FALLBACK_ITERATIONS
        for name, value in (("--epochs", self.epochs), ("--iterations", self.iterations),
                            ("--attention-stages", self.attention_stages)):
            if value < 1:
                raise UserError(f"invalid {name} {value}: give a positive number")
        if len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            raise UserError(f"invalid --seeds {self.seeds}: give distinct non-negative integers, e.g. 0 1 2")
        references = [REFERENCE] + ([f"{REFERENCE}@2d"] if self.reference_2d and self.configuration != "2d" else [])
        self.trainers = self._with_prerequisites(references + list(self.trainers))
        if recipe.needs_data:
            check_data(self.recipe, Path(self.data), self.test_cases)  # before anything is written

    @property
    def budget_measured(self) -> bool:
        """Whether the recipe's default budget comes from a convergence measurement."""
        return RECIPES[self.recipe].budget_epochs is not None

    def parse_arm(self, arm: str) -> Arm:
        """``TRAINER[@CONFIGURATION][@PLANS]``; a single ``@X`` is plans when X is ``attention`` or names plans.
        CONFIGURATION may join distinct configurations with ``+``: nnU-Net's ensemble of their models."""
        parts = arm.split("@")
        if len(parts) > 3 or not parts[0] or (len(parts) > 1 and not parts[-1]):
            raise UserError(f"invalid trainer {arm!r}: write TRAINER, TRAINER@CONFIGURATION, TRAINER@PLANS or "
                            f"TRAINER@CONFIGURATION@PLANS, e.g. nnUNetTrainer@2d or MeanTeacherTrainer@attention")
        trainer, rest = parts[0], parts[1:]
        if len(rest) == 1 and (rest[0] == ATTENTION or "plans" in rest[0].lower()):
            rest = ["", rest[0]]
        configuration = (rest[0] if rest else "") or self.configuration
        plans = rest[1] if len(rest) > 1 else ""
        members = configuration.split(ENSEMBLE)
        unknown = [c for c in members if c not in CONFIGURATIONS]
        if unknown:
            raise UserError(f"invalid trainer {arm!r}: unknown configuration {unknown[0]!r} (one of "
                            f"{', '.join(CONFIGURATIONS)}); plans go last, e.g. "
                            f"{trainer}@3d_fullres@{plans or ATTENTION}")
        if len(set(members)) != len(members):
            raise UserError(f"invalid trainer {arm!r}: an ensemble joins distinct configurations, e.g. "
                            f"{trainer}@2d+3d_fullres")
        return Arm(trainer, configuration, "" if plans == self.plans_identifier else plans)

    def arm_name(self, arm: Arm) -> str:
        """The canonical text of an arm: the benchmark's configuration and base plans are left out."""
        name = arm.trainer
        if arm.configuration != self.configuration:
            name += f"@{arm.configuration}"
        if arm.plans:
            recognisable = arm.plans == ATTENTION or "plans" in arm.plans.lower()
            name += f"@{arm.plans}" if recognisable or arm.configuration != self.configuration else f"@@{arm.plans}"
        return name

    def _with_prerequisites(self, arms: list[str]) -> list[str]:
        """``arms`` checked and canonical, without repeats, each with the stock arms it is compared with or needs:
        stock on its plans (the paired reference), and for a pseudo-label trainer the stock arms it learns from."""
        from nnunet_ext.benchmarking.speed import find_trainer_class
        from nnunet_ext.pseudo_label_generation import source_configurations
        from nnunet_ext.trainers.pseudo_label import PseudoLabelWeightedTrainer

        ordered = []
        for text in arms:
            arm = self.parse_arm(text)
            # An unknown name fails here, not inside nnU-Net's trainer search.
            trainer_class = find_trainer_class(arm.trainer, search_ext_folders=False)
            needed = [Arm(REFERENCE, self.configuration, arm.plans)]
            members = [replace(arm, configuration=c) for c in self.ensemble_members_of(arm)]
            for paired in members + [arm]:  # stock on an arm's own configuration, e.g. nnUNetTrainer@2d
                reference = self.reference_of(self.arm_name(paired))
                if reference is not None:
                    needed.append(self.parse_arm(reference))
            needed += members
            if issubclass(trainer_class, PseudoLabelWeightedTrainer):
                needed += [Arm(REFERENCE, configuration, arm.plans)
                           for configuration in source_configurations(trainer_class.pseudo_label_source)]
            for name in map(self.arm_name, needed + [arm]):
                if name not in ordered:
                    ordered.append(name)
        return ordered

    @staticmethod
    def ensemble_members_of(arm: Arm) -> list[str]:
        """The configurations an ensemble arm averages; [] for an arm that trains one model."""
        members = arm.configuration.split(ENSEMBLE)
        return members if len(members) > 1 else []

    def ensemble_members(self, arm: str) -> list[str]:
        """The arms (one per configuration) whose models an ensemble arm averages; [] for other arms."""
        parsed = self.parse_arm(arm)
        return [self.arm_name(replace(parsed, configuration=c)) for c in self.ensemble_members_of(parsed)]

    def split_arm(self, arm: str) -> tuple[str, str]:
        """An arm's (trainer, configuration)."""
        parsed = self.parse_arm(arm)
        return parsed.trainer, parsed.configuration

    def arm_plans(self, arm: str) -> str:
        """The plans identifier an arm trains with."""
        plans = self.parse_arm(arm).plans
        if plans == ATTENTION:
            return self.plans_identifier + ATTENTION_SUFFIX
        return plans or self.plans_identifier

    def reference_of(self, arm: str) -> str | None:
        """The stock arm ``arm`` is paired with: stock on the same configuration and plans (stock itself on another
        configuration or plans, and an ensemble: stock on the benchmark's own, which shows what the configuration or
        the network alone changes); None for stock on the benchmark's configuration and base plans."""
        parsed = self.parse_arm(arm)
        own_configuration = parsed.trainer != REFERENCE and not self.ensemble_members_of(parsed)
        configuration = parsed.configuration if own_configuration else self.configuration
        reference = self.arm_name(Arm(REFERENCE, configuration, parsed.plans))
        if self.arm_name(parsed) != reference:
            return reference
        if parsed.plans or parsed.configuration != self.configuration:
            return REFERENCE
        return None

    @property
    def configurations(self) -> list[str]:
        """Every configuration an arm trains, the benchmark's own first."""
        return list(dict.fromkeys([self.configuration] + [c for a in self.trainers
                                                           for c in self.split_arm(a)[1].split(ENSEMBLE)]))

    @property
    def derived_plans(self) -> list[str]:
        """Plans of arms other than the base plans (attention or existing identifiers)."""
        return list(dict.fromkeys(self.parse_arm(a).plans for a in self.trainers if self.parse_arm(a).plans))

    @property
    def sparsity_levels(self) -> list[Sparsity]:
        return [Sparsity.parse(s) for s in self.sparsities]

    @property
    def plans_identifier(self) -> str:
        return TINY_PLANS if self.plans == "tiny" else self.plans

    def bench_name(self, arm: str, epochs: int | None = None) -> str:
        """The generated budget variant of an arm's trainer, which its runs train."""
        return f"{self.split_arm(arm)[0]}_bench{epochs or self.epochs}x{self.iterations}"


# --------------------------------------------------------------------------------------------- folder and state


class BenchmarkFolder:
    """The ``--out`` folder: settings, dataset ids, nnU-Net folders, generated trainers, runs and summary."""

    def __init__(self, root: Path, settings: BenchmarkSettings, converge: bool = False, study: dict | None = None):
        self.root = Path(root).expanduser().resolve()
        self.settings = settings
        self.converge = converge  # a convergence study: one folder, several budgets (epochs) of stock nnU-Net
        # Another study's own settings ("kind" among them) that a resumed folder must share, e.g. annotate's.
        self.study = dict(study or {})
        self.state = self._load_or_create()
        self.env = nnunet_environment(self.root)
        self.env[EXT_TRAINER_VAR] = os.pathsep.join([str(self.trainer_folder), self.env[EXT_TRAINER_VAR]])

    def _load_or_create(self) -> dict:
        settings_file = self.root / SETTINGS_FILE
        fixed = {key: getattr(self.settings, key) for key in FIXED_SETTINGS if not (self.converge and key == "epochs")}
        fixed["kind"] = "converge" if self.converge else "benchmark"
        fixed.update(self.study)
        if settings_file.is_file():
            state = json.loads(settings_file.read_text())
            there = {"kind": "benchmark", **state["fixed"]}  # folders from before convergence studies have no kind
            differing = [f"{k}: {there.get(k)!r} there, {v!r} now" for k, v in fixed.items() if there.get(k) != v]
            if differing:
                raise UserError(f"{self.root} holds a benchmark with other settings ({'; '.join(differing)}): "
                                f"rerun with those settings to resume it, or pass a new --out")
            return state
        check_output_folder(self.root, "--out")
        if self.root.exists() and any(self.root.iterdir()):
            raise UserError(f"{self.root} exists and is not a benchmark folder: pass --out with a new or empty "
                            f"folder")
        self.root.mkdir(parents=True, exist_ok=True)
        state = {"fixed": fixed, "datasets": {}}
        self._save(state)
        return state

    def _save(self, state: dict) -> None:
        replace_text(self.root / SETTINGS_FILE, json.dumps(state, indent=2) + "\n")

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
        """One run's folder; a convergence study keeps one per budget (named by the budget variant)."""
        name = self.settings.bench_name(trainer) if self.converge else trainer
        return self.root / "runs" / sparsity.label / f"seed{seed}" / name

    def results(self, seed: int) -> Path:
        """One seed's nnUNet_results: seeds may share a dataset, and each must train its own models."""
        return self.root / "nnUNet_results" / f"seed{seed}"

    def seed_environment(self, seed: int) -> dict:
        return dict(self.env, nnUNet_results=str(self.results(seed)))

    def write_trainer_module(self, trainers: list[str], epochs: list[int] | None = None) -> None:
        """The budget variants nnU-Net finds through ``nnUNet_extTrainer`` (this folder comes first): every trainer
        of ``trainers`` (arms) at each of ``epochs`` (default: the benchmark's budget)."""
        s = self.settings
        epochs = epochs or [s.epochs]
        lines = [f'"""Generated by nnunet-ext benchmark: the compared trainers at {", ".join(map(str, epochs))} epochs '
                 f'x {s.iterations} iterations."""', "",
                 "from nnunet_ext.benchmarking.speed import find_trainer_class",
                 "from nnunet_ext.trainers.budget import budget_variant", ""]
        val_iterations = max(1, math.ceil(s.iterations / 10))
        for trainer, budget in product(dict.fromkeys(s.split_arm(arm)[0] for arm in trainers), epochs):
            name = s.bench_name(trainer, budget)
            lines.append(f"{name} = budget_variant(find_trainer_class({trainer!r}, search_ext_folders=False), "
                         f"{name!r}, {budget}, {s.iterations}, {val_iterations}, __name__)")
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

    def write(dataset_id: int, name: str) -> Path:
        dense = dense_dataset(folder) if RECIPES[s.recipe].needs_data else None
        return write_sparse_dataset(s.recipe, folder.raw, dataset_id, name, sparsity, seed, dense)

    description = f"{s.recipe}, {sparsity.description}" + (f", seed {seed}" if per_seed else "")
    return prepare_keyed_dataset(folder, key, write, description, {"sparsity": sparsity.label, "seed": seed})


def dense_dataset(folder: BenchmarkFolder) -> Path:
    """The dense raw dataset of a real-data recipe, written once."""
    s = folder.settings
    dense_key = f"{s.recipe}_dense"
    dense = _existing_dataset(folder.raw, folder.dataset_id(dense_key))
    if dense is None:
        dense = write_dense(s.recipe, Path(s.data), folder.raw, folder.dataset_id(dense_key), _name(dense_key),
                            s.test_cases)
    return dense


def prepare_keyed_dataset(folder: BenchmarkFolder, key: str, write: Callable[[int, str], Path], description: str,
                          record: dict) -> Path:
    """The raw folder of the dataset ``key``: ``write(dataset id, name)`` writes it, then it is planned and
    preprocessed once (base and derived plans); ``record`` goes into its marker file."""
    s = folder.settings
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
        _derive_plans(folder, dataset_id, key)
        return folder.raw / prepared["dataset"]
    for base in (folder.raw, folder.root / "nnUNet_preprocessed"):  # left by an interrupted preparation
        stale = _existing_dataset(base, dataset_id)
        if stale is not None:
            shutil.rmtree(stale)
    tqdm.write(f"dataset {dataset_id}: {description}")
    raw = write(dataset_id, _name(key))
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
    _derive_plans(folder, dataset_id, key)
    marker.parent.mkdir(exist_ok=True)
    marker.write_text(json.dumps({"dataset": raw.name, **record, "configurations": s.configurations}) + "\n")
    return raw


def _derive_plans(folder: BenchmarkFolder, dataset_id: int, key: str) -> None:
    """The plans of the arms besides the base plans: attention derived from the base plans, others must exist."""
    s = folder.settings
    preprocessed = _existing_dataset(folder.root / "nnUNet_preprocessed", dataset_id)
    for plans in s.derived_plans:
        identifier = s.plans_identifier + ATTENTION_SUFFIX if plans == ATTENTION else plans
        if (preprocessed / f"{identifier}.json").is_file():
            continue
        if plans != ATTENTION:
            raise UserError(f"plans {identifier!r} of an arm do not exist for dataset {preprocessed.name}: use "
                            f"@attention or plans that nnUNetv2_plan_and_preprocess writes (e.g. nnUNetPlans)")
        run_logged(f"plans attention {dataset_id}",
                   [sys.executable, "-m", "nnunet_ext.cli", "plans", "attention", "-d", str(dataset_id),
                    "-p", s.plans_identifier, "--stages", str(s.attention_stages)],
                   folder.env, folder.root / "logs" / f"plans_attention_{key}.log", leave=False)


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
            f"{s.bench_name(arm)}__{s.arm_plans(arm)}__{s.split_arm(arm)[1]}" / f"fold_{FOLD}")


def _dataset_id(raw: Path) -> str:
    return raw.name[len("Dataset"):len("Dataset") + 3]


def ensure_pseudolabels(folder: BenchmarkFolder, raw: Path, arm: str, seed: int, log: Path) -> None:
    """Pseudo-labels for a pseudo-label arm, from the stock arms of its source configurations (trained before it)."""
    from nnunet_ext.benchmarking.speed import find_trainer_class
    from nnunet_ext.trainers.pseudo_label import PseudoLabelWeightedTrainer

    s = folder.settings
    trainer, configuration = s.split_arm(arm)
    trainer_class = find_trainer_class(trainer, search_ext_folders=False)
    if not issubclass(trainer_class, PseudoLabelWeightedTrainer):
        return
    run_logged(f"pseudolabels {arm}", [sys.executable, "-m", "nnunet_ext.cli", "pseudolabels", "-d", _dataset_id(raw),
                                       "--from", trainer_class.pseudo_label_source, "-tr", s.bench_name(REFERENCE),
                                       "-p", s.arm_plans(arm), "-f", FOLD, "--to", configuration,
                                       "-device", s.device], folder.seed_environment(seed), log, leave=False)


def run_one(folder: BenchmarkFolder, raw: Path, sparsity: Sparsity, seed: int, trainer: str) -> dict:
    """Train, predict and score one arm (``trainer``) on one dataset; returns (and writes) the run's result."""
    return train_and_score(folder, raw, seed, trainer, folder.run_folder(sparsity, seed, trainer),
                           {"sparsity": sparsity.label})


def train_and_score(folder: BenchmarkFolder, raw: Path, seed: int, trainer: str, run: Path, labels: dict) -> dict:
    """Train, predict and score the arm ``trainer`` on the dataset ``raw`` in the run folder ``run``; returns the
    result (``labels`` say which run it is) and writes it to ``run/result.json``."""
    s = folder.settings
    run.mkdir(parents=True, exist_ok=True)
    started = time.time()
    members = s.ensemble_members(trainer)
    if members:
        trained_as = [s.bench_name(m) for m in members]
        test_predictions, train_predictions = ensemble_predictions(folder, raw, seed, trainer, members, run)
    else:
        trained_as = s.bench_name(trainer)
        test_predictions, train_predictions = train_and_predict(folder, raw, seed, trainer, run)
    test = evaluate_folder(test_predictions, raw / "labelsTs", topology=s.topology)
    train = evaluate_folder(train_predictions, raw / "labelsTr_dense", annotated_dir=raw / "labelsTr",
                            topology=False)
    write_results(test, run / "evaluation_test")
    write_results(train, run / "evaluation_train")
    result = {"trainer": trainer, "trained_as": trained_as, "configuration": s.split_arm(trainer)[1], **labels,
              "seed": seed, "dataset": raw.name, "epochs": s.epochs, "iterations": s.iterations,
              "plans": s.arm_plans(trainer), "minutes": (time.time() - started) / 60,
              "test": {"aggregate": test["aggregate"],
                       "cases": {c: m[MEAN]["dice"] for c, m in test["cases"].items()}},
              "train": {"aggregate": train["aggregate"],
                        "cases": {c: m[MEAN]["dice_unannotated"] for c, m in train["cases"].items()}}}
    _write_json(run / "result.json", result)
    return result


def train_and_predict(folder: BenchmarkFolder, raw: Path, seed: int, trainer: str, run: Path) -> tuple[Path, Path]:
    """Train one arm through nnUNetv2_train (unless finished) and predict the test volumes; returns the folders of
    the test predictions and of the training-volume predictions (nnU-Net's final validation of fold ``all``)."""
    s = folder.settings
    fold = _fold_folder(folder, raw, trainer, seed)
    if not (fold / "checkpoint_final.pth").is_file() or not (fold / "validation" / "summary.json").is_file():
        resume = ["--c"] if (fold / "checkpoint_latest.pth").is_file() else []
        if not resume:
            ensure_pseudolabels(folder, raw, trainer, seed, run / "pseudolabels.log")
        run_logged(f"train {trainer}", [nnunet_command("nnUNetv2_train"), _dataset_id(raw), s.split_arm(trainer)[1],
                                        FOLD, "-tr", s.bench_name(trainer), "-p", s.arm_plans(trainer),
                                        "-device", s.device, *resume],
                   training_environment(folder.seed_environment(seed)), run / "train.log", progress=EPOCH_LINE,
                   total=s.epochs, leave=False)
    test_predictions = run / "test_predictions"
    predict(folder, raw, seed, trainer, "imagesTs", test_predictions, run / "predict.log")
    return test_predictions, fold / "validation"


def predict(folder: BenchmarkFolder, raw: Path, seed: int, arm: str, images: str, out: Path, log: Path,
            probabilities: bool = False) -> None:
    """nnUNetv2_predict of an arm's trained model on ``raw/images`` into a fresh ``out``."""
    s = folder.settings
    shutil.rmtree(out, ignore_errors=True)
    cases = len({p.name.rsplit("_", 1)[0] for p in (raw / images).iterdir()})
    run_logged(f"predict {arm} {images}",
               [nnunet_command("nnUNetv2_predict"), "-i", str(raw / images), "-o", str(out), "-d", _dataset_id(raw),
                "-c", s.split_arm(arm)[1], "-f", FOLD, "-tr", s.bench_name(arm), "-p", s.arm_plans(arm),
                "-device", s.device, "-npp", "0", "-nps", "0", *(["--save_probabilities"] if probabilities else [])],
               folder.seed_environment(seed), log, progress=PREDICT_LINE, total=cases, leave=False)


def ensemble_predictions(folder: BenchmarkFolder, raw: Path, seed: int, arm: str, members: list[str],
                         run: Path) -> tuple[Path, Path]:
    """nnU-Net's own ensemble (nnUNetv2_ensemble: the mean of the members' probabilities) of the trained member
    arms, on the test and on the training volumes; returns the folders of both predictions. Each member's
    predictions and probabilities stay in ``run/members``."""
    for member in members:
        if not (_fold_folder(folder, raw, member, seed) / "checkpoint_final.pth").is_file():
            raise UserError(f"{arm}: its member {member} has no final checkpoint: its run must finish first")
    outputs = []
    for images, name in (("imagesTs", "test_predictions"), ("imagesTr", "train_predictions")):
        inputs = []
        for member in members:
            inputs.append(run / "members" / member / name)
            predict(folder, raw, seed, member, images, inputs[-1], run / "members" / member / f"{name}.log",
                    probabilities=True)
        shutil.rmtree(run / name, ignore_errors=True)
        run_logged(f"ensemble {arm} {images}", [nnunet_command("nnUNetv2_ensemble"), "-i", *map(str, inputs),
                                                "-o", str(run / name), "-np", _nproc(folder.env)],
                   folder.seed_environment(seed), run / f"ensemble_{name}.log", leave=False)
        outputs.append(run / name)
    return outputs[0], outputs[1]


def _write_json(path: Path, content: dict) -> None:
    from nnunet_ext.evaluation import json_ready

    path.parent.mkdir(parents=True, exist_ok=True)
    replace_text(path, json.dumps(json_ready(content), indent=2) + "\n")


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


CONVERGED_GAIN = 0.005  # annotated-slice Dice gained over the previous doubling below which training has converged
CONVERGE_EPOCHS = (25, 50, 100, 200)


def run_convergence(out: Path, settings: BenchmarkSettings, epochs: list[int] = CONVERGE_EPOCHS,
                    stop_when_converged: bool = True) -> dict:
    """Stock nnU-Net alone at each of ``epochs`` x ``settings.iterations`` on the first sparsity level and seed.

    Every budget is a finished run of its own (nnU-Net's poly learning rate is tied to the number of epochs). The
    converged budget is the smallest one whose annotated-slice Dice gains less than ``CONVERGED_GAIN`` over the
    previous budget; with ``stop_when_converged`` no larger budget is trained. Writes ``converge.csv``,
    ``converge.md`` and ``converge.png`` into ``out``; returns ``{"rows", "converged_epochs", "markdown"}``.
    """
    epochs = sorted(set(epochs))
    if not epochs or epochs[0] < 1:
        raise UserError(f"invalid --epochs {epochs}: give increasing positive budgets, e.g. 25 50 100 200")
    folder = BenchmarkFolder(out, settings, converge=True)
    folder.write_trainer_module([REFERENCE], epochs)
    sparsity, seed = settings.sparsity_levels[0], settings.seeds[0]
    print(f"convergence of stock nnU-Net in {folder.root}: {settings.recipe}, {sparsity.description}, seed {seed}, "
          f"{' / '.join(map(str, epochs))} epochs x {settings.iterations} iterations, plans "
          f"{settings.plans_identifier}, device {settings.device}")
    raw = prepare_dataset(folder, sparsity, seed)
    rows, converged = [], None
    for budget in epochs:
        folder.settings = replace(settings, epochs=budget)
        run = folder.run_folder(sparsity, seed, REFERENCE)
        if (run / "result.json").is_file():
            result = json.loads((run / "result.json").read_text())
        else:
            try:
                result = run_one(folder, raw, sparsity, seed, REFERENCE)
            except Exception as error:
                _record_failure(folder, sparsity, seed, REFERENCE, f"the {budget}-epoch run", error)
                raise UserError(f"the {budget}-epoch run failed: see {run / 'error.txt'}; rerun the same command to "
                                f"retry it") from None
        rows.append({"epochs": budget, "iterations": settings.iterations, "steps": budget * settings.iterations,
                     **{column: metric_of(result, where) for column, where, _ in SUMMARY_METRICS},
                     "minutes": result["minutes"]})
        if len(rows) > 1 and converged is None and \
                rows[-1]["annotated_dice"] - rows[-2]["annotated_dice"] < CONVERGED_GAIN:
            converged = budget
            if stop_when_converged:
                break
    folder.settings = settings
    markdown = _convergence_markdown(rows, converged, settings, sparsity, seed)
    write_rows(folder.root / "converge.csv", list(rows[0]), rows)
    (folder.root / "converge.md").write_text(markdown)
    _plot_convergence(rows, converged, folder.root / "converge.png")
    print(markdown)
    return {"rows": rows, "converged_epochs": converged, "markdown": markdown}


def _convergence_markdown(rows: list[dict], converged: int | None, settings: BenchmarkSettings,
                          sparsity: Sparsity, seed: int) -> str:
    lines = [f"# Convergence of stock nnU-Net: {settings.recipe}, {sparsity.description}, seed {seed}", "",
             f"Plans `{settings.plans_identifier}` ({settings.configuration}), device {settings.device}; each row is "
             f"a finished run. Dice = mean over foreground classes.", "",
             "| epochs x iterations | steps | Dice annotated slices | gain | Dice unannotated slices | "
             "Dice test volumes | minutes |", "|---|---|---|---|---|---|---|"]
    for i, row in enumerate(rows):
        gain = fmt(row["annotated_dice"] - rows[i - 1]["annotated_dice"], signed=True) if i else "—"
        lines.append(f"| {row['epochs']} x {row['iterations']} | {row['steps']} | {fmt(row['annotated_dice'])} | "
                     f"{gain} | {fmt(row['unannotated_dice'])} | {fmt(row['test_dice'])} | "
                     f"{row['minutes']:.1f} |")
    verdict = (f"Converged at **{converged} epochs x {settings.iterations} iterations** "
               f"({converged * settings.iterations} steps): the annotated-slice Dice gained less than "
               f"{CONVERGED_GAIN} over the previous budget." if converged is not None else
               f"Not converged up to {rows[-1]['epochs']} epochs: the annotated-slice Dice still gained "
               f"{CONVERGED_GAIN} or more; try larger --epochs.")
    return "\n".join(lines + ["", verdict, ""])


def write_rows(path: Path, fieldnames: list[str], rows: list[dict]) -> None:
    """A CSV with ``fieldnames`` as header, floats to 6 significant digits."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()} for row in rows)


def _plot_convergence(rows: list[dict], converged: int | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [row["steps"] for row in rows]
    for column, label in (("annotated_dice", "annotated slices"), ("unannotated_dice", "unannotated slices"),
                          ("test_dice", "test volumes")):
        ax.plot(steps, [row[column] for row in rows], marker="o", label=label)
    if converged is not None:
        ax.axvline(converged * rows[0]["iterations"], color="grey", linestyle="--", label="converged")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training steps (epochs x iterations)")
    ax.set_ylabel("Dice (stock nnU-Net)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _grouped(runs):
    groups = {}
    for sparsity, seed, trainer in runs:
        groups.setdefault((sparsity, seed), []).append(trainer)
    return groups.items()


def _record_failure(folder: BenchmarkFolder, sparsity: Sparsity, seed: int, trainer: str, stage: str,
                    error: Exception) -> None:
    record_failure(folder.run_folder(sparsity, seed, trainer), f"{trainer} {sparsity.label} seed {seed}", stage, error)


def record_failure(run: Path, title: str, stage: str, error: Exception) -> None:
    """``run/error.txt``: one line "<stage> failed: <message>", then the traceback of an unexpected error."""
    run.mkdir(parents=True, exist_ok=True)
    message = " ".join(str(error).split()) or type(error).__name__
    detail = "" if isinstance(error, UserError) else "".join(traceback.format_exception(error))
    (run / "error.txt").write_text(f"{stage} failed: {message}\n{detail}")
    tqdm.write(f"FAILED {title}: {stage} failed: {message}")


# --------------------------------------------------------------------------------------------- summary


# (column, where in result.json, what it is)
SUMMARY_METRICS = (
    ("test_dice", ("test", "dice"), "Dice on the held-out test volumes"),
    ("test_slice_dice", ("test", "slice_dice"), "mean 2D Dice over the test volumes' slices"),
    ("test_cldice", ("test", "cldice"), "clDice on the test volumes"),
    ("unannotated_dice", ("train", "dice_unannotated"), "Dice on the training volumes' unannotated slices"),
    ("annotated_dice", ("train", "dice_annotated"), "Dice on the training volumes' annotated slices"),
)


def metric_of(result: dict, where: tuple[str, str], name: str = MEAN) -> float:
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


def paired_difference(results: list[dict], trainer: str, sparsity: str, part: str, reference: str = REFERENCE) -> dict:
    """``trainer`` minus ``reference`` on the same (seed, case) pairs, from each run's per-case Dice of ``part``.

    Returns ``{"mean", "std", "n", "wins", "p", "seeds", "seed_p"}``; ``p`` is the two-sided Wilcoxon signed-rank
    p-value over the pairs (NaN below 6 pairs, where it cannot reach 0.05). A seed's cases share one training run, so
    ``p`` treats run-to-run noise as if it were case-to-case evidence; ``seed_p`` is the two-sided one-sample t-test
    p-value of the per-seed mean differences (NaN below 3 seeds or when they are all equal), the test that counts each
    run once.
    """
    def per_case(name):
        return {(r["seed"], case): value for r in results if r["trainer"] == name and r["sparsity"] == sparsity
                for case, value in r[part]["cases"].items() if value is not None and not math.isnan(value)}

    ours, stock = per_case(trainer), per_case(reference)
    pairs = sorted(set(ours) & set(stock))
    differences = [ours[k] - stock[k] for k in pairs]
    mean, std, n = mean_std(differences)
    per_seed: dict[int, list[float]] = {}
    for (seed, _), difference in zip(pairs, differences):
        per_seed.setdefault(seed, []).append(difference)
    by_seed = [float(np.mean(seed_differences)) for seed_differences in per_seed.values()]
    p = seed_p = float("nan")
    if n >= 6 and any(d != 0 for d in differences):
        from scipy.stats import wilcoxon

        p = float(wilcoxon(differences).pvalue)
    if len(by_seed) >= 3 and np.std(by_seed) > 0:
        from scipy.stats import ttest_1samp

        seed_p = float(ttest_1samp(by_seed, 0.0).pvalue)
    return {"mean": mean, "std": std, "n": n, "wins": sum(d > 0 for d in differences), "p": p,
            "seeds": len(by_seed), "seed_p": seed_p}


def fmt(value: float, digits: int = 3, signed: bool = False) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def fmt_mean_std(values: list[float]) -> str:
    mean, std, n = mean_std(values)
    return "n/a" if n == 0 else f"{fmt(mean)} ± {fmt(std)}" if n > 1 else fmt(mean)


# How fmt_paired's "N seeds p=" reads, for the tables that print it.
SEED_P_NOTE = "then the t-test p of the per-seed mean differences (≥ 3 seeds), which counts each training run once"


def fmt_paired(d: dict) -> str:
    if d["n"] == 0:
        return "n/a"
    p = "" if math.isnan(d["p"]) else f", p={d['p']:.2g}"
    seed_p = "" if math.isnan(d["seed_p"]) else f"; {d['seeds']} seeds p={d['seed_p']:.2g}"
    return f"{fmt(d['mean'], signed=True)} ± {fmt(d['std'])} (wins {d['wins']}/{d['n']}{p}{seed_p})"


def classes_of(result: dict) -> list[str]:
    """The foreground class names a run was scored on."""
    return [name for name in result["test"]["aggregate"] if name != MEAN]


def write_summary(root: Path, settings: BenchmarkSettings) -> dict:
    """summary.csv (a row per run and class, the class mean first), results.md and the plots from the finished runs;
    returns {"rows", "markdown", "failures"}."""
    root = Path(root)
    results, failures = load_results(root, settings)
    rows = [{"trainer": r["trainer"], "reference": settings.reference_of(r["trainer"]) or "",
             "sparsity": r["sparsity"], "seed": r["seed"], "dataset": r["dataset"], "class": name,
             **{column: metric_of(r, where, name) for column, where, _ in SUMMARY_METRICS}, "minutes": r["minutes"]}
            for r in results for name in [MEAN, *classes_of(r)]]
    write_rows(root / "summary.csv", ["trainer", "reference", "sparsity", "seed", "dataset", "class",
                                       *(c for c, _, _ in SUMMARY_METRICS), "minutes"], rows)
    markdown = _markdown(results, failures, settings)
    (root / "results.md").write_text(markdown)
    if results:
        _plot(results, settings, root)
    return {"rows": rows, "markdown": markdown, "failures": failures}


MAIN_COLUMNS = ("test_dice", "unannotated_dice", "annotated_dice")


def _markdown(results: list[dict], failures: list[dict], settings: BenchmarkSettings) -> str:
    s = settings
    lines = [f"# nnunet-ext benchmark: {s.recipe}" + (f" ({Path(s.data).name})" if s.recipe == DENSE else ""), "",
             f"{s.epochs} epochs x {s.iterations} iterations per run, base plans `{s.plans_identifier}` "
             f"({s.configuration}), device {s.device}, seeds {', '.join(map(str, s.seeds))}. Dice = mean over "
             f"foreground classes; mean ± std over seeds; minutes = wall time per run. Δ = arm − its reference "
             f"(stock nnU-Net on the same configuration and plans; for stock on others and ensembles, stock on "
             f"{s.configuration} and the base plans) on the same "
             f"(seed, case) pairs: mean ± std, wins, Wilcoxon p (≥ 6 pairs); {SEED_P_NOTE}.", ""]
    header = ("| arm | runs | Dice test volumes | Dice unannotated slices | Dice annotated slices | minutes | "
              "reference | Δ Dice test | Δ Dice unannotated |")
    for sparsity in s.sparsity_levels:
        level = [r for r in results if r["sparsity"] == sparsity.label]
        if not level:
            continue
        by_arm = {arm: [r for r in level if r["trainer"] == arm] for arm in s.trainers}
        by_arm = {arm: runs for arm, runs in by_arm.items() if runs}
        lines += [f"## {sparsity.description} (`{sparsity.label}`)", "", header, "|---" * 9 + "|"]
        for arm, mine in by_arm.items():
            cells = [fmt_mean_std([metric_of(r, where) for r in mine])
                     for column, where, _ in SUMMARY_METRICS if column in MAIN_COLUMNS]
            cells.append(fmt(mean_std([r["minutes"] for r in mine])[0], 1))
            reference = s.reference_of(arm)
            deltas = (["—", "—", "—"] if reference is None else
                      [f"`{reference}`"] + [fmt_paired(paired_difference(level, arm, sparsity.label, part, reference))
                                            for part in ("test", "train")])
            lines.append(f"| {arm} | {len(mine)} | " + " | ".join(cells + deltas) + " |")
        lines += ["", *_best_stock_lines(by_arm, s), *_per_class_table(by_arm), *_distance_table(by_arm)]
    if failures:
        lines += ["## Failed runs", ""] + [f"- {f['trainer']} {f['sparsity']} seed {f['seed']}: {f['error']}"
                                           for f in failures] + [""]
    return "\n".join(lines)


def _mean_metric(runs: list[dict], column: str, name: str = MEAN) -> float:
    where = next(w for c, w, _ in SUMMARY_METRICS if c == column)
    return mean_std([metric_of(r, where, name) for r in runs])[0]


def _best_stock_lines(by_arm: dict[str, list[dict]], settings: BenchmarkSettings) -> list[str]:
    """Which stock configuration a user keeps (as nnU-Net's find_best_configuration would), and the best arm."""
    stock = {arm: runs for arm, runs in by_arm.items()
             if settings.parse_arm(arm).trainer == REFERENCE and not settings.parse_arm(arm).plans}

    def ranked(arms):
        return sorted(arms, key=lambda arm: -np.nan_to_num(_mean_metric(by_arm[arm], "unannotated_dice"), nan=-1))

    def describe(arm):
        return (f"`{arm}` (Dice unannotated slices {fmt(_mean_metric(by_arm[arm], 'unannotated_dice'))}, test "
                f"volumes {fmt(_mean_metric(by_arm[arm], 'test_dice'))})")

    lines = []
    if len(stock) > 1:
        best, runner_up, *others = ranked(stock)
        lines.append(f"Better stock configuration: {describe(best)}; " +
                     "; ".join(f"{describe(arm)}" for arm in [runner_up, *others]) + ".")
        # The ranking is by mean unannotated Dice alone: show whether the lead holds pair by pair and on the test
        # volumes.
        level = [r for arm in (best, runner_up) for r in by_arm[arm]]
        sparsity = level[0]["sparsity"]
        lines.append(f"`{best}` − `{runner_up}` on the same pairs: Dice unannotated slices " +
                     fmt_paired(paired_difference(level, best, sparsity, "train", runner_up)) + ", test volumes " +
                     fmt_paired(paired_difference(level, best, sparsity, "test", runner_up)) + ".")
    ours = [arm for arm in by_arm if settings.parse_arm(arm).trainer != REFERENCE]
    if ours:
        lines.append(f"Best of the other arms: {describe(ranked(ours)[0])}.")
    return lines + [""] if lines else []


def _per_class_table(by_arm: dict[str, list[dict]]) -> list[str]:
    """Per-class Dice (test volumes / unannotated slices) next to the class mean; only with several classes."""
    classes = list(dict.fromkeys(name for runs in by_arm.values() for r in runs for name in classes_of(r)))
    if len(classes) < 2:
        return []
    lines = ["Per class (mean over seeds; test volumes / unannotated slices):", "",
             "| arm | " + " | ".join([*classes, MEAN]) + " |", "|---|" + "---|" * (len(classes) + 1)]
    for arm, runs in by_arm.items():
        cells = [f"{fmt(_mean_metric(runs, 'test_dice', name))} / {fmt(_mean_metric(runs, 'unannotated_dice', name))}"
                 for name in [*classes, MEAN]]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines + [""]


def _distance_table(by_arm: dict[str, list[dict]]) -> list[str]:
    """Dice on the training volumes by distance (slices) to the nearest annotated slice, mean over seeds."""
    curves = {arm: [r["train"]["aggregate"][MEAN].get("dice_by_distance") or {} for r in runs]
              for arm, runs in by_arm.items()}
    distances = sorted({int(d) for arm_curves in curves.values() for curve in arm_curves for d in curve})
    if not distances:
        return []
    lines = ["Dice on the training volumes by distance to the nearest annotated slice (0 = annotated; mean over "
             "seeds):", "", "| arm | " + " | ".join(map(str, distances)) + " |", "|---|" + "---|" * len(distances)]
    for arm, arm_curves in curves.items():
        cells = [fmt(mean_std([_none_to_nan(c.get(str(d), c.get(d))) for c in arm_curves])[0]) for d in distances]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines + [""]


def _plot(results: list[dict], settings: BenchmarkSettings, root: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    labels = [sp.label for sp in settings.sparsity_levels]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, (_column, where, title) in zip(axes, (SUMMARY_METRICS[0], SUMMARY_METRICS[3])):
        for trainer in settings.trainers:
            stats = [mean_std([metric_of(r, where) for r in results
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


def resolve_dense(text: str) -> str:
    """``--dense``: a dataset folder, or a dataset id / name in $nnUNet_raw."""
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if text.isdigit() or text.startswith("Dataset"):
        from nnunet_ext.nnunet_paths import dataset_folder

        return str(dataset_folder(text, "nnUNet_raw"))
    raise UserError(f"--dense {text}: no such folder, and not a dataset id or DatasetXXX_Name; pass a dense nnU-Net "
                    f"raw dataset")


def _data_settings(args) -> dict:
    """recipe, data and test_cases from --recipe / --data / --dense / --test-cases."""
    if args.dense is not None:
        if args.recipe is not None or args.data is not None:
            raise UserError("--dense replaces --recipe and --data: pass either --dense DATASET or a recipe")
        return {"recipe": DENSE, "data": resolve_dense(args.dense), "test_cases": args.test_cases}
    if args.test_cases is not None:
        raise UserError("--test-cases applies to --dense datasets only; the recipes have fixed test volumes")
    return {"recipe": args.recipe or "synth", "data": args.data}


def common_settings(args) -> dict:
    return {**_data_settings(args), "iterations": args.iterations, "plans": args.plans,
            "configuration": args.configuration, "device": args.device, "topology": not args.no_topology}


def run_cli(args) -> None:
    settings = BenchmarkSettings(**common_settings(args), trainers=args.trainers, sparsities=args.sparsity,
                                 seeds=args.seeds, epochs=args.epochs, attention_stages=args.attention_stages,
                                 reference_2d=not args.no_2d)
    if not settings.budget_measured and args.epochs is None:
        print(f"note: no converged budget is known for this dataset, so every arm trains {settings.epochs} x "
              f"{settings.iterations}; measure one with `nnunet-ext benchmark converge --dense ...` and pass "
              f"--epochs/--iterations", file=sys.stderr)
    summary = run_benchmark(Path(args.out), settings)
    if summary["failures"]:
        total = len(settings.sparsities) * len(settings.seeds) * len(settings.trainers)
        raise UserError(f"{len(summary['failures'])} of {total} runs failed (listed in {Path(args.out) / 'results.md'}"
                        f", each error in its run folder's error.txt): fix the cause and rerun the same command, "
                        f"which retries only them")


def run_convergence_cli(args) -> None:
    settings = BenchmarkSettings(**common_settings(args), trainers=[], sparsities=args.sparsity and [args.sparsity],
                                 seeds=[args.seed], reference_2d=False)
    run_convergence(Path(args.out), settings, args.epochs, stop_when_converged=not args.all_budgets)


def add_data_arguments(parser) -> None:
    parser.add_argument("--recipe", choices=BUILT_IN_RECIPES, help="built-in dataset recipe (default: synth)")
    parser.add_argument("--data", help="the recipe's data folder: vesselnn's TIFF pairs, gala_fibsem's "
                        "train-image.h5 + train-gt.lzf.h5")
    parser.add_argument("--dense", metavar="DATASET",
                        help="benchmark your own DENSE nnU-Net raw dataset (id or name in $nnUNet_raw, or a folder); "
                             "sparse levels are simulated from it with `nnunet-ext sparsify` along axis 0")
    parser.add_argument("--test-cases", type=int, metavar="N",
                        help="--dense without labelsTs: hold out N evenly spread cases as test volumes (default: "
                             "every third case, at least one)")


def add_training_arguments(parser) -> None:
    # Plain dataclass defaults: an instance would check the trainers, importing torch for every nnunet-ext command.
    defaults = BenchmarkSettings
    parser.add_argument("--iterations", type=int,
                        help="training iterations per epoch (default: the recipe's measured budget)")
    parser.add_argument("--plans", default=defaults.plans,
                        help="tiny (CPU-sized, derived) or an existing plans identifier such as nnUNetPlans (GPU)")
    parser.add_argument("-c", "--configuration", default=defaults.configuration)
    parser.add_argument("--device", default=defaults.device, choices=("cpu", "cuda", "mps"))
    parser.add_argument("--no-topology", action="store_true", help="skip clDice and Betti errors")


def add_arguments(parser) -> None:
    """The options of ``nnunet-ext benchmark`` (the accuracy runs)."""
    parser.add_argument("--out", default="nnunet_ext_benchmark",
                        help="benchmark folder: created, or resumed when it holds this benchmark")
    add_data_arguments(parser)
    parser.add_argument("--trainers", nargs="+", default=list(DEFAULT_TRAINERS), metavar="ARM",
                        help=f"arms TRAINER[@CONFIGURATION][@PLANS] compared with {REFERENCE} (PLANS: attention or "
                             f"an existing identifier; CONFIGURATION 2d+3d_fullres: nnU-Net's ensemble of both "
                             f"models); stock on each arm's plans and stock 2d join automatically "
                             f"(default: {' '.join(DEFAULT_TRAINERS)})")
    parser.add_argument("--sparsity", nargs="+", metavar="LEVEL",
                        help="every:K or slices:N levels (default per recipe: synth every:4 every:8)")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS), help="seeds (default 0 1 2)")
    parser.add_argument("--epochs", type=int, help="training epochs (default: the recipe's measured budget)")
    add_training_arguments(parser)
    parser.add_argument("--attention-stages", type=int, default=BenchmarkSettings.attention_stages,
                        help="decoder stages with axial attention in @attention arms (default 2)")
    parser.add_argument("--no-2d", action="store_true", help="leave out the stock 2d reference arm")
    parser.set_defaults(func=run_cli)


def register_converge_cli(modes) -> None:
    """``nnunet-ext benchmark converge``: stock nnU-Net at doubling budgets, and the budget where it converged."""
    parser = modes.add_parser("converge", help="stock nnU-Net at increasing budgets: where has it converged?",
                              description="Train stock nnU-Net alone at increasing budgets on one sparsity level and "
                                          "seed and report the annotated- and unannotated-slice Dice per budget and "
                                          f"the smallest budget whose annotated-slice Dice gains < {CONVERGED_GAIN} "
                                          f"over the previous one.")
    parser.add_argument("--out", default="nnunet_ext_converge", help="study folder: created, or resumed")
    add_data_arguments(parser)
    parser.add_argument("--sparsity", metavar="LEVEL", help="one level (default: the recipe's first)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, nargs="+", default=list(CONVERGE_EPOCHS),
                        help=f"budgets in epochs (default {' '.join(map(str, CONVERGE_EPOCHS))})")
    add_training_arguments(parser)
    parser.add_argument("--all-budgets", action="store_true", help="train every budget, also after convergence")
    parser.set_defaults(func=run_convergence_cli)
