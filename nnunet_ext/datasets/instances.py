"""Nucleus instances <-> border/interior semantic labels, and ``nnunet-ext instances`` for predictions.

nnU-Net segments classes, not objects. To separate touching nuclei, the FUCCI converter trains on three classes
(background 0 / nucleus border 1 / nucleus interior 2) made from instance labels by ``instances_to_semantic``;
``semantic_to_instances`` turns a predicted border/interior segmentation back into numbered nuclei.

Conventions (both directions, arrays in (z, y, x) order, also valid for 2D arrays):

* Border = voxels of an instance with at least one 6-connected neighbour (face neighbour) outside that instance,
  i.e. the instance minus its erosion by the 6-connectivity cross, computed for every instance at once. Where two
  nuclei touch, both contact layers are border, so their interiors never touch. The edge of the volume is not a
  border: a nucleus cut by the field of view continues outside it.
* Interior components are found with 6-connectivity: the border rule guarantees that interiors of different
  instances are never 6- (or even 18-) adjacent, whereas 26-connectivity could join them through a corner.
* Each border voxel joins the interior component it is flooded from first by a watershed on the distance to the
  nearest interior voxel (voxel units), restricted to border voxels: in practice the nearest interior. Border
  pieces that reach no interior (nuclei too thin to have one, e.g. one or two voxels deep) become instances of
  their own, so thin nuclei are not lost.
"""

import json
import os
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage
from skimage.segmentation import relabel_sequential, watershed

from nnunet_ext.datasets import readers
from nnunet_ext.errors import UserError

BACKGROUND, BORDER, INTERIOR = 0, 1, 2
PREDICTION_SUFFIXES = (".nii.gz", ".nii", ".tif", ".tiff")


def remove_small_instances(instances: np.ndarray, min_size: int) -> np.ndarray:
    """Copy of ``instances`` (any shape, integer dtype, 0 = background); instances under ``min_size`` voxels -> 0."""
    ids, counts = np.unique(instances, return_counts=True)
    small = ids[(counts < min_size) & (ids != 0)]
    out = instances.copy()
    if small.size:
        out[np.isin(instances, small)] = 0
    return out


def border_mask(instances: np.ndarray) -> np.ndarray:
    """Bool array, same shape: instance voxels with a face neighbour of another value (background or instance)."""
    border = np.zeros(instances.shape, dtype=bool)
    for axis in range(instances.ndim):
        lower = [slice(None)] * instances.ndim
        upper = [slice(None)] * instances.ndim
        lower[axis], upper[axis] = slice(None, -1), slice(1, None)
        differs = instances[tuple(lower)] != instances[tuple(upper)]
        # A differing pair makes both voxels border: each side of a contact keeps its own layer.
        border[tuple(lower)] |= differs
        border[tuple(upper)] |= differs
    return border & (instances != 0)


def instances_to_semantic(instances: np.ndarray, min_size: int = 0) -> np.ndarray:
    """Instance labels -> background 0 / nucleus border 1 / nucleus interior 2.

    Args:
        instances: (z, y, x) non-negative integer array, 0 = background, 1..n = nuclei (ids need not be consecutive).
        min_size: instances with fewer voxels become background first (0 keeps all).

    Returns:
        uint8 array of the same shape with values 0, 1, 2.
    """
    if min_size > 1:
        instances = remove_small_instances(instances, min_size)
    semantic = np.where(instances != 0, INTERIOR, BACKGROUND).astype(np.uint8)
    semantic[border_mask(instances)] = BORDER
    return semantic


def semantic_to_instances(semantic: np.ndarray, interior: int = INTERIOR, border: int = BORDER,
                          min_size: int = 0) -> np.ndarray:
    """Border/interior segmentation -> numbered nucleus instances (the reverse of ``instances_to_semantic``).

    Args:
        semantic: (z, y, x) integer array; ``interior`` and ``border`` mark nucleus voxels, every other value
            (background, other classes) is background.
        interior: class value of nucleus interiors.
        border: class value of nucleus borders.
        min_size: instances with fewer voxels are dropped (0 keeps all); ids stay consecutive.

    Returns:
        uint32 array of the same shape: 0 = background, 1..n = instances.
    """
    core = semantic == interior
    nucleus = core | (semantic == border)
    faces = ndimage.generate_binary_structure(semantic.ndim, 1)
    markers, count = ndimage.label(core, structure=faces)
    if count:
        distance = ndimage.distance_transform_edt(~core)
        instances = watershed(distance, markers, connectivity=1, mask=nucleus).astype(np.uint32)
    else:
        instances = np.zeros(semantic.shape, dtype=np.uint32)
    orphans, _ = ndimage.label(nucleus & (instances == 0), structure=faces)
    instances[orphans > 0] = orphans[orphans > 0] + count
    if min_size > 1:
        instances = remove_small_instances(instances, min_size)
    return relabel_sequential(instances)[0].astype(np.uint32)


# ------------------------------------------------------------------------------------------------ CLI


def _case_name(path: Path) -> str:
    name = path.name
    return next(name[: -len(s)] for s in PREDICTION_SUFFIXES if name.lower().endswith(s))


def prediction_files(pred: Path) -> list[Path]:
    """The NIfTI/TIFF segmentations named by ``pred`` (one file, or those directly inside a folder), sorted."""
    pred = Path(pred)
    if pred.is_dir():
        files = sorted(p for p in pred.iterdir() if p.is_file() and p.name.lower().endswith(PREDICTION_SUFFIXES))
        if not files:
            raise UserError(f"{pred} holds no segmentations ({', '.join(PREDICTION_SUFFIXES)}): "
                            f"point --pred at nnUNetv2_predict's output folder")
        return files
    if not pred.is_file():
        raise UserError(f"{pred} does not exist: point --pred at a segmentation file or folder")
    if not pred.name.lower().endswith(PREDICTION_SUFFIXES):
        raise UserError(f"{pred}: unsupported file; give a NIfTI (.nii.gz) or TIFF segmentation")
    return [pred]


def _read_prediction(path: Path) -> tuple[np.ndarray, list[float] | None]:
    """(3D integer array, (z, y, x) spacing or None) of one predicted segmentation."""
    if path.name.lower().endswith((".nii.gz", ".nii")):
        array, spacing, _ = readers.read_nifti(path)
    else:
        array = readers.read_tiff(path)
        # Tiff3DIO keeps the spacing in <case>.json beside the segmentation.
        aux = path.with_name(f"{_case_name(path)}.json")
        spacing = json.loads(aux.read_text()).get("spacing") if aux.is_file() else None
    if array.ndim != 3:
        raise UserError(f"{path}: expected a 3D segmentation, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise UserError(f"{path}: {array.dtype} values are not class labels; give nnU-Net's integer segmentation")
    return array, None if spacing is None else [float(s) for s in spacing]


def _write_instances(instances: np.ndarray, path: Path, spacing: list[float] | None) -> None:
    dtype = np.uint16 if instances.max(initial=0) <= np.iinfo(np.uint16).max else np.uint32
    tmp = path.with_name(f".{path.name}.tmp")
    tifffile.imwrite(tmp, instances.astype(dtype), compression="zlib", photometric="minisblack")
    # Rename last, so a crash never leaves a truncated label file under the final name.
    os.replace(tmp, path)
    if spacing is not None:
        path.with_suffix(".json").write_text(json.dumps({"spacing": spacing}))


def convert_predictions(pred: Path, out_dir: Path, interior: int = INTERIOR, border: int = BORDER,
                        min_size: int = 0) -> list[tuple[Path, int]]:
    """Write ``out_dir/<case>.tif`` (uint16, uint32 above 65535 nuclei) + ``<case>.json`` spacing per segmentation.

    Inputs are checked for name clashes and existing outputs before anything is written; files are converted
    one at a time (memory: one volume), each written atomically. Returns (written file, number of nuclei) pairs.
    """
    if interior == border:
        raise UserError(f"--interior and --border are both {interior}: give the two different class values")
    files = prediction_files(pred)
    out_dir = Path(out_dir)
    targets = [out_dir / f"{_case_name(p)}.tif" for p in files]
    for target, source in zip(targets, files):
        if targets.count(target) > 1:
            raise UserError(f"{source}: several segmentations are named {target.stem}; keep one per case")
        if target.exists():
            raise UserError(f"{target} already exists: choose another --out or delete it")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for source, target in zip(files, targets):
        semantic, spacing = _read_prediction(source)
        instances = semantic_to_instances(semantic, interior=interior, border=border, min_size=min_size)
        _write_instances(instances, target, spacing)
        written.append((target, int(instances.max(initial=0))))
    return written


def _run(args) -> None:
    for path, count in convert_predictions(Path(args.pred), Path(args.out), args.interior, args.border,
                                           args.min_size):
        print(f"wrote {path} ({count} nuclei)")


def register_cli(subparsers) -> None:
    """Add ``instances`` to ``nnunet-ext``'s subcommands."""
    parser = subparsers.add_parser(
        "instances", help="numbered nuclei (label TIFFs) from predicted border/interior segmentations")
    parser.add_argument("--pred", required=True, help="a predicted segmentation (NIfTI/TIFF) or a folder of them")
    parser.add_argument("--out", required=True, help="folder for the label TIFFs (<case>.tif + <case>.json)")
    parser.add_argument("--interior", type=int, default=INTERIOR, help=f"interior class (default {INTERIOR})")
    parser.add_argument("--border", type=int, default=BORDER, help=f"border class (default {BORDER})")
    parser.add_argument("--min-size", type=int, default=0, help="drop nuclei under N voxels (default: keep all)")
    parser.set_defaults(func=_run)
