"""Pseudo-label targets that travel as extra segmentation channels, and a Dice + CE loss with per-voxel weights.

Channel layout of a training target with pseudo-labels, (B, 3, *spatial) integers:
    0: nnU-Net's labels (annotated classes, ignore label elsewhere)
    1: the pseudo-label class of every voxel
    2: the pseudo-label's confidence, quantised to 0..CONFIDENCE_SCALE
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_ext.semi_supervised._checks import check_batch_tensor

PSEUDO_LABEL_CHANNELS = 3
CONFIDENCE_SCALE = 255  # confidence 1.0 is stored as 255 (uint8)


def split_pseudo_label_target(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a (B, 3, *spatial) target into labels, pseudo-labels and confidence.

    Args:
        target: (B, 3, H, W) or (B, 3, D, H, W) integer tensor in the channel layout of this module.

    Returns:
        ``(labels, pseudo_labels, confidence)``, each (B, 1, *spatial): the first two keep the input dtype, the
        confidence is float32 in [0, 1].

    Raises:
        ValueError: when ``target`` is not (B, 3, *spatial).
    """
    check_batch_tensor("target", target)
    if target.shape[1] != PSEUDO_LABEL_CHANNELS:
        raise ValueError(f"target must have {PSEUDO_LABEL_CHANNELS} channels (labels, pseudo-labels, confidence), "
                         f"got {tuple(target.shape)}")
    return target[:, 0:1], target[:, 1:2], target[:, 2:3].float() / CONFIDENCE_SCALE


class VoxelWeightedDiceCE(nn.Module):
    """nnU-Net's Dice + CE where every voxel counts with a weight; weight 0 leaves a voxel out.

    With ``S`` the voxels of weight > 0, ``n = |S|`` and ``m = sum(w) / n`` their mean weight:

        loss = weight_ce * sum_S(w * CE) / n  +  weight_dice * m * dice(logits, target, loss_mask=w / m)

    A constant weight ``a`` on ``S`` therefore gives exactly ``a`` times nnU-Net's ``DC_and_CE_loss`` on the voxels
    of ``S`` (CE averaged over them, Dice masked to them); per-voxel weights scale each voxel's CE term and its share
    of the soft-Dice sums. No voxel selected gives 0 (the Dice is still called, so DDP's batch Dice all-gather runs
    on every rank).

    Args:
        dice: soft Dice loss called as ``dice(logits, labels, loss_mask=...)`` with a float mask, e.g. the ``dc`` of
            the trainer's nnU-Net loss (``MemoryEfficientSoftDiceLoss``, softmax applied inside).
        weight_ce, weight_dice: the CE and Dice weights of that nnU-Net loss.
    """

    def __init__(self, dice: Callable[..., torch.Tensor], weight_ce: float = 1.0, weight_dice: float = 1.0):
        super().__init__()
        self.dice = dice
        self.weight_ce = weight_ce
        self.weight_dice = weight_dice

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """
        Args:
            logits: (B, C, *spatial) network output (before softmax).
            target: (B, 1, *spatial) class indices in [0, C) wherever ``weight`` > 0 (anything elsewhere).
            weight: (B, 1, *spatial) float, >= 0.

        Returns:
            float32 scalar with a gradient to ``logits``.
        """
        check_batch_tensor("logits", logits)
        expected = (logits.shape[0], 1, *logits.shape[2:])
        for name, x in (("target", target), ("weight", weight)):
            if tuple(x.shape) != expected:
                raise ValueError(f"{name} must have shape {expected} (B, 1, *spatial), got {tuple(x.shape)}")
        weight = weight.float()
        selected = weight > 0
        n_selected = selected.sum().clamp_min(1)
        mean_weight = weight.sum() / n_selected
        labels = torch.where(selected, target, 0).long()
        ce = F.cross_entropy(logits.float(), labels[:, 0], reduction="none")
        ce_term = (ce * weight[:, 0]).sum() / n_selected
        # Normalised to mean 1 on the selected voxels, so Dice's smoothing term weighs as much as in nnU-Net's loss.
        dice_term = mean_weight * self.dice(logits, labels, loss_mask=weight / mean_weight.clamp_min(1e-12))
        return self.weight_ce * ce_term + self.weight_dice * dice_term
