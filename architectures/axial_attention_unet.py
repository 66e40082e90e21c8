"""U-Nets whose deepest decoder stages hold sequential axial attention, usable from any nnU-Net plans.

Each class takes the keyword arguments of the dynamic-network-architectures U-Net it extends (the plans'
``arch_kwargs``), plus:

- ``attention_stages``: how many decoder stages, counted from the deepest, get a
  :class:`~nnunet_ext.architectures.axial_attention.SequentialAxialAttention` block (default 2);
- ``attention_heads``: heads per attention block (default 4; twice the heads must divide those stages'
  channels, since queries and keys have half of them);
- ``attention_gates``: an :class:`~nnunet_ext.architectures.attention_gate.AttentionGate` on every skip
  connection (default off).

The encoder is dynamic-network-architectures' own and the decoder is its :class:`UNetDecoder` plus these
modules, so the stock parameter names are kept: a stock U-Net's weights load with ``strict=False`` and, with
freshly initialised attention and no gates, the output is the stock network's.
"""

from dynamic_network_architectures.architectures.abstract_arch import AbstractDynamicNetworkArchitectures
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from dynamic_network_architectures.initialization.weight_init import InitWeights_He, init_last_bn_before_add_to_0

from nnunet_ext.architectures.attention_unet_decoder import AttentionUNetDecoder
from nnunet_ext.architectures.axial_attention import SequentialAxialAttention


class _AxialAttentionUNet(AbstractDynamicNetworkArchitectures):
    """Encoder (returning its skips) followed by an :class:`AttentionUNetDecoder`."""

    def _build_decoder(self, num_classes, n_conv_per_stage_decoder, deep_supervision, nonlin_first,
                       attention_stages, attention_heads, attention_gates):
        self.decoder = AttentionUNetDecoder(self.encoder, num_classes, n_conv_per_stage_decoder, deep_supervision,
                                            nonlin_first=nonlin_first, attention_stages=attention_stages,
                                            attention_heads=attention_heads, attention_gates=attention_gates)

    def forward(self, x):
        """(B, C_in, *patch) -> logits (B, classes, *patch), or with deep supervision one per stage, finest first."""
        return self.decoder(self.encoder(x))

    def compute_conv_feature_map_size(self, input_size):
        """nnU-Net's activation-memory estimate for a patch (*spatial), as the stock U-Nets compute it."""
        if len(input_size) != convert_conv_op_to_dim(self.encoder.conv_op):
            raise ValueError(f"give the patch size without batch and channel axes, got {tuple(input_size)}")
        return (self.encoder.compute_conv_feature_map_size(input_size)
                + self.decoder.compute_conv_feature_map_size(input_size))

    @staticmethod
    def _initialize_attention(module):
        # nnU-Net applies initialize to every submodule, children first: the block resets its own output layer.
        if isinstance(module, SequentialAxialAttention):
            module.reset_to_identity()


class AxialAttentionPlainConvUNet(_AxialAttentionUNet):
    """``PlainConvUNet`` with axial attention in the deepest decoder stages (see the module docstring).

    ``encoder_kwargs`` are :class:`PlainConvEncoder`'s (``n_stages``, ``features_per_stage``, ``conv_op``,
    ``kernel_sizes``, ``strides``, ``n_conv_per_stage``, ``conv_bias``, ``norm_op``, ...), as in the plans.
    """

    def __init__(self, input_channels: int, num_classes: int, n_conv_per_stage_decoder,
                 deep_supervision: bool = False, nonlin_first: bool = False, attention_stages: int = 2,
                 attention_heads: int = 4, attention_gates: bool = False, **encoder_kwargs):
        super().__init__()
        self.key_to_encoder = "encoder.stages"
        self.key_to_stem = "encoder.stages.0"
        self.keys_to_in_proj = ("encoder.stages.0.0.convs.0.all_modules.0", "encoder.stages.0.0.convs.0.conv")
        self.encoder = PlainConvEncoder(input_channels, return_skips=True, nonlin_first=nonlin_first,
                                        **encoder_kwargs)
        self._build_decoder(num_classes, n_conv_per_stage_decoder, deep_supervision, nonlin_first,
                            attention_stages, attention_heads, attention_gates)

    @staticmethod
    def initialize(module):
        InitWeights_He(1e-2)(module)
        _AxialAttentionUNet._initialize_attention(module)


class AxialAttentionResEncUNet(_AxialAttentionUNet):
    """``ResidualEncoderUNet`` (nnU-Net's ResEnc presets) with axial attention in the deepest decoder stages.

    ``encoder_kwargs`` are :class:`ResidualEncoder`'s (``n_stages``, ``features_per_stage``, ``conv_op``,
    ``kernel_sizes``, ``strides``, ``n_blocks_per_stage``, ``conv_bias``, ``norm_op``, ..., ``block``), as in
    the plans.
    """

    def __init__(self, input_channels: int, num_classes: int, n_conv_per_stage_decoder,
                 deep_supervision: bool = False, attention_stages: int = 2, attention_heads: int = 4,
                 attention_gates: bool = False, **encoder_kwargs):
        super().__init__()
        self.key_to_encoder = "encoder.stages"
        self.key_to_stem = "encoder.stem"
        self.keys_to_in_proj = ("encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0")
        self.encoder = ResidualEncoder(input_channels, return_skips=True, disable_default_stem=False,
                                       **encoder_kwargs)
        self._build_decoder(num_classes, n_conv_per_stage_decoder, deep_supervision, False,
                            attention_stages, attention_heads, attention_gates)

    @staticmethod
    def initialize(module):
        InitWeights_He(1e-2)(module)
        init_last_bn_before_add_to_0(module)
        _AxialAttentionUNet._initialize_attention(module)
