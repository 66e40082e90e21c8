"""MeanTeacherContinuityTrainer vs stock nnUNetTrainer: one training step on identical plans and batches.

Prints ratios measured side by side (data loading excluded):
  - time per iteration, steps interleaved in one process (target <= 1.35),
  - peak memory of the step (target <= 1.15): CUDA max_memory_allocated on a GPU; on CPU (Linux) the peak
    resident set size during the step above the resident size before it, each trainer in a fresh process whose
    allocator returns large blocks to the system at once (MALLOC_MMAP_THRESHOLD_), so RSS follows live memory,
  - share of the step spent in the continuity loss (target <= 3 %).

Usage (after nnUNetv2_plan_and_preprocess and `nnunet-ext plans tiny`; nnUNet_preprocessed set):
    python benchmarks/mean_teacher_step.py -d 501 [-p nnUNetPlans_tiny] [--repeats 20] [--device cpu]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.semi_supervised import axial_continuity_loss, unlabeled_mask
from nnunet_ext.steptime import build_trainer, draw_batches, median_step_seconds
from nnunet_ext.trainers import MeanTeacherContinuityTrainer
from nnunet_ext.trainers.semi_supervised_base import first_output

TRAINERS = {"nnUNetTrainer": nnUNetTrainer, "MeanTeacherContinuityTrainer": MeanTeacherContinuityTrainer}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _step_peak_bytes(trainer, batch) -> int:
    """Peak memory one train_step adds above what is live before it."""
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        trainer.train_step(batch)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident size (VmHWM) to the current one
    before = _status_bytes("VmRSS")
    trainer.train_step(batch)
    return _status_bytes("VmHWM") - before


def peak_memory_of_steps(args, name: str) -> float:
    """Largest step peak over a few steps (run in a fresh process, see the module docstring)."""
    trainer = build_trainer(TRAINERS[name], args.dataset, args.plans, args.configuration, device=args.device)
    trainer.current_epoch = trainer.num_epochs // 2  # SSL losses at full weight
    torch.manual_seed(0)
    batches = draw_batches(trainer, 2)
    trainer.network.train()
    trainer.train_step(batches[0])  # first-step allocations (optimizer state) are not the step's working memory
    return float(max(_step_peak_bytes(trainer, batches[i % 2]) for i in range(4)))


def continuity_seconds(trainer, batch, repeats: int) -> float:
    """Median time of the continuity loss forward + backward on the student's output for this batch."""
    data = batch["data"].to(trainer.device)
    target = first_output(batch["target"]).to(trainer.device)
    unlabeled = unlabeled_mask(target, trainer.label_manager.ignore_label)
    with torch.no_grad():
        logits = first_output(trainer.network(data)).float()
    times = []
    for _ in range(repeats):
        leaf = logits.clone().requires_grad_(True)
        start = time.perf_counter()
        axial_continuity_loss(torch.softmax(leaf, 1), unlabeled, trainer.continuity_axis).backward()
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dataset", required=True)
    parser.add_argument("-p", "--plans", default="nnUNetPlans_tiny")
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory-of", choices=sorted(TRAINERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:
        print(json.dumps(peak_memory_of_steps(args, args.memory_of)))
        return

    runs = {}
    for name, trainer_class in TRAINERS.items():
        trainer = build_trainer(trainer_class, args.dataset, args.plans, args.configuration, device=args.device)
        trainer.current_epoch = trainer.num_epochs // 2
        runs[name] = trainer
    batches = draw_batches(runs["nnUNetTrainer"], 4)  # the very same batches for both trainers
    seconds = median_step_seconds({name: (t, batches) for name, t in runs.items()}, repeats=args.repeats)
    mt = runs["MeanTeacherContinuityTrainer"]
    continuity = continuity_seconds(mt, batches[0], args.repeats)

    memory = {}
    for name in TRAINERS:
        out = subprocess.run([sys.executable, __file__, "-d", str(args.dataset), "-p", args.plans, "-c",
                              args.configuration, "--device", args.device, "--memory-of", name],
                             capture_output=True, text=True, check=True,
                             env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}).stdout
        memory[name] = json.loads(out.strip().splitlines()[-1])

    print(f"plans {args.plans} / {args.configuration}, patch {mt.configuration_manager.patch_size}, "
          f"batch {mt.batch_size}, device {args.device}, {args.repeats} interleaved repeats")
    for name in TRAINERS:
        print(f"{name:>30}: {seconds[name] * 1000:8.1f} ms / step, step peak memory {memory[name] / 2**20:8.1f} MiB")
    print(f"time ratio   MeanTeacherContinuity / stock: {seconds['MeanTeacherContinuityTrainer'] / seconds['nnUNetTrainer']:.3f}"
          f"  (target <= 1.35)")
    print(f"memory ratio MeanTeacherContinuity / stock: "
          f"{memory['MeanTeacherContinuityTrainer'] / memory['nnUNetTrainer']:.3f}  (target <= 1.15)")
    print(f"continuity loss share of the step: {continuity / seconds['MeanTeacherContinuityTrainer'] * 100:.2f} %"
          f"  (target <= 3 %)")


if __name__ == "__main__":
    main()
