"""Report figures: matplotlib (Agg, no display) and seaborn with ``errorbar="sd"`` so that every band is
the same mean ± std (ddof=1) over seeds that the tables show."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display, no browser: PNGs only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

DPI = 110
ACC_LABELS = {
    "final_val_acc": "final-epoch validation accuracy (%)",
    "final_test_acc": "final-epoch test accuracy (%)",
}


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _palette(labels: list[str]) -> dict[str, Any]:
    colours = sns.color_palette("tab10" if len(labels) <= 10 else "husl", len(labels))
    return dict(zip(labels, colours))


def sensitivity(
    points: pd.DataFrame, param: str, labels: list[str], log_x: bool, path: Path, note: str = ""
) -> Path:
    """Accuracy vs one searched parameter: a mean line and an sd band per configuration label."""
    metrics = [m for m in ACC_LABELS if m in points.columns and points[m].notna().any()]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.8), squeeze=False)
    present = [lab for lab in labels if lab in set(points["label"])]
    for ax, metric in zip(axes[0], metrics):
        sns.lineplot(
            data=points, x=param, y=metric, hue="label", hue_order=present, palette=_palette(present),
            errorbar="sd", marker="o", ax=ax,
        )  # fmt: skip
        if log_x:
            positive = points[param][points[param] > 0]
            if (points[param] <= 0).any() and not positive.empty:
                ax.set_xscale("symlog", linthresh=float(positive.min()))
            else:
                ax.set_xscale("log")
        ax.set_xlabel(param + (" (log scale)" if log_x else ""))
        ax.set_ylabel(ACC_LABELS[metric])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title=None)
    fig.suptitle(f"sensitivity to {param}: mean ± sd over seeds" + (f"\n{note}" if note else ""), fontsize=9)
    return _save(fig, path)


def importance(table: pd.DataFrame, path: Path) -> Path:
    """Horizontal bars: parameter importance per evaluator (each evaluator's importances sum to 1)."""
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.7 * table["parameter"].nunique()))
    sns.barplot(data=table, y="parameter", x="importance", hue="evaluator", ax=ax, errorbar=None)
    ax.set_xlabel("importance (normalised per evaluator)")
    ax.set_ylabel("")
    ax.set_xlim(0, 1)
    ax.legend(fontsize=7, title=None, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def parallel_coordinate(study: Any, params: list[str], path: Path) -> Path:
    """Optuna's parallel-coordinate plot, matplotlib backend (no plotly, no browser)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = optuna.visualization.matplotlib.plot_parallel_coordinate(study, params=params)
    fig = ax.figure
    fig.set_size_inches(max(6.0, 1.8 * (len(params) + 1)), 4.2)
    return _save(fig, path)


def heatmap_pair(means: pd.DataFrame, stds: pd.DataFrame, title: str, path: Path) -> Path:
    """Annotated heatmap of means beside a companion heatmap of stds (depth rows x width columns)."""
    fig, axes = plt.subplots(1, 2, figsize=(4.0 + 1.3 * means.shape[1] * 2, 1.6 + 0.7 * means.shape[0]))
    sns.heatmap(means.astype(float), annot=True, fmt=".2f", cmap="viridis", ax=axes[0],
                cbar_kws={"label": "mean test acc. (%)"})  # fmt: skip
    axes[0].set_title("mean over seeds")
    sns.heatmap(stds.astype(float), annot=True, fmt=".2f", cmap="magma_r", ax=axes[1],
                cbar_kws={"label": "std (ddof=1)"})  # fmt: skip
    axes[1].set_title("std over seeds")
    for ax in axes:
        ax.set_xlabel("width multiplier")
        ax.set_ylabel("blocks per stage (depth)")
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def learning_curves(curves: pd.DataFrame, labels: list[str], path: Path) -> Path:
    """Validation accuracy and mean training loss per epoch, mean ± sd over seeds, one line per label."""
    present = [lab for lab in labels if lab in set(curves["label"])]
    panels = [("val_acc", "validation accuracy (%), main readout")]
    if "train_loss" in curves.columns and curves["train_loss"].notna().any():
        panels.append(("train_loss", "training loss (ce term, mean over units)"))
    if "test_acc" in curves.columns and curves["test_acc"].notna().sum() > curves["label"].nunique():
        panels.append(("test_acc", "test accuracy (%), main readout"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 3.8), squeeze=False)
    for ax, (col, ylabel) in zip(axes[0], panels):
        sns.lineplot(data=curves, x="epoch", y=col, hue="label", hue_order=present,
                     palette=_palette(present), errorbar="sd", marker="o", ax=ax)  # fmt: skip
        ax.set_ylabel(ylabel)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title=None)
    return _save(fig, path)


def per_layer(layers: pd.DataFrame, labels: list[str], path: Path) -> Path:
    """Final-epoch test accuracy of each layer's own scores, mean ± sd over seeds."""
    present = [lab for lab in labels if lab in set(layers["label"])]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    sns.lineplot(data=layers, x="layer", y="acc", hue="label", hue_order=present,
                 palette=_palette(present), errorbar="sd", marker="o", ax=ax)  # fmt: skip
    ax.set_xlabel("layer (scoring unit, 0 = first)")
    ax.set_ylabel("test accuracy of the layer's scores (%)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title=None)
    return _save(fig, path)


def lcs_weights(weights: pd.DataFrame, labels: list[str], path: Path) -> Path:
    """LCS layer weights per epoch (mean over seeds), one panel per label, one line per layer coloured
    by depth (a colour bar names the layers)."""
    present = [lab for lab in labels if lab in set(weights["label"])]
    cols = min(3, len(present))
    rows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.4 * rows), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, label in zip(axes.flat, present):
        sub = weights[weights["label"] == label]
        mean = sub.groupby(["layer", "epoch"])["weight"].mean().reset_index()
        n_layers = int(mean["layer"].max()) + 1
        for layer, line in mean.groupby("layer"):
            colour = cmap(layer / max(1, n_layers - 1))
            ax.plot(line["epoch"], line["weight"], color=colour, marker="." if len(line) < 30 else None)
        norm = matplotlib.colors.Normalize(vmin=0, vmax=max(1, n_layers - 1))
        fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="layer")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("LCS weight")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present) :]:
        ax.set_visible(False)
    return _save(fig, path)


def assignments(matrices: list[tuple[str, np.ndarray]], title: str, path: Path) -> Path:
    """Channel-to-class assignment matrices (channels x classes, each row sums to 1) as heatmaps."""
    fig, axes = plt.subplots(1, len(matrices), figsize=(3.4 * len(matrices), 4.2), squeeze=False)
    for ax, (name, matrix) in zip(axes[0], matrices):
        image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(1e-9, float(matrix.max())),
                          interpolation="nearest")  # fmt: skip
        ax.set_title(f"{name} ({matrix.shape[0]} ch x {matrix.shape[1]} classes)", fontsize=8)
        ax.set_xlabel("class")
        ax.set_ylabel("channel")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.yaxis.get_major_locator().set_params(integer=True)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)
