"""Shared test helpers: tiny configurations, a temporary results folder, no downloads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# Before torch starts its thread pool: idle OpenMP threads sleep instead of spinning, which keeps
# 2-thread runs fast when the cores are shared (measured: a tiny op 1.4-8 ms spinning vs 15 us passive).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests never download: a missing dataset must fail fast with the paths tried.
os.environ.setdefault("CAWBENCH_NO_DOWNLOAD", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not (FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist); CI installs it",
)


def make_config(method: str = "backprop", out_dir: Path | str = "runs", **overrides: Any):
    """A resolved RunConfig: the method's smoke settings on synthetic data, then ``overrides`` (dotted keys
    with ``__`` for dots, e.g. ``optim__lr=0.1``)."""
    from cawbench.method import get_method, resolve_config

    cls = get_method(method)
    layer = {"method": method, "data.name": "synthetic", "train.epochs": 1, "train.device": "cpu",
             "train.progress": False, "out_dir": str(out_dir), **cls.smoke_overrides}  # fmt: skip
    layer.update({k.replace("__", "."): v for k, v in overrides.items()})
    return resolve_config(layer)


@pytest.fixture
def tiny_config(tmp_path: Path):
    def build(method: str = "backprop", **overrides: Any):
        return make_config(method, tmp_path / "runs", **overrides)

    return build
