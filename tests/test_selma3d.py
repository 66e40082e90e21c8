"""SELMA3D converter: reoriented patches, streamed whole-brain sub-volumes, the Dask path, bad input."""

import argparse
import itertools
import json
import re

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile

from nnunet_ext.dataset_conversion import selma3d
from nnunet_ext.errors import UserError

LPS = (1, 0, 0, 0, 1, 0, 0, 0, 1)
RAS = (-1, 0, 0, 0, -1, 0, 0, 0, 1)
SWAPPED_XY = (0, 1, 0, 1, 0, 0, 0, 0, 1)  # array x runs along physical y and array y along physical x ("PLS")
PATCH = np.arange(2 * 3 * 4, dtype=np.uint16).reshape(2, 3, 4) * 100  # (z, y, x)
MASK = (PATCH % 300 == 0).astype(np.uint8)
SPACING_XYZ = (0.5, 0.75, 2.0)
TILE = (4, 16, 16)
THRESHOLD, MIN_FOREGROUND = 500, 10.0
KEPT = [(0, 0, 0), (1, 1, 2)]  # hand-counted below: 256 and 103 of 1024 voxels > 500 (> 10 %)


def write_nifti(path, array, spacing_xyz=SPACING_XYZ, direction=LPS, origin=(0.0, 0.0, 0.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing_xyz)
    image.SetDirection(direction)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))


def write_pair(folder, stem, image, label, direction=LPS, spacing_xyz=SPACING_XYZ):
    folder.mkdir(parents=True, exist_ok=True)
    write_nifti(folder / f"{stem}.nii.gz", image, spacing_xyz, direction)
    write_nifti(folder / f"{stem}_label.nii.gz", label, spacing_xyz, direction)


def brain_volume() -> np.ndarray:
    """12 x 40 x 48 int16 with negatives and int16 extremes; bright blocks make the filter decisions below."""
    z, y, x = np.indices((12, 40, 48))
    volume = (7 * z - 3 * y + 5 * x - 200).astype(np.int16)  # -317..112: never above the threshold
    volume[0, 5, 5] = -32768
    volume[7, 30, 46] = -32768
    volume[1, 0:16, 0:16] = 1000  # tile (0, 0, 0): 256 voxels = 25 % -> kept
    volume[2, 0:10, 16:26] = 1000  # tile (0, 0, 1): 100 voxels = 9.8 % -> dropped
    volume[5, 16:26, 32:42] = 1000  # tile (1, 1, 2): 100 + 3 = 103 voxels = 10.06 % -> kept
    volume[6, 16, 32:35] = 1000
    volume[5, 16, 32] = 32767
    volume[9, 16:26, 0:10] = 1000  # tile (2, 1, 0): 100 + 2 = 102 voxels = 9.96 % -> dropped
    volume[9, 26, 0:2] = 1000
    volume[:, 32:, :] = 2000  # rows 32..39 are an incomplete edge tile: never written
    return volume


def write_slices(folder, volume):
    folder.mkdir(parents=True, exist_ok=True)
    for z, plane in enumerate(volume):
        tifffile.imwrite(folder / f"slice_{z:04d}.tif", plane)
    return folder


@pytest.fixture
def brain(tmp_path):
    return write_slices(tmp_path / "brain", brain_volume())


def region(index):
    return tuple(slice(i * s, (i + 1) * s) for i, s in zip(index, TILE))


def read(path):
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), tuple(reversed(image.GetSpacing()))


def assert_nothing_written(raw):
    assert not raw.exists() or list(raw.iterdir()) == []


# --------------------------------------------------------------------------------------------- patches


@pytest.mark.parametrize("direction, expected", [
    (LPS, PATCH),
    (RAS, PATCH[:, ::-1, ::-1]),  # R->L and A->P: both in-plane axes flip
    (SWAPPED_XY, PATCH.transpose(0, 2, 1)),  # LPS x is the stored y axis and vice versa
])
def test_load_patch_reorients_image_and_label_to_lps(tmp_path, direction, expected):
    write_pair(tmp_path, "p", PATCH, MASK * 255, direction)
    image, label, spacing = selma3d.load_patch(selma3d.find_patch_pairs(tmp_path, "vessel")[0])
    np.testing.assert_array_equal(image, expected)
    assert image.dtype == np.uint16
    mask = {LPS: MASK, RAS: MASK[:, ::-1, ::-1], SWAPPED_XY: MASK.transpose(0, 2, 1)}[direction]
    np.testing.assert_array_equal(label, mask)  # 255 -> 1, same voxel order as the image
    assert spacing == ((2.0, 0.75, 0.5) if direction != SWAPPED_XY else (2.0, 0.5, 0.75))


def test_label_stored_in_another_orientation_is_aligned_with_its_image(tmp_path):
    image = sitk.GetImageFromArray(PATCH)
    image.SetSpacing(SPACING_XYZ)
    label = sitk.GetImageFromArray(MASK)
    label.CopyInformation(image)
    sitk.WriteImage(image, str(tmp_path / "p.nii.gz"))
    sitk.WriteImage(sitk.DICOMOrient(label, "RAS"), str(tmp_path / "p_label.nii.gz"))  # same grid, flipped storage
    np.testing.assert_array_equal(read(tmp_path / "p_label.nii.gz")[0], MASK[:, ::-1, ::-1])
    _, mask, _ = selma3d.load_patch(selma3d.find_patch_pairs(tmp_path, "vessel")[0])
    np.testing.assert_array_equal(mask, MASK)


def test_challenge_layout_picks_the_structure_folder(tmp_path):
    for structure in ("Vessels", "microglia"):
        (tmp_path / structure / "raw").mkdir(parents=True)
        (tmp_path / structure / "gt").mkdir()
        write_nifti(tmp_path / structure / "raw" / "patchvolume_001.nii.gz", PATCH)
        write_nifti(tmp_path / structure / "gt" / "patchvolume_001_label.nii.gz", MASK)
    [pair] = selma3d.find_patch_pairs(tmp_path, "vessel")
    assert pair.case == "patch_patchvolume_001"
    assert pair.image == tmp_path / "Vessels" / "raw" / "patchvolume_001.nii.gz"
    assert pair.label == tmp_path / "Vessels" / "gt" / "patchvolume_001_label.nii.gz"
    with pytest.raises(UserError, match="no sub-folder for structure 'nucleus'"):
        selma3d.find_patch_pairs(tmp_path, "nucleus")


@pytest.mark.parametrize("label_kwargs, fragment", [
    ({"array": MASK[:, :2]}, "size (4, 2, 2) differs from (4, 3, 2)"),
    ({"spacing_xyz": (0.5, 0.5, 2.0)}, "spacing"),
    ({"origin": (1.0, 0.0, 0.0)}, "origin"),
    ({"array": MASK * 2 + MASK}, "label values 0, 3 are not a binary mask"),
])
def test_bad_patch_pairs_are_refused_before_writing(tmp_path, label_kwargs, fragment):
    patches = tmp_path / "patches"
    patches.mkdir()
    write_nifti(patches / "p.nii.gz", PATCH)
    kwargs = {"array": MASK, **label_kwargs}
    write_nifti(patches / "p_label.nii.gz", kwargs.pop("array"), **kwargs)
    with pytest.raises(UserError, match=r"p_label\.nii\.gz.*" + re.escape(fragment)):
        selma3d.convert(tmp_path / "raw", 1, "vessel", patches=patches)
    assert_nothing_written(tmp_path / "raw")


def test_image_without_label_is_refused(tmp_path):
    write_nifti(tmp_path / "p.nii.gz", PATCH)
    with pytest.raises(UserError, match=r"p\.nii\.gz: no label p_label\.nii\.gz"):
        selma3d.find_patch_pairs(tmp_path, "vessel")


# --------------------------------------------------------------------------------------------- whole brain


def test_patches_and_whole_brain_in_one_dataset(tmp_path, brain):
    patches = tmp_path / "patches"
    write_pair(patches, "a", PATCH, MASK)
    write_pair(patches, "b", PATCH, MASK * 255, RAS)
    write_pair(patches, "c", PATCH, MASK, SWAPPED_XY, spacing_xyz=(0.75, 0.5, 2.0))
    folder = selma3d.convert(tmp_path / "raw", 7, "nuclei", patches=patches, whole_brain=[brain],
                             spacing=(4.0, 1.0, 1.0), size=TILE, threshold=THRESHOLD,
                             min_foreground=MIN_FOREGROUND, num_workers=2)
    assert folder.name == "Dataset007_SELMA3D_nucleus"
    cases = sorted(p.name for p in (folder / "labelsTr").iterdir())
    assert cases == ["brain00_z000_y000_x000.nii.gz", "brain00_z001_y001_x002.nii.gz", "patch_a.nii.gz",
                     "patch_b.nii.gz", "patch_c.nii.gz"]
    for stem, array in {"a": PATCH, "b": PATCH[:, ::-1, ::-1], "c": PATCH.transpose(0, 2, 1)}.items():
        image, spacing = read(folder / "imagesTr" / f"patch_{stem}_0000.nii.gz")
        label, _ = read(folder / "labelsTr" / f"patch_{stem}.nii.gz")
        np.testing.assert_array_equal(image, array)
        np.testing.assert_array_equal(label, (array % 300 == 0).astype(np.uint8))
        assert spacing == (2.0, 0.75, 0.5)  # c: its stored x spacing 0.75 becomes the LPS y spacing
    volume = brain_volume()
    for index in KEPT:
        case = "brain00_" + "_".join(f"{a}{i:03d}" for a, i in zip("zyx", index))
        image, spacing = read(folder / "imagesTr" / f"{case}_0000.nii.gz")
        label, _ = read(folder / "labelsTr" / f"{case}.nii.gz")
        assert image.dtype == np.int16 and spacing == (4.0, 1.0, 1.0)
        np.testing.assert_array_equal(image, volume[region(index)])  # incl. -32768 / 32767, no wrap-around
        assert label.dtype == np.uint8 and (label == 2).all()
    assert read(folder / "imagesTr" / "brain00_z000_y000_x000_0000.nii.gz")[0].min() == -32768
    document = json.loads((folder / "dataset.json").read_text())
    assert document["labels"] == {"background": 0, "nucleus": 1, "ignore": 2}
    assert document["numTraining"] == 5 and document["file_ending"] == ".nii.gz"
    assert document["spacing"] == [2.0, 0.75, 0.5]  # per-axis median of 3 patches (2, .75, .5), 2 tiles (4, 1, 1)
    assert document["annotation_axis"] == 0
    record = document["selma3d"]["whole_brain"]["brain00"]
    assert record["grid"] == [3, 2, 3] and record["kept"] == 2 and record["dtype"] == "int16"


def test_cli_writes_tiff_dataset(tmp_path, brain, capsys):
    parser = argparse.ArgumentParser()
    selma3d.register_cli(parser.add_subparsers())
    args = parser.parse_args(["selma3d", "-d", "3", "--structure", "c-Fos", "--whole-brain", str(brain),
                              "--spacing", "4", "1", "1", "--size", *map(str, TILE), "--threshold", "500",
                              "--min-foreground", "10", "--workers", "1", "--format", "tif",
                              "--out", str(tmp_path / "raw")])
    args.func(args)
    folder = tmp_path / "raw" / "Dataset003_SELMA3D_cfos"
    assert "brain00: kept 2 of 18 sub-volumes" in capsys.readouterr().out
    image = tifffile.imread(folder / "imagesTr" / "brain00_z001_y001_x002_0000.tif")
    np.testing.assert_array_equal(image, brain_volume()[region((1, 1, 2))])
    for spacing_file in ("imagesTr/brain00_z001_y001_x002.json", "labelsTr/brain00_z001_y001_x002.json"):
        assert json.loads((folder / spacing_file).read_text()) == {"spacing": [4.0, 1.0, 1.0]}  # Tiff3DIO's names
    assert json.loads((folder / "dataset.json").read_text())["overwrite_image_reader_writer"] == "Tiff3DIO"
    with tifffile.TiffFile(folder / "labelsTr" / "brain00_z001_y001_x002.tif") as label:
        assert label.pages[0].compression == tifffile.COMPRESSION.ZSTD  # nnU-Net's check above read it back
        assert (label.asarray() == 2).all()  # a copy of the first tile's label file


@pytest.mark.parametrize("no_verify, checked", [([], 1), (["--no-verify"], 0)])
def test_no_verify_skips_nnunets_integrity_check(tmp_path, brain, monkeypatch, no_verify, checked):
    calls = []
    monkeypatch.setattr(selma3d, "verify_raw_dataset", lambda folder, num_processes: calls.append(folder))
    parser = argparse.ArgumentParser()
    selma3d.register_cli(parser.add_subparsers())
    args = parser.parse_args(["selma3d", "-d", "3", "--structure", "vessel", "--whole-brain", str(brain),
                              "--spacing", "4", "1", "1", "--size", *map(str, TILE), "--threshold", "-40000",
                              "--workers", "1", "--out", str(tmp_path / "raw"), *no_verify])
    args.func(args)
    assert len(calls) == checked
    labels = tmp_path / "raw" / "Dataset003_SELMA3D_vessel" / "labelsTr"
    assert len(list(labels.iterdir())) == 18  # all 3 x 2 x 3 tiles


@pytest.mark.parametrize("file_format", ["nifti", "tif"])
def test_reused_slab_and_tile_buffers_keep_every_tile_intact(tmp_path, brain, file_format):
    # all 18 tiles kept over 3 slabs, 2 writer threads: tile buffers are handed back and refilled while others wait
    folder = selma3d.convert(tmp_path / "raw", 5, "vessel", whole_brain=[brain], spacing=(4, 1, 1), size=TILE,
                             threshold=-40000, num_workers=2, file_format=file_format, verify=False)
    volume, ending = brain_volume(), {"nifti": ".nii.gz", "tif": ".tif"}[file_format]
    for index in itertools.product(range(3), range(2), range(3)):
        case = "brain00_" + "_".join(f"{a}{i:03d}" for a, i in zip("zyx", index))
        image = read(folder / "imagesTr" / f"{case}_0000{ending}")[0] if file_format == "nifti" else \
            tifffile.imread(folder / "imagesTr" / f"{case}_0000{ending}")
        np.testing.assert_array_equal(image, volume[region(index)])


def test_free_list_hands_back_given_arrays_before_allocating():
    tiles = selma3d._FreeList((2, 3), np.int16)
    first = tiles.take()
    assert first.shape == (2, 3) and first.dtype == np.int16
    tiles.give(first)
    assert tiles.take() is first
    assert tiles.take() is not first  # none left: a new one


@pytest.mark.parametrize("tiles_per_slab, num_workers, expected", [
    ([(4, 6), (2, 3)], 2, 4),  # half of the smallest slab's 6 tiles is 3: at least 2 per thread
    ([(10, 10), (8, 9)], 2, 36),  # half of min(100, 72) tiles
    ([], 3, 6),  # patches only
])
def test_write_queue_holds_half_a_slab_of_tiles(tiles_per_slab, num_workers, expected):
    brains = [selma3d._Brain("b", None, selma3d.TileGrid((4, 16 * ny, 16 * nx), (4, 16, 16)))
              for ny, nx in tiles_per_slab]
    assert selma3d._max_pending(brains, num_workers) == expected


def test_distributed_scheduler_gives_the_same_output(tmp_path, brain):
    from distributed import LocalCluster

    volume = selma3d.scan_slice_folder(brain)
    local = list(selma3d.iter_subvolumes(volume, TILE, THRESHOLD, MIN_FOREGROUND, num_workers=1))
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        folder = selma3d.convert(tmp_path / "raw", 9, "microglia", whole_brain=[brain], spacing=(4, 1, 1),
                                 size=TILE, threshold=THRESHOLD, min_foreground=MIN_FOREGROUND,
                                 scheduler=cluster.scheduler_address, num_workers=1)
    assert [s.index for s in local] == KEPT
    for sub in local:
        case = "brain00_" + "_".join(f"{a}{i:03d}" for a, i in zip("zyx", sub.index))
        np.testing.assert_array_equal(read(folder / "imagesTr" / f"{case}_0000.nii.gz")[0], sub.array)


@pytest.mark.parametrize("threshold, expected", [
    (-40000, [[1, 1], [1, 1]]),  # below int16's range: every voxel is above it
    (-32768.5, [[1, 1], [1, 1]]),
    (-32768, [[0, 1], [1, 1]]),
    (2.5, [[0, 0], [1, 1]]),  # integers above 2.5 are those above 2
    (32767, [[0, 0], [0, 0]]),
    (40000, [[0, 0], [0, 0]]),  # above int16's range: no wrap-around to negative values
])
def test_per_tile_foreground_counts_compare_in_the_slice_dtype(threshold, expected):
    plane = np.array([[-32768, 0], [3, 32767]], dtype=np.int16)  # one 2 x 2 slice, 1 x 1 tiles
    np.testing.assert_array_equal(selma3d._count_above(plane, 1, 1, threshold), expected)


@pytest.mark.parametrize("num_workers", [1, 2])
def test_slabs_are_read_lazily_one_at_a_time(tmp_path, monkeypatch, num_workers):
    folder = write_slices(tmp_path / "brain", brain_volume()[:, :32, :32].repeat(2, axis=0)[:14])  # 14 slices
    reads = []
    read_slice = selma3d.read_slice
    monkeypatch.setattr(selma3d, "read_slice", lambda path: reads.append(path.name) or read_slice(path))
    volume = selma3d.scan_slice_folder(folder)
    assert reads == []  # scanning reads the headers only
    seen_per_slab = {}
    for sub in selma3d.iter_subvolumes(volume, TILE, threshold=-10**6, num_workers=num_workers):
        seen_per_slab.setdefault(sub.index[0], sorted(reads))
    for iz, seen in seen_per_slab.items():
        # when slab iz yields its first tile, exactly the slices of slabs 0..iz have been read, once each
        assert seen == [f"slice_{z:04d}.tif" for z in range(4 * (iz + 1))]
    assert sorted(reads) == [f"slice_{z:04d}.tif" for z in range(12)]  # slices 12, 13: incomplete slab, unread


# --------------------------------------------------------------------------------------------- bad input


def convert_brain(tmp_path, folder, **kwargs):
    arguments = {"spacing": (4, 1, 1), "size": TILE, "num_workers": 1, **kwargs}
    return selma3d.convert(tmp_path / "raw", 1, "vessel", whole_brain=[folder], **arguments)


def test_empty_slice_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty holds no slice files"):
        convert_brain(tmp_path, tmp_path / "empty")
    assert_nothing_written(tmp_path / "raw")


@pytest.mark.parametrize("odd_slice, fragment", [
    (np.zeros((40, 40), np.int16), r"slice_0005\.tif: shape \(40, 40\) int16 differs"),
    (np.zeros((40, 48), np.uint16), r"slice_0005\.tif: shape \(40, 48\) uint16 differs"),
])
def test_slice_that_differs_is_named(tmp_path, brain, odd_slice, fragment):
    tifffile.imwrite(brain / "slice_0005.tif", odd_slice)
    with pytest.raises(UserError, match=fragment):
        convert_brain(tmp_path, brain)
    assert_nothing_written(tmp_path / "raw")


def test_float_slices_are_refused(tmp_path):
    folder = write_slices(tmp_path / "brain", brain_volume().astype(np.float32))
    with pytest.raises(UserError, match=r"slice_0000\.tif: float32 slices are not accepted"):
        convert_brain(tmp_path, folder)
    assert_nothing_written(tmp_path / "raw")


def test_subvolume_larger_than_the_volume(tmp_path, brain):
    with pytest.raises(UserError, match=r"sub-volume size \(4, 64, 16\) is larger than the volume \(12, 40, 48\)"):
        convert_brain(tmp_path, brain, size=(4, 64, 16))
    assert_nothing_written(tmp_path / "raw")


@pytest.mark.parametrize("kwargs, fragment", [
    ({"spacing": None}, "--spacing Z Y X is required"),
    ({"structure": "axon"}, "unknown structure 'axon'"),
    ({"min_foreground": 100}, "invalid --min-foreground 100"),
    ({"size": (4, 0, 16)}, "invalid sub-volume size"),
])
def test_bad_arguments(tmp_path, brain, kwargs, fragment):
    structure = kwargs.pop("structure", "vessel")
    arguments = {"spacing": (4, 1, 1), "size": TILE, **kwargs}
    with pytest.raises(UserError, match=fragment):
        selma3d.convert(tmp_path / "raw", 1, structure, whole_brain=[brain], **arguments)
    assert_nothing_written(tmp_path / "raw")


def test_failure_while_streaming_leaves_nothing_behind(tmp_path, brain, monkeypatch):
    read_slice = selma3d.read_slice

    def failing(path):
        if path.name == "slice_0009.tif":
            raise UserError(f"{path}: cannot read this slice")
        return read_slice(path)

    monkeypatch.setattr(selma3d, "read_slice", failing)
    with pytest.raises(UserError, match="slice_0009.tif"):
        convert_brain(tmp_path, brain, threshold=THRESHOLD, min_foreground=MIN_FOREGROUND)  # slabs 0, 1 written
    assert_nothing_written(tmp_path / "raw")


def test_filter_that_keeps_nothing(tmp_path, brain):
    with pytest.raises(UserError, match="no sub-volume passed the foreground filter"):
        convert_brain(tmp_path, brain, threshold=40000)  # above int16's range
    assert_nothing_written(tmp_path / "raw")
