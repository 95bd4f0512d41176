"""Frictions of the run commands: fix-it hints runnable as printed, finished members without their
resumable states (unless kept, then readable by the team), and progress lines of members.launch.experiment."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from members.contract.member import drop_states, load_member_config
from members.contract.stagefiles import (REBUILD_MEMBERS, StageFileError, make_command, read_member_meta,
                                         rebuild_ensemble, rebuild_members)
from members.launch import experiment
from members.train import states as states_mod

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ fix-it hints
def test_hints_name_the_experiment_when_known():
    assert rebuild_ensemble("configs/demo.yaml") == "make ensemble EXPERIMENT=configs/demo.yaml"
    # make train-members predicts what is not current (and computes metric members); make predict-all, which
    # re-predicts AHIQ members only, would not fix a `predictions:` or metric member: never suggested
    assert rebuild_members(Path("configs/demo.yaml")) == "make train-members EXPERIMENT=configs/demo.yaml"
    assert make_command("ensemble", "my runs/exp.yaml") == "make ensemble EXPERIMENT='my runs/exp.yaml'"  # pastes whole
    # unknown: a placeholder, never a bare `make ensemble` (that would run the Makefile's default experiment)
    assert rebuild_ensemble() == "make ensemble EXPERIMENT=<your config>"
    assert REBUILD_MEMBERS == "make train-members EXPERIMENT=<your config>"


def test_member_file_errors_name_the_experiment(tmp_path):
    with pytest.raises(StageFileError, match=r"preds_val\.json: not found; run make train-members "
                                             r"EXPERIMENT=configs/x\.yaml$"):
        read_member_meta(tmp_path, "val", "configs/x.yaml")
    with pytest.raises(StageFileError, match=r"EXPERIMENT=<your config>"):
        read_member_meta(tmp_path, "val")


# -------------------------------------------------------------------------------------- states
class SafetensorsLikeAccelerator:
    """What `save_state` uses, on one process; writes its weights 0600, as safetensors does."""

    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, folder: str) -> None:
        Path(folder).mkdir(parents=True)
        fd = os.open(Path(folder) / "model.safetensors", os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"weights")
        os.close(fd)


def progress(step: int) -> dict:
    return {"epoch": 0, "step": step, "batch": step, "best_main": 0.0, "best_epoch": None}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_states_follow_the_umask_not_0600(tmp_path, umask):
    states = tmp_path / "states"
    states.mkdir()
    old = os.umask(umask)
    try:
        states_mod.save_state(SafetensorsLikeAccelerator(), states, progress(3), keep=2)
    finally:
        os.umask(old)
    saved = states / "step-00000003"
    assert stat.S_IMODE((saved / "model.safetensors").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(saved.stat().st_mode) == 0o777 & ~umask


def test_drop_states_removes_the_folder_and_its_pointer(tmp_path):
    states = tmp_path / "states"
    states.mkdir()
    for step in (3, 6):
        states_mod.save_state(SafetensorsLikeAccelerator(), states, progress(step), keep=2)
    assert states_mod.latest_state(states).name == "step-00000006"
    drop_states(states)
    assert not states.exists() and states_mod.latest_state(states) is None
    drop_states(states)  # nothing left: no error


def test_states_a_killed_removal_left_are_removed_by_the_next_run(member_yaml, tmp_path, capsys):
    """kill -9 between done.json and the end of the states' removal leaves states/ behind (hundreds of
    MB per real member). Training never runs again for a finished member, so the next
    `make train-members` removes them, unless the states are to be kept."""
    from members.contract.schema import MemberEntry
    from members.launch.experiment import run_members

    cfg = load_member_config(member_yaml, [f"output_dir={tmp_path / 'm'}"])
    states = cfg.out / "states" / "step-00000003"
    states.mkdir(parents=True)
    (states / "model.safetensors").write_bytes(b"x" * 100)
    (cfg.out / "done.json").write_text("{}")
    kept = MemberEntry(member_yaml, cfg, [])
    assert run_members([kept], [], None, 1, keep_states=True) == []
    assert states.is_dir()  # --keep-states: left as they are
    assert run_members([kept], [], None, 1) == []
    assert not (cfg.out / "states").exists() and (cfg.out / "done.json").is_file()
    assert "removed the states a finished run left behind" in capsys.readouterr().out


# -------------------------------------------------------------------------------------- progress
def test_progress_lines_and_time_left(monkeypatch, capsys):
    now = [0.0]
    monkeypatch.setattr(experiment.time, "time", lambda: now[0])
    progress = experiment.Progress(total=3, slots=2)
    progress.start("a", "GPUs 0")
    progress.start("b", "GPUs 1")
    now[0] = 600.0
    progress.end("a")  # 10 min per member; 2 left on 2 slots side by side: about 10 min
    progress.start("c", "GPUs 0")
    now[0] = 1200.0
    progress.end("b")  # (10 + 20) / 2 = 15 min per member, 1 left on its own slot
    progress.end("c", "c: FAILED (exit 1)")
    assert capsys.readouterr().out.splitlines() == [
        "member 1 of 3: a (training on GPUs 0)",
        "member 2 of 3: b (training on GPUs 1)",
        "a: trained in 10 min, 1 of 3 done; about 10 min left for the other 2",
        "member 3 of 3: c (training on GPUs 0)",
        "b: trained in 20 min, 2 of 3 done; about 15 min left for the other 1",
        "c: FAILED (exit 1)",
    ]


@pytest.mark.parametrize("seconds, text", [(40, "40 s"), (720, "12 min"), (3 * 3600 + 5 * 60, "3 h 05 min")])
def test_duration(seconds, text):
    assert experiment.duration(seconds) == text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the launcher's process layout")
def test_experiment_prints_progress_and_keeps_states_when_asked(member_yaml, tmp_path):
    """Two tiny members, one after the other, with --keep-states: a line as each starts, the time left
    after the first, and each member's states kept, readable beyond the owner (safetensors writes 0600)."""
    base = yaml.safe_load(member_yaml.read_text())
    paths = []
    for name in ("a", "b"):
        cfg = {**base, "name": name, "train": {**base["train"], "epochs": 1}}
        paths.append(tmp_path / f"{name}.yaml")
        paths[-1].write_text(yaml.safe_dump(cfg))
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump({"name": "x", "runs_dir": str(tmp_path / "runs"),
                                                       "members": [str(p) for p in paths]}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "members.launch.experiment", "-c", str(tmp_path / "exp.yaml"),
                           "--cpu-procs", "1", "--keep-states"], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("member ") or ": trained in" in ln]
    assert [ln.split(":")[0] for ln in lines] == ["member 1 of 2", "a", "member 2 of 2", "b"], lines
    assert lines[0] == "member 1 of 2: a (training on 1 CPU process)"
    assert lines[1].startswith("a: trained in ") and ", 1 of 2 done; about " in lines[1]
    assert lines[1].endswith(" left for the other 1")
    assert lines[3].startswith("b: trained in ") and lines[3].endswith(", 2 of 2 done")  # none left: no estimate
    mask = os.umask(0)
    os.umask(mask)
    for name in ("a", "b"):
        out = tmp_path / "runs" / name
        assert (out / "done.json").is_file() and (out / "preds_test.json").is_file()
        assert (out / "states" / "latest.txt").is_file()  # kept
        files = [p for p in (out / "states").rglob("*") if p.is_file()]
        assert any(p.name == "model.safetensors" for p in files)
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask for p in files), \
            [(p.name, oct(p.stat().st_mode)) for p in files]
