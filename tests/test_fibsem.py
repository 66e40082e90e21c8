"""dataset_conversion.fibsem on a tiny slice folder: tiling, ignore placement, downsampling, equalization, errors."""

import argparse
import json

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
from nnunetv2.imageio.tif_reader_writer import Tiff3DIO
from skimage.exposure import equalize_hist

from nnunet_ext.dataset_conversion import fibsem
from nnunet_ext.datasets import raw_dataset
from nnunet_ext.errors import UserError

SPACING = (10.0, 4.0, 5.0)  # z, y, x: three different values, so any axis mix-up shows
MASK_VALUES = (0, 127, 255)
ANNOTATED = {3: 2, 7: 6, 11: 10}  # slice number -> z position (slices are numbered from 1)


def make_volume():
    """12 slices of 40 x 60, uint8: 5z + 2y + 2x, so every 2 x 2 block averages to 5z + 4i + 4j + 2 exactly."""
    z, y, x = np.indices((12, 40, 60))
    volume = (5 * z + 2 * y + 2 * x).astype(np.uint8)
    volume[0, :2, :2] = [[10, 20], [30, 41]]  # averages to 25.25 -> 25
    return volume


def make_mask():
    """0/127/255 mask: a nucleus with a nucleolus inside, and two 2 x 2 blocks for the majority vote."""
    mask = np.zeros((40, 60), np.uint8)
    mask[10:30, 10:50] = 127
    mask[16:24, 20:30] = 255
    mask[0:2, 0:2] = [[127, 127], [0, 255]]  # majority: nucleus
    mask[0:2, 2:4] = [[0, 0], [255, 255]]  # tie: the higher class, nucleolus
    return mask


VOLUME, MASK = make_volume(), make_mask()
CLASSES = np.searchsorted(MASK_VALUES, MASK).astype(np.uint8)  # 0/127/255 -> 0/1/2


def write_source(folder, volume=VOLUME, masks=None):
    """slices/slice_0001.tif ... and masks/mask_0003.png ... under ``folder``; returns (slices, masks) folders."""
    slices_dir, masks_dir = folder / "slices", folder / "masks"
    slices_dir.mkdir(parents=True)
    masks_dir.mkdir()
    for z, plane in enumerate(volume, start=1):
        tifffile.imwrite(slices_dir / f"slice_{z:04d}.tif", plane)
    for number, mask in (masks if masks is not None else {n: MASK for n in ANNOTATED}).items():
        sitk.WriteImage(sitk.GetImageFromArray(mask), str(masks_dir / f"mask_{number:04d}.png"))
    return slices_dir, masks_dir


def read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_source(tmp_path_factory.mktemp("fibsem_src"))


@pytest.fixture(scope="module")
def dataset(source, tmp_path_factory):
    """One real conversion (NIfTI, nnU-Net's own integrity check): no downsampling, 16 x 32 tiles."""
    return fibsem.convert(*source, tmp_path_factory.mktemp("raw"), 61, SPACING, tile_size=(16, 32),
                          mask_values=MASK_VALUES)


@pytest.fixture
def fast_verify(monkeypatch):
    """Record verify calls instead of spawning nnU-Net's checker (the module fixture runs the real one)."""
    calls = []
    monkeypatch.setattr(raw_dataset, "verify_raw_dataset", lambda folder, *a, **k: calls.append(folder))
    return calls


def convert(source, out, **kwargs):
    options = {"tile_size": (16, 32), "mask_values": MASK_VALUES, **kwargs}
    return fibsem.convert(*source, out, 62, SPACING, **options)


# 40 x 60 in 16 x 32 tiles: rows of 16, 16, 8; columns of 32, 28.
TILES = {"fibsem_r00_c00": (0, 0, 16, 32), "fibsem_r00_c01": (0, 32, 16, 28), "fibsem_r01_c00": (16, 0, 16, 32),
         "fibsem_r01_c01": (16, 32, 16, 28), "fibsem_r02_c00": (32, 0, 8, 32), "fibsem_r02_c01": (32, 32, 8, 28)}


# ------------------------------------------------------------------------------------ tiling


def test_tiles_files_and_dataset_json(dataset):
    assert dataset.name == "Dataset061_FIBSEM"
    assert sorted(p.name for p in (dataset / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in sorted(TILES)]
    document = json.loads((dataset / "dataset.json").read_text())
    assert document["labels"] == {"background": 0, "nucleus": 1, "nucleolus": 2, "ignore": 3}
    assert document["numTraining"] == 6 and document["spacing"] == list(SPACING)
    assert document["annotation_axis"] == 0
    assert document["annotated_slices"] == {case: [2, 6, 10] for case in TILES}
    assert document["fibsem"]["tiles"]["fibsem_r02_c01"] == {"y": 32, "x": 32, "height": 8, "width": 28}
    assert document["fibsem"]["mask_slices"] == [3, 7, 11]


@pytest.mark.parametrize("case", sorted(TILES))
def test_tile_is_the_source_crop_with_spacing(dataset, case):
    y, x, height, width = TILES[case]
    image = sitk.ReadImage(str(dataset / "imagesTr" / f"{case}_0000.nii.gz"))
    assert image.GetSpacing() == tuple(reversed(SPACING))
    array = sitk.GetArrayFromImage(image)
    assert array.dtype == np.uint8 and array.shape == (12, height, width)
    np.testing.assert_array_equal(array, VOLUME[:, y:y + height, x:x + width])


@pytest.mark.parametrize("case", sorted(TILES))
def test_labels_on_annotated_slices_ignore_elsewhere(dataset, case):
    y, x, height, width = TILES[case]
    labels = read(dataset / "labelsTr" / f"{case}.nii.gz")
    assert labels.dtype == np.uint8
    for z in range(12):
        expected = CLASSES[y:y + height, x:x + width] if z in ANNOTATED.values() else 3
        np.testing.assert_array_equal(labels[z], np.broadcast_to(expected, (height, width)))


def test_drop_partial_tiles_and_memory_groups(source, tmp_path, fast_verify, dataset):
    kept = convert(source, tmp_path / "drop", drop_partial=True)
    assert sorted(p.name for p in (kept / "labelsTr").iterdir()) == ["fibsem_r00_c00.nii.gz", "fibsem_r01_c00.nii.gz"]
    # A budget below one tile: one pass over the slices per tile, same output.
    grouped = convert(source, tmp_path / "grouped", max_memory_gb=1e-9)
    for case in TILES:
        for sub, name in (("imagesTr", f"{case}_0000.nii.gz"), ("labelsTr", f"{case}.nii.gz")):
            np.testing.assert_array_equal(read(grouped / sub / name), read(dataset / sub / name))
    assert len(fast_verify) == 2


def test_tile_grid_table():
    assert [(t.y0, t.x0, t.height, t.width) for t in fibsem.tile_grid((5, 7), (4, 4))] == [
        (0, 0, 4, 4), (0, 4, 4, 3), (4, 0, 1, 4), (4, 4, 1, 3)]
    assert [(t.row, t.col) for t in fibsem.tile_grid((5, 7), (4, 4), drop_partial=True)] == [(0, 0)]
    assert len(fibsem.tile_grid((8, 8), (8, 8))) == 1


# ------------------------------------------------------------------------------------ downsampling


def test_downsampling_by_two(source, tmp_path, fast_verify):
    folder = convert(source, tmp_path, downsample=2, tile_size=(16, 16), file_format="tif")
    document = json.loads((folder / "dataset.json").read_text())
    assert document["spacing"] == [10.0, 8.0, 10.0] and document["numTraining"] == 4  # 20 x 30: 16+4 by 16+14
    assert document["fibsem"]["tiles"]["fibsem_r01_c01"] == {"y": 32, "x": 32, "height": 8, "width": 28}
    io = Tiff3DIO()
    image, properties = io.read_images([str(folder / "imagesTr" / "fibsem_r00_c00_0000.tif")])
    assert properties["spacing"] == [10.0, 8.0, 10.0] and image.shape == (1, 12, 16, 16)
    assert image[0, 3, 1, 2] == 29  # block y 2-3, x 4-5 of slice 3: 27, 29, 29, 31
    assert image[0, 0, 0, 0] == 25  # 10, 20, 30, 41 -> 25.25
    assert image[0, 11, 15, 15] == 5 * 11 + 4 * 15 + 4 * 15 + 2
    labels, label_properties = io.read_seg(str(folder / "labelsTr" / "fibsem_r00_c00.tif"))
    assert label_properties["spacing"] == [10.0, 8.0, 10.0]
    assert labels[0, 2, 0, 0] == 1 and labels[0, 2, 0, 1] == 2  # majority nucleus; tie -> nucleolus
    assert labels[0, 2, 9, 11] == 2 and labels[0, 2, 5, 5] == 1 and labels[0, 2, 15, 15] == 0
    assert np.all(labels[0, 3] == 3) and tifffile.imread(folder / "labelsTr" / "fibsem_r01_c01.tif").shape == (
        12, 4, 14)


def test_downsample_helpers_table():
    plane = np.array([[1, 2, 9, 9, 7], [3, 4, 9, 8, 7]], np.uint16)  # last column dropped
    np.testing.assert_array_equal(fibsem.downsample_image(plane, 2), [[2, 9]])  # 2.5 -> 2 (to even), 8.75 -> 9
    assert fibsem.downsample_image(plane.astype(np.float64), 2).dtype == np.float32
    classes = np.array([[0, 1, 2, 2], [1, 1, 0, 1]], np.uint8)
    np.testing.assert_array_equal(fibsem.downsample_classes(classes, 2), [[1, 2]])


# ------------------------------------------------------------------------------------ equalization


def test_equalize_per_slice_uint8(source, tmp_path, fast_verify):
    folder = convert(source, tmp_path, equalize="slice", tile_size=(40, 60))
    image = read(folder / "imagesTr" / "fibsem_r00_c00_0000.nii.gz")
    assert image.dtype == np.uint8 and image.max() == 255
    expected = np.rint(equalize_hist(VOLUME[4]) * 255).astype(np.uint8)
    np.testing.assert_array_equal(image[4], expected)


def test_equalize_whole_volume_matches_skimage(source, tmp_path, fast_verify):
    folder = convert(source, tmp_path, equalize="volume", equalize_dtype="uint16", tile_size=(40, 60))
    image = read(folder / "imagesTr" / "fibsem_r00_c00_0000.nii.gz")
    assert image.dtype == np.uint16 and image.max() == 65535
    np.testing.assert_array_equal(image, np.rint(equalize_hist(VOLUME) * 65535).astype(np.uint16))


# ------------------------------------------------------------------------------------ CLI


def run_cli(*argv):
    parser = argparse.ArgumentParser()
    fibsem.register_cli(parser.add_subparsers())
    args = parser.parse_args(["fibsem", *map(str, argv)])
    args.func(args)


def test_cli(source, tmp_path, fast_verify, capsys):
    run_cli("--slices", source[0], "--masks", source[1], "-d", 63, "--spacing", *SPACING, "--out", tmp_path,
            "--mask-values", *MASK_VALUES, "--downsample", 4, "--tile", 10, 15, "--name", "Cells", "--format", "tif")
    folder = tmp_path / "Dataset063_Cells"
    printed = capsys.readouterr().out
    assert f"wrote {folder}" in printed and "note: 1 tiles" in printed
    document = json.loads((folder / "dataset.json").read_text())
    assert document["spacing"] == [10.0, 16.0, 20.0] and document["numTraining"] == 1
    assert tifffile.imread(folder / "imagesTr" / "cells_r00_c00_0000.tif").shape == (12, 10, 15)


# ------------------------------------------------------------------------------------ bad input


def float_mask(masks_dir):
    (masks_dir / "mask_0003.png").unlink()
    tifffile.imwrite(masks_dir / "mask_0003.tif", MASK.astype(np.float32))


def odd_slice(slices_dir):
    tifffile.imwrite(slices_dir / "slice_0005.tif", np.zeros((40, 61), np.uint8))


def empty(folder):
    for path in folder.iterdir():
        path.unlink()


BAD = {
    "mask outside the volume": ({**{n: MASK for n in ANNOTATED}, 99: MASK}, None, {},
                                "mask_0099.png: slice number 99 is outside the volume \\(slices 1..12\\)"),
    "mask shape": ({3: MASK[:, :59]}, None, {}, "mask_0003.png: mask shape \\(40, 59\\) differs"),
    "unknown mask value": ({3: np.where(MASK == 255, 128, MASK).astype(np.uint8)}, None, {},
                           "mask_0003.png: unknown mask value\\(s\\) \\[128\\].*--mask-values"),
    "default mask values": (None, None, {"mask_values": (0, 1, 2)}, "unknown mask value\\(s\\) \\[127, 255\\]"),
    "float mask": (None, lambda s, m: float_mask(m), {}, "mask_0003.tif: float32 mask"),
    "empty masks": (None, lambda s, m: empty(m), {}, "masks holds no slice files"),
    "empty slices": (None, lambda s, m: empty(s), {}, "slices holds no slice files"),
    "missing slice": (None, lambda s, m: (s / "slice_0005.tif").unlink(), {},
                      "slice_0006.tif: slice numbers jump from 4 to 6"),
    "slice shape": (None, lambda s, m: odd_slice(s), {}, "slice_0005.tif: shape \\(40, 61\\)"),
    "downsample too large": (None, None, {"downsample": 64}, "smaller than --downsample 64"),
    "no full tile": (None, None, {"tile_size": (64, 64), "drop_partial": True}, "no full \\(64, 64\\) tile"),
    "duplicate mask values": (None, None, {"mask_values": (0, 0, 255)}, "--mask-values"),
    "zero tile": (None, None, {"tile_size": (0, 16)}, "--tile"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_input_leaves_nothing(tmp_path, kind, fast_verify):
    masks, change, kwargs, fragment = BAD[kind]
    source = write_source(tmp_path, masks=masks)
    if change is not None:
        change(*source)
    with pytest.raises(UserError, match=fragment) as error:
        convert(source, tmp_path / "raw", **kwargs)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "raw").exists() and fast_verify == []


def test_volume_equalization_needs_integer_slices(tmp_path):
    source = write_source(tmp_path, volume=VOLUME.astype(np.float32))
    with pytest.raises(UserError, match="slice_0001.tif: --equalize volume needs 8/16-bit integer slices"):
        convert(source, tmp_path / "raw", equalize="volume")
    assert not (tmp_path / "raw").exists()


def test_failure_while_writing_leaves_nothing(source, tmp_path, monkeypatch):
    def reject(folder, *args, **kwargs):
        raise UserError("the converted dataset fails nnU-Net's integrity check")

    monkeypatch.setattr(raw_dataset, "verify_raw_dataset", reject)
    with pytest.raises(UserError, match="integrity"):
        convert(source, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_taken_dataset_id(source, tmp_path):
    (tmp_path / "Dataset062_Other").mkdir()
    with pytest.raises(UserError, match="Dataset062_Other already exists"):
        convert(source, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["Dataset062_Other"]
