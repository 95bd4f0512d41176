"""Pseudo-labels from a fitted ensemble (members.launch.pseudo_label): generated pairs scored by the teacher
and mapped onto the training labels' scale; the label folder verified like a stage file; held-out inputs
refused unless allowed; a kill -9 resumed to the same table."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_scorer import fitted  # noqa: F401  (the fitted two-member ensemble on the session's tiny data)

from ensemble.__main__ import main as ensemble_main
from members import Scorer
from members.contract.data_config import DataError
from members.contract.pseudo import LABELS, MANIFEST
from members.contract.schema import load_experiment
from members.contract.stagefiles import StageFileError, read_labels, read_preds, seal_holds
from members.data.pseudo import read_pseudo_labels
from members.data.splits import read_split
from members.launch.pseudo_label import main as pseudo_main

REPO = Path(__file__).resolve().parents[1]
GENERATE = ["--source", "generate", "--levels", "1", "--per-ref", "2", "--chunk", "3"]


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def _verify(folder: Path, exp) -> object:
    """What a member of `exp`'s split lists does at its start."""
    splits = {s: read_split(exp.split_dir / f"{s}.csv") for s in ("train", "val", "test", "valid")}
    return read_pseudo_labels(str(folder), 0.5, splits, exp.split_dir, 32, False)


@pytest.fixture(scope="module")
def labelled(fitted, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("pseudo") / "labels"
    assert pseudo_main(["-c", str(fitted), *GENERATE, "--out", str(out)]) == 0
    return out


def test_generated_pairs_are_labelled_by_the_teacher_on_the_mos_scale(fitted, labelled, capsys):  # noqa: F811
    exp = load_experiment(fitted)
    manifest = _read(labelled / MANIFEST)
    assert seal_holds(manifest) and manifest["allow_test_inputs"] is False
    train_refs = {p.ref_id for p in read_split(exp.split_dir / "train.csv")}
    table = read_split(labelled / LABELS)
    assert manifest["counts"] == {"pairs": 2 * len(train_refs), "generated": 2 * len(train_refs), "training": 0,
                                  "test_inputs": 0, "outside": 0}
    assert {p.ref_id for p in table} == train_refs  # training references only
    assert all(p.dis.parent == labelled / "images" and p.dis.is_file() for p in table)
    assert manifest["images"][str(table[0].dis)] and len(manifest["images"]) == len(table) + len(train_refs)
    # the teacher's scores are the ensemble's (Scorer.from_ensemble), the labels its line onto the val MOS
    teacher = Scorer.from_ensemble(exp.runs_dir).score_pairs([(p.dis, p.ref) for p in table])
    rows = {r.split(",")[0]: r.split(",") for r in (labelled / LABELS).read_text().splitlines()[1:]}
    written = np.array([float(rows[p.name][6]) for p in table])
    assert np.abs(written - teacher).max() <= 1e-9 and np.ptp(teacher) > 1e-3
    rule = manifest["label_scale"]
    assert rule["rule"] == "linear" and rule["slope"] > 0
    assert np.allclose([p.mos for p in table], rule["intercept"] + rule["slope"] * written, rtol=0, atol=1e-9)
    val = read_labels(exp.members[0].out / "labels_val.csv")
    mos = [m for _, m in val.values()]
    assert min(mos) - 200 < np.mean([p.mos for p in table]) < max(mos) + 200  # on the MOS scale, not z-scores
    # the same command again: nothing to score
    capsys.readouterr()
    assert pseudo_main(["-c", str(fitted), *GENERATE, "--out", str(labelled)]) == 0
    assert "up to date" in capsys.readouterr().out


def test_the_label_folder_is_verified_like_a_stage_file(fitted, labelled, tmp_path):  # noqa: F811
    exp = load_experiment(fitted)
    good = _verify(labelled, exp)
    assert len(good.pairs) == _read(labelled / MANIFEST)["counts"]["pairs"]
    assert good.summary["manifest_sha256"] and good.summary["allow_test_inputs"] is False

    edited = tmp_path / "edited"
    shutil.copytree(labelled, edited)
    lines = (edited / LABELS).read_text().splitlines()
    fields = lines[1].split(",")
    fields[4] = str(float(fields[4]) + 50)  # a label edited by hand
    (edited / LABELS).write_text("\n".join([lines[0], ",".join(fields), *lines[2:]]) + "\n")
    with pytest.raises(StageFileError, match=rf"{LABELS}: changed since {MANIFEST} was written.*pseudo_label"):
        _verify(edited, exp)

    other = tmp_path / "other_teacher"
    shutil.copytree(labelled, other)
    record = _read(other / MANIFEST)
    record["teacher"]["ensemble_sha256"] = "0" * 64  # claims another ensemble
    (other / MANIFEST).write_text(json.dumps(record))
    with pytest.raises(StageFileError, match=rf"{MANIFEST}: edited since it was written.*members.launch.pseudo_label"):
        _verify(other, exp)

    image = good.pairs[0].dis  # one pixel of a generated image changed after the labels were made
    backup = image.read_bytes()
    data = bytearray(backup)
    data[len(data) // 2] ^= 0xFF
    try:
        image.write_bytes(bytes(data))
        with pytest.raises(StageFileError, match=rf"{image}: changed since the pseudo-labels were made.*"
                                                 r"rebuild the pseudo-labels with .*members.launch.pseudo_label"):
            _verify(labelled, exp)
    finally:
        image.write_bytes(backup)
    assert len(_verify(labelled, exp).pairs) == len(good.pairs)


def test_another_teacher_is_never_mixed_in(fitted, labelled, tmp_path, capsys):  # noqa: F811
    """A teacher refitted (here with a calibration) labels everything again, and its calibration is the rule."""
    out = tmp_path / "labels"
    shutil.copytree(labelled, out)
    other = tmp_path / "ensemble_logistic"
    sets = ["--set", f"ensemble.out_dir={other}", "--set", "ensemble.calibration=logistic"]
    assert ensemble_main(["-c", str(fitted), *sets]) == 0
    capsys.readouterr()
    assert pseudo_main(["-c", str(fitted), *GENERATE, "--out", str(out), *sets]) == 0
    assert "up to date" not in capsys.readouterr().out
    manifest = _read(out / MANIFEST)
    assert manifest["teacher"]["ensemble_json"] == str(other / "ensemble.json")
    assert manifest["label_scale"]["rule"] == "calibration" and manifest["label_scale"]["calibration"] == "logistic"
    assert manifest["scoring"]["pairs_scored_this_run"] == manifest["counts"]["pairs"]  # nothing reused
    assert manifest["scoring"]["plan"] != _read(labelled / MANIFEST)["scoring"]["plan"]


def _pairs_csv(path: Path, pairs: list[tuple[Path, Path]]) -> Path:
    path.write_text("dis,ref\n" + "".join(f"{d},{r}\n" for d, r in pairs))
    return path


def test_held_out_inputs_are_refused_unless_allowed_and_the_flag_is_recorded(fitted, tmp_path, capsys):  # noqa: F811
    exp = load_experiment(fitted)
    test = read_split(exp.split_dir / "test.csv")[:2]
    val = read_split(exp.split_dir / "val.csv")[0]
    train = read_split(exp.split_dir / "train.csv")[0]
    copied = tmp_path / "copy_of_a_test_image.bmp"
    shutil.copy(test[1].dis, copied)  # another path, the same content
    pairs = _pairs_csv(tmp_path / "pairs.csv", [(test[0].dis, test[0].ref), (copied, train.ref), (train.dis, train.ref)])
    out = tmp_path / "out"
    capsys.readouterr()
    assert pseudo_main(["-c", str(fitted), "--source", str(pairs), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "2 pair(s) refused" in err
    assert f"pair {test[0].name} ({pairs} pair 1): its reference {test[0].ref} is a test-split image (listed there)" in err
    assert (f"pair {copied.name} ({pairs} pair 2): its distorted image {copied} is a test-split image (same content as "
            "an image listed there)") in err
    assert "only with --allow-test-inputs" in err and not (out / MANIFEST).exists()

    with_val = _pairs_csv(tmp_path / "with_val.csv", [(test[0].dis, test[0].ref), (val.dis, val.ref)])
    assert pseudo_main(["-c", str(fitted), "--source", str(with_val), "--out", str(out), "--allow-test-inputs"]) == 2
    err = capsys.readouterr().err
    assert "1 pair(s) refused" in err and f"pair {val.name} ({with_val} pair 2): its reference {val.ref} is a val-split" in err
    assert "the validation split is never pseudo-labelled" in err

    assert pseudo_main(["-c", str(fitted), "--source", str(pairs), "--out", str(out), "--allow-test-inputs"]) == 0
    manifest = _read(out / MANIFEST)
    assert manifest["allow_test_inputs"] is True
    assert manifest["counts"] == {"pairs": 3, "generated": 0, "training": 1, "test_inputs": 2, "outside": 0}
    assert manifest["test_inputs"] == sorted([test[0].name, copied.name])
    # a member refuses them too, unless the labels were made with the flag (recorded in the sealed manifest)
    assert _verify(out, exp).summary["allow_test_inputs"] is True
    record = _read(out / MANIFEST)
    record["allow_test_inputs"] = False
    (out / MANIFEST).write_text(json.dumps(record))
    with pytest.raises(StageFileError, match="edited since it was written"):
        _verify(out, exp)
    assert pseudo_main(["-c", str(fitted), "--source", str(pairs), "--out", str(out), "--skip-refused"]) == 0
    manifest = _read(out / MANIFEST)
    assert manifest["allow_test_inputs"] is False and manifest["counts"]["pairs"] == 1


def _run(out: Path, fitted_path: Path) -> subprocess.Popen:  # noqa: F811
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    args = ["-c", str(fitted_path), "--source", "generate", "--levels", "0,1,2,3", "--chunk", "2",
            "--out", str(out)]
    return subprocess.Popen([sys.executable, "-m", "members.launch.pseudo_label", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_killed_run_resumes_to_the_same_table(fitted, tmp_path):  # noqa: F811
    straight = tmp_path / "straight"
    proc = _run(straight, fitted)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]

    killed = tmp_path / "killed"
    proc = _run(killed, fitted)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        chunks = list(killed.glob(".chunks-*/*.csv"))
        if len(chunks) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(killed.glob(".chunks-*/*.csv")))
    assert done >= 2 and not (killed / MANIFEST).exists()
    host = socket.gethostname().replace(".", "_")
    (killed / f".{LABELS}.{host}-99999999.tmp").write_text("torn")  # litter of another killed writer of this host
    proc = _run(killed, fitted)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    same_folder = (straight / LABELS).read_text().replace(str(straight), str(killed))  # the images' paths
    assert (killed / LABELS).read_text() == same_folder and same_folder != (straight / LABELS).read_text()
    resumed, whole = _read(killed / MANIFEST), _read(straight / MANIFEST)
    assert resumed["scoring"]["pairs_scored_this_run"] <= whole["counts"]["pairs"] - 2 * done
    assert sorted(resumed["images"].values()) == sorted(whole["images"].values())
    assert resumed["label_scale"] == whole["label_scale"]
    assert not list(killed.glob(".chunks-*")) and not list(killed.rglob("*.tmp"))  # no litter left


def test_bad_inputs_are_one_line_before_any_scoring(fitted, tmp_path, capsys):  # noqa: F811
    capsys.readouterr()
    assert pseudo_main(["-c", str(fitted), "--source", str(tmp_path / "nope.csv")]) == 2
    assert "nope.csv: not found" in capsys.readouterr().err
    assert pseudo_main(["-c", str(fitted), "--source", "generate", "--families", "blur"]) == 2
    assert "--families blur: choose from gaussian_blur_sigma" in capsys.readouterr().err
    assert pseudo_main(["-c", str(fitted), "--source", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "needs --ref-dir" in capsys.readouterr().err
    with pytest.raises(DataError, match="not found; make the pseudo-labels with make pseudo-label"):
        _verify(tmp_path / "missing", load_experiment(fitted))


def test_continuous_generation_makes_per_ref_images_at_drawn_strengths(tmp_path):
    """--continuous: per_ref images per reference (more than the 28 fixed ones), the families in turn, each
    strength between the chosen levels' values; the same settings make the same bytes, another seed other draws."""
    from members.data.demo_data import DISTORTIONS, build
    from members.data.index import Pair
    from members.data.pseudo_generate import GenerateConfig, generate, plan, strength
    from PIL import Image

    assert strength((0.6, 1.0, 1.6, 2.6), 1.5) == pytest.approx(1.3) and strength((50, 30, 15, 6), 3) == 6
    assert strength((0.6, 1.0, 1.6, 2.6), 2.75) == pytest.approx(2.35)
    with pytest.raises(ValueError, match="--per-ref"):
        GenerateConfig(continuous=True)
    build(tmp_path / "data", size=40, seed=1)
    refs = [Pair(f"{r}.bmp", tmp_path / "data" / "Train_Ref" / f"{r}.bmp", tmp_path / "data" / "Train_Ref" / f"{r}.bmp",
                 r, None, "") for r in ("A0001", "A0002")]
    cfg = GenerateConfig(levels=(1, 3), per_ref=30, seed=3, continuous=True)
    items = plan(refs, cfg, tmp_path / "out")
    assert len(items) == 60 and len({p.name for p, _, _ in items}) == 60
    assert [f for _, f, _ in items[:8]] == [0, 1, 2, 3, 4, 5, 6, 0]
    positions = [pos for _, _, pos in items]
    assert all(1 <= pos <= 3 for pos in positions) and len(set(positions)) == 60
    made = generate(refs, cfg, tmp_path / "out")
    first = {p.name: p.dis.read_bytes() for p in made}
    assert len(first) == 60
    generate(refs, cfg, tmp_path / "again")
    assert all((tmp_path / "again" / n).read_bytes() == b for n, b in first.items())
    other = [pos for _, _, pos in plan(refs, GenerateConfig(levels=(1, 3), per_ref=30, seed=4, continuous=True), tmp_path)]
    assert other != positions
    # a blur drawn between levels 1 and 3 is softer than level 3's and harsher than level 1's
    (blur, _, pos), = [it for it in items if it[1] == 0 and 1.2 < it[2] < 2.8][:1]
    ref = np.asarray(Image.open(blur.ref), dtype=float)
    def err(level: float) -> float:
        return float(np.abs(DISTORTIONS[0].apply(ref.astype(np.uint8), strength(DISTORTIONS[0].levels, level),
                                                 np.random.default_rng(0)) - ref).mean())
    got = float(np.abs(np.asarray(Image.open(blur.dis), dtype=float) - ref).mean())
    assert err(1) < got < err(3)
