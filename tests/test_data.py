"""Tests of members.data.index and members.data.splits: readers, splits, label scaling, checks, Datasets."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from members.contract.config import ConfigError, from_dict, load_yaml
from members.data.datasets import RefGroupPairs, TrainPairs, load_rgb
from members.data.index import DataError, Pair, check_pairs, read_csv_table, read_pipal_labels
from members.data.splits import DataConfig, LabelStats, prepare_splits, read_split
from members.data.views import AugmentConfig, ViewConfig, apply_view, make_views

REAL = Path(__file__).resolve().parent / "fixtures" / "real"  # small real label files, see fixtures/README.md
TID = REAL / "tid2013_scores.csv"
SIZE, CROP = 12, 8


def write_img(path: Path, seed: int, height: int = SIZE, width: int = SIZE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def make_pipal(root: Path, layout: str = "four", n_refs: int = 5, per_ref: int = 3) -> dict[str, float]:
    """A tiny PIPAL tree: train refs A0001.., NTIRE valid A0101.. and test A0201.. (2 refs x 2 images).

    Returns the train labels by name."""
    labels = {}
    for r in range(1, n_refs + 1):
        write_img(root / "Train_Ref" / f"A{r:04d}.bmp", r)
        folder = f"Distortion_{(r - 1) % 4 + 1}" if layout == "four" else "Train_Dis"
        lines = []
        for k in range(per_ref):
            name = f"A{r:04d}_00_{k:02d}.bmp"
            write_img(root / folder / name, 100 * r + k)
            labels[name] = 1000.0 + 10 * r + k + 0.25
            lines.append(f"{name},{labels[name]}")
        (root / "Train_Label").mkdir(parents=True, exist_ok=True)
        (root / "Train_Label" / f"A{r:04d}.txt").write_text("\n".join(lines) + "\n")
    for base, kind in ((100, "Valid"), (200, "Testing")):
        for r in range(base + 1, base + 3):
            write_img(root / f"NTIRE2022_FR_{kind}_Ref" / f"A{r:04d}.bmp", r)
            for k in range(2):
                write_img(root / f"NTIRE2022_FR_{kind}_Dis" / f"A{r:04d}_10_{k:02d}.bmp", 100 * r + k)
    return labels


@pytest.fixture
def pipal(tmp_path: Path) -> tuple[DataConfig, dict[str, float]]:
    labels = make_pipal(tmp_path / "pipal")
    return DataConfig(root=str(tmp_path / "pipal"), val_fraction=0.2), labels


# ---- readers ---------------------------------------------------------------------------------------

def test_real_pipal_labels_parse(tmp_path):
    pairs = read_pipal_labels(REAL / "PIPAL_Train_Label", [tmp_path / "Train_Dis"], tmp_path / "Train_Ref", REAL)
    files = sorted(path.stem for path in (REAL / "PIPAL_Train_Label").glob("A*.txt"))
    assert files == ["A0001", "A0002", "A0003", "A0248"]  # 4 of the 200 real files, 116 lines each
    assert len(pairs) == 4 * 116 and len({p.name for p in pairs}) == 4 * 116
    refs = {p.ref_id for p in pairs}
    assert refs == set(files) and all(sum(1 for p in pairs if p.ref_id == r) == 116 for r in refs)
    assert all(p.name.startswith(p.ref_id + "_") and p.ref == tmp_path / "Train_Ref" / f"{p.ref_id}.bmp"
               for p in pairs)
    first = (REAL / "PIPAL_Train_Label" / "A0001.txt").read_text().splitlines()
    by_name = {p.name: p for p in pairs}
    for number, line in enumerate(first, start=1):
        name, score = line.split(",")
        assert by_name[name].mos == float(score) and by_name[name].source == f"PIPAL_Train_Label/A0001.txt:{number}"
    scores = [p.mos for p in pairs]
    assert 900 < min(scores) < max(scores) < 1850  # Elo scale, see ntire-format.md


def test_label_parser_tolerates_spaces_blank_lines_and_no_final_newline(tmp_path):
    (tmp_path / "L").mkdir()
    (tmp_path / "L" / "A0001.txt").write_text("A0001_00_00.bmp, 1520.0648\n\n A0001_00_01.bmp ,1437.0798")
    pairs = read_pipal_labels(tmp_path / "L", [tmp_path / "D"], tmp_path / "R", tmp_path)
    assert [(p.name, p.mos, p.source) for p in pairs] == [
        ("A0001_00_00.bmp", 1520.0648, "L/A0001.txt:1"), ("A0001_00_01.bmp", 1437.0798, "L/A0001.txt:3")]


@pytest.mark.parametrize("line", ["A0001_00_01.bmp 1437.1", "A0001_00_01.bmp,abc", "A0001_00_01.bmp,1,2",
                                  ",1437.1", "A0001_00_01.bmp,nan", "IMG01.bmp,1437.1"])
def test_malformed_label_line_names_file_and_line(tmp_path, line):
    (tmp_path / "L").mkdir()
    (tmp_path / "L" / "A0001.txt").write_text(f"A0001_00_00.bmp,1520.0648\n{line}\n")
    with pytest.raises(DataError, match=r"L/A0001\.txt:2"):
        read_pipal_labels(tmp_path / "L", [tmp_path / "D"], tmp_path / "R", tmp_path)


def test_real_tid2013_csv(tmp_path):
    pairs = read_csv_table(TID, tmp_path)
    with open(TID, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(pairs) == len(rows) == 3000 and len({p.name for p in pairs}) == 3000
    assert len({p.ref_id for p in pairs}) == 25
    for pair, row in zip(pairs, rows):
        assert pair.name == row["dis_img_path"] and pair.mos == float(row["score"])
        assert pair.dis == tmp_path / row["dis_img_path"] and pair.ref == tmp_path / row["ref_img_path"]
    assert pairs[0].source == f"{TID}:2"


def test_csv_reader_errors(tmp_path):
    bad_header = tmp_path / "a.csv"
    bad_header.write_text("dis,ref,score\nx.bmp,r.bmp,1\n")
    with pytest.raises(DataError, match=r"a\.csv:1: missing column"):
        read_csv_table(bad_header, tmp_path)
    bad_score = tmp_path / "b.csv"
    bad_score.write_text("dis_img_path,dis_type,ref_img_path,score\nx.bmp,t,r.bmp,1\ny.bmp,t,r.bmp,high\n")
    with pytest.raises(DataError, match=r"b\.csv:3: score 'high'"):
        read_csv_table(bad_score, tmp_path)


# ---- splits ----------------------------------------------------------------------------------------

def tid_config(**kw) -> DataConfig:
    return DataConfig(format="csv", csv=str(TID), root="/nonexistent/images", **kw)


def test_csv_splits_by_reference_seeded_and_reread(tmp_path):
    splits = prepare_splits(tid_config(), tmp_path / "s")
    refs = {s: {p.ref_id for p in pairs} for s, pairs in splits.items()}
    assert [len(refs[s]) for s in ("train", "val", "test")] == [15, 5, 5]  # 0.6/0.2/0.2 of 25 refs
    assert not (refs["train"] & refs["val"] or refs["train"] & refs["test"] or refs["val"] & refs["test"])
    assert sum(len(p) for p in splits.values()) == 3000
    assert splits == prepare_splits(tid_config(), tmp_path / "s")  # reread from the files
    assert splits["val"] == read_split(tmp_path / "s" / "val.csv")
    assert splits == prepare_splits(tid_config(), tmp_path / "again")  # seeded: same config, same lists
    other = prepare_splits(tid_config(split_seed=1), tmp_path / "other")
    assert {p.ref_id for p in other["val"]} != refs["val"]
    stats = LabelStats.load(tmp_path / "s" / "label_stats.json")
    train_mos = [p.mos for p in splits["train"]]
    assert (stats.min, stats.max, stats.higher_is_better) == (min(train_mos), max(train_mos), True)
    assert json.loads((tmp_path / "s" / "splits.json").read_text())["counts"]["test"]["references"] == 5


def test_fingerprint_mismatch_is_refused(tmp_path):
    prepare_splits(tid_config(), tmp_path / "s")
    with pytest.raises(DataError, match=r"split_seed: 0 -> 3.*delete"):
        prepare_splits(tid_config(split_seed=3), tmp_path / "s")
    prepare_splits(tid_config(upscale_small=True), tmp_path / "s")  # does not change the lists


def test_empty_split_is_an_error(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("dis_img_path,dis_type,ref_img_path,score\na1.bmp,t,a.bmp,1\nb1.bmp,t,b.bmp,2\n")
    with pytest.raises(DataError, match="test split is empty"):
        prepare_splits(DataConfig(format="csv", csv=str(table), root=str(tmp_path)), tmp_path / "s")
    assert not (tmp_path / "s").exists()
    empty = tmp_path / "e.csv"
    empty.write_text("name,dis,ref,ref_id,mos\n")
    with pytest.raises(DataError, match="empty"):
        read_split(empty)


@pytest.mark.parametrize("layout", ["four", "merged"])
def test_pipal_end_to_end(tmp_path, layout):
    labels = make_pipal(tmp_path / "p", layout)
    cfg = DataConfig(root=str(tmp_path / "p"))
    splits = prepare_splits(cfg, tmp_path / "s")
    assert {len({p.ref_id for p in splits[s]}) for s in ("train", "val")} == {4, 1}
    assert not {p.ref_id for p in splits["train"]} & {p.ref_id for p in splits["val"]}
    assert {p.name: p.mos for p in splits["train"] + splits["val"]} == labels
    assert [p.name for p in splits["test"]] == [f"A{r:04d}_10_{k:02d}.bmp" for r in (201, 202) for k in (0, 1)]
    assert all(p.mos is None for p in splits["test"])
    for name, pairs in splits.items():
        check_pairs(pairs, CROP, False, name)
    stats = LabelStats.load(tmp_path / "s" / "label_stats.json")
    item = TrainPairs(splits["train"], CROP, AugmentConfig(), stats, seed=1)[0]
    assert item["dis"].shape == item["ref"].shape == (3, CROP, CROP) and 0 <= item["label"] <= 1
    assert item["label"].dtype == torch.float32
    test = RefGroupPairs(splits["test"], CROP, ViewConfig(kind="five", flip=True), stats, chunk=1)[1]
    assert test["dis"].shape == (1, 10, 3, CROP, CROP) and test["ref"].shape == (10, 3, CROP, CROP)
    assert math.isnan(test["label"][0])


def test_pipal_ntire_valid_with_and_without_labels(tmp_path):
    make_pipal(tmp_path / "p")
    splits = prepare_splits(DataConfig(root=str(tmp_path / "p"), val_source="ntire_valid"), tmp_path / "s1")
    assert len({p.ref_id for p in splits["train"]}) == 5 and len(splits["val"]) == 4
    assert all(p.mos is None for p in splits["val"])
    (tmp_path / "p" / "VL").mkdir()
    (tmp_path / "p" / "VL" / "A0101.txt").write_text("A0101_10_00.bmp,1500\nA0101_10_01.bmp,1400\n")
    labelled = prepare_splits(DataConfig(root=str(tmp_path / "p"), val_source="ntire_valid", valid_labels="VL"),
                              tmp_path / "s2")
    assert [(p.name, p.mos) for p in labelled["val"]] == [("A0101_10_00.bmp", 1500.0), ("A0101_10_01.bmp", 1400.0)]
    check_pairs(labelled["val"], CROP, False, "val")


# ---- label scaling ---------------------------------------------------------------------------------

def test_label_stats_round_trip_and_dmos_orientation(tmp_path):
    pairs = [Pair(f"x{i}", Path("d"), Path("r"), "r", m) for i, m in enumerate([2.0, 5.0, 3.5])]
    mos = LabelStats.from_pairs(pairs, higher_is_better=True)
    assert mos.normalise(5.0) == 1.0 and mos.normalise(2.0) == 0.0
    dmos = LabelStats.from_pairs(pairs, higher_is_better=False)
    assert dmos.normalise(2.0) == 1.0 and dmos.normalise(5.0) == 0.0  # low DMOS = best quality
    values = np.array([2.0, 3.5, 5.0, 6.0])
    for stats in (mos, dmos):
        np.testing.assert_allclose(stats.denormalise(stats.normalise(values)), values)
        stats.save(tmp_path / "stats.json")
        assert LabelStats.load(tmp_path / "stats.json") == stats
    with pytest.raises(DataError, match="labelled"):
        LabelStats.from_pairs(pairs + [Pair("u", Path("d"), Path("r"), "r", None)], True)


# ---- bad inputs ------------------------------------------------------------------------------------

def train_list(cfg: DataConfig, tmp_path: Path) -> list[Pair]:
    return prepare_splits(cfg, tmp_path / "s")["train"]


def test_missing_and_undecodable_images_name_the_label_line(pipal, tmp_path):
    cfg, _ = pipal
    pairs = train_list(cfg, tmp_path)
    victim = pairs[1]
    victim.dis.unlink()
    with pytest.raises(DataError, match=rf"{victim.source}: file not found: .*{victim.name}"):
        check_pairs(pairs, CROP, False, "train")
    victim.dis.write_bytes(b"this is not a bitmap")
    with pytest.raises(DataError, match=rf"{victim.source}: cannot decode"):
        check_pairs(pairs, CROP, False, "train")
    write_img(victim.dis, 0)
    whole = victim.dis.read_bytes()
    victim.dis.write_bytes(whole[: len(whole) // 2])  # truncated: the header is fine, the pixels are not
    with pytest.raises(DataError, match=rf"{victim.source}: cannot decode"):
        check_pairs(pairs, CROP, False, "train")


def test_missing_reference(pipal, tmp_path):
    cfg, _ = pipal
    pairs = train_list(cfg, tmp_path)
    pairs[0].ref.unlink()
    with pytest.raises(DataError, match=rf"{pairs[0].source}: file not found: .*{pairs[0].ref_id}\.bmp"):
        check_pairs(pairs, CROP, False, "train")


def test_duplicate_name_names_both_lines(pipal, tmp_path):
    cfg, _ = pipal
    with open(Path(cfg.root) / "Train_Label" / "A0002.txt", "a") as f:
        f.write("A0001_00_00.bmp,1234\n")
    with pytest.raises(DataError, match=r"Train_Label/A0002\.txt:4: duplicate .*A0001\.txt:1"):
        prepare_splits(cfg, tmp_path / "s")
    pairs = read_pipal_labels(Path(cfg.root) / "Train_Label", [Path(cfg.root) / "Distortion_1"],
                              Path(cfg.root) / "Train_Ref", Path(cfg.root))
    with pytest.raises(DataError, match="duplicate"):
        check_pairs(pairs, CROP, False, "train")


def test_size_mismatch(pipal, tmp_path):
    cfg, _ = pipal
    pairs = train_list(cfg, tmp_path)
    write_img(pairs[2].dis, 0, SIZE, SIZE + 2)
    with pytest.raises(DataError, match=rf"{pairs[2].source}: size mismatch"):
        check_pairs(pairs, CROP, False, "train")


def test_small_images_error_or_upscale(pipal, tmp_path):
    cfg, _ = pipal
    pairs = train_list(cfg, tmp_path)
    crop = SIZE + 4
    with pytest.raises(DataError, match=rf"{pairs[0].source}: .*smaller than the {crop} crop"):
        check_pairs(pairs, crop, False, "train")
    check_pairs(pairs, crop, True, "train")
    stats = LabelStats.from_pairs(pairs, True)
    item = TrainPairs(pairs, crop, AugmentConfig(), stats, seed=0, upscale_small=True)[0]
    assert item["dis"].shape == (3, crop, crop)
    views = RefGroupPairs(pairs, crop, ViewConfig(kind="nine"), stats, chunk=1, upscale_small=True)[0]
    assert views["dis"].shape == (1, 9, 3, crop, crop)
    with pytest.raises(ValueError, match="does not fit"):
        TrainPairs(pairs, crop, AugmentConfig(), stats, seed=0)[0]
    wide = tmp_path / "wide.bmp"
    write_img(wide, 0, 6, 9)
    assert load_rgb(wide, crop).shape == (3, crop, 24)  # aspect ratio kept


def test_missing_folder_and_unknown_config_key(tmp_path):
    with pytest.raises(DataError, match="Train_Label: train label folder not found"):
        prepare_splits(DataConfig(root=str(tmp_path), train_dis=["."]), tmp_path / "s")
    yaml_file = tmp_path / "data.yaml"
    yaml_file.write_text("format: pipal\nroot: /data\nval_frac: 0.3\n")
    with pytest.raises(ConfigError, match=r"data\.yaml, line 3: 'val_frac' unknown key"):
        from_dict(DataConfig, load_yaml(yaml_file))
    with pytest.raises(ConfigError, match="fractions"):
        from_dict(DataConfig, {"format": "csv", "csv": "t.csv", "fractions": [0.5, 0.5]})
    with pytest.raises(ValueError, match="data.csv"):
        DataConfig(format="csv")


# ---- images and Datasets ---------------------------------------------------------------------------

def test_load_rgb(tmp_path):
    write_img(tmp_path / "a.bmp", 7, 5, 9)
    Image.open(tmp_path / "a.bmp").convert("L").save(tmp_path / "g.bmp")
    img = load_rgb(tmp_path / "a.bmp")
    assert img.shape == (3, 5, 9) and img.dtype == torch.float32
    expected = np.asarray(Image.open(tmp_path / "a.bmp"), dtype=np.float32).transpose(2, 0, 1) / 255
    np.testing.assert_allclose(img.numpy(), expected)
    gray = load_rgb(tmp_path / "g.bmp")
    assert gray.shape == (3, 5, 9) and torch.equal(gray[0], gray[2])


def test_train_pairs_reproducible_across_workers_and_epochs(pipal, tmp_path):
    cfg, _ = pipal
    pairs = train_list(cfg, tmp_path)
    stats = LabelStats.from_pairs(pairs, True)
    a = TrainPairs(pairs, CROP, AugmentConfig(), stats, seed=5)
    b = TrainPairs(pairs, CROP, AugmentConfig(), stats, seed=5)
    assert all(torch.equal(a[i]["dis"], b[i]["dis"]) for i in range(len(a)))
    a.set_epoch(3)
    serial = [a[i] for i in range(len(a))]
    assert any(not torch.equal(x["dis"], b[i]["dis"]) for i, x in enumerate(serial))
    parallel = [x for batch in DataLoader(a, batch_size=2, num_workers=2) for x in batch["dis"]]
    assert all(torch.equal(x["dis"], y) for x, y in zip(serial, parallel, strict=True))
    assert [float(x["label"]) for x in serial] == pytest.approx([stats.normalise(p.mos) for p in pairs])


def test_train_pairs_vertical_flip_reproduces_the_release(pipal, tmp_path):
    cfg, _ = pipal
    pairs = train_list(cfg, tmp_path)
    stats = LabelStats.from_pairs(pairs, True)
    plain = TrainPairs(pairs, CROP, AugmentConfig(flip="none"), stats, seed=2)
    vertical = TrainPairs(pairs, CROP, AugmentConfig(flip="vertical", flip_prob=1.0), stats, seed=2)
    for i in range(len(pairs)):
        assert torch.equal(vertical[i]["dis"], plain[i]["dis"].flip(-2))
        assert torch.equal(vertical[i]["ref"], plain[i]["ref"].flip(-2))


def test_reference_chunks_stack_aligned_views(pipal, tmp_path):
    cfg, _ = pipal
    pairs = train_list(cfg, tmp_path)
    stats = LabelStats.from_pairs(pairs, True)
    views = ViewConfig(kind="random", n=4, seed=1, flip=True)
    data = RefGroupPairs(pairs, CROP, views, stats, chunk=1)
    (i, item), = [(k, it) for k, it in enumerate(data) if int(it["index"][0]) == 2]
    dis, ref = load_rgb(pairs[2].dis), load_rgb(pairs[2].ref)
    boxes = make_views(SIZE, SIZE, CROP, views)
    assert torch.equal(item["dis"][0], torch.stack([apply_view(dis, v, CROP) for v in boxes]))
    assert torch.equal(item["ref"], torch.stack([apply_view(ref, v, CROP) for v in boxes]))
    assert float(item["label"][0]) == pytest.approx(stats.normalise(pairs[2].mos))
    assert math.isnan(RefGroupPairs(pairs, CROP, views, None, chunk=1)[i]["label"][0])
    with pytest.raises(DataError, match="training needs labels"):
        TrainPairs([Pair("u", pairs[0].dis, pairs[0].ref, "r", None, "x.txt:1")], CROP, AugmentConfig(), stats, 0)
