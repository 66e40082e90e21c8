"""Sequential axial self-attention for 2D and 3D feature maps (Wang et al. 2020, Axial-DeepLab).

Full self-attention over a (Z, Y, X) feature map costs (Z·Y·X)² per head; attending along one axis at a time
costs Z·Y·X·(Z + Y + X) and, applied along every axis in turn, still lets every voxel reach every other one.
As in Axial-DeepLab, queries and keys have half the channels of the values, and the axes follow each other
inside one residual block with one output projection. The positional term is a per-head bias of the
attention logits computed from the relative offset by a small MLP (the continuous position bias of Liu et
al. 2022, Swin V2), so one block serves every axis length that nnU-Net's patch sizes produce.
"""


import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from torch import nn
from torch.nn.modules.conv import _ConvNd


class RelativePositionBias(nn.Module):
    """Attention-logit bias ``b_h(j - i)`` for every head h, defined for any axis length.

    The offset d = j - i enters the MLP log-scaled, ``sign(d)·log(1 + |d|)``, so offsets longer than any seen
    in training map close to known ones. Smooth activation: every weight gets a gradient for every length.
    """

    def __init__(self, heads: int, hidden: int = 32):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(1, hidden), nn.SiLU(), nn.Linear(hidden, heads, bias=False))

    def forward(self, length: int) -> torch.Tensor:
        """Returns the bias (heads, length, length), float32; entry [h, i, j] is b_h(j - i)."""
        device = self.mlp[0].weight.device
        offsets = torch.arange(1 - length, length, device=device, dtype=torch.float32)  # (2L - 1,)
        table = self.mlp((torch.sign(offsets) * torch.log1p(offsets.abs()))[:, None])  # (2L - 1, heads)
        positions = torch.arange(length, device=device)
        index = positions[None, :] - positions[:, None] + length - 1  # (L, L): j - i, shifted to >= 0
        return table[index].permute(2, 0, 1)


class AxialSelfAttention(nn.Module):
    """Multi-head self-attention along one spatial axis: every line of voxels along ``axis`` attends within
    itself and is replaced by its attended values.

    Queries and keys (C / 2 channels) and values (C channels) are one linear map of the channels (a 1x1
    convolution, computed channels-last as one matrix product); the heads' values are concatenated.

    With gradients enabled and ``recompute`` (default), only the input is kept for backward and the rest is
    recomputed there (activation checkpointing): the layer's activations, ~4 feature maps plus the attention
    weights, would otherwise outweigh the convolutions' at the stage it sits in.

    Args:
        conv_op: ``nn.Conv2d`` or ``nn.Conv3d``; sets the dimensionality.
        channels: C; a multiple of 2 x ``heads``.
        heads: attention heads; each has C / (2 heads) query/key and C / heads value channels.
        axis: spatial axis to attend along (0 = the first spatial axis, Z in 3D).
        recompute: recompute the activations in backward instead of keeping them.
    """

    def __init__(self, conv_op: type[_ConvNd], channels: int, heads: int, axis: int, recompute: bool = True):
        super().__init__()
        self.dim = convert_conv_op_to_dim(conv_op)
        if heads < 1 or channels % (2 * heads):
            raise ValueError(f"channels ({channels}) must be a multiple of 2 x heads ({heads}): queries and keys "
                             f"have half the channels")
        if not 0 <= axis < self.dim:
            raise ValueError(f"axis {axis} is not a spatial axis of a {self.dim}D feature map")
        self.channels, self.heads, self.axis, self.recompute = channels, heads, axis, recompute
        self.qkv = nn.Linear(channels, 2 * channels)
        self.position_bias = RelativePositionBias(heads)
        # (B, C, *spatial) <-> (B, *other spatial axes, L, C): lines along the axis, channels last
        others = [2 + i for i in range(self.dim) if i != axis]
        self._to_lines = (0, *others, 2 + axis, 1)
        self._from_lines = tuple(int(i) for i in np.argsort(self._to_lines))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) -> attended values (B, C, *spatial), for any spatial size."""
        if x.ndim != self.dim + 2 or x.shape[1] != self.channels:
            raise ValueError(f"expected (B, {self.channels}, {', '.join('S' * self.dim)}), got {tuple(x.shape)}")
        if self.recompute and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._attend, x, use_reentrant=False)
        return self._attend(x)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        lines = x.permute(self._to_lines)
        line_shape, length = lines.shape, lines.shape[-2]
        lines = lines.reshape(-1, length, self.channels)  # (M lines, L, C)
        half = self.channels // 2
        # (M, L, 2C) -> q, k (M, heads, L, C / 2heads), v (M, heads, L, C / heads)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for t in self.qkv(lines).split([half, half, self.channels], dim=-1))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=self.position_bias(length).to(q.dtype))
        return attended.transpose(1, 2).reshape(line_shape).permute(self._from_lines)

    def compute_conv_feature_map_size(self, input_size) -> np.int64:
        """Activation elements of one sample for backward (nnU-Net's memory estimate), input (*spatial).

        Without recomputation they are kept from forward to backward; with it they are live only while this
        layer's backward runs.
        """
        voxels = np.prod(input_size, dtype=np.int64)
        # lines, q/k/v (2C), attention weights (heads x L per voxel), attended values
        return np.int64((4 * self.channels + self.heads * input_size[self.axis]) * voxels)


class SequentialAxialAttention(nn.Module):
    """Residual block of axial self-attention along every spatial axis in turn, Z, Y, X (3D) or Y, X (2D):
    ``x + W·A_X(A_Y(A_Z(norm(x))))``, one :class:`AxialSelfAttention` A per axis.

    W (a 1x1 convolution) starts at zero, so a new block is the identity and leaves a pretrained network's
    output unchanged until training moves W.

    Args:
        conv_op: ``nn.Conv2d`` or ``nn.Conv3d``; sets the dimensionality.
        channels: C, input and output channels; a multiple of 2 x ``heads``.
        heads: attention heads per axis.
        norm_op, norm_op_kwargs: normalisation of the block's input (nnU-Net's plans: instance norm);
            ``None`` for none.
        recompute: the axes recompute their activations in backward instead of keeping them.
    """

    def __init__(self, conv_op: type[_ConvNd], channels: int, heads: int,
                 norm_op: type[nn.Module] | None = None, norm_op_kwargs: dict | None = None,
                 recompute: bool = True):
        super().__init__()
        self.channels = channels
        self.norm = nn.Identity() if norm_op is None else norm_op(channels, **(norm_op_kwargs or {}))
        self.axes = nn.ModuleList(AxialSelfAttention(conv_op, channels, heads, axis, recompute)
                                  for axis in range(convert_conv_op_to_dim(conv_op)))
        self.out = nn.Linear(channels, channels)
        self.reset_to_identity()

    def reset_to_identity(self) -> None:
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) -> (B, C, *spatial), for any spatial size."""
        h = self.norm(x)
        for attention in self.axes:
            h = attention(h)
        return x + self.out(h.movedim(1, -1)).movedim(-1, 1)

    def compute_conv_feature_map_size(self, input_size) -> np.int64:
        """Activation elements of one sample for backward (nnU-Net's memory estimate), input (*spatial): the
        normalised input and every axis' output, plus the axes' activations (live one at a time when they
        are recomputed, all kept otherwise)."""
        sizes = [attention.compute_conv_feature_map_size(input_size) for attention in self.axes]
        recomputed = all(attention.recompute for attention in self.axes)
        maps = (1 + len(self.axes)) * self.channels * np.prod(input_size, dtype=np.int64)
        return np.int64(maps + (max(sizes) if recomputed else sum(sizes)))
