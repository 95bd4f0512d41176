"""Trust, round 2 (issue 17), the data side: a same-size image swap is seen (cases 1), the demo's hidden
labels stay out of the pipeline (8), and the demo holds out whole photos (9)."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_data import make_pipal

from members.contract import filehash
from members.contract.member import load_member_config
from members.contract.schema import load_experiment
from members.contract.stagefiles import StageFileError
from members.data import demo_data, hashing
from members.data import splits as data_mod
from members.data.hashing import CONTENT_CACHE
from members.data.splits import (VALID, DataConfig, build_splits, check_split_lists, prepare_splits,
                                 splits_content)

REPO = Path(__file__).resolve().parents[1]


def _swap(root: Path, src: str, dst: str, keep_mtime: bool) -> None:
    """Copy one image over another of the same size (as `cp`, or `cp -p` which keeps the old mtime)."""
    source, target = next(root.glob(f"*/{src}")), next(root.glob(f"*/{dst}"))
    assert source.stat().st_size == target.stat().st_size and source.read_bytes() != target.read_bytes()
    mtime = target.stat().st_mtime_ns
    shutil.copyfile(source, target)
    if keep_mtime:  # the worst case for a stat cache: size and mtime as they were
        os.utime(target, ns=(mtime, mtime))


# ---- case 1: image content, not sizes -------------------------------------------------------------
@pytest.mark.parametrize("keep_mtime", [False, True])
def test_a_same_size_swap_of_a_training_image_rebuilds_the_lists(tmp_path, keep_mtime):
    make_pipal(tmp_path / "pipal")
    cfg = DataConfig(root=str(tmp_path / "pipal"), val_fraction=0.2)
    splits = prepare_splits(cfg, tmp_path / "splits")
    before = {k: splits_content(tmp_path / "splits", k) for k in ("content", "training_content")}
    first, second = (p.name for p in splits["train"][:2])
    _swap(tmp_path / "pipal", second, first, keep_mtime)
    prepare_splits(cfg, tmp_path / "splits")
    after = {k: splits_content(tmp_path / "splits", k) for k in ("content", "training_content")}
    # as for an edited label: new fingerprints, so members trained on the old image are refused
    assert after["content"] != before["content"] and after["training_content"] != before["training_content"]


def test_a_same_size_swap_of_a_test_image_is_refused_by_the_later_stages(tmp_path):
    make_pipal(tmp_path / "pipal")
    cfg = DataConfig(root=str(tmp_path / "pipal"), val_fraction=0.2)
    prepare_splits(cfg, tmp_path / "splits")
    check_split_lists(tmp_path / "splits", cfg)  # unchanged data: passes
    _swap(tmp_path / "pipal", "A0201_10_01.bmp", "A0201_10_00.bmp", keep_mtime=True)
    with pytest.raises(StageFileError, match=r"splits: the data in .* changed .* replaced"):
        check_split_lists(tmp_path / "splits", cfg)


def test_the_fingerprint_ignores_mtimes_and_the_cache_is_reused(tmp_path, monkeypatch):
    make_pipal(tmp_path / "pipal")
    cfg = DataConfig(root=str(tmp_path / "pipal"), val_fraction=0.2)
    monkeypatch.setattr(filehash, "RACY_SECONDS", 0.0)  # the files were written just now
    hashed = []
    real = hashing.sha256_file
    monkeypatch.setattr(hashing, "sha256_file", lambda path: hashed.append(path) or real(path))
    prepare_splits(cfg, tmp_path / "splits")
    n_images = len({p for s in build_splits(cfg).values() for x in s for p in (x.dis, x.ref)})
    assert len(hashed) == n_images  # each image once, though two fingerprints are made
    content = splits_content(tmp_path / "splits")
    hashed.clear()
    check_split_lists(tmp_path / "splits", cfg)
    assert hashed == []  # all from the cache
    for path in (tmp_path / "pipal").rglob("*.bmp"):  # as after a copy to another machine
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    check_split_lists(tmp_path / "splits", cfg)
    assert len(hashed) == n_images and prepare_splits(cfg, tmp_path / "splits") and \
        splits_content(tmp_path / "splits") == content


@pytest.mark.parametrize("damage", ["", "{torn", "[1, 2]", '{"version": 1, "files": {"x": 3}}', "\xff\xfe"])
def test_a_damaged_cache_is_ignored_and_rebuilt(tmp_path, damage):
    make_pipal(tmp_path / "pipal")
    cfg = DataConfig(root=str(tmp_path / "pipal"), val_fraction=0.2)
    prepare_splits(cfg, tmp_path / "clean")
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / CONTENT_CACHE).write_text(damage, encoding="latin-1")
    prepare_splits(cfg, tmp_path / "splits")
    assert splits_content(tmp_path / "splits") == splits_content(tmp_path / "clean")
    json.loads((tmp_path / "splits" / CONTENT_CACHE).read_text(encoding="utf-8"))  # rewritten whole
    check_split_lists(tmp_path / "splits", cfg)


def test_a_cached_hash_of_a_file_since_rewritten_is_not_trusted(tmp_path, monkeypatch):
    # A stale entry must never vouch for other bytes: an entry whose stat differs is re-hashed.
    make_pipal(tmp_path / "pipal")
    cfg = DataConfig(root=str(tmp_path / "pipal"), val_fraction=0.2)
    monkeypatch.setattr(filehash, "RACY_SECONDS", 0.0)
    prepare_splits(cfg, tmp_path / "splits")
    cache = json.loads((tmp_path / "splits" / CONTENT_CACHE).read_text(encoding="utf-8"))
    assert cache["files"] and all(len(v) == 5 for v in cache["files"].values())
    _swap(tmp_path / "pipal", "A0202_10_01.bmp", "A0202_10_00.bmp", keep_mtime=True)
    with pytest.raises(StageFileError, match="changed since these split lists were written"):
        check_split_lists(tmp_path / "splits", cfg)



def test_a_forged_cache_entry_does_not_hide_a_swapped_image(tmp_path, monkeypatch, capsys):
    """Before: content_cache.json was trusted as it stood, so an image swapped and its entry given the new
    stat but the old hash passed check_split_lists: the swap was never seen. The cache is sealed now; one
    whose seal fails is ignored (every image hashed again), with one line saying so."""
    make_pipal(tmp_path / "pipal")
    cfg = DataConfig(root=str(tmp_path / "pipal"), val_fraction=0.2)
    monkeypatch.setattr(filehash, "RACY_SECONDS", 0.0)
    prepare_splits(cfg, tmp_path / "splits")
    path = tmp_path / "splits" / CONTENT_CACHE
    cache = json.loads(path.read_text(encoding="utf-8"))
    target = next((tmp_path / "pipal").glob("*/A0202_10_00.bmp"))
    old_hash = cache["files"][os.path.abspath(target)][4]
    _swap(tmp_path / "pipal", "A0202_10_01.bmp", "A0202_10_00.bmp", keep_mtime=False)
    st = target.stat()
    cache["files"][os.path.abspath(target)] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, old_hash]
    path.write_text(json.dumps(cache), encoding="utf-8")  # the entry forged: new stat, old hash
    capsys.readouterr()
    with pytest.raises(StageFileError, match="changed since these split lists were written"):
        check_split_lists(tmp_path / "splits", cfg)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and str(path) in out[0] and "hashing every image again" in out[0]
    # the rewritten cache is sealed again: the next run reuses it, silently
    prepare_splits(cfg, tmp_path / "splits")
    capsys.readouterr()
    hashed = []
    real = hashing.sha256_file
    monkeypatch.setattr(hashing, "sha256_file", lambda p: hashed.append(p) or real(p))
    check_split_lists(tmp_path / "splits", cfg)
    assert hashed == [] and capsys.readouterr().out == ""


# ---- case 8: the demo's hidden labels stay hidden -------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "data"
    demo_data.build(root, size=24, seed=0)
    return root


def shipped_demo_members() -> list:
    """The member configs of configs/demo.yaml and the tiny test member, as shipped."""
    exp = load_experiment(REPO / "configs" / "demo.yaml")
    return [m.config for m in exp.members] + [load_member_config(REPO / "configs" / "members" / "tiny.yaml")]


def test_the_demo_configs_never_read_the_hidden_labels(demo, tmp_path):
    for cfg in shipped_demo_members():
        assert cfg.data.test_labels == "" and cfg.data.valid_labels == "", cfg.name
        data = dataclasses.replace(cfg.data, root=str(demo))
        splits = prepare_splits(data, tmp_path / cfg.name)
        assert set(splits) == {"train", "val", "test", VALID}
        for split in ("test", VALID):
            assert all(p.mos is None for p in splits[split]), (cfg.name, split)
            rows = (tmp_path / cfg.name / f"{split}.csv").read_text().splitlines()[1:]
            assert rows and all(row.split(",")[4] == "" for row in rows), (cfg.name, split)


# ---- case 9: whole photos held out ----------------------------------------------------------------
def photo_of_ref(demo: Path) -> dict[str, str]:
    """Each reference's photo, as the dataset's group file says, after checking the file against the
    pixels: every reference must be a crop of the photo it is listed under."""
    groups = dict(line.split(",") for line in (demo / demo_data.REF_GROUPS).read_text().splitlines())
    crops = {photo: demo_data.photo_crops(demo_data._load_photo(photo), n, 24)
             for photos, *_ in demo_data.SPLITS.values() for photo, n in photos}
    refs = {p.stem: p for p in demo.glob("*_Ref/*.bmp")}
    assert set(groups) == set(refs)
    for ref_id, path in refs.items():
        pixels = np.asarray(Image.open(path).convert("RGB"))
        assert any(np.array_equal(pixels, c) for c in crops[groups[ref_id]]), ref_id
    return groups


def test_no_demo_photo_spans_two_splits(demo):
    photo = photo_of_ref(demo)
    for cfg in shipped_demo_members()[:-1]:  # the demo's members (tiny is the tests' member)
        splits = build_splits(dataclasses.replace(cfg.data, root=str(demo)))
        photos = {s: {photo[p.ref_id] for p in pairs} for s, pairs in splits.items()}
        for a in photos:
            for b in photos:
                assert a == b or not photos[a] & photos[b], (cfg.name, a, b, photos[a] & photos[b])
        assert len({p.ref_id for p in splits["val"]}) >= 3  # enough references for the ensemble's folds
        assert len({p.ref_id for p in splits["train"]}) >= 9


def test_groups_hold_references_together_in_a_csv_split(tmp_path):
    rows = ["dis_img_path,dis_type,ref_img_path,score"]
    rows += [f"d{r}_{k}.bmp,t,r{r}.bmp,{r * 10 + k}" for r in range(12) for k in range(2)]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "groups.csv").write_text("".join(f"r{r}.bmp,photo{r // 3}\n" for r in range(12)))
    splits = build_splits(DataConfig(format="csv", csv=str(tmp_path / "t.csv"), root=str(tmp_path),
                                     ref_groups="groups.csv", fractions=[0.5, 0.25, 0.25]))
    groups = {s: {int(p.ref_id[1:-4]) // 3 for p in pairs} for s, pairs in splits.items()}
    assert sorted(len(g) for g in groups.values()) == [1, 1, 2]
    assert not (groups["train"] & groups["val"] or groups["train"] & groups["test"] or groups["val"] & groups["test"])


@pytest.mark.parametrize("text, message", [
    ("A0001,p\nA0002\n", r"groups.csv:2: expected 'ref_id,group'"),
    ("A0001,p\nA0001,q\n", r"groups.csv:2: A0001 is listed twice"),
    ("A0001,p\n", r"groups.csv: does not list reference A0002 \(and 3 more\)"),
])
def test_a_bad_group_file_is_one_line(tmp_path, text, message):
    make_pipal(tmp_path / "pipal")
    (tmp_path / "pipal" / "groups.csv").write_text(text)
    with pytest.raises(data_mod.DataError, match=message):
        build_splits(DataConfig(root=str(tmp_path / "pipal"), ref_groups="groups.csv"))


def test_an_empty_group_setting_keeps_existing_split_folders_valid(tmp_path):
    # Split folders made before the setting existed record a config fingerprint without it.
    cfg = DataConfig(root="r")
    assert "ref_groups" not in data_mod._fingerprinted(cfg)
    assert "ref_groups" in data_mod._fingerprinted(dataclasses.replace(cfg, ref_groups="g.csv"))
