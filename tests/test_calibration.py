"""Prediction intervals calibrated by reach (study/calibration.py): split conformal quantiles by
hand, coverage on synthetic studies at each reach, leave-one-study-out, the width a few points of
one seed get, and the answers that use them."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from finetune_budget.study.calibration import (
    SCALE_FLOOR,
    CalibratedCurve,
    Calibration,
    Case,
    ReachBin,
    calibrate,
    conformal_bounds,
    coverage_table,
    curve_predictor,
    rolling_cases,
    shipped,
    study_weighted_bounds,
)
from finetune_budget.study.curves import fit_learning_curve

SIZES = np.array([100, 200, 400, 800, 1600, 3200, 6400], dtype=float)


def test_conformal_bounds_are_the_ranks_of_split_conformal_prediction():
    scores = np.arange(1.0, 20.0)  # m = 19: ranks floor(20 * 0.05) = 1 and ceil(20 * 0.95) = 19
    assert conformal_bounds(scores[::-1], 0.9) == (1.0, 10.0, 19.0)
    # m = 9: floor(10 * 0.05) = 0 and ceil(10 * 0.95) = 10 > 9: no bound either side
    lo, mid, hi = conformal_bounds(np.arange(9.0), 0.9)
    assert (lo, mid, hi) == (-math.inf, 4.0, math.inf)
    # m = 39 at 80%: ranks floor(40 * 0.1) = 4 and ceil(40 * 0.9) = 36
    assert conformal_bounds(np.arange(39.0), 0.8)[::2] == (3.0, 35.0)


def _study(rng, seeds=3, noise=0.002):
    a, b, c = rng.uniform(0.03, 0.12), rng.uniform(0.3, 1.5), rng.uniform(0.3, 0.8)
    x = np.repeat(SIZES, seeds)
    g = np.tile(np.arange(seeds), len(SIZES))
    return x, a - b * x**-c + rng.normal(0, noise, x.size), g


def _cases(n_studies: int, seed: int, prefix: str):
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n_studies):
        x, y, g = _study(rng)
        cases += rolling_cases(
            x, y, g, curve_predictor(ceiling=1.0), f"{prefix}{i}", f"{prefix}{i}"
        )
    return cases


@pytest.fixture(scope="module")
def synthetic():
    """Calibration studies and other studies drawn from the same family of curves."""
    return _cases(24, 0, "cal"), _cases(16, 1, "new")


@pytest.mark.slow  # a long integration test: `make test` runs it, `make test-fast` not
def test_calibrated_intervals_hold_their_level_at_each_reach(synthetic):
    cal_cases, new_cases = synthetic
    cal = calibrate(cal_cases, 0.9)
    rows = {r["reach"]: r for r in coverage_table(new_cases, cal)}
    for reach in ("1-2x", "2-4x", "4-8x"):
        r = rows[reach]
        assert r["cases"] >= 30
        # nominal 90%; two binomial standard errors of the share at these counts
        half = 2 * math.sqrt(0.09 / r["cases"])
        assert 0.9 - half - 0.03 <= r["coverage"] <= 0.99, (reach, r)
    # by hand: the share of new cases inside [p + q_lo s, p + q_hi s] of their bin
    b = cal.bin_for(3.0)
    at = [c for c in new_cases if 2 < c.reach <= 4]
    inside = np.mean([b.q_lo <= (c.measured - c.predicted) / c.scale <= b.q_hi for c in at])
    assert rows["2-4x"]["coverage"] == pytest.approx(inside)


def test_leave_one_study_out_never_sees_the_study_it_predicts(synthetic):
    cases = synthetic[0]
    cal = calibrate(cases, 0.9, leave_out="cal3")
    assert "cal3" not in cal.groups and len(cal.groups) == 23
    for b in cal.bins:
        others = [c for c in cases if c.group != "cal3" and b.lo < c.reach <= b.hi]
        assert b.cases == len(others)
        assert (b.q_lo, b.q_mid, b.q_hi) == conformal_bounds([c.score for c in others], 0.9)


def test_the_center_takes_out_a_known_optimism():
    # every curve predicted half a scale too high (plus a little noise): the median moves it back
    rng = np.random.default_rng(0)
    cases = [
        Case("s", "s", 100.0, 100.0 * f, 0.05, 0.05 - 0.5 * 0.02 + rng.normal(0, 1e-4), 0.02)
        for f in rng.uniform(1.1, 1.9, 200)
    ]
    cal = calibrate(cases, 0.9)
    center, lo, hi = cal.interval(np.array([0.05]), 0.02, np.array([1.5]))
    assert center[0] == pytest.approx(0.04, abs=2e-4)
    assert lo[0] < 0.04 < hi[0]
    (row, *_) = coverage_table(cases, cal)
    assert row["signed_error_raw"] == pytest.approx(0.5, abs=0.01)
    assert abs(row["signed_error_corrected"]) < 0.01


def test_three_points_of_one_seed_get_the_width_the_table_gives():
    x = np.array([100.0, 500.0, 1000.0])
    y = np.array([0.004, 0.013, 0.0195])  # the user's sweep: one seed, three sizes
    fit = fit_learning_curve(x, y, check=False)
    table = Calibration(
        0.9,
        [ReachBin(1, 2, 200, -0.8, -0.1, 0.5), ReachBin(2, 4, 150, -1.5, -0.2, 0.9)],
        ["a", "b"],
    )
    curve = CalibratedCurve(fit, table)
    scale = max(abs(float(fit(1000.0)[0])), SCALE_FLOOR)
    mean, lo, hi = curve.predict([2000.0, 3000.0])
    raw = fit(np.array([2000.0, 3000.0]))
    assert hi[0] - lo[0] == pytest.approx((0.5 + 0.8) * scale)
    assert hi[1] - lo[1] == pytest.approx((0.9 + 1.5) * scale)
    assert mean[1] == pytest.approx(raw[1] - 0.2 * scale)
    # beyond the last calibrated reach (4x): no interval; within the measured sizes: the fit's
    beyond = curve.predict([5000.0])
    assert np.isnan(beyond[1][0]) and np.isnan(beyond[2][0])
    inside = curve.predict([500.0])
    assert [v[0] for v in inside] == pytest.approx(
        [v[0] for v in fit.predict([500.0])], nan_ok=True
    )
    assert "calibrated on 150 backtests at 2-4x of a, b" == curve.rests_on(3000.0)
    # the forked report sends fits between processes: a calibrated one pickles and answers alike
    again = pickle.loads(pickle.dumps(curve))
    assert [list(v) for v in again.predict([2000.0, 3000.0])] == [list(v) for v in (mean, lo, hi)]
    assert again.family == fit.family


def _loglin_lobo_rmse(x: np.ndarray, y: np.ndarray) -> float:
    """Leave-one-budget-out RMSE of gain = a + b ln x by least squares, from its definition."""
    errs = []
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        b, a = np.polyfit(np.log(x[keep]), y[keep], 1)
        errs.append(a + b * np.log(x[i]) - y[i])
    return float(np.sqrt(np.mean(np.square(errs))))


def test_pilots_that_show_no_curve_get_intervals_in_units_of_their_noise():
    # one seed of pilots whose gains are noise around +0.3% (CelebA's after one epoch): the unit
    # of error is twice the leave-one-budget-out error, not the tiny gain at the largest size
    x = np.array([100.0, 200.0, 400.0, 800.0])
    y = np.array([0.001, 0.009, -0.004, 0.006])
    fit = fit_learning_curve(x, y, families=("loglin",), check=False)
    cv = _loglin_lobo_rmse(x, y)
    assert fit.cv_error == pytest.approx(cv, rel=1e-6)
    gain = float(fit(800.0)[0])
    assert 2 * cv > max(abs(gain), SCALE_FLOOR)
    bins = [ReachBin(1, 2, 200, -0.8, -0.1, 0.5), ReachBin(2, 4, 150, -1.5, -0.2, 0.9)]
    in_noise = CalibratedCurve(fit, Calibration(0.9, bins, ["a", "b"], cv_weight=2.0))
    in_gain = CalibratedCurve(fit, Calibration(0.9, bins, ["a", "b"]))  # a table before cv_weight
    _, lo, hi = in_noise.predict([1600.0, 3200.0])
    assert hi - lo == pytest.approx([1.3 * 2 * cv, 2.4 * 2 * cv])
    _, lo, hi = in_gain.predict([1600.0, 3200.0])
    assert hi - lo == pytest.approx(
        [1.3 * max(abs(gain), SCALE_FLOOR), 2.4 * max(abs(gain), SCALE_FLOOR)]
    )
    # a table says the unit it was made in; one written before it said none is in the gain's
    assert Calibration.from_dict(in_noise.calibration.to_dict()).cv_weight == 2.0
    old = in_gain.calibration.to_dict()
    del old["cv_weight"]
    assert Calibration.from_dict(old).cv_weight == 0.0
    # where the curve has risen far above its noise, the unit is its gain as before
    rising = fit_learning_curve(x, 0.02 * np.log(x / 50), families=("loglin",), check=False)
    assert CalibratedCurve(rising, in_noise.calibration).scale == pytest.approx(0.02 * np.log(16))


def test_the_shipped_table_covers_every_reach_it_names():
    table = shipped()
    assert table is not None, "the package ships study/calibration.json"
    assert [(b.lo, b.hi) for b in table.bins] == [(1, 2), (2, 4), (4, 8), (8, 16)]
    assert len(table.groups) >= 2 and table.level == 0.9
    for b in table.bins[:3]:
        assert b.cases >= 19 and b.q_lo < b.q_mid < b.q_hi  # 19 cases: both 90% bounds exist
    assert table.cv_weight == 2.0  # its scores in units of max(gain, 2 x the fit's cv error)


def test_study_weights_keep_a_larger_study_from_outvoting_a_smaller_one():
    # one study: the same bounds as split conformal on its scores
    scores = list(np.random.default_rng(3).normal(size=39))
    assert study_weighted_bounds(scores, ["a"] * 39, 0.9) == pytest.approx(
        conformal_bounds(scores, 0.9)
    )
    # study a: -19..-1 (19 scores, each 1/38 of the weight); study b: 1..39 (each 1/78).
    # m = 19: ranks floor(20 x 0.05) = 1 and ceil(20 x 0.95) = 19 of 19, shares 1/19 and 1:
    # the weight reaches 1/19 at a's second score (-18), 1/2 at a's last (-1), 1 at b's last (39)
    a, b = list(range(-19, 0)), list(range(1, 40))
    got = study_weighted_bounds(a + b, ["a"] * 19 + ["b"] * 39, 0.9)
    assert got == pytest.approx((-18, -1, 39))
    # pooled, b outvotes a: its median is 10.5, between b's 10th and 11th scores
    assert conformal_bounds(a + b, 0.9)[1] == pytest.approx(10.5)
