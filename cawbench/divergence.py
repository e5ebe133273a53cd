"""Divergence: one bound check over the per-epoch loss-term means that the engine reads once per epoch.

A loss term of a layer has *diverged* at an epoch when its epoch mean is not finite, or when its magnitude
exceeds ``GROWTH_LIMIT`` (1000) times the term's scale, the larger of

- the magnitude of the term on the first batch it was computed on in this run (each unit computes it before
  its first update: the term's own size at initialisation; this covers terms whose natural size is large,
  such as FF's goodness sums over thousands of units, CaFo's MSE or CAW-Conv's assignment entropy
  (C/K) ln K), and
- ln K, the cross-entropy of a uniform guess over the K classes: the size of every classification loss
  here at initialisation, and a floor for terms that start near zero (the orthogonality regulariser, FF's
  peer term, DFA's surrogate).

Losses fall while a network learns; a term three orders of magnitude above where it started is not slow
learning but a step size the optimiser cannot take (Adam at lr 1e6 gives a CE of ~1e13 on its first
epoch while ln 10 = 2.3). The rule is the same for every method and optimiser; ``tests/test_divergence.py``
trains every registered method and checks that a normal run stays far below it.

The first-batch values are kept in the epoch records (``loss_reference``, at the epoch a term first
appears), so a resumed run keeps its scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

GROWTH_LIMIT = 1000.0
REFERENCE_KEY = "loss_reference"  # epoch-record key: {term: [first-batch value per layer or None]}


class TrainingDiverged(RuntimeError):
    """A loss term became non-finite or exploded past its bound; the message names the term, the layer and
    the epoch, and says which learning rate to lower."""


def references(history: list[dict[str, Any]]) -> dict[tuple[str, int], float]:
    """(term, layer) -> the term's first-batch value, from the epoch records (the first record wins)."""
    out: dict[tuple[str, int], float] = {}
    for record in history:
        for term, values in (record.get(REFERENCE_KEY) or {}).items():
            for layer, value in enumerate(values):
                if value is not None:
                    out.setdefault((term, layer), value)
    return out


def new_references(
    known: dict[tuple[str, int], float], firsts: dict[str, list[float | None]]
) -> dict[str, list[float | None]]:
    """The first-batch values of this epoch for (term, layer) pairs seen for the first time."""
    fresh: dict[str, list[float | None]] = {}
    for term, values in firsts.items():
        row = [v if v is not None and (term, i) not in known else None for i, v in enumerate(values)]
        if any(v is not None for v in row):
            fresh[term] = row
    return fresh


def bound(reference: float | None, num_classes: int) -> float:
    """The largest magnitude an epoch mean may reach: GROWTH_LIMIT x max(|reference|, ln K)."""
    floor = math.log(max(num_classes, 2))
    ref = abs(reference) if reference is not None and math.isfinite(reference) else 0.0
    return GROWTH_LIMIT * max(ref, floor)


def check_epoch(
    means: dict[str, list[float | None]],
    firsts: dict[str, list[float | None]],
    history: list[dict[str, Any]],
    *,
    epoch: int,
    epochs: int,
    num_classes: int,
    lr_of: Callable[[int], float | None],
    config_lr: float,
) -> dict[str, list[float | None]]:
    """Raise :class:`TrainingDiverged` if a term diverged at this epoch; else return this epoch's new
    first-batch references (to be stored in its record under ``REFERENCE_KEY``).

    ``means``/``firsts``: per term, the epoch mean and the epoch's first-batch value per layer (None where a
    layer has no such term); ``history``: the earlier epoch records; ``lr_of(i)``: layer i's learning rate.
    """
    known = references(history)
    fresh = new_references(known, firsts)
    known.update(references([{REFERENCE_KEY: fresh}]))
    for term, values in means.items():
        for layer, value in enumerate(values):
            if value is None:
                continue
            where = f"diverged: {term}, layer {layer}, epoch {epoch + 1}/{epochs}"
            if not math.isfinite(value):
                raise TrainingDiverged(f"{where}: its mean is {value}; {_hint(lr_of(layer), config_lr)}")
            ref = known.get((term, layer))
            limit = bound(ref, num_classes)
            if abs(value) > limit:
                scale = f"first-batch value {ref:.3g}" if ref is not None else "no first-batch value"
                raise TrainingDiverged(
                    f"{where}: its mean {value:.3g} exceeds {limit:.3g} ({GROWTH_LIMIT:g} x the larger of its "
                    f"{scale} and ln K = {math.log(max(num_classes, 2)):.3g}); {_hint(lr_of(layer), config_lr)}"
                )
    return fresh


def _hint(unit_lr: float | None, config_lr: float) -> str:
    if unit_lr is None or math.isclose(unit_lr, config_lr, rel_tol=1e-9):
        return f"lower optim.lr (now {config_lr:g})"
    return f"lower this layer's learning rate (now {unit_lr:g}; optim.lr is {config_lr:g})"
