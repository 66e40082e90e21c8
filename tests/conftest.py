"""Shared fixtures: one tiny synthetic dataset, planned and preprocessed once per test session."""

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ext.nnunet_paths import EXT_TRAINER_VAR, NNUNET_FOLDERS, ext_trainer_value

TEST_TRAINER_DIR = Path(__file__).parent / "ext_trainers"
BIN = Path(sys.executable).parent
TINY_DATASET_ID = 7
TINY_SHAPE = (16, 32, 32)


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs two workers on two cores) one torch thread per worker, so the
    in-process tests of two workers do not oversubscribe the cores."""
    if "PYTEST_XDIST_WORKER" in os.environ:
        import torch

        torch.set_num_threads(1)


def cli(*args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    """Run a console script installed in this environment (nnunet-ext, nnUNetv2_*)."""
    result = subprocess.run([str(BIN / args[0]), *args[1:]], env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


def nnunet_env(root: Path) -> dict:
    """Environment for nnU-Net CLIs on CPU with data under ``root`` and the test trainers findable."""
    inherited = (*NNUNET_FOLDERS, EXT_TRAINER_VAR, "nnUNet_n_proc_DA")
    env = {k: v for k, v in os.environ.items() if k not in inherited}
    env.update({var: str(root / var) for var in NNUNET_FOLDERS})
    env[EXT_TRAINER_VAR] = ext_trainer_value(str(TEST_TRAINER_DIR))
    env.update(nnUNet_def_n_proc="1", nnUNet_compile="false")
    return env


def train_env(env: dict) -> dict:
    """Augmentation in the main process; not for planning, which sets torch's thread count from this value."""
    return {**env, "nnUNet_n_proc_DA": "0"}


@dataclass
class TinyDataset:
    root: Path
    env: dict
    dataset_id: int
    raw: Path  # the raw dataset folder (imagesTr, labelsTr, imagesTs, labelsTs, ...)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> TinyDataset:
    """synth -> nnUNetv2_plan_and_preprocess -> nnunet-ext plans tiny, through the real CLIs."""
    root = tmp_path_factory.mktemp("nnunet")
    env = nnunet_env(root)
    ds = str(TINY_DATASET_ID)
    cli("nnunet-ext", "synth", "-d", ds, "--cases", "5", "--test-cases", "1",
        "--size", *map(str, TINY_SHAPE), "--every", "4", env=env)
    cli("nnUNetv2_plan_and_preprocess", "-d", ds, "-c", "3d_fullres", "-np", "1", "-npfp", "1",
        "--verify_dataset_integrity",
        env=env)
    cli("nnunet-ext", "plans", "tiny", "-d", ds, env=env)
    raw = next((root / "nnUNet_raw").glob(f"Dataset{TINY_DATASET_ID:03d}_*"))
    return TinyDataset(root=root, env=env, dataset_id=TINY_DATASET_ID, raw=raw)


@pytest.fixture(scope="session")
def tiny_dataset_2d(tiny_dataset) -> TinyDataset:
    """The tiny dataset also preprocessed for nnU-Net's 2d configuration (its slices are the annotation axis's)."""
    cli("nnUNetv2_preprocess", "-d", str(tiny_dataset.dataset_id), "-c", "2d", "-np", "1", env=tiny_dataset.env)
    return tiny_dataset


def read_training_log(fold) -> str:
    """All of nnU-Net's training_log_*.txt of a fold folder (one per start, resumes included), oldest first."""
    return "\n".join(p.read_text() for p in sorted(Path(fold).glob("training_log_*.txt")))


def record_supervised_loss(trainer) -> list[tuple]:
    """Each (output, target) the trainer's supervised loss (``trainer.loss``) is called with, from now on."""
    calls = []
    supervised = trainer.loss

    def recording(output, target):
        calls.append((output, target))
        return supervised(output, target)

    trainer.loss = recording
    return calls


def assert_predicts_the_test_volume(tiny_dataset: TinyDataset, trainer: str, configuration: str = "3d_fullres",
                                    plans: str = "nnUNetPlans_tiny") -> None:
    """nnUNetv2_predict with the trained fold 0 writes a label map of the test volume's shape and classes."""
    out = tiny_dataset.root / f"predictions_{trainer}__{plans}__{configuration}"
    cli("nnUNetv2_predict", "-i", str(tiny_dataset.raw / "imagesTs"), "-o", str(out), "-d",
        str(tiny_dataset.dataset_id), "-c", configuration, "-f", "0", "-tr", trainer, "-p", plans, "-device", "cpu",
        "-npp", "0", "-nps", "0", env=tiny_dataset.env)
    (prediction,) = out.glob("*.nii.gz")
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(prediction)))
    assert array.shape == TINY_SHAPE and set(np.unique(array)) <= {0, 1, 2}


@dataclass
class TrainedModel:
    trainer: str
    fold: Path  # the fold folder under nnUNet_results
    stdout: str  # of nnUNetv2_train


STOCK_TEST_TRAINER = "nnUNetTrainer_exttest_noval"


@pytest.fixture(scope="session")
def trained_stock(tiny_dataset) -> TrainedModel:
    """Stock nnU-Net (test budget, no final validation) trained once on the tiny dataset, fold 0, for the tests
    that predict with a model."""
    result = cli("nnUNetv2_train", str(tiny_dataset.dataset_id), "3d_fullres", "0", "-tr", STOCK_TEST_TRAINER,
                 "-p", "nnUNetPlans_tiny", "-device", "cpu", env=train_env(tiny_dataset.env))
    fold = next((tiny_dataset.root / "nnUNet_results").glob(
        f"Dataset{TINY_DATASET_ID:03d}_*/{STOCK_TEST_TRAINER}__nnUNetPlans_tiny__3d_fullres/fold_0"))
    return TrainedModel(STOCK_TEST_TRAINER, fold, result.stdout)


@pytest.fixture
def benchmark_shell(monkeypatch) -> None:
    """A user's shell running `nnunet-ext benchmark`: no nnU-Net folders set (the benchmark sets its own), one worker
    process, no torch.compile; augmentation workers left to the benchmark."""
    for variable in (*NNUNET_FOLDERS, "nnUNet_n_proc_DA"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("nnUNet_def_n_proc", "1")
    monkeypatch.setenv("nnUNet_compile", "false")


@pytest.fixture
def tiny_env(tiny_dataset, monkeypatch) -> TinyDataset:
    """This process's nnU-Net variables pointed at the shared tiny dataset (augmentation in the main process)."""
    for key, value in train_env(tiny_dataset.env).items():
        if key.startswith("nnUNet"):
            monkeypatch.setenv(key, value)
    return tiny_dataset


@pytest.fixture
def build_in_process(tiny_env, tmp_path):
    """``build(trainer_class, plans="nnUNetPlans_tiny", **kwargs)``: an initialized trainer on the tiny dataset,
    built in this process as nnUNetv2_train builds it (its results folder in tmp_path)."""
    from nnunet_ext.trainer_in_process import build_trainer

    def build(trainer_class, plans: str = "nnUNetPlans_tiny", **kwargs):
        return build_trainer(trainer_class, tiny_env.dataset_id, plans, scratch=str(tmp_path), **kwargs)

    return build
