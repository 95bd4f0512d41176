"""`python -m ensemble.evaluate` (one labelled split, and --repeats), `--set members.KEY=VALUE`, the demo's
csv table and `make evaluate`."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.stats import kendalltau, pearsonr, spearmanr

from ensemble.__main__ import main as ensemble_main
from ensemble.evaluate import main as evaluate_main
from members.contract import metrics
from members.contract.config import ConfigError
from members.contract.member import prediction_fingerprint
from members.contract.schema import load_experiment
from members.contract.stagefiles import write_member_split
from members.contract.verify import made_from
from members.data import demo_data
from members.data.index import read_label_rows
from members.data.splits import DataConfig, build_splits, prepare_splits

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"


# ---- --set members.KEY=VALUE ---------------------------------------------------------------------
def test_member_overrides_reach_every_member_config():
    exp = load_experiment(DEMO, ["members.train.epochs=1", "members.data.split_seed=3", "ensemble.folds=4"])
    assert len(exp.members) == 3 and exp.ensemble.folds == 4
    for m in exp.members:
        assert (m.config.train.epochs, m.config.data.split_seed) == (1, 3), m.name
        # the training subprocess loads the member config with these overrides (members.launch.experiment)
        assert m.overrides[:2] == ["train.epochs=1", "data.split_seed=3"]
    plain = load_experiment(DEMO)
    assert {m.config.train.epochs for m in plain.members} == {8}


@pytest.mark.parametrize("override, message", [
    ("members.train.epochz=1", "(--set members.train.epochz=1): 'train.epochz' unknown key"),
    ("members.train.epochs=x", "(--set members.train.epochs=x): 'train.epochs': expected int"),
    ("members.output_dir=x", "a member's output_dir is set by the experiment"),
    ("members.name=x", "a member's name is set by the experiment"),
    ("train.epochs=1", "'train' is a member setting, not an experiment key; write --set members.train.epochs=1"),
])
def test_member_override_errors_name_the_override_as_typed(override, message):
    with pytest.raises(ConfigError) as err:
        load_experiment(DEMO, [override])
    assert message in str(err.value)


# ---- the demo's csv table --------------------------------------------------------------------------
def test_demo_table_lists_the_labelled_images_with_their_labels(tmp_path):
    root = tmp_path / "demo"
    demo_data.build(root, size=24, seed=0)
    with open(root / demo_data.TABLE, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["dis_img_path", "dis_type", "ref_img_path", "score"]
    labels = {name: score for folder in ("Train_Label", "demo_valid_labels", "demo_test_labels")
              for name, _, score, _ in read_label_rows(root / folder, root)}
    assert {Path(r["dis_img_path"]).name: float(r["score"]) for r in rows} == labels
    assert len(rows) == len(labels) and all((root / r["dis_img_path"]).is_file() and (root / r["ref_img_path"]).is_file()
                                            for r in rows)
    assert {r["dis_type"] for r in rows} == {d.name for d in demo_data.DISTORTIONS}
    # whole photos per split, through the table's own group file
    photo = dict(line.split(",") for line in (root / demo_data.TABLE_GROUPS).read_text().splitlines())
    cfg = DataConfig(format="csv", root=str(root), csv=str(root / demo_data.TABLE), ref_groups=demo_data.TABLE_GROUPS,
                     fractions=[0.5, 0.25, 0.25])
    splits = build_splits(cfg)
    photos = {s: {photo[p.ref_id] for p in pairs} for s, pairs in splits.items()}
    assert not (photos["train"] & photos["val"]) and not (photos["train"] & photos["test"])
    assert not (photos["val"] & photos["test"]) and sum(len(p) for p in splits.values()) == len(rows)


# ---- what --repeats refuses before anything is trained ---------------------------------------------
def test_repeats_need_random_test_splits(capsys):
    assert evaluate_main(["-c", str(DEMO), "--repeats", "2", "--print-runs-dir"]) == 2
    assert "--repeats needs random reference-disjoint test splits (data.format: csv)" in capsys.readouterr().err
    assert evaluate_main(["-c", str(REPO / "configs/csv_demo.yaml"), "--repeats", "1"]) == 2
    assert "needs at least 2 repeats" in capsys.readouterr().err
    assert evaluate_main(["-c", str(REPO / "configs/csv_demo.yaml"), "--repeats", "2", "--print-runs-dir",
                          "--set", "runs_dir=/somewhere/r"]) == 0
    assert capsys.readouterr().out == "/somewhere/r\n"


def _make_n(*args: str) -> str:
    return subprocess.run(["make", "-n", "--no-print-directory", "PY=py", "STAMP=", *args], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout


def test_make_evaluate_runs_one_experiment_or_repeats_then_summarises():
    assert "py -m ensemble.evaluate -c x.yaml --labels d\n" in _make_n("evaluate", "EXPERIMENT=x.yaml", "ARGS=--labels d")
    loop = _make_n("evaluate", "EXPERIMENT=x.yaml", "REPEATS=3", "ARGS=--set a=1")
    assert "py -m ensemble.evaluate -c x.yaml --set a=1 --repeats 3 --print-runs-dir" in loop
    assert 'sets="--set runs_dir=$runs/repeat_$k --set members.data.split_seed=$k"' in loop
    assert "py -m members.launch.experiment -c x.yaml" in loop and "--set a=1 $sets" in loop
    assert "py -m ensemble -c x.yaml --set a=1 $sets" in loop
    assert loop.rstrip().endswith("py -m ensemble.evaluate -c x.yaml --set a=1 --repeats 3")
    for target, command in (("train-members", "members.launch.experiment"), ("ensemble", "ensemble"),
                            ("submit", "submission")):
        assert f"-m {command} -c x.yaml" in _make_n(target, "EXPERIMENT=x.yaml", "ARGS=--set b=2")
        assert _make_n(target, "EXPERIMENT=x.yaml", "ARGS=--set b=2").rstrip().endswith("--set b=2")


# ---- a csv experiment with two repeats of fake member files (evaluate only reads files) ------------
def csv_experiment(tmp: Path, data: Path, members: list[tuple[str, int]]) -> Path:
    """A csv experiment of tiny members on the demo table in `data`; returns the experiment file."""
    names = []
    for name, seed in members:
        # the demo's readout recipe: one epoch of it already ranks the images the right way round
        member = {"base": str(REPO / "configs/members/demo_base.yaml"), "name": name, "seed": seed, "model": {"crop": 32},
                  "data": {"format": "csv", "root": str(data), "csv": str(data / demo_data.TABLE),
                           "ref_groups": demo_data.TABLE_GROUPS, "fractions": [0.5, 0.25, 0.25]},
                  "train": {"epochs": 1, "num_workers": 0, "state_every": 50},
                  "predict": {"views": {"kind": "center", "flip": False}, "batch_size": 16, "num_workers": 0}}
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump(member))
        names.append(f"{name}.yaml")
    exp = tmp / "exp.yaml"
    exp.write_text(yaml.safe_dump({"name": "csv", "runs_dir": str(tmp / "runs"), "members": names,
                                   "ensemble": {"folds": 3, "n_boot": 50}}))
    return exp


def repeat_sets(runs: Path, k: int) -> list[str]:
    """The overrides `make evaluate REPEATS=K` gives repeat k."""
    return ["--set", f"runs_dir={runs / f'repeat_{k}'}", "--set", f"members.data.split_seed={k}"]


def write_fake_members(exp_path: Path, sets: list[str], noise: float) -> None:
    """Member files as members.engine.predict writes them (split lists, verified labels and scores),
    with scores = MOS + noise instead of a trained model's: the files are all evaluate reads."""
    exp = load_experiment(exp_path, sets[1::2])
    splits = prepare_splits(exp.members[0].config.data, exp.split_dir)
    for j, m in enumerate(exp.members):
        m.out.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(j)
        for split in ("val", "test"):
            pairs = splits[split]
            meta = {"member": m.name, "split": split, "n_images": len(pairs), "higher_is_better": True,
                    **made_from(exp.split_dir, split, prediction_fingerprint(m.config), None)}
            write_member_split(m.out, split, [(p.name, p.mos + rng.normal(0, noise)) for p in pairs],
                               [(p.name, p.ref_id, p.mos) for p in pairs], meta)


@pytest.fixture(scope="module")
def csv_exp(tmp_path_factory) -> tuple[Path, Path]:
    """Two repeats (split seeds 0 and 1) of a two-member csv experiment, member files written and the
    ensemble fitted as `make evaluate REPEATS=2` would; returns (experiment file, runs_dir)."""
    tmp = tmp_path_factory.mktemp("csv")
    demo_data.build(tmp / "data", size=40, seed=1)
    exp = csv_experiment(tmp, tmp / "data", [("c", 1), ("d", 2)])
    for k in range(2):
        write_fake_members(exp, repeat_sets(tmp / "runs", k), noise=60.0)
        assert ensemble_main(["-c", str(exp), *repeat_sets(tmp / "runs", k)]) == 0
    return exp, tmp / "runs"


def test_evaluate_scores_members_and_ensemble_on_the_labelled_csv_test_split(csv_exp, capsys):
    exp, runs = csv_exp
    rep = runs / "repeat_0"
    capsys.readouterr()
    assert evaluate_main(["-c", str(exp), *repeat_sets(runs, 0), "--n-boot", "40", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    record = json.loads((rep / "ensemble" / "evaluation_test.json").read_text())
    assert (rep / "ensemble" / "evaluation_test.md").read_text() in out
    assert list(record["rows"]) == ["c", "d", "ensemble"] and record["labels"] == "the members' labels_test.csv"
    labels = {r["name"]: (r["ref"], float(r["mos"])) for r in csv.DictReader(open(rep / "c" / "labels_test.csv"))}
    names = sorted(labels)
    y, refs = np.array([labels[n][1] for n in names]), np.array([labels[n][0] for n in names])
    assert record["n_images"] == len(names) and record["n_refs"] == len(set(refs)) >= 2
    for row, folder in (("c", rep / "c"), ("d", rep / "d"), ("ensemble", rep / "ensemble")):
        preds = dict(line.split(",") for line in (folder / "preds_test.csv").read_text().split()[1:])
        p = np.array([float(preds[n]) for n in names])
        got = record["rows"][row]
        assert got["srcc"]["value"] == pytest.approx(spearmanr(p, y)[0], abs=1e-9)
        assert got["plcc"]["value"] == pytest.approx(pearsonr(p, y)[0], abs=1e-9)
        assert got["krcc"]["value"] == pytest.approx(kendalltau(p, y)[0], abs=1e-9)
        assert got["main"]["value"] == pytest.approx(got["srcc"]["value"] + got["plcc"]["value"], abs=1e-9)
        # intervals resample whole references (the test split's reference of each image), with --seed
        assert got["srcc"]["ci"] == pytest.approx(list(metrics.bootstrap_ci(metrics.srcc, p, y, refs, 40, 0.05, 3)))
        assert f"| {'member ' if row != 'ensemble' else ''}{row} | {got['srcc']['value']:.4f} [{got['srcc']['ci'][0]:.4f}," in out


def test_evaluate_refuses_an_ensemble_of_other_member_files_and_edited_labels(csv_exp, capsys):
    exp, runs = csv_exp
    ens0, ens1, aside = runs / "repeat_0" / "ensemble", runs / "repeat_1" / "ensemble", runs / "aside"
    ens0.rename(aside)
    shutil.copytree(ens1, ens0)  # repeat 1's ensemble, fitted on repeat 1's member files
    try:
        assert evaluate_main(["-c", str(exp), *repeat_sets(runs, 0)]) == 2
        err = capsys.readouterr().err
        assert "fitted on other member files than the ones now in place; run make ensemble EXPERIMENT=" in err
    finally:
        shutil.rmtree(ens0)
        aside.rename(ens0)
    labels = runs / "repeat_0" / "c" / "labels_test.csv"
    text = labels.read_text()
    labels.write_text(text.replace(text.splitlines()[1], text.splitlines()[1] + "1"))  # one MOS edited
    try:
        assert evaluate_main(["-c", str(exp), *repeat_sets(runs, 0)]) == 2
        assert "labels_test.csv: changed since preds_test.json was written" in capsys.readouterr().err
    finally:
        labels.write_text(text)
    assert evaluate_main(["-c", str(exp), *repeat_sets(runs, 0), "--split", "valid"]) == 2
    assert "--split valid: the members have no predictions of that split" in capsys.readouterr().err


def test_repeats_give_mean_and_std_and_refuse_missing_or_duplicate_repeats(csv_exp, capsys):
    exp, runs = csv_exp
    singles = []
    for k in range(2):
        assert evaluate_main(["-c", str(exp), *repeat_sets(runs, k), "--n-boot", "10"]) == 0
        singles.append(json.loads((runs / f"repeat_{k}" / "ensemble" / "evaluation_test.json").read_text())["rows"])
    capsys.readouterr()
    assert evaluate_main(["-c", str(exp), "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((runs / "evaluation_repeats.json").read_text())
    assert summary["split_seeds"] == [0, 1] and (runs / "evaluation_repeats.md").read_text() in out
    for row in ("c", "d", "ensemble"):
        for key in ("srcc", "plcc", "krcc", "main"):
            values = [s[row][key]["value"] for s in singles]
            assert summary["rows"][row][key]["mean"] == pytest.approx(np.mean(values), abs=1e-12)
            assert summary["rows"][row][key]["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
    # a missing repeat names the make command that makes it
    assert evaluate_main(["-c", str(exp), "--repeats", "3"]) == 2
    err = capsys.readouterr().err
    assert f"1 of 3 repeats missing ({runs / 'repeat_2'}); run make evaluate EXPERIMENT={exp} REPEATS=3" in err
    # a copy of a repeat counts one split twice
    shutil.copytree(runs / "repeat_1", runs / "repeat_2")
    try:
        assert evaluate_main(["-c", str(exp), "--repeats", "3"]) == 2
        assert "repeats 1 and 2" in capsys.readouterr().err
    finally:
        shutil.rmtree(runs / "repeat_2")


@pytest.mark.slow
def test_a_trained_csv_member_is_evaluated_on_its_own_test_labels(tmp_path, capsys):
    """The real path: make train-members, ensemble and evaluate on a csv experiment (one tiny member)."""
    from members.launch.experiment import main as experiment_main

    demo_data.build(tmp_path / "data", size=40, seed=1)
    exp = csv_experiment(tmp_path, tmp_path / "data", [("c", 1)])
    assert experiment_main(["-c", str(exp), "--cpu-procs", "1"]) == 0
    assert ensemble_main(["-c", str(exp)]) == 0
    capsys.readouterr()
    assert evaluate_main(["-c", str(exp), "--n-boot", "20"]) == 0
    runs = tmp_path / "runs"
    assert "| member c | " in capsys.readouterr().out
    record = json.loads((runs / "ensemble" / "evaluation_test.json").read_text())
    labels = {r["name"]: float(r["mos"]) for r in csv.DictReader(open(runs / "c" / "labels_test.csv"))}
    preds = dict(line.split(",") for line in (runs / "c" / "preds_test.csv").read_text().split()[1:])
    assert set(labels) == set(preds) == {r["name"] for r in csv.DictReader(open(runs / "splits" / "test.csv"))}
    names = sorted(labels)
    expected = spearmanr([float(preds[n]) for n in names], [labels[n] for n in names])[0]
    assert record["rows"]["c"]["srcc"]["value"] == pytest.approx(expected, abs=1e-9)
