"""Read and validate member outputs (formats in the README, "What each stage writes") into aligned arrays.

Everything is checked before any fitting: files present, headers and rows parseable (errors name file
and line), every member covering exactly the same image names per split, labels identical across
members, scores finite and not constant. Errors collect every problem of a kind at once, so one run
shows all missing files or all name differences rather than the first.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REQUIRED_FILES = ("preds_val.csv", "labels_val.csv", "preds_test.csv", "preds_test.json")
_SHOW = 5  # names shown per difference; more would drown the message


class EnsembleInputError(ValueError):
    """Member outputs are missing, malformed or inconsistent; the message names the files."""


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


def _rows(path: Path, header: tuple[str, ...]) -> list[tuple[int, list[str]]]:
    """(line number, stripped fields) of each data row, after checking the header."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise EnsembleInputError(f"{path}: not UTF-8 text ({err})") from None
    expected = ",".join(header)
    if not lines or [h.strip() for h in lines[0].split(",")] != list(header):
        got = repr(lines[0]) if lines else "an empty file"
        raise EnsembleInputError(f"{path}, line 1: expected header '{expected}', got {got}")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != len(header) or not fields[0]:
            raise EnsembleInputError(f"{path}, line {number}: expected '{expected}', got {line!r}")
        rows.append((number, fields))
    if not rows:
        raise EnsembleInputError(f"{path}: no data rows after the header")
    return rows


def _number(text: str, path: Path, number: int, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise EnsembleInputError(f"{path}, line {number}: {column} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise EnsembleInputError(f"{path}, line {number}: {column} is {text!r}; scores must be finite")
    return value


def _unique(name: str, seen: dict[str, int], path: Path, number: int) -> None:
    if name in seen:
        raise EnsembleInputError(f"{path}, line {number}: name {name!r} repeats line {seen[name]}")
    seen[name] = number


def read_preds(path: Path) -> dict[str, float]:
    """`name,score` file -> {name: score}."""
    seen: dict[str, int] = {}
    out = {}
    for number, (name, score) in _rows(path, ("name", "score")):
        _unique(name, seen, path, number)
        out[name] = _number(score, path, number, "score")
    return out


def read_labels(path: Path) -> dict[str, tuple[str, float]]:
    """`name,ref,mos` file -> {name: (ref, mos)}."""
    seen: dict[str, int] = {}
    out = {}
    for number, (name, ref, mos) in _rows(path, ("name", "ref", "mos")):
        _unique(name, seen, path, number)
        if not ref:
            raise EnsembleInputError(f"{path}, line {number}: empty ref")
        out[name] = (ref, _number(mos, path, number, "mos"))
    return out


def read_meta(path: Path) -> dict:
    """A member's `preds_<split>.json`; it must say whether the MOS is higher-is-better."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise EnsembleInputError(f"{path}, line {err.lineno}: invalid JSON: {err.msg}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("higher_is_better"), bool):
        raise EnsembleInputError(f"{path}: expected a JSON object with a boolean 'higher_is_better'")
    return meta


def _name_difference(path: Path, names: set[str], ref_path: Path, ref_names: set[str]) -> str | None:
    missing, extra = sorted(ref_names - names), sorted(names - ref_names)
    if not missing and not extra:
        return None
    parts = [f"{path} vs {ref_path}:"]
    if missing:
        parts.append(f"{len(missing)} name(s) missing (e.g. {', '.join(missing[:_SHOW])})")
    if extra:
        parts.append(f"{len(extra)} extra name(s) (e.g. {', '.join(extra[:_SHOW])})")
    return " ".join(parts)


def _check_constant(scores: np.ndarray, path: Path) -> None:
    if np.ptp(scores) == 0:
        raise EnsembleInputError(f"{path}: all {len(scores)} scores equal {scores[0]!r}; a constant member "
                                 "carries no ranking information")


def _check_names(dirs: list[Path], val: list[dict], labels: list[dict], test: list[dict]) -> None:
    """Every member's val predictions and labels cover the first member's labelled names, and every
    member's test predictions the first member's test names."""
    first = dirs[0]
    problems = []
    for d, v, lab, t in zip(dirs, val, labels, test):
        checks = [(d / "preds_val.csv", set(v), first / "labels_val.csv", set(labels[0])),
                  (d / "labels_val.csv", set(lab), first / "labels_val.csv", set(labels[0])),
                  (d / "preds_test.csv", set(t), first / "preds_test.csv", set(test[0]))]
        problems += [p for p in (_name_difference(*c) for c in checks if c[0] != c[2]) if p]
    if problems:
        raise EnsembleInputError("members do not cover the same images:\n  " + "\n  ".join(problems))


def _check_labels(dirs: list[Path], labels: list[dict]) -> None:
    """All members were scored against the same references and MOS (same dataset, same split)."""
    for d, lab in zip(dirs[1:], labels[1:]):
        differ = sorted(n for n in lab if lab[n][0] != labels[0][n][0] or abs(lab[n][1] - labels[0][n][1]) > 1e-6)
        if differ:
            raise EnsembleInputError(f"{d / 'labels_val.csv'} disagrees with {dirs[0] / 'labels_val.csv'} on the "
                                     f"ref or mos of {len(differ)} image(s) (e.g. {', '.join(differ[:_SHOW])})")


def load_members(runs_dir: Path, members: list[str]) -> MemberData:
    """Read and cross-check the outputs of `members` (directories `<runs_dir>/<name>`)."""
    dirs = [Path(runs_dir) / name for name in members]
    missing = [str(d / f) for d in dirs for f in REQUIRED_FILES if not (d / f).is_file()]
    if missing:
        raise EnsembleInputError("missing member file(s):\n  " + "\n  ".join(missing))
    val = [read_preds(d / "preds_val.csv") for d in dirs]
    labels = [read_labels(d / "labels_val.csv") for d in dirs]
    test = [read_preds(d / "preds_test.csv") for d in dirs]
    metas = [read_meta(d / "preds_test.json") for d in dirs]
    _check_names(dirs, val, labels, test)
    _check_labels(dirs, labels)
    hib = {m["higher_is_better"] for m in metas}
    if len(hib) > 1:
        raise EnsembleInputError("members disagree on 'higher_is_better' in their preds_test.json: "
                                 + ", ".join(f"{d / 'preds_test.json'}={m['higher_is_better']}"
                                             for d, m in zip(dirs, metas)))

    val_names, test_names = sorted(labels[0]), sorted(test[0])
    x_val = np.array([[v[n] for v in val] for n in val_names], dtype=np.float64)
    x_test = np.array([[t[n] for t in test] for n in test_names], dtype=np.float64)
    for j, d in enumerate(dirs):
        _check_constant(x_val[:, j], d / "preds_val.csv")
        _check_constant(x_test[:, j], d / "preds_test.csv")
    mos = np.array([labels[0][n][1] for n in val_names])
    _check_constant(mos, dirs[0] / "labels_val.csv")
    return MemberData(
        members=list(members), dirs=dirs, val_names=val_names,
        refs=np.array([labels[0][n][0] for n in val_names]), mos=mos, x_val=x_val,
        test_names=test_names, x_test=x_test, test_meta=metas, higher_is_better=hib.pop(),
    )
