"""The one seeding function of the project."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all devices); optionally ask for deterministic kernels.

    Data order does not depend on this global state: loaders draw from their own generator seeded with
    ``(seed, epoch)`` (see :func:`epoch_generator`), so a resumed run sees the same batches.
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def derive_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from several parts (same parts, same seed, on every platform)."""
    import hashlib

    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & (2**63 - 1)


def epoch_generator(seed: int, epoch: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator that orders (and augments) one epoch's batches."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, "epoch", epoch))
    return gen
