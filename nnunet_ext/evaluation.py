"""``nnunet-ext evaluate``: score a folder of predicted segmentations against dense ground truth.

Per case and class: 3D Dice, mean 2D Dice over slices (slices empty in both prediction and truth do not count),
precision, recall, clDice and the SELMA3D Betti errors; with ``--mask`` the Dice inside a region; with
``--annotated`` (the sparse training labels) the Dice on annotated and on unannotated voxels and the Dice by
distance to the nearest annotated slice. Aggregates are means over cases (NaN-aware) and, per case, the mean over
the foreground classes (``mean``). Results go to ``evaluation.json`` and ``evaluation.csv`` and a table is printed.
"""

import csv
import io
import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from nnunet_ext.datasets.raw_dataset import check_output_folder
from nnunet_ext.errors import UserError, replace_text
from nnunet_ext.metrics import (
    betti_errors,
    cldice,
    dice,
    dice_by_distance,
    masked_dice,
    mean_slice_dice,
    precision_recall,
    slice_distance_to_annotation,
)

LABEL_ENDINGS = (".nii.gz", ".nii", ".tif", ".tiff", ".mha", ".nrrd")
MEAN = "mean"  # the "class" that holds each metric's mean over the foreground classes
PRINTED_METRICS = ("dice", "slice_dice", "dice_mask", "dice_annotated", "dice_unannotated", "cldice",
                   "betti0_error", "betti1_error")


def label_files(folder: Path) -> dict[str, Path]:
    """``{case id: file}`` of the label files in ``folder`` (any of LABEL_ENDINGS)."""
    files = {}
    for path in sorted(Path(folder).iterdir()):
        ending = next((e for e in LABEL_ENDINGS if path.name.endswith(e)), None)
        if ending is not None and path.is_file():
            files[path.name[:-len(ending)]] = path
    return files


def _read(path: Path) -> np.ndarray:
    from nnunet_ext.datasets.readers import read_volume

    return np.asarray(read_volume(path))


def dataset_labels(folder: Path) -> tuple[dict[str, int], int | None] | None:
    """(foreground ``{name: value}``, ignore value) from the dataset.json beside ``folder``, or None."""
    document_path = Path(folder).resolve().parent / "dataset.json"
    if not document_path.is_file():
        return None
    labels = json.loads(document_path.read_text()).get("labels", {})
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
        raise UserError(f"{document_path}: region-based labels are not supported; pass --labels NAME=VALUE ...")
    ignore = labels.get("ignore")
    return {k: v for k, v in labels.items() if k not in ("background", "ignore") and v != 0}, ignore


def parse_labels(items: Iterable[str]) -> dict[str, int]:
    """``["vessel=1", "2"]`` -> ``{"vessel": 1, "2": 2}``."""
    labels = {}
    for item in items:
        name, _, value = item.rpartition("=")
        try:
            labels[name or value] = int(value)
        except ValueError:
            raise UserError(f"invalid label {item!r}: give NAME=VALUE or VALUE, e.g. --labels vessel=1 nucleus=2") from None
    return labels


def case_metrics(pred: np.ndarray, gt: np.ndarray, labels: dict[str, int], axis: int = 0,
                 region: np.ndarray | None = None, sparse: np.ndarray | None = None, ignore_label: int | None = None,
                 topology: bool = True) -> dict[str, dict]:
    """Metrics of one case: ``{class name or MEAN: {metric: value}}``.

    Args:
        pred, gt: integer label arrays (Z, Y, X) of equal shape.
        labels: foreground ``{name: value}`` to score.
        axis: slice axis for the 2D and distance metrics.
        region: optional bool mask (Z, Y, X): ``dice_mask`` is the Dice inside it.
        sparse: optional sparse training label (Z, Y, X) with ``ignore_label`` on unannotated voxels: adds
            ``dice_annotated``, ``dice_unannotated`` and ``dice_by_distance`` ({slices away: Dice}).
        topology: compute clDice and Betti errors (3D only; the slowest metrics).
    """
    distances = unannotated = None
    if sparse is not None:
        unannotated = sparse == ignore_label
        distances = slice_distance_to_annotation(sparse, ignore_label, axis)
    result = {}
    for name, value in labels.items():
        p, g = pred == value, gt == value
        precision, recall = precision_recall(p, g)
        metrics = {"dice": dice(p, g), "slice_dice": mean_slice_dice(p, g, axis), "precision": precision,
                   "recall": recall}
        if region is not None:
            metrics["dice_mask"] = masked_dice(p, g, region)
        if sparse is not None:
            metrics["dice_annotated"] = masked_dice(p, g, ~unannotated)
            metrics["dice_unannotated"] = masked_dice(p, g, unannotated)
            metrics["dice_by_distance"] = dice_by_distance(p, g, distances, axis)
        if topology and pred.ndim == 3:
            metrics["cldice"] = cldice(p, g)
            metrics.update(betti_errors(p, g))
        result[name] = metrics
    result[MEAN] = mean_over_classes(list(result.values()))
    return result


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def mean_over_classes(per_class: list[dict]) -> dict:
    """NaN-mean of every metric over a list of ``{metric: value}`` (``dice_by_distance`` per distance)."""
    keys = {k for metrics in per_class for k in metrics}
    mean = {}
    for key in sorted(keys):
        if key == "dice_by_distance":
            distances = sorted({d for metrics in per_class for d in metrics.get(key, {})})
            mean[key] = {d: _nanmean([m[key][d] for m in per_class if d in m.get(key, {})]) for d in distances}
        else:
            mean[key] = _nanmean([m[key] for m in per_class if key in m])
    return mean


def aggregate(cases: dict[str, dict]) -> dict:
    """Mean over cases of each class's metrics: ``{class: {metric: value}}``."""
    classes = next(iter(cases.values())).keys()
    return {name: mean_over_classes([case[name] for case in cases.values()]) for name in classes}


def _check_folder(folder, what: str) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{what} folder {folder} does not exist: check the path")
    return folder


def evaluate_folder(pred_dir: Path, gt_dir: Path, labels: dict[str, int] | None = None, mask_dir: Path | None = None,
                    mask_ignore: int | None = None, annotated_dir: Path | None = None,
                    ignore_label: int | None = None, axis: int = 0, topology: bool = True) -> dict:
    """Score every case of ``gt_dir`` against the same-named file in ``pred_dir``.

    Args:
        pred_dir, gt_dir: folders of label files (NIfTI, TIFF, ...), matched by case id.
        labels: foreground ``{name: value}``; default: from the dataset.json beside ``gt_dir``.
        mask_dir: region files per case: a voxel counts where the file is nonzero, or, with ``mask_ignore``,
            where it is not ``mask_ignore`` (for sparse label folders such as ``labelsTr_holdout``).
        annotated_dir: the sparse training labels per case (ignore label on unannotated voxels).
        ignore_label: their ignore value; default: from the dataset.json beside ``annotated_dir``.
        axis: slice axis (in the files' array order) of the 2D and distance metrics.
        topology: compute clDice and Betti errors.

    Returns:
        ``{"settings": ..., "cases": {case: {class: {metric: value}}}, "aggregate": {class: {metric: value}}}``.
    """
    pred_dir, gt_dir = _check_folder(pred_dir, "prediction"), _check_folder(gt_dir, "ground truth")
    truths = label_files(gt_dir)
    if not truths:
        raise UserError(f"{gt_dir} holds no label files ({', '.join(LABEL_ENDINGS)}): check --gt")
    if labels is None:
        found = dataset_labels(gt_dir)
        if found is None:
            raise UserError(f"no dataset.json beside {gt_dir} to read the labels from: pass --labels NAME=VALUE ...")
        labels = found[0]
    if not labels:
        raise UserError("no foreground label to evaluate: pass --labels NAME=VALUE ...")
    sparse_values = _ignore_values(gt_dir, ignore_label)
    if annotated_dir is not None and ignore_label is None:
        found = dataset_labels(_check_folder(annotated_dir, "annotation"))
        ignore_label = found[1] if found else None
        if ignore_label is None:
            raise UserError(f"the ignore label of {annotated_dir} is unknown: pass --ignore-label VALUE")
    predictions = label_files(pred_dir)
    masks = label_files(_check_folder(mask_dir, "mask")) if mask_dir is not None else {}
    sparse_files = label_files(_check_folder(annotated_dir, "annotation")) if annotated_dir is not None else {}

    cases = {}
    for case, gt_file in truths.items():
        pred_file = _matching(predictions, case, pred_dir, "prediction")
        pred, gt = _read(pred_file), _read(gt_file)
        _check_dense(gt, sparse_values, gt_file, gt_dir)
        if pred.shape != gt.shape:
            raise UserError(f"{pred_file} has shape {pred.shape} but {gt_file} has {gt.shape}: predict the same "
                            f"images the ground truth belongs to")
        region = sparse = None
        if mask_dir is not None:
            mask = _same_shape(_read(_matching(masks, case, mask_dir, "mask")), gt.shape, masks[case])
            region = mask != (0 if mask_ignore is None else mask_ignore)
        if annotated_dir is not None:
            sparse = _same_shape(_read(_matching(sparse_files, case, annotated_dir, "annotation")), gt.shape,
                                 sparse_files[case])
        try:
            cases[case] = case_metrics(pred, gt, labels, axis, region, sparse, ignore_label, topology)
        except ValueError as error:
            raise UserError(f"case {case}: {error}") from None
    settings = {"pred": str(pred_dir), "gt": str(gt_dir), "labels": labels, "axis": axis,
                "mask": None if mask_dir is None else str(mask_dir), "mask_ignore": mask_ignore,
                "annotated": None if annotated_dir is None else str(annotated_dir), "ignore_label": ignore_label}
    return {"settings": settings, "cases": cases, "aggregate": aggregate(cases)}


def _ignore_values(gt_dir: Path, ignore_label: int | None) -> set[int]:
    """Values that mark unannotated voxels: the ignore label of the dataset.json beside ``gt_dir`` and
    ``--ignore-label``."""
    found = dataset_labels(gt_dir)
    return {v for v in (found[1] if found else None, ignore_label) if v is not None}


def _check_dense(gt: np.ndarray, ignore_values: set[int], gt_file: Path, gt_dir: Path) -> None:
    """UserError for ground truth with ignore-label voxels: they would count as background, so even a perfect
    prediction of the dense truth would lose Dice on every unannotated voxel."""
    present = [v for v in sorted(ignore_values) if np.any(gt == v)]
    if present:
        raise UserError(f"{gt_file} has ignore-label voxels (value {present[0]}): --gt {gt_dir} holds sparse labels; "
                        f"pass dense truth as --gt (e.g. labelsTr_dense or labelsTs) and these as --annotated")


def _matching(files: dict[str, Path], case: str, folder: Path, what: str) -> Path:
    if case not in files:
        raise UserError(f"no {what} file for case {case} in {folder}: every ground-truth case needs one")
    return files[case]


def _same_shape(array: np.ndarray, shape: tuple, path: Path) -> np.ndarray:
    if array.shape != shape:
        raise UserError(f"{path} has shape {array.shape}, the ground truth {shape}: use the files of the same cases")
    return array


# --------------------------------------------------------------------------------------------- output


def json_ready(value):
    """NaN -> None and int dict keys -> str, so the JSON is standard."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_results(results: dict, out_dir: Path) -> tuple[Path, Path]:
    """``evaluation.json`` (everything) and ``evaluation.csv`` (one row per case and class, then the means).

    Both are rendered before either is written, and each replaces its file whole, so a failure leaves the previous
    results (or none), never a half-written file."""
    out_dir = Path(out_dir)
    rows = [(case, name, metrics) for case, classes in results["cases"].items() for name, metrics in classes.items()]
    rows += [(MEAN, name, metrics) for name, metrics in results["aggregate"].items()]
    columns = _flat_columns([metrics for *_, metrics in rows])
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(["case", "class", *columns])
    for case, name, metrics in rows:
        flat = _flatten(metrics)
        writer.writerow([case, name, *(_cell(flat.get(c)) for c in columns)])
    document = json.dumps(json_ready(results), indent=2) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / "evaluation.json", out_dir / "evaluation.csv"
    replace_text(json_path, document)
    replace_text(csv_path, table.getvalue())
    return json_path, csv_path


def _flatten(metrics: dict) -> dict:
    flat = {k: v for k, v in metrics.items() if k != "dice_by_distance"}
    flat.update({f"dice_distance_{d}": v for d, v in metrics.get("dice_by_distance", {}).items()})
    return flat


def _flat_columns(all_metrics: list[dict]) -> list[str]:
    columns = []
    for metrics in all_metrics:
        columns += [c for c in _flatten(metrics) if c not in columns]
    return columns


def _cell(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.6g}"


def format_table(aggregate: dict) -> str:
    """The aggregate as a text table: one row per class (``mean`` last), the main metrics as columns."""
    columns = [m for m in PRINTED_METRICS if any(m in metrics for metrics in aggregate.values())]
    width = max(len("class"), *(len(name) for name in aggregate))
    lines = ["class".ljust(width) + "".join(f"{c:>18}" for c in columns)]
    for name, metrics in aggregate.items():
        cells = [metrics.get(c, float("nan")) for c in columns]
        lines.append(name.ljust(width) + "".join(f"{'n/a' if math.isnan(v) else f'{v:.3f}':>18}" for v in cells))
    distances = aggregate[MEAN].get("dice_by_distance")
    if distances:
        lines.append("Dice by slices to the nearest annotated slice (mean over classes): " + ", ".join(
            f"{d}: {'n/a' if math.isnan(v) else f'{v:.3f}'}" for d, v in distances.items()))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- CLI


def _run(args) -> None:
    out = check_output_folder(args.out or args.pred, "--out")  # before the scoring, which can take long
    results = evaluate_folder(Path(args.pred), Path(args.gt), parse_labels(args.labels) if args.labels else None,
                              mask_dir=args.mask and Path(args.mask), mask_ignore=args.mask_ignore,
                              annotated_dir=args.annotated and Path(args.annotated), ignore_label=args.ignore_label,
                              axis=args.axis, topology=not args.no_topology)
    json_path, csv_path = write_results(results, out)
    print(format_table(results["aggregate"]))
    print(f"wrote {json_path} and {csv_path}")


def register_cli(subparsers) -> None:
    """Add ``evaluate`` to the top-level ``nnunet-ext`` subcommands (``argparse`` subparsers)."""
    summary = "score predicted segmentations against dense ground truth (Dice, 2D Dice, clDice, Betti, ...)"
    parser = subparsers.add_parser("evaluate", help=summary, description=summary)
    parser.add_argument("--pred", required=True, help="folder of predicted label files")
    parser.add_argument("--gt", required=True, help="folder of dense ground-truth label files (same case names)")
    parser.add_argument("--labels", nargs="+", metavar="NAME=VALUE",
                        help="foreground classes to score (default: dataset.json beside --gt)")
    parser.add_argument("--mask", help="folder of region files: Dice inside their nonzero voxels (dice_mask)")
    parser.add_argument("--mask-ignore", type=int, metavar="VALUE",
                        help="count the mask's voxels that are not VALUE instead (for sparse label folders)")
    parser.add_argument("--annotated", metavar="DIR",
                        help="sparse training labels: Dice on annotated/unannotated voxels and by slice distance")
    parser.add_argument("--ignore-label", type=int, metavar="VALUE",
                        help="ignore value of --annotated (default: dataset.json beside it)")
    parser.add_argument("--axis", type=int, default=0, help="slice axis in the files' array order (default 0 = z)")
    parser.add_argument("--no-topology", action="store_true", help="skip clDice and Betti errors (faster)")
    parser.add_argument("--out", help="folder for evaluation.json and evaluation.csv (default: --pred)")
    parser.set_defaults(func=_run)
