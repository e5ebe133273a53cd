"""One training batch through every unit (:class:`BatchStep`), and what that step reads and writes.

Per mini-batch every unit runs forward on its detached input, its weighted local loss is backpropagated
inside the unit only, its optimiser steps, and its output (computed before the update) feeds the next
unit. :class:`StepState` is the one object a batch carries: its schedule point (position, loss weights,
units that train) and the epoch's statistics. Loss terms and accuracies accumulate on the device
(:class:`StepStats`) and are read once per epoch, so nothing in the layer loop waits for the host.
Executors (:mod:`cawbench.engine.executors`) decide the order in which batches and units run.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from cawbench.config import OptimConfig
from cawbench.engine.devices import autocast
from cawbench.method import LocalNetwork, Method, StepContext
from cawbench.schedule import lr_at


@dataclasses.dataclass
class UnitState:
    """A unit with what trains it: its trainable parameters, optimiser, settings and clipping."""

    unit: nn.Module
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer | None
    optim: OptimConfig  # this unit's optimiser settings (the run's, with the unit's overrides)
    clip: float | None
    scheduled_at: float | None = None  # schedule position last applied (unit schedules and LR)


def weighted_sum(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """sum_k w_k * term_k in float32 (weight-1 terms are not multiplied: fewer kernels per unit and step).
    Weight-0 terms stay in: their zero gradient still reaches the optimiser (AdamW's decay and moments)."""
    total = None
    for k, v in terms.items():
        w = weights.get(k, 1.0)
        v = v.float() if w == 1.0 else w * v.float()
        total = v if total is None else total + v
    return total


class StepStats:
    """Per-unit sums over an epoch, kept on the device and read once at its end (no host sync per step).

    Sums are updated in place, so a captured CUDA graph that replays the step keeps accumulating.
    ``weighted``: also sum weight * term every step (the weights move within an epoch under
    ``train.budget_schedules``); otherwise the weighted means are the epoch's weight times the mean."""

    def __init__(self, n_units: int, device: torch.device, weighted: bool = False) -> None:
        self.term_sums: list[dict[str, torch.Tensor]] = [{} for _ in range(n_units)]
        self.weighted_sums: list[dict[str, torch.Tensor]] | None = (
            [{} for _ in range(n_units)] if weighted else None
        )
        # Each term's value on its first batch of the epoch (the divergence check's scale).
        self.first_terms: list[dict[str, torch.Tensor]] = [{} for _ in range(n_units)]
        self.correct = torch.zeros(n_units, device=device)
        self.seen = torch.zeros(n_units, device=device)
        self.steps = 0
        self.active_steps = [0] * n_units  # steps in which each unit trained (the mean's denominator)

    def count_step(self, ctx: StepContext) -> None:
        """One batch went (or goes) through every unit; called once per batch by every executor."""
        self.steps += 1
        for i in range(len(self.active_steps)):
            self.active_steps[i] += ctx.trains(i)

    def add_terms(self, i: int, terms: dict[str, torch.Tensor], weights: Mapping[str, float]) -> None:
        values = {k: v.detach().float() for k, v in terms.items()}
        for k, v in values.items():
            if k not in self.term_sums[i]:
                self.first_terms[i][k] = v.clone()
        _accumulate(self.term_sums[i], values)
        if self.weighted_sums is not None:
            names = list(values)
            scaled = torch._foreach_mul([values[k] for k in names], [weights.get(k, 1.0) for k in names])
            _accumulate(self.weighted_sums[i], dict(zip(names, scaled)))

    def add_scores(self, i: int, scores: torch.Tensor, y: torch.Tensor) -> None:
        labels = y[: scores.shape[0]]
        self.correct[i].add_((scores.detach().argmax(1) == labels).sum())
        self.seen[i].add_(labels.shape[0])


def _accumulate(sums: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    if sums.keys() == values.keys() and len(values) > 1:  # the usual case: one kernel for every term
        torch._foreach_add_(list(sums.values()), [values[k] for k in sums])
        return
    for k, v in values.items():
        if k in sums:
            sums[k].add_(v)
        else:
            sums[k] = v.clone()


@dataclasses.dataclass(frozen=True)
class StepState(StepContext):
    """Everything one training batch needs besides its data, as one object: where it stands on the run's
    schedules (the :class:`~cawbench.method.StepContext` fields: epoch, step, schedule position, loss-term
    weights, which units train; what a unit's ``local_losses`` sees) and where its statistics go (``stats``,
    the epoch's running sums). The trainer makes one per batch; executors hand it to :class:`BatchStep`."""

    stats: StepStats = dataclasses.field(kw_only=True, compare=False, repr=False)


UnitHook = Callable[[int], contextlib.AbstractContextManager]


class BatchStep:
    """One training mini-batch through every unit: the code path the Trainer and ``cawbench bench`` share.

    Each unit runs forward on its detached input, its weighted local loss is backpropagated inside the unit
    only, its optimiser steps, and its output (computed before the update, never recomputed) feeds the next
    unit through the plan's wiring. Nothing here reads a value back to the host.
    """

    def __init__(
        self,
        method: Method,
        net: LocalNetwork,
        units: list[UnitState],
        device: torch.device,
        bf16: bool,
        *,
        autocast_cache: bool = True,
        lr_horizon: float = 1.0,
    ) -> None:
        self.method, self.net, self.units, self.device, self.bf16 = method, net, units, device, bf16
        self.lr_horizon = lr_horizon  # epochs the LR schedules span (ScheduleClock.lr_horizon)
        self.autocast_cache = autocast_cache

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.bf16, self.autocast_cache)

    def start(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The first unit's input: the method's batch construction, then the network's stem."""
        with self._autocast():
            return self.net.stem(self.method.prepare_batch(x, y, True))

    def unit(
        self,
        i: int,
        h: torch.Tensor,
        shortcut: torch.Tensor | None,
        y: torch.Tensor,
        step: StepState,
        hook: UnitHook | None = None,
        ready: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Train unit ``i`` on ``h``; return the next unit's (detached) input and the running shortcut.
        ``ready``: a CUDA event recorded as soon as that input exists (before this unit's backward)."""
        state = self.units[i]
        if state.scheduled_at != step.at:  # once per epoch, or every step under train.budget_schedules
            self._apply_schedule(state, step.at)
        with hook(i) if hook is not None else contextlib.nullcontext(), self._autocast():
            out = state.unit(h)
            # The next unit's input is ready now (computed before this unit's update): hand it over first,
            # so that with per-unit streams the next unit's forward overlaps this unit's backward.
            passed = self.net.advance(i, out.passed, shortcut)
            if ready is not None:
                ready.record()
            terms = state.unit.local_losses(out, y, step) if step.trains(i) else {}
        if terms:
            loss = weighted_sum(terms, step.weights)
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if state.clip is not None:
                torch.nn.utils.clip_grad_norm_(state.params, state.clip)
            state.optimizer.step()
            step.stats.add_terms(i, terms, step.weights)
        if out.scores is not None:
            step.stats.add_scores(i, out.scores, y)
        return passed

    def _apply_schedule(self, state: UnitState, at: float) -> None:
        """The unit's own schedules and its learning rate at schedule position ``at``."""
        state.unit.set_schedule(at)
        if state.optimizer is not None and state.optim.scheduler != "none":
            lr = lr_at(state.optim, at, self.lr_horizon)
            for group in state.optimizer.param_groups:
                group["lr"] = lr
        state.scheduled_at = at

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, step: StepState, hook: UnitHook | None = None
    ) -> None:
        """The whole batch, unit after unit (the sequential order). ``hook(i)``: a context around unit i's
        forward and loss (``cawbench bench`` counts saved tensors with it)."""
        h, shortcut = self.start(x, y), None
        for i in range(len(self.units)):
            h, shortcut = self.unit(i, h, shortcut, y, step, hook)
