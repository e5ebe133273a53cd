"""`cawbench bench`: the saved-bytes counter against hand counts, FLOPs of a local unit, the CLI end to end."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from local_units import registered
from torch import nn

from cawbench.bench import (
    HostReadCounter,
    OpCounter,
    SavedTensorMeter,
    parameter_storages,
    parse_methods,
)
from cawbench.cli import main
from cawbench.config import ConfigError, OptimConfig
from cawbench.engine import BatchStep, StepState, StepStats, UnitState, make_optimizer
from cawbench.method import LocalNetwork, LocalUnit, UnitOutput


class LinearReLU(LocalUnit):
    """h = relu(W x + b); loss = mean(h^2). Autograd keeps x (for W's gradient) and h (ReLU's result,
    which pow also saves: the same storage, counted once). mean and the bias keep nothing else."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> UnitOutput:
        return UnitOutput(F.relu(self.fc(x)))

    def local_losses(self, out, target, ctx) -> dict[str, torch.Tensor]:
        return {"sq": out.passed.pow(2).mean()}


def test_saved_bytes_of_a_two_unit_network_match_a_hand_count():
    torch.manual_seed(0)
    batch, sizes = 4, [(3, 5), (5, 2)]
    units = [LinearReLU(a, b) for a, b in sizes]
    net = LocalNetwork(units)
    states = [UnitState(u, list(u.parameters()), make_optimizer(list(u.parameters()), OptimConfig()),
                        OptimConfig(), None) for u in units]  # fmt: skip
    method = SimpleNamespace(prepare_batch=lambda x, y, training: x)
    step = BatchStep(method, net, states, torch.device("cpu"), bf16=False)
    meter = SavedTensorMeter(parameter_storages(net))
    x, y = torch.randn(batch, 3), torch.zeros(batch, dtype=torch.long)
    step(x, y, StepState(0, 1, 0, stats=StepStats(2, torch.device("cpu"))), hook=meter.hook)
    # Hand count, float32 = 4 bytes: unit 0 keeps x [4,3] and h [4,5]; unit 1 keeps its input [4,5] and h [4,2].
    assert meter.unit_bytes() == [4 * batch * (3 + 5), 4 * batch * (5 + 2)]  # [128, 112]


def test_saved_bytes_count_a_conv_input_and_exclude_parameters():
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
    meter = SavedTensorMeter(parameter_storages(conv))
    x = torch.randn(5, 2, 6, 6)
    with meter.hook(0):
        conv(x).sum().backward()
    # Only the input is kept (the weight is a parameter; sum keeps nothing): 5*2*6*6 floats.
    assert meter.unit_bytes() == [4 * 5 * 2 * 6 * 6]


def test_host_read_counter_sees_item_and_nonzero():
    t = torch.arange(4.0)
    with HostReadCounter() as reads:
        t.sum().item()
        t.nonzero()
        _ = t * 2
    assert reads.count == 2


def test_op_counter_counts_every_dispatched_op_and_books_them_to_units():
    t = torch.arange(4.0)
    counter = OpCounter()
    with counter:
        a = t * 2  # 1 op, shared
        with counter.hook(0):
            b = a + 1  # unit 0: add, sum
            b.sum()
            with counter.hook(1):
                torch.exp(b)  # unit 1 (nested hooks book to the innermost)
            b.neg()  # unit 0 again
        torch._foreach_add_([a, b], 1.0)  # one op for the whole list
    assert counter.total == 6
    assert counter.unit_counts(3) == [3, 1, 0] and counter.shared == 2
    assert counter.by_op["aten._foreach_add_.Scalar"] == 1


def test_parse_methods_with_row_overrides_and_errors():
    entries = parse_methods("backprop,backprop{train.parallel=pipeline;optim.lr=0.5}", ["backprop", "ff"])
    assert [e.method for e in entries] == ["backprop", "backprop"]
    assert entries[1].overrides == {"train.parallel": "pipeline", "optim.lr": 0.5}
    with pytest.raises(ConfigError, match="unknown method 'nope'; valid methods: backprop, ff"):
        parse_methods("nope", ["backprop", "ff"])


def test_process_options_are_set_by_the_entry_point_and_written_into_the_report(tmp_path):
    threads = torch.get_num_threads()
    try:
        with registered() as method:
            args = ["--threads", "1", "--no-keep-cpu-memory", "bench", "--methods", method, "--arch",
                    "tinycnn", "--width", "0.1", "--input", "1x16x16", "--batch", "4", "--steps", "1",
                    "--repeats", "1", "--warmup", "0", "--eval-steps", "1", "--device", "cpu",
                    "--no-reference", "--out", str(tmp_path)]  # fmt: skip
            assert main(args) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    md = (tmp_path / "cpu.md").read_text()
    assert "command: `cawbench --threads 1 --no-keep-cpu-memory bench --methods" in md
    assert ", 1 torch threads" in md
    assert main(["--threads", "0", "list", "readouts"]) == 2  # a bad value is a user error


def _bench(tmp_path, *extra: str) -> list[dict[str, str]]:
    args = ["bench", "--input", "1x16x16", "--batch", "8", "--steps", "1", "--repeats", "2", "--warmup", "0",
            "--eval-steps", "1", "--device", "cpu", "--out", str(tmp_path), *extra]  # fmt: skip
    assert main(args) == 0
    name = extra[extra.index("--name") + 1] if "--name" in extra else "cpu"
    assert (tmp_path / f"{name}.md").is_file()
    with (tmp_path / f"{name}.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_bench_runs_on_cpu_and_writes_its_table(tmp_path, capsys):
    with registered() as method:
        rows = _bench(tmp_path, "--methods", method, "--arch", "tinycnn", "--width", "0.1")
    out = capsys.readouterr().out
    assert "train img/s" in out and method in out
    md = (tmp_path / "cpu.md").read_text()
    assert "| method | arch |" in md and "command: `cawbench bench --methods" in md and "torch" in md
    local, ref = rows
    assert (
        local["label"] == method and ref["label"] == "backprop (ref)" and local["reference"] == ref["label"]
    )
    assert int(local["units"]) == 4 and int(ref["units"]) == 1
    for row in rows:
        assert float(row["train_ips"]) > 0 and float(row["eval_ips"]) > 0
        assert float(row["saved_max_mb"]) > 0 and float(row["train_gflop_per_img"]) > 0
        assert row["host_reads_per_step"] == "0"
    assert float(ref["train_ips_x"]) == 1.0
    # a local step keeps one unit's activations at a time: less than end-to-end backprop of the same net
    assert float(local["saved_max_mb"]) < float(ref["saved_max_mb"])
    assert float(local["saved_sum_mb"]) > float(local["saved_max_mb"])
    ratio = float(local["train_ips"]) / float(ref["train_ips"])
    assert float(local["train_ips_x"]) == pytest.approx(ratio)


def test_local_training_flops_are_forward_plus_weight_gradient(tmp_path):
    # One conv layer of the tinycnn plan? Use the whole 4-layer plan: each local unit's detached input gets
    # no gradient, so training costs exactly 2x the forward convolutions (+ the tiny score projection).
    with registered() as method:
        (row,) = _bench(
            tmp_path, "--methods", method, "--arch", "tinycnn", "--width", "0.1", "--no-reference"
        )
    # tinycnn w0.1 on 1x16x16: convs 1->10 (5x5, 16x16), 10->20 (5x5, 8x8), 20->40 (3x3, 4x4), 40->40 (3x3, 4x4)
    macs = 16 * 16 * 10 * 1 * 25 + 8 * 8 * 20 * 10 * 25 + 4 * 4 * 40 * 20 * 9 + 4 * 4 * 40 * 40 * 9
    projection = 2 * (10 + 20 + 40 + 40) * 10  # [1,C] @ [C,10] per unit, forward only
    projection_grad = 2 * (10 + 20 + 40 + 40) * 10  # its gradient w.r.t. the pooled features
    expected = 2 * (2 * macs) + projection + projection_grad
    assert float(row["train_gflop_per_img"]) * 1e9 == pytest.approx(expected, rel=1e-9)


def test_ops_only_counts_each_row_and_a_baseline_adds_the_before_columns(tmp_path):
    with registered() as method:
        common = ("--methods", method, "--arch", "tinycnn", "--width", "0.1", "--ops-only")
        before = _bench(tmp_path, *common, "--name", "before")
        assert [r["label"] for r in before] == [method, "backprop (ref)"]
        for row in before:
            units = [int(n) for n in row["ops_by_unit"].split()]
            assert int(row["ops_per_step"]) == sum(units) + int(row["ops_shared"])
            assert min(units) > 0 and row["train_ips"] == ""  # nothing timed
        local, ref = before
        assert len(local["ops_by_unit"].split()) == 4 and len(ref["ops_by_unit"].split()) == 1
        assert float(local["ops_x"]) == pytest.approx(int(local["ops_per_step"]) / int(ref["ops_per_step"]))
        # a dotted name keeps its dot ("after-w0.1.md", not "after-w0.md")
        after = _bench(tmp_path, *common, "--name", "after-w0.1", "--baseline", str(tmp_path / "before.csv"))
    assert not (tmp_path / "after-w0.md").exists()
    for old, new in zip(before, after, strict=True):
        assert float(new["baseline_ops_per_step"]) == float(old["ops_per_step"])
        assert float(new["baseline_ops_x"]) == pytest.approx(float(old["ops_x"]))
    md = (tmp_path / "after-w0.1.md").read_text()
    assert "| ops/step before | x BP before |" in md and "before.csv" in md and "train img/s" not in md


def test_a_baseline_without_op_counts_is_refused(tmp_path, capsys):
    (tmp_path / "old.csv").write_text("label,arch,width,train_ips\nx,mlp,1,3\n")
    args = ["bench", "--methods", "backprop", "--device", "cpu", "--out", str(tmp_path), "--ops-only",
            "--baseline", str(tmp_path / "old.csv")]  # fmt: skip
    assert main(args) == 2
    assert "has no ops_per_step column" in capsys.readouterr().err


def test_paper_rows_are_compared_with_backprops_twin_recipe(tmp_path):
    # CwComp's twin is backprop's paper-cwcomp recipe (the same CNN with a flattened head); CAW-Conv has no
    # twin recipe of its own and is compared with backprop's paper recipe.
    from cawbench.bench import twin_recipe

    args = SimpleNamespace(recipe="paper", dataset="fashion-mnist")
    assert twin_recipe("cwcomp", args) == "paper-cwcomp" and twin_recipe("ff", args) == "paper-ff"
    assert twin_recipe("caw_conv", args) == "paper"
    assert twin_recipe("caw_conv", SimpleNamespace(recipe="default", dataset="fashion-mnist")) == "default"
    rows = _bench(tmp_path, "--methods", "cwcomp", "--recipe", "paper", "--input", "1x28x28", "--ops-only")
    assert [(r["label"], r["recipe"]) for r in rows] == [
        ("cwcomp", "paper"),
        ("backprop (ref, paper-cwcomp)", "paper-cwcomp"),
    ]
    assert rows[0]["reference"] == "backprop (ref, paper-cwcomp)" and float(rows[1]["ops_x"]) == 1.0


def _tiny_caw_trainer():
    from cawbench.engine import Trainer
    from cawbench.method import resolve_config

    cfg = resolve_config({"method": "caw_conv", "model.arch": "tinycnn", "model.width": 0.1,
                          "data.name": "synthetic", "train.device": "cpu"})  # fmt: skip
    trainer = Trainer(cfg, write_result=False)
    trainer.net.train()
    return trainer, next(trainer._batches("train", 0, train=True))


def test_unfused_layers_count_the_plain_relu_dropout_pooling_with_native_dropout(tmp_path):
    # CAW-Conv's layers train through one fused autograd node with bulk-drawn CPU dropout masks on the CPU;
    # --unfused-layers counts the GPU's op structure: ReLU, dropout and pooling as separate ops, the dropout
    # as the one native kernel a GPU runs; and says so in the command line.
    from cawbench.bench import count_step_ops, unfuse_layers
    from cawbench.layers import BulkDropout, ReluDropoutPool

    trainer, batch = _tiny_caw_trainer()
    fused = count_step_ops(trainer, *batch).by_op
    assert unfuse_layers(trainer.net) == 4
    assert [m.fused for m in trainer.net.modules() if isinstance(m, ReluDropoutPool)] == [False] * 4
    assert [m.bulk for m in trainer.net.modules() if isinstance(m, BulkDropout)] == [False] * 4
    plain = count_step_ops(trainer, *batch).by_op
    # fused: the node's masked ReLU (threshold_backward.grad_input) over the bulk draws, no native dropout
    assert fused["aten.threshold_backward.grad_input"] == 4 and fused["aten.randint.low"] == 4
    assert "aten.native_dropout.default" not in fused and "aten.relu_.default" not in fused
    # plain: ReLU, the native dropout and its backward, one each per unit; no bulk draws
    for op in ("relu_", "native_dropout", "native_dropout_backward"):
        assert plain[f"aten.{op}.default"] == 4, op
    assert "aten.randint.low" not in plain and "aten.threshold_backward.grad_input" not in plain
    common = ("--methods", "caw_conv", "--arch", "tinycnn", "--width", "0.1", "--ops-only", "--no-reference")
    _bench(tmp_path, *common, "--name", "fused")
    _bench(tmp_path, *common, "--name", "plain", "--unfused-layers")
    assert "--unfused-layers" in (tmp_path / "plain.md").read_text()
    assert "--unfused-layers" not in (tmp_path / "fused.md").read_text()


def test_ops_are_counted_on_a_steady_state_step():
    # An epoch's first step also records each loss term's first value (StepStats.firsts, an index_copy_);
    # the counted step is a later one, into the same sums, so that bookkeeping is not in the count.
    from cawbench.bench import count_step_ops

    trainer, batch = _tiny_caw_trainer()
    first = OpCounter()
    with first:
        trainer.step(*batch, trainer.step_state(0, 0, trainer.new_stats()))
    steady = count_step_ops(trainer, *batch)
    assert first.by_op.get("aten.index_copy_.default", 0) > 0
    assert "aten.index_copy_.default" not in steady.by_op
    assert steady.total < first.total
