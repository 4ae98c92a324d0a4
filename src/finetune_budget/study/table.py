"""The report's tables: one row per budget point and seed; means with a 95% interval over seeds.

A budget point is (task, model, data, n, epoch). Runs of an epoch sweep
(`trainer.max_epochs=1..10`) all contain the early epochs; a point's row comes from the run whose
budget ended there (epochs == epoch), else from the longest run that reached it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from finetune_budget.study.roi import metric_name

GROUP = ["task", "model", "data"]
POINT = [*GROUP, "n", "epoch"]


def derived_columns(metrics: Sequence[str]) -> list[str]:
    return [f"{p}/{metric_name(m)}" for m in metrics for p in ("gain", "roi_label", "roi_s")]


def budget_points(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, model, data, n, seed, epoch >= 1) from the roi_table rows."""
    trained = df[df["epoch"] > 0].copy()
    trained["_final"] = trained["epochs"] == trained["epoch"]
    trained = trained.sort_values(["_final", "epochs"], ascending=[False, False], kind="stable")
    key = [*POINT[:-1], "seed", "epoch"]
    points = trained.drop_duplicates(subset=key, keep="first").drop(columns="_final")
    return points.sort_values(key, kind="stable").reset_index(drop=True)


def items_seen(frame: pd.DataFrame) -> pd.Series:
    """The machine-independent training cost of each row: items seen so far
    (`data/samples_seen`; epoch x n for runs that did not log it)."""
    seen = frame["samples_seen"] if "samples_seen" in frame else pd.Series(np.nan, frame.index)
    return seen.where(seen.notna() & (seen > 0), frame["epoch"] * frame["n"]).astype(float)


def ci95(values: pd.Series) -> float:
    """Half-width of the t-based 95% interval of the mean (NaN for fewer than 2 values)."""
    x = values.dropna().to_numpy(dtype=float)
    if len(x) < 2:
        return math.nan
    return float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


def summarize(
    points: pd.DataFrame, metrics: Sequence[str], by: Sequence[str] = POINT
) -> pd.DataFrame:
    """Mean and `<col>_ci95` over seeds of seconds, each metric, gain and both ROIs, per `by`."""
    columns = ["seconds", *metrics, *derived_columns(metrics)]
    rows = []
    for key, group in points.groupby(list(by), dropna=False, sort=True):
        row = dict(zip(by, key, strict=True))
        row["seeds"] = int(group["seed"].nunique(dropna=False))
        row["continued"] = bool(group["continued"].any())
        for col in columns:
            row[col] = float(group[col].mean())
            row[f"{col}_ci95"] = ci95(group[col])
        rows.append(row)
    return pd.DataFrame(rows)


def data_curve(points: pd.DataFrame, metric: str, epoch: str = "final") -> pd.DataFrame:
    """Per (task, model, data, n, seed) the row at the final epoch of that n (`final`) or at the
    epoch with the best mean gain over seeds (`best`): ROI per label is gain / n there."""
    gain = f"gain/{metric_name(metric)}"
    keys = [*GROUP, "n"]
    if epoch == "final":
        last = points.groupby(keys, dropna=False)["epoch"].transform("max")
        return points[points["epoch"] == last].reset_index(drop=True)
    if epoch != "best":
        raise ValueError(f"epoch={epoch!r}: use final or best")
    means = points.groupby([*keys, "epoch"], dropna=False)[gain].mean().reset_index()
    best = means.loc[means.groupby(keys, dropna=False)[gain].idxmax()][[*keys, "epoch"]]
    return points.merge(best, on=[*keys, "epoch"]).reset_index(drop=True)


def _cell(value: object) -> str:
    if isinstance(value, bool | np.bool_):
        return "yes" if value else ""
    if isinstance(value, float | np.floating):
        if math.isnan(value):
            return ""
        return f"{value:.4g}"
    return str(value)


def to_markdown(df: pd.DataFrame, columns: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table (no extra dependency)."""
    columns = list(columns or df.columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for _, row in df[columns].iterrows():
        lines.append("| " + " | ".join(_cell(row[c]) for c in columns) + " |")
    return "\n".join(lines)


def with_intervals(summary: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """The summary with `mean ± ci95` strings for display."""
    out = summary[[*POINT, "seeds", "continued"]].copy()
    for col in ["seconds", *metrics, *derived_columns(metrics)]:
        mean, half = summary[col], summary[f"{col}_ci95"]
        out[col] = [
            _cell(m) if math.isnan(h) else f"{m:.4g} ± {h:.2g}"
            for m, h in zip(mean, half, strict=True)
        ]
    return out
