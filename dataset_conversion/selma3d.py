"""SELMA3D (MICCAI 2024 light-sheet mouse-brain challenge) -> one nnU-Net raw dataset, from either input or both:

* **Annotated patches**: NIfTI image/label pairs of ONE structure (vessel, c-Fos cell, nucleus, Abeta plaque or
  microglia). Accepted layouts of the ``patches`` folder:

  - flat: ``<stem>.nii.gz`` beside ``<stem>_label.nii.gz``;
  - split: ``raw/`` + ``gt/`` (or ``images/`` + ``labels/``); the label of
    ``raw/<stem>.nii.gz`` is ``gt/<stem>.nii.gz`` or ``gt/<stem>_label.nii.gz``;
  - challenge root: ``<structure>/raw`` + ``<structure>/gt`` for several structures side by side; the
    sub-folder whose name matches ``structure`` (e.g. ``vessel``, ``Vessels``, ``c-Fos``, ``Abeta_plaques``) is used.

  Images and labels are reoriented to LPS (identity direction, as nnU-Net's SimpleITK reader assumes), so any
  axis-aligned orientation gives the same voxel order; spacing (z, y, x) is read after reorientation, and image
  and label must share size, spacing, origin and direction. Files are written with spacing only (origin 0,
  identity direction), images in their own dtype. Labels must be binary: within {0, 1} or {0, 255} (255 -> 1).

* **Unannotated whole brains**: folders of 2D 8/16-bit integer slices (float or 32-bit slices are refused), cut
  into sub-volumes of ``size`` (z, y, x) on a regular grid from voxel (0, 0, 0), without overlap, incomplete edge
  tiles dropped. A sub-volume is kept when more than ``min_foreground`` percent of its voxels are > ``threshold``
  and written in the slices' dtype with a label file of ignore only.

Whole brains stream one slab of ``size[0]`` slices at a time (one Dask task per slice: read it, count its voxels
above the threshold per tile); kept tiles are written while the next slab is read, so memory is bounded by one
slab plus half a slab of tiles, whatever the volume size. With a scheduler address the reads and counts run on
that Dask cluster (its workers must see the slice files at the same paths and have nnunet_ext installed);
writing always happens here, where the dataset folder is.

Labels: background 0, the structure 1, ignore 2. dataset.json records ``spacing`` (z, y, x; the per-axis median
when cases differ), ``annotation_axis`` 0 (the slices' axis) and, under ``selma3d``, the source of every case.
Case names: ``patch_<stem>`` and ``brainKK_zZZZ_yYYY_xXXX`` (grid index; origin voxel = index * size). nnU-Net's
supervised loss needs at least one annotated patch.
"""

import argparse
import itertools
import json
import math
import os
import queue
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import dask
import numpy as np
import SimpleITK as sitk
import tifffile

from nnunet_ext.datasets.raw_dataset import (
    FILE_ENDINGS,
    add_output_arguments,
    atomic_dataset_folder,
    check_dataset_id_and_name,
    check_file_format,
    check_free,
    copy_label,
    dataset_folder_name,
    dataset_json,
    is_int,
    is_real,
    verify_raw_dataset,
    write_image,
)
from nnunet_ext.datasets.readers import NIFTI_SUFFIXES, list_volume_slices, read_nifti, read_slice
from nnunet_ext.errors import UserError
from nnunet_ext.nnunet_paths import raw_output_folder

STRUCTURES = {
    "vessel": ("vessel", "vessels", "bloodvessel", "bloodvessels", "vasculature"),
    "cfos": ("cfos", "cfoscell", "cfoscells"),
    "nucleus": ("nucleus", "nuclei", "cellnucleus", "cellnuclei"),
    "plaque": ("plaque", "plaques", "abeta", "abetaplaque", "abetaplaques", "amyloidplaque", "amyloidplaques"),
    "microglia": ("microglia", "microglias"),
}
BACKGROUND, FOREGROUND, IGNORE = 0, 1, 2
ORIENTATION = "LPS"
ANNOTATION_AXIS = 0
CHANNEL_NAME = "light-sheet"
DEFAULT_SIZE = (64, 256, 256)
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)
IMAGE_DIRS = ("raw", "images")
LABEL_DIRS = ("gt", "labels")
LABEL_SUFFIX = "_label"
BRAIN_PREFIX = "brain"
PATCH_PREFIX = "patch_"
_CONNECT_TIMEOUT = "10s"
# Pixel types of non-TIFF (PNG) slices that can pass the 8/16-bit integer check; any other is refused.
_SITK_DTYPES = {sitk.sitkUInt8: np.uint8, sitk.sitkInt8: np.int8, sitk.sitkUInt16: np.uint16,
                sitk.sitkInt16: np.int16, sitk.sitkVectorUInt8: np.uint8, sitk.sitkVectorUInt16: np.uint16}


# --------------------------------------------------------------------------------------------- structures


def _normalised(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower().replace("β", "beta"))


def resolve_structure(name: str) -> str:
    """The canonical structure name (a key of ``STRUCTURES``, the label name of value 1) for ``name`` or an alias."""
    key = _normalised(str(name))
    for canonical, aliases in STRUCTURES.items():
        if key in aliases:
            return canonical
    raise UserError(f"unknown structure {name!r}: choose one of {', '.join(STRUCTURES)} (one structure per dataset)")


# --------------------------------------------------------------------------------------------- patch pairs


@dataclass(frozen=True)
class PatchPair:
    """One annotated patch: nnU-Net case identifier, image file, label file."""

    case: str
    image: Path
    label: Path


def _nifti_stem(path: Path) -> str:
    return path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.name[: -len(".nii")]


def _nifti_by_stem(folder: Path) -> dict[str, Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))
    by_stem: dict[str, Path] = {}
    for path in files:
        stem = _nifti_stem(path)
        if stem in by_stem:
            raise UserError(f"{path} and {by_stem[stem]} have the same name: keep one of them")
        by_stem[stem] = path
    return by_stem


def _split_dirs(folder: Path) -> tuple[Path, Path] | None:
    """(image folder, label folder) of a split layout, None if ``folder`` has neither."""
    images = next((folder / d for d in IMAGE_DIRS if (folder / d).is_dir()), None)
    labels = next((folder / d for d in LABEL_DIRS if (folder / d).is_dir()), None)
    if images is None and labels is None:
        return None
    if images is None or labels is None:
        have, missing = (images, LABEL_DIRS) if labels is None else (labels, IMAGE_DIRS)
        raise UserError(f"{have} has no sibling folder {' or '.join(f'{m}/' for m in missing)}: "
                        f"put images in raw/ and labels in gt/ side by side")
    return images, labels


def _case_name(stem: str) -> str:
    return PATCH_PREFIX + re.sub(r"[^A-Za-z0-9_-]", "_", stem)


def _pair(images: dict[str, Path], labels: dict[str, Path], label_dir: Path) -> list[PatchPair]:
    """Pair every image with the label of the same stem (or stem + ``_label``); UserError for anything unpaired."""
    pairs, used = [], set()
    for stem, image in sorted(images.items()):
        matches = [s for s in (stem, stem + LABEL_SUFFIX) if s in labels]
        if not matches:
            raise UserError(f"{image}: no label {stem}{LABEL_SUFFIX}.nii.gz in {label_dir}; "
                            f"every patch needs its label")
        if len(matches) > 1:
            raise UserError(f"{image}: both {labels[matches[0]].name} and {labels[matches[1]].name} could be its "
                            f"label; keep one")
        used.add(matches[0])
        pairs.append(PatchPair(_case_name(stem), image, labels[matches[0]]))
    unused = sorted(set(labels) - used)
    if unused:
        raise UserError(f"{labels[unused[0]]}: label without an image of the same name; add the image or remove it")
    cases = [p.case for p in pairs]
    clash = next((p for p in pairs if cases.count(p.case) > 1), None)
    if clash is not None:
        raise UserError(f"{clash.image}: its name clashes with another patch once made a case name ({clash.case}); "
                        f"rename one")
    return pairs


def _structure_dir(folder: Path, structure: str) -> Path:
    """The ``<structure>/`` sub-folder of a challenge root that holds ``structure``'s raw/ and gt/."""
    candidates = sorted(p for p in folder.iterdir() if p.is_dir() and _split_dirs(p) is not None)
    if not candidates:
        raise UserError(f"{folder} holds no NIfTI patches: expected <stem>.nii.gz + <stem>_label.nii.gz, "
                        f"raw/ + gt/, or <structure>/raw + <structure>/gt")
    matching = [p for p in candidates if _normalised(p.name) in STRUCTURES[structure]]
    if len(matching) != 1:
        found = ", ".join(p.name for p in candidates)
        raise UserError(f"{folder}: {'no' if not matching else 'more than one'} sub-folder for structure "
                        f"{structure!r} among {found}; pass --patches {folder}/<folder> directly")
    return matching[0]


def find_patch_pairs(folder, structure: str) -> list[PatchPair]:
    """The (image, label) NIfTI pairs in ``folder`` (layouts in the module docstring), sorted by image name.

    Args:
        folder: a flat, split (raw/ + gt/) or challenge-root folder.
        structure: canonical structure name; picks the sub-folder of a challenge root.
    Raises:
        UserError: no patches, an image without label, a label without image, ambiguous pairs.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of NIfTI patches: check the --patches path")
    split = _split_dirs(folder)
    if split is not None:
        pairs = _pair(_nifti_by_stem(split[0]), _nifti_by_stem(split[1]), split[1])
        if not pairs:
            raise UserError(f"{split[0]} holds no NIfTI images (.nii.gz): check the --patches path")
        return pairs
    flat = _nifti_by_stem(folder)
    if flat:
        labels = {s: p for s, p in flat.items() if s.endswith(LABEL_SUFFIX)}
        images = {s: p for s, p in flat.items() if s not in labels}
        return _pair(images, labels, folder)
    return find_patch_pairs(_structure_dir(folder, structure), structure)


# --------------------------------------------------------------------------------------------- patch contents


def _oriented(path: Path) -> sitk.Image:
    """A 3D single-channel NIfTI image reoriented to LPS (identity direction)."""
    image = read_nifti(path)[2]
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise UserError(f"{path}: expected a 3D single-channel volume, got {image.GetDimension()}D with "
                        f"{image.GetNumberOfComponentsPerPixel()} component(s); export one channel per file")
    oriented = sitk.DICOMOrient(image, ORIENTATION)
    if not np.allclose(oriented.GetDirection(), np.eye(3).ravel(), atol=1e-4):
        raise UserError(f"{path}: oblique direction cosines {image.GetDirection()}; resample it onto an "
                        f"axis-aligned grid first")
    return oriented


def _geometry(image: sitk.Image) -> dict:
    return {"size": image.GetSize(), "spacing": image.GetSpacing(), "origin": image.GetOrigin(),
            "direction": image.GetDirection()}


def _check_same_grid(image: sitk.Image, label: sitk.Image, pair: PatchPair) -> None:
    """UserError naming the label when its reoriented grid differs from the image's."""
    a, b = _geometry(image), _geometry(label)
    for key in a:
        if not np.allclose(a[key], b[key], rtol=1e-5, atol=1e-4):
            raise UserError(f"{pair.label}: {key} {tuple(b[key])} differs from {tuple(a[key])} of {pair.image.name} "
                            f"(after reorientation to {ORIENTATION}); export image and label on the same grid")


def binarise_label(label: np.ndarray, path: Path) -> np.ndarray:
    """A binary mask as uint8 {0, 1}: values within {0, 1} kept, within {0, 255} mapped 255 -> 1.

    Args:
        label: (z, y, x) array of any numeric dtype.
        path: its file, named in the error.
    Raises:
        UserError: any other value (multi-class or soft labels).
    """
    values = np.unique(label)
    if np.isin(values, (0, 1)).all():
        return label.astype(np.uint8)
    if np.isin(values, (0, 255)).all():
        return (label == 255).astype(np.uint8)
    shown = ", ".join(str(v) for v in values[:6]) + (", ..." if values.size > 6 else "")
    raise UserError(f"{path}: label values {shown} are not a binary mask; export the structure as 0/1 (or 0/255)")


def load_patch(pair: PatchPair) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """A patch in LPS voxel order: (image (z, y, x), stored dtype; label (z, y, x) uint8 {0, 1}; spacing (z, y, x)).

    Raises:
        UserError: unreadable file, not 3D, oblique, image/label grids differ, non-binary label.
    """
    image, label = _oriented(pair.image), _oriented(pair.label)
    _check_same_grid(image, label, pair)
    mask = binarise_label(sitk.GetArrayViewFromImage(label), pair.label)
    return sitk.GetArrayFromImage(image), mask, tuple(reversed(image.GetSpacing()))


# --------------------------------------------------------------------------------------------- slice folders


@dataclass(frozen=True)
class SliceVolume:
    """A folder of 2D slices seen as one (z, y, x) volume; only headers have been read."""

    folder: Path
    paths: tuple[Path, ...]
    shape: tuple[int, int, int]
    dtype: np.dtype


def _slice_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of a slice file from its header, without reading the pixels."""
    try:
        if path.name.lower().endswith((".tif", ".tiff")):
            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                shape = (len(tif.pages), *page.shape) if len(tif.pages) > 1 else page.shape
                return tuple(shape), np.dtype(page.dtype)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        components = reader.GetNumberOfComponents()
        size = tuple(reversed(reader.GetSize())) + ((components,) if components > 1 else ())
        if reader.GetPixelID() not in _SITK_DTYPES:
            pixel_type = sitk.GetPixelIDValueAsString(reader.GetPixelID())
            raise UserError(f"{path}: {pixel_type} slices are not accepted; export the whole brain as 16-bit "
                            f"(or 8-bit) integer slices")
        return size, np.dtype(_SITK_DTYPES[reader.GetPixelID()])
    except (OSError, ValueError, RuntimeError, TypeError, tifffile.TiffFileError) as error:
        raise UserError(f"{path}: cannot read this slice ({error}); is it a valid image file?") from None


def scan_slice_folder(folder) -> SliceVolume:
    """Validate a whole-brain slice folder from the slice headers (no pixel data is read).

    Returns:
        SliceVolume with shape (number of slices, y, x) and the slices' dtype.
    Raises:
        UserError: not a folder, no slices, a gap in the slice numbers, a slice that is not 2D or whose
            shape/dtype differs from the first (naming that file), a dtype other than an 8/16-bit integer.
    """
    paths = [p.resolve() for p in list_volume_slices(Path(folder))]
    shape, dtype = _slice_header(paths[0])
    if len(shape) != 2:
        raise UserError(f"{paths[0]}: expected a 2D slice, got shape {shape}; export single-channel 2D slices")
    if dtype.kind not in "iu" or dtype.itemsize > 2:
        raise UserError(f"{paths[0]}: {dtype} slices are not accepted; export the whole brain as 16-bit (or 8-bit) "
                        f"integer slices")
    for path in paths[1:]:
        other = _slice_header(path)
        if other != (shape, dtype):
            raise UserError(f"{path}: shape {other[0]} {other[1]} differs from {paths[0].name} ({shape} {dtype}); "
                            f"all slices must match")
    return SliceVolume(Path(folder), tuple(paths), (len(paths), *shape), dtype)


def _read_checked(path: Path, shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    """One slice (y, x); a slice whose pixels disagree with its header fails here instead of in the stack."""
    array = read_slice(path)
    if array.shape != shape or array.dtype != dtype:
        raise UserError(f"{path}: pixel data {array.shape} {array.dtype} differs from the other slices "
                        f"({shape} {dtype}); re-export this slice")
    return array


class _FreeList:
    """Arrays of one shape and dtype for reuse; ``take`` allocates a new one only when none has been given back."""

    def __init__(self, shape: Sequence[int], dtype: np.dtype):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self._free = queue.SimpleQueue()  # thread-safe: writer threads give tiles back

    def take(self) -> np.ndarray:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            return np.empty(self.shape, self.dtype)

    def give(self, array: np.ndarray) -> None:
        self._free.put(array)


# --------------------------------------------------------------------------------------------- tiling


@dataclass(frozen=True)
class TileGrid:
    """Sub-volumes of ``size`` (z, y, x) on a regular grid from voxel (0, 0, 0); incomplete edge tiles dropped."""

    shape: tuple[int, int, int]
    size: tuple[int, int, int]

    @property
    def counts(self) -> tuple[int, int, int]:
        """Number of whole tiles along (z, y, x)."""
        return tuple(n // s for n, s in zip(self.shape, self.size))

    def region(self, index: tuple[int, int, int]) -> tuple[slice, slice, slice]:
        """Voxel slices of tile ``index`` = (iz, iy, ix) in the volume."""
        return tuple(slice(i * s, (i + 1) * s) for i, s in zip(index, self.size))


def tile_grid(shape: Sequence[int], size: Sequence[int], where: Path) -> TileGrid:
    """TileGrid of a (z, y, x) volume; UserError naming ``where`` if not even one tile fits."""
    grid = TileGrid(tuple(int(n) for n in shape), tuple(int(s) for s in size))
    if min(grid.counts) < 1:
        raise UserError(f"{where}: sub-volume size {grid.size} is larger than the volume {grid.shape} (z, y, x); "
                        f"choose a smaller --size")
    return grid


@dataclass(frozen=True)
class SubVolume:
    """One kept tile: ``index`` (iz, iy, ix) on the grid (origin voxel = index * size), ``array`` (z, y, x)."""

    index: tuple[int, int, int]
    array: np.ndarray


def _count_above(plane: np.ndarray, tile_y: int, tile_x: int, threshold: float) -> np.ndarray:
    """(ny, nx) int64: voxels > threshold per tile of one (ny * tile_y, nx * tile_x) integer slice.

    For integers v > t <=> v > floor(t): comparing in the slice's dtype avoids a float64 cast of every voxel, and
    thresholds outside the dtype's range count all / no voxels instead of wrapping around.
    """
    ny, nx = plane.shape[0] // tile_y, plane.shape[1] // tile_x
    info, t = np.iinfo(plane.dtype), math.floor(threshold)
    if t < info.min or t >= info.max:
        return np.full((ny, nx), tile_y * tile_x if t < info.min else 0, dtype=np.int64)
    counts = np.empty((ny, nx), dtype=np.int64)
    above = np.empty((tile_y, nx * tile_x), dtype=bool)  # one row of tiles at a time: stays in cache
    for iy in range(ny):
        np.greater(plane[iy * tile_y:(iy + 1) * tile_y, :nx * tile_x], plane.dtype.type(t), out=above)
        # A loop of count_nonzero over tiles is faster than summing a (ty, nx, tx) boolean view.
        for ix in range(nx):
            counts[iy, ix] = np.count_nonzero(above[:, ix * tile_x:(ix + 1) * tile_x])
    return counts


def _read_cropped(path: Path, shape: tuple[int, int], dtype: np.dtype, rows: int, cols: int, tile_y: int,
                  tile_x: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """One slice cropped to its whole tiles, and its per-tile counts (on a Dask cluster, which cannot fill our slab)."""
    plane = _read_checked(path, shape, dtype)[:rows, :cols]
    return plane, _count_above(plane, tile_y, tile_x, threshold)


def _read_into(path: Path, shape: tuple[int, int], dtype: np.dtype, out: np.ndarray, tile_y: int, tile_x: int,
               threshold: float) -> np.ndarray:
    """Read one slice into ``out`` (its plane of the slab buffer, whole tiles only); return its per-tile counts."""
    out[...], counts = _read_cropped(path, shape, dtype, *out.shape, tile_y, tile_x, threshold)
    return counts


def _read_slab(volume: SliceVolume, grid: TileGrid, iz: int, slab: np.ndarray, threshold: float,
               compute_kwargs: dict) -> np.ndarray:
    """Fill ``slab`` with slab ``iz`` (one dask task per slice); return the (ny, nx) voxel counts above threshold."""
    (tz, ty, tx), (_, rows, cols) = grid.size, slab.shape
    paths, shape = volume.paths[iz * tz:(iz + 1) * tz], volume.shape[1:]
    if isinstance(compute_kwargs["scheduler"], str):  # "threads" or "sync": the tasks share this process's memory
        tasks = [dask.delayed(_read_into, pure=False)(path, shape, volume.dtype, slab[z], ty, tx, threshold)
                 for z, path in enumerate(paths)]
        return np.sum(dask.compute(tasks, **compute_kwargs)[0], axis=0)
    tasks = [dask.delayed(_read_cropped, pure=True)(path, shape, volume.dtype, rows, cols, ty, tx, threshold)
             for path in paths]
    results = dask.compute(tasks, **compute_kwargs)[0]
    for z, (plane, _) in enumerate(results):
        slab[z] = plane
    return np.sum([counts for _, counts in results], axis=0)


def _iter_subvolumes(volume: SliceVolume, grid: TileGrid, threshold: float, min_foreground: float,
                     compute_kwargs: dict, tiles: _FreeList | None = None) -> Iterator[SubVolume]:
    """The kept tiles, slab by slab; each tile's array is taken from ``tiles`` (give it back once written)."""
    (tz, ty, tx), (_, ny, nx) = grid.size, grid.counts
    # The slab and the tiles are buffers refilled, not reallocated: a fresh array faults every page in again.
    slab = np.empty((tz, ny * ty, nx * tx), dtype=volume.dtype)  # refilled for every slab
    tiles = _FreeList(grid.size, volume.dtype) if tiles is None else tiles
    for iz in range(grid.counts[0]):
        counts = _read_slab(volume, grid, iz, slab, threshold, compute_kwargs)
        for iy, ix in np.argwhere(counts * 100.0 > min_foreground * (tz * ty * tx)):
            _, ys, xs = grid.region((iz, iy, ix))
            tile = tiles.take()
            np.copyto(tile, slab[:, ys, xs])
            yield SubVolume((iz, int(iy), int(ix)), tile)


@contextmanager
def dask_scheduler(address: str | None, num_workers: int) -> Iterator[dict]:
    """Keyword arguments for ``dask.compute``: a ``distributed.Client(address)``, else a local scheduler.

    Without an address: the synchronous scheduler for ``num_workers == 1``, else the threaded one with
    ``num_workers`` threads. Raises UserError if the scheduler cannot be reached.
    """
    if address is None:
        yield {"scheduler": "sync"} if num_workers == 1 else {"scheduler": "threads", "num_workers": num_workers}
        return
    from distributed import Client

    try:
        client = Client(address, timeout=_CONNECT_TIMEOUT, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as error:
        raise UserError(f"cannot reach the Dask scheduler at {address} ({error}); start it (`dask scheduler`) "
                        f"or drop --scheduler") from None
    with client:
        yield {"scheduler": client}


def iter_subvolumes(volume: SliceVolume, size: Sequence[int] = DEFAULT_SIZE, threshold: float = 0.0,
                    min_foreground: float = 0.0, scheduler: str | None = None,
                    num_workers: int = DEFAULT_WORKERS) -> Iterator[SubVolume]:
    """Stream the kept sub-volumes of a slice folder, slab by slab, in grid order (z, then y, then x).

    Args:
        volume: from ``scan_slice_folder``.
        size: sub-volume (z, y, x) in voxels; the slab depth is ``size[0]``.
        threshold, min_foreground: keep a tile when more than ``min_foreground`` percent of its voxels are
            > ``threshold`` (compared in the slices' own integer values).
        scheduler: Dask scheduler address (``tcp://host:port``); None = local threads.
        num_workers: local threads (1 = synchronous scheduler).
    Yields:
        SubVolume with a new (size) array in ``volume.dtype``. One slab of slices is held at a time.
    """
    grid = tile_grid(volume.shape, size, volume.folder)
    with dask_scheduler(scheduler, num_workers) as compute_kwargs:
        yield from _iter_subvolumes(volume, grid, threshold, min_foreground, compute_kwargs)


# --------------------------------------------------------------------------------------------- writing


def _run_bounded(jobs: Iterable[Callable[[], None]], num_workers: int, max_pending: int) -> None:
    """Run write jobs on ``num_workers`` threads with at most ``max_pending`` queued (bounds the tiles in memory)."""
    if num_workers == 1:
        for job in jobs:
            job()
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(num_workers) as pool:
        pending = deque()
        for job in jobs:
            pending.append(pool.submit(job))
            if len(pending) >= max_pending:
                pending.popleft().result()
        for future in pending:
            future.result()


def _max_pending(brains: Sequence["_Brain"], num_workers: int) -> int:
    """Queued write jobs: half a slab of tiles of the smallest brain, so that the next slab is read while
    the queue is written and memory stays near 1.5 slabs (at least 2 jobs per thread)."""
    tiles_per_slab = [b.grid.counts[1] * b.grid.counts[2] for b in brains]
    return max(2 * num_workers, min(tiles_per_slab, default=0) // 2)


def _write_case(folder: Path, case: str, image: np.ndarray, label: np.ndarray, spacing, file_format: str) -> None:
    write_image(image, folder / "imagesTr" / case, spacing, file_format, channel=0)
    write_image(label, folder / "labelsTr" / case, spacing, file_format)


def _write_brain_case(folder: Path, case: str, image: np.ndarray, label_template: Path | None, spacing,
                      file_format: str, reuse: Callable[[np.ndarray], None]) -> None:
    """Write a tile, hand its buffer back for reuse, copy the label template (None: this case is the template)."""
    write_image(image, folder / "imagesTr" / case, spacing, file_format, channel=0)
    reuse(image)
    if label_template is not None:
        copy_label(label_template, folder / "labelsTr" / case, FILE_ENDINGS[file_format])


def _write_patch(folder: Path, pair: PatchPair, file_format: str) -> None:
    image, label, spacing = load_patch(pair)
    _write_case(folder, pair.case, image, label, spacing, file_format)


@dataclass
class _Brain:
    """One whole-brain input and what was kept of it."""

    prefix: str
    volume: SliceVolume
    grid: TileGrid
    kept: int = 0

    def case(self, index: tuple[int, int, int]) -> str:
        width = max(3, *(len(str(n - 1)) for n in self.grid.counts))
        return f"{self.prefix}_" + "_".join(f"{a}{i:0{width}d}" for a, i in zip("zyx", index))


def _brain_jobs(brain: _Brain, folder: Path, spacing, threshold: float, min_foreground: float, file_format: str,
                compute_kwargs: dict) -> Iterator[Callable]:
    tiles = _FreeList(brain.grid.size, brain.volume.dtype)  # at most max_pending + 1 tiles are ever allocated
    template = None  # every tile's label is the same file (all ignore): written once, then copied
    for sub in _iter_subvolumes(brain.volume, brain.grid, threshold, min_foreground, compute_kwargs, tiles):
        brain.kept += 1
        case = brain.case(sub.index)
        label = template
        if template is None:
            template = folder / "labelsTr" / case
            write_image(np.full(brain.grid.size, IGNORE, dtype=np.uint8), template, spacing, file_format)
        yield partial(_write_brain_case, folder, case, sub.array, label, spacing, file_format, tiles.give)


# --------------------------------------------------------------------------------------------- validation


def _is_real(value) -> bool:
    return is_real(value) and math.isfinite(value)


def _check_triple(values, what: str, integer: bool, example: str) -> tuple:
    ok = isinstance(values, Sequence | np.ndarray) and not isinstance(values, str) and len(values) == 3
    ok = ok and all(is_int(v) if integer else _is_real(v)
                    for v in values) and all(v > 0 for v in values)
    if not ok:
        raise UserError(f"invalid {what} {values!r}: give 3 positive numbers (z, y, x), e.g. {example}")
    return tuple(int(v) if integer else float(v) for v in values)


def _check_args(dataset_id, name, threshold, min_foreground, num_workers, file_format) -> None:
    check_dataset_id_and_name(dataset_id, name)
    if not _is_real(threshold):
        raise UserError(f"invalid --threshold {threshold!r}: give a finite intensity")
    if not _is_real(min_foreground) or not 0 <= min_foreground < 100:
        raise UserError(f"invalid --min-foreground {min_foreground!r}: give a percentage in [0, 100)")
    if not is_int(num_workers) or num_workers < 1:
        raise UserError(f"invalid --workers {num_workers!r}: give 1 or more")
    check_file_format(file_format)


def _validate_patches(pairs: list[PatchPair]) -> list[tuple[float, float, float]]:
    """Read every pair once so that any bad patch fails before anything is written; returns their spacings."""
    return [load_patch(pair)[2] for pair in pairs]


def _scan_brains(folders: Sequence, size: tuple[int, int, int]) -> list[_Brain]:
    folders = [Path(f) for f in folders]
    resolved = [f.resolve() for f in folders]
    duplicate = next((f for i, f in enumerate(folders) if resolved[i] in resolved[:i]), None)
    if duplicate is not None:
        raise UserError(f"{duplicate} is given twice as --whole-brain: give each brain once")
    brains = []
    for k, folder in enumerate(folders):
        volume = scan_slice_folder(folder)
        brains.append(_Brain(f"{BRAIN_PREFIX}{k:02d}", volume, tile_grid(volume.shape, size, folder)))
    return brains


# --------------------------------------------------------------------------------------------- dataset


def _dataset_document(name: str, structure: str, pairs, patch_spacings, brains, spacing, threshold: float,
                      min_foreground: float, file_format: str) -> dict:
    spacings = list(patch_spacings) + [spacing] * sum(b.kept for b in brains)
    whole_brain = {b.prefix: {"folder": str(b.volume.folder.resolve()), "shape": list(b.volume.shape),
                              "dtype": str(b.volume.dtype), "spacing": list(spacing), "grid": list(b.grid.counts),
                              "subvolume_size": list(b.grid.size), "threshold": float(threshold),
                              "min_foreground_percent": float(min_foreground), "kept": b.kept}
                   for b in brains}
    description = (f"SELMA3D light-sheet mouse brain, structure {structure!r}: {len(pairs)} annotated patches "
                   f"(reoriented to {ORIENTATION}), {sum(b.kept for b in brains)} unannotated whole-brain "
                   f"sub-volumes (label = ignore {IGNORE})")
    return dataset_json(name, {0: CHANNEL_NAME}, {"background": BACKGROUND, structure: FOREGROUND, "ignore": IGNORE},
                        len(spacings), file_format, description=description,
                        spacing=[float(s) for s in np.median(np.asarray(spacings), axis=0)],
                        annotation_axis=ANNOTATION_AXIS,
                        selma3d={"structure": structure, "orientation": ORIENTATION,
                                 "patches": {p.case: str(p.image.resolve()) for p in pairs},
                                 "whole_brain": whole_brain})


def convert(out_dir, dataset_id: int, structure: str, patches=None, whole_brain: Sequence = (),
            spacing: Sequence[float] | None = None, size: Sequence[int] = DEFAULT_SIZE, threshold: float = 0.0,
            min_foreground: float = 0.0, scheduler: str | None = None, num_workers: int = DEFAULT_WORKERS,
            name: str | None = None, file_format: str = "nifti", verify: bool = True) -> Path:
    """Convert SELMA3D patches and/or whole brains into ``out_dir/DatasetXXX_<name>`` and return its path.

    Args:
        out_dir: nnU-Net raw folder.
        dataset_id: 1..999, not yet used in ``out_dir``.
        structure: vessel, cfos, nucleus, plaque or microglia (or an alias such as ``nuclei``, ``c-Fos``).
        patches: folder of annotated NIfTI pairs (layouts in the module docstring), or None.
        whole_brain: folders of 2D 8/16-bit integer slices, one whole brain each.
        spacing: (z, y, x) voxel size of the whole brains (required with ``whole_brain``; patches use their header).
        size: sub-volume (z, y, x) in voxels.
        threshold, min_foreground: keep a sub-volume when more than ``min_foreground`` percent of its voxels
            are > ``threshold``.
        scheduler: Dask scheduler address for the whole-brain reads and counts; None = ``num_workers`` local threads.
        num_workers: local threads for reading, writing and nnU-Net's integrity check.
        name: dataset name (default ``SELMA3D_<structure>``).
        file_format: ``nifti`` (.nii.gz) or ``tif`` (Tiff3DIO .tif + spacing .json; zstd: much faster to write).
        verify: run nnU-Net's integrity check on the written dataset. It reads every file back, which for whole
            brains takes longer than the conversion itself (README, benchmarks/convert_streaming.py);
            ``nnUNetv2_plan_and_preprocess --verify_dataset_integrity`` runs the same check.
    Returns:
        The dataset folder: imagesTr/<case>_0000 (patches: stored dtype; brains: slice dtype), labelsTr/<case>
        (uint8: 0/1 for patches, all 2 for brain sub-volumes), dataset.json.
    Raises:
        UserError: bad arguments or input (checked before anything is written), an unreachable scheduler, or
            no case at all; nothing is left behind.
    """
    structure = resolve_structure(structure)
    name = f"SELMA3D_{structure}" if name is None else name
    _check_args(dataset_id, name, threshold, min_foreground, num_workers, file_format)
    size = _check_triple(size, "sub-volume size", True, "--size 64 256 256")
    check_free(Path(out_dir), dataset_id, name)
    whole_brain = [whole_brain] if isinstance(whole_brain, (str, Path)) else list(whole_brain)
    spacing = _check_inputs(patches, whole_brain, spacing)
    pairs = find_patch_pairs(patches, structure) if patches is not None else []
    patch_spacings = _validate_patches(pairs)
    brains = _scan_brains(whole_brain, size)
    with dask_scheduler(scheduler, num_workers) as compute_kwargs, \
            atomic_dataset_folder(out_dir, dataset_id, name) as folder:
        for sub in ("imagesTr", "labelsTr"):
            (folder / sub).mkdir()
        patch_jobs = (partial(_write_patch, folder, pair, file_format) for pair in pairs)
        brain_jobs = (job for brain in brains
                      for job in _brain_jobs(brain, folder, spacing, threshold, min_foreground, file_format,
                                             compute_kwargs))
        _run_bounded(itertools.chain(patch_jobs, brain_jobs), num_workers, _max_pending(brains, num_workers))
        if not pairs and not any(b.kept for b in brains):
            raise UserError(f"no sub-volume passed the foreground filter (> {min_foreground} % of voxels above "
                            f"{threshold}) in {', '.join(str(b.volume.folder) for b in brains)}; lower "
                            f"--threshold or --min-foreground")
        document = _dataset_document(name, structure, pairs, patch_spacings, brains, spacing, threshold,
                                     min_foreground, file_format)
        (folder / "dataset.json").write_text(json.dumps(document, indent=2) + "\n")
        if verify:
            verify_raw_dataset(folder, num_processes=num_workers)
    return Path(out_dir) / dataset_folder_name(dataset_id, name)


def _check_inputs(patches, whole_brain: list, spacing) -> tuple[float, float, float] | None:
    """At least one input; the whole brains' spacing (validated) when there are whole brains."""
    if patches is None and not whole_brain:
        raise UserError("nothing to convert: give --patches DIR and/or --whole-brain DIR")
    if not whole_brain:
        return None
    if spacing is None:
        raise UserError("--spacing Z Y X is required with --whole-brain (slice files carry no voxel size)")
    return _check_triple(spacing, "spacing", False, "--spacing 6 6 6")


# --------------------------------------------------------------------------------------------- CLI


def _run(args: argparse.Namespace) -> None:
    out = raw_output_folder(args.out)
    folder = convert(out, args.dataset_id, args.structure, patches=args.patches, whole_brain=args.whole_brain,
                     spacing=args.spacing, size=args.size, threshold=args.threshold,
                     min_foreground=args.min_foreground, scheduler=args.scheduler, num_workers=args.workers,
                     name=args.name, file_format=args.format, verify=not args.no_verify)
    record = json.loads((folder / "dataset.json").read_text())
    kept = "".join(f", {k}: kept {v['kept']} of {math.prod(v['grid'])} sub-volumes"
                   for k, v in record["selma3d"]["whole_brain"].items())
    print(f"wrote {folder}: {len(record['selma3d']['patches'])} annotated patches{kept}")


def register_cli(subparsers) -> argparse.ArgumentParser:
    """Add the ``selma3d`` parser (a subcommand of ``nnunet-ext convert``) to ``subparsers``."""
    parser = subparsers.add_parser(
        "selma3d", help="SELMA3D light-sheet brains: annotated NIfTI patches and/or whole-brain slice folders",
        description="Annotated NIfTI patches (reoriented to LPS) and unannotated whole-brain slice folders "
                    "(streamed into sub-volumes labelled ignore) into one nnU-Net raw dataset.")
    add_output_arguments(parser, None, "SELMA3D_<structure>")
    parser.add_argument("--structure", required=True,
                        help=f"the annotated structure, label 1: {', '.join(STRUCTURES)}")
    parser.add_argument("--patches", type=Path, metavar="DIR",
                        help="annotated NIfTI pairs: <stem>.nii.gz + <stem>_label.nii.gz, raw/ + gt/, "
                             "or the challenge root with <structure>/raw + <structure>/gt")
    parser.add_argument("--whole-brain", type=Path, nargs="+", default=[], metavar="DIR",
                        help="folders of 2D 16-bit slices, one whole brain each")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("Z", "Y", "X"),
                        help="voxel size of the whole brains (required with --whole-brain)")
    parser.add_argument("--size", type=int, nargs=3, default=DEFAULT_SIZE, metavar=("Z", "Y", "X"),
                        help="sub-volume size in voxels (default 64 256 256; incomplete edge tiles are dropped)")
    parser.add_argument("--threshold", type=float, default=0.0,
                        help="foreground intensity: voxels above it count as foreground (default 0)")
    parser.add_argument("--min-foreground", type=float, default=0.0, metavar="PERCENT",
                        help="keep a sub-volume when more than PERCENT %% of its voxels are foreground (default 0)")
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help="Dask scheduler (tcp://host:port) for the whole-brain reads; default: local threads")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                        help=f"local threads for reading and writing (default {DEFAULT_WORKERS})")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip nnU-Net's integrity check after writing (it reads every file back; "
                             "nnUNetv2_plan_and_preprocess --verify_dataset_integrity runs it too)")
    parser.set_defaults(func=_run)
    return parser
