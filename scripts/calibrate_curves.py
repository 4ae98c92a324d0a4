"""The calibration of learning-curve predictions by reach, from measured studies in MLflow.

    python scripts/calibrate_curves.py --tracking-uri sqlite:///studies.db \
        --experiments clinc-epochs5 stsb-epochs flickr-captions celeba-epochs \
        --weigh-studies [--write]

For every study (experiment: its data set), metric and epoch count, the data curve (gain against
data.n at that epoch) is backtested on a rolling basis (study/calibration.py): fitted on its
first k sizes, each seed alone and all seeds together, every larger size predicted. Prints, per
reach bin (1-2x, 2-4x, 4-8x, 8-16x): the cases, the coverage of the 90% intervals when each
study is predicted by a calibration computed without it (leave one study out), and the signed
error (predicted - measured, in units of the gain measured at the largest fitted size) of the
raw curve and of the calibrated center; for all fits, and for fits on pilots (<= --pilot-max
labels), also each study's alone and all the others'. --write stores the calibration of all
the studies as the package's table;
--write-loso DIR each study's leave-one-out table (bench/collection_policies.py --calibration).
--weigh-families: predict with the curve families weighed by 1 / cv^2 (the comparison in
docs/results.md) instead of the one of least leave-one-budget-out error.
--cells: also the surface over labels and epochs (study/surface.py) of each study and metric,
fitted without each (data.n, epochs) cell in turn: how often the cell's measured mean fell
inside its 90% interval.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from finetune_budget.study.calibration import (
    CV_WEIGHT,
    SHIPPED,
    SIZE_STRATA,
    calibrate,
    coverage_table,
    curve_predictor,
    rolling_cases,
)
from finetune_budget.study.curves import fit_learning_curve
from finetune_budget.study.roi import gain_ceiling
from finetune_budget.study.surface import held_out_cells
from finetune_budget.study.table import budget_points
from finetune_budget.tracking.query import roi_table

METRICS = ("val/mrr_at_20", "val/recall_at_20", "val/map_at_20", "val/ndcg_at_20")


def families_weighed(ceiling: float | None, cv_weight: float = CV_WEIGHT):
    """A predictor that weighs the curve families by 1 / (leave-one-budget-out error)^2 instead
    of keeping the one of least error (tried against it: docs/results.md; scales and gains as
    curve_predictor's, so the scores are in one unit)."""

    def weighed(fit, x_new, points):
        errors = {f: e for f, e in fit.cv.items() if math.isfinite(e)}
        if len(errors) < 2:
            return fit(x_new)
        weights = {f: 1.0 / max(e, 1e-12) ** 2 for f, e in errors.items()}
        total = sum(weights.values())
        one = {
            f: fit_learning_curve(*points, (f,), ceiling=ceiling, n_boot=1, check=False)
            for f in weights
        }
        return sum(w / total * one[f](x_new) for f, w in weights.items())

    return curve_predictor(ceiling, cv_weight, weighed)


def study_cases(
    uri: str,
    experiment: str,
    metrics,
    level: float,
    cv_weight: float = CV_WEIGHT,
    predictor=curve_predictor,
):
    df = roi_table(uri, experiment, list(metrics))
    points = budget_points(df)
    cases = []
    for (data, epoch), at in points.groupby(["data", "epoch"]):
        base = df[df["epoch"] == 0]
        for metric in metrics:
            gain = f"gain/{metric.split('/', 1)[1]}"
            if gain not in at or at[gain].isna().all():
                continue
            ceiling = gain_ceiling(metric, float(base[metric].mean()))
            cases += rolling_cases(
                at["n"],
                at[gain],
                at["seed"],
                predictor(ceiling, cv_weight=cv_weight),
                f"{data} · {metric.split('/', 1)[1]} · epoch {epoch}",
                str(data),
            )
    return cases


def cell_coverage(uri: str, experiment: str, metrics, level: float) -> None:
    df = roi_table(uri, experiment, list(metrics))
    points = budget_points(df)
    base = df[df["epoch"] == 0]
    for metric in metrics:
        gain = f"gain/{metric.split('/', 1)[1]}"
        ceiling = gain_ceiling(metric, float(base[metric].mean()))
        rows = held_out_cells(
            points["n"], points["epoch"], points[gain], points["seed"], ceiling, level
        )
        inside = sum(r["covered"] for r in rows)
        err = sum(r["predicted"] - r["measured"] for r in rows) / max(len(rows), 1)
        print(
            f"{experiment} {metric}: {inside} of {len(rows)} held-out (data.n, epochs) cells "
            f"inside their {level:.0%} intervals ({inside / max(len(rows), 1):.0%}); mean "
            f"signed error {err:+.4f}"
        )


def show(title: str, rows) -> None:
    print(f"\n{title}")
    print(f"{'reach':>7} {'cases':>6} {'coverage':>9} {'err raw':>8} {'err cal':>8} {'width':>6}")
    for r in rows:
        print(
            f"{r['reach']:>7} {r['cases']:>6} {r['coverage']:>9.3f} "
            f"{r['signed_error_raw']:>8.3f} {r['signed_error_corrected']:>8.3f} "
            f"{r['median_width']:>6.2f}"
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tracking-uri", required=True)
    p.add_argument("--experiments", nargs="+", required=True)
    p.add_argument("--metrics", nargs="+", default=list(METRICS))
    p.add_argument("--level", type=float, default=0.9)
    p.add_argument("--pilot-max", type=float, default=400)
    p.add_argument("--write", action="store_true", help=f"store the table as {SHIPPED}")
    p.add_argument("--source", default=None, help="what the table says it was computed from")
    p.add_argument("--cells", action="store_true", help="held-out cells of the surface too")
    p.add_argument(
        "--cv-weight",
        type=float,
        default=CV_WEIGHT,
        help="the unit of error: max(gain at the largest fitted size, this x the fit's "
        "leave-one-budget-out error) (0: the gain alone)",
    )
    p.add_argument(
        "--write-loso",
        metavar="DIR",
        help="store each study's leave-one-out table as DIR/<study>.json (for "
        "bench/collection_policies.py --calibration)",
    )
    p.add_argument(
        "--weigh-families",
        action="store_true",
        help="predict with the curve families weighed by 1 / cv^2 (default: the one of least "
        "leave-one-budget-out error, as every answer does)",
    )
    p.add_argument(
        "--pooled",
        action="store_true",
        help="one table for fits on any number of sizes (default: strata by sizes, "
        "study/calibration.py SIZE_STRATA)",
    )
    p.add_argument(
        "--weigh-studies",
        action="store_true",
        help="each study weighs as much as each other (default: every backtest alike)",
    )
    args = p.parse_args(argv)
    cases = [
        c
        for e in args.experiments
        for c in study_cases(
            args.tracking_uri,
            e,
            args.metrics,
            args.level,
            args.cv_weight,
            families_weighed if args.weigh_families else curve_predictor,
        )
    ]
    groups = sorted({c.group for c in cases})
    print(f"{len(cases)} backtests of {len(groups)} studies: {', '.join(groups)}")
    if len(groups) < 2:
        sys.stderr.write("leave-one-study-out needs 2 or more studies\n")
        return 2
    w, cv = args.weigh_studies, args.cv_weight
    strata = () if args.pooled else SIZE_STRATA
    loso = {
        g: calibrate(cases, args.level, g, weigh_studies=w, cv_weight=cv, strata=strata)
        for g in groups
    }
    show(
        "all fits, each study predicted by the calibration of the others",
        coverage_table(cases, loso),
    )
    pilots = [c for c in cases if c.x_fit_max <= args.pilot_max]
    show(
        f"fits on pilots (<= {args.pilot_max:g} labels), leave one study out",
        coverage_table(pilots, loso),
    )
    for g in groups:
        mine = [c for c in cases if c.group == g]
        show(f"{g}, predicted by the calibration of the others", coverage_table(mine, loso))
        mine = [c for c in pilots if c.group == g]
        show(f"{g}, fits on pilots", coverage_table(mine, loso))
        others = [c for c in pilots if c.group != g]
        show(f"fits on pilots without {g}", coverage_table(others, loso))
    if args.write_loso:
        Path(args.write_loso).mkdir(parents=True, exist_ok=True)
        for g, cal in loso.items():
            cal.source = f"{', '.join(args.experiments)} without {g}"
            cal.save(Path(args.write_loso) / f"{g}.json")
        print(f"\nwrote the leave-one-out tables to {args.write_loso}/<study>.json")
    if args.cells:
        print()
        for e in args.experiments:
            cell_coverage(args.tracking_uri, e, args.metrics, args.level)
    if args.write:
        source = args.source or f"experiments {', '.join(args.experiments)}"
        cal = calibrate(
            cases, args.level, source=source, weigh_studies=w, cv_weight=cv, strata=strata
        )
        cal.save(SHIPPED)
        print(f"\nwrote {SHIPPED}: {cal.describe()}")
        for title, bins in [("all fits", cal.bins)] + [(s.label, s.bins) for s in cal.strata]:
            print(f"  {title}")
            for b in bins:
                bounds = f"[{b.q_lo:+.3f}, {b.q_hi:+.3f}] median {b.q_mid:+.3f}"
                pooled = " (too few studies: all fits')" if b.pooled else ""
                print(f"    {b.label}: {b.cases} cases, {bounds}{pooled}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
