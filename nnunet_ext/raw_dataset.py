"""Writing nnU-Net raw datasets: one atomic folder per dataset, NIfTI or Tiff3DIO-ready TIFF files.

Used by ``synth`` and by every converter in ``nnunet_ext.dataset_conversion``: a dataset appears in the raw
folder complete or not at all.
"""

import json
import math
import numbers
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import SimpleITK as sitk
import tifffile

from nnunet_ext.errors import UserError

FILE_ENDINGS = {"nifti": ".nii.gz", "tif": ".tif"}


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_axis(axis) -> None:
    if not is_int(axis) or axis not in (0, 1, 2):
        raise UserError(f"invalid annotation axis {axis!r}: choose 0 (z), 1 (y) or 2 (x)")


def check_seed(seed) -> None:
    if not is_int(seed) or seed < 0:
        raise UserError(f"invalid seed {seed!r}: choose a non-negative integer")


def check_dataset_id_and_name(dataset_id, name) -> None:
    """UserError unless the id is 1..999 and the name fits nnU-Net's ``DatasetXXX_<name>`` folder names."""
    if not is_int(dataset_id) or not 1 <= dataset_id <= 999:
        raise UserError(f"invalid dataset id {dataset_id!r}: choose an integer in 1..999")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
        raise UserError(f"invalid dataset name {name!r}: use letters, digits, '_' or '-', e.g. SynthMicroscopy")


def check_spacing(spacing) -> tuple[float, float, float]:
    """(z, y, x) voxel size as floats; UserError unless 3 finite positive numbers."""
    values = list(spacing) if isinstance(spacing, (Sequence, np.ndarray)) and not isinstance(spacing, str) else []
    if len(values) != 3 or not all(is_real(s) and math.isfinite(s) and s > 0 for s in values):
        raise UserError(f"invalid spacing {spacing!r}: give 3 positive voxel sizes in um (z, y, x), "
                        f"e.g. --spacing 4 1 1")
    return tuple(float(s) for s in values)


def check_file_format(file_format) -> None:
    if file_format not in FILE_ENDINGS:
        raise UserError(f"invalid file format {file_format!r}: choose {' or '.join(FILE_ENDINGS)}")


def add_output_arguments(parser, name_default: str | None, name_help: str, formats: bool = True) -> None:
    """The arguments every dataset-writing command shares: -d/--dataset-id, --name, --out and --format."""
    parser.add_argument("-d", "--dataset-id", type=int, required=True, metavar="ID", help="nnU-Net dataset id (1-999)")
    parser.add_argument("--name", default=name_default, help=f"dataset name (DatasetXXX_<name>; default {name_help})")
    parser.add_argument("--out", metavar="RAW", help="raw folder to write into (default: $nnUNet_raw)")
    if formats:
        parser.add_argument("--format", choices=tuple(FILE_ENDINGS), default="nifti", help="output files (default nifti)")


def dataset_folder_name(dataset_id: int, name: str) -> str:
    return f"Dataset{dataset_id:03d}_{name}"


def check_free(raw_dir: Path, dataset_id: int, name: str) -> None:
    """Refuse a raw_dir that is not a folder or already holds a dataset with this id (nnU-Net needs unique ids)."""
    raw_dir = Path(raw_dir)
    if raw_dir.exists() and not raw_dir.is_dir():
        raise UserError(f"{raw_dir} is not a folder: point the raw folder at a directory")
    target = raw_dir / dataset_folder_name(dataset_id, name)
    taken = sorted(p for p in raw_dir.glob(f"Dataset{dataset_id:03d}_*") if p.is_dir()) if raw_dir.is_dir() else []
    if target.exists() or target.is_symlink():
        taken.insert(0, target)
    if taken:
        raise UserError(f"{taken[0]} already exists: pick another dataset id (-d) or delete that folder")


def _missing_ancestors(path: Path) -> list[Path]:
    """``path`` and its parents that do not exist yet, deepest first (what mkdir(parents=True) would create)."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


@contextmanager
def atomic_dataset_folder(raw_dir, dataset_id: int, name: str) -> Iterator[Path]:
    """Yield a hidden work folder inside ``raw_dir``; on success it is renamed to ``DatasetXXX_<name>``.

    On any exception the work folder (and raw folders this call created) are removed, so nothing half-written
    remains. The id is checked before and again right before the rename.
    """
    raw_dir = Path(raw_dir)
    check_free(raw_dir, dataset_id, name)
    target = raw_dir / dataset_folder_name(dataset_id, name)
    created = _missing_ancestors(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        # Next to the final folder, so the rename stays on one filesystem.
        while tmp is None:
            candidate = raw_dir / f".{target.name}.tmp-{secrets.token_hex(4)}"
            try:
                candidate.mkdir()
                tmp = candidate
            except FileExistsError:
                continue
        yield tmp
        check_free(raw_dir, dataset_id, name)
        os.rename(tmp, target)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


def write_image(array: np.ndarray, stem: Path, spacing: Sequence[float], file_format: str = "nifti",
                channel: int | None = None) -> Path:
    """Write a (z, y, x) array with ``spacing`` (z, y, x) as ``<stem>[_<channel:04d>]<ending>``; returns the file.

    ``nifti``: .nii.gz via SimpleITK (nnU-Net reads the spacing back in array order). ``tif``: .tif plus the
    ``<stem>.json`` ``{"spacing": [...]}`` that nnU-Net's Tiff3DIO reads for a case (without the channel suffix;
    dataset.json must then name Tiff3DIO, see ``dataset_json``). Pass ``channel`` for images, not for labels.
    """
    suffix = "" if channel is None else f"_{channel:04d}"
    path = Path(f"{stem}{suffix}{FILE_ENDINGS[file_format]}")
    spacing = [float(s) for s in spacing]
    if file_format == "nifti":
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(tuple(reversed(spacing)))  # SimpleITK is (x, y, z)
        sitk.WriteImage(image, str(path), useCompression=True)
    else:
        # minisblack: a stack of 3 or 4 slices must not be stored as one RGB(A) image. zstd level 1 (imagecodecs,
        # an nnU-Net dependency) writes ~7x faster than zlib at the same size on noisy 16-bit microscopy.
        tifffile.imwrite(path, array, compression="zstd", compressionargs={"level": 1}, photometric="minisblack")
        Path(f"{stem}.json").write_text(json.dumps({"spacing": spacing}))
    return path


def copy_label(source_stem: Path, target_stem: Path, ending: str) -> None:
    """Byte-identical copy of the label file ``<source_stem><ending>`` and, for TIFF, its Tiff3DIO spacing JSON."""
    shutil.copyfile(f"{source_stem}{ending}", f"{target_stem}{ending}")
    spacing = Path(f"{source_stem}.json")
    if ending == FILE_ENDINGS["tif"] and spacing.is_file():  # without one nnU-Net assumes spacing 1
        shutil.copyfile(spacing, f"{target_stem}.json")


def dataset_json(name: str, channel_names: dict, labels: dict, num_training: int, file_format: str = "nifti",
                 **extra) -> dict:
    """nnU-Net's dataset.json fields (plus ``extra`` keys such as annotation_axis and spacing)."""
    document = {"name": name, "channel_names": {str(k): v for k, v in channel_names.items()}, "labels": labels,
                "numTraining": num_training, "file_ending": FILE_ENDINGS[file_format]}
    if file_format == "tif":
        document["overwrite_image_reader_writer"] = "Tiff3DIO"  # else short stacks may be read as 2D RGBA
    document.update(extra)
    return document


def verify_raw_dataset(folder: Path, num_processes: int = 1) -> None:
    """nnU-Net's own ``verify_dataset_integrity`` on a written folder; its failure becomes one UserError line."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    try:
        verify_dataset_integrity(str(folder), num_processes=num_processes)
    except (AssertionError, RuntimeError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        raise UserError(f"the converted dataset fails nnU-Net's integrity check: {message}") from None
