"""Winograd F(2x2, 3x3) for stride-1, padding-1 3x3 convolutions on the CPU: forward and weight gradient.

Lavin & Gray (2016, "Fast Algorithms for Convolutional Neural Networks"): each 2x2 output tile of a 3x3
cross-correlation is ``A^T [(G g G^T) * (B^T d B)] A`` with ``d`` the 4x4 input tile under it, ``g`` the
3x3 kernel and ``*`` the elementwise product. Summed over input channels, the 16 elementwise products of a
tile become 16 matrix products (``[tiles x C_in] @ [C_in x C_out]``), 2.25x fewer multiply-adds than the
direct convolution's 9 per output.

The weight gradient is the same identity read the other way round (the transposition principle): the 3x3
gradient of one tile is ``G^T [(A dy A^T) * (B^T d B)] G`` with ``dy`` the 2x2 output-gradient tile, and the
sum over tiles and images is again 16 matrix products (``[C_out x tiles] @ [tiles x C_in]``) before the one
back-transform.

The identity is exact; in float32 the sums are taken in another order and rounded differently. Measured
against the direct convolution: about 6e-7 of the largest output in the forward, 1e-6 to 9e-6 of the
largest entry in the weight gradient (``tests/test_cpu_conv.py`` pins both). Every transform here is a
fixed sequence of adds and subtracts on the CPU, so runs stay bit-for-bit reproducible.

All tensors are NHWC (``[N, H, W, C]``, contiguous), which keeps the channel axis innermost in every
transform and lets the tiles of all images form one matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Transform matrices of F(2x2, 3x3); B^T and A^T hold only 0 and +-1, so their products are adds.
_B_T = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))  # 4x4 input tile -> 4x4
_A_T = ((1, 1, 1, 0), (0, 1, -1, -1))  # 4x4 product -> 2x2 output tile
_A = tuple(zip(*_A_T))  # 2x2 gradient tile -> 4x4
_G = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])
_KRON_G = torch.kron(_G, _G)  # [16, 9]: vec(G g G^T) = _KRON_G @ vec(g)


def applies(
    kernel: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...], hw: tuple[int, ...]
) -> bool:
    """True for the convs this module computes: 3x3, stride 1, padding 1, on a map of even height and width
    (whole 2x2 output tiles)."""
    return (
        tuple(kernel) == (3, 3)
        and tuple(stride) == (1, 1)
        and tuple(padding) == (1, 1)
        and hw[0] % 2 == 0
        and hw[1] % 2 == 0
    )


def _combine(
    matrix: tuple[tuple[int, ...], ...], inputs: list[torch.Tensor], outs: list[torch.Tensor]
) -> None:
    """outs[k] = sum_j matrix[k][j] * inputs[j] for a matrix of 0 and +-1, written in place (no temporaries)."""
    for row, out in zip(matrix, outs, strict=True):
        terms = sorted(((c, x) for c, x in zip(row, inputs, strict=True) if c), key=lambda t: -t[0])
        (first_sign, first), *rest = terms  # a positive term first where there is one
        if not rest:
            out.copy_(first) if first_sign > 0 else torch.neg(first, out=out)
            continue
        (sign, second), *rest = rest
        if first_sign > 0:
            torch.add(first, second, alpha=sign, out=out)
        else:  # every term negative
            torch.add(first, second, out=out).neg_()
        for sign, x in rest:
            out.add_(x, alpha=sign)


def _input_tiles(x: torch.Tensor) -> torch.Tensor:
    """[16, N * H/2 * W/2, C]: B^T d B for every 4x4 tile (stride 2) of x zero-padded by 1."""
    n, h, w, c = x.shape
    th, tw = h // 2, w // 2
    padded = F.pad(x, (0, 0, 1, 1, 1, 1))
    rows = torch.empty(4, n, th, w + 2, c)
    _combine(_B_T, [padded[:, i : i + 2 * th : 2] for i in range(4)], list(rows))
    tiles = torch.empty(4, 4, n, th, tw, c)
    for i in range(4):
        _combine(_B_T, [rows[i][:, :, j : j + 2 * tw : 2] for j in range(4)], list(tiles[i]))
    return tiles.view(16, n * th * tw, c)


def _grad_tiles(grad_out: torch.Tensor) -> torch.Tensor:
    """[16, N * H/2 * W/2, C_out]: A g A^T for every 2x2 tile g of the output gradient."""
    n, h, w, c = grad_out.shape
    th, tw = h // 2, w // 2
    tile = grad_out.view(n, th, 2, tw, 2, c)
    rows = torch.empty(4, n, th, tw, 2, c)
    _combine(_A, [tile[:, :, a] for a in range(2)], list(rows))
    tiles = torch.empty(4, 4, n, th, tw, c)
    for i in range(4):
        _combine(_A, [rows[i][..., b, :] for b in range(2)], list(tiles[i]))
    return tiles.view(16, n * th * tw, c)


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``conv2d(x, weight, bias, stride=1, padding=1)`` in NHWC: x [N, H, W, C_in] (H, W even), weight
    [C_out, C_in, 3, 3] (PyTorch's layout); returns [N, H, W, C_out], contiguous."""
    n, h, w, c_in = x.shape
    c_out = weight.shape[0]
    th, tw = h // 2, w // 2
    kernels = (_KRON_G @ weight.reshape(c_out * c_in, 9).t()).view(16, c_out, c_in)  # G g G^T
    products = torch.bmm(_input_tiles(x), kernels.transpose(1, 2)).view(4, 4, n, th, tw, c_out)
    rows = torch.empty(2, 4, n, th, tw, c_out)
    _combine(_A_T, list(products), list(rows))
    out = torch.empty(n, th, 2, tw, 2, c_out)
    for a in range(2):
        _combine(_A_T, list(rows[a]), [out[:, :, a, :, b] for b in range(2)])
    out = out.view(n, h, w, c_out)
    return out if bias is None else out.add_(bias)


def weight_grad3x3(x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """The weight gradient of :func:`conv3x3`: x [N, H, W, C_in], grad_out [N, H, W, C_out], both NHWC and
    contiguous; returns [C_out, C_in, 3, 3], contiguous."""
    c_in, c_out = x.shape[-1], grad_out.shape[-1]
    summed = torch.bmm(_grad_tiles(grad_out).transpose(1, 2), _input_tiles(x))  # [16, C_out, C_in]
    return (summed.view(16, -1).t() @ _KRON_G).view(c_out, c_in, 3, 3)  # G^T (...) G
