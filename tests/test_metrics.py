import math

import numpy as np
import pytest

from nnunet_ext.metrics import (
    betti_errors,
    betti_numbers,
    cldice,
    dice_by_distance,
    masked_dice,
    mean_slice_dice,
    per_slice_dice,
    precision_recall,
    slice_distance_to_annotation,
)

NAN = float("nan")


def _same(actual, expected):
    """Element-wise equality where NaN matches NaN."""
    return np.allclose(np.asarray(actual, float), np.asarray(expected, float), equal_nan=True)


def _slice_pair():
    """(4, 2, 2) masks: slice 0 partial overlap, slice 1 empty in both, slice 2 exact, slice 3 pred only."""
    pred = np.zeros((4, 2, 2), bool)
    gt = np.zeros((4, 2, 2), bool)
    pred[0, 0, :] = True  # pred (0,0,0), (0,0,1)
    gt[0, 0, 0] = True
    pred[2, 1, 1] = gt[2, 1, 1] = True
    pred[3, 0, 1] = True
    return pred, gt


def _volume(shape, *index):
    mask = np.zeros(shape, bool)
    for i in index:
        mask[i] = True
    return mask


# slice 0: 2*1/(2+1); slice 1: empty in both; slice 2: 2*1/(1+1); slice 3: 2*0/(1+0)
# along x: x=0 pred {(0,0,0)} gt {(0,0,0)} -> 1; x=1 pred 3 voxels, gt {(2,1,1)} -> 2*1/(3+1)
@pytest.mark.parametrize(
    "axis, expected", [(0, [2 / 3, NAN, 1.0, 0.0]), (2, [1.0, 0.5]), (-1, [1.0, 0.5])]
)
def test_per_slice_dice(axis, expected):
    pred, gt = _slice_pair()
    assert _same(per_slice_dice(pred, gt, axis=axis), expected)


def test_mean_slice_dice_excludes_slices_empty_in_both():
    pred, gt = _slice_pair()
    # (2/3 + 1 + 0) / 3; the empty slice 1 is not counted as 0 or 1
    assert mean_slice_dice(pred, gt) == pytest.approx(5 / 9)
    empty = np.zeros((2, 2, 2), bool)
    assert math.isnan(mean_slice_dice(empty, empty))


# region z >= 2: pred {(2,1,1), (3,0,1)}, gt {(2,1,1)} -> 2*1/(2+1); region z == 1 is empty in both
@pytest.mark.parametrize(
    "slices, expected", [(slice(2, 4), 2 / 3), (slice(1, 2), NAN), (slice(0, 4), 2 * 2 / (4 + 2))]
)
def test_masked_dice(slices, expected):
    pred, gt = _slice_pair()
    region = np.zeros_like(pred)
    region[slices] = True
    assert _same(masked_dice(pred, gt, region), expected)


def test_slice_distance_to_annotation():
    sparse = np.full((7, 2, 2), 255, np.uint8)
    sparse[0] = 0  # an annotated background slice counts as annotated
    sparse[4, 1, 0] = 1  # one annotated voxel is enough
    # annotated {0, 4}: slice 3 is 1 from slice 4, slice 6 is 2 from slice 4
    assert slice_distance_to_annotation(sparse, 255).tolist() == [0, 1, 2, 1, 0, 1, 2]
    sparse[4], sparse[5, 0, 0] = 255, 1
    # annotated {0, 5}
    assert slice_distance_to_annotation(sparse, 255).tolist() == [0, 1, 2, 2, 1, 0, 1]
    along_y = np.full((2, 3, 2), -1)
    along_y[:, 2, :] = 0
    assert slice_distance_to_annotation(along_y, -1, axis=1).tolist() == [2, 1, 0]
    with pytest.raises(ValueError, match="no slice"):
        slice_distance_to_annotation(np.full((3, 2, 2), 255), 255)


def test_dice_by_distance():
    pred = np.array([[[1, 1]], [[1, 0]], [[0, 0]], [[0, 0]]], bool)
    gt = np.array([[[1, 1]], [[1, 1]], [[0, 0]], [[0, 1]]], bool)
    distances = np.array([0, 1, 2, 1])
    # d=0: slice 0, 2*2/(2+2); d=1: slices 1 and 3 pooled, pred 1, gt 3, overlap 1 -> 2/4; d=2: empty
    result = dice_by_distance(pred, gt, distances)
    assert list(result) == [0, 1, 2]
    assert _same(list(result.values()), [1.0, 0.5, NAN])
    with pytest.raises(ValueError, match="distances"):
        dice_by_distance(pred, gt, np.array([0, 1, 2]))


@pytest.mark.parametrize(
    "pred, gt, expected",
    [
        ([1, 1, 0, 0, 0], [0, 1, 1, 1, 0], (1 / 2, 1 / 3)),  # TP 1, |P| 2, |G| 3
        ([0, 0, 0], [1, 0, 0], (NAN, 0.0)),
        ([1, 0, 0], [0, 0, 0], (0.0, NAN)),
        ([0, 0, 0], [0, 0, 0], (NAN, NAN)),
    ],
)
def test_precision_recall(pred, gt, expected):
    assert _same(precision_recall(np.array(pred, bool), np.array(gt, bool)), expected)


def _ring(shape=(3, 7, 7), broken=False):
    """5x5 square outline in plane z=1 (16 voxels); ``broken`` removes the middle of one side."""
    mask = np.zeros(shape, bool)
    mask[1, 1:6, 1:6] = True
    mask[1, 2:5, 2:5] = False
    if broken:
        mask[1, 1, 3] = False
    return mask


def _shell():
    mask = np.zeros((5, 5, 5), bool)
    mask[1:4, 1:4, 1:4] = True
    mask[2, 2, 2] = False
    return mask


@pytest.mark.parametrize(
    "mask, expected",
    [
        (np.zeros((3, 3, 3), bool), (0, 0, 0)),
        (_volume((3, 3, 3), (1, 1, 1)), (1, 0, 0)),
        # two voxels touching at a corner are one 26-connected component
        (_volume((3, 3, 3), (0, 0, 0), (1, 1, 1)), (1, 0, 0)),
        (_ring(), (1, 1, 0)),  # the hole is open through z, so no cavity
        (_ring(broken=True), (1, 0, 0)),
        (_volume((3, 3, 7), (slice(0, 2),) * 3, (slice(1, 3), slice(1, 3), slice(4, 6))), (2, 0, 0)),
        (_shell(), (1, 0, 1)),  # χ = 2: one component, one enclosed cavity, no tunnel
        (_volume((5, 5, 5), (slice(1, 4),) * 3), (1, 0, 0)),
        (_volume((3, 3, 3), (slice(None),) * 3), (1, 0, 0)),  # touching the border: padding keeps β2 = 0
    ],
)
def test_betti_numbers(mask, expected):
    assert betti_numbers(mask) == expected


def test_betti_errors_ring_vs_broken_ring():
    # ring (1, 1) vs broken ring (1, 0)
    assert betti_errors(_ring(broken=True), _ring()) == {"betti0_error": 0, "betti1_error": 1}
    two_voxels = _volume((3, 7, 7), (1, 0, 0), (1, 0, 6))
    # two voxels (2, 0) vs broken ring (1, 0)
    assert betti_errors(two_voxels, _ring(broken=True)) == {"betti0_error": 1, "betti1_error": 0}


def _line(start, stop, y=2, shape=(5, 5, 12)):
    """One-voxel-thick tube along x; its 3D skeleton is itself."""
    return _volume(shape, (2, y, slice(start, stop)))


def _thick_tube():
    """3x3-voxel tube along x; its skeleton lies inside it, so identical tubes give 1."""
    return _volume((7, 7, 14), (slice(2, 5), slice(2, 5), slice(2, 12)))


@pytest.mark.parametrize(
    "pred, gt, expected",
    [
        (_line(2, 10), _line(2, 10), 1.0),
        (_thick_tube(), _thick_tube(), 1.0),
        (_line(2, 10, y=0), _line(2, 10, y=4), 0.0),  # disjoint
        # pred x=2..5 (4 voxels) inside gt x=2..9 (8 voxels): Tprec = 4/4, Tsens = 4/8 -> 2*1*0.5/1.5
        (_line(2, 6), _line(2, 10), 2 / 3),
        (_line(2, 10), _line(2, 6), 2 / 3),
        (np.zeros((5, 5, 12), bool), _line(2, 10), 0.0),
        # Thinning deletes a 3-voxel L in the z-x plane entirely; it is its own skeleton: Tprec = 1/1 (the pred
        # voxel lies in gt), Tsens = 1/3 (1 of the L's 3 voxels predicted) -> 2 * 1/3 / (4/3) = 1/2.
        (_volume((4, 4, 4), (1, 1, 1)), _volume((4, 4, 4), (1, 1, slice(1, 3)), (2, 1, 1)), 0.5),
        (np.zeros((5, 5, 12), bool), np.zeros((5, 5, 12), bool), NAN),
    ],
)
def test_cldice(pred, gt, expected):
    assert _same(cldice(pred, gt), expected)


@pytest.mark.parametrize(
    "metric",
    [per_slice_dice, mean_slice_dice, precision_recall, betti_errors, cldice],
)
def test_shape_mismatch_raises(metric):
    with pytest.raises(ValueError, match="shape mismatch"):
        metric(np.zeros((2, 3, 3), bool), np.zeros((3, 3, 3), bool))


def test_bad_arguments_raise():
    a = np.zeros((2, 3, 3), bool)
    with pytest.raises(ValueError, match="shape mismatch"):
        masked_dice(a, a, np.zeros((3, 3, 3), bool))
    with pytest.raises(ValueError, match="shape mismatch"):
        dice_by_distance(a, np.zeros((3, 3, 3), bool), np.zeros(2, int))
    with pytest.raises(ValueError, match="axis"):
        per_slice_dice(a, a, axis=3)
    with pytest.raises(ValueError, match="3D"):
        betti_numbers(np.zeros((3, 3), bool))
