"""Tests for nnunet_ext.datasets.readers: TIFF stacks, slice folders, NIfTI and HDF5, and their errors."""

import h5py
import numpy as np
import pytest
import SimpleITK as sitk
import tifffile

from nnunet_ext.datasets import readers
from nnunet_ext.errors import UserError


def write_slices(folder, planes: dict):
    """``{file name: 2D array}`` as TIFF/PNG files in ``folder``."""
    folder.mkdir(exist_ok=True)
    for name, plane in planes.items():
        if name.endswith(".png"):
            sitk.WriteImage(sitk.GetImageFromArray(plane), str(folder / name))
        else:
            tifffile.imwrite(folder / name, plane)
    return folder


def plane(value, shape=(3, 4), dtype=np.uint8):
    return np.full(shape, value, dtype=dtype)


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------ slice folders


@pytest.mark.parametrize("name, index", [
    ("slice_0042.tif", 42), ("z7.png", 7), ("stack_v2_0010.tiff", 10), ("frame_000000.PNG", 0), ("12.tif", 12),
])
def test_slice_index_is_the_last_number(name, index):
    assert readers.slice_index(name) == index


def test_slice_index_without_number():
    assert "no slice number in the file name" in one_line_error(readers.slice_index, "cover.tif")


def test_slices_are_ordered_by_number_not_name(tmp_path):
    folder = write_slices(tmp_path / "s", {"slice_10.tif": plane(10), "slice_2.tif": plane(2),
                                           "slice_1.tif": plane(1), "notes.txt.bak": plane(0)})
    assert [p.name for p in readers.list_slices(folder)] == ["slice_1.tif", "slice_2.tif", "slice_10.tif"]
    volume = write_slices(tmp_path / "v", {"slice_10.tif": plane(10), "slice_9.tif": plane(9), "slice_8.tif": plane(8)})
    stack = readers.read_slice_folder(volume)
    assert stack.shape == (3, 3, 4) and stack[:, 0, 0].tolist() == [8, 9, 10]
    assert np.array_equal(readers.read_volume(volume), stack)


def test_duplicate_slice_numbers(tmp_path):
    folder = write_slices(tmp_path / "s", {"a_01.tif": plane(1), "b_1.tif": plane(1)})
    message = one_line_error(readers.list_slices, folder)
    assert "have the same slice number 1" in message and "a_01.tif" in message and "b_1.tif" in message


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no slices here")
    assert "empty holds no slice files" in one_line_error(readers.read_slice_folder, tmp_path / "empty")


def test_not_a_folder(tmp_path):
    assert "is not a folder of 2D slices" in one_line_error(readers.list_slices, tmp_path / "missing")


@pytest.mark.parametrize("odd, fragment", [
    (plane(3, shape=(4, 4)), "slice_3.tif: shape (4, 4) uint8 differs from slice_1.tif ((3, 4) uint8)"),
    (plane(3, dtype=np.uint16), "slice_3.tif: shape (3, 4) uint16 differs from slice_1.tif ((3, 4) uint8)"),
])
def test_mismatching_slice_names_the_file(tmp_path, odd, fragment):
    folder = write_slices(tmp_path / "s", {"slice_1.tif": plane(1), "slice_2.tif": plane(2), "slice_3.tif": odd})
    assert fragment in one_line_error(readers.read_slice_folder, folder)


def test_signed_16_bit_slices_keep_dtype_and_values(tmp_path):
    planes = {f"s_{z}.tif": np.array([[-32768, -1], [0, 32767]], dtype=np.int16) + z for z in range(3)}
    planes["s_0.tif"][0, 0] = -32768
    stack = readers.read_slice_folder(write_slices(tmp_path / "s", planes))
    assert stack.dtype == np.int16
    assert stack[0].tolist() == [[-32768, -1], [0, 32767]]
    assert stack[2].tolist() == [[-32766, 1], [2, -32767]]  # 32767 + 2 wraps, as stored


def test_png_slices(tmp_path):
    planes = {"m_0.png": plane(0, dtype=np.uint16), "m_1.png": plane(65535, dtype=np.uint16)}
    folder = write_slices(tmp_path / "p", planes)
    stack = readers.read_slice_folder(folder)
    assert stack.dtype == np.uint16 and stack[:, 0, 0].tolist() == [0, 65535]


def test_rgb_slice_is_refused(tmp_path):
    tifffile.imwrite(tmp_path / "rgb_1.tif", np.zeros((3, 4, 3), np.uint8))
    assert "rgb_1.tif: expected a 2D slice, got shape (3, 4, 3)" in one_line_error(readers.read_slice,
                                                                                   tmp_path / "rgb_1.tif")


def test_corrupt_slice_names_the_file(tmp_path):
    (tmp_path / "bad_1.tif").write_bytes(b"not a tiff")
    assert "bad_1.tif: cannot read this slice" in one_line_error(readers.read_slice, tmp_path / "bad_1.tif")


# ------------------------------------------------------------------------------------ volumes


@pytest.mark.parametrize("write", [
    lambda path, a: tifffile.imwrite(path, a, photometric="minisblack"),
    lambda path, a: tifffile.imwrite(path, a, imagej=True),
    lambda path, a: _write_pages(path, a),
], ids=["tifffile", "imagej", "page_by_page"])
def test_multi_page_tiff(tmp_path, write):
    stack = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(3, 4, 5)
    write(tmp_path / "stack.tif", stack)
    assert np.array_equal(readers.read_volume(tmp_path / "stack.tif"), stack)


def _write_pages(path, stack):
    """Pages written one by one without shape metadata, as generic libtiff writers do."""
    with tifffile.TiffWriter(path) as tif:
        for page in stack:
            tif.write(page, metadata=None)


def test_multi_series_tiff_is_stacked_not_truncated(tmp_path):
    stack = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(3, 4, 5)
    with tifffile.TiffWriter(tmp_path / "series.tif") as tif:
        for page in stack:
            tif.write(page)
    np.testing.assert_array_equal(readers.read_tiff(tmp_path / "series.tif"), stack)


def test_multi_series_tiff_with_different_shapes_is_refused(tmp_path):
    with tifffile.TiffWriter(tmp_path / "mixed.tif") as tif:
        tif.write(np.zeros((4, 5), np.uint8))
        tif.write(np.zeros((4, 6), np.uint8))
    with pytest.raises(UserError, match="mixed.tif: its 2 image series differ"):
        readers.read_tiff(tmp_path / "mixed.tif")


def test_corrupt_tiff(tmp_path):
    (tmp_path / "v.tif").write_bytes(b"II*\x00\x08\x00\x00\x00garbage")  # a TIFF header, then nonsense
    assert "v.tif: cannot read this TIFF" in one_line_error(readers.read_volume, tmp_path / "v.tif")


def test_nifti_spacing_is_zyx(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.5, 1.0, 4.0))  # SimpleITK order: x, y, z
    sitk.WriteImage(image, str(tmp_path / "v.nii.gz"))
    volume, spacing, read_back = readers.read_nifti(tmp_path / "v.nii.gz")
    assert volume.shape == (2, 3, 4) and np.array_equal(volume, array)
    assert spacing == (4.0, 1.0, 0.5)
    assert read_back.GetSize() == (4, 3, 2)
    assert np.array_equal(readers.read_volume(tmp_path / "v.nii.gz"), array)


def test_corrupt_nifti(tmp_path):
    (tmp_path / "v.nii.gz").write_bytes(b"not nifti")
    assert "v.nii.gz: cannot read this NIfTI file" in one_line_error(readers.read_nifti, tmp_path / "v.nii.gz")


def test_hdf5(tmp_path):
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f["stack"] = np.arange(8, dtype=np.int32).reshape(2, 2, 2)
        f["raw"] = np.zeros(1)
    assert readers.read_volume(tmp_path / "v.h5", key="stack").tolist() == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    message = one_line_error(readers.read_hdf5, tmp_path / "v.h5", "labels")
    assert "v.h5: no dataset 'labels' (found: raw, stack)" in message
    message = one_line_error(readers.read_volume, tmp_path / "v.h5")
    assert "needs the dataset key" in message and "--key" not in message  # no command has such an option


def test_corrupt_hdf5(tmp_path):
    (tmp_path / "v.h5").write_bytes(b"not hdf5")
    assert "v.h5: cannot read this HDF5 file" in one_line_error(readers.read_hdf5, tmp_path / "v.h5", "stack")


@pytest.mark.parametrize("name, fragment", [
    ("volume.raw", "volume.raw: unsupported format"),
    ("missing.tif", "missing.tif does not exist"),
])
def test_read_volume_refuses(tmp_path, name, fragment):
    if name == "volume.raw":
        (tmp_path / name).write_bytes(b"\x00" * 8)
    assert fragment in one_line_error(readers.read_volume, tmp_path / name)
