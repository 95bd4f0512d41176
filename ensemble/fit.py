"""Honest comparison of combination methods and the final fit.

Every method is scored by cross-validation grouped by reference image on the validation split (weights
fitted on the other folds). The method with the best CV mean main score is chosen, but unequal weights
are kept only when a paired bootstrap over references shows that they beat the equal-weight mean
(lower bound of the difference > 0): with 25 or so references a small CV gain is mostly noise. The
chosen method is then refitted on the whole validation split and applied to the test split.

Members are z-scored with statistics of the whole validation split, also inside the CV: the statistics
use no labels, so the held-out folds leak nothing about the MOS into the fitted weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import GroupKFold
from tqdm import tqdm

from members import metrics

from .calibrate import apply_calibration, check_order, fit_calibration
from .config import EnsembleConfig
from .io import EnsembleInputError, MemberData
from .methods import Method, choose_ridge_alpha, get_method, standardisation, standardise


@dataclass
class MethodResult:
    """Cross-validated and refitted results of one method."""

    name: str
    fold_scores: list[float]
    oof: np.ndarray
    oof_metrics: dict[str, float]
    ci: tuple[float, float]
    weights: np.ndarray
    in_sample: float

    @property
    def cv_mean(self) -> float:
        return float(np.mean(self.fold_scores))


@dataclass
class EnsembleResult:
    """Everything the report and the output files need."""

    mean: np.ndarray
    std: np.ndarray
    member_metrics: list[dict]
    methods: dict[str, MethodResult]
    best: str
    chosen: str
    paired: dict[str, float] | None
    reason: str
    calibration: dict
    oof: np.ndarray
    test: np.ndarray
    ridge_alpha: float | None  # the ridge refit's alpha (configured or chosen by inner CV); None without ridge


def cross_validate(method: Method, x: np.ndarray, y: np.ndarray, groups: np.ndarray,
                   folds: int) -> tuple[np.ndarray, list[float]]:
    """Out-of-fold predictions and per-fold main scores, folds grouped by reference."""
    oof = np.empty(len(y))
    scores = []
    for train, test in GroupKFold(n_splits=folds).split(x, y, groups):
        weights = method.fit(x[train], y[train], groups[train])
        oof[test] = method.combine(x[test], weights)
        scores.append(metrics.main_score(oof[test], y[test]))
    return oof, scores


def evaluate_method(method: Method, x: np.ndarray, y: np.ndarray, mos: np.ndarray, groups: np.ndarray,
                    cfg: EnsembleConfig) -> MethodResult:
    """CV scores, bootstrap interval of the pooled out-of-fold main score, and the full refit."""
    oof, scores = cross_validate(method, x, y, groups, cfg.folds)
    weights = method.fit(x, y, groups)
    return MethodResult(
        name=method.name, fold_scores=scores, oof=oof, oof_metrics=metrics.evaluate(oof, mos),
        ci=metrics.bootstrap_ci(metrics.main_score, oof, mos, groups, n_boot=cfg.n_boot, seed=cfg.seed),
        weights=weights, in_sample=metrics.main_score(method.combine(x, weights), mos),
    )


def choose(results: dict[str, MethodResult], mos: np.ndarray, groups: np.ndarray,
           cfg: EnsembleConfig) -> tuple[str, str, dict[str, float] | None, str]:
    """(best by CV mean, chosen, paired bootstrap of best vs mean or None, reason)."""
    # max() keeps the first of equal scores and "mean" comes first: ties go to the simplest method.
    best = max(results, key=lambda name: results[name].cv_mean)
    if best == "mean":
        return best, best, None, "the equal-weight mean has the best cross-validated main score"
    paired = metrics.paired_bootstrap(metrics.main_score, results[best].oof, results["mean"].oof, mos, groups,
                                      n_boot=cfg.n_boot, seed=cfg.seed)
    detail = (f"{best} vs mean on out-of-fold predictions: delta main {paired['delta']:+.4f}, "
              f"95% interval over references [{paired['low']:+.4f}, {paired['high']:+.4f}], "
              f"P(better) {paired['p_better']:.2f}")
    if paired["low"] > 0:
        return best, best, paired, f"{best} has the best CV mean and beats the equal-weight mean ({detail})"
    return best, "mean", paired, (f"{best} has the best CV mean but does not beat the equal-weight mean "
                                  f"reliably (interval includes 0), so the mean is used ({detail})")


def run_ensemble(data: MemberData, cfg: EnsembleConfig, progress: bool = False) -> EnsembleResult:
    """Standardise, compare methods by grouped CV, choose, refit, predict the test split, calibrate."""
    n_refs = len(np.unique(data.refs))
    if n_refs < cfg.folds:
        raise EnsembleInputError(f"{data.dirs[0] / 'labels_val.csv'}: {n_refs} references, fewer than "
                                 f"folds={cfg.folds}; grouped cross-validation needs one per fold at least")
    if cfg.calibration != "none" and not data.higher_is_better:
        raise EnsembleInputError("calibration to the MOS scale needs a higher-is-better MOS (preds_test.json "
                                 "says higher_is_better=false): output scores must stay higher-is-better")
    mean, std = standardisation(data.x_val)
    x_val, x_test = standardise(data.x_val, mean, std), standardise(data.x_test, mean, std)
    y = data.mos if data.higher_is_better else -data.mos

    member_metrics = []
    for j, name in enumerate(data.members):
        row = metrics.evaluate(data.x_val[:, j], data.mos)
        row["ci"] = metrics.bootstrap_ci(metrics.main_score, data.x_val[:, j], data.mos, data.refs,
                                         n_boot=cfg.n_boot, seed=cfg.seed)
        member_metrics.append({"name": name, **row})

    results = {}
    for name in tqdm(cfg.methods, desc="ensemble methods", disable=not progress):
        method = get_method(name, ridge_alpha=cfg.ridge_alpha, greedy_rounds=cfg.greedy_rounds)
        results[name] = evaluate_method(method, x_val, y, data.mos, data.refs, cfg)
    best, chosen, paired, reason = choose(results, data.mos, data.refs, cfg)

    method = get_method(chosen)
    weights = results[chosen].weights
    val_pred = method.combine(x_val, weights)
    test_pred = method.combine(x_test, weights)
    calibration = fit_calibration(cfg.calibration, val_pred, data.mos)
    test_out = apply_calibration(calibration, test_pred)
    check_order(test_pred, test_out, "test")
    oof_out = apply_calibration(calibration, results[chosen].oof)
    check_order(results[chosen].oof, oof_out, "out-of-fold validation")
    ridge_alpha = None
    if "ridge" in results:
        ridge_alpha = cfg.ridge_alpha if cfg.ridge_alpha is not None else choose_ridge_alpha(x_val, y, data.refs)
    return EnsembleResult(mean=mean, std=std, member_metrics=member_metrics, methods=results, best=best,
                          chosen=chosen, paired=paired, reason=reason, calibration=calibration,
                          oof=oof_out, test=test_out, ridge_alpha=ridge_alpha)
