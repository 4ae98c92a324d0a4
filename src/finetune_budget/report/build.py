"""The study's answer from an experiment's MLflow runs: tables, figures, where to stop, a
learning-curve fit; written to a folder and attached to MLflow.

    python evaluate.py mode=report tracking.experiment=<name>       # -> reports/<name>/
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.tracking import MlflowClient

from finetune_budget.errors import DataError
from finetune_budget.report import html
from finetune_budget.report.figures import data_figures, time_figures
from finetune_budget.report.fit import CurveFit, fit_learning_curve
from finetune_budget.report.knee import best_epochs, drop_point, worse_with_time
from finetune_budget.report.table import (
    GROUP,
    POINT,
    budget_points,
    data_curve,
    derived_columns,
    summarize,
    to_markdown,
    with_intervals,
)
from finetune_budget.roi import metric_name
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
    bootstrap: int = 500
    log_to_mlflow: bool = True

    @classmethod
    def from_config(cls, node: Any | None) -> ReportSettings:
        if not node:
            return cls()
        known = cls.__dataclass_fields__
        values = {
            k: (list(v) if isinstance(v, Sequence) and not isinstance(v, str) else v)
            for k, v in dict(node).items()
            if k in known
        }
        return cls(**values)


@dataclass
class Report:
    out_dir: Path
    answer: list[str]
    points: pd.DataFrame
    summary: pd.DataFrame
    fits: dict[tuple[tuple, str], CurveFit]
    files: list[Path]
    numbers: dict[str, float]
    run_id: str | None = None


def _pct(x: float) -> str:
    return f"{100 * x:+.2f}%"


def _num(x: float) -> str:
    return f"{x:.3g}"


def _check(
    df: pd.DataFrame, metrics: Sequence[str], experiment: str
) -> tuple[pd.DataFrame, list[str]]:
    notes = []
    missing = [m for m in metrics if m not in df.columns or df[m].isna().all()]
    if len(missing) == len(metrics):
        have = sorted(c for c in df.columns if c.startswith("val/"))
        raise DataError(
            f"the runs of {experiment!r} logged none of {', '.join(metrics)}; "
            f"they have {', '.join(have) or 'no val/ metrics'} (set report.metrics=[...])"
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
    points: pd.DataFrame,
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
    data = data_curve(points, metric, s.data_epoch)
    try:
        targets = s.predict_n or [int(curve["n"].max() * f) for f in (2, 5, 10)]
        fit = fit_learning_curve(data["n"], data[gain], targets, n_boot=s.bootstrap)
    except (ValueError, RuntimeError) as e:
        lines.append(f"{name}: no learning-curve fit: {e}")
        return lines
    fits[(key, metric)] = fit
    preds = "; ".join(
        f"n={t:.0f}: {_pct(p)}" + ("" if math.isnan(lo) else f" [{_pct(lo)}, {_pct(hi)}]")
        for t, p, lo, hi in zip(fit.predict_n, fit.predicted, fit.lower, fit.upper, strict=True)
    )
    lines.append(
        f"{name}: learning curve {fit.formula()} fitted to {fit.points} points "
        f"({fit.distinct_n} sizes): R²={fit.r2:.3f}, RMSE={fit.rmse:.3g}; it predicts "
        f"the gain at larger budgets as {preds} (95% bootstrap interval)."
        + (f" Note: {fit.note}." if fit.note else "")
    )
    numbers[f"fit_r2/{name}"] = fit.r2
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


def _time_answer(metric: str, group: pd.DataFrame, s: ReportSettings, numbers: dict) -> list[str]:
    name = metric_name(metric)
    gain, roi_s = f"gain/{name}", f"roi_s/{name}"
    lines = []
    by = [*GROUP, "n"]
    if group["epoch"].nunique() < 2:
        return [
            f"{name}: one epoch count measured: no ROI-per-second curve; sweep "
            "trainer.max_epochs, e.g. -m trainer.max_epochs=1..10"
        ]
    for n, g in group.groupby("n"):
        if len(g) < 2:
            continue
        try:
            drop = drop_point(g["seconds"], g[roi_s], s.drop_fraction)
        except ValueError as e:
            lines.append(f"{name}, n={n}: ROI per second: {e}")
            continue
        peak_epoch = int(g.loc[(g["seconds"] - drop.peak_x).abs().idxmin(), "epoch"])
        text = (
            f"{name}, n={n}: ROI per training second peaks after {drop.peak_x:.3g} s "
            f"(epoch {peak_epoch}, {_num(drop.peak)} per s) and "
        )
        if drop.peak_x == drop.last_x:
            text += "keeps rising up to the longest run: train longer to find where it falls."
        elif drop.reached:
            text += (
                f"has fallen to {100 * s.drop_fraction:.0f}% of its peak after ≈ {drop.x:.3g} s."
            )
            numbers[f"drop_s/{name}/n={n}"] = drop.x
        else:
            text += (
                f"is still at {100 * drop.last_fraction:.0f}% of it after {drop.last_x:.3g} s "
                "(the longest measured)."
            )
        lines.append(text)
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


def build_report(
    tracking_uri: str,
    experiment: str,
    settings: ReportSettings | None = None,
    parent_run_id: str | None = None,
    attach_to_run: str | None = None,
) -> Report:
    """Read the experiment's training runs (only a sweep's children with `parent_run_id`), write
    roi_table.csv, summary.csv, report.md, PNG figures and report.html into the out dir, and log
    them as artifacts: to `attach_to_run` (a sweep's parent), else to a new `report` run."""
    s = settings or ReportSettings()
    out = Path(s.out_dir or Path("reports") / experiment)
    out.mkdir(parents=True, exist_ok=True)
    df = roi_table(tracking_uri, experiment, s.metrics, parent_run_id=parent_run_id)
    df, notes = _check(df, s.metrics, experiment)
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
    figures: list[tuple[str, list[Path]]] = []
    for key, group in summary.groupby(GROUP, sort=True):
        head = len(answer)
        answer.append(
            f"{' · '.join(map(str, key))}: {group['n'].nunique()} data sizes, "
            f"{group['epoch'].nunique()} epoch counts, up to {int(group['seeds'].max())} seeds."
        )
        gpoints = points[(points[GROUP] == pd.Series(key, index=GROUP)).all(axis=1)]
        for metric in metrics:
            curve = summarize(data_curve(gpoints, metric, s.data_epoch), metrics)
            found: dict[str, float] = {}
            answer += _data_answer(key, metric, curve, gpoints, s, fits, found)
            answer += _time_answer(metric, group, s, found)
            if metric == metrics[0]:
                answer.insert(head + 1, _headline(metric, found, s.drop_fraction))
            prefix = "" if summary[GROUP].drop_duplicates().shape[0] == 1 else f"{'/'.join(key)}/"
            numbers.update({prefix + k: v for k, v in found.items()})
    files: list[Path] = []
    for metric in metrics:
        curve = summarize(data_curve(points, metric, s.data_epoch), metrics)
        metric_fits = {k: f for (k, m), f in fits.items() if m == metric}
        paths = data_figures(curve, metric, out, metric_fits) + time_figures(summary, metric, out)
        figures.append((f"{metric_name(metric)}", paths))
        files += paths

    table_cols = [c for c in df.columns if c not in ("has_baseline", "parent_run_id")]
    per_seed = points[[c for c in table_cols if c in points.columns]]
    df[table_cols].to_csv(out / "roi_table_all_rows.csv", index=False)
    per_seed.to_csv(out / "roi_table.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    shown = with_intervals(summary, metrics)
    md_cols = [
        *POINT,
        "seeds",
        "continued",
        "seconds",
        *[c for m in metrics for c in (m, *derived_columns([m]))],
    ]
    fit_rows = pd.DataFrame(
        [
            {
                "task": k[0],
                "model": k[1],
                "data": k[2],
                "metric": m,
                "formula": f.formula(),
                "r2": f.r2,
                "rmse": f.rmse,
                "points": f.points,
                **{
                    f"gain at n={t:.0f}": f"{p:.4g} [{lo:.4g}, {hi:.4g}]"
                    for t, p, lo, hi in zip(
                        f.predict_n, f.predicted, f.lower, f.upper, strict=True
                    )
                },
            }
            for (k, m), f in fits.items()
        ]
    )
    title = f"Fine-tuning budget report: {experiment}" + (
        f" (sweep {parent_run_id[:8]})" if parent_run_id else ""
    )
    md = [f"# {title}", "", "## The answer", "", *[f"- {line}" for line in answer], ""]
    md += [f"> {n}" for n in notes] + [""]
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
    tables = [("Means over seeds (± 95% interval)", shown[md_cols])]
    if not fit_rows.empty:
        tables.append(("Learning-curve fits", fit_rows))
    tables.append(("Per run and seed", per_seed))
    (out / "report.html").write_text(html.render(title, answer, notes, tables, figures))
    files += [
        out / n
        for n in (
            "roi_table.csv",
            "roi_table_all_rows.csv",
            "summary.csv",
            "report.md",
            "report.html",
        )
    ]
    report = Report(out, answer, points, summary, fits, files, numbers)
    if s.log_to_mlflow:
        report.run_id = _log(tracking_uri, experiment, out, attach_to_run, parent_run_id)
    for line in answer:
        log.info("%s", line)
    log.info("report written to %s (open report.html)", out.resolve())
    return report


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
