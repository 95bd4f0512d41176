"""End to end on tiny members: make train-members -> make ensemble -> make submit (as CLIs)."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.stats import pearsonr, spearmanr

from ensemble.__main__ import main as ensemble_main
from ensemble.evaluate import main as evaluate_main
from members.launch.experiment import main as experiment_main
from submission.__main__ import main as submission_main
from submission.check import main as check_main


def test_experiment_ensemble_and_submission(member_yaml, tmp_path, capsys):
    base = yaml.safe_load(member_yaml.read_text())
    members = []
    for name, seed in (("tiny_a", 1), ("tiny_b", 2)):
        cfg = {**base, "name": name, "seed": seed, "train": {**base["train"], "epochs": 1}}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        members.append(str(path))
    test_dir = Path(base["data"]["root"]) / "NTIRE2022_FR_Testing_Dis"
    exp = {"name": "e2e", "runs_dir": str(tmp_path / "runs"), "members": members,
           "ensemble": {"folds": 3, "n_boot": 100}, "submission": {"test_dir": str(test_dir)}}
    exp_path = tmp_path / "exp.yaml"
    exp_path.write_text(yaml.safe_dump(exp))

    assert experiment_main(["-c", str(exp_path), "--cpu-procs", "1"]) == 0
    assert "predicting tiny_a, tiny_b together on the CPU" in capsys.readouterr().out
    runs = tmp_path / "runs"
    for name in ("tiny_a", "tiny_b"):
        for file in ("done.json", "best.pth", "preds_val.csv", "labels_val.csv", "preds_test.csv", "preds_test.json"):
            assert (runs / name / file).is_file(), (name, file)
        # predicted by members.engine.predict_all after training (the only way), both members in one run
        meta = json.loads((runs / name / "preds_test.json").read_text())
        assert meta["timing"]["shared_with"] == ["tiny_a", "tiny_b"] and meta["processes"] == 1
    assert experiment_main(["-c", str(exp_path), "--cpu-procs", "1"]) == 0  # nothing left to do
    assert capsys.readouterr().out.count("trained and predicted already") == 2

    assert ensemble_main(["-c", str(exp_path)]) == 0
    summary = json.loads((runs / "ensemble" / "ensemble.json").read_text())
    assert {m["name"] for m in summary["members"]} == {"tiny_a", "tiny_b"}
    assert (runs / "ensemble" / "report.md").is_file()

    assert submission_main(["-c", str(exp_path)]) == 0
    with zipfile.ZipFile(runs / "submission.zip") as zf:
        assert sorted(zf.namelist()) == ["output.txt", "readme.txt"]
        lines = zf.read("output.txt").decode().splitlines()
    assert len(lines) == len(list(test_dir.glob("*.bmp")))
    assert check_main([str(runs / "submission.zip"), "--test-dir", str(test_dir)]) == 0

    # the members' and the ensemble's scores against the hidden test labels (what make demo prints)
    labels = Path(base["data"]["root"]) / "demo_test_labels"
    truth = dict(line.split(",") for f in sorted(labels.glob("*.txt")) for line in f.read_text().split())
    capsys.readouterr()
    assert evaluate_main(["-c", str(exp_path), "--labels", str(labels), "--n-boot", "50"]) == 0
    table = capsys.readouterr().out
    rows = json.loads((runs / "ensemble" / "evaluation_test.json").read_text())["rows"]
    assert list(rows) == ["tiny_a", "tiny_b", "ensemble"]
    for name in rows:
        assert f"| {'member ' if name != 'ensemble' else ''}{name} | {rows[name]['srcc']['value']:.4f} [" in table
        preds = dict(line.split(",") for line in (runs / name / "preds_test.csv").read_text().split()[1:])
        y, p = np.array([float(truth[n]) for n in sorted(preds)]), np.array([float(preds[n]) for n in sorted(preds)])
        assert rows[name]["srcc"]["value"] == pytest.approx(spearmanr(p, y)[0], abs=1e-9)
        assert rows[name]["plcc"]["value"] == pytest.approx(pearsonr(p, y)[0], abs=1e-9)
    # the demo's test split is unlabelled: without --labels there is nothing to score against
    assert evaluate_main(["-c", str(exp_path)]) == 2
    assert "the test split is unlabelled" in capsys.readouterr().err
    # labels of other images, or of too few, are refused with the folder named
    wrong = tmp_path / "wrong_labels"
    wrong.mkdir()
    first = sorted(labels.glob("*.txt"))[0]
    (wrong / first.name).write_text(first.read_text())
    assert evaluate_main(["-c", str(exp_path), "--labels", str(wrong)]) == 2
    assert "does not match the test split" in capsys.readouterr().err


@pytest.mark.slow
def test_a_replaced_test_image_reaches_the_zip_after_the_advised_rerun(tmp_path, capsys):
    """The issue's reproduction on a generated dataset: a reference copied over a test image of the same
    size. Before: `make submit` refused ('run make train-members'), the advised rerun said 'trained and
    predicted already' and the zip, VALID, still held the old image's score."""
    from members import Scorer
    from members.data import demo_data

    data = tmp_path / "data"
    demo_data.build(data, size=40, seed=3)
    member = {"base": str(Path(__file__).resolve().parents[1] / "configs/members/tiny.yaml"), "name": "tiny_a",
              "model": {"crop": 32}, "data": {"root": str(data)},
              "train": {"epochs": 1, "batch_size": 8, "num_workers": 0},
              "predict": {"views": {"kind": "center", "flip": False}, "batch_size": 8, "num_workers": 0}}
    (tmp_path / "tiny_a.yaml").write_text(yaml.safe_dump(member))
    test_dir = data / "NTIRE2022_FR_Testing_Dis"
    exp = {"name": "swap", "runs_dir": str(tmp_path / "runs"), "members": ["tiny_a.yaml", {"name": "ssim", "metric": "ssim"}],
           "ensemble": {"folds": 3, "n_boot": 50}, "submission": {"test_dir": str(test_dir)}}
    exp_path = tmp_path / "exp.yaml"
    exp_path.write_text(yaml.safe_dump(exp))
    runs = tmp_path / "runs"

    def zipped() -> dict[str, float]:
        with zipfile.ZipFile(runs / "submission.zip") as zf:
            return {n: float(s) for n, s in (line.split(",") for line in zf.read("output.txt").decode().splitlines())}

    assert experiment_main(["-c", str(exp_path), "--cpu-procs", "1"]) == 0
    assert ensemble_main(["-c", str(exp_path)]) == 0 and submission_main(["-c", str(exp_path)]) == 0
    before = zipped()
    name, ref = "A0015_10_00.bmp", data / "NTIRE2022_FR_Testing_Ref" / "A0015.bmp"
    (test_dir / name).write_bytes(ref.read_bytes())  # the same size: only the content changed
    capsys.readouterr()
    assert submission_main(["-c", str(exp_path)]) == 2
    assert "make train-members" in capsys.readouterr().err

    assert experiment_main(["-c", str(exp_path), "--cpu-procs", "1"]) == 0
    out = capsys.readouterr().out
    assert "rewriting them" in out and "trained and predicted already" not in out
    assert "member 1 of" not in out and "predicting tiny_a" in out  # predicted again, not trained again
    assert "ssim (metric ssim): wrote test" in out
    assert ensemble_main(["-c", str(exp_path)]) == 0 and submission_main(["-c", str(exp_path)]) == 0
    after = zipped()
    new_score = Scorer.from_ensemble(runs).score_pairs([(test_dir / name, ref)])[0]
    assert after[name] == pytest.approx(new_score, abs=1e-5) and abs(after[name] - before[name]) > 1e-4
