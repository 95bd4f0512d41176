"""What every command line of the kit shares: one line per failure, and processes that die together.

- `run_main(main)` runs a CLI's `main`: Ctrl-C prints "interrupted; rerun the same command to
  resume" (or, for commands that recompute everything, that nothing half-written was kept) and exits
  130; the kit's known error types (bad configs, bad data, file problems such as a full disk or a
  missing folder) print one `error:` line and exit 2, never a traceback.
- `quiet_start()`, first thing in a `__main__` module, gives Ctrl-C during its slow imports (torch,
  scipy) the same one line and exit 130, instead of a KeyboardInterrupt traceback from inside them.
- `die_with_parent()` makes a worker die when the process that launched it dies, even by `kill -9`:
  torch's elastic launcher starts its workers in new sessions, so they would go on training as
  orphans. Linux's PR_SET_PDEATHSIG does it; elsewhere it is a no-op.
- `hold_folder_lock(folder)` (for the process) and `folder_lock(folder)` (for a block) make sure one run
  at a time writes a folder (a second trainer or predictor of the same member would interleave its files
  with the first's; a second `make train-members` of one experiment would run both).
- `python -m members.contract.cli --die-with-parent -- CMD...` execs CMD with the same protection, for
  children started by `members.launch.experiment`.
- `python -m members.contract.cli --launch ARGS...` is `accelerate launch ARGS...` for `members.launch.experiment`:
  a worker that fails says why in one line, and the launcher adds no traceback of its own.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, NoReturn

INTERRUPTED = "interrupted; rerun the same command to resume"
# for commands with nothing to resume (they recompute everything; their files are replaced whole)
INTERRUPTED_RERUN = "interrupted; nothing half-written was kept; rerun the same command"
PR_SET_PDEATHSIG = 1
# Parents whose children should follow them: the accelerate / torch.distributed launchers and our shim.
LAUNCHERS = ("accelerate", "torch.distributed.run", "torchrun", "members.contract.cli")

_held_locks: dict[str, IO[str]] = {}  # folder -> its open lock file, held by this process


class LockedError(RuntimeError):
    """Another live process holds the folder's lock."""


class UserError(Exception):
    """Base of the kit's "bad input or state" errors raised outside the contract (a missing weights file,
    an unreadable checkpoint or training state): `run_main` prints their message in one line, exit 2."""


def _known_errors() -> tuple[type[BaseException], ...]:
    """The kit's own "bad input" errors; imported lazily so `members.contract.cli` stays cheap to start."""
    from members.contract.config import ConfigError
    from members.contract.data_config import DataError

    return ConfigError, DataError, LockedError, UserError


def one_line(err: BaseException) -> str:
    """The message of `err` as a user should see it (no traceback, not even one relayed by a
    DataLoader worker, whose message embeds the worker's traceback)."""
    text = str(err)
    if "Original Traceback" in text:  # torch's worker re-raise: keep the original error's message
        last = [ln for ln in text.strip().splitlines() if ln.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    if isinstance(err, OSError) and err.strerror:
        where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
        hint = {errno.EFBIG: " (the file-size limit was hit: raise `ulimit -f` or write elsewhere)",
                errno.ENOSPC: " (the disk is full: free space or write elsewhere)",
                errno.EACCES: " (no permission: pick a folder you can write)",
                errno.EROFS: " (read-only file system: write elsewhere)"}.get(err.errno, "")
        text = f"{where + ': ' if where else ''}{err.strerror}{hint}"
    return text


def duration(seconds: float) -> str:
    """A rough human duration: 40 s, 12 min, 3 h 05 min ("?" when unknown)."""
    if not seconds >= 0 or seconds == float("inf"):
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def _close_progress_bars() -> None:
    """Close open tqdm bars now: at exit they would redraw themselves after our last line."""
    tqdm_module = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm_module, "tqdm", None), "_instances", [])):
        try:
            bar.close()
        except Exception:  # a bar half torn down by the interrupt: it must not hide the message
            pass


_start_message = INTERRUPTED


def _interrupted_at_start(signum: int, frame: object) -> NoReturn:
    print(_start_message, file=sys.stderr)
    sys.exit(130)  # SystemExit leaves the import it interrupts without a traceback


def quiet_start(interrupted: str = INTERRUPTED) -> None:
    """Make Ctrl-C before `run_main` (during the module imports that precede it, seconds for torch)
    print `interrupted` and exit 130, as `run_main` does later. Call it at the top of a `__main__`
    module, before those imports; `run_main` hands Ctrl-C back to Python's KeyboardInterrupt."""
    global _start_message
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored (nohup)
        _start_message = interrupted
        signal.signal(signal.SIGINT, _interrupted_at_start)


def run_main(main: Callable[[], int | None], interrupted: str = INTERRUPTED) -> NoReturn:
    """Run a CLI's `main` and exit with its status; see the module docstring for failures.
    `interrupted`: what Ctrl-C prints (INTERRUPTED_RERUN for commands that cannot resume)."""
    if signal.getsignal(signal.SIGINT) is _interrupted_at_start:  # quiet_start's part is over
        signal.signal(signal.SIGINT, signal.default_int_handler)
    die_with_parent()  # a no-op unless started by a launcher (accelerate launch, members.launch.experiment)
    try:
        code = main()
    except KeyboardInterrupt:
        _close_progress_bars()
        print(interrupted, file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `... | head`: the reader left; nothing to report
        sys.exit(1)
    except (OSError, *_known_errors()) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)


def _launched_by_launcher(ppid: int) -> bool:
    """True when the parent is a launcher whose death should end this process. A process started by
    a shell is left alone: `nohup python -m members.train.loop ... &` must outlive the shell."""
    try:
        cmdline = Path(f"/proc/{ppid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return any(name in cmdline for name in LAUNCHERS)


def die_with_parent(always: bool = False) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (`always`, or if the parent is a
    launcher); exit at once if the parent died already. Call it first thing in a worker's main."""
    if not sys.platform.startswith("linux"):
        return
    ppid = os.getppid()
    if ppid == 1 and "TORCHELASTIC_RUN_ID" in os.environ:
        os._exit(1)  # an elastic worker whose launcher is gone already
    if not always and not _launched_by_launcher(ppid):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not allowed here (a sandbox): no worse than before
    # The parent may have died between getppid and prctl: then we were re-parented already.
    if os.getppid() != ppid:
        os._exit(1)


def _lock(folder: Path, what: str) -> IO[str] | None:
    """Take `folder/.lock` (an flock, released by the OS when the process exits, even by kill -9), or
    raise `LockedError` naming the holder and what it runs. None when this process holds it already."""
    import fcntl

    key = os.path.abspath(folder)
    if key in _held_locks:
        return None  # re-entrant within a process: flock would refuse a second descriptor of our own
    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / ".lock", "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise LockedError(f"{folder}: {what} cannot start: the folder is in use ({holder}); wait for it to "
                          "finish or stop it, then rerun") from None
    f.seek(0)
    f.truncate()
    f.write(f"{what}, pid {os.getpid()} on host {socket.gethostname()}\n")
    f.flush()
    _held_locks[key] = f
    return f


def hold_folder_lock(folder: Path, what: str) -> None:
    """Hold `folder/.lock` for this process's lifetime: one run at a time writes the folder. `what`
    names this run in the message a second one gets."""
    _lock(Path(folder), what)


@contextmanager
def folder_lock(folder: Path, what: str) -> Iterator[None]:
    """Hold `folder/.lock` while the block runs (for work inside a longer-lived process: prediction)."""
    f = _lock(Path(folder), what)
    try:
        yield
    finally:
        if f is not None:
            del _held_locks[os.path.abspath(folder)]
            f.close()  # releases the flock


def shim_command(cmd: list[str]) -> list[str]:
    """`cmd` run through this module, so that it dies with the process that starts it."""
    return [sys.executable, "-m", "members.contract.cli", "--die-with-parent", "--", *cmd]


def _exec_main(argv: list[str]) -> NoReturn:
    if len(argv) < 3 or argv[:2] != ["--die-with-parent", "--"]:
        sys.exit("usage: python -m members.contract.cli --die-with-parent -- COMMAND [ARGS...]")
    die_with_parent(always=True)
    os.execvp(argv[2], argv[2:])


def _launch_main(argv: list[str]) -> NoReturn:
    """`accelerate launch argv` in this process, ending in its workers' exit status alone: a worker
    that fails has printed its one `error:` line already, and `members.launch.experiment` names the member
    that failed; the launcher's own traceback (one process) or torch elastic's failure report and log
    lines (several) would only bury that line."""
    import logging
    from subprocess import CalledProcessError

    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    logging.disable(logging.ERROR)  # in this launcher only: elastic logs every stopped worker
    try:
        launch_command(launch_command_parser().parse_args(argv))
    except CalledProcessError as err:
        sys.exit(err.returncode)
    except ChildFailedError:
        sys.exit(1)
    except Exception as err:  # the launcher's own failure (a bad argument, a busy port): still one line
        sys.exit(f"error: accelerate launch: {one_line(err)}")
    sys.exit(0)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--launch"]:
        _launch_main(sys.argv[2:])
    _exec_main(sys.argv[1:])
