"""The datasets ``nnunet-ext benchmark`` trains on: sparsity levels and dataset recipes.

A recipe writes one sparse nnU-Net raw dataset per sparsity level (and per seed, where the data itself depends on
the seed), each with ``labelsTr`` (sparse, ignore elsewhere), ``labelsTr_dense`` (dense truth of the training
cases) and ``imagesTs``/``labelsTs`` (whole held-out volumes with dense truth):

- ``synth``: ``nnunet-ext synth`` volumes; the seed draws new volumes, so every seed is a new dataset.
- ``vesselnn``: the two-photon vessel volumes of the vesselNN dataset (Teikari et al. 2016; GitHub
  petteriTeikari/vesselNN_dataset: 9 image/label TIFF pairs), made binary (vessel = label > 0), downsampled
  in-plane, every third case (sorted by name) held out as a test volume; then
  ``nnunet-ext sparsify``. The seed only repeats the training.
- ``gala_fibsem``: the FIB-SEM volume of gala's example data (GitHub janelia-flyem/gala,
  ``tests/example-data/train-image.h5`` and ``train-gt.lzf.h5``, key ``stack``), neuron boundaries (instance id 0)
  as the foreground class, cut into 4 tiles along x (the last one is the test volume); then ``nnunet-ext sparsify``.
- ``dense`` (``--dense``): any dense nnU-Net raw dataset (NIfTI or TIFF, any channels and classes), copied with
  its imagesTs/labelsTs as test volumes, or with a reproducible share of its cases held out; then
  ``nnunet-ext sparsify``.

Every recipe but synth is a writer of one dense raw dataset that goes through the same ``sparsify`` path.
"""

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnunet_ext.datasets.raw_dataset import (
    atomic_dataset_folder,
    dataset_folder_name,
    dataset_json,
    verify_raw_dataset,
    write_image,
)
from nnunet_ext.errors import UserError

_SPARSITY = re.compile(r"^(?:(every|slices):)?(\d+)$")


@dataclass(frozen=True)
class Sparsity:
    """Annotate every k-th slice (``every``) or N evenly spaced slices (``n_slices``) per volume."""

    every: int | None = None
    n_slices: int | None = None

    @classmethod
    def parse(cls, text: str) -> "Sparsity":
        """``every:4`` (or ``4``) -> every 4th slice; ``slices:3`` -> 3 slices per volume."""
        match = _SPARSITY.match(str(text).strip())
        if not match or int(match.group(2)) < 1:
            raise UserError(f"invalid sparsity {text!r}: write every:K (every k-th slice, K >= 1) or slices:N "
                            f"(N slices per volume), e.g. --sparsity every:4 every:8")
        count = int(match.group(2))
        return cls(n_slices=count) if match.group(1) == "slices" else cls(every=count)

    @property
    def label(self) -> str:
        return f"every{self.every}" if self.every is not None else f"slices{self.n_slices}"

    @property
    def description(self) -> str:
        return f"every {self.every}th slice" if self.every is not None else f"{self.n_slices} slices per volume"

    @property
    def annotated_share(self) -> float | None:
        """Share of slices annotated (for plots); None for a fixed slice count, whose share depends on the volume."""
        return 1.0 / self.every if self.every is not None else None


# --------------------------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class Recipe:
    name: str
    per_seed: bool  # True: the seed changes the data, so each seed gets its own dataset
    default_sparsities: tuple[str, ...]
    needs_data: bool
    # The default CPU budget (tiny plans) from `nnunet-ext benchmark converge` (numbers in the README): where stock
    # nnU-Net's annotated-slice Dice converged, or the largest budget measured; None: not measured (fallback).
    budget_epochs: int | None = None
    budget_iterations: int | None = None


DENSE = "dense"
RECIPES = {
    "synth": Recipe("synth", per_seed=True, default_sparsities=("every:4", "every:8"), needs_data=False,
                    budget_epochs=100, budget_iterations=50),
    "vesselnn": Recipe("vesselnn", per_seed=False, default_sparsities=("slices:5", "slices:3"), needs_data=True,
                       budget_epochs=200, budget_iterations=50),  # not converged there yet
    "gala_fibsem": Recipe("gala_fibsem", per_seed=False, default_sparsities=("every:5", "every:10"),
                          needs_data=True, budget_epochs=100, budget_iterations=50),  # not converged there yet
    DENSE: Recipe(DENSE, per_seed=False, default_sparsities=("every:4", "every:8"), needs_data=True),
}
BUILT_IN_RECIPES = tuple(name for name in RECIPES if name != DENSE)
GALA_FILES = ("train-image.h5", "train-gt.lzf.h5")
GALA_KEY = "stack"

SYNTH_CASES = dict(num_cases=6, num_test_cases=2, shape=(24, 64, 64))
VESSELNN_SPACING = (5.0, 1.0, 1.0)  # um; the source gives 5 um between slices and 0.6-2.5 um in-plane per file
VESSELNN_IN_PLANE_FACTOR = 4  # 512 -> 128 in-plane: volumes a 2-core CPU trains on in minutes
GALA_TILES = 4


def write_sparse_dataset(recipe: str, raw_dir: Path, dataset_id: int, name: str, sparsity: Sparsity, seed: int,
                         dense_source: Path | None = None) -> Path:
    """One sparse raw dataset of ``recipe``; real-data recipes sparsify ``dense_source`` (see ``write_dense``)."""
    if recipe == "synth":
        from nnunet_ext.datasets.synth import write_synthetic_dataset

        return write_synthetic_dataset(raw_dir, dataset_id, name=name, every=sparsity.every,
                                       n_slices=sparsity.n_slices, seed=seed, **SYNTH_CASES)
    from nnunet_ext.datasets.sparsify import sparsify_dataset

    return sparsify_dataset(dense_source, raw_dir, dataset_id, name=name, every=sparsity.every,
                            n_slices=sparsity.n_slices)


def check_data(recipe: str, data_dir: Path, test_cases: int | None = None) -> None:
    """Cheap checks of a recipe's input, run before the benchmark writes anything; UserError when it cannot work."""
    data_dir = Path(data_dir)
    if recipe == DENSE:
        dense_test_split(data_dir, test_cases)
        return
    if not data_dir.is_dir():
        raise UserError(f"--data {data_dir} is not a folder: pass the folder of the {recipe} files")
    if recipe == "vesselnn":
        vesselnn_pairs(data_dir)
    elif recipe == "gala_fibsem":
        import h5py

        for file in GALA_FILES:
            try:
                with h5py.File(data_dir / file, "r") as f:
                    found = list(f.keys())
            except OSError as error:
                raise UserError(f"{data_dir / file}: cannot open it as HDF5 ({error}); pass the gala_fibsem folder "
                                f"as --data") from None
            if GALA_KEY not in found:
                raise UserError(f"{data_dir / file}: no dataset {GALA_KEY!r} (found: {', '.join(found) or 'none'}); "
                                f"the gala_fibsem recipe reads the volumes of janelia-flyem/gala's example data")


def training_slice_counts(recipe: str, data_dir: Path | None, test_cases: int | None = None) -> dict[str, int]:
    """Slices along axis 0 (the axis the benchmark annotates) of each training volume ``recipe`` writes, read from
    file headers before anything is written; keys name the volumes for error messages."""
    if recipe == "synth":
        return {f"synth training volume {i}": SYNTH_CASES["shape"][0] for i in range(SYNTH_CASES["num_cases"])}
    data_dir = Path(data_dir)
    check_data(recipe, data_dir, test_cases)
    if recipe == DENSE:
        from nnunet_ext.datasets.sparsify import label_shape

        _, ending, train, _ = dense_test_split(data_dir, test_cases)
        return {case: label_shape(data_dir / "labelsTr" / f"{case}{ending}")[0] for case in train}
    if recipe == "vesselnn":
        import tifffile

        def slices(label: Path) -> int:
            with tifffile.TiffFile(label) as tif:
                return tif.series[0].shape[0]

        return {key: slices(label) for index, (key, (_, label)) in enumerate(vesselnn_pairs(data_dir).items())
                if _vesselnn_split(index) == "Tr"}
    import h5py

    with h5py.File(data_dir / GALA_FILES[1], "r") as f:
        depth = f[GALA_KEY].shape[0]
    return {f"gala_{index:03d}": depth for index in range(GALA_TILES - 1)}  # tiles along x keep every z slice


def write_dense(recipe: str, data_dir: Path, raw_dir: Path, dataset_id: int, name: str,
                test_cases: int | None = None) -> Path:
    """The dense raw dataset of a real-data recipe (``dense``: a copy of ``data_dir`` with its test split)."""
    data_dir = Path(data_dir)
    check_data(recipe, data_dir, test_cases)
    with atomic_dataset_folder(raw_dir, dataset_id, name) as folder:
        if recipe == DENSE:
            _write_dense_copy(data_dir, folder, name, test_cases)
        else:
            {"vesselnn": _write_vesselnn, "gala_fibsem": _write_gala}[recipe](data_dir, folder, name)
        verify_raw_dataset(folder)
    return Path(raw_dir) / dataset_folder_name(dataset_id, name)


def held_out_cases(cases: list[str], count: int | None) -> list[str]:
    """The test cases held out of ``cases`` (sorted): ``count`` evenly spread ones, or (None) every third case.

    >>> held_out_cases(["a", "b", "c", "d", "e", "f", "g"], None)
    ['c', 'f']
    >>> held_out_cases(["a", "b", "c", "d"], 2)
    ['b', 'd']
    """
    cases = sorted(cases)
    if count is None:
        return [case for i, case in enumerate(cases) if i % 3 == 2] or cases[-1:]
    if not 1 <= count < len(cases):
        raise UserError(f"--test-cases {count}: the dataset has {len(cases)} cases; hold out 1 to {len(cases) - 1} "
                        f"so that at least one is left for training")
    step = len(cases) / count
    return [cases[int((i + 1) * step) - 1] for i in range(count)]


def dense_test_split(source: Path, test_cases: int | None) -> tuple[dict, str, list[str], list[str]]:
    """(dataset.json, file ending, training cases, cases to hold out) of a dense dataset; UserError if unusable.

    Test volumes are the source's imagesTs/labelsTs when it has labelsTs (nothing held out then), else
    ``held_out_cases``.
    """
    from nnunet_ext.datasets.sparsify import check_dense_source

    source = Path(source)
    if not source.is_dir():
        raise UserError(f"--dense {source}: no such dataset folder; pass a dense nnU-Net raw dataset (an id or name "
                        f"in $nnUNet_raw, or a folder)")
    document, ending, cases = check_dense_source(source)
    if len([v for v in document["labels"].values() if v != 0]) < 1:
        raise UserError(f"{source / 'dataset.json'}: needs background and at least one foreground class")
    if (source / "labelsTs").is_dir() and any((source / "labelsTs").glob(f"*{ending}")):
        if test_cases is not None:
            raise UserError(f"--test-cases {test_cases}: {source} has its own labelsTs, which are the test volumes; "
                            f"drop --test-cases")
        return document, ending, cases, []
    if len(cases) < 2:
        raise UserError(f"{source} has {len(cases)} labelled case and no labelsTs: the benchmark needs at least two "
                        f"cases (one to train on, one to test) or test volumes in imagesTs/labelsTs")
    held = held_out_cases(cases, test_cases)
    return document, ending, [c for c in cases if c not in held], held


def _write_dense_copy(source: Path, folder: Path, name: str, test_cases: int | None) -> None:
    """Copy a dense dataset; the held-out cases' images and labels go to imagesTs/labelsTs."""
    document, ending, train, held = dense_test_split(source, test_cases)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir()
    for sub in ("imagesTs", "labelsTs"):  # the source's own test volumes
        if not held and (source / sub).is_dir():
            shutil.copytree(source / sub, folder / sub, dirs_exist_ok=True)
    for case in train + held:
        split = "Ts" if case in held else "Tr"
        # Images are <case>_XXXX<ending>, labels <case><ending>; a TIFF's spacing file <stem>.json goes along.
        images = list((source / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9]*"))
        if not images:
            raise UserError(f"{source / 'imagesTr'} holds no image of case {case!r}: check the dataset")
        files = [(f, "images") for f in images + list((source / "imagesTr").glob(f"{case}.json"))]
        files += [(f, "labels") for f in (source / "labelsTr").glob(f"{case}.*")]
        for file, kind in files:
            shutil.copy2(file, folder / f"{kind}{split}" / file.name)
    document = {**document, "name": name, "numTraining": len(train),
                "description": f"{document.get('description', '')} (nnunet-ext benchmark copy of {source.resolve()}; "
                               f"held out as test volumes: {', '.join(held) or 'its own imagesTs/labelsTs'})".strip()}
    (folder / "dataset.json").write_text(json.dumps(document, indent=2) + "\n")


def vesselnn_pairs(data_dir: Path) -> dict[str, tuple[Path, Path]]:
    """``{key: (image, label)}``: ``images/<key>_BM4D_denoised.tif`` with the label file starting with ``<key>``."""
    images = sorted((data_dir / "images").glob("*_BM4D_denoised.tif"))
    labels = sorted((data_dir / "labels").glob("*.tif"))
    if not images:
        raise UserError(f"{data_dir / 'images'} holds no *_BM4D_denoised.tif: pass the vesselnn folder as --data")
    pairs = {}
    for image in images:
        key = image.name[:-len("_BM4D_denoised.tif")]
        matches = [label for label in labels if label.name.startswith(key)]
        if len(matches) != 1:
            raise UserError(f"{image}: expected one label file starting with {key!r} in {data_dir / 'labels'}, "
                            f"found {len(matches)}")
        pairs[key] = (image, matches[0])
    return pairs


def _vesselnn_split(index: int) -> str:
    """"Ts" for every third vesselnn volume (the test volumes), else "Tr"."""
    return "Ts" if index % 3 == 2 else "Tr"


def _write_vesselnn(data_dir: Path, folder: Path, name: str) -> None:
    from nnunet_ext.dataset_conversion.lsfm import downsample_in_plane
    from nnunet_ext.datasets.readers import read_tiff

    pairs = vesselnn_pairs(data_dir)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir()
    train = []
    for index, (key, (image_file, label_file)) in enumerate(pairs.items()):
        image, label = read_tiff(image_file), read_tiff(label_file)
        if image.shape != label.shape:
            raise UserError(f"{label_file} has shape {label.shape}, its image {image.shape}: check the pairing")
        size = image.shape[1] // VESSELNN_IN_PLANE_FACTOR
        (image,), label, spacing = downsample_in_plane([image], (label > 0).astype(np.uint8), VESSELNN_SPACING,
                                                       size)
        split = _vesselnn_split(index)
        write_image(image, folder / f"images{split}" / key, spacing, channel=0)
        write_image(label, folder / f"labels{split}" / key, spacing)
        if split == "Tr":
            train.append(key)
    document = dataset_json(name, {0: "two-photon"}, {"background": 0, "vessel": 1}, len(train),
                            description="vesselNN two-photon vasculature (Teikari et al. 2016), dense labels, "
                                        f"in-plane downsampled {VESSELNN_IN_PLANE_FACTOR}x; nominal spacing",
                            source=str(data_dir.resolve()))
    (folder / "dataset.json").write_text(json.dumps(document, indent=2) + "\n")


def _write_gala(data_dir: Path, folder: Path, name: str) -> None:
    from nnunet_ext.datasets.readers import read_hdf5

    image, instances = (read_hdf5(data_dir / file, GALA_KEY) for file in GALA_FILES)
    if image.shape != instances.shape:
        raise UserError(f"{data_dir}: image {image.shape} and labels {instances.shape} differ in shape")
    boundary = (instances == 0).astype(np.uint8)  # gala marks the boundaries between neurons with id 0
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir()
    tiles = np.array_split(np.arange(image.shape[2]), GALA_TILES)
    for index, columns in enumerate(tiles):
        split = "Ts" if index == GALA_TILES - 1 else "Tr"
        case = f"gala_{index:03d}"
        window = np.s_[:, :, columns[0]:columns[-1] + 1]
        write_image(image[window], folder / f"images{split}" / case, (1.0, 1.0, 1.0), channel=0)
        write_image(boundary[window], folder / f"labels{split}" / case, (1.0, 1.0, 1.0))
    document = dataset_json(name, {0: "FIB-SEM"}, {"background": 0, "boundary": 1}, GALA_TILES - 1,
                            description="gala FIB-SEM (Drosophila medulla): neuron boundaries, dense, tiled along x",
                            source=str(data_dir.resolve()))
    (folder / "dataset.json").write_text(json.dumps(document, indent=2) + "\n")
