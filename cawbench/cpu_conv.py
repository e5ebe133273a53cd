"""Faster float32 convolutions for CPU training: the same convolution, its kernels picked by shape.

On the CPU, oneDNN's speed depends a lot on the memory layout and on which of its kernels a shape lands on.
Measured on this project's 2-core AVX-512 machine (``scripts/conv_layouts.py``, batch 128, ResNet-17 shapes;
``reports/bench/cpu-conv-layouts.md``), for convs of 100 channels and more:

- the forward of a 32x32 map runs faster in channels_last (NHWC), even counting the conversion of the input
  and output;
- the weight gradient of a small output map (4x4 and below) with many channels (800) is 1.2-1.5x faster
  written as a *forward* convolution of the transposed tensors (batch and channels swapped; see
  :func:`weight_grad_transposed`) than oneDNN's own weight-gradient kernel;
- the weight gradient of stride-1 maps of 8x8 and more with 200 channels and more, and of any conv whose
  forward ran in NHWC, is a little faster in NHWC.
- stride-1 3x3 convs of 200 channels and more, or of 100 and more on 32x32 maps and larger, run forward and
  weight gradient as Winograd F(4x4, 3x3) (``cawbench/winograd.py``; 4x fewer multiply-adds) where the map's
  sides are multiples of 4: at width 1.0 0.61x (400 @8x8) to 0.79x (100 @32x32) the plain conv's time and
  0.66-0.81x F(2x2, 3x3)'s. Counting the layout conversions, 160 @8x8 and 320 @4x4 (width 0.4) came out
  between 0.8x and 1.06x from run to run; the rule leaves 160 channels direct. Maps with even sides not
  divisible by 4 take F(2x2, 3x3) from 200 channels at 16x16 and below (0.56-0.87x the direct plans where it
  was measured).
- Winograd rounds differently from the direct sums. Against float64 (``scripts/conv_layouts.py``'s second
  table), F(4x4)'s forward is off by about 1e-5 of the largest output (direct: 3e-7; F(2x2): 5e-7) and its
  weight gradient by about 7e-6 (direct: 2e-6 to 8e-6). Winograd is among the algorithms cuDNN's autotuner
  picks for float32 convs, and this is far below bf16's or TF32's rounding. ``train.cpu_conv=direct`` keeps
  the direct plans only.

At ResNet-17 width 0.4 (40 to 320 channels) no direct plan helped (the A/B runs were 0.90-0.97x with NHWC
weight gradients on its 160-channel layers); only its three 320-channel 4x4 convs take Winograd.

:class:`TunedConv2d` is an ``nn.Conv2d`` (same parameters and state dict) whose training forward and backward
follow those rules; :func:`swap_convs` turns a network's plain convs into it (the engine does this on the CPU
unless ``train.cpu_conv=plain``). The choice is a fixed function of the shape, never timed at run time, so
runs stay bit-for-bit reproducible. The gradients are the same sums taken in another order (or, for Winograd,
by an exact identity): they agree with the plain conv's to float32 rounding (``tests/test_cpu_conv.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cawbench import winograd
from cawbench.archs import _conv_out

_NHWC = torch.channels_last
_plain_only = False  # process-wide, so that pipeline worker threads see it too


@dataclass(frozen=True)
class ConvPlan:
    """How one conv shape runs: the forward's layout and the weight gradient's kernel."""

    forward: str = "nchw"  # nchw | nhwc | winograd2 | winograd4 (F(m x m, 3x3), m = the digit)
    weight_grad: str = "native"  # native (oneDNN's, NCHW) | nhwc | transposed (a forward conv) | winograd2/4

    def usable_for(self, conv: nn.Conv2d, in_hw: tuple[int, ...]) -> bool:
        """Winograd F(m x m) only computes 3x3, stride-1, padding-1 convs of maps whose sides are multiples of
        m; the other plans any conv."""
        tiles = {winograd_tile(part) for part in (self.forward, self.weight_grad)} - {None}
        return all(winograd.applies(conv.kernel_size, conv.stride, conv.padding, in_hw, m) for m in tiles)


def winograd_tile(kernel: str) -> int | None:
    """m of a "winogradm" kernel name; None for the direct kernels."""
    return int(kernel.removeprefix("winograd")) if kernel.startswith("winograd") else None


PLAIN = ConvPlan()
WINOGRAD2 = ConvPlan("winograd2", "winograd2")
WINOGRAD4 = ConvPlan("winograd4", "winograd4")


def plan_for(conv: nn.Conv2d, in_hw: tuple[int, ...], winograd_ok: bool = True) -> ConvPlan:
    """The fixed rule for ``conv`` on an ``in_hw`` map (measured, see the module docstring); PLAIN where
    nothing was measured to help. ``winograd_ok=False`` (``train.cpu_conv=direct``) picks among the direct
    plans only."""
    out_hw = [_conv_out(*args) for args in zip(in_hw, conv.kernel_size, conv.stride, conv.padding)]
    channels = min(conv.in_channels, conv.out_channels)
    if conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros" or channels < 100:
        return PLAIN
    area = in_hw[0] * in_hw[1]
    if winograd_ok:
        # 160 @8 measured 0.87x and 1.06x: left direct
        if (channels >= 200 or area >= 32 * 32) and WINOGRAD4.usable_for(conv, in_hw):
            return WINOGRAD4  # measured 0.61x (400 @8) to 0.79x (100 @32) of plain
        if channels >= 200 and area <= 16 * 16 and WINOGRAD2.usable_for(conv, in_hw):
            return WINOGRAD2  # measured 0.56x (800 @4) to 0.87x (200 @16) of the best direct plan
    forward = "nhwc" if area >= 32 * 32 else "nchw"
    if out_hw[0] * out_hw[1] <= 4 * 4 and channels >= 512:  # measured: 800 channels 1.2-1.5x, 320 none
        weight_grad = "transposed"
    elif forward == "nhwc" or (conv.stride == (1, 1) and out_hw[0] * out_hw[1] >= 8 * 8 and channels >= 200):
        # After an NHWC forward the saved input is NHWC already. Otherwise NHWC paid off from 200 channels
        # (200 @16, 400 @8: 0.89-0.95x); strided 8x8 outputs and 160 @8 were no faster or slower.
        weight_grad = "nhwc"
    else:
        weight_grad = "native"
    return ConvPlan(forward, weight_grad)


def weight_grad_transposed(
    x: torch.Tensor, grad_out: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
    padding: tuple[int, int],
) -> torch.Tensor:  # fmt: skip
    """dW[o, i, a, b] = sum over n, h, w of dy[n, o, h, w] * x_pad[n, i, s*h + a, s*w + b], computed as a
    forward convolution: x with batch and channels swapped ([I, N, H, W]) convolved with dy swapped the same
    way ([O, N, Ho, Wo]) as the kernel, dilated by the stride, giving [I, O, kh, kw], swapped back. The input
    is padded only as far as the sums reach: a stride that does not divide the padded input leaves trailing
    rows no output reads, and cutting them (negative padding) saves computing kernel taps nobody wants."""
    reach = [s * (n - 1) + k for s, n, k in zip(stride, grad_out.shape[-2:], kernel)]
    spare = [size + 2 * p - r for size, p, r in zip(x.shape[-2:], padding, reach)]
    pads = (padding[1], padding[1] - spare[1], padding[0], padding[0] - spare[0])  # left, right, top, bottom
    out = F.conv2d(F.pad(x.transpose(0, 1), pads), grad_out.transpose(0, 1), dilation=stride)
    return out.transpose(0, 1).contiguous()


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """[N, H, W, C] contiguous view of an NCHW-indexed tensor (a copy unless it is channels_last already)."""
    return t.contiguous(memory_format=_NHWC).permute(0, 2, 3, 1)


def _nchw(t: torch.Tensor) -> torch.Tensor:
    """The NCHW-contiguous tensor of an [N, H, W, C] one."""
    return t.permute(0, 3, 1, 2).contiguous()


def _forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv: nn.Conv2d, plan: ConvPlan
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output in NCHW, the input as the conv read it)."""
    if m := winograd_tile(plan.forward):
        x_nhwc = x.contiguous(memory_format=_NHWC)
        return _nchw(winograd.conv3x3(x_nhwc.permute(0, 2, 3, 1), weight, bias, m)), x_nhwc
    if plan.forward == "nhwc":
        x_nhwc = x.contiguous(memory_format=_NHWC)
        w_nhwc = weight.contiguous(memory_format=_NHWC)
        y = F.conv2d(x_nhwc, w_nhwc, bias, conv.stride, conv.padding).contiguous()
        return y, x_nhwc
    return F.conv2d(x, weight, bias, conv.stride, conv.padding), x


class _TunedConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, conv: nn.Conv2d, plan: ConvPlan):  # noqa: ANN001, ANN205
        if not plan.usable_for(conv, x.shape[-2:]):
            raise ValueError(f"conv plan {plan} cannot compute {conv} on a {tuple(x.shape[-2:])} map")
        y, x_used = _forward(x, weight, bias, conv, plan)
        # Keep one copy of the input: the NHWC one when the weight gradient wants it, else the caller's.
        keep = x_used if plan.weight_grad == "nhwc" or winograd_tile(plan.weight_grad) else x
        ctx.save_for_backward(keep, weight)
        ctx.conv, ctx.plan, ctx.has_bias = conv, plan, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        x, weight = ctx.saved_tensors
        conv, plan = ctx.conv, ctx.plan
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        args = (conv.stride, conv.padding, conv.dilation, False, [0, 0], conv.groups)
        forward_m, weight_grad_m = winograd_tile(plan.forward), winograd_tile(plan.weight_grad)
        dy_nhwc = _nhwc(grad_out) if forward_m or weight_grad_m else None
        if need_x:  # backprop only; layer-local units detach their input
            if forward_m:  # dx: the conv of dy with the flipped, transposed kernel
                grad_x = _nchw(winograd.conv3x3(dy_nhwc, weight.transpose(0, 1).flip(2, 3), None, forward_m))
            else:
                grad_x = torch.ops.aten.convolution_backward(
                    grad_out, x, weight, None, *args, [True, False, False]
                )[0].contiguous()
        if need_w:
            if weight_grad_m:
                grad_w = winograd.weight_grad3x3(_nhwc(x), dy_nhwc, weight_grad_m)
            elif plan.weight_grad == "transposed":
                grad_w = weight_grad_transposed(x, grad_out, conv.kernel_size, conv.stride, conv.padding)
            elif plan.weight_grad == "nhwc":
                grad_w = torch.ops.aten.convolution_backward(
                    grad_out.contiguous(memory_format=_NHWC), x, weight.contiguous(memory_format=_NHWC),
                    None, *args, [False, True, False],
                )[1].contiguous()  # fmt: skip
            else:
                grad_w = torch.ops.aten.convolution_backward(
                    grad_out, x, weight, None, *args, [False, True, False]
                )[1]
        if need_b and ctx.has_bias:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None


class TunedConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose float32 CPU forward and backward follow :func:`plan_for` (see the module
    docstring); elsewhere (CUDA, other dtypes, grouped or dilated convs) it is the plain conv.
    ``winograd_ok=False`` keeps it to the direct plans."""

    winograd_ok: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _plain_only or x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4:
            return super().forward(x)
        plan = plan_for(self, x.shape[-2:], self.winograd_ok)
        if plan == PLAIN:
            return super().forward(x)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _TunedConvFunction.apply(x, self.weight, self.bias, self, plan)
        return _forward(x, self.weight, self.bias, self, plan)[0]


@contextlib.contextmanager
def plain_convs() -> Iterator[None]:
    """Inside, every :class:`TunedConv2d` runs as the plain conv: e.g. to count the convolution's nominal
    FLOPs, which Winograd's fewer multiplies would otherwise hide (``cawbench bench``)."""
    global _plain_only
    before, _plain_only = _plain_only, True
    try:
        yield
    finally:
        _plain_only = before


def swap_convs(module: nn.Module, winograd_ok: bool = True) -> int:
    """Turn every plain ``nn.Conv2d`` in ``module`` into a :class:`TunedConv2d` in place (same parameters,
    buffers and state dict); ``winograd_ok=False`` keeps them to the direct plans. Returns how many were
    swapped."""
    swapped = 0
    for child in module.modules():
        if type(child) is nn.Conv2d and isinstance(child.padding, tuple):  # not padding="same"/"valid"
            child.__class__ = TunedConv2d
            child.winograd_ok = winograd_ok
            swapped += 1
    return swapped
