"""How often the learning curves' 90% intervals hold, on synthetic sweeps with known noise.

    .venv/bin/python bench/curve_calibration.py [--reps 200]

Each repetition draws a sweep from gain(n) = 0.3 - 2 n^-0.5 + N(0, sigma) (sizes 100..1600, or
50..2000 for the label questions) and checks: the prediction interval of a new measured mean at
twice the largest size, the curve's own interval there, and the interval of "labels to reach a
gain" (budget_for). Prints the share of repetitions whose interval held the truth; then the
calibrated intervals by reach (1-2x, 2-4x, 4-8x) on synthetic studies, leave one study out, and
the same table judged on studies of a denser grid, at the reaches between its anchors.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from finetune_budget.study.calibration import (
    calibrate,
    coverage_table,
    curve_predictor,
    rolling_cases,
)
from finetune_budget.study.curves import fit_learning_curve

A, B, C = 0.30, 2.0, 0.5


def curve(n):
    return A - B * np.power(n, -C)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--sigma", type=float, default=0.004)
    parser.add_argument("--studies", type=int, default=20, help="synthetic studies by reach")
    args = parser.parse_args()
    print(f"{args.reps} repetitions, sigma={args.sigma}, 90% intervals")
    print(f"{'seeds':>5} {'families':>10} {'new mean':>9} {'curve':>7} {'s/fit':>7}")
    budgets = np.array([100, 200, 400, 800, 1600], dtype=float)
    for seeds in (1, 3):
        for families in (("pow3",), None):
            rng = np.random.default_rng(42)
            x = np.repeat(budgets, seeds)
            groups = np.tile(np.arange(seeds), len(budgets)) if seeds > 1 else None
            new = true = 0
            t0 = time.perf_counter()
            for rep in range(args.reps):
                y = curve(x) + rng.normal(0, args.sigma, x.size)
                kw = {} if families is None else {"families": families}
                fit = fit_learning_curve(x, y, groups, check=False, seed=rep, ceiling=1.0, **kw)
                _, lo, hi = fit.predict([3200.0])
                measured = curve(3200.0) + rng.normal(0, args.sigma, seeds).mean()
                new += bool(lo[0] <= measured <= hi[0])
                _, lo, hi = fit.expected([3200.0])
                true += bool(lo[0] <= curve(3200.0) <= hi[0])
            per_fit = (time.perf_counter() - t0) / args.reps
            name = "pow3" if families else "all 4"
            print(
                f"{seeds:>5} {name:>10} {new / args.reps:>9.3f} {true / args.reps:>7.3f} "
                f"{per_fit:>7.3f}"
            )
    sizes = np.repeat([50, 100, 200, 500, 1000, 2000], 3).astype(float)
    groups = np.tile([0, 1, 2], 6)
    hits = {0.25: 0, 0.26: 0, 0.27: 0}
    reps = max(args.reps // 4, 10)
    for rep in range(reps):
        rng = np.random.default_rng(rep)
        y = curve(sizes) + rng.normal(0, 0.002, sizes.size)
        fit = fit_learning_curve(sizes, y, groups, ceiling=1.0, check=False, seed=rep)
        for target in hits:
            _, lo, hi = fit.budget_for(target)
            hits[target] += bool(lo <= (B / (A - target)) ** (1 / C) <= hi)
    print(f"labels to reach a gain ({reps} sweeps, 6 sizes x 3 seeds, sigma=0.002):")
    for target, h in hits.items():
        need = (B / (A - target)) ** (1 / C)
        print(f"  gain {target:.2f} (needs {need:.0f} labels): interval held it {h / reps:.2f}")
    by_reach(args.studies)


def synthetic_cases(rng, grid: list[float], n_studies: int, prefix: str) -> list:
    """Rolling backtests of synthetic studies: power laws with random a, b, c on `grid`, 3
    seeds."""
    sizes = np.repeat(grid, 3).astype(float)
    seeds = np.tile([0, 1, 2], len(grid))
    cases = []
    for i in range(n_studies):
        a, b, c = rng.uniform(0.03, 0.12), rng.uniform(0.3, 1.5), rng.uniform(0.3, 0.8)
        y = a - b * sizes**-c + rng.normal(0, 0.002, sizes.size)
        name = f"{prefix}{i}"
        cases += rolling_cases(sizes, y, seeds, curve_predictor(1.0), name, name)
    return cases


def by_reach(n_studies: int) -> None:
    """Calibrated intervals by reach (study/calibration.py): synthetic studies on a doubling grid
    (7 sizes 100..6400) backtested on a rolling basis, each study's cases judged by the
    calibration of the others (leave one study out); then studies on a grid twice as dense (11
    sizes, steps of sqrt 2) judged by the calibration of all the doubling ones: the reaches
    between the table's anchors (1.4x, 2.8x, 5.7x), and a dense grid's own stratum."""
    rng = np.random.default_rng(7)
    cases = synthetic_cases(rng, [100, 200, 400, 800, 1600, 3200, 6400], n_studies, "s")
    loso = {g: calibrate(cases, 0.9, leave_out=g) for g in {c.group for c in cases}}
    print(f"calibrated 90% intervals by reach ({n_studies} synthetic studies, leave one out):")
    print(f"{'reach':>7} {'cases':>6} {'coverage':>9} {'err raw':>8} {'err cal':>8}")
    for r in coverage_table(cases, loso):
        print(
            f"{r['reach']:>7} {r['cases']:>6} {r['coverage']:>9.3f} "
            f"{r['signed_error_raw']:>8.3f} {r['signed_error_corrected']:>8.3f}"
        )
    table = calibrate(cases, 0.9)
    dense = synthetic_cases(rng, list(np.round(100 * np.sqrt(2) ** np.arange(11))), 48, "d")
    held: dict[float, list[bool]] = {}
    for c in dense:
        _, lo, hi = (
            float(v[0])
            for v in table.interval(np.array([c.predicted]), c.scale, np.array([c.reach]), c.sizes)
        )
        if np.isfinite(lo) and np.isfinite(hi):
            held.setdefault(round(c.reach, 1), []).append(lo <= c.measured <= hi)
    print("the same table on 48 studies of 11 sizes in steps of sqrt 2 (at each reach):")
    print("  " + "  ".join(f"{r:g}x {np.mean(v):.3f} ({len(v)})" for r, v in sorted(held.items())))


if __name__ == "__main__":
    main()
