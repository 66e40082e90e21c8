"""An nnU-Net trainer built in this process, as ``nnUNetv2_train`` builds it, and batches from its own data loader:
for step timing, memory measurements and tests that need a real trainer without a training run."""

import os
import tempfile
from contextlib import contextmanager

import torch
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunet_ext.nnunet_paths import dataset_folder


@contextmanager
def _results_in(folder: str):
    """nnU-Net trainers create log folders under nnUNet_results on construction: keep those out of the way."""
    previous = os.environ.get("nnUNet_results")
    os.environ["nnUNet_results"] = folder
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("nnUNet_results")
        else:
            os.environ["nnUNet_results"] = previous


def build_trainer(trainer_class, dataset: str | int, plans: str, configuration: str = "3d_fullres",
                  fold: int = 0, device: str = "cpu", scratch: str | None = None):
    """An initialized trainer (network, optimizer, loss) for a preprocessed dataset, as nnUNetv2_train builds it."""
    if torch.device(device).type == "cuda":
        use_nnunet_cudnn_settings()
    folder = dataset_folder(dataset)
    plans_dict = load_json(str(folder / f"{plans}.json"))
    plans_dict["continue_training"] = False
    with _results_in(scratch or tempfile.mkdtemp(prefix="nnunet_ext_trainer_")):
        trainer = trainer_class(plans=plans_dict, configuration=configuration, fold=fold,
                                dataset_json=load_json(str(folder / "dataset.json")), device=torch.device(device))
    trainer.initialize()
    return trainer


def use_nnunet_cudnn_settings() -> None:
    """cuDNN as nnUNetv2_train sets it on a GPU: autotuned, non-deterministic convolutions (else steps run slower
    than in real training: stock nnU-Net's step took 4.4x as long on an H200, auto-configured 3d_fullres plans)."""
    torch.backends.cudnn.deterministic = False
    torch.backends.cudnn.benchmark = True


def draw_batches(trainer, count: int) -> list[dict]:
    """``count`` augmented training batches from the trainer's own data loader, whose background workers are
    stopped afterwards (they would keep filling their queues while steps are timed)."""
    loaders = trainer.get_dataloaders()
    try:
        return [next(loaders[0]) for _ in range(count)]
    finally:
        for loader in loaders:
            if hasattr(loader, "_finish"):
                loader._finish()
