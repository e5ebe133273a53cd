"""CwComp: convolutional channel-wise competitive learning (Papachristodoulou et al., AAAI 2024).

Maths, architecture and recipes follow ``spec/baselines.md`` §4 and §8 (read from andreaspapac/CwComp):

* Layers (arch ``cwcomp_cnn``, the CFSE net): conv (bias) -> ReLU -> [2x2 max-pool] -> BatchNorm (eps 1e-4),
  channels 20 / 80 / 240 / 480, grouped convs (groups = K) and pools on layers 1 and 3. ``cwcomp_cnn100``
  is the 6-layer CIFAR-100 net whose first four layers compete over K/5 superclasses (label // 5).
* Goodness: the post-BN output's C channels split into K equal contiguous groups; G[n, k] = mean over
  group k's channels and all positions of y**2. Each layer is trained on its own loss (its own Adam,
  lr 0.01); its input is detached.
* Loss (``params.loss``): ``cwc_ce`` (default, the code's ``CwC_CE``): softmax cross-entropy over the K
  goodness values; ``pvn``: 0.5 * [mean softplus(theta - g+) + mean softplus(g- - theta)], g- = mean goodness
  of the wrong groups, theta = 2 (``params.pvn_threshold``); ``cwg``: 0.28 * CE + 0.72 * PvN
  (``params.cwg_ce_weight``; one term ``cwg``, its parts logged beside it). With ``pvn`` and ``cwg`` the
  CE is still logged as ``ce`` without gradient, so per-layer CE curves and the LCS readout stay
  available. The code's hand-written ``CwC`` loss (CE with logits clamped to +-50) equals ``cwc_ce``
  whenever the goodness stays below 50 and is not offered separately.
* Interleaved layer training (ILT): layer i trains only in epochs [s_i, e_i) and just runs forward
  otherwise (BatchNorm still in training mode, as in the code). ``params.ilt`` picks the authors' "acc"
  (default) or "fast" table for the dataset (MNIST, Fashion-MNIST, CIFAR-10, CIFAR-100 "acc"); other
  datasets need ``params.ilt=none`` (every layer trains every epoch) or explicit ``params.ilt_windows``.
* Readouts, both reported: GA (argmax of the last conv layer's class-group goodness; readout
  ``cwcomp_ga``, the main one, since the authors select the checkpoint on it) and Sf (a linear layer with
  bias on the detached, flattened last-layer output, trained by SGD lr 0.01 from the table's head start
  epoch; readout ``last``, recorded through ``readout.extra``).

Observed (not a switch): BatchNorm in eval mode can break a layer whose running statistics lag behind its
weights. A channel that has become (nearly) constant has batch variance ~0, so eval mode divides the lag
of its running mean by sqrt(1e-4) and that class group's goodness dominates. Short runs in which every
layer trains up to the last epoch sometimes collapse this way at evaluation (measured on digits and a
Fashion-MNIST subset); the ILT windows, which stop the early layers well before the end while they keep
updating their statistics, avoid it in every run we made.

Switches and deviations (each named):
* ``params.sf_double_softmax`` (default true, as the code): the Sf head's cross-entropy is applied to
  softmax outputs, i.e. a double softmax, which shrinks its gradients; false uses plain CE on the logits.
  The prediction (argmax) is the same either way.
* Model selection uses the harness's validation split; the authors' script keeps the checkpoint with the
  best *test* error (reported numbers are probably best-epoch test errors: see ``max_test_acc``).
* The paper-era third readout (two FF-trained fully connected layers) was dropped from the public code and
  is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cawbench.archs import ArchPlan, LayerSpec, build_plan, finish_plan, register_arch, scaled
from cawbench.config import ConfigError, ModelConfig
from cawbench.data import DataInfo
from cawbench.layers import PlanLayer
from cawbench.method import LocalNetwork, LocalUnit, Method, StepContext, UnitOutput, register_method
from cawbench.readouts import ReadoutContext, add_readout

LOSSES = ("cwc_ce", "pvn", "cwg")
ILT_MODES = ("acc", "fast", "none")

Windows = tuple[tuple[int, int], ...]
# ILT tables from the authors' Models.py (baselines.md 4(d), §8): per conv layer [start, end) epochs, and the
# epoch from which the softmax head trains (the code's start_end[-1][0]).
ILT_TABLES: dict[str, dict[str, tuple[Windows, int]]] = {
    "acc": {
        "mnist": (((0, 2), (0, 3), (0, 4), (0, 5)), 0),
        "fashion-mnist": (((0, 10), (0, 15), (0, 19), (0, 23)), 0),
        "cifar10": (((0, 11), (0, 16), (0, 21), (0, 25)), 0),
        "cifar100": (((0, 30), (0, 30), (30, 60), (30, 60), (60, 85), (60, 85)), 85),
    },
    "fast": {
        "mnist": (((0, 3), (1, 4), (2, 5), (3, 6)), 5),
        "fashion-mnist": (((0, 7), (1, 10), (2, 13), (3, 16)), 5),
        "cifar10": (((0, 11), (2, 18), (4, 26), (6, 32)), 10),
    },
}


# --------------------------------------------------------------------------------- the maths
def channel_group_goodness(y: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, groups]``: mean of y**2 over each contiguous channel group and position."""
    b, c = y.shape[:2]
    if c % groups:
        raise ValueError(f"{c} channels do not split into {groups} equal groups")
    return y.reshape(b, groups, c // groups, -1).pow(2).mean(dim=(2, 3))


def cwc_ce_loss(goodness: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CwC loss: softmax cross-entropy over the class-group goodness values."""
    return F.cross_entropy(goodness.float(), target)


def pvn_loss(goodness: torch.Tensor, target: torch.Tensor, threshold: float = 2.0) -> torch.Tensor:
    """FF-like positive-vs-negative loss on channel groups: the true group's goodness above ``threshold``,
    the mean of the other groups' goodness below it (mean over the 2N softplus terms, as the code)."""
    g = goodness.float()
    pos = g.gather(1, target[:, None]).squeeze(1)
    neg = (g.sum(1) - pos) / (g.shape[1] - 1)
    return 0.5 * (F.softplus(threshold - pos).mean() + F.softplus(neg - threshold).mean())


# --------------------------------------------------------------------------------- the plans
def _cwcomp_rows(info: DataInfo, per_class: list[int], classes: list[int], width: float) -> list[dict]:
    """CwComp's CFSE stack: layer i has ``classes[i] * per_class[i]`` channels (so every class owns an equal
    contiguous group); odd layers are grouped convs (groups = that layer's classes) followed by a 2x2
    max-pool; every layer is conv (bias) -> ReLU -> [pool] -> BatchNorm (eps 1e-4)."""
    rows, channels = [], info.in_channels
    for i, (mult, k) in enumerate(zip(per_class, classes, strict=True)):
        out = k * scaled(mult, width)
        odd = i % 2 == 1
        rows.append(
            dict(
                kind="conv", in_channels=channels, out_channels=out, groups=k if odd else 1,
                pool_after="max" if odd else None, norm_position="post_pool", norm_eps=1e-4,
                pool_ceil=False, class_groups=k,
            )
        )  # fmt: skip
        channels = out
    return rows


@register_arch("cwcomp_cnn")
def cwcomp_cnn(cfg: ModelConfig, info: DataInfo) -> ArchPlan:
    """CwComp's CFSE CNN (baselines.md 4(c)): 20 / 80 / 240 / 480 channels for K = 10 (2 / 8 / 24 / 48 per
    class, times the width), grouped convs with groups = K and 2x2 max-pools on layers 1 and 3, BatchNorm
    after the pool. For another K the per-class counts stay, so the channels scale with K."""
    k = info.num_classes
    return finish_plan("cwcomp_cnn", info, _cwcomp_rows(info, [2, 8, 24, 48], [k] * 4, cfg.width))


@register_arch("cwcomp_cnn100")
def cwcomp_cnn100(cfg: ModelConfig, info: DataInfo) -> ArchPlan:
    """CwComp's CIFAR-100 CFSE CNN (baselines.md 4(c)): 60 / 120 / 240 / 400 / 800 / 1600 channels; the first
    four layers compete over K/5 superclasses (label // 5), the last two over the K classes; grouped convs
    (groups 20, 20, 100) and max-pools on layers 1, 3 and 5 (32 -> 4)."""
    k = info.num_classes
    if k % 5:
        raise ConfigError(f"cwcomp_cnn100 needs a class count divisible by 5 (superclasses), got {k}")
    coarse = k // 5
    per_class = [60 // 20, 120 // 20, 240 // 20, 400 // 20, 800 // 100, 1600 // 100]
    return finish_plan(
        "cwcomp_cnn100", info, _cwcomp_rows(info, per_class, [coarse] * 4 + [k] * 2, cfg.width)
    )


# --------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class CwCompConfig:
    loss: str = "cwc_ce"  # cwc_ce | pvn | cwg
    pvn_threshold: float = 2.0
    cwg_ce_weight: float = 0.28  # CWG = w * CE + (1 - w) * PvN
    ilt: str = "acc"  # acc | fast | none: the authors' window table for the dataset, or no windows
    ilt_windows: tuple[tuple[int, int], ...] | None = None  # explicit [start, end) per conv layer
    head_start: int | None = None  # epoch the Sf head starts training; None: the table's (0 without one)
    sf_head: bool = True
    sf_double_softmax: bool = True  # the code's CE on softmax outputs
    sf_lr: float = 0.01  # SGD, no momentum

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"params.loss={self.loss!r} is not valid; choose one of: {', '.join(LOSSES)}")
        if self.ilt not in ILT_MODES:
            raise ConfigError(f"params.ilt={self.ilt!r} is not valid; choose one of: {', '.join(ILT_MODES)}")
        if not 0 <= self.cwg_ce_weight <= 1:
            raise ConfigError(f"params.cwg_ce_weight must be in [0, 1], got {self.cwg_ce_weight!r}")
        if not self.sf_lr > 0:
            raise ConfigError(f"params.sf_lr must be > 0, got {self.sf_lr!r}")
        if self.head_start is not None and self.head_start < 0:
            raise ConfigError(f"params.head_start must be >= 0 or null, got {self.head_start!r}")
        for window in self.ilt_windows or ():
            if not 0 <= window[0] < window[1]:
                raise ConfigError(
                    f"params.ilt_windows: {list(window)} is not a [start, end) with 0 <= start < end"
                )


#: the window of a layer that trains every epoch (ilt=none), whatever the schedule's horizon
ALWAYS = (0, 2**31 - 1)


def resolve_windows(params: CwCompConfig, dataset: str, n_layers: int) -> tuple[Windows, int]:
    """Per-layer training windows and the Sf head's start epoch for this run (in the recipe's epochs)."""
    head_start = params.head_start
    if params.ilt_windows is not None:
        windows: Windows = params.ilt_windows
        table_head = 0
    elif params.ilt == "none":
        windows, table_head = (ALWAYS,) * n_layers, 0
    else:
        table = ILT_TABLES[params.ilt]
        if dataset not in table:
            raise ConfigError(
                f"params.ilt={params.ilt!r} has no window table for dataset {dataset!r} (tables: "
                f"{', '.join(sorted(table))}); set params.ilt=none or give params.ilt_windows"
            )
        windows, table_head = table[dataset]
    if len(windows) != n_layers:
        raise ConfigError(
            f"ILT windows {[list(w) for w in windows]} name {len(windows)} layers but the architecture has "
            f"{n_layers} conv layers; give params.ilt_windows with one [start, end) per layer"
        )
    return windows, table_head if head_start is None else head_start


# --------------------------------------------------------------------------------- units
class CwCompLayer(LocalUnit):
    """One CFSE layer trained on its channel-group goodness inside its ILT window."""

    def __init__(self, spec: LayerSpec, num_classes: int, window: tuple[int, int], params: CwCompConfig):
        super().__init__()
        self.block = PlanLayer(spec, "batch")
        self.classes = spec.class_groups or num_classes
        if num_classes % self.classes or spec.out_channels % self.classes:
            raise ConfigError(
                f"CwComp layer {spec.index}: {spec.out_channels} channels and {num_classes} classes must "
                f"both divide into {self.classes} competing groups"
            )
        self.label_divisor = num_classes // self.classes  # superclass = label // 5 on CIFAR-100
        self.emits_scores = self.classes == num_classes  # superclass layers have no K-way scores
        self.window = window
        self.loss = params.loss
        self.threshold = params.pvn_threshold
        self.cwg_ce_weight = params.cwg_ce_weight
        self._active = True

    def set_schedule(self, at: float) -> None:
        self._active = self.trainable_at(at)

    def trainable_at(self, at: float) -> bool:
        return self.window[0] <= at < self.window[1]

    def forward(self, x: torch.Tensor) -> UnitOutput:
        # Outside its window a layer only runs forward: no graph needed.
        with torch.set_grad_enabled(torch.is_grad_enabled() and (self._active or not self.training)):
            y = self.block(x)
            goodness = channel_group_goodness(y, self.classes)
        scores = goodness if self.emits_scores else None
        return UnitOutput(passed=y, scores=scores, extras={"goodness": goodness})

    def local_losses(
        self, out: UnitOutput, target: torch.Tensor, ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        g = out.extras["goodness"]
        target = target // self.label_divisor if self.label_divisor > 1 else target
        ce = cwc_ce_loss(g, target)
        if self.loss == "cwc_ce":
            return {"ce": ce}
        pvn = pvn_loss(g, target, self.threshold)
        if self.loss == "pvn":
            return {"pvn": pvn, "ce": ce.detach()}  # CE logged only (no gradient)
        w = self.cwg_ce_weight
        return {"cwg": w * ce + (1 - w) * pvn, "ce": ce.detach(), "pvn": pvn.detach()}

    def epoch_stats(self) -> dict[str, float]:
        return {"ilt_active": float(self._active)}


class SoftmaxHead(LocalUnit):
    """CwComp's Sf predictor: a linear layer (with bias) on the detached, flattened last conv output."""

    def __init__(self, in_features: int, num_classes: int, start: int, params: CwCompConfig) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)
        self.start = start
        self.double_softmax = params.sf_double_softmax
        self.optim_overrides = {"name": "sgd", "lr": params.sf_lr, "momentum": 0.0, "weight_decay": 0.0}

    def trainable_at(self, at: float) -> bool:
        return at >= self.start

    def forward(self, x: torch.Tensor) -> UnitOutput:
        logits = self.linear(x.flatten(1))
        return UnitOutput(passed=x, scores=logits)

    def local_losses(
        self, out: UnitOutput, target: torch.Tensor, ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        logits = out.scores.float()
        inputs = torch.softmax(logits, dim=1) if self.double_softmax else logits
        return {"ce": F.cross_entropy(inputs, target)}


# --------------------------------------------------------------------------------- the GA readout
def _fit_ga(ctx: ReadoutContext) -> dict[str, int]:
    return {"layer": max(ctx.val_scores.shape[0] - 2, 0)}


add_readout(
    "cwcomp_ga",
    _fit_ga,
    lambda scores, state: scores[state["layer"]],
    "CwComp's GA predictor: the scoring layer just below the softmax head (the last conv layer's "
    "class-group goodness); the only layer when there is one",
)


# --------------------------------------------------------------------------------- the method
def _paper(dataset: str, epochs: int, normalization: str, arch: str = "cwcomp_cnn") -> dict[str, object]:
    return {
        "model.arch": arch,
        "model.width": 1.0,
        "train.epochs": epochs,
        "train.batch_size": 128,
        "optim.name": "adam",
        "optim.lr": 0.01,
        "optim.weight_decay": 0.0,
        "data.normalization": normalization,
        "data.augment": "none",
        "params.loss": "cwc_ce",
        "params.ilt": "acc",
        "params.sf_lr": 0.01,
    }


# The BP twin (backprop --recipe paper-cwcomp): the same CFSE stack trained end to end with one linear head on
# the flattened last feature map, with CwComp's epochs (20 / 50 / 50 / 100) and normalisations (spec §4(d), §8).
_BP_TWIN = {
    ds: {"model.arch": arch, "params.head_input": "flatten", "train.epochs": epochs, "train.batch_size": 128,
         "data.normalization": norm, "data.augment": "none"}
    for ds, arch, epochs, norm in (
        ("mnist", "cwcomp_cnn", 20, "dataset"),
        ("fashion-mnist", "cwcomp_cnn", 50, "half"),
        ("cifar10", "cwcomp_cnn", 50, "imagenet"),
        ("cifar100", "cwcomp_cnn100", 100, "imagenet"),
    )
}  # fmt: skip


@register_method("cwcomp")
class CwComp(Method):
    description = (
        "CwComp (AAAI 2024): CFSE CNN, channel-group goodness with the CwC cross-entropy, interleaved "
        "layer training; GA and softmax-head readouts"
    )
    report_label = "CwComp"
    report_order = 30
    bp_twin_recipes = {"paper-cwcomp": _BP_TWIN}
    bp_twin = "paper-cwcomp"
    Config = CwCompConfig
    defaults = {
        "model.arch": "cwcomp_cnn",
        "optim.name": "adam",
        "optim.lr": 0.01,
        "train.batch_size": 128,
        "readout.name": "cwcomp_ga",
        "readout.extra": ["last"],
    }
    # baselines.md 4(d) and §8: 20 / 50 / 50 / 100 epochs; MNIST (0.1307, 0.3081) = its dataset statistics,
    # F-MNIST (0.5, 0.5), CIFAR ImageNet statistics (CIFAR-100 too).
    recipes = {
        "paper": {
            "mnist": _paper("mnist", 20, "dataset"),
            "fashion-mnist": _paper("fashion-mnist", 50, "half"),
            "cifar10": _paper("cifar10", 50, "imagenet"),
            "cifar100": _paper("cifar100", 100, "imagenet", arch="cwcomp_cnn100"),
        }
    }
    smoke_overrides = {"model.width": 0.25, "params.ilt": "none", "train.batch_size": 64}

    def build(self) -> LocalNetwork:
        plan = build_plan(self.cfg.model, self.info)
        self._check_plan(plan)
        windows, head_start = resolve_windows(self.params, self.info.name, len(plan))
        k = self.info.num_classes
        units: list[LocalUnit] = [
            CwCompLayer(spec, k, window, self.params)
            for spec, window in zip(plan.layers, windows, strict=True)
        ]
        if self.params.sf_head:
            last = plan.layers[-1]
            units.append(SoftmaxHead(last.passed_channels * last.out_size**2, k, head_start, self.params))
        return LocalNetwork(units)

    def epoch_schedules(self) -> list[str]:
        p = self.params
        if p.ilt_windows is None and p.ilt == "none" and not p.head_start:
            return []
        return [f"interleaved layer-training windows (params.ilt={p.ilt}, ilt_windows={p.ilt_windows})"]

    def _check_plan(self, plan: ArchPlan) -> None:
        if any(s.kind != "conv" or s.ops_after for s in plan.layers):
            raise ConfigError(
                f"cwcomp needs a plain conv stack (e.g. model.arch=cwcomp_cnn); {plan.name!r} has linear "
                "layers or residual ops"
            )
        if plan.layers[-1].class_groups not in (0, self.info.num_classes):
            raise ConfigError(
                f"{plan.name}: the last layer must compete over all {self.info.num_classes} classes"
            )
        readouts = (self.cfg.readout.name, *self.cfg.readout.extra)
        if not self.params.sf_head and "cwcomp_ga" in readouts:
            raise ConfigError(
                "params.sf_head=false leaves the last conv layer on top: read GA with readout.name=last "
                "instead of cwcomp_ga"
            )
