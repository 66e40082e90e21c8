"""Networks with the dynamic-network-architectures constructor contract and their building blocks.

A plans file selects a network by dotted name, e.g.
``nnunet_ext.architectures.axial_attention_unet.AxialAttentionPlainConvUNet``.
"""

from nnunet_ext.architectures.attention_gate import AttentionGate
from nnunet_ext.architectures.attention_unet_decoder import AttentionUNetDecoder
from nnunet_ext.architectures.axial_attention import AxialSelfAttention, RelativePositionBias, SequentialAxialAttention
from nnunet_ext.architectures.axial_attention_unet import AxialAttentionPlainConvUNet, AxialAttentionResEncUNet

__all__ = [
    "AttentionGate",
    "AttentionUNetDecoder",
    "AxialAttentionPlainConvUNet",
    "AxialAttentionResEncUNet",
    "AxialSelfAttention",
    "RelativePositionBias",
    "SequentialAxialAttention",
]
