"""Combination methods behind one interface: `fit(x, y, groups) -> weights`, `combine(x, weights, fitted)`.

`x` holds one z-scored column per member, `y` is the MOS oriented so that higher is better, `groups`
the reference id of each row. Weights are non-negative and sum to 1, so every method's output lives on
the same z-scale: out-of-fold predictions from different folds can be pooled, and weights compared.
Correlation metrics do not care about the overall scale that this normalisation drops. `fitted` are
the rows the weights were fitted on; only rank_mean reads them (a score's place among them), so that
a row's ensemble score never depends on which other rows are scored with it.

Every method first drops the members that rank the rows it is fitted on backwards (`sane_members`):
member scores are higher-is-better by contract, so a negative correlation means a wrong direction or
wrong labels, and no weighting (equal weights included) may give such a member positive weight.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np
from scipy import optimize
from sklearn.model_selection import GroupKFold

from members.contract import metrics

# How a fit is applied lives in combine.py, shared with the Scorer and submission; re-exported here.
from .combine import COMBINE, combine_linear

RIDGE_ALPHAS = (0.01, 0.1, 1.0, 10.0)  # in units of the number of training images
INNER_FOLDS = 3


@dataclass(frozen=True)
class Method:
    """A named combination rule."""

    name: str
    fit: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
    combine: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # (x, weights, fitted rows)


def standardisation(x_val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-member mean and standard deviation on the validation split."""
    return x_val.mean(axis=0), x_val.std(axis=0)


def standardise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """z-score each member column with validation statistics (the same map for val and test)."""
    return (x - mean) / std


def signed_main(pred: np.ndarray, y: np.ndarray) -> float:
    """PLCC + SRCC against a higher-is-better target: unlike |PLCC| + |SRCC| it never rewards a
    combination for being anti-correlated."""
    return metrics.signed_main(pred, y)


def sane_members(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mask of the members whose signed PLCC + SRCC with `y` is positive (not backwards)."""
    return np.array([signed_main(x[:, j], y) > 0 for j in range(x.shape[1])])


def on_sane_members(fit: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
                    ) -> Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """`fit` restricted to the sane members of the rows it is given; backwards members get weight 0,
    so equal weights and ridge's shrinkage target are equal over the sane members only.

    With no sane member at all (possible inside one CV fold of a marginal member) the fit falls back
    to all members: the out-of-fold score then shows the failure, and `run_ensemble` refuses a backwards
    ensemble or a run whose every member is backwards.
    """
    def fit_sane(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> np.ndarray:
        mask = sane_members(x, y)
        if not mask.any():
            mask[:] = True
        weights = np.zeros(x.shape[1])
        weights[mask] = fit(x[:, mask], y, groups)
        return weights
    return fit_sane


def _normalised(w: np.ndarray) -> np.ndarray:
    """Weights summing to 1. All zero (no member helps a non-negative fit, e.g. weak members in one
    fold): fall back to the prior, equal weights, rather than abort the whole ensemble."""
    total = w.sum()
    return w / total if total > 0 else np.full(w.shape, 1.0 / w.size)


def _equal(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    return np.full(x.shape[1], 1.0 / x.shape[1])


def fit_nnls(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Non-negative least squares of the centred MOS on the centred members (no intercept needed)."""
    w, _ = optimize.nnls(x - x.mean(axis=0), y - y.mean())
    return _normalised(w)


def ridge_toward_equal(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """Minimise |yc - Xc w|^2 + alpha * n * |w - w0|^2 subject to w >= 0.

    w0 is the equal-weight vector scaled by the least-squares slope of the MOS on the equal-weight
    mean, so the penalty acts on the deviation from the mean ensemble. Stacking sqrt(alpha n) * I under
    X turns this into one NNLS problem; where the unconstrained closed form
    w0 + (Xc'Xc + alpha n I)^-1 Xc'(yc - Xc w0) is non-negative, it is the same solution.
    """
    xc, yc = x - x.mean(axis=0), y - y.mean()
    k = x.shape[1]
    mean_pred = xc.mean(axis=1)
    slope = max(float(mean_pred @ yc) / float(mean_pred @ mean_pred), 0.0)
    w0 = np.full(k, slope / k)
    root = np.sqrt(alpha * len(y))
    w, _ = optimize.nnls(np.vstack([xc, root * np.eye(k)]), np.concatenate([yc, root * w0]))
    return _normalised(w)


def choose_ridge_alpha(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    """Alpha with the best mean PLCC+SRCC over an inner cross-validation grouped by reference; ties go
    to the stronger shrinkage (closer to the equal-weight mean)."""
    n_splits = min(INNER_FOLDS, len(np.unique(groups)))
    best_alpha, best_score = RIDGE_ALPHAS[-1], -np.inf
    for alpha in sorted(RIDGE_ALPHAS, reverse=True):
        scores = [signed_main(combine_linear(x[te], ridge_toward_equal(x[tr], y[tr], alpha)), y[te])
                  for tr, te in GroupKFold(n_splits=n_splits).split(x, y, groups)]
        if np.mean(scores) > best_score + 1e-12:
            best_alpha, best_score = alpha, float(np.mean(scores))
    return best_alpha


def fit_ridge(x: np.ndarray, y: np.ndarray, groups: np.ndarray, alpha: float | None = None) -> np.ndarray:
    """Ridge toward equal weights; alpha None = choose by inner grouped CV on these rows only."""
    return ridge_toward_equal(x, y, choose_ridge_alpha(x, y, groups) if alpha is None else alpha)


def fit_greedy(x: np.ndarray, y: np.ndarray, groups: np.ndarray, rounds: int = 25) -> np.ndarray:
    """Greedy ensemble selection with replacement (Caruana et al. 2004) on PLCC+SRCC.

    Each round adds the member whose inclusion gives the best score of the running average; the bag at
    the best round is kept, so later rounds that only add noise do not count.
    """
    counts = np.zeros(x.shape[1])
    total = np.zeros(len(y))
    best_score, best_counts = -np.inf, counts
    for _ in range(rounds):
        scores = [signed_main(total + x[:, j], y) for j in range(x.shape[1])]
        j = int(np.argmax(scores))
        counts[j] += 1
        total = total + x[:, j]
        if scores[j] > best_score + 1e-12:
            best_score, best_counts = scores[j], counts.copy()
    return best_counts / best_counts.sum()


def get_method(name: str, ridge_alpha: float | None = None, greedy_rounds: int = 25) -> Method:
    """The method called `name` (one of ensemble.config.METHODS)."""
    fits = {
        "mean": _equal,
        "rank_mean": _equal,
        "nnls": fit_nnls,
        "ridge": partial(fit_ridge, alpha=ridge_alpha),
        "greedy": partial(fit_greedy, rounds=greedy_rounds),
    }
    if name not in fits:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(fits)}")
    return Method(name, on_sane_members(fits[name]), COMBINE[name])  # applied as the Scorer applies it
