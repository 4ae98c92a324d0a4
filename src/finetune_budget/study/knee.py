"""Where to stop: the point where ROI has fallen to a fraction of its peak (the reference study's
"70% drop" is fraction=0.3), the best epoch count per n, and where more epochs made it worse."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from finetune_budget.study.roi import per_unit


@dataclass
class Drop:
    """ROI against an investment axis x. `x` is where it first falls to `fraction` of its peak
    after the peak (linear interpolation between the measured points), None when not reached."""

    fraction: float
    peak_x: float
    peak: float
    x: float | None
    last_x: float
    last_fraction: float  # ROI at the largest x as a fraction of the peak

    @property
    def reached(self) -> bool:
        return self.x is not None


def drop_point(x: Sequence[float], roi: Sequence[float], fraction: float = 0.3) -> Drop:
    """First x after the peak of `roi` where roi <= fraction * peak.

    x, roi: (P,) measured points, any order; NaNs are dropped. Needs 2 points and a positive peak.
    """
    xs = np.asarray(x, dtype=float)
    ys = np.asarray(roi, dtype=float)
    keep = ~(np.isnan(xs) | np.isnan(ys))
    xs, ys = xs[keep], ys[keep]
    if len(xs) < 2:
        raise ValueError(f"a drop point needs at least 2 measured points, got {len(xs)}")
    order = np.argsort(xs, kind="stable")
    xs, ys = xs[order], ys[order]
    p = int(np.argmax(ys))
    peak = float(ys[p])
    if peak <= 0:
        raise ValueError(
            "ROI is never positive: fine-tuning did not improve on the pretrained model"
        )
    threshold = fraction * peak
    found = None
    for i in range(p + 1, len(xs)):
        if ys[i] <= threshold:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            found = float(x1 if y0 == y1 else x0 + (threshold - y0) * (x1 - x0) / (y1 - y0))
            break
    return Drop(fraction, float(xs[p]), peak, found, float(xs[-1]), float(ys[-1] / peak))


def best_epochs(summary: pd.DataFrame, gain: str, by: Sequence[str]) -> pd.DataFrame:
    """Per group of `by` (task, model, data, n): the epoch with the highest mean `gain`."""
    idx = summary.groupby(list(by), dropna=False)[gain].idxmax()
    cols = [*by, "epoch", gain, f"{gain}_ci95", "seconds"]
    return summary.loc[idx.dropna().astype(int), cols].reset_index(drop=True)


def worse_with_time(summary: pd.DataFrame, gain: str, by: Sequence[str]) -> pd.DataFrame:
    """Consecutive epochs where the mean gain fell (negative marginal gain: overfitting).

    Columns: by, epoch (the later one), delta (gain change), seconds_added, marginal_roi_s
    (delta / seconds_added) and `beyond_noise` (the fall exceeds both points' 95% intervals;
    False where a point has one seed only).
    """
    rows = []
    for key, group in summary.sort_values("epoch").groupby(list(by), dropna=False):
        g = group.reset_index(drop=True)
        for i in range(1, len(g)):
            if g.loc[i, "epoch"] != g.loc[i - 1, "epoch"] + 1:
                continue
            delta = g.loc[i, gain] - g.loc[i - 1, gain]
            if not delta < 0:
                continue
            added = g.loc[i, "seconds"] - g.loc[i - 1, "seconds"]
            noise = max(g.loc[i, f"{gain}_ci95"], g.loc[i - 1, f"{gain}_ci95"])
            rows.append(
                {
                    **dict(zip(by, key, strict=True)),
                    "epoch": int(g.loc[i, "epoch"]),
                    "delta": float(delta),
                    "seconds_added": float(added),
                    "marginal_roi_s": per_unit(float(delta), float(added)),
                    "beyond_noise": bool(not math.isnan(noise) and -delta > noise),
                }
            )
    return pd.DataFrame(
        rows, columns=[*by, "epoch", "delta", "seconds_added", "marginal_roi_s", "beyond_noise"]
    )
