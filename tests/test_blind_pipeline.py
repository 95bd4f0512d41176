"""A no-reference experiment end to end on tiny blind members: make train-members -> ensemble -> submit
(the NR zip) -> evaluate on the hidden NR test labels; a killed blind member resumes to the same heads;
the Scorer scores the NR test images without references as the files say."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ensemble.__main__ import main as ensemble_main
from ensemble.evaluate import main as evaluate_main
from members import Scorer
from members.launch.experiment import main as experiment_main
from members.model.checkpoint import read_heads
from submission.__main__ import main as submission_main
from submission.check import main as check_main

REPO = Path(__file__).resolve().parents[1]


def _preds(path: Path) -> dict[str, float]:
    return {r["name"]: float(r["score"]) for r in csv.DictReader(open(path))}


@pytest.fixture(scope="module")
def nr_experiment(member_yaml, tmp_path_factory) -> tuple[Path, Path, dict]:
    """Two tiny blind members (one with checkpoint averaging) of a track nr experiment, trained and
    predicted by the driver."""
    tmp = tmp_path_factory.mktemp("nr")
    base = yaml.safe_load(member_yaml.read_text())
    members = []
    for name, seed, extra in (("nr_a", 1, {"average_last": 1}), ("nr_b", 2, {})):
        cfg = {**base, "name": name, "seed": seed, "model": {**base["model"], "kind": "nr"},
               "train": {**base["train"], "epochs": 2, "state_every": 3, **extra}}
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        members.append(f"{name}.yaml")
    data = Path(base["data"]["root"])
    exp = {"name": "nr", "track": "nr", "runs_dir": str(tmp / "runs"), "members": members,
           "ensemble": {"folds": 3, "n_boot": 50}, "submission": {"test_dir": str(data / "NTIRE2022_NR_Testing_Dis")}}
    path = tmp / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    assert experiment_main(["-c", str(path), "--cpu-procs", "1"]) == 0
    return path, tmp / "runs", {"data": data, "tmp": tmp}


def test_nr_experiment_predicts_the_nr_folders_and_writes_the_nr_zip(nr_experiment, capsys):
    path, runs, info = nr_experiment
    data = info["data"]
    test_names = sorted(p.name for p in (data / "NTIRE2022_NR_Testing_Dis").glob("*.bmp"))
    rows = list(csv.DictReader(open(runs / "splits" / "test.csv")))
    assert [r["name"] for r in rows] == test_names and {r["ref"] for r in rows} == {""}
    assert all(Path(r["dis"]).parent.name == "NTIRE2022_NR_Testing_Dis" for r in rows)
    for name in ("nr_a", "nr_b"):
        meta = json.loads((runs / name / "preds_test.json").read_text())
        assert meta["model"]["kind"] == "nr" and meta["timing"]["shared_with"] == ["nr_a", "nr_b"]
        assert sorted(_preds(runs / name / "preds_valid.csv")) == sorted(
            p.name for p in (data / "NTIRE2022_NR_Valid_Dis").glob("*.bmp"))
        assert read_heads(runs / name / "best.pth")[1]["kind"] == "nr"
    assert "averaged_epochs" in json.loads((runs / "nr_a" / "done.json").read_text())

    assert ensemble_main(["-c", str(path)]) == 0
    assert submission_main(["-c", str(path)]) == 0
    assert submission_main(["-c", str(path), "--phase", "valid"]) == 0
    zip_path = runs / "submission.zip"
    with zipfile.ZipFile(zip_path) as zf:
        lines = zf.read("output.txt").decode().splitlines()
        readme = zf.read("readme.txt").decode().splitlines()
    assert [line.split(",")[0] for line in lines] == test_names
    assert readme[4] == "Full-Reference [1] / Non-Reference [0] : 0" and "blind (no-reference)" in readme[3]
    nr_dir = str(data / "NTIRE2022_NR_Testing_Dis")
    assert check_main([str(zip_path), "--test-dir", nr_dir, "--track", "nr"]) == 0
    assert check_main([str(zip_path), "--test-dir", nr_dir, "--track", "fr"]) == 1
    assert check_main([str(runs / "submission_valid.zip"), "--test-dir", str(data / "NTIRE2022_NR_Valid_Dis"),
                       "--track", "nr"]) == 0

    capsys.readouterr()
    assert evaluate_main(["-c", str(path), "--labels", str(data / "demo_nr_test_labels"), "--n-boot", "20"]) == 0
    result = json.loads((runs / "ensemble" / "evaluation_test.json").read_text())
    assert list(result["rows"]) == ["nr_a", "nr_b", "ensemble"] and result["n_images"] == len(test_names)

    # the ensemble scores the NR test images alone (no reference) as its files say
    ens = Scorer.from_ensemble(runs)
    images = [data / "NTIRE2022_NR_Testing_Dis" / n for n in test_names]
    written = _preds(runs / "ensemble" / "preds_test.csv")
    assert np.allclose(ens.score_pairs(images), [written[n] for n in test_names], atol=1e-5)
    assert np.allclose(ens.score_pairs([(p, None) for p in images[:3]]), [written[n] for n in test_names[:3]],
                       atol=1e-5)


def test_killed_blind_member_resumes_to_identical_heads_and_scores_as_predicted(nr_experiment, tmp_path):
    path, runs, _ = nr_experiment
    member = path.parent / "nr_b.yaml"
    env = {**os.environ, "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}

    def train(out: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "members.train.loop", "-c", str(member), "--set", "data.track=nr",
                               "--set", f"output_dir={out}", *extra], env=env, capture_output=True, text=True,
                              timeout=900, cwd=REPO)

    assert train(tmp_path / "straight").returncode == 0
    out = tmp_path / "killed"
    crashed = train(out, "--abort-after-steps", "5")
    assert crashed.returncode == 3 and not (out / "done.json").exists(), crashed.stderr[-2000:]
    assert (out / "states" / "latest.txt").read_text().strip() == "step-00000003"  # a mid-epoch state
    resumed = train(out)
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr[-2000:]
    straight, again = read_heads(tmp_path / "straight" / "last.pth")[0], read_heads(out / "last.pth")[0]
    assert set(straight) == set(again) == {"cnn_net", "regressor"}
    assert all(torch.equal(v, again[part][k]) for part in straight for k, v in straight[part].items())

    # the trained member scores its test images, given without references, as preds_test.csv holds them
    scorer = Scorer.from_member(runs / "nr_b")
    preds = _preds(runs / "nr_b" / "preds_test.csv")
    rows = list(csv.DictReader(open(runs / "splits" / "test.csv")))
    scores = scorer.score_pairs([Path(r["dis"]) for r in rows])
    assert np.allclose(scores, [preds[r["name"]] for r in rows], atol=1e-5)
    with torch.no_grad():
        tensor = scorer(torch.rand(2, 3, 40, 40))  # tensors alone: the blind Scorer needs no reference
    assert tensor.shape == (2,) and tensor.dtype == torch.float64
