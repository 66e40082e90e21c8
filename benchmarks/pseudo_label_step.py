"""PseudoLabelWeightedTrainer vs stock nnUNetTrainer: batch generation and one training step, side by side.

Prints ratios measured in one process, interleaved so that machine noise hits both alike:
  - time to generate one augmented training batch (loading + augmentation; ours also reads and transforms the
    pseudo-label and confidence channels, and samples segmentation nearest-neighbour),
  - time per training step on such batches (ours adds the pseudo-label Dice + CE over the deep-supervision outputs).

Usage (after `nnunet-ext pseudolabels -d ID ... -f FOLD`; nnUNet_preprocessed set; nnUNet_n_proc_DA is ignored):
    python benchmarks/pseudo_label_step.py -d 501 [-p nnUNetPlans_tiny] [-f 0] [--repeats 20] [--device cpu]
"""

import argparse
import statistics
import time

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.benchmarking.steptime import median_step_seconds
from nnunet_ext.trainer_in_process import build_trainer
from nnunet_ext.trainers import PseudoLabelWeightedTrainer

TRAINERS = {"nnUNetTrainer": nnUNetTrainer, "PseudoLabelWeightedTrainer": PseudoLabelWeightedTrainer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dataset", required=True)
    parser.add_argument("-p", "--plans", default="nnUNetPlans_tiny")
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("-f", "--fold", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    trainers = {name: build_trainer(cls, args.dataset, args.plans, args.configuration, args.fold, args.device)
                for name, cls in TRAINERS.items()}
    # Single-threaded loaders from the trainers' own pipelines (nnU-Net's, not the worker pool).
    loaders = {name: t.get_dataloaders()[0] for name, t in trainers.items()}
    for loader in loaders.values():
        next(loader)
    load_times = {name: [] for name in trainers}
    batches = {name: [] for name in trainers}
    for _ in range(args.repeats):
        for name, loader in loaders.items():
            start = time.perf_counter()
            batches[name].append(next(loader))
            load_times[name].append(time.perf_counter() - start)
    load = {name: statistics.median(v) for name, v in load_times.items()}
    step = median_step_seconds({name: (t, batches[name]) for name, t in trainers.items()}, repeats=args.repeats)

    ours = trainers["PseudoLabelWeightedTrainer"]
    print(f"plans {args.plans} / {args.configuration}, patch {ours.configuration_manager.patch_size}, batch "
          f"{ours.batch_size}, fold {args.fold}, device {args.device}, {args.repeats} interleaved repeats")
    for name in trainers:
        print(f"{name:>28}: {load[name] * 1000:8.1f} ms / batch, {step[name] * 1000:8.1f} ms / step")
    print(f"batch generation ratio PseudoLabelWeighted / stock: "
          f"{load['PseudoLabelWeightedTrainer'] / load['nnUNetTrainer']:.3f}")
    print(f"step time ratio        PseudoLabelWeighted / stock: "
          f"{step['PseudoLabelWeightedTrainer'] / step['nnUNetTrainer']:.3f}")


if __name__ == "__main__":
    main()
