"""Simulated sparse slice annotation: a dense nnU-Net raw dataset becomes a sparse one with its dense truth beside it.

``nnunet-ext sparsify`` keeps every k-th (``--every``) or N evenly spaced (``--slices``) slices of each training
label along one axis, like an annotator who labels a few 2D slices per volume (Pagano et al. used 7, 10, 15 and
25 per volume), and sets every other voxel to the ignore label. Written layout::

    DatasetXXX_<name>/
      dataset.json        the source's keys + the ignore label, annotation_axis, annotated_slices, holdout_slices,
                          spacing, sparsify (arguments and source)
      imagesTr/           the source images, copied unchanged (all channels)
      labelsTr/           sparse labels: the kept slices minus the held-out ones, the rest is ignore
      labelsTr_dense/     the source labels, copied unchanged (dense truth for evaluation; nnU-Net ignores it)
      labelsTr_holdout/   only with a hold-out: the held-out slices' truth, the rest is ignore
      imagesTs/ labelsTs/ copied from the source when present

The hold-out helpers here are shared with the converters (``nnunet_ext.dataset_conversion``).
"""

import json
import math
import numbers
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import tifffile

from nnunet_ext.annotation_axis import ANNOTATED_SLICES_KEY, DATASET_JSON_KEY
from nnunet_ext.datasets.raw_dataset import (
    FILE_ENDINGS,
    add_output_arguments,
    atomic_dataset_folder,
    check_axis,
    check_dataset_id_and_name,
    check_free,
    check_seed,
    copy_label,
    dataset_folder_name,
    is_int,
    undeclared_values,
    verify_raw_dataset,
    write_image,
    write_nifti,
)
from nnunet_ext.datasets.readers import read_nifti, read_tiff
from nnunet_ext.errors import UserError

IGNORE = "ignore"
DENSE_FOLDER = "labelsTr_dense"
HOLDOUT_FOLDER = "labelsTr_holdout"
_FORMAT_OF_ENDING = {ending: file_format for file_format, ending in FILE_ENDINGS.items()}
_COPIED_FOLDERS = ("imagesTr", "imagesTs", "labelsTs")


# --------------------------------------------------------------------------------------------- sparsity


def annotated_slices(length: int, every: int | None = None, n_slices: int | None = None,
                     axis: int | None = None) -> list[int]:
    """Indices of the annotated slices along the annotation axis.

    Args:
        length: number of slices along the annotation axis (>= 1).
        every: annotate slices 0, k, 2k, ... (< length) for ``every=k`` (k >= 1).
        n_slices: annotate N evenly spaced slices, slice i at ``floor((i + 0.5) * length / N)`` (1 <= N <= length).
        axis: the annotation axis, named in error messages when given.

    Returns:
        Sorted list of distinct slice indices in ``[0, length)``.

    Raises:
        UserError: unless exactly one of ``every`` / ``n_slices`` is given and in range.
    """
    where = "the annotation axis" if axis is None else f"axis {axis}"
    if not is_int(length) or length < 1:
        raise UserError(f"invalid sparsity: the annotation axis has {length!r} slices; it needs at least 1")
    if every is not None and n_slices is not None:
        raise UserError("invalid sparsity: both --every and --slices were given; choose one of them")
    if every is None and n_slices is None:
        raise UserError(
            "invalid sparsity: no annotated slices requested; give --every K (every K-th slice) "
            "or --slices N (N evenly spaced slices)"
        )
    if every is not None:
        if not is_int(every) or every < 1:
            raise UserError(f"invalid sparsity: --every {every!r} is not a positive integer; choose 1 or more")
        return list(range(0, length, int(every)))
    if not is_int(n_slices) or n_slices < 1:
        raise UserError(f"invalid sparsity: --slices {n_slices!r} is not a positive integer; choose 1..{length}")
    if n_slices > length:
        raise UserError(
            f"invalid sparsity: --slices {n_slices} exceeds the {length} slices along {where}; choose 1..{length}"
        )
    n = int(n_slices)
    # Integer form of floor((i + 0.5) * length / n): no float rounding surprises.
    return [((2 * i + 1) * length) // (2 * n) for i in range(n)]


def sparsify(dense: np.ndarray, axis: int, slices: Sequence[int], ignore_label: int) -> np.ndarray:
    """Sparse copy of a dense label map.

    Args:
        dense: label array of any integer dtype and shape (3D (z, y, x) in this project).
        axis: annotation axis of ``dense``.
        slices: indices along ``axis`` that keep their dense values.
        ignore_label: value written to every other voxel.

    Returns:
        New array, same shape and dtype as ``dense``: ``dense`` on the given slices, ``ignore_label`` elsewhere.

    Raises:
        ValueError: for an axis or slice index outside ``dense``.
    """
    dense = np.asarray(dense)
    if not -dense.ndim <= axis < dense.ndim:
        raise ValueError(f"axis {axis} is out of range for an array with {dense.ndim} dimensions")
    keep = np.asarray(list(slices), dtype=np.intp)
    length = dense.shape[axis]
    if keep.size and (keep.min() < 0 or keep.max() >= length):
        raise ValueError(f"slice indices {keep.tolist()} must lie in 0..{length - 1} along axis {axis}")
    out = np.full_like(dense, ignore_label)
    index = [slice(None)] * dense.ndim
    index[axis] = keep
    out[tuple(index)] = dense[tuple(index)]
    return out


# --------------------------------------------------------------------------------------------- hold-out


def check_holdout_fraction(fraction) -> float:
    """``fraction`` as a float in [0, 1); UserError otherwise."""
    ok = isinstance(fraction, numbers.Real) and not isinstance(fraction, bool) and math.isfinite(fraction)
    if not ok or not 0.0 <= fraction < 1.0:
        raise UserError(f"invalid hold-out fraction {fraction!r}: choose a number in [0, 1), e.g. --holdout 0.2")
    return float(fraction)


def split_holdout(slices: Sequence[int], fraction: float, seed: int, case_index: int = 0
                  ) -> tuple[list[int], list[int]]:
    """Split annotated slices into (training slices, held-out slices), both sorted.

    Args:
        slices: the annotated slice indices of one volume.
        fraction: share of them to hold out, in [0, 1); ``round(fraction * len(slices))`` slices (halves round up),
            at least one when ``fraction > 0``.
        seed, case_index: the draw uses ``np.random.default_rng([seed, case_index])``, so it is deterministic
            and differs between the cases of one dataset.

    Raises:
        UserError: the hold-out would leave no slice for training.
    """
    fraction = check_holdout_fraction(fraction)
    slices = sorted(int(s) for s in slices)
    if fraction == 0.0:
        return slices, []
    count = max(1, math.floor(fraction * len(slices) + 0.5))
    if count >= len(slices):
        raise UserError(f"holding out {count} of {len(slices)} annotated slices leaves none for training: "
                        f"lower the hold-out fraction or annotate more slices")
    chosen = np.random.default_rng([seed, case_index]).choice(len(slices), size=count, replace=False)
    held = sorted(slices[i] for i in chosen)
    return [s for s in slices if s not in held], held


# --------------------------------------------------------------------------------------------- source dataset


def _load_source(source: Path) -> tuple[dict, str, list[str]]:
    """(dataset.json, file ending, sorted case ids) of a dense raw dataset; UserError for what we cannot sparsify."""
    document_path = source / "dataset.json"
    if not document_path.is_file():
        raise UserError(f"{source} has no dataset.json: point at an nnU-Net raw dataset folder (DatasetXXX_Name)")
    try:
        document = json.loads(document_path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{document_path}: not valid JSON ({error.msg}, line {error.lineno}); fix the file") from None
    if "dataset" in document:
        raise UserError(f"{document_path}: datasets that list their files under 'dataset' are not supported; "
                        f"use imagesTr/labelsTr folders")
    labels = document.get("labels", {})
    if IGNORE in labels:
        raise UserError(f"{document_path}: the source already has an ignore label, so it is not dense; "
                        f"sparsify a densely labelled dataset")
    if not labels or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
        raise UserError(f"{document_path}: 'labels' must map names to integer values (region-based labels are not "
                        f"supported)")
    ending = document.get("file_ending")
    if ending not in _FORMAT_OF_ENDING:
        raise UserError(f"{document_path}: file_ending {ending!r} is not supported; sparsify reads "
                        f"{' and '.join(FILE_ENDINGS.values())} datasets")
    label_folder = source / "labelsTr"
    cases = sorted(p.name[:-len(ending)] for p in label_folder.glob(f"*{ending}")) if label_folder.is_dir() else []
    if not cases:
        raise UserError(f"{label_folder} holds no {ending} label files: check the source dataset")
    return document, ending, cases


def _label_header(path: Path) -> tuple[tuple[int, ...], list[float]]:
    """(shape, spacing) of a label file, both in (z, y, x) order, without reading its voxels."""
    try:
        if path.name.endswith(".tif"):
            with tifffile.TiffFile(path) as tif:
                shape = tuple(tif.series[0].shape)
            return shape, _tif_spacing(path)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        return tuple(reversed(reader.GetSize())), list(reversed(reader.GetSpacing()))
    except (OSError, RuntimeError, tifffile.TiffFileError) as error:
        raise UserError(f"{path}: cannot read this label file ({' '.join(str(error).split())})") from None


def _tif_spacing(path: Path) -> list[float]:
    """Spacing from Tiff3DIO's ``<case>.json`` next to a label; (1, 1, 1) when absent, as nnU-Net assumes."""
    aux = path.with_name(path.name[:-len(".tif")] + ".json")
    if not aux.is_file():
        return [1.0, 1.0, 1.0]
    try:
        spacing = [float(s) for s in json.loads(aux.read_text())["spacing"]]
    except (ValueError, KeyError, TypeError):
        spacing = []
    if len(spacing) != 3:
        raise UserError(f'{aux}: expected {{"spacing": [z, y, x]}} (Tiff3DIO\'s spacing file); fix or remove it')
    return spacing


def _read_label(path: Path) -> tuple[np.ndarray, sitk.Image | None]:
    """A label volume (z, y, x) and, for NIfTI, its SimpleITK image (origin and direction to copy)."""
    if path.name.endswith(".tif"):
        return read_tiff(path), None
    array, _, image = read_nifti(path)
    return array, image


def _write_label(array: np.ndarray, target_without_ending: Path, spacing: Sequence[float], ending: str,
                 reference: sitk.Image | None) -> None:
    """Write a label like its source: NIfTI keeps the source's origin and direction, TIFF gets its spacing JSON."""
    if reference is None:
        write_image(array, target_without_ending, spacing, _FORMAT_OF_ENDING[ending])
        return
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    write_nifti(image, Path(f"{target_without_ending}{ending}"))


# --------------------------------------------------------------------------------------------- planning


def _plan(source: Path, cases: list[str], ending: str, axis: int, every, n_slices, holdout_fraction: float,
          seed: int) -> dict[str, dict]:
    """Per case: shape, spacing, training slices and held-out slices; every error names the label file."""
    plan = {}
    for index, case in enumerate(cases):
        path = source / "labelsTr" / f"{case}{ending}"
        shape, spacing = _label_header(path)
        if len(shape) != 3:
            raise UserError(f"{path}: expected a 3D label volume, got shape {shape}; sparsify needs 3D datasets")
        try:
            kept = annotated_slices(shape[axis], every=every, n_slices=n_slices)
            train, held = split_holdout(kept, holdout_fraction, seed, case_index=index)
        except UserError as error:
            raise UserError(f"{path}: {error}") from None
        plan[case] = {"shape": shape, "spacing": spacing, "train": train, "held": held}
    return plan


def _common_spacing(plan: dict[str, dict]) -> list[float] | dict[str, list[float]]:
    """One (z, y, x) spacing when all cases share it, else a spacing per case."""
    spacings = {case: entry["spacing"] for case, entry in plan.items()}
    first = next(iter(spacings.values()))
    return first if all(np.allclose(s, first) for s in spacings.values()) else spacings


def _default_name(source: Path, document: dict) -> str:
    """``<source name>_sparse``: the part after ``DatasetXXX_`` of the source folder (else dataset.json's name)."""
    stem = source.name.split("_", 1)[1] if source.name.startswith("Dataset") and "_" in source.name else None
    return f"{stem or document.get('name') or source.name}_sparse"


# --------------------------------------------------------------------------------------------- writing


def _check_declared(dense: np.ndarray, labels: dict[str, int], path: Path) -> None:
    """UserError for a label value dataset.json does not declare: it would be copied unchecked, and one equal to
    the new ignore value would silently become "unannotated"."""
    unknown = undeclared_values(dense, labels.values())
    if unknown:
        declared = ", ".join(f"{name}={value}" for name, value in labels.items())
        raise UserError(f"{path}: label value {unknown[0]} is not declared in the source's dataset.json "
                        f"({declared}); add it to 'labels' there or fix the label file")


def _with_room_for(dense: np.ndarray, ignore: int) -> np.ndarray:
    """``dense`` in a type that holds the ignore value: a uint8 label with 255 classes needs a wider one."""
    return dense.astype(np.result_type(dense.dtype, np.min_scalar_type(ignore)), copy=False)


def _write_cases(folder: Path, source: Path, plan: dict[str, dict], ending: str, axis: int,
                 labels: dict[str, int], ignore: int) -> None:
    for sub in ("labelsTr", DENSE_FOLDER):
        (folder / sub).mkdir()
    holding_out = any(entry["held"] for entry in plan.values())
    if holding_out:
        (folder / HOLDOUT_FOLDER).mkdir()
    for case, entry in plan.items():
        path = source / "labelsTr" / f"{case}{ending}"
        dense, reference = _read_label(path)
        _check_declared(dense, labels, path)
        dense = _with_room_for(dense, ignore)
        _write_label(sparsify(dense, axis, entry["train"], ignore), folder / "labelsTr" / case, entry["spacing"],
                     ending, reference)
        copy_label(source / "labelsTr" / case, folder / DENSE_FOLDER / case, ending)
        if holding_out:
            _write_label(sparsify(dense, axis, entry["held"], ignore), folder / HOLDOUT_FOLDER / case,
                         entry["spacing"], ending, reference)


def _sparse_document(document: dict, name: str, ignore: int, plan: dict[str, dict], axis: int,
                     arguments: dict) -> dict:
    counts = sorted({len(entry["train"]) + len(entry["held"]) for entry in plan.values()})
    description = (f"Sparse slice annotation simulated from {arguments['source']} (nnunet-ext sparsify): labelsTr "
                   f"keep {'/'.join(map(str, counts))} slices per volume along axis {axis} minus the held-out "
                   f"ones, every other voxel is ignore ({ignore}); {DENSE_FOLDER} holds the dense truth")
    return {**document, "name": name, "description": description,
            "labels": {**document["labels"], IGNORE: ignore},
            DATASET_JSON_KEY: axis,
            ANNOTATED_SLICES_KEY: {case: entry["train"] for case, entry in plan.items()},
            "holdout_slices": {case: entry["held"] for case, entry in plan.items()},
            "spacing": _common_spacing(plan),
            "sparsify": arguments}


def sparsify_dataset(source: Path, out_dir: Path, dataset_id: int, name: str | None = None, axis: int = 0,
                     every: int | None = None, n_slices: int | None = None, holdout_fraction: float = 0.0,
                     seed: int = 0) -> Path:
    """Write a sparse copy of the dense raw dataset ``source`` as ``out_dir/DatasetXXX_<name>/``; returns its path.

    Args:
        source: dense nnU-Net raw dataset folder (dataset.json, imagesTr/, labelsTr/; ``.nii.gz`` or Tiff3DIO
            ``.tif`` files; 3D labels (z, y, x) of an integer dtype, no ignore label).
        out_dir: the raw folder to write into (usually $nnUNet_raw).
        dataset_id, name: the new dataset's id (1-999) and name (default ``<source name>_sparse``).
        axis: annotation axis in the array order nnU-Net's reader returns (0 = z).
        every, n_slices: keep every k-th slice or N evenly spaced slices (exactly one; see ``annotated_slices``).
        holdout_fraction, seed: hold out this share of each case's kept slices (see ``split_holdout``).

    Returns:
        The new dataset folder. Its labels have the source's dtype (widened if the ignore value needs it) with the
        ignore label ``max(source labels) + 1``; NIfTI labels keep the source's origin and direction.

    Raises:
        UserError: bad arguments or source (a label value its dataset.json does not declare included), an existing
            dataset id, or a result failing nnU-Net's integrity check; nothing is left in ``out_dir`` then.
    """
    source = Path(source)
    document, ending, cases = _load_source(source)
    name = _default_name(source, document) if name is None else name
    check_dataset_id_and_name(dataset_id, name)
    check_axis(axis)
    check_seed(seed)
    check_holdout_fraction(holdout_fraction)
    if (every is None) == (n_slices is None):
        annotated_slices(1, every, n_slices)  # raises the one-line error for "neither" and "both"
    check_free(out_dir, dataset_id, name)
    plan = _plan(source, cases, ending, axis, every, n_slices, holdout_fraction, seed)
    ignore = max(document["labels"].values()) + 1
    arguments = {"source": str(source.resolve()), "axis": axis, "every": every, "n_slices": n_slices,
                 "holdout_fraction": float(holdout_fraction), "seed": seed}
    with atomic_dataset_folder(out_dir, dataset_id, name) as folder:
        for sub in _COPIED_FOLDERS:
            if (source / sub).is_dir():
                shutil.copytree(source / sub, folder / sub)
        _write_cases(folder, source, plan, ending, axis, document["labels"], ignore)
        sparse = _sparse_document(document, name, ignore, plan, axis, arguments)
        (folder / "dataset.json").write_text(json.dumps(sparse, indent=2) + "\n")
        verify_raw_dataset(folder)
    return Path(out_dir) / dataset_folder_name(dataset_id, name)


# --------------------------------------------------------------------------------------------- re-annotation


def _sparse_source(source: Path) -> tuple[dict, str, int, int, list[str]]:
    """(dataset.json, file ending, annotation axis, ignore label, cases of labelsTr_dense) of a sparse dataset that
    keeps its dense truth (written by ``sparsify_dataset`` or ``synth``); UserError otherwise."""
    document_path = source / "dataset.json"
    if not document_path.is_file():
        raise UserError(f"{source} has no dataset.json: point at a sparse nnU-Net raw dataset folder")
    document = json.loads(document_path.read_text())
    ending, axis = document.get("file_ending"), document.get(DATASET_JSON_KEY)
    ignore = document.get("labels", {}).get(IGNORE)
    dense_folder = source / DENSE_FOLDER
    cases = sorted(p.name[:-len(ending)] for p in dense_folder.glob(f"*{ending}")) if ending else []
    if ignore is None or axis is None or ending not in _FORMAT_OF_ENDING or not cases:
        raise UserError(f"{source}: re-annotating needs a sparse dataset with an ignore label, annotation_axis and "
                        f"its dense truth in {DENSE_FOLDER} (as sparsify and synth write them)")
    return document, ending, axis, ignore, cases


def _checked_plan(source: Path, ending: str, axis: int, cases: list[str],
                  slices: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """``slices`` as sorted lists per case, each index a distinct slice of its case; UserError otherwise."""
    if sorted(slices) != cases:
        raise UserError(f"the slice plan names cases {sorted(slices)}, {source.name} has {cases}: give slices for "
                        f"every training case")
    plan = {}
    for case in cases:
        length = label_shape(source / DENSE_FOLDER / f"{case}{ending}")[axis]
        kept = [int(i) for i in slices[case]]
        if not kept or len(set(kept)) != len(kept) or not all(0 <= i < length for i in kept):
            raise UserError(f"slices {kept} of case {case}: give distinct indices in 0..{length - 1} (its slices "
                            f"along axis {axis}), at least one")
        plan[case] = sorted(kept)
    return plan


def reannotate_dataset(source: Path, out_dir: Path, dataset_id: int, name: str,
                       slices: Mapping[str, Sequence[int]]) -> Path:
    """A copy of the sparse dataset ``source`` whose labelsTr keep exactly ``slices[case]`` of each case's dense
    truth (labelsTr_dense) along its annotation axis, as ``out_dir/DatasetXXX_<name>/``; returns its path.

    Images, test volumes and dense truth are copied; dataset.json lists the new ``annotated_slices`` (no hold-out).
    Raises UserError for a source without dense truth or a plan that misses a case or leaves its slice range;
    nothing is left in ``out_dir`` then.
    """
    source = Path(source)
    document, ending, axis, ignore, cases = _sparse_source(source)
    check_dataset_id_and_name(dataset_id, name)
    check_free(out_dir, dataset_id, name)
    plan = _checked_plan(source, ending, axis, cases, slices)
    with atomic_dataset_folder(out_dir, dataset_id, name) as folder:
        for sub in (*_COPIED_FOLDERS, DENSE_FOLDER):
            if (source / sub).is_dir():
                shutil.copytree(source / sub, folder / sub)
        (folder / "labelsTr").mkdir()
        for case, kept in plan.items():
            path = source / DENSE_FOLDER / f"{case}{ending}"
            dense, reference = _read_label(path)
            _write_label(sparsify(_with_room_for(dense, ignore), axis, kept, ignore), folder / "labelsTr" / case,
                         _label_header(path)[1], ending, reference)
        counts = "/".join(map(str, sorted({len(kept) for kept in plan.values()})))
        document = {**document, "name": name, ANNOTATED_SLICES_KEY: plan, "holdout_slices": {c: [] for c in plan},
                    "description": f"{source.name} re-annotated: labelsTr keep {counts} slices per volume along axis "
                                   f"{axis} (listed in annotated_slices), every other voxel is ignore ({ignore}); "
                                   f"{DENSE_FOLDER} holds the dense truth",
                    "reannotated_from": str(source.resolve())}
        (folder / "dataset.json").write_text(json.dumps(document, indent=2) + "\n")
        verify_raw_dataset(folder)
    return Path(out_dir) / dataset_folder_name(dataset_id, name)


# --------------------------------------------------------------------------------------------- CLI


def _run(args) -> None:
    from nnunet_ext.nnunet_paths import dataset_folder, raw_output_folder

    source = Path(args.source) if Path(args.source).is_dir() else dataset_folder(args.source, "nnUNet_raw")
    out_dir = raw_output_folder(args.out)
    folder = sparsify_dataset(source, out_dir, args.dataset_id, name=args.name, axis=args.axis, every=args.every,
                              n_slices=args.slices, holdout_fraction=args.holdout, seed=args.seed)
    print(f"wrote {folder}")


def register_cli(subparsers) -> None:
    """Add ``sparsify`` to the top-level ``nnunet-ext`` subcommands (``argparse`` subparsers)."""
    summary = "simulate sparse slice annotation from a dense nnU-Net raw dataset"
    parser = subparsers.add_parser("sparsify", help=summary, description=summary)
    add_output_arguments(parser, None, "<source name>_sparse", formats=False)
    parser.add_argument("source", metavar="SOURCE",
                        help="dense raw dataset: a folder, or an id / DatasetXXX_Name in $nnUNet_raw")
    parser.add_argument("--axis", type=int, default=0, help="annotation axis in (z, y, x) order (default 0)")
    sparsity = parser.add_mutually_exclusive_group(required=True)
    sparsity.add_argument("--every", type=int, metavar="K", help="keep every k-th slice (0, k, 2k, ...)")
    sparsity.add_argument("--slices", type=int, metavar="N", help="keep N evenly spaced slices per volume")
    parser.add_argument("--holdout", type=float, default=0.0, metavar="FRACTION",
                        help="share of the kept slices held out for validation (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the hold-out draw (default 0)")
    parser.set_defaults(func=_run)


def check_dense_source(source: Path) -> tuple[dict, str, list[str]]:
    """(dataset.json, file ending, sorted case ids) of a dataset ``sparsify_dataset`` accepts; UserError otherwise.

    For callers that validate their input before writing anything (``nnunet-ext benchmark --dense``).
    """
    return _load_source(Path(source))


def label_shape(path: Path) -> tuple[int, ...]:
    """Shape of a label file (``.nii.gz`` or ``.tif``) in (z, y, x) order, without reading its voxels."""
    return _label_header(Path(path))[0]
