"""The engine end to end with the backprop reference: learning, seeding, resume, failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import needs_fmnist

from cawbench.engine import ResumeError, Trainer, TrainingDiverged
from cawbench.results import read_results

DIGITS = dict(data__name="digits", model__width=0.25, optim__lr=3e-3, train__batch_size=64)


def test_backprop_learns_digits(tiny_config):
    # Measured: 96.7-97.8 % test after 8 epochs (2 CPU cores, ~10 s); threshold leaves a wide margin.
    cfg = tiny_config(**DIGITS, train__epochs=8)
    result = Trainer(cfg).run()
    assert result["final_test_acc"] > 90.0
    assert result["n_test"] == 360


@pytest.mark.slow
@needs_fmnist
def test_backprop_learns_fashion_mnist_subset_in_one_epoch(tiny_config):
    # Measured: 68 % after one epoch on 5,000 images at width 0.25 (chance: 10 %).
    cfg = tiny_config(data__name="fashion-mnist", model__width=0.25, data__subset=5000, data__test_subset=2000,
                      data__val_subset=1000)  # fmt: skip
    result = Trainer(cfg).run()
    assert result["final_test_acc"] > 45.0


def test_same_seed_same_numbers_different_seed_different_numbers(tiny_config):
    a = Trainer(tiny_config(train__epochs=2, train__seed=1)).run()
    b = Trainer(tiny_config(train__epochs=2, train__seed=1, run_name="again")).run()
    c = Trainer(tiny_config(train__epochs=2, train__seed=2)).run()
    keys = ["final_val_acc", "final_test_acc", "per_layer_test_acc"]
    assert [a[k] for k in keys] == [b[k] for k in keys]
    hist_a = json.loads(Path(a["run_dir"], "metrics.jsonl").read_text().splitlines()[0])
    hist_c = json.loads(Path(c["run_dir"], "metrics.jsonl").read_text().splitlines()[0])
    assert hist_a["train_loss"]["ce"] != hist_c["train_loss"]["ce"]


def test_resumed_run_ends_like_an_uninterrupted_one(tiny_config):
    full = Trainer(tiny_config(train__epochs=3, run_name="full")).run()

    class Interrupt(Exception):
        pass

    def stop_after_first_epoch(record):
        if record["epoch"] == 1:
            raise Interrupt

    cfg = tiny_config(train__epochs=3, run_name="cut")
    with pytest.raises(Interrupt):
        Trainer(cfg, callbacks=[stop_after_first_epoch]).run()
    resumed = Trainer(cfg).run(resume=True)
    for key in ("final_val_acc", "final_test_acc", "best_val_epoch", "per_layer_test_acc"):
        assert resumed[key] == full[key], key
    lines = Path(resumed["run_dir"], "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2]


def test_resume_refuses_a_checkpoint_from_another_config(tiny_config):
    Trainer(tiny_config(run_name="shared")).run()
    other = tiny_config(run_name="shared", optim__lr=0.5)
    with pytest.raises(ResumeError, match="was made with config hash .* but this configuration hashes to"):
        Trainer(other).run(resume=True)


def test_resume_without_checkpoint_says_so(tiny_config):
    with pytest.raises(ResumeError, match="no checkpoint at"):
        Trainer(tiny_config(run_name="fresh")).run(resume=True)


def test_diverged_run_raises_and_leaves_no_result_row(tiny_config, tmp_path):
    cfg = tiny_config(optim__lr=1e30, optim__name="sgd", params__norm="none")
    with pytest.raises(TrainingDiverged, match=r"^diverged: ce, layer 0, epoch 1/1: "):
        Trainer(cfg).run()
    assert read_results(tmp_path / "runs" / "results.jsonl") == []


def test_result_row_and_resolved_config_are_saved(tiny_config, tmp_path):
    result = Trainer(tiny_config(train__epochs=2)).run()
    rows = read_results(tmp_path / "runs" / "results.jsonl")
    assert len(rows) == 1 and rows[0]["config_hash"] == result["config_hash"]
    for key in (
        "method",
        "variant",
        "dataset",
        "arch",
        "depth",
        "width",
        "seed",
        "final_test_acc",
        "test_acc_at_best_val",
        "max_test_acc",
        "per_layer_test_acc",
        "wall_time_s",
        "versions",
    ):
        assert key in rows[0], key  # fmt: skip
    from cawbench.config import load_yaml
    from cawbench.method import resolve_config

    saved = resolve_config(load_yaml(f"{result['run_dir']}/config.yaml"))
    assert saved.config_hash() == result["config_hash"]


def test_model_selection_never_reads_test(tiny_config):
    trainer = Trainer(tiny_config(train__epochs=3, readout__name="sip"))
    result = trainer.run()
    vals = [r["val_acc"]["sip"] for r in trainer.history]
    assert result["best_val_epoch"] == vals.index(max(vals))
    assert result["test_acc_at_best_val"] == trainer.history[result["best_val_epoch"]]["test_acc"]["sip"]
