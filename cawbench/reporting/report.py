"""Render a report folder from a study: README.md (Markdown tables, embedded figures), CSV tables (the
paper table also as LaTeX), PNG figures, and ``data/``, the data it was rendered from (see
:mod:`cawbench.reporting.snapshot`), so that ``cawbench report <folder>`` re-renders it anywhere.

Every section is built from the finished runs of :class:`~cawbench.reporting.source.ReportSource`; a
section without data is replaced by one line that says why. Tables show ``mean ± std (n)`` over seeds
(std with ddof=1); differences between configurations are paired per seed with a 95 % t-interval and
called "not resolved" where the interval contains 0 (:mod:`cawbench.reporting.stats`). When a label
(variant or method) has several configurations (a search space), the one with the best mean *validation*
objective represents it, and the report says so.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import re
import shlex
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cawbench.reporting import figures
from cawbench.reporting.aggregate import (
    MISSING,
    aggregate,
    cells,
    format_cell,
    format_number,
    latex_table,
    markdown_table,
)
from cawbench.reporting.methods_info import is_backprop, method_report_info
from cawbench.reporting.paper import (
    ACCURACY_COLUMNS,
    known_frame,
    load_known_results,
    load_paper_results,
    paper_comparison,
)
from cawbench.reporting.source import ReportSource, best_configs, read_artifacts, read_metrics
from cawbench.reporting.stats import NOT_RESOLVED, effect_cells, paired_effects, spreads

HEADLINE = "final_test_acc"
ACCURACY_NAMES = {
    "final_test_acc": "final-epoch test",
    "max_test_acc": "best-epoch test",
    "final_val_acc": "final-epoch val",
    "test_acc_at_best_val": "test at best val epoch",
    "best_val_acc": "best val",
}
FANOVA_SEED = 0
PED_ANOVA_ARGS = {"target_quantile": 0.1, "region_quantile": 1.0, "evaluate_on_local": False}
FANOVA_ARGS = {"n_trees": 64, "max_depth": 64, "seed": FANOVA_SEED}
#: loss terms as the per-layer figures name them (weighted: the value the unit's optimiser saw)
TERM_NAMES = {"ce": "CE", "entropy": "λ_H·H (entropy)", "ortho": "λ_O·O (orthogonality)"}
#: assignment diagnostics recorded per layer and epoch (``unit_stats``), in the order shown
DIAGNOSTICS = {
    "temperature": "temperature T",
    "assignment_entropy_norm": "assignment entropy (0 one-hot .. 1 uniform)",
    "assignment_entropy": "assignment entropy (nats)",
    "assignment_offdiag": "off-diagonal mass of the normalised Gram",
    "assignment_committed": "committed channels (max A > 0.5)",
}
ASSIGNMENTS_PER_FIGURE = 6


@dataclass
class Report:
    """What :func:`render_report` wrote: the folder, the Markdown text, every table (the aggregated,
    numeric frames that the Markdown cells were formatted from) and the summary lines."""

    folder: Path
    markdown: str
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)
    omitted: dict[str, str] = field(default_factory=dict)
    summary: list[str] = field(default_factory=list)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", str(text)).strip("_")[:80] or "x"


def _n_epochs(runs: pd.DataFrame) -> int:
    values = pd.to_numeric(runs.get("epochs_recorded", pd.Series(dtype=float)), errors="coerce").dropna()
    return int(values.max()) if len(values) else 0


class _Builder:
    def __init__(
        self,
        source: ReportSource,
        folder: Path,
        command: str,
        paper_path: Path | None,
        known: list[dict[str, Any]],
        known_error: str | None,
    ) -> None:
        self.src = source
        self.facts = source.facts
        self.folder = folder
        self.command = command
        self.paper_path = paper_path
        self.known = known
        self.known_error = known_error
        self.rows = source.rows
        self.labels = source.labels()
        self.colours = figures.palette(self.labels)
        self.report = Report(folder, "")
        self.parts: list[str] = []
        # The runs that represent each (label, dataset): the best configuration on validation.
        self.shown = best_configs(self.rows, ["label", "dataset"], source.objective, source.direction)
        self.multi_config = bool((self.rows.groupby(["label", "dataset"])["config"].nunique() > 1).any())

    # ------------------------------------------------------------------ output helpers
    def table(self, name: str, display: pd.DataFrame, numeric: pd.DataFrame | None = None) -> None:
        self.csv(name, display, numeric)
        self.parts.append(markdown_table(display))
        self.parts.append(f"\n_CSV: [tables/{_slug(name)}.csv](tables/{_slug(name)}.csv)_\n")

    def csv(self, name: str, frame: pd.DataFrame, numeric: pd.DataFrame | None = None) -> str:
        tables = self.folder / "tables"
        tables.mkdir(parents=True, exist_ok=True)
        frame.to_csv(tables / f"{_slug(name)}.csv", index=False)
        self.report.tables[name] = numeric if numeric is not None else frame
        if numeric is not None:
            numeric.to_csv(tables / f"{_slug(name)}_values.csv", index=False)
        return f"tables/{_slug(name)}.csv"

    def figure(self, name: str, path: Path, caption: str) -> None:
        self.report.figures[name] = path
        rel = path.relative_to(self.folder).as_posix()
        self.parts.append(f"![{caption}]({rel})\n")

    def heading(self, text: str) -> None:
        self.parts.append(f"\n## {text}\n")
        self._heading_at = len(self.parts) - 1

    def omit(self, key: str, title: str, reason: str) -> None:
        """Leave a section out (its heading too); the one-line reason goes to the list at the end."""
        if getattr(self, "_heading_at", None) == len(self.parts) - 1:
            self.parts.pop()
        self._heading_at = None
        self.report.omitted[key] = f"{title}: {reason}"

    def fig_path(self, name: str) -> Path:
        return self.folder / "figures" / f"{_slug(name)}.png"

    # ------------------------------------------------------------------ sections
    def build(self) -> Report:
        self.summarise()
        self.header()
        self.results()
        self.paper()
        self.ablation()
        self.top_configurations()
        self.search()
        self.history()
        self.depth_width()
        self.curves()
        self.per_layer()
        self.loss_terms()
        self.diagnostics()
        self.lcs()
        self.assignment()
        self.cost()
        self.runs()
        if self.report.omitted:
            self.heading("Not shown")
            self.parts.append("\n".join(f"- {line}." for line in self.report.omitted.values()) + "\n")
        self.report.markdown = "\n".join(self.parts).rstrip() + "\n"
        (self.folder / "README.md").write_text(self.report.markdown)
        return self.report

    def header(self) -> None:
        src, rows, facts = self.src, self.rows, self.facts
        self.parts.append(f"# Report: {src.name}\n")
        if facts.get("description"):
            self.parts.append(facts["description"] + "\n")
        self.parts.append(
            "**At a glance**\n\n" + "\n".join(f"- {line}" for line in self.report.summary) + "\n"
        )
        finished = pd.to_datetime(rows.get("finished_at", pd.Series(dtype=object)), errors="coerce", utc=True)
        finished = finished.dropna()
        if src.snapshot is not None:
            command = (
                f"- **Command:** first rendered by `{src.command or MISSING}`; re-rendered from this "
                f"folder's `data/` by `{self.command}`"
            )
        else:
            command = f"- **Command:** `{self.command}`"
        lines = [
            command,
            f"- **Date:** report rendered {_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}"
            + (
                f"; runs finished {finished.min():%Y-%m-%d %H:%M} to {finished.max():%Y-%m-%d %H:%M} UTC"
                if len(finished)
                else ""
            ),
            *self._provenance_lines(),
            f"- **Hardware (this report):** {platform.platform()}, {os.cpu_count()} CPU cores",
            f"- **Versions (runs):** {_run_versions(rows) or MISSING}",
            f"- **Versions (report):** {_report_versions()}",
        ]
        if src.storage is not None:
            lines.append(f"- **Study storage (Optuna):** `{src.storage}`, study `{src.name}`")
            lines.extend(self._mlflow_line())
        else:
            lines.append(f"- **Results folder:** `{src.out_dir}` (runs made without a study)")
        lines.append(
            "- **Data:** [`data/`](data/) holds what this report was rendered from (result rows, finished "
            "trials, each run's config, per-epoch metrics and artifacts; no checkpoints): "
            f"`cawbench report {self.folder.as_posix()}` re-renders it without re-running anything."
        )
        if facts.get("spec_name"):
            lines.append(
                f"- **Study:** spec `{facts.get('spec_path') or facts['spec_name']}`, scale `{src.scale}`, seeds "
                f"{facts.get('seeds')}, objective `{facts.get('objective')}` ({facts.get('direction')}), "
                f"sampler `{facts.get('sampler')}`, pruner `{facts.get('pruner')}`"
            )
        if src.trial_counts:
            counts = ", ".join(f"{k.lower()} {v}" for k, v in sorted(src.trial_counts.items()))
            lines.append(f"- **Trials:** {counts}; {len(rows)} finished runs reported")
        else:
            lines.append(f"- **Runs:** {len(rows)} finished runs")
        lines.append(
            "- **Conventions:** accuracies in %; cells are `mean ± std (n)` over n seeds, std with ddof=1 "
            "(no ± for n = 1); `–` marks a missing value (never zero). Differences between configurations "
            "are paired per seed: `mean [95 % t-interval] (n pairs)`, and *not resolved* where the "
            "interval contains 0 (or n < 2): seed noise could make it. "
            "*Final-epoch test* is the suite's headline: the last epoch's test accuracy with every choice "
            "(readout range/weights) made on the validation split. *Best-epoch test* is the maximum over "
            "epochs, i.e. selected on test (the peers' convention), shown only for comparison."
        )
        if self.multi_config:
            lines.append(
                "- **Configurations:** several configurations share a label here; tables show, per label "
                "and dataset, the configuration with the best mean validation objective "
                f"(`{src.objective}`), never chosen on test."
            )
        self.parts.append("\n".join(lines) + "\n")

    def _provenance_lines(self) -> list[str]:
        rows = self.rows
        commits = []
        for r in rows.to_dict("records"):
            sha = r.get("git_commit")
            if not isinstance(sha, str):
                versions = r.get("versions") if isinstance(r.get("versions"), dict) else {}
                sha = versions.get("git")
            dirty = r.get("git_dirty")
            commits.append(
                (sha[:10] if isinstance(sha, str) else "unknown", {True: "dirty", False: "clean"}.get(dirty))
            )
        counted: dict[str, dict[str, int]] = {}
        for sha, state in commits:
            counted.setdefault(sha, {})
            key = state or "dirty flag not recorded"
            counted[sha][key] = counted[sha].get(key, 0) + 1
        parts = [
            f"`{sha}` ({', '.join(f'{n} run{_s(n)} {k}' for k, n in states.items())})"
            for sha, states in counted.items()
        ]
        if len(counted) > 1:
            code = (
                f"- **Code (runs): ⚠ the runs span {len(counted)} commits**: {'; '.join(parts)}. Numbers "
                "from different commits may differ for reasons other than the configuration."
            )
        else:
            code = f"- **Code (runs):** git {parts[0]}" if parts else f"- **Code (runs):** {MISSING}"
        if any(state == "dirty" for _, state in commits):
            code += "; dirty: the checkout had uncommitted changes to tracked files"
        machines = sorted({str(m) for m in rows.get("machine", pd.Series(dtype=object)).dropna()})
        devices = sorted({str(d) for d in rows.get("device", pd.Series(dtype=object)).dropna()})
        precision = sorted({str(p) for p in rows.get("precision", pd.Series(dtype=object)).dropna()})
        return [
            code,
            f"- **Hardware (runs):** {'; '.join(devices) or MISSING}; precision {', '.join(precision) or MISSING}"
            + (f"; machine{'s' if len(machines) > 1 else ''} {'; '.join(machines)}" if machines else ""),
        ]

    def _mlflow_line(self) -> list[str]:
        attrs = self.src.study_attrs
        tracking, parent = attrs.get("mlflow_tracking_uri"), attrs.get("mlflow_parent_run_id")
        if not tracking:
            return []
        out_dir = Path(str(self.src.out_dir))
        uri = str(tracking)
        if uri.startswith("sqlite:///"):
            db = Path(uri[len("sqlite:///") :])
            uri = f"sqlite:///{(out_dir / db.name).as_posix()}" if db.parent.name == out_dir.name else uri
        return [
            f"- **MLflow:** `{uri}` (the study's results folder `{out_dir.as_posix()}`, not shipped with the "
            f"report; browse with `mlflow ui --backend-store-uri {uri}`), parent run `{parent}`, one nested "
            "run per trial (`mlflow_run_id` in `tables/runs.csv`)"
        ]

    # ------------------------------------------------------------------ summary (also printed by the CLI)
    def summarise(self) -> None:
        self.report.summary = [self._ranking(), self._budget_line(), self._paper_scale_line()]

    def _ranking(self) -> str:
        shown = self.shown
        lines = []
        for dataset, runs in shown.groupby("dataset", sort=False):
            agg = aggregate(runs, ["label"], HEADLINE).sort_values("mean", ascending=False, kind="stable")
            agg = agg[agg["n"] > 0]
            text = []
            for i, row in enumerate(agg.itertuples()):
                if i:
                    prev = agg.iloc[i - 1]["label"]
                    pair = runs[runs["label"].isin([prev, row.label])]
                    effect = paired_effects(pair, [], "label", {prev: row.label}, HEADLINE)
                    text.append(">" if len(effect) and bool(effect["resolved"].iloc[0]) else "≈")
                text.append(f"{row.label} {format_cell(row.mean, None, row.n)}")
            prefix = f"{dataset}: " if shown["dataset"].nunique() > 1 else ""
            lines.append(prefix + " ".join(text))
        return (
            "**Ranking at this scale** (final-epoch test %, mean (n seeds); `>` resolved by a paired 95 % "
            "interval, `≈` not resolved): " + "; ".join(lines)
        )

    def _budget_line(self) -> str:
        budgets = self.facts.get("budgets") or {}
        paper = budgets.get(self.facts.get("paper_scale") or "", {})
        scale = self.src.scale
        if not paper:
            return f"**Scale** `{scale or 'unknown'}`: the study spec names no paper scale to compare with."
        if scale == self.facts.get("paper_scale"):
            return f"**Scale** `{scale}`: the paper's budget (each method's published recipe)."
        label = self.src.reference if self.src.reference in paper else next(iter(paper))
        runs = self.rows[self.rows["label"] == label]
        ours = (budgets.get(scale or "") or {}).get(label, {})
        p = paper[label]
        epochs = _mode(runs.get("epochs")) or ours.get("train.epochs")
        n_train = _mode(runs.get("n_train"))
        parts = [f"{epochs} of {p.get('train.epochs')} epochs"]
        width = _mode(runs.get("width"))
        if width is not None and width != p.get("model.width"):
            parts.append(f"width {_fmt(width)} of {_fmt(p.get('model.width'))}")
        if p.get("data.subset") is None:
            parts.append(
                f"{int(n_train):,} training images (paper: the full training split)" if n_train else ""
            )
        else:
            parts.append(f"{int(n_train or 0):,} of {int(p['data.subset']):,} training images")
        seeds = len(self.facts.get("seeds") or [])
        return (
            f"**Scale** `{scale}` against the paper's budget (`{label}`): {', '.join(x for x in parts if x)}; "
            f"{seeds} seed{'s' if seeds != 1 else ''}. At this budget the numbers measure the budget, not a "
            "reproduction (per-configuration budgets: section *Scale*)."
        )

    def _paper_scale_line(self) -> str:
        name, paper = self.facts.get("spec_name"), self.facts.get("paper_scale")
        if not name or not paper:
            return "**Paper scale:** no paper scale is defined for these runs."
        if self.src.scale == paper:
            return "**Paper scale:** this report is the paper scale."
        run = shlex.join(["cawbench", "study", "run", name, "--scale", paper, "--device", "cuda",
                          "--out-dir", "runs/paper"])  # fmt: skip
        report = shlex.join(["cawbench", "report", name, "--scale", paper, "--out-dir", "runs/paper"])
        return f"**Paper scale** (a GPU; hours per configuration): `{run}`, then `{report}`."

    # ------------------------------------------------------------------ tables
    def results(self) -> None:
        self.heading("Results")
        shown = self.shown
        rows = []
        numeric = []
        names = dict(ACCURACY_NAMES)
        if _tested_once(shown):
            # A test set evaluated only after the last epoch (train.eval_test_every_epoch: false) has no
            # best epoch: those columns would repeat the final one or show one seed's value.
            for col in ("max_test_acc", "test_acc_at_best_val"):
                names.pop(col)
            self.parts.append(
                "Every run evaluated the test set once, after its last epoch (`train.eval_test_every_epoch: "
                "false`), so there is no best-epoch test accuracy: the table gives the final epoch's.\n"
            )
        for (label, dataset), runs in shown.groupby(["label", "dataset"], sort=False):
            first = runs.iloc[0]
            d = {"configuration": label, "method": first["method"], "dataset": dataset,
                 "arch": first.get("arch")}  # fmt: skip
            n_row = dict(d, config=first["config"])
            for col, name in names.items():
                if col not in runs.columns:
                    continue
                agg = aggregate(runs, ["label"], col).iloc[0]
                d[name] = format_cell(agg["mean"], agg["std"], agg["n"])
                n_row.update({f"{col}_mean": agg["mean"], f"{col}_std": agg["std"], f"{col}_n": agg["n"]})
            if self.multi_config:
                d["parameters"] = _params_text(first)
            rows.append(d)
            numeric.append(n_row)
        display = pd.DataFrame(rows)
        order = {lab: i for i, lab in enumerate(self.labels)}
        key = display["configuration"].map(order)
        display = display.assign(_k=key).sort_values(["dataset", "_k"], kind="stable").drop(columns="_k")
        numeric = pd.DataFrame(numeric).loc[display.index]
        self.table("results", display.reset_index(drop=True), numeric.reset_index(drop=True))
        self.scale_table()

    def scale_table(self) -> None:
        budgets = self.facts.get("budgets") or {}
        paper = budgets.get(self.facts.get("paper_scale") or "", {})
        if not paper or self.src.scale == self.facts.get("paper_scale"):
            return
        self.heading("Scale")
        records = []
        for label in self.labels:
            runs = self.rows[self.rows["label"] == label]
            p = paper.get(label, {})
            records.append({
                "configuration": label,
                "epochs (paper)": f"{_mode(runs['epochs'])} ({p.get('train.epochs', MISSING)})",
                "width (paper)": f"{_fmt(_mode(runs['width']))} ({_fmt(p.get('model.width'))})",
                "training images (paper)": f"{_fmt(_mode(runs['n_train']))} "
                f"({'full split' if p and p.get('data.subset') is None else _fmt(p.get('data.subset'))})",
                "seeds": int(runs["seed"].nunique()),
            })  # fmt: skip
        self.parts.append(
            f"What each configuration ran at scale `{self.src.scale}` beside the paper scale's settings "
            "(the study spec's `paper` scale: each method's published recipe).\n"
        )
        self.table("scale", pd.DataFrame(records))

    def paper(self) -> None:
        self.heading("Paper comparison")
        try:
            paper = load_paper_results(self.paper_path)
        except Exception as exc:  # a missing or unreadable CSV: say so, keep the rest of the report
            self.omit("paper", "Paper comparison", f"the paper results table could not be read ({exc})")
            return
        known = known_frame(self.known)
        display, numeric = paper_comparison(
            self.rows,
            paper,
            self.src.objective,
            self.src.direction,
            self.src.reference,
            known,
            self.src.scale,
        )
        matched = int((numeric[f"{HEADLINE}_n"] > 0).sum())
        known_cols = list(dict.fromkeys(known["budget_column"])) if len(known) else []
        matched_known = int(sum((numeric[f"{c}: n"] > 0).sum() for c in known_cols))
        if not matched and not matched_known:
            datasets = ", ".join(sorted(set(self.rows["dataset"])))
            methods = ", ".join(sorted(set(self.rows["method"])))
            self.omit("paper", "Paper comparison",
                      f"no paper row matches our runs (methods {methods}; datasets {datasets})")  # fmt: skip
            return
        scale = f" at scale `{self.src.scale}`" if self.src.scale else ""
        self.parts.append(
            f"Every row of `paper_results.csv` ({len(paper)} rows; {matched} matched by this report's "
            f"runs{scale}) beside every result of ours that exists, one column per budget. This report's "
            f"runs: **{ACCURACY_COLUMNS['final_test_acc']}** (our headline) and "
            f"**{ACCURACY_COLUMNS['max_test_acc']}** (selected on test, like the peers' scripts and "
            "likely the CAW-Conv paper's single runs); Δ = our mean − the paper's value; `our runs` gives "
            "their setting (at the cpu scale: narrow, few epochs, a subset, so the difference measures the "
            "budget, not a reproduction). The paper's std is as published; ours is over n seeds (ddof=1).\n"
        )
        if known_cols:
            sources = "; ".join(
                f"`{src}`: {what}"
                for src, what in dict.fromkeys(zip(known["known_source"], known["known_what"]))
            )
            self.parts.append(
                f"Columns `ours: <hardware>, ...`: full-data runs of the paper recipe made by the project's own "
                f"commands outside this study (listed in `studies/known_results.csv`), final-epoch test "
                f"accuracy (n runs); a run stopped before the recipe's last epoch says how far it got "
                f"(epochs run/planned). Sources: {sources}.\n"
            )
        if self.known_error:
            self.parts.append(f"_Known results not shown: {self.known_error}._\n")
        self.table("paper_comparison", display, numeric)
        tex = latex_table(
            display.drop(columns=["paper note"]),
            "Paper results beside ours (top-1 %, mean ± std (n) over seeds, ddof=1).",
            f"tab:{_slug(self.src.name)}-paper",
        )
        (self.folder / "tables" / "paper_comparison.tex").write_text(tex)
        self.parts.append("_LaTeX: [tables/paper_comparison.tex](tables/paper_comparison.tex)_\n")

    def ablation(self) -> None:
        self.heading("Ablation")
        ref = self.src.reference
        if ref is None or ref not in set(self.rows["label"]):
            why = "the study names no reference configuration" if ref is None else (
                f"the reference {ref!r} has no finished run"
            )  # fmt: skip
            self.omit("ablation", "Ablation table", why)
            return
        shown = self.shown
        present = set(shown["label"])
        against_ref = {lab: ref for lab in self.labels if lab != ref and lab in present}
        preds = {
            k: v for k, v in (self.facts.get("predecessors") or {}).items() if k in present and v in present
        }
        vs_ref = paired_effects(shown, ["dataset"], "label", against_ref, HEADLINE)
        vs_prev = paired_effects(shown, ["dataset"], "label", preds, HEADLINE)
        agg = aggregate(shown, ["dataset", "label"], HEADLINE)
        agg["cell"] = cells(agg)
        datasets = list(dict.fromkeys(agg["dataset"]))
        method_of = self.rows.groupby("label")["method"].first()
        display = pd.DataFrame({"configuration": self.labels})
        display.insert(1, "method", display["configuration"].map(method_of))
        if preds:
            display["builds on"] = display["configuration"].map(preds).fillna("")
        for ds in datasets:
            prefix = f"{ds}: " if len(datasets) > 1 else ""
            sub = agg[agg["dataset"] == ds].set_index("label")
            display[f"{prefix}final-epoch test"] = display["configuration"].map(sub["cell"]).fillna(MISSING)
            if preds:
                prev = vs_prev[vs_prev["dataset"] == ds].assign(
                    cell=lambda t: effect_cells(t) if len(t) else []
                )
                display[f"{prefix}Δ vs previous rung"] = (
                    display["configuration"].map(prev.set_index("label")["cell"]).fillna("")
                )
            ref_t = vs_ref[vs_ref["dataset"] == ds].assign(cell=lambda t: effect_cells(t) if len(t) else [])
            cell = display["configuration"].map(ref_t.set_index("label")["cell"]).fillna(MISSING)
            display[f"{prefix}Δ vs {ref}"] = cell.where(display["configuration"] != ref, "reference")
        both = pd.concat([vs_prev.assign(comparison="previous rung"), vs_ref.assign(comparison="reference")])
        resolved = both[both["resolved"].astype(bool)] if len(both) else both
        rung = (
            "against the previous rung (`builds on`: what adding this one component does; a rung's "
            "predecessor is its `extends:` variant, else the variant before it in the spec) and "
            if preds
            else ""
        )
        self.parts.append(
            f"Each configuration's final-epoch test accuracy, and its paired per-seed difference {rung}"
            f"against the reference `{ref}`: `mean [95 % t-interval] (n seeds both ran)`; *{NOT_RESOLVED}* "
            "where the interval contains 0 (or n < 2). "
            f"{len(resolved)} of {len(both)} differences are resolved at this scale.\n"
        )
        numeric = agg.drop(columns=["cell"]).merge(
            both.rename(columns={"mean": "delta_mean", "low": "delta_low", "high": "delta_high",
                                 "n": "n_pairs"}),  # fmt: skip
            on=["dataset", "label"], how="left",
        )  # fmt: skip
        self.table("ablation", display, numeric)

    def top_configurations(self) -> None:
        if not self.multi_config:
            return
        self.heading("Configurations by validation objective")
        obj = self.src.objective
        stats = aggregate(self.rows, ["label", "dataset", "config"], obj)
        test = aggregate(self.rows, ["label", "dataset", "config"], HEADLINE)
        stats = stats.merge(test, on=["label", "dataset", "config"], suffixes=("", "_test"))
        ascending = self.src.direction != "maximize"
        stats = stats.sort_values("mean", ascending=ascending, kind="stable").head(15).reset_index(drop=True)
        first = self.rows.drop_duplicates("config").set_index("config")
        display = pd.DataFrame({
            "configuration": stats["label"], "dataset": stats["dataset"], "id": stats["config"],
            "parameters": [_params_text(first.loc[c]) for c in stats["config"]],
            f"{obj} (objective)": cells(stats),
            "final-epoch test": [format_cell(m, s, n) for m, s, n in
                                 zip(stats["mean_test"], stats["std_test"], stats["n_test"])],
        })  # fmt: skip
        self.parts.append(
            f"The {len(display)} best configurations by mean `{obj}` over seeds (n per cell). Whether these "
            "differences exceed seed noise: section *Search*.\n"
        )
        self.table("configurations", display, stats)

    # ------------------------------------------------------------------ searches
    def _numeric_params(self) -> list[str]:
        out = []
        for col in [c for c in self.rows.columns if c.startswith("param:")]:
            values = pd.to_numeric(self.rows[col], errors="coerce")
            if values.notna().all() and values.nunique() > 1:
                out.append(col)
        return out

    def _dimension(self, key: str) -> dict[str, Any]:
        for d in self.facts.get("dimensions") or []:
            if d["key"] == key:
                return d
        return {}

    def search(self) -> None:
        self.heading("Search")
        params = self._numeric_params()
        if not params:
            self.omit("search", "Sensitivity and importance", "the study searched no numeric parameter")
            return
        obj = self.src.objective
        spread = spreads(self.rows, "config", obj)
        self.informative = spread.informative
        verdict = (
            "the configurations differ by more than the seeds do, so sensitivity and importance are shown"
            if spread.informative
            else "**the configurations do not differ by more than the seeds do** (or the seed spread is "
            "unknown), so no sensitivity table, importance or contour is shown: at this budget they would "
            "describe noise"
        )
        self.parts.append(f"Spread check: {spread.describe(obj)}: {verdict}.\n")
        self.csv("spreads", pd.DataFrame([{
            "objective": obj, "configuration_sd": spread.config_sd, "seed_sd": spread.seed_sd,
            "n_configurations": spread.n_configs, "min_seeds": spread.seeds_per_config[0],
            "max_seeds": spread.seeds_per_config[1], "informative": spread.informative,
        }]))  # fmt: skip
        defaults = self.facts.get("paper_defaults") or {}
        slices = []
        points = self.rows[["label", "config", "seed", "final_val_acc", HEADLINE]].copy()
        for col in params:
            key = col.split(":", 1)[1]
            values = pd.to_numeric(self.rows[col])
            dim = self._dimension(key)
            decade = bool(values.min() > 0 and values.max() / values.min() >= 10)
            log_x = bool(dim.get("log")) if dim and dim.get("type") != "categorical" else decade
            points[key] = values
            slices.append({"key": key, "log": log_x, "default": defaults.get(key)})
        path = figures.sensitivity_slices(
            points, slices, obj, self.labels, self.colours, self.fig_path("sensitivity")
        )
        marked = [s["key"] for s in slices if isinstance(s["default"], (int, float))]
        self.parts.append(
            f"Slices: `{obj}` of every run (dots, one per seed) and each configuration's mean (rings) "
            "against each searched parameter; other searched parameters vary between points. The dashed "
            f"line is the paper's default ({', '.join(f'{k} = {defaults[k]:g}' for k in marked) or 'none'}).\n"
        )
        self.figure("sensitivity", path, "sensitivity slices")
        if spread.informative:
            for slice_ in slices:
                key = slice_["key"]
                agg_val = aggregate(points, ["label", key], "final_val_acc")
                agg_test = aggregate(points, ["label", key], HEADLINE)
                merged = agg_val.merge(agg_test, on=["label", key], suffixes=("_val", "_test"))
                name = f"sensitivity_{_slug(key)}"
                self.csv(name, merged.sort_values(["label", key]).reset_index(drop=True))
                self.parts.append(
                    f"_{key}: mean, std and n per value: [tables/{name}.csv](tables/{name}.csv)_\n"
                )
        else:
            self.omit("sensitivity", "Sensitivity tables, parameter importance and contour plots",
                      "the configurations do not differ by more than the seeds do (section *Search*)")  # fmt: skip
        self.importance(spread.informative)

    def importance(self, informative: bool) -> None:
        study = self.src.study
        if study is None:
            self.omit("importance", "Parameter importance", "the runs do not come from an Optuna study")
            self.omit("parallel", "Parallel-coordinate plot", "the runs do not come from an Optuna study")
            return
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        varying = sorted({k for t in trials for k in t.params
                          if len({json_key(u.params.get(k)) for u in trials}) > 1})  # fmt: skip
        numeric = [k for k in varying if f"param:{k}" in self._numeric_params()]
        if not informative:
            pass  # said once, in the search section and the list of sections not shown
        elif len(varying) < 2 or len(trials) < 4:
            self.omit(
                "importance", "Parameter importance",
                f"it needs at least two varied parameters and four complete trials "
                f"(found {len(varying)} varied: {', '.join(varying) or 'none'}; {len(trials)} complete)",
            )  # fmt: skip
        else:
            self._importance(study, varying, trials)
        if informative:
            self._contour(study, numeric)
        self._parallel(study, varying, trials)

    def _importance(self, study: Any, varying: list[str], trials: list) -> None:
        import optuna

        self.parts.append("**Parameter importance**\n")
        results, notes = {}, []
        evaluators = {
            "PED-ANOVA": (optuna.importance.PedAnovaImportanceEvaluator, PED_ANOVA_ARGS),
            "fANOVA": (optuna.importance.FanovaImportanceEvaluator, FANOVA_ARGS),
        }
        for name, (cls, kwargs) in evaluators.items():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    results[name] = optuna.importance.get_param_importances(
                        study, evaluator=cls(**kwargs), params=varying
                    )
            except Exception as exc:  # too few trials above the quantile, a degenerate space, ...
                notes.append(f"{name} failed: {type(exc).__name__}: {exc}")
        if not results:
            self.parts.pop()
            self.omit("importance", "Parameter importance", "; ".join(notes))
            return
        long = pd.DataFrame(
            [{"parameter": p, "evaluator": e, "importance": v} for e, imp in results.items()
             for p, v in imp.items()]
        )  # fmt: skip
        display = long.pivot(index="parameter", columns="evaluator", values="importance").reset_index()
        display = display.sort_values(display.columns[1], ascending=False)
        args = "; ".join(
            f"**{n}**: `{evaluators[n][0].__name__}({', '.join(f'{k}={v}' for k, v in evaluators[n][1].items())})`"
            for n in results
        )
        self.parts.append(
            f"Importance of each parameter for the objective (`{self.src.objective}`) over "
            f"{len(trials)} complete trials (each seed is a trial), normalised to sum to 1 per "
            f"evaluator. Evaluators: {args}. They can disagree in magnitude; a TPE study's importance "
            "describes the sampler's path, a quasi-random (Sobol/grid) study's the space.\n"
            + ("".join(f"\n_{n}_\n" for n in notes))
        )
        self.table("importance", display.reset_index(drop=True), long)
        self.figure("importance", figures.importance(long, self.fig_path("importance")), "importance")

    def _contour(self, study: Any, numeric: list[str]) -> None:
        if len(numeric) < 2:
            self.omit("contour", "Contour plots", "fewer than two numeric parameters were searched")
            return
        try:
            path = figures.contour(study, numeric, self.fig_path("contour"))
        except Exception as exc:
            self.omit("contour", "Contour plots", f"Optuna could not draw them ({type(exc).__name__}: {exc})")
            return
        self.parts.append(
            f"**Contours** of `{self.src.objective}` over each pair of searched parameters (Optuna's "
            "interpolation between complete trials, dots: the trials).\n"
        )
        self.figure("contour", path, "contour plots")

    def _parallel(self, study: Any, varying: list[str], trials: list) -> None:
        if not [p for p in varying if p != "variant"] or len(trials) < 2:
            self.omit("parallel", "Parallel-coordinate plot",
                      "no searched parameter (besides the variant) varied over complete trials")  # fmt: skip
            return
        try:
            path = figures.parallel_coordinate(study, varying, self.fig_path("parallel_coordinate"))
        except Exception as exc:
            self.omit("parallel", "Parallel-coordinate plot", f"Optuna could not draw it ({exc})")
            return
        self.parts.append(
            f"**Parallel coordinates** of the complete trials (Optuna, matplotlib backend), coloured by "
            f"the objective `{self.src.objective}`.\n"
        )
        self.figure("parallel_coordinate", path, "parallel coordinates")

    def history(self) -> None:
        self.heading("Optimisation history")
        trials = self.src.trials
        sampler = (self.facts.get("sampler") or {}).get("name")
        if not trials:
            self.omit("history", "Optimisation history", "the runs do not come from an Optuna study")
            return
        if sampler in ("grid", "qmc"):
            self.omit("history", "Optimisation history",
                      f"a planned ({sampler}) study runs its plan in a fixed order: nothing is optimised")  # fmt: skip
            return
        frame = pd.DataFrame([{
            "number": t["number"], "state": t["state"], "value": t["value"],
            "last_intermediate": _last_value(t["intermediate_values"]),
        } for t in trials])  # fmt: skip
        if (frame["state"] == "COMPLETE").sum() < 2:
            self.omit("history", "Optimisation history", "fewer than two complete trials")
            return
        self.csv("trials", frame)
        path = figures.optimisation_history(frame, self.src.direction, self.src.objective,
                                            self.fig_path("optimisation_history"))  # fmt: skip
        counts = frame["state"].value_counts().to_dict()
        self.parts.append(
            f"The objective of each trial in the order the `{sampler}` sampler proposed them "
            f"({', '.join(f'{k.lower()} {v}' for k, v in sorted(counts.items()))}), with the best so far. "
            "_CSV: [tables/trials.csv](tables/trials.csv)_\n"
        )
        self.figure("optimisation_history", path, "optimisation history")
        curves = pd.DataFrame([
            {"number": t["number"], "state": t["state"], "step": int(k), "value": v}
            for t in trials if t["state"] in ("COMPLETE", "PRUNED")
            for k, v in t["intermediate_values"].items()
        ])  # fmt: skip
        pruner = (self.facts.get("pruner") or {}).get("name")
        if curves.empty or pruner in (None, "none") or curves["step"].nunique() < 2:
            self.omit("intermediate", "Intermediate values",
                      "no pruner, or fewer than two reported epochs per trial")  # fmt: skip
            return
        path = figures.intermediate_values(curves, self.src.objective, self.fig_path("intermediate_values"))
        self.parts.append(
            f"**Intermediate values**: the per-epoch `{self.src.objective}` each trial reported to the "
            f"`{pruner}` pruner; pruned trials (red) stop where the pruner stopped them.\n"
        )
        self.figure("intermediate_values", path, "intermediate values")

    def depth_width(self) -> None:
        self.heading("Depth x width")
        rows = self.rows
        combos = rows.groupby(["label", "dataset", "arch"])[["depth_label", "width"]].nunique()
        groups = combos[(combos["depth_label"] > 1) | (combos["width"] > 1)].index.tolist()
        groups = [g for g in groups if rows[(rows["label"] == g[0]) & (rows["dataset"] == g[1])]
                  .groupby(["depth_label", "width"]).ngroups > 1]  # fmt: skip
        if not groups:
            self.omit("depth_width", "Depth x width heatmaps", "the runs vary neither depth nor width")
            return
        self.parts.append(
            "Final-epoch test accuracy by blocks per stage (rows) and width multiplier (columns): mean over "
            "seeds (n per cell), with the std (ddof=1) in the companion heatmap; every configuration's heatmaps "
            "share one colour scale. Where other parameters also vary, each cell is the configuration with the "
            "best mean validation objective.\n"
        )
        all_tables, chosen = [], []
        for label, dataset, arch in groups:
            sub = rows[(rows["label"] == label) & (rows["dataset"] == dataset) & (rows["arch"] == arch)]
            sub = best_configs(sub, ["depth_label", "width"], self.src.objective, self.src.direction)
            chosen.append(sub)
            agg = aggregate(sub, ["depth_label", "width"], HEADLINE)
            agg.insert(0, "label", label)
            agg.insert(1, "dataset", dataset)
            agg.insert(2, "arch", arch)
            all_tables.append(agg)
        # One colour scale for every configuration's heatmap (means, and stds), so they compare at a glance.
        every = pd.concat(all_tables, ignore_index=True)
        scales = {k: (every[k].min(), every[k].max()) for k in ("mean", "std")}
        for agg in all_tables:
            label, dataset, arch = agg.iloc[0][["label", "dataset", "arch"]]
            means = agg.pivot(index="depth_label", columns="width", values="mean")
            stds = agg.pivot(index="depth_label", columns="width", values="std")
            title = f"{label} on {dataset} ({arch})"
            name = f"depth_width_{label}_{dataset}_{arch}"
            self.parts.append(f"**{title}**\n")
            grid = means.copy().astype(object)
            for d in grid.index:
                for w in grid.columns:
                    a = agg[(agg["depth_label"] == d) & (agg["width"] == w)]
                    grid.loc[d, w] = format_cell(*a.iloc[0][["mean", "std", "n"]]) if len(a) else MISSING
            grid.columns = [f"width {w:g}" for w in grid.columns]
            grid.index.name = "depth"
            self.parts.append(markdown_table(grid, index=True) + "\n")
            path = figures.heatmap_pair(means, stds, title, self.fig_path(name), scales)
            self.figure(name, path, title)
        table = pd.concat(all_tables, ignore_index=True)
        self.csv("depth_width", table)
        self.parts.append("_CSV: [tables/depth_width.csv](tables/depth_width.csv)_\n")
        self._depth_width_effects(pd.concat(chosen, ignore_index=True))

    def _depth_width_effects(self, runs: pd.DataFrame) -> None:
        """Each depth x width cell against the paper's network of the same configuration (its default
        depth, width 1), paired per seed, so a reader sees which changes exceed seed noise."""
        runs = runs.copy()
        width = pd.to_numeric(runs["width"], errors="coerce")
        runs["cell"] = "depth " + runs["depth_label"].astype(str) + ", width " + width.map("{:g}".format)
        runs["paper_network"] = runs["depth_label"].isin(["default", "2"]) & (width == 1.0)
        by = ["label", "dataset", "arch"]
        effects = []
        for _, sub in runs.groupby(by, sort=False):
            base = sub.loc[sub["paper_network"], "cell"].drop_duplicates()
            if len(base) == 1:
                against = {c: base.iloc[0] for c in sub["cell"].unique() if c != base.iloc[0]}
                effects.append(paired_effects(sub, by, "cell", against, HEADLINE))
        effects = [e for e in effects if len(e)]
        if not effects:
            self.parts.append(
                "No paired differences: no configuration ran the paper's network (default depth, width 1) "
                "beside another depth or width.\n"
            )
            return
        table = pd.concat(effects, ignore_index=True)
        display = table[[*by, "cell", "against"]].rename(columns={"label": "configuration"})
        display["Δ final-epoch test"] = effect_cells(table)
        self.parts.append(
            "Each cell against the paper's network of the same configuration (default depth, width 1): the "
            "paired per-seed difference in final-epoch test accuracy, `mean [95 % t-interval] (n seeds both "
            f"ran)`; *{NOT_RESOLVED}* where the interval contains 0 (or n < 2). "
            f"{int(table['resolved'].astype(bool).sum())} of {len(table)} differences are resolved at this "
            "scale.\n"
        )
        self.table("depth_width_effects", display, table)

    # ------------------------------------------------------------------ per-epoch views
    def _per_dataset(self) -> list[tuple[str, pd.DataFrame]]:
        return [(ds, runs) for ds, runs in self.shown.groupby("dataset", sort=False)]

    def _focus_label(self, labels: list[str]) -> str | None:
        """The configuration whose per-layer detail is drawn: the reference, else the first in order."""
        if self.src.reference in labels:
            return self.src.reference
        return next((lab for lab in self.labels if lab in labels), None)

    def curves(self) -> None:
        self.heading("Learning curves")
        made = False
        for dataset, runs in self._per_dataset():
            records = []
            for run in runs.to_dict("records"):
                for r in read_metrics(run["run_path"]):
                    loss = r.get("train_loss") or {}
                    values = loss.get("ce") or [v for vs in loss.values() for v in vs]
                    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
                    records.append({
                        "label": run["label"], "seed": run["seed"], "epoch": int(r["epoch"]) + 1,
                        "val_acc": (r.get("val_acc") or {}).get(run["readout"]),
                        "test_acc": (r.get("test_acc") or {}).get(run["readout"]),
                        "train_loss": float(np.mean(finite)) if finite else None,
                    })  # fmt: skip
            if not records:
                continue
            made = True
            frame = pd.DataFrame(records)
            name = f"learning_curves_{dataset}"
            csv = self.csv(name, frame)
            epochs = int(frame["epoch"].max())
            if epochs < 2:
                self.parts.append(
                    f"**{dataset}**: one epoch per run, so no curves; the epoch's values, mean ± std (n "
                    f"seeds). _CSV: [{csv}]({csv})_\n"
                )
                table = []
                for label in [lab for lab in self.labels if lab in set(frame["label"])]:
                    sub = frame[frame["label"] == label]
                    row = {"configuration": label}
                    for col, title in (("val_acc", "validation acc."), ("test_acc", "test acc."),
                                       ("train_loss", "training loss (ce)")):  # fmt: skip
                        a = aggregate(sub.assign(_a=0), ["_a"], col).iloc[0]
                        row[title] = format_cell(a["mean"], a["std"], a["n"], 3 if col == "train_loss" else 2)
                    table.append(row)
                self.parts.append(markdown_table(pd.DataFrame(table)) + "\n")
                continue
            panels = [("val_acc", "validation accuracy (%), main readout")]
            if frame["train_loss"].notna().any():
                panels.append(("train_loss", "training loss (ce where the method has one, mean over units)"))
            if frame["test_acc"].notna().sum() > frame["label"].nunique() * frame["seed"].nunique():
                panels.append(("test_acc", "test accuracy (%), main readout"))
            path = figures.banded_lines(frame, "epoch", panels, self.labels, self.colours, self.fig_path(name),
                                        "epoch")  # fmt: skip
            self.parts.append(
                f"**{dataset}**: per epoch, mean ± sd over seeds (training loss: the `ce` term averaged "
                f"over units where the method has one, else all terms; a log axis where the values lie "
                f"decades apart, e.g. FF's goodness loss beside cross-entropies). _CSV: [{csv}]({csv})_\n"
            )
            self.figure(name, path, f"learning curves on {dataset}")
        if not made:
            self.omit("curves", "Learning curves", "no run folder with metrics.jsonl was found")

    def per_layer(self) -> None:
        self.heading("Per-layer accuracy")
        made = False
        for dataset, runs in self._per_dataset():
            records = [
                {"label": r["label"], "seed": r["seed"], "layer": i, "value": v}
                for r in runs.to_dict("records") for i, v in enumerate(r.get("per_layer_test_acc") or [])
                if isinstance(v, (int, float))
            ]  # fmt: skip
            frame = pd.DataFrame(records)
            if frame.empty:
                continue
            # One scoring unit (backprop): its one score is the Results table's; a point at layer 0 would
            # read as the first layer's.
            frame = frame[frame.groupby("label")["layer"].transform("max") >= 1]
            if frame.empty:
                continue
            name = f"per_layer_{dataset}"
            agg = aggregate(frame, ["label", "layer"], "value")
            csv = self.csv(name, agg)
            self.parts.append(
                f"**{dataset}**: final-epoch test accuracy of each layer's own class scores, mean ± sd over "
                "seeds (configurations of one scoring unit, e.g. backprop, are left out: their one score is "
                f"the Results table's). _CSV: [{csv}]({csv})_\n"
            )
            path = figures.per_layer(frame, self.labels, self.colours, self.fig_path(name),
                                     "test accuracy of the layer's scores (%)")  # fmt: skip
            self.figure(name, path, f"per-layer accuracy on {dataset}")
            made = True
        if not made:
            self.omit("per_layer", "Per-layer accuracy",
                      "no run has per-layer accuracy of two or more scoring units")  # fmt: skip

    def _per_layer_records(self, runs: pd.DataFrame, extract) -> pd.DataFrame:
        records = []
        for run in runs.to_dict("records"):
            for r in read_metrics(run["run_path"]):
                for quantity, values in extract(r).items():
                    for layer, v in enumerate(values or []):
                        if isinstance(v, (int, float)) and math.isfinite(v):
                            records.append({"label": run["label"], "seed": run["seed"], "epoch": int(r["epoch"]) + 1,
                                            "layer": layer, "quantity": quantity, "value": float(v)})  # fmt: skip
        return pd.DataFrame(records)

    def _epochs_view(
        self, key: str, title: str, frame: pd.DataFrame, names: dict[str, str], dataset: str, intro: str
    ) -> None:
        """Per-layer quantities over epochs: detail (every layer) for the focus configuration and the
        mean over layers for every configuration; a table when there is only one epoch."""
        quantities = [q for q in names if q in set(frame["quantity"])]
        agg = aggregate(frame, ["label", "quantity", "epoch", "layer"], "value")
        csv = self.csv(f"{key}_{dataset}", agg)
        layer_mean = frame.groupby(["label", "seed", "epoch", "quantity"], as_index=False)["value"].mean()
        if int(frame["epoch"].max()) < 2:
            last = layer_mean[layer_mean["epoch"] == layer_mean["epoch"].max()]
            table = []
            for label in [lab for lab in self.labels if lab in set(last["label"])]:
                row = {"configuration": label}
                for q in quantities:
                    a = aggregate(
                        last[(last["label"] == label) & (last["quantity"] == q)].assign(_a=0), ["_a"], "value"
                    )
                    row[names[q]] = _sig_cell(*a.iloc[0][["mean", "std", "n"]]) if len(a) else MISSING
                table.append(row)
            self.parts.append(
                f"**{dataset}**: {intro} One epoch per run, so no curves: the epoch's mean over layers, "
                f"mean ± std (n seeds); every layer in _[{csv}]({csv})_.\n"
            )
            self.parts.append(markdown_table(pd.DataFrame(table)) + "\n")
            return
        focus = self._focus_label(sorted(set(frame["label"])))
        detail = (
            frame[frame["label"] == focus]
            .pivot_table(index=["seed", "epoch", "layer"], columns="quantity", values="value")
            .reset_index()
        )
        name = f"{key}_layers_{focus}_{dataset}"
        path = figures.per_layer_over_epochs(
            detail, [(q, names[q]) for q in quantities if q in detail.columns],
            f"{title}: {focus} on {dataset}, every layer (mean over seeds)", self.fig_path(name),
            log_y=[q for q in quantities if q != "ce"],
        )  # fmt: skip
        self.parts.append(f"**{dataset}**: {intro} _CSV: [{csv}]({csv})_\n")
        self.figure(name, path, f"{title} per layer, {focus}")
        if layer_mean["label"].nunique() > 1:
            wide = layer_mean.pivot_table(index=["label", "seed", "epoch"], columns="quantity",
                                          values="value").reset_index()  # fmt: skip
            name = f"{key}_{dataset}"
            panels = [(q, f"{names[q]}, mean over layers") for q in quantities if q in wide.columns]
            path = figures.banded_lines(
                wide, "epoch", panels, self.labels, self.colours, self.fig_path(name), "epoch"
            )
            self.figure(name, path, f"{title}, every configuration")

    def loss_terms(self) -> None:
        self.heading("Loss terms per layer")
        made = False
        for dataset, runs in self._per_dataset():

            def extract(r: dict[str, Any]) -> dict[str, list]:
                raw, weighted = r.get("train_loss") or {}, r.get("train_loss_weighted") or {}
                return {term: weighted.get(term, values) for term, values in raw.items()}

            frame = self._per_layer_records(runs, extract)
            if frame.empty or (frame["layer"].max() < 1 and frame["quantity"].nunique() < 2):
                continue  # one unit with one term: the learning curves show it
            terms = list(dict.fromkeys(["ce", *sorted(set(frame["quantity"]))]))
            weighted = any(
                "train_loss_weighted" in r for run in runs["run_path"][:1] for r in read_metrics(run)
            )
            names = {
                t: (TERM_NAMES.get(t, t) if weighted or t == "ce" else f"{t} (unweighted)") for t in terms
            }
            intro = (
                "the epoch mean of each named loss term per layer"
                + (
                    " times its weight (what the unit's optimiser saw)"
                    if weighted
                    else " (unweighted: these runs did not record the weighted terms)"
                )  # fmt: skip
                + "; a non-CE term whose layers lie decades apart on a log axis."
            )
            self._epochs_view("loss_terms", "loss terms", frame, names, dataset, intro)
            made = True
        if not made:
            self.omit("loss_terms", "Loss terms per layer",
                      "no run has several units or several loss terms (the learning curves show the loss)")  # fmt: skip

    def diagnostics(self) -> None:
        self.heading("Assignment diagnostics")
        made = False
        for dataset, runs in self._per_dataset():
            frame = self._per_layer_records(
                runs, lambda r: {k: v for k, v in (r.get("unit_stats") or {}).items() if k in DIAGNOSTICS}
            )
            if frame.empty:
                continue
            present = set(frame["quantity"])
            names = {k: v for k, v in DIAGNOSTICS.items() if k in present}
            if "assignment_entropy_norm" in names:
                names.pop("assignment_entropy", None)
            frame = frame[frame["quantity"].isin(names)]
            intro = (
                "per layer and epoch, the learnable assignment's temperature and how committed it is "
                "(recorded for configurations with a learnable assignment only)."
            )
            self._epochs_view(
                "assignment_diagnostics", "assignment diagnostics", frame, names, dataset, intro
            )
            made = True
        if not made:
            self.omit("diagnostics", "Assignment diagnostics", "no run recorded assignment statistics")

    def lcs(self) -> None:
        self.heading("LCS layer weights")
        made = False
        for dataset, runs in self._per_dataset():
            frame = self._per_layer_records(
                runs, lambda r: {"weight": ((r.get("readout_state") or {}).get("lcs") or {}).get("weights")}
            )
            if not frame.empty:  # one layer: its weight is 1, and would only squash the axis
                frame = frame[frame.groupby("label")["layer"].transform("max") >= 1]
            if frame.empty:
                continue
            name = f"lcs_weights_{dataset}"
            agg = aggregate(frame, ["label", "epoch", "layer"], "value")
            csv = self.csv(name, agg)
            final = frame[frame["epoch"] == frame.groupby("label")["epoch"].transform("max")]
            self.parts.append(
                f"**{dataset}**: the loss-aware (LCS) weight of each layer (softmax of minus each layer's "
                f"mean training CE) after the last epoch, mean ± sd over seeds. _CSV: [{csv}]({csv})_\n"
            )
            path = figures.per_layer(final, self.labels, self.colours, self.fig_path(name), "LCS weight")
            self.figure(name, path, f"LCS weights on {dataset}")
            if int(frame["epoch"].max()) >= 2:
                focus = self._focus_label(sorted(set(frame["label"])))
                detail = frame[frame["label"] == focus].rename(columns={"value": "weight"})
                name = f"lcs_weights_epochs_{focus}_{dataset}"
                path = figures.per_layer_over_epochs(detail, [("weight", "LCS weight")],
                                                     f"LCS weights over epochs: {focus} on {dataset}",
                                                     self.fig_path(name))  # fmt: skip
                self.figure(name, path, f"LCS weights over epochs, {focus}")
            made = True
        if not made:
            self.omit("lcs", "LCS weights", "no run of several layers used the `lcs` readout (main or extra)")

    def assignment(self) -> None:
        self.heading("Channel-to-class assignment")
        made = False
        for dataset, runs_ds in self._per_dataset():
            jobs = []
            for label in [lab for lab in self.labels if lab in set(runs_ds["label"])]:
                run = runs_ds[runs_ds["label"] == label].sort_values("seed").iloc[0]
                arrays = read_artifacts(run["run_path"])
                layers = sorted(
                    k for k in arrays if re.fullmatch(r"layer\d+_assignment", k) and arrays[k].ndim == 2
                )
                if not layers:
                    continue
                picked = list(dict.fromkeys([layers[0], layers[len(layers) // 2], layers[-1]]))
                jobs.append((f"{label} s{run['seed']}",
                             [(k.split("_")[0], np.asarray(arrays[k], dtype=float)) for k in picked]))  # fmt: skip
            if not jobs:
                continue
            if not made:
                self.parts.append(
                    "Assignment matrices A (channels x classes; each row sums to 1) after the last epoch of "
                    "the first seed of each configuration: first, middle and last layer. Channels are sorted "
                    "by their argmax class (strongest first), so a committed assignment reads as a staircase; "
                    "every panel shares one colour scale (0 to 1, square-root spaced so small weights show).\n"
                )
            made = True
            groups = figures.chunks(range(len(jobs)), ASSIGNMENTS_PER_FIGURE)
            for i, group in enumerate(groups):
                name = f"assignment_{dataset}" + (f"_{i + 1}" if len(groups) > 1 else "")
                part = f" ({i + 1}/{len(groups)})" if len(groups) > 1 else ""
                title = f"channel-to-class assignment on {dataset}{part}"
                path = figures.assignments([jobs[j] for j in group], title, self.fig_path(name))
                self.figure(name, path, title)
        if not made:
            self.omit("assignment", "Assignment matrices", "no run saved a `layerNN_assignment` artifact")

    # ------------------------------------------------------------------ cost
    def cost(self) -> None:
        self.heading("Cost")
        rows = self.shown
        if "train_images_per_s" not in rows.columns or not rows["train_images_per_s"].notna().any():
            self.omit("cost", "Cost table", "the runs recorded no throughput")
            return
        group = ["device", "dataset", "label"]
        table = None
        for col in (
            "train_images_per_s",
            "epoch_time_s",
            "eval_images_per_s",
            "peak_cuda_mem_mib",
            "wall_time_s",
        ):
            agg = aggregate(rows, group, col).rename(
                columns={"mean": f"{col}_mean", "std": f"{col}_std", "n": f"{col}_n"}
            )
            table = agg if table is None else table.merge(agg, on=group)
        firsts = rows.groupby(group, sort=False).first().reset_index()
        table = table.merge(firsts[[*group, "method", "network", *(["n_params"] if "n_params" in rows else [])]],
                            on=group, how="left")  # fmt: skip
        twins, notes = self._twins(table)
        table["bp_twin"] = twins
        lookup = table.set_index(["device", "dataset", "label"])
        for col, name in (
            ("train_images_per_s", "train_speed_x_twin"),
            ("peak_cuda_mem_mib", "memory_x_twin"),
        ):
            table[name] = [
                _ratio(m, lookup[f"{col}_mean"].get((d, ds, t)) if isinstance(t, str) else None)
                for m, d, ds, t in zip(
                    table[f"{col}_mean"], table["device"], table["dataset"], table["bp_twin"]
                )
            ]
        order = {lab: i for i, lab in enumerate(self.labels)}
        table = (
            table.assign(_k=table["label"].map(order))
            .sort_values(["device", "dataset", "_k"])
            .drop(columns="_k")
        )

        def col_cells(col: str, digits: int) -> list[str]:
            return [format_cell(m, s, n, digits) for m, s, n in
                    zip(table[f"{col}_mean"], table[f"{col}_std"], table[f"{col}_n"])]  # fmt: skip

        display = pd.DataFrame({
            "device": table["device"], "dataset": table["dataset"], "configuration": table["label"],
            "train images/s": col_cells("train_images_per_s", 1),
            "backprop twin": [("itself" if t == lab else t) if isinstance(t, str) else MISSING
                              for t, lab in zip(table["bp_twin"], table["label"])],
            "train speed x twin (> 1 = faster)": [_times(v) for v in table["train_speed_x_twin"]],
            "s per epoch": col_cells("epoch_time_s", 2),
            "eval images/s": col_cells("eval_images_per_s", 1),
            "peak CUDA MiB": col_cells("peak_cuda_mem_mib", 0),
            "CUDA memory x twin (> 1 = more)": [_times(v) for v in table["memory_x_twin"]],
            "parameters": [f"{int(v):,}" if isinstance(v, (int, float)) and not math.isnan(v) else MISSING
                           for v in table.get("n_params", [None] * len(table))],
        })  # fmt: skip
        self.parts.append(
            "Cost per configuration, each against its **backprop twin**: the backprop run of this study on "
            "the same network (architecture, width, depth, planes, input) and device, so a ratio compares "
            "training rules, not networks. `train speed x twin` = the configuration's training images/s "
            "over the twin's (> 1 = faster than backprop); `CUDA memory x twin` = peak CUDA memory over the "
            "twin's (> 1 = more). Throughput is the median over epochs per run, then mean ± std (n) over "
            "seeds; `s per epoch` is training plus evaluation; peak CUDA memory is "
            "`torch.cuda.max_memory_allocated` (– on CPU: `cawbench bench` counts bytes saved for backward "
            "on any device). Timings on shared machines are noisy; compare ratios from the same study.\n"
            + "".join(f"\n- {n}" for n in notes)
            + ("\n" if notes else "")
        )
        self.table("cost", display.reset_index(drop=True), table.reset_index(drop=True))

    def _twins(self, table: pd.DataFrame) -> tuple[list[str | None], list[str]]:
        """Per row, the label of its backprop twin in this study (None: none ran), and notes for the
        rows without one naming the run that would be the twin."""
        bp = table[[is_backprop(m) for m in table["method"]]]
        twins: list[str | None] = []
        missing: dict[str, list[str]] = {}
        for row in table.to_dict("records"):
            if is_backprop(row["method"]):
                twins.append(row["label"])
                continue
            same = bp[(bp["device"] == row["device"]) & (bp["dataset"] == row["dataset"])
                      & (bp["network"] == row["network"])]  # fmt: skip
            if len(same):
                labels = list(same["label"])
                twins.append(self.src.reference if self.src.reference in labels else labels[0])
                continue
            twins.append(None)
            recipe = method_report_info(row["method"]).bp_twin
            hint = (
                f" (a `method: backprop, recipe: {recipe}` variant at this scale's sizes)" if recipe else ""
            )
            missing.setdefault(hint, []).append(f"`{row['label']}`")
        notes = [
            f"{', '.join(labels)}: no backprop run of this study trains the same network{hint}, so no ratio"
            for hint, labels in missing.items()
        ]
        return twins, notes

    def runs(self) -> None:
        self.heading("Runs")
        rows = self.rows.copy()
        rows["run"] = [self._run_link(r) for r in rows.to_dict("records")]
        cols = [c for c in ("study", "trial", "label", "method", "variant", "dataset", "arch", "depth", "width",
                            "seed", "config", "readout", "epochs", "n_train", "final_val_acc", "final_test_acc",
                            "test_acc_at_best_val", "max_test_acc", "max_test_epoch", "wall_time_s",
                            "train_images_per_s", "eval_images_per_s", "epoch_time_s", "peak_cuda_mem_bytes",
                            "n_params", "device", "precision", "git_commit", "git_dirty", "machine",
                            "mlflow_run_id", "run", "finished_at")
                if c in rows.columns]  # fmt: skip
        params = [c for c in rows.columns if c.startswith("param:")]
        frame = rows[cols[:11] + params + cols[11:]]
        self.csv("runs", frame)
        self.parts.append(
            f"One row per finished run ({len(frame)}): [tables/runs.csv](tables/runs.csv). `run` is the run "
            "folder relative to the study's results folder; this report's copy of each (config.yaml, "
            "metrics.jsonl, result.json, artifacts.npz; no checkpoints) is under `data/runs/`.\n"
        )

    @staticmethod
    def _run_link(row: dict[str, Any]) -> str | None:
        from cawbench.reporting.source import run_folder_name

        name = run_folder_name(row)
        return f"runs/{name}" if name else None


def _sig_cell(mean: Any, std: Any, n: Any) -> str:
    """``mean ± std (n)`` with 4 significant digits, for quantities of any magnitude (loss terms of 1e-7)."""
    cell = format_cell(mean, std, n, 4)
    if cell == MISSING:
        return cell
    text = f"{float(mean):.4g}"
    if int(n) > 1 and std is not None and math.isfinite(float(std)):
        text += f" ± {float(std):.2g}"
    return f"{text} ({int(n)})"


def _s(n: int) -> str:
    return "" if n == 1 else "s"


def json_key(value: Any) -> str:
    return repr(value)


def _mode(values: Any) -> Any:
    series = pd.Series(values).dropna() if values is not None else pd.Series(dtype=object)
    if series.empty:
        return None
    value = series.mode().iloc[0]
    return int(value) if isinstance(value, (np.integer, int)) or float(value).is_integer() else float(value)


def _fmt(value: Any) -> str:
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:,.0f}" if value.is_integer() and value >= 1000 else f"{value:g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _ratio(value: Any, reference: Any) -> float | None:
    try:
        v, r = float(value), float(reference)
    except (TypeError, ValueError):
        return None
    return v / r if math.isfinite(v) and math.isfinite(r) and r > 0 else None


def _times(value: Any) -> str:
    text = format_number(value)
    return MISSING if text == MISSING else f"{text}x"


def _last_value(values: dict[str, Any]) -> float | None:
    if not values:
        return None
    return values[max(values, key=int)]


def _tested_once(runs: pd.DataFrame) -> bool:
    """Whether every run's per-epoch metrics hold one test evaluation at most (none known: False)."""
    counts = pd.to_numeric(runs.get("test_epochs", pd.Series(dtype=float)), errors="coerce").dropna()
    return len(counts) == len(runs) and len(runs) > 0 and bool((counts <= 1).all())


def _params_text(row: pd.Series) -> str:
    items = [(c.split(":", 1)[1], row[c]) for c in row.index if c.startswith("param:")]
    parts = [f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in items if v is not None]
    return ", ".join(parts) or MISSING


def _run_versions(rows: pd.DataFrame) -> str:
    seen = []
    for v in rows.get("versions", pd.Series(dtype=object)).dropna():
        if isinstance(v, dict):
            text = ", ".join(f"{k} {val}" for k, val in sorted(v.items()) if k != "git")
            if text not in seen:
                seen.append(text)
    return "; ".join(seen)


def _report_versions() -> str:
    from importlib import metadata

    out = []
    for pkg in ("cawbench", "optuna", "mlflow", "mlflow-skinny", "pandas", "matplotlib", "seaborn",
                "scikit-learn", "torch"):  # fmt: skip
        try:
            out.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            continue
    out.append(f"python {platform.python_version()}")
    return ", ".join(out)


def render_report(
    source: ReportSource,
    folder: Path | str,
    command: str = "",
    paper_results: Path | None = None,
    known_results: Path | str | None = None,
) -> Report:
    """Write the report folder for ``source`` and return what was written.

    ``paper_results``: the paper table (default: the one the report folder was rendered with, else the
    project's); ``known_results``: a known-results CSV, ``"none"``, or None (the report folder's own, else
    the project's ``studies/known_results.csv``)."""
    from cawbench.reporting.paper import default_paper_results
    from cawbench.reporting.snapshot import write_snapshot

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for sub in ("tables", "figures"):  # a re-render must not leave stale files behind
        target = folder / sub
        if target.is_dir():
            for f in target.iterdir():
                if f.is_file():
                    f.unlink()
    (folder / "tables").mkdir(exist_ok=True)
    paper_path = Path(paper_results) if paper_results else source.paper_csv or default_paper_results()
    known, known_error = _known(source, known_results)
    report = _Builder(source, folder, command, paper_path, known, known_error).build()
    write_snapshot(source, folder, command, paper_path, known)
    return report


def _known(source: ReportSource, known_results: Path | str | None) -> tuple[list[dict[str, Any]], str | None]:
    if known_results is not None and str(known_results).lower() == "none":  # str(None) is "None" too
        return [], None
    if known_results is None and source.known_rows is not None:
        return list(source.known_rows), None
    try:
        return load_known_results(Path(known_results) if known_results else None), None
    except Exception as exc:  # a moved result file must not cost the whole report
        return [], str(exc)
