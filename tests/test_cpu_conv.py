"""The CPU conv plans compute the plain convolution: same outputs and gradients, to float32 rounding."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cawbench import winograd
from cawbench.config import ConfigError
from cawbench.cpu_conv import (
    PLAIN,
    WINOGRAD2,
    WINOGRAD4,
    ConvPlan,
    TunedConv2d,
    _TunedConvFunction,
    plain_convs,
    plan_for,
    swap_convs,
    weight_grad_transposed,
)
from cawbench.engine import Trainer

DIRECT_PLANS = itertools.product(("nchw", "nhwc"), ("native", "nhwc", "transposed"))
PLANS = [ConvPlan(f, w) for f, w in DIRECT_PLANS] + [WINOGRAD2, WINOGRAD4, ConvPlan("nchw", "winograd4")]
SHAPES = [  # (in, out, kernel, stride, padding, input size)
    (3, 5, 3, 1, 1, 8),  # Winograd: 4x4 or 2x2 tiles
    (5, 3, 3, 1, 1, 4),  # Winograd F(4x4): one tile
    (6, 4, 3, 1, 1, 2),  # Winograd F(2x2) only: one tile
    (4, 6, 3, 2, 1, 9),  # a stride that leaves a spare padded row
    (4, 6, 3, 2, 1, 8),
    (2, 3, 5, 1, 2, 7),
    (3, 4, 3, 1, 0, 6),
    (3, 4, 3, 2, 0, 8),  # no padding, a spare row to cut
]


def test_transposed_weight_gradient_matches_a_hand_computation():
    # x = [[1, 2], [3, 4]] zero-padded by 1, dy = ones on the 2x2 output: dW[a, b] sums the 2x2 window of the
    # padded input starting at (a, b).
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    grad = weight_grad_transposed(x, torch.ones(1, 1, 2, 2), (3, 3), (1, 1), (1, 1))
    assert torch.equal(
        grad, torch.tensor([[1.0, 3.0, 2.0], [4.0, 10.0, 6.0], [3.0, 7.0, 4.0]]).view(1, 1, 3, 3)
    )
    # Stride 2 on a 3x3 input, padding 1: outputs at h, w in {0, 1}, dW[a, b] = sum of x_pad[2h + a, 2w + b].
    x = torch.arange(1.0, 10.0).view(1, 1, 3, 3)
    grad = weight_grad_transposed(x, torch.ones(1, 1, 2, 2), (3, 3), (2, 2), (1, 1))
    # a = 1 takes padded rows 1 and 3 (x's rows 1 2 3 and 7 8 9); b = 0 takes padded columns 0 (padding) and
    # 2 (x's middle column), b = 1 columns 1 and 3 (x's outer columns), b = 2 columns 2 and 4 (padding).
    assert torch.equal(grad[0, 0, 1], torch.tensor([2.0 + 8, 1 + 3 + 7 + 9, 2 + 8]))
    # a = 0 takes padded rows 0 (padding) and 2 (x's middle row, 4 5 6).
    assert torch.equal(grad[0, 0, 0], torch.tensor([5.0, 4 + 6, 5]))


def _usable(plan: ConvPlan, shape: tuple) -> bool:
    c_in, c_out, kernel, stride, padding, size = shape
    return plan.usable_for(nn.Conv2d(c_in, c_out, kernel, stride, padding), (size, size))


def test_winograd_matches_hand_computations():
    # x = [[1, 2], [3, 4]] (one image, one channel, NHWC), zero-padded by 1, F(2x2). All-ones kernel: every
    # output is the sum of the whole input, 10. Kernel with 1 at the centre: the output is x.
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 2, 1)
    centre = torch.zeros(1, 1, 3, 3)
    centre[0, 0, 1, 1] = 1.0
    assert torch.equal(winograd.conv3x3(x, torch.ones(1, 1, 3, 3), m=2), torch.full((1, 2, 2, 1), 10.0))
    assert torch.equal(winograd.conv3x3(x, centre, torch.tensor([0.5]), m=2), x + 0.5)
    # Weight gradient with dy = ones: dW[a, b] sums the 2x2 window of the padded input starting at (a, b).
    grad = winograd.weight_grad3x3(x, torch.ones(1, 2, 2, 1), m=2)
    assert torch.equal(
        grad, torch.tensor([[1.0, 3.0, 2.0], [4.0, 10.0, 6.0], [3.0, 7.0, 4.0]]).view(1, 1, 3, 3)
    )
    # F(4x4) on a 4x4 map of ones: the all-ones kernel counts the in-map neighbours (corners 4, edges 6,
    # inside 9); the centre kernel gives x back; with dy = ones, dW[a, b] counts the output positions whose
    # tap (a, b) lands in the map: 3, 4, 3 along each axis.
    ones = torch.ones(1, 4, 4, 1)
    neighbours = torch.tensor([[4.0, 6, 6, 4], [6, 9, 9, 6], [6, 9, 9, 6], [4, 6, 6, 4]]).view(1, 4, 4, 1)
    assert torch.allclose(winograd.conv3x3(ones, torch.ones(1, 1, 3, 3), m=4), neighbours, atol=1e-5)
    assert torch.allclose(winograd.conv3x3(ones, centre, m=4), ones, atol=1e-6)
    taps = torch.tensor([3.0, 4.0, 3.0])
    grad = winograd.weight_grad3x3(ones, torch.ones(1, 4, 4, 1), m=4)
    assert torch.allclose(grad, (taps.view(3, 1) * taps.view(1, 3)).view(1, 1, 3, 3), atol=1e-5)


def test_winograd_plan_refuses_convs_it_cannot_compute():
    conv = nn.Conv2d(4, 4, 3, stride=2, padding=1)
    same = nn.Conv2d(4, 4, 3, 1, 1)
    assert not WINOGRAD2.usable_for(conv, (8, 8)) and not WINOGRAD2.usable_for(same, (7, 8))
    assert WINOGRAD2.usable_for(same, (6, 6)) and not WINOGRAD4.usable_for(
        same, (6, 6)
    )  # 4 does not divide 6
    assert not ConvPlan("nchw", "winograd3").usable_for(same, (6, 6))  # no F(3x3) here
    with pytest.raises(ValueError, match="winograd.*cannot compute"):
        _TunedConvFunction.apply(torch.randn(1, 4, 8, 8), conv.weight, None, conv, WINOGRAD4)


@pytest.mark.parametrize(
    ("plan", "shape"),
    [(p, s) for p in PLANS for s in SHAPES if _usable(p, s)],
    ids=lambda v: f"{v.forward}-{v.weight_grad}" if isinstance(v, ConvPlan) else str(v),
)
@pytest.mark.parametrize("bias", [False, True])
def test_every_plan_gives_the_plain_outputs_and_gradients(plan, shape, bias):
    c_in, c_out, kernel, stride, padding, size = shape
    gen = torch.Generator().manual_seed(sum(shape))
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=bias)
    x = torch.randn(3, c_in, size, size, generator=gen, requires_grad=True)
    y_ref = conv(x)
    dy = torch.randn(y_ref.shape, generator=gen)
    ref = torch.autograd.grad(y_ref, [x, *conv.parameters()], dy)
    y = _TunedConvFunction.apply(x, conv.weight, conv.bias, conv, plan)
    got = torch.autograd.grad(y, [x, *conv.parameters()], dy)
    # F(4x4)'s transforms hold 4s, 5s and 8s: its rounding reaches ~1e-5 of the largest entry.
    tol = 1e-4 if "winograd4" in (plan.forward, plan.weight_grad) else 1e-5
    assert y.is_contiguous() and torch.allclose(y, y_ref, rtol=tol, atol=tol * y_ref.abs().max().item())
    for g, r in zip(got, ref, strict=True):
        assert g.shape == r.shape and g.is_contiguous()
        assert torch.allclose(g, r, rtol=tol, atol=tol * r.abs().max().item())


def test_plan_rule_follows_the_measured_shapes():
    def plan(c_in, size, stride):
        return plan_for(nn.Conv2d(c_in, c_in, 3, stride, 1), (size, size))

    assert plan(200, 32, 2) == ConvPlan("nhwc", "nhwc")  # big maps: NHWC both ways
    assert plan(400, 16, 2) == ConvPlan("nchw", "native")
    assert plan(800, 8, 2) == ConvPlan("nchw", "transposed")  # few output positions: a forward conv
    for channels, size in ((100, 32), (200, 16), (400, 8), (800, 4), (320, 4)):
        assert plan(channels, size, 1) == WINOGRAD4  # stride 1, 200+ channels or 32x32 maps, sides 4k
    assert plan(160, 8, 1) == PLAIN and plan(100, 16, 1) == PLAIN  # Winograd did not pay there
    assert plan(200, 14, 1) == WINOGRAD2 and plan(100, 14, 1) == PLAIN  # F(2x2): 200+ channels only
    assert plan(1, 32, 1) == PLAIN and plan(80, 32, 1) == PLAIN  # the stem, width 0.4: nothing helped
    grouped = nn.Conv2d(100, 100, 3, 1, 1, groups=10)
    assert plan_for(grouped, (32, 32)) == PLAIN

    def direct(c_in, size, stride):  # train.cpu_conv=direct: the rule without Winograd
        return plan_for(nn.Conv2d(c_in, c_in, 3, stride, 1), (size, size), winograd_ok=False)

    assert direct(800, 4, 1) == ConvPlan("nchw", "transposed") and direct(320, 4, 1) == PLAIN
    assert direct(100, 32, 1) == ConvPlan("nhwc", "nhwc") and direct(160, 8, 1) == PLAIN
    assert direct(200, 16, 1) == ConvPlan("nchw", "nhwc") and direct(400, 8, 1) == ConvPlan("nchw", "nhwc")


def test_swap_keeps_parameters_and_state_dict_and_skips_other_convs():
    net = nn.Sequential(nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.Conv2d(128, 8, 3, padding="same"))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    assert swap_convs(net) == 1  # padding="same" is left plain
    assert type(net[0]) is TunedConv2d and type(net[2]) is nn.Conv2d and net[0].winograd_ok
    direct = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1))
    swap_convs(direct, winograd_ok=False)  # train.cpu_conv=direct
    with torch.no_grad():
        assert direct[0](torch.randn(1, 256, 8, 8)).grad_fn is None
    assert plan_for(direct[0], (8, 8), direct[0].winograd_ok) == ConvPlan("nchw", "nhwc")
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    x = torch.randn(2, 128, 32, 32)
    plain = F.conv2d(x, net[0].weight, net[0].bias, padding=1)
    with torch.no_grad():  # the eval forward takes the plan too (F(4x4) here: ~1e-5 rounding)
        assert torch.allclose(net[0](x), plain, atol=1e-4)
    assert net[0](x).grad_fn is not None and "TunedConv" in type(net[0](x).grad_fn).__name__


def test_engine_tunes_cpu_convs_by_default_with_the_plain_updates(tiny_config):
    # SGD: updates linear in the gradients, so rounding differences stay rounding-sized (Adam's first steps
    # are about lr * sign(g), which turns a rounding difference in a tiny gradient into a full step).
    overrides = {"model__width": 1.0, "data__image_size": 32, "optim__name": "sgd", "data__subset": 64,
                 "train__batch_size": 32}  # fmt: skip

    def trained(mode):
        trainer = Trainer(tiny_config("caw_conv", train__cpu_conv=mode, **overrides), write_result=False)
        trainer.train_epoch(0)
        return trainer

    tuned, plain = trained("tuned"), trained("plain")
    convs = [m for m in tuned.net.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is TunedConv2d for m in convs)
    plans = set()
    hooks = [m.register_forward_hook(lambda m, i, o: plans.add(plan_for(m, i[0].shape[-2:])))
             for m in convs]  # fmt: skip
    tuned.net.layer_scores(torch.randn(2, 1, 32, 32))
    [h.remove() for h in hooks]
    assert {p.forward for p in plans} == {"nchw", "nhwc", "winograd4"}  # every kind of plan but F(2x2)
    assert {p.weight_grad for p in plans} == {"native", "nhwc", "transposed", "winograd4"}
    assert all(type(m) is nn.Conv2d for m in plain.net.modules() if isinstance(m, nn.Conv2d))
    assert tuned.cfg.config_hash() == plain.cfg.config_hash()  # same maths: the switch leaves the hash
    for (name, a), (_, b) in zip(tuned.net.named_parameters(), plain.net.named_parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), name
    again = trained("tuned")  # fixed rule, no run-time timing: bit-for-bit reproducible
    for a, b in zip(tuned.net.parameters(), again.net.parameters(), strict=True):
        assert torch.equal(a, b)


def test_bad_cpu_conv_mode_names_the_choices(tiny_config):
    with pytest.raises(ConfigError, match=r"train.cpu_conv='fast'.*tuned, direct, plain"):
        tiny_config(train__cpu_conv="fast")


def test_plain_convs_counts_the_direct_convolutions_flops():
    from torch.utils.flop_counter import FlopCounterMode

    conv = nn.Conv2d(200, 200, 3, padding=1, bias=False)
    swap_convs(conv)
    x = torch.randn(32, 200, 4, 4)

    def flops() -> int:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            conv(x)
        return counter.get_total_flops()

    assert plan_for(conv, (4, 4)) == WINOGRAD4
    direct = 2 * (32 * 4 * 4) * 200 * 200 * 9  # 2 FLOPs per multiply-add, one per output and tap
    winograd_flops = flops()  # what ran: 36 products of [32 x 200] @ [200 x 200], plus the transforms
    with plain_convs():
        assert flops() == direct
    assert winograd_flops < direct and flops() == winograd_flops  # and the switch is undone on exit
