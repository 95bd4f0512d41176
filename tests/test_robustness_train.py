"""Training survives kills: states, pointers, locks, orphaned workers and Ctrl-C (issue 9, section 6)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from members.launch.experiment import launch_command
from members.train import states as states_mod

REPO = Path(__file__).resolve().parents[1]


class FakeAccelerator:
    """Just what `save_state` uses, on one process: `save_state` writes a weights file."""

    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, folder: str) -> None:
        Path(folder).mkdir(parents=True)
        (Path(folder) / "model.bin").write_bytes(b"weights")


def progress(step: int, epoch: int, batch: int) -> dict:
    return {"epoch": epoch, "step": step, "batch": batch, "best_main": 0.0, "best_epoch": None}


def test_a_kill_while_replacing_a_same_step_state_leaves_a_loadable_pointer(tmp_path, monkeypatch):
    """The end-of-epoch state has the step of a mid-epoch one: the folder latest.txt names must not be
    deleted before the new one is in place (today: rmtree, then a kill before the rename)."""
    states = tmp_path / "states"
    states.mkdir()
    acc = FakeAccelerator()
    states_mod.save_state(acc, states, progress(3, 0, 3), keep=2)  # mid-epoch state, step 3
    real_replace = os.replace

    def killed(src, dst):  # the process dies where the new state would be renamed into place
        if Path(src).name.startswith(".tmp-"):
            raise KeyboardInterrupt("kill -9")
        real_replace(src, dst)

    monkeypatch.setattr(states_mod.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        states_mod.save_state(acc, states, progress(3, 1, 0), keep=2)  # end of epoch, same step
    monkeypatch.setattr(states_mod.os, "replace", real_replace)
    latest = states_mod.latest_state(states)
    assert latest is not None and (latest / "model.bin").is_file()
    assert json.loads((latest / "progress.json").read_text())["step"] == 3
    # the next save completes and the pointer moves to the end-of-epoch state
    states_mod.save_state(acc, states, progress(3, 1, 0), keep=2)
    latest = states_mod.latest_state(states)
    assert json.loads((latest / "progress.json").read_text())["epoch"] == 1
    states_mod.save_state(acc, states, progress(6, 2, 3), keep=1)
    assert [p.name for p in states.glob("step-*")] == ["step-00000006"]


def test_truncated_pointer_or_progress_falls_back_to_the_newest_complete_state(tmp_path, capsys):
    states = tmp_path / "states"
    states.mkdir()
    acc = FakeAccelerator()
    for step in (3, 6):
        states_mod.save_state(acc, states, progress(step, 0, step), keep=3)
    (states / "latest.txt").write_text("step-000")  # torn write
    assert states_mod.latest_state(states).name == "step-00000006"
    assert "not a complete state" in capsys.readouterr().out
    (states / "latest.txt").write_text("step-00000006\n")
    (states / "step-00000006" / "progress.json").write_text('{"epoch": 0, "st')  # torn progress.json
    assert states_mod.latest_state(states).name == "step-00000003"


def test_no_complete_state_is_one_clear_error(tmp_path):
    states = tmp_path / "states"
    states.mkdir()
    (states / "latest.txt").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(states_mod.StateError, match="latest.txt.*delete"):
        states_mod.latest_state(states)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}


def _wait_for(predicate, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _logged_steps(out: Path) -> int:
    log = out / "log.csv"
    return max(len(log.read_text().splitlines()) - 1, 0) if log.is_file() else 0


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _long_run(member_yaml: Path, out: Path) -> list[str]:
    return ["-c", str(member_yaml), "--set", f"output_dir={out}", "--set", "train.epochs=200"]


def test_a_second_trainer_on_the_same_folder_refuses_naming_the_holder(member_yaml, tmp_path):
    out = tmp_path / "member"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from members.contract.cli import hold_folder_lock; "
                               f"hold_folder_lock(Path({str(out)!r}), 'test'); print('held', flush=True); "
                               "time.sleep(60)"], env=_env(), cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = subprocess.run([sys.executable, "-m", "members.train.loop", *_long_run(member_yaml, out)],
                                env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 2, second.stderr
    assert f"test, pid {holder.pid}" in second.stderr and "the folder is in use" in second.stderr
    assert "Traceback" not in second.stderr and not (out / "log.csv").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_workers_die_with_a_killed_launcher(member_yaml, tmp_path):
    """torch elastic starts workers in new sessions: kill -9 of the launcher left them training."""
    out = tmp_path / "member"
    launcher = subprocess.Popen(launch_command("members.train.loop", _long_run(member_yaml, out), 2, cpu=True),
                                env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: _logged_steps(out) >= 1, 300, "the workers to train")
        workers = _children(launcher.pid)
        assert len(workers) == 2, workers
        launcher.kill()
        launcher.wait()
        _wait_for(lambda: not any(_alive(w) for w in workers), 30, "the orphaned workers to die")
    finally:
        launcher.kill()
        for pid in _children(launcher.pid):
            os.kill(pid, signal.SIGKILL)


def test_ctrl_c_is_one_line_and_exit_130(member_yaml, tmp_path):
    out = tmp_path / "member"
    proc = subprocess.Popen([sys.executable, "-m", "members.train.loop", *_long_run(member_yaml, out)],
                            env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: _logged_steps(out) >= 1, 300, "training to start")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted; rerun the same command to resume"
    assert "Traceback" not in err


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace") and _alive(int(cmdline.parent.name)):
                found.append(int(cmdline.parent.name))
        except (OSError, ValueError):
            continue
    return [pid for pid in found if pid != os.getpid()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_experiment_ctrl_c_and_kill_9_leave_no_training_behind(member_yaml, tmp_path):
    """members.launch.experiment runs members under `accelerate launch`: Ctrl-C is one line and exit 130, and
    kill -9 of the experiment ends its launcher and the launcher's workers too."""
    member = yaml.safe_load(member_yaml.read_text())
    member["train"]["epochs"] = 200
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(member))
    runs = tmp_path / "runs"
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump({"name": "x", "runs_dir": str(runs),
                                                       "members": [str(tmp_path / "m.yaml")]}))
    cmd = [sys.executable, "-m", "members.launch.experiment", "-c", str(tmp_path / "exp.yaml"), "--cpu-procs", "1"]
    for how in (signal.SIGINT, signal.SIGKILL):
        proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        try:
            before = _logged_steps(runs / "t")
            _wait_for(lambda: _logged_steps(runs / "t") > before, 600, "the member to train")
            assert len(_processes_mentioning(str(tmp_path / "m.yaml"))) >= 2  # launcher + worker
            proc.send_signal(how)
            _, err = proc.communicate(timeout=60)
            _wait_for(lambda: not _processes_mentioning(str(tmp_path / "m.yaml")), 30, "the training to stop")
        finally:
            proc.kill()
            for pid in _processes_mentioning(str(tmp_path / "m.yaml")):
                os.kill(pid, signal.SIGKILL)
        if how == signal.SIGINT:
            assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
            assert err.strip().splitlines()[-1] == "interrupted; rerun the same command to resume"


@pytest.mark.parametrize("module", ["ensemble", "submission", "ensemble.evaluate"])
def test_ctrl_c_where_nothing_resumes_says_so(module, monkeypatch, capsys):
    import runpy

    import members.contract.schema
    from members.contract.cli import INTERRUPTED_RERUN

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(members.contract.schema, "load_experiment", interrupt)
    monkeypatch.setattr(sys, "argv", [module, "-c", "x.yaml", "--labels", "y"][: 5 if "evaluate" in module else 3])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module(module, run_name="__main__", alter_sys=False)
    assert exit_.value.code == 130
    assert capsys.readouterr().err.strip() == INTERRUPTED_RERUN
