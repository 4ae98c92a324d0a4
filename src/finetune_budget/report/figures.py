"""The reference study's figures, per metric: relative improvement and ROI per labelled item
against labelled items (log x), improvement against epochs and training seconds, ROI per second
against seconds. One line per task and model (and n on the time axes), a band of the 95% interval
over seeds where points were repeated."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from finetune_budget.report.fit import CurveFit  # noqa: E402
from finetune_budget.report.table import GROUP  # noqa: E402
from finetune_budget.roi import metric_name  # noqa: E402

log = logging.getLogger(__name__)


def _label(key: tuple) -> str:
    task, model, data = key
    return f"{task} · {model} · {data}"


def _line(ax, x, y, half, label: str, **kw) -> None:
    x, y, half = (np.asarray(v, dtype=float) for v in (x, y, half))
    (line,) = ax.plot(x, y, marker="o", ms=4, label=label, **kw)
    if np.any(np.isfinite(half)):
        h = np.nan_to_num(half)
        ax.fill_between(x, y - h, y + h, color=line.get_color(), alpha=0.2, lw=0)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def data_figures(
    curve: pd.DataFrame, metric: str, out_dir: Path, fits: dict[tuple, CurveFit] | None = None
) -> list[Path]:
    """`curve`: summary rows (mean + _ci95) of the data curve, one per (task, model, data, n)."""
    name = metric_name(metric)
    paths = []
    for prefix, col, ylabel in (
        ("gain_vs_n", f"gain/{name}", f"relative improvement of {name}"),
        ("roi_label_vs_n", f"roi_label/{name}", f"ROI per labelled item ({name})"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for key, g in curve.groupby(GROUP, sort=True):
            g = g.sort_values("n")
            _line(ax, g["n"], g[col], g[f"{col}_ci95"], _label(key))
            fit = (fits or {}).get(key)
            if fit is not None and prefix == "gain_vs_n":
                top = max([g["n"].max(), *fit.predict_n])
                grid = np.geomspace(g["n"].min(), top, 100)
                ax.plot(
                    grid,
                    fit(grid),
                    ls="--",
                    lw=1,
                    color="gray",
                    label=f"fit {fit.formula()} (R²={fit.r2:.2f})",
                )
                for n_, p, lo, hi in zip(
                    fit.predict_n, fit.predicted, fit.lower, fit.upper, strict=True
                ):
                    if math.isfinite(lo):
                        ax.errorbar(
                            [n_],
                            [p],
                            yerr=[[p - lo], [hi - p]],
                            fmt="s",
                            color="gray",
                            ms=4,
                            capsize=3,
                        )
        ax.set_xscale("log")
        ax.axhline(0, color="black", lw=0.5)
        ax.set_xlabel("labelled items (data.n)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} vs labelled items")
        ax.legend(fontsize=7)
        paths.append(_save(fig, out_dir / f"{prefix}_{name}.png"))
    return paths


def time_figures(summary: pd.DataFrame, metric: str, out_dir: Path) -> list[Path]:
    """`summary`: rows per (task, model, data, n, epoch) with means and _ci95."""
    name = metric_name(metric)
    gain, roi_s = f"gain/{name}", f"roi_s/{name}"
    specs = (
        ("gain_vs_epoch", "epoch", gain, "epochs", f"relative improvement of {name}"),
        (
            "gain_vs_seconds",
            "seconds",
            gain,
            "training seconds",
            f"relative improvement of {name}",
        ),
        ("roi_s_vs_seconds", "seconds", roi_s, "training seconds", f"ROI per second ({name})"),
    )
    paths = []
    for prefix, xcol, ycol, xlabel, ylabel in specs:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for key, g in summary.groupby([*GROUP, "n"], sort=True):
            g = g.sort_values("epoch")
            _line(ax, g[xcol], g[ycol], g[f"{ycol}_ci95"], f"{_label(key[:3])} · n={key[3]}")
        ax.axhline(0, color="black", lw=0.5)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} vs {xlabel}")
        ax.legend(fontsize=7)
        paths.append(_save(fig, out_dir / f"{prefix}_{name}.png"))
    return paths
