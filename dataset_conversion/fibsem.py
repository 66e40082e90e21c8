"""FIB-SEM nuclei / nucleoli (Pagano et al. 2023, OHSU): a slice folder + a few mask slices -> nnU-Net raw dataset.

Input: a folder of 2D slices (thousands of pixels squared, ~800-2500 slices) named with consecutive slice numbers
(``readers.slice_index``), and a folder of 2D masks for a few evenly spaced slices, each named by the number of the
slice it annotates. Mask values map to background 0 / nucleus 1 / nucleolus 2 (``mask_values``, e.g. 0/127/255).

Output: the volume cut in-plane into tiles of ``tile_size`` (y, x) output voxels, overlap 0, each tile a case of
full depth (``<name-lower>_rRR_cCC``). Edge tiles are kept smaller, unless ``drop_partial`` drops them. Labels keep
the mask classes on the annotated slices; every other voxel is ignore (3). Processing of each slice, in order:

1. crop to a multiple of ``downsample`` (the last y % f rows and x % f columns are dropped);
2. downsample in-plane by ``downsample``: images by area averaging (integer dtypes rounded back), masks by
   majority vote over each f x f block (ties go to the higher class, so thin nucleoli survive);
3. optional histogram equalization with ``skimage.exposure.equalize_hist``: ``"slice"`` per slice, ``"volume"``
   over the whole (downsampled) volume from a streamed global histogram (identical to ``equalize_hist`` on the
   whole volume; needs 8/16-bit integer slices); the [0, 1] result is scaled to ``equalize_dtype``. Without
   equalization images keep the slice dtype (float slices become float32).

Memory: slices are streamed. Tiles are filled from each slice as it is read; as every tile spans the full depth, the
tiles of one pass (image + uint8 label, full depth) are held until written, so the tiles are processed in groups of
at most ``max_memory_gb`` (at least one tile), one pass over the slice files per group. On top of that: one source
slice and one mask at a time, and a copy of the tile being written (SimpleITK copies the array). ``"volume"``
equalization adds one more pass (the histogram). Everything that can be checked (file names, slice headers, all
masks) is checked before anything is written.
"""

import json
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import tifffile
from skimage.exposure import equalize_hist

from nnunet_ext.datasets import raw_dataset, readers
from nnunet_ext.datasets.raw_dataset import add_output_arguments
from nnunet_ext.errors import UserError
from nnunet_ext.nnunet_paths import raw_output_folder

LABELS = {"background": 0, "nucleus": 1, "nucleolus": 2, "ignore": 3}
IGNORE_LABEL = LABELS["ignore"]
NUM_CLASSES = 3
EQUALIZE_MODES = ("volume", "slice")
EQUALIZE_DTYPES = {"uint8": np.uint8, "uint16": np.uint16}
MIN_CASES_FOR_CV = 5


@dataclass(frozen=True)
class SliceStack:
    """A checked slice folder: files ordered by slice number (consecutive from ``first_index``), shape (y, x)."""

    paths: tuple[Path, ...]
    first_index: int
    shape: tuple[int, int]
    dtype: np.dtype


@dataclass(frozen=True)
class Tile:
    """One case: rows/cols of the tile grid and its box (y0, x0, height, width) in output (downsampled) voxels."""

    row: int
    col: int
    y0: int
    x0: int
    height: int
    width: int

    @property
    def box(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y0 + self.height), slice(self.x0, self.x0 + self.width)


# ------------------------------------------------------------------------------------------------ checking input


def scan_slices(folder: Path) -> SliceStack:
    """The slice folder from file names and headers only (no pixel data): consecutive numbers, one 2D shape/dtype."""
    paths = readers.list_volume_slices(folder)
    shape, dtype = _slice_header(paths[0])
    for path in paths:
        this_shape, this_dtype = _slice_header(path)
        if len(this_shape) != 2:
            raise UserError(f"{path}: expected a 2D slice, got shape {this_shape}; export single-channel 2D slices")
        if (this_shape, this_dtype) != (shape, dtype):
            raise UserError(f"{path}: shape {this_shape} {this_dtype} differs from {paths[0].name} ({shape} {dtype}); "
                            f"all slices must match")
    return SliceStack(tuple(paths), readers.slice_index(paths[0]), shape, dtype)


def scan_masks(folder: Path, stack: SliceStack, mask_values: Sequence[int]) -> dict[int, Path]:
    """{z position in the volume: mask file}, after reading and checking every mask (shape, integer dtype, values)."""
    masks = {}
    for path in readers.list_slices(folder):
        index = readers.slice_index(path)
        position = index - stack.first_index
        if not 0 <= position < len(stack.paths):
            raise UserError(f"{path}: slice number {index} is outside the volume (slices {stack.first_index}.."
                            f"{stack.first_index + len(stack.paths) - 1}); name each mask by the slice it annotates")
        _check_mask(path, readers.read_slice(path), stack, mask_values)
        masks[position] = path
    return masks


def _check_mask(path: Path, mask: np.ndarray, stack: SliceStack, mask_values: Sequence[int]) -> None:
    if mask.shape != stack.shape:
        raise UserError(f"{path}: mask shape {mask.shape} differs from the slices' {stack.shape}; "
                        f"masks must be full-size slices")
    if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
        raise UserError(f"{path}: {mask.dtype} mask is not a label image; save masks as 8/16-bit integer images")
    unknown = raw_dataset.undeclared_values(mask, mask_values)
    if unknown:
        raise UserError(f"{path}: unknown mask value(s) {unknown[:5]}; expected {list(mask_values)} for background, "
                        f"nucleus, nucleolus: pass --mask-values")


def _slice_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of a slice file without decoding its pixels (what ``readers.read_slice`` would return)."""
    try:
        if path.name.lower().endswith((".tif", ".tiff")):
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                return tuple(series.shape), np.dtype(series.dtype)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        components = reader.GetNumberOfComponents()
        probe = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID(), components)
        shape = tuple(reversed(reader.GetSize())) + ((components,) if components > 1 else ())
        return shape, sitk.GetArrayViewFromImage(probe).dtype
    except (OSError, ValueError, RuntimeError, IndexError, tifffile.TiffFileError) as error:
        raise UserError(f"{path}: cannot read this slice ({error}); is it a valid image file?") from None


# ------------------------------------------------------------------------------------------------ per-slice steps


def tile_grid(shape: tuple[int, int], tile_size: tuple[int, int], drop_partial: bool = False) -> list[Tile]:
    """Tiles (row-major) covering a (y, x) plane with overlap 0; edge tiles smaller, or dropped if ``drop_partial``."""
    tiles = []
    for row, y0 in enumerate(range(0, shape[0], tile_size[0])):
        for col, x0 in enumerate(range(0, shape[1], tile_size[1])):
            height, width = min(tile_size[0], shape[0] - y0), min(tile_size[1], shape[1] - x0)
            if not drop_partial or (height, width) == tuple(tile_size):
                tiles.append(Tile(row, col, y0, x0, height, width))
    return tiles


def _block_sums(plane: np.ndarray, factor: int, dtype) -> np.ndarray:
    """Sums over ``factor`` x ``factor`` blocks (y//f, x//f) of a plane cropped to a multiple of ``factor``."""
    height, width = plane.shape[0] // factor, plane.shape[1] // factor
    cropped = plane[: height * factor, : width * factor]
    # Rows first (contiguous adds), then strided columns: several times faster than one 4D reduction.
    rows = cropped.reshape(height, factor, width * factor).sum(axis=1, dtype=dtype)
    return sum(rows[:, k::factor] for k in range(factor))


def downsample_image(plane: np.ndarray, factor: int) -> np.ndarray:
    """Area average over ``factor`` x ``factor`` blocks of a (y, x) slice; integers rounded back, floats -> float32."""
    if factor == 1:
        return plane
    mean = _block_sums(plane, factor, np.float64) / factor**2
    if np.issubdtype(plane.dtype, np.integer):
        return np.rint(mean).astype(plane.dtype)
    return mean.astype(np.float32)


def downsample_classes(classes: np.ndarray, factor: int) -> np.ndarray:
    """Majority class (0..2) of each ``factor`` x ``factor`` block of a uint8 class slice; ties -> higher class."""
    if factor == 1:
        return classes
    counts = np.stack([_block_sums(classes == c, factor, np.int32) for c in reversed(range(NUM_CLASSES))])
    return (NUM_CLASSES - 1 - counts.argmax(axis=0)).astype(np.uint8)


def mask_to_classes(mask: np.ndarray, mask_values: Sequence[int]) -> np.ndarray:
    """uint8 classes of a (checked) mask: value ``mask_values[c]`` -> class c."""
    classes = np.zeros(mask.shape, dtype=np.uint8)
    for cls, value in enumerate(mask_values):
        classes[mask == value] = cls
    return classes


def volume_equalization(stack: SliceStack, factor: int) -> np.ndarray:
    """Lookup table value -> equalized value in [0, 1] over the whole downsampled volume (one streamed pass).

    Equals ``skimage.exposure.equalize_hist`` on the whole volume: for integer images it gives each value its
    cumulative share of voxels. Index the table with ``value - np.iinfo(dtype).min``.
    """
    info = np.iinfo(stack.dtype)
    counts = np.zeros(int(info.max) - int(info.min) + 1, dtype=np.int64)
    for path in stack.paths:
        plane = downsample_image(_read_plane(path, stack), factor)
        counts += np.bincount((plane.astype(np.int64) - info.min).ravel(), minlength=counts.size)
    return np.cumsum(counts) / counts.sum()


@dataclass(frozen=True)
class _Intensity:
    """How one source slice becomes an output slice."""

    factor: int
    equalize: str | None
    dtype: np.dtype
    table: np.ndarray | None = None

    def __call__(self, plane: np.ndarray) -> np.ndarray:
        plane = downsample_image(plane, self.factor)
        if self.equalize is None:
            return plane
        if self.equalize == "slice":
            unit = equalize_hist(plane)
        else:
            unit = self.table[plane.astype(np.int64) - np.iinfo(plane.dtype).min]
        return np.rint(unit * np.iinfo(self.dtype).max).astype(self.dtype)


def _read_plane(path: Path, stack: SliceStack) -> np.ndarray:
    plane = readers.read_slice(path)
    if plane.shape != stack.shape or plane.dtype != stack.dtype:
        raise UserError(f"{path}: decoded as {plane.shape} {plane.dtype}, its header said {stack.shape} "
                        f"{stack.dtype}; re-export this slice")
    return plane


# ------------------------------------------------------------------------------------------------ conversion


def convert(slices_dir, masks_dir, out_dir, dataset_id: int, spacing: Sequence[float], name: str = "FIBSEM",
            tile_size: Sequence[int] = (256, 256), downsample: int = 1, equalize: str | None = None,
            equalize_dtype: str = "uint8", mask_values: Sequence[int] = (0, 1, 2), drop_partial: bool = False,
            file_format: str = "nifti", max_memory_gb: float = 4.0) -> Path:
    """Write ``out_dir/DatasetXXX_<name>/`` from a FIB-SEM slice folder and its mask slices; return its path.

    Args:
        slices_dir: folder of 2D slices (TIFF/PNG), consecutive slice numbers in the names.
        masks_dir: folder of 2D masks, each named by the number of the slice it annotates.
        out_dir: nnU-Net raw folder.
        dataset_id: nnU-Net dataset id (1..999).
        spacing: source voxel size (z, y, x); the output's in-plane spacing is multiplied by ``downsample``.
        name: dataset name.
        tile_size: (y, x) tile size in output (downsampled) voxels.
        downsample: integer in-plane downsampling factor (the paper: 4, 2048 -> 512).
        equalize: None, "slice" or "volume" (see the module docstring).
        equalize_dtype: "uint8" or "uint16", the dtype of equalized images.
        mask_values: mask values of background, nucleus, nucleolus.
        drop_partial: drop edge tiles smaller than ``tile_size`` instead of keeping them.
        file_format: "nifti" (.nii.gz) or "tif" (Tiff3DIO TIFF + spacing JSON).
        max_memory_gb: memory for the tiles of one pass over the slices.

    Output: ``imagesTr/<case>_0000`` (z, y, x) in the slice dtype (or ``equalize_dtype``), ``labelsTr/<case>``
    uint8 (0-2 on annotated slices, 3 elsewhere); dataset.json with ``spacing``, ``annotation_axis`` 0,
    ``annotated_slices`` per case and the tile origins in source pixels. Atomic; passes nnU-Net's integrity check.

    Raises:
        UserError: bad arguments or input (one line naming the file), or the dataset id is taken.
    """
    raw_dataset.check_dataset_id_and_name(dataset_id, name)
    raw_dataset.check_file_format(file_format)
    spacing = raw_dataset.check_spacing(spacing)
    tile_size, mask_values = _check_options(tile_size, downsample, equalize, equalize_dtype, mask_values,
                                            max_memory_gb)
    raw_dataset.check_free(Path(out_dir), dataset_id, name)
    stack = scan_slices(Path(slices_dir))
    masks = scan_masks(Path(masks_dir), stack, mask_values)
    plane_shape = (stack.shape[0] // downsample, stack.shape[1] // downsample)
    if min(plane_shape) == 0:
        raise UserError(f"{stack.paths[0]}: slices of {stack.shape} are smaller than --downsample {downsample}; "
                        f"choose a smaller factor")
    if equalize == "volume" and not (np.issubdtype(stack.dtype, np.integer) and stack.dtype.itemsize <= 2):
        raise UserError(f"{stack.paths[0]}: --equalize volume needs 8/16-bit integer slices, not {stack.dtype}; "
                        f"use --equalize slice")
    tiles = tile_grid(plane_shape, tile_size, drop_partial)
    if not tiles:
        raise UserError(f"{stack.paths[0]}: no full {tile_size} tile fits the {plane_shape} (downsampled) slices; "
                        f"choose a smaller --tile or keep partial tiles")
    ids = {tile: f"{name.lower()}_r{tile.row:02d}_c{tile.col:02d}" for tile in tiles}
    spacing_out = (spacing[0], spacing[1] * downsample, spacing[2] * downsample)
    dtype = np.dtype(EQUALIZE_DTYPES[equalize_dtype]) if equalize else _plane_dtype(stack.dtype)
    with raw_dataset.atomic_dataset_folder(out_dir, dataset_id, name) as folder:
        (folder / "imagesTr").mkdir()
        (folder / "labelsTr").mkdir()
        table = volume_equalization(stack, downsample) if equalize == "volume" else None
        intensity = _Intensity(downsample, equalize, dtype, table)
        budget = int(max_memory_gb * 1024**3)
        for group in _tile_groups(tiles, len(stack.paths), dtype.itemsize + 1, budget):
            _write_group(group, ids, stack, masks, intensity, mask_values, folder, spacing_out, file_format)
        config = {"slices": str(slices_dir), "masks": str(masks_dir), "first_slice": stack.first_index,
                  "mask_slices": sorted(stack.first_index + z for z in masks), "source_shape": list(stack.shape),
                  "source_spacing": list(spacing), "downsample": downsample, "tile_size": list(tile_size),
                  "drop_partial": bool(drop_partial), "equalize": equalize, "mask_values": list(mask_values),
                  "tiles": {ids[t]: _source_box(t, downsample) for t in tiles}}
        document = raw_dataset.dataset_json(
            name, {0: "FIB-SEM"}, dict(LABELS), len(tiles), file_format,
            description=(f"FIB-SEM nuclei/nucleoli: {len(tiles)} full-depth tiles; labels on {len(masks)} annotated "
                         f"slices, ignore ({IGNORE_LABEL}) elsewhere"),
            annotation_axis=0, annotated_slices={ids[t]: sorted(masks) for t in tiles}, spacing=list(spacing_out),
            fibsem=config)
        (folder / "dataset.json").write_text(json.dumps(document, indent=2) + "\n")
        raw_dataset.verify_raw_dataset(folder)
    return Path(out_dir) / raw_dataset.dataset_folder_name(dataset_id, name)


def _plane_dtype(dtype: np.dtype) -> np.dtype:
    return dtype if np.issubdtype(dtype, np.integer) else np.dtype(np.float32)


def _source_box(tile: Tile, factor: int) -> dict:
    return {"y": tile.y0 * factor, "x": tile.x0 * factor, "height": tile.height * factor,
            "width": tile.width * factor}


def _tile_groups(tiles: list[Tile], depth: int, bytes_per_voxel: int, budget: int) -> list[list[Tile]]:
    """Consecutive tiles whose full-depth arrays fit ``budget`` bytes together (a tile alone may exceed it)."""
    groups, current, used = [], [], 0
    for tile in tiles:
        size = depth * tile.height * tile.width * bytes_per_voxel
        if current and used + size > budget:
            groups.append(current)
            current, used = [], 0
        current.append(tile)
        used += size
    return groups + [current]


def _write_group(group: list[Tile], ids: dict, stack: SliceStack, masks: dict[int, Path], intensity: _Intensity,
                 mask_values: Sequence[int], folder: Path, spacing: tuple, file_format: str) -> None:
    """One pass over the slices: fill the group's tiles slice by slice, then write them."""
    depth = len(stack.paths)
    images = {t: np.empty((depth, t.height, t.width), dtype=intensity.dtype) for t in group}
    labels = {t: np.full((depth, t.height, t.width), IGNORE_LABEL, dtype=np.uint8) for t in group}
    for z, path in enumerate(stack.paths):
        plane = intensity(_read_plane(path, stack))
        for tile in group:
            images[tile][z] = plane[tile.box]
        if z in masks:
            classes = downsample_classes(mask_to_classes(readers.read_slice(masks[z]), mask_values),
                                         intensity.factor)
            for tile in group:
                labels[tile][z] = classes[tile.box]
    for tile in group:
        raw_dataset.write_image(images.pop(tile), folder / "imagesTr" / ids[tile], spacing, file_format, channel=0)
        raw_dataset.write_image(labels.pop(tile), folder / "labelsTr" / ids[tile], spacing, file_format)


# ------------------------------------------------------------------------------------------------ validation


def _check_options(tile_size, downsample, equalize, equalize_dtype, mask_values, max_memory_gb):
    tile_size = tuple(tile_size) if isinstance(tile_size, (Sequence, np.ndarray)) else ()
    if len(tile_size) != 2 or not all(raw_dataset.is_int(t) and t >= 1 for t in tile_size):
        raise UserError(f"invalid --tile {tile_size!r}: give 2 positive integers (y, x), e.g. --tile 256 256")
    if not raw_dataset.is_int(downsample) or downsample < 1:
        raise UserError(f"invalid --downsample {downsample!r}: give a positive integer factor, e.g. 4")
    if equalize is not None and equalize not in EQUALIZE_MODES:
        raise UserError(f"invalid --equalize {equalize!r}: choose {' or '.join(EQUALIZE_MODES)}")
    if equalize_dtype not in EQUALIZE_DTYPES:
        raise UserError(f"invalid --equalize-dtype {equalize_dtype!r}: choose {' or '.join(EQUALIZE_DTYPES)}")
    values = tuple(mask_values) if isinstance(mask_values, (Sequence, np.ndarray)) else ()
    if len(values) != NUM_CLASSES or not all(raw_dataset.is_int(v) for v in values) or len(set(values)) != NUM_CLASSES:
        raise UserError(f"invalid --mask-values {mask_values!r}: give 3 distinct integers (background, nucleus, "
                        f"nucleolus), e.g. 0 127 255")
    if not isinstance(max_memory_gb, numbers.Real) or not max_memory_gb > 0:
        raise UserError(f"invalid --max-memory-gb {max_memory_gb!r}: give a positive number")
    return tuple(int(t) for t in tile_size), tuple(int(v) for v in values)


# ------------------------------------------------------------------------------------------------ CLI


def _run(args) -> None:
    out_dir = raw_output_folder(args.out)
    folder = convert(args.slices, args.masks, out_dir, args.dataset_id, tuple(args.spacing), name=args.name,
                     tile_size=tuple(args.tile), downsample=args.downsample, equalize=args.equalize,
                     equalize_dtype=args.equalize_dtype, mask_values=tuple(args.mask_values),
                     drop_partial=args.drop_partial_tiles, file_format=args.format,
                     max_memory_gb=args.max_memory_gb)
    print(f"wrote {folder}")
    cases = json.loads((folder / "dataset.json").read_text())["numTraining"]
    if cases < MIN_CASES_FOR_CV:
        # nnU-Net's default split is a 5-fold KFold, which fails on fewer cases.
        print(f"note: {cases} tiles; nnU-Net's 5-fold cross-validation needs at least {MIN_CASES_FOR_CV}: "
              f"use a smaller --tile, or train fold 'all'")


def register_cli(subparsers) -> None:
    """Add ``fibsem`` to ``nnunet-ext convert``'s subcommands."""
    parser = subparsers.add_parser("fibsem", help="FIB-SEM nuclei/nucleoli: slice folder + sparse mask slices")
    add_output_arguments(parser, "FIBSEM", "FIBSEM")
    parser.add_argument("--slices", required=True, help="folder of 2D slices (slice number in each file name)")
    parser.add_argument("--masks", required=True, help="folder of 2D masks named by the slice they annotate")
    parser.add_argument("--spacing", type=float, nargs=3, required=True, metavar=("Z", "Y", "X"),
                        help="source voxel size (in-plane is scaled by --downsample)")
    parser.add_argument("--tile", type=int, nargs=2, default=(256, 256), metavar=("Y", "X"),
                        help="tile size in output voxels (default 256 256)")
    parser.add_argument("--drop-partial-tiles", action="store_true", help="drop edge tiles smaller than --tile")
    parser.add_argument("--downsample", type=int, default=1, help="in-plane factor (the paper: 4)")
    parser.add_argument("--equalize", choices=EQUALIZE_MODES, help="histogram equalization (default: none)")
    parser.add_argument("--equalize-dtype", choices=tuple(EQUALIZE_DTYPES), default="uint8")
    parser.add_argument("--mask-values", type=int, nargs=3, default=(0, 1, 2), metavar=("BG", "NUCLEUS", "NUCLEOLUS"),
                        help="mask values of the three classes (default 0 1 2)")
    parser.add_argument("--max-memory-gb", type=float, default=4.0, help="memory for the tiles of one pass")
    parser.set_defaults(func=_run)
