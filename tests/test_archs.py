"""The ResNet-17 plan of spec 2(c): shapes and channels at every layer, and the BP network that runs it."""

from __future__ import annotations

import pytest
import torch

from cawbench.archs import build_plan
from cawbench.config import ConfigError, ModelConfig
from cawbench.data import DataInfo


def expected_resnet17(p: int, size: int) -> list[tuple]:
    """(conv in ch, conv out ch, out size, passed ch, ops) per layer, written out from the spec's table."""
    s1, s2, s3, s4 = size, (size + 1) // 2, (size + 3) // 4, (size + 7) // 8
    rows = [(1, p, s1, p, "save")]
    rows += [
        (p, p, s1, p, "-"),
        (p, p, s1, p, "add+save"),
        (p, p, s1, p, "-"),
        (p, p, s1, 2 * p, "cat+save_pool"),
    ]
    q = 2 * p
    rows += [
        (q, q, s2, q, "-"),
        (q, q, s2, q, "add+save"),
        (q, q, s2, q, "-"),
        (q, q, s2, 2 * q, "cat+save_pool"),
    ]
    r = 2 * q
    rows += [
        (r, r, s3, r, "-"),
        (r, r, s3, r, "add+save"),
        (r, r, s3, r, "-"),
        (r, r, s3, 2 * r, "cat+save_pool"),
    ]
    t = 2 * r
    rows += [(t, t, s4, t, "-"), (t, t, s4, t, "add+save"), (t, t, s4, t, "-"), (t, t, s4, t, "-")]
    return rows


@pytest.mark.parametrize("size", [28, 32, 64])
@pytest.mark.parametrize("width, planes", [(0.25, 25), (1.0, 100)])
def test_resnet17_plan_matches_the_spec_table(size, width, planes):
    plan = build_plan(ModelConfig(arch="resnet17", width=width), DataInfo("x", 10, 1, size))
    got = [(s.in_channels, s.out_channels, s.out_size, s.passed_channels, "+".join(s.ops_after) or "-")
           for s in plan.layers]  # fmt: skip
    assert got == expected_resnet17(planes, size)
    assert [s.stride for s in plan.layers] == [1] * 5 + [2, 1, 1, 1] * 3


@pytest.mark.parametrize("size", [28, 32, 64])
@pytest.mark.parametrize("width", [0.25, 1.0])
def test_backprop_network_runs_the_plan_with_the_planned_shapes(size, width):
    from cawbench.methods.backprop import BackpropConfig, EndToEndUnit

    plan = build_plan(ModelConfig(arch="resnet17", width=width), DataInfo("x", 10, 1, size))
    unit = EndToEndUnit(plan, 10, BackpropConfig()).eval()
    shapes, shortcut, x = [], None, torch.zeros(2, 1, size, size).normal_()
    for i, layer in enumerate(unit.layers):
        x, shortcut = unit.wiring.apply(i, layer(x), shortcut)
        shapes.append(tuple(x.shape[1:]))
    assert shapes == [(s.passed_channels, s.out_size, s.out_size) for s in plan.layers]
    assert unit(torch.zeros(2, 1, size, size)).scores.shape == (2, 10)


def test_depth_option_sets_blocks_per_stage():
    info = DataInfo("x", 10, 3, 32)
    assert len(build_plan(ModelConfig(depth=1), info)) == 9
    assert len(build_plan(ModelConfig(depth=2), info)) == 17
    assert len(build_plan(ModelConfig(depth=4), info)) == 33


def test_tiny_imagenet_planes_and_chx3():
    tiny = build_plan(ModelConfig(base_planes=200), DataInfo("t", 200, 3, 64))
    assert [s.out_channels for s in tiny.layers[::4]] == [200, 200, 400, 800, 1600]
    assert [s.out_size for s in tiny.layers[::4]] == [64, 64, 32, 16, 8]
    chx3 = build_plan(ModelConfig(base_planes=300), DataInfo("c", 100, 3, 32))
    assert chx3.layers[-1].out_channels == 2400
    n_params = sum(9 * s.in_channels * s.out_channels for s in chx3.layers)
    assert n_params == 275_408_100  # spec 5: conv weights of CHx3 (3 input channels)


def test_resnet17_conv_parameter_count_matches_the_spec():
    plan = build_plan(ModelConfig(), DataInfo("c", 10, 3, 32))
    assert sum(9 * s.in_channels * s.out_channels for s in plan.layers) == 30_602_700


def test_vgg_and_tinycnn_layer_lists():
    info = DataInfo("x", 10, 1, 28)
    vgg = build_plan(ModelConfig(arch="vgg14"), info)
    assert [s.out_channels for s in vgg.layers] == [70, 70] + [140] * 3 + [280] * 3 + [560] * 6
    assert [s.index for s in vgg.layers if s.pool_before] == [2, 5, 8, 11]
    tiny = build_plan(ModelConfig(arch="tinycnn"), info)
    assert [(s.kernel, s.out_channels, s.out_size) for s in tiny.layers] == [
        (5, 100, 28), (5, 200, 14), (3, 400, 7), (3, 400, 7)]  # fmt: skip


def test_impossible_wiring_is_reported():
    from cawbench.archs import finish_plan

    rows = [dict(kind="conv", in_channels=1, out_channels=4, ops_after=("save",)),
            dict(kind="conv", in_channels=4, out_channels=8, ops_after=("add",))]  # fmt: skip
    with pytest.raises(ConfigError, match="layer 1 adds a shortcut of \\(4, 8\\) to an output of \\(8, 8\\)"):
        finish_plan("bad", DataInfo("x", 10, 1, 8), rows)
