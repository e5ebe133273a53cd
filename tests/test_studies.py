"""Optuna studies with MLflow tracking: specs, runner, resume, parallel workers, PostgreSQL, failures.

Trials train a tiny MLP on scikit-learn's digits (1-6 epochs, well under a second each). One MLflow sqlite
database is shared by the whole module (its first use runs migrations). Worker subprocesses run with one
torch thread: on a loaded 2-core machine that is several times faster than two.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from cawbench.config import ConfigError
from cawbench.studies.runner import RunOptions, run_study, summarize
from cawbench.studies.spec import check_configs, load_spec, parse_spec, shipped_specs_dir
from cawbench.studies.storage import open_storage

SEVEN_METHODS = {"backprop", "caw_conv", "deeperforward", "cwcomp", "cafo", "ff", "symba"}
REQUIRED_SPECS = {"quickstart", "paper_table", "caw_regularizers", "depth_width", "sensitivity"}
SHIPPED = sorted(REQUIRED_SPECS | {p.stem for p in shipped_specs_dir().glob("*.yaml")})  # + caw_ablation
DIGITS_BASE = {
    "method": "backprop", "data.name": "digits", "model.arch": "mlp", "model.hidden": [32],
    "optim.lr": 0.01, "train.batch_size": 64, "train.device": "cpu",
}  # fmt: skip


def digits_spec(name: str, epochs: int = 1, **top: Any) -> dict[str, Any]:
    spec = {
        "name": name, "base": dict(DIGITS_BASE),
        "scales": {"cpu": {"train.epochs": epochs}, "paper": {"train.epochs": 50}},
        "seeds": [0, 1], "sampler": {"name": "grid"},
    }  # fmt: skip
    spec.update(top)
    return spec


def write_spec(folder: Path, spec: dict[str, Any]) -> Path:
    path = folder / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def trials_of(out_dir: Path, study: str, storage: str | None = None) -> list[optuna.trial.FrozenTrial]:
    handle = open_storage(storage, out_dir)
    return optuna.load_study(study_name=study, storage=handle.storage).get_trials(deepcopy=False)


def complete_keys(trials) -> list[str]:
    return sorted(t.user_attrs["plan_key"] for t in trials if t.state == TrialState.COMPLETE)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cawbench", "study", *args]


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    """One MLflow sqlite database for the module (migrations run once, here)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()
    return uri


def run_opts(path: Path, out_dir: Path, tracking: str, **kw: Any) -> RunOptions:
    return RunOptions(spec=load_spec(path), scale="cpu", out_dir=out_dir, tracking_uri=tracking,
                      threads=1, echo_progress=False, **kw)  # fmt: skip


# ------------------------------------------------------------------------------------------ a full study
def test_grid_study_completes_and_joins_optuna_mlflow_and_results(tmp_path, tracking_uri):
    from mlflow import MlflowClient

    variants = {"small_lr": {"optim.lr": 0.003}, "mid_lr": {}, "wide": {"model.hidden": [64]}}
    spec = digits_spec("grid6", epochs=2, variants=variants, reference="mid_lr")
    path, out = write_spec(tmp_path, spec), tmp_path / "runs"
    summary = run_study(run_opts(path, out, tracking_uri))

    trials = trials_of(out, "grid6-cpu")
    expected = sorted(f"{v}/seed={s}" for v in ("small_lr", "mid_lr", "wide") for s in (0, 1))
    assert len(trials) == 6 and complete_keys(trials) == expected
    assert summary["counts"] == {"COMPLETE": 6} and summary["best_config"] in ("small_lr", "mid_lr", "wide")
    for t in trials:  # seeds really vary, and every configuration got the same seed set
        assert t.user_attrs["seed"] == int(t.user_attrs["plan_key"].rsplit("=", 1)[1])
        assert t.params["variant"] == t.user_attrs["config_id"]
        assert sorted(t.intermediate_values) == [0, 1]

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name("grid6-cpu")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 6
    study = optuna.load_study(study_name="grid6-cpu", storage=open_storage(None, out).storage)
    assert study.user_attrs["mlflow_parent_run_id"] == parents[0].info.run_id
    by_run = {r.info.run_id: r for r in children}
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == set(by_run)
    for t in trials:
        run = by_run[t.user_attrs["mlflow_run_id"]]
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.info.status == "FINISHED" and run.data.tags["optuna.trial_number"] == str(t.number)
        history = client.get_metric_history(run.info.run_id, "val_acc")
        assert {m.step: m.value for m in history} == pytest.approx(t.intermediate_values)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc_layer/00")] == [0, 1]
        assert run.data.params["train.seed"] == str(t.user_attrs["seed"])
        assert run.data.params["optim.lr"] == str(0.003 if t.params["variant"] == "small_lr" else 0.01)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "metrics.jsonl", "result.json"} <= artifacts

    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    trial_by_number = {t.number: t for t in trials}
    for row in rows:
        t = trial_by_number[row["trial"]]
        assert row["study"] == "grid6-cpu" and row["mlflow_run_id"] == t.user_attrs["mlflow_run_id"]
        assert row["final_val_acc"] == pytest.approx(t.value) and row["seed"] == t.user_attrs["seed"]
        assert row["variant"] == t.params["variant"]
    assert all(t.value > 50 for t in trials), "a digits MLP should be far above chance (10 %)"

    # The study path changes nothing about training: the same config trained alone gives the same number
    # (this trial reused the data prepared for an earlier one).
    from cawbench.engine import Trainer

    last = max(trials, key=lambda t: t.number)
    cfg = load_spec(path).resolve("cpu", last.params["variant"], {}, last.user_attrs["seed"],
                                  out_dir=str(tmp_path / "alone"), **{"train.progress": False})  # fmt: skip
    assert cfg.config_hash() == last.user_attrs["config_hash"]
    assert Trainer(cfg, write_result=False).run()["final_val_acc"] == pytest.approx(last.value)

    # Re-running a finished study runs nothing and changes nothing.
    run_study(run_opts(path, out, tracking_uri))
    assert len(trials_of(out, "grid6-cpu")) == 6
    assert len((out / "results.jsonl").read_text().splitlines()) == 6


def test_diverging_configuration_fails_with_reason_and_the_study_goes_on(tmp_path, tracking_uri):
    from mlflow import MlflowClient

    spec = digits_spec("nan", variants={"ok": {}, "huge_lr": {"optim.name": "sgd", "optim.lr": 1.0e30}},
                       seeds=[0])  # fmt: skip
    path, out = write_spec(tmp_path, spec), tmp_path / "runs"
    run_study(run_opts(path, out, tracking_uri))
    trials = {t.params["variant"]: t for t in trials_of(out, "nan-cpu")}
    assert trials["ok"].state == TrialState.COMPLETE
    bad = trials["huge_lr"]
    assert bad.state == TrialState.FAIL
    assert bad.user_attrs["fail_reason"].startswith("diverged: ce, layer 0, epoch 1/1")
    run = MlflowClient(tracking_uri=tracking_uri).get_run(bad.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["cawbench.fail_reason"].startswith("diverged")
    # A final failure is not retried by a plain re-run, only with --retry-failed.
    run_study(run_opts(path, out, tracking_uri))
    assert len(trials_of(out, "nan-cpu")) == 2
    run_study(run_opts(path, out, "off", retry_failed=True))
    states = sorted(t.state.name for t in trials_of(out, "nan-cpu") if t.params["variant"] == "huge_lr")
    assert states == ["FAIL", "FAIL"]


def test_adaptive_study_prunes_first_seeds_and_runs_survivors_on_every_seed(tmp_path):
    spec = digits_spec(
        "tpe", epochs=2, seeds=[0, 1], n_trials=4,
        search_space={"optim.lr": {"type": "float", "low": 1e-5, "high": 0.1, "log": True}},
        # Random draws (seed 1: lr 4.7e-4, 7.6e-3, 1.0e-5, 1.6e-4) do not depend on the values seen, so
        # which configurations are pruned does not hinge on this machine's floating point.
        sampler={"name": "random", "seed": 1},
        pruner={"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
    )  # fmt: skip
    path, out = write_spec(tmp_path, spec), tmp_path / "runs"
    run_study(run_opts(path, out, "off"))
    trials = trials_of(out, "tpe-cpu")
    configs: dict[str, list] = {}
    for t in trials:
        configs.setdefault(t.user_attrs["config_id"], []).append(t)
    assert len(configs) == 4
    for group in configs.values():
        first = next(t for t in group if t.user_attrs["seed_index"] == 0)
        if first.state == TrialState.COMPLETE:  # survived: every seed ran to the end, same parameters
            assert sorted((t.user_attrs["seed"], t.state.name) for t in group) == [
                (0, "COMPLETE"),
                (1, "COMPLETE"),
            ]
            assert all(t.params == first.params for t in group)
        else:  # pruned on its first seed: no more seeds spent on it
            assert first.state == TrialState.PRUNED and len(group) == 1
    states = {t.user_attrs["config_id"]: t.state for t in trials if t.user_attrs["seed_index"] == 0}
    assert TrialState.COMPLETE in states.values() and TrialState.PRUNED in states.values()


# ------------------------------------------------------------------------------------------ resume, parallel
def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"worker exited (code {proc.returncode}) before {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_worker_resumes_with_every_trial_complete_exactly_once(tmp_path, tracking_uri):
    from mlflow import MlflowClient

    spec = digits_spec("resume", epochs=20, seeds=[0], variants={"a": {}, "b": {"optim.lr": 0.02},
                       "c": {"optim.lr": 0.005}})  # fmt: skip
    spec["base"]["model.hidden"] = [64]
    path, out = write_spec(tmp_path, spec), tmp_path / "runs"
    proc = subprocess.Popen(
        cli("run", str(path), "--out-dir", str(out), "--tracking-uri", tracking_uri, "--threads", "1",
            "--heartbeat", "1", "--no-echo"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip

    def mid_second_trial() -> bool:
        if not (out / "optuna.journal").is_file():
            return False
        try:
            trials = trials_of(out, "resume-cpu")
        except KeyError:
            return False
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        running = [t for t in trials if t.state == TrialState.RUNNING and len(t.intermediate_values) >= 2]
        return len(done) >= 1 and len(running) == 1

    try:
        _wait_for(mid_second_trial, 120, "a completed trial and one mid-way", proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = trials_of(out, "resume-cpu")
    finished_before = {t.number: t.datetime_complete for t in before if t.state == TrialState.COMPLETE}
    victim = [t for t in before if t.state == TrialState.RUNNING]
    assert len(victim) == 1, [(t.number, t.state) for t in before]
    victim = victim[0]

    run_study(run_opts(path, out, tracking_uri))
    after = trials_of(out, "resume-cpu")
    assert complete_keys(after) == ["a/seed=0", "b/seed=0", "c/seed=0"]  # each exactly once
    for number, completed_at in finished_before.items():  # never re-run
        t = after[number]
        assert t.state == TrialState.COMPLETE and t.datetime_complete == completed_at
        assert sum(u.user_attrs["plan_key"] == t.user_attrs["plan_key"] for u in after) == 1
    assert after[victim.number].state == TrialState.FAIL  # found stale, failed, re-queued
    retry = [t for t in after if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].user_attrs["plan_key"] == victim.user_attrs["plan_key"]
    assert retry[0].user_attrs["resumed_from_checkpoint"] is True  # continued from the epoch it reached
    history = MlflowClient(tracking_uri=tracking_uri).get_metric_history(
        retry[0].user_attrs["mlflow_run_id"], "val_acc"
    )
    assert sorted(m.step for m in history) == list(range(20))  # resumed epochs are logged too
    orphan = MlflowClient(tracking_uri=tracking_uri).get_run(victim.user_attrs["mlflow_run_id"])
    assert orphan.info.status == "KILLED"  # not RUNNING forever: closed when the trial was found stale
    assert orphan.data.tags["cawbench.fail_reason"].startswith("worker died")
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["plan_key"] for r in rows) == ["a/seed=0", "b/seed=0", "c/seed=0"]


def _two_worker_study(tmp_path: Path, name: str, storage: str | None, tracking: str) -> list:
    """Run a 4 x 2 grid with --workers 2 (the launcher in this process, two worker subprocesses)."""
    spec = digits_spec(name, epochs=3, seeds=[0, 1], variants={f"v{i}": {"optim.lr": 0.002 * (i + 1)}
                       for i in range(4)})  # fmt: skip
    path, out = write_spec(tmp_path, spec), tmp_path / "runs"
    summary = run_study(run_opts(path, out, tracking, workers=2, storage_url=storage))
    logs = "".join(p.read_text() for p in (out / "studies" / f"{name}-cpu" / "workers").glob("*.log"))
    assert summary["counts"] == {"COMPLETE": 8} and not summary["worker_errors"], logs
    trials = trials_of(out, f"{name}-cpu", storage)
    expected = sorted(f"v{i}/seed={s}" for i in range(4) for s in (0, 1))
    assert len(trials) == 8 and complete_keys(trials) == expected  # none lost, none duplicated
    assert not {t.user_attrs["worker"] for t in trials} & {f"{socket.gethostname()}:{os.getpid()}"}
    return trials


def test_two_workers_share_one_journal_file(tmp_path, tracking_uri):
    from mlflow import MlflowClient

    trials = _two_worker_study(tmp_path, "journal2", None, tracking_uri)
    workers = {t.user_attrs["worker"] for t in trials}
    assert len(workers) == 2, f"both workers should have taken trials, got {workers}"
    exp = MlflowClient(tracking_uri=tracking_uri).get_experiment_by_name("journal2-cpu")
    runs = MlflowClient(tracking_uri=tracking_uri).search_runs([exp.experiment_id])
    assert len(runs) == 9  # one parent (made once, by the launcher) + one run per trial


def _start_postgres() -> tuple[str, callable]:
    """A throwaway PostgreSQL cluster on loopback, as a non-root user; returns (DSN, stop)."""
    bindirs = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    found = [str(b / "initdb") for b in bindirs if (b / "initdb").exists()]
    initdb = shutil.which("initdb") or (found[0] if found else None)
    if initdb is None:
        pytest.skip("no PostgreSQL server binaries (initdb) found; apt-get install postgresql")
    pg_ctl = str(Path(initdb).with_name("pg_ctl"))
    run_as: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="cawbench-pg-"))
    if os.geteuid() == 0:  # postgres refuses to run as root
        import pwd

        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(folder, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = folder / "data"
    steps = [
        [*run_as, initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"],
        [*run_as, pg_ctl, "-D", str(data), "-l", str(folder / "log"), "-w", "-t", "60", "start",
         "-o", f"-h 127.0.0.1 -p {port} -k {folder} -F"],
    ]  # fmt: skip
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            shutil.rmtree(folder, ignore_errors=True)
            pytest.skip(f"could not start a PostgreSQL server: {' '.join(cmd[:3])}: {done.stderr[-400:]}")

    def stop() -> None:
        subprocess.run([*run_as, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)

    return f"postgresql://postgres@127.0.0.1:{port}/postgres", stop


@pytest.fixture(scope="module")
def postgres_dsn():
    """$CAWBENCH_TEST_POSTGRES (a DSN of a server CI started), else a server of our own."""
    pytest.importorskip("psycopg2", reason="psycopg2 (pip install psycopg2-binary) is needed for PostgreSQL")
    if os.environ.get("CAWBENCH_TEST_POSTGRES"):
        yield os.environ["CAWBENCH_TEST_POSTGRES"]
        return
    dsn, stop = _start_postgres()
    try:
        yield dsn
    finally:
        stop()


def test_two_workers_on_postgresql(tmp_path, postgres_dsn):
    name = f"pg{os.getpid()}x{int(time.time())}"  # unique even on a shared CI server
    trials = _two_worker_study(tmp_path, name, postgres_dsn, "off")
    assert {t.user_attrs["worker"] for t in trials}  # every trial names the worker that ran it
    assert not (tmp_path / "runs" / "optuna.journal").exists()  # the study lived on the server


# ------------------------------------------------------------------------------------------ specs
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_spec_loads_and_validates(name):
    spec = load_spec(name, check=False)
    assert {"cpu", "paper"} <= set(spec.scales)
    # Methods still being written elsewhere are skipped by name; every registered one must resolve.
    skipped = check_configs(spec, skip_methods=SEVEN_METHODS)
    assert set(skipped) <= SEVEN_METHODS
    assert spec.objective_metric in ("final_val_acc", "best_val_acc")
    for scale in ("cpu", "paper"):
        if spec.planned:
            plan = spec.plan(scale)
            assert plan and len({i.plan_key for i in plan}) == len(plan)
        else:
            assert spec.n_trials_for(scale) >= 1
    if name == "quickstart":
        assert {spec.method_of("cpu", v, {}) for v in spec.variant_names} == SEVEN_METHODS
    if name == "paper_table":
        rows = list(csv.DictReader((shipped_specs_dir() / "paper_results.csv").open()))
        assert sorted(r["study_variant"] for r in rows) == sorted(spec.variant_names)
        for r in rows:
            overrides = spec.variants[r["study_variant"]]
            assert (overrides["method"], overrides["data.name"]) == (r["method_key"], r["dataset_key"])
            assert overrides["variant"] == r["variant"]
    if name == "sensitivity":
        assert spec.sampler_name == "qmc" and len(spec.search_space) == 5
    if name == "caw_regularizers":  # entropy {off, min, max} x ortho {off, released, frobenius}, then sweeps
        grid = {
            (p.get("params.lambda_entropy", 1e-2) > 0 and p.get("params.entropy_direction", "minimize"),
             p.get("params.lambda_ortho", 1e-3) > 0 and p.get("params.ortho_form", "released"))
            for v, p in spec.variants.items() if "lambda_" not in v
        }  # fmt: skip
        assert grid == {
            (e, o) for e in (False, "minimize", "maximize") for o in (False, "released", "frobenius")
        }
        for form in ("ent_min", "ent_max", "frobenius"):
            swept = [p for v, p in spec.variants.items() if v.startswith(f"{form}__lambda_")]
            weights = [p.get("params.lambda_entropy", p.get("params.lambda_ortho")) for p in swept]
            assert max(weights) / min(weights) >= 1e2  # orders of magnitude
        assert spec.seeds_for("cpu") == (0, 1, 2)


def test_quasi_random_plan_is_seeded_in_bounds_and_extends_its_prefix():
    space = {"optim.lr": lr_dim(1e-4, 1.0, log=True), "model.depth": {"type": "int", "low": 1, "high": 3}}
    spec = parse_spec(digits_spec("q", seeds=[0, 1], n_trials=8, sampler={"name": "qmc", "seed": 5},
                                  search_space=space))  # fmt: skip
    plan = spec.plan("cpu")
    assert len(plan) == 16 and {i.seed for i in plan} == {0, 1}
    lrs = sorted({i.params["optim.lr"] for i in plan})
    assert len(lrs) == 8 and all(1e-4 <= v <= 1.0 for v in lrs)
    assert lrs[0] < 1e-3 and lrs[-1] > 1e-1  # spread over the log range, not bunched at the top
    assert {i.params["model.depth"] for i in plan} <= {1, 2, 3}
    assert spec.plan("cpu") == plan  # seeded
    assert spec.plan("cpu", n_trials=16)[:16] == plan  # growing the budget keeps the points run so far


def test_a_scale_runs_its_named_variant_subset_in_spec_order():
    variants = {"a": {}, "b": {"optim.lr": 0.02}, "c": {"optim.lr": 0.03}}
    spec = digits_spec("sub", variants=variants)
    spec["scales"]["cpu"]["variant_subset"] = ["c", "a"]
    spec = parse_spec(spec)
    assert spec.variants_for("cpu") == ["a", "c"] and spec.variants_for("paper") == ["a", "b", "c"]
    assert [(i.params["variant"], i.seed) for i in spec.plan("cpu")] == [
        ("a", 0),
        ("a", 1),
        ("c", 0),
        ("c", 1),
    ]
    assert len(spec.plan("paper")) == 6


def lr_dim(low: float, high: float, **extra: Any) -> dict[str, Any]:
    return {"type": "float", "low": low, "high": high, **extra}


def lr_space(**dim: Any) -> dict[str, Any]:
    return {"search_space": {"optim.lr": {"type": "float", "low": 0.01, "high": 0.1, **dim}}}


TPE = {"sampler": {"name": "tpe", "seed": 0}, "n_trials": 3}
BAD_SPECS = [
    ({"colour": "red"}, "unknown key 'colour'"),
    ({"search_space": {}}, "search_space` is empty"),
    (lr_space(low=0.0, log=True), "log scale needs a positive lower bound, got low=0.0"),
    (lr_space(low=1.0), "low (1.0) must be below high"),
    (lr_space(scale="log"), "unknown key 'scale' in search_space.optim.lr"),
    (lr_space(type="normal"), "type='normal' is not valid"),
    ({"variants": {"x": {"method": "no_such_method"}}}, "unknown method 'no_such_method' (in variant 'x')"),
    ({"variants": {"x": {"optim.lrr": 0.1}}}, "unknown config key 'optim.lrr'"),
    ({"objective": {"metric": "final_test_acc"}}, "reads the test split"),
    ({"base": {**DIGITS_BASE, "train.seed": 3}}, "base.train.seed cannot be set"),
    ({"variants": {"a": {}}, "reference": "b"}, "reference 'b' is not a variant"),
    ({**TPE, **lr_space(), "pruner": {"name": "median", "patience": 2}}, "'patience' in pruner (median)"),
    (lr_space(), "a grid needs finite values"),
    ({**TPE, "n_trials": None, **lr_space()}, "needs n_trials"),
    ({"seeds": [0, 0]}, "contain duplicates"),
    ({"scales": {"cpu": {"variants": {"nope": {}}}}}, "unknown variant 'nope'"),
    ({"variants": {"a": {}}, "scales": {"cpu": {"variant_subset": ["b"]}}}, "unknown variant 'b'"),
    ({"variants": {"a": {}}, "scales": {"cpu": {"variant_subset": []}}}, "variant_subset must be a non-empty"),
    ({"variants": {"a": {}}, "pruner": {"name": "median"}}, "pruning would leave holes"),
    ({"variants": {"noval": {"data.val_size": 0}}}, "data.val_size=0 leaves no validation split, but the objective"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "message"), BAD_SPECS, ids=[m for _, m in BAD_SPECS])
def test_bad_spec_fails_naming_the_problem(tmp_path, change, message):
    spec = digits_spec("bad")
    spec.update(change)
    path = write_spec(tmp_path, spec)
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    assert message in str(info.value)


def test_unknown_scale_storage_and_spec_change_are_clear_errors(tmp_path):
    path, out = write_spec(tmp_path, digits_spec("errs", seeds=[0])), tmp_path / "runs"
    with pytest.raises(ConfigError, match="no scale 'gpu'; scales: cpu, paper"):
        run_study(RunOptions(spec=load_spec(path), scale="gpu", out_dir=out, tracking_uri="off"))
    with pytest.raises(ConfigError, match="unsupported scheme 'redis'"):
        open_storage("redis://localhost:6379", out)
    run_study(run_opts(path, out, "off"))
    changed = digits_spec("errs", seeds=[0])
    changed["base"]["optim.lr"] = 0.5
    with pytest.raises(ConfigError, match="created from a different version"):
        run_study(run_opts(write_spec(tmp_path, changed), out, "off"))


def test_a_study_whose_every_trial_failed_exits_non_zero_with_the_reasons(tmp_path, capsys):
    from cawbench.cli import main

    spec = digits_spec("allfail", seeds=[0, 1], variants={"huge": {"optim.name": "sgd", "optim.lr": 1.0e30}})
    path, out = write_spec(tmp_path, spec), tmp_path / "runs"
    argv = ["study", "run", str(path), "--out-dir", str(out), "--tracking-uri", "off", "--threads", "1"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert (
        "cawbench: error: every trial of study allfail-cpu failed (2 failed, none complete):" in captured.err
    )
    assert (
        "  2 x diverged: ce, layer 0, epoch 1/1: its mean is nan; lower optim.lr (now 1e+30)" in captured.err
    )
    assert "re-run with --retry-failed" in captured.err
    assert "failed trials are not repeated by a plain re-run" in captured.out  # the summary says it too
    assert not (out / "results.jsonl").exists()


def test_study_commands_refuse_bad_places_before_creating_anything(tmp_path, capsys):
    from cawbench.cli import main

    path, out = write_spec(tmp_path, digits_spec("places", seeds=[0])), tmp_path / "runs"
    assert main(["study", "status", str(path), "--out-dir", str(out)]) == 2
    assert "there is no Optuna journal at" in capsys.readouterr().err
    assert main(["study", "run", str(path), "--out-dir", str(out), "--tracking-uri", "bogus://x"]) == 2
    assert "--tracking-uri 'bogus://x': unsupported scheme 'bogus'" in capsys.readouterr().err
    assert not out.exists()  # neither command created the folder or a journal
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    assert main(["study", "run", str(path), "--out-dir", str(afile), "--tracking-uri", "off"]) == 2
    assert f"{afile} is a file, not a folder" in capsys.readouterr().err


def _create_store(uri: str, start: Any, errors: Any) -> None:
    from cawbench.studies.tracking import create_store

    start.wait()
    try:
        create_store(uri)
        errors.put(None)
    except Exception as exc:
        errors.put(f"{type(exc).__name__}: {exc}")


def test_two_study_processes_on_a_fresh_out_dir_create_the_mlflow_store_once(tmp_path):
    """Two processes run MLflow's schema migrations on the same new sqlite file at the same moment (without
    the lock one of them fails in alembic, every time here); the store is created under a lock instead.
    Forked, so that neither pays for importing MLflow again."""
    import multiprocessing

    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ctx = multiprocessing.get_context("fork")
    start, errors = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_create_store, args=(uri, start, errors)) for _ in range(2)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(timeout=120)
    assert [errors.get(timeout=5) for _ in procs] == [None, None]
    assert MlflowClient(tracking_uri=uri).search_experiments()  # one working store


def test_status_and_list_commands(tmp_path, capsys):
    from cawbench.cli import main

    path, out = write_spec(tmp_path, digits_spec("cli", seeds=[0, 1], variants={"a": {}})), tmp_path / "runs"
    assert main(["study", "run", str(path), "--out-dir", str(out), "--tracking-uri", "off", "--threads", "1",
                 "--no-echo"]) == 0  # fmt: skip
    assert main(["study", "status", str(path), "--out-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "study cli-cpu: complete 2 (planned 2)" in text and "best (mean over all seeds): a" in text
    assert main(["study", "list", "--out-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "cli-cpu" in text and "quickstart" in text
    summary = summarize(optuna.load_study(study_name="cli-cpu", storage=open_storage(None, out).storage),
                        load_spec(path), "cpu")  # fmt: skip
    assert summary["configs"][0]["n"] == 2 and summary["configs"][0]["std"] is not None


def test_a_variant_extends_one_declared_before_it_and_chains():
    variants = {
        "a": {"optim.lr": 0.1, "train.batch_size": 32},
        "b": {"extends": "a", "optim.lr": 0.2},  # its own key wins
        "c": {"extends": "b", "model.hidden": [16]},  # a chain: a's and b's overrides, then its own
    }
    spec = parse_spec(digits_spec("ext", variants=variants))
    assert spec.variants["b"] == {"optim.lr": 0.2, "train.batch_size": 32}
    assert spec.variants["c"] == {"optim.lr": 0.2, "train.batch_size": 32, "model.hidden": [16]}
    assert spec.resolve("cpu", "c", {}, seed=0).model.hidden == (16,)
    assert spec.extends == {"b": "a", "c": "b"}  # the ladder, for reports (each rung's predecessor)
    with pytest.raises(ConfigError, match=r"variants.a.extends='b': a variant extends one declared before it; "
                                          r"declared before: \(none: it is the first variant\)"):  # fmt: skip
        parse_spec(digits_spec("ext", variants={"a": {"extends": "b"}, "b": {}}))
    with pytest.raises(ConfigError, match="variants.b.extends='zz'.*declared before: a"):
        parse_spec(digits_spec("ext", variants={"a": {}, "b": {"extends": "zz"}}))
