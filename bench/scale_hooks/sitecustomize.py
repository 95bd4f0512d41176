"""Counters for `make scale` in every Python process of a measured command (on PYTHONPATH only there).

With AHIQ_SCALE_STATS set to a folder, each process that exits normally writes `<pid>.json` there:
its command line, its peak resident set (VmHWM), the bytes that went through `hashlib.sha256`, every
`members.contract.filehash.sha256_file` call and every file it actually read (path -> calls, reads,
bytes read: a call its in-process cache answers reads nothing), and the start and end of every
`Accelerator.accumulate` block, wall clock (perf_counter) and this process's CPU clock (process_time,
all threads): in `members.train.loop.training_step` that block is the model's forward, backward and
optimizer step, so the trainer records its own compute time per step, at the same moment and under
the same load as the loop around it. DataLoader workers and killed processes
write nothing. Nothing in the kit changes: `hashlib.sha256` is wrapped by a counting object with the
same methods, and `sha256_file`, its reader `_digest` and `accumulate` by wrappers installed as their
modules are first imported, before any other module can import them by name.
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib.abc
import importlib.machinery
import json
import os
import sys
import time

_FOLDER = os.environ.get("AHIQ_SCALE_STATS", "")
_STATS: dict = {"sha256_bytes": 0, "files": {}, "accumulate": []}  # accumulate: [wall0, wall1, cpu0, cpu1]


class _Sha256:
    """hashlib.sha256 that counts what it is fed."""

    _new = staticmethod(hashlib.sha256)

    def __init__(self, data: bytes = b"", **kwargs) -> None:
        self._h = self._new(data, **kwargs)
        _STATS["sha256_bytes"] += len(data)

    def update(self, data: bytes) -> None:
        _STATS["sha256_bytes"] += memoryview(data).nbytes
        self._h.update(data)

    def __getattr__(self, name: str):  # digest, hexdigest, copy, name, digest_size, block_size
        return getattr(self._h, name)


def _wrap_filehash(module) -> None:
    """Count calls of sha256_file (cached or not) and the reads of its `_digest` (the real hashing)."""
    calls, digest = module.sha256_file, module._digest

    def entry(path) -> list[int]:
        return _STATS["files"].setdefault(os.path.abspath(str(path)), [0, 0, 0])  # calls, reads, bytes read

    def sha256_file(path):
        entry(path)[0] += 1
        return calls(path)

    def _digest(path):
        found = entry(path)
        found[1] += 1
        try:
            found[2] += os.path.getsize(path)
        except OSError:
            pass
        return digest(path)

    module.sha256_file, module._digest = sha256_file, _digest


def _wrap_accelerator(module) -> None:
    original = module.Accelerator.accumulate

    @contextlib.contextmanager
    def accumulate(self, *models):
        started, cpu = time.perf_counter(), time.process_time()
        try:
            with original(self, *models):
                yield
        finally:
            _STATS["accumulate"].append([started, time.perf_counter(), cpu, time.process_time()])

    module.Accelerator.accumulate = accumulate


_PATCHES = {"members.contract.filehash": _wrap_filehash, "accelerate.accelerator": _wrap_accelerator}


class _Finder(importlib.abc.MetaPathFinder):
    """Runs the module's patch of `_PATCHES` right after the module executes."""

    def find_spec(self, name, path, target=None):
        patch = _PATCHES.get(name)
        if patch is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_wrap(module):
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_and_wrap
        return spec


def _peak_kib() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _write() -> None:
    record = {"pid": os.getpid(), "ppid": os.getppid(), "argv": list(getattr(sys, "orig_argv", sys.argv)),
              "peak_kib": _peak_kib(), **_STATS}
    try:
        with open(os.path.join(_FOLDER, f"{os.getpid()}.json"), "w") as f:
            json.dump(record, f)
    except OSError:
        pass


if _FOLDER:
    hashlib.sha256 = _Sha256
    sys.meta_path.insert(0, _Finder())
    atexit.register(_write)
