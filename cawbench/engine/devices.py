"""Devices, precision and optimisers: where a run computes and with which update rule."""

from __future__ import annotations

import contextlib
import os
import platform
from typing import Any

import torch
from torch import nn

from cawbench.config import ConfigError, OptimConfig


def resolve_device(name: str) -> torch.device:
    """The device ``train.device`` names (``auto``: CUDA, else MPS, else the CPU), or a ConfigError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"train.device={name!r} is not a device; use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available here; use auto or cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"train.device={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s); "
            "use cuda:0 .. cuda:N-1, auto or cpu"
        )
    mps = getattr(torch.backends, "mps", None)
    if device.type == "mps" and not (mps is not None and mps.is_available()):
        raise ConfigError(f"train.device={name!r} but MPS (Apple GPU) is not available here; use auto or cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"train.device={name!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return device


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether ``train.precision`` means bf16 autocast on ``device`` (``auto``: on CUDA only)."""
    if precision == "bf16":
        return True
    return precision == "auto" and device.type == "cuda"


def autocast(device: torch.device, enabled: bool, cache: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast when enabled; ``cache=False`` under CUDA-graph capture (cast weights must be re-made)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=cache)


def make_optimizer(
    params: list[nn.Parameter], cfg: OptimConfig, *, fused: bool = False, capturable: bool = False
) -> torch.optim.Optimizer:
    """The optimiser of one unit. ``fused``: one CUDA kernel per step (same update rule as the default
    implementation, rounding aside); ``capturable``: step count kept on the device (CUDA-graph capture)."""
    fast: dict[str, Any] = {"fused": True} if fused else {}
    if cfg.name in ("adam", "adamw"):
        cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
        if capturable:
            fast["capturable"] = True
        return cls(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, **fast)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **fast)


def fused_optimizer_devices() -> list[str]:
    """Devices with fused optimiser kernels, the CPU included: there the fused AdamW step over 23 M
    parameters took 12 ms against foreach's 60 ms (2 cores; ~1% of a width-1.0 CAW-Conv step)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return list(_get_fused_kernels_supported_devices())


def device_name(device: torch.device) -> str:
    """The device as result rows name it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
