"""Prediction intervals calibrated by reach (study/calibration.py): split conformal quantiles by
hand, coverage on synthetic studies at each reach, leave-one-study-out, the width a few points of
one seed get, and the answers that use them."""

from __future__ import annotations

import math
import pickle
from dataclasses import replace

import numpy as np
import pytest

from finetune_budget.study.calibration import (
    SCALE_FLOOR,
    CalibratedCurve,
    Calibration,
    Case,
    ReachBin,
    Stratum,
    calibrate,
    conformal_bounds,
    coverage_table,
    curve_predictor,
    rolling_cases,
    seen_sizes,
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
    # by hand: the share of new cases inside [p + q_lo s, p + q_hi s] of their bin (that of the
    # stratum of their fit's number of sizes)
    at = [c for c in new_cases if 2 < c.reach <= 4]
    bins = [cal.bin_for(3.0, c.sizes) for c in at]
    inside = np.mean(
        [
            b.q_lo <= (c.measured - c.predicted) / c.scale <= b.q_hi
            for b, c in zip(bins, at, strict=True)
        ]
    )
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
    # every curve predicted half a scale too high at twice its largest size (plus a little
    # noise): the median moves it back there
    rng = np.random.default_rng(0)
    cases = [
        Case("s", "s", 100.0, 200.0, 0.05, 0.05 - 0.5 * 0.02 + rng.normal(0, 1e-4), 0.02)
        for _ in range(200)
    ]
    cal = calibrate(cases, 0.9)
    center, lo, hi = cal.interval(np.array([0.05]), 0.02, np.array([2.0]))
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
    # pilots (fits on 3 or 4 sizes) have bins of their own at the reaches pilots are asked about
    pilots = table.stratum_for(3)
    assert pilots is not None and pilots.max_sizes == 4
    for b in pilots.bins[:3]:
        assert not b.pooled and b.cases >= 19 and b.q_lo < b.q_mid < b.q_hi


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


def _stratified_cases() -> list[Case]:
    """Three studies whose fits on 3 sizes predict one scale too high and whose fits on 6 sizes
    are right on average; a fourth study (only fits on 6 sizes, only at 2-4x) is alone there."""
    rng = np.random.default_rng(7)
    cases = []
    for study in ("a", "b", "c"):
        for sizes, bias in ((3, -1.0), (6, 0.0)):
            for f in rng.uniform(1.1, 1.9, 40):
                err = bias + rng.normal(0, 0.3)
                cases.append(
                    Case(
                        study, study, 100.0, 100.0 * f, 0.05, 0.05 + err * 0.01, 0.01, sizes=sizes
                    )
                )
    for f in rng.uniform(2.1, 3.9, 40):
        cases.append(Case("d", "d", 100.0, 100.0 * f, 0.05, 0.05, 0.01, sizes=6))
    return cases


def test_fits_on_few_sizes_are_calibrated_apart_from_fits_on_many():
    cases = _stratified_cases()
    cal = calibrate(cases, 0.9)
    few, many = cal.stratum_for(3), cal.stratum_for(6)
    assert (few.min_sizes, few.max_sizes, many.min_sizes, many.max_sizes) == (0, 4, 5, None)
    # by hand: each stratum's 1-2x bin is split conformal on its own scores alone
    for stratum, sizes in ((few, 3), (many, 6)):
        own = [c.score for c in cases if c.sizes == sizes and 1 < c.reach <= 2]
        b = stratum.bins[0]
        assert not b.pooled and b.cases == len(own) == 120
        assert (b.q_lo, b.q_mid, b.q_hi) == conformal_bounds(own, 0.9)
    assert few.bins[0].q_mid == pytest.approx(-1.0, abs=0.1)
    assert many.bins[0].q_mid == pytest.approx(0.0, abs=0.1)
    # the pooled 1-2x bin holds both, its median between them
    everyone = [c.score for c in cases if 1 < c.reach <= 2]
    assert (cal.bins[0].q_lo, cal.bins[0].q_hi) == conformal_bounds(everyone, 0.9)[::2]
    # 2-4x: only study d, and only in the fits on many sizes: fewer than 3 studies, so the
    # stratum's bin is the pooled one (here the same cases), flagged as such
    assert many.bins[1].pooled and few.bins[1].pooled
    assert many.bins[1].q_mid == cal.bins[1].q_mid == 0.0
    # a prediction of a fit on 3 sizes is moved by its stratum's median, one on 6 by its own
    # (each at the median reach of the bin's cases, where that median stands)
    p = np.array([0.05])
    for stratum, sizes in ((few, 3), (many, 6)):
        b = stratum.bins[0]
        center, lo, hi = cal.interval(p, 0.01, np.array([b.at]), sizes)
        assert center[0] == pytest.approx(0.05 + b.q_mid * 0.01)
        assert (lo[0], hi[0]) == pytest.approx((0.05 + b.q_lo * 0.01, 0.05 + b.q_hi * 0.01))
    # a fit of unknown sizes, or a table without strata (older files), gets the pooled bins
    at = np.array([cal.bins[0].at])
    assert cal.interval(p, 0.01, at)[0][0] == pytest.approx(0.05 + cal.bins[0].q_mid * 0.01)
    old = cal.to_dict()
    del old["strata"]
    assert Calibration.from_dict(old).bin_for(1.5, 3) == cal.bins[0]
    # the strata survive the table's file
    assert Calibration.from_dict(cal.to_dict()) == cal
    # leave one study out: a stratum left with fewer than 3 studies falls back to the pooled bin
    loso = calibrate(cases, 0.9, leave_out="a")
    assert loso.stratum_for(3).bins[0].pooled and loso.stratum_for(3).bins[0] == replace(
        loso.bins[0], pooled=True
    )


def test_a_calibrated_curve_answers_from_the_stratum_of_its_number_of_sizes():
    x = np.array([100.0, 500.0, 1000.0])
    fit = fit_learning_curve(x, np.array([0.004, 0.013, 0.0195]), check=False)
    assert fit.n_budgets == 3
    pooled = [ReachBin(1, 2, 200, -0.8, -0.1, 0.5)]
    few = Stratum(0, 4, [ReachBin(1, 2, 100, -1.5, -0.6, 0.4)])
    many = Stratum(5, None, [ReachBin(1, 2, 100, -0.3, 0.0, 0.3)])
    curve = CalibratedCurve(fit, Calibration(0.9, pooled, ["a", "b", "c"], "", 0.0, [few, many]))
    mean, lo, hi = curve.predict([1500.0])
    scale, raw = curve.scale, float(fit(1500.0)[0])
    assert (mean[0], lo[0], hi[0]) == pytest.approx(
        (raw - 0.6 * scale, raw - 1.5 * scale, raw + 0.4 * scale)
    )
    assert curve.rests_on(1500.0) == (
        "calibrated on 100 backtests at 1-2x (fits on at most 4 sizes) of a, b, c"
    )


def test_the_calibrated_interval_moves_smoothly_with_reach_from_the_fits_own():
    # backtests at 2x (bounds -1.0 / +0.8, median -0.2) and 4x (-2.0 / +1.5, median -0.6): the
    # grids double, so each bin's cases stand at its upper edge; between those, and from the
    # fit's own interval at 1x (here [-0.3, +0.4] units, no correction), each quantile is linear
    # in log reach
    bins = [
        ReachBin(1, 2, 100, -1.0, -0.2, 0.8, at=2.0),
        ReachBin(2, 4, 100, -2.0, -0.6, 1.5, at=4.0),
    ]
    table = Calibration(0.9, bins, ["a", "b", "c"])
    reach = np.array([1.0001, 1.5, 2.0, 2.0001, 3.0, 4.0])
    center, lo, hi = table.interval(np.zeros(6), 1.0, reach, start=(-0.3, 0.4))

    def line(r, r0, r1, y0, y1):
        return y0 + (y1 - y0) * math.log(r / r0) / math.log(r1 / r0)

    def expected(y1, y2, y4):
        return [line(r, 1, 2, y1, y2) if r <= 2 else line(r, 2, 4, y2, y4) for r in reach]

    assert lo == pytest.approx(expected(-0.3, -1.0, -2.0))
    assert center == pytest.approx(expected(0.0, -0.2, -0.6))
    assert hi == pytest.approx(expected(0.4, 0.8, 1.5))
    # no step at an edge: just past 1x the fit's own interval, just past 2x the 2x bin's
    assert (lo[0], center[0], hi[0]) == pytest.approx((-0.3, 0.0, 0.4), abs=1e-3)
    assert (lo[3], center[3], hi[3]) == pytest.approx((-1.0, -0.2, 0.8), abs=1e-3)
    # a table written before `at` gives each bin's quantiles throughout the bin
    old = Calibration(0.9, [replace(b, at=math.nan) for b in bins], ["a", "b", "c"])
    center, lo, hi = old.interval(np.zeros(6), 1.0, reach)
    assert list(center) == [-0.2] * 3 + [-0.6] * 3
    assert list(lo) == [-1.0] * 3 + [-2.0] * 3 and list(hi) == [0.8] * 3 + [1.5] * 3
    # a calibrated curve starts where its own interval at the largest measured size ends
    x = np.array([100.0, 200.0, 400.0, 800.0])
    fit = fit_learning_curve(x, 0.02 * np.log(x / 50), families=("loglin",), check=False)
    curve = CalibratedCurve(fit, table)
    own = [float(v[0]) for v in fit.predict([800.0])]
    just_past = [float(v[0]) for v in curve.predict([800.0 * 1.0001])]
    assert just_past == pytest.approx(own, abs=1e-3 * curve.scale)
    # and at twice it, the table's 2x quantiles around the fit
    at_2x = [float(v[0]) for v in curve.predict([1600.0])]
    raw = float(fit(1600.0)[0])
    assert at_2x == pytest.approx([raw + q * curve.scale for q in (-0.2, -1.0, 0.8)])
    # calibrate puts each bin's median at the median reach of its cases
    cases = [Case("s", "s", 100.0, 100.0 * f, 0.05, 0.05, 0.01) for f in (1.5, 2.0, 2.0, 3.0)]
    assert [b.at for b in calibrate(cases, 0.9).bins[:2]] == [2.0, 3.0]


def test_a_dense_grid_counts_the_sizes_its_span_holds_when_it_picks_a_stratum():
    # 100, 141, 200, 283, 400 span 4x: as much of the curve as the doubling grid 100, 200, 400
    assert seen_sizes(100.0, 400.0, 5) == 3
    assert seen_sizes(100.0, 3200.0, 6) == 6  # a doubling grid: its own count
    assert seen_sizes(100.0, 1000.0, 3) == 3  # the user's 100, 500, 1000: its count is fewer
    pooled = [ReachBin(1, 2, 200, -0.8, -0.1, 0.5)]
    few = Stratum(0, 4, [ReachBin(1, 2, 100, -1.5, -0.6, 0.4)])
    many = Stratum(5, None, [ReachBin(1, 2, 100, -0.3, 0.0, 0.3)])
    table = Calibration(0.9, pooled, ["a", "b", "c"], "", 0.0, [few, many])
    dense = np.round(100 * np.sqrt(2) ** np.arange(5))  # 100 ... 400
    doubling = 100.0 * 2.0 ** np.arange(6)  # 100 ... 3200
    for x, stratum in ((dense, few), (doubling, many)):
        fit = fit_learning_curve(x, 0.02 * np.log(x / 50), families=("loglin",), check=False)
        curve = CalibratedCurve(fit, table)
        _, lo, hi = curve.predict([fit.x_max * 1.5])
        b = stratum.bins[0]
        assert hi[0] - lo[0] == pytest.approx((b.q_hi - b.q_lo) * curve.scale)
