"""The epoch-0 evaluation of a pretrained model, computed once per (model, split, eval settings).

Every run of a sweep that shares them reuses it instead of embedding the held-out split again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Keys of the data config that only shape training, not the held-out split.
TRAIN_ONLY_DATA_KEYS = {
    "n",
    "subset_seed",
    "batch_size",
    "samples_per_class",
    "num_workers",
    "augment",
}


def _fingerprint(path: Any) -> Any:
    try:
        p = Path(str(path)).expanduser()
        if p.is_file():
            st = p.stat()
            return [str(p.resolve()), st.st_size, st.st_mtime_ns]
        if p.is_dir():
            return [str(p.resolve())]
    except OSError:
        pass
    return path


def baseline_key(
    task: str,
    model: Mapping[str, Any],
    data: Mapping[str, Any],
    eval_settings: Mapping[str, Any],
    precision: str,
    seed: int | None,
) -> str:
    """A hash of everything the epoch-0 metrics depend on.

    seed: give it when the pretrained model has randomly initialised parts (a projection head, an
    assembled CLIP, a random test model), else None.
    """
    payload = {
        "task": task,
        "model": dict(model),
        "data": {
            k: _fingerprint(v) if "path" in k else v
            for k, v in data.items()
            if k not in TRAIN_ONLY_DATA_KEYS
        },
        "eval": {
            k: v for k, v in eval_settings.items() if k not in ("batch_size", "cache_baseline")
        },
        "precision": precision,
        "seed": seed,
    }
    blob = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


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
