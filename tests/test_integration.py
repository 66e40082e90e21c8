"""The main job through nnU-Net's real command-line tools, on CPU, with tiny plans."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import TINY_SHAPE, cli

pytestmark = pytest.mark.integration


def test_tiny_plans_keep_the_preprocessed_data(tiny_dataset):
    preprocessed = next((tiny_dataset.root / "nnUNet_preprocessed").glob("Dataset007_*"))
    stock = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    tiny = json.loads((preprocessed / "nnUNetPlans_tiny.json").read_text())
    assert tiny["plans_name"] == "nnUNetPlans_tiny"
    assert (tiny["configurations"]["3d_fullres"]["data_identifier"]
            == stock["configurations"]["3d_fullres"]["data_identifier"])
    assert max(tiny["configurations"]["3d_fullres"]["patch_size"]) <= 32


def test_train_and_predict_with_an_external_trainer(tiny_dataset, trained_stock):
    env, ds = tiny_dataset.env, str(tiny_dataset.dataset_id)
    assert f"Using trainer '{trained_stock.trainer}'" in trained_stock.stdout
    assert (trained_stock.fold / "checkpoint_final.pth").is_file()

    out = tiny_dataset.root / "predictions"
    cli("nnUNetv2_predict", "-i", str(tiny_dataset.raw / "imagesTs"), "-o", str(out), "-d", ds,
        "-c", "3d_fullres", "-f", "0", "-tr", trained_stock.trainer, "-p", "nnUNetPlans_tiny",
        "-device", "cpu", "-npp", "1", "-nps", "1", env=env)
    test_labels = sorted((tiny_dataset.raw / "labelsTs").glob("*.nii.gz"))
    assert len(test_labels) == 1
    predicted = sitk.ReadImage(str(out / test_labels[0].name))
    reference = sitk.ReadImage(str(test_labels[0]))
    array = sitk.GetArrayFromImage(predicted)
    assert array.shape == TINY_SHAPE
    assert predicted.GetSpacing() == pytest.approx(reference.GetSpacing())
    # Predictions hold real classes only: never the ignore label (3).
    assert set(np.unique(array)) <= {0, 1, 2}
