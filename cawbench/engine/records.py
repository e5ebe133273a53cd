"""What a run records: epoch means of the loss terms, the result row, unit statistics, artifacts, versions.

The divergence check on the epoch means is :mod:`cawbench.divergence`."""

from __future__ import annotations

import io
import math
import platform
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import cawbench
from cawbench.config import RunConfig
from cawbench.data import PreparedData
from cawbench.engine.devices import device_name
from cawbench.engine.stats import StepStats
from cawbench.method import LocalNetwork
from cawbench.provenance import provenance
from cawbench.results import atomic_write_bytes


@dataclass
class EpochMeans:
    """An epoch's loss terms read back from the device in one transfer: the record's entries (``record``:
    ``train_loss``, ``train_loss_weighted``, ``train_acc``), and for the divergence check every term's epoch
    mean and first-batch value per layer, None where a layer did not train it (``means``, ``firsts``)."""

    record: dict[str, Any]
    means: dict[str, list[float | None]]
    firsts: dict[str, list[float | None]]


def epoch_means(stats: StepStats, weights: Mapping[str, float]) -> EpochMeans:
    """Epoch means of every unit's loss terms (over the steps it trained), unweighted and weighted, their
    first-batch values, and every unit's training accuracy, read back in one transfer. ``weights``: the
    epoch's loss weights (used when they held all epoch; under ``train.budget_schedules`` the weighted
    means are summed every step)."""
    names, values, weighted, firsts = stats.means()
    if weighted is None:  # the weights held for the whole epoch: weighted mean = weight x mean
        weighted = [[weights.get(k, 1.0) * v for k, v in zip(names, row)] for row in values]
    acc = (100 * stats.correct / stats.seen.clamp(min=1)).tolist()
    seen_list = stats.seen.tolist()

    def trained(rows: list[list[float]]) -> dict[str, list[float | None]]:
        return {
            k: [
                rows[i][j] if stats.active_steps[i] and k in stats.logged[i] else None
                for i in range(len(rows))
            ]
            for j, k in enumerate(names)
        }

    def by_term(rows: list[list[float]]) -> dict[str, list[float | None]]:
        return {k: [_nan_to_none(rows[i][j]) for i in range(len(rows))] for j, k in enumerate(names)}

    record = {
        "train_loss": by_term(values),
        "train_loss_weighted": by_term(weighted),
        "train_acc": [acc[i] if seen_list[i] else None for i in range(len(acc))],
    }
    return EpochMeans(record, trained(values), trained(firsts))


def result_row(
    cfg: RunConfig,
    history: list[dict[str, Any]],
    data: PreparedData,
    net: LocalNetwork,
    device: torch.device,
    bf16: bool,
    run_dir: Path,
    wall: float,
) -> dict[str, Any]:
    """The run's row of the results table (``results.jsonl``): what ran, the accuracies (final epoch with
    every choice made on validation; at the best validation epoch; best over epochs), cost and versions."""
    hist = history
    main = cfg.readout.name
    final = hist[-1]
    vals = [r["val_acc"][main] for r in hist]
    best = int(np.nanargmax(vals)) if not all(math.isnan(v) for v in vals) else len(hist) - 1
    tests = [r.get("test_acc", {}).get(main, float("nan")) for r in hist]
    max_test = int(np.nanargmax(tests)) if not all(math.isnan(t) for t in tests) else len(hist) - 1
    plan_depth = cfg.model.depth
    return {
        "method": cfg.method,
        "variant": cfg.variant,
        "recipe": cfg.recipe,
        "dataset": cfg.data.name,
        "arch": cfg.model.arch,
        "depth": plan_depth,
        "width": cfg.model.width,
        "seed": cfg.train.seed,
        "config_hash": cfg.config_hash(),
        "readout": main,
        "epochs": len(hist),
        "epochs_planned": cfg.train.epochs,
        "truncated": len(hist) < cfg.train.epochs,  # stopped by train.time_limit_s
        "n_train": len(data.train),
        "n_val": len(data.val),
        "n_test": len(data.test),
        "final_val_acc": final["val_acc"][main],
        "final_test_acc": final.get("test_acc", {}).get(main),
        "best_val_epoch": best,
        "best_val_acc": vals[best],
        "test_acc_at_best_val": tests[best],
        "max_test_acc": tests[max_test],
        "max_test_epoch": max_test,
        "final_test_acc_by_readout": final.get("test_acc", {}),
        "per_layer_test_acc": final.get("test_acc_layers"),
        "per_layer_val_acc": final["val_acc_layers"],
        "wall_time_s": wall,
        "train_images_per_s": float(np.median([r["train_images_per_s"] or 0 for r in hist])),
        "peak_cuda_mem_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "n_params": sum(p.numel() for p in net.parameters()),
        "device": device_name(device),
        "precision": "bf16" if bf16 else "fp32",
        "versions": software_versions(),
        **provenance(),  # git_commit, git_dirty, machine
        "run_dir": str(run_dir),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def save_artifacts(net: LocalNetwork, run_dir: Path) -> None:
    """Every unit's ``artifacts()`` (e.g. CAW-Conv's assignment matrices) in ``artifacts.npz``."""
    arrays = {}
    for i, unit in enumerate(net.units):
        for name, tensor in unit.artifacts().items():
            arrays[f"layer{i:02d}_{name}"] = tensor.detach().float().cpu().numpy()
    if arrays:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        atomic_write_bytes(run_dir / "artifacts.npz", buffer.getvalue())


def unit_stats(net: LocalNetwork) -> dict[str, list[float | None]]:
    """Every unit's ``epoch_stats()`` (e.g. the temperature), as name -> one value per unit."""
    per_unit = [u.epoch_stats() for u in net.units]
    names = sorted({k for s in per_unit for k in s})
    return {k: [s.get(k) for s in per_unit] for k in names}


def accuracy_pct(scores: torch.Tensor, labels: torch.Tensor) -> float:
    if len(labels) == 0:
        return float("nan")
    return 100.0 * (scores.argmax(-1) == labels).float().mean().item()


def percent(values: list[float]) -> list[float]:
    return [100.0 * v for v in values]


def _nan_to_none(v: float) -> float | None:
    return None if isinstance(v, float) and math.isnan(v) else v


def default_run_name(cfg: RunConfig) -> str:
    width = f"{cfg.model.width:g}"
    return f"{cfg.method}-{cfg.data.name}-{cfg.model.arch}-w{width}-s{cfg.train.seed}-{cfg.config_hash()[:8]}"


def run_dir_for(cfg: RunConfig) -> Path:
    """The folder of a run: ``<out_dir>/runs/<run_name>`` (the default name when none is set)."""
    return Path(cfg.out_dir) / "runs" / (cfg.run_name or default_run_name(cfg))


def software_versions() -> dict[str, str]:
    """cawbench, torch and Python versions, and the git commit of this checkout when there is one."""
    out = {"cawbench": cawbench.__version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent,
        ).stdout.strip()  # fmt: skip
        if sha:
            out["git"] = sha
    except (OSError, subprocess.SubprocessError):
        pass
    return out
