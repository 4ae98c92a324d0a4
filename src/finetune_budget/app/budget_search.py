"""The budget search's MLflow side: finished runs read back as observations, and the decisions
recorded on the sweep's parent run. The decisions themselves are study.search (no I/O)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

from finetune_budget.errors import BudgetError
from finetune_budget.study.roi import metric_name
from finetune_budget.study.search import Observation, SearchResult, decisions_table
from finetune_budget.tracking.query import roi_table


def from_mlflow(
    uri: str, experiment: str, metric: str, parent: str | None = None
) -> dict[tuple[int, int, int], Observation]:
    """Finished training runs (the children of `parent` if given) as observations keyed
    (n, seed, epochs); cost_s is a run's training plus evaluation seconds."""
    try:
        table = roi_table(uri, experiment, [metric], parent_run_id=parent)
    except BudgetError:
        return {}
    gain_col = f"gain/{metric_name(metric)}"
    out = {}
    for run_id, rows in table.groupby("run_id", sort=False):
        rows = rows.sort_values("epoch")
        first = rows.iloc[0]
        if any(pd.isna(first[k]) for k in ("n", "seed", "epochs")):
            continue
        base = rows.loc[rows["epoch"] == 0, metric]
        trained = rows[rows["epoch"] >= 1]
        epochs = trained["epoch"].astype(int).tolist()

        def per_epoch(col: str, epochs=epochs, trained=trained) -> dict[int, float]:
            return dict(zip(epochs, trained[col].astype(float).tolist(), strict=True))

        obs = Observation(
            n=int(first["n"]),
            seed=int(first["seed"]),
            epochs=int(first["epochs"]),
            gain=per_epoch(gain_col),
            value=per_epoch(metric),
            seconds=per_epoch("seconds"),
            items_seen=per_epoch("samples_seen"),
            baseline=float(base.iloc[0]) if len(base) else math.nan,
            run_id=str(run_id),
            key=(str(first["task"]), str(first["model"]), str(first["data"])),
            cost_s=float(trained["seconds"].max()) + float(rows["eval_s"].fillna(0).sum()),
        )
        out[(obs.n, obs.seed, obs.epochs)] = obs
    return out


def training_items(data: Mapping[str, Any]) -> int | None:
    """How many labelled training items the `data` group's data set holds: the largest data.n
    a job can train on. Its loader reads the files (no model, tokenizer or DataModule is built);
    None for a format this does not count (then only hydra.sweeper.n_max caps the search)."""
    # imported here, not above: Hydra imports the sweeper plugin (and so this module) in every
    # command, and the data package brings lightning (seconds before a config error)
    from finetune_budget.data.image_text import IMAGE_TEXT_LOADERS, load_image_text_data
    from finetune_budget.data.images import load_image_data
    from finetune_budget.data.text import TEXT_LOADERS, load_text_data

    fmt = data.get("format")
    if fmt in TEXT_LOADERS:
        return len(load_text_data(data))
    if fmt in IMAGE_TEXT_LOADERS:
        return len(load_image_text_data(dict(data)))
    if fmt in ("folder", "csv"):
        return len(load_image_data(dict(data)).train_paths)
    return None


def record(client, run_id: str, result: SearchResult) -> None:
    """Decisions table (`budget_search/decisions.{md,json}`), summary and tags on the parent."""
    client.log_text(run_id, decisions_table(result) + "\n", "budget_search/decisions.md")
    client.log_dict(run_id, [d.row() for d in result.decisions], "budget_search/decisions.json")
    client.log_text(run_id, result.summary() + "\n", "budget_search/summary.txt")
    tags = {
        "budget_search.stop_reason": result.stop_reason[:5000],
        "budget_search.steps": str(len(result.decisions) - 1),
        "budget_search.jobs": str(result.jobs),
        "budget_search.cost_s": f"{result.spent_s:.1f}",
        "budget_search.item_epochs": str(result.item_epochs),
        "budget_search.grid_item_epochs": str(result.grid_item_epochs),
    }
    if result.advice is not None:
        tags["budget_search.advice"] = result.advice.lines()[0][:5000]
        tags["budget_search.advice_n"] = str(result.advice_n)
        tags["budget_search.advice_epochs"] = str(result.advice_epochs)
    if math.isfinite(result.cost()):
        tags["budget_search.cost"] = f"{result.cost():.2f}"
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
