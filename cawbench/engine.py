"""The training engine: loops, devices, precision, evaluation, selection, checkpoints, results.

Per mini-batch every unit runs forward on its detached input, its weighted local loss is backpropagated
inside the unit only, and its output (computed before the update) feeds the next unit; the units' updates
(clipping, optimiser steps) follow, all at once by default (``train.merge_units``, :mod:`cawbench.updates`).
:class:`BatchStep` is the one code path that training and ``cawbench bench`` share. Loss terms and
accuracies accumulate on the device and are read once per epoch, so there is no host synchronisation
inside the layer loop. The data stay on the training device; order and augmentation draws move there once
per epoch. On CUDA: bf16 autocast, channels_last, cuDNN autotuning by default; fused optimisers (CUDA, CPU).

Execution modes, all with the sequential maths (tests/test_parallel.py checks parameters bit for bit):

- ``train.parallel=off`` (default): units one after the other.
- ``train.parallel=pipeline``: layer-parallel; unit l works on batch b while unit l+1 works on batch b-1
  (:class:`PipelineRunner`: every unit on its own CUDA stream; on the CPU the same wavefront in one
  thread, or ``train.pipeline_threads=N`` single-threaded workers over FLOP-balanced unit groups).
- ``train.cuda_graph=true`` (CUDA): the whole training step captured once per epoch and replayed
  (:class:`GraphedSteps`); with the pipeline, its steady-state ticks are captured instead.
- ``train.compile=true``: ``torch.compile`` of every unit (static shapes).
- ``train.time_limit_s``: stop after the epoch that would overrun; the result row says ``truncated``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import cawbench
from cawbench.config import ConfigError, OptimConfig, RunConfig, save_yaml
from cawbench.cpu_conv import swap_convs
from cawbench.data import PreparedData, iterate_batches, prepare_data
from cawbench.fast_dropout import swap_dropout
from cawbench.method import LocalNetwork, Method, StepContext, get_method, recipe_overrides
from cawbench.readouts import ReadoutContext, get_readout, per_layer_accuracy
from cawbench.results import append_result, atomic_write_bytes, atomic_write_text
from cawbench.schedule import ScheduleClock, lr_at
from cawbench.seeding import seed_everything
from cawbench.updates import MergedOptimizers, PendingUpdates, StepStats, clip_grad_norms_

EpochCallback = Callable[[dict[str, Any]], None]


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the message names the epoch, layer and term."""


class ResumeError(RuntimeError):
    """The checkpoint cannot be resumed with this configuration."""


# --------------------------------------------------------------------------------- devices, precision
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"train.device={name!r} is not a device; use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available here; use auto or cpu")
    return device


def keep_freed_cpu_memory() -> bool:
    """Have glibc's malloc serve every block from its heap and keep freed memory (process-wide; no-op and
    False elsewhere). By default glibc maps blocks over 32 MiB (a 128x100x32x32 activation) afresh each time
    and returns them on free, so each such tensor pays a page-fault pass; measured here, a 52 MB clone took
    17.8 ms instead of 2.0 ms. The cost: the process keeps its peak heap until it exits."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "bf16":
        return True
    return precision == "auto" and device.type == "cuda"


def autocast(device: torch.device, enabled: bool, cache: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast when enabled; ``cache=False`` under CUDA-graph capture (cast weights must be re-made)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=cache)


# --------------------------------------------------------------------------------- optimisers
def make_optimizer(
    params: list[nn.Parameter], cfg: OptimConfig, *, fused: bool = False, capturable: bool = False
) -> torch.optim.Optimizer:
    """The optimiser of one unit. ``fused``: one CUDA kernel per step (same update rule as the default
    implementation, rounding aside); ``capturable``: step count kept on the device (CUDA-graph capture)."""
    fast: dict[str, Any] = {"fused": True} if fused else {}
    if cfg.name in ("adam", "adamw"):
        cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
        if capturable:
            fast["capturable"] = True
        return cls(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, **fast)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **fast)


@dataclasses.dataclass
class UnitState:
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


UnitHook = Callable[[int], contextlib.AbstractContextManager]


class BatchStep:
    """One training mini-batch through every unit: the code path the Trainer and ``cawbench bench`` share.

    Each unit runs forward on its detached input, its weighted local loss is backpropagated inside the unit
    only, and its output (computed before the update, never recomputed) feeds the next unit through the
    plan's wiring. The updates (clipping, optimiser step, loss and accuracy sums) follow ``merge``
    (``train.merge_units``, see :mod:`cawbench.updates`): each unit's right after its backward (``none``),
    or all units' of an update scope at once when the scope ends (:meth:`updates`). Nothing here reads a
    value back to the host.
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
        overlap: bool = False,
        lr_horizon: float = 1.0,
        merge: str = "none",
    ) -> None:
        self.method, self.net, self.units, self.device, self.bf16 = method, net, units, device, bf16
        self.lr_horizon = lr_horizon  # epochs the LR schedules span (ScheduleClock.lr_horizon)
        self.autocast_cache = autocast_cache
        self.merge = merge
        self.optimizers = MergedOptimizers()
        self._seed: torch.Tensor | None = None  # d(loss)/d(loss) = 1, one tensor for every backward
        # train.parallel=streams on CUDA: every unit on its own stream (see __call__)
        self.streams = (
            [torch.cuda.Stream(device) for _ in units] if overlap and device.type == "cuda" else None
        )

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
        ctx: StepContext,
        stats: StepStats,
        hook: UnitHook | None = None,
        ready: Any = None,
        pending: PendingUpdates | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Train unit ``i`` on ``h``; return the next unit's (detached) input and the running shortcut.
        ``ready``: a CUDA event recorded as soon as that input exists (before this unit's backward).
        ``pending``: the update scope this unit's update joins (None: update now)."""
        state = self.units[i]
        active = ctx.trains(i)
        if state.scheduled_at != ctx.at:  # once per epoch, or every step under train.budget_schedules
            self._apply_schedule(state, ctx.at)
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
                terms = state.unit.local_losses(out, y, ctx) if active else {}
            if terms:
                loss = weighted_sum(terms, ctx.weights)
                if pending is None:
                    self._update_now(state, loss)
                    stats.add_terms(i, terms, ctx.weights)
                else:  # gradients only (cleared when the scope began); the update comes with the scope's
                    torch.autograd.backward(loss, self._loss_seed(loss))
                    pending.trained.append(i)
                    pending.terms.append((i, terms, ctx.weights))
            if out.scores is not None:
                if pending is None:
                    stats.add_scores(i, out.scores, y)
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
        self, units: list[int], targets: list[torch.Tensor], ctxs: list[StepContext], stats: StepStats
    ) -> Iterator[PendingUpdates | None]:
        """An update scope: units ``units`` (which see labels ``targets`` and contexts ``ctxs``) run inside
        it, each leaving its gradients, loss terms and scores; at its end every update is made at once
        (:meth:`finish`). Yields None with ``merge=none`` (units update one by one)."""
        if self.merge == "none":
            yield None
            return
        pending = self.begin(units, targets, ctxs)
        try:
            yield pending
            self.finish(pending, stats)
        finally:
            pending.release()

    def begin(self, units: list[int], targets: list[torch.Tensor], ctxs: list[StepContext]) -> PendingUpdates:
        """Set the scope's schedules, clear the training units' gradients, and (``merge=all``) let the
        method compute the pieces its units share."""
        pending = PendingUpdates(dict(zip(units, ctxs, strict=True)))
        training = []
        for i, y, ctx in zip(units, targets, ctxs, strict=True):
            state = self.units[i]
            if state.scheduled_at != ctx.at:
                self._apply_schedule(state, ctx.at)
            if state.optimizer is not None and ctx.trains(i):
                for p in state.params:
                    p.grad = None
                training.append((i, y, ctx))
        if self.merge == "all" and training:
            pending.shared = self.method.share_pieces(
                [self.units[i].unit for i, _, _ in training], [y for _, y, _ in training],
                [ctx for _, _, ctx in training],
            )  # fmt: skip
            pending.shared_units = [i for i, _, _ in training]
        return pending

    def finish(self, pending: PendingUpdates, stats: StepStats) -> None:
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
        stats.add(pending.terms, pending.vectors, pending.scores)

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
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        ctx: StepContext,
        stats: StepStats,
        hook: UnitHook | None = None,
    ) -> None:
        if self.streams is not None:
            return self._overlapped(x, y, ctx, stats, hook)
        n = len(self.units)
        h, shortcut = self.start(x, y), None
        with self.updates(list(range(n)), [y] * n, [ctx] * n, stats) as pending:
            for i in range(n):
                h, shortcut = self.unit(i, h, shortcut, y, ctx, stats, hook, pending=pending)
        return None

    def _overlapped(self, x, y, ctx, stats, hook) -> None:
        """Every unit on its own CUDA stream: unit i+1 waits only for unit i's forward (an event), so its
        forward runs while unit i does its loss, backward, clipping and update. Each unit's stream keeps
        its steps in order, so unit i's next forward still sees its updated weights: the sequential maths,
        with the small kernels of neighbouring units in flight together (once launched from a CUDA graph,
        the device runs the chain of forwards while the updates trail behind). Merged updates run on the
        calling stream once every unit's stream is done; the next step's streams start after them."""
        origin = torch.cuda.current_stream(self.device)
        n = len(self.units)
        h, shortcut = self.start(x, y), None
        wait: Any = origin
        with self.updates(list(range(n)), [y] * n, [ctx] * n, stats) as pending:
            for i, stream in enumerate(self.streams):
                if isinstance(wait, torch.cuda.Stream):
                    stream.wait_stream(wait)
                else:
                    stream.wait_event(wait)
                with torch.cuda.stream(stream):
                    for t in (h, shortcut, y):
                        if t is not None:
                            t.record_stream(stream)  # made on another stream, freed on this one
                    ready = torch.cuda.Event()
                    h, shortcut = self.unit(i, h, shortcut, y, ctx, stats, hook, ready, pending)
                wait = ready
            for stream in self.streams:
                origin.wait_stream(stream)
        return None


def _weighted_vector(values: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """values * each unit's weight (float32), as :func:`weighted_sum` weights one unit's terms."""
    values = values.float()
    if all(w == weights[0] for w in weights):
        return values if weights[0] == 1.0 else weights[0] * values
    return torch.stack(torch._foreach_mul(list(values.unbind()), weights))


@dataclasses.dataclass
class _PipeItem:
    """A batch waiting in front of a unit: its input (in front of unit 0: the raw batch ``x``), the running
    shortcut, labels, the batch index, and an event recorded on the producing stream (CUDA only)."""

    h: torch.Tensor | None
    shortcut: torch.Tensor | None
    y: torch.Tensor
    batch: int
    ready: Any = None
    x: torch.Tensor | None = None


@dataclasses.dataclass
class _TickBuffers:
    """Static tensors of one captured pipeline tick: the raw batch for unit 0, and per slot l >= 1 the input,
    shortcut and labels waiting in front of unit l."""

    x: torch.Tensor
    y0: torch.Tensor
    h: list[torch.Tensor | None]
    shortcut: list[torch.Tensor | None]
    y: list[torch.Tensor | None]


class PipelineRunner:
    """Layer-parallel training: unit l works on batch b while unit l+1 works on batch b-1.

    The schedule is a wavefront: at every tick each unit takes the batch waiting in front of it, so unit l
    sees the batches in order and unit l+1 consumes unit l's output computed before unit l's update for
    the same batch -- exactly the sequential mode's maths, reordered. On CUDA every unit has its own stream
    (events order producer and consumer, so kernels of different units may overlap on the device);
    elsewhere the same schedule runs in this thread. Random draws (dropout) come in another order than in
    the sequential mode, so only stochastic units differ between the two modes.

    With a capture ``backend`` (``train.cuda_graph``), the steady state -- every unit busy with a full-size
    batch -- runs as captured ticks: two graphs, because ticks alternate between two sets of static buffers
    (each unit writes its output where its successor reads it one tick later, never where anyone reads in
    the same tick), each launching every unit's whole step on its own stream at once. Filling and draining
    the pipeline, and the smaller last batch, run eagerly. Graphs are captured afresh every epoch, after
    every unit has run eagerly in it (so running sums exist and per-epoch state is current).
    """

    def __init__(self, step: BatchStep, batch_size: int, backend: Any = None, warmup: int = 2) -> None:
        self.step, self.batch_size, self.backend, self.warmup = step, batch_size, backend, warmup
        self.n = len(step.units)
        self.cuda = step.device.type == "cuda"
        self.streams = [torch.cuda.Stream(step.device) for _ in range(self.n)] if self.cuda else None
        self.ticks_ever = 0

    # -- helpers ---------------------------------------------------------------------------------------
    def _stream(self, i: int) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(self.streams[i]) if self.cuda else contextlib.nullcontext()

    def _event(self, stream: Any = None) -> Any:
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def _full(self, item: _PipeItem | None) -> bool:
        return item is not None and item.y.shape[0] == self.batch_size

    # -- one eager tick ----------------------------------------------------------------------------------
    def _eager_tick(self, slots: list[_PipeItem | None], make_ctx, stats) -> None:
        # Downstream first (an output waits one tick for its consumer). Unit 0 starts a new batch, whose
        # construction may read the network (FF's hard negatives), so with merged updates it runs after
        # the others' updates, as it does when every unit updates right after its backward.
        items = [(i, slots[i]) for i in reversed(range(self.n)) if slots[i] is not None]
        for i, _ in items:
            slots[i] = None
        for group in ([(i, it) for i, it in items if i > 0], [(i, it) for i, it in items if i == 0]):
            if not group:
                continue
            ctxs = [make_ctx(item.batch) for _, item in group]
            units = [i for i, _ in group]
            with self.step.updates(units, [item.y for _, item in group], ctxs, stats) as pending:
                self._after_updates(units, pending)
                for (i, item), ctx in zip(group, ctxs, strict=True):
                    self._eager_unit(i, item, ctx, stats, slots, pending)
                self._before_updates(units, pending)

    def _eager_unit(self, i: int, item: _PipeItem, ctx: StepContext, stats, slots, pending) -> None:
        with self._stream(i):
            if self.cuda:
                self.streams[i].wait_event(item.ready)
                for t in (item.h, item.shortcut, item.y, item.x):
                    if t is not None:
                        t.record_stream(self.streams[i])  # made on another stream, freed here
            h, shortcut = (self.step.start(item.x, item.y), None) if i == 0 else (item.h, item.shortcut)
            h, shortcut = self.step.unit(i, h, shortcut, item.y, ctx, stats, pending=pending)
            if i + 1 < self.n:
                ready = self._event(self.streams[i] if self.cuda else None)
                slots[i + 1] = _PipeItem(h, shortcut, item.y, item.batch, ready)

    def _after_updates(self, units: list[int], pending: PendingUpdates | None) -> None:
        """CUDA, merged updates: the units' streams start after the updates made on the calling stream."""
        if self.cuda and pending is not None:
            origin = torch.cuda.current_stream(self.step.device)
            for i in units:
                self.streams[i].wait_stream(origin)

    def _before_updates(self, units: list[int], pending: PendingUpdates | None) -> None:
        """CUDA, merged updates: the calling stream makes the updates once the units' streams are done."""
        if self.cuda and pending is not None:
            origin = torch.cuda.current_stream(self.step.device)
            for i in units:
                origin.wait_stream(self.streams[i])

    # -- captured ticks ----------------------------------------------------------------------------------
    def _allocate(self, slots: list[_PipeItem]) -> list[_TickBuffers]:
        def like(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else torch.empty_like(t)

        return [
            _TickBuffers(
                like(slots[0].x),
                like(slots[0].y),
                [None] + [like(s.h) for s in slots[1:]],
                [None] + [like(s.shortcut) for s in slots[1:]],
                [None] + [like(s.y) for s in slots[1:]],
            )  # fmt: skip
            for _ in range(2)
        ]

    def _load(self, buf: _TickBuffers, slots: list[_PipeItem]) -> None:
        if self.cuda:
            main = torch.cuda.current_stream(self.step.device)
            for item in slots:
                main.wait_event(item.ready)
        buf.x.copy_(slots[0].x)
        buf.y0.copy_(slots[0].y)
        for i in range(1, self.n):
            buf.h[i].copy_(slots[i].h)
            buf.y[i].copy_(slots[i].y)
            if buf.shortcut[i] is not None:
                buf.shortcut[i].copy_(slots[i].shortcut)

    def _tick(self, src: _TickBuffers, dst: _TickBuffers, ctxs: list[StepContext], stats):
        origin = torch.cuda.current_stream(self.step.device) if self.cuda else None
        for group in (list(reversed(range(1, self.n))), [0]):  # unit 0 after the others (see _eager_tick)
            labels = [src.y0 if i == 0 else src.y[i] for i in group]
            with self.step.updates(group, labels, [ctxs[i] for i in group], stats) as pending:
                for i in group:
                    if self.cuda:
                        self.streams[i].wait_stream(origin)
                    with self._stream(i):
                        if i == 0:
                            h, shortcut, y = self.step.start(src.x, src.y0), None, src.y0
                        else:
                            h, shortcut, y = src.h[i], src.shortcut[i], src.y[i]
                        h, shortcut = self.step.unit(i, h, shortcut, y, ctxs[i], stats, pending=pending)
                        if i + 1 < self.n:
                            dst.h[i + 1].copy_(h)
                            dst.y[i + 1].copy_(y)
                            if dst.shortcut[i + 1] is not None:
                                dst.shortcut[i + 1].copy_(shortcut)
                if self.cuda:
                    for i in group:
                        origin.wait_stream(self.streams[i])

    # -- the epoch -----------------------------------------------------------------------------------------
    def run_epoch(self, batches, make_ctx, stats) -> None:
        n = self.n
        main = torch.cuda.current_stream(self.step.device) if self.cuda else None
        if self.cuda:
            for s in self.streams:
                s.wait_stream(main)  # the data, stats and previous evaluation come first
        it = iter(batches)
        fed = 0

        def feed() -> _PipeItem | None:
            nonlocal fed
            try:
                x, y = next(it)
            except StopIteration:
                return None
            stats.count_step(make_ctx(fed))
            fed += 1
            return _PipeItem(None, None, y, fed - 1, self._event(main), x=x)

        slots: list[_PipeItem | None] = [feed()] + [None] * (n - 1)
        replays: dict[int, Callable[[], None]] = {}
        buffers: list[_TickBuffers] | None = None
        ticks = 0
        while any(item is not None for item in slots):
            ready = (
                self.backend is not None
                and ticks >= n
                and self.ticks_ever >= n + self.warmup
                and all(self._full(item) for item in slots)
            )
            if not ready:
                self._eager_tick(slots, make_ctx, stats)
                slots[0] = feed()
            else:  # steady state: captured ticks until the batches run out or a smaller one comes
                buffers = buffers or self._allocate(slots)
                self._load(buffers[0], slots)
                index = [item.batch for item in slots]
                parity = 0
                while True:
                    if parity not in replays:
                        ctxs = [make_ctx(b) for b in index]
                        for state in self.step.units:
                            if state.optimizer is not None:
                                state.optimizer.zero_grad(set_to_none=True)
                        tick = functools.partial(
                            self._tick, buffers[parity], buffers[1 - parity], ctxs, stats
                        )
                        replays[parity] = self.backend.capture(tick)
                    replays[parity]()
                    ticks += 1
                    self.ticks_ever += 1
                    parity = 1 - parity
                    index = [-1, *index[:-1]]
                    nxt = feed()
                    if self._full(nxt):
                        index[0] = nxt.batch
                        if self.cuda:
                            main.wait_event(nxt.ready)
                        buffers[parity].x.copy_(nxt.x)
                        buffers[parity].y0.copy_(nxt.y)
                        continue
                    # leave the steady state: hand the in-flight batches back to the eager schedule
                    event = self._event(main)
                    buf = buffers[parity]
                    slots = [nxt] + [
                        _PipeItem(buf.h[i], buf.shortcut[i], buf.y[i], index[i], event) for i in range(1, n)
                    ]
                    break
                continue
            ticks += 1
            self.ticks_ever += 1
        if self.cuda:
            for s in self.streams:
                main.wait_stream(s)


def balanced_groups(costs: list[float], parts: int) -> list[list[int]]:
    """Split units 0..n-1 into ``parts`` contiguous groups whose largest total cost is smallest."""
    n = len(costs)
    parts = max(1, min(parts, n))
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    best: dict[tuple[int, int], tuple[float, list[int]]] = {}

    def solve(start: int, k: int) -> tuple[float, list[int]]:  # min over cut points of the max group cost
        if k == 1:
            return prefix[n] - prefix[start], [n]
        if (start, k) not in best:
            options = []
            for cut in range(start + 1, n - k + 2):
                rest, cuts = solve(cut, k - 1)
                options.append((max(prefix[cut] - prefix[start], rest), [cut, *cuts]))
            best[start, k] = min(options, key=lambda o: o[0])
        return best[start, k]

    _, cuts = solve(0, parts)
    bounds = [0, *cuts]
    return [list(range(bounds[g], bounds[g + 1])) for g in range(parts)]


def run_thread_pipeline(
    step: BatchStep,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    make_ctx: Callable[[int], StepContext],
    stats: StepStats,
    groups: list[list[int]],
) -> None:
    """Layer-parallel training on the CPU: one worker thread per group of consecutive units, FIFO queues
    between them, each worker with a single intra-op thread (no OpenMP barriers between the cores).

    Every unit is driven by one worker and sees the batches in order, so the updates are the sequential
    mode's; random draws (dropout) of different workers interleave in no fixed order, so only stochastic
    units differ from run to run.
    """
    import queue
    import threading

    n_workers = len(groups)
    queues: list[queue.Queue] = [queue.Queue(maxsize=2) for _ in range(n_workers)]
    errors: list[BaseException] = []

    def work(w: int) -> None:
        torch.set_num_threads(1)
        failed = False
        while True:
            item = queues[w].get()
            if item is None:
                break
            if failed:
                continue  # keep draining so the worker upstream never blocks
            try:
                h, shortcut, y, ctx = item
                units = groups[w]
                with step.updates(units, [y] * len(units), [ctx] * len(units), stats) as pending:
                    for i in units:
                        h, shortcut = step.unit(i, h, shortcut, y, ctx, stats, pending=pending)
                if w + 1 < n_workers:
                    queues[w + 1].put((h, shortcut, y, ctx))
            except BaseException as exc:  # re-raised in the calling thread
                errors.append(exc)
                failed = True
        if w + 1 < n_workers:
            queues[w + 1].put(None)

    threads_before = torch.get_num_threads()
    workers = [threading.Thread(target=work, args=(w,), daemon=True) for w in range(n_workers)]
    for t in workers:
        t.start()
    try:
        for b, (x, y) in enumerate(batches):
            if errors:
                break
            ctx = make_ctx(b)
            queues[0].put((step.start(x, y), None, y, ctx))
            stats.count_step(ctx)
    finally:
        queues[0].put(None)
        for t in workers:
            t.join()
        torch.set_num_threads(threads_before)
    if errors:
        raise errors[0]


class CudaGraphBackend:
    """Captures a step as a CUDA graph; eager steps run on a side stream, as capture requires of the steps
    before it (cuDNN/cuBLAS set-up, lazily created optimiser state)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def eager(self, fn: Callable[[], None]) -> None:
        main = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            fn()
        main.wait_stream(side)

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay


class ReplayBackend:
    """CPU stand-in for :class:`CudaGraphBackend`: "replaying" calls the captured step again with the same
    frozen arguments. Checks the graph runner's data flow (static inputs, which batches replay) anywhere."""

    def eager(self, fn: Callable[[], None]) -> None:
        fn()

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        return fn


class GraphedSteps:
    """Replays one captured CUDA graph of the whole training step (every unit, its backward and its
    optimiser step) for the full-size batches of an epoch: one launch per step instead of hundreds.

    Captured afresh every epoch, after one eager step, so per-epoch state (learning rates, loss weights,
    temperatures, training windows) is current and every running sum exists before capture; the batch index
    ``ctx.step`` is frozen at capture, so units whose maths depends on it within an epoch must not use this
    mode. The last, smaller batch runs eagerly. Needs capturable optimisers (the Trainer makes them) and no
    host synchronisation or host-to-device copy inside any unit.
    """

    def __init__(self, step: BatchStep, batch_size: int, warmup: int = 3, backend: Any = None) -> None:
        self.step, self.batch_size, self.warmup = step, batch_size, warmup
        self.backend = backend if backend is not None else CudaGraphBackend(step.device)
        self.warmed = False

    def run_epoch(
        self,
        batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
        make_ctx: Callable[[int], StepContext],
        stats: StepStats,
    ) -> None:
        replay, static_x, static_y = None, None, None
        eager_first = 1 if self.warmed else self.warmup
        for b, (x, y) in enumerate(batches):
            ctx = make_ctx(b)
            full = x.shape[0] == self.batch_size
            if replay is None and full and b >= eager_first:
                static_x, static_y = x.clone(), y.clone()
                for state in self.step.units:
                    if state.optimizer is not None:  # gradients will live in the graph's memory pool
                        state.optimizer.zero_grad(set_to_none=True)
                step = functools.partial(self.step, static_x, static_y, ctx, stats)
                replay = self.backend.capture(step)
                self.warmed = True
            if replay is not None and full:
                static_x.copy_(x)
                static_y.copy_(y)
                replay()
            else:
                self.backend.eager(functools.partial(self.step, x, y, ctx, stats))
            stats.count_step(ctx)


# --------------------------------------------------------------------------------- the trainer
class Trainer:
    """Trains one configuration; ``run()`` returns the result row (also appended to the results table)."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        data: PreparedData | None = None,
        callbacks: list[EpochCallback] | None = None,
        write_result: bool = True,
    ) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.bf16 = use_bf16(cfg.train.precision, self.device)
        self.callbacks = list(callbacks or [])
        self.write_result = write_result
        seed_everything(cfg.train.seed, cfg.train.deterministic)
        self.data = data if data is not None else prepare_data(cfg.data, self.device)
        self.method: Method = get_method(cfg.method)(cfg, self.data.info)
        self.net: LocalNetwork = self.method.build().to(self.device)
        if cfg.train.fast_dropout and self.device.type == "cpu":
            swap_dropout(self.net)  # same maths, bulk-drawn masks (see cawbench.fast_dropout)
        if cfg.train.cpu_conv != "plain" and self.device.type == "cpu":
            # Same convolutions, kernels picked by shape (see cawbench.cpu_conv).
            swap_convs(self.net, winograd_ok=cfg.train.cpu_conv == "tuned")
        if cfg.train.keep_cpu_memory and self.device.type == "cpu":
            keep_freed_cpu_memory()
        self.channels_last = cfg.train.channels_last and self.device.type == "cuda"
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if cfg.train.compile:
            # Static shapes per unit (the fastest kernels); room for every unit's shapes in train and eval.
            limit = torch._dynamo.config.recompile_limit
            torch._dynamo.config.recompile_limit = max(limit, 4 * len(self.net.units))
            for unit in self.net.units:
                unit.compile(dynamic=False)
        if self.device.type == "cuda" and not cfg.train.deterministic:
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv kernels once
        self.cuda_graph = _check_cuda_graph(cfg, self.device)
        self.units = [self._unit_state(u) for u in self.net.units]
        self.clock = self._schedule_clock()
        self.step = BatchStep(
            self.method,
            self.net,
            self.units,
            self.device,
            self.bf16,
            autocast_cache=not self.cuda_graph,
            overlap=cfg.train.parallel == "streams",
            lr_horizon=self.clock.lr_horizon,
            merge=cfg.train.merge_units,
        )
        self.graphed = None
        self.pipeline = None
        if cfg.train.parallel == "pipeline":
            backend = CudaGraphBackend(self.device) if self.cuda_graph else None
            self.pipeline = PipelineRunner(self.step, cfg.train.batch_size, backend)
        elif self.cuda_graph:
            self.graphed = GraphedSteps(self.step, cfg.train.batch_size)
        self.pipeline_groups = None
        if cfg.train.parallel == "pipeline" and self.device.type == "cpu" and cfg.train.pipeline_threads > 1:
            self.pipeline_groups = balanced_groups(self._unit_costs(), cfg.train.pipeline_threads)
        self.scoring = [i for i, u in enumerate(self.net.units) if getattr(u, "emits_scores", True)]
        if not self.scoring:
            raise ConfigError(f"method {cfg.method!r} built a network with no scoring unit")
        for name in (cfg.readout.name, *cfg.readout.extra):
            get_readout(name)  # unknown readout names fail before any work
        self.run_dir = Path(cfg.out_dir) / "runs" / (cfg.run_name or default_run_name(cfg))
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0
        self.truncated = False

    def _unit_state(self, unit: nn.Module) -> UnitState:
        params = [p for p in unit.parameters() if p.requires_grad]
        ocfg = self.cfg.optim
        if getattr(unit, "optim_overrides", None):
            ocfg = dataclasses.replace(ocfg, **unit.optim_overrides)
        fused = self.cfg.train.fused_optimizer and self.device.type in _fused_devices()
        opt = make_optimizer(params, ocfg, fused=fused, capturable=self.cuda_graph) if params else None
        return UnitState(unit, params, opt, ocfg, ocfg.grad_clip)

    def _schedule_clock(self) -> ScheduleClock:
        """Per-epoch schedules, or (``train.budget_schedules``) progress mapped onto the reference horizon:
        ``train.schedule_epochs``, else the recipe's ``train.epochs``, else this run's."""
        train = self.cfg.train
        horizon = train.schedule_epochs or self.recipe_epochs() or train.epochs
        clock = ScheduleClock(train.epochs, self.steps_per_epoch(), float(horizon), train.budget_schedules)
        if not train.budget_schedules:
            return clock
        if self.cuda_graph:
            raise ConfigError(
                "train.budget_schedules moves the schedules every step, but train.cuda_graph freezes them in "
                "the captured step; set one of them to false"
            )
        scheduled = [
            f"learning rate ({s.optim.scheduler})" for s in self.units if s.optim.scheduler != "none"
        ]
        if not scheduled + self.method.epoch_schedules():
            raise ConfigError(
                f"train.budget_schedules=true would do nothing for method {self.cfg.method!r} here: it has no "
                "epoch-indexed schedule (optim.scheduler=none and none of its own); set it to false"
            )
        return clock

    def recipe_epochs(self) -> int | None:
        """``train.epochs`` of the recipe this run was resolved from (its schedules' horizon), if any."""
        if self.cfg.recipe == "default":
            return None
        try:
            return recipe_overrides(type(self.method), self.cfg.recipe, self.cfg.data.name).get(
                "train.epochs"
            )
        except ConfigError:
            return None

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.data.train) / self.cfg.train.batch_size)

    def schedule_point(self, epoch: int, step: int) -> StepContext:
        """The schedule state of one training batch: position, loss weights, units that train."""
        at = self.clock.at(epoch, step)
        active = tuple(s.optimizer is not None and s.unit.trainable_at(at) for s in self.units)
        return StepContext(epoch, self.cfg.train.epochs, step, at, self.method.loss_weights(at), active)

    def _unit_costs(self) -> list[float]:
        """Forward FLOPs of each unit on a 2-image batch (to balance pipeline workers)."""
        from torch.utils.flop_counter import FlopCounterMode

        x = torch.zeros(2, *self.data.info.input_shape, device=self.device)
        y = torch.zeros(2, dtype=torch.long, device=self.device)
        costs = []
        stance = getattr(torch.compiler, "set_stance", None)  # compiled units: count eagerly, compile later
        eager = stance("force_eager") if stance is not None else contextlib.nullcontext()
        with torch.no_grad(), eager:
            h, shortcut = self.net.stem(self.method.prepare_batch(x, y, True)), None
            for i, unit in enumerate(self.net.units):
                counter = FlopCounterMode(display=False)
                with counter:
                    out = unit(h)
                costs.append(float(counter.get_total_flops()) + 1.0)
                h, shortcut = self.net.advance(i, out.passed, shortcut)
        return costs

    # ----------------------------------------------------------------------------- training
    def _batches(self, split: str, epoch: int, train: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        bs = self.cfg.train.batch_size if train else self.cfg.train.eval_batch_size
        part = getattr(self.data, split)
        for x, y in iterate_batches(
            part, bs, self.data.transform, self.device, train=train, seed=self.cfg.train.seed, epoch=epoch
        ):
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        cfg, net = self.cfg, self.net
        net.train()
        for u in net.units:
            u.on_epoch_start(epoch)
        budget = self.clock.budget
        epoch_point = self.schedule_point(epoch, 0)  # the whole epoch's, unless budget-scaled
        stats = StepStats(len(self.units), self.device, weighted=budget)
        bar = _progress(self.steps_per_epoch(), f"epoch {epoch + 1}/{cfg.train.epochs}", cfg.train.progress)
        batches = _counted(self._batches("train", epoch, train=True), bar)

        def make_ctx(step: int) -> StepContext:
            if budget:
                return self.schedule_point(epoch, step)
            return dataclasses.replace(epoch_point, step=step)

        start = time.perf_counter()
        if cfg.train.parallel == "pipeline" and self.pipeline_groups is not None:
            run_thread_pipeline(self.step, batches, make_ctx, stats, self.pipeline_groups)
        elif cfg.train.parallel == "pipeline":
            self.pipeline.run_epoch(batches, make_ctx, stats)
        elif self.graphed is not None:
            self.graphed.run_epoch(batches, make_ctx, stats)
        else:
            for b, (x, y) in enumerate(batches):
                ctx = make_ctx(b)
                self.step(x, y, ctx, stats)
                stats.count_step(ctx)
        bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        self.method.on_epoch_end(net, epoch)
        return self._train_summary(epoch, stats, elapsed, epoch_point.weights)

    def _train_summary(
        self, epoch: int, stats: StepStats, elapsed: float, weights: Mapping[str, float]
    ) -> dict[str, Any]:
        """Epoch means of every unit's loss terms (over the steps it trained), unweighted and weighted,
        and its training accuracy, read back in one transfer."""
        names, values, weighted, _ = stats.means()
        if weighted is None:  # the weights held for the whole epoch: weighted mean = weight x mean
            weighted = [[weights.get(k, 1.0) * v for k, v in zip(names, row)] for row in values]
        acc = (100 * stats.correct / stats.seen.clamp(min=1)).tolist()
        seen_list = stats.seen.tolist()
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                if stats.active_steps[i] and names[j] in stats.logged[i] and not math.isfinite(v):
                    raise TrainingDiverged(f"loss term {names[j]!r} of layer {i} is {v} at epoch {epoch}")

        def by_term(rows: list[list[float]]) -> dict[str, list[float | None]]:
            return {k: [_nan_to_none(rows[i][j]) for i in range(len(rows))] for j, k in enumerate(names)}

        return {
            "train_loss": by_term(values),
            "train_loss_weighted": by_term(weighted),
            "schedule_at": self.clock.at(epoch, 0),
            "train_acc": [acc[i] if seen_list[i] else None for i in range(len(acc))],
            "train_time_s": elapsed,
            "train_images_per_s": len(self.data.train) / elapsed if elapsed > 0 else None,
            "lr": self._current_lr(),
        }

    def _current_lr(self) -> float | None:
        for state in self.units:
            if state.optimizer is not None:
                return state.optimizer.param_groups[0]["lr"]
        return None

    # ----------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def collect_scores(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """All per-layer scores ``[L, N, K]`` (float32, on the device) and labels for a split."""
        self.net.eval()
        chunks, labels = [], []
        for x, y in self._batches(split, 0, train=False):
            with autocast(self.device, self.bf16):
                scores = self.method.eval_scores(self.net, x)
            chunks.append(torch.stack([s.float() for s in scores]))
            labels.append(y)
        if not chunks:
            k = self.data.info.num_classes
            return torch.zeros(len(self.scoring), 0, k, device=self.device), torch.zeros(0, dtype=torch.long)
        return torch.cat(chunks, dim=1), torch.cat(labels)

    def evaluate(self, epoch: int, train_summary: dict[str, Any], last: bool = False) -> dict[str, Any]:
        """Readouts fitted on validation; test scores every epoch, or at the last (``last``: a time limit
        ends the run here)."""
        start = time.perf_counter()
        val_scores, val_y = self.collect_scores("val")
        ce = train_summary["train_loss"].get("ce")
        train_ce = [float("nan") if ce is None or ce[i] is None else ce[i] for i in self.scoring]
        ctx = ReadoutContext(val_scores, val_y, train_ce, self.cfg.readout)
        names = list(dict.fromkeys((self.cfg.readout.name, *self.cfg.readout.extra)))
        states = {name: get_readout(name).fit(ctx) for name in names}
        record: dict[str, Any] = {
            "val_acc_layers": _pct(per_layer_accuracy(val_scores, val_y)),
            "val_acc": {n: _acc(get_readout(n).combine(val_scores, states[n]), val_y) for n in names},
            "readout_state": states,
        }
        if self.cfg.train.eval_test_every_epoch or last or epoch == self.cfg.train.epochs - 1:
            test_scores, test_y = self.collect_scores("test")
            record["test_acc_layers"] = _pct(per_layer_accuracy(test_scores, test_y))
            record["test_acc"] = {
                n: _acc(get_readout(n).combine(test_scores, states[n]), test_y) for n in names
            }
        record["eval_time_s"] = time.perf_counter() - start
        return record

    # ----------------------------------------------------------------------------- the run
    def run(self, resume: bool = False) -> dict[str, Any]:
        cfg = self.cfg
        ckpt_path = self.run_dir / "checkpoint.pt"
        if resume:
            self._load_checkpoint(ckpt_path)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, self.run_dir / "config.yaml")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        wall_start = time.perf_counter() - sum(r.get("epoch_time_s", 0.0) for r in self.history)
        limit = cfg.train.time_limit_s
        session_start = time.perf_counter()
        self.truncated = False
        for epoch in range(self.start_epoch, cfg.train.epochs):
            epoch_start = time.perf_counter()
            summary = self.train_epoch(epoch)
            if limit is not None and epoch < cfg.train.epochs - 1:
                # Stop after this epoch if the next one (as long as this one) would overrun the limit.
                spent = time.perf_counter() - session_start
                self.truncated = spent + (time.perf_counter() - epoch_start) > limit
            record = {"epoch": epoch, **summary, **self.evaluate(epoch, summary, last=self.truncated)}
            record["unit_stats"] = _unit_stats(self.net)
            record["epoch_time_s"] = time.perf_counter() - epoch_start
            self.history.append(record)
            atomic_write_text(
                self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history)
            )
            if cfg.train.checkpoint:
                self._save_checkpoint(ckpt_path, epoch + 1)
            for callback in self.callbacks:
                callback(record)
            if self.truncated:
                break
        result = self._result_row(time.perf_counter() - wall_start)
        self._save_artifacts()
        atomic_write_text(self.run_dir / "result.json", json.dumps(result, indent=2))
        if self.write_result:
            append_result(Path(cfg.out_dir) / "results.jsonl", result)
        return result

    def _result_row(self, wall: float) -> dict[str, Any]:
        cfg, hist = self.cfg, self.history
        main = cfg.readout.name
        final = hist[-1]
        vals = [r["val_acc"][main] for r in hist]
        best = int(np.nanargmax(vals)) if not all(math.isnan(v) for v in vals) else len(hist) - 1
        tests = [r.get("test_acc", {}).get(main, float("nan")) for r in hist]
        max_test = int(np.nanargmax(tests)) if not all(math.isnan(t) for t in tests) else len(hist) - 1
        plan_depth = cfg.model.depth
        return {
            "method": cfg.method,
            "variant": cfg.variant,
            "recipe": cfg.recipe,
            "dataset": cfg.data.name,
            "arch": cfg.model.arch,
            "depth": plan_depth,
            "width": cfg.model.width,
            "seed": cfg.train.seed,
            "config_hash": cfg.config_hash(),
            "readout": main,
            "epochs": len(hist),
            "epochs_planned": cfg.train.epochs,
            "truncated": len(hist) < cfg.train.epochs,  # stopped by train.time_limit_s
            "n_train": len(self.data.train),
            "n_val": len(self.data.val),
            "n_test": len(self.data.test),
            "final_val_acc": final["val_acc"][main],
            "final_test_acc": final.get("test_acc", {}).get(main),
            "best_val_epoch": best,
            "best_val_acc": vals[best],
            "test_acc_at_best_val": tests[best],
            "max_test_acc": tests[max_test],
            "max_test_epoch": max_test,
            "final_test_acc_by_readout": final.get("test_acc", {}),
            "per_layer_test_acc": final.get("test_acc_layers"),
            "per_layer_val_acc": final["val_acc_layers"],
            "wall_time_s": wall,
            "train_images_per_s": float(np.median([r["train_images_per_s"] or 0 for r in hist])),
            "peak_cuda_mem_bytes": torch.cuda.max_memory_allocated(self.device)
            if self.device.type == "cuda"
            else None,
            "n_params": sum(p.numel() for p in self.net.parameters()),
            "device": _device_name(self.device),
            "precision": "bf16" if self.bf16 else "fp32",
            "versions": _versions(),
            "run_dir": str(self.run_dir),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    # ----------------------------------------------------------------------------- persistence
    def _save_checkpoint(self, path: Path, epochs_done: int) -> None:
        state = {
            "config_hash": self.cfg.config_hash(),
            "epochs_done": epochs_done,
            "net": self.net.state_dict(),
            "optimizers": [s.optimizer.state_dict() if s.optimizer else None for s in self.units],
            "history": self.history,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        import io

        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(path, buffer.getvalue())

    def _load_checkpoint(self, path: Path) -> None:
        if not path.is_file():
            raise ResumeError(f"--resume: no checkpoint at {path}; run without --resume to start this run")
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as exc:  # a truncated or foreign file
            raise ResumeError(f"--resume: cannot read checkpoint {path}: {exc}") from None
        if state.get("config_hash") != self.cfg.config_hash():
            raise ResumeError(
                f"--resume: checkpoint {path} was made with config hash {state.get('config_hash')}, but this "
                f"configuration hashes to {self.cfg.config_hash()} (compare {path.parent / 'config.yaml'}); "
                "resume with the same configuration or choose another --run-name"
            )
        self.net.load_state_dict(state["net"])
        for s, o in zip(self.units, state["optimizers"], strict=True):
            if s.optimizer is not None and o is not None:
                s.optimizer.load_state_dict(o)  # the LR is re-set from the schedule at the next step
        self.history = list(state["history"])
        self.start_epoch = int(state["epochs_done"])
        torch.set_rng_state(state["rng_cpu"].cpu())
        if state.get("rng_cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([t.cpu() for t in state["rng_cuda"]])

    def _save_artifacts(self) -> None:
        arrays = {}
        for i, unit in enumerate(self.net.units):
            for name, tensor in unit.artifacts().items():
                arrays[f"layer{i:02d}_{name}"] = tensor.detach().float().cpu().numpy()
        if arrays:
            import io

            buffer = io.BytesIO()
            np.savez_compressed(buffer, **arrays)
            atomic_write_bytes(self.run_dir / "artifacts.npz", buffer.getvalue())


def _unit_stats(net: LocalNetwork) -> dict[str, list[float | None]]:
    per_unit = [u.epoch_stats() for u in net.units]
    names = sorted({k for s in per_unit for k in s})
    return {k: [s.get(k) for s in per_unit] for k in names}


def _acc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    if len(labels) == 0:
        return float("nan")
    return 100.0 * (scores.argmax(-1) == labels).float().mean().item()


def _pct(values: list[float]) -> list[float]:
    return [100.0 * v for v in values]


def _nan_to_none(v: float) -> float | None:
    return None if isinstance(v, float) and math.isnan(v) else v


def _counted(
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]], bar: Any
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for batch in batches:
        yield batch
        bar.update(1)


def _fused_devices() -> list[str]:
    """Devices with fused optimiser kernels, the CPU included: there the fused AdamW step over 23 M
    parameters took 12 ms against foreach's 60 ms (2 cores; ~1% of a width-1.0 CAW-Conv step)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return list(_get_fused_kernels_supported_devices())


def _check_cuda_graph(cfg: RunConfig, device: torch.device) -> bool:
    """Whether to capture the training step as a CUDA graph (``train.cuda_graph``)."""
    if not cfg.train.cuda_graph:
        return False
    if device.type != "cuda":
        raise ConfigError(f"train.cuda_graph=true needs a CUDA device, not {device}; set it to false")
    return True


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, unit="batch", dynamic_ncols=True, disable=None)


def default_run_name(cfg: RunConfig) -> str:
    width = f"{cfg.model.width:g}"
    return f"{cfg.method}-{cfg.data.name}-{cfg.model.arch}-w{width}-s{cfg.train.seed}-{cfg.config_hash()[:8]}"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _versions() -> dict[str, str]:
    out = {"cawbench": cawbench.__version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent,
        ).stdout.strip()  # fmt: skip
        if sha:
            out["git"] = sha
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def train(cfg: RunConfig, resume: bool = False, **kwargs: Any) -> dict[str, Any]:
    """Convenience: build a :class:`Trainer` and run it."""
    return Trainer(cfg, **kwargs).run(resume=resume)
