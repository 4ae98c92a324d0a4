"""The Pareto front of a multi-objective search as rows, a table, and the cheapest budget that
reaches a given share of the best gain."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import optuna

from finetune_budget.app.tuning.objectives import Objective


def pareto_rows(study: optuna.Study, objectives: Sequence[Objective]) -> list[dict[str, Any]]:
    """One row per trial on the front (study.best_trials) with a positive gain (the first
    objective), sorted by the last objective
    (the cost: seconds or labelled items), cheapest first; share = gain / best gain on the
    front."""
    trials = study.best_trials if len(objectives) > 1 else [study.best_trial]
    rows = []
    for t in trials:
        row: dict[str, Any] = {"trial": t.number}
        row.update({o.metric: v for o, v in zip(objectives, t.values, strict=True)})
        row.update(t.params)
        row["mlflow_run_id"] = t.user_attrs.get("mlflow_run_id", "")
        rows.append(row)
    key = objectives[-1]
    rows.sort(key=lambda r: r[key.metric] if key.direction == "minimize" else -r[key.metric])
    if len(objectives) == 1:
        return rows
    gain = objectives[0]
    # A trial that loses quality against the pretrained model is no budget to buy, however cheap.
    rows = [r for r in rows if math.isfinite(r[gain.metric]) and r[gain.metric] > 0]
    values = [r[gain.metric] for r in rows if math.isfinite(r[gain.metric])]
    best = max(values, default=float("nan"))
    for r in rows:
        r["share_of_best"] = r[gain.metric] / best if best > 0 else float("nan")
    return rows


def cheapest_at_share(rows: Sequence[dict[str, Any]], share: float) -> dict[str, Any] | None:
    """The first (cheapest) front row whose gain reaches `share` of the best gain."""
    return next((r for r in rows if r["share_of_best"] >= share), None)


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "(no complete trials)"
    columns = list(dict.fromkeys(k for r in rows for k in r if k != "mlflow_run_id"))

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
