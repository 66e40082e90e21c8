"""Light-sheet volumes with sparse slice annotations -> nnU-Net raw dataset (``nnunet-ext convert lsfm``).

Made for cleared-tissue light-sheet scans (PDAC histopathology, UltraMicroscope Blaze): one volume per excitation
channel (e.g. 488/560/710 nm) and a few annotated 2D slices. One call converts one case, i.e. one sample; with a
single large volume, train on nnU-Net's fold ``all`` and validate on the held-out slices (``holdout_fraction``).

Inputs:

* channels: one (z, y, x) volume per channel, a multi-page TIFF or a folder of 2D slices (any form
  ``readers.read_volume`` reads), all of the same shape; their order is the channel order (``_0000``, ``_0001``, ...).
* annotations: either a folder of 2D masks, one per annotated slice, named by the slice's 0-based index along
  ``axis`` (as CVAT exports frames: ``frame_000012.png`` annotates slice 12); or a label volume (TIFF or NIfTI) of
  the image's shape whose all-zero slices along ``axis`` count as unannotated.
* classes: ``{"name": value}`` JSON or ``name,value`` CSV lines with the values used in the masks, ``background``
  = 0 required. Without it, every value found becomes ``class_<value>``.

Output (``out_dir/DatasetXXX_<name>/``): ``imagesTr/<case>_000C``, ``labelsTr/<case>`` where annotated slices keep
their classes and every other voxel is the ignore label, ``labelsTr_holdout/<case>`` with only the held-out slices'
truth (when holding out), and dataset.json with nnU-Net's keys plus ``annotation_axis``, ``annotated_slices``
(training slices), ``holdout_slices``, ``spacing`` (z, y, x, after downsampling) and ``lsfm`` (the arguments).
Class values are renumbered 0..n-1 in the order of their source values, because nnU-Net needs consecutive labels
(a 0/255 mask becomes 0/1); the ignore label is n.
"""

import csv
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from nnunet_ext.datasets.raw_dataset import (
    add_output_arguments,
    atomic_dataset_folder,
    check_axis,
    check_dataset_id_and_name,
    check_file_format,
    check_free,
    check_seed,
    check_spacing,
    dataset_folder_name,
    dataset_json,
    is_int,
    undeclared_values,
    verify_raw_dataset,
    write_image,
)
from nnunet_ext.datasets.readers import list_slices, read_slice, read_volume, slice_index
from nnunet_ext.datasets.sparsify import HOLDOUT_FOLDER, IGNORE, check_holdout_fraction, sparsify, split_holdout
from nnunet_ext.errors import UserError
from nnunet_ext.nnunet_paths import raw_output_folder

BACKGROUND = "background"
_CASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_LABEL_STACK_SUFFIXES = (".tif", ".tiff", ".nii", ".nii.gz")


# --------------------------------------------------------------------------------------------- classes


def load_classes(classes: Path | dict) -> dict[str, int]:
    """The class mapping ``{name: value in the masks}`` from a dict, a JSON file or a ``name,value`` CSV file.

    Raises:
        UserError (naming the file): unreadable file, non-integer or negative or repeated values, no
            ``background`` = 0, or a class named ``ignore`` (reserved for unannotated voxels).
    """
    if isinstance(classes, dict):
        return _check_classes(classes, "the class mapping")
    path = Path(classes)
    if not path.is_file():
        raise UserError(f"{path} does not exist: give a JSON or CSV class mapping file")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}: not valid JSON ({error.msg}, line {error.lineno}); "
                            f'write {{"background": 0, "tumor": 1}}') from None
        if not isinstance(mapping, dict):
            raise UserError(f'{path}: expected a JSON object like {{"background": 0, "tumor": 1}}')
        return _check_classes(mapping, str(path))
    if path.suffix.lower() in (".csv", ".txt"):
        return _check_classes(_parse_csv(text, path), str(path))
    raise UserError(f"{path}: unsupported class mapping; use .json ({{\"name\": value}}) or .csv (name,value lines)")


def _parse_csv(text: str, path: Path) -> dict[str, int]:
    """``name,value`` rows; blank lines, ``#`` comments and a ``name,value`` header row are skipped."""
    mapping = {}
    for number, row in enumerate(csv.reader(text.splitlines()), start=1):
        cells = [cell.strip() for cell in row]
        if not any(cells) or cells[0].startswith("#") or [c.lower() for c in cells] == ["name", "value"]:
            continue
        if len(cells) != 2 or not re.fullmatch(r"-?\d+", cells[1]):
            raise UserError(f"{path}: line {number} {','.join(cells)!r} is not 'name,value' with an integer value")
        if cells[0] in mapping:
            raise UserError(f"{path}: class {cells[0]!r} is listed twice (line {number}); keep one")
        mapping[cells[0]] = int(cells[1])
    return mapping


def _check_classes(mapping: dict, where: str) -> dict[str, int]:
    for name, value in mapping.items():
        if not isinstance(name, str) or not name or not is_int(value) or value < 0:
            raise UserError(f"{where}: class {name!r}: {value!r} needs a non-empty name and an integer value >= 0")
    if mapping.get(BACKGROUND) != 0:
        raise UserError(f'{where}: no "background": 0 entry; nnU-Net needs background = 0, add it')
    if IGNORE in mapping:
        raise UserError(f"{where}: {IGNORE!r} is reserved for unannotated voxels; rename that class")
    values = list(mapping.values())
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise UserError(f"{where}: value {repeated[0]} is used by several classes; give each class its own value")
    return {name: int(value) for name, value in sorted(mapping.items(), key=lambda item: item[1])}


def _classes_found(values: set[int]) -> dict[str, int]:
    """Generic class names for the values found in the masks (no mapping given)."""
    return {BACKGROUND: 0, **{f"class_{v}": v for v in sorted(values - {0})}}


# --------------------------------------------------------------------------------------------- reading


def _read_channels(paths: Sequence[Path]) -> list[np.ndarray]:
    """One (z, y, x) volume per channel, all of one shape; UserError naming the offending file."""
    if not paths:
        raise UserError("no channel given: pass one volume per channel (--channels C488.tif C560.tif C710.tif)")
    volumes = []
    for path in paths:
        volume = read_volume(path)
        if volume.ndim != 3:
            raise UserError(f"{path}: expected one (z, y, x) volume, got shape {volume.shape}; "
                            f"export one single-channel volume per channel")
        if not (np.issubdtype(volume.dtype, np.integer) or np.issubdtype(volume.dtype, np.floating)):
            raise UserError(f"{path}: dtype {volume.dtype} is not an intensity type; export integer or float images")
        volumes.append(volume)
    if len({v.shape for v in volumes}) > 1:
        listing = ", ".join(f"{p} {v.shape}" for p, v in zip(paths, volumes))
        raise UserError(f"channels differ in shape: {listing}; all channels must have the same (z, y, x) shape")
    return volumes


def _channel_names(paths: Sequence[Path]) -> dict[int, str]:
    """Channel names from the file or folder names (``C488.tif`` -> ``C488``), ``channel_<i>`` if they repeat."""
    stems = [Path(p).name.split(".")[0] for p in paths]
    if len(set(stems)) < len(stems) or not all(stems):
        stems = [f"channel_{i}" for i in range(len(paths))]
    return dict(enumerate(stems))


def _read_annotations(path: Path, shape: tuple[int, ...], axis: int) -> list[tuple[int, np.ndarray, Path]]:
    """(slice index along ``axis``, 2D mask as stored, its file) per annotated slice, sorted by index."""
    path = Path(path)
    if path.is_dir():
        return [_read_mask(mask_path, shape, axis) for mask_path in list_slices(path)]
    if path.exists() and not path.name.lower().endswith(_LABEL_STACK_SUFFIXES):
        raise UserError(f"{path}: annotations must be a folder of 2D masks or a TIFF/NIfTI label volume")
    stack = read_volume(path)
    if stack.shape != shape:
        raise UserError(f"{path}: label volume shape {stack.shape} differs from the image shape {shape}; "
                        f"export labels on the image grid")
    other = tuple(a for a in range(3) if a != axis)
    annotated = np.flatnonzero(np.any(stack != 0, axis=other))
    if annotated.size == 0:
        raise UserError(f"{path}: every voxel is 0, so no slice is annotated; check the file or the axis")
    return [(int(i), np.take(stack, i, axis=axis), path) for i in annotated]


def _read_mask(path: Path, shape: tuple[int, ...], axis: int) -> tuple[int, np.ndarray, Path]:
    index = slice_index(path)
    if index >= shape[axis]:
        raise UserError(f"{path}: slice {index} is outside the volume ({shape[axis]} slices along axis {axis}, "
                        f"0..{shape[axis] - 1}); name masks by their 0-based slice index")
    mask = read_slice(path)
    expected = tuple(n for a, n in enumerate(shape) if a != axis)
    if mask.shape != expected:
        raise UserError(f"{path}: mask shape {mask.shape} differs from the slice shape {expected} along axis {axis}; "
                        f"export masks at the image's resolution")
    return index, mask, path


def _integer_mask(mask: np.ndarray, path: Path) -> np.ndarray:
    """The mask with integer values (bool and integral floats converted); UserError for anything else."""
    if mask.dtype == bool:
        return mask.astype(np.uint8)
    if np.issubdtype(mask.dtype, np.integer):
        return mask
    if np.issubdtype(mask.dtype, np.floating):
        fractional = mask[~np.isfinite(mask) | (mask != np.round(mask))]
        if fractional.size:
            raise UserError(f"{path}: float mask with non-integer value {fractional.flat[0]}; "
                            f"export integer class values (no interpolation or anti-aliasing)")
        return mask.astype(np.int64)
    raise UserError(f"{path}: mask dtype {mask.dtype} holds no class values; export integer masks")


# --------------------------------------------------------------------------------------------- labels


def _sparse_label(masks: list[tuple[int, np.ndarray, Path]], shape: tuple[int, ...], axis: int,
                  classes: dict[str, int] | None, classes_where: str) -> tuple[np.ndarray, dict[str, int]]:
    """The (z, y, x) label volume (output values, ignore elsewhere) and the class mapping used.

    Every mask's values are checked before anything is mapped, so an error names the first bad file.
    """
    masks = [(index, _integer_mask(mask, path), path) for index, mask, path in masks]
    found = {index: set(np.unique(mask).tolist()) for index, mask, _ in masks}
    if classes is None:
        classes = _classes_found(set().union(*found.values()))
    known = set(classes.values())
    for index, _, path in masks:
        unknown = undeclared_values(found[index], known)
        if unknown:
            raise UserError(f"{path}: class value {unknown[0]} (slice {index}) is not in {classes_where} "
                            f"({', '.join(f'{k}={v}' for k, v in classes.items())}); add it there or fix the mask")
    ignore = len(classes)
    # Output value = rank of the source value; the table only needs to reach the largest value found.
    top = max(set().union(*found.values()))
    lut = np.zeros(top + 1, dtype=np.uint8 if ignore <= 255 else np.uint16)
    for rank, value in enumerate(sorted(known)):
        if value <= top:
            lut[value] = rank
    label = np.full(shape, ignore, dtype=lut.dtype)
    for index, mask, _ in masks:
        target = [slice(None)] * 3
        target[axis] = index
        label[tuple(target)] = lut[mask]
    return label, classes


# --------------------------------------------------------------------------------------------- downsampling


def _check_in_plane_size(size, shape: tuple[int, ...], axis: int) -> None:
    if size is None:
        return
    if not is_int(size) or size < 1:
        raise UserError(f"invalid --in-plane-size {size!r}: give a positive number of pixels, e.g. 128")
    if axis != 0:
        raise UserError(f"--in-plane-size resamples y and x, which would move the slices annotated along axis {axis}; "
                        f"use it with annotations along axis 0 (z)")
    if size > min(shape[1:]):
        raise UserError(f"--in-plane-size {size} exceeds the in-plane size {shape[1]} x {shape[2]}; it only "
                        f"downsamples, choose at most {min(shape[1:])}")


def _downsample_image(volume: np.ndarray, size: int) -> np.ndarray:
    """(z, y, x) -> (z, size, size), linear interpolation after an anti-aliasing blur; dtype kept (rounded).

    Slice by slice: z is untouched, and only one float32 slice is held at a time.
    """
    zoom = (size / volume.shape[1], size / volume.shape[2])
    # Without the blur a 10x reduction keeps one pixel in ten and aliases fine structure (skimage's sigma rule).
    sigma = [max(0.0, (1.0 / f - 1.0) / 2.0) for f in zoom]
    out = np.empty((volume.shape[0], size, size), dtype=volume.dtype)
    for z, plane in enumerate(volume):
        smooth = ndimage.gaussian_filter(plane.astype(np.float32), sigma, mode="nearest")
        small = ndimage.zoom(smooth, zoom, order=1, mode="nearest", grid_mode=True)
        if np.issubdtype(volume.dtype, np.integer):
            info = np.iinfo(volume.dtype)
            small = np.clip(np.rint(small), info.min, info.max)
        out[z] = small
    return out


def _downsample_label(label: np.ndarray, size: int) -> np.ndarray:
    """(z, y, x) -> (z, size, size) by nearest neighbour: the input pixel under each output pixel's centre."""
    rows = ((2 * np.arange(size) + 1) * label.shape[1]) // (2 * size)
    cols = ((2 * np.arange(size) + 1) * label.shape[2]) // (2 * size)
    return label[:, rows][:, :, cols]


# --------------------------------------------------------------------------------------------- writing


def _read_case(channels: Sequence[Path], annotations: Path, classes: Path | dict | None, axis: int,
               in_plane_size: int | None) -> tuple[list[np.ndarray], np.ndarray, dict[str, int], list[int]]:
    """All inputs read and checked: (channel volumes, label volume, class mapping used, annotated slice indices)."""
    mapping = None if classes is None else load_classes(classes)
    where = "the class mapping" if classes is None or isinstance(classes, dict) else str(classes)
    images = _read_channels([Path(p) for p in channels])
    shape = images[0].shape
    _check_in_plane_size(in_plane_size, shape, axis)
    masks = _read_annotations(annotations, shape, axis)
    label, mapping = _sparse_label(masks, shape, axis, mapping, where)
    return images, label, mapping, [index for index, _, _ in masks]


def downsample_in_plane(images: list[np.ndarray], label: np.ndarray, spacing: Sequence[float], size: int
                ) -> tuple[list[np.ndarray], np.ndarray, list[float]]:
    """Images, label and (z, y, x) spacing resampled in-plane to ``size`` x ``size``."""
    _, height, width = label.shape
    return ([_downsample_image(image, size) for image in images], _downsample_label(label, size),
            [spacing[0], spacing[1] * height / size, spacing[2] * width / size])


def _write_images(folder: Path, case: str, images: list[np.ndarray], spacing: Sequence[float],
                  file_format: str) -> None:
    folder.mkdir()
    for channel, image in enumerate(images):
        write_image(image, folder / case, spacing, file_format, channel=channel)


def _check_options(dataset_id, name, spacing, axis, seed, file_format, case_id, holdout_fraction
                   ) -> tuple[float, float, float]:
    check_dataset_id_and_name(dataset_id, name)
    check_axis(axis)
    check_seed(seed)
    check_file_format(file_format)
    if not isinstance(case_id, str) or not _CASE_ID.fullmatch(case_id):
        raise UserError(f"invalid case id {case_id!r}: use letters, digits, '_' or '-', e.g. pdac_001")
    check_holdout_fraction(holdout_fraction)
    return check_spacing(spacing)


def convert(channels: Sequence[Path], annotations: Path, out_dir: Path, dataset_id: int, name: str = "LSFM",
            classes: Path | dict | None = None, *, spacing: Sequence[float], axis: int = 0,
            in_plane_size: int | None = None, holdout_fraction: float = 0.0, seed: int = 0,
            file_format: str = "nifti", case_id: str | None = None) -> Path:
    """Convert one light-sheet case to ``out_dir/DatasetXXX_<name>/``; returns that folder.

    Args:
        channels: one (z, y, x) volume per channel (TIFF stack or folder of 2D slices), same shape, in channel order.
        annotations: folder of 2D masks named by 0-based slice index along ``axis``, or a (z, y, x) label volume
            whose all-zero slices are unannotated (see the module docstring).
        out_dir: the raw folder to write into (usually $nnUNet_raw).
        dataset_id, name: nnU-Net dataset id (1-999) and name.
        classes: ``{name: value}``, or a JSON/CSV file of it (see ``load_classes``); None: the values found.
        spacing: (z, y, x) voxel size in um of the input volumes (keyword-only, required).
        axis: annotation axis of the volumes (0 = z).
        in_plane_size: resample y and x to ``in_plane_size`` each (images linear with anti-aliasing, labels
            nearest neighbour), z untouched; needs ``axis == 0``. None keeps the full resolution.
        holdout_fraction, seed: hold out this share of the annotated slices (``sparsify.split_holdout``, case 0).
        file_format: ``nifti`` (.nii.gz) or ``tif`` (Tiff3DIO TIFF + spacing JSON).
        case_id: case identifier (default ``<name lower-case>_000``).

    Returns:
        The dataset folder: images keep their dtype, labels are uint8 (uint16 when the ignore value exceeds 255).

    Raises:
        UserError: naming the file and the fix, for any bad argument or input, an existing dataset id, or a
            result failing nnU-Net's integrity check. Inputs are checked before anything is written, and nothing
            is left in ``out_dir`` on failure.
    """
    case = f"{name.lower()}_000" if case_id is None and isinstance(name, str) else case_id
    spacing = _check_options(dataset_id, name, spacing, axis, seed, file_format, case, holdout_fraction)
    check_free(out_dir, dataset_id, name)
    images, label, mapping, annotated = _read_case(channels, annotations, classes, axis, in_plane_size)
    input_shape = label.shape
    train, held = split_holdout(annotated, holdout_fraction, seed)
    out_spacing = list(spacing)
    if in_plane_size is not None:
        images, label, out_spacing = downsample_in_plane(images, label, spacing, in_plane_size)
    arguments = {"channels": [str(Path(p).resolve()) for p in channels],
                 "annotations": str(Path(annotations).resolve()), "classes": mapping,
                 "input_shape": list(input_shape),
                 "input_spacing": list(spacing), "in_plane_size": in_plane_size,
                 "holdout_fraction": float(holdout_fraction), "seed": seed}
    ignore = len(mapping)
    document = dataset_json(
        name, _channel_names(channels), {**{k: i for i, k in enumerate(mapping)}, IGNORE: ignore}, 1, file_format,
        description=(f"Light-sheet volume {case} (nnunet-ext convert lsfm): {len(train)} annotated slices along axis "
                     f"{axis} for training, {len(held)} held out; every other voxel is ignore ({ignore})"),
        annotation_axis=axis, annotated_slices={case: train}, holdout_slices={case: held}, spacing=out_spacing,
        lsfm=arguments)
    with atomic_dataset_folder(out_dir, dataset_id, name) as folder:
        _write_images(folder / "imagesTr", case, images, out_spacing, file_format)
        labels = {"labelsTr": train, **({HOLDOUT_FOLDER: held} if held else {})}
        for sub, slices in labels.items():
            (folder / sub).mkdir()
            write_image(sparsify(label, axis, slices, ignore), folder / sub / case, out_spacing, file_format)
        (folder / "dataset.json").write_text(json.dumps(document, indent=2) + "\n")
        verify_raw_dataset(folder)
    return Path(out_dir) / dataset_folder_name(dataset_id, name)


# --------------------------------------------------------------------------------------------- CLI


def _run(args) -> None:
    out_dir = raw_output_folder(args.out)
    folder = convert(args.channels, args.annotations, out_dir, args.dataset_id, name=args.name, classes=args.classes,
                     spacing=tuple(args.spacing), axis=args.axis, in_plane_size=args.in_plane_size,
                     holdout_fraction=args.holdout, seed=args.seed, file_format=args.format, case_id=args.case_id)
    print(f"wrote {folder}")


def register_cli(subparsers) -> None:
    """Add ``lsfm`` to the subcommands of ``nnunet-ext convert`` (``argparse`` subparsers)."""
    summary = "light-sheet channels + sparse slice masks -> nnU-Net raw dataset"
    parser = subparsers.add_parser("lsfm", help=summary, description=summary)
    add_output_arguments(parser, "LSFM", "LSFM")
    parser.add_argument("--channels", nargs="+", required=True, metavar="VOLUME",
                        help="one TIFF stack or folder of 2D slices per channel, in channel order")
    parser.add_argument("--annotations", required=True, metavar="PATH",
                        help="folder of 2D masks named by slice index, or a label volume (0 = unannotated slice)")
    parser.add_argument("--spacing", type=float, nargs=3, required=True, metavar=("Z", "Y", "X"),
                        help="voxel size in um of the input volumes")
    parser.add_argument("--classes", metavar="FILE",
                        help="class mapping: JSON {\"name\": value} or CSV name,value lines")
    parser.add_argument("--case-id", metavar="CASE", help="case identifier (default: <name lower-case>_000)")
    parser.add_argument("--axis", type=int, default=0, help="annotation axis in (z, y, x) order (default 0)")
    parser.add_argument("--in-plane-size", type=int, metavar="N",
                        help="downsample y and x to N x N (the paper trains at 128)")
    parser.add_argument("--holdout", type=float, default=0.0, metavar="FRACTION",
                        help="share of the annotated slices held out for validation (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the hold-out draw (default 0)")
    parser.set_defaults(func=_run)
