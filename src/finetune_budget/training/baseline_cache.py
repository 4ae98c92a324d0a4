"""The epoch-0 evaluation of a pretrained model, computed once per (model, split, eval settings).

Every run of a sweep that shares them reuses it instead of embedding the held-out split again.
The key holds everything that changes what epoch 0 computes: the task, the model config and a
digest of the model's weights as built, the data config with fingerprints of the files and
folders it names, the evaluation settings, the trainer settings that shape evaluation (precision,
accelerator, limit_val_batches), the metrics version and this package's version (which keys:
the roles in identity.py). A baseline that did not embed every held-out item is never stored
(training.evaluate_baseline checks).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from finetune_budget import __version__, identity
from finetune_budget.retrieval.metrics import METRICS_VERSION

log = logging.getLogger(__name__)


def weights_digest(module: torch.nn.Module) -> str:
    """A digest of every tensor in `module.state_dict()` (names, dtypes, shapes and bytes).
    SHA-256: on CPUs with SHA instructions it hashes MiniLM's 90 MB in half blake2b's time."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}\0{t.dtype}\0{tuple(tensor.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()[:24]


def baseline_key(*settings: Any, **named: Any) -> str:
    """identity.epoch0_key at this package's version and METRICS_VERSION: a hash of everything the
    epoch-0 metrics depend on (task, model, data, eval_settings, trainer_settings, seed, weights;
    the data keys that only shape training and the eval keys that do not change the metrics are
    left out).

    trainer_settings: precision, accelerator, limit_val_batches (as the Trainer resolved them);
    seed: give it when the pretrained model has randomly initialised parts (a projection head, an
    assembled CLIP, a random test model), else None; weights: `weights_digest(module)`.
    """
    return identity.epoch0_key(
        *settings, **named, metrics_version=METRICS_VERSION, package_version=__version__
    )


class BaselineCache:
    """JSON files under `cache_dir/baselines/<key>.json`: {"metrics": {...}, "eval_s": float}."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.dir = Path(cache_dir).expanduser() / "baselines"

    def get(self, key: str) -> dict[str, Any] | None:
        path = self.dir / f"{key}.json"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            log.warning("ignoring unreadable baseline cache file %s", path)
            return None

    def put(self, key: str, metrics: Mapping[str, float], eval_s: float) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{key}.json.{os.getpid()}.tmp"  # one per process: parallel sweeps
        try:
            tmp.write_text(json.dumps({"metrics": dict(metrics), "eval_s": eval_s}, indent=1))
            tmp.replace(self.dir / f"{key}.json")
        except OSError as e:  # a full disk: the runs go on, only the reuse is lost
            tmp.unlink(missing_ok=True)
            log.warning("could not save the baseline cache file %s (%s)", tmp, e)
