"""The main job through nnU-Net's real command-line tools, on CPU, with tiny plans."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import TINY_SHAPE, cli, train_env

pytestmark = pytest.mark.integration


def test_tiny_plans_keep_the_preprocessed_data(tiny_dataset):
    preprocessed = next((tiny_dataset.root / "nnUNet_preprocessed").glob("Dataset007_*"))
    stock = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    tiny = json.loads((preprocessed / "nnUNetPlans_tiny.json").read_text())
    assert tiny["plans_name"] == "nnUNetPlans_tiny"
    assert (tiny["configurations"]["3d_fullres"]["data_identifier"]
            == stock["configurations"]["3d_fullres"]["data_identifier"])
    assert max(tiny["configurations"]["3d_fullres"]["patch_size"]) <= 32


def test_train_and_predict_with_an_external_trainer(tiny_dataset):
    env, ds = tiny_dataset.env, str(tiny_dataset.dataset_id)
    train = cli("nnUNetv2_train", ds, "3d_fullres", "0", "-tr", "nnUNetTrainer_exttest",
                "-p", "nnUNetPlans_tiny", "-device", "cpu", env=train_env(env))
    assert "Using trainer 'nnUNetTrainer_exttest'" in train.stdout
    fold_dir = next((tiny_dataset.root / "nnUNet_results").glob(
        "Dataset007_*/nnUNetTrainer_exttest__nnUNetPlans_tiny__3d_fullres/fold_0"))
    assert (fold_dir / "checkpoint_final.pth").is_file()

    out = tiny_dataset.root / "predictions"
    cli("nnUNetv2_predict", "-i", str(tiny_dataset.raw / "imagesTs"), "-o", str(out), "-d", ds,
        "-c", "3d_fullres", "-f", "0", "-tr", "nnUNetTrainer_exttest", "-p", "nnUNetPlans_tiny",
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
