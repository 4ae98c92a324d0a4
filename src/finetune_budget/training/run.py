"""train(cfg): one budget-study run, start to finish, as a plain function tests call.

reuse a finished run of the same point, or: open the MLflow run -> build the task, tracker,
continuation and trainer -> epoch 0 (the pretrained model, cached across runs) -> fit for
trainer.max_epochs, evaluating after every epoch -> save the state and checkpoint -> summarise
-> keep or log the model. The MLflow run gets params, per-epoch metrics, gains and ROI.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from finetune_budget.config import resolve_precision
from finetune_budget.distributed import is_main_process
from finetune_budget.export.logged import check_log_model_option, log_model, model_params
from finetune_budget.speed import reuse, switches
from finetune_budget.tasks import TaskParts, build_task
from finetune_budget.tracking.mlflow_run import TrackedRun, tracked_run
from finetune_budget.tracking.parent import current_parent
from finetune_budget.tracking.resume import (
    POINT_TAG,
    point_key,
    reusable_run,
    save_checkpoint_atomically,
)
from finetune_budget.training.baseline_cache import BaselineCache, baseline_key, weights_digest
from finetune_budget.training.continuation import Continuation
from finetune_budget.training.tracker import BudgetTracker

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_id: str
    history: list[dict[str, float]]
    checkpoint: str | None = None
    objects: dict[str, Any] = field(default_factory=dict)
    reused: bool = False  # a finished run of the same point, not trained again (resume.py)

    def best(self, metric: str) -> float:
        values = [row[metric] for row in self.history if metric in row]
        return max(values) if values else float("nan")


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as logged: everything except Hydra's own node."""
    return {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"}


def default_run_name(cfg: DictConfig) -> str:
    """`minilm-l6 n=500 e=3 s=0`: a sweep's runs told apart in the MLflow UI at a glance (MLflow's
    random names repeat across a sweep's jobs, which all seed Python's RNG the same)."""
    return f"{cfg.model.name} n={cfg.data.n} e={cfg.trainer.max_epochs} s={cfg.seed}"


def run_tags(cfg: DictConfig) -> dict[str, str]:
    return {
        "task": cfg.task.name,
        "model": cfg.model.name,
        "data": cfg.data.name,
        "run_type": "train",
    }


def _instantiate_group(group: DictConfig | None) -> list[Any]:
    if not group:
        return []
    return [
        instantiate(node) for node in group.values() if node is not None and "_target_" in node
    ]


def build_trainer(
    cfg: DictConfig,
    tracker: BudgetTracker,
    run: TrackedRun,
    extra: list[L.Callback],
    plugins: list[Any] | None = None,
) -> L.Trainer:
    loggers = []
    # ranks 1.. of a multi-process run get no logger: MLFlowLogger opens the store when created
    for node in (cfg.get("logger") or {}).values() if run.writer else ():
        if node is not None and "_target_" in node:
            loggers.append(instantiate(node, run_id=run.run_id))
    precision = resolve_precision(cfg.trainer.get("precision"), cfg.trainer.get("accelerator"))
    callbacks = _instantiate_group(cfg.get("callbacks"))
    if not loggers:  # the learning-rate monitor writes through a logger
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    return instantiate(
        cfg.trainer,
        callbacks=[tracker, *callbacks, *extra],
        logger=loggers or False,
        precision=precision,
        plugins=plugins or None,
    )


def train(
    cfg: DictConfig,
    parent_run_id: str | None = None,
    callbacks: list[L.Callback] | None = None,
    tags: dict[str, str] | None = None,
) -> RunResult:
    """Run one job of the study described by `cfg` (a composed `conf/train.yaml`).

    callbacks: extra Lightning callbacks (an Optuna pruner, say) added to the configured ones.
    tags: extra MLflow tags set when the run is created (a search's study and trial number).
    A point (config, seed, package version) with a FINISHED run is reused, not trained again,
    unless budget.rerun=true or extra callbacks (a pruner) must see the epochs.
    """
    switches.configure(cfg.get("speed"))  # the fast paths this job takes (speed/switches.py)
    config = run_config(cfg)
    main_process = is_main_process(cfg.trainer)
    if not main_process:  # ranks 1.. of a multi-process run: rank 0 reports and records
        logging.getLogger("finetune_budget").setLevel(logging.WARNING)
    tags = {**run_tags(cfg), **(tags or {}), POINT_TAG: point_key(config)}
    found = reused_run(cfg, tags, parent_run_id, callbacks)
    if found is not None:
        return found
    in_sweep = parent_run_id is not None
    with open_run(cfg, config, tags, parent_run_id, main_process) as run:
        parts, tracker, cont, trainer = build(cfg, config, run, callbacks)
        epoch_zero(cfg, trainer, parts, tracker, run, cont)
        fit(cfg, trainer, parts, cont)
        checkpoint = save_checkpoint(cfg, trainer, run, in_sweep)
        summarise(cfg, run, tracker.history)
        keep_model(cfg, run, parts.module, tracker.history, parent_run_id, checkpoint)
        return RunResult(
            run.run_id,
            tracker.history,
            checkpoint,
            {"trainer": trainer, "module": parts.module, "datamodule": parts.datamodule},
        )


def reused_run(
    cfg: DictConfig,
    tags: dict[str, str],
    parent_run_id: str | None,
    callbacks: list[L.Callback] | None,
) -> RunResult | None:
    """The FINISHED run of the same point (tags[POINT_TAG]), when it may stand for this job: not
    with budget.rerun=true, extra callbacks, or a run_type other than train."""
    if callbacks or cfg.budget.rerun or tags["run_type"] != "train":
        return None
    found = reusable_run(cfg.tracking.uri, cfg.tracking.experiment, tags[POINT_TAG], parent_run_id)
    return None if found is None else RunResult(*found, reused=True)


def open_run(
    cfg: DictConfig,
    config: dict[str, Any],
    tags: dict[str, str],
    parent_run_id: str | None,
    main_process: bool,
):
    """The job's MLflow run (a child of `parent_run_id` when given), as a context manager."""
    if parent_run_id:
        tags = {**tags, "mlflow.parentRunId": parent_run_id}
    return tracked_run(
        cfg.tracking.uri,
        cfg.tracking.experiment,
        config,
        tags=tags,
        run_name=cfg.tracking.get("run_name") or default_run_name(cfg),
        config_yaml=OmegaConf.to_yaml(config),
        main_process=main_process,
        stale_after_s=cfg.tracking.stale_after_s,
    )


def evaluation_run(cfg: DictConfig, tags: dict[str, str], run_name: str | None = None):
    """A run that is not a training job (mode=eval, the external baseline) in the config's
    store and experiment, its config logged; named tracking.run_name, else `run_name`."""
    return tracked_run(
        cfg.tracking.uri,
        cfg.tracking.experiment,
        run_config(cfg),
        stale_after_s=cfg.tracking.stale_after_s,
        tags=tags,
        run_name=cfg.tracking.get("run_name") or run_name,
    )


def build(
    cfg: DictConfig,
    config: dict[str, Any],
    run: TrackedRun,
    callbacks: list[L.Callback] | None,
) -> tuple[TaskParts, BudgetTracker, Continuation, L.Trainer]:
    """The task's module and data, the budget tracker, the continuation of a shorter run (if
    any) and the Lightning trainer, seeded by `cfg.seed`."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    parts = build_task(cfg)
    tracker = BudgetTracker(
        run,
        parts.n_train,
        gain_floor=cfg.budget.gain_floor,
        max_train_s=cfg.budget.get("max_train_s"),
    )
    cont = Continuation(cfg, config, tracker, run)
    trainer = build_trainer(
        cfg, tracker, run, [*(callbacks or []), *cont.callbacks], plugins=cont.plugins
    )
    return parts, tracker, cont, trainer


def epoch_zero(
    cfg: DictConfig,
    trainer: L.Trainer,
    parts: TaskParts,
    tracker: BudgetTracker,
    run: TrackedRun,
    cont: Continuation,
) -> None:
    """The pretrained model's metrics: evaluated (or from the baseline cache), or brought back
    by the state this job continues (logged by ContinuationState)."""
    if cont.source is None:
        evaluate_baseline(cfg, trainer, parts, tracker, run)
    else:
        log.info("epoch 0: from the state of run %s", cont.source.run_id)


def fit(cfg: DictConfig, trainer: L.Trainer, parts: TaskParts, cont: Continuation) -> None:
    """trainer.max_epochs of fine-tuning (from the continued state, if any); the state saved for
    a longer job to continue."""
    # rank r draws its own dropout, augmentation and masking (nanoGPT's seed_offset); the
    # epoch's item order is shared and split across ranks by the DataModule
    L.seed_everything(cfg.seed + trainer.global_rank, workers=True, verbose=False)
    trainer.fit(parts.module, datamodule=parts.datamodule, ckpt_path=cont.ckpt_path)
    if trainer.interrupted:
        raise KeyboardInterrupt("training interrupted")
    cont.save(trainer)


def save_checkpoint(
    cfg: DictConfig, trainer: L.Trainer, run: TrackedRun, in_sweep: bool
) -> str | None:
    """The final weights as `last.ckpt` where tracking.save_checkpoint keeps them (its path as
    the run's `checkpoint` tag); None otherwise."""
    if not keep_weights(cfg.tracking, "save_checkpoint", in_sweep):
        return None
    path = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    save_checkpoint_atomically(trainer, path, weights_only=True)
    checkpoint = str(path.resolve())
    run.set_tags({"checkpoint": checkpoint})
    return checkpoint


def keep_model(
    cfg: DictConfig,
    run: TrackedRun,
    module: L.LightningModule,
    history: list[dict[str, float]],
    parent_run_id: str | None,
    checkpoint: str | None,
) -> None:
    """The model, where a later step needs it: kept in memory for the sweep's end to log (no
    checkpoint written), and logged to MLflow where tracking.log_model says so."""
    if run.writer and checkpoint is None and logged_at_sweep_end(cfg, parent_run_id):
        max_mb = cfg.tracking.sweep_weights_mb
        reuse.keep_final_weights(run.run_id, module, max_mb)
    if run.writer and keep_weights(cfg.tracking, "log_model", parent_run_id is not None):
        log_run_model(cfg, run.run_id, module, history)


def keep_weights(tracking: DictConfig, key: str, in_sweep: bool) -> bool:
    """tracking.save_checkpoint / tracking.log_model: `auto` = single runs only, not the jobs of
    a sweep or search (their chosen run is logged at the sweep's end); true; false."""
    option = check_log_model_option(tracking.get(key, "auto"), f"tracking.{key}")
    return option == "true" or (option == "auto" and not in_sweep)


def log_run_model(
    cfg: DictConfig, run_id: str, module: L.LightningModule, history: list[dict[str, float]]
) -> str | None:
    """Log the run's model to MLflow, linked to its last epoch's metrics, with the budget it was
    trained on."""
    try:
        return log_model(
            cfg.tracking.uri,
            run_id,
            module,
            int(history[-1]["epoch"]) if history else 0,
            model_params(cfg, run_id),
            registered_name=cfg.tracking.get("registered_model"),
        )
    except Exception as e:  # noqa: BLE001 - the run itself is done; keep it FINISHED
        log.warning("the run's model was not logged to MLflow: %s: %s", type(e).__name__, e)
        MlflowClient(cfg.tracking.uri).set_tag(run_id, "log_model.error", f"{e}"[:5000])
        return None


def evaluate_baseline(
    cfg: DictConfig, trainer: L.Trainer, parts, tracker: BudgetTracker, run: TrackedRun
) -> None:
    """Epoch 0: from the cache when the same model, split and settings were evaluated before.

    Only an evaluation that embedded every held-out item is stored (not one cut short by
    trainer.limit_val_batches)."""
    cache = BaselineCache(cfg.paths.cache_dir) if cfg.eval.cache_baseline else None
    key = hit = None
    if cache is not None:
        key = baseline_key(
            cfg.task.name,
            OmegaConf.to_container(cfg.model, resolve=True),
            OmegaConf.to_container(cfg.data, resolve=True),
            OmegaConf.to_container(cfg.eval, resolve=True),
            {
                "precision": str(trainer.precision),
                "accelerator": type(trainer.accelerator).__name__,
                "limit_val_batches": trainer.limit_val_batches,
            },
            cfg.seed if parts.baseline_depends_on_seed else None,
            weights=weights_digest(parts.module),
        )
        hit = cache.get(key)
    if hit is not None:
        log.info("epoch 0: pretrained metrics from the baseline cache (%s)", key)
        tracker.record(0, hit["metrics"], hit["eval_s"])
        tracker.baseline_tags = {"baseline_cached": "true", "baseline_key": key}
        run.set_tags(tracker.baseline_tags)
        return
    trainer.validate(parts.module, datamodule=parts.datamodule, verbose=False)
    seen, total = tracker.eval_items_seen, tracker.eval_items_total
    if cache is not None and trainer.is_global_zero:  # only rank 0 records history rows
        if tracker.eval_complete:
            cache.put(key, parts.module.eval_metrics, tracker.history[0]["time/eval_s"])
        else:
            log.info("epoch 0 embedded %d of %s held-out items: not cached", seen, total)
    tracker.baseline_tags = {
        "baseline_cached": "false",
        "baseline_key": str(key),
        "baseline_items": f"{seen}/{total}",
    }
    run.set_tags(tracker.baseline_tags)


def summarise(cfg: DictConfig, run: TrackedRun, history: list[dict[str, float]]) -> None:
    """Run-level summary metrics: the best epoch of the budget metric and its ROI."""
    metric = cfg.budget.metric
    trained = [r for r in history if r["epoch"] > 0 and metric in r]
    if not trained:
        return
    best = max(trained, key=lambda r: r[metric])
    name = metric.split("/", 1)[-1]
    summary = {
        f"best/{name}": best[metric],
        "best/epoch": best["epoch"],
        f"best/gain_{name}": best.get(f"gain/{name}", float("nan")),
        "time/total_train_s": history[-1]["time/train_s"],
    }
    run.log_metrics(summary, step=int(best["epoch"]))


def logged_at_sweep_end(cfg, parent_run_id: str | None) -> bool:
    """Whether the sweep this job runs in logs a chosen run's model at its end: a `-m` sweep's
    parent (app.sweep_parent) with tracking.log_model=auto. (An Optuna search logs none.)"""
    option = check_log_model_option(cfg.tracking.log_model)
    return parent_run_id is not None and parent_run_id == current_parent() and option == "auto"
