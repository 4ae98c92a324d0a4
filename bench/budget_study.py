"""The learning-curve study behind docs/results.md, from a full grid's MLflow runs.

    python bench/budget_study.py --tracking-uri sqlite:////tmp/w10b/clinc-grid.db \
        --experiment clinc-grid --epochs 2 --pilot-max 1000 [--min-roi-per-label 1e-5]

Prints, for the runs of one experiment (every data.n x seed at one epoch count):
1. the measured curve: mean gain over seeds per data.n with its `level` interval, and the cost;
2. predictions: the learning curve fitted on data.n <= pilot-max (study.curves, seeds as
   groups) at every larger measured n, the interval, the measured values and whether each was
   covered; the coverage over all of them; and report.curves.backtest (hold out the largest n);
2b. rolling backtests for every metric of --backtest-metrics: for each measured size from the
   fourth on, fit the sizes below it (report.curves.backtest), predict it, and count how often the
   interval covered the measured mean (the coverage the report's trust labels rest on);
2c. the same kind of backtests (every fit on 3 or more sizes, every larger size) judged by a
   calibration table (--calibration): coverage and signed error per reach, 1-2x to 8-16x;
3. the advice of the full grid (budget_search.grid_advice: study.advice.advise on its runs)
   and its cost;
4. the adaptive search replayed on the same runs (budget_search.replay: its jobs are looked up
   instead of trained, sizes restricted to the grid's): its decisions, advice and cost;
5. per metric of --backtest-metrics: the mean gain per size, the grid's advice and where the
   replayed search stops, had it stopped on that metric (the evidence for the stopping metric).
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import numpy as np
from scipy import stats

from finetune_budget.app.budget_search import from_mlflow
from finetune_budget.study import search as bs
from finetune_budget.study.calibration import (
    Calibration,
    coverage_table,
    curve_predictor,
    load_table,
    rolling_cases,
)
from finetune_budget.study.curves import backtest, fit_learning_curve


def interval(values: list[float], level: float) -> tuple[float, float, float]:
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * np.std(values, ddof=1)
    half /= math.sqrt(len(values))
    return mean, mean - half, mean + half


def rolling_backtests(found, metric_of, epochs: int, rule: str, level: float, first: int = 3):
    """One report.curves.backtest per held-out size from the (first+1)-th on, per metric:
    the sizes below it fitted, it predicted. Returns rows (metric, Backtest)."""
    rows = []
    for metric in metric_of:
        obs = [o for o in found[metric].values() if o.epochs == epochs]
        if bs.gain_bound(obs, metric) == 0:
            print(f"{metric}: at its ceiling before fine-tuning (no gain possible): skipped")
            continue
        points = bs.curve_points(obs, epochs, rule)
        sizes = list(points)
        for k in range(first, len(sizes)):
            kept = {n: g for n, g in points.items() if n <= sizes[k]}
            x = np.array([n for n, g in kept.items() for _ in g], float)
            y = np.array([v for g in kept.values() for v in g.values()], float)
            groups = [s for g in kept.values() for s in g]
            bound = bs.gain_bound(obs, metric)
            rows.append((metric, backtest(x, y, groups, level, ceiling=bound)))
    return rows


def calibrated_by_reach(found, metric_of, epochs: int, rule: str, table: Calibration) -> None:
    """Rolling backtests (each fit on the k smallest sizes, k >= 3, all seeds together and each
    alone, predicting every larger size) judged by a calibration table: per reach bin the
    coverage of its intervals and the signed error (predicted - measured, in units of the gain at
    the largest fitted size) of the raw curve and of the calibrated center."""
    cases = []
    for metric in metric_of:
        obs = [o for o in found[metric].values() if o.epochs == epochs]
        bound = bs.gain_bound(obs, metric)
        if bound == 0:
            continue
        points = bs.curve_points(obs, epochs, rule)
        x = [n for n, g in points.items() for _ in g]
        y = [v for g in points.values() for v in g.values()]
        seeds = [s for g in points.values() for s in g]
        predictor = curve_predictor(bound, cv_weight=table.cv_weight)
        cases += rolling_cases(x, y, seeds, predictor, metric, "this study")
    print(
        f"\ncalibrated {table.level:.0%} intervals by reach ({', '.join(metric_of)}; "
        f"{table.describe()}):\n"
    )
    print("| reach | cases | coverage | signed error, raw | calibrated | median width |")
    print("|---|---|---|---|---|---|")
    for r in coverage_table(cases, table):
        if r["cases"]:
            print(
                f"| {r['reach']} | {r['cases']} | {r['coverage']:.3f} | "
                f"{r['signed_error_raw']:+.3f} | {r['signed_error_corrected']:+.3f} | "
                f"{r['median_width']:.2f} |"
            )


def print_backtests(rows, level: float) -> None:
    print(
        f"\n| metric | held out | fitted up to | family | predicted | {level:.0%} interval "
        "| measured | covered | trust |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for metric, b in rows:
        covered = "-" if b.covered is None else ("yes" if b.covered else "no")
        print(
            f"| {metric.removeprefix('val/')} | {b.x:g} | {b.x_fit_max:g} | {b.family or '-'} "
            f"| {b.predicted:.4g} | [{b.lo:.4g}, {b.hi:.4g}] | {b.measured:.4g} | {covered} "
            f"| {b.trust} |"
        )
    tested = [b for _, b in rows if b.covered is not None]
    inside = sum(bool(b.covered) for b in tested)
    print(
        f"\nrolling backtests: {inside} of {len(tested)} covered by their {level:.0%} interval"
        f" ({len(rows) - len(tested)} untested: too few sizes below, or no interval)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tracking-uri", required=True, nargs="+", help="one or more stores")
    p.add_argument("--experiment", required=True)
    p.add_argument("--metric", default="val/mrr_at_20")
    p.add_argument("--epochs", type=int, required=True, help="trainer.max_epochs of the grid")
    p.add_argument("--pilot-max", type=int, default=1000, help="fit on data.n <= this")
    p.add_argument("--search-pilot", type=int, nargs="*", default=None, help="default: <= 400")
    p.add_argument(
        "--min-roi-per-label",
        type=float,
        default=None,
        help="the marginal-ROI stopping test; default: the advice engine's rule",
    )
    p.add_argument("--growth", type=float, default=4.0)
    p.add_argument("--level", type=float, default=0.9)
    p.add_argument("--epoch-rule", default="best")
    p.add_argument(
        "--backtest-metrics",
        nargs="*",
        default=["val/mrr_at_20", "val/recall_at_20", "val/map_at_20"],
        help="metrics of the rolling backtests",
    )
    p.add_argument(
        "--calibration",
        default="shipped",
        help="the table the backtests by reach are judged by: shipped, none, or a file "
        "(scripts/calibrate_curves.py --write-loso: one made without this study)",
    )
    args = p.parse_args()

    by_metric = {}
    for metric in dict.fromkeys([args.metric, *args.backtest_metrics]):
        by_metric[metric] = {}
        for uri in args.tracking_uri:
            by_metric[metric].update(from_mlflow(uri, args.experiment, metric))
    found = by_metric[args.metric]
    obs = [o for o in found.values() if o.epochs == args.epochs]
    points = bs.curve_points(obs, args.epochs, args.epoch_rule)
    seeds = sorted({s for by_seed in points.values() for s in by_seed})
    print(f"## {args.experiment}: {args.metric}, {args.epochs} epochs, seeds {seeds}")
    print(f"\n| data.n | seeds | mean gain | {args.level:.0%} interval | cost s (train+eval) |")
    print("|---|---|---|---|---|")
    for n, by_seed in points.items():
        mean, lo, hi = interval(list(by_seed.values()), args.level)
        cost = sum(o.cost_s for o in obs if o.n == n)
        print(f"| {n} | {len(by_seed)} | {mean:.4g} | [{lo:.4g}, {hi:.4g}] | {cost:.0f} |")

    pilot = {n: g for n, g in points.items() if n <= args.pilot_max}
    x = np.array([n for n, g in pilot.items() for _ in g], float)
    y = np.array([v for g in pilot.values() for v in g.values()], float)
    groups = [s for g in pilot.values() for s in g]
    ceiling = bs.gain_bound(obs, args.metric)
    fit = fit_learning_curve(x, y, groups=groups, level=args.level, ceiling=ceiling)
    print(
        f"\nfit on data.n <= {args.pilot_max} ({fit.n_points} points): {fit.family} "
        f"{ {k: round(v, 5) for k, v in fit.params.items()} }, cv_error {fit.cv_error:.3g}, "
        f"extrapolation_ok={fit.extrapolation_ok} {fit.reason}"
    )
    beyond = [n for n in points if n > args.pilot_max]
    covered_seeds = covered_means = total_seeds = 0
    if beyond:
        xs = np.array(beyond, float)
        mean, lo, hi = fit.predict(xs, args.level)  # interval of a mean over the seeds measured
        _, lo1, hi1 = fit.predict(xs, args.level, seeds=1)  # ... of one seed's value
        print("\n| data.n | x pilot max | predicted mean | interval | measured mean | covered |")
        print("|---|---|---|---|---|---|")
        for i, n in enumerate(beyond):
            values = list(points[n].values())
            m = float(np.mean(values))
            inside = lo[i] <= m <= hi[i]
            covered_means += inside
            covered_seeds += sum(lo1[i] <= v <= hi1[i] for v in values)
            total_seeds += len(values)
            print(
                f"| {n} | {n / args.pilot_max:.1f} | {mean[i]:.4g} | [{lo[i]:.4g}, {hi[i]:.4g}] "
                f"| {m:.4g} | {'yes' if inside else 'no'} |"
            )
        print(
            f"\ncoverage: {covered_means}/{len(beyond)} means; {covered_seeds}/{total_seeds} "
            "single-seed values inside their one-seed intervals"
        )
    xa = np.array([n for n, g in points.items() for _ in g], float)
    ya = np.array([v for g in points.values() for v in g.values()], float)
    ga = [s for g in points.values() for s in g]
    held_out = backtest(xa, ya, ga, args.level, ceiling=ceiling)
    print(f"\nreport.curves.backtest (hold out the largest n): {held_out}")
    rows = rolling_backtests(
        by_metric, args.backtest_metrics, args.epochs, args.epoch_rule, args.level
    )
    print_backtests(rows, args.level)
    table = load_table(args.calibration)
    if table is not None:
        calibrated_by_reach(by_metric, args.backtest_metrics, args.epochs, args.epoch_rule, table)

    settings = bs.SearchSettings(
        pilot_n=tuple(args.search_pilot or [n for n in points if n <= 400]),
        seeds=tuple(seeds),
        epochs=args.epochs,
        epoch_rule=args.epoch_rule,
        min_roi_per_label=args.min_roi_per_label,
        level=args.level,
        growth=args.growth,
        sizes=tuple(points),
        min_epoch_gain=None,
        compare_grid=tuple(points),
        metric=args.metric,
    )
    n_grid, why = bs.grid_advice(obs, args.epochs, settings)
    grid_cost = sum(o.cost_s for o in obs)
    grid_items = sum(o.n * o.epochs for o in obs)
    print(
        f"\nfull grid ({len(obs)} runs, {grid_items} item-epochs, {grid_cost:.0f} s): "
        f"advice data.n={n_grid} ({why})"
    )
    result = bs.run_search(bs.replay(obs), settings)
    print(f"\nadaptive search replayed on these runs:\n\n{bs.decisions_table(result)}\n")
    print(result.summary())
    print(
        f"search/grid: {result.spent_s / grid_cost:.0%} of the seconds, "
        f"{result.item_epochs / grid_items:.0%} of the item-epochs"
    )
    print_by_metric(by_metric, args.backtest_metrics, args.epochs, settings)


def print_by_metric(found, metrics, epochs: int, settings: bs.SearchSettings) -> None:
    """Per metric: its baseline, the mean gain per size, the grid's advice and the replayed
    search's stop and advice on that metric."""
    print("\n| metric | baseline | mean gain per data.n | grid advice | search stops | advice |")
    print("|---|---|---|---|---|---|")
    for metric in metrics:
        obs = [o for o in found[metric].values() if o.epochs == epochs]
        if not obs:
            continue
        s = dataclasses.replace(settings, metric=metric)
        means = bs.engine_means(obs, epochs, s)
        base = np.mean([o.baseline for o in obs])
        curve = ", ".join(f"{n}: {g:+.4f}" for n, g in means.items())
        grid_n, _ = bs.grid_advice(obs, epochs, s)
        result = bs.run_search(bs.replay(obs), s)
        print(
            f"| {metric.removeprefix('val/')} | {base:.4f} | {curve} | {grid_n} "
            f"| {result.stop_reason} | {result.advice_n} |"
        )


if __name__ == "__main__":
    main()
