"""Read the members' files (through `members.contract.stagefiles`), verify that they belong together, and align
them into arrays.

Everything is checked before any fitting, and every problem of a kind is listed at once:
- each member's `preds_<split>.json` vouches for its CSVs (content hashes): no file of an interrupted
  or another prediction run is read;
- the split lists are still what the data says (a fixed label makes them, and the members, stale);
- each member predicted the experiment's current split list and images, with its current heads and
  config (`members.contract.verify`, the check every stage makes);
- every member covers the same image names per split, with identical labels; scores are finite and
  not constant; all members agree on the MOS direction.
Members that are not AHIQ (`exp.foreign`: metrics, other models' predictions) are read from the same
stage files in `<runs_dir>/<name>/` (members.engine.foreign writes them); their fingerprint covers the
metric's name or the content of the `predictions:` files, so an edit of those files makes them stale.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from members.contract.member import prediction_fingerprint
from members.contract.schema import Experiment
from members.contract.stagefiles import StageFileError, name_difference, read_labels, read_preds, sha256_file
from members.contract.verify import check_experiment, raise_problems
from members.data.splits import check_split_lists

SPLITS = ("val", "test")
VALID = "valid"  # predicted too when the experiment's split lists include the NTIRE validation folder
_SHOW = 5


class EnsembleInputError(StageFileError):
    """Member outputs are missing, malformed, stale or inconsistent; the message names the files."""


@dataclass
class MemberData:
    """Member predictions aligned by image name (rows sorted by name, one column per member)."""

    members: list[str]
    dirs: list[Path]
    val_names: list[str]
    refs: np.ndarray
    mos: np.ndarray
    x_val: np.ndarray
    test_names: list[str]
    x_test: np.ndarray
    test_meta: list[dict]
    higher_is_better: bool
    inputs: dict = field(default_factory=dict)  # the hashes of every file read: the ensemble's manifest
    valid_names: list[str] | None = None  # the NTIRE validation folder, when the members predicted it
    x_valid: np.ndarray | None = None


def _check_names(dirs: list[Path], val: list[dict], labels: list[dict], test: list[dict]) -> None:
    first = dirs[0]
    problems = []
    for d, v, lab, t in zip(dirs, val, labels, test):
        checks = [(d / "preds_val.csv", set(v), first / "labels_val.csv", set(labels[0])),
                  (d / "labels_val.csv", set(lab), first / "labels_val.csv", set(labels[0])),
                  (d / "preds_test.csv", set(t), first / "preds_test.csv", set(test[0]))]
        problems += [p for p in (name_difference(*c) for c in checks if c[0] != c[2]) if p]
    if problems:
        raise EnsembleInputError("members do not cover the same images:\n  " + "\n  ".join(problems))


def _check_labels(dirs: list[Path], labels: list[dict]) -> None:
    for d, lab in zip(dirs[1:], labels[1:]):
        differ = sorted(n for n in lab if lab[n][0] != labels[0][n][0] or abs(lab[n][1] - labels[0][n][1]) > 1e-6)
        if differ:
            raise EnsembleInputError(f"{d / 'labels_val.csv'} disagrees with {dirs[0] / 'labels_val.csv'} on the "
                                     f"ref or mos of {len(differ)} image(s) (e.g. {', '.join(differ[:_SHOW])})")


def _check_constant(scores: np.ndarray, path: Path) -> None:
    if np.ptp(scores) == 0:
        raise EnsembleInputError(f"{path}: all {len(scores)} scores equal {scores[0]!r}; a constant member "
                                 "carries no ranking information")


def _read_metas(exp: Experiment, splits: tuple[str, ...]) -> dict[tuple[str, str], dict]:
    """Every member's verified `preds_<split>.json`, keyed by (member, split), after checking that each
    was made from the experiment's current split lists and images, heads and config
    (`members.contract.verify`); every unusable or stale one is listed in one error, with the command that
    rebuilds the members of this experiment."""
    metas, problems = check_experiment(exp, splits)
    for m in [*exp.members, *exp.foreign]:
        if (m.name, "val") in metas and "labels_val.csv" not in metas[m.name, "val"]["files"]:
            problems.append(f"{m.out / 'preds_val.json'}: the val split was predicted without labels")
    raise_problems(problems, exp.path, EnsembleInputError, "member files that cannot be used")
    return metas


def _read_valid(dirs: list[Path]) -> tuple[list[str], np.ndarray]:
    """The names and member scores (one column per member) of the NTIRE validation folder."""
    try:
        valid = [read_preds(d / f"preds_{VALID}.csv") for d in dirs]
    except StageFileError as err:
        raise EnsembleInputError(str(err)) from None
    differ = [p for p in (name_difference(d / f"preds_{VALID}.csv", set(v), dirs[0] / f"preds_{VALID}.csv",
                                          set(valid[0])) for d, v in zip(dirs[1:], valid[1:])) if p]
    if differ:
        raise EnsembleInputError("members do not cover the same images:\n  " + "\n  ".join(differ))
    names = sorted(valid[0])
    return names, np.array([[v[n] for v in valid] for n in names], dtype=np.float64)


def _inputs(exp: Experiment, metas: dict[tuple[str, str], dict], splits: tuple[str, ...]) -> dict:
    """The hashes of every file read (member files, split lists) and of the member configs (for a
    member that is not AHIQ, its fingerprint: metric name or the hashes of its `predictions:` files):
    the ensemble's manifest, which the later stages check against the files on disk."""
    return {
        "members": {m.name: {name: digest for split in splits for name, digest in
                             [(f"preds_{split}.json", sha256_file(m.out / f"preds_{split}.json")),
                              *metas[m.name, split]["files"].items()]} for m in [*exp.members, *exp.foreign]},
        "splits": {split: sha256_file(exp.split_dir / f"{split}.csv") for split in splits},
        "member_configs": {**{m.name: prediction_fingerprint(m.config) for m in exp.members},
                           **{f.name: metas[f.name, "test"]["prediction_fingerprint"] for f in exp.foreign}},
    }


def load_members(exp: Experiment) -> MemberData:
    """Read, verify and cross-check the files of the experiment's members."""
    dirs = [m.out for m in exp.members] + [f.out for f in exp.foreign]  # the order of exp.member_names
    try:  # first: member files that match stale lists would still be stale
        check_split_lists(exp.split_dir, exp.members[0].config.data, exp.path)
    except StageFileError as err:
        raise EnsembleInputError(str(err)) from None
    splits = SPLITS + ((VALID,) if (exp.split_dir / f"{VALID}.csv").is_file() else ())
    metas = _read_metas(exp, splits)
    try:
        val = [read_preds(d / "preds_val.csv") for d in dirs]
        labels = [read_labels(d / "labels_val.csv") for d in dirs]
        test = [read_preds(d / "preds_test.csv") for d in dirs]
    except StageFileError as err:
        raise EnsembleInputError(str(err)) from None
    _check_names(dirs, val, labels, test)
    _check_labels(dirs, labels)
    test_meta = [metas[name, "test"] for name in exp.member_names]
    hib = {meta["higher_is_better"] for meta in test_meta}
    if len(hib) > 1:
        raise EnsembleInputError("members disagree on 'higher_is_better' in their preds_test.json: "
                                 + ", ".join(f"{d / 'preds_test.json'}={meta['higher_is_better']}"
                                             for d, meta in zip(dirs, test_meta)))

    val_names, test_names = sorted(labels[0]), sorted(test[0])
    x_val = np.array([[v[n] for v in val] for n in val_names], dtype=np.float64)
    x_test = np.array([[t[n] for t in test] for n in test_names], dtype=np.float64)
    for j, d in enumerate(dirs):
        _check_constant(x_val[:, j], d / "preds_val.csv")
        _check_constant(x_test[:, j], d / "preds_test.csv")
    mos = np.array([labels[0][n][1] for n in val_names])
    _check_constant(mos, dirs[0] / "labels_val.csv")
    valid_names, x_valid = _read_valid(dirs) if VALID in splits else (None, None)
    return MemberData(
        members=exp.member_names, dirs=dirs, val_names=val_names,
        refs=np.array([labels[0][n][0] for n in val_names]), mos=mos, x_val=x_val,
        test_names=test_names, x_test=x_test, test_meta=test_meta, higher_is_better=hib.pop(),
        inputs=_inputs(exp, metas, splits), valid_names=valid_names, x_valid=x_valid,
    )
