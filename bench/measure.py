"""Measuring tools for the bench: wall and CPU time, peak memory of a section, counted FLOPs.

Peak memory is what a section adds on top of what was held when it started. On CUDA it is the
caching allocator's peak (`max_memory_allocated`). On the CPU it is the process's peak resident set
(VmHWM), which Linux lets a process reset by writing 5 to /proc/self/clear_refs; freed heap is handed
back first (`malloc_trim`) so the start level is honest. Where neither works the peak is None.
"""
from __future__ import annotations

import ctypes
import time
from collections.abc import Callable
from pathlib import Path

import torch

STATUS = Path("/proc/self/status")


def _status_kib(key: str) -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the start level may include freed heap
        pass


class PeakMemory:
    """`with PeakMemory(device) as pm: ...`, then `pm.peak_mib`: extra memory at the section's peak."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.start = 0
        self.peak_mib: float | None = None

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        _trim_heap()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.start = _status_kib("VmRSS") or 0
        except OSError:
            self.start = -1
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_mib = (torch.cuda.max_memory_allocated() - self.start) / 2**20
        elif self.start >= 0:
            hwm = _status_kib("VmHWM")
            self.peak_mib = None if hwm is None else (hwm - self.start) / 1024


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float | None, object]:
    """(seconds, peak MiB, result) of one call of `fn`."""
    seconds, _, peak, result = timed_cpu(fn, device)
    return seconds, peak, result


def timed_cpu(fn: Callable[[], object], device: torch.device) -> tuple[float, float, float | None, object]:
    """(wall seconds, CPU seconds of this process, peak MiB, result) of one call of `fn`. On a shared
    machine the CPU time is the fairer comparison: other jobs stretch the wall time, not it."""
    with PeakMemory(device) as pm:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started, cpu = time.perf_counter(), time.process_time()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return seconds, cpu, pm.peak_mib, result


def _deform_conv2d_flops(x_shape: torch.Size, w_shape: torch.Size, *args: object,
                         out_shape: torch.Size | None = None, **kwargs: object) -> int:
    """torchvision's deform_conv2d counted as the convolution it computes: 2 * N * H_out * W_out * 9 *
    C_in/groups * C_out, the GEMM of its bilinear im2col columns with the weight. That is what
    FlopCounterMode counts for `members.model.deform` (its addmm over the same columns), so both ways'
    deformable convs count alike; the bilinear sampling itself is counted on neither side."""
    from torch.utils.flop_counter import conv_flop_count

    return conv_flop_count(list(x_shape), list(w_shape), list(out_shape))


def counted_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations (2 per multiply-add) of the matmuls, convolutions (torchvision's
    deformable one included, see `_deform_conv2d_flops`) and attention that `fn` runs, as torch's
    FlopCounterMode counts them. Forward ops only: the backward of torchvision's deform is not mapped."""
    import torchvision  # noqa: F401  (registers torch.ops.torchvision)
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False,
                              custom_mapping={torch.ops.torchvision.deform_conv2d: _deform_conv2d_flops})
    with counter:
        fn()
    return int(counter.get_total_flops())
