"""Isotonic calibration stays on the MOS scale: bounded tails beyond the fitted blocks, order kept."""
from __future__ import annotations

import numpy as np
import pytest

from ensemble.calibrate import TAIL_MARGIN, check_order, fit_calibration
from ensemble.combine import apply_calibration

LOW, HIGH = 1000.0, 1800.0


def within_scale(out: np.ndarray, mos: np.ndarray) -> bool:
    """Inside [min, max] of the MOS widened by the documented tail margin (a share of the MOS range)."""
    margin = TAIL_MARGIN * np.ptp(mos) + 1e-9
    return bool(out.min() >= mos.min() - margin and out.max() <= mos.max() + margin)


def assert_order_kept(raw: np.ndarray, out: np.ndarray) -> None:
    order = np.argsort(raw, kind="stable")
    assert np.all(np.diff(out[order]) > 0)
    check_order(raw, out, "test")


def test_tails_stay_near_the_end_levels_far_beyond_the_fitted_range():
    # The shape that gave 5008 on a 1135-1653 scale: steep last segment, test scores well past it.
    pred = np.array([0.0, 0.1, 0.2, 0.3, 1.0, 1.01])
    mos = np.array([1135.0, 1140.0, 1150.0, 1160.0, 1600.0, 1653.0])
    params = fit_calibration("isotonic", pred, mos)
    far = np.array([-1e6, -50.0, -3.0, -0.5, 0.5, 2.0, 5.0, 50.0, 1e6])
    out = apply_calibration(params, far)
    assert within_scale(out, mos), out
    assert_order_kept(far, out)


@pytest.mark.parametrize(
    ("pred", "mos"),
    [
        (np.array([0.0, 1.0]), np.array([1100.0, 1700.0])),  # two blocks of one image each
        (np.r_[np.linspace(0, 1, 499), 1.5], np.r_[np.full(499, 1300.0), 1700.0]),  # one huge block
        (np.r_[-2.0, np.linspace(0, 1, 499)], np.r_[1000.0, np.full(499, 1800.0)]),  # huge block on top
        (np.array([0.0, 0.0, 1.0, 1.0]), np.array([1200.0, 1400.0, 1500.0, 1700.0])),  # tied scores
    ],
)
def test_degenerate_blocks(pred, mos):
    params = fit_calibration("isotonic", pred, mos)
    test = np.concatenate([np.linspace(-1e3, 1e3, 41), np.linspace(-3, 3, 301), pred])
    test = np.unique(np.round(test, 6))
    out = apply_calibration(params, test)
    assert within_scale(out, mos), (out.min(), out.max())
    assert_order_kept(test, out)


@pytest.mark.parametrize("seed", range(20))
def test_random_draws_on_a_1000_1800_scale(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    pred = rng.normal(0, rng.uniform(0.2, 3), n)
    mos = np.clip(1400 + rng.uniform(50, 300) * np.tanh(pred) + rng.normal(0, rng.uniform(5, 200), n), LOW, HIGH)
    try:
        params = fit_calibration("isotonic", pred, mos)
    except ValueError:  # a constant isotonic fit is refused; nothing to map
        return
    test = np.round(rng.normal(0, 3 * pred.std(), 1650) + rng.choice([0, 10, -10], 1650, p=[0.9, 0.05, 0.05]), 6)
    test = np.unique(test)
    out = apply_calibration(params, test)
    assert within_scale(out, mos), (out.min(), out.max())
    assert_order_kept(test, out)


def test_inside_the_fitted_range_the_map_interpolates_the_levels():
    rng = np.random.default_rng(1)
    pred = rng.normal(0, 1, 200)
    mos = 1400 + 200 * np.tanh(pred) + rng.normal(0, 30, 200)
    params = fit_calibration("isotonic", pred, mos)
    x, y = np.array(params["x"]), np.array(params["y"])
    assert np.allclose(apply_calibration(params, x), y)  # the fitted levels at the block centres
    mid = (x[:-1] + x[1:]) / 2
    assert np.allclose(apply_calibration(params, mid), (y[:-1] + y[1:]) / 2)
