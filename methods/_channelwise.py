"""Channel-wise local conv units: the components shared by DeeperForward and CAW-Conv.

One unit per conv row of the architecture plan computes (spec ``caw_conv_and_deeperforward.md`` 1(b), 2(b))::

    y = Dropout_p(ReLU(Conv(pool_before(sg(x)))))         # conv without bias
    s_c = a mean_hw y_c + b max_hw y_c - d min_hw y_c       # per-channel pooled activity ("mix"; "mean": a=1)
    A = fixed contiguous one-hot groups | softmax_classes(W / T_e)      # [C, K] channel-to-class assignment
    g = s A            (score_reduction "sum", CAW-Conv)   # class scores [B, K]
    g = (K/C) s A      (score_reduction "mean", DeeperForward: the mean over the group's channels and space)
    z = GroupNorm(K) | InstanceNorm | identity of y         # passed on; the plan's residual op follows

and the named, unweighted loss terms ``ce`` (label-smoothed CE of g), ``entropy`` and ``ortho`` of A.
The weights (lambda_H, negated for ``entropy_direction=maximize``; lambda_O times its linear warm-up) come
from :meth:`ChannelwiseMethod.loss_weights`. Two readings of the regularisers: the released code
(``entropy_direction=minimize``, ``ortho_form=released``: the defaults) and the overview's text (entropy
maximised for uniform channel use; ``ortho_form=frobenius``, ||G - I||_F^2 without the released double
normalisation that leaves the term at ~1e-7).
Every difference between the two methods is a field of :class:`ChannelwiseConfig`, so the ablation ladder
walks from one to the other one switch at a time. Gradient clipping is ``optim.grad_clip`` (per unit).

Implementation notes (why, not what):
- The passed-on tensor z is normalised from ``y.detach()``: the engine detaches it anyway and no loss
  depends on it, so building its autograd graph would only cost time and memory.
- ReLU, dropout and pooling are one layer (:class:`cawbench.layers.ReluDropoutPool`): in CPU training one
  autograd node with bulk-drawn dropout masks, the plain composition elsewhere; equal either way.
- The assignment A is computed once per forward and handed to ``local_losses`` in ``extras``, so the
  regularisers never recompute the softmax; the temperature's per-epoch decay lives in a buffer so that no
  host synchronisation happens inside the layer loop and checkpoints carry it.
- ``score_reduction="mean"`` scales by the constant K/C (= 1/group size). For the fixed assignment this is
  exactly DeeperForward's group mean; for a learnable A it is the CAW sum rescaled (a documented choice: the
  spec defines the mean only for contiguous groups).
- **[ASSUMPTION]** The gradient of ``max``/``min`` pooling goes to one position per channel (the first
  maximal/minimal one, as autograd through ``torch.max(dim)`` does); the spec does not say which reduction
  the authors called (``amax`` would share it among ties). Ties only occur where ReLU/dropout output
  zeros, whose gradient ReLU blocks anyway, so the choice does not change training.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cawbench.archs import ArchPlan, LayerSpec, build_plan
from cawbench.config import ConfigError, ModelConfig
from cawbench.data import DataInfo
from cawbench.layers import MEAN_POOL, ReluDropoutPool, channel_pool
from cawbench.method import LocalNetwork, LocalUnit, Method, StepContext, UnitOutput

ASSIGNMENTS = ("fixed", "learnable")
ASSIGNMENT_AXES = ("classes", "channels")
POOLINGS = ("mean", "mix")
SCORE_REDUCTIONS = ("mean", "sum")
NORMS = ("group", "instance", "none")
CONV_INITS = ("kaiming", "default")
INPUT_NORMS = ("layer", "none")
ENTROPY_DIRECTIONS = ("minimize", "maximize")
ORTHO_FORMS = ("released", "frobenius")
#: the architectures whose plans are made only of conv rows (what a channel-wise unit can be built from)
CONV_ARCHS = ("resnet17", "vgg14", "vgg13", "tinycnn")
ENTROPY_EPS = 1e-10  # inside the log of the entropy term, as in the authors' code
ORTHO_EPS = 1e-10  # added to each column norm before dividing, as in the authors' code
NORM_EPS = 1e-5


def _choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"params.{field}={value!r} is not valid; choose one of: {', '.join(choices)}")


@dataclass(frozen=True)
class ChannelwiseConfig:
    """Every switch of a channel-wise unit. The defaults are DeeperForward's (spec 2(b)); CAW-Conv's
    ``Config`` subclasses this with its own defaults (spec 1(b)); the spec's section 3 lists both."""

    assignment: str = "fixed"  # fixed: contiguous groups of C/K channels | learnable: softmax(W/T)
    assignment_axis: str = "classes"  # classes: rows of A sum to 1 (released) | channels: columns do
    assignment_init: float = 0.5  # every entry of W (equal entries: A starts exactly uniform)
    temperature_init: float = 10.0  # the log-temperature tau starts at ln(this)
    learn_temperature: bool = True
    temperature_decay: float = 0.995  # T_e = clamp(exp(tau), min, max) * decay**epoch
    temperature_min: float = 0.1
    temperature_max: float = 100.0
    pooling: str = "mean"  # mean | mix: pool_mean*mean + pool_max*max - pool_min*min over H x W
    pool_mean: float = 0.94
    pool_max: float = 0.06
    pool_min: float = 0.05
    score_reduction: str = "mean"  # mean: (K/C) s A (DeeperForward) | sum: s A (CAW-Conv)
    norm: str = "group"  # group: GroupNorm(K) | instance: InstanceNorm | none; no affine, eps 1e-5
    dropout: float = 0.2  # after the ReLU, before both the score and the normalisation
    conv_init: str = "kaiming"  # kaiming: kaiming_normal_(fan_out, relu) | default: PyTorch's
    label_smoothing: float = 0.0
    lambda_entropy: float = 0.0  # weight of the `entropy` term H(A)
    # minimize (released code: channels commit to few classes) | maximize (the overview's text: uniform use)
    entropy_direction: str = "minimize"
    lambda_ortho: float = 0.0  # weight of the `ortho` term at full warm-up
    # released: ((G - I)^2).mean() / (K^2 C), ~1e-7 | frobenius: ||G - I||_F^2, G the column-normalised Gram
    ortho_form: str = "released"
    ortho_warmup_epochs: int = 50  # lambda_ortho * min(1, epoch / this); 0 = no warm-up
    input_norm: str = "layer"  # layer: per-sample LayerNorm over (C, H, W), no affine, before layer 0

    def __post_init__(self) -> None:
        _choice("assignment", self.assignment, ASSIGNMENTS)
        _choice("assignment_axis", self.assignment_axis, ASSIGNMENT_AXES)
        _choice("pooling", self.pooling, POOLINGS)
        _choice("score_reduction", self.score_reduction, SCORE_REDUCTIONS)
        _choice("norm", self.norm, NORMS)
        _choice("conv_init", self.conv_init, CONV_INITS)
        _choice("input_norm", self.input_norm, INPUT_NORMS)
        _choice("entropy_direction", self.entropy_direction, ENTROPY_DIRECTIONS)
        _choice("ortho_form", self.ortho_form, ORTHO_FORMS)
        for name in ("lambda_entropy", "lambda_ortho"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"params.{name} must be a finite number >= 0, got {value!r}")
        for name in ("dropout", "label_smoothing"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ConfigError(f"params.{name} must be in [0, 1), got {value!r}")
        if not 0 < self.temperature_min <= self.temperature_max:
            raise ConfigError(
                f"params.temperature_min/max must satisfy 0 < min <= max, got "
                f"{self.temperature_min!r} / {self.temperature_max!r}"
            )
        if not self.temperature_min <= self.temperature_init <= self.temperature_max:
            raise ConfigError(
                f"params.temperature_init={self.temperature_init!r} must lie in "
                f"[temperature_min, temperature_max] = [{self.temperature_min}, {self.temperature_max}]"
            )
        if not 0 < self.temperature_decay <= 1:
            raise ConfigError(f"params.temperature_decay must be in (0, 1], got {self.temperature_decay!r}")
        if self.ortho_warmup_epochs < 0:
            raise ConfigError(f"params.ortho_warmup_epochs must be >= 0, got {self.ortho_warmup_epochs!r}")
        for name in ("pool_mean", "pool_max", "pool_min", "assignment_init"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"params.{name} must be a finite number, got {getattr(self, name)!r}")


# --------------------------------------------------------------------------------- the loss terms
def assignment_entropy(assignment: torch.Tensor) -> torch.Tensor:
    """H(A) = (1/K) sum_k sum_c -A_ck log(A_ck + 1e-10) for A of shape [C, K] (spec 1(b)6).

    Summed over channels and averaged over classes, i.e. (C/K) times the mean per-channel entropy; a
    uniform A gives (C/K) ln K.
    """
    k = assignment.shape[1]
    return -(assignment * torch.log(assignment + ENTROPY_EPS)).sum() / k


def column_gram(assignment: torch.Tensor) -> torch.Tensor:
    """G = Ahat^T Ahat [K, K], Ahat = A with L2-normalised columns (+1e-10 on each norm, as released)."""
    columns = assignment / (assignment.norm(dim=0, keepdim=True) + ORTHO_EPS)
    return columns.T @ columns


def assignment_orthogonality(assignment: torch.Tensor, form: str = "released") -> torch.Tensor:
    """Zero when the classes use disjoint channel sets; G = :func:`column_gram` of A [C, K].

    ``released``: O(A) = (1/(K^2 C)) mean_{k,k'} (G - I)^2 (spec 1(b)6; the authors' double normalisation,
    ~1e-7 in practice). ``frobenius``: the textbook ||G - I||_F^2 = sum_{k,k'} (G - I)^2, no further
    normalisation (the overview's reading of the term as a real penalty).
    """
    c, k = assignment.shape
    gram = column_gram(assignment)
    squared = (gram - torch.eye(k, device=assignment.device, dtype=gram.dtype)) ** 2
    if form == "frobenius":
        return squared.sum()
    return squared.mean() / (k * k * c)


@torch.no_grad()
def assignment_diagnostics(assignment: torch.Tensor, axis: str = "classes") -> dict[str, torch.Tensor]:
    """What the regularisers do to A [C, K], as 0-d tensors (read once per epoch):

    - ``assignment_entropy_norm``: mean entropy of the softmax's distributions (rows over classes, or
      columns over channels for ``axis=channels``) divided by its uniform maximum: 0 one-hot, 1 uniform;
    - ``assignment_offdiag``: mean off-diagonal entry of the column-normalised Gram matrix G: 0 when the
      classes use disjoint channel sets, 1 when every class uses the same channels;
    - ``assignment_committed``: fraction of channels whose largest (row-normalised) assignment exceeds 0.5.
    """
    a = assignment.float()
    c, k = a.shape
    dists, size = (a, k) if axis == "classes" else (a.T, c)
    entropy = -(dists * torch.log(dists + ENTROPY_EPS)).sum(1)
    entropy_norm = entropy.mean() / math.log(size) if size > 1 else torch.zeros((), device=a.device)
    gram = column_gram(a)
    offdiag = (gram.sum() - gram.diagonal().sum()) / max(k * (k - 1), 1)
    rows = a / a.sum(1, keepdim=True).clamp_min(ENTROPY_EPS)
    committed = (rows.amax(1) > 0.5).float().mean()
    return {
        "assignment_entropy_norm": entropy_norm,
        "assignment_offdiag": offdiag,
        "assignment_committed": committed,
    }


def ortho_warmup(at: float, warmup_epochs: int) -> float:
    """Linear curriculum factor min(1, at / warmup_epochs) at schedule position ``at`` (epochs); 1 when there
    is no warm-up."""
    return 1.0 if warmup_epochs <= 0 else min(1.0, at / warmup_epochs)


def contiguous_assignment(channels: int, num_classes: int) -> torch.Tensor:
    """DeeperForward's fixed map: channels [k C/K, (k+1) C/K) belong to class k, as a one-hot [C, K]."""
    group = channels // num_classes
    owner = torch.arange(channels) // group
    return F.one_hot(owner, num_classes).float()


def pool_coefficients(cfg: ChannelwiseConfig) -> tuple[float, float, float]:
    """(a, b, d) of the pooled activity a * mean + b * max - d * min (``mean`` pooling: the mean alone)."""
    return MEAN_POOL if cfg.pooling == "mean" else (cfg.pool_mean, cfg.pool_max, cfg.pool_min)


def pooled_activity(y: torch.Tensor, cfg: ChannelwiseConfig) -> torch.Tensor:
    """Per-channel pooled activity [B, C] of y [B, C, H, W]: the mean, or the mean/max/min mix."""
    return channel_pool(y, pool_coefficients(cfg))


# --------------------------------------------------------------------------------- the unit
class InputLayerNorm(nn.Module):
    """Per-sample LayerNorm over (C, H, W), no affine: the preprocessing before layer 0 (spec 1(c), 2(b)7)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[1:], eps=NORM_EPS)


class ChannelwiseUnit(LocalUnit):
    """One conv row of the plan as a channel-wise local layer (DeeperForward's CW-Conv / CAW-Conv's layer)."""

    def __init__(self, spec: LayerSpec, num_classes: int, cfg: ChannelwiseConfig) -> None:
        super().__init__()
        check_layer(spec, num_classes)
        self.spec, self.cfg, self.num_classes = spec, cfg, num_classes
        channels = spec.out_channels
        self.conv = nn.Conv2d(
            spec.in_channels, channels, spec.kernel, spec.stride, spec.padding, groups=spec.groups, bias=False
        )
        if cfg.conv_init == "kaiming":
            nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        # ReLU -> dropout -> pooling (one autograd node on the CPU; see cawbench.layers.ReluDropoutPool)
        self.activity = ReluDropoutPool(cfg.dropout, pool_coefficients(cfg))
        self.learnable = cfg.assignment == "learnable"
        if self.learnable:
            self.assignment_logits = nn.Parameter(torch.full((channels, num_classes), cfg.assignment_init))
            log_t = torch.tensor(math.log(cfg.temperature_init))
            if cfg.learn_temperature:
                self.log_temperature = nn.Parameter(log_t)
            else:
                self.register_buffer("log_temperature", log_t)
            self.register_buffer("temperature_schedule", torch.tensor(1.0))  # decay**at
        else:
            self.register_buffer("fixed_assignment", contiguous_assignment(channels, num_classes))
        self.score_scale = num_classes / channels if cfg.score_reduction == "mean" else 1.0
        self.softmax_dim = 1 if cfg.assignment_axis == "classes" else 0

    # -- assignment
    def temperature(self) -> torch.Tensor:
        """T = clamp(exp(tau), T_min, T_max) * decay**at (a 0-d tensor; no host sync)."""
        clamped = self.log_temperature.exp().clamp(self.cfg.temperature_min, self.cfg.temperature_max)
        return clamped * self.temperature_schedule

    def assignment(self) -> torch.Tensor:
        """The channel-to-class assignment A [C, K] (rows sum to 1 for the released softmax over classes)."""
        if not self.learnable:
            return self.fixed_assignment
        logits = self.assignment_logits.float() / self.temperature()
        return torch.softmax(logits, dim=self.softmax_dim)

    # -- forward and losses
    def forward(self, x: torch.Tensor) -> UnitOutput:
        if self.spec.pool_before == "avg":
            x = F.avg_pool2d(x, 2, 2, ceil_mode=True)
        elif self.spec.pool_before == "max":
            x = F.max_pool2d(x, 2, 2, ceil_mode=True)
        pooled, y = self.activity(self.conv(x))
        assignment = self.assignment()
        scores = pooled @ assignment.to(pooled.dtype)
        if self.score_scale != 1.0:
            scores = scores * self.score_scale
        return UnitOutput(
            passed=self._normalise(y.detach()), scores=scores, extras={"assignment": assignment}
        )

    def _normalise(self, y: torch.Tensor) -> torch.Tensor:
        if self.cfg.norm == "group":
            return F.group_norm(y, self.num_classes, eps=NORM_EPS)
        if self.cfg.norm == "instance":
            # GroupNorm with one group per channel is InstanceNorm exactly, and ~8x faster on CPU.
            return F.group_norm(y, y.shape[1], eps=NORM_EPS)
        return y

    def local_losses(
        self, out: UnitOutput, target: torch.Tensor, ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        terms = {"ce": F.cross_entropy(out.scores.float(), target, label_smoothing=self.cfg.label_smoothing)}
        if self.learnable:  # a fixed one-hot A has constant (zero) regularisers: nothing to log or learn
            assignment = out.extras["assignment"].float()
            # A term with weight 0 is still logged, but without a graph behind it.
            ent_in = assignment if self.cfg.lambda_entropy > 0 else assignment.detach()
            ortho_in = assignment if self.cfg.lambda_ortho > 0 else assignment.detach()
            terms["entropy"] = assignment_entropy(ent_in)
            terms["ortho"] = assignment_orthogonality(ortho_in, self.cfg.ortho_form)
        return terms

    # -- schedules and interpretability outputs
    def set_schedule(self, at: float) -> None:
        if self.learnable:
            self.temperature_schedule.fill_(self.cfg.temperature_decay**at)

    @torch.no_grad()
    def epoch_stats(self) -> dict[str, float]:
        assignment = self.assignment()
        stats = assignment_diagnostics(assignment, self.cfg.assignment_axis)
        if self.learnable:
            stats["temperature"] = self.temperature()
            stats["assignment_entropy"] = assignment_entropy(assignment)
        names = list(stats)
        values = torch.stack([stats[k].float() for k in names]).tolist()  # one sync
        return dict(zip(names, values))

    @torch.no_grad()
    def artifacts(self) -> dict[str, torch.Tensor]:
        out = {"assignment": self.assignment().detach().clone()}
        if self.learnable:
            out["temperature"] = self.temperature().detach().clone()
        return out


# --------------------------------------------------------------------------------- plan checks
def check_layer(spec: LayerSpec, num_classes: int) -> None:
    if spec.kind != "conv":
        raise ConfigError(
            f"layer {spec.index} is a {spec.kind!r} layer; channel-wise units need conv layers "
            f"(model.arch one of: {', '.join(CONV_ARCHS)})"
        )
    if spec.pool_after is not None:
        raise ConfigError(
            f"layer {spec.index} asks for pool_after={spec.pool_after!r}, which channel-wise units do not "
            f"define (model.arch one of: {', '.join(CONV_ARCHS)})"
        )
    if spec.out_channels % num_classes != 0:
        raise ConfigError(
            f"layer {spec.index} has {spec.out_channels} channels, not divisible by K={num_classes} classes"
        )


def widths_that_fit(model: ModelConfig, info: DataInfo, limit: int = 8) -> list[float]:
    """model.width values (steps of 0.01 up to 4) for which every layer's channels are a multiple of K."""
    found = []
    for step in range(1, 401):
        width = step / 100
        try:
            plan = build_plan(dataclasses.replace(model, width=width), info)
        except ConfigError:
            continue
        if all(s.out_channels % info.num_classes == 0 for s in plan.layers):
            found.append(width)
            if len(found) == limit:
                break
    return found


def check_plan(plan: ArchPlan, model: ModelConfig, info: DataInfo, norm: str = "group") -> None:
    """Fail before any work when a layer cannot be split into K class groups, saying which widths would."""
    k = info.num_classes
    for spec in plan.layers:
        if spec.kind != "conv" or spec.pool_after is not None:
            check_layer(spec, k)
        if norm == "instance" and spec.out_size == 1:
            raise ConfigError(
                f"{plan.name} layer {spec.index} outputs 1x1 maps for {info.image_size}px input, and "
                "InstanceNorm needs more than one position; raise data.image_size or use params.norm=group"
            )
        if spec.out_channels % k:
            fits = widths_that_fit(model, info)
            hint = (
                f"model.width values that work: {', '.join(f'{w:g}' for w in fits)}"
                if fits
                else "no model.width up to 4 works; change model.base_planes"
            )
            raise ConfigError(
                f"{plan.name} layer {spec.index} has {spec.out_channels} channels (model.width="
                f"{model.width:g}), not divisible by K={k} classes of {info.name}; every layer needs a "
                f"multiple of K (one group of channels per class). {hint}"
            )


# --------------------------------------------------------------------------------- the method base
#: recipe keys a channel-wise method also takes as its plain defaults (network, optimiser, readout)
DEFAULT_KEYS = ("model.arch", "optim.name", "optim.lr", "optim.weight_decay", "optim.scheduler",
                "optim.lr_min", "optim.grad_clip", "readout.name")  # fmt: skip


def defaults_from(recipe: dict[str, Any]) -> dict[str, Any]:
    """A method's defaults: the network, optimiser and readout of its paper recipe, every readout logged."""
    return {**{key: recipe[key] for key in DEFAULT_KEYS}, "readout.extra": ["sip", "lcs", "sum", "last"]}


class ChannelwiseMethod(Method):
    """A stack of channel-wise units on a conv plan (ResNet-17, VGG-14/13, TinyCNN), with input LayerNorm."""

    Config: ClassVar[type] = ChannelwiseConfig
    smoke_overrides: ClassVar[dict[str, Any]] = {"model.width": 0.1}

    def build(self) -> LocalNetwork:
        if self.cfg.model.arch not in CONV_ARCHS:
            raise ConfigError(
                f"model.arch={self.cfg.model.arch!r} cannot be trained by {self.name}; "
                f"choose one of: {', '.join(CONV_ARCHS)}"
            )
        plan = build_plan(self.cfg.model, self.info)
        check_plan(plan, self.cfg.model, self.info, self.params.norm)
        units = [ChannelwiseUnit(spec, self.info.num_classes, self.params) for spec in plan.layers]
        stem = InputLayerNorm() if self.params.input_norm == "layer" else None
        return LocalNetwork(units, plan, stem)

    def loss_weights(self, at: float) -> dict[str, float]:
        p = self.params
        sign = 1.0 if p.entropy_direction == "minimize" else -1.0  # maximise H: minimise -lambda_H H
        return {
            "ce": 1.0,
            "entropy": sign * p.lambda_entropy,
            "ortho": p.lambda_ortho * ortho_warmup(at, p.ortho_warmup_epochs),
        }

    def epoch_schedules(self) -> list[str]:
        p, found = self.params, []
        if p.assignment == "learnable" and p.temperature_decay != 1.0:
            found.append(f"temperature decay ({p.temperature_decay}^epoch)")
        if p.assignment == "learnable" and p.lambda_ortho > 0 and p.ortho_warmup_epochs > 0:
            found.append(f"orthogonality warm-up (over {p.ortho_warmup_epochs} epochs)")
        return found
