"""Per-iteration training time of nnU-Net trainers, measured side by side in one process.

Data loading is excluded: batches are drawn once from a trainer's own data loader and then replayed, and
the trainers' steps are interleaved so that machine noise hits them alike. Report ratios, not seconds.
"""

import os
import statistics
import tempfile
import time
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
    folder = dataset_folder(dataset)
    plans_dict = load_json(str(folder / f"{plans}.json"))
    plans_dict["continue_training"] = False
    with _results_in(scratch or tempfile.mkdtemp(prefix="nnunet_ext_steptime_")):
        trainer = trainer_class(plans=plans_dict, configuration=configuration, fold=fold,
                                dataset_json=load_json(str(folder / "dataset.json")), device=torch.device(device))
    trainer.initialize()
    return trainer


def draw_batches(trainer, count: int) -> list[dict]:
    """``count`` augmented training batches from the trainer's own data loader."""
    loader, _ = trainer.get_dataloaders()
    return [next(loader) for _ in range(count)]


def median_step_seconds(runs: dict[str, tuple], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median seconds of one ``train_step`` per named (trainer, batches) pair, steps interleaved across pairs."""
    for trainer, batches in runs.values():
        trainer.network.train()
        for batch in batches[:warmup]:
            trainer.train_step(batch)
    times = {name: [] for name in runs}
    for i in range(repeats):
        for name, (trainer, batches) in runs.items():
            batch = batches[i % len(batches)]
            _synchronize(trainer.device)
            start = time.perf_counter()
            trainer.train_step(batch)
            _synchronize(trainer.device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
