"""A report folder's own copy of the data it was rendered from, and re-rendering from it.

``render_report`` writes, beside README.md, tables/ and figures/, a ``data/`` folder:

- ``source.json``: the study's name, scale, storage (as displayed), trial counts, study attributes, the
  spec facts (:func:`~cawbench.reporting.source.spec_facts`) and the command that first rendered it;
- ``results.jsonl``: the result rows reported, exactly as read from the results table;
- ``trials.jsonl``: the study's finished Optuna trials (parameters, distributions, values, intermediate
  values, user attributes), from which importance, contour and history plots are drawn;
- ``runs/<study>/<run>/``: each run's ``config.yaml``, ``result.json``, ``metrics.jsonl`` and
  ``artifacts.npz`` (never checkpoints);
- ``paper_results.csv`` and ``known_results.jsonl``: the comparison rows the paper table used.

``cawbench report <report-folder>`` reads only that folder, so a fresh clone re-renders every table and
figure without the study, its storage or its run folders. Rendering from a live study goes through the same
serialised trials (an in-memory study rebuilt from them), so both paths draw from identical objects.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from cawbench.config import ConfigError
from cawbench.results import atomic_write_text, read_results

FORMAT = 1
RUN_FILES = ("config.yaml", "result.json", "metrics.jsonl", "artifacts.npz")
FINISHED_STATES = ("COMPLETE", "PRUNED", "FAIL")


# ------------------------------------------------------------------------------------------ trials
def serialise_trials(trials: list[Any]) -> list[dict[str, Any]]:
    """Finished Optuna trials as JSON-ready dicts, in trial-number order."""
    from optuna.distributions import distribution_to_json

    out = []
    for t in sorted(trials, key=lambda t: t.number):
        if t.state.name not in FINISHED_STATES:
            continue
        out.append({
            "number": t.number,
            "state": t.state.name,
            "params": dict(t.params),
            "distributions": {k: distribution_to_json(d) for k, d in t.distributions.items()},
            "value": t.values[0] if t.values else None,
            "intermediate_values": {str(k): v for k, v in sorted(t.intermediate_values.items())},
            "user_attrs": dict(t.user_attrs),
        })  # fmt: skip
    return json.loads(json.dumps(out, default=str))  # exactly what a reader of trials.jsonl gets


def study_from_trials(trials: list[dict[str, Any]], direction: str | None):
    """An in-memory Optuna study holding ``trials`` (each keeps its original number in the user
    attribute ``number``)."""
    import optuna
    from optuna.distributions import json_to_distribution
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction=direction or "maximize")
    frozen = []
    for t in trials:
        state = TrialState[t["state"]]
        frozen.append(
            create_trial(
                state=state,
                value=t["value"] if state == TrialState.COMPLETE else None,
                params=t["params"],
                distributions={k: json_to_distribution(d) for k, d in t["distributions"].items()},
                intermediate_values={int(k): v for k, v in t["intermediate_values"].items()},
                user_attrs={**t["user_attrs"], "number": t["number"]},
            )
        )
    study.add_trials(frozen)
    return study


# ------------------------------------------------------------------------------------------ writing
def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, default=str) + "\n" for r in rows)


def write_snapshot(
    source: Any, folder: Path, command: str, paper_csv: Path | None, known_rows: list[dict[str, Any]]
) -> None:
    """Copy what the report is rendered from into ``folder/data`` (see the module docstring)."""
    from cawbench.reporting.source import display_path, run_folder_name

    data = Path(folder) / "data"
    data.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "name": source.name,
        "origin": source.origin,
        "scale": source.scale,
        "storage": source.storage,
        "out_dir": str(source.out_dir) if source.snapshot is not None else display_path(source.out_dir),
        "trial_counts": source.trial_counts,
        "study_attrs": source.study_attrs,
        "facts": source.facts,
        "command": source.command or command,
    }
    atomic_write_text(data / "source.json", json.dumps(meta, indent=1, default=str) + "\n")
    atomic_write_text(data / "results.jsonl", _jsonl(source.raw_rows))
    atomic_write_text(data / "trials.jsonl", _jsonl(source.trials))
    atomic_write_text(data / "known_results.jsonl", _jsonl(known_rows))
    if paper_csv is not None and Path(paper_csv).is_file():
        _copy(Path(paper_csv), data / "paper_results.csv")
    paths = dict(zip(source.rows["run_dir"].astype(str), source.rows["run_path"])) if len(source.rows) else {}
    kept = set()
    for row in source.raw_rows:
        rel = run_folder_name(row)
        src = paths.get(str(row.get("run_dir")))
        if rel is None or src is None:
            continue
        kept.add(rel)
        for name in RUN_FILES:
            if (Path(src) / name).is_file():
                _copy(Path(src) / name, data / "runs" / rel / name)
    _prune_runs(data / "runs", kept)


def _copy(src: Path, dst: Path) -> None:
    if dst.exists() and src.resolve() == dst.resolve():
        return  # re-rendering in place
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def _prune_runs(root: Path, kept: set[str]) -> None:
    """Remove copied run folders that no reported row refers to any more (a study re-rendered later)."""
    if not root.is_dir():
        return
    for path in sorted(root.glob("*/*")) + sorted(root.glob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_dir() and (path / "result.json").is_file() and rel not in kept:
            shutil.rmtree(path)
    for path in root.iterdir():
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()


# ------------------------------------------------------------------------------------------ reading
def load_snapshot(folder: Path):
    """The :class:`~cawbench.reporting.source.ReportSource` of a report folder, from its data only."""
    from cawbench.reporting.source import ReportSource, normalise_rows

    data = Path(folder) / "data"
    try:
        meta = json.loads((data / "source.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{data / 'source.json'} cannot be read ({exc}); re-render from the study"
        ) from None
    if meta.get("format") != FORMAT:
        raise ConfigError(
            f"{data / 'source.json'} has format {meta.get('format')!r}; this cawbench reads format {FORMAT}"
        )
    raw = read_results(data / "results.jsonl")
    if not raw:
        raise ConfigError(f"{data / 'results.jsonl'} holds no result rows")
    trials = read_results(data / "trials.jsonl")
    facts = dict(meta.get("facts") or {})
    rows = normalise_rows(pd.DataFrame(raw), data, run_root=data / "runs")
    study = study_from_trials(trials, facts.get("direction")) if meta.get("origin") == "study" else None
    return ReportSource(
        meta["name"], Path(meta.get("out_dir") or "."), rows, meta.get("scale"), study, meta.get("storage"),
        dict(meta.get("trial_counts") or {}), dict(meta.get("study_attrs") or {}), facts, raw, trials,
        origin=meta.get("origin", "study"), snapshot=Path(folder), command=meta.get("command"),
        paper_csv=data / "paper_results.csv" if (data / "paper_results.csv").is_file() else None,
        known_rows=read_results(data / "known_results.jsonl"),
    )  # fmt: skip
