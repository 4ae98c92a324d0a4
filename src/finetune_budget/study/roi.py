"""Return on investment: relative improvement over the pretrained model per labelled item and per
second of training.

gain      = (m - m0) / max(|m0|, floor)     (for errors, where lower is better: (m0 - m) / ...)
gain_abs  = m - m0                          (m0 - m for errors)
roi_label = gain / n_labels
roi_s     = gain / train_seconds
marginal ROI per second (the report's "more time made it worse") = gain change / seconds added
The floor keeps the relative gain finite when the baseline is near zero (an assembled CLIP).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

LOWER_IS_BETTER_MARKERS = ("loss", "error", "mae", "median_ae", "rmse")
BOUNDED_ABOVE_BY_1 = ("mrr", "recall", "map", "ndcg", "hit", "precision", "accuracy", "auc", "f1")


def lower_is_better(metric: str) -> bool:
    name = metric.rsplit("/", 1)[-1]
    return any(marker in name for marker in LOWER_IS_BETTER_MARKERS)


def metric_name(key: str) -> str:
    """`val/mrr_at_20` -> `mrr_at_20` (the suffix used in gain/, roi_label/, roi_s/ keys)."""
    return key.split("/", 1)[-1]


def improvement(metric: str, value: float, baseline: float) -> float:
    """gain_abs: value - baseline, or baseline - value for errors (lower is better)."""
    return baseline - value if lower_is_better(metric) else value - baseline


def relative_gain(metric: str, value: float, baseline: float, floor: float = 0.01) -> float:
    """gain: the improvement over the baseline relative to max(|baseline|, floor)."""
    return improvement(metric, value, baseline) / max(abs(baseline), floor)


def per_unit(gain: float, cost: float) -> float:
    """ROI: `gain` per labelled item or per training second (`cost`); NaN when cost <= 0."""
    return gain / cost if cost > 0 else math.nan


def gains(
    metrics: Mapping[str, float],
    baseline: Mapping[str, float],
    n_labels: int,
    train_s: float,
    floor: float = 0.01,
) -> dict[str, float]:
    """gain/, gain_abs/, roi_label/ and roi_s/ for every metric that has a baseline value."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key not in baseline:
            continue
        gain = relative_gain(key, value, baseline[key], floor)
        name = metric_name(key)
        out[f"gain/{name}"] = gain
        out[f"gain_abs/{name}"] = improvement(key, value, baseline[key])
        if n_labels > 0:
            out[f"roi_label/{name}"] = per_unit(gain, n_labels)
        if train_s > 0:
            out[f"roi_s/{name}"] = per_unit(gain, train_s)
    return out


def gain_ceiling(metric: str, baseline: float, floor: float = 0.01) -> float | None:
    """The largest gain a metric allows: (1 - m0) / m0 for scores <= 1 (retrieval metrics,
    accuracy, AUC), 1 for errors >= 0 (an error cannot fall below 0); None when unknown."""
    if not math.isfinite(baseline):
        return None
    scale = max(abs(baseline), floor)
    name = metric_name(metric)
    if lower_is_better(metric):
        return baseline / scale if baseline >= 0 else None
    if any(marker in name for marker in BOUNDED_ABOVE_BY_1) and baseline <= 1:
        return (1.0 - baseline) / scale
    return None
