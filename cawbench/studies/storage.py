"""Optuna storages for studies: a journal file on one machine, PostgreSQL (or another RDB) for many.

- Default: ``JournalStorage(JournalFileBackend("<out_dir>/optuna.journal"))``, safe for several worker
  processes on one machine (or on a shared NFS folder). Optuna's journal storage has no heartbeat, so
  :class:`HeartbeatJournalStorage` adds one: each running trial's worker rewrites a small file
  ``<journal>.heartbeats/<trial_id>.json`` every ``heartbeat_interval`` seconds. A running trial is *stale*
  when its worker process is gone (same host: the pid is dead, seen at once) or its heartbeat file is older
  than ``grace_period`` (any host). Stale trials are failed and re-queued by Optuna's own
  ``fail_stale_trials`` + ``RetryHeartbeatStaleTrialCallback``, exactly as with an RDB storage.
- ``postgresql://...`` (also ``mysql://``, ``sqlite:///`` for one process): ``RDBStorage`` with
  ``heartbeat_interval``, ``grace_period`` and ``RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)``
  (Optuna 4.9's new name of ``RetryFailedTrialCallback``).

:func:`study_lock` serialises the few read-modify-write steps of the runner (creating the study, the
MLflow parent run, enqueueing planned trials): an ``fcntl`` lock file beside a journal/sqlite file, a
PostgreSQL advisory lock on PostgreSQL.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import optuna
from optuna.storages import BaseStorage, JournalStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from cawbench.config import ConfigError

MAX_RETRY = 3  # a trial whose worker died is re-queued at most this many times
RDB_SCHEMES = ("postgresql", "postgres", "mysql", "sqlite")
DEFAULT_HEARTBEAT_S = 20


def this_host() -> str:
    """Host name plus boot id: a pid is only meaningful on the same boot of the same machine."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        boot = "noboot"
    return f"{socket.gethostname()}:{boot}"


def pid_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (a killed, unreaped worker is dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """A journal-file storage with heartbeats kept in small files beside the journal (see module doc)."""

    def __init__(
        self,
        path: Path,
        heartbeat_interval: int = DEFAULT_HEARTBEAT_S,
        grace_period: int | None = None,
        stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(JournalFileBackend(str(path)))
        self.path = path
        self.heartbeat_dir = path.with_name(path.name + ".heartbeats")
        self.heartbeat_dir.mkdir(exist_ok=True)
        self._interval = heartbeat_interval
        self._grace = grace_period if grace_period is not None else 2 * heartbeat_interval
        self._callback = stale_trial_callback
        self._host = this_host()

    def _beat_file(self, trial_id: int) -> Path:
        return self.heartbeat_dir / f"{trial_id}.json"

    def record_heartbeat(self, trial_id: int) -> None:
        target = self._beat_file(trial_id)
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"host": self._host, "pid": os.getpid(), "time": time.time()}))
        os.replace(tmp, target)

    def clear_heartbeat(self, trial_id: int) -> None:
        with contextlib.suppress(OSError):
            self._beat_file(trial_id).unlink()

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        stale = []
        now = time.time()
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = self._beat_file(trial._trial_id)
            try:
                info = json.loads(beat.read_text())
                age = now - beat.stat().st_mtime
            except (OSError, ValueError):
                started = trial.datetime_start or datetime.now()
                if (datetime.now() - started).total_seconds() > self._grace:
                    stale.append(trial._trial_id)  # never beat (worker died at once) or file lost
                continue
            if (
                info.get("host") == self._host and not pid_alive(int(info.get("pid", -1)))
            ) or age > self._grace:
                stale.append(trial._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self._interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self._callback


@dataclass
class StorageHandle:
    storage: BaseStorage
    kind: str  # journal | rdb
    display: str  # the URL/path without any password
    lock_path: Path | None = None  # journal/sqlite: fcntl lock file
    engine: Any = None  # PostgreSQL: the SQLAlchemy engine for advisory locks
    dialect: str = ""

    @property
    def multi_process_safe(self) -> bool:
        return self.kind == "journal" or self.dialect in ("postgresql", "mysql")

    def record_heartbeat(self, trial_id: int) -> None:
        if isinstance(self.storage, BaseHeartbeat) and self.storage.get_heartbeat_interval():
            self.storage.record_heartbeat(trial_id)

    def clear_heartbeat(self, trial_id: int) -> None:
        if isinstance(self.storage, HeartbeatJournalStorage):
            self.storage.clear_heartbeat(trial_id)


def mask_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def default_journal(out_dir: Path) -> Path:
    return Path(out_dir) / "optuna.journal"


def open_storage(
    url: str | None,
    out_dir: Path,
    heartbeat_interval: int = DEFAULT_HEARTBEAT_S,
    grace_period: int | None = None,
) -> StorageHandle:
    """``None`` -> the journal file under ``out_dir``; a path or ``journal:PATH`` -> that journal file;
    ``postgresql://...`` (or mysql/sqlite) -> RDBStorage with heartbeats and retry of stale trials."""
    retry = retry_callback()
    scheme = url.split("://", 1)[0].split("+", 1)[0] if url and "://" in url else ""
    if scheme in RDB_SCHEMES:
        url = _with_available_driver(url)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
                storage = optuna.storages.RDBStorage(
                    url, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                    heartbeat_stale_trial_callback=retry, engine_kwargs=_engine_kwargs(scheme),
                )  # fmt: skip
        except Exception as exc:  # driver missing, server down, bad credentials
            raise ConfigError(f"cannot open Optuna storage {mask_password(url)}: {exc}") from None
        lock = None
        if scheme == "sqlite":
            db = url.split(":///", 1)[1] if ":///" in url else ""
            lock = Path(db + ".cawbench-lock") if db and db != ":memory:" else None
        dialect = "postgresql" if scheme == "postgres" else scheme
        return StorageHandle(storage, "rdb", mask_password(url), lock, storage.engine, dialect)
    if url and "://" in url:
        raise ConfigError(
            f"--storage {mask_password(url)!r}: unsupported scheme {scheme!r}; use a journal file path, "
            "journal:PATH, or postgresql://user:password@host:port/database"
        )
    path = Path(
        url[len("journal:") :] if url and url.startswith("journal:") else url or default_journal(out_dir)
    )
    storage = HeartbeatJournalStorage(path, heartbeat_interval, grace_period, retry)
    return StorageHandle(storage, "journal", str(path), Path(str(path) + ".cawbench-lock"))


def _with_available_driver(url: str) -> str:
    """SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3; use psycopg2 when only that is installed."""
    import importlib.util

    head, rest = url.split("://", 1)
    if head == "postgres":  # Heroku-style alias that SQLAlchemy no longer accepts
        head = "postgresql"
    find = importlib.util.find_spec
    if head == "postgresql" and find("psycopg") is None and find("psycopg2") is not None:
        head = "postgresql+psycopg2"
    return f"{head}://{rest}"


def retry_callback() -> Callable[[optuna.Study, FrozenTrial], None]:
    """Re-queue a stale trial (same params and user attrs) up to MAX_RETRY times. Optuna 4.9 renamed
    ``RetryFailedTrialCallback`` to ``RetryHeartbeatStaleTrialCallback`` (same behaviour)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
        if cls is None:
            cls = optuna.storages.RetryFailedTrialCallback
        return cls(max_retry=MAX_RETRY)


def _engine_kwargs(scheme: str) -> dict[str, Any]:
    if scheme in ("postgresql", "postgres", "mysql"):
        return {"pool_pre_ping": True}
    return {}


@contextlib.contextmanager
def study_lock(handle: StorageHandle, name: str) -> Iterator[None]:
    """Mutual exclusion across processes (and machines, on PostgreSQL) for one study's bookkeeping."""
    if handle.lock_path is not None:
        handle.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(handle.lock_path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        return
    if handle.dialect == "postgresql" and handle.engine is not None:
        from sqlalchemy import text

        key = int.from_bytes(hashlib.sha256(f"cawbench:{name}".encode()).digest()[:8], "big", signed=True)
        with handle.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
        return
    yield  # mysql: Optuna's own row locking only (documented)
