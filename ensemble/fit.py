"""Honest comparison of combination methods and the final fit.

Every method is scored by cross-validation grouped by reference image on the validation split (weights
fitted on the other folds). The held-out predictions of all folds are pooled and scored at once: PLCC +
SRCC over every image of every reference is what the challenge computes, and only a pooled score sees
offsets between references (a fold of one or two references measures correlation within a few image
contents). The method with the best pooled out-of-fold main score is chosen, but unequal weights are
kept only when a paired bootstrap over references shows that they beat the equal-weight mean (lower
bound of the difference > 0): with 25 or so references a small gain is mostly noise. The chosen method
is then refitted on the whole validation split and applied to the test split.

Quality is always signed (PLCC + SRCC against the MOS oriented higher-is-better): member scores are
higher-is-better, so a negative correlation is a defect to report, never a good score. Backwards
members get weight 0 (see `methods.on_sane_members`); a run whose members are all backwards, or whose
ensemble is backwards out of fold, stops with an input error.

Members are z-scored with statistics of the whole validation split, also inside the CV: the statistics
use no labels, so the held-out folds leak nothing about the MOS into the fitted weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.model_selection import GroupKFold
from tqdm import tqdm

from members.contract import metrics
from members.contract.schema import EnsembleConfig

from . import combine
from .calibrate import check_order, fit_calibration
from .combine import apply_calibration
from .io import EnsembleInputError, MemberData
from .methods import Method, choose_ridge_alpha, get_method, sane_members, standardisation, standardise

WITHIN_CONTENT_REFS = 3  # below this many references per fold, a fold's score is a within-content correlation


@dataclass
class MethodResult:
    """Cross-validated and refitted results of one method (all scores signed, see `quality`)."""

    name: str
    fold_scores: list[float]  # main score of each held-out fold alone: a within-fold diagnostic
    oof: np.ndarray
    oof_metrics: dict[str, float]  # of the pooled out-of-fold predictions
    ci: tuple[float, float]  # bootstrap interval (over references) of the pooled out-of-fold main
    weights: np.ndarray
    in_sample: float

    @property
    def pooled(self) -> float:
        """Pooled out-of-fold main score: the selection criterion and the leaderboard estimate."""
        return float(self.oof_metrics["main"])

    @property
    def within_fold_mean(self) -> float:
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
    valid: np.ndarray | None  # the NTIRE validation folder (development phase), when the members predicted it
    ridge_alpha: float | None  # the ridge refit's alpha (configured or chosen by inner CV); None without ridge
    refs_per_fold: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def headline(self) -> str:
        """The estimate of the leaderboard score, e.g. 'mean: pooled out-of-fold main 0.4700 [0.31, 0.60]'."""
        r = self.methods[self.chosen]
        return f"{self.chosen}: pooled out-of-fold main {r.pooled:.4f} [{r.ci[0]:.2f}, {r.ci[1]:.2f}]"


def quality(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Metrics against the higher-is-better target `y`: correlations keep their sign and main is the
    signed PLCC + SRCC; abs_main is the sign-free |PLCC| + |SRCC| of the published tables."""
    return metrics.evaluate(pred, y)


def cross_validate(method: Method, x: np.ndarray, y: np.ndarray, groups: np.ndarray,
                   folds: int) -> tuple[np.ndarray, list[float]]:
    """Out-of-fold predictions and each held-out fold's own main score, folds grouped by reference."""
    oof = np.empty(len(y))
    scores = []
    for train, test in GroupKFold(n_splits=folds).split(x, y, groups):
        weights = method.fit(x[train], y[train], groups[train])
        oof[test] = method.combine(x[test], weights, x[train])
        scores.append(metrics.signed_main(oof[test], y[test]))
    return oof, scores


def evaluate_method(method: Method, x: np.ndarray, y: np.ndarray, groups: np.ndarray,
                    cfg: EnsembleConfig) -> MethodResult:
    """Within-fold scores, pooled out-of-fold metrics with a bootstrap interval, and the full refit."""
    oof, scores = cross_validate(method, x, y, groups, cfg.folds)
    weights = method.fit(x, y, groups)
    return MethodResult(
        name=method.name, fold_scores=scores, oof=oof, oof_metrics=quality(oof, y),
        ci=metrics.bootstrap_ci(metrics.signed_main, oof, y, groups, n_boot=cfg.n_boot, seed=cfg.seed),
        weights=weights, in_sample=metrics.signed_main(method.combine(x, weights, x), y),
    )


def choose(results: dict[str, MethodResult], y: np.ndarray, groups: np.ndarray,
           cfg: EnsembleConfig) -> tuple[str, str, dict[str, float] | None, str]:
    """(best by pooled out-of-fold main, chosen, paired bootstrap of best vs mean or None, reason)."""
    # max() keeps the first of equal scores and "mean" comes first: ties go to the simplest method.
    best = max(results, key=lambda name: results[name].pooled)
    if best == "mean":
        return best, best, None, "the equal-weight mean has the best pooled out-of-fold main score"
    paired = metrics.paired_bootstrap(metrics.signed_main, results[best].oof, results["mean"].oof, y, groups,
                                      n_boot=cfg.n_boot, seed=cfg.seed)
    detail = (f"{best} vs mean on out-of-fold predictions: delta main {paired['delta']:+.4f}, "
              f"95% interval over references [{paired['low']:+.4f}, {paired['high']:+.4f}], "
              f"P(better) {paired['p_better']:.2f}")
    if paired["low"] > 0:
        return best, best, paired, (f"{best} has the best pooled out-of-fold main score and beats the "
                                    f"equal-weight mean ({detail})")
    return best, "mean", paired, (f"{best} has the best pooled out-of-fold main score but does not beat the "
                                  f"equal-weight mean reliably (interval includes 0), so the mean is used "
                                  f"({detail})")


def _direction_hint(data: MemberData) -> str:
    return (f"the MOS of {data.dirs[0] / 'labels_val.csv'} is {'higher' if data.higher_is_better else 'lower'}"
            "-is-better (preds_test.json 'higher_is_better') and member scores must be higher-is-better")


def _check_members_direction(data: MemberData, signed: list[float]) -> list[str]:
    """Raise if every member is backwards; else one warning line per backwards member."""
    if all(s <= 0 for s in signed):
        listed = ", ".join(f"{n} {s:+.3f}" for n, s in zip(data.members, signed))
        raise EnsembleInputError(f"every member ranks the validation images backwards (signed PLCC + SRCC: "
                                 f"{listed}); {_direction_hint(data)}: check 'higher_is_better' in each "
                                 "member's preds_test.json and its labels_val.csv")
    return [f"warning: member {n} ranks the validation images backwards (signed PLCC + SRCC {s:+.3f}) and gets "
            f"weight 0; member scores must be higher-is-better: check 'higher_is_better' in "
            f"{d / 'preds_test.json'} and the MOS in {d / 'labels_val.csv'}"
            for n, d, s in zip(data.members, data.dirs, signed) if s <= 0]


def _apply(record: dict, members: list[str], x: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(combined, calibrated) scores of the member columns `x`, after checking that the calibration
    keeps their order as written."""
    columns = dict(zip(members, x.T))
    raw, out = combine.combined_scores(record, columns), combine.ensemble_scores(record, columns)
    check_order(raw, out, what)
    return raw, out


def run_ensemble(data: MemberData, cfg: EnsembleConfig, progress: bool = False) -> EnsembleResult:
    """Standardise, compare methods by grouped CV, choose, refit, predict the test split, calibrate."""
    n_refs = len(np.unique(data.refs))
    if n_refs < cfg.folds:
        raise EnsembleInputError(f"{data.dirs[0] / 'labels_val.csv'}: {n_refs} references, fewer than "
                                 f"folds={cfg.folds}; grouped cross-validation needs one per fold at least")
    if cfg.calibration != "none" and not data.higher_is_better:
        raise EnsembleInputError("calibration to the MOS scale needs a higher-is-better MOS (preds_test.json "
                                 "says higher_is_better=false): output scores must stay higher-is-better")
    y = data.mos if data.higher_is_better else -data.mos
    signed = [metrics.signed_main(data.x_val[:, j], y) for j in range(len(data.members))]
    warnings = _check_members_direction(data, signed)  # before any fitting: it may refuse the run
    mean, std = standardisation(data.x_val)
    x_val = standardise(data.x_val, mean, std)

    member_metrics = []
    for j, name in enumerate(data.members):
        row = quality(data.x_val[:, j], y)
        row["ci"] = metrics.bootstrap_ci(metrics.signed_main, data.x_val[:, j], y, data.refs,
                                         n_boot=cfg.n_boot, seed=cfg.seed)
        member_metrics.append({"name": name, **row, "backwards": bool(signed[j] <= 0)})

    results = {}
    for name in tqdm(cfg.methods, desc="ensemble methods", disable=not progress):
        method = get_method(name, ridge_alpha=cfg.ridge_alpha, greedy_rounds=cfg.greedy_rounds)
        results[name] = evaluate_method(method, x_val, y, data.refs, cfg)
    best, chosen, paired, reason = choose(results, y, data.refs, cfg)
    if results[chosen].pooled <= 0:
        raise EnsembleInputError(f"the chosen ensemble ({chosen}) ranks the validation images backwards out of "
                                 f"fold (pooled signed PLCC + SRCC {results[chosen].pooled:+.4f}); nothing was "
                                 f"written. {_direction_hint(data)}: check the members' 'higher_is_better' "
                                 "and labels_val.csv")

    weights = results[chosen].weights
    calibration = fit_calibration(cfg.calibration, get_method(chosen).combine(x_val, weights, x_val), data.mos)
    # The test (and valid) files are made from the fit as ensemble.json records it, by the function that
    # submission and the Scorer apply to that record: what they recompute is what was written.
    record = {"method": chosen, "weights": {n: float(w) for n, w in zip(data.members, weights)},
              "standardisation": {n: {"mean": float(m), "std": float(s)} for n, m, s in zip(data.members, mean, std)},
              "calibration": calibration,
              "rank_reference": ({n: col.tolist() for n, col in zip(data.members, x_val.T)}
                                 if chosen == "rank_mean" else None)}
    _, test_out = _apply(record, data.members, data.x_test, "test")
    valid_out = None
    if data.x_valid is not None:
        _, valid_out = _apply(record, data.members, data.x_valid, "valid")
    oof_out = apply_calibration(calibration, results[chosen].oof)
    check_order(results[chosen].oof, oof_out, "out-of-fold validation")
    ridge_alpha = None
    if "ridge" in results:
        sane = sane_members(x_val, y)  # the members the ridge refit used
        ridge_alpha = (cfg.ridge_alpha if cfg.ridge_alpha is not None
                       else choose_ridge_alpha(x_val[:, sane], y, data.refs))
    return EnsembleResult(mean=mean, std=std, member_metrics=member_metrics, methods=results, best=best,
                          chosen=chosen, paired=paired, reason=reason, calibration=calibration,
                          oof=oof_out, test=test_out, valid=valid_out, ridge_alpha=ridge_alpha,
                          refs_per_fold=n_refs / cfg.folds, warnings=warnings)
