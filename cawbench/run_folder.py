"""A run's folder (``OUT_DIR/runs/<run name>``): refuse to clobber it, replace it whole, or find it finished.

- A folder that already holds a run (a result, metrics or a checkpoint) is never overwritten by accident:
  ``cawbench train`` refuses and names ``--resume`` and ``--overwrite``. Replacing it on purpose first
  removes every file of the old run, so a crash midway cannot leave a folder that mixes two runs.
- ``--resume`` of a finished run changes nothing: the run's stored result is returned, and its row is
  appended to the results table only if that row is missing (the run was killed between the two writes).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from cawbench.config import ConfigError
from cawbench.results import append_result, read_results

RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "result.json", "artifacts.npz", "config.yaml")
PROGRESS_FILES = ("result.json", "metrics.jsonl", "checkpoint.pt")  # a folder with one of these holds a run


class RunFolderError(ConfigError):
    """The run folder (or the --out-dir above it) cannot be used as asked; the message says what to do."""


def check_out_dir(out_dir: Path) -> None:
    """--out-dir must be a folder (it is created when missing), not a file."""
    out_dir = Path(out_dir)
    for folder in (out_dir, *out_dir.parents):
        if folder.exists():
            if not folder.is_dir():
                raise RunFolderError(
                    f"--out-dir {out_dir}: {folder} is a file, not a folder; give a folder (created if missing)"
                )
            return


def describe(run_dir: Path) -> str | None:
    """What the folder holds ("finished", "unfinished (2 epochs recorded)"), or None if no run."""
    run_dir = Path(run_dir)
    if not any((run_dir / name).is_file() for name in PROGRESS_FILES):
        return None
    if (run_dir / "result.json").is_file():
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if json.loads((run_dir / "result.json").read_text()).get("truncated"):
                return "finished (truncated by train.time_limit_s)"
        return "finished"
    metrics = run_dir / "metrics.jsonl"
    epochs = 0
    with contextlib.suppress(OSError):
        epochs = sum(1 for line in metrics.read_text().splitlines() if line.strip())
    return f"unfinished ({epochs} epoch{'s' if epochs != 1 else ''} recorded)"


def check(run_dir: Path, out_dir: Path, *, resume: bool, overwrite: bool) -> str | None:
    """Refuse an unusable --out-dir, and a folder that holds a run unless resuming or overwriting; returns
    what the folder holds (see :func:`describe`)."""
    check_out_dir(out_dir)
    state = describe(run_dir)
    if state is not None and not (resume or overwrite):
        raise RunFolderError(
            f"run folder {run_dir} already holds a {state} run; add --resume to continue it (a finished run "
            "is left as it is), --overwrite to replace it, or choose another --run-name"
        )
    return state


def claim(run_dir: Path, out_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Make ``run_dir`` ready for a run: :func:`check`, then (not resuming) remove an old run's files, so a
    crash midway cannot leave a folder that mixes two runs."""
    state = check(run_dir, out_dir, resume=resume, overwrite=overwrite)
    if resume or state is None:
        return
    for name in RUN_FILES:
        with contextlib.suppress(FileNotFoundError):
            (Path(run_dir) / name).unlink()


def finished_result(run_dir: Path, config_hash: str) -> dict[str, Any] | None:
    """The stored result row of a finished run of this configuration, or None."""
    path = Path(run_dir) / "result.json"
    try:
        row = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(row, dict) or row.get("config_hash") != config_hash or row.get("truncated"):
        return None
    return row


def ensure_row(results_path: Path, row: dict[str, Any]) -> bool:
    """Append ``row`` unless the table already has it (same run folder and finish time); True if appended."""
    for existing in read_results(results_path, warn=False):
        if existing.get("run_dir") == row.get("run_dir") and existing.get("finished_at") == row.get(
            "finished_at"
        ):
            return False
    append_result(results_path, row)
    return True
