"""Writing nnU-Net raw datasets: one atomic folder per dataset, NIfTI or Tiff3DIO-ready TIFF files.

Used by ``synth`` and by every converter in ``nnunet_ext.dataset_conversion``: a dataset appears in the raw
folder complete or not at all.
"""

import json
import os
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


def write_image(array: np.ndarray, path_without_ending: Path, spacing: Sequence[float], file_format: str = "nifti"
                ) -> Path:
    """Write a (z, y, x) array with ``spacing`` (z, y, x); returns the file written.

    ``nifti``: .nii.gz via SimpleITK (nnU-Net reads the spacing back in array order). ``tif``: .tif plus the
    ``<name>.json`` ``{"spacing": [...]}`` that nnU-Net's Tiff3DIO needs (dataset.json must then name Tiff3DIO).
    """
    path = Path(f"{path_without_ending}{FILE_ENDINGS[file_format]}")
    spacing = [float(s) for s in spacing]
    if file_format == "nifti":
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(tuple(reversed(spacing)))  # SimpleITK is (x, y, z)
        sitk.WriteImage(image, str(path), useCompression=True)
    else:
        tifffile.imwrite(path, array, compression="zlib")
        Path(f"{path_without_ending}.json").write_text(json.dumps({"spacing": spacing}))
    return path


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
