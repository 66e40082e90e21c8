"""Readers for the microscopy exports the converters accept: TIFF stacks, folders of 2D slices, NIfTI, HDF5.

Every reader returns numpy arrays in (z, y, x) order (multi-channel stacks as stored; the converters say which
layout they expect) and raises UserError naming the file when it cannot read it, when it holds NaN or infinite
values (``check_finite``), or, for a folder of slices forming a volume, when the slice numbers have a gap
(``list_volume_slices``). Every converter reads through these functions, so these checks hold for all of them.
"""

import re
from pathlib import Path

import h5py
import numpy as np
import SimpleITK as sitk
import tifffile

from nnunet_ext.errors import UserError

SLICE_SUFFIXES = (".tif", ".tiff", ".png")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
_LAST_INTEGER = re.compile(r"(\d+)(?!.*\d)")
# What reading a damaged file raises: imagecodecs' ZlibError/ZstdError (a corrupt compressed TIFF) are RuntimeErrors.
_DECODE_ERRORS = (OSError, ValueError, RuntimeError, IndexError, tifffile.TiffFileError)
_FINITE_CHUNK = 1 << 22  # elements per np.isfinite call: bounds the temporary mask on huge volumes


def slice_index(path: Path) -> int:
    """The slice number of a 2D slice file: the last integer in its name (``slice_0042.tif`` -> 42)."""
    match = _LAST_INTEGER.search(Path(path).name.split(".")[0])
    if match is None:
        raise UserError(f"{path}: no slice number in the file name; name slices like slice_0001.tif")
    return int(match.group(1))


def list_slices(folder: Path) -> list[Path]:
    """The 2D slice files of a folder ordered by slice number; UserError if none or if two share a number."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of 2D slices: check the path")
    files = [p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(SLICE_SUFFIXES)]
    if not files:
        raise UserError(f"{folder} holds no slice files ({', '.join(SLICE_SUFFIXES)}): check the path")
    by_index = {}
    for path in files:
        index = slice_index(path)
        if index in by_index:
            raise UserError(f"{path} and {by_index[index]} have the same slice number {index}: rename one")
        by_index[index] = path
    return [by_index[i] for i in sorted(by_index)]


def list_volume_slices(folder: Path) -> list[Path]:
    """The slice files of a folder that forms one volume, ordered; UserError naming the first gap in the numbers.

    Slices 0, 1, 2, 5, 6, 7 would otherwise stack into a 6-slice volume in which position 3 is file 5, so a mask
    or a spacing that counts slice numbers would land on the wrong image.
    """
    paths = list_slices(folder)
    indices = [slice_index(p) for p in paths]
    for previous, path, index in zip(indices, paths[1:], indices[1:]):
        if index != previous + 1:
            raise UserError(f"{path}: slice numbers jump from {previous} to {index}; the slices of a volume must be "
                            f"consecutive (add the missing slices or renumber)")
    return paths


def check_finite(array: np.ndarray, path: Path) -> np.ndarray:
    """``array`` unchanged; UserError naming ``path`` if it holds NaN or infinite values (nnU-Net's
    normalisation would spread them over the whole image)."""
    if array.dtype.kind in "fc":
        flat = array.reshape(-1)
        for start in range(0, flat.size, _FINITE_CHUNK):
            if not np.isfinite(flat[start:start + _FINITE_CHUNK]).all():
                raise UserError(f"{path}: contains NaN or infinite values; replace them (e.g. by 0) and export again")
    return array


def read_slice(path: Path) -> np.ndarray:
    """One 2D slice (y, x)."""
    try:
        array = tifffile.imread(path) if str(path).lower().endswith((".tif", ".tiff")) else _read_with_sitk(path)
    except _DECODE_ERRORS as error:
        raise UserError(f"{path}: cannot read this slice ({error}); is it a valid image file?") from None
    if array.ndim != 2:
        raise UserError(f"{path}: expected a 2D slice, got shape {array.shape}; export single-channel 2D slices")
    return check_finite(array, path)


def read_slice_folder(folder: Path) -> np.ndarray:
    """A folder of 2D slices as one (z, y, x) stack; UserError naming the first slice whose shape/dtype differs."""
    paths = list_volume_slices(folder)
    first = read_slice(paths[0])
    stack = np.empty((len(paths), *first.shape), dtype=first.dtype)
    stack[0] = first
    for z, path in enumerate(paths[1:], start=1):
        array = read_slice(path)
        if array.shape != first.shape or array.dtype != first.dtype:
            raise UserError(f"{path}: shape {array.shape} {array.dtype} differs from {paths[0].name} "
                            f"({first.shape} {first.dtype}); all slices must match")
        stack[z] = array
    return stack


def read_tiff(path: Path) -> np.ndarray:
    """A (multi-page) TIFF file as stored (e.g. (z, y, x) or (c, z, y, x)).

    A file written page by page (one series per page, as ``tifffile.imwrite`` in a loop does) is stacked
    along a new first axis instead of returning its first page only.
    """
    try:
        with tifffile.TiffFile(path) as tiff:
            series = [s.asarray() for s in tiff.series]
    except _DECODE_ERRORS as error:
        raise UserError(f"{path}: cannot read this TIFF ({error}); check the file") from None
    if not series:
        raise UserError(f"{path}: the TIFF holds no image: check the file")
    if len(series) == 1:
        return check_finite(series[0], path)
    if len({(s.shape, s.dtype) for s in series}) != 1:
        raise UserError(f"{path}: its {len(series)} image series differ in shape or type; export one stack")
    return check_finite(np.stack(series), path)


def read_nifti(path: Path) -> tuple[np.ndarray, tuple[float, float, float], sitk.Image]:
    """A NIfTI volume as ((z, y, x) array, (z, y, x) spacing, the SimpleITK image for its orientation)."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise UserError(f"{path}: cannot read this NIfTI file ({str(error).strip().splitlines()[-1]})") from None
    return check_finite(sitk.GetArrayFromImage(image), path), tuple(reversed(image.GetSpacing())), image


def read_hdf5(path: Path, key: str) -> np.ndarray:
    """Dataset ``key`` of an HDF5 file."""
    try:
        with h5py.File(path, "r") as f:
            if key not in f:
                raise UserError(f"{path}: no dataset {key!r} (found: {', '.join(f.keys())}); export the "
                                f"volume under {key!r} or as a TIFF stack")
            return check_finite(np.asarray(f[key][()]), path)
    except OSError as error:
        raise UserError(f"{path}: cannot read this HDF5 file ({error})") from None


def read_volume(path: Path, key: str | None = None) -> np.ndarray:
    """Any supported volume by its form: a folder of 2D slices, TIFF stack, NIfTI or HDF5 (``key`` needed)."""
    path = Path(path)
    name = path.name.lower()
    if not path.exists():
        raise UserError(f"{path} does not exist: check the path")
    if path.is_dir():
        return read_slice_folder(path)
    if name.endswith((".tif", ".tiff")):
        return read_tiff(path)
    if name.endswith(NIFTI_SUFFIXES):
        return read_nifti(path)[0]
    if name.endswith(HDF5_SUFFIXES):
        if key is None:
            raise UserError(f"{path}: an HDF5 file needs the dataset key, which this command does not take: "
                            f"export the volume as a TIFF stack or NIfTI")
        return read_hdf5(path, key)
    raise UserError(f"{path}: unsupported format; use TIFF, a folder of 2D slices, NIfTI or HDF5")


def _read_with_sitk(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
