"""nnunet_ext.datasets.instances on hand-built volumes: border/interior labels, instances back, the CLI."""

import argparse
import json

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile

from nnunet_ext.datasets.instances import (
    instances_to_semantic,
    register_cli,
    remove_small_instances,
    semantic_to_instances,
)
from nnunet_ext.errors import UserError

# One z slice of two touching 3x3 boxes (ids 5 and 9), repeated over 3 slices; z edges are not borders.
BOXES = np.array([
    [0, 0, 0, 0, 0, 0, 0, 0],
    [0, 5, 5, 5, 9, 9, 9, 0],
    [0, 5, 5, 5, 9, 9, 9, 0],
    [0, 5, 5, 5, 9, 9, 9, 0],
    [0, 0, 0, 0, 0, 0, 0, 0],
])
# Each box keeps only its centre as interior: its other voxels touch background or the other box.
BOXES_SEMANTIC = np.array([
    [0, 0, 0, 0, 0, 0, 0, 0],
    [0, 1, 1, 1, 1, 1, 1, 0],
    [0, 1, 2, 1, 1, 2, 1, 0],
    [0, 1, 1, 1, 1, 1, 1, 0],
    [0, 0, 0, 0, 0, 0, 0, 0],
])
BOXES_INSTANCES = np.array([
    [0, 0, 0, 0, 0, 0, 0, 0],
    [0, 1, 1, 1, 2, 2, 2, 0],
    [0, 1, 1, 1, 2, 2, 2, 0],
    [0, 1, 1, 1, 2, 2, 2, 0],
    [0, 0, 0, 0, 0, 0, 0, 0],
])


def stacked(plane, depth=3):
    return np.repeat(plane[None], depth, axis=0)


def same_partition(a, b):
    """True if a and b number the same voxel sets (ids may differ), background 0 in both."""
    pairs = set(zip(a.ravel().tolist(), b.ravel().tolist()))
    return np.array_equal(a == 0, b == 0) and len(pairs) == len(np.unique(a)) == len(np.unique(b))


def spheres(radius, distance, shape=(16, 24, 36)):
    """Two balls of ``radius`` whose centres lie ``distance`` apart along x; the first keeps shared voxels."""
    zz, yy, xx = np.indices(shape)
    volume = np.zeros(shape, np.uint16)
    volume[(zz - 8) ** 2 + (yy - 12) ** 2 + (xx - 8) ** 2 <= radius**2] = 1
    second = (zz - 8) ** 2 + (yy - 12) ** 2 + (xx - 8 - distance) ** 2 <= radius**2
    volume[second & (volume == 0)] = 2
    return volume


# ------------------------------------------------------------------------------------ instances -> semantic


def test_touching_boxes_border_and_interior():
    semantic = instances_to_semantic(stacked(BOXES))
    assert semantic.dtype == np.uint8
    np.testing.assert_array_equal(semantic, stacked(BOXES_SEMANTIC))


def test_z_neighbours_count_a_one_slice_nucleus_is_all_border():
    volume = np.zeros((3, 5, 5), np.uint8)
    volume[1, 1:4, 1:4] = 1
    expected = np.zeros_like(volume)
    expected[1, 1:4, 1:4] = 1
    np.testing.assert_array_equal(instances_to_semantic(volume), expected)


def test_min_size_turns_small_instances_into_background():
    volume = stacked(BOXES)
    volume[0, 0, 0:2] = 4  # 2 voxels
    filtered = remove_small_instances(volume, 3)
    np.testing.assert_array_equal(filtered, stacked(BOXES))
    np.testing.assert_array_equal(instances_to_semantic(volume, min_size=3), stacked(BOXES_SEMANTIC))
    assert instances_to_semantic(volume)[0, 0, 0] == 1


# ------------------------------------------------------------------------------------ semantic -> instances


def test_touching_boxes_from_semantic():
    instances = semantic_to_instances(stacked(BOXES_SEMANTIC))
    assert instances.dtype == np.uint32
    np.testing.assert_array_equal(instances, stacked(BOXES_INSTANCES))


def test_other_classes_and_custom_values():
    semantic = stacked(BOXES_SEMANTIC)
    # Interior 7 / border 4; class 3 (e.g. ignore or another class) is not a nucleus.
    custom = np.choose(semantic, [0, 4, 7]).astype(np.uint8)
    custom[:, 0, :] = 3
    np.testing.assert_array_equal(semantic_to_instances(custom, interior=7, border=4), stacked(BOXES_INSTANCES))


def test_border_without_interior_becomes_its_own_instance():
    wider = ((0, 0), (0, 0), (0, 3))
    semantic = np.pad(stacked(BOXES_SEMANTIC), wider)
    semantic[:, 1:3, 9:11] = 1  # a border-only speck two columns right of the boxes (12 voxels)
    instances = semantic_to_instances(semantic)
    expected = np.pad(stacked(BOXES_INSTANCES), wider)
    expected[:, 1:3, 9:11] = 3
    np.testing.assert_array_equal(instances, expected)
    expected[expected == 3] = 0
    np.testing.assert_array_equal(semantic_to_instances(semantic, min_size=13), expected)


def test_empty_volume():
    assert not semantic_to_instances(np.zeros((2, 3, 4), np.uint8)).any()


@pytest.mark.parametrize("volume", [
    stacked(BOXES, depth=4),
    spheres(5, 10),  # just touching
    spheres(5, 9),  # pressed together: flattened contact
    spheres(4, 16),  # well separated
], ids=["boxes", "touching-spheres", "pressed-spheres", "separate-spheres"])
def test_round_trip_recovers_instances(volume):
    back = semantic_to_instances(instances_to_semantic(volume))
    assert same_partition(volume, back)
    assert back.max() == len(np.unique(volume)) - 1


# ------------------------------------------------------------------------------------ CLI


def write_tif(path, array):
    path.parent.mkdir(exist_ok=True)
    tifffile.imwrite(path, array, photometric="minisblack")  # a 3-slice stack is not RGB
    return path

def run_cli(*argv):
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    args = parser.parse_args(["instances", *map(str, argv)])
    args.func(args)


def test_cli_converts_a_prediction_folder(tmp_path, capsys):
    pred, out = tmp_path / "pred", tmp_path / "out"
    pred.mkdir()
    image = sitk.GetImageFromArray(stacked(BOXES_SEMANTIC).astype(np.uint8))
    image.SetSpacing((0.5, 0.25, 2.0))  # (x, y, z)
    sitk.WriteImage(image, str(pred / "a.nii.gz"))
    write_tif(pred / "b.tif", stacked(BOXES_SEMANTIC).astype(np.uint8))
    (pred / "b.json").write_text(json.dumps({"spacing": [3.0, 1.0, 1.0]}))
    (pred / "plans.json").write_text("{}")  # nnUNetv2_predict leaves such files beside the predictions
    run_cli("--pred", pred, "--out", out)
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "a.tif", "b.json", "b.tif"]
    for case, spacing in (("a", [2.0, 0.25, 0.5]), ("b", [3.0, 1.0, 1.0])):
        written = tifffile.imread(out / f"{case}.tif")
        assert written.dtype == np.uint16
        np.testing.assert_array_equal(written, stacked(BOXES_INSTANCES))
        assert json.loads((out / f"{case}.json").read_text()) == {"spacing": spacing}
    assert "a.tif (2 nuclei)" in capsys.readouterr().out


def test_cli_single_file_without_spacing(tmp_path):
    write_tif(tmp_path / "c.tiff", stacked(BOXES_SEMANTIC).astype(np.uint8))
    run_cli("--pred", tmp_path / "c.tiff", "--out", tmp_path / "out", "--min-size", "1")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["c.tif"]


@pytest.mark.parametrize("setup, argv, fragment", [
    (lambda d: (d / "pred").mkdir(), [], "holds no segmentations"),
    (lambda d: write_tif(d / "pred" / "x.tif", np.zeros((2, 3, 4), np.float32)), [], "float32 values"),
    (lambda d: write_tif(d / "pred" / "x.tif", np.zeros((3, 4), np.uint8)), [], "expected a 3D segmentation"),
    (lambda d: (write_tif(d / "pred" / "x.tif", np.zeros((2, 3, 4), np.uint8)),
                write_tif(d / "out" / "x.tif", np.zeros((2, 3, 4), np.uint8))), [], "already exists"),
    (lambda d: write_tif(d / "pred" / "x.tif", np.zeros((2, 3, 4), np.uint8)), ["--border", "2"], "both 2"),
], ids=["empty", "float", "2d", "exists", "same-classes"])
def test_cli_bad_input(tmp_path, setup, argv, fragment):
    setup(tmp_path)
    with pytest.raises(UserError, match=fragment):
        run_cli("--pred", tmp_path / "pred", "--out", tmp_path / "out", *argv)


def test_missing_prediction_names_the_path(tmp_path):
    with pytest.raises(UserError, match="nope.nii.gz does not exist"):
        run_cli("--pred", tmp_path / "nope.nii.gz", "--out", tmp_path / "out")
