"""Readouts: per-layer class scores ``[L, N, K]`` -> one prediction score ``[N, K]``.

A readout is fitted after every epoch from the validation split (and the epoch's training losses) and then
applied unchanged to the test split, so no choice ever sees test labels. Any readout works with any
method that emits per-layer scores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cawbench.config import ConfigError, ReadoutConfig
from cawbench.registry import Registry


@dataclass
class ReadoutContext:
    val_scores: torch.Tensor  # [L, N, K]
    val_labels: torch.Tensor  # [N]
    train_loss: list[float]  # per layer: epoch-mean training CE (the "ce" term), NaN if unknown
    cfg: ReadoutConfig


@dataclass(frozen=True)
class Readout:
    name: str
    fit: Callable[[ReadoutContext], dict[str, Any]]  # -> JSON-able state
    combine: Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]  # ([L, N, K], state) -> [N, K]
    description: str = ""
    # Whether fitting it needs validation images under this config (else it fits on nothing or on training)
    uses_validation: Callable[[ReadoutConfig], bool] = lambda cfg: False


READOUTS: Registry[Readout] = Registry("readout")


def add_readout(
    name: str,
    fit: Callable,
    combine: Callable,
    description: str = "",
    uses_validation: Callable[[ReadoutConfig], bool] | None = None,
) -> None:
    READOUTS.add(name, Readout(name, fit, combine, description, uses_validation or (lambda cfg: False)))


def check_readouts(cfg: ReadoutConfig, n_val: int, val_size: Any = None) -> None:
    """Every configured readout exists, and none that is fitted on validation runs without validation images
    (it would silently keep its initial choice)."""
    names = list(dict.fromkeys((cfg.name, *cfg.extra)))
    readouts = [get_readout(name) for name in names]  # unknown names fail before any work
    if n_val > 0:
        return
    for readout in readouts:
        if readout.uses_validation(cfg):
            free = [n for n in list_readouts() if not get_readout(n).uses_validation(cfg)]
            if cfg.lcs_signal == "val":
                free.append("lcs with readout.lcs_signal=train")
            shown = f"{val_size:g}" if isinstance(val_size, (int, float)) else val_size
            raise ConfigError(
                f"data.val_size={shown} leaves no validation images, but readout {readout.name!r} is fitted "
                f"on validation; set data.val_size > 0 (a count, or a fraction < 1), or choose a readout that "
                f"is not: {', '.join(free)}"
            )


def list_readouts(filter: str = "*") -> list[str]:
    return READOUTS.names(filter)


def get_readout(name: str) -> Readout:
    return READOUTS.get(name)


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    if len(labels) == 0:
        return float("nan")
    return (scores.argmax(-1) == labels).float().mean().item()


def per_layer_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> list[float]:
    if len(labels) == 0:
        return [float("nan")] * scores.shape[0]
    return (scores.argmax(-1) == labels[None]).float().mean(1).tolist()


def _resolve(index: int, n_layers: int) -> int:
    return index + n_layers if index < 0 else index


# --------------------------------------------------------------------------------- last / sum
def _fit_none(ctx: ReadoutContext) -> dict[str, Any]:
    return {}


add_readout("last", _fit_none, lambda s, st: s[-1], "the last scoring layer")


def _fit_sum(ctx: ReadoutContext) -> dict[str, Any]:
    n = ctx.val_scores.shape[0]
    start, end = ctx.cfg.sum_range or (0, n - 1)
    start, end = _resolve(start, n), _resolve(end, n)
    if not 0 <= start <= end < n:
        raise ConfigError(f"readout.sum_range={ctx.cfg.sum_range} is outside layers 0..{n - 1}")
    return {"start": start, "end": end}


add_readout("sum", _fit_sum, lambda s, st: s[st["start"] : st["end"] + 1].sum(0), "sum of a layer range")


# --------------------------------------------------------------------------------- SIP
def sip_select(
    val_scores: torch.Tensor, labels: torch.Tensor, initial: tuple[int, int]
) -> tuple[int, int, float]:
    """DeeperForward's Signal Integrating and Pruning: the best contiguous range on held-out data.

    Scan the end layer E in the outer loop and the start S <= E in the inner loop, both ascending, and keep
    a range only if it is strictly better: ties go to the smallest E, then the smallest S. With no held-out
    data the initial range is kept. Ranges are compared by their integer count of correct predictions
    (read from the device in one transfer), so equal accuracies are exactly equal.
    """
    n = val_scores.shape[0]
    best = (_resolve(initial[0], n), _resolve(initial[1], n), float("-inf"))
    if len(labels) == 0:
        return best
    ranges = [(start, end) for end in range(n) for start in range(end + 1)]  # the scan order
    correct = torch.stack(
        [(val_scores[s : e + 1].sum(0).argmax(-1) == labels).sum() for s, e in ranges]
    ).tolist()
    best_count = -1
    for (start, end), count in zip(ranges, correct, strict=True):
        if count > best_count:
            best_count, best = count, (start, end, count / len(labels))
    return best


def _fit_sip(ctx: ReadoutContext) -> dict[str, Any]:
    start, end, acc = sip_select(ctx.val_scores, ctx.val_labels, ctx.cfg.sip_initial)
    return {"start": start, "end": end, "val_acc": acc}


add_readout(
    "sip",
    _fit_sip,
    lambda s, st: s[st["start"] : st["end"] + 1].sum(0),
    "best contiguous range on val",
    uses_validation=lambda cfg: True,
)


# --------------------------------------------------------------------------------- LCS
def lcs_weights(layer_losses: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """CAW-Conv's loss-aware layer contribution: softmax over layers of minus the mean layer loss."""
    return torch.softmax(-layer_losses / temperature, dim=0)


def _fit_lcs(ctx: ReadoutContext) -> dict[str, Any]:
    if ctx.cfg.lcs_signal == "val" and len(ctx.val_labels) > 0:
        losses = torch.stack([F.cross_entropy(s, ctx.val_labels) for s in ctx.val_scores.float()])
    else:
        losses = torch.tensor(ctx.train_loss, dtype=torch.float32)
        if torch.isnan(losses).any():
            raise ConfigError("readout lcs needs a per-layer training 'ce' term; this method logs none")
    weights = lcs_weights(losses.cpu(), ctx.cfg.lcs_temperature)
    return {"weights": weights.tolist(), "signal": ctx.cfg.lcs_signal}


def _combine_lcs(scores: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
    w = torch.tensor(state["weights"], dtype=scores.dtype, device=scores.device)
    return (w[:, None, None] * scores).sum(0)


add_readout(
    "lcs",
    _fit_lcs,
    _combine_lcs,
    "layers weighted by softmax(-mean layer CE)",
    uses_validation=lambda cfg: cfg.lcs_signal == "val",
)


# --------------------------------------------------------------------------------- probability sum
add_readout(
    "softmax_sum",
    _fit_none,
    lambda s, st: torch.softmax(s.float(), -1).sum(0),
    "sum over layers of softmax(scores)",
)
