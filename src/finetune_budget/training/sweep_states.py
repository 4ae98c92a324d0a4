"""The Hydra callback that gives a `-m` sweep an id for its epoch states (continuation.py) and
removes them when the sweep ends, from memory and from disk.

Hydra builds its callbacks before every run, so this module imports nothing heavy: a job's config
check (app/cli.py) does not wait for lightning, which the states' module needs.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from finetune_budget.tracking.parent import SWEEP_ENV

log = logging.getLogger(__name__)


class SweepStates(Callback):
    """Wired in conf/hydra/default.yaml (`hydra.callbacks.continuation_states`)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ[SWEEP_ENV] = f"{os.getpid()}-{time.time_ns()}"

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from finetune_budget.training.continuation import MEMORY, EpochStore  # lightning: late

        sweep = os.environ.pop(SWEEP_ENV, None)
        in_memory = MEMORY.clear()
        on_disk = EpochStore(config.paths.cache_dir).remove_sweep(sweep) if sweep else 0
        if in_memory or on_disk:
            log.info(
                "removed the sweep's epoch states (%d in memory, %d on disk)", in_memory, on_disk
            )
