"""``cawbench report --index``: ``reports/README.md``, one line per report folder.

Each line says what the report answers, at which scale and with which seeds, when its runs finished, the
command that made it, and one sentence of finding. The facts come from the report folder itself where it
was rendered by ``cawbench report`` (``data/source.json`` and ``data/results.jsonl``); for other folders
(benchmarks, one-off GPU checks) and for every finding they come from ``reports/index.yaml``, written by
hand from the numbers::

    quickstart-cpu:
      finding: "At 2 epochs on 2,000 images CaFo leads (82.2 %) ..."
    bench:
      question: What each method costs per image against the backprop twin of the same network
      scale: ...
      seeds: "-"
      command: cawbench bench --out reports/bench/cpu.md

What a rendered folder says about itself wins over index.yaml (it is regenerated with the report); the
finding always comes from index.yaml. The date falls back to the last commit that touched the folder.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from cawbench.config import ConfigError
from cawbench.reporting.aggregate import MISSING, markdown_table
from cawbench.results import atomic_write_text, read_results

COLUMNS = ("question", "scale", "seeds", "date", "command", "finding")
NO_FINDING = "_(finding not written yet: `finding:` in index.yaml)_"


def _first_sentence(text: str) -> str:
    text = " ".join(str(text).split())
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


def folder_facts(folder: Path) -> dict[str, Any]:
    """What a rendered report folder says about itself (empty for folders ``cawbench report`` did not make)."""
    source = folder / "data" / "source.json"
    if not source.is_file():
        return {}
    meta = json.loads(source.read_text())
    facts = meta.get("facts") or {}
    rows = read_results(folder / "data" / "results.jsonl")
    command = meta.get("command")
    if facts.get("spec_name") and meta.get("scale") and meta.get("origin") == "study":
        run = (
            f"cawbench study run {facts['spec_name']} --scale {meta['scale']} --out-dir {meta.get('out_dir')}"
        )
        command = f"{run}` then `{command}" if command else run
    seeds = facts.get("seeds") or sorted({r.get("seed") for r in rows if r.get("seed") is not None})
    finished = pd.to_datetime(
        pd.Series([r.get("finished_at") for r in rows]), errors="coerce", utc=True
    ).dropna()
    return {
        "question": _first_sentence(facts.get("description") or f"the runs of {meta.get('name')}"),
        "scale": meta.get("scale") or MISSING,
        "seeds": ", ".join(str(s) for s in seeds) or MISSING,
        "date": f"{finished.max():%Y-%m-%d}" if len(finished) else None,
        "command": command,
    }


def _git_date(folder: Path) -> str | None:
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%cs", "--", "."], cwd=folder, capture_output=True,
                             text=True, timeout=10, check=False)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def read_index_yaml(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(
            f"{path} must map report folder names to {{question, scale, seeds, date, command, finding}}"
        )
    for name, entry in data.items():
        unknown = sorted(set(entry) - set(COLUMNS))
        if unknown:
            raise ConfigError(f"{path}: {name}: unknown key {unknown[0]!r}; keys: {', '.join(COLUMNS)}")
    return data


def index_rows(reports: Path) -> list[dict[str, Any]]:
    hand = read_index_yaml(reports / "index.yaml")
    folders = sorted(p for p in reports.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = sorted(set(hand) - {p.name for p in folders})
    if unknown:
        raise ConfigError(
            f"{reports / 'index.yaml'} names {unknown[0]!r}, which is not a folder of {reports}"
        )
    rows = []
    for folder in folders:
        entry = {
            **{k: v for k, v in folder_facts(folder).items() if v is not None},
            **hand.get(folder.name, {}),
        }
        entry.setdefault("date", _git_date(folder))
        rows.append({
            "report": f"[{folder.name}]({folder.name}/)",
            **{k: (str(entry[k]) if entry.get(k) not in (None, "") else MISSING) for k in COLUMNS[:4]},
            "command": f"`{entry['command']}`" if entry.get("command") else MISSING,
            "finding": str(entry["finding"]).strip() if entry.get("finding") else NO_FINDING,
        })  # fmt: skip
    return rows


def write_index(reports: Path) -> tuple[Path, int]:
    """Write ``reports/README.md``; returns its path and the number of reports listed."""
    if not reports.is_dir():
        raise ConfigError(f"reports folder {reports} not found")
    rows = index_rows(reports)
    text = "\n".join([
        "# Reports",
        "",
        "Every folder here was produced by the project's own commands (the `command` column); numbers are "
        "never typed by hand. Folders made by `cawbench report` hold their data in `data/` and re-render "
        "with `cawbench report reports/<folder>`. This index is written by `cawbench report --index` from "
        "each folder's `data/source.json` and from `index.yaml` (questions of the other folders, and the "
        "findings, written from the numbers).",
        "",
        markdown_table(pd.DataFrame(rows)),
        "",
    ])  # fmt: skip
    path = reports / "README.md"
    atomic_write_text(path, text)
    return path, len(rows)
