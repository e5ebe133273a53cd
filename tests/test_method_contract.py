"""Every registered method, for free: builds, trains an epoch on synthetic data, scores, reads out."""

from __future__ import annotations

import math
import re

import pytest
import torch

from cawbench.engine import Trainer
from cawbench.method import (
    LocalNetwork,
    get_method,
    list_methods,
    method_report_info,
    recipes_of,
    reference_method,
)
from cawbench.readouts import list_readouts

METHODS = list_methods()


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_one_epoch_and_reports_finite_results(method, tiny_config):
    cfg = tiny_config(method)
    trainer = Trainer(cfg)
    assert isinstance(trainer.net, LocalNetwork)
    result = trainer.run()
    assert result["method"] == method
    assert 0.0 <= result["final_test_acc"] <= 100.0
    record = trainer.history[-1]
    for term, values in record["train_loss"].items():
        assert all(v is None or math.isfinite(v) for v in values), (term, values)
    assert len(record["test_acc_layers"]) == len(trainer.scoring)


@pytest.mark.parametrize("method", METHODS)
def test_method_scores_have_one_column_per_class(method, tiny_config):
    trainer = Trainer(tiny_config(method))
    x, _ = next(trainer._batches("test", 0, train=False))
    scores = trainer.method.eval_scores(trainer.net.eval(), x)
    assert len(scores) == len(trainer.scoring)
    for s in scores:
        assert s.shape == (x.shape[0], trainer.data.info.num_classes)
        assert torch.isfinite(s).all()


@pytest.mark.parametrize("method", METHODS)
def test_method_paper_recipes_resolve(method):
    from cawbench.method import resolve_config

    cls = get_method(method)
    for recipe, table in recipes_of(cls).items():  # the reference's include the BP twins of the others
        for dataset in table:
            cfg = resolve_config({"method": method, "data.name": dataset, "recipe": recipe})
            assert cfg.recipe == recipe and cfg.data.name == dataset


@pytest.mark.parametrize("method", METHODS)
def test_method_is_documented(method):
    cls = get_method(method)
    assert cls.description.strip(), f"{method} needs a one-line description for `cawbench list`"


@pytest.mark.parametrize("method", METHODS)
def test_method_reports_itself_and_names_a_bp_twin_of_the_reference(method):
    info = method_report_info(method)
    assert info.label.strip() and info.name == method and info.paper_names
    reference = get_method(reference_method())
    if info.bp_twin is not None:  # a recipe of the reference, brought by this method or the reference's own
        assert info.bp_twin in recipes_of(reference), (method, info.bp_twin)
    for recipe in get_method(method).bp_twin_recipes:
        assert recipe in recipes_of(reference)


def test_labels_and_orders_tell_the_methods_apart():
    infos = [method_report_info(m) for m in METHODS]
    names = [
        n
        for info in infos
        for n in {re.sub(r"[^a-z0-9]", "", n.lower()) for n in (info.name, info.label, *info.paper_names)}
    ]
    assert len(names) == len(set(names)), "a label or alias denotes two methods"
    assert len({info.order for info in infos}) == len(infos), "two methods share a report order"
    assert sum(info.end_to_end for info in infos) == 1
    unknown = method_report_info("no_such_method")  # rows of a method since removed: defaults, no error
    assert (unknown.label, unknown.bp_twin) == ("no_such_method", None)


@pytest.mark.parametrize("readout", list_readouts())
def test_every_readout_works_on_backprop_scores(readout, tiny_config):
    cfg = tiny_config("backprop", readout__name=readout)
    result = Trainer(cfg).run()
    assert 0.0 <= result["final_test_acc"] <= 100.0
