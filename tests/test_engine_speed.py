"""Engine speed paths keep the maths: batching, no host reads in the step, the time limit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cawbench.bench import HostReadCounter
from cawbench.config import DataConfig
from cawbench.data import BatchTransform, Split, iterate_batches
from cawbench.engine import Trainer
from cawbench.method import list_methods
from cawbench.seeding import epoch_generator


def _per_batch_reference(split, batch_size, transform, seed, epoch):
    """The straightforward loader: permutation and crop draws taken batch by batch (the order they are drawn
    in on the CPU is the contract; the engine now moves them to the device once per epoch)."""
    order = torch.randperm(len(split), generator=epoch_generator(seed, epoch, "cpu"))
    aug = epoch_generator(seed + 1, epoch, "cpu")
    for start in range(0, len(split), batch_size):
        idx = order[start : start + batch_size]
        yield transform(split.x[idx], True, aug), split.y[idx]


@pytest.mark.parametrize("augment", ["none", "crop_flip"])
def test_epoch_batches_equal_the_batch_by_batch_loader(augment):
    gen = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (37, 3, 8, 8), generator=gen, dtype=torch.uint8), torch.arange(37))
    transform = BatchTransform((0.5,) * 3, (0.25,) * 3, None, DataConfig(name="synthetic", augment=augment))
    fast = list(iterate_batches(split, 10, transform, torch.device("cpu"), train=True, seed=4, epoch=2))
    slow = list(_per_batch_reference(split, 10, transform, 4, 2))
    assert [len(y) for _, y in fast] == [10, 10, 10, 7]
    for (xa, ya), (xb, yb) in zip(fast, slow, strict=True):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_evaluation_batches_are_the_split_in_order():
    split = Split(torch.randint(0, 256, (9, 1, 4, 4), dtype=torch.uint8), torch.arange(9))
    transform = BatchTransform((0.0,), (1.0,), None, DataConfig(name="synthetic"))
    ys = [y for _, y in iterate_batches(split, 4, transform, torch.device("cpu"), train=False)]
    assert torch.equal(torch.cat(ys), torch.arange(9))


@pytest.mark.parametrize("method", list_methods())
def test_a_training_step_reads_nothing_back_to_the_host(method, tiny_config):
    # .item(), bool(tensor), nonzero, ... inside the layer loop would stall a GPU once per unit per batch.
    trainer = Trainer(tiny_config(method), write_result=False)
    x, y = next(trainer._batches("train", 0, train=True))
    trainer.net.train()
    for unit in trainer.net.units:  # as train_epoch does
        unit.on_epoch_start(0)
    for step in range(2):  # the second step too: optimiser state exists by then
        with HostReadCounter() as reads:
            trainer.step(x, y, trainer.step_state(0, step, trainer.new_stats()))
        assert reads.count == 0, (step, sorted(reads.names))


def test_time_limit_stops_after_an_epoch_and_marks_the_row(tiny_config):
    cfg = tiny_config(train__epochs=4, train__time_limit_s=1e-3)
    result = Trainer(cfg).run()
    assert result["truncated"] is True and result["epochs"] == 1 and result["epochs_planned"] == 4
    assert result["final_test_acc"] is not None  # the last epoch run is evaluated on test
    records = Path(result["run_dir"], "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in records] == [0]


def test_time_limit_leaves_the_config_hash_and_a_full_run_unmarked(tiny_config):
    assert tiny_config(train__time_limit_s=5.0).config_hash() == tiny_config().config_hash()
    result = Trainer(tiny_config(train__epochs=2, train__time_limit_s=1e6)).run()
    assert result["truncated"] is False and result["epochs"] == 2


def test_the_entry_point_keeps_freed_memory_on_glibc():
    import platform

    from cawbench.cli import keep_freed_cpu_memory

    # glibc accepts both settings (mallopt returns 1); elsewhere the call is a no-op that says False
    assert keep_freed_cpu_memory() is (platform.libc_ver()[0] == "glibc")
