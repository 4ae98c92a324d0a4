"""The study's answer from an experiment's MLflow runs: a decision card, the questions answered,
checked learning curves with their backtests, figures, tables; written to a folder and attached
to MLflow.

    python evaluate.py mode=report tracking.experiment=<name>       # -> reports/<name>/
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.tracking import MlflowClient

from finetune_budget.errors import DataError
from finetune_budget.report import html
from finetune_budget.speed.forked import Task, in_two_processes
from finetune_budget.study.advice import (
    Advice,
    AdviceSettings,
    advise,
    answers_frame,
    epochs_lines,
)
from finetune_budget.study.curves import CurveFit, quiet_numerics
from finetune_budget.study.knee import best_epochs, drop_point, worse_with_time
from finetune_budget.study.plan import Plan, experiment_plans
from finetune_budget.study.roi import metric_name
from finetune_budget.study.table import (
    GROUP,
    POINT,
    budget_points,
    data_curve,
    derived_columns,
    summarize,
    to_markdown,
    with_intervals,
)
from finetune_budget.tracking.query import roi_table

log = logging.getLogger(__name__)

DEFAULT_METRICS = ("val/mrr_at_20", "val/recall_at_20", "val/map_at_20", "val/map_hits_at_20")


@dataclass
class ReportSettings:
    """What `conf/report/default.yaml` holds (see there)."""

    out_dir: str | None = None
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    drop_fraction: float = 0.3
    data_epoch: str = "final"
    predict_n: list[int] | None = None
    bootstrap: int = 300
    level: float = 0.9
    log_to_mlflow: bool = True
    advise: AdviceSettings = field(default_factory=AdviceSettings)

    @classmethod
    def from_config(cls, node: Any | None, budget_metric: str | None = None) -> ReportSettings:
        """The `report` group's settings; budget_metric (budget.metric) leads the metrics, so the
        decision card, `mode=advise` and the sweep's chosen run answer on the metric the runs
        were summarised and searched on."""
        known = cls.__dataclass_fields__
        values = {
            k: (list(v) if isinstance(v, Sequence) and not isinstance(v, str) else v)
            for k, v in dict(node or {}).items()
            if k in known and k != "advise"
        }
        if node and "advise" in node:
            values["advise"] = AdviceSettings.from_config(node["advise"])
        if budget_metric:
            metrics = values.get("metrics", DEFAULT_METRICS)
            values["metrics"] = list(dict.fromkeys([budget_metric, *metrics]))
        return cls(**values)

    def advice_settings(self) -> AdviceSettings:
        """The advice with this report's drop fraction, epoch rule and interval level."""
        a = self.advise
        return AdviceSettings(
            **{
                **a.__dict__,
                "drop_fraction": self.drop_fraction,
                "data_epoch": self.data_epoch,
                "level": self.level,
                "bootstrap": self.bootstrap,
            }
        )


@dataclass
class Report:
    out_dir: Path
    answer: list[str]
    points: pd.DataFrame
    summary: pd.DataFrame
    fits: dict[tuple[tuple, str], CurveFit]
    files: list[Path]
    numbers: dict[str, float]
    advice: dict[tuple[tuple, str], Advice] = field(default_factory=dict)
    backtests: pd.DataFrame | None = None
    run_id: str | None = None
    plans: list[Plan] = field(default_factory=list)  # the priced plan (none without prices)


def _pct(x: float) -> str:
    return f"{100 * x:+.2f}%"


def _num(x: float) -> str:
    return f"{x:.3g}"


def check_runs(
    df: pd.DataFrame, metrics: Sequence[str], experiment: str
) -> tuple[pd.DataFrame, list[str]]:
    """The rows with an epoch-0 baseline, and notes on what was left out; DataError when nothing
    usable is left."""
    notes = []
    missing = [m for m in metrics if m not in df.columns or df[m].isna().all()]
    if len(missing) == len(metrics):
        have = sorted(c for c in df.columns if c.startswith("val/"))
        raise DataError(
            f"the runs of {experiment!r} logged none of {', '.join(metrics)}; "
            f"they have {', '.join(have) or 'no val/ metrics'} (set budget.metric=<one of them>)"
        )
    if missing:
        notes.append(f"not logged by these runs, left out: {', '.join(missing)}")
    without = df.loc[~df["has_baseline"], "run_id"].unique()
    if len(without) == df["run_id"].nunique():
        raise DataError(
            f"no run of {experiment!r} has epoch-0 (pretrained) metrics, so there is no "
            "gain to measure; re-run them with this version of train.py"
        )
    if len(without):
        notes.append(
            f"{len(without)} run(s) without an epoch-0 baseline left out: "
            + ", ".join(r[:8] for r in without)
        )
    return df[df["has_baseline"]], notes


def _data_answer(
    key: tuple,
    metric: str,
    curve: pd.DataFrame,
    advice: Advice,
    s: ReportSettings,
    fits: dict,
    numbers: dict,
) -> list[str]:
    name = metric_name(metric)
    roi, gain = f"roi_label/{name}", f"gain/{name}"
    lines = []
    if curve["n"].nunique() < 2:
        return [
            f"{name}: one data.n measured ({int(curve['n'].iloc[0])}): no ROI-per-label curve; "
            "sweep data.n, e.g. -m data.n=100,500,1000"
        ]
    try:
        drop = drop_point(curve["n"], curve[roi], s.drop_fraction)
    except ValueError as e:
        lines.append(f"{name}: ROI per labelled item: {e}")
    else:
        peak_row = curve.loc[curve["n"] == drop.peak_x].iloc[0]
        head = (
            f"{name}: ROI per labelled item peaks at n={drop.peak_x:.0f} (gain "
            f"{_pct(peak_row[gain])}, {_num(drop.peak)} per item) and "
        )
        if drop.peak_x == drop.last_x:
            lines.append(
                head + "keeps rising up to the largest n measured: no drop yet; sweep "
                "larger data.n to find where it falls."
            )
        elif drop.reached:
            lines.append(
                head + f"has fallen to {100 * s.drop_fraction:.0f}% of its peak after "
                f"≈ {drop.x:.0f} labelled items."
            )
            numbers[f"drop_n/{name}"] = drop.x
        else:
            lines.append(
                head + f"is still at {100 * drop.last_fraction:.0f}% of its peak at the "
                f"largest n={drop.last_x:.0f}: not yet down to "
                f"{100 * s.drop_fraction:.0f}% within the measured budgets."
            )
    fit = advice.data_fit
    if fit is None:
        lines.append(f"{name}: no learning curve in data.n: fewer than 2 sizes measured.")
        return lines
    fits[(key, metric)] = fit
    targets = s.predict_n or [int(curve["n"].max() * f) for f in (2, 5)]
    mean, lo, hi = fit.predict(targets)
    preds = "; ".join(
        f"n={t:.0f}: {_pct(p)}"
        + ("" if math.isnan(a) else f" [{_pct(a)}, {_pct(b)}]")
        + f" ({fit.trust_at(t)})"
        for t, p, a, b in zip(targets, mean, lo, hi, strict=True)
    )
    bt = fit.backtest
    check = (
        f" Backtest: fitted below n={bt.x:.0f}, it predicted {_pct(bt.predicted)} "
        f"[{_pct(bt.lo)}, {_pct(bt.hi)}] there and {_pct(bt.measured)} was measured "
        f"({'inside' if bt.covered else 'outside'}; trust {bt.trust})."
        if bt is not None and bt.covered is not None
        else f" Not backtested: {bt.reason if bt is not None else 'no backtest'}."
    )
    if fit.extrapolation_ok:
        lines.append(
            f"{name}: learning curve {fit.formula()} ({fit.family}, chosen by "
            f"leave-one-budget-out error {fit.cv_error:.3g} among {', '.join(fit.cv)}; "
            f"{fit.n_points} points, {fit.n_budgets} sizes); {100 * s.level:.0f}% prediction "
            f"intervals: {preds}." + check
        )
    else:
        lines.append(f"{name}: learning curve {fit.formula()}: no extrapolation: {fit.reason}.")
    numbers[f"cv_error/{name}"] = fit.cv_error
    return lines


def _headline(metric: str, found: dict[str, float], fraction: float) -> str:
    """The reference study's sentence: ROI down to `fraction` of its peak after ... items / s."""
    name = metric_name(metric)
    items = found.get(f"drop_n/{name}")
    seconds = {k.rsplit("=", 1)[1]: v for k, v in found.items() if k.startswith(f"drop_s/{name}/")}
    parts = []
    if items is not None:
        parts.append(f"after ≈ {items:.0f} labelled items")
    if seconds:  # the time answer at the largest n (the reference study fixed n=1000)
        n_top = max(seconds, key=float)
        parts.append(f"after ≈ {seconds[n_top]:.3g} s of training (n={n_top})")
    drop = f"{100 * (1 - fraction):.0f}%"
    if not parts:
        return (
            f"In short ({name}): ROI did not shrink by {drop} from its peak within the "
            "measured budgets (details below)."
        )
    return (
        f"In short ({name}): ROI shrinks by {drop} from its highest value "
        + " or ".join(parts)
        + "."
    )


def _time_answer(
    metric: str, group: pd.DataFrame, s: ReportSettings, numbers: dict, rows: list[dict]
) -> list[str]:
    """Lines for the answer, and one row per n (ROI per second: peak, where it falls to the drop
    fraction) into `rows` for the compact table."""
    name = metric_name(metric)
    gain, roi_s = f"gain/{name}", f"roi_s/{name}"
    lines = []
    by = [*GROUP, "n"]
    if group["epoch"].nunique() < 2:
        return [
            f"{name}: one epoch count measured: no ROI-per-second curve; sweep "
            "trainer.max_epochs, e.g. -m trainer.max_epochs=1..10"
        ]
    drop_col = f"ROI/s down to {100 * s.drop_fraction:.0f}% of peak"
    for n, g in group.groupby("n"):
        if len(g) < 2:
            continue
        row = {"task · model · data": " · ".join(g[GROUP].iloc[0]), "metric": name, "data.n": n}
        try:
            drop = drop_point(g["seconds"], g[roi_s], s.drop_fraction)
        except ValueError as e:
            rows.append({**row, drop_col: str(e)})
            continue
        peak_epoch = int(g.loc[(g["seconds"] - drop.peak_x).abs().idxmin(), "epoch"])
        row["ROI/s peak"] = (
            f"{_num(drop.peak)} per s after {drop.peak_x:.3g} s (epoch {peak_epoch})"
        )
        if drop.peak_x == drop.last_x:
            row[drop_col] = "still rising at the longest run: train longer"
        elif drop.reached:
            row[drop_col] = f"after ≈ {drop.x:.3g} s"
            numbers[f"drop_s/{name}/n={n}"] = drop.x
        else:
            row[drop_col] = (
                f"not yet: {100 * drop.last_fraction:.0f}% of peak after {drop.last_x:.3g} s"
            )
        rows.append(row)
    best = best_epochs(group, gain, by)
    lines.append(
        f"{name}: best epoch count per n: "
        + "; ".join(
            f"n={r['n']}: {int(r['epoch'])} (gain {_pct(r[gain])}"
            + ("" if math.isnan(r[f"{gain}_ci95"]) else f" ± {100 * r[f'{gain}_ci95']:.2f}")
            + f", {r['seconds']:.0f} s)"
            for _, r in best.iterrows()
        )
        + "."
    )
    worse = worse_with_time(group, gain, by)
    if worse.empty:
        lines.append(f"{name}: no extra epoch lowered the mean gain (no overfitting measured).")
    else:
        lines.append(
            f"{name}: more time made it worse (negative marginal gain) at "
            + "; ".join(
                f"n={r['n']} epoch {r['epoch'] - 1}→{r['epoch']}: {_pct(r['delta'])} "
                + (
                    f"in {r['seconds_added']:.0f} s more ({_num(r['marginal_roi_s'])} per s"
                    if r["seconds_added"] > 0
                    else "(the longer run was timed faster"
                )
                + (", beyond the seed noise)" if r["beyond_noise"] else ")")
                for _, r in worse.iterrows()
            )
            + "."
        )
    return lines


@quiet_numerics
def build_report(
    tracking_uri: str,
    experiment: str,
    settings: ReportSettings | None = None,
    parent_run_id: str | None = None,
    attach_to_run: str | None = None,
    alongside: Callable[[dict[tuple[tuple, str], Advice]], Any] | None = None,
) -> Report:
    """Read the experiment's training runs (only a sweep's children with `parent_run_id`), write
    roi_table.csv, summary.csv, report.md, PNG figures and report.html into the out dir, and log
    them as artifacts: to `attach_to_run` (a sweep's parent), else to a new `report` run.

    alongside: called with the report's advice (the fits done) in this process while a forked
    one draws the figures (a sweep logs its recommended run's model there)."""
    # matplotlib only where figures are drawn: `mode=advise` and `mode=check` import this module
    # and answer ~0.5 s sooner without it
    from finetune_budget.report import figures as draw

    s = settings or ReportSettings()
    out = Path(s.out_dir or Path("reports") / experiment)
    out.mkdir(parents=True, exist_ok=True)
    df = roi_table(tracking_uri, experiment, s.metrics, parent_run_id=parent_run_id)
    df, notes = check_runs(df, s.metrics, experiment)
    notes += df.attrs.get("notes", [])  # duplicate runs skipped by roi_table (one per config)
    metrics = [m for m in s.metrics if m in df.columns and not df[m].isna().all()]
    points = budget_points(df)
    summary = summarize(points, metrics)
    if len(summary) < 2:
        row = summary.iloc[0] if len(summary) else None
        where = "" if row is None else f" (n={row['n']}, epoch={row['epoch']})"
        raise DataError(
            f"the runs of {experiment!r} measured one budget point{where}; a report needs "
            "two or more: sweep data.n or trainer.max_epochs, e.g. "
            "python train.py -m data.n=100,500 trainer.max_epochs=1..3"
        )
    noisy = [
        str(n)
        for (*_, n), g in summary.groupby([*GROUP, "n"])
        if not g.sort_values("epoch")["seconds"].is_monotonic_increasing
    ]
    if noisy:
        notes.append(
            f"training seconds fall with more epochs at n={', '.join(noisy)}: separately timed "
            "runs on a busy machine; read ROI per second there with care (continued runs share "
            "one clock)"
        )
    continued = df.loc[df["continued"], "run_id"].nunique()
    if continued:
        notes.append(
            f"{continued} of {df['run_id'].nunique()} runs continued from the saved state "
            "of a shorter run (column `continued`; same metrics as from scratch)"
        )

    answer: list[str] = []
    numbers: dict[str, float] = {
        "runs": float(df["run_id"].nunique()),
        "points": float(len(summary)),
    }
    fits: dict[tuple[tuple, str], CurveFit] = {}
    advices: dict[tuple[tuple, str], Advice] = {}
    time_rows: list[dict] = []
    figures: list[tuple[str, list[Path]]] = []
    base = df[df["epoch"] == 0].groupby(GROUP)[metrics].mean()
    advice_settings = s.advice_settings()
    groups = list(summary.groupby(GROUP, sort=True))
    pairs = [(key, metric) for key, _ in groups for metric in metrics]
    fitted = in_two_processes(  # the curve fits: the report's longest part
        [
            (
                advise,
                (
                    points,
                    key,
                    metric,
                    float(base.loc[key, metric]) if key in base.index else math.nan,
                    advice_settings,
                ),
            )
            for key, metric in pairs
        ]
    )
    advices.update(zip(pairs, fitted, strict=True))
    plan_metric = s.advise.metric if s.advise.metric in metrics else metrics[0]
    plans = (
        experiment_plans(advices, advice_settings, plan_metric)
        if advice_settings.prices.priced
        else []
    )
    for key, group in groups:
        head = len(answer)
        answer.append(
            f"{' · '.join(map(str, key))}: {group['n'].nunique()} data sizes, "
            f"{group['epoch'].nunique()} epoch counts, up to {int(group['seeds'].max())} seeds."
        )
        for metric in metrics:
            advice = advices[(key, metric)]
            gpoints = points[(points[GROUP] == pd.Series(key, index=GROUP)).all(axis=1)]
            curve = summarize(data_curve(gpoints, metric, s.data_epoch), metrics)
            found: dict[str, float] = {}
            answer += _data_answer(key, metric, curve, advice, s, fits, found)
            answer += _time_answer(metric, group, s, found, time_rows)
            if metric == metrics[0]:
                answer.insert(head + 1, _headline(metric, found, s.drop_fraction))
            prefix = "" if summary[GROUP].drop_duplicates().shape[0] == 1 else f"{'/'.join(key)}/"
            numbers.update({prefix + k: v for k, v in found.items()})
    backtests = _backtests(advices)
    covered = backtests["covered"].dropna() if not backtests.empty else pd.Series(dtype=bool)
    if len(covered):
        numbers["backtest_coverage"] = float(covered.astype(bool).mean())
        numbers["backtests"] = float(len(covered))
    tasks: list[Task] = []
    for metric in metrics:
        curve = summarize(data_curve(points, metric, s.data_epoch), metrics)
        metric_fits = {k: f for (k, m), f in fits.items() if m == metric}
        metric_time = {k: a.time_fits for (k, m), a in advices.items() if m == metric}
        tasks += [
            (draw.data_figures, (curve, metric, out, metric_fits, s.predict_n)),
            (draw.time_figures, (summary, metric, out)),
            (draw.cost_figures, (points, metric, out, metric_time)),
        ]
    drawn = in_two_processes(
        tasks, alongside=None if alongside is None else lambda: alongside(advices)
    )
    files: list[Path] = []
    for i, metric in enumerate(metrics):
        paths = [path for each in drawn[3 * i : 3 * i + 3] for path in each]
        figures.append((f"{metric_name(metric)}", paths))
        files += paths

    table_cols = [c for c in df.columns if c not in ("has_baseline", "parent_run_id")]
    per_seed = points[[c for c in table_cols if c in points.columns]]
    df[table_cols].to_csv(out / "roi_table_all_rows.csv", index=False)
    per_seed.to_csv(out / "roi_table.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    backtests.to_csv(out / "backtests.csv", index=False)
    shown = with_intervals(summary, metrics)
    md_cols = [
        *POINT,
        "seeds",
        "continued",
        "seconds",
        *[c for m in metrics for c in (m, *derived_columns([m]))],
    ]
    cards = [a for (k, m), a in advices.items() if m == metrics[0]]
    questions = answers_frame(cards)
    epochs = pd.concat(
        [
            epochs_lines(a).assign(**{"task · model · data": " · ".join(map(str, k))})
            for (k, m), a in advices.items()
            if m == metrics[0]
        ],
        ignore_index=True,
    )
    time_table = pd.DataFrame(time_rows)
    fit_rows = _fit_rows(fits)
    title = f"Fine-tuning budget report: {experiment}" + (
        f" (sweep {parent_run_id[:8]})" if parent_run_id else ""
    )
    coverage = _coverage_line(backtests, s.level)
    md = [f"# {title}", ""]
    plan_png = draw.plan_figure(plans, out)
    if plans:
        md += ["## The plan", "", *[f"- {line}" for p in plans for line in p.lines()], ""]
        md += [f"![{p.stem}]({p.name})" for p in plan_png] + [""]
    md += ["## The decision", ""]
    md += [f"- {line}" for a in cards for line in a.lines()[:3]]
    md += ["", "## The questions, answered", "", to_markdown(questions), ""]
    md += ["## The answer", "", *[f"- {line}" for line in answer], ""]
    md += [f"> {n}" for n in notes] + [""]
    md += ["## Backtests", "", coverage, "", to_markdown(backtests), ""]
    if not epochs.empty:
        md += ["## Epochs worth it per data.n", "", to_markdown(epochs), ""]
    if not time_table.empty:
        md += ["## ROI per training second per data.n", "", to_markdown(time_table), ""]
    md += [
        "## Means over seeds (± half-width of the t-based 95% interval)",
        "",
        to_markdown(shown, md_cols),
        "",
    ]
    if not fit_rows.empty:
        md += ["## Learning-curve fits", "", to_markdown(fit_rows), ""]
    md += [
        "## Per run and seed",
        "",
        "See roi_table.csv (one row per task, model, n, epoch, seed).",
        "",
        "## Figures",
        "",
    ]
    md += [f"![{p.stem}]({p.name})" for p in files]
    (out / "report.md").write_text("\n".join(md) + "\n")
    tables = [("The questions, answered", questions)]
    if not epochs.empty:
        tables.append(("Epochs worth it per data.n", epochs))
    tables.append((f"Backtests: {coverage}", backtests))
    if not time_table.empty:
        tables.append(("ROI per training second per data.n", time_table))
    tables.append(("Means over seeds (± 95% interval)", shown[md_cols]))
    if not fit_rows.empty:
        tables.append(("Learning-curve fits", fit_rows))
    tables.append(("Per run and seed", per_seed))
    card = html.plan_card(plans, plan_png[0] if plan_png else None)
    (out / "report.html").write_text(
        html.render(title, answer, notes, tables, figures, cards, plan=card)
    )
    files += plan_png + [
        out / n
        for n in (
            "roi_table.csv",
            "roi_table_all_rows.csv",
            "summary.csv",
            "backtests.csv",
            "report.md",
            "report.html",
        )
    ]
    report = Report(out, answer, points, summary, fits, files, numbers, advices, backtests)
    report.plans = plans
    if s.log_to_mlflow:
        report.run_id = _log(tracking_uri, experiment, out, attach_to_run, parent_run_id)
    for line in [line for p in plans for line in p.lines()] + [
        line for a in cards for line in a.lines()
    ]:
        log.info("%s", line)
    log.info("report written to %s (open report.html)", out.resolve())
    return report


def _backtests(advices: dict[tuple[tuple, str], Advice]) -> pd.DataFrame:
    """One row per backtest in the report: the data curve of each (task, model, data, metric)
    (with the reason where it could not be checked) and the items-seen curve of each n that
    could be checked."""
    rows = []
    for (key, metric), a in advices.items():
        curves = [("gain vs data.n", a.data_fit)]
        curves += [(f"gain vs items seen, n={n}", f) for n, f in sorted(a.time_fits.items())]
        for label, fit in curves:
            bt = None if fit is None else fit.backtest
            if bt is None or (bt.covered is None and label != "gain vs data.n"):
                continue  # an items-seen curve with too few epochs to check: no row
            rows.append(
                {
                    "task · model · data": " · ".join(map(str, key)),
                    "metric": metric_name(metric),
                    "curve": label,
                    "held out": bt.x,
                    "fitted up to": bt.x_fit_max,
                    "family": bt.family,
                    "predicted": bt.predicted,
                    "lo": bt.lo,
                    "hi": bt.hi,
                    "measured": bt.measured,
                    "seeds": bt.seeds,
                    "covered": bt.covered,
                    "trust": bt.trust,
                    "note": "" if bt.covered is not None else bt.reason,
                }
            )
    return pd.DataFrame(rows)


def _coverage_line(backtests: pd.DataFrame, level: float) -> str:
    if backtests.empty or backtests["covered"].dropna().empty:
        return "no backtest had an interval (too few budgets)"
    c = backtests["covered"].dropna().astype(bool)
    return (
        f"{int(c.sum())} of {len(c)} held-out budgets inside their {100 * level:.0f}% "
        f"prediction interval (coverage {100 * c.mean():.0f}%)"
    )


def _fit_rows(fits: dict[tuple[tuple, str], CurveFit]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "task · model · data": " · ".join(map(str, k)),
                "metric": metric_name(m),
                "family": f.family,
                "formula": f.formula(),
                "leave-one-budget-out error": f.cv_error,
                **{f"cv {name}": v for name, v in f.cv.items()},
                "points": f.n_points,
                "sizes": f.n_budgets,
                "trust": f.trust,
            }
            for (k, m), f in fits.items()
        ]
    )


def _log(
    tracking_uri: str,
    experiment: str,
    out: Path,
    attach_to_run: str | None,
    parent_run_id: str | None,
) -> str:
    client = MlflowClient(tracking_uri)
    if attach_to_run:
        client.log_artifacts(attach_to_run, str(out), artifact_path="report")
        return attach_to_run
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    tags = {"run_type": "report", "report.experiment": experiment}
    if parent_run_id:
        tags["report.sweep"] = parent_run_id
    run = client.create_run(exp_id, run_name=f"report {experiment}", tags=tags)
    try:
        client.log_artifacts(run.info.run_id, str(out))
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id
