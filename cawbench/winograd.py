"""Winograd F(m x m, 3x3) for stride-1, padding-1 3x3 convolutions on the CPU: forward and weight gradient.

Lavin & Gray (2016, "Fast Algorithms for Convolutional Neural Networks"): each m x m output tile of a 3x3
cross-correlation is ``A^T [(G g G^T) * (B^T d B)] A`` with ``d`` the (m+2) x (m+2) input tile under it,
``g`` the 3x3 kernel and ``*`` the elementwise product. Summed over input channels, the (m+2)^2 elementwise
products of a tile become (m+2)^2 matrix products (``[tiles x C_in] @ [C_in x C_out]``): 16 for 4 outputs
(m = 2, 2.25x fewer multiply-adds than the direct convolution's 9 per output) or 36 for 16 (m = 4, 4x fewer).

The weight gradient is the same identity read the other way round (the transposition principle): the 3x3
gradient of one tile is ``G^T [(A dy A^T) * (B^T d B)] G`` with ``dy`` the m x m output-gradient tile, and
the sum over tiles and images is again (m+2)^2 matrix products (``[C_out x tiles] @ [tiles x C_in]``) before
one back-transform.

Each 2-D transform is one matrix product with a Kronecker product of the 1-D matrices (``vec(B^T d B) =
(B^T kron B^T) vec(d)``), applied to all tiles of all channels at once: a gather of the overlapping tiles,
then a product with a small (m+2)^2-row matrix, which runs at memory speed.

The identity is exact; in float32 the sums are rounded differently. Against float64 on ResNet-17's shapes
(the error table of ``scripts/conv_layouts.py``, in ``reports/bench/cpu-conv-layouts.md``), as the largest
difference over the largest entry: the direct forward is off by about 3e-7, F(2x2) by 5e-7 and F(4x4) by
1e-5 (its transforms hold 4s, 5s and 8s); the weight gradient by 2e-6 to 8e-6 direct, 5e-7 to 8e-7 F(2x2)
and about 7e-6 F(4x4). Everything here is a fixed sequence of tensor ops, so runs stay bit-for-bit
reproducible.

All tensors are NHWC (``[N, H, W, C]``, contiguous): the channel axis stays innermost in every transform and
the tiles of all images form one matrix.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# 1-D transforms (Lavin & Gray): B^T [(m+2) x (m+2)], G [(m+2) x 3], A^T [m x (m+2)].
_MATRICES = {
    2: (
        [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]],
    ),
    4: (
        [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
         [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    ),
}  # fmt: skip
TILES = tuple(_MATRICES)  # the output tile sizes m implemented


@functools.cache
def _transforms(m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 2-D transforms of F(m x m, 3x3) as float32 matrices: input [(m+2)^2, (m+2)^2], kernel
    [(m+2)^2, 9], output [m^2, (m+2)^2] (Kronecker products of the 1-D ones, computed in float64)."""
    b_t, g, a_t = (torch.tensor(rows, dtype=torch.float64) for rows in _MATRICES[m])
    return tuple(torch.kron(t, t).float() for t in (b_t, g, a_t))  # type: ignore[return-value]


def applies(
    kernel: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...], hw: tuple[int, ...], m: int
) -> bool:
    """True for the convs F(m x m, 3x3) here computes: 3x3, stride 1, padding 1, on a map whose height and
    width are multiples of m (whole output tiles)."""
    return (
        m in TILES
        and tuple(kernel) == (3, 3)
        and tuple(stride) == (1, 1)
        and tuple(padding) == (1, 1)
        and hw[0] % m == 0
        and hw[1] % m == 0
    )


def _input_tiles(x: torch.Tensor, m: int) -> torch.Tensor:
    """[(m+2)^2, N * H/m * W/m, C]: B^T d B for every (m+2) x (m+2) tile (stride m) of x zero-padded by 1."""
    n, h, w, c = x.shape
    th, tw = h // m, w // m
    padded = F.pad(x, (0, 0, 1, 1, 1, 1))
    s_n, s_h, s_w, s_c = padded.stride()
    size = m + 2
    tiles = padded.as_strided((size, size, n, th, tw, c), (s_h, s_w, s_n, m * s_h, m * s_w, s_c))
    return (_transforms(m)[0] @ tiles.reshape(size * size, -1)).view(size * size, n * th * tw, c)


def conv3x3(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, m: int = 4
) -> torch.Tensor:
    """``conv2d(x, weight, bias, stride=1, padding=1)`` in NHWC by F(m x m, 3x3): x [N, H, W, C_in] (H, W
    multiples of m), weight [C_out, C_in, 3, 3] (PyTorch's layout); returns [N, H, W, C_out], contiguous."""
    n, h, w, c_in = x.shape
    c_out = weight.shape[0]
    th, tw = h // m, w // m
    _, kernel_t, output_t = _transforms(m)
    kernels = (kernel_t @ weight.reshape(c_out * c_in, 9).t()).view(-1, c_out, c_in)  # G g G^T per tile entry
    products = torch.bmm(_input_tiles(x, m), kernels.transpose(1, 2))  # [(m+2)^2, tiles, C_out]
    out = (output_t @ products.view(products.shape[0], -1)).view(m, m, n, th, tw, c_out)
    out = out.permute(2, 3, 0, 4, 1, 5).reshape(n, h, w, c_out)
    return out if bias is None else out.add_(bias)


def weight_grad3x3(x: torch.Tensor, grad_out: torch.Tensor, m: int = 4) -> torch.Tensor:
    """The weight gradient of :func:`conv3x3`: x [N, H, W, C_in], grad_out [N, H, W, C_out], both NHWC and
    contiguous; returns [C_out, C_in, 3, 3], contiguous."""
    n, h, w, c_in = x.shape
    c_out = grad_out.shape[-1]
    th, tw = h // m, w // m
    _, kernel_t, output_t = _transforms(m)
    grad_tiles = grad_out.view(n, th, m, tw, m, c_out).permute(2, 4, 0, 1, 3, 5).reshape(m * m, -1)
    expanded = (output_t.t() @ grad_tiles).view(-1, n * th * tw, c_out)  # A dy A^T per tile
    summed = torch.bmm(expanded.transpose(1, 2), _input_tiles(x, m))  # [(m+2)^2, C_out, C_in]
    return (summed.view(summed.shape[0], -1).t() @ kernel_t).view(c_out, c_in, 3, 3)  # G^T (...) G
