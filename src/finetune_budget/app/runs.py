"""A run's fine-tuned model: the weights its process kept, its logged model, its checkpoint, or
rebuilt by retraining its logged config (deterministic: see `rebuild_run`).

    python evaluate.py mode=export run_id=<id>     write a run's model, log it, register it
    python evaluate.py run_id=<id>                 evaluate the model the run logged
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import lightning as L
import mlflow
import torch
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf, open_dict

from finetune_budget.errors import ConfigError, ModelError
from finetune_budget.export.formats import load_into_module
from finetune_budget.export.logged import (
    LOGGED_MODEL_TAG,
    load_logged_model,
    log_model,
    model_params,
)
from finetune_budget.speed import reuse
from finetune_budget.tasks import build_task
from finetune_budget.training.run import train

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


def config_of_run(tracking_uri: str, run_id: str):
    """The resolved config a run logged (its `config.yaml` artifact) as a DictConfig."""
    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except Exception as e:  # noqa: BLE001 - MLflow raises several kinds for a bad id
        raise ConfigError(
            f"run_id={run_id} is not a run of {tracking_uri}; copy the id from the MLflow UI"
        ) from e
    mlflow.set_tracking_uri(tracking_uri)
    try:
        text = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config.yaml")
    except Exception as e:  # noqa: BLE001
        raise ConfigError(
            f"run {run_id} has no config.yaml artifact; pick a training run (run_type=train)"
        ) from e
    return with_current_defaults(OmegaConf.create(text)), run


# The train.yaml sections no group choice (task, model, data) changes: a key added to one of them
# since a run was logged takes today's default there.
SHARED_SECTIONS = ("tracking", "budget", "eval", "optim", "speed")


def with_current_defaults(logged: DictConfig) -> DictConfig:
    """A config logged by an older version, with the keys it lacks in SHARED_SECTIONS taken from
    today's conf/train.yaml (its own values kept). Needs Hydra's config search path with
    train.yaml (evaluate.py sets it); without it the config is returned as logged."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    if not GlobalHydra.instance().is_initialized():
        return logged
    try:
        defaults = compose(config_name="train")
    except Exception as e:  # noqa: BLE001 - another config search path: the config as logged
        log.debug("no train.yaml to fill a logged config from: %s", e)
        return logged
    with open_dict(logged):
        for section in SHARED_SECTIONS:
            if section in defaults:
                mine = logged[section] if section in logged else {}
                logged[section] = OmegaConf.merge(defaults[section], mine)
    return logged


def weights_of_run(run) -> tuple[str, str] | None:
    """Where a run's fine-tuned weights are: ("logged_model", models:/...) or
    ("checkpoint", path of last.ckpt); None when it kept neither."""
    tags = run.data.tags
    if tags.get(LOGGED_MODEL_TAG):
        return "logged_model", tags[LOGGED_MODEL_TAG]
    path = tags.get("checkpoint")
    if path and Path(path).is_file():
        return "checkpoint", path
    return None


def apply_weights(module: L.LightningModule, where: tuple[str, str]) -> None:
    """Load the weights `weights_of_run` found into a module built from the run's config."""
    kind, ref = where
    if kind == "logged_model":
        load_into_module(module, load_logged_model(ref))
    else:
        load_weights(module, ref)


def rebuild_run(tracking_uri: str, run_id: str) -> tuple[L.LightningModule, float]:
    """Retrain a run from its logged config (same seed and data subset: deterministic on the same
    hardware and versions) as a `run_type=rebuild` run; returns (module, |difference|) where the
    difference is between the rebuilt and the original final `budget.metric`."""
    cfg, run = config_of_run(tracking_uri, run_id)
    with open_dict(cfg):
        cfg.tracking.uri = tracking_uri
        cfg.tracking.log_model = False
        cfg.tracking.save_checkpoint = False
        cfg.tracking.run_name = f"rebuild of {run_id}"
        cfg.paths.output_dir = tempfile.mkdtemp(prefix="finetune_budget_rebuild_")
    log.info("run %s kept no weights: retraining its logged config", run_id)
    parent = run.data.tags.get("mlflow.parentRunId")
    result = train(cfg, parent_run_id=parent, tags={"run_type": "rebuild", "rebuilt_from": run_id})
    metric = cfg.budget.metric
    diff = abs(result.history[-1].get(metric, float("nan")) - run.data.metrics.get(metric, 0.0))
    client = MlflowClient(tracking_uri)
    client.set_tag(run_id, "rebuilt_by", result.run_id)
    client.log_metric(result.run_id, "rebuild/max_abs_diff", diff)
    if not diff <= 1e-4:
        log.warning(
            "the rebuilt run %s differs from run %s by %.3g in %s (other hardware or versions?)",
            result.run_id,
            run_id,
            diff,
            metric,
        )
    return result.objects["module"], diff


def module_of_run(tracking_uri: str, run_id: str, rebuild: bool = True) -> L.LightningModule:
    """A run's fine-tuned module: from the weights this process's sweep kept in memory
    (reuse.keep_final_weights), its logged model, its checkpoint, or (rebuild=True) retrained
    from its logged config."""
    cfg, run = config_of_run(tracking_uri, run_id)
    kept = reuse.final_weights(run_id)
    if kept is not None:  # a job of this process's sweep: its final weights, still in memory
        module = build_task(cfg).module
        module.load_state_dict(kept, strict=True)
        return module
    where = weights_of_run(run)
    if where is None:
        if not rebuild:
            raise ModelError(
                f"run {run_id} kept no weights (tracking.save_checkpoint/log_model); run "
                f"`python evaluate.py mode=export run_id={run_id}` to rebuild and log it"
            )
        return rebuild_run(tracking_uri, run_id)[0]
    module = build_task(cfg).module
    apply_weights(module, where)
    return module


def log_model_of_run(tracking_uri: str, run_id: str, registered_name: str | None = None) -> str:
    """Log run `run_id`'s model (see `module_of_run`) to that run, unless it has one already;
    register a version under `registered_name` when given. Returns the model URI."""
    cfg, run = config_of_run(tracking_uri, run_id)
    model_uri = run.data.tags.get(LOGGED_MODEL_TAG)
    if model_uri is None:
        module = module_of_run(tracking_uri, run_id)
        model_uri = log_model(
            tracking_uri, run_id, module, last_epoch(tracking_uri, run), model_params(cfg, run_id)
        )
    if registered_name:
        mlflow.set_tracking_uri(tracking_uri)
        version = mlflow.register_model(model_uri, registered_name)
        mlflow.tracking.MlflowClient(tracking_uri).set_tag(
            run_id, "registered_model", f"{registered_name}/{version.version}"
        )
        log.info("registered %s as %s version %s", model_uri, registered_name, version.version)
    return model_uri


def last_epoch(tracking_uri: str, run) -> int:
    """The last epoch a finished run recorded (the step of its final per-epoch metrics)."""
    steps = [
        m.step
        for m in MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "time/train_s")
    ]
    return max(steps, default=0)
