"""A small dropout-free layer-local method for engine tests (registered only inside a test, then removed).

Every plan layer is [2x2 avg pool] -> Conv (the plan's kernel) -> ReLU; class scores are the GAP features through a fixed random projection
(so a unit's loss reaches only its own conv); the InstanceNorm output is passed on. Deterministic: no
dropout, so two schedules of the same updates give the same parameters bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from cawbench.archs import LayerSpec, build_plan
from cawbench.method import (
    LocalNetwork,
    LocalUnit,
    Method,
    StepContext,
    UnitOutput,
    register_method,
    unregister_method,
)

NAME = "_test_local_conv"


class ConvUnit(LocalUnit):
    def __init__(self, spec: LayerSpec, num_classes: int) -> None:
        super().__init__()
        self.spec = spec
        self.conv = nn.Conv2d(spec.in_channels, spec.out_channels, spec.kernel, spec.stride, spec.padding,
                              bias=False)  # fmt: skip
        gen = torch.Generator().manual_seed(spec.index)
        self.register_buffer("proj", torch.randn(spec.out_channels, num_classes, generator=gen))

    def forward(self, x: torch.Tensor) -> UnitOutput:
        if self.spec.pool_before == "avg":
            x = F.avg_pool2d(x, 2, 2, ceil_mode=True)
        y = F.relu(self.conv(x))
        return UnitOutput(F.instance_norm(y), y.mean((2, 3)) @ self.proj)

    def local_losses(
        self, out: UnitOutput, target: torch.Tensor, ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        return {"ce": F.cross_entropy(out.scores, target)}


class LocalConv(Method):
    description = "test-only dropout-free local conv units on the architecture plan"
    defaults = {"optim.name": "adamw", "optim.lr": 0.01, "optim.grad_clip": 1.0}

    def build(self) -> LocalNetwork:
        plan = build_plan(self.cfg.model, self.info)
        return LocalNetwork([ConvUnit(s, self.info.num_classes) for s in plan.layers], plan)


@contextlib.contextmanager
def registered() -> Iterator[str]:
    """Register the test method for the duration of a test, then remove it from the registry."""
    register_method(NAME)(LocalConv)
    try:
        yield NAME
    finally:
        unregister_method(NAME)
