"""What the entry points share: argv rewriting, error reporting, the run table, the exit code, the
allocator setting (allocator.keep_freed_memory, once per process), and a console without the
libraries' chatter (console.py: it goes to the job's log file).

A job's config is checked first (config.check_config: types, ranges, files, the tracking store, the
device), before the heavy imports, so a typo is reported in about a second. A job that fails is
logged as one line (BudgetError: what is wrong and how to fix it; with its traceback when
HYDRA_FULL_ERROR=1 or FINETUNE_BUDGET_DEBUG=1) or with its traceback (anything else), its MLflow
run is marked FAILED, and a sweep's other jobs go on; the process exits 1 at the end.
Imports nothing heavy (no torch, lightning or mlflow).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from omegaconf import DictConfig

from finetune_budget.config import check_config, expand_range_overrides
from finetune_budget.console import quiet_libraries
from finetune_budget.distributed import is_main_process
from finetune_budget.errors import BudgetError, one_line
from finetune_budget.speed import switches
from finetune_budget.speed.allocator import keep_freed_memory
from finetune_budget.speed.collector import resume_after_startup

log = logging.getLogger("finetune_budget")

FAILED_JOBS: list[str] = []
JOBS: list[int] = []  # one entry per job this process ran
__all__ = [
    "evaluate_job",
    "exit_code",
    "exit_now",
    "expand_argv",
    "format_table",
    "guarded_job",
    "is_main_process",
    "train_job",
    "tune_job",
]


def expand_argv(argv: Sequence[str]) -> list[str]:
    """sys.argv with `key=a..b` ranges rewritten for Hydra."""
    try:
        return [argv[0], *expand_range_overrides(argv[1:])]
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def show_tracebacks() -> bool:
    return any(os.environ.get(k, "") not in ("", "0") for k in ("HYDRA_FULL_ERROR", DEBUG_ENV))


DEBUG_ENV = "FINETUNE_BUDGET_DEBUG"


def guarded_job(job: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Check the config, then run one Hydra job; report a failure instead of aborting the sweep."""
    JOBS.append(1)
    quiet_libraries()  # those imported so far; each job again after its heavy imports
    try:
        switches.configure(cfg.get("speed"))  # the fast paths (speed/switches.py)
        keep_freed_memory()  # once per process: no page faults for the tensors freed every step
        check_config(cfg)
        return job(cfg)
    except BudgetError as e:
        FAILED_JOBS.append(one_line(e))
        log.error("error: %s", one_line(e), exc_info=show_tracebacks())
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - a sweep's other jobs go on
        FAILED_JOBS.append(f"{type(e).__name__}: {e}")
        log.exception("job failed: %s", e)
    return float("nan")


def exit_code() -> int:
    if FAILED_JOBS and len(JOBS) > 1:  # a single job's error line says it all
        log.error(
            "%d of %d jobs failed (those that had started an MLflow run have it marked FAILED)",
            len(FAILED_JOBS),
            len(JOBS),
        )
    return 1 if FAILED_JOBS else 0


def exit_now(code: int) -> NoReturn:
    """Leave the process with `code` as Python's own exit would, less the teardown of every module
    and object (2-5 s once torch, Lightning and MLflow are loaded): the non-daemon threads are
    joined and the atexit handlers run (MLflow, logging, temporary files), stdout and stderr are
    flushed, then the process ends. `speed.quick_exit=false` (the last job's; speed/switches.py):
    sys.exit, the full teardown."""
    import atexit
    import sys
    import threading

    join_threads = getattr(threading, "_shutdown", None)  # what Python's exit calls first
    if not switches.enabled("quick_exit") or join_threads is None:
        sys.exit(code)
    try:
        join_threads()
        atexit._run_exitfuncs()
        logging.shutdown()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def format_table(
    history: list[dict[str, float]],
    metric_keys: Sequence[str] | None = None,
    *,
    budget_metric: str,
) -> str:
    """Per epoch: metrics, relative gain, training seconds and both ROIs of `budget_metric`."""
    if not history:
        return "(no epochs recorded)"
    if metric_keys is None:
        metric_keys = [k for k in history[0] if k.startswith(("val/", "probe/"))][:5]
    name = budget_metric.split("/", 1)[-1]
    columns = [
        "epoch",
        *metric_keys,
        f"gain/{name}",
        "time/train_s",
        f"roi_label/{name}",
        f"roi_s/{name}",
    ]
    rows = [
        [_fmt(r.get(c, float("nan"))) for c in columns]
        for r in sorted(history, key=lambda r: r["epoch"])
    ]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


# ---- the entry points' jobs: the heavy imports happen here, after guarded_job checked the config


def train_job(cfg: DictConfig) -> float:
    """train.py: one run (or a reused finished run of the same point); prints its table."""
    from finetune_budget.app.tuning.objectives import sweep_objective
    from finetune_budget.tracking.parent import current_parent
    from finetune_budget.training.run import train

    resume_after_startup()  # the heavy modules are imported: collect what is created from here
    quiet_libraries()  # their chatter to the job's log file (console.py)
    result = train(cfg, parent_run_id=current_parent())
    if is_main_process(cfg.trainer):  # ranks 1.. of a multi-process run print nothing
        if result.reused:
            print(
                f"\nreused run {result.run_id}: this point (config, seed, version) finished "
                "before; budget.rerun=true trains it again"
            )
        print(f"\nMLflow run {result.run_id} ({cfg.tracking.uri}, {cfg.tracking.experiment})")
        print(format_table(result.history, budget_metric=cfg.budget.metric))
    return sweep_objective(cfg, result)  # tune.objectives of hparams_search, else budget.metric


def evaluate_job(cfg: DictConfig) -> Any:
    """evaluate.py: the mode's result; an evaluation's metrics are printed."""
    from finetune_budget.app.modes import run_mode

    resume_after_startup()
    quiet_libraries()  # their chatter to the job's log file (console.py)
    result = run_mode(cfg)
    if isinstance(result, dict):
        for key, value in result.items():
            print(f"{key:28s} {value:.4f}")
    return result


def tune_job(cfg: DictConfig) -> float:
    """tune.py: an Optuna search; prints its trials and the cheapest one near the best."""
    from finetune_budget.app.tuning import run_search

    resume_after_startup()
    quiet_libraries()  # their chatter to the job's log file (console.py)
    result = run_search(cfg)
    study = result.study.study_name
    print(f"\nstudy {study}: {result.counts}; MLflow parent run {result.parent_run_id}")
    print(result.table())
    if result.cheapest is not None:
        share = cfg.tune.target_share
        print(f"cheapest trial reaching {share:.0%} of the best gain: {result.cheapest['trial']}")
    return float(result.rows[0][result.objectives[0].metric]) if result.rows else float("nan")
