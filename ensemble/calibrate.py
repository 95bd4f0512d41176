"""Optional monotone calibration of ensemble scores onto the MOS scale, fitted on validation.

A calibration must never reorder (or tie) test scores: SRCC on the test set would change. The
logistic is strictly increasing when its slope is positive; isotonic regression is a step function
(it ties whole blocks), so we keep its fitted levels but interpolate linearly between block centres and
add bounded tails beyond the end centres (`combine._tail`), which gives a strictly increasing map that stays
on the MOS scale. `check_order` verifies the result at the precision the scores are written with.
"""
from __future__ import annotations

import numpy as np
from sklearn.isotonic import IsotonicRegression

from members.contract import metrics

# How a calibration is applied lives in combine.py, shared with the Scorer and submission.

DECIMALS = 6  # scores are written with %.6f
# Beyond the end block centres the isotonic map rises at most this share of the validation MOS range
# above the top level (and falls as far below the bottom one): scores stay on the MOS scale.
TAIL_MARGIN = 0.01


class CalibrationError(ValueError):
    """The calibration cannot be fitted or would change the order of scores."""


def fit_calibration(kind: str, pred: np.ndarray, mos: np.ndarray) -> dict:
    """Fit calibration `kind` ('none', 'logistic' or 'isotonic') of `pred` to `mos`; returns its
    JSON-safe parameters."""
    if kind == "none":
        return {"kind": "none"}
    if kind == "logistic":
        b1, b2, b3, b4 = (float(v) for v in metrics.fit_logistic(pred, mos))
        if not (b1 - b2) / b4 > 0:
            raise CalibrationError(f"logistic calibration is decreasing (b1={b1:g}, b2={b2:g}, b4={b4:g}): the "
                                   "ensemble score does not increase with the MOS")
        return {"kind": "logistic", "params": [b1, b2, b3, b4]}
    if kind == "isotonic":
        fitted = IsotonicRegression(increasing=True).fit_transform(pred, mos)
        levels = np.unique(fitted)
        if len(levels) < 2:
            raise CalibrationError("isotonic calibration is constant: the ensemble score does not increase "
                                   "with the MOS")
        centres = np.array([pred[fitted == level].mean() for level in levels])
        return {"kind": "isotonic", "x": centres.tolist(), "y": levels.tolist(),
                "tail_margin": float(TAIL_MARGIN * np.ptp(mos)),
                "tail_scale": float(np.ptp(pred))}  # > 0: at least two blocks
    raise CalibrationError(f"unknown calibration {kind!r}")


def check_order(raw: np.ndarray, calibrated: np.ndarray, what: str) -> None:
    """Raise unless every pair of neighbouring scores that differs as written (%.6f) without
    calibration still differs, in the same direction, with it."""
    order = np.argsort(raw, kind="stable")
    rising = np.diff(np.round(raw[order], DECIMALS)) > 0
    kept = np.diff(np.round(calibrated[order], DECIMALS)) > 0
    broken = int(np.sum(rising & ~kept))
    if broken:
        raise CalibrationError(f"calibration would tie or reorder {broken} pair(s) of neighbouring {what} "
                               "scores; use calibration: none")
