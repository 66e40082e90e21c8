"""CutMix in 2D or 3D: one random box per sample, filled with the same box of the previous sample of the batch.

Inputs, targets and pseudo-labels are all mixed by ``cutmix(x, mask)`` with one mask, so they stay voxel-aligned.
A mask drawn at full resolution mixes nnU-Net's downsampled deep-supervision targets too: ``resize_mask`` uses the
nearest-exact rule with which nnU-Net downsamples them (batchgeneratorsv2 ``DownsampleSegForDSTransform``), so each
low-resolution voxel copies one full-resolution voxel and mixing commutes with the downsampling.
"""

import math

import torch
import torch.nn.functional as F

from nnunet_ext.semi_supervised._checks import check_batch_tensor

# Draws per sample before giving up on a box whose whole-voxel volume fraction lies in the requested range.
MAX_BOX_DRAWS = 100


def random_boxes(batch_size: int, spatial_shape: tuple[int, ...], fraction: tuple[float, float] = (0.25, 0.5),
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """One axis-aligned box per sample, inside the patch, of random aspect and volume fraction.

    Per sample: a target fraction ``f ~ U(fraction)`` and aspect weights ``w ~ Dirichlet(1, ..., 1)`` (uniform on the
    simplex) give side fractions ``f ** w_d``, whose product is ``f`` and each of which is <= 1; sides are rounded to
    whole voxels (at least 1), and a draw whose rounded box covers a volume fraction outside ``fraction`` is drawn
    again. The start along each axis is uniform over the positions that keep the box inside the patch.

    Args:
        batch_size: number of boxes B (>= 1).
        spatial_shape: patch shape, 2 or 3 axes, e.g. (Z, Y, X).
        fraction: (low, high) with 0 < low <= high <= 1, bounds of the box's share of the patch volume.
        generator: CPU torch.Generator; None uses torch's default CPU generator.

    Returns:
        int64 CPU tensor (B, D, 2): ``[..., 0]`` the first voxel of the box along each axis, ``[..., 1]`` its size.

    Raises:
        ValueError: on a bad batch size, shape or fraction, or when no box of whole voxels of this patch covers a
            fraction in range (a patch of very few voxels).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(spatial_shape) not in (2, 3) or min(spatial_shape) < 1:
        raise ValueError(f"spatial_shape must be 2 or 3 positive sizes, got {tuple(spatial_shape)}")
    low, high = fraction
    if not 0 < low <= high <= 1:
        raise ValueError(f"fraction must satisfy 0 < low <= high <= 1, got {tuple(fraction)}")
    shape = torch.tensor(spatial_shape, dtype=torch.float64)
    volume = math.prod(spatial_shape)
    boxes = torch.empty((batch_size, len(spatial_shape), 2), dtype=torch.int64)
    for b in range(batch_size):
        for _ in range(MAX_BOX_DRAWS):
            u = torch.rand(1 + 2 * len(spatial_shape), generator=generator, dtype=torch.float64)
            target = low + (high - low) * u[0]
            weights = -torch.log1p(-u[1:1 + len(spatial_shape)])  # Exp(1) draws, normalised: Dirichlet(1, ..., 1)
            weights = weights / weights.sum()
            size = torch.round(shape * target ** weights).clamp(min=1).minimum(shape)
            if low <= float(size.prod()) / volume <= high:
                break
        else:
            raise ValueError(f"no box of whole voxels of a {tuple(spatial_shape)} patch covers a volume fraction in "
                             f"[{low}, {high}]: widen the fraction range or use larger patches")
        start = torch.floor(u[1 + len(spatial_shape):] * (shape - size + 1)).minimum(shape - size)
        boxes[b, :, 0], boxes[b, :, 1] = start.long(), size.long()
    return boxes


def box_mask(boxes: torch.Tensor, spatial_shape: tuple[int, ...], device: torch.device | str | None = None
             ) -> torch.Tensor:
    """Render boxes as a voxel mask.

    Args:
        boxes: (B, D, 2) int64 from ``random_boxes`` (start, size per axis).
        spatial_shape: the patch shape, D axes.
        device: where the mask is built (default: the device of ``boxes``).

    Returns:
        bool tensor (B, 1, *spatial_shape), True inside the sample's box.

    Raises:
        ValueError: when ``boxes`` is not (B, len(spatial_shape), 2).
    """
    if boxes.ndim != 3 or boxes.shape[1:] != (len(spatial_shape), 2):
        raise ValueError(f"boxes must have shape (B, {len(spatial_shape)}, 2), got {tuple(boxes.shape)}")
    boxes = boxes.to(device if device is not None else boxes.device)
    mask = torch.ones((boxes.shape[0],) + (1,) * len(spatial_shape), dtype=torch.bool, device=boxes.device)
    for axis, size in enumerate(spatial_shape):
        coordinate = torch.arange(size, device=boxes.device)
        start, length = boxes[:, axis, 0:1], boxes[:, axis, 1:2]
        inside = (coordinate >= start) & (coordinate < start + length)  # (B, size)
        view = [boxes.shape[0]] + [1] * len(spatial_shape)
        view[1 + axis] = size
        mask = mask & inside.view(view)
    return mask[:, None]


def resize_mask(mask: torch.Tensor, spatial_shape: tuple[int, ...]) -> torch.Tensor:
    """A mask at another resolution by nearest-exact selection, the rule of nnU-Net's deep-supervision targets.

    Args:
        mask: bool (B, 1, *spatial).
        spatial_shape: the wanted spatial shape (same number of axes).

    Returns:
        bool (B, 1, *spatial_shape); ``mask`` itself when the shape already matches.
    """
    if tuple(mask.shape[2:]) == tuple(spatial_shape):
        return mask
    return F.interpolate(mask.float(), size=tuple(spatial_shape), mode="nearest-exact") > 0.5


def cutmix(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sample i takes the voxels inside its box from sample i - 1 of the batch (cyclically), elsewhere its own.

    This is ``x1 * (1 - M) + x2 * M`` with ``x2 = x.roll(1, dims=0)``, computed by selection, so integer label maps
    (with their ignore label) are mixed exactly too. With a batch of one the sample is mixed with itself: unchanged.

    Args:
        x: (B, C, H, W) or (B, C, D, H, W), any dtype and device: images, label maps, pseudo-labels.
        mask: bool (B, 1, *spatial) from ``box_mask`` at ``x``'s or another resolution (resized by ``resize_mask``).

    Returns:
        a new tensor with the shape, dtype and device of ``x``.

    Raises:
        ValueError: on a bad ``x`` shape, or a mask whose batch size or number of axes differs from ``x``'s.
        TypeError: when ``mask`` is not bool.
    """
    check_batch_tensor("x", x)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = take the other sample), got {mask.dtype}")
    if mask.ndim != x.ndim or mask.shape[0] != x.shape[0] or mask.shape[1] != 1:
        raise ValueError(f"mask must have shape (B, 1, *spatial) with B={x.shape[0]} and {x.ndim - 2} spatial axes, "
                         f"got {tuple(mask.shape)}")
    mask = resize_mask(mask.to(x.device), tuple(x.shape[2:]))
    return torch.where(mask, x.roll(1, dims=0), x)
