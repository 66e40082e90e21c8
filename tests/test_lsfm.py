"""Tests for nnunet_ext.dataset_conversion.lsfm: light-sheet channels + sparse slice masks -> nnU-Net raw dataset.

nnU-Net's integrity check spawns a worker (~4 s), so it runs for real in two conversions (NIfTI and TIFF output);
the other tests replace it with a recorder.
"""

import argparse
import json

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile

from nnunet_ext.dataset_conversion import lsfm
from nnunet_ext.datasets.sparsify import split_holdout
from nnunet_ext.errors import UserError

SHAPE = (6, 4, 5)  # z, y, x
SPACING = (5.0, 0.75, 1.5)  # three different values, so a (z, y, x) / (x, y, z) mix-up shows
CASE = "lsfm_000"
CLASSES = {"background": 0, "tumor": 2, "stroma": 5}  # non-consecutive values as in the masks -> 0, 1, 2
IGNORE = 3
# Slice 1 and 4 are annotated; their masks in source values and the expected output values.
MASKS = {
    1: np.array([[0, 2, 2, 0, 0], [0, 2, 2, 0, 5], [0, 0, 0, 5, 5], [0, 0, 0, 0, 5]], dtype=np.uint8),
    4: np.array([[5, 5, 0, 0, 0], [5, 0, 0, 2, 0], [0, 0, 2, 2, 0], [0, 0, 0, 0, 0]], dtype=np.uint8),
}
MAPPED = {1: np.array([[0, 1, 1, 0, 0], [0, 1, 1, 0, 2], [0, 0, 0, 2, 2], [0, 0, 0, 0, 2]]),
          4: np.array([[2, 2, 0, 0, 0], [2, 0, 0, 1, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 0]])}


def channel_volumes():
    """Three uint16 channels whose every voxel differs from the others' (channel c, voxel i: 1000 c + i)."""
    base = np.arange(np.prod(SHAPE), dtype=np.uint16).reshape(SHAPE)
    return {name: (base + 1000 * c).astype(np.uint16) for c, name in enumerate(("C488", "C560", "C710"))}


def write_stacks(folder, volumes):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, volume in volumes.items():
        tifffile.imwrite(folder / f"{name}.tif", volume)
        paths.append(folder / f"{name}.tif")
    return paths


def write_slice_folders(folder, volumes):
    """One folder of 2D slices per channel, numbered from 1 (slice_1 ... slice_6): positions, not numbers, count."""
    paths = []
    for name, volume in volumes.items():
        (folder / name).mkdir(parents=True)
        for z, plane in enumerate(volume):
            tifffile.imwrite(folder / name / f"slice_{z + 1}.tif", plane)
        paths.append(folder / name)
    return paths


def write_mask_folder(folder, masks, pattern="frame_{:06d}.png"):
    folder.mkdir(parents=True)
    for index, mask in masks.items():
        sitk.WriteImage(sitk.GetImageFromArray(mask), str(folder / pattern.format(index)))
    return folder


def write_label_stack(path, masks, shape=SHAPE, axis=0):
    stack = np.zeros(shape, dtype=np.uint8)
    for index, mask in masks.items():
        target = [slice(None)] * 3
        target[axis] = index
        stack[tuple(target)] = mask
    tifffile.imwrite(path, stack)
    return path


def expected_label(masks=MAPPED, shape=SHAPE, axis=0):
    label = np.full(shape, IGNORE, dtype=np.uint8)
    for index, mask in masks.items():
        target = [slice(None)] * 3
        target[axis] = index
        label[tuple(target)] = mask
    return label


def read_nifti(path):
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), tuple(reversed(image.GetSpacing()))


def listing(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else None


@pytest.fixture
def verified(monkeypatch):
    """Replaces nnU-Net's integrity check with a recorder of the folders it was asked to check."""
    calls = []
    monkeypatch.setattr(lsfm, "verify_raw_dataset", lambda folder: calls.append(folder.name))
    return calls


@pytest.fixture
def inputs(tmp_path):
    """Channel TIFF stacks, a CVAT-style mask folder and a JSON class mapping."""
    channels = write_stacks(tmp_path / "in", channel_volumes())
    masks = write_mask_folder(tmp_path / "in" / "masks", MASKS)
    classes = tmp_path / "in" / "classes.json"
    classes.write_text(json.dumps(CLASSES))
    return channels, masks, classes


# ------------------------------------------------------------------------------------ conversion, real check


def test_nifti_conversion_passes_nnunet_check(tmp_path, inputs):
    channels, masks, classes = inputs
    folder = lsfm.convert(channels, masks, tmp_path / "raw", 501, classes=classes, spacing=SPACING)
    assert folder == tmp_path / "raw" / "Dataset501_LSFM"
    assert listing(tmp_path / "raw") == ["Dataset501_LSFM"]
    assert listing(folder) == ["dataset.json", "imagesTr", "labelsTr"]
    assert listing(folder / "imagesTr") == [f"{CASE}_0000.nii.gz", f"{CASE}_0001.nii.gz", f"{CASE}_0002.nii.gz"]
    for c, volume in enumerate(channel_volumes().values()):
        image, spacing = read_nifti(folder / "imagesTr" / f"{CASE}_{c:04d}.nii.gz")
        assert image.dtype == np.uint16 and np.array_equal(image, volume)  # channel order = argument order
        assert spacing == SPACING
    label, spacing = read_nifti(folder / "labelsTr" / f"{CASE}.nii.gz")
    assert label.dtype == np.uint8 and spacing == SPACING
    np.testing.assert_array_equal(label, expected_label())
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "C488", "1": "C560", "2": "C710"}
    assert meta["labels"] == {"background": 0, "tumor": 1, "stroma": 2, "ignore": 3}
    assert meta["numTraining"] == 1 and meta["file_ending"] == ".nii.gz"
    assert meta["annotation_axis"] == 0
    assert meta["annotated_slices"] == {CASE: [1, 4]} and meta["holdout_slices"] == {CASE: []}
    assert meta["spacing"] == [5.0, 0.75, 1.5]
    assert meta["lsfm"]["classes"] == CLASSES and meta["lsfm"]["in_plane_size"] is None


def test_tiff_output_downsampled_with_holdout_reads_in_tiff3dio(tmp_path):
    from nnunetv2.imageio.tif_reader_writer import Tiff3DIO

    shape = (5, 8, 12)
    volumes = {"C488": np.full(shape, 300, np.uint16), "C560": np.full(shape, 7, np.uint16)}
    channels = write_stacks(tmp_path / "in", volumes)
    mask = (np.arange(96).reshape(8, 12) % 3).astype(np.uint8)
    masks = write_mask_folder(tmp_path / "masks", {0: mask, 2: mask, 4: mask}, pattern="{}.tif")
    folder = lsfm.convert(channels, masks, tmp_path / "raw", 502, name="Blaze", spacing=(4.0, 1.0, 1.0),
                          in_plane_size=4, holdout_fraction=0.34, seed=3, file_format="tif", case_id="pdac_7")
    meta = json.loads((folder / "dataset.json").read_text())
    # y: 8 -> 4 pixels doubles the voxel size, x: 12 -> 4 triples it, z stays.
    assert meta["spacing"] == [4.0, 2.0, 3.0]
    assert meta["overwrite_image_reader_writer"] == "Tiff3DIO" and meta["file_ending"] == ".tif"
    held = split_holdout([0, 2, 4], 0.34, 3)[1]
    assert len(held) == 1 and meta["holdout_slices"] == {"pdac_7": held}
    assert meta["annotated_slices"] == {"pdac_7": sorted({0, 2, 4} - set(held))}

    io = Tiff3DIO()
    images, props = io.read_images([str(folder / "imagesTr" / f"pdac_7_{c:04d}.tif") for c in range(2)])
    assert images.shape == (2, 5, 4, 4) and list(props["spacing"]) == [4.0, 2.0, 3.0]
    assert np.all(images[0] == 300) and np.all(images[1] == 7)  # a constant image stays constant
    assert tifffile.imread(folder / "imagesTr" / "pdac_7_0000.tif").dtype == np.uint16
    # Nearest neighbour under each output pixel centre: rows floor((2j+1) * 8/8) = 1,3,5,7, cols (2j+1)*12//8.
    small = mask[[1, 3, 5, 7]][:, [1, 4, 7, 10]]
    train, props = io.read_seg(str(folder / "labelsTr" / "pdac_7.tif"))
    assert list(props["spacing"]) == [4.0, 2.0, 3.0]
    holdout, _ = io.read_seg(str(folder / "labelsTr_holdout" / "pdac_7.tif"))
    for z in range(5):
        assert np.array_equal(train[0, z], small if z in meta["annotated_slices"]["pdac_7"] else np.full((4, 4), 3))
        assert np.array_equal(holdout[0, z], small if z in held else np.full((4, 4), 3))


def test_downsampling_does_not_alias():
    """A 0/200 checkerboard reduced 15 -> 5: plain sampling hits pixels 1, 4, 7, ... and keeps 0 or 200 each;
    the anti-aliasing blur makes it its mean. Border pixels see the 'nearest' padding, so the interior is checked."""
    checkerboard = (200 * (np.indices((2, 15, 15)).sum(axis=0) % 2)).astype(np.uint8)
    small = lsfm._downsample_image(checkerboard, 5)
    assert small.shape == (2, 5, 5) and small.dtype == np.uint8
    assert np.all(small[:, 1:4, 1:4] == 100)


# ------------------------------------------------------------------------------------ input variants


@pytest.mark.parametrize("channel_form", ["stacks", "slice_folders"])
@pytest.mark.parametrize("annotation_form", ["mask_folder", "label_stack"])
def test_input_forms_give_the_same_dataset(tmp_path, verified, channel_form, annotation_form):
    write = write_stacks if channel_form == "stacks" else write_slice_folders
    channels = write(tmp_path / "channels", channel_volumes())
    annotations = (write_mask_folder(tmp_path / "masks", MASKS) if annotation_form == "mask_folder"
                   else write_label_stack(tmp_path / "labels.tif", MASKS))
    folder = lsfm.convert(channels, annotations, tmp_path / "raw", 503, classes=CLASSES, spacing=SPACING)
    assert len(verified) == 1 and verified[0].startswith(f".{folder.name}.tmp-")  # checked before the rename
    np.testing.assert_array_equal(read_nifti(folder / "labelsTr" / f"{CASE}.nii.gz")[0], expected_label())
    for c, volume in enumerate(channel_volumes().values()):
        assert np.array_equal(read_nifti(folder / "imagesTr" / f"{CASE}_{c:04d}.nii.gz")[0], volume)
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "C488", "1": "C560", "2": "C710"}
    assert meta["annotated_slices"] == {CASE: [1, 4]}


def test_annotations_along_x(tmp_path, verified, inputs):
    channels, _, _ = inputs
    masks = {0: np.array([[0, 1, 1, 0]] * 6, dtype=np.uint8), 3: np.eye(6, 4, dtype=np.uint8)}  # (z, y) masks
    folder = lsfm.convert(channels, write_mask_folder(tmp_path / "xmasks", masks), tmp_path / "raw", 504,
                          spacing=SPACING, axis=2)
    label = read_nifti(folder / "labelsTr" / f"{CASE}.nii.gz")[0]
    expected = np.full(SHAPE, 2, dtype=np.uint8)  # no mapping: classes 0 and 1 found, ignore 2
    expected[:, :, 0], expected[:, :, 3] = masks[0], masks[3]
    np.testing.assert_array_equal(label, expected)
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "class_1": 1, "ignore": 2}
    assert meta["annotation_axis"] == 2 and meta["annotated_slices"] == {CASE: [0, 3]}


@pytest.mark.parametrize("text", [
    "background,0\ntumor,2\nstroma,5\n",
    "name,value\n# mask values of the CVAT export\nstroma, 5\ntumor,2\n\nbackground,0\n",
])
def test_csv_classes(tmp_path, text):
    path = tmp_path / "classes.csv"
    path.write_text(text)
    assert lsfm.load_classes(path) == CLASSES
    assert list(lsfm.load_classes(path)) == ["background", "tumor", "stroma"]  # ordered by value


def test_float_and_bool_masks_with_integer_values_are_accepted(tmp_path, verified, inputs):
    channels, _, _ = inputs
    stack = np.zeros(SHAPE, dtype=np.float32)
    stack[2] = MASKS[1].astype(np.float32)
    tifffile.imwrite(tmp_path / "labels.tif", stack)
    folder = lsfm.convert(channels, tmp_path / "labels.tif", tmp_path / "raw", 505, classes=CLASSES,
                          spacing=SPACING)
    np.testing.assert_array_equal(read_nifti(folder / "labelsTr" / f"{CASE}.nii.gz")[0],
                                  expected_label({2: MAPPED[1]}))
    tifffile.imwrite(tmp_path / "bool.tif", stack > 0)
    folder = lsfm.convert(channels, tmp_path / "bool.tif", tmp_path / "raw", 506, spacing=SPACING)
    assert read_nifti(folder / "labelsTr" / f"{CASE}.nii.gz")[0][2].tolist() == (MASKS[1] > 0).tolist()


def test_holdout_is_deterministic(tmp_path, verified, inputs):
    channels, _, _ = inputs
    masks = write_mask_folder(tmp_path / "five", {z: MASKS[1] for z in range(5)})
    runs = [lsfm.convert(channels, masks, tmp_path / "raw", dataset_id, spacing=SPACING, holdout_fraction=0.4,
                         seed=seed) for dataset_id, seed in ((507, 11), (508, 11))]
    metas = [json.loads((folder / "dataset.json").read_text()) for folder in runs]
    train, held = split_holdout(range(5), 0.4, 11)
    assert len(held) == 2  # round(0.4 * 5)
    for meta in metas:
        assert meta["holdout_slices"] == {CASE: held} and meta["annotated_slices"] == {CASE: train}
    truth = {z: np.where(MASKS[1] > 0, 1 + (MASKS[1] == 5), 0) for z in range(5)}
    sparse = read_nifti(runs[0] / "labelsTr" / f"{CASE}.nii.gz")[0]
    holdout = read_nifti(runs[0] / "labelsTr_holdout" / f"{CASE}.nii.gz")[0]
    np.testing.assert_array_equal(sparse, expected_label({z: truth[z] for z in train}))
    np.testing.assert_array_equal(holdout, expected_label({z: truth[z] for z in held}))
    assert (runs[1] / "labelsTr_holdout" / f"{CASE}.nii.gz").read_bytes() == \
        (runs[0] / "labelsTr_holdout" / f"{CASE}.nii.gz").read_bytes()


def test_cli_registers_lsfm_under_convert(tmp_path, verified, inputs, capsys):
    channels, masks, classes = inputs
    parser = argparse.ArgumentParser(prog="nnunet-ext")
    convert = parser.add_subparsers(dest="command").add_parser("convert").add_subparsers(dest="source")
    lsfm.register_cli(convert)
    args = parser.parse_args(["convert", "lsfm", "-d", "509", "--channels", *map(str, channels),
                              "--annotations", str(masks), "--classes", str(classes), "--spacing", "5", "0.75", "1.5",
                              "--out", str(tmp_path / "raw"), "--case-id", "sample_a", "--holdout", "0.5"])
    args.func(args)
    folder = tmp_path / "raw" / "Dataset509_LSFM"
    assert capsys.readouterr().out.strip() == f"wrote {folder}"
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["spacing"] == [5.0, 0.75, 1.5] and set(meta["annotated_slices"]) == {"sample_a"}
    assert sorted(meta["annotated_slices"]["sample_a"] + meta["holdout_slices"]["sample_a"]) == [1, 4]


# ------------------------------------------------------------------------------------ bad input


def _missing_channel(tmp, channels, masks):
    return dict(channels=[*channels[:2], tmp / "in" / "C710_missing.tif"]), "C710_missing.tif does not exist"


def _mismatched_shapes(tmp, channels, masks):
    tifffile.imwrite(tmp / "in" / "small.tif", np.zeros((6, 4, 4), np.uint16))
    return dict(channels=[channels[0], tmp / "in" / "small.tif"]), "small.tif (6, 4, 4)"


def _unknown_class(tmp, channels, masks):
    bad = MASKS[1].copy()
    bad[0, 0] = 7
    sitk.WriteImage(sitk.GetImageFromArray(bad), str(masks / "frame_000001.png"))
    return {}, "frame_000001.png: class value 7 (slice 1) is not in"


def _slice_outside(tmp, channels, masks):
    sitk.WriteImage(sitk.GetImageFromArray(MASKS[1]), str(masks / "frame_000006.png"))
    return {}, "frame_000006.png: slice 6 is outside the volume (6 slices along axis 0, 0..5)"


def _empty_mask_folder(tmp, channels, masks):
    (tmp / "empty").mkdir()
    return dict(annotations=tmp / "empty"), "empty holds no slice files"


def _empty_channel_folder(tmp, channels, masks):
    (tmp / "C405").mkdir()
    return dict(channels=[tmp / "C405", *channels[1:]]), "C405 holds no slice files"


def _float_mask(tmp, channels, masks):
    tifffile.imwrite(masks / "frame_000002.tif", np.full((4, 5), 0.5, np.float32))
    return {}, "frame_000002.tif: float mask with non-integer value 0.5"


def _wrong_mask_shape(tmp, channels, masks):
    tifffile.imwrite(masks / "frame_000002.tif", np.zeros((5, 4), np.uint8))
    return {}, "frame_000002.tif: mask shape (5, 4) differs from the slice shape (4, 5)"


def _label_stack_shape(tmp, channels, masks):
    return dict(annotations=write_label_stack(tmp / "l.tif", {}, shape=(6, 5, 4))), "l.tif: label volume shape"


def _empty_label_stack(tmp, channels, masks):
    return dict(annotations=write_label_stack(tmp / "zeros.tif", {})), "zeros.tif: every voxel is 0"


def _no_background(tmp, channels, masks):
    (tmp / "c.csv").write_text("tumor,2\nstroma,5\n")
    return dict(classes=tmp / "c.csv"), 'c.csv: no "background": 0 entry'


def _bad_json(tmp, channels, masks):
    (tmp / "c.json").write_text('{"background": 0,}')
    return dict(classes=tmp / "c.json"), "c.json: not valid JSON"


def _too_much_holdout(tmp, channels, masks):
    return dict(holdout_fraction=0.75), "holding out 2 of 2 annotated slices leaves none"


def _upsampling(tmp, channels, masks):
    return dict(in_plane_size=5), "--in-plane-size 5 exceeds the in-plane size 4 x 5"


def _downsampling_across_annotations(tmp, channels, masks):
    return dict(in_plane_size=2, axis=1), "--in-plane-size resamples y and x"


def _bad_spacing(tmp, channels, masks):
    return dict(spacing=(5.0, 0.0, 1.0)), "invalid spacing"


def _taken_id(tmp, channels, masks):
    (tmp / "raw" / "Dataset510_Other").mkdir(parents=True)
    return {}, "Dataset510_Other already exists"


@pytest.mark.parametrize("case", [
    _missing_channel, _mismatched_shapes, _unknown_class, _slice_outside, _empty_mask_folder, _empty_channel_folder,
    _float_mask, _wrong_mask_shape, _label_stack_shape, _empty_label_stack, _no_background, _bad_json,
    _too_much_holdout, _upsampling, _downsampling_across_annotations, _bad_spacing, _taken_id,
], ids=lambda case: case.__name__.strip("_"))
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, verified, inputs, case):
    channels, masks, classes = inputs
    changes, fragment = case(tmp_path, channels, masks)
    before = listing(tmp_path / "raw")
    arguments = {**dict(channels=channels, annotations=masks, classes=classes, spacing=SPACING), **changes}
    with pytest.raises(UserError) as info:
        lsfm.convert(arguments.pop("channels"), arguments.pop("annotations"), tmp_path / "raw", 510, **arguments)
    message = str(info.value)
    assert fragment in message and "\n" not in message
    assert listing(tmp_path / "raw") == before
    assert verified == []


def test_failing_integrity_check_leaves_nothing(tmp_path, monkeypatch, inputs):
    def failing(folder):
        raise UserError("the converted dataset fails nnU-Net's integrity check: test")

    monkeypatch.setattr(lsfm, "verify_raw_dataset", failing)
    channels, masks, classes = inputs
    with pytest.raises(UserError, match="integrity check"):
        lsfm.convert(channels, masks, tmp_path / "raw" / "nested", 511, classes=classes, spacing=SPACING)
    assert not (tmp_path / "raw").exists()
