"""What a report reads: a study (its spec, Optuna storage and result rows), a plain results folder, or a
report folder that holds the data it was rendered from.

``cawbench report TARGET`` accepts

- a study spec (a YAML path or the name of a shipped spec, e.g. ``quickstart``): the study
  ``<name>-<scale>`` in the Optuna storage (default ``<out_dir>/optuna.journal``);
- the name of a study in that storage (e.g. ``quickstart-cpu``): its spec is read back from the study;
- a results folder holding ``results.jsonl`` (runs made with ``cawbench train``): every row in it;
- a report folder (``data/source.json`` inside): re-rendered from its own copy of the data, without the
  study, its storage or its run folders (see :mod:`cawbench.reporting.snapshot`).

The runs are the rows of ``<out_dir>/results.jsonl`` that belong to the study and whose trial is complete
in Optuna (a row written just before a worker died, then retried, is counted once). Every row is joined
with its run folder: per-epoch metrics (learning curves, LCS weights, evaluation throughput) and
``artifacts.npz`` (assignment matrices).

What the report needs from the spec is reduced once to plain **facts** (:func:`spec_facts`: variant order,
reference, rung predecessors, searched dimensions, the paper scale's defaults and budget), so that a
report folder re-renders from its data even where the spec schema has moved on.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cawbench.config import ConfigError
from cawbench.reporting.methods_info import TAIL_ORDER, method_report_info
from cawbench.results import read_results

#: ladder rungs without an explicit ``extends:`` build on the variant before them in the spec
LADDER_NAME = re.compile(r"^ladder\d+")
#: the config keys of a run's budget (the summary line compares them with the paper scale's)
BUDGET_KEYS = ("train.epochs", "model.width", "model.depth", "data.subset", "data.val_size")


class NoFinishedTrials(ConfigError):
    """The study exists but has no finished run to report on."""


@dataclass
class ReportSource:
    """Everything a report is made from."""

    name: str  # the study name (or the results folder's name)
    out_dir: Path
    rows: pd.DataFrame  # one row per finished run, normalised (see :func:`normalise_rows`)
    scale: str | None = None
    study: Any = None  # optuna.Study rebuilt from :attr:`trials` (in memory), when the runs come from a study
    storage: str | None = None  # the storage as displayed (no password)
    trial_counts: dict[str, int] = field(default_factory=dict)
    study_attrs: dict[str, Any] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)  # see :func:`spec_facts`
    raw_rows: list[dict[str, Any]] = field(default_factory=list)  # the result rows as read
    trials: list[dict[str, Any]] = field(default_factory=list)  # finished trials, JSON-ready
    origin: str = "study"  # where the runs came from: study | results folder
    # Read back from a report folder's data/ (None: read from the study or results folder itself):
    snapshot: Path | None = None  # the report folder
    command: str | None = None  # the command that first rendered the data
    paper_csv: Path | None = None  # the paper table it was rendered with
    known_rows: list[dict[str, Any]] | None = None  # the known results it was rendered with

    @property
    def reference(self) -> str | None:
        return self.facts.get("reference")

    @property
    def objective(self) -> str:
        return self.facts.get("objective") or "final_val_acc"

    @property
    def direction(self) -> str:
        return self.facts.get("direction") or "maximize"

    def labels(self) -> list[str]:
        """Configuration labels in report order (see :func:`label_order`)."""
        return label_order(self.rows, self.facts)


# ------------------------------------------------------------------------------------------ locating
def load_source(
    target: str, out_dir: Path | str = "runs", storage: str | None = None, scale: str | None = None
) -> ReportSource:
    """Find what ``target`` names (report folder, results folder, spec, study) and read its finished runs."""
    out_dir = Path(out_dir)
    path = Path(target)
    if path.is_dir() and (path / "data" / "source.json").is_file():
        from cawbench.reporting.snapshot import load_snapshot

        return load_snapshot(path)
    if path.is_dir() and (path / "results.jsonl").is_file() and not path.suffix:
        return _from_results_folder(path)
    if path.is_dir() and (path / "README.md").is_file() and not (path / "optuna.journal").is_file():
        raise ConfigError(
            f"{path} holds a report without its data (data/source.json): it was rendered before report "
            "folders kept their data, so it can only be re-rendered from its study, with the command in its "
            "README.md"
        )
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

    from cawbench.reporting.snapshot import serialise_trials, study_from_trials

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
    all_trials = study.get_trials(deepcopy=False)
    counts: dict[str, int] = {}
    for t in all_trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    complete = {t.number for t in all_trials if t.state.name == "COMPLETE"}
    raw = [r for r in read_results(out_dir / "results.jsonl") if r.get("study") == name]
    raw = last_per_trial([r for r in raw if r.get("trial") in complete])
    if not raw:
        states = ", ".join(f"{k.lower()} {v}" for k, v in sorted(counts.items())) or "no trials at all"
        raise NoFinishedTrials(
            f"study {name!r} in {handle.display} has no finished trials to report ({states}); "
            f"run it first: `cawbench study run {getattr(spec, 'path', None) or name} --out-dir {out_dir}`"
        )
    facts = spec_facts(spec, scale)
    trials = serialise_trials(all_trials)
    rows = normalise_rows(pd.DataFrame(raw), out_dir)
    return ReportSource(
        name, out_dir, rows, scale, study_from_trials(trials, facts.get("direction")), handle.display,
        counts, attrs, facts, raw, trials,
    )  # fmt: skip


def last_per_trial(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per trial, the last written (a trial retried after a dead worker wrote two)."""
    last = {r.get("trial"): i for i, r in enumerate(raw)}
    return [r for i, r in enumerate(raw) if last[r.get("trial")] == i]


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
    rows = normalise_rows(pd.DataFrame(raw), folder)
    return ReportSource(folder.resolve().name, folder, rows, raw_rows=raw, origin="results folder")


# ------------------------------------------------------------------------------------------ spec facts
def spec_facts(spec: Any, scale: str | None) -> dict[str, Any]:
    """What the report needs from a study spec, as plain JSON-ready values (empty without a spec)."""
    if spec is None:
        return {}
    variants = list(getattr(spec, "variants", {}) or {})
    facts: dict[str, Any] = {
        "spec_name": spec.name,
        "spec_path": display_path(spec.path) if spec.path else None,
        "description": (spec.description or "").strip(),
        "reference": spec.reference,
        "objective": spec.objective_metric,
        "direction": spec.direction,
        "sampler": dict(spec.sampler),
        "pruner": dict(spec.pruner),
        "seeds": list(spec.seeds_for(scale)) if scale else list(spec.seeds),
        "scales": list(spec.scales),
        "variants": variants,
        "predecessors": predecessors(spec),
        "dimensions": [{"key": d.key, "type": d.type, "log": bool(d.log)} for d in spec.search_space],
    }
    paper_scale = "paper" if "paper" in spec.scales else None
    facts["paper_scale"] = paper_scale
    facts["budgets"] = {s: _budgets(spec, s) for s in dict.fromkeys([scale, paper_scale]) if s is not None}
    facts["paper_defaults"] = _defaults(spec, paper_scale or scale)
    return facts


def predecessors(spec: Any) -> dict[str, str]:
    """Variant -> the rung it builds on: the variant named by its ``extends:`` (a parsed ``extends``
    mapping on the spec, or the key in the raw spec), else, for a ladder rung (``ladderNN_...``), the
    variant just before it in the spec's order. Other variants have none (they are compared with the
    reference only)."""
    names = list(getattr(spec, "variants", {}) or {})
    parsed = getattr(spec, "extends", None)
    raw = (getattr(spec, "raw", None) or {}).get("variants") or {}
    out: dict[str, str] = {}
    for i, name in enumerate(names):
        parent = parsed.get(name) if isinstance(parsed, dict) else None
        if parent is None and isinstance(raw.get(name), dict):
            parent = raw[name].get("extends")
        if parent is None and LADDER_NAME.match(name) and i > 0:
            parent = names[i - 1]
        if parent is not None and str(parent) != name:
            out[name] = str(parent)
    return out


def _resolved(spec: Any, scale: str, variant: str | None):
    try:
        return spec.resolve(scale, variant, {}, spec.seeds_for(scale)[0])
    except Exception:  # a method that is not registered here, or a search-only required key
        return None


def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part, None)
    return node


def _budgets(spec: Any, scale: str) -> dict[str, dict[str, Any]]:
    """Per variant (or the study's method), the budget keys of its resolved config at ``scale``."""
    out = {}
    for variant in list(spec.variants) or [None]:
        cfg = _resolved(spec, scale, variant)
        if cfg is not None:
            label = variant if variant is not None else cfg.method
            out[label] = {"method": cfg.method, **{k: _plain(_get(cfg, k)) for k in BUDGET_KEYS}}
    return out


def _defaults(spec: Any, scale: str | None) -> dict[str, Any]:
    """Each searched key's value in the config without the search (the paper's default at the paper scale)."""
    if scale is None or not spec.search_space:
        return {}
    variant = spec.reference or (list(spec.variants)[0] if spec.variants else None)
    cfg = _resolved(spec, scale, variant)
    if cfg is None:
        return {}
    return {d.key: _plain(_get(cfg, d.key)) for d in spec.search_space}


def _plain(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


def display_path(path: str | Path) -> str:
    """A path as the report shows it: as given when relative, relative to the working folder when inside
    it, else absolute."""
    p = Path(path)
    if not p.is_absolute():
        return p.as_posix()
    try:
        return p.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return p.as_posix()


# ------------------------------------------------------------------------------------------ rows
def normalise_rows(frame: pd.DataFrame, out_dir: Path, run_root: Path | None = None) -> pd.DataFrame:
    """Add the columns a report groups by:

    - ``label``: the study's variant name, else a non-default ``variant``, else the method;
    - ``config``: the configuration (a study's ``config_id``, else a hash of the run's config without the
      seed), so that the seeds of one configuration group together;
    - ``param:<key>``: every searched parameter; ``depth_label``; ``run_path`` (the run folder here: under
      ``run_root`` when given, a report folder's copy, else as recorded or under ``<out_dir>/runs/``);
    - ``eval_images_per_s`` and ``epochs_recorded`` from the run's metrics."""
    df = frame.copy().reset_index(drop=True)
    for col in (
        "variant",
        "study_variant",
        "config_id",
        "search_params",
        "depth",
        "width",
        "seed",
        "trial",
        "arch",
        "run_dir",
    ):
        if col not in df.columns:
            df[col] = None
    df["label"] = [_label(r) for r in df.to_dict("records")]
    df["run_path"] = [_run_path(r.get("run_dir"), out_dir, run_root) for r in df.to_dict("records")]
    params = [r if isinstance(r, dict) else {} for r in df["search_params"]]
    for key in sorted({k for p in params for k in p}):
        df[f"param:{key}"] = [p.get(key) for p in params]
    df["config"] = [_config_key(r) for r in df.to_dict("records")]
    df["network"] = [network_key(r) for r in df.to_dict("records")]
    # The same configuration and seed finished twice (a re-run): the later row counts, once.
    df = df.drop_duplicates(subset=["config", "seed"], keep="last").reset_index(drop=True)
    df["depth_label"] = [("default" if _missing(d) else str(int(d))) for d in df["depth"]]
    extra = [_metrics_summary(p) for p in df["run_path"]]
    df["eval_images_per_s"] = [e.get("eval_images_per_s") for e in extra]
    df["epochs_recorded"] = [e.get("epochs") for e in extra]
    df["epoch_time_s"] = [e.get("epoch_time_s") for e in extra]
    df["test_epochs"] = [e.get("test_epochs") for e in extra]
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


def _run_path(run_dir: Any, out_dir: Path, run_root: Path | None = None) -> Path | None:
    """The run folder on this machine: under ``run_root`` (a report folder's copy) by its name, else as
    recorded, else under ``<out_dir>/runs/`` by its name."""
    if _missing(run_dir):
        return None
    recorded = Path(str(run_dir))
    parts = recorded.parts
    roots = [run_root] if run_root is not None else [None, Path(out_dir) / "runs"]
    for root in roots:
        if root is None:
            if recorded.is_dir():
                return recorded
            continue
        for depth in (2, 1):  # study runs are "<study>/<run>", plain runs "<run>"
            candidate = Path(root) / Path(*parts[-depth:])
            if len(parts) >= depth and candidate.is_dir():
                return candidate
    return None


def run_folder_name(row: dict[str, Any]) -> str | None:
    """A run's folder relative to its results folder's ``runs/``: ``<study>/<run>`` or ``<run>``."""
    if _missing(row.get("run_dir")):
        return None
    name = Path(str(row["run_dir"])).name
    study = row.get("study")
    return f"{study}/{name}" if isinstance(study, str) and study else name


def _config_key(row: dict[str, Any]) -> str:
    if not _missing(row.get("config_id")):
        return str(row["config_id"])
    cfg = _run_config(row.get("run_path"))
    if cfg is not None:
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


def _run_config(path: Any) -> dict[str, Any] | None:
    if path is None or not (Path(path) / "config.yaml").is_file():
        return None
    import yaml

    return yaml.safe_load((Path(path) / "config.yaml").read_text()) or {}


def network_key(row: dict[str, Any]) -> str:
    """What makes two runs train the same network on the same input: the model section of the run's
    config (architecture, width, depth, planes, hidden sizes), the dataset and the image size. A method
    and its backprop twin share it; the cost table divides by the twin found this way."""
    cfg = _run_config(row.get("run_path"))
    if cfg is not None:
        data = cfg.get("data") or {}
        key = {"model": cfg.get("model"), "dataset": data.get("name"), "image_size": data.get("image_size")}
    else:  # no run folder: the identifying columns of the row
        key = {k: row.get(k) for k in ("arch", "width", "depth", "dataset")}
    return json.dumps(key, sort_keys=True, default=str)


def read_metrics(run_path: Path | None) -> list[dict[str, Any]]:
    if run_path is None:
        return []
    path = Path(run_path) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _metrics_summary(run_path: Path | None) -> dict[str, Any]:
    """Median evaluation throughput over epochs (images evaluated, val plus test when it was, per second)
    and median seconds per epoch (training and evaluation)."""
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
    times = [r["epoch_time_s"] for r in records if isinstance(r.get("epoch_time_s"), (int, float))]
    return {
        "eval_images_per_s": float(np.median(rates)) if rates else None,
        "epochs": len(records),
        "epoch_time_s": float(np.median(times)) if times else None,
        "test_epochs": sum(1 for r in records if r.get("test_acc")),
    }


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
def label_order(rows: pd.DataFrame, facts: dict[str, Any] | None = None) -> list[str]:
    """The reference first, then the spec's variants in its order (or methods in their report order),
    configurations of tail methods (the ladder's far end, the backprop reference) last, as ablation
    tables are read."""
    facts = facts or {}
    labels = list(dict.fromkeys(rows["label"])) if "label" in rows.columns else []
    method_of = rows.groupby("label")["method"].first().to_dict() if labels else {}
    declared = list(facts.get("variants") or [])
    reference = facts.get("reference")

    def rank(label: str) -> tuple[int, int, int, str]:
        order = method_report_info(str(method_of.get(label, ""))).order
        tail = order if order >= TAIL_ORDER else 0
        if reference == label:
            return (-1, 0, 0, label)
        if label in declared:
            return (tail, declared.index(label), 0, label)
        return (tail, len(declared), order, label)

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
