"""Optional monotone calibration of ensemble scores onto the MOS scale, fitted on validation.

A calibration must never reorder (or tie) test scores: SRCC on the test set would change. The
logistic is strictly increasing when its slope is positive; isotonic regression is a step function
(it ties whole blocks), so we keep its fitted levels but interpolate linearly between block centres and
add bounded tails beyond the end centres (`_tail`), which gives a strictly increasing map that stays
on the MOS scale. `check_order` verifies the result at the precision the scores are written with.
"""
from __future__ import annotations

import numpy as np
from sklearn.isotonic import IsotonicRegression

from members import metrics

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


def apply_calibration(params: dict, pred: np.ndarray) -> np.ndarray:
    """Map scores through a calibration from `fit_calibration`."""
    kind = params["kind"]
    if kind == "none":
        return np.asarray(pred, dtype=np.float64)
    if kind == "logistic":
        return metrics.logistic4(pred, *params["params"])
    x, y = np.asarray(params["x"]), np.asarray(params["y"])
    pred = np.asarray(pred, dtype=np.float64)
    out = np.interp(pred, x, y)
    # np.interp clamps outside [x0, xn], which would tie every score beyond the ends; bounded tails instead.
    low, high = pred < x[0], pred > x[-1]
    margin, scale = params["tail_margin"], params["tail_scale"]
    out[low] = y[0] - _tail(x[0] - pred[low], margin, scale)
    out[high] = y[-1] + _tail(pred[high] - x[-1], margin, scale)
    return out


def _tail(distance: np.ndarray, margin: float, scale: float) -> np.ndarray:
    """Rise beyond an end centre: margin * L / (1 + L) with L = log(1 + d / scale); strictly increasing
    in the distance d and below `margin`.

    Validation says nothing about the MOS beyond its outermost blocks. Extending the end segments
    (the earlier rule) extrapolates without bound (5008 on a 1135-1653 scale); clipping to the end
    levels ties every score out there, which changes the test SRCC and fails `check_order`. This
    tail starts with slope margin / scale (scale = the range of the validation scores, so about 1% of
    the mean slope of the fitted map) and its slope decays like 1 / (d log^2 d): much slower than a
    tanh's (exponential) or d / (d + scale)'s (1 / d^2), so scores far out still differ at 6 decimals
    (where they do not, check_order refuses the map).
    """
    spread = np.log1p(distance / scale)
    return margin * spread / (1.0 + spread)


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
