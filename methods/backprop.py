"""Backprop reference: the same architecture plan trained end to end with one softmax-CE head.

Every layer of the plan becomes conv (or linear) -> norm -> ReLU (with the plan's pooling and the same
residual add/concat ops as the local methods), followed by global average pooling and a linear head.
It is one local unit holding the whole network, so it runs through the same engine, data pipeline,
evaluation and measurement as the forward-only methods: its "per-layer" score is the head's logits.
Recipe convention (spec baselines.md §5): Adam 1e-3, the twin method's batch size, epochs and data.
``params.norm=rms`` (or ``l2``) replaces the per-layer BN by FF's length normalisation of each layer's
input (no centring), for the BP twins of FF and SymBa; ``params.head_input=flatten`` (a linear head on the
flattened last feature map instead of global average pooling), for those of CaFo and CwComp. Each method
declares its own BP twin recipe (``bp_twin_recipes`` in its file: ``paper-ff``, ``paper-symba``,
``paper-cafo``, ``paper-cwcomp``); they are recipes of this method, listed by ``cawbench list``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cawbench.archs import ArchPlan, Wiring, build_plan
from cawbench.config import ConfigError
from cawbench.layers import BulkDropout, PlanLayer
from cawbench.method import LocalNetwork, LocalUnit, Method, StepContext, UnitOutput, register_method

NORMS = ("batch", "none", "rms", "l2")


@dataclass(frozen=True)
class BackpropConfig:
    norm: str = "batch"  # batch | none: after each layer | rms | l2: length of each layer's input (FF)
    label_smoothing: float = 0.0
    dropout: float = 0.0  # before the head
    # What the linear head sees: "gap" (global average pool) or "flatten" (the whole last feature map,
    # as CaFo's and CwComp's own heads and CwComp's Backprop.py nets do).
    head_input: str = "gap"

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ConfigError(f"params.norm={self.norm!r} is not valid; choose one of: {', '.join(NORMS)}")
        if self.head_input not in ("gap", "flatten"):
            raise ConfigError(
                f"params.head_input={self.head_input!r} is not valid; choose one of: gap, flatten"
            )
        if not 0 <= self.label_smoothing < 1 or not 0 <= self.dropout < 1:
            raise ConfigError("params.label_smoothing and params.dropout must be in [0, 1)")


class EndToEndUnit(LocalUnit):
    """The whole network and its head as one unit: the loss reaches every layer."""

    def __init__(self, plan: ArchPlan, num_classes: int, cfg: BackpropConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(PlanLayer(s, cfg.norm) for s in plan.layers)
        self.wiring = Wiring(plan)
        self.dropout = BulkDropout(cfg.dropout)
        last = plan.layers[-1]
        self.flatten_head = cfg.head_input == "flatten"
        spatial = last.out_size**2 if self.flatten_head and last.kind == "conv" else 1
        self.head = nn.Linear(last.passed_channels * spatial, num_classes)
        self.label_smoothing = cfg.label_smoothing

    def forward(self, x: torch.Tensor) -> UnitOutput:
        shortcut = None
        for i, layer in enumerate(self.layers):
            x, shortcut = self.wiring.apply(i, layer(x), shortcut)
        features = x
        if x.dim() == 4:
            features = x.flatten(1) if self.flatten_head else x.mean(dim=(2, 3))
        logits = self.head(self.dropout(features))
        return UnitOutput(passed=logits, scores=logits)

    def local_losses(
        self, out: UnitOutput, target: torch.Tensor, ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        return {"ce": F.cross_entropy(out.scores, target, label_smoothing=self.label_smoothing)}


@register_method("backprop")
class Backprop(Method):
    description = "end-to-end backprop reference on the same architecture (+ GAP and a linear CE head)"
    report_label = "Backprop"
    paper_names = ("Backprop", "BP")
    report_order = 1000  # after every other configuration
    end_to_end = True  # the reference every other method is compared with
    Config = BackpropConfig
    defaults = {"optim.name": "adam", "optim.lr": 1e-3, "readout.name": "last"}
    # The ResNet-17 twin of CAW-Conv and DeeperForward: same data, batch, epochs and resize; Adam 1e-3
    # (baselines.md §5). The other methods' BP twins (paper-ff, paper-symba, paper-cafo, paper-cwcomp) are
    # declared by those methods' files (``bp_twin_recipes``) and join these recipes when they register.
    recipes = {
        "paper": {
            ds: {
                "model.arch": "resnet17",
                "train.epochs": 150,
                "train.batch_size": 128,
                "data.image_size": size,
                "data.val_size": val,
            }
            for ds, size, val in (
                ("mnist", 32, 10_000),
                ("fashion-mnist", 32, 10_000),
                ("cifar10", None, 5_000),
                ("cifar100", None, 5_000),
                ("tiny-imagenet", None, 0.1),
            )
        },  # fmt: skip
    }

    def build(self) -> LocalNetwork:
        plan = build_plan(self.cfg.model, self.info)
        return LocalNetwork([EndToEndUnit(plan, self.info.num_classes, self.params)])
