"""Tests for nnunet_ext.datasets.sparsify: hold-out split and sparse copies of dense nnU-Net raw datasets.

nnU-Net's integrity check spawns a worker (~4 s), so it runs for real twice (a hand-built NIfTI dataset and a crop of
the real FIB-SEM data); the other tests replace it with a recorder.
"""

import argparse
import filecmp
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile

from nnunet_ext.datasets import sparsify
from nnunet_ext.datasets.raw_dataset import dataset_json, write_image
from nnunet_ext.datasets.readers import read_hdf5
from nnunet_ext.datasets.sparsify import sparsify_dataset, split_holdout
from nnunet_ext.errors import UserError

SHAPE = (6, 4, 5)  # z, y, x
SPACING = (3.0, 0.5, 0.25)
CASES = ("cell_000", "cell_001")
LABELS = {"background": 0, "membrane": 1, "nucleus": 2}
FIBSEM = Path(__file__).resolve().parents[2] / "shared" / "data" / "gala_fibsem"


def dense_label(case_index):
    """Every z slice differs (value pattern shifted by z and case), so a wrong slice shows."""
    z, y, x = np.indices(SHAPE)
    return ((z + y + 2 * x + case_index) % 3).astype(np.uint8)


def write_dense_dataset(raw, file_format="nifti", name="Dataset100_Cells", with_test=True, labels=LABELS):
    """Two training cases with two channels, one test case; images differ per channel and case."""
    folder = raw / name
    for sub in ("imagesTr", "labelsTr") + (("imagesTs", "labelsTs") if with_test else ()):
        (folder / sub).mkdir(parents=True)
    for i, case in enumerate(CASES):
        for c in range(2):
            image = (np.arange(np.prod(SHAPE)).reshape(SHAPE) + 100 * c + 1000 * i).astype(np.int16)
            write_image(image, folder / "imagesTr" / f"{case}_{c:04d}", SPACING, file_format)
        write_image(dense_label(i), folder / "labelsTr" / case, SPACING, file_format)
    if with_test:
        write_image(np.zeros(SHAPE, np.int16), folder / "imagesTs" / "cell_100_0000", SPACING, file_format)
        write_image(dense_label(5), folder / "labelsTs" / "cell_100", SPACING, file_format)
    document = dataset_json("Cells", {0: "membrane_dye", 1: "nuclear_dye"}, labels, len(CASES), file_format,
                            licence="CC-BY-4.0")
    (folder / "dataset.json").write_text(json.dumps(document))
    return folder


def read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def expected_sparse(dense, slices, axis=0, ignore=3):
    out = np.full_like(dense, ignore)
    for s in slices:
        index = [slice(None)] * 3
        index[axis] = s
        out[tuple(index)] = dense[tuple(index)]
    return out


def listing(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else None


@pytest.fixture
def verified(monkeypatch):
    """Replaces nnU-Net's integrity check with a recorder of the folders it was asked to check."""
    calls = []
    monkeypatch.setattr(sparsify, "verify_raw_dataset", lambda folder: calls.append(folder.name))
    return calls


@pytest.fixture
def source(tmp_path):
    return write_dense_dataset(tmp_path / "raw")


# ------------------------------------------------------------------------------------ split_holdout


@pytest.mark.parametrize("slices, fraction, n_held", [
    (range(10), 0.25, 3),  # 2.5 rounds up
    (range(10), 0.2, 2),
    ([3, 7], 0.1, 1),  # 0.2 rounds to 0, but a positive fraction holds out at least one
    ([4, 9, 14, 19, 24, 29, 34], 0.3, 2),
    (range(10), 0.0, 0),
])
def test_split_holdout_counts(slices, fraction, n_held):
    train, held = split_holdout(slices, fraction, seed=0)
    assert len(held) == n_held
    assert sorted(train + held) == sorted(slices) and not set(train) & set(held)
    assert train == sorted(train) and held == sorted(held)


def test_split_holdout_is_deterministic_per_seed_and_case():
    draws = {(seed, case): split_holdout(range(20), 0.5, seed, case)[1] for seed in (0, 1) for case in (0, 1)}
    assert split_holdout(range(20), 0.5, 0, 0)[1] == draws[0, 0]
    assert len(set(map(tuple, draws.values()))) == 4  # seed and case index both change the draw


@pytest.mark.parametrize("slices, fraction, fragment", [
    ([5], 0.5, "holding out 1 of 1 annotated slices leaves none for training"),
    ([1, 2], 1.0, "invalid hold-out fraction 1.0"),
    ([1, 2], -0.1, "invalid hold-out fraction -0.1"),
    ([1, 2], "0.2", "invalid hold-out fraction '0.2'"),
])
def test_split_holdout_errors(slices, fraction, fragment):
    with pytest.raises(UserError, match=fragment):
        split_holdout(slices, fraction, seed=0)


# ------------------------------------------------------------------------------------ sparsify_dataset


def test_every_k_with_nnunet_check(tmp_path, source):
    folder = sparsify_dataset(source, tmp_path / "out", 101, every=2)
    assert folder == tmp_path / "out" / "Dataset101_Cells_sparse"
    assert listing(folder) == ["dataset.json", "imagesTr", "imagesTs", "labelsTr", "labelsTr_dense", "labelsTs"]
    for i, case in enumerate(CASES):
        sparse = read(folder / "labelsTr" / f"{case}.nii.gz")
        assert sparse.dtype == np.uint8
        np.testing.assert_array_equal(sparse, expected_sparse(dense_label(i), [0, 2, 4]))
        assert filecmp.cmp(folder / "labelsTr_dense" / f"{case}.nii.gz", source / "labelsTr" / f"{case}.nii.gz",
                           shallow=False)
    for sub in ("imagesTr", "imagesTs", "labelsTs"):
        assert listing(folder / sub) == listing(source / sub)
        assert all(filecmp.cmp(folder / sub / f, source / sub / f, shallow=False) for f in listing(source / sub))
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["labels"] == {**LABELS, "ignore": 3}
    assert meta["name"] == "Cells_sparse" and meta["numTraining"] == 2 and meta["licence"] == "CC-BY-4.0"
    assert meta["channel_names"] == {"0": "membrane_dye", "1": "nuclear_dye"}
    assert meta["annotation_axis"] == 0
    assert meta["annotated_slices"] == {case: [0, 2, 4] for case in CASES}
    assert meta["holdout_slices"] == {case: [] for case in CASES}
    assert meta["spacing"] == [3.0, 0.5, 0.25]
    assert meta["sparsify"] == {"source": str(source.resolve()), "axis": 0, "every": 2, "n_slices": None,
                                "holdout_fraction": 0.0, "seed": 0}


def test_n_slices_along_y(tmp_path, source, verified):
    folder = sparsify_dataset(source, tmp_path / "out", 102, name="Along_y", axis=1, n_slices=2)
    # N=2 of 4 slices: floor((i + 0.5) * 4 / 2) = 1, 3
    for i, case in enumerate(CASES):
        np.testing.assert_array_equal(read(folder / "labelsTr" / f"{case}.nii.gz"),
                                      expected_sparse(dense_label(i), [1, 3], axis=1))
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["annotation_axis"] == 1 and meta["annotated_slices"] == {case: [1, 3] for case in CASES}
    assert len(verified) == 1


def test_holdout(tmp_path, source, verified):
    folder = sparsify_dataset(source, tmp_path / "out", 103, n_slices=5, holdout_fraction=0.4, seed=2)
    meta = json.loads((folder / "dataset.json").read_text())
    kept = [0, 1, 3, 4, 5]  # floor((2i + 1) * 6 / 10)
    for i, case in enumerate(CASES):
        train, held = split_holdout(kept, 0.4, 2, case_index=i)
        assert len(held) == 2
        assert meta["annotated_slices"][case] == train and meta["holdout_slices"][case] == held
        np.testing.assert_array_equal(read(folder / "labelsTr" / f"{case}.nii.gz"),
                                      expected_sparse(dense_label(i), train))
        np.testing.assert_array_equal(read(folder / "labelsTr_holdout" / f"{case}.nii.gz"),
                                      expected_sparse(dense_label(i), held))
    again = sparsify_dataset(source, tmp_path / "out", 104, name="again", n_slices=5, holdout_fraction=0.4, seed=2)
    assert json.loads((again / "dataset.json").read_text())["holdout_slices"] == meta["holdout_slices"]


def test_tiff_source_keeps_tiff(tmp_path, verified):
    source = write_dense_dataset(tmp_path / "raw", file_format="tif", with_test=False)
    folder = sparsify_dataset(source, tmp_path / "out", 105, every=3)
    assert listing(folder / "labelsTr") == ["cell_000.json", "cell_000.tif", "cell_001.json", "cell_001.tif"]
    np.testing.assert_array_equal(tifffile.imread(folder / "labelsTr" / "cell_001.tif"),
                                  expected_sparse(dense_label(1), [0, 3]))
    assert json.loads((folder / "labelsTr" / "cell_001.json").read_text()) == {"spacing": [3.0, 0.5, 0.25]}
    assert filecmp.cmp(folder / "labelsTr_dense" / "cell_001.tif", source / "labelsTr" / "cell_001.tif",
                       shallow=False)
    assert (folder / "labelsTr_dense" / "cell_001.json").is_file()
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["file_ending"] == ".tif" and meta["overwrite_image_reader_writer"] == "Tiff3DIO"


def test_ignore_label_widens_the_dtype(tmp_path, verified):
    labels = {"background": 0, **{f"c{v}": v for v in range(1, 256)}}
    source = write_dense_dataset(tmp_path / "raw", labels=labels, with_test=False)
    folder = sparsify_dataset(source, tmp_path / "out", 106, every=5)
    sparse = read(folder / "labelsTr" / "cell_000.nii.gz")
    assert sparse.dtype == np.uint16 and sparse[1].tolist() == np.full(SHAPE[1:], 256).tolist()
    assert json.loads((folder / "dataset.json").read_text())["labels"]["ignore"] == 256


def test_cli(tmp_path, source, verified, monkeypatch, capsys):
    parser = argparse.ArgumentParser(prog="nnunet-ext")
    sparsify.register_cli(parser.add_subparsers(dest="command"))
    monkeypatch.setenv("nnUNet_raw", str(source.parent))
    args = parser.parse_args(["sparsify", "100", "-d", "107", "--slices", "3", "--holdout", "0.3", "--seed", "4"])
    args.func(args)
    folder = source.parent / "Dataset107_Cells_sparse"
    assert capsys.readouterr().out.strip() == f"wrote {folder}"
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["sparsify"]["n_slices"] == 3 and meta["sparsify"]["seed"] == 4
    with pytest.raises(SystemExit):
        parser.parse_args(["sparsify", "100", "-d", "108", "--slices", "3", "--every", "2"])


def test_real_fibsem_crop(tmp_path):
    """A dense dataset from a crop of the real FIB-SEM volume (boundary vs neuron), sparsified like Pagano et al."""
    if not FIBSEM.is_dir():
        pytest.skip(f"{FIBSEM} is not available")
    image = read_hdf5(FIBSEM / "train-image.h5", "stack")[:20, :40, :40]
    boundary = (read_hdf5(FIBSEM / "train-gt.lzf.h5", "stack")[:20, :40, :40] == 0).astype(np.uint8)
    folder = tmp_path / "raw" / "Dataset120_Gala"
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True)
    spacing = (0.01, 0.01, 0.01)
    write_image(image, folder / "imagesTr" / "gala_000_0000", spacing)
    write_image(boundary, folder / "labelsTr" / "gala_000", spacing)
    (folder / "dataset.json").write_text(json.dumps(
        dataset_json("Gala", {0: "EM"}, {"background": 0, "boundary": 1}, 1)))
    out = sparsify_dataset(folder, tmp_path / "raw", 121, n_slices=7, holdout_fraction=0.3)
    meta = json.loads((out / "dataset.json").read_text())
    kept = [1, 4, 7, 10, 12, 15, 18]  # floor((2i + 1) * 20 / 14)
    assert sorted(meta["annotated_slices"]["gala_000"] + meta["holdout_slices"]["gala_000"]) == kept
    assert len(meta["holdout_slices"]["gala_000"]) == 2
    sparse = read(out / "labelsTr" / "gala_000.nii.gz")
    np.testing.assert_array_equal(sparse, expected_sparse(boundary, meta["annotated_slices"]["gala_000"], ignore=2))


# ------------------------------------------------------------------------------------ refusals


def _sparse_source(tmp, source):
    document = json.loads((source / "dataset.json").read_text())
    document["labels"]["ignore"] = 3
    (source / "dataset.json").write_text(json.dumps(document))
    return {}, "already has an ignore label, so it is not dense"


def _no_dataset_json(tmp, source):
    (source / "dataset.json").unlink()
    return {}, "has no dataset.json"


def _too_many_slices(tmp, source):
    return dict(n_slices=7), "cell_000.nii.gz: invalid sparsity: --slices 7 exceeds the 6 slices along the annotation"


def _both_sparsities(tmp, source):
    return dict(every=2, n_slices=2), "both --every and --slices"


def _bad_axis(tmp, source):
    return dict(axis=3), "invalid annotation axis 3"


def _unsupported_ending(tmp, source):
    document = json.loads((source / "dataset.json").read_text())
    (source / "dataset.json").write_text(json.dumps({**document, "file_ending": ".mha"}))
    return {}, "file_ending '.mha' is not supported"


def _taken_id(tmp, source):
    (tmp / "out" / "Dataset110_Taken").mkdir(parents=True)
    return {}, "Dataset110_Taken already exists"


def _holdout_all(tmp, source):
    return dict(every=4, holdout_fraction=0.9), "cell_000.nii.gz: holding out 2 of 2 annotated slices"


@pytest.mark.parametrize("case", [_sparse_source, _no_dataset_json, _too_many_slices, _both_sparsities, _bad_axis,
                                  _unsupported_ending, _taken_id, _holdout_all],
                         ids=lambda case: case.__name__.strip("_"))
def test_refusals_leave_nothing(tmp_path, source, verified, case):
    changes, fragment = case(tmp_path, source)
    before = listing(tmp_path / "out")
    arguments = {"every": 2, **changes} if "n_slices" not in changes else changes
    with pytest.raises(UserError) as info:
        sparsify_dataset(source, tmp_path / "out", 110, **arguments)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    assert listing(tmp_path / "out") == before and verified == []


def test_failing_integrity_check_leaves_nothing(tmp_path, source, monkeypatch):
    def failing(folder):
        raise UserError("the converted dataset fails nnU-Net's integrity check: test")

    monkeypatch.setattr(sparsify, "verify_raw_dataset", failing)
    with pytest.raises(UserError, match="integrity check"):
        sparsify_dataset(source, tmp_path / "out", 111, every=2)
    assert not (tmp_path / "out").exists()
