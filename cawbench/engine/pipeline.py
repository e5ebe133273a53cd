"""The pipeline executor (``train.parallel=pipeline``): unit l works on batch b while unit l+1 works on b-1.

On CUDA, and on the CPU with one thread, :class:`PipelineRunner` runs the wavefront (every unit on its own
CUDA stream; with ``train.cuda_graph`` its steady-state ticks captured as graphs). On the CPU with
``train.pipeline_threads=N`` (N > 1), :func:`run_thread_pipeline` drives N single-threaded workers over
FLOP-balanced groups of consecutive units (:func:`balanced_groups`). Every unit sees the batches in order
and consumes its predecessor's output from before that predecessor's update: the sequential maths. Merged
updates (``train.merge_units``) are scoped per tick (units 1.., then unit 0) and per worker batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch

from cawbench.engine.executors import Batches, CudaGraphBackend, Executor, ExecutorSetup, register_executor
from cawbench.engine.step import BatchStep, StepState


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
    def _eager_tick(self, slots: list[_PipeItem | None], point: Callable[[int], StepState]) -> None:
        # Downstream first (an output waits one tick for its consumer). Unit 0 starts a new batch, whose
        # construction may read the network (FF's hard negatives), so with merged updates it runs after
        # the others' updates, as it does when every unit updates right after its backward.
        items = [(i, slots[i]) for i in reversed(range(self.n)) if slots[i] is not None]
        for i, _ in items:
            slots[i] = None
        for group in ([(i, it) for i, it in items if i > 0], [(i, it) for i, it in items if i == 0]):
            if not group:
                continue
            states = [point(item.batch) for _, item in group]
            units = [i for i, _ in group]
            with self.step.updates(units, [item.y for _, item in group], states) as pending:
                self._after_updates(units, pending)
                for (i, item), state in zip(group, states, strict=True):
                    self._eager_unit(i, item, state, slots, pending)
                self._before_updates(units, pending)

    def _eager_unit(
        self, i: int, item: _PipeItem, state: StepState, slots: list[_PipeItem | None], pending: Any
    ) -> None:
        with self._stream(i):
            if self.cuda:
                self.streams[i].wait_event(item.ready)
                for t in (item.h, item.shortcut, item.y, item.x):
                    if t is not None:
                        t.record_stream(self.streams[i])  # made on another stream, freed here
            h, shortcut = (self.step.start(item.x, item.y), None) if i == 0 else (item.h, item.shortcut)
            h, shortcut = self.step.unit(i, h, shortcut, item.y, state, pending=pending)
            if i + 1 < self.n:
                ready = self._event(self.streams[i] if self.cuda else None)
                slots[i + 1] = _PipeItem(h, shortcut, item.y, item.batch, ready)

    def _after_updates(self, units: list[int], pending: Any) -> None:
        """CUDA, merged updates: the units' streams start after what the scope did on the calling stream
        (its gradients cleared, the method's shared pieces)."""
        if self.cuda and pending is not None:
            origin = torch.cuda.current_stream(self.step.device)
            for i in units:
                self.streams[i].wait_stream(origin)

    def _before_updates(self, units: list[int], pending: Any) -> None:
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

    def _tick(self, src: _TickBuffers, dst: _TickBuffers, states: list[StepState]) -> None:
        origin = torch.cuda.current_stream(self.step.device) if self.cuda else None
        for group in (list(reversed(range(1, self.n))), [0]):  # unit 0 after the others (see _eager_tick)
            if not group:
                continue
            labels = [src.y0 if i == 0 else src.y[i] for i in group]
            with self.step.updates(group, labels, [states[i] for i in group]) as pending:
                for i in group:
                    if self.cuda:
                        self.streams[i].wait_stream(origin)
                    with self._stream(i):
                        if i == 0:
                            h, shortcut, y = self.step.start(src.x, src.y0), None, src.y0
                        else:
                            h, shortcut, y = src.h[i], src.shortcut[i], src.y[i]
                        h, shortcut = self.step.unit(i, h, shortcut, y, states[i], pending=pending)
                        if i + 1 < self.n:
                            dst.h[i + 1].copy_(h)
                            dst.y[i + 1].copy_(y)
                            if dst.shortcut[i + 1] is not None:
                                dst.shortcut[i + 1].copy_(shortcut)
                if self.cuda:
                    for i in group:
                        origin.wait_stream(self.streams[i])

    # -- the epoch -----------------------------------------------------------------------------------------
    def run_epoch(self, batches: Batches, point: Callable[[int], StepState]) -> None:
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
            state = point(fed)
            state.stats.count_step(state)
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
                self._eager_tick(slots, point)
                slots[0] = feed()
            else:  # steady state: captured ticks until the batches run out or a smaller one comes
                buffers = buffers or self._allocate(slots)
                self._load(buffers[0], slots)
                index = [item.batch for item in slots]
                parity = 0
                while True:
                    if parity not in replays:
                        states = [point(b) for b in index]
                        for unit in self.step.units:
                            if unit.optimizer is not None:
                                unit.optimizer.zero_grad(set_to_none=True)
                        tick = functools.partial(self._tick, buffers[parity], buffers[1 - parity], states)
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
    step: BatchStep, batches: Batches, point: Callable[[int], StepState], groups: list[list[int]]
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
                h, shortcut, y, state = item
                units = groups[w]
                with step.updates(units, [y] * len(units), [state] * len(units)) as pending:
                    for i in units:
                        h, shortcut = step.unit(i, h, shortcut, y, state, pending=pending)
                if w + 1 < n_workers:
                    queues[w + 1].put((h, shortcut, y, state))
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
            state = point(b)
            queues[0].put((step.start(x, y), None, y, state))
            state.stats.count_step(state)
    finally:
        queues[0].put(None)
        for t in workers:
            t.join()
        torch.set_num_threads(threads_before)
    if errors:
        raise errors[0]


class ThreadPipeline:
    """:func:`run_thread_pipeline` over fixed ``groups`` of consecutive units (one worker thread each)."""

    def __init__(self, step: BatchStep, groups: list[list[int]]) -> None:
        self.step, self.groups = step, groups

    def run_epoch(self, batches: Batches, point: Callable[[int], StepState]) -> None:
        run_thread_pipeline(self.step, batches, point, self.groups)


@register_executor("pipeline")
def _pipeline(setup: ExecutorSetup) -> Executor:
    train = setup.train
    if setup.device.type == "cpu" and train.pipeline_threads > 1:
        return ThreadPipeline(setup.step, balanced_groups(setup.unit_costs(), train.pipeline_threads))
    backend = None
    if train.cuda_graph:
        backend = setup.graph_backend if setup.graph_backend is not None else CudaGraphBackend(setup.device)
    return PipelineRunner(setup.step, train.batch_size, backend)
