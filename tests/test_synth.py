"""Tests for nnunet_ext.datasets.synth: sparsity helpers, the case generator and the raw-dataset writer."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ext.datasets import synth
from nnunet_ext.datasets.sparsify import annotated_slices, sparsify
from nnunet_ext.datasets.synth import make_case, write_synthetic_dataset
from nnunet_ext.errors import UserError

SHAPE = (16, 32, 32)
# Three different values, so any (z, y, x) / (x, y, z) mix-up shows up in the read-back checks.
SPACING = (3.0, 0.75, 1.0)
TRAIN = ["synthmicroscopy_000", "synthmicroscopy_001", "synthmicroscopy_002"]
TEST = ["synthmicroscopy_test_000"]


def read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def listing(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else None


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    return write_synthetic_dataset(raw, 501, num_cases=3, num_test_cases=1, shape=SHAPE, spacing=SPACING,
                                   axis=0, every=4, seed=7)


# ------------------------------------------------------------------------------------ annotated_slices


@pytest.mark.parametrize("length, every, n_slices, expected", [
    (10, 4, None, [0, 4, 8]),
    (10, 1, None, list(range(10))),
    (10, 20, None, [0]),
    (24, 4, None, [0, 4, 8, 12, 16, 20]),
    (10, None, 3, [1, 5, 8]),  # floor(0.5 * 10/3)=1, floor(1.5 * 10/3)=5, floor(2.5 * 10/3)=8
    (10, None, 4, [1, 3, 6, 8]),  # 1.25, 3.75, 6.25, 8.75
    (24, None, 1, [12]),
    (24, None, 24, list(range(24))),
])
def test_annotated_slices_table(length, every, n_slices, expected):
    assert annotated_slices(length, every=every, n_slices=n_slices) == expected


@pytest.mark.parametrize("every, n_slices, fragment", [
    (None, None, "no annotated slices"),
    (4, 3, "both"),
    (0, None, "--every 0"),
    (-2, None, "--every -2"),
    (None, 0, "--slices 0 is not a positive integer; choose 1..24"),
    (None, 25, "--slices 25 exceeds the 24 slices along the annotation axis; choose 1..24"),
    (None, 2.5, "--slices 2.5"),
])
def test_annotated_slices_errors(every, n_slices, fragment):
    with pytest.raises(UserError) as info:
        annotated_slices(24, every=every, n_slices=n_slices)
    message = str(info.value)
    assert message.startswith("invalid sparsity: ")
    assert fragment in message
    assert "\n" not in message


# ------------------------------------------------------------------------------------ sparsify


def test_sparsify_axis0():
    dense = np.array([[[0, 1], [2, 1]],
                      [[1, 1], [0, 2]],
                      [[2, 0], [0, 1]]], dtype=np.uint8)
    expected = np.array([[[0, 1], [2, 1]],
                         [[3, 3], [3, 3]],
                         [[2, 0], [0, 1]]], dtype=np.uint8)
    out = sparsify(dense, axis=0, slices=[0, 2], ignore_label=3)
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.uint8
    assert dense[1, 0, 0] == 1  # the input is left untouched


def test_sparsify_axis2():
    dense = np.array([[[0, 1], [2, 1]],
                      [[1, 1], [0, 2]],
                      [[2, 0], [0, 1]]], dtype=np.uint8)
    expected = np.array([[[3, 1], [3, 1]],
                         [[3, 1], [3, 2]],
                         [[3, 0], [3, 1]]], dtype=np.uint8)
    np.testing.assert_array_equal(sparsify(dense, axis=2, slices=[1], ignore_label=3), expected)


def test_sparsify_rejects_out_of_range():
    with pytest.raises(ValueError):
        sparsify(np.zeros((3, 2, 2), np.uint8), axis=0, slices=[3], ignore_label=3)
    with pytest.raises(ValueError):
        sparsify(np.zeros((3, 2, 2), np.uint8), axis=3, slices=[0], ignore_label=3)


# ------------------------------------------------------------------------------------ make_case


def test_make_case_types_classes_and_intensity_order():
    image, label = make_case((24, 64, 64), (4.0, 1.0, 1.0), np.random.default_rng([0, 0]))
    assert image.shape == label.shape == (24, 64, 64)
    assert image.dtype == np.uint16 and label.dtype == np.uint8
    assert set(np.unique(label)) == {0, 1, 2}
    means = [image[label == k].mean() for k in (0, 1, 2)]
    # Dim background, bright vessels, medium nuclei.
    assert means[0] < means[2] < means[1]


def test_make_case_is_deterministic():
    a = make_case((16, 32, 32), (4.0, 1.0, 1.0), np.random.default_rng([3, 1]))
    b = make_case((16, 32, 32), (4.0, 1.0, 1.0), np.random.default_rng([3, 1]))
    c = make_case((16, 32, 32), (4.0, 1.0, 1.0), np.random.default_rng([4, 1]))
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    assert not np.array_equal(a[0], c[0])


def test_make_case_falls_back_when_draws_keep_missing_a_class(monkeypatch):
    def vessels_only(grid, rng, scale):
        return np.ones(grid.shape, np.uint8), np.zeros(grid.shape, np.float32)

    monkeypatch.setattr(synth, "_draw_label", vessels_only)
    image, label = make_case((8, 10, 12), (4.0, 1.0, 1.0), np.random.default_rng(0))
    assert image.shape == label.shape == (8, 10, 12)
    assert set(np.unique(label)) == {0, 1, 2}


@pytest.mark.parametrize("spacing", [(4.0, 1.0, 1.0), (0.05, 0.01, 0.01), (50.0, 20.0, 20.0)])
def test_make_case_smallest_volume_has_both_classes(spacing):
    for seed in range(10):
        _, label = make_case((8, 8, 8), spacing, np.random.default_rng([seed, 0]))
        assert {1, 2} <= set(np.unique(label)), (spacing, seed)


# ------------------------------------------------------------------------------------ write_synthetic_dataset


def test_layout(dataset):
    assert dataset.name == "Dataset501_SynthMicroscopy"
    assert listing(dataset.parent) == ["Dataset501_SynthMicroscopy"]  # no temporary folder left behind
    assert listing(dataset) == ["dataset.json", "imagesTr", "imagesTs", "labelsTr", "labelsTr_dense", "labelsTs"]
    assert listing(dataset / "imagesTr") == [f"{c}_0000.nii.gz" for c in TRAIN]
    assert listing(dataset / "labelsTr") == [f"{c}.nii.gz" for c in TRAIN]
    assert listing(dataset / "labelsTr_dense") == [f"{c}.nii.gz" for c in TRAIN]
    assert listing(dataset / "imagesTs") == [f"{c}_0000.nii.gz" for c in TEST]
    assert listing(dataset / "labelsTs") == [f"{c}.nii.gz" for c in TEST]


def test_dataset_json(dataset):
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "fluorescence"}
    assert meta["labels"] == {"background": 0, "vessel": 1, "nucleus": 2, "ignore": 3}
    assert meta["numTraining"] == 3
    assert meta["file_ending"] == ".nii.gz"
    assert meta["name"] == "SynthMicroscopy"
    assert isinstance(meta["description"], str) and meta["description"]
    assert meta["annotation_axis"] == 0
    assert meta["annotated_slices"] == {c: [0, 4, 8, 12] for c in TRAIN}
    assert meta["spacing"] == [3.0, 0.75, 1.0]
    assert meta["synth"] == {"dataset_id": 501, "name": "SynthMicroscopy", "num_cases": 3, "num_test_cases": 1,
                             "shape": [16, 32, 32], "spacing": [3.0, 0.75, 1.0], "axis": 0, "every": 4,
                             "n_slices": None, "seed": 7}


def test_images_and_dense_labels(dataset):
    for folder, case in [("Tr", c) for c in TRAIN] + [("Ts", c) for c in TEST]:
        image = read(dataset / f"images{folder}" / f"{case}_0000.nii.gz")
        dense = read(dataset / ("labelsTr_dense" if folder == "Tr" else "labelsTs") / f"{case}.nii.gz")
        assert image.shape == dense.shape == SHAPE
        assert image.dtype == np.uint16 and dense.dtype == np.uint8
        assert set(np.unique(dense)) == {0, 1, 2}


def test_sparse_labels_match_dense_on_annotated_slices(dataset):
    annotated = [0, 4, 8, 12]
    others = [z for z in range(SHAPE[0]) if z not in annotated]
    for case in TRAIN:
        sparse = read(dataset / "labelsTr" / f"{case}.nii.gz")
        dense = read(dataset / "labelsTr_dense" / f"{case}.nii.gz")
        assert set(np.unique(sparse)) <= {0, 1, 2, 3}
        assert np.all(sparse[others] == 3)
        np.testing.assert_array_equal(sparse[annotated], dense[annotated])


def test_spacing_read_back_in_zyx(dataset):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    image = dataset / "imagesTr" / f"{TRAIN[0]}_0000.nii.gz"
    label = dataset / "labelsTr" / f"{TRAIN[0]}.nii.gz"
    assert tuple(reversed(sitk.ReadImage(str(image)).GetSpacing())) == SPACING
    data, props = SimpleITKIO().read_images([str(image)])
    assert data.shape == (1, *SHAPE)
    assert tuple(props["spacing"]) == SPACING
    _, props = SimpleITKIO().read_seg(str(label))
    assert tuple(props["spacing"]) == SPACING


def test_nnunet_integrity_check_accepts_dataset(dataset):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(dataset), num_processes=1)


def test_other_axis_with_n_slices(tmp_path):
    folder = write_synthetic_dataset(tmp_path, 12, name="Side", num_cases=1, num_test_cases=0, shape=(8, 12, 10),
                                     axis=2, every=None, n_slices=3, seed=1)
    assert folder.name == "Dataset012_Side"
    meta = json.loads((folder / "dataset.json").read_text())
    # Along x (10 slices): floor(0.5 * 10/3)=1, floor(1.5 * 10/3)=5, floor(2.5 * 10/3)=8.
    assert meta["annotation_axis"] == 2 and meta["annotated_slices"] == {"side_000": [1, 5, 8]}
    sparse = read(folder / "labelsTr" / "side_000.nii.gz")
    dense = read(folder / "labelsTr_dense" / "side_000.nii.gz")
    np.testing.assert_array_equal(sparse[:, :, [1, 5, 8]], dense[:, :, [1, 5, 8]])
    assert np.all(sparse[:, :, [0, 2, 3, 4, 6, 7, 9]] == 3)
    assert listing(folder / "imagesTs") == [] and listing(folder / "labelsTs") == []


def test_same_seed_same_data_other_seed_different(tmp_path):
    kwargs = dict(num_cases=2, num_test_cases=1, shape=(8, 16, 16), every=2)
    first = write_synthetic_dataset(tmp_path / "a", 1, seed=5, **kwargs)
    again = write_synthetic_dataset(tmp_path / "b", 1, seed=5, **kwargs)
    other = write_synthetic_dataset(tmp_path / "c", 1, seed=6, **kwargs)
    files = ["imagesTr/synthmicroscopy_001_0000.nii.gz", "labelsTr/synthmicroscopy_001.nii.gz",
             "labelsTr_dense/synthmicroscopy_000.nii.gz", "imagesTs/synthmicroscopy_test_000_0000.nii.gz"]
    for name in files:
        np.testing.assert_array_equal(read(first / name), read(again / name))
    assert (first / "dataset.json").read_text() == (again / "dataset.json").read_text()
    assert not np.array_equal(read(first / files[0]), read(other / files[0]))
    # Test volumes come from their own streams, never repeating a training volume.
    assert not np.array_equal(read(first / "imagesTr/synthmicroscopy_000_0000.nii.gz"), read(first / files[3]))


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(every=None, n_slices=None), "invalid sparsity"),
    (dict(every=4, n_slices=2), "invalid sparsity"),
    (dict(every=0), "invalid sparsity"),
    (dict(every=None, n_slices=17), "--slices 17 exceeds the 16 slices along axis 0; choose 1..16"),
    (dict(axis=1, every=None, n_slices=33), "--slices 33 exceeds the 32 slices along axis 1; choose 1..32"),
    (dict(axis=3), "invalid annotation axis 3"),
    (dict(num_cases=0), "invalid number of training cases 0"),
    (dict(num_test_cases=-1), "invalid number of test cases -1"),
    (dict(shape=(7, 32, 32)), "invalid shape (7, 32, 32)"),
    (dict(shape=(16, 32)), "invalid shape (16, 32)"),
    (dict(shape=(16.0, 32, 32)), "invalid shape"),
    (dict(spacing=(4.0, 0.0, 1.0)), "invalid spacing"),
    (dict(dataset_id=0), "invalid dataset id 0"),
    (dict(dataset_id=1000), "invalid dataset id 1000"),
    (dict(name="bad/name"), "invalid dataset name"),
    (dict(seed=-1), "invalid seed -1"),
])
def test_bad_arguments_write_nothing(tmp_path, kwargs, fragment):
    raw = tmp_path / "raw"
    args = dict(dataset_id=42, num_cases=1, num_test_cases=0, shape=SHAPE, every=4) | kwargs
    with pytest.raises(UserError) as info:
        write_synthetic_dataset(raw, **args)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    assert not raw.exists()


def test_existing_dataset_id_is_refused(tmp_path):
    (tmp_path / "Dataset501_Other").mkdir()
    (tmp_path / "Dataset051_Near").mkdir()
    with pytest.raises(UserError, match=r"Dataset501_Other already exists: pick another dataset id \(-d\)"):
        write_synthetic_dataset(tmp_path, 501, num_cases=1, num_test_cases=0, shape=(8, 16, 16))
    assert listing(tmp_path) == ["Dataset051_Near", "Dataset501_Other"]
    assert listing(tmp_path / "Dataset501_Other") == []
    write_synthetic_dataset(tmp_path, 502, num_cases=1, num_test_cases=0, shape=(8, 16, 16))
    assert listing(tmp_path) == ["Dataset051_Near", "Dataset501_Other", "Dataset502_SynthMicroscopy"]


def test_existing_file_with_the_target_name_is_refused(tmp_path):
    (tmp_path / "Dataset009_SynthMicroscopy").write_text("not a dataset")
    with pytest.raises(UserError, match="already exists"):
        write_synthetic_dataset(tmp_path, 9, num_cases=1, num_test_cases=0, shape=(8, 16, 16))
    assert listing(tmp_path) == ["Dataset009_SynthMicroscopy"]


def test_raw_dir_that_is_a_file_is_refused(tmp_path):
    raw = tmp_path / "raw"
    raw.write_text("")
    with pytest.raises(UserError, match="is not a folder"):
        write_synthetic_dataset(raw, 9, num_cases=1, num_test_cases=0, shape=(8, 16, 16))
    assert listing(tmp_path) == ["raw"]


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing_write(array, path, spacing, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_write(array, path, spacing, **kwargs)

    real_write = synth.write_image
    monkeypatch.setattr(synth, "write_image", failing_write)
    raw = tmp_path / "new" / "raw"
    with pytest.raises(OSError, match="disk full"):
        write_synthetic_dataset(raw, 7, num_cases=2, num_test_cases=0, shape=(8, 16, 16))
    assert len(calls) == 2
    assert listing(tmp_path) == []  # the raw folders this call created are gone as well

    existing = tmp_path / "kept"
    existing.mkdir()
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        write_synthetic_dataset(existing, 7, num_cases=2, num_test_cases=0, shape=(8, 16, 16))
    assert listing(existing) == []
