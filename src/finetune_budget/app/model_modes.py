"""evaluate.py's modes that load a model: `eval`, a model (pretrained, a run's logged model or
checkpoint) on a held-out split, logged to MLflow as an evaluation run with the same metrics as
training (step 0); `export`, a run's model in its library's format. They import torch, Lightning
and the tasks; app.modes imports this module only when one of them runs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from finetune_budget.app.runs import (
    apply_weights,
    config_of_run,
    load_weights,
    log_model_of_run,
    module_of_run,
    weights_of_run,
)
from finetune_budget.config import resolve_precision
from finetune_budget.errors import ConfigError
from finetune_budget.export.formats import Exported, export_model
from finetune_budget.tasks import build_task
from finetune_budget.training.run import evaluation_run

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate `cfg.model` (or `cfg.checkpoint`) on `cfg.data`'s held-out split; with `run_id`,
    the model that training run logged (or its checkpoint) on the run's own task, model and data.
    """
    checkpoint = cfg.get("checkpoint")
    weights = None
    if cfg.get("run_id"):
        cfg, weights = run_to_evaluate(cfg)
        checkpoint = weights[1]
    tags = {
        "task": cfg.task.name,
        "model": cfg.model.name,
        "data": cfg.data.name,
        "run_type": "evaluation",
        "checkpoint": checkpoint or "pretrained",
    }
    if cfg.get("run_id"):
        tags["evaluated_run_id"] = cfg.run_id
    with evaluation_run(cfg, tags) as run:
        L.seed_everything(cfg.seed, verbose=False)
        parts = build_task(cfg)
        if weights is not None:
            apply_weights(parts.module, weights)  # a logged model or a checkpoint
        elif checkpoint:
            load_weights(parts.module, checkpoint)
        trainer = instantiate(
            cfg.trainer,
            logger=False,
            callbacks=[],
            precision=resolve_precision(
                cfg.trainer.get("precision"), cfg.trainer.get("accelerator")
            ),
        )
        start = time.perf_counter()
        trainer.validate(parts.module, datamodule=parts.datamodule, verbose=False)
        metrics = dict(parts.module.eval_metrics)
        metrics["time/eval_s"] = time.perf_counter() - start
        run.log_metrics(metrics, step=0)
        log.info("evaluation run %s: %s", run.run_id, metrics)
        return metrics


def run_to_evaluate(cfg: DictConfig) -> tuple[DictConfig, tuple[str, str]]:
    """`cfg` with the training run's task, model, data, loss, optim, eval and seed, and where the
    run's weights are (its logged model, else its checkpoint)."""
    run_cfg, run = config_of_run(cfg.tracking.uri, cfg.run_id)
    weights = weights_of_run(run)
    if weights is None:
        raise ConfigError(
            f"run {cfg.run_id} kept no weights (a sweep job, or tracking.save_checkpoint=false); "
            f"`python evaluate.py mode=export run_id={cfg.run_id}` rebuilds and logs them"
        )
    cfg = cfg.copy()
    with open_dict(cfg):
        for key in ("task", "model", "data", "loss", "optim", "eval", "seed"):
            if key in run_cfg:
                cfg[key] = run_cfg[key]
    return cfg, weights


def export_mode(cfg) -> Exported:
    """`python evaluate.py mode=export run_id=<id>`: write the run's model in its library's format
    (export.dir, default <output_dir>/export), log it to the run and register it
    (export.registered_model, default `<experiment>-<task>`)."""
    run_id = cfg.get("run_id")
    if not run_id:
        raise ConfigError("mode=export needs run_id=<id of a training run>; copy it from the UI")
    export_cfg = cfg.get("export") or {}
    run_cfg, _ = config_of_run(cfg.tracking.uri, run_id)
    name = export_cfg.get("registered_model") or (
        f"{run_cfg.tracking.experiment}-{run_cfg.task.name}"
    )
    model_uri = log_model_of_run(cfg.tracking.uri, run_id, name)
    module = module_of_run(cfg.tracking.uri, run_id, rebuild=False)
    folder = export_cfg.get("dir") or str(Path(cfg.paths.output_dir) / "export")
    exported = export_model(module, folder)
    log.info("run %s: %s, registered as %s; files in %s", run_id, model_uri, name, folder)
    return exported
