"""dataset_conversion.fucci on tiny hand-built TIFFs: layouts, border/interior labels, unlabeled cases, steps."""

import argparse
import json

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
from nnunetv2.imageio.tif_reader_writer import Tiff3DIO

from nnunet_ext.dataset_conversion import fucci
from nnunet_ext.dataset_conversion.fucci import Preprocessing, preprocess_channel, read_channels
from nnunet_ext.datasets import raw_dataset
from nnunet_ext.datasets.instances import semantic_to_instances
from nnunet_ext.errors import UserError

SHAPE = (4, 10, 12)  # z, y, x
SPACING = (2.0, 0.5, 0.25)  # three different values: any axis mix-up shows
CHANNELS = (np.arange(3 * np.prod(SHAPE), dtype=np.uint16).reshape(3, *SHAPE) * 7) % 1000


def instance_volume():
    """Two touching boxes, the second starting at z=1, and a 2-voxel speck."""
    volume = np.zeros(SHAPE, np.uint16)
    volume[:, 2:7, 1:6] = 4
    volume[1:, 2:7, 6:11] = 9
    volume[0, 8, 0:2] = 2
    return volume


def expected_semantic():
    """By hand: borders are the in-plane faces, the contact columns (x=5, x=6) and the first slice of box two."""
    semantic = np.zeros(SHAPE, np.uint8)
    semantic[:, 2:7, 1:6] = 1
    semantic[:, 3:6, 2:5] = 2  # box one spans all of z: the volume's z edges are no border
    semantic[1:, 2:7, 6:11] = 1
    semantic[2:, 3:6, 7:10] = 2  # box two's z=1 slice faces background at z=0
    return semantic


def write_tif(path, array):
    tifffile.imwrite(path, array, photometric="minisblack")  # a 3- or 4-slice stack is not RGB
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same volume as (C, Z, Y, X), (Z, C, Y, X) and one file per channel, plus its instance labels."""
    folder = tmp_path_factory.mktemp("fucci_src")
    return {
        "czyx": write_tif(folder / "czyx.tif", CHANNELS),
        "zcyx": write_tif(folder / "zcyx.tif", CHANNELS.transpose(1, 0, 2, 3)),
        "channels": [write_tif(folder / f"ch{c}.tif", CHANNELS[c]) for c in range(3)],
        "labels": write_tif(folder / "labels.tif", instance_volume()),
    }


@pytest.fixture(scope="module")
def dataset(sources, tmp_path_factory):
    """One real conversion (TIFF output, nnU-Net's own integrity check) with all three layouts."""
    raw = tmp_path_factory.mktemp("raw")
    cases = [(sources["czyx"], sources["labels"]), (sources["zcyx"], sources["labels"]),
             (sources["channels"], None)]
    return fucci.convert(cases, raw, 42, SPACING, min_size=3, file_format="tif")


@pytest.fixture
def fast_verify(monkeypatch):
    """Record verify calls instead of spawning nnU-Net's checker (the module fixture runs the real one)."""
    calls = []
    monkeypatch.setattr(raw_dataset, "verify_raw_dataset", lambda folder, *a, **k: calls.append(folder))
    return calls


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------ the converted dataset


def test_files_and_dataset_json(dataset):
    assert dataset.name == "Dataset042_FUCCI"
    cases = ["fucci_000", "fucci_001", "fucci_002"]
    assert listing(dataset / "imagesTr") == sorted([f"{c}.json" for c in cases]
                                                   + [f"{c}_{i:04d}.tif" for c in cases for i in range(3)])
    assert listing(dataset / "labelsTr") == sorted([f"{c}.json" for c in cases] + [f"{c}.tif" for c in cases])
    document = json.loads((dataset / "dataset.json").read_text())
    assert document["labels"] == {"background": 0, "nucleus_border": 1, "nucleus_interior": 2, "ignore": 3}
    assert document["channel_names"] == {"0": "Cy3", "1": "GFP", "2": "Hoechst"}
    assert document["overwrite_image_reader_writer"] == "Tiff3DIO"
    assert document["spacing"] == list(SPACING) and document["annotation_axis"] == 0
    assert document["annotated_slices"] == {"fucci_000": [0, 1, 2, 3], "fucci_001": [0, 1, 2, 3], "fucci_002": []}
    assert document["numTraining"] == 3 and document["fucci"]["min_size"] == 3


@pytest.mark.parametrize("case", ["fucci_000", "fucci_001", "fucci_002"])
def test_every_layout_gives_the_source_channels(dataset, case):
    for c in range(3):
        written = tifffile.imread(dataset / "imagesTr" / f"{case}_{c:04d}.tif")
        assert written.dtype == np.uint16
        np.testing.assert_array_equal(written, CHANNELS[c])


def test_labels_border_interior_and_size_filter(dataset):
    labels = tifffile.imread(dataset / "labelsTr" / "fucci_000.tif")
    np.testing.assert_array_equal(labels, expected_semantic())  # the 2-voxel speck (min_size 3) is background
    np.testing.assert_array_equal(tifffile.imread(dataset / "labelsTr" / "fucci_001.tif"), labels)


def test_unlabeled_case_is_all_ignore(dataset):
    labels = tifffile.imread(dataset / "labelsTr" / "fucci_002.tif")
    assert labels.shape == SHAPE and np.all(labels == 3)


def test_nnunet_tiff3dio_reads_images_and_spacing(dataset):
    io = Tiff3DIO()
    images, properties = io.read_images([str(dataset / "imagesTr" / f"fucci_000_{c:04d}.tif") for c in range(3)])
    assert images.shape == (3, *SHAPE) and properties["spacing"] == list(SPACING)
    np.testing.assert_array_equal(images, CHANNELS.astype(np.float32))
    seg, seg_properties = io.read_seg(str(dataset / "labelsTr" / "fucci_000.tif"))
    assert seg.shape == (1, *SHAPE) and seg_properties["spacing"] == list(SPACING)


def test_round_trip_back_to_instances(dataset):
    back = semantic_to_instances(tifffile.imread(dataset / "labelsTr" / "fucci_000.tif"))
    original = instance_volume()
    original[original == 2] = 0  # removed by min_size
    np.testing.assert_array_equal(back, np.searchsorted([0, 4, 9], original))  # ids 4, 9 -> 1, 2 in scan order


# ------------------------------------------------------------------------------------ channel layouts


def test_channel_axis_explicit_and_auto(sources):
    np.testing.assert_array_equal(read_channels(sources["zcyx"], channel_axis=1), CHANNELS)
    np.testing.assert_array_equal(read_channels(sources["czyx"], channel_axis=0), CHANNELS)
    np.testing.assert_array_equal(read_channels(sources["channels"]), CHANNELS)


def test_ambiguous_channel_axis_asks_for_it(tmp_path):
    path = write_tif(tmp_path / "three_slices.tif", np.zeros((3, 3, 5, 5), np.uint16))
    with pytest.raises(UserError, match="three_slices.tif.*both axis 0 and axis 1.*--channel-axis"):
        read_channels(path)
    assert read_channels(path, channel_axis=1).shape == (3, 3, 5, 5)


# ------------------------------------------------------------------------------------ preprocessing


def test_threshold_zeroes_low_values_and_keeps_dtype():
    channel = np.array([[[5, 10, 11, 300]]], np.uint16)
    out = preprocess_channel(channel, Preprocessing(threshold=11))
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, [[[0, 0, 11, 300]]])


def test_gamma_on_the_rescaled_channel():
    channel = np.array([[[100, 150, 200]]], np.uint16)  # rescaled: 0, 0.5, 1
    out = preprocess_channel(channel, Preprocessing(gamma=2.0))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[[0.0, 0.25, 1.0]]])


def test_median_removes_a_hot_pixel_and_tophat_a_wide_plateau():
    channel = np.zeros((1, 9, 9), np.uint16)
    channel[0, 4, 4] = 100
    np.testing.assert_array_equal(preprocess_channel(channel, Preprocessing(median=3)), 0)
    channel[0, 1:8, 1:8] = 50  # plateau wider than the disk; the hot pixel rises above it
    channel[0, 4, 4] = 100
    out = preprocess_channel(channel, Preprocessing(tophat=1))
    expected = np.zeros((1, 9, 9), np.float32)
    expected[0, 4, 4] = 0.5  # 100 -> 1.0 after rescaling, minus the plateau's 0.5
    expected[0, [1, 1, 7, 7], [1, 7, 1, 7]] = 0.5  # disk(1) is a cross: the opening cuts the plateau's corners
    np.testing.assert_allclose(out, expected)


def test_clahe_per_slice_keeps_constant_slices():
    channel = np.zeros((2, 16, 16), np.uint16)
    channel[0] = np.arange(16)[None] * 10
    out = preprocess_channel(channel, Preprocessing(clahe=0.02))
    assert out.min() >= 0 and out.max() <= 1
    assert not np.allclose(out[0], channel[0] / 150)  # rescaled but not equalized would be this
    np.testing.assert_array_equal(out[1], 0)


def test_conversion_with_preprocessing_and_nifti(sources, tmp_path, fast_verify):
    folder = fucci.convert([(sources["czyx"], sources["labels"])], tmp_path, 43, SPACING, name="Spheroids",
                           preprocessing=Preprocessing(threshold=500))
    assert fast_verify == [tmp_path / fast_verify[0].name] and not fast_verify[0].exists()
    image = sitk.ReadImage(str(folder / "imagesTr" / "spheroids_000_0002.nii.gz"))
    assert image.GetSpacing() == tuple(reversed(SPACING))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), np.where(CHANNELS[2] < 500, 0, CHANNELS[2]))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / "spheroids_000.nii.gz")))
    assert labels[0, 8, 0] == 1  # no size filter: the speck is border
    assert "ignore" not in json.loads((folder / "dataset.json").read_text())["labels"]


# ------------------------------------------------------------------------------------ bad input


def bad_cases(src, tmp):
    """(cases, keyword arguments, message fragment) for each kind of bad input."""
    float_labels = write_tif(tmp / "float_labels.tif", instance_volume().astype(np.float32))
    negative = write_tif(tmp / "negative.tif", instance_volume().astype(np.int16) - 1)
    small = write_tif(tmp / "small.tif", np.zeros((4, 10, 11), np.uint16))
    two = write_tif(tmp / "two.tif", CHANNELS[:2])
    return {
        "missing channel file": ([(src["channels"][:2], src["labels"])], {}, "2 channel files given"),
        "missing channel in stack": ([(two, src["labels"])], {}, "two.tif.*neither axis"),
        "wrong channel axis": ([(src["czyx"], src["labels"])], {"channel_axis": 1}, "4 channels on axis 1"),
        "channel shapes differ": ([([*src["channels"][:2], small], None), (src["czyx"], src["labels"])], {},
                                  "small.tif: shape"),
        "label shape differs": ([(src["czyx"], small)], {}, "small.tif: label shape"),
        "float labels": ([(src["czyx"], float_labels)], {}, "float_labels.tif: float32 labels"),
        "negative ids": ([(src["czyx"], negative)], {}, "negative.tif: negative instance id -1"),
        "missing file": ([(tmp / "gone.tif", src["labels"])], {}, "gone.tif does not exist"),
        "no labels": ([(src["czyx"], None)], {}, "no case has a label file"),
        "bad gamma": ([(src["czyx"], src["labels"])], {"preprocessing": Preprocessing(gamma=-1.0)}, "--gamma"),
        "bad spacing": ([(src["czyx"], src["labels"])], {"spacing": (1, 0, 1)}, "invalid spacing"),
    }


@pytest.mark.parametrize("kind", ["missing channel file", "missing channel in stack", "wrong channel axis",
                                  "channel shapes differ", "label shape differs", "float labels", "negative ids",
                                  "missing file", "no labels", "bad gamma", "bad spacing"])
def test_bad_input_leaves_nothing(sources, tmp_path, kind, fast_verify):
    cases, kwargs, fragment = bad_cases(sources, tmp_path)[kind]
    out = tmp_path / "raw"
    kwargs = {"spacing": SPACING, **kwargs}
    with pytest.raises(UserError, match=fragment) as error:
        fucci.convert(cases, out, 44, **kwargs)
    assert "\n" not in str(error.value)
    assert not out.exists() and fast_verify == []


def test_failed_check_leaves_nothing(sources, tmp_path, monkeypatch):
    def reject(folder, *args, **kwargs):
        raise UserError("the converted dataset fails nnU-Net's integrity check")

    monkeypatch.setattr(raw_dataset, "verify_raw_dataset", reject)
    with pytest.raises(UserError, match="integrity"):
        fucci.convert([(sources["czyx"], sources["labels"])], tmp_path / "raw", 45, SPACING)
    assert not (tmp_path / "raw").exists()


# ------------------------------------------------------------------------------------ CLI


def run_cli(*argv):
    parser = argparse.ArgumentParser()
    fucci.register_cli(parser.add_subparsers())
    args = parser.parse_args(["fucci", *map(str, argv)])
    args.func(args)


def test_cli_cases_and_steps(sources, tmp_path, fast_verify, capsys):
    run_cli("--case", sources["zcyx"], sources["labels"], "--case", *sources["channels"], "-",
            "-d", 46, "--spacing", *SPACING, "--out", tmp_path, "--format", "tif", "--min-size", 3,
            "--threshold", 100, "--gamma", 0.5)
    folder = tmp_path / "Dataset046_FUCCI"
    assert f"wrote {folder}" in capsys.readouterr().out
    document = json.loads((folder / "dataset.json").read_text())
    assert document["fucci"]["preprocessing"]["gamma"] == 0.5 and document["labels"]["ignore"] == 3
    assert tifffile.imread(folder / "imagesTr" / "fucci_001_0000.tif").dtype == np.float32


def test_cli_case_needs_image_and_label(sources, tmp_path):
    with pytest.raises(UserError, match="give IMAGE LABEL or CY3 GFP HOECHST LABEL"):
        run_cli("--case", *sources["channels"], "-d", 47, "--spacing", *SPACING, "--out", tmp_path)
    assert list(tmp_path.iterdir()) == []
