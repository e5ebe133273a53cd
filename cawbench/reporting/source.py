"""What a report reads: a study (its spec, Optuna storage and result rows) or a plain results folder.

``cawbench report TARGET`` accepts

- a study spec (a YAML path or the name of a shipped spec, e.g. ``quickstart``): the study
  ``<name>-<scale>`` in the Optuna storage (default ``<out_dir>/optuna.journal``);
- the name of a study in that storage (e.g. ``quickstart-cpu``): its spec is read back from the study;
- a results folder holding ``results.jsonl`` (runs made with ``cawbench train``): every row in it.

The runs are the rows of ``<out_dir>/results.jsonl`` that belong to the study and whose trial is complete
in Optuna (a row written just before a worker died, then retried, is counted once). Every row is joined
with its run folder: per-epoch metrics (learning curves, LCS weights, evaluation throughput) and
``artifacts.npz`` (assignment matrices).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cawbench.config import ConfigError
from cawbench.method import method_report_info
from cawbench.results import read_results


class NoFinishedTrials(ConfigError):
    """The study exists but has no finished run to report on."""


@dataclass
class ReportSource:
    """Everything a report is made from."""

    name: str  # the study name (or the results folder's name)
    out_dir: Path
    rows: pd.DataFrame  # one row per finished run, normalised (see :func:`normalise_rows`)
    spec: Any = None  # cawbench.studies.spec.StudySpec, when the runs come from a study
    scale: str | None = None
    study: Any = None  # optuna.Study
    storage: str | None = None  # the storage as displayed (no password)
    trial_counts: dict[str, int] = field(default_factory=dict)
    study_attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def reference(self) -> str | None:
        return getattr(self.spec, "reference", None)

    @property
    def objective(self) -> str:
        return getattr(self.spec, "objective_metric", None) or "final_val_acc"

    @property
    def direction(self) -> str:
        return getattr(self.spec, "direction", None) or "maximize"

    def labels(self) -> list[str]:
        """Configuration labels in report order (see :func:`label_order`)."""
        return label_order(self.rows, self.spec)


# ------------------------------------------------------------------------------------------ locating
def load_source(
    target: str, out_dir: Path | str = "runs", storage: str | None = None, scale: str | None = None
) -> ReportSource:
    """Find what ``target`` names (spec, study, results folder) and read its finished runs."""
    out_dir = Path(out_dir)
    path = Path(target)
    if path.is_dir() and (path / "results.jsonl").is_file() and not path.suffix:
        return _from_results_folder(path)
    spec = _try_spec(target)
    if spec is not None:
        scale = spec.check_scale(scale)
        return _from_study(spec.study_name(scale), out_dir, storage, spec, scale)
    return _from_study(target, out_dir, storage, None, scale)


def _try_spec(target: str):
    try:
        from cawbench.studies.spec import find_spec_file, load_spec
    except ModuleNotFoundError:  # the studies package is not installed in this checkout
        return None
    looks_like_file = target.endswith((".yaml", ".yml")) or Path(target).is_file()
    try:
        find_spec_file(target)
    except ConfigError:
        if looks_like_file:
            raise
        return None
    return load_spec(target, check=False)


def _open_storage(storage: str | None, out_dir: Path):
    try:
        from cawbench.studies.storage import open_storage
    except ModuleNotFoundError:
        raise ConfigError(
            "reading a study needs the cawbench.studies package; give a results folder instead"
        ) from None
    return open_storage(storage, out_dir)


def _from_study(name: str, out_dir: Path, storage: str | None, spec: Any, scale: str | None) -> ReportSource:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    journal = out_dir / "optuna.journal"
    if storage is None and not journal.is_file():
        what = f"study spec or study {name!r}" if spec is None else f"study {name!r}"
        raise ConfigError(
            f"no Optuna storage at {journal} for {what}; run `cawbench study run "
            f"{getattr(spec, 'path', None) or 'SPEC'} --out-dir {out_dir}` "
            "first, or pass --out-dir/--storage where the study lives, or a results folder"
        )
    handle = _open_storage(storage, out_dir)
    try:
        study = optuna.load_study(study_name=name, storage=handle.storage)
    except KeyError:
        names = sorted(s.study_name for s in optuna.get_all_study_summaries(handle.storage))
        hint = f"studies there: {', '.join(names)}" if names else "it holds no study"
        kind = "study" if spec is not None else "study spec, study name or results folder"
        raise ConfigError(f"{name!r} is not a {kind} in {handle.display} ({hint})") from None
    attrs = dict(study.user_attrs)
    if spec is None:
        spec = _spec_from_study(attrs, name)
        scale = attrs.get("scale", scale)
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    complete = {t.number for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"}
    raw = [r for r in read_results(out_dir / "results.jsonl") if r.get("study") == name]
    raw = [r for r in raw if r.get("trial") in complete]
    if not raw:
        states = ", ".join(f"{k.lower()} {v}" for k, v in sorted(counts.items())) or "no trials at all"
        raise NoFinishedTrials(
            f"study {name!r} in {handle.display} has no finished trials to report ({states}); "
            f"run it first: `cawbench study run {getattr(spec, 'path', None) or name} --out-dir {out_dir}`"
        )
    frame = pd.DataFrame(raw).drop_duplicates(subset=["trial"], keep="last")
    rows = normalise_rows(frame, out_dir, spec)
    return ReportSource(name, out_dir, rows, spec, scale, study, handle.display, counts, attrs)


def _spec_from_study(attrs: dict[str, Any], name: str):
    text = attrs.get("spec")
    if not text:
        return None
    from cawbench.studies.spec import parse_spec

    try:
        return parse_spec(json.loads(text), attrs.get("spec_path") or name)
    except (ConfigError, ValueError):
        return None  # a spec from another version of the schema: report without it


def _from_results_folder(folder: Path) -> ReportSource:
    raw = read_results(folder / "results.jsonl")
    if not raw:
        raise NoFinishedTrials(f"{folder / 'results.jsonl'} holds no finished runs")
    rows = normalise_rows(pd.DataFrame(raw), folder, None)
    return ReportSource(folder.resolve().name, folder, rows)


# ------------------------------------------------------------------------------------------ rows
def normalise_rows(frame: pd.DataFrame, out_dir: Path, spec: Any) -> pd.DataFrame:
    """Add the columns a report groups by:

    - ``label``: the study's variant name, else a non-default ``variant``, else the method;
    - ``config``: the configuration (a study's ``config_id``, else a hash of the run's config without the
      seed), so that the seeds of one configuration group together;
    - ``param:<key>``: every searched parameter; ``depth_label``; ``run_path`` (the run folder here);
    - ``eval_images_per_s`` and ``epochs_recorded`` from the run's metrics."""
    df = frame.copy().reset_index(drop=True)
    for col in ("variant", "study_variant", "config_id", "search_params", "depth", "width", "seed", "trial"):
        if col not in df.columns:
            df[col] = None
    df["label"] = [_label(r) for r in df.to_dict("records")]
    df["run_path"] = [_run_path(r.get("run_dir"), out_dir) for r in df.to_dict("records")]
    params = [r if isinstance(r, dict) else {} for r in df["search_params"]]
    for key in sorted({k for p in params for k in p}):
        df[f"param:{key}"] = [p.get(key) for p in params]
    df["config"] = [_config_key(r) for r in df.to_dict("records")]
    # The same configuration and seed finished twice (a re-run): the later row counts, once.
    df = df.drop_duplicates(subset=["config", "seed"], keep="last").reset_index(drop=True)
    df["depth_label"] = [("default" if _missing(d) else str(int(d))) for d in df["depth"]]
    extra = [_metrics_summary(p) for p in df["run_path"]]
    df["eval_images_per_s"] = [e.get("eval_images_per_s") for e in extra]
    df["epochs_recorded"] = [e.get("epochs") for e in extra]
    df["peak_cuda_mem_mib"] = [
        (v / 2**20 if isinstance(v, (int, float)) and not _missing(v) else None)
        for v in df.get("peak_cuda_mem_bytes", pd.Series([None] * len(df)))
    ]
    if "method" in df.columns:
        df["method"] = df["method"].astype(str)
    return df


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _label(row: dict[str, Any]) -> str:
    if not _missing(row.get("study_variant")):
        return str(row["study_variant"])
    variant = row.get("variant")
    if not _missing(variant) and variant not in ("base", ""):
        return str(variant)
    return str(row.get("method"))


def _run_path(run_dir: Any, out_dir: Path) -> Path | None:
    """The run folder on this machine: as recorded, else found under ``<out_dir>/runs/`` by its name."""
    if _missing(run_dir):
        return None
    recorded = Path(str(run_dir))
    if recorded.is_dir():
        return recorded
    parts = recorded.parts
    for depth in (2, 1):  # study runs are "<study>/<run>", plain runs "<run>"
        candidate = Path(out_dir) / "runs" / Path(*parts[-depth:])
        if len(parts) >= depth and candidate.is_dir():
            return candidate
    return None


def _config_key(row: dict[str, Any]) -> str:
    if not _missing(row.get("config_id")):
        return str(row["config_id"])
    path = row.get("run_path")
    if path is not None and (Path(path) / "config.yaml").is_file():
        import yaml

        cfg = yaml.safe_load((Path(path) / "config.yaml").read_text()) or {}
        cfg.pop("out_dir", None)
        cfg.pop("run_name", None)
        train = cfg.get("train") or {}
        for key in ("seed", "progress", "checkpoint"):
            train.pop(key, None)
        (cfg.get("data") or {}).pop("data_dir", None)
        blob = json.dumps(cfg, sort_keys=True, default=str)
    else:  # no run folder: the identifying columns of the row
        keys = ("method", "variant", "recipe", "dataset", "arch", "depth", "width", "readout", "epochs")
        blob = json.dumps({k: row.get(k) for k in keys}, sort_keys=True, default=str)
    return f"{row.get('label')}@{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


def read_metrics(run_path: Path | None) -> list[dict[str, Any]]:
    if run_path is None:
        return []
    path = Path(run_path) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _metrics_summary(run_path: Path | None) -> dict[str, Any]:
    """Median evaluation throughput over epochs: images evaluated (val, plus test when it was) per second."""
    records = read_metrics(run_path)
    if not records:
        return {}
    n_val, n_test = _split_sizes(run_path)
    rates = []
    for r in records:
        seconds = r.get("eval_time_s")
        if not seconds or n_val is None:
            continue
        images = n_val + ((n_test or 0) if r.get("test_acc") else 0)
        rates.append(images / seconds)
    return {"eval_images_per_s": float(np.median(rates)) if rates else None, "epochs": len(records)}


def _split_sizes(run_path: Path | None) -> tuple[int | None, int | None]:
    path = Path(run_path) / "result.json" if run_path is not None else None
    if path is None or not path.is_file():
        return None, None
    result = json.loads(path.read_text())
    return result.get("n_val"), result.get("n_test")


def read_artifacts(run_path: Path | None) -> dict[str, np.ndarray]:
    if run_path is None or not (Path(run_path) / "artifacts.npz").is_file():
        return {}
    with np.load(Path(run_path) / "artifacts.npz") as data:
        return {k: data[k] for k in data.files}


# ------------------------------------------------------------------------------------------ ordering
def label_order(rows: pd.DataFrame, spec: Any = None) -> list[str]:
    """The reference first, then the spec's variants (or methods in their declared report order), the
    configurations of methods that sort last (``Method.report_last``: DeeperForward, the ablation ladder's
    far end, then backprop) after them, as ablation tables are read."""
    labels = list(dict.fromkeys(rows["label"])) if "label" in rows.columns else []
    method_of = rows.groupby("label")["method"].first().to_dict() if labels else {}
    declared = list(getattr(spec, "variants", {}) or {})

    def rank(label: str) -> tuple[int, int, float, str]:
        info = method_report_info(str(method_of.get(label, "")))
        tail = (1, info.order) if info.last else (0, 0)
        if spec is not None and getattr(spec, "reference", None) == label:
            return (-1, 0, 0, label)
        if label in declared:
            return (*tail, declared.index(label), label)
        return (*tail, len(declared) + info.order, label)

    return sorted(labels, key=rank)


def best_configs(rows: pd.DataFrame, group: list[str], objective: str, direction: str) -> pd.DataFrame:
    """The runs of the best configuration per group, chosen by the mean *validation* objective over
    seeds (test accuracy never selects), among the configurations with the most finished seeds in the
    group; ties go to the first seen."""
    if rows.empty:
        return rows
    if not group:
        return best_configs(rows.assign(_all=0), ["_all"], objective, direction).drop(columns="_all")
    values = pd.to_numeric(rows[objective], errors="coerce")
    stats = (
        rows.assign(_v=values)
        .groupby([*group, "config"], dropna=False, sort=False)["_v"]
        .agg(["mean", "count"])
        .reset_index()
    )
    sign = 1 if direction == "maximize" else -1
    stats["_score"] = sign * stats["mean"].fillna(-math.inf * sign)
    # Configurations that ran on the group's full seed set come first: one lucky seed must not win.
    stats["_full"] = stats["count"] == stats.groupby(group, dropna=False)["count"].transform("max")
    stats = stats.sort_values(["_full", "_score"], ascending=False, kind="stable")
    chosen = stats.drop_duplicates(subset=group, keep="first")[[*group, "config"]]
    return rows.merge(chosen, on=[*group, "config"], how="inner")


def mask_url(url: str) -> str:
    """A storage URL without its password (for the report's command line and header)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))
    return url
