"""Trust round 3, command lines: process counts, a killed preflight, and one writer per experiment and member
folder (issue 24, cases 7, 9 and 10)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from members.contract.cli import LockedError, folder_lock, hold_folder_lock
from members.contract.member import load_member_config
from members.engine.predict import predict_members
from members.launch import placement

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _experiment(tmp_path: Path, member_yaml: Path, names: tuple[str, ...] = ("pa",)) -> Path:
    base = yaml.safe_load(member_yaml.read_text())
    for seed, name in enumerate(names, 1):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**base, "name": name, "seed": seed}))
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "runs_dir": str(tmp_path / "runs"),
                                    "members": [f"{n}.yaml" for n in names]}))
    return path


# ------------------------------------------------------------------------------------ 7: process counts
@pytest.mark.parametrize("module", ["members.launch.experiment", "members.launch.preflight"])
@pytest.mark.parametrize("count", ["0", "-1", "two"])
def test_a_process_count_below_one_is_refused_in_one_line(tmp_path, member_yaml, module, count):
    """Before: CPU_PROCS=0 ended in a ZeroDivisionError traceback (cpu_threads), and -1 was accepted."""
    done = subprocess.run([sys.executable, "-m", module, "-c", str(_experiment(tmp_path, member_yaml)),
                           f"--cpu-procs={count}"], env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith(
        f"argument --cpu-procs: {count!r}: expected a positive whole number of processes")
    assert not (tmp_path / "runs").exists()  # refused before anything was read or written


def test_threads_share_the_cores_this_process_may_use(monkeypatch):
    """Under SLURM or taskset a job may use a few cores of a large machine: os.cpu_count() counts them all."""
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5, 6, 7}, raising=False)
    assert placement.usable_cores() == 4
    assert placement.cpu_threads(2) == 2 and placement.cpu_threads(8) == 1 and placement.cpu_threads(0) == 4


# ------------------------------------------------------------------------------------ 9: a killed preflight
def _probe_pids(work_marker: str) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "members.train.probe" in text and work_marker in text and "contract.cli" not in text:
            pids.append(int(cmdline.parent.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux only")
def test_kill_9_of_preflight_takes_its_probe_along_and_the_next_run_sweeps_its_folder(tmp_path, member_yaml):
    """Before: the probe child (plain subprocess.run) went on after kill -9 of `make preflight`, and its
    runs/<exp>/.preflight-* folder stayed for good."""
    exp_path = _experiment(tmp_path, member_yaml)
    runs = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "members.launch.preflight", "-c", str(exp_path), "--cpu-procs",
                             "1", "--steps", "400", "--images", "2"], env=_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not _probe_pids(str(runs)):
            time.sleep(0.5)
        probes = _probe_pids(str(runs))
        assert probes, "the probe never started"
        time.sleep(2)  # well inside its 400 steps
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 30
        while time.time() < deadline and any(_alive(p) for p in probes):
            time.sleep(0.2)
        assert not any(_alive(p) for p in probes), "the probe outlived the killed preflight"
    finally:
        proc.kill()
        proc.wait()
    litter = [p.name for p in runs.iterdir() if p.name.startswith(".preflight")]
    assert litter  # what the kill left ...
    from members.contract.atomic import temp_dir

    with temp_dir(runs, "preflight"):  # ... the next preflight removes when it starts
        pass
    assert not [p.name for p in runs.iterdir() if p.name.startswith(".preflight")]


# ------------------------------------------------------------------------------------ 10: one writer
def _holder(folder: Path, what: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", "import time; from pathlib import Path; "
                             "from members.contract.cli import hold_folder_lock; "
                             f"hold_folder_lock(Path({str(folder)!r}), {what!r}); print('held', flush=True); "
                             "time.sleep(120)"], env=_env(), cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_train_members_of_one_experiment_is_refused(tmp_path, member_yaml):
    """Before: a second `make train-members` was refused training (member folders locked) but went on to
    predict the same members at once, both writing the same member files."""
    exp_path = _experiment(tmp_path, member_yaml)
    first = _holder(tmp_path / "runs", f"make train-members of {exp_path}")
    try:
        second = subprocess.run([sys.executable, "-m", "members.launch.experiment", "-c", str(exp_path),
                                 "--cpu-procs", "1"], env=_env(), cwd=REPO, capture_output=True, text=True,
                                timeout=300)
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert second.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'runs'}: make train-members of {exp_path} cannot start: the folder is in use "
        f"(make train-members of {exp_path}, pid {first.pid} on host {os.uname().nodename}); wait for it to "
        "finish or stop it, then rerun"]
    assert not (tmp_path / "runs" / "pa").exists()


def test_prediction_refuses_a_member_folder_another_process_holds(tmp_path, member_yaml):
    from members.contract.config import to_dict
    from members.model.ahiq import build_model
    from members.model.checkpoint import save_heads

    cfg = load_member_config(member_yaml, [f"output_dir={tmp_path / 'm'}"])
    save_heads(build_model(cfg.model), tmp_path / "heads.pth", to_dict(cfg.model))
    holder = _holder(cfg.out, "training of member 't'")
    try:
        with pytest.raises(LockedError, match=r"prediction of member 't' cannot start: the folder is in use "
                                              r"\(training of member 't', pid"):
            predict_members([cfg], ["test"], checkpoints={cfg.name: str(tmp_path / "heads.pth")})
    finally:
        holder.kill()
        holder.wait()
    assert not list(cfg.out.glob("preds_*"))


def test_locks_are_reentrant_in_one_process_and_released_after_a_block(tmp_path):
    hold_folder_lock(tmp_path / "a", "first")
    hold_folder_lock(tmp_path / "a", "again")  # the same process: no refusal of itself
    with folder_lock(tmp_path / "b", "block"):
        with folder_lock(tmp_path / "b", "nested"):
            pass
    other = _holder(tmp_path / "b", "another process")  # released after the block: another can take it
    other.kill()
    other.wait()


# ------------------------------------------------------------------------------------ GPU placement (26.1)
def test_members_go_to_the_physical_gpus_the_user_made_visible(monkeypatch, tmp_path, member_yaml):
    """Before: `resolve_gpus("")` returned the ordinals 0..n-1 and `member_env` wrote them into
    CUDA_VISIBLE_DEVICES, so `CUDA_VISIBLE_DEVICES=2,3 make train-members` trained on physical GPUs 0 and 1,
    which may be someone else's. Two members side by side must get physical GPUs 2 and 3."""
    import torch

    from members.contract.schema import load_experiment
    from members.launch import experiment as driver

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    gpus = placement.resolve_gpus("")
    assert gpus == ["2", "3"]
    assert placement.resolve_gpus("1") == ["3"]  # an ordinal among the visible GPUs, as torch counts them
    with pytest.raises(ValueError, match="--gpus 2: 2 is not the ordinal of a visible GPU .2 visible, "
                                         "CUDA_VISIBLE_DEVICES=2,3"):
        placement.resolve_gpus("2")
    exp = load_experiment(_experiment(tmp_path, member_yaml, ("pa", "pb")))
    seen: list[tuple[str, str]] = []

    class Finished:
        returncode = 0

        def poll(self):
            return 0

    def fake_spawn(cmd, env, **kwargs):
        seen.append((cmd[cmd.index("-c") + 1], env["CUDA_VISIBLE_DEVICES"]))
        return Finished()

    monkeypatch.setattr(driver, "spawn", fake_spawn)
    assert driver.run_members(exp.members, gpus, 1, cpu_procs=2) == []
    assert sorted(seen) == [(str(exp.members[0].path), "2"), (str(exp.members[1].path), "3")]
    env = placement.member_env(["2", "3"], 4)  # a DDP member over both: the physical pair
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and env["OMP_NUM_THREADS"] == "4"


# ------------------------------------------------------------------------------------ make predict-all
@pytest.mark.slow
def test_predict_all_predicts_every_trained_member_on_the_drivers_processes(tmp_path, member_yaml):
    """Before: `make predict-all` ran `members.engine.predict_all` alone, ignoring ARGS, GPUS and CPU_PROCS,
    while every refusal suggested it. Now it is the driver's own prediction (the same placement as
    make train-members), forced for every trained member, and the refusals suggest make train-members."""
    import json

    from members.contract.config import dump_yaml, to_dict
    from members.contract.member import write_training_record
    from members.contract.schema import load_experiment
    from members.contract.stagefiles import read_member_meta
    from members.data.splits import prepare_member_data
    from members.model.ahiq import build_model
    from members.model.checkpoint import save_heads

    exp_path = _experiment(tmp_path, member_yaml, ("pa", "pb"))
    exp = load_experiment(exp_path)
    trained = exp.members[0].config  # pa is trained (by hand: heads, record, done.json); pb is not
    prepare_member_data(trained)
    trained.out.mkdir(parents=True, exist_ok=True)
    dump_yaml(trained, trained.out / "config.yaml")
    write_training_record(trained)
    save_heads(build_model(trained.model), trained.out / "best.pth", to_dict(trained.model))
    (trained.out / "done.json").write_text(json.dumps({"member": "pa"}))
    done = subprocess.run([sys.executable, "-m", "members.launch.experiment", "-c", str(exp_path), "--cpu-procs", "2",
                           "--predict-all", "--set", "members.predict.batch_size=3"], env=_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "not trained yet, so not predicted: pb" in done.stdout
    assert "predicting pa together on 2 CPU processes" in done.stdout
    for split in ("val", "test"):
        assert read_member_meta(trained.out, split)["processes"] == 2
    assert not (exp.members[1].out / "preds_test.json").exists()
