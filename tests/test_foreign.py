"""Members that are not AHIQ: `{name, metric}` and `{name, predictions}` entries of an experiment's
`members:` list, from the experiment file through the members stage, the ensemble and the submission."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from ensemble.__main__ import main as ensemble_main
from members.contract.config import ConfigError
from members.contract.member import prediction_fingerprint
from members.contract.schema import load_experiment
from members.contract.stagefiles import preds_csv, sha256_file, write_member_split
from members.contract.verify import made_from
from members.data import demo_data
from members.data.splits import prepare_splits
from members.engine.foreign import main as foreign_main
from submission.__main__ import main as submission_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("foreign") / "data"
    demo_data.build(root, size=40, seed=1)
    return root


def experiment(tmp: Path, data: Path, ahiq: list[str], foreign: list[dict]) -> Path:
    """An experiment of tiny AHIQ member configs named `ahiq` (one centre view) plus the `foreign` mappings."""
    names = []
    for k, name in enumerate(ahiq):
        member = {"base": str(REPO / "configs/members/tiny.yaml"), "name": name, "seed": k + 1,
                  "model": {"crop": 32}, "data": {"root": str(data)},
                  "predict": {"views": {"kind": "center", "flip": False}}}
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump(member))
        names.append(f"{name}.yaml")
    path = tmp / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": "mixed", "runs_dir": str(tmp / "runs"), "members": names + foreign,
                                    "ensemble": {"folds": 3, "n_boot": 50}}))
    return path


def noisy(pairs: list, noise: float, seed: int) -> list[tuple[str, float]]:
    """MOS plus noise where labelled (a good or weak model), noise alone where not."""
    rng = np.random.default_rng(seed)
    return [(p.name, (p.mos if p.mos is not None else 0.0) + rng.normal(0, noise)) for p in pairs]


def write_fake_ahiq(exp_path: Path, noise: float = 30.0) -> dict[str, list]:
    """The split lists and, for each AHIQ member, the files members.engine.predict writes (with the test
    metadata the submission's readme reads), with MOS + noise scores; returns the split lists."""
    exp = load_experiment(exp_path)
    splits = prepare_splits(exp.members[0].config.data, exp.split_dir)
    for j, m in enumerate(exp.members):
        m.out.mkdir(parents=True, exist_ok=True)
        for split in ("val", "test", "valid"):
            pairs = splits[split]
            labelled = all(p.mos is not None for p in pairs)
            meta = {"member": m.name, "split": split, "n_images": len(pairs), "higher_is_better": True,
                    "n_views": 5, "views": "five crops", "seconds_per_image": 0.01, "device": "cpu",
                    "pretrained_backbones": False, "model": {"vit": "vit_tiny", "cnn": "resnet18", "crop": 32},
                    **made_from(exp.split_dir, split, prediction_fingerprint(m.config), None)}
            write_member_split(m.out, split, noisy(pairs, noise, j),
                               [(p.name, p.ref_id, p.mos) for p in pairs] if labelled else None, meta)
    return splits


def write_predictions_dir(folder: Path, splits: dict[str, list], noise: float, seed: int = 7) -> Path:
    """Another model's `preds_<split>.csv` for val, test and valid, on its own scale."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("val", "test", "valid"):
        rows = [(n, 0.01 * s + 5) for n, s in noisy(splits[split], noise, seed)]
        (folder / f"preds_{split}.csv").write_text(preds_csv(rows))
    return folder


def mixed_experiment(tmp: Path, data: Path) -> tuple[Path, Path]:
    """Two AHIQ members, one `predictions:` member and two metrics (one lower-is-better), member files
    written; returns (experiment file, runs_dir)."""
    foreign = [{"name": "other", "predictions": "other_model"}, {"name": "psnr", "metric": "psnr"},
               {"name": "gmsd", "metric": "gmsd"}]
    (tmp / "other_model").mkdir()  # the loader checks that the folder exists
    exp = experiment(tmp, data, ["a", "b"], foreign)
    splits = write_fake_ahiq(exp)
    write_predictions_dir(tmp / "other_model", splits, noise=60.0)
    assert foreign_main(["-c", str(exp)]) == 0
    return exp, tmp / "runs"


def test_mixed_experiment_goes_through_ensemble_and_submission(data_root, tmp_path, capsys):
    exp, runs = mixed_experiment(tmp_path, data_root)
    for name in ("other", "psnr", "gmsd"):
        for split in ("val", "test", "valid"):
            assert (runs / name / f"preds_{split}.json").is_file(), (name, split)
        assert (runs / name / "labels_val.csv").read_text() == (runs / "a" / "labels_val.csv").read_text()
    gmsd = json.loads((runs / "gmsd" / "preds_val.json").read_text())
    assert gmsd["kind"] == "metric" and gmsd["negated"] is True
    assert all(float(line.split(",")[1]) <= 0 for line in (runs / "gmsd" / "preds_val.csv").read_text().split()[1:])
    capsys.readouterr()
    assert foreign_main(["-c", str(exp)]) == 0  # nothing changed: nothing recomputed
    assert capsys.readouterr().out.count("up to date") == 3

    assert ensemble_main(["-c", str(exp)]) == 0
    record = json.loads((runs / "ensemble" / "ensemble.json").read_text())
    names = ["a", "b", "other", "psnr", "gmsd"]
    assert [m["name"] for m in record["members"]] == names and set(record["weights"]) == set(names)
    assert set(record["manifest"]["inputs"]["members"]) == set(names)
    report = (runs / "ensemble" / "report.md").read_text()
    assert all(f"| {n} |" in report for n in names) and record["reason"] in report
    # gmsd falls as quality rises: negated when written, it ranks the images the right way round
    assert {m["name"]: m["backwards"] for m in record["member_metrics"]}["gmsd"] is False

    assert submission_main(["-c", str(exp)]) == 0
    with zipfile.ZipFile(runs / "submission.zip") as zf:
        readme = zf.read("readme.txt").decode()
    assert "full-reference metric psnr" in readme and "other: predictions of another model" in readme


def test_scorer_refuses_an_ensemble_with_a_predictions_member(data_root, tmp_path):
    from members.engine.inputs import ScorerError
    from members.engine.scorer import Scorer

    exp, runs = mixed_experiment(tmp_path, data_root)
    assert ensemble_main(["-c", str(exp)]) == 0
    with pytest.raises(ScorerError, match="member 'other' is another model's predictions; the Scorer cannot"):
        Scorer.from_ensemble(runs)


def test_scorer_computes_metric_members_as_the_members_stage_did(data_root, tmp_path):
    """An AHIQ member with random heads, psnr and gmsd: the Scorer's ensemble scores of the test images
    equal the ensemble's preds_test.csv."""
    import torch

    from members.contract.config import dump_yaml, to_dict
    from members.contract.stagefiles import read_preds
    from members.data.splits import read_split
    from members.engine.predict import predict_members
    from members.engine.scorer import Scorer
    from members.model.ahiq import build_model
    from members.model.checkpoint import save_heads

    exp_path = experiment(tmp_path, data_root, ["a"], [{"name": "psnr", "metric": "psnr"},
                                                       {"name": "gmsd", "metric": "gmsd"}])
    exp = load_experiment(exp_path)
    cfg = exp.members[0].config
    prepare_splits(cfg.data, exp.split_dir)
    cfg.out.mkdir(parents=True)
    dump_yaml(cfg, cfg.out / "config.yaml")
    torch.manual_seed(0)
    save_heads(build_model(cfg.model), cfg.out / "best.pth", to_dict(cfg.model))
    predict_members([cfg], None, progress=False)
    (cfg.out / "done.json").write_text("{}")
    assert foreign_main(["-c", str(exp_path)]) == 0
    assert ensemble_main(["-c", str(exp_path)]) == 0
    record = json.loads((exp.out_dir / "ensemble.json").read_text())
    assert record["weights"]["psnr"] + record["weights"]["gmsd"] > 0  # the metrics count in the scores below

    pairs = read_split(exp.split_dir / "test.csv")
    want = read_preds(exp.out_dir / "preds_test.csv")
    scorer = Scorer.from_ensemble(exp.runs_dir)
    got = scorer.score_pairs([(p.dis, p.ref) for p in pairs])
    assert np.abs(got - [want[p.name] for p in pairs]).max() <= 1e-5 and np.ptp(got) > 1e-3
    by_path = scorer.score([str(p.dis) for p in pairs[:4]], [str(p.ref) for p in pairs[:4]])
    assert np.abs(by_path - got[:4]).max() <= 1e-5


def test_edited_predictions_are_refused_by_the_ensemble_and_the_submission(data_root, tmp_path, capsys):
    exp, runs = mixed_experiment(tmp_path, data_root)
    assert ensemble_main(["-c", str(exp)]) == 0
    test_file = tmp_path / "other_model" / "preds_test.csv"
    lines = test_file.read_text().splitlines()
    name, score = lines[1].split(",")
    test_file.write_text("\n".join([lines[0], f"{name},{float(score) + 1:.6f}", *lines[2:]]) + "\n")
    capsys.readouterr()
    assert submission_main(["-c", str(exp)]) != 0
    err = capsys.readouterr().err
    assert f"{runs / 'other' / 'preds_test.json'}: made before the files in {tmp_path / 'other_model'} changed" in err
    assert "make train-members" in err and "then make ensemble" in err
    assert "Traceback" not in err and not (runs / "submission.zip").exists()
    assert ensemble_main(["-c", str(exp)]) != 0  # the imported copy is stale too, until the members stage reruns
    assert "made before the files in" in capsys.readouterr().err



def test_small_imported_scores_keep_their_ranking(data_root, tmp_path, capsys):
    """Before: another model's scores at the 1e-9 scale were written with 6 decimals (56 distinct values
    became 1-7 levels), so the ensemble fitted on ties, exit 0. Imported scores are stored exactly now, and
    the ensemble, its recomputation (combine.check_outputs) and the submission agree on them."""
    from ensemble.combine import check_outputs
    from members.contract.metrics import srcc
    from members.contract.stagefiles import read_labels, read_preds

    (tmp_path / "small_model").mkdir()
    exp = experiment(tmp_path, data_root, ["a", "b"], [{"name": "small", "predictions": "small_model"}])
    splits = write_fake_ahiq(exp)
    folder = write_predictions_dir(tmp_path / "small_model", splits, noise=60.0)
    for split in ("val", "test", "valid"):
        path = folder / f"preds_{split}.csv"
        scores = read_preds(path)
        path.write_text("name,score\n" + "".join(f"{n},{(s - 5) * 1e-9!r}\n" for n, s in sorted(scores.items())))
    assert foreign_main(["-c", str(exp)]) == 0
    runs = tmp_path / "runs"
    for split in ("val", "test", "valid"):
        assert read_preds(runs / "small" / f"preds_{split}.csv") == read_preds(folder / f"preds_{split}.csv")
    labels = {n: mos for n, (_, mos) in read_labels(runs / "small" / "labels_val.csv").items()}
    stored, source = read_preds(runs / "small" / "preds_val.csv"), read_preds(folder / "preds_val.csv")
    names = sorted(labels)
    assert len(set(stored.values())) == len(names)  # no ties made by rounding
    assert srcc([stored[n] for n in names], [labels[n] for n in names]) == \
        pytest.approx(srcc([source[n] for n in names], [labels[n] for n in names]), abs=1e-12)

    assert ensemble_main(["-c", str(exp)]) == 0
    record = json.loads((runs / "ensemble" / "ensemble.json").read_text())
    members = {m: read_preds(runs / m / "preds_test.csv") for m in ("a", "b", "small")}
    check_outputs(record, members, read_preds(runs / "ensemble" / "preds_test.csv"), "preds_test.csv")
    assert submission_main(["-c", str(exp)]) == 0


def test_imported_scores_whose_ranking_cannot_be_stored_are_refused(data_root, tmp_path, capsys):
    """Two scores that differ in the file but not as 64-bit floats would tie once read: refused, in one
    line naming the file."""
    (tmp_path / "fine_model").mkdir()
    exp = experiment(tmp_path, data_root, ["a"], [{"name": "fine", "predictions": "fine_model"}])
    splits = write_fake_ahiq(exp)
    folder = write_predictions_dir(tmp_path / "fine_model", splits, noise=60.0)
    lines = (folder / "preds_test.csv").read_text().splitlines()
    first, second = lines[1].split(",")[0], lines[2].split(",")[0]
    lines[1], lines[2] = f"{first},0.30000000000000000001", f"{second},0.30000000000000000002"
    (folder / "preds_test.csv").write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert foreign_main(["-c", str(exp)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {folder / 'preds_test.csv'}") and first in err and "64-bit" in err
    assert not (tmp_path / "runs" / "fine" / "preds_test.json").exists()


@pytest.mark.parametrize("change, message", [("drop", "1 name(s) missing"), ("add", "1 extra name(s)")])
def test_predictions_with_a_missing_or_extra_name_are_refused(data_root, tmp_path, capsys, change, message):
    (tmp_path / "other_model").mkdir()
    exp = experiment(tmp_path, data_root, ["a"], [{"name": "other", "predictions": "other_model"}])
    splits = write_fake_ahiq(exp)
    folder = write_predictions_dir(tmp_path / "other_model", splits, noise=60.0)
    lines = (folder / "preds_val.csv").read_text().splitlines()
    lines = lines[:-1] if change == "drop" else [*lines, "not_in_the_split.bmp,1.0"]
    (folder / "preds_val.csv").write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert foreign_main(["-c", str(exp)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the data check's progress bars
    assert err.startswith("error: ") and message in err
    assert str(folder / "preds_val.csv") in err and str(tmp_path / "runs" / "splits" / "val.csv") in err
    assert not (tmp_path / "runs" / "other" / "preds_val.json").exists()


def test_a_weak_noisy_member_gets_a_small_weight(data_root, tmp_path):
    (tmp_path / "weak_model").mkdir()
    exp = experiment(tmp_path, data_root, ["good"], [{"name": "weak", "predictions": "weak_model"}])
    splits = write_fake_ahiq(exp, noise=20.0)
    write_predictions_dir(tmp_path / "weak_model", splits, noise=400.0)
    assert foreign_main(["-c", str(exp)]) == 0
    assert ensemble_main(["-c", str(exp)]) == 0
    record = json.loads((tmp_path / "runs" / "ensemble" / "ensemble.json").read_text())
    for method in ("nnls", "ridge", "greedy"):
        weights = record["cv"][method]["weights"]
        assert weights["weak"] < 0.2 < 0.8 < weights["good"], (method, weights)


@pytest.mark.parametrize("entry, message", [
    ({"name": "m", "metric": "nope"}, "metric 'nope' is not supported"),
    ({"name": "m", "metric": "psnr", "predictions": "x"}, "exactly one of"),
    ({"name": "a", "metric": "psnr"}, "share the name 'a'"),
    ({"name": "m", "predictions": "missing_dir"}, "predictions folder"),
    ({"name": "m", "metric": "psnr", "colour": 1}, "'members[1].colour' unknown key"),
])
def test_bad_entries_are_refused_by_the_loader(data_root, tmp_path, entry, message):
    exp = experiment(tmp_path, data_root, ["a"], [entry])
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_experiment(exp)


def test_an_experiment_of_foreign_members_only_is_refused(data_root, tmp_path):
    exp = experiment(tmp_path, data_root, [], [{"name": "psnr", "metric": "psnr"}])
    with pytest.raises(ConfigError, match="lists no AHIQ member config"):
        load_experiment(exp)


def test_make_train_members_computes_them_without_training_them(data_root, tmp_path, monkeypatch, capsys):
    import members.launch.experiment as launcher

    trained: list[list[str]] = []
    monkeypatch.setattr(launcher, "run_members", lambda members, *a, **k: trained.append([m.name for m in members])
                        or [])
    monkeypatch.setattr(launcher, "predict_shared", lambda *a, **k: True)
    exp = experiment(tmp_path, data_root, ["a"], [{"name": "psnr", "metric": "psnr"}])
    assert launcher.main(["-c", str(exp), "--cpu-procs", "1"]) == 0
    assert trained == [["a"]]  # the AHIQ members only are trained
    assert "psnr (metric psnr): wrote val, test, valid" in capsys.readouterr().out
    meta = json.loads((tmp_path / "runs" / "psnr" / "preds_test.json").read_text())
    assert meta["split_sha256"] == sha256_file(tmp_path / "runs" / "splits" / "test.csv")


def test_predict_all_names_a_metric_member_as_not_ahiq(data_root, tmp_path, capsys):
    from members.engine.predict_all import main as predict_all_main

    exp = experiment(tmp_path, data_root, ["a"], [{"name": "psnr", "metric": "psnr"}])
    assert predict_all_main(["-c", str(exp), "--only", "psnr"]) == 2
    assert "psnr not AHIQ member(s)" in capsys.readouterr().err
