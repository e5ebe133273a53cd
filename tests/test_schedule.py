"""Budget-scaled schedules (train.budget_schedules): training progress mapped onto the recipe's epochs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import needs_fmnist

from cawbench.archs import LayerSpec
from cawbench.config import ConfigError, OptimConfig
from cawbench.engine import Trainer
from cawbench.methods._channelwise import ChannelwiseUnit
from cawbench.methods.caw_conv import CAWConvConfig
from cawbench.schedule import ScheduleClock, lr_at

COSINE = OptimConfig(lr=0.08, lr_min=0.006, scheduler="cosine")


def caw_budget(tiny_config, **overrides):
    """CAW-Conv's released schedules (cosine LR to 0.006, ortho warm-up over 50 epochs, temperature decay)
    on the 150-epoch horizon, squeezed into a short run."""
    settings = dict(train__budget_schedules=True, train__schedule_epochs=150, optim__lr=0.08,
                    optim__lr_min=0.006, optim__scheduler="cosine")  # fmt: skip
    return tiny_config("caw_conv", **{**settings, **overrides})


def test_at_the_reference_horizon_both_modes_agree_at_every_epoch_start():
    per_epoch = ScheduleClock(epochs=150, steps_per_epoch=7, horizon=150, budget=False)
    budget = ScheduleClock(epochs=150, steps_per_epoch=7, horizon=150, budget=True)
    for epoch in range(150):
        assert budget.at(epoch, 0) == per_epoch.at(epoch, 0) == epoch
    assert budget.lr_horizon == per_epoch.lr_horizon == 150
    # within an epoch only the budget clock moves (per step)
    assert per_epoch.at(3, 5) == 3 and budget.at(3, 5) == pytest.approx(3 + 5 / 7)


def test_trainer_schedule_points_agree_at_the_horizon(tiny_config):
    common = dict(train__epochs=4, train__schedule_epochs=4, params__ortho_warmup_epochs=3)
    off = Trainer(caw_budget(tiny_config, **common, train__budget_schedules=False), write_result=False)
    on = Trainer(caw_budget(tiny_config, **common), write_result=False)
    for epoch in range(4):
        a, b = off.schedule_point(epoch, 0), on.schedule_point(epoch, 0)
        assert (a.at, dict(a.weights), a.active) == (b.at, dict(b.weights), b.active)
    assert off.clock.lr_horizon == on.clock.lr_horizon == 4


def test_three_epochs_pass_through_the_150_epoch_phases(tiny_config):
    trainer = Trainer(caw_budget(tiny_config, train__epochs=3), write_result=False)
    clock = trainer.clock
    steps = clock.steps_per_epoch
    assert clock.horizon == 150
    # start, one third, end of the run = the recipe's epochs 0, 50, 150
    assert [clock.at(0, 0), clock.at(1, 0), clock.at_progress(1.0)] == [0.0, 50.0, 150.0]
    assert clock.at(0, steps - 1) < 50 < clock.at(2, 0) < 150
    start, third = trainer.schedule_point(0, 0), trainer.schedule_point(1, 0)
    assert start.weights["ortho"] == 0.0 and third.weights["ortho"] == pytest.approx(1e-3)  # full at 1/3
    unit = ChannelwiseUnit(LayerSpec(0, "conv", 1, 10, 3, padding=1), 10, CAWConvConfig())
    values = []
    for at in (0.0, 50.0, 150.0):
        unit.set_schedule(at)
        values.append(unit.temperature().item())
    assert values == pytest.approx([10.0, 10.0 * 0.995**50, 10.0 * 0.995**150], rel=1e-6)
    lrs = [lr_at(COSINE, at, clock.lr_horizon) for at in (0.0, 50.0, 150.0)]
    assert lrs == pytest.approx([0.08, 0.006 + 0.074 * 0.75, 0.006])


def test_a_budget_run_moves_lr_temperature_and_ortho_weight_every_step(tiny_config):
    cfg = caw_budget(tiny_config, train__epochs=3, data__subset=96, train__batch_size=32)
    trainer = Trainer(cfg)
    result = trainer.run()
    records = [json.loads(line) for line in Path(result["run_dir"], "metrics.jsonl").read_text().splitlines()]
    last_at = 150 * (3 * 3 - 1) / (3 * 3)  # 3 epochs x 3 steps: the last step stands at 8/9 of the run
    assert [r["schedule_at"] for r in records] == pytest.approx([0, 50, 100])
    assert [r["lr"] for r in records] == pytest.approx([lr_at(COSINE, 150 * k / 9, 150) for k in (2, 5, 8)])
    for unit in trainer.net.units:
        assert unit.temperature_schedule.item() == pytest.approx(0.995**last_at, rel=1e-6)
    # the weighted ortho term grows with the warm-up inside the first epoch (weights 0, 1/3, 2/3 of 1e-3)
    first = records[0]
    ortho, weighted = first["train_loss"]["ortho"][0], first["train_loss_weighted"]["ortho"][0]
    assert 0 < weighted < 1e-3 * ortho
    later = records[-1]
    assert later["train_loss_weighted"]["ortho"][0] == pytest.approx(1e-3 * later["train_loss"]["ortho"][0])
    assert later["train_loss_weighted"]["entropy"][0] == pytest.approx(
        1e-2 * later["train_loss"]["entropy"][0]
    )


def test_budget_run_resumed_mid_run_equals_the_uninterrupted_one(tiny_config):
    cfg = caw_budget(tiny_config, train__epochs=3, data__subset=96, train__batch_size=32)
    full = Trainer(cfg.replace(run_name="full")).run()

    class Interrupt(Exception):
        pass

    def stop_after_first_epoch(record):
        if record["epoch"] == 0:
            raise Interrupt

    cut = cfg.replace(run_name="cut")
    with pytest.raises(Interrupt):
        Trainer(cut, callbacks=[stop_after_first_epoch]).run()
    resumed = Trainer(cut).run(resume=True)
    for key in ("final_val_acc", "final_test_acc", "per_layer_test_acc", "per_layer_val_acc"):
        assert resumed[key] == full[key], key
    a = [json.loads(x) for x in Path(full["run_dir"], "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in Path(resumed["run_dir"], "metrics.jsonl").read_text().splitlines()]
    for key in ("lr", "train_loss", "train_loss_weighted", "unit_stats", "schedule_at"):
        assert [r[key] for r in a] == [r[key] for r in b], key


@needs_fmnist
def test_the_horizon_is_the_recipes_epochs(tiny_config):
    cfg = tiny_config(
        "caw_conv", data__name="fashion-mnist", recipe="paper", train__epochs=2, data__subset=64,
        data__val_size=64, data__test_subset=64, train__budget_schedules=True, model__width=0.1,
    )  # fmt: skip
    trainer = Trainer(cfg, write_result=False)
    assert trainer.clock.horizon == 150 and trainer.clock.lr_horizon == 150
    assert trainer.schedule_point(1, 0).at == 75.0


def test_budget_schedules_that_would_do_nothing_is_an_error(tiny_config):
    with pytest.raises(ConfigError, match="would do nothing for method 'cafo'.*set it to false"):
        Trainer(tiny_config("cafo", train__budget_schedules=True), write_result=False)
    with pytest.raises(ConfigError, match="would do nothing for method 'backprop'"):
        Trainer(tiny_config("backprop", train__budget_schedules=True), write_result=False)
    # a cosine LR alone is a schedule to scale
    trainer = Trainer(tiny_config("backprop", train__budget_schedules=True, optim__scheduler="cosine"))
    assert trainer.clock.budget


def test_a_progress_mapping_with_zero_steps_is_an_error():
    with pytest.raises(ConfigError, match="no training step"):
        ScheduleClock(epochs=3, steps_per_epoch=0, horizon=150, budget=True)
    assert ScheduleClock(epochs=3, steps_per_epoch=0, horizon=150, budget=False).at(2) == 2.0


def test_schedule_epochs_must_be_positive(tiny_config):
    with pytest.raises(ConfigError, match="train.schedule_epochs must be >= 1"):
        tiny_config(train__schedule_epochs=0)


@pytest.mark.parametrize(
    "scheduler, at, expected",
    [("cosine", 0, 0.08), ("cosine", 75, 0.043), ("cosine", 150, 0.006), ("cosine", 200, 0.006),
     ("linear_cooldown", 74, 0.08), ("linear_cooldown", 112.5, 0.04), ("linear_cooldown", 150, 0.0),
     ("none", 100, 0.08)],
)  # fmt: skip
def test_lr_schedules_by_hand(scheduler, at, expected):
    cfg = OptimConfig(lr=0.08, lr_min=0.006 if scheduler == "cosine" else 0.0, scheduler=scheduler)
    assert lr_at(cfg, at, 150) == pytest.approx(expected)
