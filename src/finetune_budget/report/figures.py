"""The reference study's figures, per metric: relative improvement and ROI per labelled item
against labelled items (log x), improvement against epochs, training seconds and items seen, ROI
per second against seconds. One line per task and model (and n on the time axes), a band of the
95% interval over seeds where points were repeated; the checked learning curves dashed with their
interval band, their predictions, and each backtest (the held-out budget's predicted interval in
red, its measured mean as a star)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from finetune_budget.study.curves import CurveFit  # noqa: E402
from finetune_budget.study.plan import Plan  # noqa: E402
from finetune_budget.study.roi import metric_name  # noqa: E402
from finetune_budget.study.table import GROUP, items_seen  # noqa: E402

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


def _axes():
    """One figure of the report's size with fixed margins (room for the axis labels and tick
    labels): a fixed layout draws each figure once, where tight_layout draws it twice."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.12, top=0.92)
    return fig, ax


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fitted(ax, fit: CurveFit, top: float, color: str, what: str) -> None:
    """The fitted curve over its measured range and on to `top`, its interval band, and the
    backtest: predicted interval (red) and measured mean (star) at the held-out budget."""
    grid = np.geomspace(fit.x_min, max(top, fit.x_max), 120)
    mean, lo, hi = fit.expected(grid)
    ax.plot(grid, mean, ls="--", lw=1, color=color, label=f"{what}: {fit.family} ({fit.trust})")
    if np.isfinite(lo).any():
        ax.fill_between(grid, lo, hi, color=color, alpha=0.12, lw=0)
    bt = fit.backtest
    if bt is not None and math.isfinite(bt.predicted):
        if math.isfinite(bt.lo):
            ax.errorbar(
                [bt.x],
                [bt.predicted],
                yerr=[[bt.predicted - bt.lo], [bt.hi - bt.predicted]],
                fmt="s",
                color="tab:red",
                ms=4,
                capsize=3,
            )
        ax.plot(
            [bt.x],
            [bt.measured],
            marker="*",
            ms=10,
            color="tab:red",
            ls="none",
            label=f"backtest at {bt.x:.4g}: {'inside' if bt.covered else 'outside'}",
        )


def data_figures(
    curve: pd.DataFrame,
    metric: str,
    out_dir: Path,
    fits: dict[tuple, CurveFit] | None = None,
    predict_n: list[float] | None = None,
) -> list[Path]:
    """`curve`: summary rows (mean + _ci95) of the data curve, one per (task, model, data, n)."""
    name = metric_name(metric)
    paths = []
    for prefix, col, ylabel in (
        ("gain_vs_n", f"gain/{name}", f"relative improvement of {name}"),
        ("roi_label_vs_n", f"roi_label/{name}", f"ROI per labelled item ({name})"),
    ):
        fig, ax = _axes()
        for key, g in curve.groupby(GROUP, sort=True):
            g = g.sort_values("n")
            _line(ax, g["n"], g[col], g[f"{col}_ci95"], _label(key))
            fit = (fits or {}).get(key)
            if fit is not None and prefix == "gain_vs_n":
                targets = predict_n or [2 * fit.x_max, 5 * fit.x_max]
                color = ax.lines[-1].get_color()
                if fit.extrapolation_ok:
                    _fitted(ax, fit, max(targets), color, "fit")
                    mean, lo, hi = fit.predict(targets)
                    ok = np.isfinite(lo)
                    ax.errorbar(
                        np.asarray(targets)[ok],
                        mean[ok],
                        yerr=[(mean - lo)[ok], (hi - mean)[ok]],
                        fmt="D",
                        color=color,
                        ms=4,
                        capsize=3,
                        mfc="white",
                    )
                else:
                    _fitted(ax, fit, fit.x_max, color, "fit, not extrapolated")
        ax.set_xscale("log")
        ax.axhline(0, color="black", lw=0.5)
        ax.set_xlabel("labelled items (data.n)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} vs labelled items")
        ax.legend(fontsize=7)
        paths.append(_save(fig, out_dir / f"{prefix}_{name}.png"))
    return paths


def cost_figures(
    points: pd.DataFrame,
    metric: str,
    out_dir: Path,
    fits: dict[tuple, dict[int, CurveFit]] | None = None,
) -> list[Path]:
    """Gain against items seen (the machine-independent time axis), one line per n with its
    seed band, and the fitted curve of each n that could be backtested, with its backtest."""
    name = metric_name(metric)
    gain = f"gain/{name}"
    fig, ax = _axes()
    frame = points.assign(_cost=items_seen(points))
    for key, g in frame.groupby([*GROUP, "n"], sort=True):
        stats_ = g.groupby("epoch").agg(
            x=("_cost", "mean"), y=(gain, "mean"), s=(gain, "std"), k=(gain, "count")
        )
        half = 1.96 * stats_["s"] / np.sqrt(stats_["k"])
        _line(ax, stats_["x"], stats_["y"], half, f"{_label(key[:3])} · n={key[3]}")
        fit = (fits or {}).get(tuple(key[:3]), {}).get(int(key[3]))
        if fit is not None and fit.trust != "untested":  # only curves a backtest checked
            _fitted(ax, fit, fit.x_max, ax.lines[-1].get_color(), f"n={key[3]}")
    ax.set_xscale("log")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlabel("items seen in training (data/samples_seen)")
    ax.set_ylabel(f"relative improvement of {name}")
    ax.set_title(f"relative improvement of {name} vs items seen")
    ax.legend(fontsize=6)
    return [_save(fig, out_dir / f"gain_vs_items_seen_{name}.png")]


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
        fig, ax = _axes()
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


def plan_figure(plans: Sequence[Plan], out_dir: Path) -> list[Path]:
    """The priced plan: expected gain against expected total cost (labels + compute) of training
    on n labels, one line per base model with its interval band, each plan's n marked (filled:
    the model to buy) and the target dashed."""
    made = [p for p in plans if p.curve is not None and p.sizes]
    if not made:
        return []
    fig, ax = _axes()
    for p in made:
        c = p.curve[np.isfinite(p.curve["gain"])]
        (line,) = ax.plot(c["cost"], c["gain"], lw=1.5, label=_label(p.key))
        ax.fill_between(c["cost"], c["lo"], c["hi"], color=line.get_color(), alpha=0.15, lw=0)
        at = p.curve.set_index("n").loc[p.n]
        ax.plot(
            [at["cost"]],
            [at["gain"]],
            marker="o",
            ms=9,
            color=line.get_color(),
            mfc=line.get_color() if p.chosen in (None, True) else "white",
            label=f"plan: data.n={p.n:,}, {p.epochs} epochs",
        )
    target = made[0].target
    if target is not None:
        ax.axhline(target, color="black", ls="--", lw=0.8, label=f"target {made[0].target_text}")
    money = made[0].prices
    ax.set_xscale("log")
    ax.set_xlabel(f"total cost of training on n labels ({money.currency}, labels + compute)")
    ax.set_ylabel(f"expected gain in {metric_name(made[0].metric)} (band: interval)")
    ax.set_title("the priced plan: expected gain vs total cost")
    ax.legend(fontsize=7)
    return [_save(fig, out_dir / f"plan_{metric_name(made[0].metric)}.png")]
