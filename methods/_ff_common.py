"""What FF and SymBa share: label-embedded MLP layers with goodness, length normalisation, negatives,
label-sweep inference and the optional one-pass softmax head (spec baselines.md §1, §2, §6.1).

A layer maps its length-normalised input a = x / ||x|| (L2 or RMS, never centred) to h = ReLU(W a + b)
and scores it with the goodness G(h) = sum or mean of h². Training rows are laid out as
``[positives (B); negatives (B); neutral (B, only with the softmax head)]``: positives carry the true
label, negatives the same image with a wrong label, neutral rows the class-average label. Each layer's
input is detached by the engine, so every layer learns only from its own pair loss (FF's threshold loss
or SymBa's symmetric loss: subclasses choose). Inference embeds every label in turn (K passes, batched)
and reports each layer's goodness per label as that layer's class scores; the default readout sums them
over all layers but the first (Hinton's rule).

Not implemented from the references: loeweX's downstream linear classifier trained on every batch is
the ``softmax_head`` switch here but fed the neutral-label pass (Hinton's one-pass rule), not the
positive pass; Hinton's recurrent / locally connected nets are out of scope (MLP only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cawbench.archs import LayerSpec, build_plan
from cawbench.config import ConfigError, RunConfig
from cawbench.data import DataInfo
from cawbench.layers import length_normalise
from cawbench.method import LocalNetwork, LocalUnit, Method, StepContext, UnitOutput
from cawbench.seeding import derive_seed

PairLoss = Callable[[torch.Tensor, torch.Tensor, int], dict[str, torch.Tensor]]  # (G+, G-, layer width)

#: rows per label-sweep chunk at evaluation: bounds memory when K (and the batch) is large
SWEEP_ROWS = 16_384


# --------------------------------------------------------------------------------- maths
def goodness(h: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-row goodness: the sum (Hinton) or the mean (mohammadpz, dah33) of squared activities."""
    squares = h.float().pow(2)
    return squares.sum(1) if kind == "sum" else squares.mean(1)


def mlp_twin(recipe: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The BP twin of an FF-family recipe (a backprop recipe): its MLP, data split, batch size and epochs;
    FF's length normalisation (RMS) before every layer; Adam 1e-3 (spec baselines.md §5)."""
    kept = ("model.", "data.", "train.")
    return {
        ds: {**{k: v for k, v in over.items() if k.startswith(kept)}, "params.norm": "rms"}
        for ds, over in recipe.items()
    }


def ff_threshold_loss(g_pos: torch.Tensor, g_neg: torch.Tensor, theta: float) -> torch.Tensor:
    """Hinton's per-layer loss: mean over pairs of softplus(θ − G⁺) + softplus(G⁻ − θ)."""
    return (F.softplus(theta - g_pos) + F.softplus(g_neg - theta)).mean()


def symba_loss(g_pos: torch.Tensor, g_neg: torch.Tensor, alpha: float) -> torch.Tensor:
    """SymBa's symmetric loss: mean over pairs of softplus(−α (G⁺ − G⁻)).

    ``F.softplus`` returns its input unchanged above 20 and underflows to 0 far below, so |αΔ| of 1e4
    stays finite where the naive log(1 + exp(·)) overflows.
    """
    return F.softplus(-alpha * (g_pos - g_neg)).mean()


class _ReluFullGrad(torch.autograd.Function):
    """ReLU forward; the backward lets the gradient through everywhere (loeweX's "full grad" ReLU)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


def uniform_wrong_labels(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """A label drawn uniformly from the K−1 classes other than ``y`` (never the true one)."""
    shift = torch.randint(1, num_classes, y.shape, device=y.device)
    return (y + shift) % num_classes


def hard_wrong_labels(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A wrong label drawn with probability softmax(scores) restricted to the wrong classes (Hinton's
    hard negatives: the labels the net itself finds most plausible are drawn most often)."""
    logits = scores.float().scatter(1, y[:, None], float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=1), 1).squeeze(1)


# --------------------------------------------------------------------------------- configuration
GOODNESS = ("mean", "sum")
NORMS = ("rms", "l2")
LABEL_VALUES = ("max", "constant")
NEGATIVES = ("uniform", "hard")
RELU_GRADS = ("standard", "full")
INITS = ("torch", "normal")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"params.{name}={value!r} is not valid; choose one of: {', '.join(choices)}")


@dataclass(frozen=True)
class FFFamilyConfig:
    goodness: str = "mean"  # mean | sum of squared activities
    norm: str = "rms"  # rms (loeweX) | l2 (mohammadpz): length normalisation of every layer's input
    norm_eps: float | None = None  # None: 1e-8 for rms (loeweX), 1e-4 for l2 (mohammadpz)
    label_value: str = "max"  # max: each image's own max (mohammadpz, per sample) | constant
    label_constant: float = 1.0  # the value written when label_value=constant (loeweX: 1.0)
    negatives: str = "uniform"  # uniform over the wrong labels (loeweX) | hard: by the net's own goodness
    softmax_head: bool = False  # add Hinton's one-pass head on a neutral label (a unit with its own CE)
    head_lr: float | None = None  # the head's learning rate; None: optim.lr
    peer_norm: float = 0.0  # weight of loeweX's peer-normalisation term (0.03 in loeweX; 0 = off)
    peer_momentum: float = 0.9
    relu_grad: str = "standard"  # standard | full (loeweX: gradient passes where the unit is off)
    init: str = "torch"  # torch: nn.Linear's default | normal: N(0, 1/out_features), zero bias (loeweX)

    def __post_init__(self) -> None:
        _choice("goodness", self.goodness, GOODNESS)
        _choice("norm", self.norm, NORMS)
        _choice("label_value", self.label_value, LABEL_VALUES)
        _choice("negatives", self.negatives, NEGATIVES)
        _choice("relu_grad", self.relu_grad, RELU_GRADS)
        _choice("init", self.init, INITS)
        if self.norm_eps is not None and not self.norm_eps > 0:
            raise ConfigError(f"params.norm_eps must be > 0 or null, got {self.norm_eps!r}")
        if self.peer_norm < 0 or not 0 <= self.peer_momentum < 1:
            raise ConfigError("params.peer_norm must be >= 0 and params.peer_momentum in [0, 1)")
        if self.head_lr is not None and not self.head_lr > 0:
            raise ConfigError(f"params.head_lr must be > 0 or null, got {self.head_lr!r}")

    @property
    def eps(self) -> float:
        if self.norm_eps is not None:
            return self.norm_eps
        return 1e-8 if self.norm == "rms" else 1e-4


# --------------------------------------------------------------------------------- units
class FFLayer(LocalUnit):
    """normalise -> linear -> ReLU; goodness per row; the pair loss on [positives; negatives] rows.

    With the softmax head on, the passed tensor also carries the normalised activities of the layers the
    head reads, appended after this layer's own activity ``h``: ``[h, carried..., norm(h)?]``. The next
    layer reads only its first ``in_features`` columns, so this carry is plain dataflow through the engine.
    """

    def __init__(self, spec: LayerSpec, cfg: FFFamilyConfig, pair_loss: PairLoss, feeds_head: bool) -> None:
        super().__init__()
        self.in_features = spec.in_channels
        self.linear = nn.Linear(spec.in_channels, spec.out_channels)
        if cfg.init == "normal":
            nn.init.normal_(self.linear.weight, 0.0, spec.out_channels**-0.5)
            nn.init.zeros_(self.linear.bias)
        self.cfg = cfg
        self.pair_loss = pair_loss
        self.width = spec.out_channels
        self.feeds_head = feeds_head
        self.register_buffer("running_activity", torch.zeros(spec.out_channels))

    def forward(self, x: torch.Tensor) -> UnitOutput:
        x = x.flatten(1)
        inputs, carried = x[:, : self.in_features], x[:, self.in_features :]
        pre = self.linear(length_normalise(inputs, self.cfg.norm, self.cfg.eps))
        h = _ReluFullGrad.apply(pre) if self.cfg.relu_grad == "full" else F.relu(pre)
        parts = [h, carried]
        if self.feeds_head:
            parts.append(length_normalise(h.detach(), self.cfg.norm, self.cfg.eps))
        passed = torch.cat(parts, dim=1) if len(parts) > 2 or carried.shape[1] else h
        return UnitOutput(
            passed=passed, scores=None, extras={"goodness": goodness(h, self.cfg.goodness), "h": h}
        )

    def local_losses(
        self, out: UnitOutput, target: torch.Tensor, ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        b = target.shape[0]
        g = out.extras["goodness"]
        terms = self.pair_loss(g[:b], g[b : 2 * b], self.width)
        if self.cfg.peer_norm > 0:
            terms["peer"] = self._peer_term(out.extras["h"][:b])
        return terms

    def _peer_term(self, h_pos: torch.Tensor) -> torch.Tensor:
        """loeweX's peer normalisation: push each unit's running mean activity towards the layer mean."""
        m = self.cfg.peer_momentum
        running = self.running_activity * m + h_pos.float().mean(0) * (1 - m)
        self.running_activity.copy_(running.detach())
        return (running.mean() - running).pow(2).mean()


class FFSoftmaxHead(LocalUnit):
    """Hinton's one-pass readout: a linear softmax (no bias, zero init as loeweX) on the normalised
    activities of all layers but the first, computed on the neutral-label rows; trained by its own CE."""

    def __init__(self, in_features: int, skip: int, num_classes: int, lr: float | None) -> None:
        super().__init__()
        self.skip = skip  # the last layer's own activity, which precedes the carried features
        self.linear = nn.Linear(in_features, num_classes, bias=False)
        nn.init.zeros_(self.linear.weight)
        self.optim_overrides = {"lr": lr} if lr is not None else None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1)[:, self.skip :])

    def forward(self, x: torch.Tensor) -> UnitOutput:
        # Training batches are [positives; negatives; neutral]: the head sees only the neutral third.
        rows = x[-(x.shape[0] // 3) :] if self.training else x
        logits = self.logits(rows)
        return UnitOutput(passed=logits, scores=logits)

    def local_losses(
        self, out: UnitOutput, target: torch.Tensor, ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        return {"ce": F.cross_entropy(out.scores.float(), target)}


# --------------------------------------------------------------------------------- the method
class FFFamilyMethod(Method):
    """Base of FF and SymBa: subclasses give ``pair_loss`` and may change ``class_codes`` (SymBa's ICP)."""

    Config: ClassVar[type] = FFFamilyConfig
    defaults: ClassVar[dict[str, Any]] = {
        "model.arch": "mlp",
        "readout.name": "sum",
        "readout.sum_range": (1, -1),  # Hinton: all layers but the first
        "optim.name": "adam",
    }

    def __init__(self, cfg: RunConfig, info: DataInfo) -> None:
        super().__init__(cfg, info)
        self.net: LocalNetwork | None = None
        self._codes: torch.Tensor | None = None
        if cfg.model.arch != "mlp":
            raise ConfigError(f"method {self.name!r} runs on model.arch='mlp' only, got {cfg.model.arch!r}")
        size = self.input_size
        if self.code_length > size:
            raise ConfigError(
                f"method {self.name!r}: the label embedding needs {self.code_length} input values but "
                f"{info.name} inputs have only {size}"
            )
        if self.params.softmax_head:
            self._check_readouts_skip_head()

    # ----------------------------------------------------------------------------- subclass hooks
    def pair_loss(self, g_pos: torch.Tensor, g_neg: torch.Tensor, width: int) -> dict[str, torch.Tensor]:
        """Named loss terms of one layer from its positives' and negatives' goodness [B]."""
        raise NotImplementedError

    @property
    def code_length(self) -> int:
        """How many leading input values the label occupies."""
        return self.info.num_classes

    def make_class_codes(self) -> torch.Tensor:
        """[K, code_length] 0/1 codes written (times the label value) into the leading input values."""
        return torch.eye(self.info.num_classes)

    # ----------------------------------------------------------------------------- build
    @property
    def input_size(self) -> int:
        return self.info.in_channels * self.info.image_size**2

    def build(self) -> LocalNetwork:
        plan = build_plan(self.cfg.model, self.info)
        n = len(plan.layers)
        head_layers = range(1, n) if n > 1 else range(n)
        head = self.params.softmax_head
        units: list[LocalUnit] = [
            FFLayer(spec, self.params, self.pair_loss, feeds_head=head and i in head_layers)
            for i, spec in enumerate(plan.layers)
        ]
        if head:
            features = sum(plan.layers[i].out_channels for i in head_layers)
            units.append(
                FFSoftmaxHead(
                    features, plan.layers[-1].out_channels, self.info.num_classes, self.params.head_lr
                )
            )
        self.net = LocalNetwork(units)
        return self.net

    def _check_readouts_skip_head(self) -> None:
        """Goodness sums must not include the head's logits: the sum range must end before it."""
        r = self.cfg.readout
        uses_sum = "sum" in (r.name, *r.extra)
        end = (r.sum_range or (0, -1))[1]
        n_layers = len(build_plan(self.cfg.model, self.info).layers)
        if uses_sum and end in (-1, n_layers):
            raise ConfigError(
                f"params.softmax_head=true adds a head after the {n_layers} goodness layers, and "
                f"readout.sum_range={r.sum_range} would add its logits to the goodness sum; use "
                "readout.name=last for the head (and readout.sum_range=[1,-2] for the label sweep)"
            )

    def loss_weights(self, at: float) -> dict[str, float]:
        return {"peer": self.params.peer_norm}

    # ----------------------------------------------------------------------------- label embedding
    def class_codes(self, device: torch.device) -> torch.Tensor:
        if self._codes is None or self._codes.device != device:
            self._codes = self.make_class_codes().float().to(device)
        return self._codes

    def label_values(self, x_flat: torch.Tensor) -> torch.Tensor:
        """[B] the value an "on" label position gets: each image's own maximum, or a constant."""
        if self.params.label_value == "max":
            return x_flat.amax(dim=1)
        return torch.full(x_flat.shape[:1], self.params.label_constant, device=x_flat.device)

    def embed(self, x_flat: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The image with its leading ``code_length`` values replaced by the labels' codes."""
        codes = self.class_codes(x_flat.device)[labels]
        return self._write(x_flat, codes)

    def embed_neutral(self, x_flat: torch.Tensor) -> torch.Tensor:
        """The image with the class-average code (0.1 per one-hot slot for K = 10, as Hinton)."""
        codes = self.class_codes(x_flat.device).mean(0).expand(x_flat.shape[0], -1)
        return self._write(x_flat, codes)

    def _write(self, x_flat: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        out = x_flat.clone()
        out[:, : codes.shape[1]] = codes.to(out.dtype) * self.label_values(x_flat)[:, None].to(out.dtype)
        return out

    def wrong_labels(self, x_flat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.params.negatives == "uniform" or self.net is None:
            return uniform_wrong_labels(y, self.info.num_classes)
        with torch.no_grad():
            per_layer = self.label_sweep(self.net, x_flat)
        start = 1 if len(per_layer) > 1 else 0  # the same layers as Hinton's inference rule
        return hard_wrong_labels(torch.stack(per_layer[start:]).sum(0), y)

    def prepare_batch(self, x: torch.Tensor, y: torch.Tensor, training: bool) -> torch.Tensor:
        x_flat = x.flatten(1)
        if not training:
            return self.embed_neutral(x_flat)
        rows = [self.embed(x_flat, y), self.embed(x_flat, self.wrong_labels(x_flat, y))]
        if self.params.softmax_head:
            rows.append(self.embed_neutral(x_flat))
        return torch.cat(rows)

    # ----------------------------------------------------------------------------- inference
    def _ff_layers(self, net: LocalNetwork) -> list[FFLayer]:
        return [u for u in net.units if isinstance(u, FFLayer)]

    def _walk(self, net: LocalNetwork, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Run the goodness layers; return each layer's goodness [N] and the last passed tensor."""
        h, shortcut, goods = net.stem(x), None, []
        for i, unit in enumerate(self._ff_layers(net)):
            out = unit(h)
            goods.append(out.extras["goodness"])
            h, shortcut = net.advance(i, out.passed, shortcut)
        return goods, h

    @torch.no_grad()
    def label_sweep(self, net: LocalNetwork, x_flat: torch.Tensor) -> list[torch.Tensor]:
        """Per goodness layer, [B, K]: the layer's goodness with each label embedded (K passes, batched)."""
        b, k = x_flat.shape[0], self.info.num_classes
        per_label = max(1, SWEEP_ROWS // max(b, 1))
        columns: list[list[torch.Tensor]] = []
        for first in range(0, k, per_label):
            labels = torch.arange(first, min(first + per_label, k), device=x_flat.device)
            batch = torch.cat([self.embed(x_flat, labels.new_full((b,), int(c))) for c in labels])
            goods, _ = self._walk(net, batch)
            columns.append([g.float().view(len(labels), b).T for g in goods])
        return [torch.cat([chunk[layer] for chunk in columns], dim=1) for layer in range(len(columns[0]))]

    @torch.no_grad()
    def eval_scores(self, net: LocalNetwork, x: torch.Tensor) -> list[torch.Tensor]:
        x_flat = x.flatten(1)
        scores = self.label_sweep(net, x_flat)
        if self.params.softmax_head:
            _, h = self._walk(net, self.embed_neutral(x_flat))
            scores.append(net.units[-1].logits(h).float())
        return scores

    @torch.no_grad()
    def one_pass_scores(self, net: LocalNetwork, x: torch.Tensor) -> torch.Tensor:
        """The head's logits from a single neutral-label pass (what one-pass inference costs)."""
        if not self.params.softmax_head:
            raise ConfigError(f"method {self.name!r}: one-pass inference needs params.softmax_head=true")
        _, h = self._walk(net, self.embed_neutral(x.flatten(1)))
        return net.units[-1].logits(h).float()


def random_class_patterns(num_classes: int, length: int, tag: str) -> torch.Tensor:
    """Fixed 0/1 patterns, half the values on, one per class; the same on every run (seeded by ``tag``)."""
    gen = torch.Generator().manual_seed(derive_seed(tag, num_classes, length) % 2**63)
    return (torch.rand(num_classes, length, generator=gen) < 0.5).float()
