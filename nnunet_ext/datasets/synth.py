"""Deterministic synthetic nnU-Net v2 raw datasets that look like sparsely annotated 3D fluorescence microscopy.

Every volume is an array in (z, y, x) order with anisotropic physical ``spacing`` (z, y, x) in micrometres.
Two foreground classes are drawn in physical space, so the anisotropy is geometrically right:

* vessel (1): smooth, branching random-walk centrelines rasterised as tubes of radius ~1.5-3 um;
* nucleus (2): randomly oriented ellipsoids of radius ~3-6 um scattered around a few cluster centres.

The intensity model is dim background + bright vessels + medium textured nuclei, blurred with an
anisotropic Gaussian PSF, multiplied by a smooth illumination field, with Poisson shot noise and
Gaussian read noise on top. Training labels are made sparse by keeping only some slices along one
axis and setting everything else to the ignore label (the highest label value, as nnU-Net requires).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from nnunet_ext.annotation_axis import ANNOTATED_SLICES_KEY, DATASET_JSON_KEY
from nnunet_ext.datasets.raw_dataset import (
    atomic_dataset_folder,
    check_axis,
    check_dataset_id_and_name,
    check_seed,
    check_spacing,
    dataset_folder_name,
    is_int,
    write_image,
)
from nnunet_ext.datasets.sparsify import annotated_slices, sparsify
from nnunet_ext.errors import UserError

LABELS = {"background": 0, "vessel": 1, "nucleus": 2, "ignore": 3}
IGNORE_LABEL = LABELS["ignore"]

MIN_EDGE = 8  # voxels; smaller volumes cannot hold a nucleus and a vessel side by side
# Peak memory of make_case per voxel (tracemalloc: 61 bytes at 24x64x64 to 48x128x128), with a little margin.
BYTES_PER_VOXEL = 64
MAX_CASES = 1000  # training streams [seed, i] must stay clear of the test streams [seed, 1000 + i]
FILE_ENDING = ".nii.gz"

_VESSEL_RADIUS_UM = (1.5, 3.0)
_NUCLEUS_RADIUS_UM = (3.0, 6.0)
_PSF_SIGMA_UM = (1.2, 0.5, 0.5)  # z, y, x: widefield/confocal PSFs are ~2-3x longer along the optical axis
_CAMERA_OFFSET = 100.0
_READ_NOISE = 4.0
_MAX_ATTEMPTS = 8
_MAX_SEGMENTS = 4000  # per tree; bounds the run time of pathological draws


# --------------------------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Grid:
    """Voxel grid of one volume: ``shape`` in voxels, ``spacing`` in um, both (z, y, x)."""

    shape: tuple[int, int, int]
    spacing: np.ndarray

    @property
    def extent(self) -> np.ndarray:
        """Physical size (z, y, x) in um of the box spanned by the voxel centres."""
        return (np.asarray(self.shape) - 1) * self.spacing

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, ...] | None:
        """Voxel slices covering the physical box [lo, hi] (um), or None if it misses the grid."""
        start = np.maximum(np.ceil(lo / self.spacing), 0).astype(int)
        stop = np.minimum(np.floor(hi / self.spacing), np.asarray(self.shape) - 1).astype(int) + 1
        if np.any(stop <= start):
            return None
        return tuple(slice(a, b) for a, b in zip(start, stop))

    def coords(self, box: tuple[slice, ...]) -> list[np.ndarray]:
        """Physical coordinates of a sub-grid as three broadcastable arrays (z, y, x)."""
        axes = [np.arange(s.start, s.stop) * d for s, d in zip(box, self.spacing)]
        return [axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]]


def _segment_mask(grid: _Grid, p0: np.ndarray, p1: np.ndarray, radius: float):
    """Voxels within ``radius`` um of the segment p0-p1 (physical z/y/x): (box, bool sub-mask), or None."""
    box = grid.box(np.minimum(p0, p1) - radius, np.maximum(p0, p1) + radius)
    if box is None:
        return None
    z, y, x = grid.coords(box)
    v = p1 - p0
    vv = float(v @ v)
    rel = (z - p0[0], y - p0[1], x - p0[2])
    # Clamped projection onto the segment gives the closest point; a zero-length segment becomes a sphere.
    t = np.clip((rel[0] * v[0] + rel[1] * v[1] + rel[2] * v[2]) / vv, 0.0, 1.0) if vv > 0 else 0.0
    d2 = (rel[0] - t * v[0]) ** 2 + (rel[1] - t * v[1]) ** 2 + (rel[2] - t * v[2]) ** 2
    return box, d2 <= radius * radius


def _ellipsoid_mask(grid: _Grid, centre: np.ndarray, axes_um: np.ndarray, rotation: np.ndarray):
    """Voxels inside the ellipsoid with semi-axes ``axes_um`` along the columns of ``rotation``: (box, sub-mask)."""
    reach = float(axes_um.max())
    box = grid.box(centre - reach, centre + reach)
    if box is None:
        return None
    z, y, x = grid.coords(box)
    rel = (z - centre[0], y - centre[1], x - centre[2])
    inside = np.zeros(tuple(s.stop - s.start for s in box))
    for k in range(3):
        q = rel[0] * rotation[0, k] + rel[1] * rotation[1, k] + rel[2] * rotation[2, k]
        inside += (q / axes_um[k]) ** 2
    return box, inside <= 1.0


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def _random_direction(rng: np.random.Generator) -> np.ndarray:
    return _unit(rng.standard_normal(3))


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly random 3x3 rotation matrix (QR of a Gaussian matrix with sign fix)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _size_scale(grid: _Grid) -> float:
    """Shrink factor for object sizes so that tiny physical volumes are not swallowed by one object."""
    return min(1.0, float(grid.extent.min()) / 40.0)


def _branch_off(direction: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Direction of a daughter branch, 30-70 degrees away from its parent."""
    perp = _unit(np.cross(direction, _random_direction(rng)))
    angle = math.radians(rng.uniform(30.0, 70.0))
    return _unit(math.cos(angle) * direction + math.sin(angle) * perp)


def _vessel_tree(grid: _Grid, rng: np.random.Generator, scale: float) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Segments (p0, p1, radius_um) of one branching tree: smooth random walks that occasionally fork.

    The trunk enters through a random face and heads roughly through the interior, like a vessel
    crossing the field of view; branches leave the parent at 30-70 degrees and are thinner and shorter.
    """
    extent = grid.extent
    # ~2 um steps, but never longer than the volume allows nor much shorter than a voxel.
    step = max(min(2.0, float(extent.min()) / 8.0), 0.5 * float(grid.spacing.min()))
    start, direction = _entry_point(grid, rng)
    radius = rng.uniform(*_VESSEL_RADIUS_UM) * scale
    pending = [(start, direction, radius, float(np.linalg.norm(extent)) * rng.uniform(0.8, 1.3), 0)]
    segments = []
    while pending and len(segments) < _MAX_SEGMENTS:
        p, d, r, length, depth = pending.pop()
        curl = np.zeros(3)
        for i in range(int(length / step)):
            # The turning rate itself drifts slowly, so the centreline bends smoothly instead of zig-zagging.
            curl = 0.85 * curl + 0.012 * rng.standard_normal(3)
            d = _unit(d + curl * step)
            q = p + d * step
            segments.append((p, q, r))
            p = q
            if np.any(p < -r) or np.any(p > extent + r):
                break
            if depth < 2 and rng.random() < step / 60.0:
                remaining = length - (i + 1) * step
                pending.append((p.copy(), _branch_off(d, rng), max(r * rng.uniform(0.7, 0.9), 0.6 * scale),
                                remaining * rng.uniform(0.3, 0.6), depth + 1))
    return segments


def _entry_point(grid: _Grid, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A point on a random face of the volume (um) and a unit direction towards a random interior point."""
    start = rng.uniform(0.0, 1.0, 3) * grid.extent
    axis = int(rng.integers(0, 3))
    start[axis] = grid.extent[axis] * float(rng.integers(0, 2))
    target = rng.uniform(0.3, 0.7, 3) * grid.extent
    return start, _unit(target - start + 1e-3 * rng.standard_normal(3))


def _draw_vessels(grid: _Grid, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Boolean vessel mask (grid shape): a few trees, or one forced straight tube if the draw missed the grid."""
    mask = np.zeros(grid.shape, dtype=bool)
    # More trees in larger fields of view, capped by voxel count so coarse, huge volumes stay fast.
    extra = min(int(np.prod(grid.extent) / 150.0**3), int(np.prod(grid.shape)) // 500_000)
    n_trees = int(rng.integers(2, 4)) + extra
    for _ in range(n_trees):
        for p0, p1, r in _vessel_tree(grid, rng, scale):
            _paint(mask, _segment_mask(grid, p0, p1, r))
    if not mask.any():
        anchor = _random_voxel_centre(grid, rng)
        half = np.zeros(3)
        half[int(np.argmax(grid.extent))] = grid.extent.max()
        _paint(mask, _segment_mask(grid, anchor - half, anchor + half, _VESSEL_RADIUS_UM[0] * scale))
    return mask


def _paint(mask: np.ndarray, region) -> np.ndarray | None:
    """OR a (box, sub-mask) region into ``mask``; returns the sub-mask (None if the region missed the grid)."""
    if region is None:
        return None
    box, inside = region
    mask[box] |= inside
    return inside


def _random_voxel_centre(grid: _Grid, rng: np.random.Generator) -> np.ndarray:
    """Physical position of a random voxel centre: an object centred there always covers at least that voxel."""
    return np.array([rng.integers(0, n) for n in grid.shape]) * grid.spacing


def _draw_nuclei(grid: _Grid, rng: np.random.Generator, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Nucleus mask (bool) and per-voxel nucleus brightness factor (float32, 0 outside nuclei), grid shape."""
    mask = np.zeros(grid.shape, dtype=bool)
    brightness = np.zeros(grid.shape, dtype=np.float32)
    # About one cluster per (60 um)^3, capped by voxel count for the same reason as the vessel trees.
    expected = min(max(1.5, np.prod(grid.extent) / 60.0**3), max(2, int(np.prod(grid.shape)) // 20_000))
    n_clusters = max(1, int(rng.poisson(expected)))
    placed = _Placed()
    for _ in range(n_clusters):
        cluster = rng.uniform(0.15, 0.85, 3) * grid.extent
        spread = rng.uniform(6.0, 14.0) * scale
        for _ in range(int(rng.integers(3, 9))):
            nucleus = _place_nucleus(grid, rng, scale, cluster, spread, placed)
            if nucleus is not None:
                _add_nucleus(mask, brightness, grid, rng, *nucleus)
    if not mask.any():
        radius = _NUCLEUS_RADIUS_UM[0] * scale
        _add_nucleus(mask, brightness, grid, rng, _random_voxel_centre(grid, rng), np.full(3, radius))
    return mask, brightness


class _Placed:
    """Centres (um) and radii of the nuclei placed so far, kept as arrays for vectorised distance checks."""

    def __init__(self) -> None:
        self.centres = np.empty((0, 3))
        self.radii = np.empty(0)

    def clear_of(self, centre: np.ndarray, radius: float) -> bool:
        # Real nuclei touch but rarely interpenetrate: reject centres much closer than the sum of radii.
        distance = np.sqrt(((self.centres - centre) ** 2).sum(axis=1))
        return bool(np.all(distance > 0.8 * (self.radii + radius)))

    def add(self, centre: np.ndarray, radius: float) -> None:
        self.centres = np.vstack([self.centres, centre])
        self.radii = np.append(self.radii, radius)


def _place_nucleus(grid: _Grid, rng: np.random.Generator, scale: float, cluster: np.ndarray, spread: float,
                   placed: _Placed) -> tuple[np.ndarray, np.ndarray] | None:
    """Centre and semi-axes (um) of a nucleus near ``cluster`` that does not overlap much with ``placed``."""
    for _ in range(6):
        centre = np.clip(cluster + rng.normal(0.0, spread, 3), 0.0, grid.extent)
        radius = rng.uniform(*_NUCLEUS_RADIUS_UM) * scale
        if placed.clear_of(centre, radius):
            placed.add(centre, radius)
            return centre, radius * rng.uniform(0.75, 1.25, 3)
    return None


def _add_nucleus(mask: np.ndarray, brightness: np.ndarray, grid: _Grid, rng: np.random.Generator,
                 centre: np.ndarray, axes_um: np.ndarray) -> None:
    """Paint one randomly oriented nucleus into ``mask`` and give it its own brightness factor."""
    region = _ellipsoid_mask(grid, centre, axes_um, _random_rotation(rng))
    inside = _paint(mask, region)
    if inside is not None:
        brightness[region[0]][inside] = rng.uniform(0.7, 1.3)


def _draw_label(grid: _Grid, rng: np.random.Generator, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Dense label (uint8, 0/1/2) and nucleus brightness map; nuclei overwrite vessels where they overlap."""
    vessels = _draw_vessels(grid, rng, scale)
    nuclei, brightness = _draw_nuclei(grid, rng, scale)
    label = np.zeros(grid.shape, dtype=np.uint8)
    label[vessels] = LABELS["vessel"]
    label[nuclei] = LABELS["nucleus"]
    return label, brightness


def _fallback_label(grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """Guaranteed two-class layout (never reached in practice): a centred nucleus and a vessel along one edge."""
    label = np.zeros(grid.shape, dtype=np.uint8)
    brightness = np.zeros(grid.shape, dtype=np.float32)
    centre = (np.asarray(grid.shape) // 2) * grid.spacing
    nucleus = _ellipsoid_mask(grid, centre, grid.extent / 6, np.eye(3))
    label[nucleus[0]][nucleus[1]] = LABELS["nucleus"]
    brightness[label == LABELS["nucleus"]] = 1.0
    label[:, 0, 0] = LABELS["vessel"]
    return label, brightness


def _has_both_classes(label: np.ndarray) -> bool:
    present = np.bincount(label.ravel(), minlength=3)
    return bool(present[LABELS["vessel"]] and present[LABELS["nucleus"]])


# --------------------------------------------------------------------------------------------- intensities


def _smooth_noise(grid: _Grid, rng: np.random.Generator, sigma_um: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-smoothed white noise (float32, grid shape) with correlation length sigma_um."""
    noise = rng.standard_normal(grid.shape, dtype=np.float32)
    field = ndimage.gaussian_filter(noise, sigma=sigma_um / grid.spacing, mode="reflect")
    field -= field.mean()
    return field / max(float(field.std()), 1e-6)


def _illumination(grid: _Grid, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative inhomogeneity field (float32, grid shape) spanning roughly [0.6, 1.2].

    Heavily smoothed noise, made cheaply: random values on a coarse lattice (~1 node per 50 um)
    upsampled with cubic splines, which is smooth by construction.
    """
    coarse_shape = tuple(int(min(n, max(2, math.ceil(e / 50.0) + 1))) for n, e in zip(grid.shape, grid.extent))
    field = rng.standard_normal(coarse_shape)
    # Spline upsampling is linear and separable, so one small matrix per axis replaces a slow 3D zoom.
    for axis, n in enumerate(grid.shape):
        weights = _upsampling_matrix(coarse_shape[axis], n)
        field = np.moveaxis(np.tensordot(weights, field, axes=([1], [axis])), 0, axis)
    field = field.astype(np.float32)
    lo, hi = float(field.min()), float(field.max())
    low, high = rng.uniform(0.6, 0.7), rng.uniform(1.1, 1.2)
    if hi - lo < 1e-6:
        return np.full(grid.shape, (low + high) / 2, dtype=np.float32)
    return low + (high - low) * (field - lo) / (hi - lo)


def _upsampling_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix that cubic-spline upsamples a 1D signal from n_in to n_out samples, end to end."""
    return ndimage.zoom(np.eye(n_in), (n_out / n_in, 1.0), order=3, mode="nearest", grid_mode=False)


def _render(label: np.ndarray, nucleus_brightness: np.ndarray, grid: _Grid, rng: np.random.Generator) -> np.ndarray:
    """Microscope image (uint16, grid shape) of a dense label map."""
    texture = _smooth_noise(grid, rng, sigma_um=0.8)
    background = rng.uniform(15.0, 30.0) * (1.0 + 0.2 * texture)
    vessel = rng.uniform(350.0, 600.0) * (label == LABELS["vessel"]) * (1.0 + 0.1 * texture)
    # Chromatin texture: nuclei are medium bright and visibly grainy, unlike the smooth vessel lumen.
    nucleus = rng.uniform(120.0, 220.0) * nucleus_brightness * np.clip(1.0 + 0.35 * texture, 0.2, None)
    fluorophores = np.maximum(background + vessel + nucleus, 0.0)
    blurred = ndimage.gaussian_filter(fluorophores, sigma=np.asarray(_PSF_SIGMA_UM) / grid.spacing)
    expected = np.maximum(blurred * _illumination(grid, rng), 0.0)
    counts = rng.poisson(expected).astype(np.float32)
    counts += _CAMERA_OFFSET + _READ_NOISE * rng.standard_normal(grid.shape, dtype=np.float32)
    return np.clip(np.rint(counts), 0, np.iinfo(np.uint16).max).astype(np.uint16)


def make_case(shape: tuple[int, int, int], spacing: tuple[float, float, float], rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic microscopy volume.

    Args:
        shape: (z, y, x) voxels, each >= 8.
        spacing: (z, y, x) voxel size in um (z usually the largest).
        rng: the only source of randomness; the same generator state gives byte-identical arrays.

    Returns:
        image: uint16 array of ``shape``, camera counts.
        label: uint8 array of ``shape`` with 0 background, 1 vessel, 2 nucleus; both foreground classes present.
    """
    grid = _Grid(_check_shape(shape), np.asarray(check_spacing(spacing), dtype=float))
    scale = _size_scale(grid)
    for attempt in range(_MAX_ATTEMPTS):
        # Each retry shrinks the objects so nuclei cannot keep swallowing every vessel voxel of a tiny volume.
        label, brightness = _draw_label(grid, rng, scale * 0.75**attempt)
        if _has_both_classes(label):
            break
    else:
        label, brightness = _fallback_label(grid)
    return _render(label, brightness, grid, rng), label


# --------------------------------------------------------------------------------------------- validation


def _check_shape(shape) -> tuple[int, int, int]:
    ok = isinstance(shape, Sequence | np.ndarray) and len(shape) == 3 and all(is_int(n) for n in shape)
    if not ok or min(shape) < MIN_EDGE:
        raise UserError(
            f"invalid shape {_show(shape)}: give 3 integers (z, y, x), each at least {MIN_EDGE}, e.g. --size 24 64 64"
        )
    shape = tuple(int(n) for n in shape)
    _check_memory(shape)
    return shape


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not a POSIX system: no bound known
        return None


def _check_memory(shape: tuple[int, int, int]) -> None:
    """UserError when one volume of ``shape`` needs more memory than this machine has (it would end in a
    MemoryError, or in the kernel killing the process, only after minutes of work)."""
    need, have = math.prod(shape) * BYTES_PER_VOXEL, _physical_memory()
    if have is not None and need > have:
        raise UserError(f"--size {' '.join(map(str, shape))} needs about {need / 1e9:,.0f} GB of memory per volume "
                        f"({BYTES_PER_VOXEL} bytes per voxel), more than this machine's {have / 1e9:,.0f} GB: "
                        f"choose a smaller --size")


def _show(value) -> str:
    """Compact one-line rendering of a user value for error messages."""
    if isinstance(value, Sequence | np.ndarray) and not isinstance(value, str):
        return repr(tuple(value))
    return repr(value)


def _check_args(dataset_id, name, num_cases, num_test_cases, axis, seed) -> None:
    check_dataset_id_and_name(dataset_id, name)
    if not is_int(num_cases) or not 1 <= num_cases <= MAX_CASES:
        raise UserError(f"invalid number of training cases {num_cases!r}: choose 1..{MAX_CASES}")
    if not is_int(num_test_cases) or num_test_cases < 0:
        raise UserError(f"invalid number of test cases {num_test_cases!r}: choose 0 or more")
    check_axis(axis)
    check_seed(seed)


# --------------------------------------------------------------------------------------------- writing


def _case_ids(name: str, num_cases: int, test: bool = False) -> list[str]:
    """Case identifiers: ``<name-lower>_000``, ... for training, ``<name-lower>_test_000``, ... for test cases."""
    stem = f"{name.lower()}_test" if test else name.lower()
    width = max(3, len(str(num_cases - 1)))
    return [f"{stem}_{i:0{width}d}" for i in range(num_cases)]


def _dataset_json(name: str, train_ids: list[str], slices: list[int], config: dict) -> dict:
    axis, shape = config["axis"], config["shape"]
    return {
        "name": name,
        "description": (
            "Synthetic sparsely annotated 3D fluorescence microscopy (nnunet_ext.datasets.synth): vessels and nuclei; "
            f"labelsTr keep {len(slices)} of {shape[axis]} slices along axis {axis} and mark all other voxels "
            f"as ignore ({IGNORE_LABEL}); labelsTr_dense holds the full ground truth"
        ),
        "channel_names": {"0": "fluorescence"},
        "labels": dict(LABELS),
        "numTraining": len(train_ids),
        "file_ending": FILE_ENDING,
        DATASET_JSON_KEY: axis,
        ANNOTATED_SLICES_KEY: {case: list(slices) for case in train_ids},
        "spacing": list(config["spacing"]),
        "synth": config,
    }


def _write_contents(folder: pathlib.Path, name: str, slices: list[int], config: dict) -> None:
    shape, spacing, axis, seed = config["shape"], config["spacing"], config["axis"], config["seed"]
    for sub in ("imagesTr", "labelsTr", "labelsTr_dense", "imagesTs", "labelsTs"):
        (folder / sub).mkdir()
    train_ids = _case_ids(name, config["num_cases"])
    for i, case in enumerate(train_ids):
        image, dense = make_case(shape, spacing, np.random.default_rng([seed, i]))
        write_image(image, folder / "imagesTr" / case, spacing, channel=0)
        write_image(sparsify(dense, axis, slices, IGNORE_LABEL), folder / "labelsTr" / case, spacing)
        write_image(dense, folder / "labelsTr_dense" / case, spacing)
    test_ids = _case_ids(name, config["num_test_cases"], test=True) if config["num_test_cases"] else []
    for i, case in enumerate(test_ids):
        # A separate stream per test case: test volumes never repeat a training volume.
        image, dense = make_case(shape, spacing, np.random.default_rng([seed, MAX_CASES + i]))
        write_image(image, folder / "imagesTs" / case, spacing, channel=0)
        write_image(dense, folder / "labelsTs" / case, spacing)
    document = _dataset_json(name, train_ids, slices, config)
    (folder / "dataset.json").write_text(json.dumps(document, indent=2) + "\n")


def write_synthetic_dataset(raw_dir, dataset_id: int, name: str = "SynthMicroscopy", num_cases: int = 6,
                            num_test_cases: int = 2, shape=(24, 64, 64), spacing=(4.0, 1.0, 1.0), axis: int = 0,
                            every: int | None = 4, n_slices: int | None = None, seed: int = 0) -> pathlib.Path:
    """Write a synthetic nnU-Net v2 raw dataset ``raw_dir/DatasetXXX_<name>/`` and return its path.

    Layout: ``dataset.json``, ``imagesTr/<case>_0000.nii.gz`` (uint16), ``labelsTr/<case>.nii.gz`` (uint8, sparse:
    annotated slices along ``axis`` hold the truth, every other voxel is 3 = ignore), ``labelsTr_dense/`` (dense
    truth of the training cases), ``imagesTs/`` and ``labelsTs/`` (dense). Arrays are (z, y, x) with ``spacing``
    (z, y, x) in um. Training case i uses ``np.random.default_rng([seed, i])``, test case i
    ``np.random.default_rng([seed, 1000 + i])``.

    Everything is validated before anything is written; the dataset appears atomically (built in a hidden
    temporary folder inside ``raw_dir``, then renamed), and nothing is left behind on failure.

    Raises:
        UserError: invalid arguments, or ``raw_dir`` already holds a ``DatasetXXX_*`` folder with this id.
    """
    _check_args(dataset_id, name, num_cases, num_test_cases, axis, seed)
    shape, spacing = _check_shape(shape), check_spacing(spacing)
    slices = annotated_slices(shape[axis], every, n_slices, axis=axis)
    config = {"dataset_id": int(dataset_id), "name": name, "num_cases": int(num_cases),
              "num_test_cases": int(num_test_cases), "shape": list(shape), "spacing": list(spacing),
              "axis": int(axis), "every": None if every is None else int(every),
              "n_slices": None if n_slices is None else int(n_slices), "seed": int(seed)}
    with atomic_dataset_folder(raw_dir, dataset_id, name) as folder:
        _write_contents(folder, name, slices, config)
    return pathlib.Path(raw_dir) / dataset_folder_name(dataset_id, name)

