"""evaluate.py's modes (MODES): `report` and `advise`, the study's answers; `check`, the runs
audited (tracking.audit); and, imported only when they run (they load torch, Lightning and the
tasks: seconds an answer need not wait), `eval`, a model on a held-out split logged as an
evaluation run, `export`, a run's model in its library's format (app.model_modes), and
`external_baseline`, a hosted model scored (app.external_baseline).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from finetune_budget.errors import ConfigError, DataError
from finetune_budget.report.build import ReportSettings, build_report, check_runs
from finetune_budget.study.advice import Advice, AdviceSettings, experiment_advice
from finetune_budget.study.plan import experiment_plans
from finetune_budget.study.table import budget_points
from finetune_budget.tracking.audit import audit_experiment
from finetune_budget.tracking.query import roi_table


def eval_mode(cfg: DictConfig) -> dict[str, float]:
    """evaluate.py mode=eval (app.model_modes.evaluate)."""
    from finetune_budget.app.model_modes import evaluate

    return evaluate(cfg)


def export_mode(cfg: DictConfig) -> Any:
    """evaluate.py mode=export run_id=<id> (app.model_modes.export_mode)."""
    from finetune_budget.app.model_modes import export_mode as export

    return export(cfg)


def external_baseline_mode(cfg: DictConfig) -> dict[str, float]:
    """evaluate.py mode=external_baseline (app.external_baseline.evaluate_external)."""
    from finetune_budget.app.external_baseline import evaluate_external

    return evaluate_external(cfg)


def _node(cfg: DictConfig, name: str) -> dict | None:
    node = cfg.get(name)
    return OmegaConf.to_container(node, resolve=True) if node is not None else None


def report_mode(cfg: DictConfig) -> dict[str, float]:
    """evaluate.py mode=report: the report of `tracking.experiment` (of one sweep with
    `report.sweep=<parent run id>`). Returns a few headline numbers for the console."""
    node = _node(cfg, "report")
    settings = ReportSettings.from_config(node, cfg.budget.metric)
    settings.advise = AdviceSettings.from_config(_node(cfg, "advise"))
    sweep = (node or {}).get("sweep")
    report = build_report(cfg.tracking.uri, cfg.tracking.experiment, settings, parent_run_id=sweep)
    return report.numbers


def advise_mode(cfg: DictConfig) -> list[Advice]:
    """evaluate.py mode=advise: with prices, the plan first (study/plan.py: labels to buy, epochs,
    base model, cost, P(reach the target), what each of report.metrics says there); then the
    recommendation and the questions answered, in a few lines on stdout, for `advise.metric`
    (default: budget.metric, the first of the report's metrics)."""
    report = ReportSettings.from_config(_node(cfg, "report"), cfg.budget.metric)
    s = AdviceSettings.from_config(_node(cfg, "advise"))
    prices = s.prices  # bad prices: one line before anything is read
    metric = s.metric or report.metrics[0]
    # the plan says what every metric of the report would advise at its n
    metrics = [metric] + ([m for m in report.metrics if m != metric] if prices.priced else [])
    experiment = cfg.tracking.experiment
    sweep = (_node(cfg, "report") or {}).get("sweep")
    df = roi_table(cfg.tracking.uri, experiment, metrics, parent_run_id=sweep)
    df, notes = check_runs(df, metrics, experiment)
    metrics = [m for m in metrics if m == metric or (m in df.columns and df[m].notna().any())]
    points = budget_points(df)
    by_metric = {m: experiment_advice(df, points, m, s) for m in metrics}
    advices = by_metric[metric]
    lines = []
    if prices.priced:
        keyed = {(a.key, m): a for m, each in by_metric.items() for a in each}
        lines += [line for p in experiment_plans(keyed, s, metric) for line in p.lines()]
    lines += [line for a in advices for line in a.lines()] + [f"note: {n}" for n in notes]
    sys.stdout.write("\n".join(lines) + "\n")
    return advices


def check_mode(cfg) -> list[str]:
    """evaluate.py mode=check: print the problems of `tracking.experiment`'s runs, one a line;
    fail when there is any."""
    problems = audit_experiment(
        cfg.tracking.uri, cfg.tracking.experiment, stale_after_s=cfg.tracking.stale_after_s
    )
    print_problems(problems, cfg.tracking.experiment)
    return problems


def print_problems(problems: Sequence[str], experiment: str) -> None:
    for line in problems:
        sys.stdout.write(f"{line}\n")
    if problems:
        raise DataError(
            f"{len(problems)} problem(s) in experiment {experiment!r} (listed above); the "
            "answers skip the values named there"
        )
    sys.stdout.write(f"experiment {experiment!r}: no problems found\n")


MODES: dict[str, Callable[[DictConfig], Any]] = {
    "eval": eval_mode,
    "report": report_mode,
    "advise": advise_mode,
    "check": check_mode,
    "export": export_mode,
    "external_baseline": external_baseline_mode,
}


def run_mode(cfg: DictConfig) -> Any:
    mode = cfg.get("mode", "eval")
    if mode not in MODES:
        raise ConfigError(f"mode={mode} is unknown; use one of {', '.join(sorted(MODES))}")
    return MODES[mode](cfg)
