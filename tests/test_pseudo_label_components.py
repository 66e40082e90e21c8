"""Pseudo-label components on tiny inputs: the voxel-weighted loss, the target channels, storage and geometry.

Expected values are computed by hand in the comments, or are nnU-Net's own results for the same input.
"""

import json
import math

import blosc2
import numpy as np
import pytest
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import softmax_helper_dim1
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_ext.errors import UserError
from nnunet_ext.pseudo_label_generation import (
    StackedChannels,
    fold_split,
    missing_cases,
    parse_fold,
    pseudo_label_array,
    save_pseudo_labels,
    to_preprocessed_geometry,
)
from nnunet_ext.semi_supervised import VoxelWeightedDiceCE, split_pseudo_label_target
from nnunet_ext.trainers import PseudoLabelConfidenceTrainer, PseudoLabelWeightedTrainer
from nnunet_ext.trainers.semi_supervised_base import mean_of_defined


def dice(batch_dice=False, smooth=0.0):
    return MemoryEfficientSoftDiceLoss(apply_nonlin=softmax_helper_dim1, batch_dice=batch_dice, do_bg=False,
                                       smooth=smooth, ddp=False)


# ------------------------------------------------------------------------------------------- VoxelWeightedDiceCE

def three_voxels():
    # (B, C, D, H, W) = (1, 2, 1, 1, 3); voxels a, b, c.
    #   a: logits (0, 0)    -> p = (1/2, 1/2); target 1; weight 1/2
    #   b: logits (ln 3, 0) -> p = (3/4, 1/4); target 0; weight 1
    #   c: logits (5, -5), target 7 (not a class), weight 0: left out
    logits = torch.tensor([[0.0, math.log(3.0), 5.0], [0.0, 0.0, -5.0]]).reshape(1, 2, 1, 1, 3)
    target = torch.tensor([1, 0, 7]).reshape(1, 1, 1, 1, 3)
    weight = torch.tensor([0.5, 1.0, 0.0]).reshape(1, 1, 1, 1, 3)
    return logits, target, weight


def test_weighted_ce_by_hand():
    # n = 2 selected voxels; CE_a = ln 2, CE_b = -ln(3/4) = ln(4/3); CE term = (1/2 ln 2 + ln(4/3)) / 2
    loss = VoxelWeightedDiceCE(dice(), weight_ce=1.0, weight_dice=0.0)(*three_voxels())
    assert loss.item() == pytest.approx((0.5 * math.log(2) + math.log(4 / 3)) / 2, rel=1e-6)


def test_weighted_dice_by_hand():
    # mean weight m = (1/2 + 1) / 2 = 3/4; Dice mask = w / m = (2/3, 4/3) on a, b.
    # Foreground class 1 (do_bg=False): p1 = (1/2, 1/4), y1 = (1, 0).
    #   intersect = 1/2 * 1 * 2/3 = 1/3; sum_pred = 1/2 * 2/3 + 1/4 * 4/3 = 2/3; sum_gt = 2/3
    #   dc = 2 * 1/3 / (2/3 + 2/3) = 1/2 -> nnU-Net's Dice loss = -1/2; Dice term = m * (-1/2) = -3/8
    loss = VoxelWeightedDiceCE(dice(), weight_ce=0.0, weight_dice=1.0)(*three_voxels())
    assert loss.item() == pytest.approx(-0.375, rel=1e-6)
    both = VoxelWeightedDiceCE(dice())(*three_voxels())
    assert both.item() == pytest.approx((0.5 * math.log(2) + math.log(4 / 3)) / 2 - 0.375, rel=1e-6)


@pytest.mark.parametrize("batch_dice", [False, True])
def test_constant_weight_is_alpha_times_nnunets_loss_on_the_selected_voxels(batch_dice):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 6, 6)
    target = torch.randint(0, 3, (2, 1, 4, 6, 6))
    selected = torch.rand(2, 1, 4, 6, 6) < 0.4
    ignore = 3
    nnunet = DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                            weight_ce=1, weight_dice=1, ignore_label=ignore, dice_class=MemoryEfficientSoftDiceLoss)
    expected = 0.5 * nnunet(logits, torch.where(selected, target, ignore))
    ours = VoxelWeightedDiceCE(nnunet.dc, nnunet.weight_ce, nnunet.weight_dice)(logits, target, 0.5 * selected)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)

    # The same through nnU-Net's deep-supervision wrapper, per-scale arguments zipped.
    small = (slice(None), slice(None), slice(None), slice(None, None, 2), slice(None, None, 2))
    scales = [1.0, 0.5]
    expected_ds = DeepSupervisionWrapper(nnunet, scales)(
        [logits, logits[small]], [torch.where(selected, target, ignore), torch.where(selected, target, ignore)[small]])
    ours_ds = DeepSupervisionWrapper(VoxelWeightedDiceCE(nnunet.dc), scales)(
        [logits, logits[small]], [target, target[small]], [0.5 * selected, 0.5 * selected[small]])
    assert ours_ds.item() == pytest.approx(0.5 * expected_ds.item(), rel=1e-5)


def test_no_selected_voxel_gives_zero_with_a_gradient():
    logits, target, _ = three_voxels()
    logits.requires_grad_(True)
    loss = VoxelWeightedDiceCE(dice(smooth=1e-5))(logits, target, torch.zeros_like(target, dtype=torch.float32))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0


def test_weighted_loss_rejects_bad_shapes():
    logits, target, weight = three_voxels()
    loss = VoxelWeightedDiceCE(dice())
    with pytest.raises(ValueError, match="target must have shape"):
        loss(logits, target[:, :, :, :, :2], weight)
    with pytest.raises(ValueError, match="weight must have shape"):
        loss(logits, target, weight.expand(1, 2, 1, 1, 3))
    with pytest.raises(ValueError, match="logits must have shape"):
        loss(logits[0, 0], target, weight)


# --------------------------------------------------------------------------------------------- target channels

def test_split_pseudo_label_target():
    # two voxels: labels (0, ignore 3), pseudo-labels (2, 1), confidence (255, 51) -> (1.0, 51/255 = 0.2)
    target = torch.tensor([[0, 3], [2, 1], [255, 51]], dtype=torch.int16).reshape(1, 3, 1, 1, 2)
    labels, pseudo, confidence = split_pseudo_label_target(target)
    assert labels.flatten().tolist() == [0, 3] and pseudo.flatten().tolist() == [2, 1]
    assert torch.allclose(confidence.flatten(), torch.tensor([1.0, 0.2]))
    with pytest.raises(ValueError, match="3 channels"):
        split_pseudo_label_target(target[:, :2])


def test_pseudo_label_array():
    # voxel 0: p = (0.1, 0.6, 0.3) -> class 1, 0.6 * 255 = 153; voxel 1: p = (1, 0, 0) -> class 0, 255
    probabilities = np.array([[0.1, 1.0], [0.6, 0.0], [0.3, 0.0]], dtype=np.float32)
    array = pseudo_label_array(probabilities)
    assert array.dtype == np.uint8 and array.tolist() == [[1, 0], [153, 255]]


def test_voxel_weights_of_the_two_trainers():
    unlabeled = torch.tensor([True, False, True]).reshape(1, 1, 1, 1, 3)
    confidence = torch.tensor([0.2, 0.9, 1.0]).reshape(1, 1, 1, 1, 3)
    weighted = PseudoLabelWeightedTrainer.voxel_weights(PseudoLabelWeightedTrainer, unlabeled, confidence)
    assert weighted.flatten().tolist() == [0.5, 0.0, 0.5]  # alpha = 0.5 on unlabeled voxels
    by_confidence = PseudoLabelConfidenceTrainer.voxel_weights(PseudoLabelConfidenceTrainer, unlabeled, confidence)
    assert torch.allclose(by_confidence.flatten(), torch.tensor([0.2, 0.0, 1.0]))  # 1.0 x confidence


# ------------------------------------------------------------------------------------------ storage and loading

def test_stacked_channels_read_patches_like_a_segmentation(tmp_path):
    seg = (np.arange(6, dtype=np.int8) - 1).reshape(1, 1, 2, 3)  # one slice [[-1, 0, 1], [2, 3, 4]]
    pseudo = np.stack([np.full((1, 2, 3), 2, np.uint8), np.full((1, 2, 3), 200, np.uint8)])
    save_pseudo_labels(pseudo, tmp_path, "case", patch_size=(1, 2, 2))
    stored = blosc2.open(urlpath=str(tmp_path / "case.b2nd"), mode="r")
    stacked = StackedChannels((seg, stored))
    assert stacked.shape == (3, 1, 2, 3) and stacked.dtype == np.int16
    patch = stacked[:, :, 1:2, 0:2]
    assert patch.dtype == np.int16 and patch.tolist() == [[[[2, 3]]], [[[2, 2]]], [[[200, 200]]]]
    assert stacked[2, 0, 0, 0] == 200 and stacked[..., 2].tolist() == [[[1, 4]], [[2, 2]], [[200, 200]]]
    # nnU-Net's loader crop: rows -1..1 (one padded row of -1), columns 1..3
    cropped = crop_and_pad_nd(stacked, [[0, 1], [-1, 1], [1, 3]], -1, cast_cropped_to=np.int16)
    assert cropped.tolist() == [[[[-1, -1], [0, 1]]], [[[-1, -1], [2, 2]]], [[[-1, -1], [200, 200]]]]
    with pytest.raises(ValueError, match="spatial shape"):
        StackedChannels((seg, pseudo[:, :, :1]))


def test_missing_cases(tmp_path):
    (tmp_path / "a.b2nd").write_bytes(b"")
    assert missing_cases(tmp_path, ["a", "b"]) == ["b"]


def test_fold_split_follows_nnunets_split_file(tmp_path):
    splits = [{"train": ["b", "c"], "val": ["a"]}, {"train": ["a", "c"], "val": ["b"]}]
    (tmp_path / "splits_final.json").write_text(json.dumps(splits))
    assert fold_split(tmp_path, ["a", "b", "c"], 1) == (["a", "c"], ["b"])
    assert fold_split(tmp_path, ["c", "a", "b"], "all") == (["a", "b", "c"], [])
    with pytest.raises(UserError, match="fold 2 is not in"):
        fold_split(tmp_path, ["a", "b", "c"], 2)
    with pytest.raises(UserError, match="train the source model"):
        fold_split(tmp_path / "nowhere", ["a"], 0)
    assert parse_fold("3") == 3 and parse_fold("all") == "all"
    with pytest.raises(UserError, match="invalid fold"):
        parse_fold("x")


# -------------------------------------------------------------------------------- augmentation: nearest for seg

def test_pseudo_label_trainers_sample_segmentation_nearest_neighbour():
    args = ((16, 32, 32), ((-0.5, 0.5),) * 3, [[1, 1, 1], [1, 0.5, 0.5]], (0, 1, 2), False)

    def modes(transforms):
        return [t.mode_seg for t in transforms.transforms if isinstance(t, SpatialTransform)]

    assert modes(nnUNetTrainer.get_training_transforms(*args)) == ["bilinear"]  # stock
    assert modes(PseudoLabelWeightedTrainer.get_training_transforms(*args)) == ["nearest"]
    assert modes(PseudoLabelConfidenceTrainer.get_training_transforms(*args)) == ["nearest"]


# ------------------------------------------------------------------- geometry: the way nnU-Net preprocesses data

def hand_made_plans(transpose_forward, spacing) -> PlansManager:
    """Plans with one 3d configuration: what DefaultPreprocessor and our geometry read from them."""
    backward = [int(i) for i in np.argsort(transpose_forward)]
    resampling = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}
    return PlansManager({
        "dataset_name": "Dataset999_Test", "plans_name": "TestPlans", "transpose_forward": list(transpose_forward),
        "transpose_backward": backward, "image_reader_writer": "SimpleITKIO",
        "foreground_intensity_properties_per_channel": {"0": {}}, "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "configurations": {"3d": {
            "data_identifier": "TestPlans_3d", "preprocessor_name": "DefaultPreprocessor", "spacing": list(spacing),
            "patch_size": [8, 8, 8], "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": resampling,
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_seg_kwargs": {**resampling, "is_seg": True},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": resampling, "architecture": {}, "batch_dice": False}},
    })


def blob_case(shape=(10, 14, 12)):
    """An image with a zero border (so nnU-Net crops it) and three labels: background, a ball, a box."""
    rng = np.random.default_rng(0)
    image = np.zeros((1, *shape), np.float32)
    image[0, 1:-2, 2:-1, 1:-3] = rng.uniform(1, 2, size=(shape[0] - 3, shape[1] - 3, shape[2] - 4))
    z, y, x = np.indices(shape)
    seg = np.zeros((1, *shape), np.int8)
    seg[0][(z - 5) ** 2 + (y - 6) ** 2 + (x - 5) ** 2 <= 9] = 1
    seg[0, 2:5, 9:12, 6:9] = 2
    return image, seg


@pytest.mark.parametrize("transpose_forward", [(0, 1, 2), (2, 0, 1)])
def test_geometry_matches_nnunets_preprocessing_of_the_labels(transpose_forward):
    image, seg = blob_case()
    spacing = (2.0, 1.0, 1.5)  # original (reader order)
    transposed_spacing = [spacing[i] for i in transpose_forward]
    plans = hand_made_plans(transpose_forward, transposed_spacing)  # no resampling: exact
    configuration = plans.get_configuration("3d")
    dataset_json = {"labels": {"background": 0, "ball": 1, "box": 2}, "channel_names": {"0": "x"},
                    "file_ending": ".nii.gz"}
    _, preprocessed_seg, properties = DefaultPreprocessor(verbose=False).run_case_npy(
        image, seg, {"spacing": spacing}, plans, configuration, dataset_json)
    assert preprocessed_seg.shape[1:] != image.shape[1:]  # it did crop (and transpose)

    one_hot = np.stack([(seg[0] == c) for c in range(3)]).astype(np.float32)
    ours = to_preprocessed_geometry(one_hot, properties, plans, configuration).argmax(0)
    # nnU-Net marks background outside the nonzero mask -1; there our map says background 0.
    assert np.array_equal(ours, np.where(preprocessed_seg[0] == -1, 0, preprocessed_seg[0]))


def test_geometry_resamples_to_the_configurations_spacing():
    image, seg = blob_case()
    plans = hand_made_plans((2, 0, 1), (1.0, 1.0, 1.0))  # from (1.5, 2, 1) after transpose: larger grid
    configuration = plans.get_configuration("3d")
    dataset_json = {"labels": {"background": 0, "ball": 1, "box": 2}, "channel_names": {"0": "x"},
                    "file_ending": ".nii.gz"}
    _, preprocessed_seg, properties = DefaultPreprocessor(verbose=False).run_case_npy(
        image, seg, {"spacing": (2.0, 1.0, 1.5)}, plans, configuration, dataset_json)
    one_hot = np.stack([(seg[0] == c) for c in range(3)]).astype(np.float32)
    ours = to_preprocessed_geometry(one_hot, properties, plans, configuration).argmax(0)
    assert ours.shape == preprocessed_seg.shape[1:]
    reference = np.where(preprocessed_seg[0] == -1, 0, preprocessed_seg[0])
    # Linear interpolation of probabilities + argmax vs nnU-Net's per-label seg resampling: boundary voxels only.
    assert (ours == reference).mean() > 0.97
    assert set(np.unique(ours)) == {0, 1, 2}


def test_geometry_rejects_a_case_of_another_shape():
    image, seg = blob_case()
    plans = hand_made_plans((0, 1, 2), (2.0, 1.0, 1.5))
    configuration = plans.get_configuration("3d")
    _, _, properties = DefaultPreprocessor(verbose=False).run_case_npy(
        image, seg, {"spacing": (2.0, 1.0, 1.5)}, plans, configuration,
        {"labels": {"background": 0, "ball": 1, "box": 2}, "channel_names": {"0": "x"}, "file_ending": ".nii.gz"})
    with pytest.raises(ValueError, match="do not match the preprocessed case"):
        to_preprocessed_geometry(np.zeros((3, 10, 14, 11), np.float32), properties, plans, configuration)


@pytest.mark.parametrize(("values", "expected"), [
    ([0.5, float("nan"), 0.25], 0.375),  # (0.5 + 0.25) / 2: the undefined step is left out
    ([0.0, 0.5], 0.25),  # a defined 0 still counts
    ([float("nan"), float("nan")], float("nan")),  # nothing defined in the whole epoch
])
def test_epoch_mean_of_a_logged_quantity_leaves_out_undefined_steps(values, expected):
    assert mean_of_defined(values) == pytest.approx(expected, nan_ok=True)
