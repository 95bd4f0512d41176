"""The scale of pseudo-labels: the teacher ensemble's scores mapped onto the training labels' scale.

Members train on the MOS their split lists hold (min-max normalised with the train split's
`label_stats.json`), so a pseudo-label must be a MOS too. The rule is fitted on the ensemble's
validation scores (its record applied to the members' `preds_val.csv`, exactly what new images get)
against the validation MOS:
- an ensemble with a calibration (`ensemble.calibration: logistic | isotonic`) maps its scores onto the
  validation MOS already: the labels are its scores;
- else (`none`: standardised members combined, a scale of its own) a straight line fitted by least
  squares, MOS = intercept + slope x score. A line keeps the teacher's spacing (the student learns its
  ranking and its gaps), never ties two scores, and extends past the validation range; its slope must
  follow the MOS direction, or the fit is refused.
The manifest records the rule, its parameters and how well the mapped validation scores fit the MOS.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from members.contract import metrics
from members.contract.stagefiles import StageFileError, read_labels, read_preds, rebuild_ensemble, sha256_file


class ScaleError(ValueError):
    """The validation files cannot be read, or no increasing map onto the MOS exists."""


def validation_scores(folder: Path, record: dict) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each member's validation scores (name -> one per image, images in name order) and the validation MOS,
    read from the member files the ensemble was fitted on (their hashes checked against its manifest)."""
    rebuild = rebuild_ensemble(record.get("manifest", {}).get("experiment"))
    inputs = record.get("manifest", {}).get("inputs", {}).get("members", {})
    scores, labels = {}, None
    for entry in record["members"]:
        name = entry["name"]
        member_dir = folder.parent / name if (folder.parent / name).is_dir() else Path(entry["dir"])
        for file in ("preds_val.csv", "labels_val.csv"):
            path, recorded = member_dir / file, inputs.get(name, {}).get(file)
            if not path.is_file() or recorded is None or sha256_file(path) != recorded:
                raise ScaleError(f"{path}: not the validation file the ensemble was fitted on; rerun {rebuild}")
        try:
            preds = read_preds(member_dir / "preds_val.csv")
            labels = labels or read_labels(member_dir / "labels_val.csv")
        except StageFileError as err:
            raise ScaleError(f"{err}; rerun {rebuild}") from None
        names = sorted(labels)
        if sorted(preds) != names:
            raise ScaleError(f"{member_dir / 'preds_val.csv'}: other images than the validation labels; rerun {rebuild}")
        scores[name] = np.array([preds[n] for n in names], dtype=np.float64)
    if labels is None:
        raise ScaleError(f"{folder / 'ensemble.json'}: lists no members; rerun {rebuild}")
    return scores, np.array([labels[n][1] for n in sorted(labels)], dtype=np.float64)


def fit_label_scale(val_scores: np.ndarray, mos: np.ndarray, calibration: str, higher_is_better: bool) -> dict:
    """The rule that maps ensemble scores onto the MOS (module docstring), with its fit on validation."""
    if calibration != "none":
        rule = {"rule": "calibration", "calibration": calibration,
                "what": f"the ensemble's own {calibration} calibration onto the validation MOS: label = its score"}
    else:
        slope, intercept = np.polyfit(val_scores, mos, 1)
        if not np.isfinite(slope) or (slope > 0) != higher_is_better or slope == 0:
            raise ScaleError(f"the ensemble's validation scores do not follow the validation MOS (least-squares slope "
                             f"{slope:+.4g}, MOS {'higher' if higher_is_better else 'lower'}-is-better): no increasing "
                             "map onto the training labels' scale exists; check the ensemble report")
        rule = {"rule": "linear", "slope": float(slope), "intercept": float(intercept),
                "what": "least-squares line of the validation MOS on the ensemble's validation scores: "
                        "label = intercept + slope x score"}
    mapped = apply_label_scale(rule, val_scores)
    rule["fitted_on"] = {"images": int(len(mos)), "mos_min": float(mos.min()), "mos_max": float(mos.max()),
                         "plcc": float(metrics.plcc(mapped, mos)), "srcc": float(metrics.srcc(mapped, mos)),
                         "rmse": float(metrics.rmse(mapped, mos))}
    return rule


def apply_label_scale(rule: dict, scores: np.ndarray) -> np.ndarray:
    """Labels on the MOS scale from ensemble scores, by a rule of `fit_label_scale`."""
    scores = np.asarray(scores, dtype=np.float64)
    if rule["rule"] == "calibration":
        return scores.copy()
    return rule["intercept"] + rule["slope"] * scores
