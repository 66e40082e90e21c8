"""Segmentation metrics on label arrays (numpy, no nnU-Net imports)."""

from nnunet_ext.metrics.dice import dice, dice_per_class

__all__ = ["dice", "dice_per_class"]
