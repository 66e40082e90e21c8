"""The conversion commands through the real ``nnunet-ext`` entry point (the modules' own tests go deeper)."""

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
from conftest import cli

from nnunet_ext.datasets.raw_dataset import write_image

pytestmark = pytest.mark.integration


def run(*args, check=True):
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    return cli("nnunet-ext", *args, env=env, check=check)


def read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_lsfm_then_error_line(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("488", "560"):
        tifffile.imwrite(tmp_path / f"{name}.tif", rng.integers(0, 4000, (6, 16, 16), dtype=np.uint16))
    labels = np.zeros((6, 16, 16), np.uint8)
    labels[0, 4:8, 4:8] = 1  # slices 0 and 3 annotated; an empty slice means unannotated
    labels[3, 2:5, 9:12] = 1
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    raw = tmp_path / "raw"
    run("convert", "lsfm", "-d", "11", "--channels", str(tmp_path / "488.tif"), str(tmp_path / "560.tif"),
        "--annotations", str(tmp_path / "labels.tif"), "--spacing", "5", "1", "1", "--out", str(raw))
    (dataset,) = raw.glob("Dataset011_*")
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["labels"]["ignore"] == 2 and meta["annotation_axis"] == 0
    (label_file,) = (dataset / "labelsTr").glob("*.nii.gz")
    label = read(label_file)
    assert set(np.unique(label[[1, 2, 4, 5]])) == {2}  # unannotated slices are ignore
    np.testing.assert_array_equal(label[[0, 3]], labels[[0, 3]])
    assert len(list((dataset / "imagesTr").glob("*_000[01].nii.gz"))) == 2

    failed = run("convert", "lsfm", "-d", "12", "--channels", str(tmp_path / "missing.tif"), "--annotations",
                 str(tmp_path / "labels.tif"), "--spacing", "5", "1", "1", "--out", str(raw), check=False)
    assert failed.returncode == 2
    assert failed.stderr.strip().count("\n") == 0 and "missing.tif" in failed.stderr
    assert sorted(p.name for p in raw.iterdir()) == [dataset.name]


def test_sparsify_a_dense_dataset(tmp_path):
    source = tmp_path / "Dataset020_Dense"
    for sub in ("imagesTr", "labelsTr"):
        (source / sub).mkdir(parents=True)
    dense = (np.arange(8 * 10 * 12).reshape(8, 10, 12) % 3).astype(np.uint8)
    write_image(dense.astype(np.float32), source / "imagesTr" / "case", (2, 1, 1), channel=0)
    write_image(dense, source / "labelsTr" / "case", (2, 1, 1))
    (source / "dataset.json").write_text(json.dumps({"channel_names": {"0": "em"}, "numTraining": 1,
                                                     "labels": {"background": 0, "a": 1, "b": 2},
                                                     "file_ending": ".nii.gz"}))
    run("sparsify", str(source), "-d", "21", "--every", "3", "--out", str(tmp_path / "raw"))
    (dataset,) = (tmp_path / "raw").glob("Dataset021_*")
    sparse = read(dataset / "labelsTr" / "case.nii.gz")
    np.testing.assert_array_equal(sparse[[0, 3, 6]], dense[[0, 3, 6]])
    assert set(np.unique(sparse[[1, 2, 4, 5, 7]])) == {3}
    np.testing.assert_array_equal(read(dataset / "labelsTr_dense" / "case.nii.gz"), dense)


def test_fibsem_tiles(tmp_path):
    slices, masks = tmp_path / "slices", tmp_path / "masks"
    slices.mkdir()
    masks.mkdir()
    volume = np.random.default_rng(1).integers(0, 255, (6, 32, 32), dtype=np.uint8)
    for z in range(6):
        tifffile.imwrite(slices / f"slice_{z:04d}.tif", volume[z])
    mask = np.zeros((32, 32), np.uint8)
    mask[4:20, 4:20], mask[8:12, 8:12] = 1, 2
    for z in (1, 4):
        tifffile.imwrite(masks / f"mask_{z:04d}.tif", mask)
    run("convert", "fibsem", "--slices", str(slices), "--masks", str(masks), "-d", "13", "--spacing", "8", "8", "8",
        "--tile", "16", "16", "--out", str(tmp_path / "raw"))
    (dataset,) = (tmp_path / "raw").glob("Dataset013_*")
    assert len(list((dataset / "imagesTr").glob("*.nii.gz"))) == 4  # 32 x 32 in 16 x 16 tiles


def test_fucci_and_back_to_instances(tmp_path):
    image = np.random.default_rng(2).integers(0, 1000, (3, 5, 24, 24), dtype=np.uint16)  # (C, Z, Y, X)
    instances = np.zeros((5, 24, 24), np.uint16)
    instances[1:4, 2:10, 2:10] = 1
    instances[1:4, 10:18, 2:10] = 2  # touching the first nucleus
    tifffile.imwrite(tmp_path / "image.tif", image)
    tifffile.imwrite(tmp_path / "labels.tif", instances)
    run("convert", "fucci", "--case", str(tmp_path / "image.tif"), str(tmp_path / "labels.tif"), "-d", "14",
        "--spacing", "2", "0.5", "0.5", "--channel-axis", "0", "--out", str(tmp_path / "raw"))
    (dataset,) = (tmp_path / "raw").glob("Dataset014_*")
    (label_file,) = (dataset / "labelsTr").glob("*.nii.gz")
    assert set(np.unique(read(label_file))) == {0, 1, 2}

    run("instances", "--pred", str(dataset / "labelsTr"), "--out", str(tmp_path / "instances"))
    (recovered_file,) = (tmp_path / "instances").glob("*.tif")
    recovered = tifffile.imread(recovered_file)
    # The two touching nuclei come back as two instances covering the same voxels.
    assert len(np.unique(recovered[recovered > 0])) == 2
    np.testing.assert_array_equal(recovered > 0, instances > 0)
