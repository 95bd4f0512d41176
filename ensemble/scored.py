"""A labelled split's scores, read and cross-checked for `ensemble.evaluate` (one experiment) and
`ensemble.repeats` (mean ± std over repeats): member and ensemble predictions from verified stage
files, labels from the members' verified `labels_<split>.csv` or a folder of PIPAL label files, and
each image's reference (from the split list) for bootstraps over references.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from members.contract import metrics
from members.contract.atomic import atomic_write_text
from members.contract.schema import Experiment
from members.contract.stagefiles import (name_difference, read_labels, read_preds, read_stage_outputs,
                                         rebuild_ensemble, rebuild_members, sha256_file)
from members.data.index import read_label_rows
from members.data.splits import read_split

from .io import MemberData, load_members

METRICS = {"srcc": metrics.srcc, "plcc": metrics.plcc, "krcc": metrics.krcc, "main": metrics.signed_main}
ALPHA = 0.05
ENSEMBLE = "ensemble"


@dataclass
class Scored:
    """One labelled split: every row's scores against the higher-is-better target, by reference."""

    split: str
    names: list[str]
    refs: np.ndarray
    target: np.ndarray  # the MOS, negated when the data's MOS is lower-is-better
    rows: dict[str, np.ndarray]  # member name (and ENSEMBLE) -> scores, aligned with names
    labels: str  # where the labels came from, for the table's caption
    ensemble_sha256: str


def member_scores(data: MemberData, split: str) -> tuple[list[str], np.ndarray]:
    if split == "test":
        return data.test_names, data.x_test
    if split == "valid" and data.valid_names is not None:
        return data.valid_names, data.x_valid
    raise ValueError(f"--split {split}: the members have no predictions of that split (test, or valid when "
                     "the data has an NTIRE validation folder)")


def folder_labels(label_dir: Path, names: list[str], split_list: Path) -> dict[str, float]:
    """The labels of `names` (the images of `split_list`) from the PIPAL label files in `label_dir`;
    the files must name exactly those images, once each."""
    if not label_dir.is_dir():
        raise ValueError(f"--labels {label_dir}: not a folder of label files (A####.txt)")
    labels: dict[str, float] = {}
    for name, _, score, where in read_label_rows(label_dir, label_dir):
        if name in labels:
            raise ValueError(f"{where}: {name} is labelled twice")
        labels[name] = score
    differ = name_difference(label_dir, set(labels), split_list, set(names))
    if differ:
        raise ValueError(f"--labels {label_dir}: does not match the {split_list.stem} split ({differ}); "
                         f"pass the labels of the {split_list.stem} images")
    return labels


def member_labels(exp: Experiment, data: MemberData, split: str, names: list[str]) -> dict[str, float]:
    """The MOS of `names` from the members' `labels_<split>.csv`, as their manifests recorded them;
    every member must hold the same labels."""
    file = f"labels_{split}.csv"
    digests = [data.inputs["members"][m.name].get(file) for m in exp.members]
    if not any(digests):
        raise ValueError(f"the {split} split is unlabelled (the members' preds_{split}.json list no {file}): pass "
                         f"--labels DIR (PIPAL label files of its images), or label it in the data config and run "
                         f"{rebuild_members(exp.path)}")
    first: dict[str, tuple[str, float]] | None = None
    for m, digest in zip(exp.members, digests):
        path = m.out / file
        if digest is None or not path.is_file() or sha256_file(path) != digest:
            raise ValueError(f"{path}: {'missing' if digest is None else 'changed'} beside the other members' "
                             f"{file}; run {rebuild_members(exp.path)}")
        labels = read_labels(path)
        differ = name_difference(path, set(labels), m.out / f"preds_{split}.csv", set(names))
        if differ:
            raise ValueError(f"labels and predictions do not cover the same images ({differ}); "
                             f"run {rebuild_members(exp.path)}")
        if first is not None and labels != first:
            raise ValueError(f"{path} disagrees with {exp.members[0].out / file}; run {rebuild_members(exp.path)}")
        first = labels
    return {n: mos for n, (_, mos) in first.items()}


def ensemble_scores(exp: Experiment, data: MemberData, split: str, names: list[str]) -> tuple[np.ndarray, str]:
    """The ensemble's scores of `names`, from files its manifest vouches for, fitted on these members'
    files; and the sha256 of that manifest."""
    rebuild = rebuild_ensemble(exp.path)
    record = read_stage_outputs(exp.out_dir, "ensemble.json", [f"preds_{split}.csv"], rebuild)
    if record["manifest"].get("inputs") != data.inputs:
        raise ValueError(f"{exp.out_dir / 'ensemble.json'}: fitted on other member files than the ones now "
                         f"in place; run {rebuild}")
    ens = read_preds(exp.out_dir / f"preds_{split}.csv")
    differ = name_difference(exp.out_dir / f"preds_{split}.csv", set(ens), data.dirs[0] / f"preds_{split}.csv",
                             set(names))
    if differ:
        raise ValueError(f"the ensemble and the members do not cover the same images ({differ}); run {rebuild}")
    return np.array([ens[n] for n in names]), sha256_file(exp.out_dir / "ensemble.json")


def gather(exp: Experiment, split: str, label_dir: Path | None) -> Scored:
    """Read and cross-check everything one evaluation needs (members, ensemble, labels, references)."""
    data = load_members(exp)
    names, x = member_scores(data, split)
    ens, ens_sha = ensemble_scores(exp, data, split, names)
    split_list = exp.split_dir / f"{split}.csv"
    if label_dir is not None:
        labels, source = folder_labels(label_dir, names, split_list), f"the label files in {label_dir}"
    else:
        labels, source = member_labels(exp, data, split, names), f"the members' labels_{split}.csv"
    ref_of = {p.name: p.ref_id for p in read_split(split_list)}
    mos = np.array([labels[n] for n in names])
    rows = {name: x[:, j] for j, name in enumerate(data.members)}
    rows[ENSEMBLE] = ens
    return Scored(split, names, np.array([ref_of[n] for n in names]), mos if data.higher_is_better else -mos,
                  rows, source + ("" if data.higher_is_better else " (lower-is-better MOS, negated)"), ens_sha)


def table(rows: dict[str, dict[str, object]], cell) -> list[str]:
    """The markdown table of both reports: one line per member (and the ensemble), one column per
    metric, each cell `cell(value)` of that row's entry for the metric."""
    lines = ["| row | SRCC | PLCC | KRCC | main |", "|---|---|---|---|---|"]
    for row, values in rows.items():
        cells = [cell(values[key]) for key in METRICS]
        lines.append(f"| {row if row == ENSEMBLE else 'member ' + row} | {' | '.join(cells)} |")
    return lines


def point_metrics(scored: Scored) -> dict[str, dict[str, float]]:
    return {row: {k: fn(pred, scored.target) for k, fn in METRICS.items()} for row, pred in scored.rows.items()}


def write_report(folder: Path, stem: str, text: str, record: dict) -> list[Path]:
    """The markdown and its json beside it, each written atomically."""
    paths = [folder / f"{stem}.md", folder / f"{stem}.json"]
    atomic_write_text(paths[0], text)
    atomic_write_text(paths[1], json.dumps(record, indent=2) + "\n")
    return paths
