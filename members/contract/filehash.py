"""The sha256 of a file, read at most once per process while the file is unchanged.

Every stage hashes the files it checks: a member's best.pth (109 MB for ViT-B) is compared with each of
its predictions' manifests (3 splits), by the training driver twice and again by the ensemble and the
submission. An in-process cache keyed by the file's path and stat serves the repeats; a file whose stat
changed (a write changes its ctime, which no tool sets back) is read again. A file written within
RACY_SECONDS of its hashing is not cached: a coarse file-system clock could give its next rewrite the
same time stamps. The persistent cache of image hashes (members.data.hashing) keys on the same stat.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

# A file written this close to its hashing may later be rewritten with an equal time stamp (coarse
# file-system clocks): its hash is used once but not cached.
RACY_SECONDS = 2.0
_BLOCK = 1 << 20

_cache: dict[str, tuple[list[int], str]] = {}  # absolute path -> (stat key, sha256)


def stat_key(st: os.stat_result) -> list[int]:
    """What must be unchanged for a cached hash to be reused. Not the mtime alone: `cp -p` keeps it,
    and images of one size have one byte count; a write changes the ctime, which no tool sets back."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def settled(key: list[int], started_ns: int) -> bool:
    """Whether a file of stat `key`, hashed from `started_ns` on, is old enough for its hash to be cached."""
    return max(key[1], key[2]) < started_ns - int(RACY_SECONDS * 1e9)


def _digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    """The file's sha256 (OSError when it cannot be read), from this process's cache when its stat is
    the one it had when it was hashed."""
    started = time.time_ns()
    key = stat_key(os.stat(path))
    name = os.path.abspath(path)
    hit = _cache.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    digest = _digest(path)
    if settled(key, started):
        _cache[name] = (key, digest)
    return digest


def forget() -> None:
    """Empty the cache (as a new process starts with)."""
    _cache.clear()
