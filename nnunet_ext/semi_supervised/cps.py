"""Cross pseudo supervision (Chen et al. 2021): a network is trained toward the other network's hard labels."""

import torch
import torch.nn.functional as F

from nnunet_ext.semi_supervised._checks import check_batch_tensor, check_voxel_mask

CPS_LOSSES = ("dice", "ce")


def cross_pseudo_supervision_loss(logits: torch.Tensor, pseudo_labels: torch.Tensor, mask: torch.Tensor,
                                  kind: str = "dice", smooth: float = 1e-5) -> torch.Tensor:
    """Loss of ``logits`` against hard ``pseudo_labels`` on the voxels where ``mask`` is True.

    ``"dice"`` (Pagano et al. 2023 found Dice better than CE on sparse EM): soft Dice of the softmax against the
    one-hot pseudo-labels, summed over the batch and the counted voxels (batch Dice), foreground classes 1..C-1 as
    nnU-Net's own Dice: ``1 - mean_c (2 sum p_c q_c + smooth) / (sum p_c + sum q_c + smooth)``.
    ``"ce"``: cross-entropy averaged over the counted voxels. Computed in float32.

    Args:
        logits: (B, C, H, W) or (B, C, D, H, W), C >= 2, any float dtype; receives the gradient.
        pseudo_labels: (B, 1, *spatial) integer class indices in [0, C) (e.g. the other network's argmax).
        mask: (B, 1, *spatial) bool, True = the voxel counts (the unlabeled voxels, see ``unlabeled_mask``).
        kind: "dice" or "ce".
        smooth: > 0, added to the Dice numerator and denominator.

    Returns:
        float32 scalar with a gradient to ``logits``; 0.0, still connected to the graph, when no voxel counts.

    Raises:
        ValueError: on bad shapes, fewer than 2 classes, an unknown ``kind`` or ``smooth <= 0``.
        TypeError: when ``mask`` is not bool or ``pseudo_labels`` is not an integer tensor.
    """
    check_batch_tensor("logits", logits)
    check_voxel_mask("mask", mask, logits)
    if tuple(pseudo_labels.shape) != tuple(mask.shape):
        raise ValueError(f"pseudo_labels must have shape {tuple(mask.shape)} (B, 1, *spatial), "
                         f"got {tuple(pseudo_labels.shape)}")
    if pseudo_labels.is_floating_point() or pseudo_labels.dtype == torch.bool:
        raise TypeError(f"pseudo_labels must be integer class indices, got {pseudo_labels.dtype}")
    if logits.shape[1] < 2:
        raise ValueError(f"logits need >= 2 classes (softmax), got {logits.shape[1]}")
    if kind not in CPS_LOSSES:
        raise ValueError(f"kind must be one of {CPS_LOSSES}, got {kind!r}")
    if not smooth > 0:
        raise ValueError(f"smooth must be > 0, got {smooth}")

    logits = logits.float()
    labels = pseudo_labels.long()
    counted = mask.float()
    if kind == "ce":
        ce = F.cross_entropy(logits, labels[:, 0], reduction="none")[:, None]
        return (ce * counted).sum() / counted.sum().clamp_min(1)

    probabilities = torch.softmax(logits, dim=1) * counted
    one_hot = torch.zeros_like(probabilities).scatter_(1, labels, 1.0) * counted
    axes = [0] + list(range(2, logits.ndim))
    intersection = (probabilities * one_hot).sum(axes)[1:]
    denominator = probabilities.sum(axes)[1:] + one_hot.sum(axes)[1:]
    return 1 - ((2 * intersection + smooth) / (denominator + smooth)).mean()
