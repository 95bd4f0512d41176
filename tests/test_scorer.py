"""The Python API (`members.Scorer`) and `members.engine.score` on tiny members: scores equal the prediction
files, every input kind gives the same score, and the ensemble applies `ensemble.json` exactly."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ensemble.__main__ import main as ensemble_main
from members import Scorer
from members.contract.config import dump_yaml, to_dict
from members.contract.metrics import plcc
from members.contract.schema import load_experiment
from members.contract.stagefiles import read_labels, read_preds, sealed_json
from members.data.splits import prepare_member_data, read_split
from members.engine.predict import predict_members
from members.engine.score import main as score_main
from members.engine.scorer import ScorerError
from members.model.ahiq import build_model
from members.model.checkpoint import save_heads
from submission.__main__ import main as submission_main

TOL = 1e-5
REPO = Path(__file__).resolve().parents[1]


def _heads(cfg, seed: int, flip: bool):
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    if flip:  # score -> -score: the per-patch score conv is linear in its weights and bias
        conv = model.regressor.conv[0]
        conv.weight.data.neg_()
        conv.bias.data.neg_()
    save_heads(model, cfg.out / "best.pth", to_dict(cfg.model))


@pytest.fixture(scope="module")
def fitted(member_yaml, tmp_path_factory) -> Path:
    """Two members with random heads (turned so that both rank the validation images the right way),
    predicted, and an ensemble fitted on them; returns the experiment config."""
    root = tmp_path_factory.mktemp("scorer")
    base = yaml.safe_load(member_yaml.read_text())
    data = Path(base["data"]["root"])
    for kind in ("Ref", "Dis"):  # an NTIRE validation folder: the test images stand in for it
        if not (data / f"NTIRE2022_FR_Valid_{kind}").exists():
            shutil.copytree(data / f"NTIRE2022_FR_Testing_{kind}", data / f"NTIRE2022_FR_Valid_{kind}")
    names = []
    for name, seed in (("sa", 1), ("sb", 2)):
        (root / f"{name}.yaml").write_text(yaml.safe_dump({**base, "name": name, "seed": seed}))
        names.append(f"{name}.yaml")
    exp_path = root / "exp.yaml"
    exp_path.write_text(yaml.safe_dump({"name": "s", "runs_dir": str(root / "runs"), "members": names,
                                        "ensemble": {"folds": 3, "n_boot": 50}}))
    exp = load_experiment(exp_path)
    for k, m in enumerate(exp.members):
        prepare_member_data(m.config)
        m.out.mkdir(parents=True, exist_ok=True)
        dump_yaml(m.config, m.out / "config.yaml")
        _heads(m.config, k, flip=False)
    predict_members([m.config for m in exp.members], None, progress=False)
    backwards = []
    for k, m in enumerate(exp.members):
        preds, labels = read_preds(m.out / "preds_val.csv"), read_labels(m.out / "labels_val.csv")
        if plcc([preds[n] for n in labels], [labels[n][1] for n in labels]) < 0:
            _heads(m.config, k, flip=True)
            backwards.append(m.config)
    if backwards:
        predict_members(backwards, None, progress=False)
    for m in exp.members:  # their training is over: the heads above are final
        (m.out / "done.json").write_text("{}")
    assert ensemble_main(["-c", str(exp_path)]) == 0
    return exp_path


def test_scores_equal_the_prediction_files(fitted):
    exp = load_experiment(fitted)
    pairs = read_split(exp.split_dir / "test.csv")
    member = Scorer.from_member(exp.members[0].out)
    want = read_preds(exp.members[0].out / "preds_test.csv")
    got = member.score_pairs([(p.dis, p.ref) for p in pairs], batch_size=3)
    assert np.abs(got - [want[p.name] for p in pairs]).max() <= TOL
    ensemble = Scorer.from_ensemble(exp.runs_dir)
    want = read_preds(exp.out_dir / "preds_test.csv")
    got = ensemble.score_pairs([(p.dis, p.ref) for p in pairs])
    assert np.abs(got - [want[p.name] for p in pairs]).max() <= TOL
    assert np.ptp(got) > 100 * TOL  # the comparison is not between constants


def test_every_input_kind_gives_the_same_score(fitted):
    exp = load_experiment(fitted)
    pairs = read_split(exp.split_dir / "test.csv")[:4]
    scorer = Scorer.from_ensemble(exp.out_dir)
    by_path = scorer.score([str(p.dis) for p in pairs], [p.ref for p in pairs])
    images = [(Image.open(p.dis).convert("RGB"), Image.open(p.ref).convert("RGB")) for p in pairs]
    by_pil = scorer.score([d for d, _ in images], [r for _, r in images])
    as_tensor = [torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for pair in images for im in pair]
    by_tensor = scorer.score(torch.stack(as_tensor[0::2]), torch.stack(as_tensor[1::2]))
    assert np.array_equal(by_path, by_pil) and np.allclose(by_path, by_tensor, atol=1e-6)
    assert np.allclose(by_path, scorer.score_pairs([(p.dis, p.ref) for p in pairs]), atol=1e-6)


def test_bad_inputs_are_clear_errors(fitted, tmp_path):
    exp = load_experiment(fitted)
    scorer = Scorer.from_member(exp.members[0].out)
    small = torch.rand(3, 16, 16)
    with pytest.raises(ScorerError, match="smaller than the member's 32px crop"):
        scorer.score(small, small)
    with pytest.raises(ScorerError, match=r"values must be in \[0, 1\]"):
        scorer.score(torch.rand(3, 40, 40) * 255, torch.rand(3, 40, 40))
    with pytest.raises(ScorerError, match="differ in size"):
        scorer.score(torch.rand(3, 40, 40), torch.rand(3, 48, 40))
    # Before: a NaN pixel passed the [0, 1] check (NaN compares false both ways) and the score was NaN.
    for bad in (float("nan"), float("inf")):
        image = torch.rand(3, 40, 40)
        image[1, 7, 9] = bad
        with pytest.raises(ScorerError, match=r"distorted image 0: 1 value\(s\) are NaN or infinite"):
            scorer.score(image, torch.rand(3, 40, 40))
        with pytest.raises(ScorerError, match=r"reference 0: 1 value\(s\) are NaN or infinite"):
            scorer.score(torch.rand(3, 40, 40), image)
    with pytest.raises(ScorerError, match="config.yaml: not found"):
        Scorer.from_member(tmp_path)


def test_ensemble_refuses_heads_it_was_not_fitted_with(fitted, tmp_path):
    exp = load_experiment(fitted)
    copy = tmp_path / "runs"
    shutil.copytree(exp.runs_dir, copy)
    _heads(dataclasses.replace(exp.members[0].config, output_dir=str(copy / "sa")), 7, flip=False)  # retrained
    with pytest.raises(ScorerError, match="preds_test.json: predicted with other heads than .*best.pth"):
        Scorer.from_ensemble(copy)



def test_heads_changed_after_prediction_are_refused_by_every_stage_alike(fitted, tmp_path, capsys):
    """Before: `make submit` wrote a VALID zip from predictions of heads that best.pth no longer holds, while
    the ensemble and the Scorer refused the same state (each in its own words). One verifier says it now,
    in the same line everywhere, with the command that rebuilds the members."""
    from ensemble.io import EnsembleInputError, load_members
    from members.launch.experiment import needs_prediction

    exp = load_experiment(fitted)
    copy = tmp_path / "runs"
    shutil.copytree(exp.runs_dir, copy)
    sets = ["--set", f"runs_dir={copy}"]
    assert submission_main(["-c", str(fitted), *sets]) == 0  # the copy as it is: fine
    moved = load_experiment(fitted, sets[1::2])
    _heads(moved.members[0].config, 7, flip=False)  # best.pth replaced after the prediction
    line = f"{copy / 'sa' / 'preds_test.json'}: predicted with other heads than {copy / 'sa' / 'best.pth'}"
    capsys.readouterr()
    assert submission_main(["-c", str(fitted), *sets]) == 2
    err = capsys.readouterr().err
    assert line in err and f"make train-members EXPERIMENT={fitted}" in err
    assert needs_prediction(moved.members[0].config) and not needs_prediction(moved.members[1].config)
    with pytest.raises(EnsembleInputError) as ens:
        load_members(moved)
    assert line in str(ens.value) and f"make train-members EXPERIMENT={fitted}" in str(ens.value)
    with pytest.raises(ScorerError) as scorer:
        Scorer.from_ensemble(copy)
    assert line in str(scorer.value) and "make train-members" in str(scorer.value)


def test_a_resealed_ensemble_record_is_refused(fitted, tmp_path):
    """Before: ensemble.json with every weight negated and its self-hash recomputed was applied as it
    was: every score negated, exit 0. The record must give its own preds_test.csv from the members'."""
    exp = load_experiment(fitted)
    copy = tmp_path / "runs"
    shutil.copytree(exp.runs_dir, copy)
    path = copy / "ensemble" / "ensemble.json"
    record = json.loads(path.read_text())
    record.pop("self_sha256")
    record["weights"] = {k: -v for k, v in record["weights"].items()}
    path.write_text(sealed_json(record))
    with pytest.raises(ScorerError, match=rf"ensemble.json: .*make ensemble EXPERIMENT={fitted}"):
        Scorer.from_ensemble(copy)


def test_an_unfinished_member_is_scored_only_when_allowed(fitted, tmp_path, capsys):
    """Before: a member folder without done.json (training killed half-way) was scored silently."""
    exp = load_experiment(fitted)
    member = tmp_path / "sb"
    shutil.copytree(exp.members[1].out, member)
    (member / "done.json").unlink()
    data = Path(exp.members[0].config.data.root)
    name = sorted(read_preds(member / "preds_test.csv"))[0]
    pair = [str(data / "NTIRE2022_FR_Testing_Dis" / name), str(data / "NTIRE2022_FR_Testing_Ref" / f"{name[:5]}.bmp")]
    capsys.readouterr()
    assert score_main(["--member", str(member), *pair]) == 2
    captured = capsys.readouterr()
    assert "has not finished training" in captured.err and captured.out == ""
    assert score_main(["--member", str(member), "--allow-unfinished", *pair]) == 0
    captured = capsys.readouterr()
    assert "warning:" in captured.err and "has not finished training" in captured.err
    score = float(captured.out.splitlines()[-1].split(",")[1])
    assert abs(score - read_preds(member / "preds_test.csv")[name]) <= 2e-6


def test_cli_scores_a_folder_and_one_pair(fitted, tmp_path, capsys):
    exp = load_experiment(fitted)
    data = Path(exp.members[0].config.data.root)
    out = tmp_path / "scores.csv"
    assert score_main(["--ensemble", str(exp.runs_dir), "--dis-dir", str(data / "NTIRE2022_FR_Testing_Dis"),
                       "--ref-dir", str(data / "NTIRE2022_FR_Testing_Ref"), "--out", str(out)]) == 0
    got = read_preds(out)
    want = read_preds(exp.out_dir / "preds_test.csv")
    assert set(got) == set(want) and max(abs(got[n] - want[n]) for n in want) <= 2e-6
    name = sorted(want)[0]
    pair = [str(data / "NTIRE2022_FR_Testing_Dis" / name), str(data / "NTIRE2022_FR_Testing_Ref" / f"{name[:5]}.bmp")]
    capsys.readouterr()
    assert score_main(["--member", str(exp.members[1].out), *pair]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.split(",")[0] == name
    assert abs(float(line.split(",")[1]) - read_preds(exp.members[1].out / "preds_test.csv")[name]) <= 2e-6
    assert score_main(["--member", str(exp.members[1].out), pair[0], str(tmp_path / "nope.bmp")]) == 2
    assert "not found" in capsys.readouterr().err


def test_validation_phase_zip(fitted):
    """The members predicted the NTIRE validation folder; the ensemble applies its weights to it and the
    submission stage writes the development-phase zip, checked against the folder's names."""
    exp = load_experiment(fitted)
    valid = read_preds(exp.out_dir / "preds_valid.csv")
    names = [p.name for p in read_split(exp.split_dir / "valid.csv")]
    assert sorted(valid) == sorted(names)
    assert submission_main(["-c", str(fitted), "--phase", "valid"]) == 0
    with zipfile.ZipFile(exp.zip_path("valid")) as archive:
        rows = archive.read("output.txt").decode().splitlines()
    assert [r.split(",")[0] for r in rows] == sorted(names)
    manifest = json.loads((exp.out_dir / "ensemble.json").read_text())["manifest"]
    assert "valid" in manifest["inputs"]["splits"] and "preds_valid.csv" in manifest["outputs"]


def test_rank_mean_ensemble_scores_one_pair_as_the_whole_set(fitted):
    # rank_mean places each score among the validation scores it was fitted on, so one pair scored
    # alone gets the score it has in the whole test set (no "rank within the scored set")
    from ensemble.combine import combine_ranks

    exp = load_experiment(fitted)
    base = Scorer.from_ensemble(exp.runs_dir)
    names = [m.name for m in exp.members]
    mean = np.array([base.ensemble["standardisation"][n]["mean"] for n in names])
    std = np.array([base.ensemble["standardisation"][n]["std"] for n in names])
    val = [read_preds(m.out / "preds_val.csv") for m in exp.members]
    z_val = (np.array([[v[k] for v in val] for k in sorted(val[0])]) - mean) / std
    record = {**base.ensemble, "method": "rank_mean", "weights": {n: 0.5 for n in names},
              "calibration": {"kind": "none"},
              "rank_reference": {n: sorted(z_val[:, j].tolist()) for j, n in enumerate(names)}}
    members = [(cfg, base.checkpoints[cfg.name]) for cfg in base.configs]
    scorer = Scorer(members, ensemble=record)
    pairs = read_split(exp.split_dir / "test.csv")
    test = [read_preds(m.out / "preds_test.csv") for m in exp.members]
    want = combine_ranks((np.array([[t[p.name] for t in test] for p in pairs]) - mean) / std, np.array([0.5, 0.5]), z_val)
    got = np.array([scorer.score_pairs([(p.dis, p.ref)])[0] for p in pairs[:3]])
    assert np.abs(got - want[:3]).max() <= TOL and np.ptp(want) > 100 * TOL
    with pytest.raises(ScorerError, match="rank_reference"):
        Scorer(members, ensemble={**record, "rank_reference": None}).score_pairs([(pairs[0].dis, pairs[0].ref)])


# ------------------------------------------------------------------------ the module API (pyiqa-style)
def test_the_scorer_is_a_torch_module(fitted):
    exp = load_experiment(fitted)
    pairs = read_split(exp.split_dir / "test.csv")[:3]
    scorer = Scorer.from_ensemble(exp.runs_dir)
    assert isinstance(scorer, torch.nn.Module) and scorer.lower_better is False
    want = read_preds(exp.out_dir / "preds_test.csv")
    got = scorer([p.dis for p in pairs], [p.ref for p in pairs])  # paths: a CPU tensor
    assert isinstance(got, torch.Tensor) and got.shape == (3,) and got.dtype == torch.float64
    assert got.device.type == "cpu" and np.abs(got.numpy() - [want[p.name] for p in pairs]).max() <= TOL
    as_tensor = [torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1).float() / 255
                 for p in pairs for f in (p.dis, p.ref)]
    batch = scorer(torch.stack(as_tensor[0::2]), torch.stack(as_tensor[1::2]))
    assert torch.allclose(batch, got, atol=1e-6)
    # frozen, in eval mode whatever is asked, and movable
    assert list(scorer.parameters()) and not any(p.requires_grad for p in scorer.parameters())
    assert not any(m.training for m in scorer.train().modules())
    assert scorer.to("cpu") is scorer and scorer.device.type == "cpu"
    with pytest.raises(ScorerError, match="precision="):
        scorer.double()
    assert all(p.dtype == torch.float32 for p in scorer.parameters())  # the cast was undone
    assert torch.equal(scorer(torch.stack(as_tensor[0::2]), torch.stack(as_tensor[1::2])), batch)


def test_a_tensor_that_requires_grad_is_refused(fitted):
    """Before: the tensor was detached silently, and a loss built on the score had no gradient."""
    scorer = Scorer.from_member(load_experiment(fitted).members[0].out)
    dis = torch.rand(3, 40, 40, requires_grad=True)
    with pytest.raises(ScorerError, match="distorted image 0: the tensor requires grad, but the Scorer is not "
                                          "differentiable"):
        scorer(dis, torch.rand(3, 40, 40))
    with pytest.raises(ScorerError, match="not differentiable"):
        scorer.score(torch.rand(2, 3, 40, 40), torch.rand(2, 3, 40, 40).requires_grad_())
    assert torch.isfinite(scorer(dis.detach(), torch.rand(3, 40, 40))).all()


def _noise_pair(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(3, 40, 40, generator=gen), torch.rand(3, 40, 40, generator=gen)


def test_score_range_holds_for_random_noise(fitted):
    """`score_range` is what the scores can be, not what the training data gave: a member and an
    uncalibrated rank_mean ensemble are unbounded (noise scores outside 0..1 on both), a calibration
    bounds the scores within its levels."""
    exp = load_experiment(fitted)
    member = Scorer.from_member(exp.members[0].out)
    assert member.score_range == (-math.inf, math.inf)
    val = read_preds(exp.members[0].out / "preds_val.csv").values()
    assert member.validation_range == (min(val), max(val))
    base = Scorer.from_ensemble(exp.runs_dir)
    val = read_preds(exp.out_dir / "preds_val.csv").values()
    assert base.validation_range == (min(val), max(val))
    names = [m.name for m in exp.members]
    members = [(cfg, base.checkpoints[cfg.name]) for cfg in base.configs]
    # validation scores squeezed together: the noise pair lies far past the ends of their CDF, where
    # rank_mean continues it linearly (what a random image does to a real ensemble, made certain here)
    squeezed = {n: [0.001 * k for k in range(-5, 6)] for n in names}
    rank = {**base.ensemble, "method": "rank_mean", "weights": {n: 0.5 for n in names},
            "calibration": {"kind": "none"}, "rank_reference": squeezed}
    dis, ref = _noise_pair(0)
    scorer = Scorer(members, ensemble=rank)
    (s,) = scorer.score(dis, ref)
    assert not 0 <= s <= 1  # a quantile is not confined to [0, 1] ...
    assert scorer.score_range == (-math.inf, math.inf)  # ... and the range says so
    for calibration, bounds in (
            ({"kind": "isotonic", "x": [0.2, 0.8], "y": [10.0, 20.0], "tail_margin": 1.5, "tail_scale": 0.6},
             (8.5, 21.5)),
            ({"kind": "logistic", "params": [30.0, 5.0, 0.5, 0.1]}, (5.0, 30.0))):
        calibrated = Scorer(members, ensemble={**rank, "calibration": calibration})
        assert calibrated.score_range == bounds
        (c,) = calibrated.score(dis, ref)
        assert bounds[0] <= c <= bounds[1]
        if calibration["kind"] == "isotonic":  # in a tail: past the end levels, within the margin
            assert not 10.0 <= c <= 20.0
    for seed in range(3):
        (m,) = member.score(*_noise_pair(seed))
        assert member.score_range[0] <= m <= member.score_range[1] and math.isfinite(m)


# ------------------------------------------------------------------------ the CLI: stdout, pairs files
def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "members.engine.score", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_stdout_holds_the_csv_alone(fitted, tmp_path):
    """Before: "loaded heads from ..." lines were printed on stdout, so `score ... > out.csv` began
    with them. The run reads a split list the pipeline wrote (before: refused as not 'dis,ref')."""
    exp = load_experiment(fitted)
    out = _cli("--ensemble", str(exp.runs_dir), "--pairs", str(exp.split_dir / "test.csv"))
    assert out.returncode == 0, out.stderr
    rows = list(csv.reader(io.StringIO(out.stdout)))
    assert rows[0] == ["name", "score"] and all(len(r) == 2 for r in rows)
    want = read_preds(exp.out_dir / "preds_test.csv")
    got = {name: float(score) for name, score in rows[1:]}
    assert set(got) == set(want) and max(abs(got[n] - want[n]) for n in want) <= 2e-6
    assert "loaded heads from" in out.stderr
    written = _cli("--member", str(exp.members[0].out), "--pairs", str(exp.split_dir / "test.csv"),
                   "--out", str(tmp_path / "s.csv"))
    assert written.returncode == 0 and written.stdout == "" and "wrote" in written.stderr
    assert read_preds(tmp_path / "s.csv") == pytest.approx(read_preds(exp.members[0].out / "preds_test.csv"),
                                                           abs=2e-6)


def test_pairs_files_in_the_kits_formats(fitted, tmp_path, capsys):
    exp = load_experiment(fitted)
    root = Path(exp.members[0].config.data.root)
    pairs = read_split(exp.split_dir / "test.csv")[:3]
    rel = [(p.dis.relative_to(root).as_posix(), p.ref.relative_to(root).as_posix()) for p in pairs]
    table = tmp_path / "table.csv"
    table.write_text("dis_img_path,dis_type,ref_img_path,score\n" + "".join(f"{d},x,{r},1.0\n" for d, r in rel))
    plain = tmp_path / "pairs.csv"
    plain.write_text("dis,ref\n" + "".join(f"{d},{r}\n" for d, r in rel))
    member = ["--member", str(exp.members[1].out)]
    want = read_preds(exp.members[1].out / "preds_test.csv")
    capsys.readouterr()
    assert score_main([*member, "--pairs", str(table), "--root", str(root)]) == 0
    got = read_preds_text(capsys.readouterr().out)
    assert list(got) == [d for d, _ in rel]  # a table names its images by their path as written
    assert all(abs(got[d] - want[p.name]) <= 2e-6 for (d, _), p in zip(rel, pairs))
    assert score_main([*member, "--pairs", str(plain), "--root", str(root)]) == 0
    assert list(read_preds_text(capsys.readouterr().out).values()) == list(got.values())
    # relative paths without --root are relative to the working directory: not found from here
    assert score_main([*member, "--pairs", str(table)]) == 2
    err = capsys.readouterr().err
    assert "image(s) not found" in err and f"relative to the working directory {Path.cwd()}" in err
    assert "--root DIR" in err
    assert score_main([*member, "--pairs", str(exp.split_dir / "test.csv"), "--root", str(root)]) == 2
    assert "drop --root" in capsys.readouterr().err
    for header in ("distorted,reference", "name,dis,ref", "image,dmos,extra"):
        bad = tmp_path / "bad.csv"
        bad.write_text(f"{header}\na.png,b.png\n")
        assert score_main([*member, "--pairs", str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{bad}, line 1: unknown header '{header}'" in err
        assert "name,dis,ref,ref_id,mos,source" in err and "dis_img_path,dis_type,ref_img_path,score" in err


def read_preds_text(text: str) -> dict[str, float]:
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["name", "score"]
    return {name: float(score) for name, score in rows[1:]}


def test_scores_beyond_the_validation_range_are_noted(capsys):
    from members.engine.score import _note_extrapolation

    _note_extrapolation(np.array([0.5, 2.0, -1.0]), (0.0, 1.0))
    assert "2 of 3 score(s) lie outside the validation scores' range [0.000000, 1.000000]" in capsys.readouterr().err
    _note_extrapolation(np.array([0.5]), (0.0, 1.0))
    _note_extrapolation(np.array([5.0]), None)
    assert capsys.readouterr().err == ""
