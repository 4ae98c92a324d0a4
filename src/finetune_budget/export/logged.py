"""A module's model logged to MLflow and loaded back (sentence_transformers flavor for text,
pytorch for CLIP and images).

MLflow logging (`tracking.log_model`): `auto` logs the model of a single `python train.py` run,
not of every sweep or search job; at a sweep's end the sweep's best run of `budget.metric` gets
its model logged (from its checkpoint, or rebuilt by retraining its logged config, which is
deterministic: see `rebuild_run`). `true` logs every run, `false` none.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning as L

from finetune_budget.config import installed_versions
from finetune_budget.errors import ConfigError
from finetune_budget.export.formats import library_image_model, model_kind, sentence_transformer

log = logging.getLogger(__name__)

MODEL_NAME = "model"  # the name of the logged model inside its run

LOGGED_MODEL_TAG = "logged_model"  # run tag: the model's URI (models:/<model_id>)


def _requirements(*packages: str) -> list[str]:
    return [f"{name}=={v}" for name, v in installed_versions(packages).items()]


def log_model(
    tracking_uri: str,
    run_id: str,
    module: L.LightningModule,
    step: int,
    params: Mapping[str, Any] | None = None,
    registered_name: str | None = None,
) -> str:
    """Log `module`'s model to MLflow run `run_id` (sentence_transformers flavor for text, pytorch
    for CLIP and images) with the params of the budget it was trained on; optionally register it.

    step: the epoch whose weights these are. MLflow links the run's metrics at that step to the
    model (the Models tab shows them); nothing is written to the run's metric history, and the
    run's status and end time are not touched (the run is not resumed).
    Returns the model URI (models:/<model_id>), also set as the run's `logged_model` tag.
    """
    import mlflow

    kind = model_kind(module)
    module = module.cpu().eval()
    mlflow.set_tracking_uri(tracking_uri)
    common = {
        "name": MODEL_NAME,
        "params": {k: str(v) for k, v in (params or {}).items()},
        "registered_model_name": registered_name,
        "run_id": run_id,
        "step": int(step),
    }
    if kind == "text":
        info = mlflow.sentence_transformers.log_model(
            sentence_transformer(module),
            pip_requirements=_requirements("sentence-transformers", "torch", "transformers"),
            **common,
        )
    else:
        library = {"clip": ("open_clip_torch", "timm"), "image": ("timm",)}[kind]
        net = module.clip if kind == "clip" else library_image_model(module)
        info = mlflow.pytorch.log_model(
            net,
            serialization_format="pickle",
            pip_requirements=_requirements("torch", *library),
            **common,
        )
    mlflow.tracking.MlflowClient(tracking_uri).set_tag(run_id, LOGGED_MODEL_TAG, info.model_uri)
    log.info("logged %s model %s to run %s", kind, info.model_uri, run_id)
    return info.model_uri


def load_logged_model(model_uri: str) -> Any:
    """The object a logged model loads as: a SentenceTransformer, an open_clip or a timm model."""
    import mlflow

    flavors = mlflow.models.get_model_info(model_uri).flavors
    if "sentence_transformers" in flavors:
        return mlflow.sentence_transformers.load_model(model_uri)
    return mlflow.pytorch.load_model(model_uri, map_location="cpu")


def check_log_model_option(value: Any, key: str = "tracking.log_model") -> str:
    """tracking.log_model / tracking.save_checkpoint as auto | true | false."""
    text = str(value).lower()
    if text not in ("auto", "true", "false"):
        raise ConfigError(f"{key}={value} is unknown; use auto, true or false")
    return text


def model_params(cfg, run_id: str) -> dict[str, Any]:
    """The params a logged model carries: the budget it was trained on and where it came from."""
    return {
        "data.n": cfg.data.n,
        "trainer.max_epochs": cfg.trainer.max_epochs,
        "seed": cfg.seed,
        "task.name": cfg.task.name,
        "model.name": cfg.model.name,
        "run_id": run_id,
    }
