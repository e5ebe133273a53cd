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
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cawbench.archs import ArchPlan, LayerSpec, build_plan
from cawbench.config import ConfigError, ModelConfig, RunConfig
from cawbench.data import DataInfo
from cawbench.layers import MEAN_POOL, ReluDropoutPool, channel_pool
from cawbench.method import (
    Gathered,
    Handoff,
    LocalNetwork,
    LocalUnit,
    Method,
    SharedPieces,
    SharedTerms,
    StepContext,
    UnitOutput,
)

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
    uniform A gives (C/K) ln K. A stack of assignments [..., C, K] gives one value per assignment.
    """
    k = assignment.shape[-1]
    return -(assignment * torch.log(assignment + ENTROPY_EPS)).sum((-2, -1)) / k


def column_gram(assignment: torch.Tensor) -> torch.Tensor:
    """G = Ahat^T Ahat [K, K], Ahat = A with L2-normalised columns (+1e-10 on each norm, as released);
    [..., K, K] for a stack of assignments [..., C, K]."""
    columns = assignment / (assignment.norm(dim=-2, keepdim=True) + ORTHO_EPS)
    return columns.transpose(-2, -1) @ columns


def assignment_orthogonality(
    assignment: torch.Tensor, form: str = "released", channels: torch.Tensor | None = None
) -> torch.Tensor:
    """Zero when the classes use disjoint channel sets; G = :func:`column_gram` of A [C, K] (one value per
    assignment of a stack [..., C, K]; ``channels``: each assignment's own C when the stack pads them with
    zero rows to one C).

    ``released``: O(A) = (1/(K^2 C)) mean_{k,k'} (G - I)^2 (spec 1(b)6; the authors' double normalisation,
    ~1e-7 in practice). ``frobenius``: the textbook ||G - I||_F^2 = sum_{k,k'} (G - I)^2, no further
    normalisation (the overview's reading of the term as a real penalty).
    """
    c, k = assignment.shape[-2:]
    gram = column_gram(assignment)
    squared = (gram - torch.eye(k, device=assignment.device, dtype=gram.dtype)) ** 2
    if form == "frobenius":
        return squared.sum((-2, -1))
    return squared.mean((-2, -1)) / (k * k * (c if channels is None else channels))


def temperature_of(
    log_temperature: torch.Tensor, schedule: torch.Tensor, cfg: ChannelwiseConfig
) -> torch.Tensor:
    """T = clamp(exp(tau), T_min, T_max) * decay**at (elementwise: one unit's 0-d tau, or a stack)."""
    return log_temperature.exp().clamp(cfg.temperature_min, cfg.temperature_max) * schedule


def assignment_of(logits: torch.Tensor, temperature: torch.Tensor, softmax_dim: int) -> torch.Tensor:
    """A = softmax(W / T) over classes (``softmax_dim`` -1) or channels (-2), in float32; for a stack of
    logits [n, C, K], T has shape [n, 1, 1]."""
    return torch.softmax(logits.float() / temperature, dim=softmax_dim)


def smoothed_targets(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(1 - eps) onehot(y) + eps / K [B, K]: cross-entropy against it is label-smoothed cross-entropy."""
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return targets.scatter_(1, labels.unsqueeze(1), 1.0 - smoothing + off)


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
        self.softmax_dim = -1 if cfg.assignment_axis == "classes" else -2
        # Handed over by ChannelwiseMethod.share_pieces for one training step (train.merge_units=all): the
        # assignment computed with the other units' of this shape (its entropy and orthogonality are then
        # computed there too), and the label-smoothed CE target shared by every unit.
        self.handed_assignment: torch.Tensor | None = None
        self.handed_target: torch.Tensor | None = None

    # -- assignment
    def temperature(self) -> torch.Tensor:
        """T = clamp(exp(tau), T_min, T_max) * decay**at (a 0-d tensor; no host sync)."""
        return temperature_of(self.log_temperature, self.temperature_schedule, self.cfg)

    def assignment(self) -> torch.Tensor:
        """The channel-to-class assignment A [C, K] (rows sum to 1 for the released softmax over classes)."""
        if not self.learnable:
            return self.fixed_assignment
        return assignment_of(self.assignment_logits, self.temperature(), self.softmax_dim)

    # -- forward and losses
    def forward(self, x: torch.Tensor) -> UnitOutput:
        if self.spec.pool_before == "avg":
            x = F.avg_pool2d(x, 2, 2, ceil_mode=True)
        elif self.spec.pool_before == "max":
            x = F.max_pool2d(x, 2, 2, ceil_mode=True)
        pooled, y = self.activity(self.conv(x))
        assignment = self.handed_assignment if self.handed_assignment is not None else self.assignment()
        scores = pooled @ assignment.to(pooled.dtype)
        if self.score_scale != 1.0:
            scores = scores * self.score_scale
        # y carries no graph out of the fused node; the plain composition's is cut here
        passed = self._normalise(y.detach() if y.requires_grad else y)
        return UnitOutput(passed=passed, scores=scores, extras={"assignment": assignment})

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
        scores = out.scores.float()
        if self.handed_target is not None:  # the smoothed target distribution, made once for every unit
            terms = {"ce": F.cross_entropy(scores, self.handed_target)}
        else:
            terms = {"ce": F.cross_entropy(scores, target, label_smoothing=self.cfg.label_smoothing)}
        # A fixed one-hot A has constant (zero) regularisers: nothing to log or learn. A handed-over A has
        # its regularisers computed with the other units' (ChannelwiseMethod.share_pieces).
        if self.learnable and self.handed_assignment is None:
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


@dataclass(frozen=True)
class _StackLayout:
    """Where the assignments of units with C_1..C_n channels sit in one zero-padded [n, C_max, K] stack."""

    sizes: list[int]  # C of each unit
    c_max: int
    rows: torch.Tensor  # the stack's real rows, unit by unit, as indices into its [n * C_max, K] view
    mask: torch.Tensor  # [n, C_max, 1]: 1 on real rows
    channels: torch.Tensor  # [n] float: C of each unit

    @staticmethod
    def of(units: list[ChannelwiseUnit], c_max: int) -> _StackLayout:
        device = units[0].assignment_logits.device
        sizes = [u.assignment_logits.shape[0] for u in units]
        rows = torch.cat([torch.arange(c) + i * c_max for i, c in enumerate(sizes)]).to(device)
        mask = (torch.arange(c_max)[None, :] < torch.tensor(sizes)[:, None]).float()[..., None].to(device)
        channels = torch.tensor(sizes, dtype=torch.float32, device=device)
        return _StackLayout(sizes, c_max, rows, mask, channels)

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rows of the units one after the other ([sum C, ...]) -> one tensor per unit."""
        return rows.split(self.sizes)

    def assemble(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """The stack's gradient from the units' leaves' gradients (zero on padding rows)."""
        flat = torch.cat(grads)
        stack = flat.new_zeros(len(self.sizes) * self.c_max, flat.shape[1]).index_copy(0, self.rows, flat)
        return stack.view(len(self.sizes), self.c_max, -1)


def _gather(params: list[torch.Tensor], join, split) -> Gathered:
    """The parameters joined into one leaf (no graph back to them: the engine splits its gradient)."""
    with torch.no_grad():
        leaf = join(params)
    return Gathered(leaf.requires_grad_(), params, split)


def _take_back(units: list[ChannelwiseUnit]) -> None:
    for unit in units:
        unit.handed_assignment = unit.handed_target = None


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

    def __init__(self, cfg: RunConfig, info: DataInfo) -> None:
        super().__init__(cfg, info)
        self._layouts: dict[tuple[int, ...], _StackLayout] = {}  # per set of units sharing pieces
        self._units: list[ChannelwiseUnit] = []  # the network's units (set by build)

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
        self._units = units
        return LocalNetwork(units, plan, stem)

    def loss_weights(self, at: float) -> dict[str, float]:
        p = self.params
        sign = 1.0 if p.entropy_direction == "minimize" else -1.0  # maximise H: minimise -lambda_H H
        return {
            "ce": 1.0,
            "entropy": sign * p.lambda_entropy,
            "ortho": p.lambda_ortho * ortho_warmup(at, p.ortho_warmup_epochs),
        }

    def share_pieces(
        self, units: Sequence[LocalUnit], targets: Sequence[torch.Tensor], ctxs: Sequence[StepContext]
    ) -> SharedPieces | None:
        """What the channel-wise units of a step compute alike, once for all: the learnable assignments
        (temperature, softmax, entropy and orthogonality) of every unit as one zero-padded stack, each unit's
        assignment handed to its forward as a detached leaf; the label-smoothed CE target of each label
        tensor. Same maths as the units' own (padding rows add exact zeros), summed in another order."""
        mine = [(j, u) for j, u in enumerate(units) if isinstance(u, ChannelwiseUnit)]
        pieces = SharedPieces(release=functools.partial(_take_back, [u for _, u in mine]))
        if self.params.label_smoothing > 0:
            made: dict[int, torch.Tensor] = {}
            for j, unit in mine:
                y = targets[j]
                if id(y) not in made:
                    made[id(y)] = smoothed_targets(y, unit.num_classes, self.params.label_smoothing)
                unit.handed_target = made[id(y)]
        learnable = [(j, u) for j, u in mine if u.learnable]
        if learnable:
            handoff, gathered, layout = self._shared_assignments([u for _, u in learnable])
            pieces.handoffs.append(handoff)
            pieces.gathered += gathered
            pieces.terms.append(self._shared_regularisers([j for j, _ in learnable], handoff.source, layout))
        return pieces

    def _layout(self, units: list[ChannelwiseUnit]) -> _StackLayout:
        key = tuple(id(u) for u in units)
        if key not in self._layouts:
            # Padded to the network's widest layer, whichever units share a step (a pipeline tick runs a
            # few): every unit's slice of the stack has one shape, so its sums run the same way each time.
            widest = max(u.spec.out_channels for u in [*self._units, *units])
            self._layouts[key] = _StackLayout.of(units, widest)
        return self._layouts[key]

    def _shared_assignments(
        self, units: list[ChannelwiseUnit]
    ) -> tuple[Handoff, list[Gathered], _StackLayout]:
        """A of every unit in one [n, C_max, K] stack, rows past a unit's C zero; the leaves are the real
        rows, one [C, K] tensor per unit."""
        layout = self._layout(units)
        n, k = len(units), units[0].num_classes
        softmax_dim = units[0].softmax_dim
        gathered = [_gather([u.assignment_logits for u in units], torch.cat, layout.split)]
        logits = gathered[0].leaf
        if self.params.learn_temperature:
            gathered.append(_gather([u.log_temperature for u in units], torch.stack, torch.unbind))
            log_temperatures = gathered[-1].leaf
        else:
            log_temperatures = torch.stack([u.log_temperature for u in units])  # buffers
        # padding rows: 0 when the softmax runs over classes (masked below), -inf over channels (weight 0)
        fill = 0.0 if softmax_dim == -1 else float("-inf")
        padded = logits.new_full((n * layout.c_max, k), fill).index_copy(0, layout.rows, logits)
        temperatures = temperature_of(
            log_temperatures, torch.stack([u.temperature_schedule for u in units]), self.params
        )
        stacked = assignment_of(padded.view(n, layout.c_max, k), temperatures.view(-1, 1, 1), softmax_dim)
        stacked = stacked * layout.mask
        leaves = list(stacked.detach().view(-1, k).index_select(0, layout.rows).split(layout.sizes))
        for unit, leaf in zip(units, leaves, strict=True):
            unit.handed_assignment = leaf.requires_grad_()
        return Handoff(stacked, leaves, layout.assemble), gathered, layout

    def _shared_regularisers(
        self, positions: list[int], stacked: torch.Tensor, layout: _StackLayout
    ) -> SharedTerms:
        p = self.params
        ent_in = stacked if p.lambda_entropy > 0 else stacked.detach()  # logged without a graph
        ortho_in = stacked if p.lambda_ortho > 0 else stacked.detach()
        return SharedTerms(
            positions,
            {
                "entropy": assignment_entropy(ent_in),
                "ortho": assignment_orthogonality(ortho_in, p.ortho_form, layout.channels),
            },
        )

    def epoch_schedules(self) -> list[str]:
        p, found = self.params, []
        if p.assignment == "learnable" and p.temperature_decay != 1.0:
            found.append(f"temperature decay ({p.temperature_decay}^epoch)")
        if p.assignment == "learnable" and p.lambda_ortho > 0 and p.ortho_warmup_epochs > 0:
            found.append(f"orthogonality warm-up (over {p.ortho_warmup_epochs} epochs)")
        return found
