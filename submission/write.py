"""Build the NTIRE submission zip from the ensemble stage's files.

Inputs, both written by the ensemble stage into `<runs_dir>/ensemble/`:
- `ensemble.json`: "members" (each with the `test_meta` its prediction run measured), "method", "weights";
- `preds_test.csv`: header `name,score`, then the ensemble's higher-is-better test scores.

Every readme value comes from those files, never from constants: the runtime is the sum of the members'
measured seconds per image (the ensemble runs all of them, each with its own test views), the device
and extra-data flags come from the members' metadata. The zip is written to a temporary sibling,
checked with `submission.check`, and renamed into place only when valid: no partial or invalid zip.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from members.config import ConfigError, apply_overrides, from_dict, load_yaml
from submission.check import OUTPUT, README, Report, check_zip, names_in_dir, read_names_file
from submission.readme import ReadmeInfo, format_readme


class SubmissionInputError(ValueError):
    """The ensemble's files are missing or malformed; the message names the file (and line)."""


class SubmissionInvalidError(ValueError):
    """The zip built from the ensemble's files fails the checker; nothing was written."""

    def __init__(self, report: Report) -> None:
        super().__init__("the submission fails the checks:\n" + "\n".join(report.errors))
        self.report = report


@dataclass
class SubmissionConfig:
    """The experiment config's `submission:` section. Relative paths are relative to the working dir."""

    out: str | None = None  # the zip; None = <runs_dir>/submission.zip
    description: str | None = None  # readme "Other description"; None = generated from the experiment
    test_dir: str | None = None  # folder of the distorted test images, to check names against
    names_file: str | None = None  # or a file with one test image name per line

    def __post_init__(self) -> None:
        if self.test_dir is not None and self.names_file is not None:
            raise ValueError("give 'test_dir' or 'names_file', not both")
        if self.description is not None and (not self.description.strip() or "\n" in self.description):
            raise ValueError("'description' must be one non-empty line (the readme is one field per line)")


@dataclass(frozen=True)
class MemberMeta:
    """What the submission needs from one member's `test_meta`."""

    name: str
    vit: str
    cnn: str
    crop: int
    n_views: int
    views: str
    seconds_per_image: float
    device: str
    pretrained_backbones: bool


@dataclass(frozen=True)
class EnsembleMeta:
    """What the submission needs from `ensemble.json`."""

    members: list[MemberMeta]
    method: str
    weights: dict[str, float]


def load_experiment(path: str | Path, overrides: list[str] = ()) -> tuple[Path, SubmissionConfig]:
    """The runs dir and the `submission:` section of an experiment config (with `--set` overrides)."""
    data = apply_overrides(load_yaml(path), list(overrides))
    runs_dir = data.get("runs_dir")
    if not isinstance(runs_dir, str) or not runs_dir:
        raise ConfigError(f"{path}: 'runs_dir' is missing or not a path (e.g. runs_dir: runs/demo)")
    return Path(runs_dir), from_dict(SubmissionConfig, data.get("submission"), prefix="submission.")


def _field(mapping: Any, key: str, kind: type | tuple[type, ...], where: str, path: Path) -> Any:
    """`mapping[key]` checked against `kind`; bools are not numbers here."""
    if not isinstance(mapping, dict) or key not in mapping:
        raise SubmissionInputError(f"{path}: missing '{where}{key}'")
    value = mapping[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise SubmissionInputError(f"{path}: '{where}{key}' must be {names}, got {value!r}")
    return value


def _member(entry: Any, index: int, path: Path) -> MemberMeta:
    where = f"members[{index}]."
    name = _field(entry, "name", str, where, path)
    meta = _field(entry, "test_meta", dict, where, path)
    where += "test_meta."
    if meta.get("split", "test") != "test":
        raise SubmissionInputError(f"{path}: '{where}split' is {meta['split']!r}: expected the test split's metadata")
    model = _field(meta, "model", dict, where, path)
    seconds = float(_field(meta, "seconds_per_image", (int, float), where, path))
    if not math.isfinite(seconds) or seconds <= 0:
        raise SubmissionInputError(f"{path}: '{where}seconds_per_image' must be a positive time, got {seconds!r}")
    device = _field(meta, "device", str, where, path)
    if device not in ("cpu", "cuda"):
        raise SubmissionInputError(f"{path}: '{where}device' must be 'cpu' or 'cuda', got {device!r}")
    return MemberMeta(
        name=name,
        vit=_field(model, "vit", str, where + "model.", path),
        cnn=_field(model, "cnn", str, where + "model.", path),
        crop=_field(model, "crop", int, where + "model.", path),
        n_views=_field(meta, "n_views", int, where, path),
        views=" ".join(_field(meta, "views", str, where, path).split()),  # one readme line
        seconds_per_image=seconds,
        device=device,
        pretrained_backbones=_field(meta, "pretrained_backbones", bool, where, path),
    )


def load_ensemble(path: Path) -> EnsembleMeta:
    """Read and validate `ensemble.json`."""
    if not path.is_file():
        raise SubmissionInputError(f"{path}: not found; run the ensemble stage first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SubmissionInputError(f"{path} line {err.lineno}: invalid JSON: {err.msg}") from None
    entries = _field(data, "members", list, "", path)
    if not entries:
        raise SubmissionInputError(f"{path}: 'members' is empty")
    members = [_member(entry, i, path) for i, entry in enumerate(entries)]
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise SubmissionInputError(f"{path}: member names repeat: {names}")
    weights = _field(data, "weights", dict, "", path)
    if set(weights) != set(names):
        raise SubmissionInputError(f"{path}: 'weights' names {sorted(weights)} but the members are {sorted(names)}")
    for name in names:
        value = _field(weights, name, (int, float), "weights.", path)
        if not math.isfinite(value):
            raise SubmissionInputError(f"{path}: 'weights.{name}' is {value!r}, not a finite number")
    return EnsembleMeta(members, _field(data, "method", str, "", path), {n: float(weights[n]) for n in names})


def read_predictions(path: Path) -> list[tuple[str, float]]:
    """Rows of a `name,score` prediction CSV, sorted by name; every score finite, every name once."""
    if not path.is_file():
        raise SubmissionInputError(f"{path}: not found; run the ensemble stage first")
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].strip() != "name,score":
        raise SubmissionInputError(f"{path} line 1: expected the header 'name,score'")
    rows: dict[str, float] = {}
    for number, line in enumerate(lines[1:], start=2):
        parts = [part.strip() for part in line.split(",")]
        if len(parts) != 2 or not parts[0]:
            raise SubmissionInputError(f"{path} line {number}: expected 'name,score', got {line!r}")
        name, text = parts
        try:
            score = float(text)
        except ValueError:
            score = math.nan
        if not math.isfinite(score):
            raise SubmissionInputError(f"{path} line {number}: score {text!r} for {name} is not a finite number")
        if name in rows:
            raise SubmissionInputError(f"{path} line {number}: {name} appears twice")
        rows[name] = score
    if not rows:
        raise SubmissionInputError(f"{path}: no prediction rows")
    return sorted(rows.items())


def describe(ensemble: EnsembleMeta) -> str:
    """A one-line readme description of the ensemble, generated from its metadata."""
    n = len(ensemble.members)
    weights = ", ".join(f"{name}={w:.3g}" for name, w in ensemble.weights.items())
    parts = [
        f"Ensemble of {n} AHIQ full-reference IQA model{'s' if n > 1 else ''} "
        f"(ViT and CNN features fused by deformable convolution, patch-weighted score), "
        f"combined by '{ensemble.method}' with weights {weights}."
    ]
    for m in ensemble.members:
        parts.append(
            f"{m.name}: ViT {m.vit} + CNN {m.cnn}, {m.crop}px crops, "
            f"{m.n_views} test view{'s' if m.n_views != 1 else ''} ({m.views}), "
            f"{m.seconds_per_image:.4g} s/image on {m.device}."
        )
    if any(m.pretrained_backbones for m in ensemble.members):
        parts.append("Backbones are pretrained (counted as extra data).")
    parts.append("Runtime is the sum over members of their measured seconds per image.")
    return " ".join(parts)


def readme_info(ensemble: EnsembleMeta, description: str | None) -> ReadmeInfo:
    """The readme values, all derived from the members' measured test metadata."""
    members = ensemble.members
    return ReadmeInfo(
        runtime_per_image=sum(m.seconds_per_image for m in members),
        cpu=0 if any(m.device == "cuda" for m in members) else 1,
        extra_data=int(any(m.pretrained_backbones for m in members)),
        description=description if description is not None else describe(ensemble),
        full_reference=1,
    )


def format_output(rows: list[tuple[str, float]]) -> str:
    """output.txt: `name,score` lines sorted by name, 6 decimals, no header."""
    return "".join(f"{name},{score:.6f}\n" for name, score in sorted(rows))


def write_submission(runs_dir: Path, config: SubmissionConfig) -> tuple[Path, Report]:
    """Write the checked zip; return its path and the checker's report (warnings only)."""
    ensemble_dir = runs_dir / "ensemble"
    ensemble = load_ensemble(ensemble_dir / "ensemble.json")
    rows = read_predictions(ensemble_dir / "preds_test.csv")
    if config.test_dir is not None:
        names = names_in_dir(config.test_dir)
    elif config.names_file is not None:
        names = read_names_file(config.names_file)
    else:
        names = [name for name, _ in rows]
    files = {OUTPUT: format_output(rows), README: format_readme(readme_info(ensemble, config.description))}

    out = Path(config.out) if config.out is not None else runs_dir / "submission.zip"
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name, text in files.items():
                archive.writestr(name, text.encode("utf-8"))
        # Check the very bytes that will be published, before they replace any previous zip.
        report = check_zip(tmp, names)
        if not report.ok:
            raise SubmissionInvalidError(report)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out, report
