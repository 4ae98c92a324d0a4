"""An audit of an MLflow store's training runs: what every answer of the project rests on.

    python evaluate.py mode=check tracking.experiment=<name>     (app.modes.check_mode)

One line per problem, and the command fails (exit 1) when there is any:
- a run's per-epoch history holds a second value at a step, or a step-0 value logged after
  training began (tracking/history.py: neither is read);
- a point (config, seed, version) has more than one FINISHED training run (`budget.rerun=true`
  runs are asked for and not counted);
- a FINISHED training run has no trained epoch;
- a run is left RUNNING by a process that is gone;
- a run's logged `gain/<metric>` at an epoch differs from the gain the ROI table computes for it
  from the logged metrics (the report's gain).

Reading only: the audit changes nothing in the store.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from finetune_budget.errors import DataError
from finetune_budget.study.roi import gains
from finetune_budget.tracking.history import HistoryProblem, epoch_values
from finetune_budget.tracking.mlflow_run import why_stale
from finetune_budget.tracking.query import all_runs
from finetune_budget.tracking.resume import EPOCH_PREFIXES, POINT_TAG

log = logging.getLogger(__name__)

AUDITED_PREFIXES = (*EPOCH_PREFIXES, "cost/")
GAIN_TOLERANCE = 1e-9  # relative; the same float64 arithmetic on the same logged values


def _asked_to_rerun(run: Run) -> bool:
    return run.data.params.get("budget.rerun", "False").lower() == "true"


def _float(text: str | None, default: float) -> float:
    try:
        return float(text) if text not in (None, "None") else default
    except ValueError:
        return default


def history_lines(found: Sequence[HistoryProblem]) -> list[str]:
    """One line per run and kind of history problem (the first value named, the rest counted)."""
    by_kind: dict[tuple[str, str], list[HistoryProblem]] = defaultdict(list)
    for problem in found:
        by_kind[(problem.run_id, problem.kind)].append(problem)
    lines = []
    for (_, _), group in by_kind.items():
        more = len(group) - 1
        lines.append(str(group[0]) + (f"; and {more} more value(s) like it" if more else ""))
    return lines


def gain_problems(run: Run, by_step: dict[int, dict[str, float]]) -> list[str]:
    """Where the run's logged gain at an epoch differs from the gain of its logged metrics over
    its logged epoch 0 (what the ROI table and the report compute)."""
    base = by_step.get(0, {})
    floor = _float(run.data.params.get("budget.gain_floor"), 0.01)
    problems = []
    for step, values in sorted(by_step.items()):
        if step == 0:
            continue
        measured = {k: v for k, v in values.items() if k.startswith("val/") and k in base}
        n = int(values.get("data/n", 0) or 0)
        expected = gains(measured, base, n, values.get("time/train_s", math.nan), floor)
        for key, want in expected.items():
            if not key.startswith("gain/") or key not in values:
                continue
            got = values[key]
            if math.isnan(want) and math.isnan(got):
                continue
            if not math.isclose(got, want, rel_tol=GAIN_TOLERANCE, abs_tol=1e-12):
                problems.append(
                    f"run {run.info.run_id}: {key} logged at epoch {step} is {got:.6g}, but its "
                    f"logged metrics give {want:.6g}"
                )
    return problems


def audit_experiment(
    tracking_uri: str, experiment: str, *, stale_after_s: float | None
) -> list[str]:
    """The problems of `experiment`'s runs, one line each (empty: the store is sound);
    stale_after_s: tracking.stale_after_s, the age after which another host's RUNNING run is
    called left behind (None: never)."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise DataError(
            f"experiment {experiment!r} not found in {tracking_uri}; set tracking.experiment="
        )
    problems: list[str] = []
    finished_by_point: dict[str, list[str]] = defaultdict(list)
    for run in all_runs(client, found.experiment_id):
        run_id, status = run.info.run_id, run.info.status
        if status == "RUNNING":
            reason = why_stale(run, stale_after_s)
            if reason is not None:
                problems.append(f"run {run_id}: left RUNNING, but {reason}")
        if run.data.tags.get("run_type") != "train":
            continue
        keys = [k for k in run.data.metrics if k.startswith(AUDITED_PREFIXES)]
        by_step, found_problems = epoch_values(client, run_id, keys)
        problems.extend(history_lines(found_problems))
        if status != "FINISHED":
            continue
        if not any(step > 0 for step in by_step):
            problems.append(f"run {run_id}: FINISHED without a trained epoch")
        problems.extend(gain_problems(run, by_step))
        point = run.data.tags.get(POINT_TAG)
        if point and not _asked_to_rerun(run) and run.data.tags.get("state") != "pruned":
            finished_by_point[point].append(run_id)
    for point, run_ids in sorted(finished_by_point.items()):
        if len(run_ids) > 1:
            problems.append(
                f"point {point}: {len(run_ids)} FINISHED training runs ({', '.join(run_ids)}); "
                "each point is trained once unless budget.rerun=true"
            )
    return problems
