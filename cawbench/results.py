"""The flat results table (one JSON line per finished run) and atomic file writes."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def append_result(path: Path, row: dict[str, Any]) -> None:
    """Append one row as one whole line, safe against concurrent writers and a torn previous line.

    Several worker processes may finish at once: the append happens under an exclusive ``flock`` and as a
    single ``write`` on an ``O_APPEND`` descriptor. If the file does not end in a newline (a writer was
    killed mid-line), the row starts on a new line, so the torn line stays one bad line (skipped, with a
    warning, by :func:`read_results`) instead of swallowing this row."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(row, default=str) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line
            written = os.write(fd, line)
            if written != len(line):  # a full disk: say so rather than leave half a row unnoticed
                raise OSError(f"{path}: wrote {written} of {len(line)} bytes of a result row (disk full?)")
            os.fsync(fd)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class ResultsFileError(ValueError):
    """A line of a results table is not a JSON object; the message names the file and the line."""


def read_results(path: Path, *, strict: bool = False, warn: bool = True) -> list[dict[str, Any]]:
    """The rows of a results table (``results.jsonl``), in file order.

    A line that is not a JSON object (a row torn by a killed writer, a hand edit) is skipped with a warning
    on stderr naming the file and the line number; ``strict=True`` raises :class:`ResultsFileError`
    instead; ``warn=False`` skips silently."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                row, why = None, f"not valid JSON ({exc})"
            else:
                why = f"a JSON {type(row).__name__}, not an object"
            if isinstance(row, dict):
                rows.append(row)
                continue
            message = f"{path}, line {number}: {why}"
            if strict:
                raise ResultsFileError(f"{message}; repair or delete that line")
            if warn:
                print(f"cawbench: warning: {message}; line skipped", file=sys.stderr)
    return rows


def results_frame(path: Path):
    """The results table as a pandas DataFrame (one row per run)."""
    import pandas as pd

    return pd.DataFrame(read_results(path))
