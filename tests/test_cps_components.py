"""CutMix, the cross-pseudo-supervision loss and the softmax ensemble on tiny tensors; expected values by hand."""

import math
from types import SimpleNamespace

import pytest
import torch
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from torch import nn

from nnunet_ext.semi_supervised import (
    SoftmaxEnsemble,
    box_mask,
    cross_pseudo_supervision_loss,
    cutmix,
    random_boxes,
    resize_mask,
)

# ------------------------------------------------------------------------------------------------ CutMix geometry


@pytest.mark.parametrize("shape", [(16, 32, 32), (5, 7, 3), (64, 48)])
def test_boxes_lie_inside_the_patch_and_cover_the_requested_fraction(shape):
    generator = torch.Generator().manual_seed(0)
    boxes = random_boxes(200, shape, (0.25, 0.5), generator)
    assert boxes.shape == (200, len(shape), 2) and boxes.dtype == torch.int64
    start, size = boxes[..., 0], boxes[..., 1]
    patch = torch.tensor(shape)
    assert (start >= 0).all() and (size >= 1).all() and (start + size <= patch).all()
    fraction = size.prod(1).double() / math.prod(shape)
    assert (fraction >= 0.25).all() and (fraction <= 0.5).all()
    # Random aspect: many different box shapes, and every axis is sometimes the longest relative to the patch.
    assert len({tuple(s) for s in size.tolist()}) > 20
    assert set((size.double() / patch).argmax(1).tolist()) == set(range(len(shape)))


def test_boxes_of_exact_fractions_by_hand():
    # Fraction exactly 1: the whole patch, starting at 0.
    boxes = random_boxes(3, (4, 6, 2), (1.0, 1.0))
    assert boxes[..., 0].eq(0).all() and boxes[..., 1].eq(torch.tensor([4, 6, 2])).all()
    # A 2 x 2 x 2 patch and fraction exactly 1/2: 4 of 8 voxels, i.e. one side 1 and two sides 2.
    sizes = random_boxes(50, (2, 2, 2), (0.5, 0.5), torch.Generator().manual_seed(1))[..., 1]
    assert sizes.prod(1).eq(4).all()
    assert sorted(sizes.sort(1).values.unique(dim=0).tolist()) == [[1, 2, 2]]


def test_box_fraction_is_uniform_on_average():
    # Sides are rounded, but the mean fraction of U(0.25, 0.5) is 0.375.
    boxes = random_boxes(2000, (32, 64, 64), (0.25, 0.5), torch.Generator().manual_seed(2))
    fraction = boxes[..., 1].prod(1).double() / (32 * 64 * 64)
    assert fraction.mean().item() == pytest.approx(0.375, abs=0.01)


def test_boxes_are_deterministic_per_seed():
    a = random_boxes(4, (16, 32, 32), generator=torch.Generator().manual_seed(7))
    b = random_boxes(4, (16, 32, 32), generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs", [
    dict(batch_size=0, spatial_shape=(4, 4, 4)),
    dict(batch_size=1, spatial_shape=(4,)),
    dict(batch_size=1, spatial_shape=(4, 0, 4)),
    dict(batch_size=1, spatial_shape=(4, 4, 4), fraction=(0.0, 0.5)),
    dict(batch_size=1, spatial_shape=(4, 4, 4), fraction=(0.6, 0.5)),
    dict(batch_size=1, spatial_shape=(4, 4, 4), fraction=(0.5, 1.5)),
])
def test_boxes_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        random_boxes(**kwargs)


def test_boxes_impossible_in_a_one_voxel_patch():
    # A 1 x 1 x 1 patch only has boxes of fraction 1.
    with pytest.raises(ValueError, match="widen the fraction range or use larger patches"):
        random_boxes(1, (1, 1, 1), (0.25, 0.5))


def test_box_mask_by_hand():
    # Patch (3, 2, 4); sample 0: z in [1, 3), y in [0, 1), x in [2, 3); sample 1: the whole patch.
    boxes = torch.tensor([[[1, 2], [0, 1], [2, 1]], [[0, 3], [0, 2], [0, 4]]])
    mask = box_mask(boxes, (3, 2, 4))
    assert mask.shape == (2, 1, 3, 2, 4) and mask.dtype == torch.bool
    expected = torch.zeros(3, 2, 4, dtype=torch.bool)
    expected[1, 0, 2] = expected[2, 0, 2] = True
    assert torch.equal(mask[0, 0], expected)
    assert mask[1].all()
    with pytest.raises(ValueError):
        box_mask(boxes, (3, 2))


# -------------------------------------------------------------------------------------------------- CutMix mixing

def test_cutmix_inputs_and_targets_by_hand():
    # (B, C, Z, Y, X) = (2, 1, 1, 1, 4). Sample 0's box is x in [1, 3), sample 1's box is x in [0, 1).
    mask = box_mask(torch.tensor([[[0, 1], [0, 1], [1, 2]], [[0, 1], [0, 1], [0, 1]]]), (1, 1, 4))
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0], [10.0, 11.0, 12.0, 13.0]]).view(2, 1, 1, 1, 4)
    # Sample 0 takes x = 1, 2 from sample 1; sample 1 takes x = 0 from sample 0 (the previous one, cyclically).
    expected = torch.tensor([[0.0, 11.0, 12.0, 3.0], [0.0, 11.0, 12.0, 13.0]]).view(2, 1, 1, 1, 4)
    assert torch.equal(cutmix(x, mask), expected)
    # x1 (1 - M) + x2 M, the CutMix formula.
    m = mask.float()
    assert torch.equal(cutmix(x, mask), x * (1 - m) + x.roll(1, 0) * m)
    # A target with ignore label 3: the pasted voxels carry the other sample's labels and ignore.
    y = torch.tensor([[3, 1, 3, 0], [2, 3, 0, 3]], dtype=torch.int16).view(2, 1, 1, 1, 4)
    mixed = cutmix(y, mask)
    assert mixed.dtype == torch.int16
    assert mixed.flatten(1).tolist() == [[3, 3, 0, 0], [3, 3, 0, 3]]


def test_cutmix_of_a_single_sample_is_the_identity():
    x = torch.randn(1, 2, 4, 4, 4)
    mask = box_mask(random_boxes(1, (4, 4, 4)), (4, 4, 4))
    assert torch.equal(cutmix(x, mask), x)


def test_cutmix_keeps_the_input_and_its_channels():
    x = torch.randn(3, 2, 4, 6, 6)
    before = x.clone()
    mask = box_mask(random_boxes(3, (4, 6, 6)), (4, 6, 6))
    mixed = cutmix(x, mask)
    assert torch.equal(x, before)
    for c in range(2):  # every channel is mixed with the same box
        assert torch.equal(mixed[:, c:c + 1], cutmix(x[:, c:c + 1], mask))


def test_resize_mask_by_hand():
    # nearest-exact from 4 to 2 voxels picks source voxels floor((j + 0.5) * 2) = 1, 3.
    mask = torch.tensor([False, True, True, False]).view(1, 1, 1, 1, 4)
    assert resize_mask(mask, (1, 1, 2)).flatten().tolist() == [True, False]
    assert resize_mask(mask, (1, 1, 4)) is mask


def test_mixing_deep_supervision_targets_equals_downsampling_the_mixed_target():
    # nnU-Net's own downsampling of the targets; scales of a 3-stage anisotropic plan.
    scales = [[1.0, 1.0, 1.0], [1.0, 0.5, 0.5], [0.5, 0.25, 0.25]]
    downsample = DownsampleSegForDSTransform(ds_scales=scales)
    generator = torch.Generator().manual_seed(3)
    target = torch.randint(0, 4, (2, 1, 16, 32, 32), generator=generator).to(torch.int16)
    mask = box_mask(random_boxes(2, (16, 32, 32), generator=generator), (16, 32, 32))

    def per_level(batch):  # nnU-Net downsamples each sample, then collates
        levels = [downsample(segmentation=sample)["segmentation"] for sample in batch]
        return [torch.stack(level) for level in zip(*levels)]

    mixed_levels = [cutmix(level, mask) for level in per_level(target)]
    for ours, nnunet in zip(mixed_levels, per_level(cutmix(target, mask)), strict=True):
        assert torch.equal(ours, nnunet)


def test_cutmix_bad_arguments():
    x = torch.zeros(2, 1, 4, 4, 4)
    with pytest.raises(TypeError):
        cutmix(x, torch.zeros(2, 1, 4, 4, 4))
    with pytest.raises(ValueError):
        cutmix(x, torch.zeros(3, 1, 4, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError):
        cutmix(x, torch.zeros(2, 1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError):
        cutmix(torch.zeros(2, 4, 4), torch.zeros(2, 1, 4, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------- CPS loss

LN3 = math.log(3)
# (B, C, Z, Y, X) = (1, 2, 1, 1, 3):
#   v0 logits (0, 0)   -> p = (1/2, 1/2), pseudo-label 1, counted
#   v1 logits (0, ln3) -> p = (1/4, 3/4), pseudo-label 0, counted
#   v2 logits (0, 5),     pseudo-label 0, NOT counted (labeled voxel): counting it would change both values
LOGITS = torch.tensor([[0.0, 0.0, 0.0], [0.0, LN3, 5.0]]).view(1, 2, 1, 1, 3)
LABELS = torch.tensor([1, 0, 0]).view(1, 1, 1, 1, 3)
COUNTED = torch.tensor([True, True, False]).view(1, 1, 1, 1, 3)
SMOOTH = 1e-5
# Dice of foreground class 1: intersection 1/2 * 1 + 3/4 * 0 = 1/2; sum p = 1/2 + 3/4 = 5/4; sum q = 1
#   -> 1 - (2 * 1/2 + s) / (5/4 + 1 + s)
DICE = 1 - (1 + SMOOTH) / (2.25 + SMOOTH)
# CE: -log p_1(v0) = ln 2, -log p_0(v1) = -log 1/4 = ln 4; mean over 2 voxels = 3/2 ln 2
CE = 1.5 * math.log(2)


@pytest.mark.parametrize("kind, expected", [("dice", DICE), ("ce", CE)])
def test_cps_loss_by_hand(kind, expected):
    logits = LOGITS.clone().requires_grad_()
    loss = cross_pseudo_supervision_loss(logits, LABELS, COUNTED, kind, SMOOTH)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert logits.grad[..., :2].abs().sum() > 0
    assert logits.grad[..., 2].abs().sum() == 0  # the uncounted voxel gets no gradient


@pytest.mark.parametrize("kind", ["dice", "ce"])
def test_cps_loss_2d_and_half_precision(kind):
    expected = cross_pseudo_supervision_loss(LOGITS, LABELS, COUNTED, kind, SMOOTH)
    flat = (LOGITS.view(1, 2, 1, 3), LABELS.view(1, 1, 1, 3), COUNTED.view(1, 1, 1, 3))
    assert cross_pseudo_supervision_loss(*flat, kind, SMOOTH).item() == pytest.approx(expected.item(), rel=1e-6)
    half = cross_pseudo_supervision_loss(LOGITS.half(), LABELS.to(torch.uint8), COUNTED, kind, SMOOTH)
    assert half.dtype == torch.float32 and half.item() == pytest.approx(expected.item(), rel=1e-3)


@pytest.mark.parametrize("kind", ["dice", "ce"])
def test_cps_loss_nothing_counts(kind):
    # Dice: (0 + s) / (0 + s) = 1 for every class -> loss 0; CE: empty mean -> 0.
    logits = LOGITS.clone().requires_grad_()
    loss = cross_pseudo_supervision_loss(logits, LABELS, torch.zeros_like(COUNTED), kind)
    assert loss.item() == 0.0 and loss.requires_grad


def test_cps_loss_agreeing_confident_prediction_is_near_zero():
    # Logits of +-20 follow the pseudo-labels: p = 1 - e^-40 on the label; Dice -> 1, CE -> e^-40.
    labels = torch.tensor([1, 0, 1, 2]).view(1, 1, 1, 1, 4)
    logits = torch.nn.functional.one_hot(labels[:, 0], 3).movedim(-1, 1).float() * 40 - 20
    mask = torch.ones_like(labels, dtype=torch.bool)
    assert cross_pseudo_supervision_loss(logits, labels, mask, "dice").item() == pytest.approx(0, abs=1e-6)
    assert cross_pseudo_supervision_loss(logits, labels, mask, "ce").item() == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("args, error", [
    ((LOGITS, LABELS, COUNTED.float()), TypeError),
    ((LOGITS, LABELS.float(), COUNTED), TypeError),
    ((LOGITS, LABELS[..., :2], COUNTED), ValueError),
    ((LOGITS[:, :1], LABELS, COUNTED), ValueError),
    ((LOGITS, LABELS, COUNTED, "mse"), ValueError),
    ((LOGITS, LABELS, COUNTED, "dice", 0.0), ValueError),
])
def test_cps_loss_bad_arguments(args, error):
    with pytest.raises(error):
        cross_pseudo_supervision_loss(*args)


# ---------------------------------------------------------------------------------------------- softmax ensemble

class FixedLogits(nn.Module):
    """Returns fixed logits of shape (B, 2, 1, 1, 1) per resolution, with nnU-Net's decoder.deep_supervision flag."""

    def __init__(self, logits: tuple[float, float]):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits).view(1, 2, 1, 1, 1))
        self.decoder = SimpleNamespace(deep_supervision=True)

    def forward(self, x):
        out = self.logits.expand(x.shape[0], -1, -1, -1, -1)
        return [out, out * 2] if self.decoder.deep_supervision else out


def test_ensemble_averages_softmax_by_hand():
    # member 0: (0, 0) -> (1/2, 1/2); member 1: (ln 3, 0) -> (3/4, 1/4); average (5/8, 3/8).
    ensemble = SoftmaxEnsemble(FixedLogits((0.0, 0.0)), FixedLogits((LN3, 0.0)))
    ensemble.decoder.deep_supervision = False
    assert not any(m.decoder.deep_supervision for m in ensemble.members) and not ensemble.decoder.deep_supervision
    out = ensemble(torch.zeros(3, 1, 1, 1, 1))
    assert out.shape == (3, 2, 1, 1, 1) and out.dtype == torch.float32
    assert torch.softmax(out, 1)[0].flatten().tolist() == pytest.approx([5 / 8, 3 / 8])
    assert out[0].flatten().tolist() == pytest.approx([math.log(5 / 8), math.log(3 / 8)])


def test_ensemble_deep_supervision_and_state_dict():
    # Second resolution doubles the logits: (0, 0) -> (1/2, 1/2); (2 ln 3, 0) -> (9/10, 1/10); average (7/10, 3/10).
    ensemble = SoftmaxEnsemble(FixedLogits((0.0, 0.0)), FixedLogits((LN3, 0.0)))
    ensemble.decoder.deep_supervision = True
    assert ensemble.decoder.deep_supervision
    full, low = ensemble(torch.zeros(1, 1, 1, 1, 1))
    assert torch.softmax(full, 1).flatten().tolist() == pytest.approx([5 / 8, 3 / 8])
    assert torch.softmax(low, 1).flatten().tolist() == pytest.approx([7 / 10, 3 / 10])
    assert list(ensemble.state_dict()) == ["members.0.logits", "members.1.logits"]


def test_ensemble_of_an_underflowing_probability_stays_finite():
    ensemble = SoftmaxEnsemble(FixedLogits((200.0, -200.0)))
    ensemble.decoder.deep_supervision = False
    assert torch.isfinite(ensemble(torch.zeros(1, 1, 1, 1, 1))).all()
    with pytest.raises(ValueError):
        SoftmaxEnsemble()
