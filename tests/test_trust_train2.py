"""Trust, round 2 (issue 17), training side: each case ended in a wrong result or a traceback before.

3. best.pth was chosen by |PLCC| + |SRCC|: an epoch that ranks the validation images backwards won.
6. lr NaN or < 0 passed the config loader; a member failing under members.launch.experiment ended in the
   launcher's traceback.
7. Ctrl-C during a CLI's start-up imports printed a KeyboardInterrupt traceback.
"""
from __future__ import annotations

import fcntl
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from members.contract.cli import INTERRUPTED, INTERRUPTED_RERUN
from members.contract.config import ConfigError
from members.contract.member import load_member_config

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


# ------------------------------------------------------------------------------ 3: signed best checkpoint

def test_a_backwards_epoch_is_never_chosen_over_a_weakly_forwards_one():
    """Before: a member whose validation SRCC was -0.08 was saved as best.pth with main +0.109."""
    from accelerate import Accelerator

    from members.train.loop import _validation_metrics, record_if_best

    rng = np.random.default_rng(0)
    mos = np.arange(40.0)
    accelerator = Accelerator(cpu=True)
    weak = _validation_metrics(mos + rng.normal(0, 40, 40), mos, "m epoch 0", accelerator)
    backwards = _validation_metrics(-mos + rng.normal(0, 15, 40), mos, "m epoch 1", accelerator)
    assert 0 < weak["srcc"] < 0.5 and backwards["srcc"] < -0.5
    assert backwards["abs_main"] > weak["abs_main"]  # the sign-free score prefers the backwards epoch
    assert backwards["main"] < 0 < weak["main"]  # what log.csv and best.pth's metrics record
    for epochs in ([(0, weak), (1, backwards)], [(1, backwards), (0, weak)]):
        progress = {"best_main": -math.inf, "best_epoch": None}
        for epoch, metrics in epochs:
            record_if_best(progress, metrics, epoch)
        assert progress["best_epoch"] == 0 and progress["best_metrics"] is weak


# ------------------------------------------------------------------------ 6: train numbers at load time

@pytest.mark.parametrize(("setting", "message"), [
    ("train.lr=.nan", "'train.lr': expected a finite number, got nan"),
    ("train.lr=nan", "'train.lr': expected a finite number, got 'nan'"),
    ("train.lr=-0.001", "'train.lr': must be > 0; got -0.001"),
    ("train.lr=0", "'train.lr': must be > 0; got 0.0"),
    ("train.weight_decay=-1.0e-5", "'train.weight_decay': must be >= 0; got -1e-05"),
    ("train.warmup_epochs=-1", "'train.warmup_epochs': must be >= 0; got -1.0"),
    ("train.warmup_epochs=.inf", "'train.warmup_epochs': expected a finite number, got inf"),
    ("train.min_lr=-1.0e-6", "'train.min_lr': must be >= 0; got -1e-06"),
    ("train.min_lr=1", "'train.min_lr': must not exceed train.lr (0.0003); got 1.0"),
    ("train.epochs=0", "'train.epochs': must be >= 1; got 0"),
    ("train.batch_size=-4", "'train.batch_size': must be >= 1; got -4"),
    ("train.batch_size=.nan", "'train.batch_size': expected int, got nan"),
    ("train.num_workers=-1", "'train.num_workers': must be >= 0; got -1"),
    ("predict.num_workers=-1", "'predict.num_workers': must be >= 0; got -1"),
])
def test_bad_train_numbers_are_refused_at_load_time(member_yaml, setting, message):
    """Before: lr NaN or negative loaded fine and failed inside training (Accelerate's traceback)."""
    with pytest.raises(ConfigError) as err:
        load_member_config(member_yaml, [setting])
    assert str(err.value) == f"{member_yaml} (--set {setting}): {message}"


def test_a_bad_lr_in_a_member_file_stops_the_experiment_before_any_launch(member_yaml, tmp_path, capsys):
    from members.launch.experiment import main as experiment_main

    member = yaml.safe_load(member_yaml.read_text())
    member["train"]["lr"] = float("nan")
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(member))
    line = next(i for i, text in enumerate((tmp_path / "m.yaml").read_text().splitlines(), 1) if "lr: .nan" in text)
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump({"name": "x", "runs_dir": str(tmp_path / "runs"),
                                                       "members": [str(tmp_path / "m.yaml")]}))
    assert experiment_main(["-c", str(tmp_path / "exp.yaml")]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {tmp_path / 'm.yaml'}, line {line}: 'train.lr': expected a finite number, got nan\n"
    assert captured.out == "" and not (tmp_path / "runs").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="flock and the launcher's process layout")
@pytest.mark.parametrize("processes", [1, 2])
def test_a_member_failing_in_the_launched_process_ends_in_its_one_line(member_yaml, tmp_path, processes):
    """Before: the member's error line was followed by Accelerate's CalledProcessError traceback (one
    process) or torch elastic's failure report (two)."""
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump({"name": "x", "runs_dir": str(tmp_path / "runs"),
                                                       "members": [str(member_yaml)]}))
    folder = tmp_path / "runs" / "t"
    folder.mkdir(parents=True)
    # The member passes every check of the driver and fails at start-up inside the launched process:
    # its folder is locked, as by a trainer that is still running.
    with open(folder / ".lock", "a+", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("pid 1 on host elsewhere\n")
        lock.flush()
        done = subprocess.run([sys.executable, "-m", "members.launch.experiment", "-c", str(tmp_path / "exp.yaml"),
                               "--cpu-procs", str(processes)],
                              env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    error = (f"error: {folder}: training of member 't' cannot start: the folder is in use (pid 1 on host "
             "elsewhere); wait for it to finish or stop it, then rerun")
    lines = done.stderr.strip().splitlines()
    assert lines[-2:] == [error, "failed: t"], done.stderr[-3000:]
    assert lines.count(error) == 1 and "Traceback" not in done.stderr and "elastic" not in done.stderr
    assert done.stdout.splitlines()[1] == f"t: FAILED (exit {2 if processes == 1 else 1})"


# ------------------------------------------------------------------------ 7: Ctrl-C during start-up imports

# Runs an entry point as `python -m` does, delivering a real SIGINT while it imports its first
# third-party module (yaml, numpy or torch): the moment Ctrl-C hits at start-up.
CTRL_C_AT_IMPORT = """
import importlib.abc, os, runpy, signal, sys

class CtrlC(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in ("yaml", "numpy", "torch"):
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, CtrlC())
sys.argv = [sys.argv[1], "-c", "x.yaml"]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize(("module", "message"), [("ensemble", INTERRUPTED_RERUN), ("submission", INTERRUPTED_RERUN),
                                                 ("members.launch.experiment", INTERRUPTED), ("members.train.loop", INTERRUPTED)])
def test_ctrl_c_during_start_up_imports_is_one_line(module, message):
    """Before: a 17-frame KeyboardInterrupt traceback from inside the imports (`python -m ensemble`)."""
    done = subprocess.run([sys.executable, "-c", CTRL_C_AT_IMPORT, module], env=_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (130, message + "\n")
