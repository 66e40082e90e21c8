"""One training iteration of stock nnUNetTrainer: auto-configured plans vs nnUNetPlans_tiny, side by side.

Usage (after nnUNetv2_plan_and_preprocess and `nnunet-ext plans tiny` for the dataset):
    python benchmarks/tiny_plans_step_time.py -d 501 [--repeats 5] [--device cpu]
"""

import argparse

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.benchmarking.steptime import median_step_seconds
from nnunet_ext.trainer_in_process import build_trainer, draw_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dataset", required=True)
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("--plans", nargs=2, default=("nnUNetPlans", "nnUNetPlans_tiny"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    runs = {}
    for plans in args.plans:
        trainer = build_trainer(nnUNetTrainer, args.dataset, plans, args.configuration, device=args.device)
        runs[plans] = (trainer, draw_batches(trainer, 2))
    seconds = median_step_seconds(runs, repeats=args.repeats)
    for plans, (trainer, _) in runs.items():
        print(f"{plans:>20}: patch {trainer.configuration_manager.patch_size}, batch {trainer.batch_size}, "
              f"{seconds[plans]:.3f} s / iteration (median of {args.repeats})")
    reference, variant = args.plans
    print(f"ratio {reference} / {variant}: {seconds[reference] / seconds[variant]:.1f}")


if __name__ == "__main__":
    main()
