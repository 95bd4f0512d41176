"""The NR demo walk-through (make demo-nr) at tiny size: the FR teacher's pseudo-labels of generated training
pairs (--continuous), the shipped blind configs (a) configs/demo_nr.yaml and (b) configs/demo_nr_student.yaml
trained, fitted and evaluated on the hidden NR test labels, and ensemble.compare's table of (a), (b) and the
teacher (c), checked against the evaluation files; compare refuses evaluations of different image sets."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_scorer import fitted  # noqa: F401  (the teacher: a fitted two-member FR ensemble on the tiny data)

from ensemble.__main__ import main as ensemble_main
from ensemble.compare import disjoint
from ensemble.compare import main as compare_main
from ensemble.evaluate import main as evaluate_main
from members.contract.pseudo import recorded_summary
from members.contract.schema import load_experiment
from members.data.splits import read_split
from members.launch.experiment import main as experiment_main

REPO = Path(__file__).resolve().parents[1]
PER_REF = 6  # generated pairs per training reference (the demo: 70, 5x its 14 labelled ones)


def _tiny(runs: Path, data: Path) -> list[str]:
    """--set overrides that shrink a shipped demo NR config to the session's 40 px data and three short epochs.
    No ref_groups: validation on references of the training photos. On a held-out photo these tiny blind
    members ranked the validation images backwards (main -0.49 and -0.47), and the ensemble refuses members
    that all do; the walk-through's plumbing, not their accuracy, is what this test checks."""
    sets = {"runs_dir": runs, "submission.test_dir": data / "NTIRE2022_NR_Testing_Dis", "members.data.root": data,
            "members.model.crop": 32, "members.train.epochs": 3, "members.train.batch_size": 8,
            "ensemble.n_boot": 50, "members.data.ref_groups": "''"}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def walk(fitted, tmp_path_factory) -> dict:  # noqa: F811
    """pseudo-label -> (a) and (b) trained, fitted, evaluated; the teacher evaluated as (c)."""
    tmp = tmp_path_factory.mktemp("nrdemo")
    teacher = load_experiment(fitted)
    data = Path(teacher.members[0].config.data.root)
    assert evaluate_main(["-c", str(fitted), "--labels", str(data / "demo_test_labels")]) == 0
    labels = tmp / "pseudo"
    assert pseudo_main_generate(fitted, labels) == 0
    files = {"(c) FR": teacher.out_dir / "evaluation_test.json"}
    for key, config, extra in (("(a) NR", "demo_nr.yaml", []),
                               ("(b) student", "demo_nr_student.yaml", ["--set", f"members.data.pseudo_labels={labels}"])):
        sets = _tiny(tmp / key[1], data) + extra
        config = str(REPO / "configs" / config)
        assert experiment_main(["-c", config, "--cpu-procs", "1", *sets]) == 0
        assert ensemble_main(["-c", config, *sets]) == 0
        assert evaluate_main(["-c", config, "--labels", str(data / "demo_nr_test_labels"), *sets]) == 0
        files[key] = tmp / key[1] / "ensemble" / "evaluation_test.json"
    return {"files": files, "labels": labels, "teacher": teacher, "tmp": tmp, "data": data}


def pseudo_main_generate(fitted: Path, out: Path) -> int:  # noqa: F811
    from members.launch.pseudo_label import main as pseudo_main
    return pseudo_main(["-c", str(fitted), "--source", "generate", "--continuous", "--levels", "0,3",
                        "--per-ref", str(PER_REF), "--out", str(out)])


@pytest.mark.slow
def test_the_student_trains_on_labels_and_pseudo_labels_and_a_is_blind(walk):
    train = read_split(walk["teacher"].split_dir / "train.csv")
    refs = {p.ref_id for p in train}
    manifest = json.loads((walk["labels"] / "pseudo_labels.json").read_text())
    assert manifest["counts"]["pairs"] == PER_REF * len(refs) and manifest["counts"]["generated"] == PER_REF * len(refs)
    student = walk["tmp"] / "b" / "demo_nr_student_s1919"
    found = [p for p in student.iterdir() if p.suffix == ".json" and recorded_summary(student, p.name)]
    assert found, "the student records no pseudo-labels"
    summary = recorded_summary(student, found[0].name)
    assert summary["pairs"] == PER_REF * len(refs) and summary["weight"] > 0
    for key in ("a", "b"):
        test_rows = read_split(walk["tmp"] / key / "splits" / "test.csv")
        assert test_rows and all(p.ref is None and p.dis.parent.name == "NTIRE2022_NR_Testing_Dis" for p in test_rows)
    plain = walk["tmp"] / "a" / "demo_nr_s1919"
    assert not any(recorded_summary(plain, p.name) for p in plain.iterdir() if p.suffix == ".json")


@pytest.mark.slow
def test_compare_prints_each_ensemble_row_of_the_evaluation_files(walk, capsys):
    files = walk["files"]
    args = [f"{k}={files[k]}" for k in ("(a) NR", "(b) student", "(c) FR")]
    capsys.readouterr()
    assert compare_main([*args, "--vs", "(c) FR"]) == 0
    out = capsys.readouterr().out
    rows = {k: json.loads(files[k].read_text())["rows"]["ensemble"] for k in files}
    for key, row in rows.items():
        line = next(x for x in out.splitlines() if x.startswith(f"| {key} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        for cell, metric in zip(cells[1:4], ("srcc", "plcc", "main")):
            value, (low, high) = row[metric]["value"], row[metric]["ci"]
            assert cell == f"{value:.3f} [{low:.3f}, {high:.3f}]"
        assert cells[4] == f"{row['srcc']['value'] / rows['(c) FR']['srcc']['value']:.0%}"
    verdict = "disjoint" if disjoint(rows["(b) student"], rows["(a) NR"]) else "overlap"
    diff = rows["(b) student"]["srcc"]["value"] - rows["(a) NR"]["srcc"]["value"]
    assert f"- (a) NR - (b) student: SRCC {-diff:+.3f}, intervals {verdict}" in out
    # a member's row instead of the ensemble's: only where every file has it
    assert compare_main([args[0], "--row", "demo_nr_s1919"]) == 0
    assert compare_main(args[:2] + ["--row", "demo_nr_s1919"]) == 2
    assert "no row 'demo_nr_s1919'" in capsys.readouterr().err


def test_intervals_are_disjoint_only_without_overlap():
    def row(low: float, high: float) -> dict:
        return {"srcc": {"value": (low + high) / 2, "ci": [low, high]}}
    assert disjoint(row(0.1, 0.3), row(0.31, 0.5)) and disjoint(row(0.6, 0.9), row(0.1, 0.5))
    assert not disjoint(row(0.1, 0.3), row(0.3, 0.5)) and not disjoint(row(0.1, 0.9), row(0.4, 0.5))


def test_compare_refuses_other_image_sets_and_bad_files(tmp_path, capsys):
    metric = {"value": 0.5, "ci": [0.4, 0.6]}
    record = {"split": "test", "n_images": 70, "n_refs": 5, "labels": "x",
              "rows": {"ensemble": {"srcc": metric, "plcc": metric, "main": metric}}}
    (tmp_path / "a.json").write_text(json.dumps(record))
    (tmp_path / "b.json").write_text(json.dumps({**record, "n_images": 56, "n_refs": 4}))
    (tmp_path / "c.json").write_text(json.dumps({**record, "rows": {"ensemble": {"srcc": metric}}}))
    assert compare_main([f"a={tmp_path / 'a.json'}", f"b={tmp_path / 'a.json'}"]) == 0
    capsys.readouterr()
    assert compare_main([f"a={tmp_path / 'a.json'}", f"b={tmp_path / 'b.json'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different images" in err[0] and "n_images 56 vs 70" in err[0]
    assert compare_main([f"c={tmp_path / 'c.json'}"]) == 2
    assert "lacks plcc, main" in capsys.readouterr().err
    assert compare_main([f"m={tmp_path / 'missing.json'}"]) == 2
    assert "not a readable evaluation file" in capsys.readouterr().err
    shutil.copy(tmp_path / "a.json", tmp_path / "d.json")
    with pytest.raises(SystemExit):
        compare_main([f"a={tmp_path / 'a.json'}", f"a={tmp_path / 'd.json'}"])
