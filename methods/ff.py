"""FF: Hinton's Forward-Forward algorithm on a fully connected net (spec baselines.md §1, §6.1, §8).

Each hidden layer of the ``mlp`` plan (4 x 2000 ReLU by default; ``model.hidden`` overrides) is a local
unit: it length-normalises its detached input (RMS by default, ``params.norm=l2``; never centred),
applies linear + ReLU and scores the result with the goodness G = mean of h² (``params.goodness=sum``).
Its loss over a positive (image + true label) and a negative (same image + wrong label) is

    softplus(θ − G⁺) + softplus(G⁻ − θ),  averaged over the batch,

with θ = ``params.theta`` (default 2 for mean goodness, the layer width for sum goodness, i.e. loeweX's
Σh² − d). The label is written into the first K values of the flattened (normalised) image, scaled by
``params.label_value``: ``max`` = each image's own maximum (mohammadpz writes x.max(); we take it per
image) or ``constant`` = ``params.label_constant``. Negatives take a wrong label uniformly
(``params.negatives=uniform``; mohammadpz's shuffled labels, which are right 10 % of the time, are not
offered) or a hard one drawn by the net's own label-sweep goodness (``hard``: K extra forward passes
per training batch). Prediction: embed every label, sum the goodness over all layers but the first and
take the argmax (readout ``sum`` with ``readout.sum_range=[1,-1]``: K passes per image). Switch
``params.softmax_head=true`` adds Hinton's cheaper one-pass rule: a linear softmax on the normalised
activities of all but the first layer, computed on a neutral label (0.1 in every label slot for K = 10)
and trained by its own CE; read it with ``readout.name=last readout.sum_range=[1,-2]``.

Further switches, all off by default: ``params.peer_norm`` (loeweX's peer normalisation, 0.03 there),
``params.relu_grad=full`` and ``params.init=normal`` (loeweX's ReLU backward and weight init).

Paper recipe (``recipe=paper``): MNIST 4 x 2000, 60 epochs (Hinton: 1.36 % test error, i.e. 98.64 %),
with loeweX's optimiser from their reproduction of that number (SGD momentum 0.9, lr 1e-3, weight decay
3e-4, batch 100, linear cooldown over the second half) and their sum goodness with θ = width, RMS
normalisation, peer normalisation 0.03, full-gradient ReLU and N(0, 1/d) init; 10,000 training images
held out for validation. The same recipe is used for Fashion-MNIST and, flattened (3072 inputs),
CIFAR-10/100. Provenance caveat for reports: the comparison table's FF row (MNIST 98.69, CIFAR-10 59.00)
does not come from an MLP (98.69 is most likely Hinton's recurrent net, 59.00 his locally connected
CIFAR-10 net); the 4 x 2000 MLP anchor is 98.64 on MNIST, and there is no MLP anchor on CIFAR-10. Label
the harness's FF row as an MLP result. BP twin: ``method=backprop recipe=paper-ff``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from cawbench.config import ConfigError
from cawbench.method import register_method
from cawbench.methods._ff_common import FFFamilyConfig, FFFamilyMethod, ff_threshold_loss, mlp_twin

#: Overrides shared by the FF paper recipes (loeweX's reproduction of Hinton's MNIST result).
FF_PAPER_COMMON: dict[str, Any] = {
    "model.arch": "mlp",
    "model.hidden": (2000, 2000, 2000, 2000),
    "train.epochs": 60,
    "train.batch_size": 100,
    "optim.name": "sgd",
    "optim.lr": 1e-3,
    "optim.momentum": 0.9,
    "optim.weight_decay": 3e-4,
    "optim.scheduler": "linear_cooldown",
    "params.goodness": "sum",
    "params.norm": "rms",
    "params.peer_norm": 0.03,
    "params.relu_grad": "full",
    "params.init": "normal",
}
FF_PAPER: dict[str, dict[str, Any]] = {
    "mnist": {**FF_PAPER_COMMON, "data.val_size": 10_000},
    "fashion-mnist": {**FF_PAPER_COMMON, "data.val_size": 10_000},
    "cifar10": {**FF_PAPER_COMMON, "data.val_size": 5_000},
    "cifar100": {**FF_PAPER_COMMON, "data.val_size": 5_000},
}


@dataclass(frozen=True)
class FFConfig(FFFamilyConfig):
    theta: float | None = None  # None: 2.0 for mean goodness, the layer width for sum goodness

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.theta is not None and not self.theta > 0:
            raise ConfigError(f"params.theta must be > 0 or null, got {self.theta!r}")

    def threshold(self, width: int) -> float:
        if self.theta is not None:
            return self.theta
        return 2.0 if self.goodness == "mean" else float(width)


@register_method("ff")
class ForwardForward(FFFamilyMethod):
    description = "Forward-Forward (Hinton 2022): MLP, goodness threshold loss, label sweep over K passes"
    Config: ClassVar[type] = FFConfig
    defaults: ClassVar[dict[str, Any]] = {**FFFamilyMethod.defaults, "optim.lr": 1e-3}
    recipes: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {"paper": FF_PAPER}
    report_label = "FF"
    report_order = 60
    bp_twin_recipes: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {"paper-ff": mlp_twin(FF_PAPER)}
    bp_twin = "paper-ff"
    smoke_overrides: ClassVar[dict[str, Any]] = {"model.hidden": (32, 32), "train.batch_size": 64}

    def pair_loss(self, g_pos: torch.Tensor, g_neg: torch.Tensor, width: int) -> dict[str, torch.Tensor]:
        return {"ff": ff_threshold_loss(g_pos, g_neg, self.params.threshold(width))}
