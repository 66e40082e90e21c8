"""nnU-Net's U-Net decoder with axial attention in its deepest stages and optional gates on the skips."""


import numpy as np
import torch
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from torch import nn

from nnunet_ext.architectures.attention_gate import AttentionGate
from nnunet_ext.architectures.axial_attention import SequentialAxialAttention


class AttentionUNetDecoder(UNetDecoder):
    """:class:`UNetDecoder` (transposed conv, concatenation with the skip, conv blocks, segmentation layer per
    stage) plus, per stage s (0 = deepest):

    - ``attention[s]``: :class:`SequentialAxialAttention` after the stage's conv blocks for the
      ``attention_stages`` deepest stages, ``nn.Identity`` elsewhere;
    - ``gates[s]`` (with ``attention_gates``): an :class:`AttentionGate` on the skip, gated by the stage's input
      from the level below (the bottleneck for s = 0).

    The stock modules keep their names (``stages``, ``transpconvs``, ``seg_layers``), so a stock decoder's
    state dict loads into this one (``strict=False``); with freshly initialised attention (zero output
    projections) and no gates its output is the stock decoder's.
    """

    def __init__(self, encoder: PlainConvEncoder | ResidualEncoder, num_classes: int,
                 n_conv_per_stage: int | tuple[int, ...] | list[int], deep_supervision: bool,
                 nonlin_first: bool = False, attention_stages: int = 2, attention_heads: int = 4,
                 attention_gates: bool = False):
        super().__init__(encoder, num_classes, n_conv_per_stage, deep_supervision, nonlin_first=nonlin_first)
        n_stages = len(self.stages)
        if not 0 <= attention_stages <= n_stages:
            raise ValueError(f"attention_stages must be in 0..{n_stages} (the decoder's stages), "
                             f"got {attention_stages}")
        skip_channels = [encoder.output_channels[-(s + 2)] for s in range(n_stages)]
        self.attention_stages, self.attention_heads = attention_stages, attention_heads
        self.attention = nn.ModuleList(
            SequentialAxialAttention(encoder.conv_op, skip_channels[s], attention_heads, encoder.norm_op,
                                     encoder.norm_op_kwargs) if s < attention_stages else nn.Identity()
            for s in range(n_stages))
        self.gates = nn.ModuleList(
            AttentionGate(encoder.conv_op, skip_channels[s], encoder.output_channels[-(s + 1)],
                          encoder.strides[-(s + 1)])
            for s in range(n_stages)) if attention_gates else None

    def forward(self, skips: list[torch.Tensor]):
        """Encoder skips, finest first, bottleneck last -> logits (B, classes, *input size), or with deep
        supervision the list of every stage's logits, finest first (like :class:`UNetDecoder`)."""
        lres_input = skips[-1]
        seg_outputs = []
        for s in range(len(self.stages)):
            skip = skips[-(s + 2)]
            if self.gates is not None:
                skip = self.gates[s](skip, lres_input)
            x = self.stages[s](torch.cat((self.transpconvs[s](lres_input), skip), 1))
            x = self.attention[s](x)
            if self.deep_supervision or s == len(self.stages) - 1:
                seg_outputs.append(self.seg_layers[s](x))
            lres_input = x
        seg_outputs = seg_outputs[::-1]
        return seg_outputs if self.deep_supervision else seg_outputs[0]

    def compute_conv_feature_map_size(self, input_size) -> np.int64:
        """:class:`UNetDecoder`'s estimate plus the attention blocks' and gates' activations (encoder input size)."""
        output = super().compute_conv_feature_map_size(input_size)
        sizes = []  # output size of every encoder stage but the bottleneck, finest first
        for stride in self.encoder.strides[:-1]:
            input_size = [i // s for i, s in zip(input_size, stride)]
            sizes.append(input_size)
        for s in range(len(self.stages)):
            if s < self.attention_stages:
                output += self.attention[s].compute_conv_feature_map_size(sizes[-(s + 1)])
            if self.gates is not None:
                output += self.gates[s].compute_conv_feature_map_size(sizes[-(s + 1)])
        return np.int64(output)
