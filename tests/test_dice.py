import math

import numpy as np
import pytest

from nnunet_ext.metrics import dice, dice_per_class


def test_dice_of_known_overlap():
    pred = np.array([1, 1, 1, 0, 0], bool)
    gt = np.array([0, 1, 1, 1, 0], bool)
    assert dice(pred, gt) == pytest.approx(2 * 2 / (3 + 3))


def test_dice_edge_cases():
    empty = np.zeros((2, 2), bool)
    assert math.isnan(dice(empty, empty))
    assert dice(~empty, empty) == 0.0
    with pytest.raises(ValueError, match="shape mismatch"):
        dice(empty, np.zeros((2, 3), bool))


def test_dice_per_class():
    pred = np.array([[0, 1, 1], [2, 2, 0]])
    gt = np.array([[0, 1, 2], [2, 2, 2]])
    # class 1: |P|=2, |G|=1, overlap 1 -> 2/3; class 2: |P|=2, |G|=4, overlap 2 -> 4/6
    assert dice_per_class(pred, gt, [1, 2]) == pytest.approx({1: 2 / 3, 2: 4 / 6})
