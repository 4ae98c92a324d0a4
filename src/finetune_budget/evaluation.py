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
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from finetune_budget.config import resolve_precision
from finetune_budget.errors import ConfigError, ModelError
from finetune_budget.external_baseline import evaluate_external
from finetune_budget.report import advise_mode, report_mode
from finetune_budget.tasks import build_task
from finetune_budget.tracking.mlflow_run import tracked_run
from finetune_budget.training import run_config

log = logging.getLogger(__name__)


def checkpoint_of_run(tracking_uri: str, run_id: str) -> str:
    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except Exception as e:  # noqa: BLE001 - MLflow raises several kinds for a bad id
        raise ConfigError(
            f"run_id={run_id} is not a run of {tracking_uri}; copy the id from the MLflow UI"
        ) from e
    path = run.data.tags.get("checkpoint")
    if not path:
        raise ConfigError(f"run {run_id} saved no checkpoint (tracking.save_checkpoint was false)")
    return path


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
    """Evaluate `cfg.model` (or `cfg.checkpoint` / `cfg.run_id`) on `cfg.data`'s held-out split."""
    checkpoint = cfg.get("checkpoint")
    if cfg.get("run_id"):
        checkpoint = checkpoint_of_run(cfg.tracking.uri, cfg.run_id)
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
        if checkpoint:
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


MODES: dict[str, Callable[[DictConfig], Any]] = {"eval": evaluate, "report": report_mode}
MODES["external_baseline"] = evaluate_external
MODES["advise"] = advise_mode


def run_mode(cfg: DictConfig) -> Any:
    mode = cfg.get("mode", "eval")
    if mode not in MODES:
        raise ConfigError(f"mode={mode} is unknown; use one of {', '.join(sorted(MODES))}")
    return MODES[mode](cfg)
