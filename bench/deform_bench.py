"""Micro-benchmark: exact formulations of AHIQ's shared-offset 3x3 deformable conv on CPU.

N inputs (1 reference + distorted images) share one offset field. Every variant gets the same
inputs; the table gives seconds per image (best of --reps timed rounds, after a warm-up call on
two inputs that also measures the error against torchvision) and the max abs error relative to
the max abs of torchvision's output. Rounds interleave the variants, so background load hits them alike, but
on a shared machine compare rows of one run only. "setup" rows are paid once per reference
(offset field), not per image. The last table times forward + backward (training).

    python -m bench.deform_bench            # real size: C=768, 56x56, N=9 (1.5-2 min on 2 idle cores)
    python -m bench.deform_bench --channels 64 --size 20 --n 3 --reps 3
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

if __package__ in (None, ""):  # allow `python bench/deform_bench.py` as well as `-m bench.deform_bench`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchvision.ops import deform_conv2d  # noqa: E402

from members.model.deform import TAPS, DeformSampling, build_sampling, deform_conv_shared, flat_sampling


def sparse_im2col_matrix(s: DeformSampling) -> Tensor:
    """CSR (H*W*9, H*W): row pixel*9+tap holds that sample point's four bilinear weights."""
    rows = torch.arange(s.index.shape[1]).repeat_interleave(4)
    p = s.in_hw[0] * s.in_hw[1]
    coo = torch.sparse_coo_tensor(
        torch.stack((rows, s.index[0].flatten())), s.weight[0].flatten(), (len(rows) // 4, p), check_invariants=False
    )
    return coo.coalesce().to_sparse_csr()


def tap_rows(s: DeformSampling) -> Tensor:
    """(H*W, 36) rows into tap-GEMM outputs laid out (pixel, tap): source pixel * 9 + tap."""
    p = s.index.shape[1] // TAPS
    return (s.index[0].view(p, TAPS, 4) * TAPS + torch.arange(TAPS).view(1, TAPS, 1)).view(p, TAPS * 4)


def sparse_tap_matrix(s: DeformSampling) -> Tensor:
    """CSR (H*W, H*W*9) applying the shared sampling to tap-GEMM outputs (the earlier prototype)."""
    p = s.index.shape[1] // TAPS
    rows = torch.arange(p).repeat_interleave(TAPS * 4)
    coo = torch.sparse_coo_tensor(
        torch.stack((rows, tap_rows(s).flatten())), s.weight[0].flatten(), (p, p * TAPS), check_invariants=False
    )
    return coo.coalesce().to_sparse_csr()


def channels_last_rows(x: Tensor) -> Tensor:
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(n * h * w, c)


def to_nchw(out_rows: Tensor, n: int, h: int, w: int) -> Tensor:
    return out_rows.view(n, h, w, -1).permute(0, 3, 1, 2).contiguous()


def wmat_tap_channel(weight: Tensor) -> Tensor:
    """(C_out, 9*C) with column tap*C + channel."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def variants(
    x: Tensor, offset: Tensor, weight: Tensor, bias: Tensor
) -> tuple[dict[str, float], dict[str, Callable[[], Tensor]]]:
    """Per-reference setup times and the per-call closures of every formulation."""
    n, c, h, w = x.shape
    p, c_out = h * w, weight.shape[0]
    setup: dict[str, float] = {}

    def timed_setup(name: str, fn: Callable[[], object]) -> object:
        value = fn()  # warm-up; then the best of three (these are milliseconds, easily disturbed)
        setup[name] = round_robin({name: fn}, 3)[name][0]
        return value

    s: DeformSampling = timed_setup("build_sampling (indices + weights)", lambda: build_sampling(offset, (h, w)))
    s_im2col = timed_setup("CSR im2col matrix", lambda: sparse_im2col_matrix(s))
    s_taps = timed_setup("CSR tap-sampling matrix", lambda: sparse_tap_matrix(s))
    rows36 = tap_rows(s)
    w36 = s.weight[0].reshape(p, TAPS * 4)

    def gemm(cols: Tensor) -> Tensor:
        return to_nchw(torch.addmm(bias, cols.view(n * p, -1), wmat_tap_channel(weight).t()), n, h, w)

    def index_im2col() -> Tensor:
        table = channels_last_rows(x)
        index, corner_weight = flat_sampling(s, n)
        cols = table[index[:, 0]] * corner_weight[:, :1]
        for j in range(1, 4):
            cols.addcmul_(table[index[:, j]], corner_weight[:, j : j + 1])
        return gemm(cols)

    def csr_im2col() -> Tensor:
        table = channels_last_rows(x).view(n, p, c)
        return gemm(torch.stack([s_im2col @ table[i] for i in range(n)]))

    def tap_gemms() -> Tensor:
        # Y[(n, q, tap), o] = sum_c W[o, c, tap] x[n, c, q]
        wcat = weight.permute(1, 2, 3, 0).reshape(c, TAPS * c_out)
        return (channels_last_rows(x) @ wcat).view(n * p * TAPS, c_out)

    def tap_embbag() -> Tensor:
        y = tap_gemms()
        bags = (rows36.unsqueeze(0) + (torch.arange(n) * p * TAPS).view(n, 1, 1)).view(n * p, -1)
        out = F.embedding_bag(bags, y, mode="sum", per_sample_weights=w36.repeat(n, 1)) + bias
        return to_nchw(out, n, h, w)

    def tap_csr() -> Tensor:
        y = tap_gemms().view(n, p * TAPS, c_out)
        return to_nchw(torch.cat([s_taps @ y[i] for i in range(n)]) + bias, n, h, w)

    # grid_sample needs normalised coordinates: not bit-exact (rounding of x*2/(W-1)-1), for reference.
    tap = torch.arange(TAPS)
    py = (torch.arange(h).view(h, 1, 1) - 1 + tap // 3) + offset[0, 0::2].permute(1, 2, 0)
    px = (torch.arange(w).view(1, w, 1) - 1 + tap % 3) + offset[0, 1::2].permute(1, 2, 0)
    grid = torch.stack((px * 2 / (w - 1) - 1, py * 2 / (h - 1) - 1), -1)
    grid = grid.permute(2, 0, 1, 3).reshape(1, TAPS, p, 2)

    def grid_sample_im2col() -> Tensor:
        cols = F.grid_sample(x, grid.expand(n, -1, -1, -1), align_corners=True).reshape(n, c * TAPS, p)
        return (torch.matmul(weight.reshape(c_out, -1), cols) + bias.view(1, -1, 1)).view(n, c_out, h, w)

    calls = {
        "plain conv2d (not deformable; GEMM floor)": lambda: F.conv2d(x, weight, bias, padding=1),
        "torchvision deform_conv2d": lambda: deform_conv2d(x, offset.expand(n, -1, -1, -1), weight, bias, padding=1),
        "embedding_bag im2col + GEMM, 28 MiB chunks [members.model.deform]": lambda: deform_conv_shared(x, weight, bias, s),
        "embedding_bag im2col + GEMM, one shot (autograd path)": lambda: deform_conv_shared(
            x, weight, bias, s, chunk_bytes=1 << 62
        ),
        "index_select x4 im2col + GEMM": index_im2col,
        "CSR im2col (sparse.mm) + GEMM": csr_im2col,
        "tap GEMMs first + embedding_bag sampling": tap_embbag,
        "tap GEMMs first + CSR sampling (prototype)": tap_csr,
        "grid_sample im2col + GEMM (inexact coords)": grid_sample_im2col,
    }
    return setup, calls


def round_robin(calls: dict[str, Callable[[], object]], reps: int) -> dict[str, tuple[float, float]]:
    """Best (wall, process CPU) seconds of each call over `reps` rounds. Rounds interleave the
    calls, so that load from other processes hits every variant alike; CPU time (all threads)
    does not count the time this process waited for a core, so it is steadier on a busy machine."""
    best = {name: (float("inf"), float("inf")) for name in calls}
    for _ in range(reps):
        for name, fn in calls.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def bench_training(
    x: Tensor, offset: Tensor, weight: Tensor, bias: Tensor, reps: int
) -> dict[str, tuple[float, float]]:
    """Forward + backward (grads for x, weight, bias, offset): (wall, CPU) seconds per image."""
    n = x.shape[0]
    leaves = [t.detach().requires_grad_(True) for t in (x, offset, weight, bias)]
    xg, og, wg, bg = leaves

    def tv() -> None:
        deform_conv2d(xg, og.expand(n, -1, -1, -1), wg, bg, padding=1).square().mean().backward()

    def fast() -> None:
        deform_conv_shared(xg, wg, bg, build_sampling(og, tuple(x.shape[2:]))).square().mean().backward()

    # No warm-up call: the forward table already warmed the kernels, and torchvision's backward is slow.
    calls = {"torchvision deform_conv2d": tv, "members.model.deform (incl. build_sampling)": fast}
    return {name: (wall / n, cpu / n) for name, (wall, cpu) in round_robin(calls, reps).items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--channels", type=int, default=768)
    ap.add_argument("--size", type=int, default=56, help="H = W of the CNN feature grid")
    ap.add_argument("--n", type=int, default=9, help="inputs sharing the offset (1 ref + distorted)")
    ap.add_argument("--reps", type=int, default=2, help="timed rounds over all variants (best is kept)")
    ap.add_argument("--offset-scale", type=float, default=4.0, help="std of the random offsets, pixels")
    ap.add_argument("--train-n", type=int, default=2, help="inputs for the forward+backward table (0: skip)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    c, hw, n = args.channels, args.size, args.n
    x = torch.randn(n, c, hw, hw)
    weight = torch.randn(c, c, 3, 3) / (3 * c**0.5)
    bias = torch.randn(c)
    offset = torch.randn(1, 18, hw, hw) * args.offset_scale
    print(f"C={c} H=W={hw} N={n} fp32, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    with torch.no_grad():
        # Errors (and the warm-up) on two of the inputs: a full-size call of every variant costs ~30 s.
        few = x[:2]
        _, small = variants(few, offset, weight, bias)
        ref = deform_conv2d(few, offset.expand(len(few), -1, -1, -1), weight, bias, padding=1)
        scale = ref.abs().max().item()
        errors = {name: (fn() - ref).abs().max().item() / scale for name, fn in small.items()}
        errors["plain conv2d (not deformable; GEMM floor)"] = float("nan")
        setup, calls = variants(x, offset, weight, bias)
        seconds = round_robin(calls, args.reps)
    print(f"\n{'forward (no_grad), per image':62s} {'s/image':>9s} {'cpu s/img':>9s} {'rel err':>9s}")
    for name, (wall, cpu) in seconds.items():
        print(f"{name:62s} {wall / n:9.4f} {cpu / n:9.4f} {errors[name]:9.1e}")
    print(f"\n{'setup, once per reference':62s} {'s':>9s}")
    for name, sec in setup.items():
        print(f"{name:62s} {sec:9.4f}")
    if args.train_n:
        m = args.train_n
        title = f"forward+backward (x, weight, bias, offset), N={m}"
        print(f"\n{title:62s} {'s/image':>9s} {'cpu s/img':>9s}")
        for name, (wall, cpu) in bench_training(x[:m], offset, weight, bias, args.reps).items():
            print(f"{name:62s} {wall:9.4f} {cpu:9.4f}")


if __name__ == "__main__":
    main()
