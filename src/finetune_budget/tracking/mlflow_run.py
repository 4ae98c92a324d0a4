"""One MLflow run per training job: params = the flattened resolved config, tags, versions, status.

A run that raises is marked FAILED with its error as the tag `error`; Ctrl-C marks it KILLED.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from finetune_budget.config import flatten

log = logging.getLogger(__name__)

VERSIONED_PACKAGES = (
    "finetune-budget",
    "torch",
    "transformers",
    "lightning",
    "torchmetrics",
    "open_clip_torch",
    "timm",
    "mlflow",
    "optuna",
    "hydra-core",
)
MAX_PARAM_CHARS = 6000
BATCH = 100  # MLflow's limit of params (and tags) per log_batch call


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


@dataclass
class TrackedRun:
    client: MlflowClient | None  # None in the extra processes of a multi-process run
    run_id: str | None  # None in the extra processes of a multi-process run (not launched by us)
    experiment_id: str
    tracking_uri: str
    history: list[dict[str, float]] = field(default_factory=list)
    # False in the extra processes of a multi-device run: they share rank 0's run and write nothing
    writer: bool = True

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.writer:
            return
        import time

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.writer:
            return
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), BATCH):
            self.client.log_batch(self.run_id, tags=items[i : i + BATCH])


def artifact_location(tracking_uri: str) -> str | None:
    """For a sqlite store, artifacts go beside the database file (`mlartifacts/`), not into
    whatever directory a run happens to start in; other stores keep MLflow's default."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri.removeprefix("sqlite:///")).expanduser().resolve()
    return (db.parent / "mlartifacts").as_uri()


# MLflow 3's experiment type: "custom_model_development" is the UI's "Machine learning" kind, which
# opens on the runs table (untagged experiments may open on the GenAI traces page).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created as a model-training experiment when missing; an
    existing experiment without a kind gets it (a kind set in the UI is kept)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        if EXPERIMENT_KIND_TAG not in experiment.tags:
            client.set_experiment_tag(
                experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
            )
        return experiment.experiment_id
    try:
        return client.create_experiment(
            name,
            artifact_location=artifact_location(client.tracking_uri),
            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
        )
    except mlflow.exceptions.MlflowException:  # created meanwhile by a parallel job
        return client.get_experiment_by_name(name).experiment_id


def ui_addresses(tracking_uri: str, base: str = "http://127.0.0.1:5000") -> list[str]:
    """`<name>: <runs-table address>` for each experiment of the store (for `make ui`): MLflow
    3.17's UI opens a new browser on its GenAI pages unless the address asks for model training."""
    try:
        experiments = MlflowClient(tracking_uri).search_experiments()
    except Exception:  # noqa: BLE001 - no store yet: nothing to list
        return []
    return [
        f"{e.name}: {base}/#/experiments/{e.experiment_id}/runs?workflowType=machine_learning"
        for e in experiments
        if e.name != "Default"
    ]


RUN_ID_ENV = "FINETUNE_BUDGET_RUN_ID"


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:5000]


@contextmanager
def tracked_run(
    tracking_uri: str,
    experiment: str,
    config: Mapping[str, Any],
    tags: Mapping[str, Any] | None = None,
    run_name: str | None = None,
    config_yaml: str | None = None,
    main_process: bool = True,
) -> Iterator[TrackedRun]:
    """Create a run, log params/tags/config/versions, and set its final status on exit.

    main_process: False in the extra processes (global ranks 1..) of a multi-process run
    (`distributed.is_main_process`): they create no run and write nothing, under Lightning's
    launcher, torchrun and srun alike. Ranks that Lightning's launcher starts inherit rank 0's
    run id (RUN_ID_ENV); others get None.
    """
    if not main_process:  # not even the store is opened (a new sqlite file: rank 0 creates it)
        yield TrackedRun(None, os.environ.get(RUN_ID_ENV), "", tracking_uri, writer=False)
        return
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    exp_id = experiment_id(client, experiment)
    all_tags = {f"versions.{k}": v for k, v in package_versions().items()}
    all_tags["command"] = " ".join(sys.argv)[:5000]
    all_tags.update(tags or {})
    run = client.create_run(
        exp_id, run_name=run_name, tags={k: str(v) for k, v in all_tags.items()}
    )
    tracked = TrackedRun(client, run.info.run_id, exp_id, tracking_uri)
    os.environ[RUN_ID_ENV] = tracked.run_id  # inherited by the ranks Lightning launches
    params = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in flatten(config).items()]
    for i in range(0, len(params), BATCH):
        client.log_batch(tracked.run_id, params=params[i : i + BATCH])
    if config_yaml is not None:
        client.log_text(tracked.run_id, config_yaml, "config.yaml")
    try:
        yield tracked
    except (KeyboardInterrupt, SystemExit) as e:
        client.set_tag(tracked.run_id, "error", f"interrupted ({type(e).__name__})")
        client.set_terminated(tracked.run_id, "KILLED")
        raise
    except BaseException as e:
        client.set_tag(tracked.run_id, "error", _one_line(e))
        client.set_terminated(tracked.run_id, "FAILED")
        raise
    else:
        client.set_terminated(tracked.run_id, "FINISHED")
