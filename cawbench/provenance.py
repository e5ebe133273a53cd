"""Where a result came from: the git commit of the code (with a dirty flag) and the machine.

Every result row carries these (``git_commit``, ``git_dirty``, ``machine``) so that a report can say which
code produced its numbers and flag a table that mixes commits. Outside a git checkout (an installed
wheel) the commit and the flag are ``None``: unknown, never guessed.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10, cwd=PACKAGE_DIR, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_commit() -> str | None:
    """The full hash of HEAD of the checkout this package runs from, or None outside git."""
    out = _git("rev-parse", "HEAD")
    return (out or "").strip() or None


def git_dirty() -> bool | None:
    """True when tracked files differ from HEAD (untracked files, e.g. ``runs/``, do not count)."""
    out = _git("status", "--porcelain", "--untracked-files=no")
    return bool(out.strip()) if out is not None else None


def machine() -> str:
    """Host name, OS and CPU of this machine (the GPU, if any, is the row's ``device``)."""
    cpu = platform.processor() or platform.machine()
    return f"{platform.node() or 'unknown host'} ({platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores)"


def provenance() -> dict[str, Any]:
    """The provenance fields of a result row."""
    return {"git_commit": git_commit(), "git_dirty": git_dirty(), "machine": machine()}
