"""IQA metrics: correlations, the 4-parameter logistic mapping, and bootstrap intervals over references.

This is the one tested place for metrics; training, the ensemble stage and reports import it.
Conventions follow the NTIRE challenge (see shared/docs/ntire-format.md):

- main score = PLCC + SRCC with their signs (`signed_main`, evaluate's "main"): what the kit chooses
  checkpoints, methods and members by, since a predictor that ranks backwards must score below zero,
  not look good; `abs_main` = |PLCC| + |SRCC| is the sign-free number of the published tables, only
  reported beside it (both agree whenever the correlations are positive);
- PLCC/RMSE "after the logistic" map predictions through
  `(b1 - b2) / (1 + exp(-(x - b3) / b4)) + b2` fitted to the MOS, started at
  `[max(mos), min(mos), mean(pred), std(pred) / 4]`;
- intervals resample REFERENCE images (groups), not single images: the images of one reference share
  content, so an image-level bootstrap pretends to have far more independent data than there is.
"""
from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
from scipy import optimize, special, stats

MetricFn = Callable[[np.ndarray, np.ndarray], float]


class MetricError(ValueError):
    """Inputs to a metric are unusable (non-finite, mismatched, too few or constant)."""


def _as_vector(values: object, name: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise MetricError(f"{name}: not numeric ({err})") from None
    if arr.ndim != 1:
        raise MetricError(f"{name}: expected a 1-D sequence, got shape {arr.shape}")
    bad = ~np.isfinite(arr)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise MetricError(f"{name}: {int(bad.sum())} non-finite value(s) (NaN/inf), first at index {first}")
    return arr


def check_pair(pred: object, mos: object, min_items: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Validate a prediction/MOS pair and return them as float64 vectors.

    Raises `MetricError` naming the argument on NaN/inf, a length mismatch, fewer than `min_items`
    items, or a constant vector (every correlation is undefined then).
    """
    p, m = _as_vector(pred, "pred"), _as_vector(mos, "mos")
    if len(p) != len(m):
        raise MetricError(f"length mismatch: pred has {len(p)} items, mos has {len(m)}")
    if len(p) < min_items:
        raise MetricError(f"need at least {min_items} items, got {len(p)}")
    for arr, name in ((p, "pred"), (m, "mos")):
        if np.ptp(arr) == 0:
            raise MetricError(f"{name}: all {len(arr)} values are equal ({arr[0]!r}); correlation undefined")
    return p, m


def _ranks(a: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing the mean of the ranks they span (as scipy.stats.rankdata 'average')."""
    _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse]


def _pearson(p: np.ndarray, m: np.ndarray) -> float:
    dp, dm = p - p.mean(), m - m.mean()
    r = float(dp @ dm) / np.sqrt(float(dp @ dp) * float(dm @ dm))
    return float(np.clip(r, -1.0, 1.0))  # rounding can push |r| a hair above 1


# Pearson/Spearman are computed here with numpy rather than through scipy.stats: the bootstrap calls
# them thousands of times and scipy's per-call overhead dominated the ensemble stage's runtime. The
# tests check both against scipy.stats.


def srcc(pred: object, mos: object) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks)."""
    p, m = check_pair(pred, mos)
    return _pearson(_ranks(p), _ranks(m))


def plcc(pred: object, mos: object) -> float:
    """Pearson linear correlation of the raw predictions."""
    p, m = check_pair(pred, mos)
    return _pearson(p, m)


def krcc(pred: object, mos: object) -> float:
    """Kendall rank correlation (tau-b)."""
    p, m = check_pair(pred, mos)
    return float(stats.kendalltau(p, m).statistic)


def rmse(pred: object, mos: object) -> float:
    """Root mean squared error of the raw predictions (meaningful only on the MOS scale)."""
    p, m = check_pair(pred, mos)
    return float(np.sqrt(np.mean((p - m) ** 2)))


def logistic4(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """(b1 - b2) / (1 + exp(-(x - b3) / b4)) + b2, written with `expit` so large |x| cannot overflow."""
    return (b1 - b2) * special.expit((np.asarray(x, dtype=np.float64) - b3) / b4) + b2


def fit_logistic(pred: object, mos: object, maxfev: int = 100_000) -> np.ndarray:
    """Least-squares fit of `logistic4` mapping predictions to MOS; returns [b1, b2, b3, b4].

    Raises `MetricError` when the optimiser does not converge or returns non-finite parameters.
    """
    # Four parameters need at least four points; curve_fit would raise a bare TypeError otherwise.
    p, m = check_pair(pred, mos, min_items=4)
    p0 = [m.max(), m.min(), p.mean(), p.std() / 4]
    try:
        with warnings.catch_warnings():
            # An unestimable covariance is irrelevant here: only the parameters are used.
            warnings.simplefilter("ignore", optimize.OptimizeWarning)
            params, _ = optimize.curve_fit(logistic4, p, m, p0=p0, maxfev=maxfev)
    except RuntimeError as err:
        raise MetricError(f"logistic fit did not converge on {len(p)} items: {err}") from None
    if not np.all(np.isfinite(params)) or params[3] == 0:
        raise MetricError(f"logistic fit gave unusable parameters {params.tolist()}")
    return params


def plcc_logistic(pred: object, mos: object) -> float:
    """PLCC after mapping predictions through the fitted logistic."""
    p, m = check_pair(pred, mos)
    return plcc(logistic4(p, *fit_logistic(p, m)), m)


def rmse_logistic(pred: object, mos: object) -> float:
    """RMSE (MOS units) after mapping predictions through the fitted logistic."""
    p, m = check_pair(pred, mos)
    return rmse(logistic4(p, *fit_logistic(p, m)), m)


def abs_main(pred: object, mos: object) -> float:
    """|PLCC| + |SRCC|, sign-free as in the published NTIRE tables: a predictor that ranks backwards
    scores as well as its mirror image, so never choose by it (see `signed_main`)."""
    p, m = check_pair(pred, mos)
    return abs(_pearson(p, m)) + abs(_pearson(_ranks(p), _ranks(m)))


def signed_main(pred: object, target: object) -> float:
    """The main score PLCC + SRCC with their signs, against a higher-is-better `target` (negate a
    lower-is-better MOS first): a predictor that ranks backwards scores below zero, so it is the one
    to choose checkpoints, members and ensembles by; it equals `abs_main` when both correlations are
    positive."""
    p, t = check_pair(pred, target)
    return _pearson(p, t) + _pearson(_ranks(p), _ranks(t))


def evaluate(pred: object, mos: object) -> dict[str, float]:
    """All metrics at once: srcc, plcc, krcc, rmse, plcc_logistic, rmse_logistic, main (signed
    PLCC + SRCC, the one to choose by) and abs_main (sign-free, as published)."""
    p, m = check_pair(pred, mos)
    fitted = logistic4(p, *fit_logistic(p, m))
    return {
        "srcc": srcc(p, m),
        "plcc": plcc(p, m),
        "krcc": krcc(p, m),
        "rmse": rmse(p, m),
        "plcc_logistic": plcc(fitted, m),
        "rmse_logistic": rmse(fitted, m),
        "main": signed_main(p, m),
        "abs_main": abs_main(p, m),
    }


def _group_indices(groups: object, n: int) -> list[np.ndarray]:
    g = np.asarray(groups)
    if g.ndim != 1 or len(g) != n:
        raise MetricError(f"groups: expected {n} labels (one per item), got shape {g.shape}")
    _, inverse = np.unique(g, return_inverse=True)
    members = [np.flatnonzero(inverse == k) for k in range(inverse.max() + 1)]
    if len(members) < 2:
        raise MetricError("groups: need at least 2 distinct groups to bootstrap over groups")
    return members


def _resample(members: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    picks = rng.integers(0, len(members), size=len(members))
    return np.concatenate([members[k] for k in picks])


def _check_alpha(alpha: float, n_boot: int) -> None:
    if not 0 < alpha < 1:
        raise MetricError(f"alpha must be in (0, 1), got {alpha}")
    if n_boot < 1:
        raise MetricError(f"n_boot must be >= 1, got {n_boot}")


def _bootstrap_draws(stat: Callable[[np.ndarray], float], groups: object, n: int, n_boot: int,
                     seed: int) -> np.ndarray:
    """`stat(idx)` over `n_boot` resamples of whole groups (`idx`: the resampled item indices).

    A resample can be degenerate (e.g. every drawn group has one constant prediction); such draws
    carry no information about the metric and are dropped, but most must survive.
    """
    members = _group_indices(groups, n)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        idx = _resample(members, rng)
        try:
            draws.append(stat(idx))
        except MetricError:
            draws.append(np.nan)
    arr = np.asarray(draws, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if len(arr) < n_boot / 2:
        raise MetricError(f"only {len(arr)} of {n_boot} bootstrap resamples gave a defined metric")
    return arr


def bootstrap_ci(
    metric_fn: MetricFn,
    pred: object,
    mos: object,
    groups: object,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval (1 - alpha) of `metric_fn(pred, mos)`, resampling whole groups with
    replacement (groups = reference image ids)."""
    _check_alpha(alpha, n_boot)
    p, m = check_pair(pred, mos)
    values = _bootstrap_draws(lambda idx: metric_fn(p[idx], m[idx]), groups, len(p), n_boot, seed)
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def paired_bootstrap(
    metric_fn: MetricFn,
    pred_a: object,
    pred_b: object,
    mos: object,
    groups: object,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, float]:
    """Does `pred_a` beat `pred_b`? Bootstrap of metric(a) - metric(b) over groups, both predictions
    evaluated on the SAME resampled groups so that shared difficulty cancels.

    Returns delta (on the full data), low/high (percentile interval) and p_better (share of resamples
    where a scores higher than b).
    """
    _check_alpha(alpha, n_boot)
    a, m = check_pair(pred_a, mos)
    b, _ = check_pair(pred_b, mos)
    values = _bootstrap_draws(lambda idx: metric_fn(a[idx], m[idx]) - metric_fn(b[idx], m[idx]),
                              groups, len(m), n_boot, seed)
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return {
        "delta": float(metric_fn(a, m) - metric_fn(b, m)),
        "low": float(low),
        "high": float(high),
        "p_better": float(np.mean(values > 0)),
    }
