"""Axial continuity between adjacent slices on unlabeled voxels (MIDL 2026 light-sheet paper)."""

import torch

from nnunet_ext.semi_supervised._checks import check_batch_tensor, check_voxel_mask


def axial_continuity_loss(probabilities: torch.Tensor, mask: torch.Tensor, axis: int,
                          labels: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared difference of class probabilities between adjacent slices along one spatial axis.

    A voxel pair (slice i, slice i + 1, same in-plane position) counts only when BOTH voxels are unlabeled in
    ``mask``. The mask is used voxel by voxel: after nnU-Net's rotations an annotated slice is no longer a whole
    slice of the patch. With ``labels`` (e.g. the teacher's argmax) a pair counts only when both voxels also have
    the same label, so an object's real top or bottom (where the label changes) is not smoothed away.
    Loss = sum over counted pairs and classes of (p[i] - p[i + 1])^2 / (counted pairs * C).

    Args:
        probabilities: (B, C, H, W) or (B, C, D, H, W), any float dtype (typically softmax of the logits).
        mask: (B, 1, *spatial) bool, True = unlabeled (see ``unlabeled_mask``).
        axis: spatial axis, 0 = first spatial dim (tensor dim 2); negative values count from the end, Python style.
        labels: None or (B, 1, *spatial), any dtype; pairs whose two labels differ do not count.

    Returns:
        float32 scalar with a gradient to ``probabilities``; 0.0, still connected to the graph, when no pair
        counts (e.g. size 1 along ``axis``).

    Raises:
        ValueError: on a bad ``probabilities`` shape, a mask or labels that are not (B, 1, *spatial), or ``axis`` out
            of range.
        TypeError: when ``mask`` is not bool.
    """
    check_batch_tensor("probabilities", probabilities)
    check_voxel_mask("mask", mask, probabilities)
    n_spatial = probabilities.ndim - 2
    if not -n_spatial <= axis < n_spatial:
        raise ValueError(f"axis must be in [{-n_spatial}, {n_spatial - 1}] for {n_spatial} spatial dims, got {axis}")
    dim = axis % n_spatial + 2
    if labels is not None and labels.shape != mask.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must have the mask's shape {tuple(mask.shape)}")

    p = probabilities.float()
    pairs = p.shape[dim] - 1
    # Size 1 along the axis gives length-0 slices: the sums below are then 0 and keep a grad_fn.
    squared = (p.narrow(dim, 0, pairs) - p.narrow(dim, 1, pairs)).square().sum(dim=1, keepdim=True)
    both_unlabeled = mask.narrow(dim, 0, pairs) & mask.narrow(dim, 1, pairs)
    if labels is not None:
        both_unlabeled = both_unlabeled & (labels.narrow(dim, 0, pairs) == labels.narrow(dim, 1, pairs))
    n_pairs = both_unlabeled.sum()
    return torch.where(both_unlabeled, squared, 0.0).sum() / (n_pairs.clamp_min(1) * p.shape[1])
