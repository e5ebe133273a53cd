"""Dropout for the CPU with its keep mask drawn in bulk: the same maths as ``nn.Dropout``, ~4x cheaper.

On the CPU, PyTorch draws a dropout mask one element at a time from its Mersenne Twister (``bernoulli_``):
measured here, 42 ms for a 128x40x32x32 activation, a fifth of a whole CAW-Conv training step at width 0.4.
:class:`BulkDropout` draws 32 random bits per element in bulk from NumPy's SFC64 generator (seeded from
torch's generator, so runs stay reproducible from ``train.seed``) and keeps an element when its bits are
>= round(p * 2**32): an i.i.d. Bernoulli(1 - p) keep mask (p exact to 2**-32, finer than the 2**-24 of a
float32 uniform), scaled by 1 / (1 - p), with the boolean mask saved for backward like ``native_dropout``.
Only the random stream differs from ``nn.Dropout``'s. The engine swaps it in for ``nn.Dropout`` on the CPU
(``train.fast_dropout``); elsewhere the fused native kernels are used.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn


def bulk_keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """An i.i.d. Bernoulli(1 - p) boolean mask of ``shape`` (CPU), seeded from torch's default generator."""
    n = int(np.prod(shape))
    seed = int(torch.randint(0, 2**62, (1,)).item())  # one draw from torch's (seeded) CPU generator
    bits = np.random.SFC64(seed).random_raw((n + 1) // 2).view(np.uint32)[:n]
    return torch.from_numpy(bits >= np.uint32(round(p * 2**32))).view(shape)


class _ApplyMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x * scale, 0.0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad * ctx.scale, 0.0), None, None


class BulkDropout(nn.Module):
    """``nn.Dropout(p)`` with a bulk-drawn mask on the CPU (the native op elsewhere)."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return torch.nn.functional.dropout(x, self.p, True)
        keep = bulk_keep_mask(x.shape, self.p)
        return _ApplyMask.apply(x, keep, 1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def swap_dropout(module: nn.Module) -> int:
    """Replace every plain ``nn.Dropout`` (not Dropout2d & co., which drop whole channels) with
    :class:`BulkDropout` of the same p; returns how many were swapped."""
    swapped = 0
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout and child.p > 0 and not child.inplace:
                setattr(parent, name, BulkDropout(child.p))
                swapped += 1
    return swapped
