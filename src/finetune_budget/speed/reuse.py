"""What the jobs of one process load once: pretrained weights, tokenizers, data sets.

Hydra's basic launcher runs all jobs of a `-m` sweep in one process, so job 2..N would otherwise
load the same weights, tokenizer and data again. `cached(kind, key, load, copy)` keeps the last
few loaded objects of each kind, keyed by what they were loaded from (file fingerprints
included); `copy` gives every job its own object where it will change it (a module being trained
is always a copy of the cached one, never the cached one).

    module = cached("transformer", (spec, cls), lambda: load(spec), copy=copy.deepcopy)

`speed.process_reuse=false` (speed/switches.py): every call loads.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

from finetune_budget import identity
from finetune_budget.speed.switches import enabled

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_PER_KIND = 4
_CACHE: dict[str, OrderedDict[str, Any]] = {}
STATS = {"hits": 0, "misses": 0}


def cache_key(*parts: Any) -> str:
    """`parts` as JSON text (identity.process_key). A config group's part is what it reads,
    identity.loaded_from(group, tree): `cached("text_data", loaded_from("data", cfg), load)`."""
    return identity.process_key(*parts)


def cached(kind: str, key: Any, load: Callable[[], T], copy: Callable[[T], T] | None = None) -> T:
    """`load()` once per (kind, key) in this process; later calls get `copy(obj)` (or obj)."""
    if not enabled("process_reuse"):
        return load()
    entries = _CACHE.setdefault(kind, OrderedDict())
    k = key if isinstance(key, str) else cache_key(key)
    if k in entries:
        entries.move_to_end(k)
        STATS["hits"] += 1
        log.debug("reusing the loaded %s %s", kind, k)
    else:
        STATS["misses"] += 1
        entries[k] = load()
        while len(entries) > MAX_PER_KIND:
            entries.popitem(last=False)
    obj = entries[k]
    return copy(obj) if copy is not None else obj


def clear() -> None:
    _CACHE.clear()


# -- the final weights of a sweep's jobs ----------------------------------------------------------
_WEIGHTS: OrderedDict[str, tuple[dict[str, Any], int]] = OrderedDict()  # run id: (state, bytes)


def keep_final_weights(run_id: str, module: Any, max_mb: float) -> None:
    """Keep `module`'s final weights (a CPU state dict) under `run_id`, dropping the oldest kept
    runs past `max_mb` MB (0: keep none)."""
    if not max_mb or max_mb <= 0:
        return
    # on the CPU these are the trained tensors themselves (the job is over: nothing changes them)
    state = {k: v.detach().to("cpu") for k, v in module.state_dict().items()}
    _WEIGHTS[run_id] = (state, sum(t.numel() * t.element_size() for t in state.values()))
    _WEIGHTS.move_to_end(run_id)
    total = sum(size for _, size in _WEIGHTS.values())
    while len(_WEIGHTS) > 1 and total > max_mb * 2**20:
        dropped, (_, size) = _WEIGHTS.popitem(last=False)
        total -= size
        log.debug("kept weights past %s MB: dropped run %s", max_mb, dropped)


def final_weights(run_id: str) -> dict[str, Any] | None:
    """The final weights `keep_final_weights` kept for `run_id` in this process (None: not)."""
    entry = _WEIGHTS.get(run_id)
    return None if entry is None else entry[0]


def clear_final_weights() -> int:
    """Forget every kept run's weights (a sweep's end); returns how many."""
    count = len(_WEIGHTS)
    _WEIGHTS.clear()
    return count
