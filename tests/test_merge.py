"""Merged updates (train.merge_units): the same parameters as every unit updating on its own.

``steps`` (one clipping pass, one optimiser call per optimiser kind, one stats update per step) is bit for bit
``none`` on the CPU, for every registered method and every executor. ``all`` adds the loss pieces a method
shares across units (CAW-Conv's assignment softmax, entropy and orthogonality batched over every unit, the
label-smoothed CE target made once): bit for bit where a method shares nothing, else equal to float
rounding (batched reductions sum in another order). That tolerance test uses SGD: CAW-Conv's assignment
starts exactly uniform, which makes its conv gradients vanish analytically in the first steps (the scores'
gradient sums to zero over classes), and Adam scales what is left, rounding noise of ~1e-10, to full
lr-sized steps, so under Adam any rounding change (this one, another BLAS, a GPU) moves the first updates
by up to 2 lr. SGD keeps a rounding difference as small as it is.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from local_units import registered

from cawbench.config import OptimConfig
from cawbench.engine import (
    EXECUTORS,
    MergedOptimizers,
    StepStats,
    Trainer,
    build_executor,
    clip_grad_norms_,
    with_replayed_graphs,
)
from cawbench.method import Method, StepContext, get_method, list_methods


def _train(cfg, epochs: int) -> tuple[Trainer, list[dict]]:
    trainer = Trainer(cfg, write_result=False)
    records = [trainer.train_epoch(epoch) for epoch in range(epochs)]
    return trainer, [{k: r[k] for k in ("train_loss", "train_loss_weighted", "train_acc")} for r in records]


def _params(trainer: Trainer) -> list[tuple[str, torch.Tensor]]:
    return [(n, p.detach().clone()) for n, p in trainer.net.named_parameters()]


def _shares(method: str) -> bool:
    return get_method(method).share_pieces is not Method.share_pieces


# --------------------------------------------------------------------------------- the pieces
def test_one_clipping_pass_equals_clip_grad_norm_per_unit():
    gen = torch.Generator().manual_seed(0)
    shapes = [[(3, 4), (5,)], [(7, 2, 3)], [(2,), (2, 2), (9,)], [(4,)]]
    scales = [1e-3, 10.0, 0.5, 3.0]  # both below and above the max norms
    max_norms = [1.0, 1.0, 0.25, 2.0]
    lists = [[torch.zeros(s, requires_grad=True) for s in unit] for unit in shapes]
    for params, scale in zip(lists, scales, strict=True):
        for p in params:
            p.grad = scale * torch.randn(p.shape, generator=gen)
    lists[3][0].grad = None  # a unit without gradients is left alone
    expected = [[None if p.grad is None else p.grad.clone() for p in params] for params in lists]
    for grads, m in zip(expected, max_norms, strict=True):  # the reference: torch's own, unit by unit
        present = [g for g in grads if g is not None]
        if present:
            holders = [torch.zeros_like(g, requires_grad=True) for g in present]
            for h, g in zip(holders, present, strict=True):
                h.grad = g
            torch.nn.utils.clip_grad_norm_(holders, m)
    clip_grad_norms_(lists, max_norms)
    for params, grads in zip(lists, expected, strict=True):
        for p, g in zip(params, grads, strict=True):
            assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    assert not torch.equal(expected[1][0], 10.0 * torch.ones(1))  # (the clipped unit really was scaled)


def _optimizers(kind: str) -> list[torch.optim.Optimizer]:
    from cawbench.engine import make_optimizer

    gen = torch.Generator().manual_seed(1)
    configs = {
        "adamw": [OptimConfig(name="adamw", lr=0.1, weight_decay=5e-4)] * 3,
        "mixed": [
            OptimConfig(name="adamw", lr=0.1, weight_decay=5e-4),
            OptimConfig(name="adamw", lr=0.05, weight_decay=5e-4),  # another lr: another call
            OptimConfig(name="sgd", lr=0.3, momentum=0.9),
            OptimConfig(name="sgd", lr=0.3, momentum=0.0, weight_decay=0.0),
            OptimConfig(name="sgd", lr=0.3, momentum=0.9),  # with the first SGD: momentum buffers routed
            OptimConfig(name="adam", lr=0.1),
            OptimConfig(name="adamw", lr=0.1, weight_decay=5e-4),
        ],
    }[kind]
    opts = []
    for cfg in configs:
        params = [
            torch.nn.Parameter(torch.randn(3, 2, generator=gen)),
            torch.nn.Parameter(torch.randn(4, generator=gen)),
        ]
        opts.append(make_optimizer(params, cfg, fused=True))
    return opts


@pytest.mark.parametrize("kind", ["adamw", "mixed"])
def test_merged_optimiser_calls_equal_each_optimiser_stepping_alone(kind):
    ours, theirs = _optimizers(kind), _optimizers(kind)
    merged = MergedOptimizers()
    gen = torch.Generator().manual_seed(2)
    for step in range(4):
        resting = 0 if step == 2 else None  # a unit that does not train this step keeps its state
        for a, b in zip(ours, theirs, strict=True):
            for p, q in zip(a.param_groups[0]["params"], b.param_groups[0]["params"], strict=True):
                p.grad = torch.randn(p.shape, generator=gen)
                q.grad = p.grad.clone()
        merged.step([o for i, o in enumerate(ours) if i != resting])
        for i, o in enumerate(theirs):
            if i != resting:
                o.step()
    for a, b in zip(ours, theirs, strict=True):
        for p, q in zip(a.param_groups[0]["params"], b.param_groups[0]["params"], strict=True):
            assert torch.equal(p, q)
        sa, sb = a.state_dict(), b.state_dict()  # each optimiser's own state, as if it had stepped alone
        assert sa["param_groups"] == sb["param_groups"]
        for key in sb["state"]:
            for name, value in sb["state"][key].items():
                assert torch.equal(sa["state"][key][name], value), (key, name)
    if kind == "mixed":
        assert len(merged._standins) == 2  # the two identical AdamW units, the two momentum SGD ones


def test_step_stats_sum_terms_and_scores_by_hand():
    stats = StepStats(3, torch.device("cpu"), weighted=True)
    y = torch.tensor([0, 1, 1])
    right = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])  # argmax = y: 3 hits
    wrong = -right  # argmax 1, 0, 0: 1 hit (the first row, 0 vs 0: argmax picks index 0)
    for step, w in enumerate([0.5, 2.0]):
        stats.add(
            terms=[(0, {"ce": torch.tensor(1.0 + step)}, {"ce": 1.0}), (2, {"aux": torch.tensor(4.0)}, {})],
            vectors=[([0, 2], "reg", torch.tensor([0.25, 0.75]), [w, w])],
            scores=[(0, right, y), (1, wrong, y)],
        )
        stats.count_step(StepContext(0, 1, step))
    names, means, weighted, firsts = stats.means()
    assert names == ["aux", "ce", "reg"]
    nan = float("nan")
    expected = [[nan, 1.5, 0.25], [nan, nan, nan], [4.0, nan, 0.75]]
    expected_weighted = [[nan, 1.5, 0.25 * 1.25], [nan, nan, nan], [4.0, nan, 0.75 * 1.25]]
    expected_firsts = [[nan, 1.0, 0.25], [nan, nan, nan], [4.0, nan, 0.75]]  # the first step's values
    for got, want in ((means, expected), (weighted, expected_weighted), (firsts, expected_firsts)):
        for row, ref in zip(got, want, strict=True):
            assert all((math.isnan(a) and math.isnan(b)) or a == pytest.approx(b) for a, b in zip(row, ref))
    assert stats.correct.tolist() == [6.0, 0.0, 0.0] and stats.seen.tolist() == [6.0, 6.0, 0.0]


def test_first_values_are_each_units_first_batch_also_when_units_start_one_by_one():
    # a pipeline filling up: each tick one more unit computes its first batch beside units seen before
    stats = StepStats(3, torch.device("cpu"))
    for tick in range(3):
        stats.add(terms=[(i, {"ce": torch.tensor(10.0 * i + tick)}, {}) for i in range(tick + 1)])
    _, _, _, firsts = stats.means()
    assert [row[0] for row in firsts] == [0.0, 11.0, 22.0]


# --------------------------------------------------------------------------------- whole runs
COMMON = dict(train__epochs=2, data__subset=96, train__batch_size=32, train__seed=3)


@pytest.mark.parametrize("method", list_methods())
def test_merged_updates_give_every_methods_unmerged_parameters(method, tiny_config):
    alone, records = _train(tiny_config(method, train__merge_units="none", **COMMON), 2)
    merged, merged_records = _train(tiny_config(method, train__merge_units="steps", **COMMON), 2)
    initial = _params(Trainer(tiny_config(method, **COMMON), write_result=False))
    for (name, a), (_, b) in zip(_params(alone), _params(merged), strict=True):
        assert torch.equal(a, b), name
    assert merged_records == records  # the same loss terms and accuracies, read from the merged sums
    moved = [not torch.equal(a, b) for (_, a), (_, b) in zip(initial, _params(alone), strict=True)]
    assert any(moved)  # the comparison is between trained networks
    if not _shares(method):  # nothing shared: "all" is "steps"
        shared, shared_records = _train(tiny_config(method, train__merge_units="all", **COMMON), 2)
        for (name, a), (_, b) in zip(_params(alone), _params(shared), strict=True):
            assert torch.equal(a, b), name
        assert shared_records == records


@pytest.mark.parametrize("method", [m for m in list_methods() if _shares(m)])
def test_shared_loss_pieces_give_the_same_training_to_float_rounding(method, tiny_config):
    # SGD (see the module docstring); ResNet-17 at width 0.1 pads four assignment shapes into one stack.
    common = dict(COMMON, optim__name="sgd", optim__lr=0.05, optim__momentum=0.9, model__arch="resnet17")
    alone, records = _train(tiny_config(method, train__merge_units="none", **common), 2)
    shared, shared_records = _train(tiny_config(method, train__merge_units="all", **common), 2)
    for (name, a), (_, b) in zip(_params(alone), _params(shared), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    for mine, theirs in zip(shared_records, records, strict=True):
        for term, values in theirs["train_loss"].items():
            assert mine["train_loss"][term] == pytest.approx(values, rel=1e-5, abs=1e-9), term


@pytest.mark.parametrize("method", ["caw_conv", "cwcomp"])
def test_merged_sums_keep_budget_weights_and_each_units_active_steps(method, tiny_config):
    # Under train.budget_schedules the loss weights move every step (CAW-Conv's ortho warm-up: weighted sums
    # are summed step by step) and units may train only part of an epoch (CwComp's ILT windows, in the
    # horizon's epochs: each unit's mean is over its own active steps); the merged sums keep both exactly.
    extra = {
        "caw_conv": dict(train__schedule_epochs=150),
        "cwcomp": dict(train__schedule_epochs=4, params__ilt_windows=[[0, 1], [1, 3], [0, 4], [0, 4]]),
    }[method]
    common = dict(COMMON, train__budget_schedules=True, **extra)
    alone, records = _train(tiny_config(method, train__merge_units="none", **common), 2)
    merged, merged_records = _train(tiny_config(method, train__merge_units="steps", **common), 2)
    for (name, a), (_, b) in zip(_params(alone), _params(merged), strict=True):
        assert torch.equal(a, b), name
    assert merged_records == records
    if method == "cwcomp":  # 3 steps per epoch at 0, 2/3, 4/3 | 2, 8/3, 10/3: layer 0 trains in epoch 0 only
        assert any(v[0] is not None for v in records[0]["train_loss"].values())
        assert all(v[0] is None for v in records[1]["train_loss"].values())
    else:  # the warm-up moves the ortho weight within the first epoch: weighted != weight x mean
        first = records[0]
        assert 0 < first["train_loss_weighted"]["ortho"][0] < 1e-3 * first["train_loss"]["ortho"][0]


#: every executor of the registry; the pipeline also with CPU worker threads (each worker's batch one scope)
EXECUTOR_RUNS = [(name, 1) for name in EXECUTORS.names()] + [("pipeline", 3)]
#: 10 batches of 16 per epoch (TinyCNN's 4 units where a method can take it): the replayed CUDA-graph
#: executors capture (the pipeline's steady-state ticks too), and the last batch of each epoch is smaller
EXECUTOR_COMMON = dict(train__epochs=2, data__subset=150, train__batch_size=16, train__seed=3)
TINY = dict(model__arch="tinycnn")


def _executor_run(cfg, name: str, threads: int) -> Trainer:
    """Two epochs through executor ``name`` built from the registry as the trainer builds it (the CUDA-graph
    ones with replayed "graphs": their data flow on the CPU)."""
    parallel = {"pipeline": "pipeline", "streams": "streams"}.get(name, "off")
    trainer = Trainer(
        cfg.replace(**{"train.parallel": parallel, "train.pipeline_threads": threads}), write_result=False
    )
    setup = trainer.executor_setup
    if name in ("cuda_graph", "pipeline") and threads == 1:
        setup = with_replayed_graphs(setup)
    trainer.executor = build_executor(name, setup)
    for epoch in range(cfg.train.epochs):
        trainer.train_epoch(epoch)
    return trainer


@contextlib.contextmanager
def _one_thread_if(threads: int) -> Iterator[None]:
    """Worker threads run with one intra-op thread; so does their reference (sums follow the threads)."""
    before = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(("executor", "threads"), EXECUTOR_RUNS, ids=[f"{n}-{t}" for n, t in EXECUTOR_RUNS])
@pytest.mark.parametrize("method", ["caw_conv", "cwcomp", "ff", "local"])
def test_merged_updates_equal_unmerged_under_every_executor(method, executor, threads, tiny_config):
    # Each executor scopes the merged updates its own way (the step, the streams' join, a captured step, a
    # pipeline tick, a worker's batch): the same parameters as the units updating one by one in it.
    extra = dict(TINY) if method in ("caw_conv", "local") else {}  # CwComp, FF: their own networks
    if threads > 1 and method == "caw_conv":  # workers' dropout draws interleave at random
        extra["params__dropout"] = 0.0
    with registered() as local, _one_thread_if(threads):
        name = local if method == "local" else method
        runs = [
            _executor_run(tiny_config(name, train__merge_units=merge, **{**EXECUTOR_COMMON, **extra}),
                          executor, threads)
            for merge in ("none", "steps")
        ]  # fmt: skip
    alone, merged = runs
    for (n, a), (_, b) in zip(_params(alone), _params(merged), strict=True):
        assert torch.equal(a, b), n


@pytest.mark.parametrize(("executor", "threads"), EXECUTOR_RUNS, ids=[f"{n}-{t}" for n, t in EXECUTOR_RUNS])
def test_shared_loss_pieces_under_every_executor(executor, threads, tiny_config):
    # A pipeline tick or worker shares the pieces of the units it runs (subsets of the network, padded to
    # the network's widest assignment); SGD and float tolerance as in the sequential test above.
    common = dict(EXECUTOR_COMMON, **TINY, optim__name="sgd", optim__lr=0.05, params__dropout=0.0)
    with _one_thread_if(threads):
        alone, shared = [
            _executor_run(tiny_config("caw_conv", train__merge_units=merge, **common), executor, threads)
            for merge in ("none", "all")
        ]
    for (name, a), (_, b) in zip(_params(alone), _params(shared), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_a_checkpoint_of_per_unit_updates_resumes_exactly_under_merged_ones(tiny_config):
    # The optimisers stay one per unit, so checkpoints keep their format: a run stopped under
    # merge_units=none (the format every earlier checkpoint has) and resumed under "steps" ends bit for bit
    # like the uninterrupted per-unit run; merge_units is left out of the config hash (equal maths).
    common = dict(COMMON, train__epochs=3)
    full = Trainer(tiny_config("caw_conv", train__merge_units="none", run_name="full", **common)).run()

    class Interrupt(Exception):
        pass

    def stop(record):
        if record["epoch"] == 0:
            raise Interrupt

    before = tiny_config("caw_conv", train__merge_units="none", run_name="cut", **common)
    with pytest.raises(Interrupt):
        Trainer(before, callbacks=[stop]).run()
    after = tiny_config("caw_conv", train__merge_units="steps", run_name="cut", **common)
    assert after.config_hash() == before.config_hash()
    resumed_trainer = Trainer(after)
    resumed = resumed_trainer.run(resume=True)
    for key in ("final_val_acc", "final_test_acc", "per_layer_test_acc", "per_layer_val_acc"):
        assert resumed[key] == full[key], key
    saved = torch.load(Path(full["run_dir"]) / "checkpoint.pt", weights_only=False)
    for name, value in resumed_trainer.net.state_dict().items():
        assert torch.equal(value, saved["net"][name]), name
    steps = {int(s["step"]) for o in saved["optimizers"] for s in o["state"].values()}
    assert steps == {3 * 3}  # 3 epochs of 3 batches, each unit's own count carried over the resume


@pytest.mark.parametrize("threads", [1, 3])
def test_shared_pieces_keep_pipeline_and_sequential_training_equal(threads, tiny_config):
    # A pipeline tick shares the pieces of only the units it runs; padded to the network's widest layer,
    # each unit's sums run the same way in any company, so the layer-parallel schedule still trains bit for
    # bit like the sequential one (dropout off: its draws come in another order in a pipeline).
    common = dict(COMMON, model__arch="resnet17", params__dropout=0.0, train__merge_units="all")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count (sums are ordered by the threads that run them)
    try:
        seq, _ = _train(tiny_config("caw_conv", **common), 2)
        piped, _ = _train(
            tiny_config("caw_conv", train__parallel="pipeline", train__pipeline_threads=threads, **common), 2
        )
    finally:
        torch.set_num_threads(before)
    for (name, a), (_, b) in zip(_params(seq), _params(piped), strict=True):
        assert torch.equal(a, b), name
