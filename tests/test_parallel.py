"""Every executor (sequential, streams, CUDA graph, pipeline: the engine's registry) computes exactly what
the sequential mode computes; the graph executors' data flow checked on the CPU with replayed "graphs"."""

from __future__ import annotations

import pytest
import torch
from local_units import registered

from cawbench.config import ConfigError
from cawbench.engine import EXECUTORS, GraphedSteps, Trainer, build_executor, with_replayed_graphs


def _train(cfg) -> Trainer:
    trainer = Trainer(cfg, write_result=False)
    trainer.records = [trainer.train_epoch(epoch) for epoch in range(cfg.train.epochs)]
    return trainer


@pytest.mark.parametrize("threads", [1, 3])
def test_pipeline_gives_the_same_parameters_as_sequential(tiny_config, threads):
    # ResNet-17 wiring (shortcut adds and concatenations between units), 2 epochs of 4 batches, the last
    # one smaller: every unit must see the same inputs in the same order in both schedules; with 1 thread
    # the wavefront runs in the calling thread, with 3 the units are split over 3 worker threads.
    with registered() as method:
        common = dict(model__arch="resnet17", model__width=0.04, train__batch_size=40, data__subset=150,
                      train__epochs=2, train__seed=7)  # fmt: skip
        # Workers run with one intra-op thread; so does the reference (summation order is thread-dependent).
        before = torch.get_num_threads()
        torch.set_num_threads(1 if threads > 1 else before)
        try:
            seq = _train(tiny_config(method, train__parallel="off", **common))
        finally:
            torch.set_num_threads(before)
        pipe = _train(
            tiny_config(method, train__parallel="pipeline", train__pipeline_threads=threads, **common)
        )
        initial = Trainer(tiny_config(method, **common), write_result=False)  # same seed, not trained
    assert len(seq.units) == 17
    for (name, a), (_, b) in zip(seq.net.named_parameters(), pipe.net.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    # the comparison is between two trained networks, not two untouched ones
    moved = [
        not torch.equal(a, b) for a, b in zip(seq.net.parameters(), initial.net.parameters(), strict=True)
    ]
    assert all(moved)


def test_pipeline_and_sequential_record_the_same_epoch(tiny_config):
    with registered() as method:
        common = dict(model__arch="tinycnn", model__width=0.1, train__batch_size=50, data__subset=120,
                      train__seed=1)  # fmt: skip
        a = Trainer(tiny_config(method, train__parallel="off", **common), write_result=False)
        b = Trainer(tiny_config(method, train__parallel="pipeline", **common), write_result=False)
        sa, sb = a.train_epoch(0), b.train_epoch(0)
    assert sa["train_loss"] == sb["train_loss"]
    assert sa["train_acc"] == sb["train_acc"]


def test_cuda_graph_needs_cuda_and_the_sequential_mode(tiny_config):
    with pytest.raises(ConfigError, match="train.cuda_graph=true needs a CUDA device"):
        Trainer(tiny_config(train__cuda_graph=True))


def test_graph_runner_replays_every_full_batch_once(tiny_config):
    # The CUDA-graph runner's data flow, checked on the CPU with a stand-in that "replays" by calling the
    # captured step again: same parameters as plain eager steps, over 2 epochs (capture in each) with a
    # smaller last batch (run eagerly).
    from cawbench.engine import GraphedSteps, ReplayBackend

    with registered() as method:
        common = dict(model__arch="tinycnn", model__width=0.1, train__batch_size=20, data__subset=110,
                      train__epochs=2, train__seed=5)  # fmt: skip
        eager = _train(tiny_config(method, **common))
        graphed = Trainer(tiny_config(method, **common), write_result=False)
        graphed.executor = GraphedSteps(graphed.step, 20, warmup=2, backend=ReplayBackend())
        records = [graphed.train_epoch(epoch) for epoch in range(2)]
    for a, b in zip(eager.net.parameters(), graphed.net.parameters(), strict=True):
        assert torch.equal(a, b)
    assert all(r["train_images_per_s"] for r in records)


def test_a_failing_unit_in_a_pipeline_worker_raises_in_the_caller(tiny_config):
    with registered() as method:
        cfg = tiny_config(method, model__arch="tinycnn", model__width=0.1, train__batch_size=10,
                          data__subset=60, train__parallel="pipeline", train__pipeline_threads=2)  # fmt: skip
        trainer = Trainer(cfg, write_result=False)
        assert trainer.executor.groups == [[0, 1], [2, 3]] or len(trainer.executor.groups) == 2

        def broken(*args, **kwargs):
            raise FloatingPointError("unit 3 broke")

        trainer.net.units[3].local_losses = broken
        with pytest.raises(FloatingPointError, match="unit 3 broke"):
            trainer.train_epoch(0)


def test_balanced_groups_are_contiguous_and_minimise_the_largest_group():
    from cawbench.engine import balanced_groups

    assert balanced_groups([1, 1, 1, 1], 2) == [[0, 1], [2, 3]]
    assert balanced_groups([6, 1, 1, 1, 1, 1], 2) == [[0], [1, 2, 3, 4, 5]]
    assert balanced_groups([1, 2, 3], 5) == [[0], [1], [2]]
    groups = balanced_groups([3, 1, 1, 1, 2, 2, 2], 3)
    assert [i for g in groups for i in g] == list(range(7))
    assert max(sum([3, 1, 1, 1, 2, 2, 2][i] for i in g) for g in groups) == 4


def test_captured_pipeline_ticks_give_the_same_parameters_as_sequential(tiny_config):
    # The captured pipeline's double-buffered ticks, with the CPU replay stand-in for CUDA graphs: 12 batches
    # per epoch through 4 units, so the steady state (captured ticks) is entered and left in each epoch.
    from cawbench.engine import PipelineRunner, ReplayBackend

    with registered() as method:
        common = dict(model__arch="tinycnn", model__width=0.1, train__batch_size=10, data__subset=115,
                      train__epochs=2, train__seed=9)  # fmt: skip
        seq = _train(tiny_config(method, **common))
        piped = Trainer(tiny_config(method, train__parallel="pipeline", **common), write_result=False)
        backend = ReplayBackend()
        captured = []
        backend.capture = lambda fn: captured.append(fn) or fn
        piped.executor = PipelineRunner(piped.step, 10, backend, warmup=1)
        records = [piped.train_epoch(epoch) for epoch in range(2)]
    assert len(captured) == 4  # two tick graphs (alternating buffers) per epoch
    for a, b in zip(seq.net.parameters(), piped.net.parameters(), strict=True):
        assert torch.equal(a, b)
    for mine, theirs in zip(records, seq.records, strict=True):
        assert mine["train_loss"] == theirs["train_loss"] and mine["train_acc"] == theirs["train_acc"]


def test_streams_mode_gives_the_same_parameters_as_sequential(tiny_config):
    # parallel=streams hands each unit's output on before its backward (per-unit CUDA streams; on the CPU
    # the same reordered code runs in one stream): the same updates as the sequential mode.
    with registered() as method:
        common = dict(model__arch="resnet17", model__width=0.04, train__batch_size=40, data__subset=150,
                      train__epochs=2, train__seed=7)  # fmt: skip
        seq = _train(tiny_config(method, **common))
        streams = _train(tiny_config(method, train__parallel="streams", **common))
    for a, b in zip(seq.net.parameters(), streams.net.parameters(), strict=True):
        assert torch.equal(a, b)
    for mine, theirs in zip(streams.records, seq.records, strict=True):
        assert mine["train_loss"] == theirs["train_loss"]


def test_the_configuration_picks_the_executor_by_name(tiny_config):
    assert EXECUTORS.names() == ["cuda_graph", "pipeline", "sequential", "streams"]
    with registered() as method:
        for parallel, name in (("off", "sequential"), ("streams", "streams"), ("pipeline", "pipeline")):
            trainer = Trainer(tiny_config(method, model__arch="tinycnn", train__parallel=parallel))
            assert trainer.executor_name == name


@pytest.mark.parametrize("name", EXECUTORS.names())
def test_every_executor_gives_the_sequential_parameters_and_records(tiny_config, name):
    # ResNet-17 wiring, 2 epochs of 4 batches (the last smaller), each executor built from the registry as
    # the trainer builds it; the CUDA-graph ones with replayed "graphs" (their data flow, on the CPU).
    with registered() as method:
        common = dict(model__arch="resnet17", model__width=0.04, train__batch_size=40, data__subset=150,
                      train__epochs=2, train__seed=7)  # fmt: skip
        seq = _train(tiny_config(method, **common))
        parallel = "pipeline" if name == "pipeline" else "streams" if name == "streams" else "off"
        other = Trainer(tiny_config(method, train__parallel=parallel, **common), write_result=False)
        setup = other.executor_setup
        if name == "cuda_graph" or name == "pipeline":
            setup = with_replayed_graphs(setup)
        other.executor = build_executor(name, setup)
        built = other.executor
        runs = type(getattr(built, "run_batch", built)).__name__  # what runs a batch (or the executor)
        assert runs == {"sequential": "BatchStep", "streams": "StreamsStep", "cuda_graph": "BatchStep",
                        "pipeline": "PipelineRunner"}[name], runs  # fmt: skip
        assert (type(built) is GraphedSteps) == (name == "cuda_graph")
        records = [other.train_epoch(epoch) for epoch in range(2)]
    for (label, a), (_, b) in zip(seq.net.named_parameters(), other.net.named_parameters(), strict=True):
        assert torch.equal(a, b), (name, label)
    for mine, theirs in zip(records, seq.records, strict=True):
        assert mine["train_loss"] == theirs["train_loss"] and mine["train_acc"] == theirs["train_acc"]
