"""The cross-run ROI table of an experiment, from MLflow alone (no files of the runs needed).

    python -m finetune_budget.tracking.query --experiment finetune-budget [--csv roi.csv]
    finetune-budget-roi --experiment finetune-budget

One row per training run and evaluated epoch: run_id, task, model, data, n, seed, epochs
(trainer.max_epochs), epoch, seconds (cumulative training seconds), samples_seen and train_flops
(cumulative machine-independent cost; NaN where a run did not log it), each metric, and per
metric the relative gain over the run's epoch 0 and both ROIs (gain per labelled item, gain per
training second), recomputed here from the logged metrics with the run's `budget.gain_floor`.

Each (config, seed) counts once: of runs with the same config (resume.config_key of their params:
the config without bookkeeping keys) only the latest finished one is read; the table says how many
it skipped (`df.attrs["duplicates_skipped"]`, and a line in `df.attrs["notes"]`).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Sequence

import pandas as pd
from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from finetune_budget.errors import BudgetError, ConfigError, DataError
from finetune_budget.study.roi import gains, metric_name
from finetune_budget.tracking.history import read_epochs
from finetune_budget.tracking.mlflow_run import mark_stale_runs, mlflow_client
from finetune_budget.tracking.resume import REUSED_TAG_PREFIX, config_key

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"
ID_COLUMNS = [
    "run_id",
    "task",
    "model",
    "data",
    "n",
    "seed",
    "epochs",
    "epoch",
    "seconds",
    "samples_seen",
    "train_flops",
    "eval_s",
    "continued",
    "continued_from",
    "parent_run_id",
]

COST_KEYS = {"data/samples_seen": "samples_seen", "cost/train_flops": "train_flops"}


def default_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)


def _experiment_id(client: MlflowClient, tracking_uri: str, experiment: str) -> str:
    try:
        found = client.get_experiment_by_name(experiment)
    except MlflowException as e:
        raise ConfigError(
            f"cannot read the MLflow store {tracking_uri}: {e}; check tracking.uri"
        ) from e
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise DataError(
            f"experiment {experiment!r} not found in {tracking_uri}; existing: "
            f"{', '.join(names) or 'none'} (set tracking.experiment=<name> or tracking.uri=...)"
        )
    # a reader marks only the runs whose process is provably gone (this host's); calling another
    # host's run stale by its age is tracking.stale_after_s's, applied where a run or sweep
    # opens the experiment with its config
    mark_stale_runs(client, found.experiment_id, stale_after_s=None)
    return found.experiment_id


def all_runs(client: MlflowClient, exp_id: str, query: str = "") -> list[Run]:
    """Every active run of the experiment that `query` selects, page by page."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(
            [exp_id], query, ViewType.ACTIVE_ONLY, max_results=1000, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def latest_per_config(runs: Sequence[Run]) -> tuple[list[Run], int]:
    """One run per (config, seed): the latest finished (by end time); and how many were skipped."""
    latest: dict[str, Run] = {}
    for run in runs:
        key = config_key(run.data.params)
        old = latest.get(key)
        if old is None or (run.info.end_time or 0) > (old.info.end_time or 0):
            latest[key] = run
    kept = sorted(latest.values(), key=lambda r: r.info.start_time or 0)
    return kept, len(runs) - len(kept)


def train_runs(
    tracking_uri: str,
    experiment: str,
    parent_run_id: str | None = None,
    with_skipped: bool = False,
) -> list[Run] | tuple[list[Run], int]:
    """Finished training runs of `experiment`, one per (config, seed) (latest_per_config).

    parent_run_id: only a sweep's jobs (its children, and the earlier runs it reused).
    with_skipped: also return how many duplicate runs were left out.
    """
    client = mlflow_client(tracking_uri)
    exp_id = _experiment_id(client, tracking_uri, experiment)
    query = "tags.run_type = 'train' and attributes.status = 'FINISHED'"
    if parent_run_id:
        runs = all_runs(
            client, exp_id, f"{query} and tags.`mlflow.parentRunId` = '{parent_run_id}'"
        )
        runs += all_runs(
            client, exp_id, f"{query} and tags.`{REUSED_TAG_PREFIX}{parent_run_id}` = 'true'"
        )
    else:
        runs = all_runs(client, exp_id, query)
    runs, skipped = latest_per_config(runs)
    return (runs, skipped) if with_skipped else runs


def _param(run: Run, key: str, cast=int, default=None):
    value = run.data.params.get(key)
    if value is None or value == "None":
        return default
    try:
        return cast(value)
    except ValueError:
        return default


def logged_names(logged: Sequence[str]) -> dict[str, str]:
    """{metric as this version defines it: the key the run logged it under}.

    Runs from before metrics version 2 (retrieval.metrics) logged torchmetrics' mAP, now
    `map_hits_at_k`, as `map_at_k`, and have no `map_hits_at_k`: their `map_at_k` is read as
    `map_hits_at_k`, and they have no `map_at_k` of the current definition.
    """
    names = {k: k for k in logged}
    if any("map_hits_at_" in k for k in logged):
        return names
    for key in logged:
        if "map_at_" in key:
            del names[key]
            names[key.replace("map_at_", "map_hits_at_")] = key
    return names


def run_rows(client: MlflowClient, run: Run, metrics: Sequence[str] | None = None) -> list[dict]:
    """The per-epoch rows of one run: logged metric histories joined on step (= epoch)."""
    names = logged_names(list(run.data.metrics))
    keys = [k for k in names if k.startswith("val/")] if metrics is None else list(metrics)
    wanted = [*keys, "time/train_s", "time/eval_s", "data/n", *COST_KEYS]
    logged = {names[key]: key for key in wanted if key in names}
    by_step = {
        step: {logged[k]: v for k, v in values.items()}
        for step, values in read_epochs(client, run.info.run_id, logged).items()
    }
    if not by_step:
        return []
    tags = run.data.tags
    n = by_step.get(max(by_step), {}).get("data/n") or _param(run, "data.n")
    floor = _param(run, "budget.gain_floor", float, 0.01)
    base = {k: v for k, v in by_step.get(0, {}).items() if k in keys}
    common = {
        "run_id": run.info.run_id,
        "task": tags.get("task", "?"),
        "model": tags.get("model", "?"),
        "data": tags.get("data", "?"),
        "n": int(n) if n is not None else None,
        "seed": _param(run, "seed"),
        "epochs": _param(run, "trainer.max_epochs"),
        "continued": "continued_from" in tags,
        "continued_from": tags.get("continued_from"),
        "parent_run_id": tags.get("mlflow.parentRunId"),
    }
    rows = []
    for step in sorted(by_step):
        values = by_step[step]
        seconds = values.get("time/train_s", 0.0 if step == 0 else math.nan)
        row = {**common, "epoch": step, "seconds": seconds, "eval_s": values.get("time/eval_s")}
        for key, column in COST_KEYS.items():  # machine-independent training cost so far
            row[column] = values.get(key, 0.0 if step == 0 else math.nan)
        row.update({k: values.get(k, math.nan) for k in keys})
        row["has_baseline"] = bool(base)
        if step > 0 and base:
            measured = {k: values[k] for k in keys if k in values}
            row.update(gains(measured, base, int(n or 0), seconds, floor))
        rows.append(row)
    return rows


def roi_table(
    tracking_uri: str,
    experiment: str,
    metrics: Sequence[str] | None = None,
    parent_run_id: str | None = None,
) -> pd.DataFrame:
    """One row per finished training run of `experiment` and evaluated epoch (0 = pretrained).

    metrics: the `val/...` keys to include (None: every `val/` metric the runs logged).
    Columns: ID_COLUMNS, each metric, `gain/<m>`, `gain_abs/<m>`, `roi_label/<m>`, `roi_s/<m>`
    (m = the metric's name without `val/`), `has_baseline`.
    """
    client = mlflow_client(tracking_uri)
    runs, skipped = train_runs(tracking_uri, experiment, parent_run_id, with_skipped=True)
    if not runs:
        where = f"sweep {parent_run_id}" if parent_run_id else f"experiment {experiment!r}"
        raise DataError(
            f"{where} in {tracking_uri} has no finished training runs; "
            "run `python train.py tracking.experiment=<name>` first"
        )
    rows = [row for run in runs for row in run_rows(client, run, metrics)]
    if not rows:
        raise DataError(f"the runs of experiment {experiment!r} logged no per-epoch metrics")
    df = pd.DataFrame(rows)
    keys = [
        k
        for k in (metrics or sorted(c for c in df.columns if c.startswith("val/")))
        if k in df.columns
    ]
    derived = [
        f"{p}/{metric_name(k)}" for k in keys for p in ("gain", "gain_abs", "roi_label", "roi_s")
    ]
    for col in derived:
        if col not in df.columns:
            df[col] = math.nan
    ordered = [c for c in ID_COLUMNS if c in df.columns] + keys + derived + ["has_baseline"]
    df = (
        df[ordered]
        .sort_values(
            ["task", "model", "data", "n", "seed", "epochs", "epoch"],
            na_position="last",
            kind="stable",
        )
        .reset_index(drop=True)
    )
    df.attrs["duplicates_skipped"] = skipped
    df.attrs["notes"] = (
        [
            f"{skipped} duplicate run(s) skipped: each (config, seed) counts once, its latest "
            "finished run"
        ]
        if skipped
        else []
    )
    return df


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="finetune-budget-roi", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--experiment", default="finetune-budget", help="MLflow experiment name")
    parser.add_argument(
        "--tracking-uri",
        default=default_uri(),
        help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)",
    )
    parser.add_argument("--metrics", nargs="*", default=None, help="val/... keys (default: all)")
    parser.add_argument("--csv", default=None, help="write the table to this CSV file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        df = roi_table(args.tracking_uri, args.experiment, args.metrics)
    except BudgetError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    for note in df.attrs.get("notes", []):
        sys.stderr.write(f"{note}\n")
    if args.csv:
        df.to_csv(args.csv, index=False)
        sys.stderr.write(f"wrote {len(df)} rows to {args.csv}\n")
    with pd.option_context(
        "display.max_rows", 200, "display.width", 200, "display.float_format", "{:.4g}".format
    ):
        sys.stdout.write(
            df.drop(columns=["parent_run_id", "continued_from"]).to_string(index=False)
        )
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
