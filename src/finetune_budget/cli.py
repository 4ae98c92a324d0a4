"""What the entry points share: argv rewriting, error reporting, the run table, the exit code.

A job that fails is logged as one line (BudgetError) or with its traceback (anything else), its
MLflow run is marked FAILED, and a sweep's other jobs go on; the process exits 1 at the end.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

from omegaconf import DictConfig

from finetune_budget.config import expand_range_overrides
from finetune_budget.distributed import is_main_process
from finetune_budget.errors import BudgetError

log = logging.getLogger("finetune_budget")

FAILED_JOBS: list[str] = []
__all__ = ["exit_code", "expand_argv", "format_table", "guarded_job", "is_main_process"]


def expand_argv(argv: Sequence[str]) -> list[str]:
    """sys.argv with `key=a..b` ranges rewritten for Hydra."""
    try:
        return [argv[0], *expand_range_overrides(argv[1:])]
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def guarded_job(job: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run one Hydra job; report a failure instead of aborting the sweep."""
    try:
        return job(cfg)
    except BudgetError as e:
        FAILED_JOBS.append(str(e))
        log.error("error: %s", e)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - a sweep's other jobs go on
        FAILED_JOBS.append(f"{type(e).__name__}: {e}")
        log.exception("job failed: %s", e)
    return float("nan")


def exit_code() -> int:
    if FAILED_JOBS:
        log.error("%d job(s) failed; their MLflow runs are marked FAILED", len(FAILED_JOBS))
    return 1 if FAILED_JOBS else 0


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def format_table(
    history: list[dict[str, float]],
    metric_keys: Sequence[str] | None = None,
    budget_metric: str = "val/mrr_at_20",
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
