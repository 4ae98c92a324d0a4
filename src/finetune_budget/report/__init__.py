"""The study's answers from MLflow alone: ROI tables, the reference study's figures, where to stop
(ROI down to 30% of its peak, best epochs, overfitting), a learning-curve fit; Markdown and HTML.

    python evaluate.py mode=report tracking.experiment=<name>
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

from finetune_budget.report.build import Report, ReportSettings, build_report

log = logging.getLogger(__name__)

__all__ = ["Report", "ReportSettings", "build_report", "report_mode"]


def report_mode(cfg: DictConfig) -> dict[str, float]:
    """evaluate.py mode=report: the report of `tracking.experiment` (of one sweep with
    `report.sweep=<parent run id>`). Returns a few headline numbers for the console."""
    node = cfg.get("report")
    settings = ReportSettings.from_config(
        OmegaConf.to_container(node, resolve=True) if node is not None else None
    )
    sweep = node.get("sweep") if node is not None else None
    report = build_report(cfg.tracking.uri, cfg.tracking.experiment, settings, parent_run_id=sweep)
    return report.numbers
