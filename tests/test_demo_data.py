"""Tests of members.data.demo_data: PIPAL/NTIRE layout and names, labels, determinism, idempotence."""
from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.stats import spearmanr

from members.data import demo_data
from members.data.demo_data import (MARKER, REF_GROUPS, TABLE, TABLE_GROUPS, DemoDataError, build, main,
                                    proxy_quality)
from members.data.splits import DataConfig, build_splits

TRAIN_DIS = [f"Distortion_{i}" for i in range(1, 5)]
TRAIN_NAME = re.compile(r"^A\d{4}_0[0-6]_\d{2}\.bmp$")
TEST_NAME = re.compile(r"^A\d{4}_10_\d{2}\.bmp$")
# (labels, distorted folders) of every split; the validation and test labels are the hidden ones.
LABELLED = (("Train_Label", TRAIN_DIS), ("demo_valid_labels", ["NTIRE2022_FR_Valid_Dis"]),
            ("demo_test_labels", ["NTIRE2022_FR_Testing_Dis"]))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "demo"
    assert build(out) is True
    return out


def read_labels(folder: Path) -> dict[str, float]:
    """Parse PIPAL label files (`name,score` lines) the way consumers do: split on the comma, strip."""
    labels: dict[str, float] = {}
    for path in sorted(folder.glob("*.txt")):
        for line in path.read_text(encoding="utf-8").splitlines():
            name, score = (part.strip() for part in line.split(","))
            assert name[:5] == path.stem, f"{path.name} lists {name} of another reference"
            assert name not in labels, f"{name} labelled twice"
            labels[name] = float(score)
    return labels


def names_in(root: Path, folders: list[str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in folders:
        for path in (root / folder).iterdir():
            assert path.name not in found, f"{path.name} in two folders"
            found[path.name] = path
    return found


def test_layout_and_names(demo: Path) -> None:
    top = {p.name for p in demo.iterdir()}
    assert top == {"Train_Ref", "Train_Label", *TRAIN_DIS, "NTIRE2022_FR_Testing_Ref",
                   "NTIRE2022_FR_Testing_Dis", "demo_test_labels", "NTIRE2022_FR_Valid_Ref",
                   "NTIRE2022_FR_Valid_Dis", "demo_valid_labels", REF_GROUPS, TABLE, TABLE_GROUPS, "README.txt",
                   MARKER, "NTIRE2022_NR_Testing_Dis", "NTIRE2022_NR_Valid_Dis", "demo_nr_test_labels",
                   "demo_nr_valid_labels"}
    train = names_in(demo, TRAIN_DIS)
    assert 12 * 8 <= len(train) and all(TRAIN_NAME.match(n) for n in train)
    assert all((demo / "Train_Ref" / f"{n[:5]}.bmp").is_file() for n in train)
    assert {n[6:8] for n in train} == {f"{g:02d}" for g in range(7)}
    # Every folder is used, and one reference's images all sit in one folder (blocks, as PIPAL).
    folder_of_ref = defaultdict(set)
    for name, path in train.items():
        folder_of_ref[name[:5]].add(path.parent.name)
    assert all(len(f) == 1 for f in folder_of_ref.values())
    assert {f for fs in folder_of_ref.values() for f in fs} == set(TRAIN_DIS)
    assert {p.stem for p in (demo / "Train_Ref").iterdir()} == set(folder_of_ref)

    test = names_in(demo, ["NTIRE2022_FR_Testing_Dis"])
    assert all(TEST_NAME.match(n) for n in test)
    assert all((demo / "NTIRE2022_FR_Testing_Ref" / f"{n[:5]}.bmp").is_file() for n in test)
    ks_of_ref = defaultdict(set)
    for name in test:
        ks_of_ref[name[:5]].add(name[9:11])
    assert 4 <= len(ks_of_ref) <= 6 and 12 <= len(folder_of_ref) <= 16
    assert len({frozenset(ks) for ks in ks_of_ref.values()}) == 1
    assert not set(ks_of_ref) & set(folder_of_ref), "test references must differ from train ones"


def test_nr_folders_copy_the_fr_images_without_references(demo: Path) -> None:
    # the NR track's folders: the FR test and validation images, byte for byte, and their hidden labels
    for fr, nr, fr_labels, nr_labels in (("NTIRE2022_FR_Testing_Dis", "NTIRE2022_NR_Testing_Dis", "demo_test_labels",
                                          "demo_nr_test_labels"),
                                         ("NTIRE2022_FR_Valid_Dis", "NTIRE2022_NR_Valid_Dis", "demo_valid_labels",
                                          "demo_nr_valid_labels")):
        names = sorted(p.name for p in (demo / nr).iterdir())
        assert names == sorted(p.name for p in (demo / fr).iterdir()) and names
        assert all((demo / nr / n).read_bytes() == (demo / fr / n).read_bytes() for n in names)
        assert sorted(p.name for p in (demo / nr_labels).iterdir()) == sorted(p.name for p in (demo / fr_labels).iterdir())
        assert all((demo / nr_labels / f.name).read_text() == f.read_text() for f in (demo / fr_labels).iterdir())
    assert not any(p.name.startswith("NTIRE2022_NR") and p.name.endswith("_Ref") for p in demo.iterdir())


def test_validation_folder_is_ntire_like_and_disjoint(demo: Path) -> None:
    # The development-phase folder: group 10, the test's k list, its own references and photos.
    valid = names_in(demo, ["NTIRE2022_FR_Valid_Dis"])
    test = names_in(demo, ["NTIRE2022_FR_Testing_Dis"])
    assert valid and all(TEST_NAME.match(n) for n in valid)
    valid_refs = {p.stem for p in (demo / "NTIRE2022_FR_Valid_Ref").iterdir()}
    assert valid_refs == {n[:5] for n in valid}
    ks_of_ref = defaultdict(set)
    for name in valid:
        ks_of_ref[name[:5]].add(name[9:11])
    assert 3 <= len(ks_of_ref) <= 6
    assert {frozenset(ks) for ks in ks_of_ref.values()} == {frozenset(n[9:11] for n in test)}, "one k list"
    others = {p.stem for d in ("Train_Ref", "NTIRE2022_FR_Testing_Ref") for p in (demo / d).iterdir()}
    assert not valid_refs & others
    # Other photos, not other crops of the same ones: no validation reference resembles another one.
    def pixels(path: Path) -> np.ndarray:
        return np.asarray(Image.open(path), dtype=np.float64)
    for v in sorted((demo / "NTIRE2022_FR_Valid_Ref").iterdir()):
        for d in ("Train_Ref", "NTIRE2022_FR_Testing_Ref"):
            for o in (demo / d).iterdir():
                assert np.abs(pixels(v).mean((0, 1)) - pixels(o).mean((0, 1))).max() > 1.0, (v.name, o.name)


def test_validation_split_is_read_unlabelled_or_with_its_hidden_labels(demo: Path) -> None:
    # As NTIRE ships it the folder has no labels; the demo's hidden ones load like valid_labels would.
    hidden = build_splits(DataConfig(root=str(demo), val_source="ntire_valid", valid_labels="demo_valid_labels"))
    plain = build_splits(DataConfig(root=str(demo), val_source="ntire_valid"))
    assert [p.name for p in hidden["val"]] == [p.name for p in plain["val"]] == sorted(
        names_in(demo, ["NTIRE2022_FR_Valid_Dis"]))
    assert all(p.mos is None for p in plain["val"]) and all(p.mos is not None for p in hidden["val"])
    assert len(hidden["train"]) == len(names_in(demo, TRAIN_DIS)), "ntire_valid keeps every train reference"


def test_labels_cover_exactly_the_images(demo: Path) -> None:
    for label_dir, folders in LABELLED:
        labels = read_labels(demo / label_dir)
        assert set(labels) == set(names_in(demo, folders))
        scores = np.array(list(labels.values()))
        assert all(math.isfinite(s) for s in scores)
        assert 900 < scores.min() and scores.max() < 1850 and scores.std() > 50
    first = (demo / "Train_Label" / "A0001.txt").read_text(encoding="utf-8").splitlines()[0]
    assert re.fullmatch(r"A0001_00_00\.bmp,\d{3,4}\.\d{4}", first)


def test_stronger_level_gets_lower_label(demo: Path) -> None:
    # Train: within group (= type) k 01 is the stronger level; valid and test: k = 2 * type + (0 mild, 1 strong).
    train = read_labels(demo / "Train_Label")
    test = {**read_labels(demo / "demo_test_labels"), **read_labels(demo / "demo_valid_labels")}
    pairs = [(n, n[:9] + "01.bmp") for n in train if n.endswith("_00.bmp")]
    pairs += [(n, f"{n[:9]}{int(n[9:11]) + 1:02d}.bmp") for n in test if int(n[9:11]) % 2 == 0]
    assert len(pairs) == (len(train) + len(test)) // 2
    both = {**train, **test}
    for mild, strong in pairs:
        assert both[strong] < both[mild], f"{strong} ({both[strong]}) not below {mild} ({both[mild]})"


@pytest.mark.parametrize("labels_dir, folders, ref_dir", [
    ("Train_Label", TRAIN_DIS, "Train_Ref"),
    ("demo_valid_labels", ["NTIRE2022_FR_Valid_Dis"], "NTIRE2022_FR_Valid_Ref")])
def test_labels_follow_the_full_reference_measure(demo: Path, labels_dir: str, folders: list[str],
                                                  ref_dir: str) -> None:
    labels = read_labels(demo / labels_dir)
    files = names_in(demo, folders)
    q = [proxy_quality(np.asarray(Image.open(demo / ref_dir / f"{n[:5]}.bmp")), np.asarray(Image.open(files[n])))
         for n in labels]
    assert spearmanr(q, list(labels.values())).statistic > 0.95


def check_images(root: Path, size: int) -> int:
    paths = list(root.glob("*/*.bmp"))
    for path in paths:
        with Image.open(path) as img:
            assert (img.format, img.mode, img.size) == ("BMP", "RGB", (size, size)), path
        assert int.from_bytes(path.read_bytes()[28:30], "little") == 24, f"{path} is not 24-bit"
    return len(paths)


def test_images_are_8bit_rgb_of_the_size(demo: Path, tmp_path: Path) -> None:
    assert check_images(demo, 80) > 200
    build(tmp_path / "small", size=32)
    assert check_images(tmp_path / "small", 32) > 200


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_bytes_and_seed_matters(tmp_path: Path) -> None:
    build(tmp_path / "a", size=32, seed=3)
    build(tmp_path / "b", size=32, seed=3)
    build(tmp_path / "c", size=32, seed=4)
    a, b, c = (tree_bytes(tmp_path / x) for x in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert a["Train_Label/A0001.txt"] != c["Train_Label/A0001.txt"]
    assert a["Train_Ref/A0001.bmp"] == c["Train_Ref/A0001.bmp"]  # references do not depend on the seed


def test_idempotent_with_marker(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    assert build(out, size=32) is True
    marker = json.loads((out / MARKER).read_text(encoding="utf-8"))
    assert marker["params"] == {"generator": "members.data.demo_data", "format_version": 5, "size": 32, "seed": 0}
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert build(out, size=32) is False
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert build(out, size=24) is True  # other parameters: rebuilt in place
    assert json.loads((out / MARKER).read_text(encoding="utf-8"))["params"]["size"] == 24
    assert check_images(out, 24) > 200
    assert [p.name for p in tmp_path.iterdir()] == ["demo"], "temporary folders left behind"


def test_failure_leaves_no_half_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "demo"
    build(out, size=24)
    old = tree_bytes(out)
    calls = []
    real_save = demo_data._save_bmp

    def failing_save(path: Path, img: np.ndarray) -> None:
        calls.append(path)
        if len(calls) > 20:
            raise OSError("disk full (simulated)")
        real_save(path, img)

    monkeypatch.setattr(demo_data, "_save_bmp", failing_save)
    with pytest.raises(OSError, match="simulated"):
        build(out, size=32)
    assert tree_bytes(out) == old, "the previous complete dataset must survive a failed rebuild"
    with pytest.raises(OSError, match="simulated"):
        build(tmp_path / "fresh", size=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_litter_of_a_killed_build_is_swept(tmp_path: Path) -> None:
    # kill -9 skips build's cleanup: its temporary dataset (or the set-aside old one) stays beside out
    for litter in (".demo.tmp-k1lled", ".demo.old-k1lled"):
        (tmp_path / litter / "NTIRE2022_FR_Testing_Dis").mkdir(parents=True)
    (tmp_path / ".other.tmp-keep").mkdir()  # not ours
    assert build(tmp_path / "demo", size=24) is True
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-keep", "demo"]


def test_refuses_to_replace_a_foreign_folder(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("user data", encoding="utf-8")
    with pytest.raises(DemoDataError, match="not a demo dataset"):
        build(out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(DemoDataError, match="--size"):
        build(tmp_path / "x", size=8)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["--out", str(out), "--size", "24", "--seed", "1"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["--out", str(out), "--size", "24", "--seed", "1"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(out), "--size", "4"])
    assert exit_info.value.code == 2 and "--size 4" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "SYNTHETIC" in capsys.readouterr().out
