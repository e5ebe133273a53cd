"""Report figures: matplotlib (Agg, no display), seaborn for banded lines, Optuna's matplotlib backend for
the contour and parallel-coordinate plots.

Rules every figure follows, so that it reads at a glance:

- bands are mean ± sd (ddof=1) over seeds, the same statistic the tables show;
- legends and colour bars sit outside the data (right of the panels), never over it, and are never cut
  off (figures are saved with a tight bounding box);
- at most :data:`MAX_SERIES` series share a panel: more labels are split over rows of panels (facets);
- panels that compare configurations share their axes' scales (and heatmaps one colour scale);
- a quantity over epochs is only drawn with at least two epochs (the report shows a table otherwise).
"""

from __future__ import annotations

import math
import textwrap
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display, no browser: PNGs only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

DPI = 110
MAX_SERIES = 8
ACC_LABELS = {
    "final_val_acc": "final-epoch validation accuracy (%)",
    "final_test_acc": "final-epoch test accuracy (%)",
}


def _save(fig: plt.Figure, path: Path, laid_out: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not laid_out:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tight_layout's warning about outside legends
            fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def chunks(labels: Sequence[str], size: int = MAX_SERIES) -> list[list[str]]:
    """Labels split into groups of at most ``size`` (balanced: 9 labels -> 5 + 4, not 8 + 1)."""
    labels = list(labels)
    if not labels:
        return []
    groups = math.ceil(len(labels) / size)
    per = math.ceil(len(labels) / groups)
    return [labels[i : i + per] for i in range(0, len(labels), per)]


def palette(labels: Sequence[str]) -> dict[str, Any]:
    """One colour per label, stable over every figure of a report (tab10, then tab20, then husl)."""
    labels = list(labels)
    name = "tab10" if len(labels) <= 10 else "tab20" if len(labels) <= 20 else "husl"
    return dict(zip(labels, sns.color_palette(name, len(labels))))


def _group_colours(group: list[str], colours: dict[str, Any], total: int) -> dict[str, Any]:
    """The report-wide colours while they are distinct (<= 10 labels); beyond, tab10 within each facet, so
    the lines that share a panel never get neighbouring shades of one gradient."""
    if total <= 10:
        return colours
    return dict(zip(group, sns.color_palette("tab10", len(group))))


def _legend_right(ax: plt.Axes, title: str | None = None) -> None:
    handles, names = ax.get_legend_handles_labels()
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    if handles:
        ax.legend(handles, names, fontsize=7, title=title, title_fontsize=7, loc="upper left",
                  bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)  # fmt: skip


def _row_legend(row_axes: Sequence[plt.Axes]) -> None:
    """One legend per row of panels, right of its last panel, naming every series drawn in any panel of the
    row (a series may be missing from some panels, the last one included)."""
    handles: dict[str, Any] = {}
    for ax in row_axes:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(name, handle)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    if handles:
        row_axes[-1].legend(list(handles.values()), list(handles), fontsize=7, loc="upper left",
                            bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)  # fmt: skip


def _integer_x(ax: plt.Axes) -> None:
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))


def _plain_y(ax: plt.Axes) -> None:
    """Tick labels that read as values: no "1e-5 + 7.93" offset, 6 significant digits at most."""
    if ax.get_yscale() == "linear":
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.6g}"))


# ------------------------------------------------------------------------------------------ lines
def banded_lines(
    frame: pd.DataFrame,
    x: str,
    panels: list[tuple[str, str]],
    labels: list[str],
    colours: dict[str, Any],
    path: Path,
    xlabel: str,
    title: str = "",
) -> Path:
    """Mean ± sd (over seeds) of each ``panels`` column against ``x``: one column of panels per quantity,
    one row per group of at most MAX_SERIES labels, the legend right of each row."""
    present = [lab for lab in labels if lab in set(frame["label"])]
    groups = chunks(present)
    fig, axes = plt.subplots(len(groups), len(panels), figsize=(4.6 * len(panels) + 1.8, 3.3 * len(groups)),
                             squeeze=False, sharex=True)  # fmt: skip
    for col, (value, ylabel) in enumerate(panels):
        ymin, ymax = frame[value].min(), frame[value].max()
        # Values decades apart (e.g. FF's goodness loss beside cross-entropies) flatten every other series on
        # a linear axis: such a column gets a log axis.
        log = bool(pd.notna(ymin) and ymin > 0 and ymax / ymin > 30)
        for row, group in enumerate(groups):
            ax = axes[row][col]
            sub = frame[frame["label"].isin(group) & frame[value].notna()]
            if not sub.empty:
                sns.lineplot(data=sub, x=x, y=value, hue="label", hue_order=group, palette=_group_colours(group, colours, len(present)),
                             errorbar="sd", marker="o", markersize=4, ax=ax)  # fmt: skip
            if log:
                ax.set_yscale("log")
                ax.set_ylim(ymin / 1.2, ymax * 1.2)
            elif pd.notna(ymin) and pd.notna(ymax) and ymax > ymin:  # the same y range in every row
                pad = 0.05 * (ymax - ymin)
                ax.set_ylim(ymin - pad, ymax + pad)
            # The quantity names the column (a title over the top row): long names never overrun the
            # neighbouring panel as y labels would.
            if row == 0:
                ax.set_title(textwrap.fill(ylabel, 48), fontsize=8)
            ax.set_ylabel("")
            ax.set_xlabel(xlabel if row == len(groups) - 1 else "")
            _integer_x(ax)
            _plain_y(ax)
            ax.grid(alpha=0.3)
            if sub.empty:  # no series of this row has the quantity (e.g. backprop has no entropy term)
                ax.set_axis_off()
    for row_axes in axes:
        _row_legend(row_axes)
    for col in range(len(panels)):  # the lowest drawn panel of each column carries its x axis
        drawn = [axes[row][col] for row in range(len(groups)) if axes[row][col].axison]
        if drawn:
            drawn[-1].tick_params(labelbottom=True)
            drawn[-1].set_xlabel(xlabel)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def per_layer_over_epochs(
    frame: pd.DataFrame, panels: list[tuple[str, str]], title: str, path: Path, log_y: Sequence[str] = ()
) -> Path:
    """One panel per quantity: its value per layer over epochs (mean over seeds), one line per layer
    coloured by depth; the colour bar (layer index) right of the panels."""
    n_layers = int(frame["layer"].max()) + 1
    cmap = plt.get_cmap("viridis")
    norm = matplotlib.colors.Normalize(vmin=0, vmax=max(1, n_layers - 1))
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols + 1.0, 3.2 * rows), squeeze=False,
                             layout="constrained")  # fmt: skip
    for ax, (value, ylabel) in zip(axes.flat, panels):
        sub = frame[frame[value].notna()] if value in frame.columns else frame.iloc[0:0]
        mean = sub.groupby(["layer", "epoch"])[value].mean().reset_index()
        for layer, line in mean.groupby("layer"):
            ax.plot(line["epoch"], line[value], color=cmap(norm(layer)), lw=1.2,
                    marker="." if len(line) < 30 else None)  # fmt: skip
        positive = len(mean) and (mean[value] > 0).all()
        if value in log_y and positive and mean[value].max() / mean[value].min() > 30:  # layers decades apart
            ax.set_yscale("log")
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(ylabel, fontsize=8)
        ax.set_xlabel("epoch")
        _integer_x(ax)
        _plain_y(ax)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    mappable = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
    bar = fig.colorbar(mappable, ax=axes.ravel().tolist(), label="layer (0 = first)", fraction=0.03, pad=0.01)
    bar.locator = matplotlib.ticker.MaxNLocator(integer=True)
    bar.update_ticks()
    fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")  # no tight_layout: the shared colour bar owns a column
    plt.close(fig)
    return path


def per_layer(
    layers: pd.DataFrame, labels: list[str], colours: dict[str, Any], path: Path, ylabel: str
) -> Path:
    """A per-layer quantity (mean ± sd over seeds) against the layer index, one line per label."""
    return banded_lines(layers, "layer", [("value", ylabel)], labels, colours, path, "layer (0 = first)")


# ------------------------------------------------------------------------------------------ heatmaps
def sort_channels(matrix: np.ndarray) -> np.ndarray:
    """Rows (channels) grouped by their argmax class, strongest first within a class: a committed
    assignment shows as a staircase of blocks."""
    best = matrix.argmax(axis=1)
    order = np.lexsort((-matrix.max(axis=1), best))
    return matrix[order]


def assignments(
    jobs: list[tuple[str, list[tuple[str, np.ndarray]]]], title: str, path: Path, vmax: float = 1.0
) -> Path:
    """Assignment matrices (channels x classes, rows summing to 1), one row of panels per configuration
    (first, middle, last layer), channels sorted by argmax class, all on one colour scale 0..vmax."""
    n_cols = max(len(m) for _, m in jobs)
    fig, axes = plt.subplots(len(jobs), n_cols, figsize=(2.6 * n_cols + 1.2, 2.6 * len(jobs)),
                             squeeze=False, layout="constrained")  # fmt: skip
    norm = matplotlib.colors.PowerNorm(gamma=0.5, vmin=0.0, vmax=vmax)
    image = None
    for row, (label, matrices) in enumerate(jobs):
        for col in range(n_cols):
            ax = axes[row][col]
            if col >= len(matrices):
                ax.set_visible(False)
                continue
            name, matrix = matrices[col]
            image = ax.imshow(sort_channels(matrix), aspect="auto", cmap="viridis", norm=norm,
                              interpolation="nearest")  # fmt: skip
            ax.set_title(f"{label}: {name} ({matrix.shape[0]} ch)", fontsize=7)
            ax.set_xticks(range(matrix.shape[1]))
            ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.tick_params(labelsize=6)
            ax.set_xlabel("class" if row == len(jobs) - 1 else "", fontsize=7)
            ax.set_ylabel("channel (by argmax class)" if col == 0 else "", fontsize=7)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.025, pad=0.01,
                     label="assignment weight A[c, k] (shared scale, sqrt)")  # fmt: skip
    fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def heatmap_pair(
    means: pd.DataFrame,
    stds: pd.DataFrame,
    title: str,
    path: Path,
    scales: dict[str, tuple[float, float]] | None = None,
) -> Path:
    """Annotated heatmap of means beside a companion heatmap of stds (depth rows x width columns);
    ``scales``: the (min, max) of "mean" and "std" shared by every configuration's pair."""
    scales = scales or {}
    mean_range, std_range = scales.get("mean", (None, None)), scales.get("std", (None, None))
    fig, axes = plt.subplots(1, 2, figsize=(4.0 + 1.3 * means.shape[1] * 2, 1.6 + 0.7 * means.shape[0]))
    sns.heatmap(means.astype(float), annot=True, fmt=".2f", cmap="viridis", ax=axes[0], vmin=mean_range[0],
                vmax=mean_range[1], cbar_kws={"label": "mean test acc. (%)"})  # fmt: skip
    axes[0].set_title("mean over seeds")
    sns.heatmap(stds.astype(float), annot=True, fmt=".2f", cmap="magma_r", ax=axes[1], vmin=std_range[0],
                vmax=std_range[1], cbar_kws={"label": "std (ddof=1)"})  # fmt: skip
    axes[1].set_title("std over seeds")
    for ax in axes:
        ax.set_xlabel("width multiplier")
        ax.set_ylabel("blocks per stage (depth)")
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------ searches
def sensitivity_slices(
    points: pd.DataFrame,
    params: list[dict[str, Any]],
    metric: str,
    labels: list[str],
    colours: dict[str, Any],
    path: Path,
    note: str = "",
) -> Path:
    """One panel per searched parameter: every run (each seed) as a small dot, each configuration's
    mean over seeds as a larger ring, and the paper's default value as a dashed vertical line.

    ``params``: dicts with ``key`` (the column in ``points``), ``log`` and ``default`` (None: unmarked)."""
    cols = min(3, len(params))
    rows = math.ceil(len(params) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols + 1.6, 3.2 * rows), squeeze=False, sharey=True)
    present = [lab for lab in labels if lab in set(points["label"])]
    marked_default = False
    for ax, p in zip(axes.flat, params):
        key = p["key"]
        for i, label in enumerate(present):
            sub = points[points["label"] == label]
            shift = _dodge(points[key], bool(p.get("log")), i, len(present))
            ax.scatter(shift(sub[key]), sub[metric], s=14, alpha=0.6, color=colours[label], linewidths=0)
            means = sub.groupby("config").agg(x=(key, "first"), y=(metric, "mean"))
            ax.scatter(shift(means["x"]), means["y"], s=40, facecolors="none", edgecolors=colours[label],
                       linewidths=1.3, label=label)  # fmt: skip
        if p.get("log"):
            positive = points[key][points[key] > 0]
            if (points[key] <= 0).any() and not positive.empty:
                ax.set_xscale("symlog", linthresh=float(positive.min()))
            else:
                ax.set_xscale("log")
                _plain_log_ticks(ax.xaxis, float(positive.max() / positive.min()))
        elif (points[key].dropna() % 1 == 0).all():  # an integer parameter (e.g. depth): no 1.25 ticks
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        default = p.get("default")
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            marked_default = True
            ax.axvline(float(default), color="black", ls="--", lw=1.0, label="paper default")
        ax.set_xlabel(key + (" (log)" if p.get("log") else ""), fontsize=8)
        ax.grid(alpha=0.3)
    for r in range(rows):
        axes[r][0].set_ylabel(ACC_LABELS.get(metric, metric), fontsize=8)
    for ax in list(axes.flat)[len(params) :]:
        ax.set_visible(False)
    handles = [
        matplotlib.lines.Line2D([], [], ls="", marker="o", ms=4, color="grey", alpha=0.6, label="one run (seed)"),
        matplotlib.lines.Line2D([], [], ls="", marker="o", ms=7, mfc="none", color="grey",
                                label="configuration mean"),
    ]  # fmt: skip
    if marked_default:
        handles.append(matplotlib.lines.Line2D([], [], ls="--", color="black", label="paper default"))
    if len(present) > 1:
        handles += [matplotlib.patches.Patch(color=colours[lab], label=lab) for lab in present]
    fig.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 0.95), frameon=False)
    fig.suptitle("accuracy against each searched parameter (slices: other parameters vary)"
                 + (f"\n{note}" if note else ""), fontsize=9)  # fmt: skip
    return _save(fig, path)


def _plain_log_ticks(axis: Any, ratio: float) -> None:
    """Log ticks written as plain numbers (0.02, not 2 x 10^-2): at 1, 2 and 5 per decade where the data
    span at most two decades (``ratio`` = max / min; matplotlib would label every minor tick there, and the
    labels overprint), at the decades beyond that."""
    subs = (1.0, 2.0, 5.0) if ratio <= 100 else (1.0,)
    axis.set_major_locator(matplotlib.ticker.LogLocator(subs=subs))
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _dodge(values: pd.Series, log: bool, index: int, count: int):
    """Side-by-side offsets for the labels of a parameter with few distinct values (a grid), so that
    their points do not hide each other; continuous (sampled) parameters are left where they are."""
    distinct = np.unique(values.dropna())
    if count < 2 or len(distinct) > 6:
        return lambda x: x
    step = 0.015 * (index - (count - 1) / 2)
    if log and (distinct > 0).all():
        span = np.log10(distinct.max() / distinct.min()) or 1.0
        return lambda x: x * 10 ** (step * span)
    span = float(distinct.max() - distinct.min()) or 1.0
    return lambda x: x + step * span


def importance(table: pd.DataFrame, path: Path) -> Path:
    """Horizontal bars: parameter importance per evaluator (each evaluator's importances sum to 1)."""
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.7 * table["parameter"].nunique()))
    sns.barplot(data=table, y="parameter", x="importance", hue="evaluator", ax=ax, errorbar=None)
    ax.set_xlabel("importance (normalised per evaluator)")
    ax.set_ylabel("")
    ax.set_xlim(0, 1)
    _legend_right(ax)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def _optuna_figure(
    draw: Any, size: tuple[float, float], path: Path, lay_out: Callable[[plt.Figure], None] | None = None
) -> Path:
    """Draw with Optuna's matplotlib backend. It switches the global style to ggplot: the rc context
    keeps that to its own figure. ``lay_out`` replaces the default tight layout where a figure needs its
    own (e.g. a colour bar that must not overlap the panels)."""
    import optuna

    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)
        result = draw()
        axes = np.atleast_1d(result)
        fig = axes.flat[0].figure
        for ax in fig.axes:  # log axes: label the decades only, or the minor labels overprint
            for axis, scale in ((ax.xaxis, ax.get_xscale()), (ax.yaxis, ax.get_yscale())):
                if scale == "log":
                    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        fig.set_size_inches(*size)
        if lay_out is not None:
            lay_out(fig)
        return _save(fig, path, laid_out=lay_out is not None)


def parallel_coordinate(study: Any, params: list[str], path: Path) -> Path:
    """Optuna's parallel-coordinate plot, matplotlib backend (no plotly, no browser)."""
    import optuna

    return _optuna_figure(
        lambda: optuna.visualization.matplotlib.plot_parallel_coordinate(study, params=params),
        (max(7.0, 2.2 * (len(params) + 1)), 4.2), path, _keep_optunas_layout,
    )  # fmt: skip


def contour(study: Any, params: list[str], path: Path) -> Path:
    """Optuna's contour plot of the objective over every pair of ``params`` (a matrix for > 2)."""
    import optuna

    side = 3.6 if len(params) <= 2 else 2.6 * len(params)
    return _optuna_figure(
        lambda: optuna.visualization.matplotlib.plot_contour(study, params=params),
        (side + 1.5, side), path, _colour_bar_in_own_column,
    )  # fmt: skip


def _keep_optunas_layout(fig: plt.Figure) -> None:
    """Parallel coordinates: Optuna places one axes per coordinate beside a colour bar; a tight layout
    would move the axes under the bar."""


def _colour_bar_in_own_column(fig: plt.Figure) -> None:
    """Optuna attaches the contour matrix's colour bar by shrinking the panels, which a tight layout undoes,
    leaving the bar over the last column: lay the panels out in the left part, then add the bar to the
    right of them."""
    bars = [ax._colorbar for ax in fig.axes if getattr(ax, "_colorbar", None) is not None]
    mappable = bars[0].mappable if bars else None
    label = bars[0].ax.get_ylabel() if bars else ""
    for bar in bars:
        bar.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig.tight_layout(rect=(0, 0, 0.88, 1))
    if mappable is not None:
        fig.colorbar(mappable, cax=fig.add_axes((0.92, 0.15, 0.015, 0.7)), label=label)


def optimisation_history(trials: pd.DataFrame, direction: str, objective: str, path: Path) -> Path:
    """The objective of each trial by trial number (complete trials as dots, pruned ones as crosses at
    their last reported value) and the best complete value so far."""
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    done = trials[trials["state"] == "COMPLETE"].sort_values("number")
    pruned = trials[trials["state"] == "PRUNED"]
    ax.scatter(done["number"], done["value"], s=16, color="tab:blue", label=f"complete ({len(done)})")
    if len(pruned):
        ax.scatter(pruned["number"], pruned["last_intermediate"], s=22, marker="x", color="tab:red",
                   label=f"pruned ({len(pruned)}), last reported value")  # fmt: skip
    best = done["value"].cummax() if direction == "maximize" else done["value"].cummin()
    ax.step(done["number"], best, where="post", color="black", lw=1.2, label="best so far")
    ax.set_xlabel("trial number (each seed of a configuration is a trial)")
    ax.set_ylabel(ACC_LABELS.get(objective, objective), fontsize=8)
    _integer_x(ax)
    ax.grid(alpha=0.3)
    _legend_right(ax)
    return _save(fig, path)


def intermediate_values(curves: pd.DataFrame, objective: str, path: Path) -> Path:
    """The per-epoch value each trial reported to the pruner: complete trials in blue, pruned in red."""
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for (_, state), line in curves.groupby(["number", "state"], sort=True):
        colour, alpha = ("tab:red", 0.8) if state == "PRUNED" else ("tab:blue", 0.35)
        ax.plot(line["step"] + 1, line["value"], color=colour, alpha=alpha, lw=1.0, marker=".")
    counts = curves.drop_duplicates("number")["state"].value_counts()
    handles = [
        matplotlib.lines.Line2D([], [], color="tab:blue", label=f"complete ({counts.get('COMPLETE', 0)})"),
        matplotlib.lines.Line2D([], [], color="tab:red", label=f"pruned ({counts.get('PRUNED', 0)})"),
    ]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"reported {objective} (%)", fontsize=8)
    _integer_x(ax)
    ax.grid(alpha=0.3)
    return _save(fig, path)
