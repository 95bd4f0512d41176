"""The training loop at the real scale: states without the frozen backbones, no host sync per step,
persistent DataLoader workers, bounded logs, and the paths real members take (bf16, grad_accum > 1,
DataLoader workers, two processes), each resumed exactly."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_train import heads

from members.contract.member import load_member_config
from members.launch.experiment import launch_command
from members.model.checkpoint import head_parts, read_heads

REPO = Path(__file__).resolve().parents[1]


def _train(member_yaml: Path, out: Path, *sets: str, abort: int | None = None, processes: int = 1,
           script: str | None = None, log: Path | None = None) -> subprocess.CompletedProcess:
    """members.train.loop on the tiny member in a fresh process (or `script` run as its main), its
    stdout and stderr into `log` when given (as members side by side write their run.log)."""
    args = ["-c", str(member_yaml), "--set", f"output_dir={out}", *[a for s in sets for a in ("--set", s)]]
    args += ["--abort-after-steps", str(abort)] if abort else []
    env = {**os.environ, "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    if processes > 1:
        cmd = launch_command("members.train.loop", args, processes, cpu=True)
    else:
        cmd = [sys.executable, *(["-c", script] if script else ["-m", "members.train.loop"]), *args]
    if log is None:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    else:
        with open(log, "w") as f:
            proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, text=True, timeout=900, cwd=REPO)
    if abort is None and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{(proc.stderr or log.read_text())[-4000:]}")
    if abort is not None:  # the simulated crash: exit 3, which the launcher of several processes reports as 1
        assert proc.returncode == (3 if processes == 1 else 1), (proc.stderr or log.read_text())[-4000:]
    return proc


def _same_heads(a: Path, b: Path) -> None:
    x, y = heads(a), heads(b)
    assert x.keys() == y.keys()
    differ = [k for k in x if not torch.equal(x[k], y[k])]
    assert not differ, f"{len(differ)} head tensors differ, e.g. {differ[0]}"


def _latest(out: Path) -> Path:
    return out / "states" / (out / "states/latest.txt").read_text().strip()


def _head_sizes(member_yaml: Path) -> dict[str, tuple[int, ...]]:
    """The tiny member's head keys (as a state names them) and their shapes."""
    from members.model.ahiq import build_model

    model = build_model(load_member_config(member_yaml).model)
    return {f"{part}.{k}": tuple(v.shape) for part in head_parts(model) for k, v in getattr(model, part).state_dict().items()}


@pytest.fixture(scope="module")
def straight(member_yaml, tmp_path_factory) -> Path:
    """The tiny member trained without a stop (2 epochs), every state kept, its output in run.log."""
    out = tmp_path_factory.mktemp("scale") / "straight"
    out.mkdir()
    _train(member_yaml, out, "train.keep_states_when_done=true", "train.keep_states=100", log=out / "run.log")
    return out


# ------------------------------------------------------------------ 1. states hold the heads only

def test_states_hold_the_heads_only_and_resume_exactly_with_workers(straight, member_yaml, tmp_path):
    """Before: every state held the whole model, frozen backbones included (a ViT-B/8 member: 254 MB of
    weights per state, of which 109 MB are heads). With DataLoader workers (persistent), resume is exact."""
    out = tmp_path / "killed"
    _train(member_yaml, out, "train.num_workers=2", abort=5)
    state = _latest(out)
    assert state.name == "step-00000003"
    sizes = _head_sizes(member_yaml)
    with safe_open(state / "model.safetensors", "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert saved == sizes  # the heads' keys, nothing of the backbones, no DDP prefix
    weights = sum(4 * math.prod(s) for s in sizes.values())
    assert weights <= (state / "model.safetensors").stat().st_size <= weights + 64 * 1024
    resumed = _train(member_yaml, out, "train.num_workers=2")
    assert "resuming from" in resumed.stdout
    _same_heads(straight / "last.pth", out / "last.pth")
    _same_heads(straight / "best.pth", out / "best.pth")


KIT_BEFORE = """
import sys
import members.train.loop as loop
loop.register_head_states = lambda accelerator: None  # the kit before: whole-model states
loop.main(sys.argv[1:])
"""


def test_a_whole_model_state_of_the_kit_before_resumes_exactly(straight, member_yaml, tmp_path):
    """States written before (the whole model's state dict) resume from their head keys (a regression
    test: this path worked before and must keep working)."""
    out = tmp_path / "old"
    _train(member_yaml, out, abort=5, script=KIT_BEFORE)
    with safe_open(_latest(out) / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert any(k.startswith("vit.") for k in keys) and any(k.startswith("cnn.") for k in keys)
    _train(member_yaml, out)
    _same_heads(straight / "last.pth", out / "last.pth")


def test_a_whole_model_state_of_ddp_loads_its_heads(member_yaml, tmp_path):
    """A state the kit wrote before under DDP names every key with the wrapper's 'module.' prefix."""
    from safetensors.torch import save_file

    from members.model.ahiq import build_model
    from members.train.states import _load_heads

    model = build_model(load_member_config(member_yaml).model)
    with torch.no_grad():
        for p in model.head_parameters():
            p.add_(torch.randn_like(p))
    save_file({f"module.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    fresh = build_model(load_member_config(member_yaml).model)
    _load_heads(fresh, tmp_path / "model.safetensors")
    want, got = model.state_dict(), fresh.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_a_state_with_other_heads_is_refused_in_one_line(straight, member_yaml, tmp_path):
    out = tmp_path / "other"
    _train(member_yaml, out, abort=5)
    state = _latest(out)
    weights = load_file(state / "model.safetensors")
    weights.pop(next(k for k in weights if k.startswith("regressor.")))
    from safetensors.torch import save_file

    save_file(weights, str(state / "model.safetensors"))
    proc = subprocess.run([sys.executable, "-m", "members.train.loop", "-c", str(member_yaml), "--set",
                           f"output_dir={out}"], env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    err = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert err.startswith("error: ") and str(state) in err and "regressor." in err and "delete" in err


# ----------------------------------------------------------- 2. no host sync per step, NaN guard

def _in_process(member_yaml: Path, out: Path, *sets: str):
    from members.train.loop import train

    return train(load_member_config(member_yaml, [f"output_dir={out}", *sets]))


def _hot_loop_caller() -> bool:
    """Whether the patched tensor method was called by the training code (members/train) inside
    `train`'s batch loop, not by validation, state saving, setup or the end of training."""
    frame = sys._getframe(2)
    if "/members/train/" not in frame.f_code.co_filename:
        return False
    names = []
    while frame is not None:
        names.append(frame.f_code.co_name)
        frame = frame.f_back
    cold = {"_validate", "_score", "_validate_average", "_finish", "_resume", "_setup", "save_state", "_prepare_data"}
    return "train" in names and not cold & set(names)


def test_at_most_one_host_sync_and_one_collective_per_log_every_steps(member_yaml, tmp_path, monkeypatch):
    """Before: every micro-step gathered the loss over the processes, then `isfinite(...).all()` and
    `.item()`: two host syncs and a collective per step."""
    from accelerate import Accelerator

    counts = {"sync": 0, "collective": 0}

    def counted(kind: str, method):
        def wrapper(*args, **kwargs):
            if _hot_loop_caller():
                counts[kind] += 1
            return method(*args, **kwargs)
        return wrapper

    for name in ("item", "__bool__", "__float__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, counted("sync", getattr(torch.Tensor, name)))
    for name in ("gather", "reduce"):
        monkeypatch.setattr(Accelerator, name, counted("collective", getattr(Accelerator, name)))
    log_every = 5
    done = _in_process(member_yaml, tmp_path / "m", "train.epochs=1", "train.state_every=0",
                       f"train.log_every={log_every}")
    assert done["steps"] == 19  # the fixture: 157 training pairs, batches of 8
    assert 1 <= counts["sync"] <= math.ceil(done["steps"] / log_every), counts
    assert 1 <= counts["collective"] <= math.ceil(done["steps"] / log_every), counts


def _poison(monkeypatch, epoch: int, item: int) -> None:
    """The label of the `item`-th item drawn in `epoch` becomes inf (the loss of that batch too)."""
    from members.data.datasets import TrainPairs

    real, drawn = TrainPairs.__getitem__, {}

    def getitem(self, i):
        out = real(self, i)
        e = int(self.epoch)
        drawn[e] = drawn.get(e, -1) + 1
        if e == epoch and drawn[e] == item:
            out["label"] = torch.tensor(math.inf)
        return out

    monkeypatch.setattr(TrainPairs, "__getitem__", getitem)


def _finite_state(state: Path) -> bool:
    return all(torch.isfinite(v).all() for v in load_file(state / "model.safetensors").values())


@pytest.mark.parametrize("state_every,epoch,item,kept", [
    (3, 0, 8 * 3 + 2, "step-00000003"),  # inf in step 4's batch: seen before the state of step 6
    (0, 1, 8 * 10, "step-00000019"),  # inf in epoch 1: seen before its validation and end-of-epoch state
])
def test_a_non_finite_loss_stops_in_one_line_and_nothing_non_finite_is_saved(member_yaml, tmp_path, monkeypatch,
                                                                            state_every, epoch, item, kept):
    from members.train.loop import NonFiniteLoss

    _poison(monkeypatch, epoch, item)
    out = tmp_path / "m"
    with pytest.raises(NonFiniteLoss) as err:
        _in_process(member_yaml, out, f"train.state_every={state_every}", "train.log_every=1000")
    message = str(err.value)
    assert "\n" not in message and "non-finite" in message and "lower train.lr" in message
    assert str(out / "states") in message
    assert _latest(out).name == kept
    for state in (out / "states").glob("step-*"):
        assert _finite_state(state), state
    if epoch == 1:  # epoch 0 was validated before: its best.pth is kept, finite
        best, info = read_heads(out / "best.pth")
        assert info["epoch"] == 0 and all(torch.isfinite(v).all() for sd in best.values() for v in sd.values())
        assert [r["epoch"] for r in csv.DictReader(open(out / "log.csv")) if r["main"]] == ["0"]
    else:
        assert not (out / "best.pth").exists()


# ------------------------------------------------------------------ persistent DataLoader workers

def test_persistent_workers_draw_each_epochs_own_crops(member_yaml, tmp_path):
    """Before: TrainPairs kept its epoch in a plain attribute, so persistent workers kept drawing
    epoch 0's crops (the loop re-forked its workers every epoch instead)."""
    from torch.utils.data import DataLoader

    from members.data.datasets import TrainPairs
    from members.data.splits import prepare_member_data

    cfg = load_member_config(member_yaml, [f"output_dir={tmp_path / 'm'}"])
    splits, stats = prepare_member_data(cfg)
    pairs = splits["train"][:12]

    def dataset(epoch: int) -> TrainPairs:
        ds = TrainPairs(pairs, cfg.model.crop, cfg.train.augment, stats, cfg.seed)
        ds.set_epoch(epoch)
        return ds

    shared = dataset(0)
    loader = DataLoader(shared, batch_size=4, num_workers=2, persistent_workers=True)
    epochs = []
    for epoch in range(3):
        shared.set_epoch(epoch)
        epochs.append(torch.cat([b["dis"] for b in loader]))
    for epoch, crops in enumerate(epochs):
        fresh = dataset(epoch)
        assert torch.equal(crops, torch.stack([fresh[i]["dis"] for i in range(len(pairs))])), epoch
    assert not torch.equal(epochs[0], epochs[1])


def test_the_training_loader_keeps_its_workers(member_yaml, tmp_path):
    from accelerate import Accelerator

    from members.train.loop import _setup

    cfg = load_member_config(member_yaml, [f"output_dir={tmp_path / 'm'}", "train.num_workers=2"])
    assert _setup(cfg, Accelerator(cpu=True)).train_loader.persistent_workers
    cfg = load_member_config(member_yaml, [f"output_dir={tmp_path / 'n'}", "train.num_workers=0"])
    assert not _setup(cfg, Accelerator(cpu=True)).train_loader.persistent_workers


# ------------------------------------------------------------------------------ 3. bounded logs

def _rows(out: Path) -> list[dict]:
    return list(csv.DictReader(open(out / "log.csv")))


def test_logs_grow_by_far_less_than_a_megabyte_per_ten_thousand_steps(straight, member_yaml, tmp_path):
    """Before: a log.csv row per optimizer step and tqdm's carriage-return redraws in run.log
    (stdout and stderr of members side by side): ~2 MB per 10k steps."""
    longer = tmp_path / "longer"
    longer.mkdir()
    _train(member_yaml, longer, "train.epochs=4", log=longer / "run.log")
    steps = [json.loads((d / "done.json").read_text())["steps"] for d in (straight, longer)]
    sizes = [(d / "log.csv").stat().st_size + (d / "run.log").stat().st_size for d in (straight, longer)]
    per_10k = (sizes[1] - sizes[0]) / (steps[1] - steps[0]) * 10_000
    # the tiny member validates every 19 steps (the real ones every 4640): an upper bound
    assert per_10k < 1_000_000, (sizes, steps)
    log = (longer / "run.log").read_text()
    training = [ln for ln in log.splitlines() if "step " in ln and "steps/s" in ln]
    assert training and all("\r" not in ln for ln in training)  # plain lines, no redraws
    assert "left" in training[-1] and "lr" in training[-1] and "loss" in training[-1]


def test_log_rows_every_log_every_steps_with_their_mean_loss(straight):
    rows = _rows(straight)
    done = json.loads((straight / "done.json").read_text())
    cfg = load_member_config(straight / "config.yaml")
    per_epoch = done["steps"] // cfg.train.epochs
    train = [r for r in rows if r["loss"]]
    wanted = sorted({*range(cfg.train.log_every, done["steps"] + 1, cfg.train.log_every),
                     *range(per_epoch, done["steps"] + 1, per_epoch),
                     *range(cfg.train.state_every, done["steps"] + 1, cfg.train.state_every)})
    assert [int(r["step"]) for r in train] == wanted  # rows at log_every, at states and at epoch ends
    assert sum(int(r["steps"]) for r in train) == done["steps"]  # each row: the mean of its steps
    assert [r["epoch"] for r in rows if r["main"]] == ["0", "1"]  # validation rows kept


def test_resume_truncates_the_log_in_place_and_drops_a_torn_line(tmp_path):
    """Before: the whole log was read and rewritten on every resume (a new file), and a torn row whose
    step field parsed was kept."""
    from members.train.logs import truncate_log

    log = tmp_path / "log.csv"
    head = "step,epoch,lr,loss,srcc,plcc,krcc,main,steps\n"
    kept = head + "50,0,1e-4,0.5,,,,,50\n100,0,1e-4,0.4,,,,,50\n100,0,,,0.1,0.2,0.1,0.3,\n"
    log.write_text(kept + "150,1,1e-4,0.3,,,,,50\n200,1,1e-4,0.")  # a killed run's rows after step 100
    inode = log.stat().st_ino
    truncate_log(log, 100)
    assert log.read_text() == kept and log.stat().st_ino == inode
    log.write_text(kept + "10")  # torn: a step that parses, but no line end
    truncate_log(log, 100)
    assert log.read_text() == kept
    log.write_text("step,epo")  # torn header: started over
    truncate_log(log, 0)
    assert log.read_text() == ""


def test_training_curves_weight_each_row_by_its_steps(tmp_path):
    from members.contract.stagefiles import read_training_curves

    (tmp_path / "log.csv").write_text("step,epoch,lr,loss,srcc,plcc,krcc,main,steps\n3,0,1e-4,0.5,,,,,3\n"
                                      "4,0,1e-4,0.1,,,,,1\n4,0,,,0.1,0.2,0.1,0.3,\n8,1,1e-4,0.2,,,,,4\n9,1,1e-4,0.")
    curves = read_training_curves(tmp_path)
    assert curves["epoch"] == [1, 2] and np.allclose(curves["train_loss"], [0.4, 0.2])
    assert curves["val_main"][0] == 0.3 and np.isnan(curves["val_main"][1])


# --------------------------------------------------------------- 4. the paths real members take

def test_bf16_trains_finite_and_resumes_exactly(straight, member_yaml, tmp_path):
    sets = ("train.mixed_precision=bf16", "train.epochs=1", "train.log_every=2")
    full, out = tmp_path / "full", tmp_path / "killed"
    _train(member_yaml, full, *sets)
    _train(member_yaml, out, *sets, abort=5)
    at_3 = load_file(_latest(out) / "model.safetensors")
    fp32_at_3 = load_file(straight / "states/step-00000003/model.safetensors")
    assert any(not torch.equal(at_3[k], fp32_at_3[k]) for k in at_3)  # bf16 autocast was on
    _train(member_yaml, out, *sets)
    _same_heads(full / "last.pth", out / "last.pth")
    losses = [float(r["loss"]) for r in _rows(full) if r["loss"]]
    assert len(losses) >= 9 and all(math.isfinite(x) for x in losses)
    trained = heads(full / "last.pth")
    assert any(not torch.equal(at_3[k], trained[k]) for k in at_3)  # it went on training


def test_grad_accum_with_a_ragged_epoch(member_yaml, tmp_path):
    """19 batches an epoch with grad_accum 2: Accelerate steps the optimizer 10 times (the last on the
    epoch's single last batch). Before: steps_per_epoch was 19 // 2 = 9, so the schedule ended two
    steps early (and warmed up over 9), and progress and states counted 9 steps an epoch."""
    sets = ("train.grad_accum=2", "train.log_every=1")
    full, out = tmp_path / "full", tmp_path / "killed"
    _train(member_yaml, full, *sets)
    cfg = load_member_config(full / "config.yaml")
    done = json.loads((full / "done.json").read_text())
    assert done["steps"] == 2 * 10
    rows = [r for r in _rows(full) if r["loss"]]
    assert [int(r["step"]) for r in rows] == list(range(1, 21))
    assert [int(r["epoch"]) for r in rows] == [0] * 10 + [1] * 10
    for r in rows:  # the schedule over the steps taken: warm-up over epoch 0, cosine to its end
        assert float(r["lr"]) == pytest.approx(cfg.train.lr_at(int(r["step"]) - 1, 10), rel=1e-6)
    assert float(rows[9]["lr"]) == cfg.train.lr and 0 < float(rows[-1]["lr"]) < 0.05 * cfg.train.lr
    _train(member_yaml, out, *sets, abort=13)
    state = json.loads((_latest(out) / "progress.json").read_text())
    assert (state["epoch"], state["step"], state["batch"]) == (1, 12, 4)  # mid-epoch 1
    _train(member_yaml, out, *sets)
    _same_heads(full / "last.pth", out / "last.pth")


def test_two_processes_resume_exactly(member_yaml, tmp_path):
    """Two CPU processes (gloo DDP): the state holds the heads without DDP's `module.` prefix, and
    the heads after kill + resume equal an uninterrupted run's, bit for bit."""
    full, out = tmp_path / "full", tmp_path / "killed"
    _train(member_yaml, full, processes=2)
    _train(member_yaml, out, abort=4, processes=2)
    state = _latest(out)
    with safe_open(state / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(_head_sizes(member_yaml))
    assert json.loads((state / "progress.json").read_text())["step"] == 3
    _train(member_yaml, out, processes=2)
    _same_heads(full / "last.pth", out / "last.pth")
    _same_heads(full / "best.pth", out / "best.pth")
