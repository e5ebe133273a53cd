"""Layers shared by methods: plain PyTorch modules, each with the maths of its docstring on every device.

- :class:`BulkDropout`: ``nn.Dropout`` whose mask, on the CPU, is drawn in bulk (several times cheaper).
- :class:`ReluDropoutPool`: ReLU -> dropout -> per-channel pooling of a conv output, with the pooled
  activity and the activation it came from; on the CPU in training one autograd node with a hand-written
  backward (the channel-wise units' layer; equal to the plain composition, ``tests/test_layers.py``).
- :class:`PlanLayer`: one row of an architecture plan as an ordinary layer (the backprop reference and
  the CaFo/CwComp blocks), with :func:`length_normalise` (FF's normalisation of a layer's input).

Kernels are PyTorch's own: what is written by hand here is the autograd bookkeeping of elementwise work and
reductions that is part of a layer's maths, never a convolution.

Why bulk draws: on the CPU, PyTorch draws a dropout mask one element at a time from its Mersenne Twister
(``bernoulli_``): measured here, 42 ms for a 128x40x32x32 activation, a fifth of a whole CAW-Conv training
step at width 0.4. :func:`bulk_uniform` draws 32 random bits per element in bulk from NumPy's SFC64 generator
(seeded from torch's generator, so runs stay reproducible from ``train.seed``) and turns their low 23 bits
into a float32 ``u`` uniform on [1, 2) (two in-place NumPy integer ops: no ATen op for the bit work). An element is kept when ``u > 1 + p``:
an i.i.d. Bernoulli(1 - p) keep decision (p exact to 2**-23), survivors scaled by 1 / (1 - p). Only the
random stream differs from ``nn.Dropout``'s. Keeping ``u`` as a float lets a kept-or-zero select be one
``threshold_backward`` pass instead of a boolean ``where``, ~10x slower here. On other devices the native
fused dropout kernel is used (bulk host draws would only add a copy).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cawbench.archs import LayerSpec

MANTISSA_BITS = 0x007FFFFF  # the low 23 bits of each draw become the mantissa
ONE_F32_BITS = 0x3F800000  # exponent of 1.0: mantissa bits m give the float 1 + m * 2**-23
#: (mean, max, min) pooling coefficients: pooled = a * mean + b * max - d * min over H x W
MEAN_POOL = (1.0, 0.0, 0.0)


# --------------------------------------------------------------------------------- bulk-drawn dropout
def bulk_uniform(shape: torch.Size) -> torch.Tensor:
    """i.i.d. uniform float32 on [1, 2) with ``shape`` (CPU, step 2**-23), seeded from torch's generator."""
    n = int(np.prod(shape))
    # One draw from torch's (seeded) CPU generator, read with tolist(): a host tensor's value without an
    # ATen op (``.item()`` would dispatch one).
    (seed,) = torch.randint(0, 2**62, (1,)).tolist()
    bits = np.random.SFC64(seed).random_raw((n + 1) // 2).view(np.int32)[:n]
    # The bit work in NumPy, in place: the same bits as torch's bitwise ops, and no ATen op per step for it.
    np.bitwise_and(bits, MANTISSA_BITS, out=bits)
    np.bitwise_or(bits, ONE_F32_BITS, out=bits)
    return torch.from_numpy(bits.view(np.float32).reshape(tuple(shape)))


def keep_threshold(p: float) -> float:
    """Keep an element when its :func:`bulk_uniform` draw is above this (1 + p)."""
    return 1.0 + p


def bulk_keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """An i.i.d. Bernoulli(1 - p) boolean keep mask of ``shape`` (CPU), seeded from torch's generator."""
    return bulk_uniform(shape) > keep_threshold(p)


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


def _check_p(p: float) -> float:
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return float(p)


class BulkDropout(nn.Module):
    """``nn.Dropout(p)``: on the CPU with a bulk-drawn mask (see the module docstring), elsewhere native.

    ``bulk = False`` runs the native kernel on the CPU too: ``torch.native_dropout``, the one op F.dropout
    dispatches to on a GPU (on the CPU F.dropout is four ops), for op counts with a GPU step's structure
    (``cawbench bench --unfused-layers``); its random stream is torch's, not the bulk draws'.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = _check_p(p)
        self.bulk = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        if not self.bulk:
            return torch.native_dropout(x, self.p, True)[0]
        keep = bulk_keep_mask(x.shape, self.p)
        return _ApplyMask.apply(x, keep, 1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


# --------------------------------------------------------------------------------- ReLU -> dropout -> pool
class _MixPool(torch.autograd.Function):
    """a * mean + b * max - d * min over the last dim of [B, C, HW], with a hand-written backward.

    The extremes' gradient goes to one position each (the first maximal/minimal one, like ``torch.max``
    along a dim): the backward is one broadcast write plus two [B, C] scatters, ~3x cheaper on CPU than
    autograd through ``amax``/``amin`` (which builds equality masks and tie counts).
    """

    @staticmethod
    def forward(ctx: Any, flat: torch.Tensor, a: float, b: float, d: float) -> torch.Tensor:
        high, at_high = flat.max(-1)
        low, at_low = flat.min(-1)
        ctx.save_for_backward(at_high, at_low)
        ctx.shape, ctx.coef = flat.shape, (a, b, d)
        return a * flat.mean(-1) + b * high - d * low

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        at_high, at_low = ctx.saved_tensors
        a, b, d = ctx.coef
        positions = ctx.shape[-1]
        out = ((a / positions) * grad).unsqueeze(-1).expand(ctx.shape).contiguous()
        out.scatter_add_(-1, at_high.unsqueeze(-1), (b * grad).unsqueeze(-1))
        out.scatter_add_(-1, at_low.unsqueeze(-1), (-d * grad).unsqueeze(-1))
        return out, None, None, None


def channel_pool(y: torch.Tensor, coef: tuple[float, float, float] = MEAN_POOL) -> torch.Tensor:
    """Per-channel pooled activity [B, C] of y [B, C, H, W]: ``a * mean + b * max - d * min`` over H x W
    (``coef = (a, b, d)``; the mean alone for :data:`MEAN_POOL`). The gradient of max and min goes to the
    first extreme position, as autograd through ``torch.max(dim)`` does."""
    flat = y.flatten(2)
    if coef == MEAN_POOL:
        return flat.mean(-1)
    return _MixPool.apply(flat, *coef)


class _FusedReluDropoutPool(torch.autograd.Function):
    """ReLU, dropout and pooling of a conv output z in one autograd node (the CPU training path).

    Forward: y = scale * ReLU(z) where the draw u > threshold, else 0; pooled as :func:`channel_pool`.
    Backward: dL/dz = scale * [y > 0] * dL/dy, with dL/dy the pooling's gradient (a/HW everywhere, plus b and
    -d at the first maximal and minimal positions), in one ``threshold_backward`` pass plus two [B, C]
    scatters. ``y > 0`` is exactly "z > 0 and kept", so y is the only full-size tensor saved; the plain
    composition (ReLU, dropout's boolean select, :class:`_MixPool`) makes several more full passes and
    saves two (ReLU's output and the keep mask).
    """

    @staticmethod
    def forward(
        ctx: Any, z: torch.Tensor, u: torch.Tensor, threshold: float, scale: float, coef: tuple[float, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # z where kept, else 0, written over the draws u (no second full-size buffer)
        y = torch.ops.aten.threshold_backward.grad_input(z, u, threshold, grad_input=u)
        y.clamp_min_(0).mul_(scale)
        flat = y.flatten(2)
        a, b, d = coef
        if b == 0 and d == 0:
            pooled = flat.mean(-1) if a == 1 else a * flat.mean(-1)
            ctx.save_for_backward(y)
        else:
            high, at_high = flat.max(-1)
            low, at_low = flat.min(-1)
            pooled = a * flat.mean(-1) + b * high - d * low
            ctx.save_for_backward(y, at_high, at_low, high > 0, low > 0)
        ctx.scale, ctx.coef = scale, coef
        ctx.mark_non_differentiable(y)
        # y's gradient is never used: no full-size zeros for it in backward (autograd would materialise one)
        ctx.set_materialize_grads(False)
        return pooled, y

    @staticmethod
    def backward(
        ctx: Any, grad: torch.Tensor | None, _grad_y: Any
    ) -> tuple[torch.Tensor | None, None, None, None, None]:
        if grad is None:  # nothing reached the pooled activity (grads are not materialised)
            return None, None, None, None, None
        y, *extremes = ctx.saved_tensors
        a, b, d = ctx.coef
        flat = y.flatten(2)
        spread = grad * (ctx.scale * a / flat.shape[-1])
        grad_z = torch.ops.aten.threshold_backward(spread.unsqueeze(-1).expand(flat.shape), flat, 0)
        if extremes:
            at_high, at_low, high_live, low_live = extremes
            # a ReLU'd or dropped extreme (y = 0) passes no gradient, as the mask above would do
            grad_z.scatter_add_(-1, at_high.unsqueeze(-1), (grad * (ctx.scale * b) * high_live).unsqueeze(-1))
            grad_z.scatter_add_(-1, at_low.unsqueeze(-1), (grad * (-ctx.scale * d) * low_live).unsqueeze(-1))
        return grad_z.view(y.shape), None, None, None, None


class ReluDropoutPool(nn.Module):
    """``y = dropout_p(relu(z))`` and its per-channel pooled activity ``channel_pool(y, coef)``.

    ``forward(z)`` returns ``(pooled [B, C], y [B, C, H, W])``; y carries no gradient of its own (the
    channel-wise units pass it on detached). In training on the CPU in float32 with p > 0 the three steps
    run as one autograd node (:class:`_FusedReluDropoutPool`: the same values and draws as the composition,
    gradients equal to float32 rounding, one full-size tensor saved instead of three; 1.15-1.25x on a whole
    CAW-Conv step at width 1.0). Everywhere else, the plain composition: ReLU (in place: z is the conv's
    output, kept by nobody), :class:`BulkDropout`, :func:`channel_pool`. ``fused = False`` forces the
    composition (for A/B timing and tests), as does ``dropout.bulk = False`` (native dropout draws).
    """

    def __init__(self, p: float, coef: tuple[float, float, float] = MEAN_POOL) -> None:
        super().__init__()
        self.dropout = BulkDropout(p)
        self.coef = tuple(float(c) for c in coef)
        self.fused = True

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.dropout.p
        # float32 only: the draws are float32 uniforms (bf16 would round p to 1/128)
        fusable = self.fused and self.dropout.bulk  # the node's draws are bulk draws
        if fusable and self.training and p > 0 and z.device.type == "cpu" and z.dtype == torch.float32:
            u = bulk_uniform(z.shape)
            return _FusedReluDropoutPool.apply(z, u, keep_threshold(p), 1.0 / (1.0 - p), self.coef)
        y = self.dropout(F.relu(z, inplace=True))
        return channel_pool(y, self.coef), y

    def extra_repr(self) -> str:
        return f"p={self.dropout.p}, coef={self.coef}"


# --------------------------------------------------------------------------------- plan rows as layers
def length_normalise(x: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """Divide each row of x [B, D] by its L2 length (``l2``) or its RMS (``rms``), without subtracting the
    mean (only the direction passes): FF's normalisation of a layer's input."""
    length = x.norm(dim=1, keepdim=True)
    if kind == "rms":
        length = length / x.shape[1] ** 0.5
    return x / (length + eps)


def pool2x2(kind: str | None, x: torch.Tensor, ceil: bool = True) -> torch.Tensor:
    """A plan's 2x2 stride-2 pooling (``avg`` or ``max``; None passes x through)."""
    if kind == "avg":
        return F.avg_pool2d(x, 2, 2, ceil_mode=ceil)
    if kind == "max":
        return F.max_pool2d(x, 2, 2, ceil_mode=ceil)
    return x


class PlanLayer(nn.Module):
    """One plan row as an ordinary layer: [pool] -> conv/linear -> norm -> ReLU -> [pool], or, for rows with
    ``norm_position="post_pool"`` (CaFo, CwComp), [pool] -> conv (with bias) -> ReLU -> [pool] -> norm.

    ``norm``: ``batch`` (BatchNorm), ``none``, or ``rms``/``l2`` (FF's length normalisation of the layer's
    input instead of a norm after it)."""

    def __init__(self, spec: LayerSpec, norm: str) -> None:
        super().__init__()
        self.spec = spec
        self.input_norm = norm if norm in ("rms", "l2") else None
        self.post_pool_norm = spec.norm_position == "post_pool"
        # a bias before the ReLU is not cancelled by a norm placed after the pool
        bias = norm != "batch" or self.post_pool_norm
        if spec.kind == "conv":
            self.op = nn.Conv2d(
                spec.in_channels, spec.out_channels, spec.kernel, spec.stride, spec.padding,
                groups=spec.groups, bias=bias,
            )  # fmt: skip
            batch_norm: type[nn.Module] = nn.BatchNorm2d
        else:
            self.op = nn.Linear(spec.in_channels, spec.out_channels)
            batch_norm = nn.BatchNorm1d
        self.norm = batch_norm(spec.out_channels, eps=spec.norm_eps) if norm == "batch" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if spec.kind == "linear":
            x = x.flatten(1)
        x = pool2x2(spec.pool_before, x, spec.pool_ceil)
        if self.input_norm is not None:  # FF's length normalisation of the layer input, per sample
            eps = 1e-8 if self.input_norm == "rms" else 1e-4
            x = length_normalise(x.flatten(1), self.input_norm, eps).view_as(x)
        if self.post_pool_norm:
            return self.norm(pool2x2(spec.pool_after, F.relu(self.op(x)), spec.pool_ceil))
        x = F.relu(self.norm(self.op(x)))
        return pool2x2(spec.pool_after, x, spec.pool_ceil)
