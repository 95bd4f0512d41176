"""The fitted ensemble as a function: the record in `ensemble.json` and the members' scores of a split
give the ensemble's scores. The one place that applies a fit: the ensemble stage writes its
`preds_<split>.csv` with it, the Scorer scores new pairs with it, and submission and the Scorer
recompute the stage's files with it (`check_outputs`), so a record edited and resealed by hand is
found. numpy only (plus `members.contract.metrics.logistic4`): no torch, no fitting.

A record holds `method`, `weights` (one per member, non-negative, summing to 1: every method's
contract), `standardisation` (each member's validation mean and std), `calibration` (see
`ensemble.calibrate`) and, for rank_mean, `rank_reference` (the standardised validation scores that new
scores are placed among). The stage combines the members' written scores (6 decimals for AHIQ members,
in full for the others): a caller with fresh AHIQ scores rounds them so first (the Scorer does).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from members.contract.metrics import logistic4
from members.contract.stagefiles import SCORE_DECIMALS, rebuild_ensemble

# Written scores are rounded to 6 decimals: a recomputed score may differ from its file by half a unit
# there; one unit leaves room for float noise and still finds any real change.
TOLERANCE = 10.0 ** -SCORE_DECIMALS
WEIGHT_SUM_SLACK = 1e-6
_SHOW = 3


class CombineError(ValueError):
    """An ensemble record that cannot be applied, or whose outputs it does not reproduce; the message
    names the record's key."""


def combine_linear(x: np.ndarray, weights: np.ndarray, fitted: np.ndarray | None = None) -> np.ndarray:
    """Weighted sum of the member columns."""
    return x @ weights


def quantiles(x: np.ndarray, fitted: np.ndarray) -> np.ndarray:
    """Each column of `x` as its place among the same column of `fitted`: the mid-rank empirical CDF
    ((rank - 0.5) / n, ties averaged) at the fitted values, linear between them and continued past
    both ends with the mean slope, so that order is kept everywhere. On `fitted` itself this is the
    rank transform; any other rows are placed on that same scale, one at a time."""
    out = np.empty(x.shape, dtype=np.float64)
    for j in range(x.shape[1]):
        values, counts = np.unique(fitted[:, j], return_counts=True)  # sorted
        q = (np.cumsum(counts) - counts / 2) / len(fitted)  # (rows below + half the ties) / n
        col = np.interp(x[:, j], values, q)
        slope = (q[-1] - q[0]) / (values[-1] - values[0]) if len(values) > 1 else 0.0
        below, above = x[:, j] < values[0], x[:, j] > values[-1]
        col[below] = q[0] + (x[below, j] - values[0]) * slope
        col[above] = q[-1] + (x[above, j] - values[-1]) * slope
        out[:, j] = col
    return out


def combine_ranks(x: np.ndarray, weights: np.ndarray, fitted: np.ndarray) -> np.ndarray:
    """Weighted sum of each member's quantile among the fitted rows (`quantiles`)."""
    return quantiles(x, fitted) @ weights


# How each method combines standardised member columns (x, weights, fitted rows); the fits are in methods.py.
COMBINE: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray | None], np.ndarray]] = {
    "mean": combine_linear, "rank_mean": combine_ranks, "nnls": combine_linear, "ridge": combine_linear,
    "greedy": combine_linear,
}


def apply_calibration(params: dict, pred: np.ndarray) -> np.ndarray:
    """Map scores through a calibration from `ensemble.calibrate.fit_calibration`."""
    kind = params["kind"]
    if kind == "none":
        return np.asarray(pred, dtype=np.float64)
    if kind == "logistic":
        return logistic4(pred, *params["params"])
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


# ------------------------------------------------------------------------------- reading a record
def _finite(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CombineError(f"'{key}' is {value!r}, not a finite number")
    return float(value)


def _numbers(value: Any, key: str, size: int | None = None) -> np.ndarray:
    if not isinstance(value, list) or (size is not None and len(value) != size) or not value:
        raise CombineError(f"'{key}' must be a list of {size or 'some'} numbers, got {str(value)[:60]}")
    return np.array([_finite(v, f"{key}[{i}]") for i, v in enumerate(value)])


def _weights(record: dict, names: list[str]) -> np.ndarray:
    weights = record.get("weights")
    if not isinstance(weights, dict) or sorted(weights) != sorted(names):
        raise CombineError(f"'weights' must name the members {sorted(names)}, got "
                           f"{sorted(weights) if isinstance(weights, dict) else weights!r}")
    w = np.array([_finite(weights[n], f"weights.{n}") for n in names])
    bad = [n for n, v in zip(names, w) if v < 0]
    if bad or abs(w.sum() - 1.0) > WEIGHT_SUM_SLACK:
        where = f"'weights.{bad[0]}' is {weights[bad[0]]!r}" if bad else f"'weights' sum to {w.sum():.6g}"
        raise CombineError(f"{where}: every method's weights are non-negative and sum to 1")
    return w


def _standardisation(record: dict, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    table = record.get("standardisation")
    if not isinstance(table, dict) or not all(isinstance(table.get(n), dict) for n in names):
        raise CombineError(f"'standardisation' must give a mean and std for each of {names}")
    mean = np.array([_finite(table[n].get("mean"), f"standardisation.{n}.mean") for n in names])
    std = np.array([_finite(table[n].get("std"), f"standardisation.{n}.std") for n in names])
    for n, s in zip(names, std):
        if s <= 0:
            raise CombineError(f"'standardisation.{n}.std' is {s!r}: a member's spread is positive")
    return mean, std


def _calibration(record: dict) -> dict:
    """The calibration, checked to be the increasing map the stage fits (never one that reverses)."""
    params = record.get("calibration")
    kind = params.get("kind") if isinstance(params, dict) else None
    if kind == "none":
        return params
    if kind == "logistic":
        b1, b2, _, b4 = _numbers(params.get("params"), "calibration.params", 4)
        if not (b1 - b2) / b4 > 0:
            raise CombineError("'calibration.params' give a decreasing logistic: it would reverse the scores")
        return params
    if kind == "isotonic":
        x, y = _numbers(params.get("x"), "calibration.x"), _numbers(params.get("y"), "calibration.y")
        if len(x) != len(y) or len(x) < 2 or np.any(np.diff(x) < 0) or np.any(np.diff(y) <= 0):
            raise CombineError("'calibration.x' and 'calibration.y' must be increasing lists of one length")
        for key in ("tail_margin", "tail_scale"):
            if _finite(params.get(key), f"calibration.{key}") <= 0:
                raise CombineError(f"'calibration.{key}' must be positive")
        return params
    raise CombineError(f"'calibration.kind' is {kind!r}; expected none, logistic or isotonic")


def _rank_reference(record: dict, names: list[str]) -> np.ndarray:
    table = record.get("rank_reference")
    if not isinstance(table, dict) or not all(isinstance(table.get(n), list) for n in names):
        raise CombineError("a rank_mean ensemble without its 'rank_reference' (written by an older kit)")
    columns = [_numbers(table[n], f"rank_reference.{n}") for n in names]
    if len({len(c) for c in columns}) != 1:
        raise CombineError("'rank_reference' lists differ in length between members")
    return np.array(columns).T


# ---------------------------------------------------------------------------------- applying it
def combined_scores(record: dict, scores: Mapping[str, np.ndarray]) -> np.ndarray:
    """The ensemble's scores before calibration: member `scores` (name -> one score per row)
    standardised and combined by the record's method and weights."""
    names = list(scores)
    method = record.get("method")
    if method not in COMBINE:
        raise CombineError(f"'method' is {method!r}; expected one of {', '.join(COMBINE)}")
    weights = _weights(record, names)
    mean, std = _standardisation(record, names)
    x = np.column_stack([np.asarray(scores[n], dtype=np.float64) for n in names])
    fitted = _rank_reference(record, names) if method == "rank_mean" else None
    return COMBINE[method]((x - mean) / std, weights, fitted)


def ensemble_scores(record: dict, scores: Mapping[str, np.ndarray]) -> np.ndarray:
    """The ensemble's scores of one split's rows from its members' scores (name -> one per row)."""
    calibration = _calibration(record)
    return apply_calibration(calibration, combined_scores(record, scores))


def check_outputs(record: dict, members: Mapping[str, Mapping[str, float]], written: Mapping[str, float],
                  what: str) -> None:
    """Refuse a record whose weights, standardisation and calibration, applied to the `members`' scores
    (name -> {image: score}), do not give the ensemble's `written` scores ({image: score}; `what`
    names that file) within the files' rounding."""
    names = sorted(written)
    for member, table in members.items():
        missing = [n for n in names if n not in table]
        if missing:
            raise CombineError(f"{what} scores {len(missing)} image(s) that member {member} did not predict "
                               f"(e.g. {', '.join(missing[:_SHOW])})")
    got = ensemble_scores(record, {m: np.array([table[n] for n in names]) for m, table in members.items()})
    want = np.array([written[n] for n in names])
    off = np.flatnonzero(~(np.abs(got - want) <= TOLERANCE))
    if len(off):
        shown = ", ".join(f"{names[i]} written {want[i]:.6f} but recomputed {got[i]:.6f}" for i in off[:_SHOW])
        raise CombineError(f"its weights, standardisation and calibration applied to the members' scores do not "
                           f"give {what}: {len(off)} of {len(names)} scores differ by more than {TOLERANCE:g} "
                           f"({shown})")


def rebuild_hint(experiment: str | Path | None) -> str:
    """What to do about a record that `check_outputs` or `ensemble_scores` refused."""
    return f"ensemble.json was edited, or its files come from another run: run {rebuild_ensemble(experiment)}"
