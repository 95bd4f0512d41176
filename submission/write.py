"""Build the NTIRE submission zip from the ensemble stage's files.

Inputs, both written by the ensemble stage into `<runs_dir>/ensemble/`:
- `ensemble.json`: "members" (each with the `test_meta` its prediction run measured), "method", "weights",
  and the manifest that ties the set to its inputs (checked first: `verify_ensemble`);
- `preds_test.csv`: header `name,score`, then the ensemble's higher-is-better test scores, which the
  record's weights, standardisation and calibration must give again from the members' own
  `preds_test.csv` (`check_reproduced`, through `ensemble.combine`): a resealed edit is refused.
The zip's names are checked against the test folder when configured, else against the test split list
the members predicted, never against the rows of `preds_test.csv` itself.

Every readme value comes from those files, never from constants: the runtime is the sum of the members'
measured seconds per image (the ensemble runs all of them, each with its own test views), the device
and extra-data flags come from the members' metadata. The zip is written to a temporary sibling,
checked with `submission.check`, and renamed into place only when valid: no partial or invalid zip.

The track (`track`, default the experiment's) sets the readme's fifth field (full reference 1, no
reference 0); a zip for another track than the experiment's is refused before anything is read: an FR
experiment's members need references, which the NR track does not give, and an NR experiment's members
predicted the NR folders, whose names the FR track does not take.
"""
from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ensemble.combine import CombineError, check_outputs, rebuild_hint
from members.contract.atomic import atomic_path
from members.contract.pseudo import ORIGINS
from members.contract.schema import PHASES, TRACKS, Experiment
from members.contract.stagefiles import (REBUILD_ENSEMBLE, StageFileError, read_json, read_preds,
                                         read_stage_outputs, rebuild_ensemble, rebuild_members, sha256_file)
from members.contract.verify import check_experiment, raise_problems
from members.data.splits import check_split_lists, read_split
from submission.check import OUTPUT, README, Report, check_zip, names_in_dir, read_names_file
from submission.readme import ReadmeInfo, format_readme


class SubmissionInputError(ValueError):
    """The ensemble's files are missing or malformed; the message names the file (and line)."""


class SubmissionInvalidError(ValueError):
    """The zip built from the ensemble's files fails the checker; nothing was written."""

    def __init__(self, report: Report) -> None:
        super().__init__("the submission fails the checks:\n" + "\n".join(report.errors))
        self.report = report


@dataclass(frozen=True)
class MemberMeta:
    """What the submission needs from one member's `test_meta`."""

    name: str
    vit: str
    cnn: str
    crop: int
    n_views: int
    views: str
    seconds_per_image: float | None  # None: a `predictions:` member whose runtime was not given
    device: str
    pretrained_backbones: bool  # for a member that is not AHIQ: whether it used extra data
    kind: str = "ahiq"  # or "blind" (model.kind nr), "metric" / "predictions" (members.contract.foreign)
    detail: str = ""  # the metric's name, or the folder the predictions came from
    pseudo: dict | None = None  # the pseudo-labels it trained on (members.contract.pseudo.summary), if any


@dataclass(frozen=True)
class EnsembleMeta:
    """What the submission needs from `ensemble.json`."""

    members: list[MemberMeta]
    method: str
    weights: dict[str, float]


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
    if meta.get("kind") in ("metric", "predictions"):
        return _foreign_member(name, meta, where, path)
    model = _field(meta, "model", dict, where, path)
    seconds = float(_field(meta, "seconds_per_image", (int, float), where, path))
    if not math.isfinite(seconds) or seconds <= 0:
        raise SubmissionInputError(f"{path}: '{where}seconds_per_image' must be a positive time, got {seconds!r}")
    device = _field(meta, "device", str, where, path)
    if device not in ("cpu", "cuda"):
        raise SubmissionInputError(f"{path}: '{where}device' must be 'cpu' or 'cuda', got {device!r}")
    kind = model.get("kind", "fr")  # files written before blind members existed are AHIQ's
    if kind not in ("fr", "nr"):
        raise SubmissionInputError(f"{path}: '{where}model.kind' must be 'fr' or 'nr', got {kind!r}")
    return MemberMeta(
        name=name,
        kind="blind" if kind == "nr" else "ahiq",
        vit=_field(model, "vit", str, where + "model.", path),
        cnn=_field(model, "cnn", str, where + "model.", path),
        crop=_field(model, "crop", int, where + "model.", path),
        n_views=_field(meta, "n_views", int, where, path),
        views=" ".join(_field(meta, "views", str, where, path).split()),  # one readme line
        seconds_per_image=seconds,
        device=device,
        pretrained_backbones=_field(meta, "pretrained_backbones", bool, where, path),
        pseudo=_pseudo(meta, where, path),
    )


def _pseudo(meta: dict, where: str, path: Path) -> dict | None:
    """The member's pseudo-label summary (its counts and whether test inputs were allowed), checked."""
    if "pseudo_labels" not in meta:
        return None
    pseudo = _field(meta, "pseudo_labels", dict, where, path)
    for key in ("pairs", *ORIGINS):
        _field(pseudo, key, int, f"{where}pseudo_labels.", path)
    _field(pseudo, "allow_test_inputs", bool, f"{where}pseudo_labels.", path)
    return pseudo


def _foreign_member(name: str, meta: dict, where: str, path: Path) -> MemberMeta:
    """A member that is not AHIQ: a metric (its time measured on the CPU) or another model's predictions
    (its runtime, device and extra data as its experiment entry gave them; runtime maybe unknown)."""
    kind = meta["kind"]
    seconds = meta.get("seconds_per_image")
    if seconds is not None:
        seconds = float(_field(meta, "seconds_per_image", (int, float), where, path))
        if not math.isfinite(seconds) or seconds <= 0:
            raise SubmissionInputError(f"{path}: '{where}seconds_per_image' must be a positive time, got {seconds!r}")
    elif kind == "metric":
        raise SubmissionInputError(f"{path}: missing '{where}seconds_per_image' of metric member {name!r}")
    device = _field(meta, "device", str, where, path)
    if device not in ("cpu", "cuda"):
        raise SubmissionInputError(f"{path}: '{where}device' must be 'cpu' or 'cuda', got {device!r}")
    detail = _field(meta, "metric" if kind == "metric" else "source", str, where, path)
    return MemberMeta(name=name, vit="", cnn="", crop=0, n_views=1, views="whole image", seconds_per_image=seconds,
                      device=device, pretrained_backbones=_field(meta, "extra_data", bool, where, path), kind=kind,
                      detail=detail)


def load_ensemble(path: Path) -> EnsembleMeta:
    """Read and validate `ensemble.json` (the caller has verified its manifest)."""
    try:
        data = read_json(path, REBUILD_ENSEMBLE)
    except StageFileError as err:
        raise SubmissionInputError(str(err)) from None
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
    """Rows of a `name,score` prediction CSV, sorted by name (format checked by members.contract.stagefiles)."""
    try:
        return sorted(read_preds(path).items())
    except StageFileError as err:
        raise SubmissionInputError(str(err)) from None


def verify_ensemble(exp: Experiment, needed: list[str]) -> dict:
    """`ensemble.json`, after proving that the ensemble's files are one set and were made from the
    experiment's current members, member files, split lists and ensemble settings, and that those member
    files are current (made from the current split lists and images, heads and configs:
    `members.contract.verify`, the check every stage makes)."""
    try:
        record = read_stage_outputs(exp.out_dir, "ensemble.json", needed, rebuild_ensemble(exp.path))
    except StageFileError as err:
        raise SubmissionInputError(str(err)) from None
    path = exp.out_dir / "ensemble.json"
    manifest = record["manifest"]
    inputs = manifest.get("inputs", {})
    used = sorted(inputs.get("members", {}))
    if used == sorted(exp.member_names):  # the members' own files first: stale ones need the earlier command
        _, stale = check_experiment(exp, tuple(inputs.get("splits", {})))
        raise_problems(stale, exp.path, SubmissionInputError, then=f", then {rebuild_ensemble(exp.path)}")
    problems = []
    if used != sorted(exp.member_names):
        problems.append(f"the experiment lists members {sorted(exp.member_names)} but the ensemble used {used}")
    elif manifest.get("ensemble_fingerprint") != exp.ensemble_fingerprint():
        problems.append(f"the ensemble: section of {exp.path} changed since the ensemble was fitted")
    for name, files in inputs.get("members", {}).items():
        for file, digest in files.items():
            current = exp.runs_dir / name / file
            if name in exp.member_names and (not current.is_file() or sha256_file(current) != digest):
                problems.append(f"{current} changed since the ensemble was fitted")
    for split, digest in inputs.get("splits", {}).items():
        current = exp.split_dir / f"{split}.csv"
        if not current.is_file() or sha256_file(current) != digest:
            problems.append(f"{current} changed since the ensemble was fitted")
    if problems:
        raise SubmissionInputError(f"{path} is stale; rerun {rebuild_ensemble(exp.path)}:\n  " + "\n  ".join(problems))
    try:  # lists unchanged on disk, but the data moved on (a fixed label): the zip would be stale
        check_split_lists(exp.split_dir, exp.members[0].config.data, exp.path)
    except StageFileError as err:
        raise SubmissionInputError(str(err)) from None
    return record


def check_reproduced(exp: Experiment, record: dict, phase: str, rows: list[tuple[str, float]]) -> None:
    """Refuse an `ensemble.json` whose weights, standardisation and calibration, applied to the members'
    `preds_<phase>.csv`, do not give the ensemble's: its seal proves only that it was not edited
    without being resealed, and the readme quotes its weights beside scores made by other ones."""
    try:
        members = {name: read_preds(exp.runs_dir / name / f"preds_{phase}.csv") for name in exp.member_names}
    except StageFileError as err:
        raise SubmissionInputError(f"{err}; run {rebuild_members(exp.path)}") from None
    try:
        check_outputs(record, members, dict(rows), str(exp.out_dir / f"preds_{phase}.csv"))
    except CombineError as err:
        raise SubmissionInputError(f"{exp.out_dir / 'ensemble.json'}: {err}; {rebuild_hint(exp.path)}") from None


def split_names(exp: Experiment, split: str) -> list[str]:
    """The image names of the split the members predicted (the ensemble verified its hash)."""
    try:
        return [p.name for p in read_split(exp.split_dir / f"{split}.csv")]
    except ValueError as err:
        raise SubmissionInputError(f"{err}; run {rebuild_members(exp.path)}") from None


MODELS = ("ahiq", "blind")  # the kit's own members (their backbones are described)


def _models(n: int, blind: int) -> str:
    """The kit's own members, in words: AHIQ ones, blind ones, or both."""
    ahiq = (f"{n - blind} AHIQ full-reference IQA model{'s' if n - blind > 1 else ''} (ViT and CNN features fused by "
            "deformable convolution, patch-weighted score)") if n > blind else ""
    nr = (f"{blind} blind (no-reference) IQA model{'s' if blind > 1 else ''} (ViT and CNN features of the distorted "
          "image alone, no reference, patch-weighted score)") if blind else ""
    return " and ".join(t for t in (ahiq, nr) if t) or "no AHIQ or blind model"


def describe(ensemble: EnsembleMeta) -> str:
    """A one-line readme description of the ensemble, generated from its metadata."""
    n = sum(m.kind in MODELS for m in ensemble.members)
    blind = sum(m.kind == "blind" for m in ensemble.members)
    others = len(ensemble.members) - n
    weights = ", ".join(f"{name}={w:.3g}" for name, w in ensemble.weights.items())
    parts = [
        f"Ensemble of {_models(n, blind)}"
        + (f" and {others} other member{'s' if others > 1 else ''}" if others else "")
        + f", combined by '{ensemble.method}' with weights {weights}."
    ]
    for m in ensemble.members:
        if m.kind not in MODELS:
            time = (f"{m.seconds_per_image:.4g} s/image on {m.device}" if m.seconds_per_image is not None
                    else "runtime not given, not counted")
            what = f"full-reference metric {m.detail}" if m.kind == "metric" else "predictions of another model"
            parts.append(f"{m.name}: {what}, {time}.")
            continue
        parts.append(
            f"{m.name}: {'blind, ' if m.kind == 'blind' else ''}ViT {m.vit} + CNN {m.cnn}, {m.crop}px crops, "
            f"{m.n_views} test view{'s' if m.n_views != 1 else ''} ({m.views}), "
            f"{m.seconds_per_image:.4g} s/image on {m.device}."
        )
    if any(m.pretrained_backbones for m in ensemble.members if m.kind in MODELS):
        parts.append("Backbones are pretrained (counted as extra data).")
    if any(m.pretrained_backbones for m in ensemble.members if m.kind not in MODELS):
        parts.append("Members that are not AHIQ used extra data.")
    for m in ensemble.members:
        if m.pseudo is not None:
            counts = ", ".join(f"{m.pseudo[k]} {ORIGIN_WORDS[k]}" for k in ORIGINS if m.pseudo[k])
            parts.append(f"{m.name} also trained on {m.pseudo['pairs']} pairs pseudo-labelled by a full-reference "
                         f"teacher ensemble ({counts}).")
    parts.append("Runtime is the sum over members of their measured seconds per image.")
    return " ".join(parts)


# How the readme words each origin of pseudo-labelled pairs (members.contract.pseudo.ORIGINS).
ORIGIN_WORDS = {"generated": "generated from training references", "training": "training-set images",
                "test_inputs": "test/validation inputs", "outside": "from outside the challenge data"}


def test_input_note(ensemble: EnsembleMeta) -> str | None:
    """The sentence a readme must carry when a member trained on pseudo-labels made with
    --allow-test-inputs (challenge rules usually forbid training on test inputs); None otherwise."""
    named = [m for m in ensemble.members if m.pseudo is not None and m.pseudo["allow_test_inputs"]]
    if not named:
        return None
    listed = ", ".join(f"{m.name} ({m.pseudo['test_inputs']} images)" for m in named)
    return (f"Test/validation inputs were allowed in the pseudo-labels of {listed}: "
            "made with --allow-test-inputs.")


def readme_info(ensemble: EnsembleMeta, description: str | None, track: str = "fr") -> ReadmeInfo:
    """The readme values, all derived from the members' measured test metadata (and the track: the
    fifth field is 1 for full reference, 0 for no reference)."""
    members = ensemble.members
    text = description if description is not None else describe(ensemble)
    note = test_input_note(ensemble)
    if note is not None and note not in text:  # said even under a description of the user's own
        text = f"{text} {note}"
    # pairs from outside the challenge data are extra data; generated ones come from its training references
    outside = any(m.pseudo is not None and m.pseudo["outside"] for m in members)
    return ReadmeInfo(
        runtime_per_image=sum(m.seconds_per_image or 0.0 for m in members),  # None: not given (described)
        cpu=0 if any(m.device == "cuda" for m in members) else 1,
        extra_data=int(any(m.pretrained_backbones for m in members) or outside),
        description=text,
        full_reference=1 if track == "fr" else 0,
    )


def format_output(rows: list[tuple[str, float]]) -> str:
    """output.txt: `name,score` lines sorted by name, 6 decimals, no header."""
    return "".join(f"{name},{score:.6f}\n" for name, score in sorted(rows))


def check_track(exp: Experiment, track: str | None) -> str:
    """The track of the zip: `track`, or the experiment's; refused (one line) when they differ."""
    track = track or exp.config.track
    if track not in TRACKS:
        raise SubmissionInputError(f"track {track!r}: expected one of {', '.join(TRACKS)}")
    if track == "nr" and exp.config.track == "fr":
        raise SubmissionInputError(f"{exp.path} is a full-reference experiment (track: fr): its members predicted the FR "
                                   "test folder, with references, which the no-reference track does not give; an NR "
                                   "zip comes from an experiment with track: nr and blind members (e.g. "
                                   "configs/demo_nr.yaml)")
    if track == "fr" and exp.config.track == "nr":
        raise SubmissionInputError(f"{exp.path} is a no-reference experiment (track: nr): its members predicted the NR "
                                   "folders, not the full-reference track's test images; write its NR zip (--track nr), "
                                   "or an FR zip from an experiment with track: fr")
    return track


def write_submission(exp: Experiment, phase: str = "test", track: str | None = None) -> tuple[Path, Report]:
    """Write the checked zip of `phase` ("test", or "valid": the development-phase leaderboard on the
    NTIRE validation folder) for `track` (None: the experiment's; `check_track`); return its path and
    the checker's report (warnings only)."""
    if phase not in PHASES:
        raise SubmissionInputError(f"phase {phase!r}: expected one of {', '.join(PHASES)}")
    track = check_track(exp, track)
    config = exp.submission
    preds = f"preds_{phase}.csv"
    if phase == "valid" and not (exp.split_dir / "valid.csv").is_file():
        raise SubmissionInputError(f"{exp.split_dir / 'valid.csv'}: no validation split; the data has no NTIRE "
                                   + ("NR validation folder (data.nr_valid_dis)" if track == "nr" else
                                      "validation folder (data.valid_dis / data.valid_ref)") + ", or run "
                                   f"{rebuild_members(exp.path)} after adding it")
    record = verify_ensemble(exp, [preds])
    rows = read_predictions(exp.out_dir / preds)
    check_reproduced(exp, record, phase, rows)
    ensemble = load_ensemble(exp.out_dir / "ensemble.json")
    if phase == "test" and config.test_dir is not None:
        names = names_in_dir(config.test_dir)
    elif phase == "test" and config.names_file is not None:
        names = read_names_file(config.names_file)
    elif phase == "valid" and config.valid_dir is not None:
        names = names_in_dir(config.valid_dir)
    else:  # never the file's own rows: a missing row must be caught
        names = split_names(exp, phase)
    files = {OUTPUT: format_output(rows), README: format_readme(readme_info(ensemble, config.description, track))}

    out = exp.zip_path(phase)
    if out.is_dir():
        raise SubmissionInputError(f"{out}: is a folder; submission.out must be the path of a .zip file")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:  # removed, and `out` untouched, if anything below fails
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name, text in files.items():
                archive.writestr(name, text.encode("utf-8"))
        # Check the very bytes that will be published, before they replace any previous zip.
        report = check_zip(tmp, names, track)
        if not report.ok:
            raise SubmissionInvalidError(report)
    return out, report
