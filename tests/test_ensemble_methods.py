"""Tests of the ensemble numerics on in-memory synthetic members: methods, CV, choice, calibration."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from ensemble.calibrate import CalibrationError, check_order, fit_calibration
from ensemble.combine import apply_calibration, combine_linear, combine_ranks, quantiles
from ensemble.fit import MethodResult, choose, evaluate_method, run_ensemble
from ensemble.io import EnsembleInputError, MemberData
from ensemble.methods import (fit_greedy, fit_nnls, fit_ridge, get_method, ridge_toward_equal,
                              standardisation, standardise)
from members.contract import metrics
from members.contract.schema import EnsembleConfig


def synthetic(noise_sds: list[float], n_refs: int = 30, per_ref: int = 20, seed: int = 0,
              higher_is_better: bool = True) -> MemberData:
    """Members = MOS plus independent noise of the given strengths, each on its own affine scale;
    images grouped by reference (a per-reference shift in the MOS makes references matter)."""
    rng = np.random.default_rng(seed)

    def split(prefix: str, refs: int) -> tuple[list[str], np.ndarray, np.ndarray]:
        names = [f"{prefix}{r:03d}_{k:02d}.bmp" for r in range(refs) for k in range(per_ref)]
        groups = np.repeat([f"{prefix}{r:03d}" for r in range(refs)], per_ref)
        mos = 1450 + np.repeat(rng.normal(0, 60, refs), per_ref) + rng.normal(0, 100, refs * per_ref)
        return names, groups, mos

    def members(mos: np.ndarray) -> np.ndarray:
        z = (mos - 1450) / 120
        return np.column_stack([(j + 1) * (z + rng.normal(0, sd, len(z))) + 3 * j
                                for j, sd in enumerate(noise_sds)])

    val_names, refs, mos = split("V", n_refs)
    test_names, _, test_mos = split("T", n_refs // 2)
    names = [f"m{j}" for j in range(len(noise_sds))]
    return MemberData(
        members=names, dirs=[Path("runs") / n for n in names], val_names=val_names, refs=refs,
        mos=mos if higher_is_better else -mos, x_val=members(mos), test_names=test_names,
        x_test=members(test_mos), test_meta=[{"member": n} for n in names], higher_is_better=higher_is_better,
    )


def zscored(data: MemberData) -> tuple[np.ndarray, np.ndarray]:
    mean, std = standardisation(data.x_val)
    return standardise(data.x_val, mean, std), data.mos


def test_standardise_uses_validation_statistics():
    data = synthetic([0.5, 1.0])
    mean, std = standardisation(data.x_val)
    z_val = standardise(data.x_val, mean, std)
    assert np.allclose(z_val.mean(axis=0), 0) and np.allclose(z_val.std(axis=0), 1)
    z_test = standardise(data.x_test, mean, std)
    assert np.allclose(z_test, (data.x_test - data.x_val.mean(axis=0)) / data.x_val.std(axis=0))


@pytest.mark.parametrize("fit", [fit_nnls, fit_ridge, fit_greedy])
def test_fitted_methods_give_better_members_larger_weights(fit):
    data = synthetic([0.3, 0.7, 1.5])
    x, y = zscored(data)
    w = fit(x, y, data.refs)
    assert np.all(w >= 0) and w.sum() == pytest.approx(1)
    assert w[0] > w[1] >= w[2] and w[0] > w[2]


@pytest.mark.parametrize("name", ["mean", "rank_mean"])
def test_equal_weight_methods(name):
    data = synthetic([0.3, 0.7, 1.5])
    x, y = zscored(data)
    assert get_method(name).fit(x, y, data.refs).tolist() == pytest.approx([1 / 3] * 3)


def test_rank_mean_places_each_row_among_the_fitted_rows():
    data = synthetic([0.3, 0.7])
    w = np.array([0.5, 0.5])
    fitted = data.x_val
    # on the fitted rows: the rank transform, (rank - 0.5) / n, ties averaged
    expected = (stats.rankdata(fitted, axis=0) - 0.5) / len(fitted)
    assert np.allclose(quantiles(fitted, fitted), expected)
    test = combine_ranks(data.x_test, w, fitted)
    # a row's score does not depend on the rows scored with it (the API scores one pair at a time)
    one_by_one = np.array([combine_ranks(data.x_test[i:i + 1], w, fitted)[0] for i in range(len(test))])
    assert np.allclose(one_by_one, test)
    # monotone in every member, also past the ends of the fitted range
    far = np.array([[fitted[:, 0].min() - 5, 0.0], [fitted[:, 0].min() - 1, 0.0], [fitted[:, 0].max() + 1, 0.0],
                    [fitted[:, 0].max() + 5, 0.0]])
    assert np.all(np.diff(quantiles(far, fitted)[:, 0]) > 0)
    # a monotone warp of a member, applied to fitted and scored rows alike, changes nothing
    warp = lambda a: np.column_stack([a[:, 0], np.exp(a[:, 1])])  # noqa: E731
    inside = data.x_test[(data.x_test >= fitted.min(0)).all(1) & (data.x_test <= fitted.max(0)).all(1)]
    assert np.allclose(combine_ranks(warp(inside), w, warp(fitted)), combine_ranks(inside, w, fitted), atol=0.02)


def test_rank_mean_out_of_fold_rows_use_the_training_folds_only():
    # the pooled out-of-fold score must see each fold on one scale: a fold's scores are placed
    # among the other folds' rows, not ranked within the fold (which would stretch every fold to [0, 1])
    from ensemble.fit import cross_validate

    data = synthetic([0.3, 0.7])
    x, y = zscored(data)
    oof, _ = cross_validate(get_method("rank_mean"), x, y, data.refs, 3)
    from sklearn.model_selection import GroupKFold

    for train, test in GroupKFold(n_splits=3).split(x, y, data.refs):
        assert np.allclose(oof[test], quantiles(x[test], x[train]).mean(1))


def test_ridge_matches_closed_form_when_unconstrained():
    data = synthetic([0.5, 0.6, 0.7])
    x, y = zscored(data)
    xc, yc = x - x.mean(axis=0), y - y.mean()
    alpha = 0.5
    m = xc.mean(axis=1)
    w0 = np.full(3, (m @ yc) / (m @ m) / 3)
    closed = w0 + np.linalg.solve(xc.T @ xc + alpha * len(y) * np.eye(3), xc.T @ (yc - xc @ w0))
    assert np.all(closed > 0)
    assert ridge_toward_equal(x, y, alpha) == pytest.approx(closed / closed.sum(), abs=1e-8)


def test_ridge_shrinks_from_nnls_to_equal_weights():
    data = synthetic([0.3, 0.7, 1.5])
    x, y = zscored(data)
    assert ridge_toward_equal(x, y, 1e-9) == pytest.approx(fit_nnls(x, y, data.refs), abs=1e-4)
    assert ridge_toward_equal(x, y, 1e6) == pytest.approx([1 / 3] * 3, abs=1e-4)
    spread = [np.ptp(ridge_toward_equal(x, y, a)) for a in (0.01, 0.1, 1, 10)]
    assert spread == sorted(spread, reverse=True)


@pytest.mark.parametrize("name", ["nnls", "ridge", "greedy"])
def test_cv_estimate_is_below_in_sample(name):
    # Two useful members among ten pure-noise ones and few references: fitting overfits.
    data = synthetic([0.8, 1.0] + [50.0] * 10, n_refs=10, per_ref=8, seed=1)
    x, _ = zscored(data)
    result = evaluate_method(get_method(name), x, data.mos, data.refs, EnsembleConfig(folds=5, n_boot=50))
    assert result.within_fold_mean < result.in_sample
    assert result.pooled == result.oof_metrics["main"] < result.in_sample


def test_equal_weights_win_when_members_are_equally_good():
    data = synthetic([0.8, 0.8, 0.8, 0.8], seed=2)
    result = run_ensemble(data, EnsembleConfig(n_boot=200))
    assert result.chosen == "mean"
    assert result.methods["mean"].weights.tolist() == pytest.approx([0.25] * 4)
    assert "mean" in result.reason
    if result.best != "mean":
        assert result.paired["low"] <= 0 and "does not beat" in result.reason


def test_best_cv_method_falls_back_to_mean_without_a_reliable_gain():
    data = synthetic([0.8, 0.8], seed=7)
    x, _ = zscored(data)
    base = combine_linear(x, np.array([0.5, 0.5]))
    # Seed picked so that this perturbed ensemble is slightly better on the full data, but not reliably.
    noisy = base + np.random.default_rng(15).normal(0, 0.05, len(base))

    def result(name: str, oof: np.ndarray) -> MethodResult:
        main = metrics.signed_main(oof, data.mos)
        return MethodResult(name, [main], oof, {"main": main}, (0.0, 0.0), np.array([0.5, 0.5]), main)

    results = {"mean": result("mean", base), "nnls": result("nnls", noisy)}
    best, chosen, paired, reason = choose(results, data.mos, data.refs, EnsembleConfig(n_boot=200))
    assert (best, chosen) == ("nnls", "mean")
    assert paired["delta"] > 0 >= paired["low"]
    assert "does not beat the equal-weight mean" in reason


def test_unequal_weights_kept_when_they_beat_the_mean():
    data = synthetic([0.2, 2.0, 2.0, 2.0], seed=3)
    result = run_ensemble(data, EnsembleConfig(n_boot=200))
    assert result.chosen in ("nnls", "ridge", "greedy")
    assert result.paired["low"] > 0
    weights = result.methods[result.chosen].weights
    assert weights[0] == weights.max() > 0.5
    # Test predictions are the refitted weights applied to the z-scored test members.
    z_test = standardise(data.x_test, result.mean, result.std)
    assert np.allclose(result.test, combine_linear(z_test, weights))


def test_lower_is_better_mos_gives_the_same_weights():
    up = run_ensemble(synthetic([0.3, 0.7, 1.5], seed=4), EnsembleConfig(n_boot=50, methods=["nnls"]))
    down = run_ensemble(synthetic([0.3, 0.7, 1.5], seed=4, higher_is_better=False),
                        EnsembleConfig(n_boot=50, methods=["nnls"]))
    assert down.methods["nnls"].weights == pytest.approx(up.methods["nnls"].weights)
    assert np.allclose(down.test, up.test)


def test_run_rejects_inputs_before_fitting():
    with pytest.raises(EnsembleInputError, match="6 references, fewer than folds=8"):
        run_ensemble(synthetic([0.5, 1.0], n_refs=6), EnsembleConfig(folds=8))
    with pytest.raises(EnsembleInputError, match="higher-is-better"):
        run_ensemble(synthetic([0.5, 1.0], higher_is_better=False), EnsembleConfig(calibration="logistic"))


@pytest.mark.parametrize("kind", ["logistic", "isotonic"])
def test_calibration_keeps_test_order_and_maps_to_mos(kind):
    rng = np.random.default_rng(5)
    pred = rng.normal(0, 1, 500)
    mos = metrics.logistic4(pred, 1800, 1000, 0.2, 0.6) + rng.normal(0, 20, 500)
    params = fit_calibration(kind, pred, mos)
    test = np.concatenate([rng.normal(0, 1.5, 400), [-8.0, 8.0]])  # includes values beyond validation
    out = apply_calibration(params, test)
    order = np.argsort(test)
    assert np.all(np.diff(out[order]) > 0)
    check_order(test, out, "test")
    assert np.sqrt(np.mean((apply_calibration(params, pred) - mos) ** 2)) < 30


def test_run_with_calibration_keeps_test_order():
    data = synthetic([0.3, 0.7, 1.5], seed=6)
    plain = run_ensemble(data, EnsembleConfig(n_boot=50))
    for kind in ("logistic", "isotonic"):
        calibrated = run_ensemble(data, EnsembleConfig(n_boot=50, calibration=kind))
        assert calibrated.chosen == plain.chosen
        assert np.array_equal(np.argsort(calibrated.test), np.argsort(plain.test))
        assert abs(calibrated.test.mean() - data.mos.mean()) < 50  # now on the MOS scale


def test_decreasing_or_degenerate_calibration_is_rejected():
    pred = np.linspace(0, 1, 50)
    with pytest.raises(CalibrationError, match="decreasing"):
        fit_calibration("logistic", pred, 1000 - 500 * pred)
    with pytest.raises(CalibrationError, match="constant"):
        fit_calibration("isotonic", pred, 1000 - 500 * pred)


def test_check_order_catches_ties():
    raw = np.array([0.0, 1.0, 2.0, 3.0])
    check_order(raw, 10 * raw, "test")
    with pytest.raises(CalibrationError, match="1 pair"):
        check_order(raw, np.array([0.0, 1.0, 1.0, 3.0]), "test")


def test_non_negative_fits_fall_back_to_equal_weights_when_no_member_helps():
    # Inside one CV fold a fit must still return weights; run_ensemble refuses such members as a whole
    # (tests/test_ensemble_signed.py), and the fold's out-of-fold score shows the failure.
    rng = np.random.default_rng(0)
    y = rng.normal(size=60)
    x = np.column_stack([-y + 0.1 * rng.normal(size=60), -y + 0.2 * rng.normal(size=60)])  # both anti-correlated
    groups = np.repeat(np.arange(12), 5)
    for name in ("nnls", "ridge"):
        weights = get_method(name).fit(x, y, groups)
        assert np.allclose(weights, [0.5, 0.5]), name


def test_a_weak_metric_beside_good_members_gets_a_small_weight_on_real_labels():
    """TID2013's real MOS (tests/fixtures/real): two good members and a weak classical measure (a
    monotone but noisy function of the MOS, as PSNR is of opinion scores). The guard keeps the fitted
    weights only when they beat the equal-weight mean; either way the weak member must not pull the
    ensemble below its best member, and a fitted method gives it a small weight."""
    rows = [line.split(",") for line in (Path(__file__).parent / "fixtures/real/tid2013_scores.csv")
            .read_text().splitlines()[1:]]
    refs = np.array([r[2] for r in rows])
    mos = np.array([float(r[3]) for r in rows])
    ref_ids = sorted(set(refs))
    val = np.isin(refs, ref_ids[:15])
    rng = np.random.default_rng(0)
    z = (mos - mos.mean()) / mos.std()
    x = np.column_stack([z + rng.normal(0, 0.35, len(z)), 2 * z + rng.normal(0, 0.8, len(z)) + 1,
                         np.exp(0.5 * z) + rng.normal(0, 1.5, len(z))])  # the weak "metric"
    names = [f"{r[0]}" for r in rows]
    members = ["good_a", "good_b", "weak_metric"]
    data = MemberData(members=members, dirs=[Path("runs") / n for n in members],
                      val_names=[n for n, v in zip(names, val) if v], refs=refs[val], mos=mos[val], x_val=x[val],
                      test_names=[n for n, v in zip(names, val) if not v], x_test=x[~val],
                      test_meta=[{"member": n} for n in members], higher_is_better=True)
    result = run_ensemble(data, EnsembleConfig(n_boot=200))
    for name in ("nnls", "ridge", "greedy"):
        weights = result.methods[name].weights
        assert weights[2] < 0.15 < weights[0], (name, weights)
    best_member = max(metrics.signed_main(x[~val][:, j], mos[~val]) for j in range(2))
    assert metrics.signed_main(result.test, mos[~val]) >= best_member - 0.01
