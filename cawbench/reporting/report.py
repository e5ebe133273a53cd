"""Render a report folder from a study: README.md (Markdown tables, embedded figures), CSV tables (the
paper table also as LaTeX) and PNG figures.

Every section is built from the finished runs of :class:`~cawbench.reporting.source.ReportSource`; a
section without data is replaced by one line that says why. Tables show ``mean ± std (n)`` over seeds
(std with ddof=1); when a label (variant or method) has several configurations (a search space), the one
with the best mean *validation* objective represents it, and the report says so.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cawbench.method import method_report_info
from cawbench.reporting import figures
from cawbench.reporting.aggregate import (
    MISSING,
    aggregate,
    cells,
    delta_cells,
    format_cell,
    format_number,
    latex_table,
    markdown_table,
    paired_deltas,
)
from cawbench.reporting.paper import ACCURACY_COLUMNS, load_paper_results, paper_comparison
from cawbench.reporting.source import ReportSource, best_configs, read_artifacts, read_metrics

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


@dataclass
class Report:
    """What :func:`render_report` wrote: the folder, the Markdown text and every table (the aggregated,
    numeric frames that the Markdown cells were formatted from)."""

    folder: Path
    markdown: str
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)
    omitted: dict[str, str] = field(default_factory=dict)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", str(text)).strip("_")[:80] or "x"


class _Builder:
    def __init__(self, source: ReportSource, folder: Path, command: str, paper_path: Path | None) -> None:
        self.src = source
        self.folder = folder
        self.command = command
        self.paper_path = paper_path
        self.rows = source.rows
        self.labels = source.labels()
        self.report = Report(folder, "")
        self.parts: list[str] = []
        # The runs that represent each (label, dataset): the best configuration on validation.
        self.shown = best_configs(self.rows, ["label", "dataset"], source.objective, source.direction)
        self.multi_config = bool((self.rows.groupby(["label", "dataset"])["config"].nunique() > 1).any())

    # ------------------------------------------------------------------ output helpers
    def table(self, name: str, display: pd.DataFrame, numeric: pd.DataFrame | None = None) -> None:
        tables = self.folder / "tables"
        tables.mkdir(parents=True, exist_ok=True)
        display.to_csv(tables / f"{name}.csv", index=False)
        self.report.tables[name] = numeric if numeric is not None else display
        if numeric is not None:
            numeric.to_csv(tables / f"{name}_values.csv", index=False)
        self.parts.append(markdown_table(display))
        self.parts.append(f"\n_CSV: [tables/{name}.csv](tables/{name}.csv)_\n")

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
        self.header()
        self.results()
        self.paper()
        self.ablation()
        self.top_configurations()
        self.sensitivity()
        self.importance()
        self.depth_width()
        self.curves()
        self.per_layer()
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
        src, rows = self.src, self.rows
        spec = src.spec
        self.parts.append(f"# Report: {src.name}\n")
        if spec is not None and getattr(spec, "description", ""):
            self.parts.append(spec.description.strip() + "\n")
        devices = sorted({str(d) for d in rows.get("device", pd.Series(dtype=object)).dropna()})
        versions = _run_versions(rows)
        finished = pd.to_datetime(rows.get("finished_at"), errors="coerce", utc=True).dropna()
        lines = [
            f"- **Command:** `{self.command}`",
            f"- **Date:** report rendered {_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}"
            + (
                f"; runs finished {finished.min():%Y-%m-%d %H:%M} to {finished.max():%Y-%m-%d %H:%M} UTC"
                if len(finished)
                else ""
            ),
            f"- **Hardware (runs):** {'; '.join(devices) or MISSING}; precision "
            f"{', '.join(sorted({str(p) for p in rows.get('precision', pd.Series(dtype=object)).dropna()})) or MISSING}",
            f"- **Hardware (this report):** {platform.platform()}, {os.cpu_count()} CPU cores",
            f"- **Versions (runs):** {versions or MISSING}",
            f"- **Versions (report):** {_report_versions()}",
        ]
        if src.storage is not None:
            lines.append(f"- **Study storage (Optuna):** `{src.storage}`, study `{src.name}`")
            tracking = src.study_attrs.get("mlflow_tracking_uri")
            parent = src.study_attrs.get("mlflow_parent_run_id")
            if tracking:
                lines.append(f"- **MLflow:** `{tracking}`, parent run `{parent}` (one nested run per trial)")
        else:
            lines.append(f"- **Results folder:** `{src.out_dir}` (runs made without a study)")
        if spec is not None:
            lines.append(
                f"- **Study:** spec `{spec.path or spec.name}`, scale `{src.scale}`, seeds "
                f"{list(spec.seeds_for(src.scale))}, objective `{spec.objective_metric}` ({spec.direction}), "
                f"sampler `{spec.sampler}`, pruner `{spec.pruner}`"
            )
        if src.trial_counts:
            counts = ", ".join(f"{k.lower()} {v}" for k, v in sorted(src.trial_counts.items()))
            lines.append(f"- **Trials:** {counts}; {len(rows)} finished runs reported")
        else:
            lines.append(f"- **Runs:** {len(rows)} finished runs")
        lines.append(
            "- **Conventions:** accuracies in %; cells are `mean ± std (n)` over n seeds, std with ddof=1 "
            "(no ± for n = 1); `–` marks a missing value (never zero). "
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

    def results(self) -> None:
        self.heading("Results")
        shown = self.shown
        rows = []
        numeric = []
        for (label, dataset), runs in shown.groupby(["label", "dataset"], sort=False):
            first = runs.iloc[0]
            d = {"configuration": label, "method": first["method"], "dataset": dataset,
                 "arch": first.get("arch")}  # fmt: skip
            n_row = dict(d, config=first["config"])
            for col, name in ACCURACY_NAMES.items():
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

    def paper(self) -> None:
        self.heading("Paper comparison")
        try:
            paper = load_paper_results(self.paper_path)
        except Exception as exc:  # a missing or unreadable CSV: say so, keep the rest of the report
            self.omit("paper", "Paper comparison", f"the paper results table could not be read ({exc})")
            return
        display, numeric = paper_comparison(
            self.rows, paper, self.src.objective, self.src.direction, self.src.reference
        )
        matched = int((numeric[f"{HEADLINE}_n"] > 0).sum())
        if not matched:
            datasets = ", ".join(sorted(set(self.rows["dataset"])))
            methods = ", ".join(sorted(set(self.rows["method"])))
            self.omit("paper", "Paper comparison",
                      f"no paper row matches our runs (methods {methods}; datasets {datasets})")  # fmt: skip
            return
        scale = f" at scale `{self.src.scale}`" if self.src.scale else ""
        self.parts.append(
            f"Every row of `paper_results.csv` ({len(paper)} rows; {matched} matched by our runs{scale}). "
            f"Two accuracy columns, each named: **{ACCURACY_COLUMNS['final_test_acc']}** (our headline) and "
            f"**{ACCURACY_COLUMNS['max_test_acc']}** (selected on test, like the peers' scripts and "
            "likely the CAW-Conv paper's single runs). Δ = our mean − the paper's value. The paper's std is "
            "as published; ours is over n seeds (ddof=1). `our runs` gives the setting behind our numbers: "
            "when it is not the paper's recipe (cpu scale: narrow, few epochs, a subset), the difference "
            "measures the budget, not a reproduction.\n"
        )
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
        deltas = paired_deltas(shown, ["dataset"], "label", ref, HEADLINE)
        agg = aggregate(shown, ["dataset", "label"], HEADLINE)
        table = agg.merge(deltas, on=["dataset", "label"], how="left")
        table["cell"] = cells(table)
        table["delta"] = delta_cells(table)
        table.loc[table["label"] == ref, "delta"] = "reference"
        datasets = list(dict.fromkeys(table["dataset"]))
        display = pd.DataFrame({"configuration": self.labels})
        method_of = self.rows.groupby("label")["method"].first()
        display.insert(1, "method", display["configuration"].map(method_of))
        for ds in datasets:
            sub = table[table["dataset"] == ds].set_index("label")
            prefix = f"{ds}: " if len(datasets) > 1 else ""
            display[f"{prefix}final-epoch test"] = display["configuration"].map(sub["cell"]).fillna(MISSING)
            display[f"{prefix}Δ vs {ref} (paired seeds)"] = (
                display["configuration"].map(sub["delta"]).fillna(MISSING)
            )
        self.parts.append(
            f"Full configuration `{ref}` first, each variant with its paired-seed difference to it "
            "(mean ± std of the per-seed differences, n = seeds both ran), DeeperForward and the backprop "
            "reference last. Accuracy: final-epoch test (choices on validation).\n"
        )
        self.table("ablation", display, table.drop(columns=["cell", "delta"]))

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
        self.parts.append(f"The {len(display)} best configurations by mean `{obj}` over seeds.\n")
        self.table("configurations", display, stats)

    def _numeric_params(self) -> list[str]:
        out = []
        for col in [c for c in self.rows.columns if c.startswith("param:")]:
            values = pd.to_numeric(self.rows[col], errors="coerce")
            if values.notna().all() and values.nunique() > 1:
                out.append(col)
        return out

    def _dimension(self, key: str) -> Any:
        for d in getattr(self.src.spec, "search_space", ()) or ():
            if d.key == key:
                return d
        return None

    def sensitivity(self) -> None:
        self.heading("Sensitivity")
        params = self._numeric_params()
        if not params:
            self.omit("sensitivity", "Sensitivity plots", "the study searched no numeric parameter")
            return
        for col in params:
            key = col.split(":", 1)[1]
            dim = self._dimension(key)
            values = pd.to_numeric(self.rows[col])
            spread = bool(values.min() > 0 and values.max() / values.min() >= 10)  # a decade or more
            log_x = bool(dim.log) if dim is not None and dim.type != "categorical" else spread
            points = self.rows[["label", "seed", "final_val_acc", HEADLINE]].copy()
            points[key] = values
            note = "other searched parameters vary between points" if len(params) > 1 else ""
            path = figures.sensitivity(
                points, key, self.labels, log_x, self.fig_path(f"sensitivity_{key}"), note
            )
            agg_val = aggregate(points, ["label", key], "final_val_acc")
            agg_test = aggregate(points, ["label", key], HEADLINE)
            merged = agg_val.merge(agg_test, on=["label", key], suffixes=("_val", "_test")).sort_values(
                ["label", key]
            )
            name = f"sensitivity_{_slug(key)}"
            merged.to_csv(self.folder / "tables" / f"{name}.csv", index=False)
            self.report.tables[name] = merged
            self.parts.append(
                f"**{key}** ({'log' if log_x else 'linear'} axis): mean line and sd band over seeds, one line "
                f"per configuration label; {len(merged)} points. "
                f"_CSV: [tables/{name}.csv](tables/{name}.csv)_\n"
            )
            self.figure(name, path, f"accuracy vs {key}")

    def importance(self) -> None:
        study = self.src.study
        self.heading("Parameter importance")
        if study is None:
            self.omit("importance", "Parameter importance", "the runs do not come from an Optuna study")
            self.omit("parallel", "Parallel-coordinate plot", "the runs do not come from an Optuna study")
            return
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        varying = sorted({k for t in trials for k in t.params
                          if len({json_key(u.params.get(k)) for u in trials}) > 1})  # fmt: skip
        if len(varying) < 2 or len(trials) < 4:
            self.omit(
                "importance", "Parameter importance",
                f"it needs at least two varied parameters and four complete trials "
                f"(found {len(varying)} varied: {', '.join(varying) or 'none'}; {len(trials)} complete)",
            )  # fmt: skip
            self._parallel(study, varying, trials)
            return
        results, notes = {}, []
        import optuna

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
            self.omit("importance", "Parameter importance", "; ".join(notes))
        else:
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
        self._parallel(study, varying, trials)

    def _parallel(self, study: Any, varying: list[str], trials: list) -> None:
        self.heading("Parallel coordinates")
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
            f"Parallel coordinates of the complete trials (Optuna, matplotlib backend), coloured by "
            f"the objective `{self.src.objective}`.\n"
        )
        self.figure("parallel_coordinate", path, "parallel coordinates")

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
            "seeds, with the std (ddof=1) in the companion heatmap. Where other parameters also vary, each "
            "cell is the configuration with the best mean validation objective.\n"
        )
        all_tables = []
        for label, dataset, arch in groups:
            sub = rows[(rows["label"] == label) & (rows["dataset"] == dataset) & (rows["arch"] == arch)]
            sub = best_configs(sub, ["depth_label", "width"], self.src.objective, self.src.direction)
            agg = aggregate(sub, ["depth_label", "width"], HEADLINE)
            agg.insert(0, "label", label)
            agg.insert(1, "dataset", dataset)
            agg.insert(2, "arch", arch)
            all_tables.append(agg)
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
            self.figure(name, figures.heatmap_pair(means, stds, title, self.fig_path(name)), title)
        table = pd.concat(all_tables, ignore_index=True)
        table.to_csv(self.folder / "tables" / "depth_width.csv", index=False)
        self.report.tables["depth_width"] = table
        self.parts.append("_CSV: [tables/depth_width.csv](tables/depth_width.csv)_\n")

    # ------------------------------------------------------------------ per-epoch views
    def _per_dataset(self) -> list[tuple[str, pd.DataFrame]]:
        return [(ds, runs) for ds, runs in self.shown.groupby("dataset", sort=False)]

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
            frame = pd.DataFrame(records)
            name = f"learning_curves_{dataset}"
            path = figures.learning_curves(frame, self.labels, self.fig_path(name))
            frame.to_csv(self.folder / "tables" / f"{_slug(name)}.csv", index=False)
            self.report.tables[name] = frame
            self.parts.append(
                f"**{dataset}**: per epoch, mean ± sd over seeds (training loss: the `ce` term averaged "
                "over units where the method has one, else all terms). "
                f"_CSV: [tables/{_slug(name)}.csv](tables/{_slug(name)}.csv)_\n"
            )
            self.figure(name, path, f"learning curves on {dataset}")
            made = True
        if not made:
            self.omit("curves", "Learning curves", "no run folder with metrics.jsonl was found")

    def per_layer(self) -> None:
        self.heading("Per-layer accuracy")
        made = False
        for dataset, runs in self._per_dataset():
            records = [
                {"label": r["label"], "seed": r["seed"], "layer": i, "acc": v}
                for r in runs.to_dict("records") for i, v in enumerate(r.get("per_layer_test_acc") or [])
                if isinstance(v, (int, float))
            ]  # fmt: skip
            if not records:
                continue
            frame = pd.DataFrame(records)
            name = f"per_layer_{dataset}"
            agg = aggregate(frame, ["label", "layer"], "acc")
            agg.to_csv(self.folder / "tables" / f"{_slug(name)}.csv", index=False)
            self.report.tables[name] = agg
            self.parts.append(
                f"**{dataset}**: final-epoch test accuracy of each layer's own class scores, mean ± sd over "
                f"seeds (backprop is one unit: its single point is its head). _CSV: [tables/{_slug(name)}.csv](tables/{_slug(name)}.csv)_\n"
            )
            self.figure(name, figures.per_layer(frame, self.labels, self.fig_path(name)), name)
            made = True
        if not made:
            self.omit("per_layer", "Per-layer accuracy", "the result rows hold no per-layer accuracy")

    def lcs(self) -> None:
        self.heading("LCS layer weights")
        made = False
        for dataset, runs in self._per_dataset():
            records = []
            for run in runs.to_dict("records"):
                for r in read_metrics(run["run_path"]):
                    state = (r.get("readout_state") or {}).get("lcs") or {}
                    for layer, w in enumerate(state.get("weights") or []):
                        records.append({"label": run["label"], "seed": run["seed"],
                                        "epoch": int(r["epoch"]) + 1, "layer": layer, "weight": w})  # fmt: skip
            if not records:
                continue
            frame = pd.DataFrame(records)
            name = f"lcs_weights_{dataset}"
            agg = aggregate(frame, ["label", "epoch", "layer"], "weight")
            agg.to_csv(self.folder / "tables" / f"{_slug(name)}.csv", index=False)
            self.report.tables[name] = agg
            self.parts.append(
                f"**{dataset}**: the loss-aware (LCS) weight of each layer per epoch (softmax of minus each "
                f"layer's mean training CE), mean over seeds. "
                f"_CSV: [tables/{_slug(name)}.csv](tables/{_slug(name)}.csv)_\n"
            )
            self.figure(name, figures.lcs_weights(frame, self.labels, self.fig_path(name)), name)
            made = True
        if not made:
            self.omit("lcs", "LCS weights", "no run used the `lcs` readout (main or extra)")

    def assignment(self) -> None:
        self.heading("Channel-to-class assignment")
        jobs = []
        for (label, dataset), runs in self.shown.groupby(["label", "dataset"], sort=False):
            run = runs.sort_values("seed").iloc[0]
            arrays = read_artifacts(run["run_path"])
            layers = sorted(
                k for k in arrays if re.fullmatch(r"layer\d+_assignment", k) and arrays[k].ndim == 2
            )
            if not layers:
                continue
            picked = list(dict.fromkeys([layers[0], layers[len(layers) // 2], layers[-1]]))
            matrices = [(k.split("_")[0], np.asarray(arrays[k], dtype=float)) for k in picked]
            title = f"{label} on {dataset}, seed {run['seed']}: first, middle and last layer"
            jobs.append((f"assignment_{label}_{dataset}", matrices, title))
        if not jobs:
            self.omit("assignment", "Assignment matrices", "no run saved a `layerNN_assignment` artifact")
            return
        self.parts.append(
            "Assignment matrices A (channels x classes; each row sums to 1) after the last epoch, from "
            "`artifacts.npz` of the first seed of each configuration, channels in their own order.\n"
        )
        for name, matrices, title in jobs:
            self.figure(name, figures.assignments(matrices, title, self.fig_path(name)), title)

    def cost(self) -> None:
        self.heading("Cost")
        rows = self.shown
        if "train_images_per_s" not in rows.columns or not rows["train_images_per_s"].notna().any():
            self.omit("cost", "Cost table", "the runs recorded no throughput")
            return
        group = ["device", "dataset", "label"]
        parts = []
        for col in ("train_images_per_s", "eval_images_per_s", "peak_cuda_mem_mib", "wall_time_s"):
            agg = aggregate(rows, group, col).rename(
                columns={"mean": f"{col}_mean", "std": f"{col}_std", "n": f"{col}_n"}
            )
            parts.append(agg)
        table = parts[0]
        for p in parts[1:]:
            table = table.merge(p, on=group)
        params = rows.groupby(group)["n_params"].first().reset_index() if "n_params" in rows else None
        if params is not None:
            table = table.merge(params, on=group, how="left")
        bp_labels = [lab for lab in self.labels if lab in self._backprop_labels()]
        if self.src.reference in bp_labels:  # several backprop configurations: the study's reference
            bp_labels = [self.src.reference]
        bp = table[table["label"].isin(bp_labels[:1])]
        bp = bp.groupby(["device", "dataset"])["train_images_per_s_mean"].first()
        table["train_speed_vs_backprop"] = [
            (m / bp.get((d, ds)) if (d, ds) in bp.index and bp.get((d, ds)) else None)
            for m, d, ds in zip(table["train_images_per_s_mean"], table["device"], table["dataset"])
        ]
        order = {lab: i for i, lab in enumerate(self.labels)}
        table = (
            table.assign(_k=table["label"].map(order))
            .sort_values(["device", "dataset", "_k"])
            .drop(columns="_k")
        )
        display = pd.DataFrame({
            "device": table["device"], "dataset": table["dataset"], "configuration": table["label"],
            "train images/s": [format_cell(m, s, n, 1) for m, s, n in zip(
                table["train_images_per_s_mean"], table["train_images_per_s_std"], table["train_images_per_s_n"])],
            "eval images/s": [format_cell(m, s, n, 1) for m, s, n in zip(
                table["eval_images_per_s_mean"], table["eval_images_per_s_std"], table["eval_images_per_s_n"])],
            "peak CUDA memory (MiB)": [format_cell(m, s, n, 0) for m, s, n in zip(
                table["peak_cuda_mem_mib_mean"], table["peak_cuda_mem_mib_std"], table["peak_cuda_mem_mib_n"])],
            "train speed / backprop": [(format_number(v) + "x") if format_number(v) != MISSING else MISSING
                                       for v in table["train_speed_vs_backprop"]],
            "wall time (s)": [format_cell(m, s, n, 1) for m, s, n in zip(
                table["wall_time_s_mean"], table["wall_time_s_std"], table["wall_time_s_n"])],
            "parameters": [f"{int(v):,}" if isinstance(v, (int, float)) and not math.isnan(v) else MISSING
                           for v in table.get("n_params", [None] * len(table))],
        })  # fmt: skip
        has_bp = bool(len(bp))
        self.parts.append(
            "Throughput per configuration (median over epochs per run, then mean ± std over seeds): training "
            "images/s, and evaluation images/s (validation, plus test where evaluated, per second of "
            "evaluation). Peak CUDA memory is `torch.cuda.max_memory_allocated` (– on CPU). "
            + (
                f"Training speed relative to the backprop reference (`{bp_labels[0]}`) on the same device and "
                "dataset. "
                if has_bp
                else "No backprop reference ran in this study, so no ratio is given. "
            )  # fmt: skip
            + "Timings on shared machines are noisy; compare ratios from the same study.\n"
        )
        self.table("cost", display.reset_index(drop=True), table.reset_index(drop=True))

    def _backprop_labels(self) -> set[str]:
        """Labels of the reference method's configurations (``Method.reference``: backprop)."""
        is_reference = self.rows["method"].map(lambda m: method_report_info(str(m)).reference)
        return set(self.rows.loc[is_reference.astype(bool), "label"])

    def runs(self) -> None:
        self.heading("Runs")
        cols = [c for c in ("study", "trial", "label", "method", "variant", "dataset", "arch", "depth", "width",
                            "seed", "config", "readout", "epochs", "n_train", "final_val_acc", "final_test_acc",
                            "test_acc_at_best_val", "max_test_acc", "max_test_epoch", "wall_time_s",
                            "train_images_per_s", "eval_images_per_s", "peak_cuda_mem_bytes", "n_params",
                            "device", "precision", "mlflow_run_id", "run_dir", "finished_at")
                if c in self.rows.columns]  # fmt: skip
        params = [c for c in self.rows.columns if c.startswith("param:")]
        frame = self.rows[cols[:11] + params + cols[11:]]
        (self.folder / "tables").mkdir(parents=True, exist_ok=True)
        frame.to_csv(self.folder / "tables" / "runs.csv", index=False)
        self.report.tables["runs"] = frame
        self.parts.append(
            f"One row per finished run ({len(frame)}): [tables/runs.csv](tables/runs.csv). Run folders "
            f"(config.yaml, metrics.jsonl, artifacts.npz) are under `{self.src.out_dir}/runs/`.\n"
        )


def json_key(value: Any) -> str:
    return repr(value)


def _params_text(row: pd.Series) -> str:
    items = [(c.split(":", 1)[1], row[c]) for c in row.index if c.startswith("param:")]
    parts = [f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in items if v is not None]
    return ", ".join(parts) or MISSING


def _run_versions(rows: pd.DataFrame) -> str:
    seen = []
    for v in rows.get("versions", pd.Series(dtype=object)).dropna():
        if isinstance(v, dict):
            text = ", ".join(f"{k} {val}" for k, val in sorted(v.items()))
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
    source: ReportSource, folder: Path | str, command: str = "", paper_results: Path | None = None
) -> Report:
    """Write the report folder for ``source`` and return what was written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for sub in ("tables", "figures"):  # a re-render must not leave stale files behind
        target = folder / sub
        if target.is_dir():
            for f in target.iterdir():
                if f.is_file():
                    f.unlink()
    (folder / "tables").mkdir(exist_ok=True)
    return _Builder(source, folder, command, paper_results).build()
