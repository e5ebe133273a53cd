"""Divergence: the bound of cawbench.divergence, hand-checked, and on every registered method both ways: a
normal smoke run stays far below it, a learning rate of 1e6 is stopped with the term, layer and epoch named."""

from __future__ import annotations

import math

import pytest

from cawbench.divergence import GROWTH_LIMIT, REFERENCE_KEY, TrainingDiverged, bound, check_epoch
from cawbench.engine import Trainer
from cawbench.method import list_methods

METHODS = list_methods()


def _check(means, firsts, history=(), epoch=0, lr=0.1):
    return check_epoch(means, firsts, list(history), epoch=epoch, epochs=3, num_classes=10,
                       lr_of=lambda i: lr, config_lr=0.1)  # fmt: skip


def test_bound_is_a_thousand_times_the_larger_of_first_value_and_ln_k():
    assert bound(0.01, 10) == pytest.approx(1000 * math.log(10))  # near-zero start: the ln K floor
    assert bound(-50.0, 10) == pytest.approx(50_000)  # a large (or negative) start: its own magnitude
    assert bound(None, 2) == pytest.approx(1000 * math.log(2))
    assert GROWTH_LIMIT == 1000


def test_check_names_term_layer_epoch_and_the_learning_rate():
    refs = _check({"ce": [2.0, 2.1]}, {"ce": [2.3, 2.3]})
    assert refs == {"ce": [2.3, 2.3]}  # first sight: stored for the epoch record
    history = [{REFERENCE_KEY: refs}]
    # Later epochs compare with the stored first-batch values, not with their own first batch.
    assert _check({"ce": [5.0, 2299.0]}, {"ce": [1e9, 1e9]}, history, epoch=1) == {}
    with pytest.raises(TrainingDiverged) as info:
        _check({"ce": [5.0, 2400.0]}, {"ce": [2.0, 2.0]}, history, epoch=1)
    assert str(info.value).startswith("diverged: ce, layer 1, epoch 2/3: its mean 2.4e+03 exceeds 2.3e+03")
    assert str(info.value).endswith("lower optim.lr (now 0.1)")
    with pytest.raises(TrainingDiverged, match=r"^diverged: ff, layer 0, epoch 1/3: its mean is nan; lower this "
                       r"layer's learning rate \(now 0.5; optim.lr is 0.1\)"):  # fmt: skip
        _check({"ff": [float("nan")]}, {"ff": [1.0]}, lr=0.5)
    # A term with a large natural scale (a goodness sum) may be large; only its growth counts.
    assert _check({"ff": [4e5]}, {"ff": [2000.0]}) == {"ff": [2000.0]}
    # Absent layers (None) are skipped.
    assert _check({"ce": [None, 1.0]}, {"ce": [None, 2.0]}) == {"ce": [None, 2.0]}


@pytest.mark.parametrize("method", METHODS)
def test_normal_smoke_run_stays_far_below_the_bound(method, tiny_config):
    trainer = Trainer(tiny_config(method, train__epochs=2, data__subset=256), write_result=False)
    trainer.run()
    refs = trainer.history[0][REFERENCE_KEY]
    k = trainer.data.info.num_classes
    for record in trainer.history:
        for term, values in record["train_loss"].items():
            for layer, value in enumerate(values):
                if value is not None:  # a tenth of the bound at most: the rule has room to spare
                    assert abs(value) < bound(refs[term][layer], k) / 10, (term, layer, value)


@pytest.mark.parametrize("method", METHODS)
def test_learning_rate_1e6_is_stopped_as_diverged(method, tiny_config):
    trainer = Trainer(tiny_config(method, optim__lr=1e6, data__subset=256), write_result=False)
    with pytest.raises(TrainingDiverged, match=r"^diverged: \w+, layer \d+, epoch 1/1: .*; lower .*learning rate|"
                       r"^diverged: \w+, layer \d+, epoch 1/1: .*; lower optim.lr \(now 1e\+06\)"):  # fmt: skip
        trainer.run()
    assert not (trainer.run_dir / "result.json").exists()


def test_sgd_divergence_says_diverged(tiny_config):
    trainer = Trainer(tiny_config("backprop", optim__name="sgd", optim__lr=1e6, data__subset=256))
    with pytest.raises(TrainingDiverged, match=r"^diverged: ce, layer 0, epoch 1/1"):
        trainer.run()
