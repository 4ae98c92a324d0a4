"""Fine-tuned models in their ecosystem's format (library code: no MLflow, no training).

    python evaluate.py mode=export run_id=<id>     a run's model (app.model_modes.export_mode)

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

from finetune_budget.errors import ModelError
from finetune_budget.models.text import SentenceEncoder, load_tokenizer

# models.clip and models.vision (open_clip, timm, torchvision) are imported where a CLIP or an
# image model is exported: a text job that logs its model does not wait for them.

log = logging.getLogger(__name__)


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


SAVERS = {"text": _save_text, "clip": _save_clip, "image": _save_image}


def export_model(module: L.LightningModule, folder: str | Path) -> Exported:
    """Save `module`'s fine-tuned model into `folder` the way its library loads it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    exported = SAVERS[model_kind(module)](module.cpu().eval(), folder)
    (folder / "LOAD.txt").write_text(f"{exported.library}: {exported.load}\n")
    log.info("exported %s model to %s: %s", exported.library, folder, exported.load)
    return exported


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
