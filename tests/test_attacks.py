"""A hostile user's attempts on the stage files, the experiment schema and the scorer: each one gave a
wrong result with exit status 0, a traceback or a misleading message before it was fixed.

The fixtures are built without any model: stage files written through `members.contract.stagefiles` as the
stages write them, on tiny generated PIPAL trees."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from test_data import make_pipal, write_img
from test_ensemble_cli import make_experiment
from test_submission import TWO, _meta, make_runs

import ensemble.__main__ as ensemble_cli
from ensemble.io import EnsembleInputError, load_members
from members.contract.config import ConfigError, dump_yaml
from members.contract.member import (MemberConfig, StaleMemberError, check_member_folder,
                                     prediction_fingerprint)
from members.contract.schema import load_experiment
from members.contract.stagefiles import read_member_meta, sha256_file, write_member_split, write_stage_outputs
from members.contract.verify import made_from
from members.data.splits import DataConfig, prepare_splits, read_split
from members.engine.inputs import as_image
from members.engine.score import main as score_main
from members.engine.score import read_pairs_csv
from members.engine.scorer import Scorer, ScorerError
from submission.__main__ import main as submission_main


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


# ------------------------------------------------------------------- stage manifests edited by hand

def test_ensemble_json_edited_by_hand_is_refused(tmp_path, capsys):
    """Before: the zip was VALID with exit 0 while its readme said 'weights a=1, b=0' and output.txt held
    the scores of the fitted weights; the scorer applied the edited weights."""
    runs, _, config = make_runs(tmp_path, [_meta(*m) for m in TWO])
    _edit_json(runs / "ensemble" / "ensemble.json", lambda d: d["weights"].update(a=1.0, b=0.0))
    assert submission_main(["-c", str(config)]) == 2
    err = capsys.readouterr().err
    assert "ensemble.json: edited since it was written" in err and "make ensemble" in err
    assert not (runs / "submission.zip").exists()
    with pytest.raises(ScorerError, match="ensemble.json: edited since it was written"):
        Scorer.from_ensemble(runs)


def test_member_json_edited_by_hand_is_refused(tmp_path):
    """Before: a hand-edited preds_test.json (seconds per image, device) went into the readme."""
    config = make_experiment(tmp_path)
    path = tmp_path / "runs" / "demo" / "m1" / "preds_test.json"
    read_member_meta(path.parent, "test")  # as written: fine
    _edit_json(path, lambda d: d.update(seconds_per_image=1e-6, device="cuda"))
    with pytest.raises(EnsembleInputError, match=r"m1/preds_test.json: edited since it was written"):
        load_members(load_experiment(config))


# ------------------------------------------------------------------------ split lists and member folders

def test_a_split_list_edited_by_hand_is_rewritten_from_the_data(tmp_path):
    """Before: prepare_splits kept a hand-edited list (its content fingerprint comes from the data), so the
    members' manifests hashed a list they had not predicted and the submission checked names against it."""
    make_pipal(tmp_path / "pipal")
    cfg = DataConfig(root=str(tmp_path / "pipal"), val_fraction=0.2)
    prepare_splits(cfg, tmp_path / "splits")
    test_list = tmp_path / "splits" / "test.csv"
    original = test_list.read_bytes()
    test_list.write_bytes(b"".join(original.splitlines(keepends=True)[:-1]))  # a row removed
    prepare_splits(cfg, tmp_path / "splits")
    assert test_list.read_bytes() == original


def test_a_member_folder_with_heads_but_no_record_is_stale(tmp_path):
    """Before: without fingerprint.json a folder counted as 'nothing trained here yet', so heads copied in
    from another run (or with the record deleted) were used as this member's."""
    cfg = MemberConfig(name="m", output_dir=str(tmp_path / "m"), split_dir=str(tmp_path / "splits"))
    cfg.out.mkdir()
    (cfg.out / "config.yaml").write_text("name: m\n")  # a run killed before its first step: fine
    check_member_folder(cfg)
    (cfg.out / "best.pth").write_bytes(b"heads of another run")
    (cfg.out / "done.json").write_text("{}")
    with pytest.raises(StaleMemberError, match=r"holds training \(done.json, best.pth\) but no fingerprint.json"):
        check_member_folder(cfg)


# ----------------------------------------------------------------------------------- experiment schema

def _experiment(tmp_path: Path, names: list[str], extra: str = "") -> Path:
    for name in names:
        (tmp_path / f"{name}.yaml").write_text(f"name: {name}\n")
    config = tmp_path / "exp.yaml"
    config.write_text(f"name: t\nruns_dir: {tmp_path / 'runs'}\nmembers: {json.dumps([f'{n}.yaml' for n in names])}\n"
                      + extra)
    return config


@pytest.mark.parametrize("name", ["ensemble", "splits"])
def test_a_member_cannot_share_a_stage_folder(tmp_path, name):
    """Before: a member named 'ensemble' (or ensemble.out_dir set to a member's folder) made the ensemble
    write its preds_val.csv / preds_test.csv over the member's, exit 0."""
    with pytest.raises(ConfigError, match=rf"member name '{name}' makes its folder"):
        load_experiment(_experiment(tmp_path, ["a", name]))


def test_ensemble_out_dir_cannot_be_a_member_or_split_folder(tmp_path):
    config = _experiment(tmp_path, ["a", "b"])
    with pytest.raises(ConfigError, match="member name 'b' makes its folder .* the ensemble's folder"):
        load_experiment(config, [f"ensemble.out_dir={tmp_path / 'runs' / 'b'}"])
    with pytest.raises(ConfigError, match="is the split lists' folder"):
        load_experiment(config, [f"ensemble.out_dir={tmp_path / 'runs' / 'splits'}"])


def test_schema_messages(tmp_path):
    """Before: a negative ensemble seed failed after the fit with numpy's 'expected non-negative integer';
    a config that is not UTF-8 raised a bare codec error naming no file; an override's 'line' read
    'line --set members=...'."""
    config = _experiment(tmp_path, ["a"])
    with pytest.raises(ConfigError, match=r"'ensemble': seed must be >= 0, got -1"):
        load_experiment(config, ["ensemble.seed=-1"])
    override = r"exp.yaml \(--set members=\[nope.yaml\]\): member config .*nope.yaml not found"
    with pytest.raises(ConfigError, match=override):
        load_experiment(config, ["members=[nope.yaml]"])
    (tmp_path / "a.yaml").write_bytes(b"name: \xe9t\xe9\n")  # latin-1
    with pytest.raises(ConfigError, match=r"a.yaml \(or a file its 'base:' names\): not UTF-8 text"):
        load_experiment(config)
    config.write_bytes(b"\xff\xfename: t\n")
    with pytest.raises(ConfigError, match=r"exp.yaml: not UTF-8 text"):
        load_experiment(config)


def test_submission_out_must_be_a_zip(tmp_path, capsys):
    """Before: `--set submission.out=exp.yaml` replaced the experiment file (or a stage file) with the
    zip and reported VALID; a folder named like a zip ended in a traceback."""
    runs, _, config = make_runs(tmp_path, [_meta(*m) for m in TWO])
    before = config.read_bytes()
    assert submission_main(["-c", str(config), "--set", f"submission.out={config}"]) == 2
    assert "'out' must be the path of a .zip file" in capsys.readouterr().err
    assert config.read_bytes() == before
    (tmp_path / "sub.zip").mkdir()
    assert submission_main(["-c", str(config), "--set", f"submission.out={tmp_path / 'sub.zip'}"]) == 2
    assert "sub.zip: is a folder" in capsys.readouterr().err


# ---------------------------------------------------------------------- data changed after the members

def _pipeline(tmp_path: Path) -> tuple[Path, Path]:
    """Split lists from a generated PIPAL tree and two members' stage files made from them (no model):
    what the ensemble and submission stages read. Returns (experiment config, data root)."""
    data = tmp_path / "pipal"
    make_pipal(data, n_refs=16, per_ref=4)
    for name in ("a", "b"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({"name": name, "data": {"root": str(data),
                                                                                       "val_fraction": 0.5}}))
    config = tmp_path / "exp.yaml"
    config.write_text(f"name: t\nruns_dir: {tmp_path / 'runs'}\nmembers: [a.yaml, b.yaml]\n"
                      "ensemble: {folds: 3, n_boot: 20}\n")
    exp = load_experiment(config)
    prepare_splits(exp.members[0].config.data, exp.split_dir)
    rng = np.random.default_rng(0)
    for m in exp.members:
        m.out.mkdir(parents=True)
        for split in ("val", "test", "valid"):
            pairs = read_split(exp.split_dir / f"{split}.csv")
            rows = [(p.name, (p.mos or 1000.0) / 100 + float(rng.normal(0, 0.05))) for p in pairs]
            labels = [(p.name, p.ref_id, p.mos) for p in pairs] if split == "val" else None
            meta = {**_meta(m.name, 0.1, "cpu", False), "split": split,
                    **made_from(exp.split_dir, split, prediction_fingerprint(m.config), None)}
            write_member_split(m.out, split, rows, labels, meta)
    return config, data


def test_a_label_fixed_after_the_members_is_not_used_stale(tmp_path, capsys):
    """Before: after a MOS was fixed in the data, `python -m ensemble` fitted on the old MOS and
    `python -m submission` zipped its scores, both with exit 0 (nothing compared the lists with the data)."""
    config, data = _pipeline(tmp_path)
    assert ensemble_cli.main(["-c", str(config)]) == 0
    assert submission_main(["-c", str(config)]) == 0
    label = data / "Train_Label" / "A0001.txt"
    label.write_text(label.read_text().replace(",1010.25", ",1500.0"))
    assert submission_main(["-c", str(config)]) == 2
    assert "changed since these split lists were written" in capsys.readouterr().err
    assert ensemble_cli.main(["-c", str(config)]) == 2
    err = capsys.readouterr().err
    assert "changed since these split lists were written" in err and "make train-members" in err


def test_an_unwritable_ensemble_folder_fails_before_the_fit(tmp_path, capsys, monkeypatch):
    """Before: the fit ran, then the write failed on the output folder."""
    config = make_experiment(tmp_path)
    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(ensemble_cli, "run_ensemble", lambda *a, **k: pytest.fail("the fit ran"))
    assert ensemble_cli.main(["-c", str(config), "--set", f"ensemble.out_dir={tmp_path / 'afile' / 'ens'}"]) == 2
    assert "afile is a file, not a folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- the scorer

def _fitted_member(tmp_path: Path, views: str = "center") -> tuple[Path, MemberConfig]:
    """A runs dir with one member (config.yaml, heads, preds_test.json) and an ensemble.json over it."""
    runs = tmp_path / "runs"
    cfg = MemberConfig(name="m", output_dir=str(runs / "m"), split_dir=str(runs / "splits"))
    cfg.predict.views.kind = views
    cfg.out.mkdir(parents=True)
    dump_yaml(cfg, cfg.out / "config.yaml")
    (cfg.out / "best.pth").write_bytes(b"heads")
    meta = {**_meta("m", 0.1, "cpu", False), "checkpoint_sha256": sha256_file(cfg.out / "best.pth"),
            "prediction_fingerprint": prediction_fingerprint(cfg)}
    write_member_split(cfg.out, "test", [("a.bmp", 0.1), ("b.bmp", 0.2)], None, meta)
    record = {"members": [{"name": "m", "dir": str(cfg.out)}], "method": "mean", "weights": {"m": 1.0},
              "standardisation": {"m": {"mean": 0.0, "std": 1.0}}, "calibration": {"kind": "none"},
              "manifest": {"experiment": None, "inputs": {"members": {"m": {
                  "preds_test.json": sha256_file(cfg.out / "preds_test.json")}}}}}
    write_stage_outputs(runs / "ensemble", {"preds_test.csv": "name,score\na.bmp,0.1\nb.bmp,0.2\n"},
                        "ensemble.json", record)
    return runs, cfg


def test_the_scorer_uses_the_config_the_predictions_were_made_with(tmp_path, monkeypatch):
    """Before: a member's config.yaml with other views (edited, or older than a re-prediction) was used
    as it was, so the ensemble scorer's scores differed from preds_test.csv, exit 0."""
    built = []
    monkeypatch.setattr(Scorer, "__init__", lambda self, members, **kw: built.append(members))
    runs, cfg = _fitted_member(tmp_path)
    Scorer.from_ensemble(runs)
    assert built[-1][0][0].predict.views.kind == "center"
    path = cfg.out / "config.yaml"
    path.write_text(path.read_text().replace("kind: center", "kind: five"))
    with pytest.raises(ScorerError, match=r"config.yaml: not the config .*preds_test.json was predicted with"):
        Scorer.from_ensemble(runs)


def test_the_scorer_checks_its_device_and_images_first(tmp_path):
    """Before: `--device tpu` (or cuda without a GPU) ended in a torch traceback; an unreadable image was
    reported as having 'passed the check when the run started', a check the scorer never made."""
    with pytest.raises(ScorerError, match="device 'tpu': expected cpu, cuda or cuda:N"):
        Scorer([], device="tpu")
    if not __import__("torch").cuda.is_available():
        with pytest.raises(ScorerError, match="device 'cuda': no such CUDA GPU"):
            Scorer([], device="cuda")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ScorerError) as err:
        as_image(empty, 0, 1, "distorted image 0")
    assert "cannot read" in str(err.value) and "passed the check" not in str(err.value)
    good, ref = tmp_path / "d.png", tmp_path / "r.png"
    write_img(good, 1, 40, 40)
    write_img(ref, 2, 40, 40)
    (tmp_path / "t.png").write_bytes(good.read_bytes()[:100])  # truncated
    scorer = Scorer.__new__(Scorer)  # no model: the check must come before any scoring
    scorer.configs, scorer.groups, scorer.ensemble, scorer.blind = [MemberConfig(name="m")], [], None, False
    scorer.configs[0].model.crop = 32
    with pytest.raises(ScorerError, match=r"pair 2: cannot decode .*t.png"):
        scorer.score_pairs([(good, ref), (tmp_path / "t.png", ref)])
    write_img(tmp_path / "big.png", 3, 48, 48)
    with pytest.raises(ScorerError, match="pair 1: size mismatch"):
        scorer.score_pairs([(tmp_path / "big.png", ref)])


def test_score_cli_pairs_file_and_out(tmp_path, capsys):
    """Before: a properly quoted path with a comma was 'expected dis,ref'; `--out` naming a folder failed
    only after every pair was scored."""
    pairs = tmp_path / "pairs.csv"
    pairs.write_text('dis,ref\n"img/a,b.png",img/r.png\n')
    assert read_pairs_csv(pairs) == [(Path("img/a,b.png"), Path("img/r.png"))]
    with pytest.raises(SystemExit) as exit_:
        score_main(["--member", str(tmp_path / "nope"), "d.png", "r.png", "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "is a folder" in capsys.readouterr().err
    Image.new("RGB", (40, 40)).save(tmp_path / "a,b.png")
    Image.new("RGB", (40, 40)).save(tmp_path / "r.png")
    pairs.write_text(f'"{tmp_path / "a,b.png"}",{tmp_path / "r.png"}\n')
    assert score_main(["--member", str(tmp_path / "nope"), "--pairs", str(pairs)]) == 2
    assert "image name 'a,b.png' cannot be written to a name,score file" in capsys.readouterr().err
