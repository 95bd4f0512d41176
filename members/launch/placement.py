"""Where members run: the GPUs (or CPU processes) of each member's slot, its environment, and the children
the drivers start (`make train-members`, `make preflight`).

GPU ids mean what they mean to torch and Accelerate: ordinals among the VISIBLE devices. On a shared machine
`CUDA_VISIBLE_DEVICES=4,5,6,7 make train-members` sees four GPUs, ordinals 0-3, which are physical GPUs
4-7; a member's slot gets CUDA_VISIBLE_DEVICES set to those physical entries (ids, UUIDs or MIG ids, as
the user wrote them), never to the ordinals, which would be someone else's GPUs 0-3. CPU threads are shared
out over the cores this process may run on (its affinity under SLURM, taskset or a container).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
from typing import Any

from members.contract.cli import shim_command
from members.contract.config import ConfigError


def visible_gpus() -> list[str]:
    """The CUDA_VISIBLE_DEVICES entries of the GPUs this process sees, in ordinal order (plain ids when the
    variable is unset: then ordinal k is physical GPU k)."""
    import torch  # here, not at start-up: only a run that places members needs it

    count = torch.cuda.device_count()
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    if mask is None:
        return [str(i) for i in range(count)]
    entries = [e.strip() for e in mask.split(",") if e.strip()]
    return entries[:count]  # CUDA stops at the first invalid entry; device_count counts the usable ones


def resolve_gpus(text: str) -> list[str]:
    """--gpus (ordinals among the visible GPUs, as torch numbers them), else every visible GPU; returned as the
    CUDA_VISIBLE_DEVICES entries a member's environment must name. None visible: the CPU ([])."""
    visible = visible_gpus()
    wanted = [g.strip() for g in text.split(",") if g.strip()]
    if not wanted:
        return visible
    shown = os.environ.get("CUDA_VISIBLE_DEVICES")
    seen = f"CUDA_VISIBLE_DEVICES={shown}" if shown is not None else "no CUDA_VISIBLE_DEVICES"
    bad = [g for g in wanted if not g.isdigit() or int(g) >= len(visible)]
    if bad:
        raise ConfigError(f"--gpus {text}: {', '.join(bad)} is not the ordinal of a visible GPU ({len(visible)} visible, "
                         f"{seen}; ordinals count the visible GPUs from 0)")
    if len(set(wanted)) != len(wanted):
        raise ConfigError(f"--gpus {text}: a GPU is named twice")
    return [visible[int(g)] for g in wanted]


def gpus_per_member(text: str) -> int | None:
    """--gpus-per-member: a positive whole number of GPUs, or 'all' (None)."""
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive whole number of GPUs or 'all'")
    return int(text)


def positive_count(text: str) -> int:
    """--cpu-procs: a positive whole number of processes."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive whole number of processes")
    return int(text)


def plan_slots(gpus: list[str], per_member: int | None, cpu_procs: int) -> tuple[list[list[str]], int]:
    """Slots that run one member each (GPU lists; [[]] = the CPU) and processes per member.

    per_member K: len(gpus) // K slots side by side (left-over GPUs idle); None: one slot, all GPUs.
    """
    if not gpus:
        return [[]], cpu_procs
    if per_member is None or per_member >= len(gpus):
        return [gpus], len(gpus)
    slots = [gpus[i:i + per_member] for i in range(0, len(gpus) - per_member + 1, per_member)]
    return slots, per_member


def usable_cores() -> int:
    """The cores this process may run on: its affinity (what SLURM, taskset or a container allot), not
    every core of the machine."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def cpu_threads(processes: int) -> int:
    """CPU threads for each of `processes` processes running at once: the usable cores shared out."""
    return max(1, usable_cores() // max(processes, 1))


def member_env(gpus: list[str], threads: int) -> dict[str, str]:
    """The environment of a member's processes: its slot's GPUs (CUDA_VISIBLE_DEVICES entries from
    `resolve_gpus`) or the CPU, and its CPU threads."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    else:
        env["ACCELERATE_USE_CPU"] = "1"  # with --multi_gpu: gloo processes on the CPU
    return env


def spawn(cmd: list[str], **kwargs: Any) -> subprocess.Popen:
    """Start a child that dies with this process (even on kill -9), in its own session so that a
    Ctrl-C reaches only this process, which then stops the child and prints one line."""
    return subprocess.Popen(shim_command(cmd), start_new_session=True, **kwargs)


def stop(proc: subprocess.Popen) -> None:
    """Kill a child started by `spawn` and everything in its session; its writes are atomic, and
    the next run resumes from its last saved state."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
