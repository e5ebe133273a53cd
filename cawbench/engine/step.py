"""One training batch through every unit (:class:`BatchStep`), and what that step reads and writes.

Per mini-batch every unit runs forward on its detached input, its weighted local loss is backpropagated
inside the unit only, and its output (computed before the update) feeds the next unit; the units' updates
(clipping, optimiser steps) follow, all at once by default (``train.merge_units``, an update scope:
:meth:`BatchStep.updates`, :mod:`cawbench.engine.updates`). :class:`StepState` is the one object a batch
carries: its schedule point (position, loss weights, units that train) and the epoch's statistics. Loss
terms and accuracies accumulate on the device (:class:`~cawbench.engine.stats.StepStats`) and are read once
per epoch, so nothing in the layer loop waits for the host. Executors (:mod:`cawbench.engine.executors`)
decide the order in which batches and units run, and which units share an update scope.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from cawbench.config import OptimConfig
from cawbench.engine.devices import autocast
from cawbench.engine.stats import StepStats
from cawbench.engine.updates import MERGE_MODES, MergedOptimizers, PendingUpdates, clip_grad_norms_
from cawbench.method import LocalNetwork, Method, StepContext
from cawbench.schedule import lr_at

__all__ = ["BatchStep", "StepState", "StepStats", "UnitHook", "UnitState", "weighted_sum"]


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
    only, and its output (computed before the update, never recomputed) feeds the next unit through the
    plan's wiring. The updates (clipping, optimiser step, loss and accuracy sums) follow ``merge``
    (``train.merge_units``, see :mod:`cawbench.engine.updates`): each unit's right after its backward
    (``none``), or all units' of an update scope at once when the scope ends (:meth:`updates`). Nothing here
    reads a value back to the host.
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
        merge: str = "none",
    ) -> None:
        if merge not in MERGE_MODES:
            raise ValueError(f"merge={merge!r} is not valid; choose one of: {', '.join(MERGE_MODES)}")
        self.method, self.net, self.units, self.device, self.bf16 = method, net, units, device, bf16
        self.lr_horizon = lr_horizon  # epochs the LR schedules span (ScheduleClock.lr_horizon)
        self.autocast_cache = autocast_cache
        self.merge = merge
        self.optimizers = MergedOptimizers()
        self._seed: torch.Tensor | None = None  # d(loss)/d(loss) = 1, one tensor for every backward

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
        pending: PendingUpdates | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Train unit ``i`` on ``h``; return the next unit's (detached) input and the running shortcut.
        ``ready``: a CUDA event recorded as soon as that input exists (before this unit's backward).
        ``pending``: the update scope this unit's update joins (None: update now)."""
        state = self.units[i]
        if state.scheduled_at != step.at:  # once per epoch, or every step under train.budget_schedules
            self._apply_schedule(state, step.at)
        # ``hook`` spans everything this unit does (forward, losses, backward, update): what bench's
        # saved-bytes meter and op counter attribute to the unit.
        with hook(i) if hook is not None else contextlib.nullcontext():
            with self._autocast():
                out = state.unit(h)
                # The next unit's input is ready now (computed before this unit's update): hand it over
                # first, so that with per-unit streams the next unit's forward overlaps this unit's backward.
                passed = self.net.advance(i, out.passed, shortcut)
                if ready is not None:
                    ready.record()
                terms = state.unit.local_losses(out, y, step) if step.trains(i) else {}
            if terms:
                loss = weighted_sum(terms, step.weights)
                if pending is None:
                    self._update_now(state, loss)
                    step.stats.add_terms(i, terms, step.weights)
                else:  # gradients only (cleared when the scope began); the update comes with the scope's
                    torch.autograd.backward(loss, self._loss_seed(loss))
                    pending.trained.append(i)
                    pending.terms.append((i, terms, step.weights))
            if out.scores is not None:
                if pending is None:
                    step.stats.add_scores(i, out.scores, y)
                else:
                    pending.scores.append((i, out.scores, y))
        return passed

    def _update_now(self, state: UnitState, loss: torch.Tensor) -> None:
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if state.clip is not None:
            torch.nn.utils.clip_grad_norm_(state.params, state.clip)
        state.optimizer.step()

    def _loss_seed(self, loss: torch.Tensor) -> torch.Tensor:
        """A ones scalar kept for every backward (autograd would make one per call). Held here, it is never
        taken over as a parameter's gradient (autograd only steals gradients nobody else references)."""
        if self._seed is None or self._seed.dtype != loss.dtype:
            self._seed = torch.ones((), device=self.device, dtype=loss.dtype)
        return self._seed

    def _apply_schedule(self, state: UnitState, at: float) -> None:
        """The unit's own schedules and its learning rate at schedule position ``at``."""
        state.unit.set_schedule(at)
        if state.optimizer is not None and state.optim.scheduler != "none":
            lr = lr_at(state.optim, at, self.lr_horizon)
            for group in state.optimizer.param_groups:
                group["lr"] = lr
        state.scheduled_at = at

    # ----------------------------------------------------------------------------- merged updates
    @contextlib.contextmanager
    def updates(
        self, units: list[int], targets: list[torch.Tensor], steps: list[StepState]
    ) -> Iterator[PendingUpdates | None]:
        """An update scope: units ``units`` (which see labels ``targets`` and step states ``steps``) run
        inside it, each leaving its gradients, loss terms and scores; at its end every update is made at
        once (:meth:`finish`), the sums going to the steps' statistics. Yields None with ``merge=none``
        (units update one by one)."""
        if self.merge == "none":
            yield None
            return
        pending = self.begin(units, targets, steps)
        try:
            yield pending
            self.finish(pending)
        finally:
            pending.release()

    def begin(self, units: list[int], targets: list[torch.Tensor], steps: list[StepState]) -> PendingUpdates:
        """Set the scope's schedules, clear the training units' gradients, and (``merge=all``) let the
        method compute the pieces its units share."""
        stats = steps[0].stats if steps else None
        if any(s.stats is not stats for s in steps):
            raise ValueError("an update scope's steps must add to one epoch's statistics")
        pending = PendingUpdates(dict(zip(units, steps, strict=True)), stats)
        training = []
        for i, y, step in zip(units, targets, steps, strict=True):
            state = self.units[i]
            if state.scheduled_at != step.at:
                self._apply_schedule(state, step.at)
            if state.optimizer is not None and step.trains(i):
                for p in state.params:
                    p.grad = None
                training.append((i, y, step))
        if self.merge == "all" and training:
            pending.shared = self.method.share_pieces(
                [self.units[i].unit for i, _, _ in training], [y for _, y, _ in training],
                [step for _, _, step in training],
            )  # fmt: skip
            pending.shared_units = [i for i, _, _ in training]
        return pending

    def finish(self, pending: PendingUpdates) -> None:
        """The scope's updates: the shared pieces' backward, one clipping pass, the optimiser calls, the
        loss and accuracy sums."""
        trained = set(pending.trained)
        if pending.shared is not None:
            trained |= self._backward_shared(pending)
        states = [self.units[i] for i in sorted(trained)]
        clipped = [s for s in states if s.clip is not None]
        if clipped:
            clip_grad_norms_([s.params for s in clipped], [s.clip for s in clipped])
        self.optimizers.step([s.optimizer for s in states])
        if pending.stats is not None:
            pending.stats.add(pending.terms, pending.vectors, pending.scores)

    def _backward_shared(self, pending: PendingUpdates) -> set[int]:
        """Backpropagate the method's shared terms (weighted with each unit's loss weights) and the
        gradients its units left on the handed-over leaves; return the units these reach."""
        shared, owners = pending.shared, pending.shared_units
        total, reached = None, set()
        for part in shared.terms:
            units = [owners[j] for j in part.units]
            reached.update(units)
            for name, values in part.terms.items():
                weights = [pending.ctxs[i].weights.get(name, 1.0) for i in units]
                pending.vectors.append((units, name, values, weights))  # recorded without a graph
                if values.requires_grad:
                    weighted = _weighted_vector(values, weights).sum()
                    total = weighted if total is None else total + weighted
        roots, grads = ([total], [self._loss_seed(total)]) if total is not None else ([], [])
        for handoff in shared.handoffs:
            if any(leaf.grad is not None for leaf in handoff.leaves):
                leaf_grads = [
                    leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in handoff.leaves
                ]
                roots.append(handoff.source)
                grads.append(handoff.assemble(leaf_grads))
        if roots:
            torch.autograd.backward(roots, grads)
        for gathered in shared.gathered:
            if gathered.leaf.grad is not None:
                parts = gathered.split(gathered.leaf.grad)
                for param, part in zip(gathered.params, parts, strict=True):
                    param.grad = part if param.grad is None else param.grad + part
        return reached

    # ----------------------------------------------------------------------------- one whole step
    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, step: StepState, hook: UnitHook | None = None
    ) -> None:
        """The whole batch, unit after unit (the sequential order), in one update scope. ``hook(i)``: a
        context around everything unit i does (``cawbench bench`` counts saved tensors and ops with it)."""
        n = len(self.units)
        h, shortcut = self.start(x, y), None
        with self.updates(list(range(n)), [y] * n, [step] * n) as pending:
            for i in range(n):
                h, shortcut = self.unit(i, h, shortcut, y, step, hook, pending=pending)


def _weighted_vector(values: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """values * each unit's weight (float32), as :func:`weighted_sum` weights one unit's terms."""
    values = values.float()
    if all(w == weights[0] for w in weights):
        return values if weights[0] == 1.0 else weights[0] * values
    return torch.stack(torch._foreach_mul(list(values.unbind()), weights))
