"""evaluate.py's modes. `eval`: a model (pretrained or a run's checkpoint) on a held-out split,
logged to MLflow as an evaluation run with the same metrics as training (step 0).

Other modes register themselves in MODES (the report, for example).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from finetune_budget.config import resolve_precision
from finetune_budget.errors import ConfigError, ModelError
from finetune_budget.export import apply_weights, config_of_run, export_mode, weights_of_run
from finetune_budget.external_baseline import evaluate_external
from finetune_budget.report import advise_mode, report_mode
from finetune_budget.tasks import build_task
from finetune_budget.tracking.audit import check_mode
from finetune_budget.tracking.mlflow_run import tracked_run
from finetune_budget.training import run_config

log = logging.getLogger(__name__)


def load_weights(module: L.LightningModule, path: str) -> None:
    """Load a checkpoint's weights into `module`; one-line ModelErrors for a file that is not a
    checkpoint, or a checkpoint of another task or model."""
    fix = "give checkpoint=<a .ckpt file train.py saved> or run_id=<its MLflow run>"
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError as e:
        raise ModelError(f"checkpoint {path} not found; {fix}") from e
    except Exception as e:  # noqa: BLE001 - pickle, zip and torch raise many kinds
        raise ModelError(f"checkpoint {path} is not a PyTorch checkpoint; {fix}") from e
    if not isinstance(state, dict):
        raise ModelError(f"checkpoint {path} holds a {type(state).__name__}, not weights; {fix}")
    want = module.hparams.get("model", {}).get("name")
    saved = (state.get("hyper_parameters") or {}).get("model", {})
    saved_name = saved.get("name") if isinstance(saved, dict) else None
    if saved_name is not None and want is not None and saved_name != want:
        raise ModelError(
            f"checkpoint {path} is of model {saved_name!r}, not {want!r}; pass the run's "
            "model= (and task=) options"
        )
    missing, unexpected = module.load_state_dict(state.get("state_dict", state), strict=False)
    if unexpected or missing:
        raise ModelError(
            f"checkpoint {path} does not fit task={type(module).__name__} model={want} "
            f"({len(missing)} missing, {len(unexpected)} unexpected weights); "
            "pass the run's task= and model="
        )


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
    with tracked_run(
        cfg.tracking.uri,
        cfg.tracking.experiment,
        run_config(cfg),
        tags=tags,
        run_name=cfg.tracking.get("run_name"),
    ) as run:
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


MODES: dict[str, Callable[[DictConfig], Any]] = {"eval": evaluate, "report": report_mode}
MODES["export"] = export_mode
MODES["external_baseline"] = evaluate_external
MODES["advise"] = advise_mode
MODES["check"] = check_mode


def run_mode(cfg: DictConfig) -> Any:
    mode = cfg.get("mode", "eval")
    if mode not in MODES:
        raise ConfigError(f"mode={mode} is unknown; use one of {', '.join(sorted(MODES))}")
    return MODES[mode](cfg)
