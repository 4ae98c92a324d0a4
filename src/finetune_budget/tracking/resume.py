"""Resume by default: a job whose point already has a FINISHED run in the experiment is not trained
again; the finished run is reused.

    python train.py -m data.n=100,500 trainer.max_epochs=1..3   # again: only what is missing
    python train.py data.n=500 budget.rerun=true                # train this point again anyway

A point is the resolved config without bookkeeping keys (where runs are stored and named,
progress bars, ...: the roles in identity.py), plus this package's version. Each training run
carries its hash as the tag `point_key`; the config part alone (`config_key`, computed from a
run's params so older runs have it too) is what the ROI table deduplicates on: each (config,
seed) counts once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from finetune_budget import __version__, identity
from finetune_budget.tracking.history import read_epochs

log = logging.getLogger(__name__)

POINT_TAG = "point_key"
REUSED_TAG_PREFIX = "reused_in."  # + a sweep parent's run id: the run counted in that sweep


def config_key(params: Mapping[str, Any]) -> str:
    """A hash of a run's flattened config (or logged params) over the point's keys: without
    bookkeeping keys (identity.py)."""
    return identity.config_key(params)


def point_key(config: Mapping[str, Any], version: str = __version__) -> str:
    """config_key of the resolved run config, with the package version and the fingerprints of
    the data and model files it names (an edited CSV is a new point): what resume looks up."""
    return identity.point_key(config, version)


def finished_run(client: Any, experiment_id: str, key: str) -> Any | None:
    """The latest FINISHED training run of `key` in the experiment (pruned trials excluded)."""
    runs = client.search_runs(
        [experiment_id],
        f"tags.{POINT_TAG} = '{key}' and tags.run_type = 'train' "
        "and attributes.status = 'FINISHED'",
        max_results=50,
        order_by=["attributes.end_time DESC"],
    )
    for run in runs:
        if run.data.tags.get("state") != "pruned":
            return run
    return None


# Per-epoch keys the BudgetTracker logs at step = epoch (Lightning's own logger writes other keys,
# such as train/loss and epoch, at step = global step).
EPOCH_PREFIXES = ("val/", "probe/", "time/", "data/", "gain/", "gain_abs/", "roi_label/", "roi_s/")


def history_of(client: Any, run: Any) -> list[dict[str, float]]:
    """A finished run's per-epoch rows (step = epoch) as train() returns them."""
    try:
        last = int(run.data.params.get("trainer.max_epochs", ""))
    except ValueError:
        last = None
    keys = [k for k in run.data.metrics if k.startswith(EPOCH_PREFIXES)]
    keys = [k for k in keys if k != "time/total_train_s"]
    by_step = read_epochs(client, run.info.run_id, keys, max_step=last)
    return [{**by_step[step], "epoch": step} for step in sorted(by_step)]


def reusable_run(
    tracking_uri: str, experiment: str, key: str, parent_run_id: str | None = None
) -> tuple[str, list[dict[str, float]], str | None] | None:
    """(run id, per-epoch rows, checkpoint) of the point's finished run, or None: train it."""
    from finetune_budget.tracking.mlflow_run import mlflow_client

    client = mlflow_client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None or found.lifecycle_stage == "deleted":
        return None
    run = finished_run(client, found.experiment_id, key)
    if run is None:
        return None
    history = history_of(client, run)
    if not any(row["epoch"] > 0 for row in history):
        return None
    mark_reused(client, run.info.run_id, parent_run_id)
    log.debug("reused run %s: this point (%s) finished before", run.info.run_id, key)
    return run.info.run_id, history, run.data.tags.get("checkpoint")


def mark_reused(client: Any, run_id: str, parent_run_id: str | None) -> None:
    """Count a reused run in the running sweep (its report and its 'N of M points reused')."""
    if parent_run_id:
        client.set_tag(run_id, f"{REUSED_TAG_PREFIX}{parent_run_id}", "true")


def save_checkpoint_atomically(trainer: Any, path: str | Path, **kwargs: Any) -> Path:
    """trainer.save_checkpoint into a temporary file beside `path`, then renamed onto it: a write
    that fails (a full disk) leaves the earlier checkpoint at `path` whole, and no partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        trainer.save_checkpoint(tmp, **kwargs)
        if trainer.is_global_zero:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
