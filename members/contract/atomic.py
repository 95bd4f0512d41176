"""The one way this kit writes a file that users keep: whole or not at all.

Every file is written to a temporary sibling and renamed over its target, so a reader (or a run
killed with `kill -9` half way) sees the old file or the new one, never a torn one.

The temporary name is fixed per target and writer: `.<name>.<host>-<pid>.tmp`. The writer in it lets
two processes write the same file at once (every process of a DDP run writes the same split lists),
and the name lets the next write of a target remove what a killed writer left of it; `sweep_temps`
removes the rest when a run starts. Files are created with the usual permissions (0666 minus the
umask, i.e. 0644 under umask 022): `tempfile.mkstemp` would make them 0600, unreadable for the rest
of a team sharing the results.
"""
from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_SUFFIX = ".tmp"

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "sweep_temps", "temp_dir", "temp_path"]


def _host() -> str:
    return socket.gethostname().replace(".", "_")  # no dots: the writer is the last dotted part


def _writer() -> str:
    return f"{_host()}-{os.getpid()}"


def temp_path(path: str | os.PathLike) -> Path:
    """The temporary sibling this process writes `path` through: `.<name>.<host>-<pid>.tmp`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{_writer()}{TEMP_SUFFIX}")


def _is_dead_writer(name: str) -> bool:
    """Whether a temp file's writer is gone: a process of this host that no longer runs, or a name
    of another shape (litter of older versions of the kit, e.g. mkstemp's random names)."""
    writer = name[: -len(TEMP_SUFFIX)].rpartition(".")[2]
    host, sep, pid = writer.rpartition("-")
    if not sep or not host or not pid.isdigit():
        return True
    if host != _host() or int(pid) == os.getpid():
        return False  # a writer on another machine may be alive; our own temps are ours to handle
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _remove_dead_temps(folder: Path, prefix: str) -> list[Path]:
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if name.startswith(prefix) and name.endswith(TEMP_SUFFIX) and _is_dead_writer(name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)  # a `temp_dir` of a killed run
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


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
    _remove_dead_temps(path.parent, f".{path.name}.")
    tmp = temp_path(path)
    # A stale temp (a reused pid) may carry other permissions; a fresh file gets the umask's.
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


@contextmanager
def temp_dir(folder: str | os.PathLike, stem: str) -> Iterator[Path]:
    """A scratch folder `folder/.<stem>.<host>-<pid>.tmp` for this process, removed when the block ends;
    one that a killed run left (its writer gone) is removed by the next `temp_dir` of the same stem."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(folder, f".{stem}.")
    path = temp_path(folder / stem)
    shutil.rmtree(path, ignore_errors=True)  # a reused pid's leftover
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def sweep_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders (`.*.tmp`) that dead writers left directly in `folder`; those of
    live writers on this host, and of writers on other hosts, stay. Returns what was removed."""
    return _remove_dead_temps(Path(folder), ".")
