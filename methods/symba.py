"""SymBa (Lee & Song 2023): FF with a symmetric pair loss and an intrinsic class pattern (spec §2, §6.1, §8).

Everything but the loss and the label embedding is FF's (``methods/_ff_common.py``): the same MLP,
RMS/L2 length normalisation before every layer, detached layers, goodness (mean of squares by default),
negatives (uniform wrong labels; ``params.negatives=hard``) and inference (embed every label, sum the
goodness over all layers but the first: K passes). Per layer and pair (positive, negative) of one image:

    L = softplus(−α (G⁺ − G⁻)),  α = ``params.alpha`` = 4,  averaged over the batch,

with no threshold: the gradient with respect to G⁺ is minus the one with respect to G⁻. It is computed
with ``F.softplus``, which is exact and finite for any |αΔ| (the naive log(1 + exp) overflows). With
``params.goodness=sum`` Δ grows with the width, so α must shrink accordingly (the spec suggests a sweep
over {1, 2, 4, 8} when the goodness scale differs).

ICP (intrinsic class pattern): SymBa's construction is unpublished (spec §2(b)). Our choice, switch
``params.icp``:
- ``repeat`` (default, the spec's option (i), "a larger one-hot block"): the one-hot label tiled over the
  first ``params.icp_size`` = 100 input values (value j is on for class j mod K), each "on" value set to
  the label value as in FF. Ten copies of the label carry ten times a one-hot's share of the normalised
  input, so class identity is less easily washed out by the length normalisation.
- ``pattern`` (option (ii)): a fixed random 0/1 pattern per class (half the values on, seeded, the same
  on every run) over the first ``params.icp_size`` values.
- ``onehot``: FF's K-value one-hot (isolates the loss in an FF-vs-SymBa comparison).
The first 100 values of a 28 x 28 image are its top 3.5 rows (MNIST's empty border); on 3 x 32 x 32 CIFAR
input they are the first three rows of the red channel. The pattern must fit the input (error if not).

Paper recipe (``recipe=paper``): SymBa's widths, optimiser and epochs are unpublished. DeeperForward's
table calls it a 3-layer MLP, so we use 3 x 2000 (FF's width) with FF's epoch budget (60), batch 100 and
FF's data split, mean goodness with α = 4 (third-party default) and Adam (lr 1e-3; SymBa tolerates large
rates). Compare with the table's 98.58 / 59.09 only loosely. BP twin: ``method=backprop
recipe=paper-symba``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from cawbench.config import ConfigError, RunConfig
from cawbench.data import DataInfo
from cawbench.method import register_method
from cawbench.methods._ff_common import (
    FFFamilyConfig,
    FFFamilyMethod,
    mlp_twin,
    random_class_patterns,
    symba_loss,
)

ICP_CHOICES = ("repeat", "pattern", "onehot")

SYMBA_PAPER_COMMON: dict[str, Any] = {
    "model.arch": "mlp",
    "model.hidden": (2000, 2000, 2000),
    "train.epochs": 60,
    "train.batch_size": 100,
    "optim.name": "adam",
    "optim.lr": 1e-3,
}
SYMBA_PAPER: dict[str, dict[str, Any]] = {
    "mnist": {**SYMBA_PAPER_COMMON, "data.val_size": 10_000},
    "fashion-mnist": {**SYMBA_PAPER_COMMON, "data.val_size": 10_000},
    "cifar10": {**SYMBA_PAPER_COMMON, "data.val_size": 5_000},
    "cifar100": {**SYMBA_PAPER_COMMON, "data.val_size": 5_000},
}


@dataclass(frozen=True)
class SymBaConfig(FFFamilyConfig):
    alpha: float = 4.0  # scale of the goodness difference inside the softplus
    icp: str = "repeat"  # repeat | pattern | onehot (see the module docstring)
    icp_size: int = 100  # input values the class pattern occupies (repeat, pattern)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.alpha > 0:
            raise ConfigError(f"params.alpha must be > 0, got {self.alpha!r}")
        if self.icp not in ICP_CHOICES:
            raise ConfigError(
                f"params.icp={self.icp!r} is not valid; choose one of: {', '.join(ICP_CHOICES)}"
            )
        if self.icp_size < 1:
            raise ConfigError(f"params.icp_size must be >= 1, got {self.icp_size!r}")


@register_method("symba")
class SymBa(FFFamilyMethod):
    description = (
        "SymBa (Lee & Song 2023): FF with the symmetric loss softplus(-a(G+ - G-)) and a class pattern"
    )
    Config: ClassVar[type] = SymBaConfig
    defaults: ClassVar[dict[str, Any]] = {**FFFamilyMethod.defaults, "optim.lr": 1e-3}
    recipes: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {"paper": SYMBA_PAPER}
    report_label = "SymBa"
    report_order = 50
    bp_twin_recipes: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {"paper-symba": mlp_twin(SYMBA_PAPER)}
    bp_twin = "paper-symba"
    smoke_overrides: ClassVar[dict[str, Any]] = {"model.hidden": (32, 32), "train.batch_size": 64}

    def __init__(self, cfg: RunConfig, info: DataInfo) -> None:
        p, k = cfg.params, info.num_classes
        if p.icp != "onehot" and p.icp_size < k:
            raise ConfigError(f"params.icp_size={p.icp_size} must be >= the {k} classes for icp={p.icp!r}")
        size = info.in_channels * info.image_size**2
        if p.icp != "onehot" and p.icp_size > size:
            raise ConfigError(
                f"params.icp_size={p.icp_size} exceeds the {size} input values of {info.name}; "
                f"choose a value in {k}..{size} (or params.icp=onehot)"
            )
        super().__init__(cfg, info)

    def pair_loss(self, g_pos: torch.Tensor, g_neg: torch.Tensor, width: int) -> dict[str, torch.Tensor]:
        return {"symba": symba_loss(g_pos, g_neg, self.params.alpha)}

    @property
    def code_length(self) -> int:
        return self.info.num_classes if self.params.icp == "onehot" else self.params.icp_size

    def make_class_codes(self) -> torch.Tensor:
        k, n = self.info.num_classes, self.code_length
        if self.params.icp == "pattern":
            return random_class_patterns(k, n, "symba-icp")
        positions = torch.arange(n)
        return (positions[None, :] % k == torch.arange(k)[:, None]).float()  # onehot when n == k
