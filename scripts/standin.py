"""A CAW-Conv-shaped local-unit stand-in for engine experiments (not a method of the suite).

Per layer of the ResNet-17 plan: Conv3x3 (no bias) -> ReLU -> Dropout -> per-channel mean/max/min pooling
-> softmax(W/T) channel-to-class assignment -> class scores; InstanceNorm output passed on; loss =
label-smoothed CE + entropy + orthogonality (spec 1(b)). Used only to time the engine before the real
caw_conv method exists; `register()` adds it to the registry as ``standin_caw`` on demand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cawbench.archs import LayerSpec, build_plan
from cawbench.method import METHODS, LocalNetwork, LocalUnit, Method, StepContext, UnitOutput, register_method


class StandinUnit(LocalUnit):
    def __init__(self, spec: LayerSpec, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(spec.in_channels, spec.out_channels, 3, spec.stride, 1, bias=False)
        self.assign = nn.Parameter(torch.full((spec.out_channels, num_classes), 0.5))
        self.log_t = nn.Parameter(torch.tensor(math.log(10.0)))
        self.dropout = nn.Dropout(dropout)
        self.decay = 1.0

    def on_epoch_start(self, epoch: int) -> None:
        self.decay = 0.995**epoch

    def forward(self, x: torch.Tensor) -> UnitOutput:
        y = self.dropout(F.relu(self.conv(x)))
        s = 0.94 * y.mean((2, 3)) + 0.06 * y.amax((2, 3)) - 0.05 * y.amin((2, 3))
        t = self.log_t.exp().clamp(0.1, 100) * self.decay
        a = torch.softmax(self.assign / t, dim=1)
        scores = s @ a.to(s.dtype)
        return UnitOutput(F.instance_norm(y), scores, {"a": a})

    def local_losses(
        self, out: UnitOutput, target: torch.Tensor, ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        a = out.extras["a"].float()
        k = a.shape[1]
        entropy = (-a * torch.log(a + 1e-10)).sum() / k
        a_hat = a / (a.norm(dim=0, keepdim=True) + 1e-10)
        gram = a_hat.T @ a_hat
        ortho = ((gram - torch.eye(k, device=a.device)) ** 2).mean() / (k * k * a.shape[0])
        ce = F.cross_entropy(out.scores.float(), target, label_smoothing=0.1)
        return {"ce": ce, "entropy": entropy, "ortho": ortho}


@dataclass(frozen=True)
class StandinConfig:
    dropout: float = 0.1


class StandinCAW(Method):
    description = "CAW-Conv-shaped stand-in for engine timing (scripts/standin.py)"
    Config = StandinConfig
    defaults = {"optim.name": "adamw", "optim.lr": 0.08, "optim.weight_decay": 5e-4, "optim.grad_clip": 1.0,
                "optim.scheduler": "cosine", "optim.lr_min": 0.006, "readout.name": "lcs"}  # fmt: skip
    smoke_overrides = {"model.width": 0.1}

    def build(self) -> LocalNetwork:
        plan = build_plan(self.cfg.model, self.info)
        units = [StandinUnit(s, self.info.num_classes, self.params.dropout) for s in plan.layers]
        stem = nn.LayerNorm(list(self.info.input_shape), elementwise_affine=False)
        return LocalNetwork(units, plan, stem)

    def loss_weights(self, epoch: int) -> dict[str, float]:
        return {"entropy": 1e-2, "ortho": 1e-3 * min(1.0, epoch / 50)}


def register() -> None:
    if "standin_caw" not in METHODS:
        register_method("standin_caw")(StandinCAW)
