"""Trust, round 2 (issue 17, cases 2 and 5): an ensemble.json resealed after an edit, and a member that
has not finished training. Each gave a wrong result with exit status 0 before it was fixed.

Built without any model: the stage files of tests/test_attacks.py's `_pipeline`, fitted by the real
ensemble stage."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from test_attacks import _pipeline
from test_data import write_img

import ensemble.__main__ as ensemble_cli
from ensemble.combine import CombineError, ensemble_scores
from members.contract.config import dump_yaml
from members.contract.member import MemberConfig
from members.contract.stagefiles import read_preds, sealed_json
from members.engine.score import main as score_main
from members.engine.scorer import Scorer, ScorerError
from submission.__main__ import main as submission_main


def _reseal(path: Path, change) -> None:
    """Edit a stage manifest and recompute its self-hash, as an attacker who read stagefiles.py would."""
    record = json.loads(path.read_text())
    change(record)
    record.pop("self_sha256")
    path.write_text(sealed_json(record))


@pytest.fixture()
def fitted(tmp_path: Path) -> tuple[Path, Path]:
    """(experiment config, runs dir) of two members and the ensemble the real stage fitted on them."""
    config, _ = _pipeline(tmp_path)
    config.write_text(config.read_text().replace("n_boot: 20}", "n_boot: 20, calibration: logistic}"))
    assert ensemble_cli.main(["-c", str(config)]) == 0
    return config, tmp_path / "runs"


def test_the_ensemble_files_reproduce_from_the_record(fitted):
    """The record's weights, standardisation and calibration applied to the members' files give the
    ensemble's preds_test.csv and preds_valid.csv (the check that submission and the Scorer make)."""
    _, runs = fitted
    record = json.loads((runs / "ensemble" / "ensemble.json").read_text())
    assert record["calibration"]["kind"] == "logistic"  # the calibration is part of what is recomputed
    for split in ("test", "valid"):
        members = {m: read_preds(runs / m / f"preds_{split}.csv") for m in ("a", "b")}
        written = read_preds(runs / "ensemble" / f"preds_{split}.csv")
        names = sorted(written)
        got = ensemble_scores(record, {m: np.array([s[n] for n in names]) for m, s in members.items()})
        assert np.abs(got - [written[n] for n in names]).max() <= 5e-7
        assert np.ptp(got) > 1.0  # on the MOS scale: not a comparison of constants


def test_negated_weights_resealed_are_refused(fitted, capsys):
    """Before: with every weight negated and self_sha256 recomputed, `make submit` wrote a VALID zip whose
    readme quoted negative weights, and the Scorer / `members.engine.score --ensemble` gave negated scores, exit 0."""
    config, runs = fitted
    assert submission_main(["-c", str(config)]) == 0  # untouched: passes
    zipped = (runs / "submission.zip").read_bytes()
    _reseal(runs / "ensemble" / "ensemble.json",
            lambda r: r["weights"].update({k: -v for k, v in r["weights"].items()}))
    capsys.readouterr()
    assert submission_main(["-c", str(config)]) == 2
    err = capsys.readouterr().err
    assert "ensemble.json" in err and f"make ensemble EXPERIMENT={config}" in err and len(err.splitlines()) == 1
    assert (runs / "submission.zip").read_bytes() == zipped  # the previous zip is kept
    with pytest.raises(ScorerError, match=r"ensemble.json: .*make ensemble EXPERIMENT="):
        Scorer.from_ensemble(runs)
    write_img(runs / "d.png", 1, 40, 40)
    assert score_main(["--ensemble", str(runs), str(runs / "d.png"), str(runs / "d.png")]) == 2
    err = capsys.readouterr().err
    assert "ensemble.json" in err and "make ensemble EXPERIMENT=" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("phase", ["test", "valid"])
def test_negated_weights_with_their_outputs_resealed_are_refused(fitted, capsys, phase):
    """The whole set made consistent again (negated weights, negated preds files, manifest resealed):
    weights outside the methods' contract (non-negative, summing to 1) are refused all the same."""
    config, runs = fitted
    folder = runs / "ensemble"
    for split in ("val", "test", "valid"):
        path = folder / f"preds_{split}.csv"
        path.write_text("name,score\n" + "".join(f"{n},{-s:.6f}\n" for n, s in sorted(read_preds(path).items())))

    def negate(record: dict) -> None:
        record["weights"] = {k: -v for k, v in record["weights"].items()}
        b1, b2, b3, b4 = record["calibration"]["params"]
        record["calibration"]["params"] = [-b1, -b2, -b3, -b4]  # maps -x to minus what it mapped x to
        record["manifest"]["outputs"] = {n: hashlib.sha256((folder / n).read_bytes()).hexdigest()
                                         for n in record["manifest"]["outputs"]}
    _reseal(folder / "ensemble.json", negate)
    assert submission_main(["-c", str(config), "--phase", phase]) == 2
    err = capsys.readouterr().err
    assert "'weights." in err and "non-negative" in err and "make ensemble EXPERIMENT=" in err
    with pytest.raises(ScorerError, match="non-negative"):
        Scorer.from_ensemble(runs)


def test_a_record_that_disagrees_with_one_score_is_refused(fitted, capsys):
    """A single ensemble score moved beyond the files' rounding (file and manifest resealed) is found."""
    config, runs = fitted
    folder = runs / "ensemble"
    path = folder / "preds_test.csv"
    scores = read_preds(path)
    name = sorted(scores)[3]
    scores[name] += 2e-6
    path.write_text("name,score\n" + "".join(f"{n},{s:.6f}\n" for n, s in sorted(scores.items())))
    _reseal(folder / "ensemble.json", lambda r: r["manifest"]["outputs"].update(
        {"preds_test.csv": hashlib.sha256(path.read_bytes()).hexdigest()}))
    assert submission_main(["-c", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"1 of {len(scores)}" in err and name in err and "preds_test.csv" in err


def test_the_combination_refuses_a_malformed_record():
    record = {"method": "mean", "weights": {"a": 0.5, "b": 0.5}, "calibration": {"kind": "none"},
              "standardisation": {"a": {"mean": 0.0, "std": 1.0}, "b": {"mean": 1.0, "std": 2.0}}}
    scores = {"a": np.array([0.0, 1.0]), "b": np.array([1.0, 5.0])}
    assert ensemble_scores(record, scores).tolist() == [0.0, 1.5]
    for change, fragment in (({"method": "median"}, "'method'"),
                             ({"weights": {"a": 0.5}}, "'weights'"),
                             ({"weights": {"a": 1.5, "b": -0.5}}, "'weights.b'"),
                             ({"weights": {"a": float("nan"), "b": 0.5}}, "'weights.a'"),
                             ({"standardisation": {"a": {"mean": 0.0, "std": 0.0}, "b": {"mean": 0, "std": 1}}},
                              "'standardisation.a.std'"),
                             ({"calibration": {"kind": "logistic", "params": [0.0, 1.0, 0.0, 1.0]}}, "decreasing"),
                             ({"method": "rank_mean"}, "'rank_reference'")):
        with pytest.raises(CombineError, match=fragment):
            ensemble_scores({**record, **change}, scores)


# --------------------------------------------------------------------- a member that has not finished

def _half_trained(tmp_path: Path) -> Path:
    """A member folder as a killed training run leaves it: config.yaml and best.pth, no done.json."""
    cfg = MemberConfig(name="m", output_dir=str(tmp_path / "m"), split_dir=str(tmp_path / "splits"))
    cfg.out.mkdir(parents=True)
    dump_yaml(cfg, cfg.out / "config.yaml")
    (cfg.out / "best.pth").write_bytes(b"heads of epoch 1 of 8")
    return cfg.out


def test_an_unfinished_member_is_refused_unless_allowed(tmp_path, capsys, monkeypatch):
    """Before: Scorer.from_member and `members.engine.score --member` scored a half-trained folder silently."""
    folder = _half_trained(tmp_path)
    with pytest.raises(ScorerError, match=r"has not finished training \(no done.json\).*make train-members"):
        Scorer.from_member(folder)
    write_img(tmp_path / "d.png", 1, 40, 40)
    assert score_main(["--member", str(folder), str(tmp_path / "d.png"), str(tmp_path / "d.png")]) == 2
    err = capsys.readouterr().err
    assert "has not finished training" in err and "--allow-unfinished" in err and len(err.splitlines()) == 1

    built = []
    monkeypatch.setattr(Scorer, "__init__", lambda self, members, **kw: built.append(members))
    Scorer.from_member(folder, allow_unfinished=True)
    assert built and built[-1][0][1] == str(folder / "best.pth")
    assert "warning:" in capsys.readouterr().err
    (folder / "done.json").write_text("{}")
    Scorer.from_member(folder)  # finished: no flag, no warning
    assert capsys.readouterr().err == ""
