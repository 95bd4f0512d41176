"""Optional monotone calibration of ensemble scores onto the MOS scale, fitted on validation.

A calibration must never reorder (or tie) test scores: SRCC on the test set would change. The
logistic is strictly increasing when its slope is positive; isotonic regression is a step function
(it ties whole blocks), so we keep its fitted levels but interpolate linearly between block centres and
extend the end segments, which gives a strictly increasing map. `check_order` verifies the result at
the precision the scores are written with.
"""
from __future__ import annotations

import numpy as np
from sklearn.isotonic import IsotonicRegression

from members import metrics

DECIMALS = 6  # scores are written with %.6f


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
        return {"kind": "isotonic", "x": centres.tolist(), "y": levels.tolist()}
    raise CalibrationError(f"unknown calibration {kind!r}")


def apply_calibration(params: dict, pred: np.ndarray) -> np.ndarray:
    """Map scores through a calibration from `fit_calibration`."""
    kind = params["kind"]
    if kind == "none":
        return np.asarray(pred, dtype=np.float64)
    if kind == "logistic":
        return metrics.logistic4(pred, *params["params"])
    x, y = np.asarray(params["x"]), np.asarray(params["y"])
    out = np.interp(pred, x, y)
    # np.interp clamps outside [x0, xn]; extend the end segments instead so no tail collapses to a tie.
    low, high = pred < x[0], pred > x[-1]
    out[low] = y[0] + (pred[low] - x[0]) * (y[1] - y[0]) / (x[1] - x[0])
    out[high] = y[-1] + (pred[high] - x[-1]) * (y[-1] - y[-2]) / (x[-1] - x[-2])
    return out


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
