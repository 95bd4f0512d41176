"""Tests of the ensemble stage on member directories written to disk: reading, validation errors
(with nothing written), config handling and end-to-end CLI runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ensemble.__main__ import main
from ensemble.io import EnsembleInputError, load_members
from members.contract.config import ConfigError
from members.contract.member import prediction_fingerprint
from members.contract.schema import load_experiment
from members.contract.stagefiles import StageFileError, read_labels, read_preds, write_member_split
from members.contract.verify import made_from

REPO = Path(__file__).resolve().parents[1]
METHODS = ["mean", "rank_mean", "nnls", "ridge", "greedy"]


def meta(name: str, n: int) -> dict:
    return {"member": name, "split": "test", "n_images": n, "n_views": 5, "views": "4 corners + centre",
            "seconds": 1.5, "seconds_per_image": 0.01, "device": "cpu", "pretrained_backbones": True,
            "higher_is_better": True, "model": {"vit": "vit_base_patch8_224", "cnn": "resnet50", "crop": 224}}


def write_split(path: Path, names: list[str], refs: list[str], mos: list[float] | None) -> None:
    """A split list in the members' format (what `prepare_splits` writes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [f"{n},dis/{n},ref/{r}.bmp,{r},{'' if mos is None else repr(float(m))},synthetic\n"
            for n, r, m in zip(names, refs, mos if mos is not None else [None] * len(names))]
    path.write_text("name,dis,ref,ref_id,mos,source\n" + "".join(rows), encoding="utf-8")


def write_member(exp_config: Path, name: str, val: list[tuple[str, str]], mos: np.ndarray, val_scores: np.ndarray,
                 test: list[str], test_scores: np.ndarray, test_meta: dict | None = None) -> None:
    """A member's stage files as `members.engine.predict` writes them (manifest included), made from the
    experiment's current split lists and the member's current config."""
    exp = load_experiment(exp_config)
    cfg = next(m.config for m in exp.members if m.name == name)
    cfg.out.mkdir(parents=True, exist_ok=True)
    for split, rows, labels, base in (
            ("val", [(n, s) for (n, _), s in zip(val, val_scores)], [(n, r, float(m)) for (n, r), m in zip(val, mos)],
             {**meta(name, len(val)), "split": "val"}),
            ("test", list(zip(test, test_scores)), None, test_meta or meta(name, len(test)))):
        extra = made_from(exp.split_dir, split, prediction_fingerprint(cfg), None)
        write_member_split(cfg.out, split, [(n, float(s)) for n, s in rows], labels, {**base, **extra})


def make_experiment(root: Path, noise_sds: tuple[float, ...] = (0.3, 0.7, 1.5), n_refs: int = 12,
                    per_ref: int = 10, section: str = "  n_boot: 50\n", relative: bool = False,
                    signs: tuple[float, ...] | None = None) -> Path:
    """Synthetic members (MOS + noise of the given strengths, times `signs`) under root/runs/demo, with
    their split lists, member configs and an experiment config; returns the experiment config path."""
    rng = np.random.default_rng(0)
    val = [(f"V{r:03d}_10_{k:02d}.bmp", f"V{r:03d}") for r in range(n_refs) for k in range(per_ref)]
    test = [f"T{r:03d}_10_{k:02d}.bmp" for r in range(n_refs) for k in range(per_ref)]
    mos = 1450 + np.repeat(rng.normal(0, 60, n_refs), per_ref) + rng.normal(0, 100, len(val))
    test_mos = 1450 + rng.normal(0, 110, len(test))
    base = Path() if relative else root
    (root / "configs" / "members").mkdir(parents=True)
    runs = base / "runs" / "demo"
    names = [f"m{j}" for j in range(len(noise_sds))]
    for j, name in enumerate(names):
        (root / "configs" / "members" / f"{name}.yaml").write_text(f"name: {name}\nseed: {j}\n")
    config = root / "configs" / "exp.yaml"
    config.write_text(f"name: demo\nruns_dir: {runs}\nmembers: {json.dumps([f'members/{n}.yaml' for n in names])}\n"
                      f"ensemble:\n{section}submission:\n  out: out.zip\n", encoding="utf-8")
    write_split(root / "runs" / "demo" / "splits" / "val.csv", [n for n, _ in val], [r for _, r in val], list(mos))
    write_split(root / "runs" / "demo" / "splits" / "test.csv", test, [n[:4] for n in test], None)
    cwd = os.getcwd()
    os.chdir(root)  # runs_dir may be relative to the working directory
    try:
        for j, sd in enumerate(noise_sds):
            sign = 1.0 if signs is None else signs[j]
            val_scores = sign * ((mos - 1450) / 120 + rng.normal(0, sd, len(val)))
            test_scores = sign * ((test_mos - 1450) / 120 + rng.normal(0, sd, len(test)))
            write_member(config, names[j], val, mos, val_scores, test, test_scores)
    finally:
        os.chdir(cwd)
    return config


def run_fails(config: Path, capsys: pytest.CaptureFixture, *pieces: str) -> None:
    """The CLI exits with 2, prints every `piece` in its error, and writes nothing."""
    assert main(["-c", str(config)]) == 2
    err = capsys.readouterr().err
    for piece in pieces:
        assert piece in err
    assert not (config.parents[1] / "runs" / "demo" / "ensemble").exists()


def members_of(config: Path):
    return load_members(load_experiment(config))


def test_load_members_aligns_rows_by_name(tmp_path):
    config = make_experiment(tmp_path)
    data = members_of(config)
    by_name = read_preds(tmp_path / "runs" / "demo" / "m1" / "preds_test.csv")
    assert data.test_names == sorted(data.test_names) and data.x_test.shape == (120, 3)
    assert np.allclose(data.x_test[:, 1], [by_name[n] for n in data.test_names])
    assert data.members == ["m0", "m1", "m2"]
    assert {k: v for k, v in data.test_meta[0].items() if k in meta("m0", 120)} == meta("m0", 120)


def test_missing_member_file(tmp_path, capsys):
    config = make_experiment(tmp_path)
    missing = tmp_path / "runs" / "demo" / "m1" / "preds_test.csv"
    missing.unlink()
    run_fails(config, capsys, "member files that cannot be used", str(missing), "make train-members")


def test_refusal_names_the_experiment_to_rebuild(tmp_path):
    """The fix-it hint is runnable as printed: without EXPERIMENT=, make would run the Makefile's
    default experiment, not this one."""
    make_experiment(tmp_path, relative=True)
    (tmp_path / "runs" / "demo" / "m1" / "preds_test.csv").unlink()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "ensemble", "-c", "configs/exp.yaml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) >= 2
    assert "rebuild them with make train-members EXPERIMENT=configs/exp.yaml)" in done.stderr
    assert "; run make train-members EXPERIMENT=configs/exp.yaml" in done.stderr  # the file's own line too
    assert "Traceback" not in done.stderr


def test_edited_member_file_is_refused(tmp_path, capsys):
    """A file that does not match its member's manifest (edited, or from an interrupted run) is never read."""
    config = make_experiment(tmp_path)
    path = tmp_path / "runs" / "demo" / "m2" / "preds_val.csv"
    path.write_text(path.read_text().replace("V000_10_00.bmp,", "V000_10_00.bmp,9", 1))
    run_fails(config, capsys, str(path), "changed since preds_val.json was written")


def test_stale_member_files_are_refused(tmp_path, capsys):
    """Predictions made from another split list or another member config are stale."""
    config = make_experiment(tmp_path)
    split = tmp_path / "runs" / "demo" / "splits" / "test.csv"
    split.write_text(split.read_text().replace("T000_10_00.bmp,", "T000_10_01.bmp,", 1))
    run_fails(config, capsys, "predicted another test split list")
    config = make_experiment(tmp_path / "b")
    (tmp_path / "b" / "configs" / "members" / "m0.yaml").write_text("name: m0\nseed: 0\ntrain: {epochs: 3}\n")
    run_fails(config, capsys, "made before the config of member m0")


def test_mismatched_names_list_the_differences(tmp_path, capsys):
    config = make_experiment(tmp_path)
    data = members_of(config)
    val = [(n, r) for n, r in zip(data.val_names, data.refs)]
    write_member(config, "m1", val[:-1], data.mos[:-1], data.x_val[:-1, 1], data.test_names, data.x_test[:, 1])
    test = [n.replace("T000_10_00.bmp", "T999_10_00.bmp") for n in data.test_names]
    write_member(config, "m2", val, data.mos, data.x_val[:, 2], test, data.x_test[:, 2])
    m1_val, m2_test = (tmp_path / "runs" / "demo" / m for m in ("m1/preds_val.csv", "m2/preds_test.csv"))
    run_fails(config, capsys, f"{m1_val} vs", "1 name(s) missing (e.g. V011_10_09.bmp)",
              f"{m2_test} vs", "extra name(s) (e.g. T999_10_00.bmp)")


@pytest.mark.parametrize(
    ("file", "edit", "pieces"),
    [
        ("preds_val.csv", lambda t: t.replace(t.splitlines()[3].split(",")[1], "nan", 1), ["line 4", "finite"]),
        ("preds_test.csv", lambda t: t.replace("name,score", "image,score"), ["line 1", "expected header"]),
        ("preds_test.csv", lambda t: t.replace(".bmp,", ".bmp;", 1), ["line 2", "expected 'name,score'"]),
        ("preds_test.csv", lambda t: t.replace(".bmp,", ".bmp,1,", 1), ["line 2", "expected 'name,score'"]),
        ("preds_val.csv", lambda t: t.replace(t.splitlines()[5].split(",")[1], "good", 1), ["line 6", "'good'"]),
        ("labels_val.csv", lambda t: t + t.splitlines()[1] + "\n", ["line 122", "repeats line 2"]),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, file, edit, pieces):
    make_experiment(tmp_path)
    path = tmp_path / "runs" / "demo" / "m2" / file
    path.write_text(edit(path.read_text()))
    with pytest.raises(StageFileError) as err:
        (read_labels if file.startswith("labels") else read_preds)(path)
    for piece in [str(path), *pieces]:
        assert piece in str(err.value)


@pytest.mark.parametrize(("edit", "piece"), [(lambda t: t.replace('"higher_is_better": true', '"hib": 1'),
                                              "higher_is_better"), (lambda t: t[:-2], "invalid JSON")])
def test_malformed_member_json(tmp_path, capsys, edit, piece):
    config = make_experiment(tmp_path)
    path = tmp_path / "runs" / "demo" / "m2" / "preds_test.json"
    path.write_text(edit(path.read_text()))
    run_fails(config, capsys, str(path), piece)


def test_constant_member(tmp_path, capsys):
    config = make_experiment(tmp_path)
    data = members_of(config)
    val = [(n, r) for n, r in zip(data.val_names, data.refs)]
    write_member(config, "m0", val, data.mos, data.x_val[:, 0], data.test_names, np.full(len(data.test_names), 0.5))
    run_fails(config, capsys, str(tmp_path / "runs" / "demo" / "m0" / "preds_test.csv"), "constant member")


def test_labels_must_agree_across_members(tmp_path, capsys):
    config = make_experiment(tmp_path)
    data = members_of(config)
    val = [(n, r) for n, r in zip(data.val_names, data.refs)]
    mos = data.mos.copy()
    mos[6] = 1.0
    write_member(config, "m2", val, mos, data.x_val[:, 2], data.test_names, data.x_test[:, 2])
    run_fails(config, capsys, str(tmp_path / "runs" / "demo" / "m2" / "labels_val.csv"), "disagrees with",
              data.val_names[6])


def test_config_errors(tmp_path):
    config = make_experiment(tmp_path)
    config.write_text(config.read_text().replace("  n_boot: 50\n", "  n_boot: 50\n  fold: 3\n"))
    with pytest.raises(ConfigError, match=r"exp.yaml, line 6: 'ensemble.fold' unknown key"):
        load_experiment(config)
    config.write_text(config.read_text().replace("  fold: 3\n", ""))
    with pytest.raises(ConfigError, match="methods \\['blend'\\] invalid"):
        load_experiment(config, ["ensemble.methods=[blend]"])
    with pytest.raises(ConfigError, match="'ensemble.folds': expected int"):
        load_experiment(config, ["ensemble.folds=three"])
    with pytest.raises(ConfigError, match=r"--set folds=3\): 'folds' unknown key"):
        load_experiment(config, ["folds=3"])  # one meaning of --set: dotted from the top level
    with pytest.raises(ConfigError, match=r"'ensembel' unknown key"):
        load_experiment(config, ["ensembel.folds=3"])
    (tmp_path / "configs" / "members" / "m1.yaml").write_text("name: m0\nseed: 1\n")
    with pytest.raises(ConfigError, match="share the name 'm0'"):
        load_experiment(config)
    (tmp_path / "configs" / "members" / "m1.yaml").unlink()
    with pytest.raises(ConfigError, match=r"exp.yaml, line 3: member config .*m1.yaml not found"):
        load_experiment(config)


def test_typo_in_top_level_key_is_an_error_in_every_stage(tmp_path, capsys):
    from submission.__main__ import main as submission_main

    config = make_experiment(tmp_path)
    config.write_text(config.read_text().replace("ensemble:", "ensembel:"))
    assert main(["-c", str(config)]) == 2
    assert "'ensembel' unknown key" in capsys.readouterr().err
    assert submission_main(["-c", str(config)]) == 2
    assert "'ensembel' unknown key" in capsys.readouterr().err


def test_overrides_and_defaults(tmp_path):
    config = make_experiment(tmp_path)
    exp = load_experiment(config, ["ensemble.folds=3", "ensemble.calibration=logistic"])
    cfg = exp.ensemble
    assert (cfg.folds, cfg.calibration, cfg.n_boot, cfg.seed) == (3, "logistic", 50, 0)
    assert cfg.methods == METHODS and exp.out_dir == tmp_path / "runs" / "demo" / "ensemble"
    assert load_experiment(config, ["ensemble.methods=[nnls]"]).ensemble.methods == ["mean", "nnls"]


def test_load_members_error_type(tmp_path):
    config = make_experiment(tmp_path)
    (tmp_path / "runs" / "demo" / "m1" / "preds_test.json").unlink()
    with pytest.raises(EnsembleInputError, match="preds_test.json: not found"):
        members_of(config)


def read_scores(path: Path) -> tuple[list[str], np.ndarray]:
    header, *rows = path.read_text().splitlines()
    assert header == "name,score"
    names = [r.split(",")[0] for r in rows]
    assert all(len(r.split(",")[1].split(".")[1]) == 6 for r in rows)  # %.6f
    return names, np.array([float(r.split(",")[1]) for r in rows])


def test_cli_end_to_end(tmp_path):
    make_experiment(tmp_path, relative=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "ensemble", "-c", "configs/exp.yaml", "--set", "ensemble.folds=4"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "runs" / "demo" / "ensemble"
    expected = {"ensemble.json", "preds_val.csv", "preds_test.csv", "report.md", "oof_scatter.png", "weights.png",
                "training_curves.png"}
    assert {p.name for p in out.iterdir()} == expected  # no temp files left

    record = json.loads((out / "ensemble.json").read_text())
    assert set(record["manifest"]["outputs"]) == expected - {"ensemble.json"}
    assert [m["name"] for m in record["members"]] == ["m0", "m1", "m2"]
    assert {k: v for k, v in record["members"][1]["test_meta"].items() if k in meta("m1", 120)} == meta("m1", 120)
    assert record["method"] in METHODS and sum(record["weights"].values()) == pytest.approx(1)
    assert set(record["cv"]) == set(METHODS) and record["reason"]
    assert all(len(v["within_fold_scores"]) == 4 and len(v["oof_main_ci"]) == 2 for v in record["cv"].values())
    assert record["config"]["ensemble"]["folds"] == 4
    assert record["ridge_alpha"] in (0.01, 0.1, 1.0, 10.0)  # chosen by inner CV (not configured)
    assert record["weights"]["m0"] >= record["weights"]["m2"]

    test_names, test_scores = read_scores(out / "preds_test.csv")
    val_names, _ = read_scores(out / "preds_val.csv")
    assert test_names == sorted(test_names) and len(test_names) == 120 and np.all(np.isfinite(test_scores))
    assert val_names == sorted(val_names) and val_names[0] == "V000_10_00.bmp"
    report = (out / "report.md").read_text()
    # named for what it is (issue 17): the members' best.pth were chosen on these validation images
    assert done.stdout.strip().splitlines()[-1].startswith(
        f"validation estimate (optimistic: the members' checkpoints were chosen on this split): {record['method']}: ")
    assert "This is a validation estimate (optimistic: the members' checkpoints were chosen on this split)" in report
    assert "the estimate of the leaderboard score" not in report
    for row in [f"| member m{j} |" for j in range(3)] + [f"| method {m} |" for m in METHODS]:
        assert row in report
    assert "oof_scatter.png" in report and "weights.png" in report and "training_curves.png" in report
    for png in ("oof_scatter.png", "weights.png", "training_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_help():
    done = subprocess.run([sys.executable, "-m", "ensemble", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "--set" in done.stdout and "grouped by reference" in done.stdout


def test_cli_calibration_keeps_test_order(tmp_path):
    config = make_experiment(tmp_path)
    plain, calibrated = tmp_path / "plain", tmp_path / "calibrated"
    assert main(["-c", str(config), "--set", f"ensemble.out_dir={plain}", "--set", "ensemble.methods=[mean,nnls]"]) == 0
    assert main(["-c", str(config), "--set", f"ensemble.out_dir={calibrated}", "--set",
                 "ensemble.methods=[mean,nnls]", "--set", "ensemble.calibration=isotonic"]) == 0
    _, before = read_scores(plain / "preds_test.csv")
    _, after = read_scores(calibrated / "preds_test.csv")
    assert np.array_equal(np.argsort(before, kind="stable"), np.argsort(after, kind="stable"))
    assert 1200 < after.mean() < 1700  # on the MOS scale now
    assert json.loads((calibrated / "ensemble.json").read_text())["calibration"]["kind"] == "isotonic"


def test_training_curves_from_member_logs(tmp_path):
    from members.contract.stagefiles import read_training_curves

    log = tmp_path / "log.csv"
    log.write_text("step,epoch,lr,loss,srcc,plcc,krcc,main\n1,0,1e-4,0.5,,,,\n2,0,1e-4,0.3,,,,\n2,0,,,0.1,0.2,0.1,0.3\n"
                   "3,1,1e-4,0.2,,,,\n4,1,1e-4,0.1,,,,\n4,1,,,0.5,0.6,0.4,1.1\n5,2,1e-4,0.0")  # torn last line
    curves = read_training_curves(tmp_path)
    assert curves["epoch"] == [1, 2, 3] and curves["val_main"][:2] == [0.3, 1.1] and np.isnan(curves["val_main"][2])
    assert np.allclose(curves["train_loss"], [0.4, 0.15, 0.0])
    assert read_training_curves(tmp_path / "nowhere") is None
