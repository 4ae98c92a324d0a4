"""Optuna searches driven from Python: one study (sqlite by default, any SQLAlchemy URL such as
postgresql://... for workers on several machines), one MLflow run per trial nested under the
search's parent run, trials pruned per epoch, failures recorded and counted.

    python tune.py hparams_search=lr_batch
    python tune.py hparams_search=budget_pareto        # gain against training seconds: a front
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from hydra.utils import instantiate
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf, open_dict
from optuna.trial import TrialState

from finetune_budget.app.tuning.objectives import Objective, objective_values, objectives_from_cfg
from finetune_budget.app.tuning.pareto import cheapest_at_share, format_rows, pareto_rows
from finetune_budget.app.tuning.pruning import EpochPruning
from finetune_budget.app.tuning.space import apply_overrides, parse_search_space, suggest
from finetune_budget.errors import BudgetError, ConfigError
from finetune_budget.tracking.mlflow_run import experiment_id
from finetune_budget.training.run import train

log = logging.getLogger(__name__)

PARENT_ATTR = "mlflow_parent_run_id"
PRUNERS: dict[str, type[optuna.pruners.BasePruner]] = {
    "none": optuna.pruners.NopPruner,
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
}
# Trials that count towards n_trials (enqueued, WAITING ones do not until a worker starts them).
STARTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
STATE_TAGS = {
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
}


class SearchError(BudgetError):
    """A search that cannot go on (too many failed trials)."""


@dataclass
class SearchResult:
    study: optuna.Study
    parent_run_id: str
    objectives: list[Objective]
    rows: list[dict[str, Any]]  # the best trial, or the Pareto front cheapest first
    counts: dict[str, int]  # trials of the study by state
    worker_trials: list[int] = field(default_factory=list)  # trial numbers this process ran
    cheapest: dict[str, Any] | None = None

    def table(self) -> str:
        return format_rows(self.rows)


# -- settings ------------------------------------------------------------------------------------
def make_pruner(
    name: str | None, kwargs: Mapping[str, Any] | None = None
) -> optuna.pruners.BasePruner:
    key = "none" if name in (None, "null") else str(name)
    if key not in PRUNERS:
        raise ConfigError(f"tune.pruner={name!r} is unknown; use one of {', '.join(PRUNERS)}")
    if key == "none":
        return optuna.pruners.NopPruner()
    try:
        return PRUNERS[key](**dict(kwargs or {}))
    except TypeError as e:
        raise ConfigError(
            f"tune.pruners.{key}={dict(kwargs or {})} does not fit {PRUNERS[key].__name__} "
            f"({e}); fix the keys of tune.pruners.{key}"
        ) from None


def make_storage(
    url: str | None, timeout_s: float = 60.0, heartbeat_interval: int | None = None
) -> optuna.storages.BaseStorage | None:
    """RDBStorage for `url` (None: in memory). sqlite waits up to `timeout_s` for a lock held by
    another worker; server databases check pooled connections before use."""
    if not url:
        return None
    if url.startswith("sqlite"):
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": timeout_s}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
    last: Exception | None = None
    for attempt in range(5):  # two workers creating the tables at once can collide
        try:
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval,
                grace_period=None if heartbeat_interval is None else 2 * heartbeat_interval,
            )
        except Exception as e:  # noqa: BLE001 - retried, then reported
            last = e
            time.sleep(0.5 * (attempt + 1))
    raise ConfigError(
        f"cannot open the Optuna storage {_masked(url)} ({last}); check hydra.sweeper.storage"
    ) from last


def _masked(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL SQLAlchemy cannot parse is shown as it is
        return url


def _directions(sweeper: DictConfig, objectives: Sequence[Objective]) -> list[str]:
    wanted = [o.direction for o in objectives]
    given = sweeper.get("direction")
    if given is not None:
        given_list = [
            str(d).split(".")[-1]
            for d in (
                given if isinstance(given, Sequence) and not isinstance(given, str) else [given]
            )
        ]
        if given_list != wanted:
            raise ConfigError(
                f"hydra.sweeper.direction={given_list} but tune.objectives ask for {wanted}; "
                "make them the same list in the hparams_search config"
            )
    return wanted


def _sampler(sweeper: DictConfig, offset: int) -> optuna.samplers.BaseSampler | None:
    node = sweeper.get("sampler")
    if node is None:
        return None
    spec = OmegaConf.to_container(node, resolve=True)
    if spec.get("seed") is not None:
        spec["seed"] = int(spec["seed"]) + offset
    return instantiate(spec)


# -- the parent run ------------------------------------------------------------------------------
def _create_parent(
    client: MlflowClient,
    cfg: DictConfig,
    study: optuna.Study,
    sweeper: DictConfig,
    objectives: Sequence[Objective],
    storage_url: str,
) -> str:
    exp = experiment_id(client, cfg.tracking.experiment, stale_after_s=cfg.tracking.stale_after_s)
    run = client.create_run(
        exp,
        run_name=f"search-{study.study_name}",
        tags={
            "run_type": "search",
            "study": study.study_name,
            "optuna.storage": _masked(storage_url or ""),
            "objectives": ",".join(f"{o.metric}:{o.direction}" for o in objectives),
            "task": cfg.task.name,
            "model": cfg.model.name,
            "data": cfg.data.name,
        },
    )
    params = {f"search.{k}": str(v) for k, v in (sweeper.get("params") or {}).items()}
    params.update(
        {
            "search.n_trials": sweeper.get("n_trials"),
            "search.sampler": sweeper.get("sampler", {}).get("_target_"),
            "search.pruner": (cfg.get("tune") or {}).get("pruner"),
            "search.max_failure_rate": sweeper.get("max_failure_rate"),
        }
    )
    for key, value in params.items():
        client.log_param(run.info.run_id, key, str(value)[:6000])
    return run.info.run_id


def _parent_run(
    cfg: DictConfig,
    study: optuna.Study,
    created: bool,
    sweeper: DictConfig,
    objectives: Sequence[Objective],
    storage_url: str,
    wait_s: float = 60.0,
) -> tuple[MlflowClient, str]:
    """The study's creator makes the parent run and stores its id in the study; other workers and
    resumed searches find it there (creating the study is the atomic step). Other workers open
    MLflow only then: two processes creating a new sqlite MLflow store at once collide."""
    if created:
        client = MlflowClient(cfg.tracking.uri)
        run_id = _create_parent(client, cfg, study, sweeper, objectives, storage_url)
        study.set_user_attr(PARENT_ATTR, run_id)
        return client, run_id
    deadline = time.monotonic() + wait_s
    while (run_id := study.user_attrs.get(PARENT_ATTR)) is None and time.monotonic() < deadline:
        time.sleep(0.5)
    client = MlflowClient(cfg.tracking.uri)
    if run_id is None:  # the creator died before recording it
        run_id = _create_parent(client, cfg, study, sweeper, objectives, storage_url)
        study.set_user_attr(PARENT_ATTR, run_id)
    else:
        client.update_run(run_id, status="RUNNING")
    return client, run_id


# -- trials --------------------------------------------------------------------------------------
class TrialObjective:
    """Train one trial config; tag its MLflow run with study, trial and state."""

    def __init__(
        self,
        cfg: DictConfig,
        space: Mapping[str, Any],
        fixed: Mapping[str, Any],
        objectives: Sequence[Objective],
        parent_run_id: str,
        study_name: str,
        prune: bool,
    ) -> None:
        self.cfg = cfg
        self.space = space
        self.fixed = fixed
        self.objectives = list(objectives)
        self.parent_run_id = parent_run_id
        self.study_name = study_name
        self.prune = prune
        self.worker = int(cfg.tune.worker)
        self.client = MlflowClient(cfg.tracking.uri)
        self.output_dir = str(cfg.paths.output_dir)
        self.numbers: list[int] = []
        self.errors: dict[int, str] = {}

    def _run_of(self, number: int) -> str | None:
        tracking = self.cfg.tracking
        exp = experiment_id(self.client, tracking.experiment, stale_after_s=tracking.stale_after_s)
        runs = self.client.search_runs(
            [exp],
            f"tags.`mlflow.parentRunId` = '{self.parent_run_id}' and tags.trial = '{number}'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        self.numbers.append(trial.number)
        trial.set_user_attr("worker", self.worker)
        values = {**self.fixed, **suggest(trial, self.space)}
        trial_cfg = apply_overrides(self.cfg, values)
        with open_dict(trial_cfg):
            trial_cfg.pop("hydra", None)  # a composed hydra node does not resolve outside a run
            trial_cfg.paths.output_dir = f"{self.output_dir}/trial_{trial.number}"
            if trial_cfg.tracking.get("run_name") is None:
                trial_cfg.tracking.run_name = f"{self.study_name}-trial-{trial.number}"
        tags = {
            "run_type": "trial",
            "study": self.study_name,
            "trial": str(trial.number),
            "state": "running",
        }
        pruning = EpochPruning(trial, self.objectives[0].metric) if self.prune else None
        log.info("trial %d: %s", trial.number, ", ".join(f"{k}={v}" for k, v in values.items()))
        try:
            result = train(
                trial_cfg,
                parent_run_id=self.parent_run_id,
                callbacks=[pruning] if pruning else None,
                tags=tags,
            )
        except Exception as e:
            message = (
                f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            )
            self.errors[trial.number] = message
            trial.set_user_attr("error", message[:1000])
            run_id = self._run_of(trial.number)
            if run_id is not None:
                trial.set_user_attr("mlflow_run_id", run_id)
                self.client.set_tag(run_id, "state", "failed")
            log.error("trial %d failed: %s", trial.number, message)
            raise
        trial.set_user_attr("mlflow_run_id", result.run_id)
        if pruning is not None and pruning.pruned_epoch is not None:
            self.client.set_tag(result.run_id, "state", "pruned")
            self.client.set_tag(result.run_id, "pruned_epoch", str(pruning.pruned_epoch))
            trial.set_user_attr("pruned_epoch", pruning.pruned_epoch)
            raise optuna.TrialPruned(f"pruned at epoch {pruning.pruned_epoch}")
        out = objective_values(result.history, self.objectives)
        if not all(math.isfinite(v) for v in out):
            message = (
                f"objective {self.objectives[0].metric} has no finite value at a trained "
                "epoch (check tune.objectives)"
            )
            self.errors[trial.number] = message
            trial.set_user_attr("error", message)
            self.client.set_tag(result.run_id, "state", "failed")
            self.client.set_tag(result.run_id, "error", message)
            raise SearchError(message)
        self.client.set_tag(result.run_id, "state", "complete")
        return out[0] if len(out) == 1 else out


class FailureLimit:
    """Optuna callback: stop this worker once its failed share exceeds `max_rate` (checked once
    `min_trials` of its trials have ended)."""

    def __init__(self, objective: TrialObjective, max_rate: float, min_trials: int = 3) -> None:
        self.objective = objective
        self.max_rate = max_rate
        self.min_trials = min_trials
        self.message: str | None = None

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        mine = set(self.objective.numbers)
        done = [
            t
            for t in study.get_trials(deepcopy=False)
            if t.number in mine and t.state.is_finished()
        ]
        failed = [t for t in done if t.state == TrialState.FAIL]
        if failed and len(done) >= self.min_trials and len(failed) / len(done) > self.max_rate:
            first = self.objective.errors.get(failed[0].number, "see the trial's MLflow run")
            self.message = (
                f"search stopped: {len(failed)} of {len(done)} trials failed (more than "
                f"hydra.sweeper.max_failure_rate={self.max_rate}); first error: {first}. Narrow "
                "the search space or raise hydra.sweeper.max_failure_rate"
            )
            study.stop()


# -- results -------------------------------------------------------------------------------------
def _counts(study: optuna.Study) -> dict[str, int]:
    counts = {"complete": 0, "pruned": 0, "failed": 0, "running": 0, "waiting": 0}
    for t in study.get_trials(deepcopy=False):
        name = STATE_TAGS.get(t.state, t.state.name.lower())
        counts[name] = counts.get(name, 0) + 1
    return counts


def _record_results(
    client: MlflowClient,
    parent: str,
    study: optuna.Study,
    objectives: Sequence[Objective],
    target_share: float,
) -> SearchResult:
    counts = _counts(study)
    for state, n in counts.items():
        client.log_metric(parent, f"trials/{state}_n", n)
    rows: list[dict[str, Any]] = []
    cheapest = None
    if counts["complete"]:
        rows = pareto_rows(study, objectives)
        client.log_text(parent, format_rows(rows) + "\n", "best_trials.txt")
        client.log_dict(
            parent,
            {"objectives": [o.__dict__ for o in objectives], "rows": rows},
            "best_trials.json",
        )
        if len(objectives) == 1:
            best = study.best_trial
            tags = {"best_trial": str(best.number)}
            tags["best_run_id"] = best.user_attrs.get("mlflow_run_id", "")
            tags.update({f"best.{key}": str(value) for key, value in best.params.items()})
            _set_parent_tags(client, parent, tags)
            client.log_metric(parent, f"best/{objectives[0].metric}", float(best.value))
        else:
            client.set_tag(parent, "pareto_trials", ",".join(str(r["trial"]) for r in rows))
            cheapest = cheapest_at_share(rows, target_share)
            if cheapest is not None:
                client.set_tag(parent, "cheapest_trial", str(cheapest["trial"]))
                client.set_tag(parent, "cheapest_share", f"{target_share:g}")
                for o in objectives:
                    client.log_metric(parent, f"cheapest/{o.metric}", float(cheapest[o.metric]))
    return SearchResult(study, parent, list(objectives), rows, counts, cheapest=cheapest)


def _set_parent_tags(client: MlflowClient, parent: str, tags: dict[str, str]) -> None:
    """The parent run's tags, written again once where another worker of the same study wrote
    the same new tag at the same moment (PostgreSQL: a unique violation); both write the
    study's own best trial, so the values agree."""
    for attempt in range(3):
        try:
            for key, value in tags.items():
                client.set_tag(parent, key, value)
            return
        except MlflowException:
            if attempt == 2:
                raise
            time.sleep(0.5 + attempt)


# -- the search ----------------------------------------------------------------------------------
def run_search(cfg: DictConfig, sweeper: DictConfig | None = None) -> SearchResult:
    """Run (or resume, or join) the search that `cfg` (train.yaml + hparams_search=...) describes.

    sweeper: the `hydra.sweeper` node (default: cfg.hydra.sweeper, else the running Hydra app's).
    """
    if sweeper is None:
        sweeper = cfg.get("hydra", {}).get("sweeper") if "hydra" in cfg else None
    if sweeper is None:
        from hydra.core.hydra_config import HydraConfig

        sweeper = HydraConfig.get().sweeper if HydraConfig.initialized() else None
    tune = cfg.get("tune")
    if tune is None or sweeper is None or not sweeper.get("params"):
        raise ConfigError(
            "no search space; run `python tune.py hparams_search=lr_batch` (or "
            "another config in conf/hparams_search/)"
        )
    objectives = objectives_from_cfg(cfg)
    directions = _directions(sweeper, objectives)
    space, fixed = parse_search_space(sweeper.params)
    probe = {**fixed, **{k: _probe(d) for k, d in space.items()}}
    apply_overrides(cfg, probe)  # unknown keys fail now, not in every trial
    pruner_name = tune.get("pruner")
    prune = pruner_name not in (None, "none", "null")
    if prune and len(objectives) > 1:
        raise ConfigError(
            "Optuna prunes single-objective searches only; set tune.pruner=none for "
            f"the {len(objectives)} objectives in tune.objectives"
        )
    storage_url = sweeper.get("storage")
    storage = make_storage(storage_url, float(tune.sqlite_timeout_s), tune.heartbeat_interval_s)
    study_name = sweeper.get("study_name") or "finetune-budget"
    pruner = make_pruner(pruner_name, (tune.get("pruners") or {}).get(str(pruner_name)))
    created = True
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=study_name,
            directions=directions,
            pruner=pruner,
            load_if_exists=False,
        )
    except optuna.exceptions.DuplicatedStudyError:
        created = False
        study = optuna.load_study(study_name=study_name, storage=storage, pruner=pruner)
        if [d.name.lower() for d in study.directions] != directions:
            raise ConfigError(
                f"study {study_name!r} in {_masked(storage_url)} has directions "
                f"{[d.name.lower() for d in study.directions]}, not {directions}; pick another "
                "hydra.sweeper.study_name"
            ) from None
    n_before = len(study.get_trials(deepcopy=False, states=STARTED))
    study.sampler = _sampler(sweeper, 1000 * int(tune.worker) + n_before) or study.sampler
    client, parent = _parent_run(cfg, study, created, sweeper, objectives, storage_url or "")
    for params in tune.get("enqueue") or []:
        study.enqueue_trial(dict(params), skip_if_exists=True)
    objective = TrialObjective(cfg, space, fixed, objectives, parent, study_name, prune)
    n_trials = int(sweeper.n_trials)
    limit = FailureLimit(objective, float(sweeper.max_failure_rate), min_trials=min(3, n_trials))
    remaining = n_trials - n_before
    log.info(
        "study %s (%s): %d trials so far, %d to run; parent MLflow run %s",
        study_name,
        _masked(storage_url or "in memory"),
        n_before,
        max(remaining, 0),
        parent,
    )
    if remaining > 0:
        total = optuna.study.MaxTrialsCallback(n_trials, states=STARTED)  # all workers together
        try:
            study.optimize(
                objective,
                n_trials=remaining,
                callbacks=[total, limit],
                catch=(Exception,),
                gc_after_trial=True,
            )
        except KeyboardInterrupt:
            client.set_terminated(parent, "KILLED")
            raise
    result = _record_results(client, parent, study, objectives, float(tune.target_share))
    result.worker_trials = list(objective.numbers)
    if limit.message is not None:
        client.set_tag(parent, "error", limit.message[:5000])
        client.set_terminated(parent, "FAILED")
        raise SearchError(limit.message)
    client.set_terminated(parent, "FINISHED")
    return result


def _probe(dist: optuna.distributions.BaseDistribution) -> Any:
    """A value of `dist` (to check the config keys before the first trial)."""
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return dist.choices[0]
    return dist.low  # Int/FloatDistribution


__all__ = ["SearchError", "SearchResult", "make_pruner", "make_storage", "run_search"]
