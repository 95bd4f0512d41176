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
2. one GEMM of the (N*H*W, 9*C) columns with the weight reshaped to (9*C, C_out).
Both steps run over chunks of rows (~28 MiB of columns on the CPU), and the columns are never kept
for backward: `_ColumnsConv` builds them again, chunk by chunk, when the gradients are asked for.

It is exact (same sampling arithmetic as torchvision's kernel; only the GEMM's summation order
differs), pure torch (runs on CUDA, `embedding_bag` has CUDA kernels) and differentiable with
respect to the input, the weight, the bias AND the offsets: the corner weights are a smooth
function of the offsets (`floor` has zero gradient), so the offset gradient is the corner weights'
gradient (a dot product of each column row's gradient with its corner's input row) carried back
through `build_sampling` by autograd; it equals torchvision's. Other formulations (sparse matrices,
tap GEMMs first, grid_sample) are compared in `bench/deform_bench.py`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

KERNEL = 3
TAPS = KERNEL * KERNEL
CORNERS = 4
CPU_CHUNK_BYTES = 28 << 20  # columns per chunk on the CPU: just under 32 MiB, see deform_conv_sampled
GPU_CHUNK_BYTES = 256 << 20  # columns per chunk on a GPU: big GEMMs, bounded memory


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


def _chunks(rows: int, step: int):
    for a in range(0, rows, step):
        yield a, min(a + step, rows)


class _ColumnsConv(torch.autograd.Function):
    """out = im2col(table) @ wmat_t + bias with the columns never kept: built a chunk of rows at a
    time in forward, and built again chunk by chunk in backward. The columns are 9x the input; the
    autograd graph of the plain ops would hold all of them (0.7 GB for a batch-4 AHIQ step at 224
    px), here it holds the input, the weight and the sampling only.

    `table` stacks the inputs' pixels, `pixels` rows each, and every corner of an input's rows lies
    in that input's block. So a chunk of rows only reads the blocks it spans, and its backward runs
    embedding_bag's own (dense) backward against those blocks alone: a gradient the size of a block
    or two per chunk, not of the whole table.
    """

    @staticmethod
    def forward(ctx, table: Tensor, wmat_t: Tensor, bias: Tensor | None, corner_weight: Tensor,
                index: Tensor, pixels: int, gemm_dtype: torch.dtype, chunk_rows: int) -> Tensor:
        rows, c_out = index.shape[0] // TAPS, wmat_t.shape[1]
        w = wmat_t.to(gemm_dtype)
        b = None if bias is None else bias.to(gemm_dtype)
        out = torch.empty(rows, c_out, dtype=gemm_dtype, device=table.device)
        # Autocast off: the dtype is chosen by the caller, and autocast refuses `out=` matmuls.
        with torch.autocast(table.device.type, enabled=False):
            for a, z in _chunks(rows, chunk_rows):
                cols = gather_columns(table, index[a * TAPS : z * TAPS], corner_weight[a * TAPS : z * TAPS])
                cols = cols.to(gemm_dtype)
                if b is None:
                    torch.mm(cols, w, out=out[a:z])
                else:
                    torch.addmm(b, cols, w, out=out[a:z])
        ctx.save_for_backward(table, wmat_t, corner_weight, index)
        ctx.pixels, ctx.gemm_dtype, ctx.chunk_rows = pixels, gemm_dtype, chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        table, wmat_t, corner_weight, index = ctx.saved_tensors
        need_table, need_w, need_b, need_cw = ctx.needs_input_grad[:4]
        rows, p = index.shape[0] // TAPS, ctx.pixels
        g_all = grad_out.to(ctx.gemm_dtype)
        w = wmat_t.to(ctx.gemm_dtype)
        grad_table = torch.zeros_like(table) if need_table else None
        grad_w = torch.zeros_like(wmat_t) if need_w else None
        grad_cw = torch.empty_like(corner_weight) if need_cw else None
        with torch.autocast(table.device.type, enabled=False):
            for a, z in _chunks(rows, ctx.chunk_rows):
                lo, hi = a // p * p, -(-z // p) * p  # the input blocks rows a..z read from
                with torch.enable_grad():
                    block = table[lo:hi].detach().requires_grad_(need_table)
                    cw = corner_weight[a * TAPS : z * TAPS].detach().requires_grad_(need_cw)
                    cols = gather_columns(block, index[a * TAPS : z * TAPS] - lo, cw)
                g = g_all[a:z]
                if need_w:
                    cols_t = cols.detach().to(ctx.gemm_dtype).t()
                    if grad_w.dtype == g.dtype:
                        grad_w.addmm_(cols_t, g)
                    else:  # low-precision GEMM, float32 sum over the chunks
                        grad_w += cols_t @ g
                if need_table or need_cw:
                    grad_cols = (g @ w.t()).to(cols.dtype)
                    wanted = [t for t, need in ((block, need_table), (cw, need_cw)) if need]
                    got = list(torch.autograd.grad(cols, wanted, grad_cols))
                    if need_table:
                        grad_table[lo:hi] += got.pop(0)
                    if need_cw:
                        grad_cw[a * TAPS : z * TAPS] = got.pop(0)
                del cols
        grad_b = grad_out.sum(0).to(wmat_t.dtype) if need_b else None
        return grad_table, grad_w, grad_b, grad_cw, None, None, None, None


def deform_conv_sampled(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    sampling: DeformSampling,
    chunk_bytes: int | None = None,
) -> Tensor:
    """3x3 deformable conv of `x` (N, C, H, W) with a prebuilt sampling of batch 1 (shared by all
    N inputs) or N (one offset field per input). Returns (N, C_out, H, W), contiguous NCHW.

    The columns are built and multiplied `chunk_bytes` at a time (default: `CPU_CHUNK_BYTES` on the
    CPU, `GPU_CHUNK_BYTES` elsewhere), in forward and again in backward, so memory stays at one
    chunk whatever the batch and autograd keeps no columns. On the CPU, chunks under glibc's largest
    mmap threshold (32 MiB) reuse heap memory instead of page-faulting a fresh 9x-the-input buffer
    on every call (about 10% of the run time at 768x56x56 on one thread); much smaller chunks lose
    more to the GEMM re-packing the weight. Under autocast the GEMM runs in the autocast dtype.
    """
    _check(x, weight, bias, sampling)
    n, c, h, w = x.shape
    c_out = weight.shape[0]
    table = x.permute(0, 2, 3, 1).reshape(n * h * w, c).to(sampling.weight.dtype)
    index, corner_weight = flat_sampling(sampling, n)
    # Weight columns ordered (tap, channel) to match the columns'.
    wmat_t = weight.permute(0, 2, 3, 1).reshape(c_out, TAPS * c).t()
    dev = x.device.type
    gemm_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    if chunk_bytes is None:
        chunk_bytes = CPU_CHUNK_BYTES if dev == "cpu" else GPU_CHUNK_BYTES
    chunk_rows = max(1, chunk_bytes // (TAPS * c * table.element_size()))
    out = _ColumnsConv.apply(table, wmat_t, bias, corner_weight, index, h * w, gemm_dtype, chunk_rows)
    # (N*H*W, C_out) rows are channels-last; hand back the usual NCHW layout.
    return out.view(n, h, w, c_out).permute(0, 3, 1, 2).contiguous()


def deform_conv_shared(
    x: Tensor, weight: Tensor, bias: Tensor | None, sampling: DeformSampling, chunk_bytes: int | None = None
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
