"""Writing nnU-Net raw datasets: one atomic folder per dataset, NIfTI or Tiff3DIO-ready TIFF files.

Used by ``synth`` and by every converter in ``nnunet_ext.dataset_conversion``: a dataset appears in the raw
folder complete or not at all.
"""

import gzip
import json
import math
import numbers
import os
import re
import secrets
import shutil
import socket
import struct
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import tifffile

from nnunet_ext.errors import UserError, sigterm_raises
from nnunet_ext.nnunet_paths import nnunet_folders_beside

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


def check_output_folder(folder, option: str = "--out") -> Path:
    """UserError unless ``folder`` is a folder this process may write into, or can be created as one.

    Catches before any work what would otherwise fail at the first write: a path below a regular file, or a
    folder without write permission (a full or read-only disk shows only when writing: see ``cli.main``).
    """
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:  # exists() is False below a regular file
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{existing} is not a folder but a file, so {folder} cannot be written: choose another "
                        f"{option}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"no permission to write in {existing}: choose another {option} or fix its permissions")
    return folder


def check_free(raw_dir: Path, dataset_id: int, name: str) -> None:
    """Refuse a raw_dir we cannot write into or a dataset id that is taken in raw_dir or in the nnU-Net folders
    beside it (``nnunet_folders_beside``): nnU-Net needs one name per id across raw, preprocessed and results."""
    raw_dir = check_output_folder(raw_dir)
    target = raw_dir / dataset_folder_name(dataset_id, name)
    taken = [target] if target.exists() or target.is_symlink() else []
    for base in [raw_dir, *nnunet_folders_beside(raw_dir)]:
        if base.is_dir():
            taken += sorted(p for p in base.glob(f"Dataset{dataset_id:03d}_*") if p.is_dir())
    if taken:
        raise UserError(f"{taken[0]} already exists: pick another dataset id (-d) or delete that folder")


# Work folders: ``.<DatasetXXX_Name>.tmp-<host>-<pid>-<random>``; the host and pid tell a later run whether the
# process that made one still runs (a SIGKILL or a power cut leaves it behind).
_WORK_FOLDER = re.compile(r"\.Dataset\d{3}_.+\.tmp-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}")


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_work_folders(raw_dir: Path) -> list[Path]:
    """Remove the work folders in ``raw_dir`` whose process (on this host) no longer runs, saying so on stderr.

    Only folders of ``atomic_dataset_folder``'s own naming are touched; those of other hosts (a shared file
    system) are left alone, since their process cannot be checked from here.
    """
    removed = []
    for path in sorted(Path(raw_dir).glob(".Dataset*.tmp-*")):
        match = _WORK_FOLDER.fullmatch(path.name)
        if match is None or match["host"] != socket.gethostname() or _process_runs(int(match["pid"])):
            continue
        shutil.rmtree(path, ignore_errors=True)
        print(f"nnunet-ext: removed {path}, an unfinished dataset of process {match['pid']}, which no longer runs",
              file=sys.stderr)
        removed.append(path)
    return removed


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

    On any exception, SIGTERM included (``sigterm_raises``), the work folder (and raw folders this call created)
    are removed, so nothing half-written remains; work folders that killed runs left behind are removed first
    (``remove_stale_work_folders``). The id is checked before and again right before the rename.
    """
    raw_dir = Path(raw_dir)
    check_free(raw_dir, dataset_id, name)
    target = raw_dir / dataset_folder_name(dataset_id, name)
    created = _missing_ancestors(raw_dir)
    tmp = None
    with sigterm_raises():
        try:
            raw_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_work_folders(raw_dir)
            # Next to the final folder, so the rename stays on one filesystem.
            while tmp is None:
                candidate = raw_dir / f".{target.name}.tmp-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
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
        write_nifti(image, path)
    else:
        # minisblack: a stack of 3 or 4 slices must not be stored as one RGB(A) image. zstd level 1 (imagecodecs,
        # an nnU-Net dependency) writes much faster than zlib at about the same size on noisy 16-bit microscopy.
        tifffile.imwrite(path, array, compression="zstd", compressionargs={"level": 1}, photometric="minisblack")
        Path(f"{stem}.json").write_text(json.dumps({"spacing": spacing}))
    return path


def write_nifti(image: sitk.Image, path: Path) -> None:
    """Write a compressed NIfTI file and check that it is complete (``nifti_is_complete``).

    SimpleITK reports no error when its gzip stream fails (a full disk leaves a truncated file behind), so
    without this check a dataset written with ``--no-verify`` would keep such a file.
    """
    sitk.WriteImage(image, str(path), useCompression=True)
    if not nifti_is_complete(path):
        raise UserError(f"{path} was written incomplete (SimpleITK reported no error; is the disk full?): "
                        f"free space in {Path(path).parent} and run the command again")


def nifti_is_complete(path: Path) -> bool:
    """True when a .nii.gz file's gzip trailer (uncompressed size mod 2**32) equals the size its header declares.

    Reads the header and the last 4 bytes only, so it costs nothing next to the write; a truncated stream has
    random bytes where the trailer should be (a false pass has odds of 1 in 2**32).
    """
    try:
        with gzip.open(path, "rb") as f:
            header = f.read(_NIFTI2_HEADER_BYTES)
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            stored = int.from_bytes(f.read(4), "little")
    except (OSError, EOFError, ValueError):  # gzip.BadGzipFile is an OSError
        return False
    declared = _nifti_declared_bytes(header)
    return declared is not None and stored == declared % 2**32


_NIFTI1_HEADER_BYTES, _NIFTI2_HEADER_BYTES = 348, 540


def _nifti_declared_bytes(header: bytes) -> int | None:
    """vox_offset + voxel bytes from a NIfTI-1 or NIfTI-2 header (either byte order); None if it is neither."""
    for order in "<>":
        size = struct.unpack(f"{order}i", header[:4])[0] if len(header) >= 4 else None
        if size == _NIFTI1_HEADER_BYTES and len(header) >= size:
            dims = struct.unpack(f"{order}8h", header[40:56])
            bitpix = struct.unpack(f"{order}h", header[72:74])[0]
            offset = struct.unpack(f"{order}f", header[108:112])[0]
            break
        if size == _NIFTI2_HEADER_BYTES and len(header) >= size:
            bitpix, dims = struct.unpack(f"{order}h", header[14:16])[0], struct.unpack(f"{order}8q", header[16:80])
            offset = struct.unpack(f"{order}q", header[168:176])[0]
            break
    else:
        return None
    if not 1 <= dims[0] <= 7:
        return None
    return int(offset) + math.prod(dims[1:dims[0] + 1]) * bitpix // 8


def undeclared_values(values: np.ndarray | Iterable[int], declared: Iterable[int]) -> list[int]:
    """The label values in ``values`` (an integer array, or the values found in one) that ``declared`` lacks.

    The one check of label values against the classes a dataset declares: an undeclared value would be copied
    into nnU-Net's labels unchecked (or, equal to the ignore value, silently become "unannotated").
    """
    found = np.unique(values).tolist() if isinstance(values, np.ndarray) else values
    return sorted(set(found) - set(declared))  # exact: a float label 2.5 is not the class 2


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
