"""The one way this kit writes a file that users keep: whole or not at all.

Every file is written to a temporary sibling and renamed over its target, so a reader (or a run
killed with `kill -9` half way) sees the old file or the new one, never a torn one. The temporary
name is fixed per target (`.<name>.tmp`), so the litter of a killed write is overwritten by the next
write of the same file, and `sweep_temps` removes what is left when a run starts. Files are created
with the usual permissions (0666 minus the umask, i.e. 0644 under umask 022): `tempfile.mkstemp`
would make them 0600, unreadable for the rest of a team sharing the results.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_SUFFIX = ".tmp"

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "sweep_temps", "temp_path"]


def temp_path(path: str | os.PathLike) -> Path:
    """The temporary sibling a write of `path` goes through: `.<name>.tmp` in the same folder."""
    path = Path(path)
    return path.with_name(f".{path.name}{TEMP_SUFFIX}")


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable; some file systems cannot open a folder, which is harmless."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield the temporary sibling of `path` to write (torch.save, a zip); on success it is synced
    and renamed over `path`; on any error (or Ctrl-C) it is removed and `path` is left untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    # A stale temp from a killed write may carry other permissions; a fresh file gets the umask's.
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.filename is None and err.strerror:  # a failed write() names no file; say which one
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (see the module docstring)."""
    with atomic_path(path) as tmp:
        # 0o666 is filtered by the umask, as for any file a program creates with open().
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically as UTF-8 with '\\n' line endings."""
    atomic_write_bytes(path, text.encode("utf-8"))


def sweep_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files (`.*.tmp`) that killed writes left directly in `folder`.

    Call it where a run starts, once it owns the folder: a write in progress by another process
    would lose its temp file. Returns what was removed.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX) and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
