"""Additive attention gate on a U-Net skip connection (Oktay et al. 2018, Attention U-Net)."""

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from torch import nn
from torch.nn.modules.conv import _ConvNd

_INTERPOLATION = {2: "bilinear", 3: "trilinear"}


class AttentionGate(nn.Module):
    """Scales skip features by a sigmoid attention map computed from them and a coarser gating signal.

    ``α = σ(ψ(ReLU(θ(skip) + φ(gating))))`` at the gating resolution, upsampled (linear interpolation) to the
    skip's and multiplied with it; θ is a convolution with kernel = stride = ``stride`` (it brings the skip to
    the gating resolution), φ and ψ are 1x1 convolutions, ψ has one output channel.

    Args:
        conv_op: ``nn.Conv2d`` or ``nn.Conv3d``.
        skip_channels: channels of the skip features (B, C_s, *fine).
        gating_channels: channels of the gating signal (B, C_g, *coarse), the decoder level below.
        stride: fine / coarse size per spatial axis (the encoder stride between the two levels).
        inter_channels: channels of θ and φ; default C_s // 2 (at least 1).
    """

    def __init__(self, conv_op: type[_ConvNd], skip_channels: int, gating_channels: int, stride: Sequence[int],
                 inter_channels: int | None = None):
        super().__init__()
        self.dim = convert_conv_op_to_dim(conv_op)
        stride = tuple(int(s) for s in stride)
        if len(stride) != self.dim:
            raise ValueError(f"stride {stride} must have one entry per spatial axis ({self.dim})")
        inter = inter_channels or max(skip_channels // 2, 1)
        self.skip_channels, self.gating_channels, self.inter_channels, self.stride = (
            skip_channels, gating_channels, inter, stride)
        self.theta = conv_op(skip_channels, inter, stride, stride, bias=False)
        self.phi = conv_op(gating_channels, inter, 1)
        self.psi = conv_op(inter, 1, 1)

    def attention_map(self, skip: torch.Tensor, gating: torch.Tensor) -> torch.Tensor:
        """(B, C_s, *fine), (B, C_g, *coarse) -> α (B, 1, *fine) in (0, 1)."""
        if skip.ndim != self.dim + 2 or skip.shape[1] != self.skip_channels or gating.shape[1] != self.gating_channels:
            raise ValueError(f"expected skip (B, {self.skip_channels}, ...) and gating (B, {self.gating_channels}, "
                             f"...) with {self.dim} spatial axes, got {tuple(skip.shape)} and {tuple(gating.shape)}")
        coarse = self.theta(skip)
        if coarse.shape[2:] != gating.shape[2:]:
            raise ValueError(f"skip {tuple(skip.shape[2:])} / stride {self.stride} != gating "
                             f"{tuple(gating.shape[2:])}")
        alpha = torch.sigmoid(self.psi(F.relu(coarse + self.phi(gating))))
        return F.interpolate(alpha, size=skip.shape[2:], mode=_INTERPOLATION[self.dim], align_corners=False)

    def forward(self, skip: torch.Tensor, gating: torch.Tensor) -> torch.Tensor:
        """(B, C_s, *fine), (B, C_g, *coarse) -> gated skip (B, C_s, *fine)."""
        return skip * self.attention_map(skip, gating)

    def compute_conv_feature_map_size(self, skip_size) -> np.int64:
        """Activation elements of one sample kept for backward (nnU-Net's memory estimate), skip size (*fine)."""
        fine = np.prod(skip_size, dtype=np.int64)
        coarse = np.prod([s // t for s, t in zip(skip_size, self.stride)], dtype=np.int64)
        # θ, φ, their ReLU'd sum, ψ / σ at the coarse level; α upsampled and the gated skip at the fine level
        return np.int64((3 * self.inter_channels + 1) * coarse + (1 + self.skip_channels) * fine)
