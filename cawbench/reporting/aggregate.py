"""Aggregation of the flat results table: ``mean ± std (n)`` cells and paired-seed deltas.

Conventions (the same everywhere in a report):

- std is the sample standard deviation (ddof=1, pandas' default) and n is always stated; a cell over one
  run shows its value and ``(1)`` with no ``±``, because one run has no spread;
- differences between configurations are paired per seed, with a 95 % t-interval
  (:mod:`cawbench.reporting.stats`);
- a missing value renders as an en dash ``–``, never as zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd

MISSING = "–"  # en dash: no data, never a zero
PLUS_MINUS = "±"


def _finite(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def format_number(value: Any, digits: int = 2, signed: bool = False) -> str:
    if not _finite(value):
        return MISSING
    return f"{float(value):+.{digits}f}" if signed else f"{float(value):.{digits}f}"


def format_cell(mean: Any, std: Any, n: Any, digits: int = 2, signed: bool = False) -> str:
    """``93.12 ± 0.15 (3)``; one run: ``93.12 (1)``; no runs: ``–``."""
    if not _finite(n) or int(n) < 1 or not _finite(mean):
        return MISSING
    n = int(n)
    text = format_number(mean, digits, signed)
    if n > 1 and _finite(std):
        text += f" {PLUS_MINUS} {float(std):.{digits}f}"
    return f"{text} ({n})"


def aggregate(frame: pd.DataFrame, by: Sequence[str], value: str) -> pd.DataFrame:
    """One row per group of ``by``: mean, std (ddof=1), n of the finite values of ``value``.

    Groups whose values are all missing (or a ``value`` column that does not exist) keep a row with n = 0,
    so a table can show "–" for them."""
    by = list(by)
    if frame.empty:
        return pd.DataFrame(columns=[*by, "mean", "std", "n"])
    # A column the rows do not have (an older results table) aggregates to n = 0: "–", never an error.
    values = (
        pd.to_numeric(frame[value], errors="coerce") if value in frame else pd.Series(math.nan, frame.index)
    )
    work = frame[by].copy()
    work["_v"] = values
    grouped = work.groupby(by, dropna=False, sort=False)["_v"]
    out = grouped.agg(mean="mean", std=lambda s: s.std(ddof=1), n="count").reset_index()
    out["n"] = out["n"].astype(int)
    return out


def cells(agg: pd.DataFrame, digits: int = 2, signed: bool = False) -> pd.Series:
    """The formatted ``mean ± std (n)`` string of every row of an :func:`aggregate` frame."""
    return pd.Series(
        [format_cell(m, s, n, digits, signed) for m, s, n in zip(agg["mean"], agg["std"], agg["n"])],
        index=agg.index,
        dtype=object,
    )


def pivot_cells(
    table: pd.DataFrame, index: str, columns: str, cell: str, index_order: Sequence[Any] | None = None
) -> pd.DataFrame:
    """Pivot formatted cells to a grid; absent combinations become "–"."""
    grid = table.pivot(index=index, columns=columns, values=cell)
    if index_order is not None:
        grid = grid.reindex([i for i in index_order if i in grid.index])
    return grid.fillna(MISSING).astype(object)


def markdown_table(frame: pd.DataFrame, index: bool = False) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency); missing values show "–"."""
    if index:
        frame = frame.reset_index()
    header = [str(c) for c in frame.columns]

    def text(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return MISSING
        if isinstance(value, float):
            return f"{value:.2f}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(text(v) for v in row) + " |")
    return "\n".join(lines)


def latex_table(frame: pd.DataFrame, caption: str, label: str) -> str:
    """A plain ``tabular`` in a ``table`` float (booktabs rules); ± and – become LaTeX."""

    def esc(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "--"
        s = f"{value:.2f}" if isinstance(value, float) else str(value)
        for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#")):
            s = s.replace(a, b)
        s = s.replace(PLUS_MINUS, r"$\pm$").replace(MISSING, "--").replace("Δ", r"$\Delta$")
        return s.replace("~", r"\textasciitilde{}")

    cols = "l" * len(frame.columns)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        rf"\caption{{{esc(caption)}}}",
        rf"\label{{{label}}}",
        rf"\begin{{tabular}}{{{cols}}}",
        r"\toprule",
        " & ".join(esc(c) for c in frame.columns) + r" \\",
        r"\midrule",
    ]
    for row in frame.itertuples(index=False):
        lines.append(" & ".join(esc(v) for v in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)
