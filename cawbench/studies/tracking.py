"""A small MLflow adapter for studies (Optuna's MLflowCallback is deprecated and logs only after a trial).

One MLflow experiment per study (named like the Optuna study), one parent run per study and one nested
run per trial (``mlflow.parentRunId`` tag). A trial's run holds its parameters (the flattened resolved
config plus study/trial/seed), per-epoch metrics with ``step=epoch`` (validation and test accuracy per
readout, per-layer accuracy, per-layer loss terms, unit statistics, times), the summary of the result
row, and as artifacts the run folder's ``config.yaml`` (the resolved config), ``metrics.jsonl``,
``artifacts.npz`` and ``result.json``. The run id goes onto the Optuna trial (user attr
``mlflow_run_id``) and into the results table, so the three stores join on it.

Everything goes through ``MlflowClient`` with an explicit tracking URI (never the fluent global state), so
several studies/processes can log at once. The default URI is ``sqlite:///<out_dir>/mlflow.db`` with
artifacts under ``<out_dir>/mlartifacts/``; a tracking server (``http://host:5000``) works the same.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import re
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cawbench.config import ConfigError, flatten

_log = logging.getLogger(__name__)
PARAM_VALUE_LIMIT = 6000  # MLflow's limit on a param value
BATCH_LIMIT = 100  # params/tags per log_batch call
METRIC_BATCH_LIMIT = 1000


def default_tracking_uri(out_dir: Path) -> str:
    return f"sqlite:///{(Path(out_dir).resolve() / 'mlflow.db').as_posix()}"


#: URI schemes of MLflow tracking stores (a plain folder path has none)
TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")


def check_tracking_uri(uri: str) -> None:
    """Refuse a URI MLflow cannot open, before anything is created."""
    scheme = urlsplit(uri).scheme if "://" in uri or uri.startswith("sqlite:") else ""
    if scheme and scheme.split("+", 1)[0] not in TRACKING_SCHEMES:
        raise ConfigError(
            f"--tracking-uri {_mask(uri)!r}: unsupported scheme {scheme!r}; use sqlite:///PATH.db (the default "
            "is sqlite:///OUT_DIR/mlflow.db), http(s)://HOST:PORT of an MLflow server, postgresql://..., "
            "or off"
        )


def _sqlite_file(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


@contextlib.contextmanager
def _file_lock(path: Path | None) -> Iterator[None]:
    if path is None:
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def create_store(uri: str) -> None:
    """Create (or migrate) the tracking store once, before any worker logs to it. For a local sqlite file
    this happens under a lock file beside it: two ``study run`` processes started at once on a fresh
    out-dir would otherwise both run MLflow's schema migrations, and one would fail inside alembic."""
    from mlflow import MlflowClient

    db = _sqlite_file(uri)
    if db is not None and not db.parent.is_dir():
        raise ConfigError(f"--tracking-uri {uri!r}: folder {db.parent} does not exist")
    lock = db.with_name(db.name + ".cawbench-lock") if db is not None else None
    with _file_lock(lock):
        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception as exc:  # unreachable server, unsupported URI, a foreign database
            detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise ConfigError(
                f"cannot open the MLflow tracking store {_mask(uri)} ({type(exc).__name__}: {detail}); check "
                "--tracking-uri, or pass --tracking-uri off to run without MLflow"
            ) from None


def _mask(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.password:
        return uri.replace(f":{parts.password}@", ":***@")
    return uri


def _metric_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


def epoch_metrics(record: dict[str, Any], main_readout: str) -> dict[str, float]:
    """Flatten one engine epoch record into MLflow metric names (finite numbers only)."""
    out: dict[str, float] = {}

    def put(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        if math.isfinite(value):
            out[_metric_name(name)] = float(value)

    val, test = record.get("val_acc") or {}, record.get("test_acc") or {}
    put("val_acc", val.get(main_readout))
    put("test_acc", test.get(main_readout))
    for readout, value in val.items():
        put(f"val_acc_by_readout/{readout}", value)
    for readout, value in test.items():
        put(f"test_acc_by_readout/{readout}", value)
    for split in ("val", "test", "train"):
        layers = record.get(f"{split}_acc_layers" if split != "train" else "train_acc") or []
        for i, value in enumerate(layers):
            put(f"{split}_acc_layer/{i:02d}", value)
    for term, values in (record.get("train_loss") or {}).items():
        finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
        if finite:
            put(f"train_loss/{term}", sum(finite) / len(finite))
        for i, value in enumerate(values):
            put(f"train_loss_layer/{term}/{i:02d}", value)
    for stat, values in (record.get("unit_stats") or {}).items():
        for i, value in enumerate(values or []):
            put(f"unit/{stat}/{i:02d}", value)
    for key in ("lr", "epoch_time_s", "train_time_s", "eval_time_s", "train_images_per_s"):
        put(key, record.get(key))
    return out


class Tracker:
    """MLflow for one study: its experiment and parent run, and a :class:`TrialRun` per trial."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: Path | None = None) -> None:
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.experiment_name = experiment
        self.artifact_root = artifact_root
        self._experiment_id: str | None = None

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment_name)
            if exp is None:
                location = None
                if self.artifact_root is not None and _is_local_store(self.tracking_uri):
                    location = (Path(self.artifact_root).resolve() / self.experiment_name).as_uri()
                try:
                    self._experiment_id = self.client.create_experiment(
                        self.experiment_name, artifact_location=location
                    )
                except Exception:  # another worker created it first
                    exp = self.client.get_experiment_by_name(self.experiment_name)
                    if exp is None:
                        raise
                    self._experiment_id = exp.experiment_id
            else:
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    def parent_run(self, existing: str | None, tags: dict[str, str], params: dict[str, Any]) -> str:
        """Reuse the study's parent run if this tracking store has it, else create it; returns its id."""
        if existing:
            try:
                run = self.client.get_run(existing)
                if run.info.experiment_id == self.experiment_id:
                    if run.info.status != "RUNNING":
                        self.client.update_run(existing, status="RUNNING")
                    return existing
            except Exception:  # a different tracking store (or a deleted run): start a new parent
                pass
        run = self.client.create_run(self.experiment_id, run_name=tags.get("cawbench.study"), tags=tags)
        self._log_params(run.info.run_id, params)
        return run.info.run_id

    def finish_parent(self, run_id: str, summary: dict[str, Any], done: bool) -> None:
        from mlflow.entities import Metric

        now = _now_ms()
        metrics = [
            Metric(k, float(v), now, 0) for k, v in summary.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ]  # fmt: skip
        for i in range(0, len(metrics), METRIC_BATCH_LIMIT):
            self.client.log_batch(run_id, metrics=metrics[i : i + METRIC_BATCH_LIMIT])
        if done:
            self.client.set_terminated(run_id, status="FINISHED")

    def start_trial(
        self, parent_run_id: str, run_name: str, tags: dict[str, str], params: dict[str, Any]
    ) -> TrialRun:
        run = self.client.create_run(
            self.experiment_id, run_name=run_name, tags={"mlflow.parentRunId": parent_run_id, **tags}
        )
        self._log_params(run.info.run_id, params)
        return TrialRun(self, run.info.run_id)

    def close_orphan(self, run_id: str, reason: str) -> bool:
        """Mark KILLED a trial's run left RUNNING by a worker that died; True if it was still running."""
        if self.client.get_run(run_id).info.status != "RUNNING":
            return False
        self.client.set_tag(run_id, "cawbench.fail_reason", reason)
        self.client.set_tag(run_id, "optuna.state", "FAIL")
        self.client.set_terminated(run_id, status="KILLED")
        return True

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), str(v)[:PARAM_VALUE_LIMIT]) for k, v in flatten(params).items()]
        for i in range(0, len(items), BATCH_LIMIT):
            self.client.log_batch(run_id, params=items[i : i + BATCH_LIMIT])


class TrialRun:
    """The nested MLflow run of one trial."""

    def __init__(self, tracker: Tracker, run_id: str) -> None:
        self.tracker = tracker
        self.client = tracker.client
        self.run_id = run_id
        self.logged_epochs: set[int] = set()

    def log_epoch(self, record: dict[str, Any], main_readout: str) -> None:
        from mlflow.entities import Metric

        epoch = int(record["epoch"])
        now = _now_ms()
        metrics = [Metric(k, v, now, epoch) for k, v in epoch_metrics(record, main_readout).items()]
        for i in range(0, len(metrics), METRIC_BATCH_LIMIT):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + METRIC_BATCH_LIMIT])
        self.logged_epochs.add(epoch)

    def log_result(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = _now_ms()
        metrics = []
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                metrics.append(Metric(f"result/{key}", float(value), now, 0))
        for i, value in enumerate(row.get("per_layer_test_acc") or []):
            metrics.append(Metric(f"result/per_layer_test_acc/{i:02d}", float(value), now, 0))
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_run_folder(self, run_dir: Path) -> None:
        for name in ("config.yaml", "metrics.jsonl", "artifacts.npz", "result.json"):
            path = Path(run_dir) / name
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))

    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value)[:8000])

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri


def quiet_mlflow() -> None:
    """MLflow logs its database migrations at INFO and warns about the filesystem store; keep the progress
    lines readable."""
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="mlflow")
