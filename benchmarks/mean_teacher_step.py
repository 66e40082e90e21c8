"""MeanTeacherContinuityTrainer vs stock nnUNetTrainer: one training step on identical plans and batches.

Prints ratios measured side by side (data loading excluded; ``nnunet-ext benchmark speed`` does the first two):
  - time per iteration, steps interleaved in one process (target <= 1.35),
  - peak memory of the step (target <= 1.15), each trainer in a fresh process
    (see ``nnunet_ext.benchmarking.steptime``),
  - share of the step spent in the continuity loss (target <= 3 %).

Usage (after nnUNetv2_plan_and_preprocess and `nnunet-ext plans tiny`; nnUNet_preprocessed set):
    python benchmarks/mean_teacher_step.py -d 501 [-p nnUNetPlans_tiny] [--repeats 20] [--device cpu]
"""

import argparse
import statistics
import tempfile
import time

import torch

from nnunet_ext.benchmarking.speed import format_speed, measure_speed
from nnunet_ext.semi_supervised import axial_continuity_loss, unlabeled_mask
from nnunet_ext.trainer_in_process import build_trainer, draw_batches
from nnunet_ext.trainers import MeanTeacherContinuityTrainer
from nnunet_ext.trainers.semi_supervised_base import first_output

TRAINER = "MeanTeacherContinuityTrainer"


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
    args = parser.parse_args()

    results = measure_speed(args.dataset, [TRAINER], plans=args.plans, configuration=args.configuration,
                            repeats=args.repeats, device=args.device)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = build_trainer(MeanTeacherContinuityTrainer, args.dataset, args.plans, args.configuration,
                                device=args.device, scratch=scratch)
        torch.manual_seed(0)
        continuity = continuity_seconds(trainer, draw_batches(trainer, 1)[0], args.repeats)
    ours = results["trainers"][TRAINER]
    print(format_speed(results))
    print(f"time ratio   {TRAINER} / stock: {ours['time_ratio']:.3f}  (target <= 1.35)")
    print(f"memory ratio {TRAINER} / stock: {ours['memory_ratio']:.3f}  (target <= 1.15)")
    print(f"continuity loss share of the step: {continuity / ours['seconds'] * 100:.2f} %  (target <= 3 %)")


if __name__ == "__main__":
    main()
