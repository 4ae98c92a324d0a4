"""The study's answers from MLflow alone: ROI tables, the reference study's figures, where to stop
(ROI down to 30% of its peak, best epochs, overfitting), checked learning curves, the questions
answered and a decision card; Markdown and HTML.

    python evaluate.py mode=report tracking.experiment=<name>
    python evaluate.py mode=advise tracking.experiment=<name> advise.target_gain=0.05
"""

from __future__ import annotations

import logging
import sys

from omegaconf import DictConfig, OmegaConf

from finetune_budget.report.advice import Advice, AdviceSettings, experiment_advice
from finetune_budget.report.build import Report, ReportSettings, build_report, check_runs
from finetune_budget.report.table import budget_points
from finetune_budget.tracking.query import roi_table

log = logging.getLogger(__name__)

__all__ = [
    "Advice",
    "AdviceSettings",
    "Report",
    "ReportSettings",
    "advise_mode",
    "build_report",
    "report_mode",
]


def _node(cfg: DictConfig, name: str) -> dict | None:
    node = cfg.get(name)
    return OmegaConf.to_container(node, resolve=True) if node is not None else None


def report_mode(cfg: DictConfig) -> dict[str, float]:
    """evaluate.py mode=report: the report of `tracking.experiment` (of one sweep with
    `report.sweep=<parent run id>`). Returns a few headline numbers for the console."""
    node = _node(cfg, "report")
    settings = ReportSettings.from_config(node)
    settings.advise = AdviceSettings.from_config(_node(cfg, "advise"))
    sweep = (node or {}).get("sweep")
    report = build_report(cfg.tracking.uri, cfg.tracking.experiment, settings, parent_run_id=sweep)
    return report.numbers


def advise_mode(cfg: DictConfig) -> list[Advice]:
    """evaluate.py mode=advise: the recommendation and the questions answered, in a few lines
    on stdout, for `advise.metric` (default: the first of report.metrics)."""
    report = ReportSettings.from_config(_node(cfg, "report"))
    s = AdviceSettings.from_config(_node(cfg, "advise"))
    metric = s.metric or report.metrics[0]
    experiment = cfg.tracking.experiment
    sweep = (_node(cfg, "report") or {}).get("sweep")
    df = roi_table(cfg.tracking.uri, experiment, [metric], parent_run_id=sweep)
    df, notes = check_runs(df, [metric], experiment)
    advices = experiment_advice(df, budget_points(df), metric, s)
    lines = [line for a in advices for line in a.lines()] + [f"note: {n}" for n in notes]
    sys.stdout.write("\n".join(lines) + "\n")
    return advices
