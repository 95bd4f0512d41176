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
from ensemble.config import load_experiment
from ensemble.io import EnsembleInputError, load_members
from members.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
METHODS = ["mean", "rank_mean", "nnls", "ridge", "greedy"]


def meta(name: str, n: int) -> dict:
    return {"member": name, "split": "test", "n_images": n, "n_views": 5, "views": "4 corners + centre",
            "seconds": 1.5, "seconds_per_image": 0.01, "device": "cpu", "pretrained_backbones": True,
            "higher_is_better": True, "model": {"vit": "vit_base_patch8_224", "cnn": "resnet50", "crop": 224}}


def write_csv(path: Path, header: str, rows: list[tuple]) -> None:
    path.write_text(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows), encoding="utf-8")


def make_experiment(root: Path, noise_sds: tuple[float, ...] = (0.3, 0.7, 1.5), n_refs: int = 12,
                    per_ref: int = 10, section: str = "  n_boot: 50\n", relative: bool = False) -> Path:
    """Synthetic members (MOS + noise of the given strengths) under root/runs/demo, their member configs
    and an experiment config; returns the experiment config path."""
    rng = np.random.default_rng(0)
    val = [(f"V{r:03d}_10_{k:02d}.bmp", f"V{r:03d}") for r in range(n_refs) for k in range(per_ref)]
    test = [f"T{r:03d}_10_{k:02d}.bmp" for r in range(n_refs) for k in range(per_ref)]
    mos = 1450 + np.repeat(rng.normal(0, 60, n_refs), per_ref) + rng.normal(0, 100, len(val))
    test_mos = 1450 + rng.normal(0, 110, len(test))
    base = Path() if relative else root
    (root / "configs" / "members").mkdir(parents=True)
    member_paths = []
    for j, sd in enumerate(noise_sds):
        name = f"m{j}"
        d = root / "runs" / "demo" / name
        d.mkdir(parents=True)
        val_scores = (mos - 1450) / 120 + rng.normal(0, sd, len(val))
        test_scores = (test_mos - 1450) / 120 + rng.normal(0, sd, len(test))
        write_csv(d / "preds_val.csv", "name,score", [(n, f"{s:.6f}") for (n, _), s in zip(val, val_scores)])
        write_csv(d / "labels_val.csv", "name,ref,mos", [(n, r, f"{m:.4f}") for (n, r), m in zip(val, mos)])
        write_csv(d / "preds_test.csv", "name,score", [(n, f"{s:.6f}") for n, s in zip(test, test_scores)])
        (d / "preds_test.json").write_text(json.dumps(meta(name, len(test))), encoding="utf-8")
        (root / "configs" / "members" / f"{name}.yaml").write_text(f"name: {name}\nseed: {j}\n")
        member_paths.append(str(base / "configs" / "members" / f"{name}.yaml"))
    config = root / "configs" / "exp.yaml"
    config.write_text(f"name: demo\nruns_dir: {base / 'runs' / 'demo'}\nmembers: {json.dumps(member_paths)}\n"
                      f"ensemble:\n{section}submission:\n  zip: out.zip\n", encoding="utf-8")
    return config


def run_fails(config: Path, capsys: pytest.CaptureFixture, *pieces: str) -> None:
    """The CLI exits with 2, prints every `piece` in its error, and writes nothing."""
    assert main(["-c", str(config)]) == 2
    err = capsys.readouterr().err
    for piece in pieces:
        assert piece in err
    assert not (config.parents[1] / "runs" / "demo" / "ensemble").exists()


def test_load_members_aligns_rows_by_name(tmp_path):
    config = make_experiment(tmp_path)
    path = tmp_path / "runs" / "demo" / "m1" / "preds_test.csv"
    header, *rows = path.read_text().splitlines()
    path.write_text("\n".join([header, *reversed(rows)]) + "\n")  # same rows, reverse order
    exp = load_experiment(config)
    data = load_members(exp.runs_dir, exp.member_names)
    assert data.test_names == sorted(data.test_names) and data.x_test.shape == (120, 3)
    by_name = dict(line.split(",") for line in rows)
    assert np.allclose(data.x_test[:, 1], [float(by_name[n]) for n in data.test_names])
    assert data.members == ["m0", "m1", "m2"] and data.test_meta[0] == meta("m0", 120)


def test_missing_member_file(tmp_path, capsys):
    config = make_experiment(tmp_path)
    missing = tmp_path / "runs" / "demo" / "m1" / "preds_test.csv"
    missing.unlink()
    run_fails(config, capsys, "missing member file", str(missing))


def test_mismatched_names_list_the_differences(tmp_path, capsys):
    config = make_experiment(tmp_path)
    m1_val = tmp_path / "runs" / "demo" / "m1" / "preds_val.csv"
    m1_val.write_text("\n".join(m1_val.read_text().splitlines()[:-1]) + "\n")  # drop the last image
    m2_test = tmp_path / "runs" / "demo" / "m2" / "preds_test.csv"
    m2_test.write_text(m2_test.read_text().replace("T000_10_00.bmp", "T999_10_00.bmp"))
    run_fails(config, capsys, f"{m1_val} vs", "1 name(s) missing (e.g. V011_10_09.bmp)",
              f"{m2_test} vs", "extra name(s) (e.g. T999_10_00.bmp)")


@pytest.mark.parametrize(
    ("file", "edit", "pieces"),
    [
        ("preds_val.csv", lambda t: t.replace(t.splitlines()[3].split(",")[1], "nan", 1), ["line 4", "finite"]),
        ("preds_test.csv", lambda t: t.replace("name,score", "image,score"), ["line 1", "expected header"]),
        ("preds_test.csv", lambda t: t.replace(".bmp,", ".bmp;", 1), ["line 2", "expected 'name,score'"]),
        ("preds_val.csv", lambda t: t.replace(t.splitlines()[5].split(",")[1], "good", 1), ["line 6", "'good'"]),
        ("labels_val.csv", lambda t: t + t.splitlines()[1] + "\n", ["line 122", "repeats line 2"]),
        ("preds_test.json", lambda t: t.replace('"higher_is_better": true', '"hib": 1'), ["higher_is_better"]),
        ("preds_test.json", lambda t: t[:-1], ["invalid JSON"]),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, capsys, file, edit, pieces):
    config = make_experiment(tmp_path)
    path = tmp_path / "runs" / "demo" / "m2" / file
    path.write_text(edit(path.read_text()))
    run_fails(config, capsys, str(path), *pieces)


def test_constant_member(tmp_path, capsys):
    config = make_experiment(tmp_path)
    path = tmp_path / "runs" / "demo" / "m0" / "preds_test.csv"
    header, *rows = path.read_text().splitlines()
    path.write_text("\n".join([header, *(r.split(",")[0] + ",0.500000" for r in rows)]) + "\n")
    run_fails(config, capsys, str(path), "constant member")


def test_labels_must_agree_across_members(tmp_path, capsys):
    config = make_experiment(tmp_path)
    path = tmp_path / "runs" / "demo" / "m2" / "labels_val.csv"
    lines = path.read_text().splitlines()
    name, ref, _ = lines[7].split(",")
    lines[7] = f"{name},{ref},1.0"
    path.write_text("\n".join(lines) + "\n")
    run_fails(config, capsys, str(path), "disagrees with", name)


def test_config_errors(tmp_path):
    config = make_experiment(tmp_path, section="  n_boot: 50\n  fold: 3\n")
    with pytest.raises(ConfigError, match=r"exp.yaml, line 6: 'ensemble.fold' unknown key"):
        load_experiment(config)
    config.write_text(config.read_text().replace("  fold: 3\n", ""))
    with pytest.raises(ConfigError, match="methods \\['blend'\\] invalid"):
        load_experiment(config, ["methods=[blend]"])
    with pytest.raises(ConfigError, match="'ensemble.folds': expected int"):
        load_experiment(config, ["folds=three"])
    (tmp_path / "configs" / "members" / "m1.yaml").write_text("seed: 1\n")
    with pytest.raises(ConfigError, match="m1.yaml: member config needs a 'name:'"):
        load_experiment(config)
    (tmp_path / "configs" / "members" / "m1.yaml").unlink()
    with pytest.raises(ConfigError, match=r"exp.yaml, line 3: member config .*m1.yaml not found"):
        load_experiment(config)


def test_overrides_and_defaults(tmp_path):
    config = make_experiment(tmp_path)
    exp = load_experiment(config, ["folds=3", "ensemble.calibration=logistic"])
    cfg = exp.ensemble
    assert (cfg.folds, cfg.calibration, cfg.n_boot, cfg.seed) == (3, "logistic", 50, 0)
    assert cfg.methods == METHODS and exp.out_dir == tmp_path / "runs" / "demo" / "ensemble"
    assert load_experiment(config, ["methods=[nnls]"]).ensemble.methods == ["mean", "nnls"]


def test_load_members_error_type(tmp_path):
    make_experiment(tmp_path)
    with pytest.raises(EnsembleInputError, match="missing member file"):
        load_members(tmp_path / "runs" / "demo", ["m0", "nobody"])


def read_scores(path: Path) -> tuple[list[str], np.ndarray]:
    header, *rows = path.read_text().splitlines()
    assert header == "name,score"
    names = [r.split(",")[0] for r in rows]
    assert all(len(r.split(",")[1].split(".")[1]) == 6 for r in rows)  # %.6f
    return names, np.array([float(r.split(",")[1]) for r in rows])


def test_cli_end_to_end(tmp_path):
    make_experiment(tmp_path, relative=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "ensemble", "-c", "configs/exp.yaml", "--set", "folds=4"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "runs" / "demo" / "ensemble"
    expected = {"ensemble.json", "preds_val.csv", "preds_test.csv", "report.md", "oof_scatter.png", "weights.png"}
    assert {p.name for p in out.iterdir()} == expected  # no temp files left

    record = json.loads((out / "ensemble.json").read_text())
    assert [m["name"] for m in record["members"]] == ["m0", "m1", "m2"]
    assert record["members"][1]["test_meta"] == meta("m1", 120)
    assert record["method"] in METHODS and sum(record["weights"].values()) == pytest.approx(1)
    assert set(record["cv"]) == set(METHODS) and record["reason"]
    assert all(len(v["fold_main"]) == 4 and len(v["oof_main_ci"]) == 2 for v in record["cv"].values())
    assert record["config"]["ensemble"]["folds"] == 4
    assert record["ridge_alpha"] in (0.01, 0.1, 1.0, 10.0)  # chosen by inner CV (not configured)
    assert record["weights"]["m0"] >= record["weights"]["m2"]

    test_names, test_scores = read_scores(out / "preds_test.csv")
    val_names, _ = read_scores(out / "preds_val.csv")
    assert test_names == sorted(test_names) and len(test_names) == 120 and np.all(np.isfinite(test_scores))
    assert val_names == sorted(val_names) and val_names[0] == "V000_10_00.bmp"
    report = (out / "report.md").read_text()
    for row in [f"| member m{j} |" for j in range(3)] + [f"| method {m} |" for m in METHODS]:
        assert row in report
    assert "oof_scatter.png" in report and "weights.png" in report
    for png in ("oof_scatter.png", "weights.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_help():
    done = subprocess.run([sys.executable, "-m", "ensemble", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "--set" in done.stdout and "grouped by reference" in done.stdout


def test_cli_calibration_keeps_test_order(tmp_path):
    config = make_experiment(tmp_path)
    plain, calibrated = tmp_path / "plain", tmp_path / "calibrated"
    assert main(["-c", str(config), "--set", f"out_dir={plain}", "--set", "methods=[mean,nnls]"]) == 0
    assert main(["-c", str(config), "--set", f"out_dir={calibrated}", "--set", "methods=[mean,nnls]",
                 "--set", "calibration=isotonic"]) == 0
    _, before = read_scores(plain / "preds_test.csv")
    _, after = read_scores(calibrated / "preds_test.csv")
    assert np.array_equal(np.argsort(before, kind="stable"), np.argsort(after, kind="stable"))
    assert 1200 < after.mean() < 1700  # on the MOS scale now
    assert json.loads((calibrated / "ensemble.json").read_text())["calibration"]["kind"] == "isotonic"
