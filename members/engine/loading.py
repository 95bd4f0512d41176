"""What a Scorer loads, checked: a member folder's config and heads, an ensemble's record and the member
files it was fitted on, and the range its scores can take."""
from __future__ import annotations

import math
from pathlib import Path

from members.contract.config import ConfigError, from_dict, load_yaml
from members.contract.member import MemberConfig, prediction_fingerprint
from members.contract.stagefiles import StageFileError, make_command, read_preds
from members.engine.inputs import ScorerError


def score_range_of(ensemble: dict | None) -> tuple[float, float]:
    """(low, high) with low <= every score <= high, infinite where nothing bounds the scores.

    A member's heads end in a linear layer: its normalised scale maps the training labels' min..max to
    0..1, but nothing clamps it, so noise or an unusual distortion can score below 0 or above 1. An
    ensemble without calibration is unbounded too: standardised members are combined linearly, or
    (rank_mean) placed on the validation CDF, which is continued linearly past its ends to keep the
    order, so a random image can score -2.4 there. Only a calibration bounds it: a logistic between
    its two levels, an isotonic map within `tail_margin` of its end levels (`ensemble.combine`)."""
    calibration = (ensemble or {}).get("calibration") or {}
    try:
        if calibration.get("kind") == "logistic":
            b1, b2 = (float(b) for b in calibration["params"][:2])
            return min(b1, b2), max(b1, b2)
        if calibration.get("kind") == "isotonic":
            margin = float(calibration["tail_margin"])
            return float(calibration["y"][0]) - margin, float(calibration["y"][-1]) + margin
    except (KeyError, TypeError, ValueError, IndexError):
        pass  # a malformed record: scoring refuses it with the key named (ensemble_scores)
    return -math.inf, math.inf


def value_span(preds: Path) -> tuple[float, float] | None:
    """(min, max) of a `preds_val.csv`: where the scores of validation images lie; None without one."""
    try:
        scores = list(read_preds(preds).values()) if preds.is_file() else []
    except StageFileError:
        return None  # informational only: scoring does not depend on it
    return (min(scores), max(scores)) if scores else None


def check_ensemble_outputs(folder: Path, record: dict, dirs: dict[str, Path]) -> None:
    """Refuse an ensemble.json whose weights, standardisation and calibration, applied to its members'
    preds_test.csv (each verified by the caller against its preds_test.json: `members.contract.verify`),
    do not give its preds_test.csv: resealed after an edit, it would score every pair with another rule
    than the one its files (and the submission zip) were made with."""
    from ensemble.combine import CombineError, check_outputs, rebuild_hint

    try:
        members = {name: read_preds(member_dir / "preds_test.csv") for name, member_dir in dirs.items()}
        written = read_preds(folder / "preds_test.csv")
    except StageFileError as err:
        raise ScorerError(str(err)) from None
    try:
        check_outputs(record, members, written, str(folder / "preds_test.csv"))
    except CombineError as err:
        raise ScorerError(f"{folder / 'ensemble.json'}: {err}; {rebuild_hint(record['manifest'].get('experiment'))}"
                          ) from None


def prediction_config(member_dir: Path, meta: dict, experiment: str | None) -> MemberConfig:
    """The member config its predictions were made with (same `prediction_fingerprint`): its folder's
    `config.yaml` (written when training started), else the experiment's current entry (views may have
    changed since training, and the member was predicted again). Another config (other views, crop,
    upscaling) would give other scores than the ensemble's files, silently."""
    wanted = meta.get("prediction_fingerprint")
    cfg = member_config(member_dir)
    if prediction_fingerprint(cfg) == wanted:
        return cfg
    if experiment and Path(experiment).is_file():
        from members.contract.schema import load_experiment

        try:
            entry = next((m for m in load_experiment(experiment).members if m.name == cfg.name), None)
        except ConfigError:
            entry = None
        if entry is not None and prediction_fingerprint(entry.config) == wanted:
            return entry.config
    raise ScorerError(f"{member_dir / 'config.yaml'}: not the config {member_dir / 'preds_test.json'} was predicted "
                      f"with (config hash {prediction_fingerprint(cfg)}, predictions {wanted}), and the experiment "
                      f"{experiment or '(unknown)'} does not give it either; restore the member config, or rerun "
                      f"{make_command('train-members', experiment)} and {make_command('ensemble', experiment)}")


def member_config(member_dir: Path) -> MemberConfig:
    try:
        return from_dict(MemberConfig, load_yaml(member_dir / "config.yaml"))
    except ConfigError as err:
        raise ScorerError(str(err)) from None

