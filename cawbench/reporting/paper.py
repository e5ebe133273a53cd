"""The paper comparison: every row of ``paper_results.csv`` beside our mean ± std and the difference.

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

from cawbench.method import list_methods, method_report_info
from cawbench.reporting.aggregate import MISSING, aggregate, format_cell, format_number
from cawbench.reporting.source import best_configs


def method_of_paper_name(text: Any) -> str | None:
    """The registered method a paper table's method name denotes: its name, its report label or an alias
    (``Method.label``/``aliases``: ``CAW-Conv`` = ``caw_conv``, ``BP`` = ``backprop``), ignoring case and
    punctuation."""
    wanted = _norm(text)
    for name in list_methods():
        if wanted in {_norm(n) for n in method_report_info(name).names()}:
            return name
    return None


ACCURACY_COLUMNS = {
    "final_test_acc": "final-epoch test (choices on validation)",
    "max_test_acc": "best-epoch test (max over epochs)",
}


def default_paper_results() -> Path:
    """``studies/paper_results.csv`` of the project (beside the shipped study specs)."""
    return Path(__file__).resolve().parents[2] / "studies" / "paper_results.csv"


def _norm(text: Any) -> str:
    return re.sub(r"[^a-z0-9]", "", str(text).lower())


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
    method = _text(paper_row.get("method_key")) or method_of_paper_name(paper_row["method"])
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


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def paper_comparison(
    rows: pd.DataFrame, paper: pd.DataFrame, objective: str, direction: str, reference: str | None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(display table of strings, numeric table). One row per paper row, in the CSV's order."""
    display, numeric = [], []
    for _, p in paper.iterrows():
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
            agg = aggregate(runs.assign(_all=0), ["_all"], col) if not runs.empty else None
            mean, std, n = agg.iloc[0][["mean", "std", "n"]] if agg is not None else (None, None, 0)
            diff = float(mean) - float(paper_acc) if n and not math.isnan(float(mean)) else None
            d[f"ours: {name}"] = format_cell(mean, std, n)
            d[f"Δ {name.split(' (')[0]} − paper"] = format_number(diff, signed=True)
            n_row.update({f"{col}_mean": mean, f"{col}_std": std, f"{col}_n": n, f"{col}_diff": diff})
        d["our runs"] = _setting(runs)
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
    parts = [str(r.get("arch")), depth, width, f"{int(r['epochs'])} ep", f"{int(r['n_train'])} train"]
    if r.get("label") not in (None, r.get("method")):
        parts.insert(0, str(r["label"]))
    return ", ".join(p for p in parts if p)
