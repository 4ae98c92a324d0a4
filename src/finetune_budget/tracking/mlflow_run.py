"""One MLflow run per training job: params = the flattened resolved config, tags, versions, status.

A run that raises is marked FAILED with its error as the tag `error`; Ctrl-C marks it KILLED.
Each run records the host and process that write it (tags `host`, `pid`, `pid_started`); a run
left RUNNING by a process that is gone (`kill -9`, a crash, a lost node) is marked KILLED with an
`error` tag the next time the project opens its experiment (mark_stale_runs).
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from finetune_budget.config import flatten, installed_versions
from finetune_budget.errors import one_line

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
    """Versions of Python and the packages a run's results depend on."""
    return {"python": platform.python_version(), **installed_versions(VERSIONED_PACKAGES)}


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
        self.log_steps({step: metrics})

    def log_steps(
        self, steps: Mapping[int, Mapping[str, float]], tags: Mapping[str, Any] | None = None
    ) -> None:
        """Metrics of several steps (epochs), and `tags`, in as few MLflow calls as its batch
        limits allow (one where they fit)."""
        if not self.writer:
            return
        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, int(step))
            for step, metrics in steps.items()
            for k, v in metrics.items()
        ]
        labels = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        if labels and len(labels) <= BATCH and len(items) + len(labels) <= 1000:
            self.client.log_batch(self.run_id, metrics=items, tags=labels)
            return
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])
        self.set_tags(tags or {})

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


_READY_STORES: set[str] = set()


def mlflow_client(tracking_uri: str) -> MlflowClient:
    """An MlflowClient whose store is ready. A sqlite store is opened the first time (in this
    process) under a lock file beside it (`<db>.lock`), so parallel sweeps on a new store do not
    race creating or upgrading its tables; later clients reuse MLflow's cached store."""
    if not tracking_uri.startswith("sqlite:///") or tracking_uri in _READY_STORES:
        return MlflowClient(tracking_uri)
    db = Path(tracking_uri.removeprefix("sqlite:///")).expanduser()
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        fcntl = None
    with open(f"{db}.lock", "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client = MlflowClient(tracking_uri)  # creates (or upgrades) the tables
        finally:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_UN)
    _READY_STORES.add(tracking_uri)
    return client


def experiment_id(client: MlflowClient, name: str, *, stale_after_s: float | None) -> str:
    """The experiment's id, created as a model-training experiment when new (an existing one
    without a kind gets it; a kind set in the UI is kept); its runs left RUNNING by dead processes
    are marked (mark_stale_runs; stale_after_s: tracking.stale_after_s)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        if EXPERIMENT_KIND_TAG not in experiment.tags:
            client.set_experiment_tag(
                experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
            )
        mark_stale_runs(client, experiment.experiment_id, stale_after_s)
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


def _process_started(pid: int) -> str | None:
    """`<boot id>:<start time in clock ticks>` of a process (Linux), to tell a reused pid apart."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return f"{boot}:{fields[19]}"  # field 22 of stat; fields[0] is field 3 (the state)
    except (OSError, IndexError):
        return None


def process_tags() -> dict[str, str]:
    """host, pid and pid_started of the process writing a run."""
    tags = {"host": socket.gethostname(), "pid": str(os.getpid())}
    started = _process_started(os.getpid())
    if started is not None:
        tags["pid_started"] = started
    return tags


def process_alive(pid: int, started: str | None = None) -> bool:
    """Whether process `pid` of this host runs (and is the one that started at `started`)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):  # a zombie: it has exited
                return False
    except (OSError, IndexError):
        pass
    if started is not None:
        now = _process_started(pid)
        return now is None or now == started
    return True


def why_stale(run: Any, stale_after_s: float | None, now_s: float | None = None) -> str | None:
    """Why a RUNNING run is dead (None: it may still be running)."""
    tags = run.data.tags
    host, pid = tags.get("host"), tags.get("pid")
    if host == socket.gethostname() and pid and pid.isdigit():
        if not process_alive(int(pid), tags.get("pid_started")):
            return f"its process {pid} on {host} is gone (killed or crashed)"
        return None
    age_s = (now_s or time.time()) - run.info.start_time / 1000
    if stale_after_s is None or age_s <= stale_after_s:
        return None
    where = f"on {host}" if host else "on an unknown host"
    return (
        f"it started {age_s / 3600:.1f} h ago {where}, more than tracking.stale_after_s="
        f"{stale_after_s:g}"
    )


def mark_stale_runs(client: MlflowClient, exp_id: str, stale_after_s: float | None) -> list[str]:
    """Mark the experiment's RUNNING runs whose process is gone KILLED, with an `error` tag.

    A run of this host is stale when its process (pid, and its start time) no longer runs; a run
    of another host only when it started more than `stale_after_s` ago. Returns their ids.
    """
    try:
        running = client.search_runs([exp_id], "attributes.status = 'RUNNING'", max_results=1000)
    except mlflow.exceptions.MlflowException as e:
        log.debug("could not look for stale runs: %s", e)
        return []
    marked = []
    for run in running:
        reason = why_stale(run, stale_after_s)
        if reason is None:
            continue
        run_id = run.info.run_id
        client.set_tag(run_id, "error", f"marked KILLED: {reason}")
        client.set_terminated(run_id, "KILLED")
        log.warning("run %s was left RUNNING; marked KILLED: %s", run_id, reason)
        marked.append(run_id)
    return marked


RUN_ID_ENV = "FINETUNE_BUDGET_RUN_ID"


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {one_line(error)}"[:5000]


@contextmanager
def tracked_run(
    tracking_uri: str,
    experiment: str,
    config: Mapping[str, Any],
    *,
    stale_after_s: float | None,
    tags: Mapping[str, Any] | None = None,
    run_name: str | None = None,
    config_yaml: str | None = None,
    main_process: bool = True,
) -> Iterator[TrackedRun]:
    """Create a run, log params/tags/config/versions, and set its final status on exit.
    stale_after_s: tracking.stale_after_s (experiment_id marks runs left RUNNING).

    main_process: False in the extra processes (global ranks 1..) of a multi-process run
    (`distributed.is_main_process`): they create no run and write nothing, under Lightning's
    launcher, torchrun and srun alike. Ranks that Lightning's launcher starts inherit rank 0's
    run id (RUN_ID_ENV); others get None.
    """
    if not main_process:  # not even the store is opened (a new sqlite file: rank 0 creates it)
        yield TrackedRun(None, os.environ.get(RUN_ID_ENV), "", tracking_uri, writer=False)
        return
    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow_client(tracking_uri)
    exp_id = experiment_id(client, experiment, stale_after_s=stale_after_s)
    all_tags = {f"versions.{k}": v for k, v in package_versions().items()}
    all_tags["command"] = " ".join(sys.argv)[:5000]
    all_tags.update(process_tags())
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
