"""Split lists: the data config, seeded splits by reference image, label scaling, content fingerprints.

Splits are written once per experiment (`prepare_splits`) and read back by every member, so all
members train and predict on the same lists. Images of one reference share content, so every split
is made by REFERENCE image; a split by image would leak. Later stages check that the lists still
describe the data (`check_split_lists`). Torch-free: the ensemble and submission stages import it.

Reading and checking the raw lists lives in `members.data.index`; the torch Datasets in
`members.data.datasets`.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from members.contract.atomic import atomic_write_text
from members.contract.config import to_dict
from members.contract.data_config import SPLITS, VALID, DataConfig, DataError
from members.contract.stagefiles import StageFileError, rebuild_members, splits_content
from members.data.hashing import image_hashes
from members.data.index import (Pair, check_pairs, check_unique, read_csv_table, read_ntire_folder,
                                read_pipal_labels, read_ref_groups)

if TYPE_CHECKING:
    from members.contract.member import MemberConfig

__all__ = ["DataConfig", "LabelStats", "build_splits", "check_split_lists", "prepare_member_data", "prepare_splits",
           "read_split", "SPLITS", "VALID"]

SPLIT_COLUMNS = ["name", "dis", "ref", "ref_id", "mos", "source"]
# Fields that do not change which images land in which split; changing them keeps the split dir valid.
# The pseudo-labels are extra training pairs of one member (members.data.pseudo), not part of the lists.
NOT_FINGERPRINTED = ("upscale_small", "pseudo_labels", "pseudo_weight")
# Fields added after split folders were in use: fingerprinted only when set, so those folders stay valid.
FINGERPRINTED_WHEN_SET = ("ref_groups",)
# The no-reference track's fields: fingerprinted only for track nr (an fr split folder never reads them).
NR_TRACK_FIELDS = ("track", "nr_valid_dis", "nr_test_dis")
HASHES = "lists+image sha256"  # what `splits.json`'s fingerprints hash (older kits: lists + image sizes)


@dataclass
class LabelStats:
    """Min-max label scaling fitted on the TRAIN list (as the release), oriented higher = better."""

    min: float
    max: float
    higher_is_better: bool = True

    @classmethod
    def from_pairs(cls, pairs: list[Pair], higher_is_better: bool) -> LabelStats:
        scores = [p.mos for p in pairs if p.mos is not None]
        if len(scores) != len(pairs) or not scores:
            raise DataError("label statistics need a non-empty, fully labelled train list")
        if max(scores) <= min(scores):
            raise DataError(f"all train labels equal {scores[0]}: cannot scale them")
        return cls(float(min(scores)), float(max(scores)), higher_is_better)

    def normalise(self, mos: float | np.ndarray) -> float | np.ndarray:
        """MOS -> [0, 1] on the train range (values outside it fall outside); 1 = best quality."""
        x = (mos - self.min) / (self.max - self.min)
        return x if self.higher_is_better else 1 - x

    def denormalise(self, score: float | np.ndarray) -> float | np.ndarray:
        """Inverse of `normalise`: a model score back on the dataset's original MOS scale."""
        x = score if self.higher_is_better else 1 - score
        return x * (self.max - self.min) + self.min

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> LabelStats:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(float(data["min"]), float(data["max"]), bool(data["higher_is_better"]))


def _folder(root: Path, sub: str, what: str) -> Path:
    path = root / sub
    if not path.is_dir():
        raise DataError(f"{path}: {what} folder not found (check data.root and the folder names)")
    return path


def _labelled_or_folder(root: Path, labels: str, dis: str, ref: str | None, what: str) -> list[Pair]:
    """The pairs of an NTIRE folder, labelled from `labels` when given; `ref` None: the no-reference
    track's folder (distorted images only, no reference paths)."""
    dis_dir = _folder(root, dis, f"{what} distorted")
    ref_dir = _folder(root, ref, f"{what} reference") if ref is not None else None
    if labels:
        return read_pipal_labels(_folder(root, labels, f"{what} label"), [dis_dir], ref_dir, root)
    return read_ntire_folder(dis_dir, ref_dir, root)


def _pick_refs(ref_ids: list[str], bounds: list[float], seed: int, cfg: DataConfig) -> list[set[str]]:
    """Shuffle the sorted reference ids (or, with `cfg.ref_groups`, the sorted groups) with `seed`
    and cut them at the cumulative fractions `bounds`."""
    ids = set(ref_ids)
    group = (read_ref_groups(Path(cfg.root) / cfg.ref_groups, ids) if cfg.ref_groups
             else {r: r for r in ids})
    order = np.random.default_rng(seed).permutation(sorted({group[r] for r in ids})).tolist()
    cuts = [0] + [int(math.floor(b * len(order) + 0.5)) for b in bounds] + [len(order)]
    parts = [set(order[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    return [{r for r in ids if group[r] in part} for part in parts]


def build_splits(cfg: DataConfig) -> dict[str, list[Pair]]:
    """Read the index and split it by reference image (no file is written, no image opened)."""
    root = Path(cfg.root)
    if cfg.format == "csv":
        pairs = read_csv_table(Path(cfg.csv), root)
        check_unique(pairs, cfg.csv)
        f = cfg.fractions
        groups = _pick_refs([p.ref_id for p in pairs], [f[0], f[0] + f[1]], cfg.split_seed, cfg)
        splits = {s: [p for p in pairs if p.ref_id in g] for s, g in zip(SPLITS, groups)}
    else:
        dis_dirs = [root / d for d in cfg.train_dis]
        if not any(d.is_dir() for d in dis_dirs):
            raise DataError(f"{root}: none of the training distortion folders exist: {', '.join(cfg.train_dis)}")
        train = read_pipal_labels(_folder(root, cfg.train_labels, "train label"), dis_dirs,
                                  _folder(root, cfg.train_ref, "train reference"), root)
        # the no-reference track: its own folders of distorted images, no reference (train/val as fr)
        blind = cfg.track == "nr"
        valid_dis, valid_ref = (cfg.nr_valid_dis, None) if blind else (cfg.valid_dis, cfg.valid_ref)
        test_dis, test_ref = (cfg.nr_test_dis, None) if blind else (cfg.test_dis, cfg.test_ref)
        what = "NR " if blind else ""
        if cfg.val_source == "holdout":
            val_refs, _ = _pick_refs([p.ref_id for p in train], [cfg.val_fraction], cfg.split_seed, cfg)
            val = [p for p in train if p.ref_id in val_refs]
            train = [p for p in train if p.ref_id not in val_refs]
        else:
            val = _labelled_or_folder(root, cfg.valid_labels, valid_dis, valid_ref, f"{what}validation")
        test = _labelled_or_folder(root, cfg.test_labels, test_dis, test_ref, f"{what}test")
        splits = {"train": train, "val": val, "test": test}
        if (root / valid_dis).is_dir() and (valid_ref is None or (root / valid_ref).is_dir()):
            splits[VALID] = _labelled_or_folder(root, cfg.valid_labels, valid_dis, valid_ref, f"{what}validation")
    for split, pairs in splits.items():
        if not pairs:
            raise DataError(f"{cfg.root or '.'}: the {split} split is empty (too few reference images "
                            "for the fractions, or an empty folder)")
        check_unique(pairs, f"{split} split")
    return {s: sorted(pairs, key=lambda p: p.name) for s, pairs in splits.items()}


def _fingerprinted(cfg: DataConfig) -> dict:
    return {k: v for k, v in to_dict(cfg).items()
            if k not in NOT_FINGERPRINTED and (v or k not in FINGERPRINTED_WHEN_SET)
            and (cfg.track == "nr" or k not in NR_TRACK_FIELDS)}


def _fingerprint(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _split_csv(pairs: list[Pair]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(SPLIT_COLUMNS)
    for p in pairs:
        writer.writerow([p.name, str(p.dis), "" if p.ref is None else str(p.ref), p.ref_id,
                         "" if p.mos is None else repr(p.mos), p.source])
    return buf.getvalue()


def read_split(path: Path) -> list[Pair]:
    """Read a split list written by `prepare_splits` (columns name,dis,ref,ref_id,mos[,source]); an empty
    `ref` (the no-reference track's test and validation lists) reads as None."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: split list not found")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = set(SPLIT_COLUMNS[:5]) - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path}:1: missing column(s) {', '.join(sorted(missing))}")
        pairs = []
        for row in reader:
            where = f"{path}:{reader.line_num}"
            try:
                mos = float(row["mos"]) if row["mos"] else None
            except ValueError:
                raise DataError(f"{where}: mos {row['mos']!r} is not a number") from None
            pairs.append(Pair(row["name"], Path(row["dis"]), Path(row["ref"]) if row["ref"] else None, row["ref_id"],
                              mos, row.get("source") or where))
    if not pairs:
        raise DataError(f"{path}: the split list is empty")
    return pairs


TRAINING_SPLITS = ("train", "val")  # what training reads; test and valid only feed predictions


def _fingerprints(splits: dict[str, list[Pair]], groups: dict[str, tuple[str, ...]], cache_dir: Path | None,
                  texts: dict[str, str] | None = None) -> dict[str, str]:
    """The content fingerprint of each group of splits (its lists and the sha256 of their images; see
    `content_fingerprint`), every image hashed once for all groups; `texts`: the lists, if made already."""
    texts = texts or {s: _split_csv(p) for s, p in splits.items()}
    paths = {s: {path for p in pairs for path in (p.dis, p.ref) if path is not None} for s, pairs in splits.items()}
    hashes = image_hashes(sorted(set().union(*paths.values()), key=str), cache_dir)
    keys = {s: {str(path) for path in group} for s, group in paths.items()}
    return {name: _fingerprint({"lists": {s: texts[s] for s in sorted(chosen)},
                                "images": {k: hashes[k] for k in set().union(*(keys[s] for s in chosen))}})
            for name, chosen in groups.items()}


def content_fingerprint(splits: dict[str, list[Pair]], cache_dir: Path | None = None) -> str:
    """Hash of the data the splits were built from: every list (names, paths, MOS) and the sha256 of
    every image, so an edited score or an image replaced, even by one of the same size, changes it.
    Time stamps only decide whether a hash cached in `cache_dir` can be reused: copying a dataset to
    another machine changes nothing."""
    return _fingerprints(splits, {"all": tuple(splits)}, cache_dir)["all"]


def content_record(splits: dict[str, list[Pair]], cache_dir: Path | None = None,
                   texts: dict[str, str] | None = None) -> dict:
    """The content fingerprints `splits.json` records, every image hashed once: "content" (every list),
    "training_content" (the lists training reads) and "split_content" (each split on its own: what a
    member's predictions of that split were made from, `members.contract.verify`)."""
    found = _fingerprints(splits, {"content": tuple(splits), "training_content": TRAINING_SPLITS,
                                   **{f"split/{s}": (s,) for s in splits}}, cache_dir, texts)
    return {"content": found["content"], "training_content": found["training_content"],
            "split_content": {s: found[f"split/{s}"] for s in sorted(splits)}}


def prepare_splits(cfg: DataConfig, split_dir: Path) -> dict[str, list[Pair]]:
    """Write `split_dir/{train,val,test}.csv`, `label_stats.json` and `splits.json` when the data changed.

    The lists are rebuilt from the label files and folders on every call (no image is opened), so an
    edited score or a fixed file takes effect at once; `splits.json` (written last) records the data
    config and the content fingerprint. A directory made from another data config is refused rather
    than overwritten: other members may be using it.
    """
    split_dir = Path(split_dir)
    marker = split_dir / "splits.json"
    data = _fingerprinted(cfg)
    saved = {}
    if marker.is_file():
        try:
            saved = json.loads(marker.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            saved = {}  # a damaged marker: rebuild the directory below
        if saved and saved.get("fingerprint") != _fingerprint(data):
            old = saved.get("data", {})
            diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in data.items() if old.get(k) != v]
            raise DataError(f"{marker}: these splits were made from a different data config "
                            f"({'; '.join(diff) or 'unknown difference'}); use another split directory "
                            f"or delete {split_dir}")
    splits = build_splits(cfg)
    texts = {split: _split_csv(pairs) for split, pairs in splits.items()}
    contents = content_record(splits, split_dir, texts)
    content = contents["content"]
    # A list edited by hand would be hashed into the members' manifests as if they had predicted it,
    # while they predict (and train on) what the data says: the files must say the same.
    edited = [s for s, text in texts.items() if _read_text(split_dir / f"{s}.csv") != text]
    if all(saved.get(k) == v for k, v in contents.items()) and not edited:
        return splits
    if saved.get("content") == content and edited:
        print(f"{split_dir}: {', '.join(f'{s}.csv' for s in edited)} differ(s) from the data (edited by hand, "
              "or missing); rewriting from the data", flush=True)
    elif saved and saved.get("hashes") != HASHES:
        print(f"{split_dir}: these split lists were fingerprinted by an older kit (image sizes, not contents); "
              "recording their new fingerprint", flush=True)
    elif saved.get("content") == content:
        print(f"{split_dir}: recording the content fingerprint of each split (splits.json of an older kit)",
              flush=True)
    elif saved:
        print(f"{split_dir}: the data changed since these split lists were written; rewriting them", flush=True)
    marker.unlink(missing_ok=True)  # the lists below and the marker never disagree, even if killed
    for split, text in texts.items():
        atomic_write_text(split_dir / f"{split}.csv", text)
    if VALID not in splits:
        (split_dir / f"{VALID}.csv").unlink(missing_ok=True)  # the folder is gone: so is its list
    LabelStats.from_pairs(splits["train"], cfg.higher_is_better).save(split_dir / "label_stats.json")
    counts = {s: {"images": len(p), "references": len({x.ref_id for x in p}),
                  "labelled": all(x.mos is not None for x in p)} for s, p in splits.items()}
    atomic_write_text(marker, json.dumps({"fingerprint": _fingerprint(data), "hashes": HASHES, **contents,
                                          "data": data, "counts": counts}, indent=2) + "\n")
    return splits


def _read_text(path: Path) -> str | None:
    """The file's exact text (no newline translation: the manifests hash its bytes), or None."""
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def check_split_lists(split_dir: Path, data_cfg: object, experiment: str | Path | None = None) -> None:
    """Refuse split lists that the data has moved away from: a score fixed in a label file, images
    added or removed. The members' manifests only prove that they predicted these lists; the lists
    must also still be what the data says, or the ensemble would fit (and the zip come from) stale MOS.

    The lists are rebuilt in memory from the label files and folders and compared with the content
    fingerprint `prepare_splits` recorded, images hashed as there (through the split folder's cache,
    so an image replaced by one of the same size is seen). Skipped when the lists carry no record
    (written by hand) or the data is not on this machine (the ensemble needs no images). Errors name the
    command that rebuilds the members of `experiment` (its config path, when the caller knows it).
    """

    recorded = splits_content(Path(split_dir))
    source = Path(data_cfg.csv if data_cfg.format == "csv" else data_cfg.root or ".")
    if recorded is None or not source.exists():
        return
    try:
        current = content_fingerprint(build_splits(data_cfg), Path(split_dir))
    except DataError as err:
        raise StageFileError(f"{split_dir}: cannot compare the split lists with the data they were made from: "
                             f"{err}; fix the data, then run {rebuild_members(experiment)}") from None
    if current != recorded:
        raise StageFileError(f"{split_dir}: the data in {source} changed since these split lists were written "
                             f"(a label edited, images added, removed or replaced; data fingerprint {recorded} -> "
                             f"{current}); run {rebuild_members(experiment)} to rebuild the lists and the members "
                             "made from them, then this stage again")


def prepare_member_data(cfg: MemberConfig) -> tuple[dict[str, list[Pair]], LabelStats]:
    """The member's split lists and label statistics, with every list checked once, up front.

    The check (every file decodes, sizes match, names unique, images fit the crop) runs the first
    time a split directory is used with a given crop; a marker file records that it passed. A blind
    member's check (model.kind nr) never opens a reference: it reads none.
    """
    split_dir = Path(cfg.split_dir)
    splits = prepare_splits(cfg.data, split_dir)
    stats = LabelStats.load(split_dir / "label_stats.json")
    blind = cfg.model.kind == "nr"
    marker = split_dir / f"checked_crop{cfg.model.crop}_upscale{int(cfg.data.upscale_small)}{'_blind' * blind}.json"
    content = splits_content(split_dir)
    try:
        checked = json.loads(marker.read_text(encoding="utf-8")).get("content")
    except (OSError, ValueError, AttributeError):
        checked = None
    if checked is None or checked != content:  # checked for other data (or never): check again
        for split, pairs in splits.items():
            check_pairs(pairs, cfg.model.crop, cfg.data.upscale_small, str(split_dir / f"{split}.csv"), blind)
        atomic_write_text(marker, json.dumps({"content": content, **{s: len(p) for s, p in splits.items()}}) + "\n")
    return splits, stats
