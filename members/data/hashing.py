"""The sha256 of every image of a dataset, cached by file stat beside the split lists.

The split lists' content fingerprint (`members.data.splits.content_fingerprint`) hashes every image, so
that an image replaced by another of the same size is seen. Hashing a 23k-image PIPAL tree (~6 GB) reads
it all; the cache (`content_cache.json`) lets a later check reuse the hash of every file whose stat is
unchanged. The fingerprints never depend on the cache: it only saves reading. The cache is sealed like
the stage manifests (`self_sha256`): one edited by hand (an entry given a swapped image's new stat and
its old hash), torn or of an older kit is ignored, and every image is hashed again.
"""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from members.contract.atomic import atomic_write_text
from members.contract.filehash import settled, stat_key
from members.contract.stagefiles import seal_holds, sealed_json, sha256_file

# sha256 of every image, keyed by its path and stat, beside the split lists: it only saves re-reading
# unchanged images (a 23k-image PIPAL tree is ~6 GB); the fingerprints never depend on it.
CONTENT_CACHE = "content_cache.json"
CACHE_VERSION = 2  # 2: sealed
PROGRESS_MIN = 200  # images to hash above which a progress bar is shown


def _read_cache(path: Path) -> dict[str, list]:
    """{absolute path: stat key + [sha256]}; a missing cache is an empty one, and so is one whose seal
    fails (edited by hand, torn, or written by an older kit), with one line saying so."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not seal_holds(record) or record.get("version") != CACHE_VERSION:
            raise ValueError("seal")
        files = record["files"]
        return {k: v for k, v in files.items()
                if isinstance(v, list) and len(v) == 5 and all(isinstance(x, int) for x in v[:4])
                and isinstance(v[4], str)}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        print(f"{path}: not a cache this kit wrote and sealed (edited by hand, damaged, or written by an older "
              "kit); hashing every image again", flush=True)
        return {}


def _sha256_or_none(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None  # unreadable: `check_pairs` says so; the fingerprint just records it


def image_hashes(paths: list[Path], cache_dir: Path | None) -> dict[str, str | None]:
    """sha256 of each file (None when missing or unreadable), reusing `cache_dir/content_cache.json`
    for files whose stat is unchanged, and adding the new ones to it. Processes writing the cache
    at once are fine (atomic writes, the last one wins; a lost entry is only re-hashed)."""
    cache_file = Path(cache_dir) / CONTENT_CACHE if cache_dir is not None else None
    cache = _read_cache(cache_file) if cache_file else {}
    hashes: dict[str, str | None] = {}
    todo: list[tuple[Path, str, list[int]]] = []
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            hashes[str(path)] = None
            continue
        key, entry = os.path.abspath(path), stat_key(st)
        if cache.get(key, [])[:4] == entry:
            hashes[str(path)] = cache[key][4]
        else:
            todo.append((path, key, entry))
    if not todo:
        return hashes
    started = time.time_ns()
    # hashlib releases the GIL on large buffers: threads overlap reading and hashing
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(tqdm(pool.map(_sha256_or_none, [p for p, _, _ in todo]), total=len(todo),
                            desc="hashing images", unit="img", disable=len(todo) < PROGRESS_MIN))
    for (path, key, entry), digest in zip(todo, digests):
        hashes[str(path)] = digest
        if digest is not None and settled(entry, started):
            cache[key] = [*entry, digest]
    if cache_file is not None:
        try:
            atomic_write_text(cache_file, sealed_json({"version": CACHE_VERSION, "files": cache}, indent=None))
        except OSError:
            pass  # a read-only split folder: the next check hashes again, nothing else changes
    return hashes

