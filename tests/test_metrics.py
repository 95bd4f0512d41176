"""Tests for members.contract.metrics: agreement with scipy, the logistic fit, grouped bootstrap, errors."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from members.contract import metrics
from members.contract.metrics import MetricError


@pytest.fixture
def pair() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    mos = rng.normal(1450, 120, size=200)
    pred = 0.002 * mos + rng.normal(0, 0.1, size=200)
    return pred, mos


def test_correlations_match_scipy(pair):
    pred, mos = pair
    assert metrics.srcc(pred, mos) == pytest.approx(stats.spearmanr(pred, mos).statistic)
    assert metrics.plcc(pred, mos) == pytest.approx(stats.pearsonr(pred, mos).statistic)
    assert metrics.krcc(pred, mos) == pytest.approx(stats.kendalltau(pred, mos).statistic)
    assert metrics.rmse(pred, mos) == pytest.approx(np.sqrt(np.mean((pred - mos) ** 2)))


def test_rank_correlations_match_scipy_with_ties(pair):
    pred, mos = np.round(pair[0], 1), np.round(pair[1], -2)  # many tied values in both
    assert len(np.unique(pred)) < len(pred) and len(np.unique(mos)) < len(mos)
    assert metrics.srcc(pred, mos) == pytest.approx(stats.spearmanr(pred, mos).statistic)
    assert metrics.krcc(pred, mos) == pytest.approx(stats.kendalltau(pred, mos).statistic)
    assert metrics.srcc(-pred, mos) == pytest.approx(-stats.spearmanr(pred, mos).statistic)


def test_perfect_correlations():
    x = np.arange(10.0)
    assert metrics.plcc(x, 3 * x + 1) == 1.0
    assert metrics.srcc(x, np.exp(x)) == pytest.approx(1.0)
    assert metrics.plcc(x, -x) == -1.0


def test_main_keeps_the_signs_and_abs_main_drops_them(pair):
    pred, mos = pair
    signed = stats.pearsonr(pred, mos).statistic + stats.spearmanr(pred, mos).statistic
    assert signed > 1  # a good predictor: both agree
    assert metrics.signed_main(pred, mos) == pytest.approx(signed) == metrics.abs_main(pred, mos)
    assert metrics.signed_main(-pred, mos) == pytest.approx(-signed)  # backwards is below zero ...
    assert metrics.abs_main(-pred, mos) == pytest.approx(signed)  # ... where the published number is blind
    result = metrics.evaluate(-pred, mos)
    assert result["main"] == pytest.approx(-signed) and result["abs_main"] == pytest.approx(signed)


def test_logistic_fit_recovers_known_curve():
    rng = np.random.default_rng(2)
    true = (1800.0, 1000.0, 0.5, 0.12)
    x = rng.uniform(0, 1, size=400)
    y = metrics.logistic4(x, *true) + rng.normal(0, 5, size=400)
    params = metrics.fit_logistic(x, y)
    grid = np.linspace(0, 1, 50)
    # Compare curves, not parameters: b1/b2 trade off against b4 near flat tails.
    assert np.max(np.abs(metrics.logistic4(grid, *params) - metrics.logistic4(grid, *true))) < 20
    assert metrics.rmse_logistic(x, y) == pytest.approx(5, rel=0.15)
    assert metrics.plcc_logistic(x, y) > metrics.plcc(x, y)


def test_logistic_is_stable_far_from_centre():
    values = metrics.logistic4(np.array([-1e6, 1e6]), 2.0, 1.0, 0.0, 1.0)
    assert np.all(np.isfinite(values))
    assert values.tolist() == pytest.approx([1.0, 2.0])


def test_evaluate_keys_and_values(pair):
    pred, mos = pair
    result = metrics.evaluate(pred, mos)
    assert set(result) == {"srcc", "plcc", "krcc", "rmse", "plcc_logistic", "rmse_logistic", "main", "abs_main"}
    assert result["main"] == pytest.approx(metrics.signed_main(pred, mos))
    assert result["plcc_logistic"] == pytest.approx(metrics.plcc_logistic(pred, mos))
    assert result["rmse_logistic"] < result["rmse"]  # raw preds are on another scale than MOS


def _grouped_data(group_sd: float, seed: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """30 references x 40 images; the prediction error has a per-reference offset of sd `group_sd`."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(30), 40)
    mos = rng.normal(0, 1, size=groups.size)
    pred = mos + rng.normal(0, group_sd, size=30)[groups] + rng.normal(0, 0.5, size=groups.size)
    return pred, mos, groups


def test_bootstrap_over_groups_is_wider_than_over_images():
    pred, mos, groups = _grouped_data(group_sd=0.8)
    low_g, high_g = metrics.bootstrap_ci(metrics.plcc, pred, mos, groups, n_boot=300)
    low_i, high_i = metrics.bootstrap_ci(metrics.plcc, pred, mos, np.arange(len(mos)), n_boot=300)
    assert low_g < metrics.plcc(pred, mos) < high_g
    assert (high_g - low_g) > 1.5 * (high_i - low_i)


def test_bootstrap_is_reproducible_and_seeded():
    pred, mos, groups = _grouped_data(group_sd=0.3)
    first = metrics.bootstrap_ci(metrics.srcc, pred, mos, groups, n_boot=100, seed=5)
    assert metrics.bootstrap_ci(metrics.srcc, pred, mos, groups, n_boot=100, seed=5) == first
    assert metrics.bootstrap_ci(metrics.srcc, pred, mos, groups, n_boot=100, seed=6) != first


def test_paired_bootstrap_detects_better_prediction():
    pred, mos, groups = _grouped_data(group_sd=0.3)
    rng = np.random.default_rng(4)
    worse = pred + rng.normal(0, 1.0, size=len(pred))
    result = metrics.paired_bootstrap(metrics.signed_main, pred, worse, mos, groups, n_boot=300)
    assert result["delta"] == pytest.approx(metrics.signed_main(pred, mos) - metrics.signed_main(worse, mos))
    assert 0 < result["low"] < result["delta"] < result["high"]
    assert result["p_better"] == 1.0
    same = metrics.paired_bootstrap(metrics.signed_main, pred, pred, mos, groups, n_boot=50)
    assert same["delta"] == 0 and same["low"] == 0 and same["high"] == 0 and same["p_better"] == 0


@pytest.mark.parametrize(
    ("pred", "mos", "message"),
    [
        ([1.0, np.nan, 3.0], [1.0, 2.0, 3.0], "pred: 1 non-finite"),
        ([1.0, 2.0, 3.0], [1.0, np.inf, 3.0], "mos: 1 non-finite"),
        ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0], "length mismatch"),
        ([1.0, 2.0], [1.0, 2.0], "at least 3"),
        ([2.0, 2.0, 2.0], [1.0, 2.0, 3.0], "pred: all 3 values are equal"),
        ([1.0, 2.0, 3.0], [5.0, 5.0, 5.0], "mos: all 3 values are equal"),
        ([[1.0, 2.0, 3.0]], [1.0, 2.0, 3.0], "pred: expected a 1-D"),
        (["a", "b", "c"], [1.0, 2.0, 3.0], "pred: not numeric"),
    ],
)
@pytest.mark.parametrize("fn", [metrics.srcc, metrics.plcc, metrics.krcc, metrics.rmse, metrics.signed_main,
                                metrics.abs_main, metrics.evaluate])
def test_invalid_inputs_raise_metric_error(fn, pred, mos, message):
    with pytest.raises(MetricError, match=message):
        fn(pred, mos)


def test_metric_error_is_a_value_error():
    assert issubclass(MetricError, ValueError)


def test_bootstrap_argument_errors(pair):
    pred, mos = pair
    with pytest.raises(MetricError, match="groups: expected 200"):
        metrics.bootstrap_ci(metrics.srcc, pred, mos, np.arange(10))
    with pytest.raises(MetricError, match="at least 2 distinct groups"):
        metrics.bootstrap_ci(metrics.srcc, pred, mos, np.zeros(200))
    with pytest.raises(MetricError, match="alpha"):
        metrics.bootstrap_ci(metrics.srcc, pred, mos, np.arange(200) % 4, alpha=1.5)
    with pytest.raises(MetricError, match="length mismatch"):
        metrics.paired_bootstrap(metrics.srcc, pred, pred[:-1], mos, np.arange(200) % 4)


def test_logistic_fit_failure_is_clear():
    rng = np.random.default_rng(7)
    x = rng.uniform(0, 1, size=50)
    y = metrics.logistic4(x, 5.0, 1.0, 0.5, 0.1)
    with pytest.raises(MetricError, match="logistic fit did not converge"):
        metrics.fit_logistic(x, y, maxfev=3)
    with pytest.raises(MetricError, match="at least 4 items"):
        metrics.fit_logistic([0.0, 1.0, 2.0], [3.0, 1.0, 2.0])
