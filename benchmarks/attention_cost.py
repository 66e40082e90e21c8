"""Cost of axial attention: the same trainer on plans with vs without attention, side by side in one run.

Prints, per attention plans, ratios to the plans without attention (data loading excluded):
  - time per training iteration, identical batches, steps interleaved (target <= 1.25),
  - peak memory of a training step, each in a fresh process (target <= 1.2; see nnunet_ext/benchmarking/steptime.py),
  - inference time through nnUNetPredictor's sliding window (with nnU-Net's default mirroring) on the same
    preprocessed volume, interleaved (target <= 1.2).

Usage (after nnUNetv2_plan_and_preprocess and `nnunet-ext plans attention`; nnUNet_preprocessed set):
    python benchmarks/attention_cost.py -d 501 -p nnUNetPlans -a nnUNetPlans_axialattn [-a nnUNetPlans_attn_full]
        [-tr nnUNetTrainer] [--repeats 10] [--predict-repeats 3] [--device cpu] [--threads 1]
"""

import argparse
import statistics
import time

import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.benchmarking.steptime import max_step_peak_bytes, median_step_seconds, run_fresh_process
from nnunet_ext.plans import attention_feature_maps
from nnunet_ext.trainer_in_process import build_trainer, draw_batches
from nnunet_ext.trainers import MeanTeacherContinuityTrainer, MeanTeacherTrainer

TRAINERS = {t.__name__: t for t in (nnUNetTrainer, MeanTeacherTrainer, MeanTeacherContinuityTrainer)}
TARGETS = {"time": 1.25, "memory": 1.2, "inference": 1.2}


def _build(args, plans: str):
    trainer = build_trainer(TRAINERS[args.trainer], args.dataset, plans, args.configuration, device=args.device)
    trainer.current_epoch = trainer.num_epochs // 2  # SSL trainers: their losses at full weight
    return trainer


def step_memory(args, plans: str) -> float:
    """Largest step peak memory of the trainer on these plans (run in a fresh process)."""
    trainer = _build(args, plans)
    torch.manual_seed(0)
    return float(max_step_peak_bytes(trainer, draw_batches(trainer, 2)))


def predictor_for(trainer) -> nnUNetPredictor:
    """nnU-Net's predictor around the trainer's network, as nnU-Net's own final validation sets it up."""
    trainer.set_deep_supervision_enabled(False)
    # the mirroring axes nnU-Net records for prediction (set on a trainer only once it built its data loaders)
    mirror_axes = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[3]
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True, device=trainer.device,
                                verbose=False, allow_tqdm=False)
    predictor.manual_initialization(trainer.network, trainer.plans_manager, trainer.configuration_manager, None,
                                    trainer.dataset_json, type(trainer).__name__, mirror_axes)
    return predictor


def median_inference_seconds(predictors: dict, volume: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds of one sliding-window prediction of ``volume`` (C, Z, Y, X) per predictor, interleaved."""
    times = {name: [] for name in predictors}
    for i in range(repeats + 1):
        for name, predictor in predictors.items():
            start = time.perf_counter()
            with torch.no_grad():
                predictor.predict_sliding_window_return_logits(volume)
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _describe(trainer) -> str:
    kwargs = trainer.configuration_manager.network_arch_init_kwargs
    stages = kwargs.get("attention_stages", 0)
    maps = attention_feature_maps({"architecture": {"arch_kwargs": kwargs},
                                   "patch_size": list(trainer.configuration_manager.patch_size)}, stages)
    where = ", ".join(f"{c} x {'x'.join(map(str, size))}" for c, size in maps) or "none"
    return f"attention on {where}{', gates' if kwargs.get('attention_gates') else ''}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dataset", required=True)
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("-p", "--plans", default="nnUNetPlans_tiny", help="plans without attention")
    parser.add_argument("-a", "--attention-plans", action="append",
                        help="plans with attention (repeatable; default: <plans>_axialattn)")
    parser.add_argument("-tr", "--trainer", default="nnUNetTrainer", choices=sorted(TRAINERS))
    parser.add_argument("--repeats", type=int, default=10, help="interleaved training steps per plans")
    parser.add_argument("--predict-repeats", type=int, default=3, help="interleaved predictions per plans")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); 1 steadies "
                        "the ratios on a machine shared with other jobs")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        print(step_memory(args, args.memory_of))
        return
    plans = [args.plans, *(args.attention_plans or [args.plans + "_axialattn"])]

    trainers = {p: _build(args, p) for p in plans}
    batches = draw_batches(trainers[args.plans], 4)  # the very same batches for every plans
    seconds = median_step_seconds({p: (t, batches) for p, t in trainers.items()}, repeats=args.repeats)
    same = [__file__, "-d", str(args.dataset), "-c", args.configuration, "-tr", args.trainer, "--device",
            args.device, *(["--threads", str(args.threads)] if args.threads else [])]
    memory = {p: run_fresh_process([*same, "--memory-of", p]) for p in plans}
    _, val_keys = trainers[args.plans].do_split()
    dataset = trainers[args.plans].dataset_class(trainers[args.plans].preprocessed_dataset_folder, val_keys)
    data, *_ = dataset.load_case(val_keys[0])
    volume = torch.from_numpy(data[:]).float()
    inference = median_inference_seconds({p: predictor_for(t) for p, t in trainers.items()}, volume,
                                         args.predict_repeats)

    base = trainers[args.plans]
    print(f"{args.trainer} on {args.configuration}, patch {base.configuration_manager.patch_size}, batch "
          f"{base.batch_size}, device {args.device}; {args.repeats} interleaved steps, {args.predict_repeats} "
          f"interleaved predictions of {val_keys[0]} {tuple(volume.shape[1:])}")
    for p in plans:
        print(f"{p:>32}: {seconds[p] * 1000:8.1f} ms / step, step peak {memory[p] / 2**20:8.1f} MiB, "
              f"inference {inference[p]:6.2f} s; {_describe(trainers[p])}")
    for p in plans[1:]:
        ratios = {"time": seconds[p] / seconds[args.plans], "memory": memory[p] / memory[args.plans],
                  "inference": inference[p] / inference[args.plans]}
        print(f"{p} / {args.plans}: " + ", ".join(f"{k} {v:.3f} (target <= {TARGETS[k]})"
                                                   for k, v in ratios.items()))


if __name__ == "__main__":
    main()
