"""Shared argument checks for the tensors of this package: (B, C, *spatial) with 2 or 3 spatial dims."""

import torch


def check_batch_tensor(name: str, x: torch.Tensor) -> None:
    """ValueError unless ``x`` is a tensor of shape (B, C, H, W) or (B, C, D, H, W)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim not in (4, 5):
        raise ValueError(f"{name} must have shape (B, C, H, W) or (B, C, D, H, W), got {tuple(x.shape)}")


def check_voxel_mask(name: str, mask: torch.Tensor, reference: torch.Tensor) -> None:
    """ValueError unless ``mask`` is a bool tensor of shape (B, 1, *spatial) matching ``reference`` (B, C, *spatial)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    expected = (reference.shape[0], 1, *reference.shape[2:])
    if tuple(mask.shape) != expected:
        raise ValueError(f"{name} must have shape {expected} (B, 1, *spatial), got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = unlabeled), got {mask.dtype}")
