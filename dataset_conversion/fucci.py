"""FUCCI spheroids (confocal, Nikon): 3-channel volumes + nucleus instance labels -> nnU-Net raw dataset.

Input per case: a volume with the channels Cy3, GFP, Hoechst, either ONE TIFF in (C, Z, Y, X) or (Z, C, Y, X)
order or one 3D TIFF per channel (in that channel order), typically 21 slices of 512 x 512; and optionally an
instance label TIFF (Z, Y, X) with 0 = background and 1..n = nuclei (Cellpose / Labkit output).

Labels: instances become background 0 / nucleus border 1 / nucleus interior 2 (``nnunet_ext.datasets.instances``:
border = instance minus its 3D 6-connectivity erosion, computed per instance, so touching nuclei are separated by
border; ``nnunet-ext instances`` reverses it on predictions). Labels are dense. A case without a label file is an unlabeled
case for the semi-supervised trainers: its label file is all ignore (3) and dataset.json then lists "ignore": 3.

Optional preprocessing (off by default), applied to each channel of each case in this order:
threshold (raw values below it -> 0; keeps the dtype) -> rescale to [0, 1] by the channel's min/max (float32, only
when one of the following steps is on) -> gamma (x ** gamma) -> CLAHE (skimage equalize_adapthist per z slice,
constant slices left as they are) -> median filter (size x size window per z slice) -> white top-hat
(skimage white_tophat per z slice with a disk of the given radius: removes background wider than the disk).
The in-plane steps work per slice because the z spacing of these stacks is several times the in-plane spacing.
"""

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.exposure import equalize_adapthist
from skimage.morphology import disk, white_tophat

from nnunet_ext.datasets import raw_dataset, readers
from nnunet_ext.datasets.instances import BACKGROUND, BORDER, INTERIOR, instances_to_semantic
from nnunet_ext.datasets.raw_dataset import add_output_arguments
from nnunet_ext.errors import UserError
from nnunet_ext.nnunet_paths import raw_output_folder

CHANNELS = ("Cy3", "GFP", "Hoechst")
LABELS = {"background": BACKGROUND, "nucleus_border": BORDER, "nucleus_interior": INTERIOR}
IGNORE_LABEL = 3
LAYOUTS = {0: "(C, Z, Y, X)", 1: "(Z, C, Y, X)"}

PathLike = str | os.PathLike
ImageSource = PathLike | Sequence[PathLike]


@dataclass(frozen=True)
class Preprocessing:
    """Preprocessing steps from the FUCCI thesis; ``None`` switches a step off (all off by default).

    Attributes:
        threshold: raw intensities below this value become 0.
        gamma: exponent applied to the [0, 1]-rescaled channel (> 0; < 1 brightens dim nuclei).
        clahe: clip limit of CLAHE per z slice (0 < clip <= 1; skimage's default is 0.01).
        median: window size (pixels, >= 2) of an in-plane median filter per z slice.
        tophat: disk radius (pixels, >= 1) of an in-plane white top-hat per z slice.
    """

    threshold: float | None = None
    gamma: float | None = None
    clahe: float | None = None
    median: int | None = None
    tophat: int | None = None

    @property
    def rescales(self) -> bool:
        """True when a step after the threshold is on: the channel is then rescaled to float32 [0, 1]."""
        return any(v is not None for v in (self.gamma, self.clahe, self.median, self.tophat))

    def check(self) -> None:
        """UserError naming the CLI flag of the first invalid setting."""
        rules = [("threshold", self.threshold, lambda v: math.isfinite(v), "a finite number"),
                 ("gamma", self.gamma, lambda v: math.isfinite(v) and v > 0, "a positive number"),
                 ("clahe", self.clahe, lambda v: 0 < v <= 1, "a clip limit in (0, 1], e.g. 0.01")]
        for flag, value, ok, what in rules:
            if value is not None and not (raw_dataset.is_real(value) and ok(value)):
                raise UserError(f"invalid --{flag} {value!r}: give {what}")
        for flag, value, least in (("median", self.median, 2), ("tophat", self.tophat, 1)):
            if value is not None and not (raw_dataset.is_int(value) and value >= least):
                raise UserError(f"invalid --{flag} {value!r}: give an integer >= {least} (pixels)")


def preprocess_channel(channel: np.ndarray, steps: Preprocessing) -> np.ndarray:
    """One channel (z, y, x) through the enabled steps (see the module docstring for the order).

    Returns the input dtype if only the threshold (or nothing) is on, else float32 in [0, 1].
    """
    if steps.threshold is not None:
        channel = np.where(channel < steps.threshold, 0, channel).astype(channel.dtype)
    if not steps.rescales:
        return channel
    x = channel.astype(np.float32)
    low, high = float(x.min()), float(x.max())
    x = (x - low) / (high - low) if high > low else np.zeros_like(x)
    if steps.gamma is not None:
        x = x ** np.float32(steps.gamma)
    for z in range(x.shape[0]):
        x[z] = _preprocess_slice(x[z], steps)
    return x


def _preprocess_slice(plane: np.ndarray, steps: Preprocessing) -> np.ndarray:
    # CLAHE would map a constant (e.g. empty, thresholded) slice to all ones.
    if steps.clahe is not None and plane.max() > plane.min():
        plane = equalize_adapthist(plane, clip_limit=steps.clahe)
    if steps.median is not None:
        plane = ndimage.median_filter(plane, size=steps.median)
    if steps.tophat is not None:
        plane = white_tophat(plane, footprint=disk(steps.tophat))
    return plane


# ------------------------------------------------------------------------------------------------ reading


def read_channels(image: ImageSource, channel_axis: int | None = None) -> np.ndarray:
    """The (3, z, y, x) channels (Cy3, GFP, Hoechst) of one case, as stored (dtype unchanged).

    Args:
        image: one TIFF in (C, Z, Y, X) or (Z, C, Y, X) order, or a sequence of 3 TIFFs (z, y, x), one per channel.
        channel_axis: 0 for (C, Z, Y, X), 1 for (Z, C, Y, X); None picks the one of the two axes of size 3
            (UserError if both or neither are). Ignored for per-channel files.
    """
    if isinstance(image, (str, os.PathLike)):
        return _read_stacked(Path(image), channel_axis)
    paths = [Path(p) for p in image]
    if len(paths) != len(CHANNELS):
        raise UserError(f"{paths[0] if paths else 'case'}: {len(paths)} channel files given; give 3 "
                        f"({', '.join(CHANNELS)}) or one TIFF holding all channels")
    channels = [_read_tiff(p) for p in paths]
    for path, channel in zip(paths, channels):
        _check_intensities(path, channel)
        if channel.ndim != 3 or channel.shape != channels[0].shape:
            raise UserError(f"{path}: shape {channel.shape} differs from {paths[0].name} {channels[0].shape}; "
                            f"each channel file must be one (Z, Y, X) stack of the same size")
    return np.stack(channels)


def _read_stacked(path: Path, channel_axis: int | None) -> np.ndarray:
    array = _read_tiff(path)
    _check_intensities(path, array)
    if array.ndim != 4:
        raise UserError(f"{path}: shape {array.shape} is not 4D; give (C, Z, Y, X) or (Z, C, Y, X) with "
                        f"{len(CHANNELS)} channels, or one file per channel")
    if channel_axis is None:
        found = [axis for axis in LAYOUTS if array.shape[axis] == len(CHANNELS)]
        if len(found) != 1:
            why = "both axis 0 and axis 1 have" if found else "neither axis 0 nor axis 1 has"
            raise UserError(f"{path}: shape {array.shape}: {why} size {len(CHANNELS)}; pass --channel-axis 0 "
                            f"for {LAYOUTS[0]} or 1 for {LAYOUTS[1]}")
        channel_axis = found[0]
    if array.shape[channel_axis] != len(CHANNELS):
        raise UserError(f"{path}: {array.shape[channel_axis]} channels on axis {channel_axis} of {array.shape}; "
                        f"expected {len(CHANNELS)} ({', '.join(CHANNELS)}): check --channel-axis or the export")
    return np.moveaxis(array, channel_axis, 0)


def read_instances(path: PathLike, shape: tuple[int, int, int]) -> np.ndarray:
    """An instance label TIFF (z, y, x) of ``shape``: non-negative integers, 0 = background."""
    path = Path(path)
    array = _read_tiff(path)
    if array.shape != tuple(shape):
        raise UserError(f"{path}: label shape {array.shape} differs from the image's (Z, Y, X) {tuple(shape)}; "
                        f"pair each image with its own label file")
    if not np.issubdtype(array.dtype, np.integer):
        raise UserError(f"{path}: {array.dtype} labels are not instance ids; export integer instance labels "
                        f"(0 = background, 1..n = nuclei)")
    if array.size and array.min() < 0:
        raise UserError(f"{path}: negative instance id {array.min()}; use 0 for background and 1..n for nuclei")
    return array


def _read_tiff(path: Path) -> np.ndarray:
    if not path.is_file():
        raise UserError(f"{path} does not exist: check the path")
    return readers.read_tiff(path)


def _check_intensities(path: Path, array: np.ndarray) -> None:
    numeric = np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    if array.dtype == bool or not numeric:
        raise UserError(f"{path}: {array.dtype} is not an intensity image; give integer or float TIFFs")


# ------------------------------------------------------------------------------------------------ conversion


def convert(cases: Sequence[tuple[ImageSource, PathLike | None]], out_dir: PathLike, dataset_id: int,
            spacing: Sequence[float], name: str = "FUCCI", channel_axis: int | None = None, min_size: int = 0,
            preprocessing: Preprocessing | None = None, file_format: str = "nifti") -> Path:
    """Write ``out_dir/DatasetXXX_<name>/`` from FUCCI cases and return its path.

    Args:
        cases: (image, label) pairs; image as in ``read_channels``, label an instance TIFF or None (unlabeled case:
            its label file is all ignore).
        out_dir: nnU-Net raw folder.
        dataset_id: nnU-Net dataset id (1..999).
        spacing: voxel size (z, y, x), e.g. in um.
        name: dataset name.
        channel_axis: see ``read_channels``.
        min_size: instances under this many voxels become background.
        preprocessing: optional intensity steps per channel (``Preprocessing``); None = raw intensities.
        file_format: "nifti" (.nii.gz) or "tif" (Tiff3DIO TIFF + spacing JSON).

    Output: ``imagesTr/<name-lower>_NNN_000{0,1,2}`` (Cy3, GFP, Hoechst; input dtype, or float32 when
    preprocessing rescales), ``labelsTr/<name-lower>_NNN`` uint8. Everything is read and checked before anything is
    written (so each file is read twice; memory: one case); the dataset appears atomically and passes nnU-Net's
    ``verify_dataset_integrity``.

    Raises:
        UserError: bad arguments or input files (one line naming the file), or the dataset id is taken.
    """
    raw_dataset.check_dataset_id_and_name(dataset_id, name)
    raw_dataset.check_file_format(file_format)
    spacing = raw_dataset.check_spacing(spacing)
    steps = preprocessing or Preprocessing()
    steps.check()
    if not raw_dataset.is_int(min_size) or min_size < 0:
        raise UserError(f"invalid --min-size {min_size!r}: give a number of voxels >= 0")
    if channel_axis is not None and channel_axis not in LAYOUTS:
        raise UserError(f"invalid --channel-axis {channel_axis!r}: 0 for {LAYOUTS[0]}, 1 for {LAYOUTS[1]}")
    cases = list(cases)
    if not cases:
        raise UserError("no cases given: pass --case IMAGE LABEL (or --case CY3 GFP HOECHST LABEL)")
    if all(label is None for _, label in cases):
        raise UserError("no case has a label file: give at least one instance label TIFF to train on")
    raw_dataset.check_free(Path(out_dir), dataset_id, name)
    # Read every case once before writing: a bad file fails here, not halfway through the dataset.
    for image, label in cases:
        _load_case(image, label, channel_axis)
    ids = [f"{name.lower()}_{i:03d}" for i in range(len(cases))]
    with raw_dataset.atomic_dataset_folder(out_dir, dataset_id, name) as folder:
        (folder / "imagesTr").mkdir()
        (folder / "labelsTr").mkdir()
        depths = {}
        for case, (image, label) in zip(ids, cases):
            channels, instances = _load_case(image, label, channel_axis)
            semantic = (np.full(channels.shape[1:], IGNORE_LABEL, np.uint8) if instances is None
                        else instances_to_semantic(instances, min_size=min_size))
            _write_channels([preprocess_channel(c, steps) for c in channels], folder / "imagesTr", case, spacing,
                            file_format)
            raw_dataset.write_image(semantic, folder / "labelsTr" / case, spacing, file_format)
            depths[case] = channels.shape[1]
        config = {"cases": [_describe(case, image, label) for case, (image, label) in zip(ids, cases)],
                  "channel_axis": channel_axis, "min_size": int(min_size), "preprocessing": asdict(steps)}
        document = _dataset_json(name, cases, ids, depths, spacing, file_format, config)
        (folder / "dataset.json").write_text(json.dumps(document, indent=2) + "\n")
        raw_dataset.verify_raw_dataset(folder)
    return Path(out_dir) / raw_dataset.dataset_folder_name(dataset_id, name)


def _load_case(image: ImageSource, label: PathLike | None, channel_axis: int | None
               ) -> tuple[np.ndarray, np.ndarray | None]:
    channels = read_channels(image, channel_axis)
    return channels, None if label is None else read_instances(label, channels.shape[1:])


def _describe(case: str, image: ImageSource, label: PathLike | None) -> dict:
    sources = [str(image)] if isinstance(image, (str, os.PathLike)) else [str(p) for p in image]
    return {"case": case, "image": sources, "label": None if label is None else str(label)}


def _dataset_json(name: str, cases: list, ids: list[str], depths: dict, spacing: tuple, file_format: str,
                  config: dict) -> dict:
    labelled = {case: label is not None for case, (_, label) in zip(ids, cases)}
    labels = dict(LABELS)
    if not all(labelled.values()):
        labels["ignore"] = IGNORE_LABEL
    description = ("FUCCI spheroids (confocal): channels Cy3, GFP, Hoechst; labels from nucleus instances as "
                   "border (instance minus its 6-connectivity erosion) and interior; unlabeled cases are all ignore")
    return raw_dataset.dataset_json(
        name, dict(enumerate(CHANNELS)), labels, len(ids), file_format, description=description,
        annotation_axis=0, annotated_slices={c: list(range(depths[c])) if labelled[c] else [] for c in ids},
        spacing=list(spacing), fucci=config)


def _write_channels(channels: Sequence[np.ndarray], images_dir: Path, case: str, spacing: tuple,
                    file_format: str) -> None:
    for index, channel in enumerate(channels):
        raw_dataset.write_image(channel, images_dir / case, spacing, file_format, channel=index)


# ------------------------------------------------------------------------------------------------ CLI


def _case_argument(values: list[str]) -> tuple[ImageSource, str | None]:
    if len(values) not in (2, len(CHANNELS) + 1):
        raise UserError(f"--case {' '.join(values)}: give IMAGE LABEL or CY3 GFP HOECHST LABEL (LABEL '-' for an "
                        f"unlabeled case)")
    *images, label = values
    return (images[0] if len(images) == 1 else images), (None if label == "-" else label)


def _run(args) -> None:
    out_dir = raw_output_folder(args.out)
    steps = Preprocessing(threshold=args.threshold, gamma=args.gamma, clahe=args.clahe, median=args.median,
                          tophat=args.tophat)
    folder = convert([_case_argument(c) for c in args.case], out_dir, args.dataset_id, tuple(args.spacing),
                     name=args.name, channel_axis=args.channel_axis, min_size=args.min_size, preprocessing=steps,
                     file_format=args.format)
    print(f"wrote {folder}")


def register_cli(subparsers) -> None:
    """Add ``fucci`` to ``nnunet-ext convert``'s subcommands."""
    parser = subparsers.add_parser("fucci", help="FUCCI spheroids: 3-channel confocal + nucleus instance labels")
    add_output_arguments(parser, "FUCCI", "FUCCI")
    parser.add_argument("--case", nargs="+", action="append", required=True, metavar="FILE",
                        help="IMAGE LABEL or CY3 GFP HOECHST LABEL (LABEL '-': unlabeled case); repeat per case")
    parser.add_argument("--spacing", type=float, nargs=3, required=True, metavar=("Z", "Y", "X"),
                        help="voxel size, e.g. in um")
    parser.add_argument("--channel-axis", type=int, choices=tuple(LAYOUTS),
                        help="0: (C, Z, Y, X), 1: (Z, C, Y, X); default: the axis of size 3")
    parser.add_argument("--min-size", type=int, default=0, help="instances under N voxels become background")
    steps = parser.add_argument_group("preprocessing (per channel, in this order; all off by default)")
    steps.add_argument("--threshold", type=float, help="raw values below T become 0")
    steps.add_argument("--gamma", type=float, help="gamma on the [0, 1]-rescaled channel")
    steps.add_argument("--clahe", type=float, metavar="CLIP", help="CLAHE per slice with this clip limit")
    steps.add_argument("--median", type=int, metavar="SIZE", help="in-plane median filter window")
    steps.add_argument("--tophat", type=int, metavar="RADIUS", help="in-plane white top-hat disk radius")
    parser.set_defaults(func=_run)
