"""``nnunet-ext suggest``: which unannotated slices to annotate next, ranked by a trained model's uncertainty.

A trained model predicts the training cases of the raw dataset through nnU-Net's predictor (sliding window, and
its mirroring unless ``--disable-tta``); the class probabilities come back in the raw image geometry, in the axis
order of nnU-Net's image reader (z, y, x for SimpleITK). Each slice along the annotation axis gets a score
(``nnunet_ext.slice_suggestion``):

- ``entropy``: the entropy of the model's prediction (of ``network_weights``, the network nnUNetv2_predict uses);
- ``mirror``: the disagreement of the predictions of the mirrored images, one prediction per mirroring nnU-Net's
  test-time augmentation uses (every combination of the checkpoint's ``inference_allowed_mirroring_axes``, the
  unmirrored image included), each with nnU-Net's own mirroring off: the whole raw image is flipped, predicted
  and the probabilities flipped back;
- ``models``: the disagreement of the two networks a Mean-Teacher checkpoint (teacher ``network_weights``,
  ``student_weights``) or a CPS checkpoint (``cps_branch_weights`` a and b) holds, loaded in turn into the
  predictor (the default for such checkpoints, else ``entropy``).

The highest-scoring unannotated slices over all cases are suggested, none within ``--min-gap`` slices of an
annotated or another suggested slice of its case. Annotated slices come from the raw dataset.json
(``annotation_axis`` and ``annotated_slices``, written by our converters, ``synth`` and ``sparsify``), else from
the label files (a slice is annotated when it holds a voxel other than the ignore label). Output folder
(``--out``, default ``suggestions_<dataset>``), written in a work folder and moved into place:

    suggestions.csv      rank, case, axis, slice, score, score_name (one row per suggested slice)
    montage.png          the suggested slices: image (first channel) with the predicted labels overlaid
    scores_<case>.png    per case: score per slice, annotated and suggested slices marked
"""

import copy
import csv
import json
import math
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier
from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

from nnunet_ext.annotation_axis import ANNOTATED_SLICES_KEY, DATASET_JSON_KEY, find_annotation_axis
from nnunet_ext.datasets.raw_dataset import check_output_folder
from nnunet_ext.errors import UserError
from nnunet_ext.nnunet_paths import dataset_folder, require_folder
from nnunet_ext.plans import check_plans_name
from nnunet_ext.pseudo_label_generation import parse_fold, replace_folder, torch_device
from nnunet_ext.semi_supervised import SoftmaxEnsemble, unwrap
from nnunet_ext.slice_suggestion import (
    SCORES,
    SUGGESTIONS_CSV,
    PredictionMoments,
    Suggestion,
    annotated_slices_of_label,
    mirror_flips,
    per_slice_mean,
    rank_slices,
    voxel_scores,
)

MONTAGE_FILE = "montage.png"
CSV_COLUMNS = ("rank", "case", "axis", "slice", "score", "score_name")


def model_states(checkpoint: dict) -> dict[str, dict] | None:
    """Name -> state dict of the two networks a checkpoint holds; None for a checkpoint with one network.

    Mean-Teacher trainers store the teacher as ``network_weights`` and the student as ``student_weights``; CPS
    trainers store both branches under ``cps_branch_weights`` (``a``, ``b``), each a single network.
    """
    if "student_weights" in checkpoint:
        return {"teacher": checkpoint["network_weights"], "student": checkpoint["student_weights"]}
    if "cps_branch_weights" in checkpoint:
        return {f"branch {name}": state for name, state in checkpoint["cps_branch_weights"].items()}
    return None


def choose_score(score: str | None, two_models: bool, trainer: str) -> str:
    """The score to use: ``score`` if it can be computed, by default ``models`` for two-network checkpoints."""
    if score is None:
        return "models" if two_models else "entropy"
    if score not in SCORES:
        raise UserError(f"unknown score {score!r}: choose one of {', '.join(SCORES)}")
    if score == "models" and not two_models:
        raise UserError(f"--score models needs a checkpoint with two networks (Mean-Teacher or CPS trainers); the "
                        f"checkpoint of {trainer} holds one: use --score entropy or --score mirror")
    return score


def check_out_folder(target: Path) -> Path:
    """``target`` if a suggestions folder may be written there (absent, empty, or an older suggestions folder)."""
    older_suggestions = (target / SUGGESTIONS_CSV).is_file()
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not older_suggestions)):
        raise UserError(f"{target} exists and is not a suggestions folder: choose another --out (an older "
                        f"suggestions folder is replaced)")
    check_output_folder(target.parent)
    return target


@dataclass
class CaseScores:
    scores: np.ndarray  # (n_slices,) along the annotation axis
    annotated: list[int]
    prediction: np.ndarray  # (*spatial) uint8 argmax of the mean of the compared predictions


def predict_probabilities(predictor: nnUNetPredictor, image: np.ndarray, properties: dict) -> np.ndarray:
    """(C, *spatial) class probabilities of one raw image (C, *spatial), in its own geometry and axis order."""
    _, probabilities = predictor.predict_single_npy_array(np.ascontiguousarray(image), copy.deepcopy(properties),
                                                          save_or_return_probabilities=True)
    return np.asarray(probabilities, dtype=np.float32)


def case_predictions(predictor: nnUNetPredictor, image: np.ndarray, properties: dict, score: str,
                     states: dict[str, dict] | None, flips: list[tuple[int, ...]]) -> Iterator[np.ndarray]:
    """The probability arrays of one case that ``score`` compares (one for ``entropy``)."""
    if score == "models":
        for state in states.values():
            predictor.list_of_parameters = [state]  # the predictor loads it into its network before predicting
            yield predict_probabilities(predictor, image, properties)
    elif score == "mirror":
        for axes in flips:
            channel_axes = [a + 1 for a in axes]
            flipped = np.flip(image, channel_axes) if axes else image
            probabilities = predict_probabilities(predictor, flipped, properties)
            yield np.flip(probabilities, channel_axes) if axes else probabilities
    else:
        yield predict_probabilities(predictor, image, properties)


def annotated_slices_of_case(case: str, dataset_json: dict, read_label, axis: int, length: int,
                             ignore_label: int) -> list[int]:
    """dataset.json's annotated slices of ``case`` when it lists them with its annotation axis, else the slices of
    its label file (``read_label()``) that hold a voxel other than the ignore label."""
    listed = dataset_json.get(ANNOTATED_SLICES_KEY) or {}
    if dataset_json.get(DATASET_JSON_KEY) is not None and case in listed:
        slices = [int(i) for i in listed[case]]
        outside = [i for i in slices if not 0 <= i < length]
        if outside:
            raise UserError(f"dataset.json {ANNOTATED_SLICES_KEY} of {case} lists slice {outside[0]}, but the image "
                            f"has {length} slices along axis {axis}: fix dataset.json")
        return sorted(set(slices))
    return annotated_slices_of_label(read_label(), axis, ignore_label)


def suggest_slices(dataset: str | int, configuration: str, trainer: str, n: int, plans: str = "nnUNetPlans",
                   fold: int | str = 0, cases: list[str] | None = None, min_gap: int = 1, score: str | None = None,
                   out: str | Path | None = None, device: str = "cuda", checkpoint: str = "checkpoint_final.pth",
                   use_mirroring: bool = True, progress=print) -> tuple[Path, str, list[Suggestion]]:
    """``nnunet-ext suggest`` (see the module docstring).

    Args:
        dataset: raw dataset id or name ($nnUNet_raw, with the ignore label).
        configuration, trainer, plans, fold, checkpoint: the model
            ``$nnUNet_results/Dataset/<trainer>__<plans>__<configuration>/fold_<fold>/<checkpoint>``.
        n: how many slices to suggest (>= 1).
        cases: training cases to predict (default all of imagesTr).
        min_gap: no suggestion within this many slices of an annotated or another suggested slice (>= 0).
        score: ``entropy``, ``mirror`` or ``models``; None: ``models`` for two-network checkpoints, else entropy.
        out: output folder (default ``suggestions_<dataset name>``); an older suggestions folder is replaced.
        device: ``cuda``, ``cpu`` or ``mps``, as for nnUNetv2_predict.
        use_mirroring: nnU-Net's mirroring test-time augmentation for ``entropy`` and ``models``.
        progress: called with one line per predicted case.

    Returns:
        (output folder, score used, suggestions highest score first).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"-n {n!r}: give the number of slices to suggest, 1 or more")
    if isinstance(min_gap, bool) or not isinstance(min_gap, int) or min_gap < 0:
        raise UserError(f"--min-gap {min_gap!r}: give 0 or more slices")
    fold = parse_fold(fold)
    check_plans_name(plans, "-p")
    raw = dataset_folder(dataset, "nnUNet_raw")
    if not (raw / "dataset.json").is_file():
        raise UserError(f"{raw} has no dataset.json: it is not an nnU-Net raw dataset")
    dataset_json = json.loads((raw / "dataset.json").read_text())
    ignore_label = dataset_json.get("labels", {}).get("ignore")
    if ignore_label is None:
        raise UserError(f"{raw.name} has no ignore label in dataset.json: every voxel is annotated, so there is no "
                        f"unannotated slice to suggest (sparse datasets label unannotated voxels 'ignore')")
    files = get_filenames_of_train_images_and_targets(str(raw), copy.deepcopy(dataset_json))
    cases = sorted(files) if not cases else list(dict.fromkeys(cases))
    unknown = [c for c in cases if c not in files]
    if unknown:
        raise UserError(f"case {unknown[0]} is not a training case of {raw.name}: choose --cases from "
                        f"{', '.join(sorted(files)[:5])}{', ...' if len(files) > 5 else ''}")
    if not cases:
        raise UserError(f"{raw.name} has no training cases in imagesTr")

    model_folder = (require_folder("nnUNet_results") / raw.name /
                    convert_trainer_plans_config_to_identifier(trainer, plans, configuration))
    checkpoint_file = model_folder / f"fold_{fold}" / checkpoint
    if not checkpoint_file.is_file():
        raise UserError(f"no trained model at {checkpoint_file}: train it with `nnUNetv2_train {raw.name} "
                        f"{configuration} {fold} -tr {trainer} -p {plans}` (or pass -c/-tr/-p/-f/--checkpoint)")
    target = check_out_folder(Path(out) if out else Path(f"suggestions_{raw.name}"))

    states = model_states(torch.load(checkpoint_file, map_location="cpu", weights_only=False))
    score = choose_score(score, states is not None, trainer)
    predictor = nnUNetPredictor(use_mirroring=use_mirroring and score != "mirror", device=torch_device(device),
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_folder), (fold,), checkpoint)
    if predictor.label_manager.has_regions:
        raise UserError("region-based datasets are not supported: the scores need one class per voxel")
    flips = [()]
    if score == "mirror":
        flips = mirror_flips(predictor.allowed_mirroring_axes, predictor.plans_manager.transpose_forward,
                             len(predictor.configuration_manager.patch_size))
        if len(flips) == 1:
            raise UserError(f"the model of {trainer} was trained without mirroring, so it has no mirror axes: use "
                            f"--score entropy" + (" or --score models" if states else ""))
    if score == "models" and isinstance(unwrap(predictor.network), SoftmaxEnsemble):
        predictor.network = unwrap(predictor.network).members[0]  # one branch at a time instead of the pair

    reader = predictor.plans_manager.image_reader_writer_class()
    spacing = reader.read_images(files[cases[0]]["images"])[1]["spacing"]
    try:
        axis, source = find_annotation_axis(dataset_json, list(range(len(spacing))), spacing,
                                            (reader.read_seg(files[c]["label"])[0] for c in cases), ignore_label)
    except ValueError as error:
        raise UserError(str(error)) from None
    progress(f"score: {score}; annotation axis {axis} ({source}); {len(cases)} cases")

    results = {}
    for number, case in enumerate(cases, 1):
        image, properties = reader.read_images(files[case]["images"])
        moments = PredictionMoments.of(case_predictions(predictor, image, properties, score, states, flips))
        scores = per_slice_mean(voxel_scores(moments, score), axis)
        annotated = annotated_slices_of_case(case, dataset_json, lambda c=case: reader.read_seg(files[c]["label"])[0],
                                             axis, len(scores), ignore_label)
        results[case] = CaseScores(scores, annotated, moments.mean().argmax(0).astype(np.uint8))
        progress(f"[{number}/{len(cases)}] {case}: {len(scores)} slices, {len(annotated)} annotated, highest "
                 f"{score} {scores.max():.4g}")

    suggestions = rank_slices({c: r.scores for c, r in results.items()},
                              {c: r.annotated for c, r in results.items()}, n, min_gap)
    if not suggestions:
        raise UserError(f"every slice is annotated or within --min-gap {min_gap} of an annotated slice: lower "
                        f"--min-gap or add cases")
    if len(suggestions) < n:
        progress(f"only {len(suggestions)} slices are more than {min_gap} slices from annotated and suggested ones")

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        write_csv(tmp / SUGGESTIONS_CSV, suggestions, axis, score)
        images = {case: reader.read_images(files[case]["images"]) for case in {s.case for s in suggestions}}
        plot_montage(tmp / MONTAGE_FILE, [(f"{s.case} slice {s.index}\n{score} {s.score:.3g}",
                                           np.take(images[s.case][0][0], s.index, axis),
                                           np.take(results[s.case].prediction, s.index, axis),
                                           slice_aspect(images[s.case][1]["spacing"], axis))
                                          for s in suggestions])
        for case, result in results.items():
            plot_score_curve(tmp / f"scores_{case}.png", case, result.scores, result.annotated,
                             [s.index for s in suggestions if s.case == case], score, axis)
        replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target, score, suggestions


# ---- outputs

def write_csv(path: Path, suggestions: list[Suggestion], axis: int, score: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for rank, s in enumerate(suggestions, 1):
            writer.writerow([rank, s.case, axis, s.index, f"{s.score:.6g}", score])


def slice_aspect(spacing, axis: int) -> float:
    """imshow aspect (row spacing / column spacing) of a slice taken along ``axis`` of a 3D image."""
    rows, columns = (spacing[a] for a in range(len(spacing)) if a != axis)
    return float(rows) / float(columns)


def plot_montage(path: Path, panels: list[tuple[str, np.ndarray, np.ndarray, float]]) -> None:
    """One panel per (title, image slice, predicted label slice, aspect): grey image, labels > 0 in colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(len(panels), 4)
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, image, label, aspect) in zip(axes.flat, panels):
        ax.imshow(image, cmap="gray", aspect=aspect, interpolation="nearest")
        ax.imshow(np.ma.masked_equal(label, 0), cmap="tab10", vmin=0, vmax=9, alpha=0.45, aspect=aspect,
                  interpolation="nearest")
        ax.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_score_curve(path: Path, case: str, scores: np.ndarray, annotated: list[int], suggested: list[int],
                     score: str, axis: int) -> None:
    """Score per slice of one case; annotated slices as grey lines, suggested slices as red dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(7, 3))
    ax.plot(np.arange(len(scores)), scores, color="black", linewidth=1, label=f"{score} score")
    for number, index in enumerate(annotated):
        ax.axvline(index, color="tab:blue", alpha=0.6, linestyle="--", linewidth=1,
                   label="annotated" if number == 0 else None)
    if suggested:
        ax.scatter(suggested, scores[suggested], color="red", zorder=3, label="suggested")
    ax.set_xlabel(f"slice index (axis {axis})")
    ax.set_ylabel(score)
    ax.set_title(case)
    ax.legend(fontsize=8, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ---- the command

def _run(args) -> None:
    folder, score, suggestions = suggest_slices(
        args.dataset, args.configuration, args.trainer, args.n, args.plans, args.fold, args.cases, args.min_gap,
        args.score, args.out, args.device, args.checkpoint, not args.disable_tta)
    width = max(len("case"), *(len(s.case) for s in suggestions))
    print(f"{'rank':>4}  {'case':<{width}}  {'slice':>5}  {score} score")
    for rank, s in enumerate(suggestions, 1):
        print(f"{rank:>4}  {s.case:<{width}}  {s.index:>5}  {s.score:.4g}")
    print(f"wrote {len(suggestions)} suggestions to {folder}")


SUMMARY = "suggest which unannotated slices to annotate next, ranked by a trained model's uncertainty"


def register_cli(subparsers) -> None:
    """Add ``suggest`` to the top-level ``nnunet-ext`` subcommands (``argparse`` subparsers)."""
    parser = subparsers.add_parser(
        "suggest", help=SUMMARY,
        description=SUMMARY + ". Writes suggestions.csv, a montage of the slices and a score curve per case.")
    parser.add_argument("-d", "--dataset", required=True, help="dataset id or name (raw dataset with ignore label)")
    parser.add_argument("-c", "--configuration", required=True, help="configuration of the model, e.g. 3d_fullres")
    parser.add_argument("-tr", "--trainer", required=True, help="trainer of the model")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("-f", "--fold", default="0", help="fold of the model (default 0)")
    parser.add_argument("-n", type=int, required=True, help="number of slices to suggest")
    parser.add_argument("--cases", nargs="+", help="training cases to predict (default: all of imagesTr)")
    parser.add_argument("--min-gap", type=int, default=1,
                        help="no suggestion within this many slices of an annotated or another suggested slice of "
                             "its case (default 1: no neighbours)")
    parser.add_argument("--score", choices=SCORES,
                        help="entropy of the prediction, mirror disagreement, or models disagreement of the two "
                             "networks of Mean-Teacher/CPS checkpoints (default: models when available, else entropy)")
    parser.add_argument("--out", help="output folder (default: suggestions_<dataset name>)")
    parser.add_argument("-device", "--device", default="cuda", choices=("cuda", "cpu", "mps"),
                        help="as for nnUNetv2_predict (default cuda)")
    parser.add_argument("--checkpoint", default="checkpoint_final.pth", help="checkpoint file name")
    parser.add_argument("--disable-tta", action="store_true",
                        help="no mirroring test-time augmentation for the entropy and models scores (faster)")
    parser.set_defaults(func=_run)
