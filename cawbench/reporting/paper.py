"""The paper comparison: every row of ``paper_results.csv`` beside our mean ± std and the difference, and
beside every other known result of ours (full-data GPU runs listed in ``studies/known_results.csv``), one
column per budget, each labelled, so a reader sees the paper and all of ours in one place.

Matching a paper row to our runs: method and dataset by name (``CAW-Conv`` = ``caw_conv``,
``Fashion-MNIST`` = ``fashion-mnist``, ...); the paper's ``CHx3`` variant matches runs labelled CHx3 (or
at width 3), ``base`` every other run. When several of our configurations match, the one with the best
mean validation objective is shown (test accuracy never selects), preferring the study's reference variant
or a variant named like the method. Two accuracy columns, each named: the suite's headline
(final-epoch test accuracy, every choice made on validation) and best-epoch test accuracy (the maximum
over epochs, i.e. selected on test: the convention of the peers' scripts and, likely, of the CAW-Conv
numbers). Our std is ddof=1 over n seeds; the paper's std is as published (blank: none published).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pandas as pd

from cawbench.config import ConfigError
from cawbench.reporting.aggregate import MISSING, aggregate, format_cell, format_number
from cawbench.reporting.methods_info import method_report_info, registered_methods
from cawbench.reporting.source import best_configs

ACCURACY_COLUMNS = {
    "final_test_acc": "final-epoch test (choices on validation)",
    "max_test_acc": "best-epoch test (max over epochs)",
}


def default_paper_results() -> Path:
    """``studies/paper_results.csv`` of the project (beside the shipped study specs)."""
    return Path(__file__).resolve().parents[2] / "studies" / "paper_results.csv"


def default_known_results() -> Path:
    """``studies/known_results.csv`` of the project."""
    return default_paper_results().with_name("known_results.csv")


def _norm(text: Any) -> str:
    return re.sub(r"[^a-z0-9]", "", str(text).lower())


def paper_method(name: Any) -> str | None:
    """The registered method a paper-table name stands for (each method declares its paper names)."""
    wanted = _norm(name)
    for method in registered_methods():
        info = method_report_info(method)
        if wanted in {_norm(n) for n in (*info.paper_names, info.label, method)}:
            return method
    return None


def _fields(text: Any) -> dict[str, Any]:
    """``key=value; key=value`` with YAML scalars (``1.0``, ``false``, ``paper``) -> a dict."""
    import yaml

    out: dict[str, Any] = {}
    for item in str(text or "").split(";"):
        if item.strip():
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"{item.strip()!r} is not key=value")
            out[key.strip()] = yaml.safe_load(value.strip())
    return out


def load_known_results(path: Path | None = None) -> list[dict[str, Any]]:
    """The result rows listed in a known-results CSV (``studies/known_results.csv``: results the project's
    own commands made outside a study, e.g. full-data GPU runs), each with ``known_source`` and
    ``known_what`` added.

    Columns: ``path`` of a result row (``.json``) or rows (``.jsonl``; lines without ``method`` and
    ``final_test_acc`` are per-epoch records and are skipped), relative to the folder above the CSV's (the
    project root); ``where``: ``key=value; ...`` a row must match; ``defaults``: ``key=value; ...`` for fields
    the rows predate; ``what``: one line."""
    import json

    path = Path(path) if path is not None else default_known_results()
    if not path.is_file():
        raise ConfigError(f"known results list {path} not found; pass --known-results PATH (or none)")
    entries = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = {"path", "where", "defaults", "what"} - set(entries.columns)
    if missing:
        raise ConfigError(f"{path} lacks the column(s) {', '.join(sorted(missing))}")
    root = path.resolve().parents[1]
    rows: list[dict[str, Any]] = []
    for i, entry in entries.iterrows():
        file = root / entry["path"]
        if not file.is_file():
            raise ConfigError(f"{path}: row {i + 1}: {file} not found")
        try:
            where, defaults = _fields(entry["where"]), _fields(entry["defaults"])
        except ConfigError as exc:
            raise ConfigError(f"{path}: row {i + 1}: {exc}") from None
        text = file.read_text()
        found = [json.loads(text)] if file.suffix == ".json" else [
            json.loads(line) for line in text.splitlines() if line.strip()
        ]  # fmt: skip
        for row in found:
            if not isinstance(row, dict) or "method" not in row or "final_test_acc" not in row:
                continue
            if any(row.get(k) != v for k, v in where.items()):
                continue
            rows.append({**defaults, **row, "known_source": entry["path"], "known_what": entry["what"]})
    return rows


def short_device(device: Any) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``H100``; ``cpu (x86_64, 2 cores)`` -> ``CPU``."""
    text = str(device or "").strip()
    if not text or text.lower().startswith("cpu"):
        return "CPU" if text else "unknown device"
    words = [w for w in text.replace("NVIDIA", "").split() if w]
    out = []
    for word in words:
        out.append(word)
        if any(c.isdigit() for c in word):
            break
    return " ".join(out) or text


def known_budget(row: dict[str, Any]) -> tuple[str, str]:
    """(column label, budget note of the cell) of a known result row."""
    device = short_device(row.get("device"))
    epochs, planned = row.get("epochs"), row.get("epochs_planned")
    partial = bool(row.get("truncated")) or (
        isinstance(epochs, int) and isinstance(planned, int) and epochs < planned
    )
    if partial:
        note = f"{epochs}/{planned} ep" if planned else f"{epochs} ep"
        return f"ours: {device}, recipe stopped early (epochs run/planned)", note
    return f"ours: {device}, full recipe", ""


def known_frame(known: list[dict[str, Any]]) -> pd.DataFrame:
    """Known result rows with the columns :func:`matching_runs` reads."""
    if not known:
        return pd.DataFrame()
    budgets = [known_budget(r) for r in known]  # from the rows as read (a frame makes ints floats)
    frame = pd.DataFrame(known)
    for col in ("study_variant", "variant", "depth", "width"):
        if col not in frame.columns:
            frame[col] = None
    frame["label"] = frame["method"].astype(str)
    frame["depth_label"] = ["default" if d is None or d != d else str(int(d)) for d in frame["depth"]]
    frame["width"] = pd.to_numeric(frame["width"], errors="coerce").fillna(1.0)
    frame["budget_column"] = [b[0] for b in budgets]
    frame["budget_note"] = [b[1] for b in budgets]
    return frame


def load_paper_results(path: Path | None = None) -> pd.DataFrame:
    path = Path(path) if path is not None else default_paper_results()
    if not path.is_file():
        from cawbench.config import ConfigError

        raise ConfigError(f"paper results table {path} not found; pass --paper-results PATH")
    return pd.read_csv(path, dtype={"std_pct": float, "top1_accuracy_pct": float}, keep_default_na=True)


def _is_chx3(row: pd.Series) -> bool:
    width = row.get("width")
    named = "chx3" in _norm(row.get("label")) or "chx3" in _norm(row.get("variant"))
    return named or (isinstance(width, (int, float)) and math.isclose(float(width), 3.0))


def matching_runs(rows: pd.DataFrame, paper_row: pd.Series, reference: str | None) -> pd.DataFrame:
    """Our runs for one paper row: same method and dataset, CHx3 or not; then, each step only where it
    leaves some runs: the study variant named for that row, the reference/method-named variant, the
    paper's width (1, or 3 for CHx3) at the default depth."""
    method = _text(paper_row.get("method_key")) or paper_method(paper_row["method"])
    dataset = _norm(_text(paper_row.get("dataset_key")) or paper_row["dataset"])
    if method is None or rows.empty:
        return rows.iloc[0:0]
    sel = rows[(rows["method"] == method) & (rows["dataset"].map(_norm) == dataset)]
    if sel.empty:
        return sel
    want_chx3 = _norm(paper_row.get("variant")) == "chx3"
    sel = sel[sel.apply(_is_chx3, axis=1) == want_chx3]
    width = 3.0 if want_chx3 else 1.0
    narrowing = [
        lambda s: s["label"] == _text(paper_row.get("study_variant")),
        lambda s: s["label"].isin({reference, method, "base", "full"} - {None}),
        lambda s: (pd.to_numeric(s["width"]) == width) & s["depth_label"].isin(["default", "2"]),
    ]
    for keep in narrowing:  # each step narrows the choice where it can, never to nothing
        mask = keep(sel)
        if mask.any():
            sel = sel[mask]
    return sel


def unpublished_rows(rows: pd.DataFrame, paper: pd.DataFrame, known: pd.DataFrame) -> list[pd.Series]:
    """Rows for results of ours (this report's runs or known results) whose method and dataset no paper
    row covers, so that every result stands in the table: the paper cell is empty ("no published number")."""
    covered = {(paper_method(p["method"]), _norm(p["dataset"])) for _, p in paper.iterrows()}
    out: dict[tuple[str, str], pd.Series] = {}
    for frame in (rows, known):
        if frame is None or frame.empty:
            continue
        for r in frame.to_dict("records"):
            key = (str(r["method"]), _norm(r["dataset"]))
            if key in covered or key in out:
                continue
            out[key] = pd.Series({
                "method": method_report_info(key[0]).label, "architecture": _text(r.get("arch")) or MISSING,
                "dataset": r["dataset"], "variant": "base", "top1_accuracy_pct": math.nan, "std_pct": math.nan,
                "note": "no published number", "method_key": key[0], "dataset_key": r["dataset"],
            })  # fmt: skip
    return list(out.values())


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def paper_comparison(
    rows: pd.DataFrame,
    paper: pd.DataFrame,
    objective: str,
    direction: str,
    reference: str | None,
    known: pd.DataFrame | None = None,
    scale: str | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(display table of strings, numeric table). One row per paper row, in the CSV's order: the paper's
    number, this report's runs (both accuracy columns, with Δ), then one column per known-result budget."""
    known = known if known is not None else pd.DataFrame()
    columns = list(dict.fromkeys(known["budget_column"])) if len(known) else []
    ours = f"ours ({scale} scale)" if scale else "ours"
    display, numeric = [], []
    specs = [p for _, p in paper.iterrows()] + unpublished_rows(rows, paper, known)
    for p in specs:
        runs = matching_runs(rows, p, reference)
        if not runs.empty:
            runs = best_configs(runs, [], objective, direction)
        paper_acc, paper_std = p["top1_accuracy_pct"], p.get("std_pct")
        paper_cell = format_number(paper_acc) + (
            f" ± {paper_std:.2f}" if isinstance(paper_std, float) and not math.isnan(paper_std) else ""
        )
        d = {
            "method": p["method"], "architecture": p["architecture"], "dataset": p["dataset"],
            "variant": p["variant"], "paper top-1 %": paper_cell,
        }  # fmt: skip
        n_row: dict[str, Any] = {k: p[k] for k in ("method", "architecture", "dataset", "variant")}
        n_row.update(paper_acc=paper_acc, paper_std=paper_std)
        for col, name in ACCURACY_COLUMNS.items():
            agg = aggregate(runs.assign(_all=0), ["_all"], col) if not runs.empty and col in runs else None
            mean, std, n = agg.iloc[0][["mean", "std", "n"]] if agg is not None else (None, None, 0)
            diff = float(mean) - float(paper_acc) if n and not math.isnan(float(mean)) else None
            d[f"{ours}: {name}"] = format_cell(mean, std, n)
            d[f"Δ {name.split(' (')[0]} − paper"] = format_number(diff, signed=True)
            n_row.update({f"{col}_mean": mean, f"{col}_std": std, f"{col}_n": n, f"{col}_diff": diff})
        d["our runs"] = _setting(runs)
        matched = matching_runs(known, p, None) if len(known) else known
        for column in columns:
            sub = matched[matched["budget_column"] == column] if len(matched) else matched
            if sub.empty:
                d[column] = MISSING
                n_row.update({f"{column}: mean": None, f"{column}: n": 0})
                continue
            agg = aggregate(sub.assign(_all=0), ["_all"], "final_test_acc").iloc[0]
            notes = ", ".join(dict.fromkeys(n for n in sub["budget_note"] if n))
            d[column] = format_cell(agg["mean"], agg["std"], agg["n"]) + (f", {notes}" if notes else "")
            n_row.update({f"{column}: mean": agg["mean"], f"{column}: std": agg["std"], f"{column}: n": agg["n"],
                          f"{column}: budget": notes or "full recipe"})  # fmt: skip
        d["paper note"] = p.get("note") if isinstance(p.get("note"), str) else MISSING
        display.append(d)
        numeric.append(n_row)
    return pd.DataFrame(display), pd.DataFrame(numeric)


def _setting(runs: pd.DataFrame) -> str:
    """Arch, width, epochs and training images of the runs shown (they differ from the paper's at cpu scale)."""
    if runs.empty:
        return MISSING
    r = runs.iloc[0]
    width = f"w{float(r['width']):g}" if r.get("width") is not None else ""
    depth = f"depth {r['depth_label']}" if r.get("depth_label") not in (None, "default") else ""
    epochs, n_train = pd.to_numeric(r.get("epochs"), "coerce"), pd.to_numeric(r.get("n_train"), "coerce")
    parts = [str(r.get("arch")), depth, width, f"{int(epochs)} ep" if pd.notna(epochs) else "",
             f"{int(n_train)} train" if pd.notna(n_train) else ""]  # fmt: skip
    if r.get("label") not in (None, r.get("method")):
        parts.insert(0, str(r["label"]))
    return ", ".join(p for p in parts if p)
