"""members.launch.preflight and members.train.probe: the real model, steps, state and predictions of
every member, before the long run; estimates from what they measure."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from members.contract.schema import load_experiment
from members.contract.member import load_member_config
from members.launch.preflight import estimate, schedule, validation_share

REPO = Path(__file__).resolve().parents[1]


def _experiment(tmp_path: Path, member_yaml: Path, extra_member: dict | None = None) -> Path:
    base = yaml.safe_load(member_yaml.read_text())
    for name, seed in (("pa", 1), ("pb", 2)):
        cfg = {**base, "name": name, "seed": seed, **(extra_member or {})}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    exp = {"name": "pf", "runs_dir": str(tmp_path / "runs"), "members": ["pa.yaml", "pb.yaml"]}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "members.launch.preflight", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_preflight_measures_every_member_and_writes_the_table(tmp_path, member_yaml):
    exp_path = _experiment(tmp_path, member_yaml)
    out = _run("-c", str(exp_path), "--cpu-procs", "1", "--steps", "3", "--images", "2")
    assert out.returncode == 0, out.stderr
    report = (tmp_path / "runs" / "preflight.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| p")]
    assert [r.split("|")[1].strip() for r in rows] == ["pa", "pb"]
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[1] == "cpu" and float(cells[4]) > 0 and float(cells[5]) > 0 and float(cells[7]) > 0
        assert cells[8] == "8"  # crops per call: the CPU's MAX_CROPS (a GPU sizes it by its free memory)
        # fp32 on the CPU both ways: the forward is the same computation, the two deform kernels agree
        assert float(cells[12]) < 1e-5 and float(cells[13]) < 1e-4
        assert cells[10].endswith("%") and 0 < float(cells[10][:-1]) < 100  # validation's share of training
    assert "Estimated total" in report and "member 2 of 2: pb" in out.stderr
    # nothing of the probe is left in the run folder, and no member folder was made
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["preflight.md"]


def test_a_missing_weights_file_fails_in_one_line_naming_it(tmp_path, member_yaml):
    exp_path = _experiment(tmp_path, member_yaml, {"model": {**yaml.safe_load(member_yaml.read_text())["model"],
                                                             "vit_weights": str(tmp_path / "no_such.safetensors")}})
    out = _run("-c", str(exp_path), "--cpu-procs", "1", "--steps", "2", "--images", "1")
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("error: member pa: preflight failed") and "no_such.safetensors" in lines[-1]
    assert "make weights" in lines[-1]
    # --random-weights builds the backbones without the files
    ok = _run("-c", str(exp_path), "--cpu-procs", "1", "--steps", "2", "--images", "1", "--random-weights")
    assert ok.returncode == 0, ok.stderr


def test_estimates_follow_the_recipe(member_yaml, tmp_path):
    exp = load_experiment(_experiment(tmp_path, member_yaml))
    cfg = exp.members[0].config
    # validation scores train.val_views (0.25 s per image), prediction predict.views (0.5 s per image)
    probe = {"step_s": [9.0, 1.0, 1.0], "predict_s_per_image": 0.5, "val_s_per_image": 0.25, "setup_s": 2.0,
             "pairs": {"train": 64, "val": 10, "test": 20}}
    train_s, predict_s = estimate(cfg, probe, processes=1)
    steps = 64 // cfg.train.batch_size * cfg.train.epochs
    validations = cfg.train.epochs  # val_every 1
    assert train_s == pytest.approx(2.0 + steps * 1.0 + 0.25 * 10 * validations)  # the warm-up step is not counted
    assert predict_s == pytest.approx(2.0 + 0.5 * 30)
    two = estimate(cfg, probe, processes=2)  # twice the processes: half the steps and images each
    assert two[0] == pytest.approx(2.0 + steps / 2 + 0.25 / 2 * 10 * validations)
    assert schedule([3.0, 1.0, 1.0, 1.0], 2) == 3.0 and schedule([3.0, 1.0, 1.0], 1) == 5.0
    # the share of training time that validation takes (setup left out), shown in preflight.md
    val = 0.25 * 10 * validations
    assert validation_share(cfg, probe, 1) == pytest.approx(val / (steps * 1.0 + val))
    every_other = load_member_config(exp.members[0].path, ["train.val_every=2", "train.epochs=4"])
    half = 0.25 * 10 * 2
    assert validation_share(every_other, probe, 1) == pytest.approx(half / (64 // cfg.train.batch_size * 4 + half))


def test_preflight_places_members_where_training_would(monkeypatch, member_yaml, tmp_path):
    """Without --gpus, make train-members uses every visible GPU; the preflight must plan the same slots
    (before: it planned the CPU, and its estimates were for a run that would not happen)."""
    import torch

    from members.launch import preflight
    from members.launch.placement import resolve_gpus

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert resolve_gpus("") == ["0", "1"] and resolve_gpus("1, 0") == ["1", "0"]
    seen = {}

    def plan(gpus, per_member, cpu_procs):
        seen.update(gpus=gpus, per_member=per_member)
        raise SystemExit(0)  # the plan is all this test needs

    monkeypatch.setattr(preflight, "plan_slots", plan)
    with pytest.raises(SystemExit):
        preflight.main(["-c", str(_experiment(tmp_path, member_yaml)), "--gpus-per-member", "all"])
    assert seen == {"gpus": ["0", "1"], "per_member": None}
