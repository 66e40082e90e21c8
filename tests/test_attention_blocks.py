"""Building blocks: relative position bias, axial self-attention, attention gate (hand-computed values)."""

import math

import pytest
import torch
from torch import nn

from nnunet_ext.architectures import AttentionGate, AxialSelfAttention, RelativePositionBias, SequentialAxialAttention

LN2 = math.log(2)


def hand_set_bias(bias: RelativePositionBias, zero: bool = False) -> None:
    """One hidden unit h = SiLU(c) of the log-offset c, bias = h (or 0): b(d) = SiLU(sign(d)·log(1 + |d|))."""
    mlp = bias.mlp
    with torch.no_grad():
        for layer in (mlp[0], mlp[2]):
            layer.weight.zero_()
        mlp[0].bias.zero_()
        mlp[0].weight[0, 0] = 1.0
        if not zero:
            mlp[2].weight[:, 0] = 1.0


def mean_layer(axis: int, dim: int = 3, positional: bool = False) -> AxialSelfAttention:
    """2 channels, 1 head: q = k = 0 (one channel each) and v = x, so the attention weights are softmax(bias)."""
    layer = AxialSelfAttention(nn.Conv3d if dim == 3 else nn.Conv2d, channels=2, heads=1, axis=axis)
    with torch.no_grad():
        layer.qkv.weight.zero_()
        layer.qkv.bias.zero_()
        layer.qkv.weight[2:] = torch.eye(2)  # rows 0, 1: q, k; rows 2, 3: v
    hand_set_bias(layer.position_bias, zero=not positional)
    return layer


# Channel 0 of x (Z = 1, Y = 3, X = 2) is [[1, 2], [3, 4], [5, 12]], channel 1 is ten times it.
GRID = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 12.0]])
X = torch.stack([GRID, 10 * GRID]).reshape(1, 2, 1, 3, 2)


@pytest.mark.parametrize("axis, expected", [
    (0, [[1, 2], [3, 4], [5, 12]]),  # Z has length 1: each voxel attends to itself
    (1, [[3, 6], [3, 6], [3, 6]]),  # column means 3 and 6
    (2, [[1.5, 1.5], [3.5, 3.5], [8.5, 8.5]]),  # row means
])
def test_uniform_attention_gives_the_mean_along_its_axis(axis, expected):
    expected = torch.tensor(expected, dtype=torch.float32)
    torch.testing.assert_close(mean_layer(axis)(X), torch.stack([expected, 10 * expected]).reshape(X.shape))


def test_position_bias_weights_the_values():
    # Length 2, values [1, 2]. Row 0 logits [b(0), b(1)] = [0, 2/3 ln 2]: weights [1, 2^(2/3)] / (1 + 2^(2/3))
    # = [0.38649, 0.61351], attended 0.38649 + 2·0.61351 = 1.61351. Row 1 logits [-1/3 ln 2, 0]: weights
    # [2^(-1/3), 1] / (1 + 2^(-1/3)) = [0.44250, 0.55750], attended 1.55750.
    layer = mean_layer(axis=0, dim=2, positional=True)
    x = torch.tensor([1.0, 2.0]).reshape(1, 1, 2, 1).repeat(1, 2, 1, 1)
    expected = torch.tensor([1.61351, 1.55750]).reshape(1, 1, 2, 1).repeat(1, 2, 1, 1)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


def test_block_adds_the_projected_attention_of_every_axis_in_turn():
    block = SequentialAxialAttention(nn.Conv3d, channels=2, heads=1)
    assert [a.axis for a in block.axes] == [0, 1, 2]  # Z, Y, X in turn
    for axis in range(3):
        block.axes[axis] = mean_layer(axis)
    with torch.no_grad():
        block.out.weight.copy_(torch.eye(2))
    # Z keeps x, Y gives the column means [3, 6] in every row, X then their mean 4.5 = (1+2+3+4+5+12)/6.
    torch.testing.assert_close(block(X), X + torch.tensor([4.5, 45.0]).reshape(1, 2, 1, 1, 1))


@pytest.mark.parametrize("conv_op, norm_op, size", [
    (nn.Conv3d, nn.InstanceNorm3d, (5, 7, 3)),
    (nn.Conv2d, nn.InstanceNorm2d, (9, 1)),
])
def test_new_blocks_are_the_identity_on_odd_sizes(conv_op, norm_op, size):
    block = SequentialAxialAttention(conv_op, channels=8, heads=4, norm_op=norm_op, norm_op_kwargs={"affine": True})
    x = torch.randn(2, 8, *size)
    assert torch.equal(block(x), x)
    with torch.no_grad():
        block.out.weight.normal_()
    y = block(x)
    assert y.shape == x.shape and not torch.allclose(y, x)


def test_output_projection_learns_from_the_identity_and_then_every_weight_does():
    block = SequentialAxialAttention(nn.Conv3d, channels=4, heads=2, norm_op=nn.InstanceNorm3d,
                                     norm_op_kwargs={"affine": True})
    x = torch.randn(2, 4, 3, 5, 2)
    (block(x) ** 2).sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None, name
        assert (p.grad.abs().sum() > 0) == name.startswith("out."), name
    with torch.no_grad():
        for p in block.parameters():
            p -= 0.1 * p.grad
            p.grad = None
    (block(x) ** 2).sum().backward()
    assert all(p.grad.abs().sum() > 0 for p in block.parameters())


def test_attention_block_estimates_its_activation_memory():
    # Per axis (4·C + heads·L)·voxels, C = 8, heads = 4, 30 voxels: (32 + 8)·30, (32 + 12)·30, (32 + 20)·30
    # = 1200, 1320, 1560; the block keeps its normalised input and the 3 axes' outputs, 4·8·30 = 960.
    kept = SequentialAxialAttention(nn.Conv3d, channels=8, heads=4, recompute=False)
    assert kept.compute_conv_feature_map_size((2, 3, 5)) == 960 + 1200 + 1320 + 1560
    recomputed = SequentialAxialAttention(nn.Conv3d, channels=8, heads=4)  # one axis' activations at a time
    assert recomputed.compute_conv_feature_map_size((2, 3, 5)) == 960 + 1560


def test_recomputation_gives_the_same_gradients():
    kept = SequentialAxialAttention(nn.Conv3d, channels=4, heads=2, norm_op=nn.InstanceNorm3d,
                                    norm_op_kwargs={"affine": True}, recompute=False)
    recomputed = SequentialAxialAttention(nn.Conv3d, channels=4, heads=2, norm_op=nn.InstanceNorm3d,
                                          norm_op_kwargs={"affine": True})
    with torch.no_grad():
        kept.out.weight.normal_()
    recomputed.load_state_dict(kept.state_dict())
    x = torch.randn(2, 4, 3, 5, 2)
    for block in (kept, recomputed):
        (block(x) ** 2).sum().backward()
    for (name, a), b in zip(kept.named_parameters(), recomputed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_attention_blocks_reject_bad_shapes():
    with pytest.raises(ValueError, match=r"multiple of 2 x heads"):
        AxialSelfAttention(nn.Conv3d, channels=12, heads=4, axis=0)
    with pytest.raises(ValueError, match="not a spatial axis"):
        AxialSelfAttention(nn.Conv2d, channels=4, heads=2, axis=2)
    with pytest.raises(ValueError, match=r"expected \(B, 4, S, S, S\)"):
        AxialSelfAttention(nn.Conv3d, channels=4, heads=2, axis=0)(torch.zeros(1, 3, 2, 2, 2))


def hand_gate() -> AttentionGate:
    """1 skip channel, 1 gating channel, 1 intermediate: θ = mean over each 2x2 block, φ = g, ψ = identity."""
    gate = AttentionGate(nn.Conv2d, skip_channels=1, gating_channels=1, stride=(2, 2), inter_channels=1)
    with torch.no_grad():
        gate.theta.weight.fill_(0.25)
        gate.phi.weight.fill_(1.0)
        gate.phi.bias.zero_()
        gate.psi.weight.fill_(1.0)
        gate.psi.bias.zero_()
    return gate


@pytest.mark.parametrize("g, alpha", [
    (-1.0, 0.5),  # mean(skip) = 1: σ(ReLU(1 - 1)) = σ(0) = 0.5
    (1.0, 1 / (1 + math.exp(-2))),  # σ(ReLU(1 + 1)) = σ(2) = 0.88080
    (-3.0, 0.5),  # ReLU(1 - 3) = 0
])
def test_gate_scales_the_skip_by_the_sigmoid_map(g, alpha):
    gate = hand_gate()
    skip = torch.tensor([[1.0, 2.0], [3.0, -2.0]]).reshape(1, 1, 2, 2)
    gating = torch.tensor(g).reshape(1, 1, 1, 1)
    torch.testing.assert_close(gate.attention_map(skip, gating), torch.full((1, 1, 2, 2), alpha))
    torch.testing.assert_close(gate(skip, gating), alpha * skip)


def test_gate_upsamples_an_anisotropic_map_and_passes_gradients():
    gate = AttentionGate(nn.Conv3d, skip_channels=6, gating_channels=10, stride=(1, 2, 2))
    assert gate.inter_channels == 3
    skip, gating = torch.randn(2, 6, 3, 10, 6), torch.randn(2, 10, 3, 5, 3)
    out = gate(skip, gating)
    assert out.shape == skip.shape
    out.sum().backward()
    assert all(p.grad.abs().sum() > 0 for p in gate.parameters())
    # coarse 3·5·3 = 45, fine 180: (3·3 + 1)·45 + (1 + 6)·180 = 450 + 1260
    assert gate.compute_conv_feature_map_size((3, 10, 6)) == 1710
    with pytest.raises(ValueError, match="stride"):
        gate(skip, torch.randn(2, 10, 3, 4, 3))
