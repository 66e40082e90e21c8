"""Volume-level Dice."""

from collections.abc import Iterable

import numpy as np


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two boolean masks of equal shape; NaN when both are empty (no evidence either way).

    Args:
        pred, gt: bool arrays of any equal shape.
    """
    if pred.shape != gt.shape:
        raise ValueError(f"shape mismatch: prediction {pred.shape} vs ground truth {gt.shape}")
    denominator = np.count_nonzero(pred) + np.count_nonzero(gt)
    if denominator == 0:
        return float("nan")
    return 2.0 * np.count_nonzero(pred & gt) / denominator


def dice_per_class(pred: np.ndarray, gt: np.ndarray, labels: Iterable[int]) -> dict[int, float]:
    """Dice of each label value in ``labels`` between integer label arrays ``pred`` and ``gt`` (same shape)."""
    return {int(label): dice(pred == label, gt == label) for label in labels}
