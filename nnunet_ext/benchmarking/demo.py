"""``nnunet-ext demo``: the main job end to end on CPU, through nnU-Net's own command-line tools.

synth -> nnUNetv2_plan_and_preprocess -> plans tiny -> nnUNetv2_train -> nnUNetv2_predict -> Dice table.
"""

import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_ext.benchmarking.commands import (
    EPOCH_LINE,
    PREDICT_LINE,
    nnunet_command,
    nnunet_environment,
    run_logged,
    training_environment,
)
from nnunet_ext.datasets.synth import LABELS, write_synthetic_dataset
from nnunet_ext.errors import UserError
from nnunet_ext.metrics import dice_per_class
from nnunet_ext.plans import TINY_PLANS

DEMO_DATASET_ID = 501
DEMO_TRAINERS = ("nnUNetTrainer_demo", "MeanTeacherContinuityTrainer_demo")  # stock reference first
DEMO_SYNTH = dict(name="SynthDemo", num_cases=6, num_test_cases=2, shape=(24, 64, 64), every=4, seed=0)
DEMO_FOLD = "0"
MARKER = "nnunet_ext_demo.json"
# The demo's 1 000 steps are a fifth of the budget where stock nnU-Net converges on such data (README).
DEMO_CAVEAT = ("This budget (25 x 40 steps, one run, 2 test volumes) is too short to show whether a trainer beats "
               "stock nnU-Net: it shows the pipeline. `nnunet-ext benchmark` measures that over seeds at converged "
               "budgets.")


def prepare_output_folder(out: Path) -> None:
    """Start from an empty folder; a previous demo's folder (it has our marker) is replaced."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise UserError(f"{out} exists and is not a demo folder: pass --out with a new or empty folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"started": time.strftime("%Y-%m-%d %H:%M:%S")}))


def score_predictions(pred_dir: Path, gt_dir: Path, labels: dict[str, int]) -> dict[str, float]:
    """Mean Dice over test cases per foreground class, and their mean."""
    foreground = {name: value for name, value in labels.items() if name not in ("background", "ignore")}
    per_case = []
    for gt_file in sorted(gt_dir.glob("*.nii.gz")):
        pred_file = pred_dir / gt_file.name
        if not pred_file.is_file():
            raise UserError(f"prediction {pred_file} is missing: see the prediction log")
        gt = sitk.GetArrayFromImage(sitk.ReadImage(str(gt_file)))
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_file)))
        per_case.append(dice_per_class(pred, gt, foreground.values()))
    scores = {name: float(np.nanmean([case[value] for case in per_case])) for name, value in foreground.items()}
    scores["mean"] = float(np.mean(list(scores.values())))
    return scores


def format_table(results: dict[str, dict[str, float]]) -> str:
    columns = list(next(iter(results.values())))
    width = max(len("trainer"), *(len(t) for t in results))
    lines = ["trainer".ljust(width) + "".join(f"{c:>10}" for c in columns)]
    for trainer, scores in results.items():
        cells = "".join(f"{'n/a' if math.isnan(scores[c]) else f'{scores[c]:.3f}':>10}" for c in columns)
        lines.append(trainer.ljust(width) + cells)
    return "\n".join(lines)


def run_demo(out: Path, device: str = "cpu", trainers: tuple[str, ...] = DEMO_TRAINERS,
             dataset_id: int = DEMO_DATASET_ID, synth: dict = DEMO_SYNTH, fold: str = DEMO_FOLD) -> dict:
    """Run the demo into ``out`` and print the test-set Dice table; returns {trainer: {class: Dice}}."""
    out = out.expanduser().resolve()
    prepare_output_folder(out)
    env = nnunet_environment(out)
    logs = out / "logs"
    nproc = env["nnUNet_def_n_proc"]
    started = time.time()

    print(f"[1/5] Writing a synthetic sparse dataset into {out / 'nnUNet_raw'}")
    dataset = write_synthetic_dataset(out / "nnUNet_raw", dataset_id, **synth)
    print("[2/5] nnUNetv2_plan_and_preprocess (auto-configured plans)")
    run_logged("plan_and_preprocess", [nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id),
                                       "-c", "3d_fullres", "-np", nproc, "-npfp", nproc,
                                       "--verify_dataset_integrity"],
               env, logs / "plan_and_preprocess.log")
    print(f"[3/5] nnunet-ext plans tiny -> {TINY_PLANS}")
    run_logged("plans tiny", [sys.executable, "-m", "nnunet_ext.cli", "plans", "tiny", "-d", str(dataset_id)],
               env, logs / "plans_tiny.log")

    results = {}
    for trainer in trainers:
        print(f"[4/5] nnUNetv2_train {dataset_id} 3d_fullres {fold} -tr {trainer} -p {TINY_PLANS} -device {device}")
        epochs = _trainer_epochs(trainer)
        run_logged(f"train {trainer}", [nnunet_command("nnUNetv2_train"), str(dataset_id), "3d_fullres", fold,
                                        "-tr", trainer, "-p", TINY_PLANS, "-device", device],
                   training_environment(env), logs / f"train_{trainer}.log", progress=EPOCH_LINE, total=epochs)
        predictions = out / "predictions" / trainer
        print(f"[5/5] nnUNetv2_predict -> {predictions}")
        run_logged(f"predict {trainer}", [nnunet_command("nnUNetv2_predict"), "-i", str(dataset / "imagesTs"),
                                          "-o", str(predictions), "-d", str(dataset_id), "-c", "3d_fullres",
                                          "-f", fold, "-tr", trainer, "-p", TINY_PLANS, "-device", device,
                                          "-npp", "0", "-nps", "0"],  # small volumes: worker start-up costs more
                   env, logs / f"predict_{trainer}.log", progress=PREDICT_LINE, total=synth["num_test_cases"])
        results[trainer] = score_predictions(predictions, dataset / "labelsTs", LABELS)

    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nDice on the {synth['num_test_cases']} synthetic test volumes (dense ground truth), "
          f"{time.time() - started:.0f} s in all:")
    print(format_table(results))
    print(DEMO_CAVEAT)
    return results


def _trainer_epochs(trainer: str) -> int | None:
    """Epochs of one of our trainers, for the progress bar (None for trainers we do not know)."""
    import nnunet_ext.trainers as ours

    return getattr(getattr(ours, trainer, None), "budget_epochs", None)
