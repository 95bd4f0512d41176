"""Members on the CPU with tiny configs: 2-process training, exact resume, batch-size invariance."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from members.contract.config import ConfigError, to_dict
from members.contract.member import load_member_config
from members.contract.metrics import evaluate
from members.data.splits import LabelStats
from members.engine.predict import predict
from members.launch.experiment import launch_command
from members.launch.experiment import main as experiment_main
from members.model.checkpoint import read_heads

REPO = Path(__file__).resolve().parents[1]


def run(module: str, args: list[str], processes: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = launch_command(module, args, processes, cpu=True) if processes > 1 else [sys.executable, "-m", module, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def read_preds(path: Path) -> dict[str, float]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    names = [r["name"] for r in rows]
    assert names == sorted(names) and len(set(names)) == len(names)
    return {r["name"]: float(r["score"]) for r in rows}


def heads(path: Path) -> dict[str, torch.Tensor]:
    state, _ = read_heads(path)
    return {f"{part}.{k}": v for part, sd in state.items() for k, v in sd.items()}


@pytest.fixture(scope="module")
def uninterrupted(member_yaml, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "straight"
    run("members.train.loop", ["-c", str(member_yaml), "--set", f"output_dir={out}"])
    return out


def test_training_writes_everything_and_is_not_repeated(uninterrupted, member_yaml):
    for name in ("config.yaml", "log.csv", "best.pth", "last.pth", "done.json"):
        assert (uninterrupted / name).is_file(), name
    assert not (uninterrupted / "states").exists()  # a finished member's resumable states are dropped
    log = list(csv.DictReader(open(uninterrupted / "log.csv")))
    # a row per train.log_every steps, per state (train.state_every) and per epoch end, with the mean
    # loss of its steps (rows no longer come every step: tests/test_loop_scale.py)
    steps = [int(r["step"]) for r in log if r["loss"]]
    assert steps == sorted(set(steps)) and sum(int(r["steps"]) for r in log if r["loss"]) == steps[-1]
    assert steps[-1] == json.loads((uninterrupted / "done.json").read_text())["steps"]
    assert sum(1 for r in log if r["main"]) == 2  # one validation per epoch
    again = run("members.train.loop", ["-c", str(member_yaml), "--set", f"output_dir={uninterrupted}"])
    assert "already trained" in again.stdout


def test_killed_run_resumes_to_identical_weights(uninterrupted, member_yaml, tmp_path):
    out = tmp_path / "killed"
    args = ["-c", str(member_yaml), "--set", f"output_dir={out}"]
    crashed = run("members.train.loop", [*args, "--abort-after-steps", "5"], check=False)
    assert crashed.returncode == 3 and not (out / "done.json").exists()
    assert (out / "states/latest.txt").read_text().strip() == "step-00000003"  # mid-epoch state
    resumed = run("members.train.loop", args)
    assert "resuming from" in resumed.stdout
    straight, again = heads(uninterrupted / "last.pth"), heads(out / "last.pth")
    assert straight.keys() == again.keys()
    assert all(torch.equal(straight[k], again[k]) for k in straight)
    steps = [r["step"] for r in csv.DictReader(open(out / "log.csv")) if r["loss"]]
    assert steps == sorted(set(steps), key=int)  # the crashed run's extra rows were dropped
    # once finished, its states are dropped, and the member is never resumed or retrained
    assert (out / "done.json").is_file() and not (out / "states").exists()
    again = run("members.train.loop", args)
    assert "already trained" in again.stdout and "resuming" not in again.stdout


def test_two_process_training_and_prediction_match_one_process(uninterrupted, member_yaml, tmp_path):
    out = tmp_path / "ddp"
    args = ["-c", str(member_yaml), "--set", f"output_dir={out}"]
    trained = run("members.train.loop", args, processes=2)
    assert "epoch 1:" in trained.stdout
    run("members.engine.predict", [*args, "--split", "val", "test"], processes=2)
    single = tmp_path / "single"
    run("members.engine.predict", ["-c", str(member_yaml), "--split", "val", "test", "--set", f"output_dir={single}",
                            "--checkpoint", str(out / "best.pth")])
    for split in ("val", "test"):
        two, one = read_preds(out / f"preds_{split}.csv"), read_preds(single / f"preds_{split}.csv")
        names = [r["name"] for r in csv.DictReader(open(out / f"splits/{split}.csv"))]
        assert sorted(two) == sorted(one) == sorted(names)  # every image exactly once
        assert len(set(one.values())) > 1 and max(abs(one[n] - two[n]) for n in one) <= 1e-5
        metas = [json.loads((d / f"preds_{split}.json").read_text()) for d in (single, out)]
        assert [m["processes"] for m in metas] == [1, 2]
    assert (out / "labels_val.csv").read_text() == (single / "labels_val.csv").read_text()
    # training's validation (engine on 2 processes) chose best.pth by the metrics of these very scores,
    # on its own views (train.val_views)
    on_val_views = tmp_path / "val_views"
    views = load_member_config(member_yaml).train.val_views
    run("members.engine.predict", ["-c", str(member_yaml), "--split", "val", "--set", f"output_dir={on_val_views}",
                                   "--set", f"predict.views.kind={views.kind}", "--set", f"predict.views.flip={views.flip}",
                                   "--checkpoint", str(out / "best.pth")])
    _, info = read_heads(out / "best.pth")
    stats = LabelStats.load(out / "splits/label_stats.json")
    mos = {r["name"]: stats.normalise(float(r["mos"])) for r in csv.DictReader(open(on_val_views / "labels_val.csv"))}
    scores = read_preds(on_val_views / "preds_val.csv")
    recomputed = evaluate(np.array([scores[n] for n in mos]), np.array(list(mos.values())))
    assert abs(recomputed["main"] - info["metrics"]["main"]) <= 1e-4


def test_predictions_do_not_depend_on_batch_size(uninterrupted, member_yaml, tmp_path):
    results = {}
    for batch_size in (1, 3, 8):
        cfg = load_member_config(member_yaml, [f"output_dir={tmp_path / str(batch_size)}"])
        predict(cfg, ["val", "test"], checkpoint=str(uninterrupted / "best.pth"), batch_size=batch_size)
        results[batch_size] = read_preds(cfg.out / "preds_val.csv")
        assert (cfg.out / "labels_val.csv").is_file() and (cfg.out / "preds_test.json").is_file()
    for batch_size in (3, 8):
        assert results[batch_size].keys() == results[1].keys()
        assert max(abs(results[batch_size][n] - results[1][n]) for n in results[1]) <= 2e-6
    assert len(set(results[1].values())) > 1


def test_unknown_member_key_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ntrain:\n  epochs: 2\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml, line 4: 'train\.learning_rate' unknown key"):
        load_member_config(path)


def test_experiment_checks_data_before_training(tmp_path, member_yaml, capsys):
    bad = yaml.safe_load(member_yaml.read_text())
    data_root = Path(bad["data"]["root"])
    broken = tmp_path / "data"
    subprocess.run(["cp", "-r", str(data_root), str(broken)], check=True)
    victim = next((broken / "Distortion_2").glob("*.bmp"))
    victim.write_bytes(b"BM not really an image")
    bad["data"]["root"] = str(broken)
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(bad))
    exp = {"name": "x", "runs_dir": str(tmp_path / "runs"), "members": [str(tmp_path / "m.yaml")]}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    assert experiment_main(["-c", str(tmp_path / "exp.yaml")]) == 2
    err = capsys.readouterr().err
    assert "cannot decode" in err and victim.name in err and "Train_Label" in err
    assert not (tmp_path / "runs" / "t").exists()


@pytest.mark.parametrize("gpus,per_member,expected", [
    ([], 1, ([[]], 2)),
    (["0", "1", "2", "3"], 1, ([["0"], ["1"], ["2"], ["3"]], 1)),
    (["0", "1", "2"], 2, ([["0", "1"]], 2)),
    (["0", "1", "2", "3"], None, ([["0", "1", "2", "3"]], 4)),
    (["5"], 4, ([["5"]], 1)),
])
def test_gpu_slots(gpus, per_member, expected):
    from members.launch.placement import plan_slots
    assert plan_slots(gpus, per_member, cpu_procs=2) == expected


def test_member_jobs_follow_done_marker_and_prediction_age(member_yaml, tmp_path):
    from members.launch.experiment import member_jobs, needs_prediction

    cfg = load_member_config(member_yaml, [f"output_dir={tmp_path / 'm'}"])
    modules = lambda: [m for m, _ in member_jobs(str(member_yaml), cfg, [])]  # noqa: E731
    assert modules() == ["members.train.loop"]  # prediction is never a member's job: predict_all does it
    cfg.out.mkdir(parents=True)
    (cfg.out / "done.json").write_text("{}")
    (cfg.out / "best.pth").write_bytes(b"")
    assert needs_prediction(cfg) and modules() == []
    from members.contract.member import prediction_fingerprint, prediction_splits
    from members.contract.stagefiles import write_member_split
    from members.contract.verify import made_from
    from members.data.splits import prepare_member_data

    prepare_member_data(cfg)  # the split lists the predictions are checked against

    def predicted() -> None:
        for split in prediction_splits(cfg):
            meta = {"higher_is_better": True,
                    **made_from(Path(cfg.split_dir), split, prediction_fingerprint(cfg), cfg.out / "best.pth")}
            write_member_split(cfg.out, split, [("a.bmp", 0.5)], None, meta)

    (cfg.out / "preds_val.json").write_text("{}")  # no manifest: not a usable prediction
    assert needs_prediction(cfg)
    predicted()
    assert not needs_prediction(cfg) and modules() == []
    (cfg.out / "best.pth").write_bytes(b"retrained")  # other heads than the predictions were made with
    assert needs_prediction(cfg) and modules() == []
    predicted()
    (cfg.out / "preds_test.csv").write_text("name,score\na.bmp,0.7\n")  # edited or torn by a kill
    assert needs_prediction(cfg)


def test_launch_command_picks_the_process_layout():
    two = launch_command("members.train.loop", ["-c", "x.yaml"], processes=2, cpu=True)
    assert "--multi_gpu" in two and two[two.index("--num_processes") + 1] == "2" and two[-3:] == ["members.train.loop", "-c", "x.yaml"]
    one = launch_command("members.train.loop", [], processes=1, cpu=True)
    assert "--cpu" in one and "--multi_gpu" not in one
    # the user's `accelerate config` decides the rest: no mixed precision or dynamo forced on every launch
    assert not {"--mixed_precision", "--dynamo_backend"} & set(two + one)


def test_trackers_get_the_whole_config(member_yaml):
    from members.contract.member import load_member_config
    from members.train.loop import flat_config

    cfg = load_member_config(member_yaml)
    flat = flat_config(to_dict(cfg))
    assert flat["train.lr"] == cfg.train.lr and flat["model.vit"] == cfg.model.vit
    assert flat["predict.views.kind"] == cfg.predict.views.kind and flat["seed"] == cfg.seed
    assert all(isinstance(v, (int, float, str, bool)) for v in flat.values())


def test_collapsed_validation_counts_as_zero_instead_of_stopping(capsys):
    import numpy as np
    from accelerate import Accelerator

    from members.train.loop import _validation_metrics

    metrics = _validation_metrics(np.full(6, 0.5), np.arange(6.0), "m epoch 3", Accelerator(cpu=True))
    assert metrics["main"] == 0.0 and metrics["srcc"] == 0.0
    assert "m epoch 3" in capsys.readouterr().out
    good = _validation_metrics(np.arange(6.0), np.arange(6.0) ** 2, "m", Accelerator(cpu=True))
    assert good["srcc"] == 1.0 and good["main"] > 1.9
