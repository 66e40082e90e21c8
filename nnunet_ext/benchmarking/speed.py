"""``nnunet-ext benchmark speed``: each trainer's training step against stock nnUNetTrainer, side by side.

All trainers are built on the same plans and replay the very same augmented batches (data loading excluded);
their steps are interleaved in one process and the median is taken, so the ratios hold on a noisy machine. The
step peak memory of each trainer is measured in a fresh process on the same batches
(``nnunet_ext.benchmarking.steptime``).
SSL trainers are measured at mid-training (``current_epoch = num_epochs // 2``), where their weights are full.
"""

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from nnunet_ext.benchmarking.steptime import CPU_MEMORY_ENV, max_step_peak_bytes, median_step_seconds
from nnunet_ext.errors import UserError
from nnunet_ext.trainer_in_process import build_trainer, draw_batches

REFERENCE = "nnUNetTrainer"


def find_trainer_class(name: str, search_ext_folders: bool = True) -> type:
    """A trainer class by name: ours (``nnunet_ext.trainers``), nnU-Net's own, then ``$nnUNet_extTrainer``'s."""
    import nnunetv2
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    import nnunet_ext.trainers as ours

    if name == nnUNetTrainer.__name__:
        return nnUNetTrainer
    if name in ours.__all__:
        return getattr(ours, name)
    found = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "training", "nnUNetTrainer"), name,
                                        "nnunetv2.training.nnUNetTrainer")
    if found is None and search_ext_folders:
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

        with contextlib.redirect_stdout(io.StringIO()):  # it narrates every folder it searches
            try:
                found = recursive_find_trainer_class_by_name(name)
            except RuntimeError:
                found = None
    if found is None:
        where = "nnU-Net, nnunet_ext.trainers or $nnUNet_extTrainer" if search_ext_folders else \
            "nnU-Net or nnunet_ext.trainers"
        raise UserError(f"trainer {name!r} not found in {where}: check the name")
    return found


def _built(name: str, dataset, plans: str, configuration: str, device: str, scratch: str):
    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net's banner and set-up messages, once per trainer
        trainer = build_trainer(find_trainer_class(name), dataset, plans, configuration, device=device,
                                scratch=scratch)
    trainer.current_epoch = trainer.num_epochs // 2
    return trainer


def measure_speed(dataset, trainers: list[str], plans: str = "nnUNetPlans_tiny", configuration: str = "3d_fullres",
                  repeats: int = 20, device: str = "cpu", num_batches: int = 4) -> dict:
    """Median step seconds and step peak bytes of stock nnUNetTrainer and each of ``trainers``, with ratios.

    Returns:
        ``{"settings": {...}, "trainers": {name: {"seconds", "peak_bytes", "time_ratio", "memory_ratio"}}}``;
        ratios are relative to nnUNetTrainer (always measured first).
    """
    if repeats < 1:
        raise UserError(f"invalid --repeats {repeats}: give a positive number of steps, e.g. 20")
    names = [REFERENCE] + [t for t in dict.fromkeys(trainers) if t != REFERENCE]
    for name in names:
        find_trainer_class(name)  # a bad name fails before anything is built
    with tempfile.TemporaryDirectory(prefix="nnunet_ext_speed_") as scratch:
        built = {name: _built(name, dataset, plans, configuration, device, scratch) for name in names}
        torch.manual_seed(0)
        batches = draw_batches(built[REFERENCE], num_batches)  # the very same batches for every trainer
        seconds = median_step_seconds({name: (t, batches) for name, t in built.items()}, repeats=repeats)
        reference = built[REFERENCE]
        settings = {"dataset": str(dataset), "plans": plans, "configuration": configuration, "device": device,
                    "repeats": repeats, "patch_size": list(reference.configuration_manager.patch_size),
                    "batch_size": reference.batch_size}
        del built, reference  # the child processes measure memory; these trainers are done
        batch_file = Path(scratch) / "batches.pt"
        torch.save(batches, batch_file)
        memory = {name: _peak_bytes_in_fresh_process(name, dataset, plans, configuration, device, batch_file)
                  for name in names}
    results = {name: {"seconds": seconds[name], "peak_bytes": memory[name],
                      "time_ratio": seconds[name] / seconds[REFERENCE],
                      "memory_ratio": memory[name] / memory[REFERENCE]} for name in names}
    return {"settings": settings, "trainers": results}


def _peak_bytes_in_fresh_process(name: str, dataset, plans: str, configuration: str, device: str,
                                 batch_file: Path) -> float:
    command = [sys.executable, "-m", "nnunet_ext.benchmarking.speed", name, str(dataset), plans, configuration, device,
               str(batch_file)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **CPU_MEMORY_ENV})
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement of {name} failed:\n{done.stderr[-3000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1]))


def _peak_bytes_main(argv: list[str]) -> None:
    """Child process: step peak memory of one trainer on the saved batches, printed as JSON."""
    name, dataset, plans, configuration, device, batch_file = argv
    trainer = _built(name, dataset, plans, configuration, device, str(Path(batch_file).parent))
    batches = torch.load(batch_file, weights_only=False)
    print(json.dumps(max_step_peak_bytes(trainer, batches)))


def format_speed(results: dict) -> str:
    s = results["settings"]
    lines = [f"plans {s['plans']} / {s['configuration']}, patch {s['patch_size']}, batch {s['batch_size']}, "
             f"device {s['device']}, median of {s['repeats']} interleaved steps, identical batches"]
    width = max(len("trainer"), *(len(name) for name in results["trainers"]))
    lines.append(f"{'trainer':<{width}} {'ms/step':>9} {'peak MiB':>9} {'time ratio':>11} {'memory ratio':>13}")
    for name, r in results["trainers"].items():
        lines.append(f"{name:<{width}} {r['seconds'] * 1e3:9.1f} {r['peak_bytes'] / 2**20:9.1f} "
                     f"{r['time_ratio']:11.3f} {r['memory_ratio']:13.3f}")
    return "\n".join(lines)


def run_cli(args) -> None:
    results = measure_speed(args.dataset, args.trainers, plans=args.plans, configuration=args.configuration,
                            repeats=args.repeats, device=args.device)
    print(format_speed(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")


def register_cli(subparsers) -> None:
    """Add ``speed`` to the subcommands of ``nnunet-ext benchmark``."""
    summary = "step time and step peak memory of trainers relative to stock nnUNetTrainer (identical batches)"
    parser = subparsers.add_parser("speed", help=summary, description=summary)
    parser.add_argument("-d", "--dataset", required=True, help="preprocessed dataset id or name")
    parser.add_argument("--trainers", nargs="+", required=True, metavar="TRAINER",
                        help="trainers to compare with nnUNetTrainer (ours, nnU-Net's or $nnUNet_extTrainer's)")
    parser.add_argument("-p", "--plans", default="nnUNetPlans_tiny", help="plans identifier (default nnUNetPlans_tiny)")
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("--repeats", type=int, default=20, help="interleaved steps per trainer (default 20)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"))
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.set_defaults(func=run_cli)


if __name__ == "__main__":
    _peak_bytes_main(sys.argv[1:])
