"""Fine-tuned models in their ecosystem's format, and in MLflow as models.

    python evaluate.py mode=export run_id=<id>     write a run's model, log it, register it
    python evaluate.py run_id=<id>                 evaluate the model the run logged

- text encoders (`text_text`, `mlm_price`): a sentence-transformers folder,
  `SentenceTransformer(folder)`; in MLflow the `sentence_transformers` flavor.
- CLIP (`text_image`): an open_clip folder (`open_clip_config.json` with the model and
  preprocessing config, `open_clip_model.safetensors`, the text tower's HF config and tokenizer),
  `open_clip.create_model_and_transforms("local-dir:<folder>")`; for built-in architectures also
  `create_model_and_transforms(arch, pretrained="<folder>/open_clip_model.safetensors")`. In MLflow
  the `pytorch` flavor of the open_clip model.
- image backbones (`image_image`): a timm folder (`config.json`, `model.safetensors`) written by
  `timm.models.save_for_hf`, `timm.create_model("local-dir:<folder>", pretrained=True)`; a
  projection head (`model.output_dim`) is the classifier (bias 0), so the model's output is the
  embedding before L2 normalisation. torchvision MobileNetV2 trunks become timm `mobilenetv2_100`
  (same tensors in the same order). `torchvision:<name>` backbones and `tiny_cnn` are saved as a
  plain state dict of the trunk (`trunk.safetensors`, `projection.safetensors`). In MLflow the
  `pytorch` flavor of the timm model.

MLflow logging (`tracking.log_model`): `auto` logs the model of a single `python train.py` run,
not of every sweep or search job; at a sweep's end the sweep's best run of `budget.metric` gets
its model logged (from its checkpoint, or rebuilt by retraining its logged config, which is
deterministic: see `rebuild_run`). `true` logs every run, `false` none.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from finetune_budget.config import installed_versions
from finetune_budget.errors import ConfigError, ModelError
from finetune_budget.models.text import SentenceEncoder, load_tokenizer

log = logging.getLogger(__name__)

MODEL_NAME = "model"  # the name of the logged model inside its run
LOGGED_MODEL_TAG = "logged_model"  # run tag: the model's URI (models:/<model_id>)


@dataclass
class Exported:
    """A model saved in its library's format. load: the Python line that loads it."""

    folder: Path
    library: str  # sentence_transformers | open_clip | timm | torch
    load: str


def model_kind(module: L.LightningModule) -> str:
    """text (a SentenceEncoder at .encoder), clip (an open_clip model at .clip) or image."""
    if isinstance(getattr(module, "encoder", None), SentenceEncoder):
        return "text"
    if hasattr(module, "clip"):
        return "clip"
    if hasattr(module, "embedder"):
        return "image"
    raise ModelError(f"{type(module).__name__} has no exportable model")


# -- text: sentence-transformers ----------------------------------------------------------------
def sentence_transformer(module: L.LightningModule):
    """The module's encoder as a SentenceTransformer: Transformer, Pooling, Dense, Normalize."""
    model_cfg = module.hparams.model
    tokenizer = load_tokenizer(model_cfg["tokenizer"])
    return encoder_as_sentence_transformer(module.encoder, tokenizer, int(model_cfg["max_length"]))


def encoder_as_sentence_transformer(encoder: SentenceEncoder, tokenizer: Any, max_length: int):
    """A SentenceEncoder and its tokenizer as a SentenceTransformer (Transformer, Pooling, Dense
    for a projection head, Normalize): `.save(folder)` writes the folder its users load."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import (
        Dense,
        Normalize,
        Pooling,
        Transformer,
    )

    hidden = int(encoder.transformer.config.hidden_size)
    with tempfile.TemporaryDirectory() as tmp:
        encoder.transformer.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        modules: list[nn.Module] = [
            Transformer(tmp, max_seq_length=int(max_length)),
            Pooling(hidden, pooling_mode=encoder.pooling),
        ]
    if encoder.projection is not None:
        weight = encoder.projection.weight.detach().float().cpu()
        modules.append(
            Dense(
                hidden,
                weight.shape[0],
                bias=False,
                activation_function=nn.Identity(),
                init_weight=weight.clone(),
            )
        )
    if encoder.normalize:
        modules.append(Normalize())
    return SentenceTransformer(modules=modules, device="cpu")


def load_sentence_transformer(module: L.LightningModule, model: Any) -> None:
    """Put a SentenceTransformer's weights (as `sentence_transformer` builds it) into `module`."""
    encoder: SentenceEncoder = module.encoder
    state = {
        k: v for k, v in model[0].auto_model.state_dict().items() if not k.startswith("pooler.")
    }
    encoder.transformer.load_state_dict(state, strict=True)
    dense = [m for m in model if type(m).__name__ == "Dense"]
    if (encoder.projection is None) != (not dense):
        raise ModelError(
            "the logged model and model.output_dim disagree on a projection head; "
            "evaluate with the run's own model config"
        )
    if dense:
        encoder.projection.weight.data.copy_(dense[0].linear.weight.data)


def _save_text(module: L.LightningModule, folder: Path) -> Exported:
    sentence_transformer(module).save(str(folder))
    return Exported(folder, "sentence_transformers", f"SentenceTransformer({str(folder)!r})")


# -- CLIP: open_clip ------------------------------------------------------------------------------
def _save_clip(module: L.LightningModule, folder: Path) -> Exported:
    import open_clip
    from safetensors.torch import save_file

    parts = module.parts
    model_cfg = open_clip.get_model_config(parts.arch)
    if model_cfg is None:
        raise ModelError(f"open_clip has no config {parts.arch!r}; rebuild the model first")
    text_cfg = model_cfg.get("text_cfg", {})
    if "hf_model_name" in text_cfg and parts.tokenizer.hf is not None:
        # open_clip builds the HF text tower from this folder's config.json (weights come from
        # the checkpoint) and its tokenizer from the folder a local-dir: name points at.
        module.clip.text.transformer.config.save_pretrained(folder)
        parts.tokenizer._load().save_pretrained(folder)
        text_cfg["hf_model_name"] = text_cfg["hf_tokenizer_name"] = str(folder.resolve())
    preprocess = {
        "size": int(parts.image_size),
        "mean": list(parts.mean),
        "std": list(parts.std),
        "interpolation": "bilinear",
        "resize_mode": "shortest",
    }
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=2)
    )
    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.clip.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return Exported(
        folder, "open_clip", f"open_clip.create_model_and_transforms('local-dir:{folder}')"
    )


def load_open_clip(folder: str | Path) -> tuple[nn.Module, Any, Any]:
    """(model, preprocess, tokenizer) of an exported open_clip folder, in eval mode."""
    import open_clip

    name = f"local-dir:{Path(folder).resolve()}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


# -- images: timm ---------------------------------------------------------------------------------
def _timm_name(backbone: str) -> str | None:
    from finetune_budget.models.clip import TIMM_NAMES

    if backbone == "tiny_cnn" or backbone.startswith("torchvision:"):
        return None
    return TIMM_NAMES.get(backbone, backbone.removeprefix("timm:"))


def _order_map(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]):
    """`source` tensors under `target`'s names: the same keys, or the same tensors in order."""
    from finetune_budget.models.vision import map_efficientnet_lite

    if set(source) == set(target):
        return dict(source)
    return map_efficientnet_lite(source, target)


def timm_model(module: L.LightningModule) -> nn.Module:
    """The module's image embedder as one timm model: trunk + projection as its classifier."""
    import timm

    embedder = module.embedder
    model_cfg = module.hparams.model
    name = _timm_name(model_cfg["backbone"])
    if name is None:
        raise ModelError(f"model.backbone={model_cfg['backbone']} has no timm equivalent")
    dim = embedder.projection.weight.shape[0] if embedder.projection is not None else 0
    model = timm.create_model(name, pretrained=False, num_classes=dim)
    head = model.get_classifier() if dim else None
    if dim and not isinstance(head, nn.Linear):
        raise ModelError(
            f"timm {name} has no single linear classifier to hold the projection; "
            "export with model.output_dim=null"
        )
    trunk_target = {k: v for k, v in model.state_dict().items() if k not in _head_names(model)}
    mapped = _order_map(embedder.trunk.state_dict(), trunk_target)
    model.load_state_dict(mapped, strict=not dim)
    if dim:
        head.weight.data.copy_(embedder.projection.weight.data)
        head.bias.data.zero_()
    return model.eval()


def load_timm_model(module: L.LightningModule, model: nn.Module) -> None:
    """Put a timm model's weights (as `timm_model` builds it) into `module`'s embedder."""
    embedder = module.embedder
    head_names = _head_names(model)
    trunk_state = {k: v for k, v in model.state_dict().items() if k not in head_names}
    embedder.trunk.load_state_dict(
        _order_map(trunk_state, embedder.trunk.state_dict()), strict=True
    )
    if embedder.projection is not None:
        embedder.projection.weight.data.copy_(model.get_classifier().weight.data)


def _head_names(model: nn.Module) -> set[str]:
    """State-dict names of a timm model's linear classifier (empty when it has none)."""
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        return set()
    return {n for n, p in model.named_parameters() if p is head.weight or p is head.bias}


def _save_image(module: L.LightningModule, folder: Path) -> Exported:
    from safetensors.torch import save_file
    from timm.models import save_for_hf

    model_cfg = module.hparams.model
    size = int(model_cfg["image_size"])
    mean, std = _image_mean_std(model_cfg)
    if _timm_name(model_cfg["backbone"]) is None:
        embedder = module.embedder
        state = {k: v.detach().cpu().contiguous() for k, v in embedder.trunk.state_dict().items()}
        save_file(state, str(folder / "trunk.safetensors"))
        if embedder.projection is not None:
            save_file(
                {"weight": embedder.projection.weight.detach().cpu().contiguous()},
                str(folder / "projection.safetensors"),
            )
        info = {"backbone": model_cfg["backbone"], "image_size": size, "mean": mean, "std": std}
        (folder / "config.json").write_text(json.dumps(info, indent=2))
        return Exported(folder, "torch", "safetensors.torch.load_file('trunk.safetensors')")
    data_config = {
        "input_size": (3, size, size),
        "mean": tuple(mean),
        "std": tuple(std),
        "crop_pct": 0.875,
        "interpolation": "bilinear",
    }
    save_for_hf(timm_model(module), folder, safe_serialization=True, data_config=data_config)
    return Exported(folder, "timm", f"timm.create_model('local-dir:{folder}', pretrained=True)")


def _image_mean_std(model_cfg: Mapping[str, Any]) -> tuple[list[float], list[float]]:
    from finetune_budget.models.vision import backbone_mean_std

    default_mean, default_std = backbone_mean_std(model_cfg["backbone"])
    return list(model_cfg.get("mean") or default_mean), list(model_cfg.get("std") or default_std)


def load_timm_folder(folder: str | Path) -> nn.Module:
    import timm

    return timm.create_model(f"local-dir:{Path(folder).resolve()}", pretrained=True).eval()


# -- one entry point ------------------------------------------------------------------------------
SAVERS = {"text": _save_text, "clip": _save_clip, "image": _save_image}


def export_model(module: L.LightningModule, folder: str | Path) -> Exported:
    """Save `module`'s fine-tuned model into `folder` the way its library loads it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    exported = SAVERS[model_kind(module)](module.cpu().eval(), folder)
    (folder / "LOAD.txt").write_text(f"{exported.library}: {exported.load}\n")
    log.info("exported %s model to %s: %s", exported.library, folder, exported.load)
    return exported


# -- MLflow ---------------------------------------------------------------------------------------
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


def library_image_model(module: L.LightningModule) -> nn.Module:
    """The timm model of an image module; for backbones timm lacks (`torchvision:<name>`,
    `tiny_cnn`) the module's own embedder (loading it needs this package)."""
    if _timm_name(module.hparams.model["backbone"]) is None:
        return module.embedder
    return timm_model(module)


def load_into_module(module: L.LightningModule, model: Any) -> None:
    """Put a logged model's weights (`load_logged_model`) into a freshly built `module`."""
    kind = model_kind(module)
    if kind == "text":
        load_sentence_transformer(module, model)
    elif kind == "clip":
        module.clip.load_state_dict(model.state_dict(), strict=True)
    elif _timm_name(module.hparams.model["backbone"]) is None:
        module.embedder.load_state_dict(model.state_dict(), strict=True)
    else:
        load_timm_model(module, model)


def module_embeddings(module: L.LightningModule, inputs: Any) -> torch.Tensor:
    """Embeddings (N, D), L2-normalised, the way the module computes them in evaluation.

    inputs: tokenised texts (dict of input_ids, attention_mask) for text; images (N, 3, H, W)
    for image models and CLIP; token ids (N, T) for CLIP's text tower when 2-D integer."""
    module.eval()
    with torch.no_grad():
        kind = model_kind(module)
        if kind == "text":
            return module.encoder(**inputs)
        if kind == "clip":
            if inputs.dtype in (torch.int32, torch.int64):
                return module.encode_text(inputs)
            return module.encode_image(inputs)
        return F.normalize(module.embedder(inputs).float(), dim=-1)


def check_log_model_option(value: Any, key: str = "tracking.log_model") -> str:
    """tracking.log_model / tracking.save_checkpoint as auto | true | false."""
    text = str(value).lower()
    if text not in ("auto", "true", "false"):
        raise ConfigError(f"{key}={value} is unknown; use auto, true or false")
    return text


# -- a run's model: logged, checkpointed, or rebuilt ---------------------------------------------
def config_of_run(tracking_uri: str, run_id: str):
    """The resolved config a run logged (its `config.yaml` artifact) as a DictConfig."""
    import mlflow
    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf

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
    return OmegaConf.create(text), run


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
        from finetune_budget.evaluation import load_weights

        load_weights(module, ref)


def rebuild_run(tracking_uri: str, run_id: str) -> tuple[L.LightningModule, float]:
    """Retrain a run from its logged config (same seed and data subset: deterministic on the same
    hardware and versions) as a `run_type=rebuild` run; returns (module, |difference|) where the
    difference is between the rebuilt and the original final `budget.metric`."""
    from mlflow.tracking import MlflowClient
    from omegaconf import open_dict

    from finetune_budget.training import train

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
    from finetune_budget import reuse
    from finetune_budget.tasks import build_task

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
    import mlflow

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


def last_epoch(tracking_uri: str, run) -> int:
    """The last epoch a finished run recorded (the step of its final per-epoch metrics)."""
    from mlflow.tracking import MlflowClient

    steps = [
        m.step
        for m in MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "time/train_s")
    ]
    return max(steps, default=0)


def logged_at_sweep_end(cfg, parent_run_id: str | None) -> bool:
    """Whether the sweep this job runs in logs a chosen run's model at its end: a `-m` sweep's
    parent (tracking.sweep_parent) with tracking.log_model=auto. (An Optuna search logs none.)"""
    from finetune_budget.tracking.sweep_parent import current_parent

    option = check_log_model_option(cfg.tracking.get("log_model", "auto"))
    return parent_run_id is not None and parent_run_id == current_parent() and option == "auto"


def sweep_choices(config, children: list, advice: dict | None = None) -> list[tuple[str, str]]:
    """The runs whose model a sweep logs, with why: the run each decision card of the report
    recommends (its data.n, its epochs, the best seed there); where the report recommends none,
    or names a budget no run ended at, the sweep's best finished run by `budget.metric`."""
    metric = config.budget.metric
    done = [
        r
        for r in children
        if r.info.status == "FINISHED"
        and r.data.tags.get("run_type") == "train"
        and metric in r.data.metrics
    ]
    chosen: list[tuple[str, str]] = []
    cards = [a for (_, m), a in (advice or {}).items() if m == metric]
    for advice in cards:
        if advice.run_id and advice.run_id not in {c[0] for c in chosen}:
            why = f"recommended: data.n={advice.n}, {advice.epochs} epochs"
            if advice.run_epochs != advice.epochs:
                why += (
                    f"; no run ended there, this one trained {advice.run_epochs} "
                    f"(retrain with trainer.max_epochs={advice.epochs} for that model)"
                )
            chosen.append((advice.run_id, why))
    if not chosen and done:
        best = max(done, key=lambda r: r.data.metrics[metric])
        why = "no run at the recommended budget" if cards else "no recommendation"
        chosen.append((best.info.run_id, f"best {metric} ({why})"))
    return chosen


def log_sweep_choice(
    config, parent_run_id: str, children: list, advice: dict | None = None
) -> list[str]:
    """At a sweep's end (tracking.log_model=auto): log the model of the run the sweep's report
    recommends (`sweep_choices`; `advice`: the report's, by (group, metric)). Returns the ids of
    the runs whose model was logged."""
    from mlflow.tracking import MlflowClient

    if check_log_model_option(config.tracking.get("log_model", "auto")) != "auto":
        return []  # true: every job logged its own; false: none
    client = MlflowClient(config.tracking.uri)
    logged = []
    for run_id, why in sweep_choices(config, children, advice):
        try:
            uri = log_model_of_run(
                config.tracking.uri, run_id, config.tracking.get("registered_model")
            )
        except Exception as e:  # noqa: BLE001 - the sweep's runs are done; keep them
            log.warning("run %s (%s): model not logged: %s: %s", run_id, why, type(e).__name__, e)
            client.set_tag(parent_run_id, "log_model.error", f"{e}"[:5000])
            continue
        logged.append(run_id)
        client.set_tag(parent_run_id, "logged_model_run", ",".join(logged))
        client.set_tag(parent_run_id, "logged_model_why", why)
        client.set_tag(parent_run_id, LOGGED_MODEL_TAG, uri)
        log.info("the sweep's model: run %s (%s), logged as %s", run_id, why, uri)
    return logged


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
