"""Run a study: workers that pull trials from Optuna storage, train them, and track them in MLflow.

How a worker proceeds (``cawbench study run`` starts one in-process, or ``--workers N`` subprocesses):

1. **Prepare** (under :func:`~cawbench.studies.storage.study_lock`): create or load the Optuna study
   ``<spec name>-<scale>`` (a study made from a different spec is refused), record the spec on it, make or
   reuse the MLflow parent run, and *reconcile*: every (configuration, seed) that should exist and has no
   live trial (waiting, running, complete, pruned) and no final failure is enqueued with fixed parameters.
   For grid/qmc studies that is the whole plan; for tpe/random, the remaining seeds of every configuration
   whose first seed completed. Reconciling is idempotent, so re-running a spec resumes it.
2. **Loop**: fail stale trials (their worker died; Optuna's ``fail_stale_trials`` with our heartbeats;
   ``RetryFailedTrialCallback`` re-queues them), pop a waiting trial, or, for an adaptive study that has
   drawn fewer than ``n_trials`` configurations, ask the sampler for a new one; train it; repeat until no
   work is left.
3. **A trial** resolves its config, opens a nested MLflow run, trains through ``Trainer`` with an epoch
   callback that logs metrics, calls ``trial.report`` and prunes, and resumes from the run folder's
   checkpoint when an earlier attempt of the same plan key was interrupted. Outcomes: complete (value =
   the objective metric of the result row), pruned, or failed with ``fail_reason`` recorded: ``diverged:
   ...`` (NaN/inf loss), ``error: ...`` (any other exception: final unless ``--retry-failed``), or
   ``interrupted`` (Ctrl-C/SIGTERM: retried on the next run; a killed worker is found stale instead).

Every completed trial appends its result row, with ``study``, ``trial``, ``plan_key``, ``config_id`` and
``mlflow_run_id`` added, to ``<out_dir>/results.jsonl``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from cawbench.config import ConfigError, flatten
from cawbench.results import append_result, atomic_write_text
from cawbench.run_folder import check_out_dir
from cawbench.studies.spec import PlanItem, StudySpec, make_pruner, make_sampler, plan_key
from cawbench.studies.storage import (
    DEFAULT_HEARTBEAT_S,
    MAX_RETRY,
    StorageHandle,
    open_storage,
    study_lock,
)

ACTIVE_STATES = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)
TRACKING_OFF = ("off", "none", "")


class TrialFailed(RuntimeError):
    """A trial ended without a value; the message is its recorded ``fail_reason``."""


@dataclass
class RunOptions:
    spec: StudySpec
    scale: str | None = None
    out_dir: Path = Path("runs")
    storage_url: str | None = None
    tracking_uri: str | None = None  # None: sqlite:///<out_dir>/mlflow.db; "off": no MLflow
    n_trials: int | None = None  # overrides the spec's (configurations for tpe/random/qmc)
    workers: int = 1
    heartbeat_interval: int = DEFAULT_HEARTBEAT_S
    retry_failed: bool = False
    worker_label: str = "w1"
    status_file: Path | None = None
    echo_progress: bool = True
    threads: int | None = None
    device: str | None = None  # overrides train.device for every trial (e.g. cpu in tests)


@dataclass
class StudyContext:
    opts: RunOptions
    spec: StudySpec
    scale: str
    study_name: str
    handle: StorageHandle
    study: optuna.Study
    tracker: Any = None
    parent_run_id: str | None = None
    data_cache: dict[Any, Any] = field(default_factory=dict)
    orphans_checked: set[int] = field(default_factory=set)  # trials whose MLflow run was looked at

    @property
    def seeds(self) -> tuple[int, ...]:
        return self.spec.seeds_for(self.scale)

    @property
    def n_configs(self) -> int | None:
        return self.opts.n_trials or self.spec.n_trials_for(self.scale)

    @property
    def out_dir(self) -> Path:
        return Path(self.opts.out_dir)

    def planned_total(self) -> int:
        if self.spec.planned:
            return len(self.spec.plan(self.scale, self.n_configs))
        return (self.n_configs or 0) * len(self.seeds)


# ------------------------------------------------------------------------------------------ preparing
def resolve_tracking_uri(opts: RunOptions) -> str | None:
    from cawbench.studies.tracking import default_tracking_uri

    if opts.tracking_uri is None:
        return default_tracking_uri(opts.out_dir)
    return None if opts.tracking_uri.lower() in TRACKING_OFF else opts.tracking_uri


def prepare(opts: RunOptions) -> StudyContext:
    """Open storage and MLflow, create or load the study, and enqueue whatever is missing."""
    spec = opts.spec
    scale = spec.check_scale(opts.scale)
    if opts.n_trials is not None and spec.sampler_name == "grid":
        raise ConfigError(
            f"--n-trials does not apply to the grid study {spec.name!r}: the grid is the budget"
        )
    study_name = spec.study_name(scale)
    tracking_uri = resolve_tracking_uri(opts)
    if tracking_uri is not None:  # refuse a bad URI or out-dir before anything is created
        from cawbench.studies.tracking import check_tracking_uri

        check_tracking_uri(tracking_uri)
    check_out_dir(Path(opts.out_dir))
    handle = open_storage(opts.storage_url, Path(opts.out_dir), opts.heartbeat_interval)
    if opts.workers > 1 and not handle.multi_process_safe:
        raise ConfigError(
            f"storage {handle.display} is not safe for {opts.workers} parallel workers; "
            "use the default journal file or postgresql://"
        )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tracker = None
    if tracking_uri is not None:
        from cawbench.studies.tracking import Tracker, create_store, quiet_mlflow

        quiet_mlflow()
        create_store(tracking_uri)  # once, under a lock, before any worker logs
        tracker = Tracker(tracking_uri, study_name, Path(opts.out_dir) / "mlartifacts")
    with study_lock(handle, study_name):
        study = optuna.create_study(
            study_name=study_name, storage=handle.storage, sampler=make_sampler(spec),
            pruner=make_pruner(spec.pruner), direction=spec.direction, load_if_exists=True,
        )  # fmt: skip
        _check_or_record_spec(study, spec, scale, handle)
        ctx = StudyContext(opts, spec, scale, study_name, handle, study, tracker)
        if tracker is not None:
            ctx.parent_run_id = _parent_run(ctx, tracking_uri)
        reconcile(ctx, retry_failed=opts.retry_failed)  # final failures: re-queued once per run
    return ctx


def _check_or_record_spec(study: optuna.Study, spec: StudySpec, scale: str, handle: StorageHandle) -> None:
    fingerprint = spec.fingerprint(scale)
    attrs = study.user_attrs
    if "spec_fingerprint" in attrs:
        if attrs["spec_fingerprint"] != fingerprint:
            raise ConfigError(
                f"study {study.study_name!r} in {handle.display} was created from a different version of "
                f"{spec.path or spec.name} (fingerprint {attrs['spec_fingerprint']} vs {fingerprint} now): "
                "its trials would not be comparable. Rename the study (`name:`), use another --out-dir/"
                "--storage, or restore the spec (`cawbench study status` shows the stored one)"
            )
        return
    values = {
        "spec_name": spec.name, "scale": scale, "spec_fingerprint": fingerprint,
        "spec": json.dumps(spec.raw, default=str), "spec_path": str(spec.path or ""),
        "seeds": list(spec.seeds_for(scale)), "objective": spec.objective_metric,
        "sampler": spec.sampler, "pruner": spec.pruner, "planned": spec.planned,
        "reference_variant": spec.reference, "optuna_version": optuna.__version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip
    for key, value in values.items():
        study.set_user_attr(key, value)


def _parent_run(ctx: StudyContext, tracking_uri: str) -> str:
    import mlflow

    spec = ctx.spec
    tags = {
        "cawbench.study": ctx.study_name, "cawbench.spec": spec.name, "cawbench.scale": ctx.scale,
        "optuna.storage": ctx.handle.display, "optuna.sampler": json.dumps(spec.sampler),
        "optuna.pruner": json.dumps(spec.pruner), "optuna.version": optuna.__version__,
        "mlflow.version": mlflow.__version__,
    }  # fmt: skip
    if spec.description:
        tags["mlflow.note.content"] = spec.description
    params = {
        "seeds": list(ctx.seeds), "objective": f"{spec.objective_metric} ({spec.direction})",
        "variants": ",".join(spec.variant_names), "search_space": ",".join(d.key for d in spec.search_space),
        "n_trials": ctx.n_configs, "spec_fingerprint": spec.fingerprint(ctx.scale),
    }  # fmt: skip
    existing = ctx.study.user_attrs.get("mlflow_parent_run_id")
    run_id = ctx.tracker.parent_run(existing, tags, params)
    if run_id != existing:
        ctx.study.set_user_attr("mlflow_parent_run_id", run_id)
        ctx.study.set_user_attr("mlflow_tracking_uri", _mask(tracking_uri))
        ctx.study.set_user_attr("mlflow_experiment_id", ctx.tracker.experiment_id)
    return run_id


def _mask(uri: str) -> str:
    from cawbench.studies.storage import mask_password

    return mask_password(uri)


# ------------------------------------------------------------------------------------------ reconciling
def fail_reason(trial: FrozenTrial) -> str:
    return str(trial.user_attrs.get("fail_reason", ""))


def is_final_failure(trial: FrozenTrial) -> bool:
    """A failure that re-running the same trial would repeat (divergence, errors); not an interruption."""
    reason = fail_reason(trial)
    return bool(reason) and not reason.startswith("interrupted")


def needs_enqueue(trials: list[FrozenTrial], retry_failed: bool) -> bool:
    if any(t.state in ACTIVE_STATES for t in trials):
        return False
    failures = [t for t in trials if t.state == TrialState.FAIL]
    if len(failures) > MAX_RETRY:
        return False  # gave up: the trial keeps dying
    return retry_failed or not any(is_final_failure(t) for t in failures)


def expected_items(ctx: StudyContext, trials: list[FrozenTrial]) -> list[PlanItem]:
    """What should exist: the plan (grid/qmc), or every seed of each configuration drawn so far."""
    if ctx.spec.planned:
        return ctx.spec.plan(ctx.scale, ctx.n_configs)
    first: dict[str, FrozenTrial] = {}
    completed: set[str] = set()
    for t in sorted(trials, key=lambda t: t.number):
        config_id = t.user_attrs.get("config_id")
        if config_id is None or t.user_attrs.get("seed_index") != 0:
            continue
        first.setdefault(config_id, t)
        if t.state == TrialState.COMPLETE:
            completed.add(config_id)
    items = []
    for config_id, t in first.items():
        seeds = ctx.seeds if config_id in completed else ctx.seeds[:1]
        items.extend(PlanItem(config_id, dict(t.params), s, i) for i, s in enumerate(seeds))
    return items


def reconcile(ctx: StudyContext, retry_failed: bool = False) -> int:
    """Enqueue every expected (configuration, seed) that has no live trial; call under the study lock.
    ``retry_failed`` also re-queues final failures (divergence, errors)."""
    trials = ctx.study.get_trials(deepcopy=False)
    by_key: dict[str, list[FrozenTrial]] = defaultdict(list)
    for t in trials:
        key = t.user_attrs.get("plan_key")
        if key is not None:
            by_key[key].append(t)
    added = 0
    for item in expected_items(ctx, trials):
        if needs_enqueue(by_key.get(item.plan_key, []), retry_failed):
            ctx.study.enqueue_trial(item.params, user_attrs=_item_attrs(item), skip_if_exists=False)
            by_key[item.plan_key].append(_placeholder())
            added += 1
    return added


def _item_attrs(item: PlanItem) -> dict[str, Any]:
    return {"config_id": item.config_id, "plan_key": item.plan_key, "seed": item.seed,
            "seed_index": item.seed_index}  # fmt: skip


def _placeholder() -> FrozenTrial:
    return optuna.trial.create_trial(state=TrialState.WAITING)


# ------------------------------------------------------------------------------------------ the loop
def close_orphaned_runs(ctx: StudyContext) -> int:
    """Mark KILLED the MLflow runs of trials whose worker died (found stale and failed without a reason of
    their own), so that no run stays RUNNING forever. Each trial is looked at once per process; returns how
    many runs were closed."""
    if ctx.tracker is None:
        return 0
    closed = 0
    for t in ctx.study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        run_id = t.user_attrs.get("mlflow_run_id")
        if run_id is None or fail_reason(t) or t.number in ctx.orphans_checked:
            continue
        ctx.orphans_checked.add(t.number)
        reason = f"worker died (trial {t.number} found stale; re-queued)"
        if _safe_quiet(lambda run_id=run_id, reason=reason: ctx.tracker.close_orphan(run_id, reason)):
            closed += 1
    return closed


def _safe_quiet(action: Any) -> Any:
    try:
        return action()
    except Exception as exc:  # MLflow trouble never stops a study
        print(f"cawbench: warning: MLflow: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def pop_waiting(ctx: StudyContext) -> optuna.Trial | None:
    """Take one waiting trial (atomically, as Optuna's own ask() does), or None."""
    storage = ctx.study._storage
    for t in storage.get_all_trials(ctx.study._study_id, deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                return optuna.Trial(ctx.study, t._trial_id)
        except UpdateFinishedTrialError:
            continue
    return None


def configs_drawn(trials: list[FrozenTrial]) -> int:
    """Configurations the sampler has produced: named ones, plus trials that have no name yet (just
    asked for) or never got one (failed while suggesting), so a broken sampler cannot loop forever."""
    named = {t.user_attrs["config_id"] for t in trials if "config_id" in t.user_attrs}
    unnamed = sum(1 for t in trials if "config_id" not in t.user_attrs and t.state != TrialState.WAITING)
    return len(named) + unnamed


def next_trial(ctx: StudyContext) -> optuna.Trial | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(ctx.study)  # re-queued by the storage's retry callback
    close_orphaned_runs(ctx)
    trial = pop_waiting(ctx)
    if trial is not None:
        return trial
    if not ctx.spec.planned and configs_drawn(ctx.study.get_trials(deepcopy=False)) < (ctx.n_configs or 0):
        trial_id = ctx.study._storage.create_new_trial(ctx.study._study_id)
        return optuna.Trial(ctx.study, trial_id)
    with study_lock(ctx.handle, ctx.study_name):
        reconcile(ctx)  # an interrupted trial of another worker, or seeds of a finished configuration
    return pop_waiting(ctx)


def run_worker(ctx: StudyContext) -> int:
    """Run trials until none is left; returns how many this worker ran."""
    progress = Progress(ctx)
    ran = 0
    _install_sigterm()
    try:
        while True:
            trial = next_trial(ctx)
            if trial is None:
                break
            run_trial(ctx, trial, progress)
            ran += 1
    finally:
        progress.close(ran)
    return ran


def _install_sigterm() -> None:
    """SIGTERM ends the current trial as 'interrupted' (retried on the next run) instead of vanishing."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGTERM, handler)


class Heartbeat:
    """Records the trial's heartbeat every interval in a thread (like Optuna's optimize loop does)."""

    def __init__(self, handle: StorageHandle, trial_id: int, interval: float) -> None:
        self.handle, self.trial_id, self.interval = handle, trial_id, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # a missed beat is harmless; grace covers it
                self.handle.record_heartbeat(self.trial_id)
            if self.stop.wait(self.interval):
                return

    def __enter__(self) -> Heartbeat:
        self.handle.record_heartbeat(self.trial_id)
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()
        self.handle.clear_heartbeat(self.trial_id)


def run_trial(ctx: StudyContext, trial: optuna.Trial, progress: Progress) -> TrialState:
    state, value = TrialState.FAIL, None
    with Heartbeat(ctx.handle, trial._trial_id, ctx.opts.heartbeat_interval):
        try:
            value = objective(ctx, trial, progress)
            state = TrialState.COMPLETE
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted")
            ctx.study.tell(trial, state=TrialState.FAIL)
            progress.trial_end(trial, TrialState.FAIL, None, "interrupted")
            raise
        except Exception as exc:  # the study goes on; the reason stays on the trial
            reason = str(exc) if isinstance(exc, TrialFailed) else f"error: {type(exc).__name__}: {exc}"
            trial.set_user_attr("fail_reason", reason[:2000])
        if state == TrialState.COMPLETE:
            ctx.study.tell(trial, value)
        else:
            ctx.study.tell(trial, state=state)
    progress.trial_end(trial, state, value, trial.user_attrs.get("fail_reason"))
    if state == TrialState.COMPLETE and not ctx.spec.planned and trial.user_attrs.get("seed_index") == 0:
        with study_lock(ctx.handle, ctx.study_name):
            reconcile(ctx)  # this configuration survived its first seed: queue the other seeds
    return state


# ------------------------------------------------------------------------------------------ one trial
def _slug(text: str, limit: int = 80) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", text)[:limit]


def trial_config(ctx: StudyContext, trial: optuna.Trial):
    """Suggest (or read the fixed) parameters, name the configuration and seed, and resolve the config."""
    spec = ctx.spec
    variant = trial.suggest_categorical("variant", spec.variants_for(ctx.scale)) if spec.variants else None
    sampled = {d.key: d.suggest(trial) for d in spec.search_space}
    attrs = trial.user_attrs
    if "plan_key" not in attrs:  # a configuration just drawn by the sampler: its first seed
        config_id = f"c{trial.number:04d}"
        attrs = {"config_id": config_id, "plan_key": plan_key(config_id, ctx.seeds[0]),
                 "seed": ctx.seeds[0], "seed_index": 0}  # fmt: skip
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
    extra: dict[str, Any] = {"out_dir": str(ctx.out_dir), "train.progress": False}
    if ctx.opts.device:
        extra["train.device"] = ctx.opts.device
    cfg = spec.resolve(ctx.scale, variant, sampled, int(attrs["seed"]), **extra)
    run_name = f"{ctx.study_name}/{_slug(attrs['config_id'])}-s{attrs['seed']}-{cfg.config_hash()[:8]}"
    return dataclasses.replace(cfg, run_name=run_name), variant, sampled, attrs


class EpochReporter:
    """The Trainer callback of one trial: MLflow metrics, trial.report, pruning, progress."""

    def __init__(self, ctx, trial, run, main_readout, progress, epochs):
        self.ctx, self.trial, self.run = ctx, trial, run
        self.main, self.progress, self.epochs = main_readout, progress, epochs
        self.trainer = None
        self.reported: set[int] = set()
        self.prunable = trial.user_attrs.get("seed_index", 0) == 0

    def __call__(self, record: dict[str, Any]) -> None:
        # A run resumed from a checkpoint has earlier epochs in its history: report those first.
        history = self.trainer.history if self.trainer is not None else [record]
        for earlier in history:
            if earlier["epoch"] < record["epoch"] and earlier["epoch"] not in self.reported:
                self._report(earlier)
        self._report(record)
        # Only a configuration's first seed can be pruned: once it survived, its other seeds run to the
        # end, so that every surviving configuration has the full seed set.
        if self.prunable and self.trial.should_prune():
            value = record["val_acc"].get(self.main)
            raise optuna.TrialPruned(f"pruned after epoch {record['epoch']} (val {value:.2f})")

    def _report(self, record: dict[str, Any]) -> None:
        epoch = int(record["epoch"])
        value = record["val_acc"].get(self.main, float("nan"))
        self.trial.report(float(value), epoch)
        self.reported.add(epoch)
        if self.run is not None:
            _safe(self.trial, lambda: self.run.log_epoch(record, self.main))
        self.progress.epoch(self.trial, epoch, self.epochs, value)


def _safe(trial: optuna.Trial, action: Any) -> Any:
    """MLflow trouble (a busy database, a server restart) must not cost the training run."""
    try:
        return action()
    except Exception as exc:
        with contextlib.suppress(Exception):
            trial.set_user_attr("mlflow_error", f"{type(exc).__name__}: {exc}"[:1000])
        print(f"cawbench: warning: MLflow logging failed ({type(exc).__name__}: {exc})", file=sys.stderr)
        return None


def objective(ctx: StudyContext, trial: optuna.Trial, progress: Progress) -> float:
    from cawbench.engine import ResumeError, Trainer, TrainingDiverged, resolve_device, run_dir_for

    cfg, variant, sampled, attrs = trial_config(ctx, trial)
    run_dir = run_dir_for(cfg)
    info = {"worker": f"{socket.gethostname()}:{os.getpid()}", "config_hash": cfg.config_hash(),
            "run_dir": str(run_dir), "method": cfg.method, "dataset": cfg.data.name,
            "variant": variant or cfg.variant}  # fmt: skip
    for key, value in info.items():
        trial.set_user_attr(key, value)
    progress.trial_start(trial, attrs, variant or cfg.method)
    run = None
    if ctx.tracker is not None and ctx.parent_run_id is not None:
        tags = {"cawbench.study": ctx.study_name, "optuna.trial_number": str(trial.number),
                "cawbench.plan_key": attrs["plan_key"], "cawbench.config_id": attrs["config_id"],
                "cawbench.seed": str(attrs["seed"]), "cawbench.variant": str(variant or cfg.variant),
                "cawbench.method": cfg.method, "cawbench.config_hash": cfg.config_hash()}  # fmt: skip
        params = {"study": ctx.study_name, "trial": trial.number, "plan_key": attrs["plan_key"],
                  "config_id": attrs["config_id"], **flatten(cfg.to_dict())}  # fmt: skip
        name = f"trial-{trial.number:04d} {attrs['config_id']} s{attrs['seed']}"
        run = _safe(trial, lambda: ctx.tracker.start_trial(ctx.parent_run_id, name, tags, params))
        if run is not None:
            trial.set_user_attr("mlflow_run_id", run.run_id)
    reporter = EpochReporter(ctx, trial, run, cfg.readout.name, progress, cfg.train.epochs)
    data_key = (cfg.data, str(resolve_device(cfg.train.device)))
    data = ctx.data_cache.get(data_key)
    status, row, error = "FAILED", None, None
    try:
        trainer = Trainer(cfg, data=data, callbacks=[reporter], write_result=False)
        ctx.data_cache.clear()
        ctx.data_cache[data_key] = trainer.data
        reporter.trainer = trainer
        resume = (run_dir / "checkpoint.pt").is_file()
        try:
            row = trainer.run(resume=resume, overwrite=True)
        except ResumeError:  # a foreign or truncated checkpoint: start this run over
            trainer = Trainer(cfg, data=trainer.data, callbacks=[reporter], write_result=False)
            reporter.trainer = trainer
            row = trainer.run(resume=False, overwrite=True)
        trial.set_user_attr("resumed_from_checkpoint", resume)
        status = "FINISHED"
    except TrainingDiverged as exc:
        error = str(exc)  # "diverged: <term>, layer <i>, epoch <e>: ...; lower optim.lr (now X)"
        raise TrialFailed(error) from None
    except optuna.TrialPruned:
        status = "KILLED"
        raise
    except KeyboardInterrupt:
        error = "interrupted"
        raise
    except Exception as exc:
        error = f"error: {type(exc).__name__}: {exc}"
        raise
    finally:
        if run is not None:
            _safe(trial, lambda: _close_run(run, status, run_dir, row, error))
    value = float(row[ctx.spec.objective_metric])
    row.update({
        "study": ctx.study_name, "study_spec": ctx.spec.name, "scale": ctx.scale, "trial": trial.number,
        "plan_key": attrs["plan_key"], "config_id": attrs["config_id"], "seed_index": attrs["seed_index"],
        "study_variant": variant, "search_params": sampled, "objective": value,
        "mlflow_run_id": run.run_id if run is not None else None,
    })  # fmt: skip
    append_result(ctx.out_dir / "results.jsonl", row)
    return value


def _close_run(run, status: str, run_dir: Path, row: dict[str, Any] | None, error: str | None) -> None:
    state = {"FINISHED": "COMPLETE", "KILLED": "PRUNED"}.get(status, "FAIL")
    tags: dict[str, Any] = {"optuna.state": state}
    if error:
        tags["cawbench.fail_reason"] = error
    if row is not None:
        run.log_result(row)
    run.log_run_folder(run_dir)
    run.set_tags(tags)
    run.finish(status)


# ------------------------------------------------------------------------------------------ progress
class Progress:
    """One live line per worker: trial k of n, epoch, best value so far. Also written to a status file
    that ``--workers N`` reads to draw every worker's line."""

    def __init__(self, ctx: StudyContext) -> None:
        self.ctx = ctx
        self.label = ctx.opts.worker_label
        self.echo = ctx.opts.echo_progress
        self.tty = self.echo and sys.stdout.isatty()
        self.status_file = ctx.opts.status_file
        self.total = ctx.planned_total()
        self.state: dict[str, Any] = {"label": self.label, "pid": os.getpid()}
        self.best: float | None = None
        self.done = 0

    def _refresh_counts(self) -> None:
        trials = self.ctx.study.get_trials(deepcopy=False)
        finished = {t.user_attrs.get("plan_key") for t in trials if t.state.is_finished() and
                    (t.state != TrialState.FAIL or is_final_failure(t))}  # fmt: skip
        self.done = len(finished - {None})
        values = [t.value for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
        if values:
            self.best = max(values) if self.ctx.spec.direction == "maximize" else min(values)
        if not self.ctx.spec.planned:
            self.total = max(self.total, len({t.user_attrs.get("plan_key") for t in trials} - {None}))

    def trial_start(self, trial: optuna.Trial, attrs: dict[str, Any], label: str) -> None:
        self._refresh_counts()
        self.state.update(trial=trial.number, config=attrs["config_id"], seed=attrs["seed"], what=label,
                          epoch=None, epochs=None, val=None, note="starting")  # fmt: skip
        self._show()

    def epoch(self, trial: optuna.Trial, epoch: int, epochs: int, value: float) -> None:
        self.state.update(epoch=epoch + 1, epochs=epochs, val=value, note="")
        self._show()

    def trial_end(
        self, trial: optuna.Trial, state: TrialState, value: float | None, reason: str | None
    ) -> None:
        self._refresh_counts()
        note = {TrialState.COMPLETE: f"complete {value:.2f}" if value is not None else "complete",
                TrialState.PRUNED: "pruned"}.get(state, f"failed ({reason})")  # fmt: skip
        self.state.update(note=note)
        self._show(final=True)

    def line(self) -> str:
        return format_status(self.state, self.done, self.total, self.best)

    def _show(self, final: bool = False) -> None:
        self.state.update(done=self.done, total=self.total, best=self.best, time=time.time())
        if self.status_file is not None:
            with contextlib.suppress(OSError):
                atomic_write_text(Path(self.status_file), json.dumps(self.state))
        if not self.echo:
            return
        if self.tty:
            print("\r\x1b[2K" + self.line(), end="\n" if final else "", flush=True)
        else:
            print(self.line(), flush=True)

    def close(self, ran: int) -> None:
        self.state.update(note=f"finished ({ran} trials run)", trial=None)
        self._refresh_counts()
        self._show(final=True)


def format_status(state: dict[str, Any], done: int, total: int, best: float | None) -> str:
    parts = [f"{state.get('label', '?'):>3}"]
    if state.get("trial") is not None:
        what = f"trial {state['trial']} [{state.get('config')} seed {state.get('seed')}]"
        if state.get("epoch"):
            val = state.get("val")
            what += f" epoch {state['epoch']}/{state['epochs']}" + (
                f" val {val:.2f}" if isinstance(val, (int, float)) and math.isfinite(val) else ""
            )
        parts.append(what)
    parts.append(f"done {done}/{total}")
    parts.append(f"best {best:.2f}" if best is not None else "best -")
    if state.get("note"):
        parts.append(str(state["note"]))
    return " | ".join(parts)


# ------------------------------------------------------------------------------------------ entry points
def run_study(opts: RunOptions) -> dict[str, Any]:
    """Prepare the study, run it with ``opts.workers`` workers, and return its summary."""
    if opts.threads:
        import torch

        torch.set_num_threads(opts.threads)
    ctx = prepare(opts)
    worker_errors: list[tuple[int, int]] = []
    if opts.workers > 1:
        worker_errors = _run_subprocess_workers(ctx)
    else:
        run_worker(ctx)
    summary = summarize(ctx.study, ctx.spec, ctx.scale, ctx.n_configs)
    summary["worker_errors"] = worker_errors
    if ctx.tracker is not None and ctx.parent_run_id is not None:
        idle = summary["counts"].get("RUNNING", 0) == 0 and summary["counts"].get("WAITING", 0) == 0
        counts = summary["counts"]
        metrics = {
            "best_value": summary.get("best_mean"), "trials_complete": counts.get("COMPLETE", 0),
            "trials_failed": counts.get("FAIL", 0), "trials_pruned": counts.get("PRUNED", 0),
        }  # fmt: skip
        with contextlib.suppress(Exception):
            ctx.tracker.finish_parent(ctx.parent_run_id, metrics, done=idle)
    return summary


def _run_subprocess_workers(ctx: StudyContext) -> list[tuple[int, int]]:
    """Start ``opts.workers`` worker processes, draw their lines, and return (worker, exit code) of those
    that failed."""
    opts = ctx.opts
    if opts.spec.path is None:
        raise ConfigError("--workers > 1 needs a spec file (workers read it themselves)")
    folder = ctx.out_dir / "studies" / ctx.study_name / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    threads = opts.threads or max(1, (os.cpu_count() or 1) // opts.workers)
    gpus = _gpu_count()
    storage = opts.storage_url or str(ctx.handle.display)
    tracking = opts.tracking_uri if opts.tracking_uri is not None else resolve_tracking_uri(opts)
    procs = []
    for k in range(1, opts.workers + 1):
        label = f"w{k}"
        status = folder / f"{label}.json"
        with contextlib.suppress(OSError):
            status.unlink()
        cmd = [sys.executable, "-m", "cawbench", "study", "run", str(opts.spec.path), "--scale", ctx.scale,
               "--out-dir", str(opts.out_dir), "--storage", storage, "--workers", "1",
               "--tracking-uri", tracking or "off",
               "--worker-label", label, "--status-file", str(status), "--threads", str(threads),
               "--heartbeat", str(opts.heartbeat_interval), "--no-echo"]  # fmt: skip
        if opts.n_trials is not None:
            cmd += ["--n-trials", str(opts.n_trials)]
        # (--retry-failed is not passed on: the launcher's own prepare() already re-queued those trials.)
        if opts.device:
            cmd += ["--device", opts.device]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        if gpus > 1:
            env["CUDA_VISIBLE_DEVICES"] = str((k - 1) % gpus)
        log = open(folder / f"{label}.log", "w")  # noqa: SIM115 - closed when the worker ends
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), status, log))
    try:
        _watch_workers(procs, ctx)
    except KeyboardInterrupt:
        for proc, _, _ in procs:
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGINT)
        for proc, _, _ in procs:
            proc.wait()
        raise
    finally:
        for _, _, log in procs:
            log.close()
    failed = [(i + 1, p.returncode) for i, (p, _, _) in enumerate(procs) if p.returncode not in (0, None)]
    if failed:
        logs = ", ".join(str(folder / f"w{i}.log") for i, _ in failed)
        print(f"cawbench: warning: worker(s) {failed} exited with an error; see {logs}", file=sys.stderr)
    return failed


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def _watch_workers(procs: list, ctx: StudyContext) -> None:
    """Draw one line per worker from their status files until every worker has exited."""
    tty = ctx.opts.echo_progress and sys.stdout.isatty()
    shown: dict[int, str] = {}
    drawn = 0
    while True:
        running = any(p.poll() is None for p, _, _ in procs)
        lines = []
        for i, (proc, status, _) in enumerate(procs):
            try:
                state = json.loads(Path(status).read_text())
                line = format_status(state, state.get("done", 0), state.get("total", 0), state.get("best"))
            except (OSError, ValueError):
                line = f" w{i + 1} | starting"
            if proc.poll() is not None and proc.returncode != 0:
                line += f" | exited with code {proc.returncode}"
            lines.append(line)
        if ctx.opts.echo_progress:
            if tty:
                if drawn:
                    print(f"\x1b[{drawn}F", end="")
                for line in lines:
                    print("\x1b[2K" + line)
                drawn = len(lines)
            else:
                for i, line in enumerate(lines):
                    if shown.get(i) != line:
                        print(line, flush=True)
                        shown[i] = line
        if not running:
            return
        time.sleep(1.0)


# ------------------------------------------------------------------------------------------ summaries
def summarize(
    study: optuna.Study, spec: StudySpec, scale: str, n_configs: int | None = None
) -> dict[str, Any]:
    """Counts by state, each configuration's objective over seeds (mean ± std, ddof=1), failures."""
    trials = study.get_trials(deepcopy=False)
    counts: dict[str, int] = defaultdict(int)
    for t in trials:
        counts[t.state.name] += 1
    configs: dict[str, dict[str, Any]] = {}
    for t in sorted(trials, key=lambda t: t.number):
        config_id = t.user_attrs.get("config_id")
        if config_id is None:
            continue
        entry = configs.setdefault(config_id, {"config_id": config_id, "params": dict(t.params),
                                               "values": {}, "states": defaultdict(int)})  # fmt: skip
        entry["states"][t.state.name] += 1
        if t.state == TrialState.COMPLETE and t.value is not None:
            entry["values"][t.user_attrs.get("seed")] = t.value
    seeds = spec.seeds_for(scale)
    rows = []
    for entry in configs.values():
        values = [entry["values"][s] for s in seeds if s in entry["values"]]
        entry["n"] = len(values)
        entry["mean"] = statistics.fmean(values) if values else None
        entry["std"] = statistics.stdev(values) if len(values) > 1 else None
        entry["all_seeds"] = len(values) == len(seeds)
        entry["states"] = dict(entry["states"])
        rows.append(entry)
    full = [r for r in rows if r["all_seeds"]]
    best = None
    if full:
        pick = max if spec.direction == "maximize" else min
        best = pick(full, key=lambda r: r["mean"])
    failures = [
        {"trial": t.number, "plan_key": t.user_attrs.get("plan_key"),
         "reason": fail_reason(t) or "worker died"}
        for t in trials if t.state == TrialState.FAIL
    ]  # fmt: skip
    planned = len(spec.plan(scale, n_configs)) if spec.planned else (n_configs or 0) * len(seeds)
    return {
        "study": study.study_name, "counts": dict(counts), "planned_trials": planned, "configs": rows,
        "best_config": best["config_id"] if best else None, "best_mean": best["mean"] if best else None,
        "failures": failures, "objective": spec.objective_metric, "direction": spec.direction,
        "seeds": list(seeds), "mlflow_parent_run_id": study.user_attrs.get("mlflow_parent_run_id"),
    }  # fmt: skip


def format_summary(summary: dict[str, Any]) -> str:
    counts = ", ".join(f"{k.lower()} {v}" for k, v in sorted(summary["counts"].items())) or "no trials"
    lines = [
        f"study {summary['study']}: {counts} (planned {summary['planned_trials']}); objective "
        f"{summary['objective']} ({summary['direction']}), seeds {summary['seeds']}",
        f"{'configuration':<44}{'seeds':>6}{'mean':>9}{'std':>8}  states",
    ]
    for row in sorted(summary["configs"], key=lambda r: r["config_id"]):
        mean = f"{row['mean']:.2f}" if row["mean"] is not None else "-"
        std = f"{row['std']:.2f}" if row["std"] is not None else "-"
        states = " ".join(f"{k.lower()}:{v}" for k, v in sorted(row["states"].items()))
        lines.append(f"{row['config_id'][:43]:<44}{row['n']:>6}{mean:>9}{std:>8}  {states}")
    if summary["best_config"] is not None:
        lines.append(f"best (mean over all seeds): {summary['best_config']} {summary['best_mean']:.2f}")
    for f in summary["failures"][:20]:
        lines.append(f"failed trial {f['trial']} ({f['plan_key']}): {f['reason']}")
    if len(summary["failures"]) > 20:
        lines.append(f"... and {len(summary['failures']) - 20} more failures")
    if any(not str(f["reason"]).startswith(("interrupted", "worker died")) for f in summary["failures"]):
        lines.append(
            "failed trials are not repeated by a plain re-run: fix the cause, then add --retry-failed"
        )
    lines.append("accuracies in %, validation split; std with ddof=1")
    return "\n".join(lines)


def existing_journal(storage_url: str | None, out_dir: Path) -> Path | None:
    """The journal file a storage argument names (None for a database URL)."""
    if storage_url and "://" in storage_url:
        return None
    if storage_url:
        return Path(storage_url.removeprefix("journal:"))
    return Path(out_dir) / "optuna.journal"


def failure_report(summary: dict[str, Any]) -> str | None:
    """When no trial of the study succeeded and some failed: the failure reasons, most frequent first, and
    what to do; else None."""
    counts = summary["counts"]
    failed = counts.get("FAIL", 0)
    if not failed or counts.get("COMPLETE", 0) or counts.get("PRUNED", 0) or counts.get("RUNNING", 0):
        return None
    reasons: dict[str, int] = defaultdict(int)
    for f in summary["failures"]:
        reasons[str(f["reason"]).splitlines()[0][:300]] += 1
    lines = [f"every trial of study {summary['study']} failed ({failed} failed, none complete):"]
    for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:10]:
        lines.append(f"  {n} x {reason}")
    if len(reasons) > 10:
        lines.append(f"  ... and {len(reasons) - 10} other reasons")
    lines.append(
        "fix the cause (e.g. the config or the learning rate), then re-run with --retry-failed to run the "
        "failed trials again (a plain re-run does not repeat final failures)"
    )
    return "\n".join(lines)


def load_study_for(
    spec: StudySpec, scale: str | None, out_dir: Path, storage_url: str | None
) -> optuna.Study:
    name = spec.study_name(scale)
    journal = existing_journal(storage_url, Path(out_dir))
    if journal is not None and not journal.is_file():  # opening it would create it (and the folder)
        raise ConfigError(
            f"no study {name!r}: there is no Optuna journal at {journal}; start it with `cawbench study run "
            f"{spec.path or spec.name} --out-dir {out_dir}`, or pass the --out-dir/--storage where it lives"
        )
    handle = open_storage(storage_url, Path(out_dir))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=name, storage=handle.storage)
    except KeyError:
        raise ConfigError(
            f"no study {name!r} in {handle.display}; "
            f"start it with `cawbench study run {spec.path or spec.name}`"
        ) from None
