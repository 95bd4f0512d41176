"""Pseudo-label folders: their file names, and what a member trained on them records (torch-free).

`make pseudo-label` (members.launch.pseudo_label) writes, into its folder (default
`<runs_dir>/pseudo_labels/`):
- `labels.csv`: one row per distorted image, in the split-list columns (`name,dis,ref,ref_id,mos,source`,
  plus `teacher_score`, the ensemble's own score): `mos` is the pseudo-label, on the scale of the
  training labels (what `label_stats.json` normalises; the rule is in the manifest);
- `images/`: the distorted images it generated from the teacher's training references;
- `pseudo_labels.json`, written LAST and sealed (`self_sha256`): the teacher ensemble's hash, the sha256
  of every image, the label-scale rule, the generation settings, the counts, whether test inputs were
  allowed, and the hash of `labels.csv`.

A member with `data.pseudo_labels: PATH` (the folder or its manifest) verifies all of it when it starts
(`members.data.pseudo`) and records a summary of it (`summary`) in its training record
(`fingerprint.json`): the manifest's sha256 makes the member stale when the labels change, and the
summary travels into the member's prediction metadata, the ensemble's record and the submission readme
(which says so when test or validation inputs were pseudo-labelled).
"""
from __future__ import annotations

import json
from pathlib import Path

MANIFEST = "pseudo_labels.json"
LABELS = "labels.csv"
IMAGES = "images"
KIND = "pseudo_labels"
VERSION = 1
# The counts of a label table by where its pairs come from (members.data.pseudo.classify_pairs):
# generated from training references, both images in the training split, pairs that touch a test or
# validation input (only with --allow-test-inputs), and the rest (from outside the challenge data).
ORIGINS = ("generated", "training", "test_inputs", "outside")


def manifest_path(setting: str | Path) -> Path:
    """The manifest that `data.pseudo_labels` names: the path itself when it is a file (or ends in
    .json), else `<folder>/pseudo_labels.json`."""
    path = Path(setting)
    return path if path.is_file() or path.suffix == ".json" else path / MANIFEST


def summary(manifest: dict, manifest_sha256: str, path: Path, weight: float) -> dict:
    """What a member records about the pseudo-labels it trains on (training record, prediction
    metadata, ensemble record, readme)."""
    counts = manifest.get("counts", {})
    return {"manifest": str(path), "manifest_sha256": manifest_sha256,
            "teacher_ensemble_sha256": manifest.get("teacher", {}).get("ensemble_sha256"),
            "pairs": int(counts.get("pairs", 0)), **{k: int(counts.get(k, 0)) for k in ORIGINS},
            "allow_test_inputs": bool(manifest.get("allow_test_inputs", False)), "weight": weight}


def recorded_summary(member_dir: Path, record_name: str) -> dict | None:
    """The pseudo-label summary a member's training record holds (None: trained without them, or no
    readable record)."""
    try:
        record = json.loads((Path(member_dir) / record_name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    found = record.get("pseudo_labels") if isinstance(record, dict) else None
    return found if isinstance(found, dict) else None
