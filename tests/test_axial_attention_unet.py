"""Axial-attention U-Nets: shapes, deep supervision, gradients, stock-weight identity, memory estimate, plans."""

import json

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import nn

from nnunet_ext.architectures import AxialAttentionPlainConvUNet, AxialAttentionResEncUNet
from nnunet_ext.plans import derive_attention_plans


def unet_kwargs(dim: int, residual: bool = False) -> dict:
    """3 stages of 4/8/8 features; strides 1, 2, 2 (3D: 1, (1, 2, 2), 2)."""
    conv, norm = (nn.Conv3d, nn.InstanceNorm3d) if dim == 3 else (nn.Conv2d, nn.InstanceNorm2d)
    strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2]] if dim == 3 else [[1, 1], [2, 2], [2, 2]]
    kwargs = dict(n_stages=3, features_per_stage=[4, 8, 8], conv_op=conv, kernel_sizes=[[3] * dim] * 3,
                  strides=strides, n_conv_per_stage_decoder=[1, 1], conv_bias=True, norm_op=norm,
                  norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})
    kwargs["n_blocks_per_stage" if residual else "n_conv_per_stage"] = [1, 2, 2] if residual else 2
    return kwargs


NETWORKS = {False: (PlainConvUNet, AxialAttentionPlainConvUNet), True: (ResidualEncoderUNet, AxialAttentionResEncUNet)}
# Odd feature-map sizes: the bottleneck of (10, 28, 12) in 3D is (5, 7, 3), of (20, 12) in 2D it is (5, 3).
PATCH = {3: (10, 28, 12), 2: (20, 12)}


def attention_net(dim: int, residual: bool = False, deep_supervision: bool = True, **attention):
    """2 heads: the finest decoder stage has 4 channels, queries and keys 2."""
    net = NETWORKS[residual][1](input_channels=2, num_classes=3, deep_supervision=deep_supervision,
                                attention_heads=2, **unet_kwargs(dim, residual), **attention)
    net.apply(net.initialize)
    return net


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("gates", [False, True])
def test_output_shapes_with_and_without_deep_supervision(dim, residual, gates):
    patch = PATCH[dim]
    x = torch.randn(2, 2, *patch)
    outputs = attention_net(dim, residual, attention_gates=gates)(x)
    # One output per decoder stage, finest first: full resolution, then after the first stride.
    half = (patch[0], patch[1] // 2, patch[2] // 2) if dim == 3 else (patch[0] // 2, patch[1] // 2)
    assert [o.shape for o in outputs] == [(2, 3, *patch), (2, 3, *half)]
    net = attention_net(dim, residual, deep_supervision=False, attention_gates=gates)
    assert net.decoder.deep_supervision is False
    assert net(x).shape == (2, 3, *patch)


@pytest.mark.parametrize("residual", [False, True])
def test_every_parameter_learns(residual):
    net = attention_net(3, residual, attention_gates=True)
    x, optimizer = torch.randn(2, 2, *PATCH[3]), torch.optim.SGD(net.parameters(), lr=0.1)

    def backward():
        optimizer.zero_grad()
        sum((o ** 2).mean() for o in net(x)).backward()
        return {n: p.grad for n, p in net.named_parameters()}

    grads = backward()
    assert all(g is not None for g in grads.values())
    # A new attention block is the identity (zero output projection): that projection learns in the first step,
    # the block's other weights after it (as the residual encoder's convs behind its zero-initialised norms).
    silent = {n for n, g in grads.items() if g.abs().sum() == 0}
    projections = {n for n in grads if ".attention." in n and n.split(".")[-2] == "out"}
    assert projections and not projections & silent
    assert {n for n in grads if ".attention." in n} - projections <= silent
    if not residual:
        assert all(".attention." in n for n in silent)
    optimizer.step()
    assert [n for n, g in backward().items() if g.abs().sum() == 0] == []


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("residual", [False, True])
def test_stock_weights_give_the_stock_output(dim, residual):
    stock_class, attention_class = NETWORKS[residual]
    stock = stock_class(input_channels=2, num_classes=3, deep_supervision=True, **unet_kwargs(dim, residual))
    stock.apply(stock.initialize)
    with torch.no_grad():  # "pretrained": every weight away from its initial value
        for p in stock.parameters():
            p.add_(0.1 * torch.randn_like(p))
    net = attention_net(dim, residual, attention_stages=2)
    result = net.load_state_dict(stock.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.startswith("decoder.attention.") for k in result.missing_keys)
    x = torch.randn(2, 2, *PATCH[dim])
    with torch.no_grad():
        for ours, theirs in zip(net.eval()(x), stock.eval()(x)):
            assert torch.equal(ours, theirs)


def test_mixed_precision_forward_and_backward():
    """Under autocast (bfloat16 on CPU here, float16 with nnU-Net's AMP on CUDA) the attention's logit bias
    follows the queries' dtype."""
    net = attention_net(3, attention_gates=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = net(torch.randn(2, 2, *PATCH[3]))
        assert {o.dtype for o in outputs} == {torch.bfloat16}
    sum(o.float().mean() for o in outputs).backward()
    assert all(p.grad is not None for p in net.parameters())


def test_memory_estimate_adds_the_attention_blocks_and_gates():
    kwargs = unet_kwargs(2)
    stock = PlainConvUNet(input_channels=1, num_classes=3, deep_supervision=True, **kwargs)
    # Decoder stage 0 (deepest) runs at 4x6 with 8 channels, stage 1 at 8x12 with 4 channels (input 8x12).
    # Attention in stage 0 with 2 heads, per axis (4·8 + 2·L)·24: Y 960, X 1056, recomputed in backward one at
    # a time; kept: the normalised input and both axes' outputs, 3·8·24 = 576. Sum 1632.
    one_stage = AxialAttentionPlainConvUNet(1, 3, deep_supervision=True, attention_stages=1, attention_heads=2,
                                            **kwargs)
    assert one_stage.compute_conv_feature_map_size((8, 12)) - stock.compute_conv_feature_map_size((8, 12)) == 1632
    # Gates: stage 0 (skip 8 ch at 4x6, inter 4, coarse 2x3): (3·4 + 1)·6 + (1 + 8)·24 = 294;
    # stage 1 (skip 4 ch at 8x12, inter 2, coarse 4x6): (3·2 + 1)·24 + (1 + 4)·96 = 648.
    gated = AxialAttentionPlainConvUNet(1, 3, deep_supervision=True, attention_stages=1, attention_heads=2,
                                        attention_gates=True, **kwargs)
    assert gated.compute_conv_feature_map_size((8, 12)) - stock.compute_conv_feature_map_size((8, 12)) == 1632 + 942


def test_attention_stages_beyond_the_decoder_are_refused():
    with pytest.raises(ValueError, match=r"attention_stages must be in 0\.\.2"):
        attention_net(3, attention_stages=3)


def dotted(cls) -> str:
    return f"{cls.__module__}.{cls.__name__}"


def stock_plans(residual: bool) -> dict:
    kwargs = unet_kwargs(3, residual)
    for key in ("conv_op", "norm_op", "nonlin"):
        kwargs[key] = dotted(kwargs[key])
    kwargs.update(dropout_op=None, dropout_op_kwargs=None)
    architecture = {"network_class_name": dotted(NETWORKS[residual][0]), "arch_kwargs": kwargs,
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    return {"dataset_name": "Dataset042_Hand", "plans_name": "nnUNetPlans", "configurations": {
        "3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "batch_size": 2, "patch_size": list(PATCH[3]),
                       "architecture": architecture}}}


@pytest.mark.parametrize("residual", [False, True])
def test_plans_file_round_trip_through_nnunet(tmp_path, monkeypatch, residual):
    folder = tmp_path / "Dataset042_Hand"
    folder.mkdir()
    (folder / "nnUNetPlans.json").write_text(json.dumps(stock_plans(residual)))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    path = derive_attention_plans(42, stages=1, heads=2, gates=True)
    assert path.name == "nnUNetPlans_axialattn.json"
    config = PlansManager(str(path)).get_configuration("3d_fullres")
    assert config.network_arch_class_name == dotted(NETWORKS[residual][1])
    network = get_network_from_plans(config.network_arch_class_name, config.network_arch_init_kwargs,
                                     config.network_arch_init_kwargs_req_import, 2, 3, deep_supervision=True)
    assert type(network) is NETWORKS[residual][1]
    assert network.decoder.attention_stages == 1 and network.decoder.attention_heads == 2
    assert network.decoder.gates is not None
    assert network(torch.zeros(1, 2, *config.patch_size))[0].shape == (1, 3, *config.patch_size)
    # nnU-Net's planner builds the network by name (without deep supervision) to estimate its memory.
    estimate = ExperimentPlanner.static_estimate_VRAM_usage(
        config.patch_size, 2, 3, config.network_arch_class_name, config.network_arch_init_kwargs,
        config.network_arch_init_kwargs_req_import)
    network.decoder.deep_supervision = False
    assert estimate == network.compute_conv_feature_map_size(config.patch_size)
