"""Segmentation metrics on label arrays (numpy, no nnU-Net imports)."""

from nnunet_ext.metrics.dice import dice, dice_per_class
from nnunet_ext.metrics.slices import (
    dice_by_distance,
    masked_dice,
    mean_slice_dice,
    per_slice_dice,
    precision_recall,
    slice_distance_to_annotation,
)
from nnunet_ext.metrics.topology import betti_errors, betti_numbers, cldice

__all__ = [
    "betti_errors",
    "betti_numbers",
    "cldice",
    "dice",
    "dice_by_distance",
    "dice_per_class",
    "masked_dice",
    "mean_slice_dice",
    "per_slice_dice",
    "precision_recall",
    "slice_distance_to_annotation",
]
