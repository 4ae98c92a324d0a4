"""Collection policies simulated on measured grids: how often each misses its target and how many
labels it buys beyond those needed.

    .venv/bin/python bench/collection_policies.py --synthetic
    .venv/bin/python bench/collection_policies.py --uri sqlite:////tmp/studies/studies.db \
        --experiment stsb-epochs [--metric val/mrr_at_20] [--pilots 3] [--penalty-x 50]
    .venv/bin/python bench/collection_policies.py --uri ... --epoch 1 \
        --experiment clinc-epochs5 --calibration loso/clinc150.json \
        --experiment stsb-epochs --calibration loso/stsb.json      # each with its own table

Each (task, model, data) and seed of the experiment is a ground truth: its measured gain at the
final epoch of each data.n, linear in log n between the measured sizes (and flat beyond the
largest). A case is one seed and one target: the gain 25%, 50% or 75% of the way from the
largest pilot size (the `--pilots` smallest data.n) to the largest measured one; the labels it
needs are where the seed's curve first reaches it. Each policy fits the calibrated learning curve
(study/calibration.py, `--calibration`) to the seed's pilot points and buys labels, i.e. looks the
gain up on the measured curve:

- LOC 1 round: study/plan.py's choice, label cost 1 and a miss penalty of `--penalty-x` times the
  largest pilot size (cost + penalty x P(miss) least);
- LOC 3 rounds: the same with 3 rounds: buy the plan's first round, look up the gain, stop if the
  target is reached, else refit with that point and plan the rounds left;
- naive: the curve's point estimate of the labels to the target (one round).

Printed per policy: cases, miss rate, the mean chance of missing the plan itself stated when it
was first made (its P(n_needed > the last size); 3 rounds: of the plan for all three, which
replans after each), median over-collection (labels bought / labels needed - 1) and its 90th
percentile; per experiment, then over all of them where there are several. One
`--calibration` serves every experiment, or one is given per `--experiment` in the same order
(leave one study out: each grid planned by the table made without it). No training runs: the
grid's runs must be in the store.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import pandas as pd

from finetune_budget.study.calibration import CalibratedCurve, load_table
from finetune_budget.study.curves import fit_learning_curve, quiet_numerics
from finetune_budget.study.plan import next_purchase
from finetune_budget.study.prices import Prices
from finetune_budget.study.roi import gain_ceiling, metric_name
from finetune_budget.study.table import GROUP, data_curve

SHARES = (0.25, 0.5, 0.75)


def synthetic_grid(seeds: int = 3) -> pd.DataFrame:
    """A grid like the studies': data.n 50..3200, gain 0.3 - 2 n^-0.5 times a per-seed scale
    (0.9..1.1) plus N(0, 0.003) per point."""
    rng = np.random.default_rng(0)
    rows = []
    for seed in range(seeds):
        scale = rng.uniform(0.9, 1.1)
        for n in (50, 100, 200, 400, 800, 1600, 3200):
            g = scale * (0.3 - 2.0 * n**-0.5) + rng.normal(0, 0.003)
            rows.append(
                {"task": "t", "model": "synthetic", "data": "d", "n": n, "seed": seed, "g": g}
            )
    return pd.DataFrame(rows)


def measured_grid(
    uri: str, experiment: str, metric: str, epoch: int | None = None
) -> tuple[pd.DataFrame, dict]:
    """Per (task, model, data, n, seed): the gain at the final epoch (or at `epoch`, where the
    sizes were trained for different epochs); and each group's ceiling."""
    from finetune_budget.study.table import budget_points
    from finetune_budget.tracking.query import roi_table

    df = roi_table(uri, experiment, [metric])
    points = budget_points(df)
    if epoch is not None:
        points = points[points["epoch"] == epoch]
    name = metric_name(metric)
    curve = data_curve(points[points[f"gain/{name}"].notna()], metric, "final")
    base = df[df["epoch"] == 0].groupby(GROUP)[metric].mean()
    ceilings = {k: gain_ceiling(metric, float(v)) for k, v in base.items()}
    grid = curve[[*GROUP, "n", "seed"]].assign(g=curve[f"gain/{name}"].astype(float))
    return grid, ceilings


def truth(ns: np.ndarray, gains: np.ndarray):
    """The measured curve of one seed, linear in log n, flat beyond the largest n."""
    x, y = np.log(ns), gains

    def at(n: float) -> float:
        return float(np.interp(math.log(max(n, ns[0])), x, y))

    return at


def needed(ns: np.ndarray, gains: np.ndarray, target: float) -> float:
    fine = np.geomspace(ns[0], ns[-1], 4000)
    at = truth(ns, gains)
    hit = [n for n in fine if at(n) >= target]
    return float(hit[0]) if hit else math.inf


def fit(x, y, ceiling, table):
    f = fit_learning_curve(x, y, None, ceiling=ceiling, n_boot=100, check=False)
    if not f.extrapolation_ok:
        raise ValueError(f.reason)
    return CalibratedCurve(f, table) if table is not None else f


@quiet_numerics
def simulate(
    grid: pd.DataFrame, ceilings: dict, pilots: int, penalty_x: float, table
) -> pd.DataFrame:
    rows = []
    for group, g in grid.groupby([*GROUP, "seed"]):
        key, seed = tuple(group[:3]), group[3]
        g = g.sort_values("n")
        ns, gains = g["n"].to_numpy(float), g["g"].to_numpy(float)
        if len(ns) < pilots + 2:
            continue
        at = truth(ns, gains)
        x0, y0 = ns[:pilots], gains[:pilots]
        have = float(ns[pilots - 1])
        prices = Prices(label_cost=1.0, miss_penalty=penalty_x * have)
        ceiling = ceilings.get(key)
        try:
            pilot_fit = fit(x0, y0, ceiling, table)
        except ValueError:
            continue
        top = float(np.max(gains[pilots:]))
        for share in SHARES:
            target = y0[-1] + share * (top - y0[-1])
            need = needed(ns, gains, target)
            if not need > have or not math.isfinite(need):
                continue
            case = {"group": " · ".join(map(str, key)), "seed": seed, "share": share}
            # LOC, one round
            one = next_purchase(pilot_fit, target, prices, 1, have)
            n1 = one.sizes[0]
            rows.append(
                {
                    **case,
                    "policy": "LOC 1 round",
                    "bought": n1,
                    "needed": need,
                    "reached": at(n1) >= target,
                    "p_miss": one.p_miss,
                }
            )
            # LOC, three rounds: buy, look up, refit
            x, y, f, q, reached = list(x0), list(y0), pilot_fit, have, False
            plan = next_purchase(pilot_fit, target, prices, 3, have)
            p_miss = plan.p_miss  # as first planned
            for left in (3, 2, 1):
                if left < 3:  # re-planned on what the rounds before measured
                    plan = next_purchase(f, target, prices, left, q)
                q = max(plan.sizes[0], q)
                if at(q) >= target:
                    reached = True
                    break
                x.append(q)
                y.append(at(q))
                try:
                    f = fit(np.array(x), np.array(y), ceiling, table)
                except ValueError:
                    pass
            rows.append(
                {
                    **case,
                    "policy": "LOC 3 rounds",
                    "bought": q,
                    "needed": need,
                    "reached": reached,
                    "p_miss": p_miss,
                }
            )
            # naive: the point estimate
            point = float(pilot_fit.budget_for(target)[0])
            n0 = max(point, have) if math.isfinite(point) else float(ns[-1]) * 16
            rows.append(
                {
                    **case,
                    "policy": "naive (point estimate)",
                    "bought": n0,
                    "needed": need,
                    "reached": at(n0) >= target,
                    "p_miss": math.nan,  # it states no chance
                }
            )
    return pd.DataFrame(rows)


def summary(cases: pd.DataFrame) -> pd.DataFrame:
    over = cases["bought"] / cases["needed"] - 1
    out = (
        cases.assign(over=over)
        .groupby("policy", sort=False)
        .agg(
            cases=("reached", "size"),
            miss_rate=("reached", lambda r: 1 - r.mean()),
            predicted_miss=("p_miss", "mean"),
            median_over_collection=("over", "median"),
            p90_over_collection=("over", lambda v: v.quantile(0.9)),
        )
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--uri")
    ap.add_argument("--experiment", action="append", default=[])
    ap.add_argument("--metric", default="val/ndcg_at_20", help="budget.metric's default")
    ap.add_argument("--pilots", type=int, default=3)
    ap.add_argument("--penalty-x", type=float, default=50.0)
    ap.add_argument(
        "--calibration",
        action="append",
        default=[],
        help="a table for all (default: shipped), or one per --experiment in order",
    )
    ap.add_argument(
        "--epoch", type=int, default=None, help="the gain at this epoch (default: final)"
    )
    args = ap.parse_args(argv)
    specs = args.calibration or ["shipped"]
    if len(specs) not in (1, len(args.experiment)):
        ap.error(
            f"{len(specs)} --calibration for {len(args.experiment)} --experiment: give one, or "
            "one per --experiment"
        )
    tables = [load_table(spec) for spec in specs]
    frames = []
    if args.synthetic:
        frames.append(
            simulate(synthetic_grid(), {}, args.pilots, args.penalty_x, tables[0]).assign(
                experiment="synthetic"
            )
        )
    for i, name in enumerate(args.experiment):
        grid, ceilings = measured_grid(args.uri, name, args.metric, args.epoch)
        table = tables[i if len(tables) > 1 else 0]
        frames.append(
            simulate(grid, ceilings, args.pilots, args.penalty_x, table).assign(experiment=name)
        )
    cases = pd.concat(frames, ignore_index=True)
    if cases.empty:
        print(f"no cases: each seed needs {args.pilots} pilot sizes and 2 more measured data.n")
        return 1
    print(" ".join(["python", *sys.argv]))
    print(
        f"calibration: {', '.join(specs)}; pilots: the {args.pilots} smallest data.n; penalty "
        f"{args.penalty_x:g} x the largest pilot n, label cost 1"
    )
    parts = list(cases.groupby("experiment", sort=False))
    for name, part in parts:
        print(f"\n{name}" if len(parts) > 1 else "")
        print(summary(part).to_string(float_format=lambda v: f"{v:.3f}"))
    if len(parts) > 1:
        print(f"\nall {len(parts)}")
        print(summary(cases).to_string(float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
