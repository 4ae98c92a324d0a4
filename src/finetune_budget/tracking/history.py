"""A run's per-epoch metrics read back from MLflow: one value per (metric, step), where step is
the epoch and step 0 the pretrained model.

MLflow keeps every value ever logged under a (metric, step), so a later write can add a second
value to an epoch that was already recorded. Such a second value is a corruption of the run's
history: it is reported (`HistoryProblem`, a warning, `evaluate.py mode=check`) and never read.
The value read is the first one logged. A step-0 value logged after the run's first trained epoch
cannot be the pretrained model's (stores written by finetune-budget 0.1.0, whose model logging
re-logged each final metric at step 0): it is reported and skipped too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HistoryProblem:
    """A value of a run's history that is not read: `kind` is `duplicate` (a second value at a
    step) or `late_epoch_0` (a step-0 value logged after training had started)."""

    run_id: str
    key: str
    step: int
    kind: str
    kept: float | None
    ignored: float

    def __str__(self) -> str:
        if self.kind == "late_epoch_0":
            return (
                f"run {self.run_id}: {self.key} has a step-0 value {self.ignored:.6g} logged "
                "after training began (not the pretrained model's; ignored)"
            )
        return (
            f"run {self.run_id}: {self.key} has a second value {self.ignored:.6g} at step "
            f"{self.step} (first: {self.kept:.6g}, which is read)"
        )


def epoch_values(
    client: Any, run_id: str, keys: Iterable[str], max_step: int | None = None
) -> tuple[dict[int, dict[str, float]], list[HistoryProblem]]:
    """{step: {key: value}} for `keys` of run `run_id` (steps 0..max_step when given), one value
    per (key, step): the first logged. Also the values left out, as problems."""
    histories = {key: list(client.get_metric_history(run_id, key)) for key in keys}
    trained_from = min(
        (m.timestamp for ms in histories.values() for m in ms if m.step > 0), default=None
    )
    by_step: dict[int, dict[str, float]] = {}
    problems: list[HistoryProblem] = []
    for key, entries in histories.items():
        for m in sorted(entries, key=lambda m: m.timestamp):  # stable: logged order kept
            step = int(m.step)
            if step < 0 or (max_step is not None and step > max_step):
                continue
            if step == 0 and trained_from is not None and m.timestamp > trained_from:
                problems.append(HistoryProblem(run_id, key, 0, "late_epoch_0", None, m.value))
                continue
            row = by_step.setdefault(step, {})
            if key in row:
                problems.append(HistoryProblem(run_id, key, step, "duplicate", row[key], m.value))
                continue
            row[key] = m.value
    return by_step, problems


def read_epochs(
    client: Any, run_id: str, keys: Iterable[str], max_step: int | None = None
) -> dict[int, dict[str, float]]:
    """epoch_values, with one warning per run whose history holds values that are not read."""
    by_step, problems = epoch_values(client, run_id, keys, max_step)
    if problems:
        log.warning(
            "run %s: %d logged value(s) of its history are not read (%s); "
            "`python evaluate.py mode=check` lists them",
            run_id,
            len(problems),
            problems[0],
        )
    return by_step
