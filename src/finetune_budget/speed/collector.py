"""Python's cyclic garbage collector off while an entry point starts up.

Importing torch, Lightning (with torchmetrics' imports of torchvision and `torch._dynamo`),
transformers and MLflow creates ~800k objects that live as long as the process: modules,
functions, classes. While they are created the collector makes full passes over all of them and
frees almost nothing (what that costs a sweep: docs/performance.md, the fast paths).

`pause_during_startup` (train.py, evaluate.py, tune.py) turns the collector off.
`resume_after_startup` (each job, once its heavy modules are imported) moves what is alive then
to the permanent generation (`gc.freeze`: never scanned again; the report's forked process gains
too, no copy-on-write of those objects' headers) and turns the collector back on for everything
created after. Where `pause_during_startup` did not turn it off (a library caller, the tests),
both leave it as it is. Its switch, `pause_collector` (speed/switches.py): the pause comes before
the config is read, so only FINETUNE_BUDGET_SPEED=false stops it; `speed.pause_collector=false`
turns the collector on at the job's start without freezing anything.
"""

from __future__ import annotations

import gc

from finetune_budget.speed.switches import enabled, env_all

_paused = False


def pause_during_startup() -> None:
    global _paused
    if gc.isenabled() and env_all():
        gc.disable()
        _paused = True


def resume_after_startup() -> None:
    """Once per process; a no-op unless `pause_during_startup` turned the collector off."""
    global _paused
    if _paused:
        _paused = False
        if enabled("pause_collector"):
            gc.freeze()
        gc.enable()
