"""Executors: in which order a training epoch's batches and units run. All compute the sequential updates.

An executor has one method, ``run_epoch(batches, point)``: it trains on every ``(x, y)`` of ``batches``,
``point(b)`` giving batch b's :class:`~cawbench.engine.step.StepState` (schedule point and statistics), and
counts every batch once (``state.stats.count_step(state)``). Executors are registered by name and picked
from the configuration by :func:`executor_name`; each is tested equal to ``sequential``
(``tests/test_parallel.py``). Methods never see which one runs them.

Every executor also scopes the merged updates of ``train.merge_units`` (:meth:`BatchStep.updates
<cawbench.engine.step.BatchStep.updates>`): the units it runs together update together, each before its
next forward.

- ``sequential`` (``train.parallel=off``): batch after batch, unit after unit.
- ``streams`` (``train.parallel=streams``, CUDA): every unit on its own CUDA stream, the next unit's forward
  overlapping this unit's backward and update (elsewhere: sequential).
- ``cuda_graph`` (``train.cuda_graph=true``, CUDA): the whole training step (sequential or streams)
  captured once per epoch and replayed.
- ``pipeline`` (``train.parallel=pipeline``, :mod:`cawbench.engine.pipeline`): unit l on batch b while unit
  l+1 is on batch b-1; CUDA streams, or CPU worker threads (``train.pipeline_threads``); with
  ``train.cuda_graph`` its steady-state ticks are captured.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch

from cawbench.config import ConfigError, TrainConfig
from cawbench.engine.step import BatchStep, StepState, UnitHook
from cawbench.registry import Registry

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
BatchRunner = Callable[[torch.Tensor, torch.Tensor, StepState], None]


class Executor(Protocol):
    def run_epoch(self, batches: Batches, point: Callable[[int], StepState]) -> None: ...


@dataclasses.dataclass
class ExecutorSetup:
    """What an executor is built from: the batch step, the run's training settings, and (for the pipeline's
    worker groups) each unit's cost. ``graph_backend``: how steps are captured (default: CUDA graphs; the
    tests use :class:`ReplayBackend` to run the graph executors' data flow on the CPU)."""

    step: BatchStep
    train: TrainConfig
    unit_costs: Callable[[], list[float]]
    graph_backend: Any = None

    @property
    def device(self) -> torch.device:
        return self.step.device


def _load_pipeline() -> None:
    importlib.import_module("cawbench.engine.pipeline")  # registers "pipeline"


EXECUTORS: Registry[Callable[[ExecutorSetup], Executor]] = Registry("executor", loader=_load_pipeline)
register_executor = EXECUTORS.register


def executor_name(train: TrainConfig, device: torch.device) -> str:
    """The executor a configuration asks for (``train.parallel`` and ``train.cuda_graph``)."""
    if train.cuda_graph and device.type != "cuda":
        raise ConfigError(f"train.cuda_graph=true needs a CUDA device, not {device}; set it to false")
    if train.parallel == "pipeline":
        return "pipeline"  # captures its own steady state under train.cuda_graph
    if train.cuda_graph:
        return "cuda_graph"  # of the sequential or the streams step
    return {"off": "sequential", "streams": "streams"}[train.parallel]


def build_executor(name: str, setup: ExecutorSetup) -> Executor:
    return EXECUTORS.get(name)(setup)


def with_replayed_graphs(setup: ExecutorSetup) -> ExecutorSetup:
    """``setup`` with CUDA-graph capture on, each captured step "replayed" by calling it again with the
    same frozen arguments (:class:`ReplayBackend`): the graph executors' data flow on any device."""
    train = dataclasses.replace(setup.train, cuda_graph=True)
    return dataclasses.replace(setup, train=train, graph_backend=ReplayBackend())


# --------------------------------------------------------------------------------- sequential
class Sequential:
    """Batch after batch through :class:`BatchStep` (unit after unit)."""

    def __init__(self, run_batch: BatchRunner) -> None:
        self.run_batch = run_batch

    def run_epoch(self, batches: Batches, point: Callable[[int], StepState]) -> None:
        for b, (x, y) in enumerate(batches):
            state = point(b)
            self.run_batch(x, y, state)
            state.stats.count_step(state)


@register_executor("sequential")
def _sequential(setup: ExecutorSetup) -> Executor:
    return Sequential(setup.step)


# --------------------------------------------------------------------------------- CUDA streams
class StreamsStep:
    """One batch with every unit on its own CUDA stream: unit i+1 waits only for unit i's forward (an event),
    so its forward runs while unit i does its loss, backward, clipping and update. Each unit's stream keeps
    its steps in order, so unit i's next forward still sees its updated weights: the sequential maths, with
    the small kernels of neighbouring units in flight together (once launched from a CUDA graph, the device
    runs the chain of forwards while the updates trail behind). Merged updates (``train.merge_units``) run
    on the calling stream once every unit's stream is done; the next step's streams start after them. Off
    CUDA: the sequential step."""

    def __init__(self, step: BatchStep) -> None:
        self.step = step
        cuda = step.device.type == "cuda"
        self.streams = [torch.cuda.Stream(step.device) for _ in step.units] if cuda else None

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, state: StepState, hook: UnitHook | None = None
    ) -> None:
        if self.streams is None:
            return self.step(x, y, state, hook)
        origin = torch.cuda.current_stream(self.step.device)
        n = len(self.streams)
        h, shortcut = self.step.start(x, y), None
        wait: Any = origin
        with self.step.updates(list(range(n)), [y] * n, [state] * n) as pending:
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
                    h, shortcut = self.step.unit(i, h, shortcut, y, state, hook, ready, pending)
                wait = ready
            for stream in self.streams:
                origin.wait_stream(stream)
        return None


@register_executor("streams")
def _streams(setup: ExecutorSetup) -> Executor:
    return Sequential(StreamsStep(setup.step))


# --------------------------------------------------------------------------------- CUDA graphs
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

    def __init__(
        self,
        step: BatchStep,
        batch_size: int,
        warmup: int = 3,
        backend: Any = None,
        run_batch: BatchRunner | None = None,
    ) -> None:
        self.step, self.batch_size, self.warmup = step, batch_size, warmup
        self.backend = backend if backend is not None else CudaGraphBackend(step.device)
        self.run_batch = run_batch if run_batch is not None else step  # what is captured: one whole batch
        self.warmed = False

    def run_epoch(self, batches: Batches, point: Callable[[int], StepState]) -> None:
        replay, static_x, static_y = None, None, None
        eager_first = 1 if self.warmed else self.warmup
        for b, (x, y) in enumerate(batches):
            state = point(b)
            full = x.shape[0] == self.batch_size
            if replay is None and full and b >= eager_first:
                static_x, static_y = x.clone(), y.clone()
                for unit in self.step.units:
                    if unit.optimizer is not None:  # gradients will live in the graph's memory pool
                        unit.optimizer.zero_grad(set_to_none=True)
                replay = self.backend.capture(functools.partial(self.run_batch, static_x, static_y, state))
                self.warmed = True
            if replay is not None and full:
                static_x.copy_(x)
                static_y.copy_(y)
                replay()
            else:
                self.backend.eager(functools.partial(self.run_batch, x, y, state))
            state.stats.count_step(state)


@register_executor("cuda_graph")
def _cuda_graph(setup: ExecutorSetup) -> Executor:
    run_batch = StreamsStep(setup.step) if setup.train.parallel == "streams" else setup.step
    return GraphedSteps(setup.step, setup.train.batch_size, backend=setup.graph_backend, run_batch=run_batch)
