"""Files users keep: written whole, with normal permissions, no litter; limits and Ctrl-C (issue 9)."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from torch import nn

from members.contract.atomic import atomic_path, atomic_write_bytes, atomic_write_text, sweep_temps, temp_path
from members.contract.cli import one_line
from members.contract.config import ConfigError, read_yaml_with_base
from members.data.index import DataError
from members.model.checkpoint import save_heads
from submission.check import MAX_MEMBER_BYTES, check_zip

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class Heads(nn.Module):
    kind = "fr"  # an AHIQ's head parts (checkpoint.HEAD_PARTS)

    def __init__(self) -> None:
        super().__init__()
        self.deform_net, self.regressor = nn.Linear(2, 2), nn.Linear(2, 1)


def test_checkpoints_zips_and_texts_are_0644_not_0600(tmp_path, umask_022):
    save_heads(Heads(), tmp_path / "best.pth", {"vit": "x"})
    atomic_write_text(tmp_path / "a.txt", "a")
    atomic_write_bytes(tmp_path / "b.png", b"\x89PNG")
    with atomic_path(tmp_path / "s.zip") as tmp, zipfile.ZipFile(tmp, "w") as z:
        z.writestr("output.txt", "x,1\n")
    for name in ("best.pth", "a.txt", "b.png", "s.zip"):
        assert mode(tmp_path / name) == 0o644, name


def test_a_killed_writers_temp_is_removed_by_the_next_write_and_litter_is_swept(tmp_path, umask_022):
    target = tmp_path / "best.pth"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = temp_path(target).with_name(temp_path(target).name.replace(f"-{os.getpid()}.", f"-{dead.stdout.strip()}."))
    killed.write_bytes(b"half of a 58 MB checkpoint")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = temp_path(target).with_name(temp_path(target).name.replace(f"-{os.getpid()}.", f"-{live.pid}."))
        busy.write_bytes(b"being written")
        atomic_write_bytes(target, b"whole")
        assert target.read_bytes() == b"whole" and mode(target) == 0o644
        assert not killed.exists() and busy.exists()  # a live writer's temp is left alone
    finally:
        live.kill()
        live.wait()
    old_style = tmp_path / ".last.pth.k3j2_x.tmp"  # what mkstemp left before this module
    old_style.write_bytes(b"58 MB")
    keep = tmp_path / "notes.tmp"  # not hidden: not ours
    keep.write_text("mine")
    assert sorted(sweep_temps(tmp_path)) == sorted([old_style, busy])  # busy's writer is gone now
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pth", "notes.tmp"]


CONCURRENT_SCRIPT = """
import sys
from members.contract.atomic import atomic_write_text
for i in range(300):
    atomic_write_text(sys.argv[1], "same content\\n" * 1000)
"""


def test_processes_writing_the_same_file_at_once_do_not_collide(tmp_path):
    """Every DDP process writes the same split lists; one shared temp name made them fail."""
    target = tmp_path / "train.csv"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_SCRIPT, str(target)], env=env, cwd=REPO,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    assert target.read_text() == "same content\n" * 1000 and os.listdir(tmp_path) == ["train.csv"]


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "preds.csv"
    atomic_write_text(target, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("new, half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["preds.csv"]


FSIZE_SCRIPT = """
import resource, signal, sys
from pathlib import Path
from members.contract.atomic import atomic_write_bytes
target = Path(sys.argv[1])
atomic_write_bytes(target, b"old")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
atomic_write_bytes(target, b"x" * 100_000)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX resource limits")
def test_a_file_size_limit_hit_keeps_the_old_file(tmp_path):
    target = tmp_path / "last.pth"
    proc = subprocess.run([sys.executable, "-c", FSIZE_SCRIPT, str(target)], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert proc.returncode != 0 and "File too large" in proc.stderr
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["last.pth"]


def test_a_file_size_limit_hit_while_training_is_one_line(tmp_path, member_yaml):
    """Under a 200 KB file-size limit the first training state cannot be saved: one line, the
    folder keeps no half-written state (today: a safetensors traceback)."""
    out = tmp_path / "member"
    script = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000)); "
              f"sys.argv = ['members.train.loop', '-c', {str(member_yaml)!r}, '--set', 'output_dir={out}']; "
              "runpy.run_module('members.train.loop', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "File too large" in last and "ulimit" in last
    assert not (out / "states/latest.txt").exists() and list((out / "states").iterdir()) == []


def test_base_cycle_is_a_config_error_naming_the_chain(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nseed: 1\n")
    with pytest.raises(ConfigError, match=r"a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        read_yaml_with_base(tmp_path / "a.yaml")
    (tmp_path / "self.yaml").write_text("base: self.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        read_yaml_with_base(tmp_path / "self.yaml")


def _zip_with(path: Path, output: bytes) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("output.txt", output)
        z.writestr("readme.txt", "runtime per image [s] : 1\n")
    return path


def test_check_refuses_a_zip_that_inflates_past_the_cap(tmp_path):
    bomb = _zip_with(tmp_path / "bomb.zip", b"A0001_00_00.bmp,1\n" * (MAX_MEMBER_BYTES // 10))
    assert bomb.stat().st_size < MAX_MEMBER_BYTES // 20  # small on disk, huge inflated
    report = check_zip(bomb, None)
    assert not report.ok and any("inflates to more than" in e for e in report.errors)
    assert report.n_rows == 0  # nothing of it was parsed


def test_check_cli_on_a_zip_bomb_is_one_verdict(tmp_path):
    bomb = _zip_with(tmp_path / "bomb.zip", b"0" * (MAX_MEMBER_BYTES + 10))
    names = tmp_path / "names.txt"
    names.write_text("A0001_00_00.bmp\n")
    proc = subprocess.run([sys.executable, "-m", "submission.check", str(bomb), "--names", str(names)], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert proc.returncode == 1 and "inflates to more than" in proc.stdout and "Traceback" not in proc.stderr


def test_a_dataloader_workers_error_is_shown_as_its_own_one_line():
    from torch._utils import ExceptionWrapper

    try:
        raise DataError("data/x.bmp: cannot read this image any more")
    except DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(DataError) as caught:
        wrapped.reraise()
    assert "Traceback" in str(caught.value)  # what torch relays
    assert one_line(caught.value) == "data/x.bmp: cannot read this image any more"

