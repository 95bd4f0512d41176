"""Deformable 3x3 convolution (DCNv1: stride 1, padding 1, dilation 1, one offset group, no mask)
with the bilinear sampling built once per offset field.

In AHIQ the offsets of `deform_net` come from the REFERENCE image, so the reference branch and
every distorted image of that reference share one offset field. `build_sampling` turns it into,
for every (output pixel, tap), the four bilinear corners: their row in the flattened input grid
and their weight (zero for a corner outside the image, which is torchvision's zero padding).
`deform_conv_shared` then applies it to any number of inputs:

1. bilinear im2col as ONE `embedding_bag(mode="sum", per_sample_weights=...)` over the
   channels-last input: each column row is a weighted sum of four contiguous C-wide input rows,
   the weights being computed once per (pixel, tap) instead of once per channel as in
   torchvision's im2col;
2. one GEMM of the (N*H*W, 9*C) columns with the weight reshaped to (9*C, C_out); on CPU
   without autograd both steps run over ~28 MiB chunks of columns (see `deform_conv_sampled`).

It is exact (same sampling arithmetic as torchvision's kernel; only the GEMM's summation order
differs), pure torch (runs on CUDA, `embedding_bag` has CUDA kernels) and differentiable with
respect to the input, the weight, the bias AND the offsets: the corner weights are a smooth
function of the offsets (`floor` has zero gradient), and `embedding_bag` differentiates its
`per_sample_weights`, so autograd gives torchvision's offset gradient. Other formulations
(sparse matrices, tap GEMMs first, grid_sample) are compared in `bench/deform_bench.py`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

KERNEL = 3
TAPS = KERNEL * KERNEL
CORNERS = 4
CPU_CHUNK_BYTES = 28 << 20  # columns per chunk without autograd on CPU: just under 32 MiB, see below


class DeformShapeError(ValueError):
    """Offsets, inputs or weights whose shapes do not fit a 3x3 stride-1 deformable conv."""


class DeformSampling(NamedTuple):
    """Bilinear sampling of a 3x3 deformable conv, for `batch` offset fields.

    index:  (batch, H*W*9, 4) int64, row of each corner in the flattened (H*W) input grid, for row
            `pixel * 9 + tap` (tap = 3*i + j as in the weight's (i, j)); 0 for unused corners.
    weight: (batch, H*W*9, 4) float32/float64 bilinear weight of each corner, 0 outside the image;
            differentiable with respect to the offsets it was built from.
    in_hw:  (H, W) of the input (and output) grid.
    """

    index: Tensor
    weight: Tensor
    in_hw: tuple[int, int]

    @property
    def batch(self) -> int:
        """Number of offset fields (1 when all inputs share one)."""
        return self.index.shape[0]


def build_sampling(offset: Tensor, in_hw: tuple[int, int]) -> DeformSampling:
    """Corners and bilinear weights of `offset` (B, 18, H, W), laid out (dy, dx) per tap like torchvision.

    Mirrors torchvision's `bilinear_interpolate`: the sample point of output (h, w), tap (i, j) is
    y = (h - 1 + i) + dy, x = (w - 1 + j) + dx; each of its four integer neighbours contributes
    with the usual bilinear weight if it lies inside the image and zero otherwise (so points
    outside (-1, H) x (-1, W) read zero). Half-precision offsets are computed in float32, since
    bf16 cannot even hold x = 55.3 to a tenth of a pixel.
    """
    h, w = (int(v) for v in in_hw)
    if offset.dim() != 4 or offset.shape[1] != 2 * TAPS or tuple(offset.shape[2:]) != (h, w):
        raise DeformShapeError(
            f"offset must have shape (B, {2 * TAPS}, {h}, {w}) for a 3x3 stride-1 padding-1 conv "
            f"on a {h}x{w} input, got {tuple(offset.shape)}"
        )
    if offset.dtype not in (torch.float32, torch.float64):
        offset = offset.float()
    b, dev, dt = offset.shape[0], offset.device, offset.dtype
    # (B, H, W, 9, 2): pixel-major, then tap, so that rows come out as pixel * 9 + tap.
    off = offset.reshape(b, TAPS, 2, h, w).permute(0, 3, 4, 1, 2)
    tap = torch.arange(TAPS, device=dev)
    # Integer base positions are exact in float, so base + offset rounds once, like torchvision.
    base_y = (torch.arange(h, device=dev).view(h, 1, 1) - 1 + tap // KERNEL).to(dt)
    base_x = (torch.arange(w, device=dev).view(1, w, 1) - 1 + tap % KERNEL).to(dt)
    y = base_y + off[..., 0]
    x = base_x + off[..., 1]
    y0 = torch.floor(y)
    x0 = torch.floor(x)
    ly = y - y0
    lx = x - x0
    hy = 1 - ly
    hx = 1 - lx
    rows = torch.stack((y0, y0, y0 + 1, y0 + 1), dim=-1)
    cols = torch.stack((x0, x0 + 1, x0, x0 + 1), dim=-1)
    weight = torch.stack((hy * hx, hy * lx, ly * hx, ly * lx), dim=-1)
    inside = (rows >= 0) & (rows <= h - 1) & (cols >= 0) & (cols <= w - 1)
    # `where` (not a multiply) so that a NaN/inf offset cannot leak into valid rows or the gradient.
    weight = torch.where(inside, weight, torch.zeros((), dtype=dt, device=dev))
    index = torch.where(inside, rows * w + cols, torch.zeros((), dtype=dt, device=dev)).long()
    return DeformSampling(
        index=index.reshape(b, h * w * TAPS, CORNERS),
        weight=weight.reshape(b, h * w * TAPS, CORNERS),
        in_hw=(h, w),
    )


def flat_sampling(sampling: DeformSampling, n: int) -> tuple[Tensor, Tensor]:
    """Corner rows and weights for n inputs stacked in one (n*H*W, C) table: (n*H*W*9, 4) each."""
    p = sampling.in_hw[0] * sampling.in_hw[1]
    # Shift each input's corner rows into its own block of the stacked table.
    shift = (torch.arange(n, device=sampling.index.device) * p).view(n, 1, 1)
    index = (sampling.index + shift).view(n * p * TAPS, CORNERS)
    weight = sampling.weight.expand(n, -1, -1).reshape(n * p * TAPS, CORNERS)
    return index, weight


def gather_columns(table: Tensor, index: Tensor, weight: Tensor) -> Tensor:
    """Bilinear im2col rows: (len(index) // 9, 9*C), column `tap * C + channel`, of the
    channels-last `table` (rows = pixels of the stacked inputs, C wide)."""
    cols = F.embedding_bag(index, table, mode="sum", per_sample_weights=weight)
    return cols.view(-1, TAPS * table.shape[1])


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, sampling: DeformSampling) -> None:
    if x.dim() != 4 or tuple(x.shape[2:]) != sampling.in_hw:
        raise DeformShapeError(
            f"x must have shape (N, C, {sampling.in_hw[0]}, {sampling.in_hw[1]}), got {tuple(x.shape)}"
        )
    if weight.dim() != 4 or weight.shape[1] != x.shape[1] or tuple(weight.shape[2:]) != (KERNEL, KERNEL):
        raise DeformShapeError(
            f"weight must have shape (C_out, {x.shape[1]}, 3, 3), got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise DeformShapeError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if sampling.batch not in (1, x.shape[0]):
        raise DeformShapeError(
            f"sampling holds {sampling.batch} offset fields for {x.shape[0]} inputs (need 1 or {x.shape[0]})"
        )


def deform_conv_sampled(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    sampling: DeformSampling,
    chunk_bytes: int = CPU_CHUNK_BYTES,
) -> Tensor:
    """3x3 deformable conv of `x` (N, C, H, W) with a prebuilt sampling of batch 1 (shared by all
    N inputs) or N (one offset field per input). Returns (N, C_out, H, W), contiguous NCHW.

    Without autograd on CPU the columns are built and multiplied `chunk_bytes` at a time: chunks
    under glibc's largest mmap threshold (32 MiB) reuse heap memory instead of page-faulting a
    fresh 9x-the-input buffer on every call (about 10% of the run time at 768x56x56 on one
    thread), and bound memory; much smaller chunks lose more to the GEMM re-packing the weight.
    With autograd, autocast or on GPU (caching allocator) it is one embedding_bag and one GEMM.
    """
    _check(x, weight, bias, sampling)
    n, c, h, w = x.shape
    c_out = weight.shape[0]
    rows = n * h * w
    table = x.permute(0, 2, 3, 1).reshape(rows, c).to(sampling.weight.dtype)
    index, corner_weight = flat_sampling(sampling, n)
    # Weight columns ordered (tap, channel) to match the columns'.
    wmat_t = weight.permute(0, 2, 3, 1).reshape(c_out, TAPS * c).t()
    autocast = torch.is_autocast_enabled(x.device.type)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, sampling.weight)
    )
    if needs_grad or autocast or x.device.type != "cpu":
        cols = gather_columns(table, index, corner_weight)
        if not autocast:
            cols = cols.to(weight.dtype)
        out = cols @ wmat_t if bias is None else torch.addmm(bias, cols, wmat_t)
    else:
        out = torch.empty(rows, c_out, dtype=weight.dtype, device=x.device)
        step = max(1, chunk_bytes // (TAPS * c * table.element_size()))
        for a in range(0, rows, step):
            b = min(a + step, rows)
            cols = gather_columns(table, index[a * TAPS : b * TAPS], corner_weight[a * TAPS : b * TAPS])
            cols = cols.to(weight.dtype)
            if bias is None:
                torch.mm(cols, wmat_t, out=out[a:b])
            else:
                torch.addmm(bias, cols, wmat_t, out=out[a:b])
    # (N*H*W, C_out) rows are channels-last; hand back the usual NCHW layout.
    return out.view(n, h, w, c_out).permute(0, 3, 1, 2).contiguous()


def deform_conv_shared(
    x: Tensor, weight: Tensor, bias: Tensor | None, sampling: DeformSampling, chunk_bytes: int = CPU_CHUNK_BYTES
) -> Tensor:
    """3x3 deformable conv of all N inputs `x` (N, C, H, W) with ONE shared offset field.

    `sampling` comes from `build_sampling(offset (1, 18, H, W), (H, W))`; build it once per
    reference and reuse it for the reference and its distorted images (see `deform_conv_sampled`
    for `chunk_bytes`). Returns (N, C_out, H, W), equal to
    `torchvision.ops.deform_conv2d(x, offset.expand(N, -1, -1, -1), weight, bias, padding=1)`.
    """
    if sampling.batch != 1:
        raise DeformShapeError(f"deform_conv_shared needs one shared offset field, got {sampling.batch}")
    return deform_conv_sampled(x, weight, bias, sampling, chunk_bytes)


def deform_conv(
    x: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None = None, backend: str = "fast"
) -> Tensor:
    """3x3 deformable conv with one offset field per input (offset batch 1 or N).

    backend "fast" uses the embedding_bag + GEMM path (also with per-sample offsets: it needs no
    sharing to beat torchvision's im2col); "torchvision" calls `torchvision.ops.deform_conv2d`.
    """
    if backend == "torchvision":
        from torchvision.ops import deform_conv2d

        if offset.shape[0] == 1 and x.shape[0] > 1:
            offset = offset.expand(x.shape[0], -1, -1, -1)
        return deform_conv2d(x, offset, weight, bias, padding=1)
    if backend != "fast":
        raise ValueError(f"backend must be 'fast' or 'torchvision', got {backend!r}")
    return deform_conv_sampled(x, weight, bias, build_sampling(offset, tuple(x.shape[2:])))
