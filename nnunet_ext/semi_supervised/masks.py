"""The project's one definition of 'unlabeled': voxels whose target is the dataset's ignore label."""

import torch

from nnunet_ext.semi_supervised._checks import check_batch_tensor


def unlabeled_mask(target: torch.Tensor, ignore_label: int) -> torch.Tensor:
    """Voxels whose target is the ignore label.

    Args:
        target: (B, 1, H, W) or (B, 1, D, H, W) label map, any integer or float dtype (as nnU-Net delivers it;
            for deep supervision pass one resolution at a time).
        ignore_label: the dataset's ignore label (nnU-Net: the highest label value).

    Returns:
        bool tensor of the same shape and device as ``target``; True = unlabeled.

    Raises:
        ValueError: when ``target`` is not (B, 1, *spatial) with 2 or 3 spatial dims.
    """
    check_batch_tensor("target", target)
    if target.shape[1] != 1:
        raise ValueError(f"target must have one channel (B, 1, *spatial), got {tuple(target.shape)}")
    return target == ignore_label
