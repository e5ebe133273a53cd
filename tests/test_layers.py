"""Shared layers (cawbench.layers): bulk-drawn dropout is dropout; the fused ReLU -> dropout -> pooling node
equals the plain composition (values and gradients) and is what a channel-wise unit runs in CPU training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cawbench.archs import LayerSpec
from cawbench.layers import MEAN_POOL, BulkDropout, ReluDropoutPool, bulk_uniform, channel_pool
from cawbench.method import StepContext
from cawbench.methods._channelwise import ChannelwiseUnit
from cawbench.methods.caw_conv import CAWConvConfig
from cawbench.methods.deeperforward import DeeperForwardConfig

MIX = (0.94, 0.06, 0.05)  # CAW-Conv's mean/max/min pooling


def test_bulk_dropout_is_dropout():
    # Keep rate 1 - p, survivors scaled by 1 / (1 - p), the same mask in backward, reproducible from the seed.
    drop = BulkDropout(0.1).train()
    x = torch.ones(200, 500, requires_grad=True)
    torch.manual_seed(0)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.005  # 100k draws: 5 standard errors is ~0.0047
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.9))
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept) and torch.allclose(x.grad[kept], y[kept])
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # same torch seed, same mask
    assert torch.equal(drop.eval()(x), x)
    with pytest.raises(ValueError, match=r"dropout probability must be in \[0, 1\), got 1"):
        BulkDropout(1)


def test_bulk_uniform_has_the_bits_of_torchs_bitwise_ops_on_the_sfc64_draws():
    # The draws are pinned: the low 23 bits of each 32-bit SFC64 word, seeded by one torch.randint, as the
    # mantissa of a float in [1, 2). Written out with torch's bitwise ops (how it was computed before the
    # bit work moved to NumPy), the same floats bit for bit, and torch's generator advanced alike.
    shape = torch.Size([3, 4, 5, 7])  # odd element count: half of the last 64-bit word is unused
    torch.manual_seed(4)
    seed = int(torch.randint(0, 2**62, (1,)).item())
    after_seed = torch.rand(2)
    words = np.random.SFC64(seed).random_raw((shape.numel() + 1) // 2).view(np.int32)[: shape.numel()]
    expected = torch.from_numpy(words.copy()).bitwise_and_(0x007FFFFF).bitwise_or_(0x3F800000)
    torch.manual_seed(4)
    u = bulk_uniform(shape)
    assert u.shape == shape and u.dtype == torch.float32 and u.is_contiguous()
    assert torch.equal(u.view(torch.int32).flatten(), expected)
    assert torch.equal(torch.rand(2), after_seed)
    assert u.min() >= 1.0 and u.max() < 2.0


def test_bulk_dropout_without_bulk_draws_is_torchs_native_dropout():
    # bulk = False (cawbench bench --unfused-layers): the native kernel, as F.dropout runs on a GPU.
    drop = BulkDropout(0.25).train()
    drop.bulk = False
    x = torch.ones(200, 500, requires_grad=True)
    torch.manual_seed(0)
    y = drop(x)
    torch.manual_seed(0)
    reference = torch.native_dropout(torch.ones(200, 500), 0.25, True)[0]
    assert torch.equal(y, reference)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.007  # 100k draws: 5 standard errors is ~0.0068
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the same mask and scale 1 / (1 - p) in backward
    layer = ReluDropoutPool(0.25, MIX).train()
    layer.dropout.bulk = False  # no bulk draws: no fused node either
    pooled, _ = layer(torch.randn(2, 3, 4, 4, requires_grad=True).clone())  # (its ReLU works in place)
    assert "_FusedReluDropoutPoolBackward" not in graph_nodes(pooled.grad_fn)


def test_fused_node_backward_materialises_no_gradient_for_the_passed_activation():
    # y leaves the node without a graph; autograd would hand backward a full-size zeros tensor for it.
    from cawbench.bench import OpCounter

    z = torch.randn(4, 3, 6, 6, requires_grad=True)
    pooled, y = ReluDropoutPool(0.2, MIX).train()(z.clone())
    assert not y.requires_grad
    counter = OpCounter()
    with counter:
        pooled.sum().backward()
    assert not any("zeros" in op or "fill" in op for op in counter.by_op), counter.by_op
    assert z.grad is not None and torch.equal(z.grad != 0, y != 0)


def _through(layer: ReluDropoutPool, z0: torch.Tensor, grad: torch.Tensor, fused: bool):
    """(pooled, y, dL/dz) of the layer on a copy of z0, fused or as the plain composition, same draws."""
    z = z0.clone().requires_grad_()
    layer.fused = fused
    torch.manual_seed(1)
    pooled, y = layer(z.clone())  # the composition's ReLU works in place: keep z itself a leaf
    (pooled * grad).sum().backward()
    return pooled.detach(), y.detach(), z.grad


def plain_composition(z: torch.Tensor, p: float, coef: tuple[float, float, float]):
    """ReLU -> BulkDropout -> pooling written out with autograd through torch.max/min along a dim."""
    y = BulkDropout(p).train()(F.relu(z))
    flat = y.flatten(2)
    a, b, d = coef
    return a * flat.mean(-1) + b * flat.max(-1).values - d * flat.min(-1).values, y


@pytest.mark.parametrize("coef", [MIX, MEAN_POOL], ids=["mix", "mean"])
@pytest.mark.parametrize("p", [1e-7, 0.3], ids=["nothing-dropped", "p=0.3"])
def test_fused_node_equals_relu_dropout_pooling(coef, p):
    torch.manual_seed(0)
    z0 = torch.randn(6, 4, 5, 5)
    z0[0, 0] = torch.rand(5, 5) + 0.1  # all positive: a live minimum, which passes gradient
    z0[1, 1] = -torch.rand(5, 5)  # all negative: a dead channel, no gradient anywhere
    grad = torch.randn(6, 4)
    layer = ReluDropoutPool(p, coef).train()
    pooled, y, dz = _through(layer, z0, grad, fused=True)
    ref_pooled, ref_y, ref_dz = _through(layer, z0, grad, fused=False)
    assert torch.equal(pooled, ref_pooled) and torch.equal(y, ref_y)  # same draws, same forward values
    torch.testing.assert_close(dz, ref_dz, rtol=1e-5, atol=1e-7)  # the backward only regroups products
    # and both equal the composition written out with autograd's own max/min backward
    z = z0.clone().requires_grad_()
    torch.manual_seed(1)
    plain_pooled, plain_y = plain_composition(z, p, coef)
    (plain_pooled * grad).sum().backward()
    assert torch.equal(plain_y, y)
    torch.testing.assert_close(pooled, plain_pooled.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dz, z.grad, rtol=1e-5, atol=1e-7)
    assert torch.equal(dz != 0, y != 0)  # gradient exactly where z > 0 and kept
    assert not dz[1, 1].any()
    if p < 1e-3:
        assert (y[0, 0] > 0).all() and (y[0, 0] == z0[0, 0] / (1 - p)).all()
    else:
        assert 0.1 < (y == 0).float().mean() - (z0 <= 0).float().mean() < 0.25  # ~0.3 of the live half


def test_layer_without_dropout_or_in_eval_is_relu_then_pooling():
    z = torch.randn(3, 2, 4, 4)
    expected = channel_pool(F.relu(z), MIX)
    for layer in (ReluDropoutPool(0.0, MIX).train(), ReluDropoutPool(0.4, MIX).eval()):
        pooled, y = layer(z.clone())
        assert torch.equal(y, F.relu(z)) and torch.equal(pooled, expected)


def graph_nodes(fn) -> set[str]:
    """Names of every autograd node behind ``fn``."""
    seen, todo = set(), [fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo.extend(next_fn for next_fn, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


def conv_spec(cin: int, cout: int) -> LayerSpec:
    return LayerSpec(index=0, kind="conv", in_channels=cin, out_channels=cout)


@pytest.mark.parametrize("cfg", [CAWConvConfig(), DeeperForwardConfig()], ids=["caw_conv", "deeperforward"])
def test_channelwise_unit_runs_the_fused_node_in_cpu_training_with_the_composition_updates(cfg):
    def run(fused: bool):
        torch.manual_seed(0)
        unit = ChannelwiseUnit(conv_spec(3, 20), 10, cfg).train()
        unit.activity.fused = fused
        x, target = torch.randn(8, 3, 6, 6), torch.randint(0, 10, (8,))
        out = unit(x)
        sum(unit.local_losses(out, target, StepContext(0, 1, 0)).values()).backward()
        return out, unit.conv.weight.grad, "_FusedReluDropoutPoolBackward" in graph_nodes(out.scores.grad_fn)

    out, grad, was_fused = run(True)
    ref, ref_grad, ref_fused = run(False)
    assert was_fused and not ref_fused  # the layer's default on the CPU, with no switch anywhere
    assert torch.equal(out.passed, ref.passed) and torch.equal(out.scores, ref.scores)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 conv output: the composition, no error
        out = ChannelwiseUnit(conv_spec(3, 20), 10, cfg).train()(torch.randn(2, 3, 6, 6))
        assert out.scores.shape == (2, 10)
        assert "_FusedReluDropoutPoolBackward" not in graph_nodes(out.scores.grad_fn)
