"""Pseudo-labelled training pairs: the label table, the held-out check, and the verification a member
makes before it trains on them (`data.pseudo_labels`).

The folder is written by `make pseudo-label` (members.launch.pseudo_label; file names and the manifest's
summary in members.contract.pseudo). A member refuses, in one line naming the file and the command that
rebuilds it: a manifest edited since it was sealed, a `labels.csv` that is not the one it vouches for,
an image whose content changed, and any pair that touches an image of its own validation, test or valid
split (by path or by content, so a copy is caught). The validation split is never allowed: it chooses
the member's checkpoints and fits the ensemble, and the teacher's labels of it would leak into both;
test and valid inputs only when the labels were made with `--allow-test-inputs` (recorded in the
manifest and, through the member's records, in the submission readme). A teacher that has been refitted
or removed since does not matter: the labels are what the manifest vouches for.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from members.contract.data_config import VALID, DataError
from members.contract.filehash import sha256_file
from members.contract.pseudo import KIND, LABELS, MANIFEST, manifest_path, summary
from members.contract.stagefiles import StageFileError, read_stage_outputs
from members.data.hashing import image_hashes
from members.data.index import MAX_REPORTED, Pair, check_pairs
from members.data.splits import SPLIT_COLUMNS, read_split

HELD_OUT = ("val", "test", VALID)  # never trained on by default; val never at all
LABEL_COLUMNS = [*SPLIT_COLUMNS, "teacher_score"]  # the split-list columns (mos = the pseudo-label) + the raw score
GENERIC_REBUILD = "make pseudo-label EXPERIMENT=<the fitted teacher experiment> SOURCE=generate (or your pairs)"


@dataclass(frozen=True)
class PseudoLabels:
    """A verified label table: its pairs (labels on the MOS scale) and the summary a member records."""

    pairs: list[Pair]
    summary: dict


@dataclass(frozen=True)
class SplitImages:
    """Where the images of split lists are: absolute path -> split, and sha256 -> split (a held-out split
    wins over train when one image is in both)."""

    by_path: dict[str, str]
    by_content: dict[str, str]


def split_images(splits: dict[str, list[Pair]], cache_dir: Path | None) -> SplitImages:
    """Index the images (distorted and references) of `splits`, hashed through `cache_dir`'s cache."""
    order = [s for s in (*HELD_OUT, "train") if s in splits]
    paths = {s: sorted({str(p) for pair in splits[s] for p in (pair.dis, pair.ref)}) for s in order}
    hashes = image_hashes([Path(p) for s in order for p in paths[s]], cache_dir)
    by_path: dict[str, str] = {}
    by_content: dict[str, str] = {}
    for split in order:
        for path in paths[split]:
            by_path.setdefault(os.path.abspath(path), split)
            if hashes.get(path):
                by_content.setdefault(hashes[path], split)
    return SplitImages(by_path, by_content)


def _where(path: Path, digest: str | None, index: SplitImages) -> tuple[str, str] | None:
    """(split, how) when the image at `path` is an image of a split list, by path or by content."""
    split = index.by_path.get(os.path.abspath(path))
    if split is not None:
        return split, "listed there"
    if digest and digest in index.by_content:
        return index.by_content[digest], "same content as an image listed there"
    return None


def classify_pairs(pairs: list[Pair], hashes: dict[str, str | None], index: SplitImages, allow_test_inputs: bool,
                   generated: set[str]) -> tuple[dict[str, str], list[str]]:
    """Each pair's origin (members.contract.pseudo.ORIGINS) by name, and one line per pair that may not be
    pseudo-labelled or trained on (it touches a validation image, or a test/valid one without
    `allow_test_inputs`), naming the pair, where it was listed and the image."""
    origins, refused = {}, []
    for pair in pairs:
        found = {role: _where(path, hashes.get(str(path)), index) for role, path in (("reference", pair.ref),
                                                                                      ("distorted image", pair.dis))}
        held = [(role, f) for role, f in found.items() if f is not None and f[0] in HELD_OUT]
        val = [(role, f) for role, f in held if f[0] == "val"]
        shown = val or held
        if val or (held and not allow_test_inputs):
            role, (split, how) = shown[0]
            path = pair.ref if role == "reference" else pair.dis
            refused.append(f"pair {pair.name} ({pair.source}): its {role} {path} is a {split}-split image ({how})")
        elif held:
            origins[pair.name] = "test_inputs"
        elif pair.name in generated:
            origins[pair.name] = "generated"
        elif all(f is not None and f[0] == "train" for f in found.values()):
            origins[pair.name] = "training"
        else:
            origins[pair.name] = "outside"
    return origins, refused


WHY_REFUSED = ("the validation split is never pseudo-labelled or trained on (it chooses checkpoints and fits the "
               "ensemble), test and valid inputs only with --allow-test-inputs (challenge rules usually forbid "
               "training on them)")


def refuse(lines: list[str], what: str, then: str) -> None:
    """One DataError listing the refused pairs (the first MAX_REPORTED), why, and what to do (`then`)."""
    if lines:
        more = f"\n  ... and {len(lines) - MAX_REPORTED} more" if len(lines) > MAX_REPORTED else ""
        raise DataError(f"{what}: {len(lines)} pair(s) refused: {WHY_REFUSED}; {then}:\n  "
                        + "\n  ".join(lines[:MAX_REPORTED]) + more)


def label_table(rows: list[tuple[Pair, float, float]]) -> str:
    """`labels.csv` text: (pair, label, teacher score) rows sorted by name, numbers in full."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(LABEL_COLUMNS)
    for pair, label, teacher in sorted(rows, key=lambda r: r[0].name):
        writer.writerow([pair.name, str(pair.dis), str(pair.ref), pair.ref_id, repr(float(label)), pair.source,
                         repr(float(teacher))])
    return buf.getvalue()


def rebuild_command(path: Path) -> str:
    """The command that made the manifest at `path` (as it records it), for messages; a generic one when
    it cannot be read."""
    try:
        command = json.loads(path.read_text(encoding="utf-8")).get("command")
    except (OSError, ValueError, AttributeError):
        command = None
    return command if isinstance(command, str) and command else GENERIC_REBUILD


def read_manifest(path: Path) -> dict:
    """A pseudo-label manifest after checking its seal and that `labels.csv` is the one it vouches for."""
    rebuild = rebuild_command(path)
    manifest = read_stage_outputs(path.parent, path.name, [LABELS], rebuild)
    if manifest.get("kind") != KIND or not isinstance(manifest.get("images"), dict):
        raise StageFileError(f"{path}: not a pseudo-label manifest (no kind '{KIND}' or no images); run {rebuild}")
    return manifest


def read_pseudo_labels(setting: str, weight: float, splits: dict[str, list[Pair]], split_dir: Path, crop: int,
                       upscale_small: bool) -> PseudoLabels:
    """The verified pseudo-labelled pairs `data.pseudo_labels` names, for a member whose split lists are
    `splits` (in `split_dir`); DataError or StageFileError in one line naming the file otherwise."""
    path = manifest_path(setting)
    if not path.is_file():
        raise DataError(f"data.pseudo_labels: {path}: not found; make the pseudo-labels with {GENERIC_REBUILD}")
    first = read_manifest(path)
    rebuild = rebuild_command(path)
    try:
        pairs = read_split(path.parent / LABELS)
    except DataError as err:
        raise DataError(f"{err}; rebuild the pseudo-labels with {rebuild}") from None
    recorded = first["images"]
    paths = sorted({str(p) for pair in pairs for p in (pair.dis, pair.ref)})
    now = image_hashes([Path(p) for p in paths], path.parent)
    for image in paths:
        if image not in recorded:
            raise StageFileError(f"{path.parent / LABELS}: lists {image}, which {path.name} does not record; rebuild "
                                 f"the pseudo-labels with {rebuild}")
        if now[image] != recorded[image]:
            state = "missing" if now[image] is None else "changed since the pseudo-labels were made"
            raise StageFileError(f"{image}: {state} (its sha256 no longer matches {path}); rebuild the pseudo-labels "
                                 f"with {rebuild}")
    _, refused = classify_pairs(pairs, now, split_images(splits, split_dir), bool(first.get("allow_test_inputs")),
                                set())
    refuse(refused, f"{path.parent / LABELS} (data.pseudo_labels)", "compared with this member's split lists in "
           f"{split_dir}; rebuild the labels without those pairs (a teacher with this member's split lists)")
    _note_teacher(first, path)
    check_pairs(pairs, crop, upscale_small, str(path.parent / LABELS))
    return PseudoLabels(pairs, summary(first, sha256_file(path), path, weight))


def _note_teacher(manifest: dict, path: Path) -> None:
    """Say when the teacher ensemble has been refitted since: the labels stay what they are."""
    teacher = manifest.get("teacher", {})
    ensemble = Path(teacher.get("ensemble_json", ""))
    if ensemble.is_file() and sha256_file(ensemble) != teacher.get("ensemble_sha256"):
        print(f"note: {ensemble} has been refitted since {path} was made; the member trains on the labels as made "
              f"(rebuild them with {rebuild_command(path)} to use the new teacher)", flush=True)


__all__ = ["HELD_OUT", "LABEL_COLUMNS", "MANIFEST", "PseudoLabels", "SplitImages", "classify_pairs", "label_table",
           "read_manifest", "read_pseudo_labels", "refuse", "split_images"]
