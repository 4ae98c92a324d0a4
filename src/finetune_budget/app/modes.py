"""evaluate.py's modes (MODES): `eval`, a model (pretrained, a run's logged model or checkpoint)
on a held-out split, logged to MLflow as an evaluation run with the same metrics as training
(step 0); `report` and `advise`, the study's answers; `export`, a run's model in its library's
format; `check`, the runs audited (tracking.audit); `external_baseline`, a hosted model scored.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from finetune_budget.app.external_baseline import evaluate_external
from finetune_budget.app.runs import (
    apply_weights,
    config_of_run,
    load_weights,
    log_model_of_run,
    module_of_run,
    weights_of_run,
)
from finetune_budget.config import resolve_precision
from finetune_budget.errors import ConfigError, DataError
from finetune_budget.export.formats import Exported, export_model
from finetune_budget.report.build import ReportSettings, build_report, check_runs
from finetune_budget.study.advice import Advice, AdviceSettings, experiment_advice
from finetune_budget.study.plan import experiment_plans
from finetune_budget.study.table import budget_points
from finetune_budget.tasks import build_task
from finetune_budget.tracking.audit import audit_experiment
from finetune_budget.tracking.mlflow_run import tracked_run
from finetune_budget.tracking.query import roi_table
from finetune_budget.training.run import run_config

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate `cfg.model` (or `cfg.checkpoint`) on `cfg.data`'s held-out split; with `run_id`,
    the model that training run logged (or its checkpoint) on the run's own task, model and data.
    """
    checkpoint = cfg.get("checkpoint")
    weights = None
    if cfg.get("run_id"):
        cfg, weights = run_to_evaluate(cfg)
        checkpoint = weights[1]
    tags = {
        "task": cfg.task.name,
        "model": cfg.model.name,
        "data": cfg.data.name,
        "run_type": "evaluation",
        "checkpoint": checkpoint or "pretrained",
    }
    if cfg.get("run_id"):
        tags["evaluated_run_id"] = cfg.run_id
    with tracked_run(
        cfg.tracking.uri,
        cfg.tracking.experiment,
        run_config(cfg),
        tags=tags,
        run_name=cfg.tracking.get("run_name"),
    ) as run:
        L.seed_everything(cfg.seed, verbose=False)
        parts = build_task(cfg)
        if weights is not None:
            apply_weights(parts.module, weights)  # a logged model or a checkpoint
        elif checkpoint:
            load_weights(parts.module, checkpoint)
        trainer = instantiate(
            cfg.trainer,
            logger=False,
            callbacks=[],
            precision=resolve_precision(
                cfg.trainer.get("precision"), cfg.trainer.get("accelerator")
            ),
        )
        start = time.perf_counter()
        trainer.validate(parts.module, datamodule=parts.datamodule, verbose=False)
        metrics = dict(parts.module.eval_metrics)
        metrics["time/eval_s"] = time.perf_counter() - start
        run.log_metrics(metrics, step=0)
        log.info("evaluation run %s: %s", run.run_id, metrics)
        return metrics


def run_to_evaluate(cfg: DictConfig) -> tuple[DictConfig, tuple[str, str]]:
    """`cfg` with the training run's task, model, data, loss, optim, eval and seed, and where the
    run's weights are (its logged model, else its checkpoint)."""
    run_cfg, run = config_of_run(cfg.tracking.uri, cfg.run_id)
    weights = weights_of_run(run)
    if weights is None:
        raise ConfigError(
            f"run {cfg.run_id} kept no weights (a sweep job, or tracking.save_checkpoint=false); "
            f"`python evaluate.py mode=export run_id={cfg.run_id}` rebuilds and logs them"
        )
    cfg = cfg.copy()
    with open_dict(cfg):
        for key in ("task", "model", "data", "loss", "optim", "eval", "seed"):
            if key in run_cfg:
                cfg[key] = run_cfg[key]
    return cfg, weights


def export_mode(cfg) -> Exported:
    """`python evaluate.py mode=export run_id=<id>`: write the run's model in its library's format
    (export.dir, default <output_dir>/export), log it to the run and register it
    (export.registered_model, default `<experiment>-<task>`)."""
    run_id = cfg.get("run_id")
    if not run_id:
        raise ConfigError("mode=export needs run_id=<id of a training run>; copy it from the UI")
    export_cfg = cfg.get("export") or {}
    run_cfg, _ = config_of_run(cfg.tracking.uri, run_id)
    name = export_cfg.get("registered_model") or (
        f"{run_cfg.tracking.experiment}-{run_cfg.task.name}"
    )
    model_uri = log_model_of_run(cfg.tracking.uri, run_id, name)
    module = module_of_run(cfg.tracking.uri, run_id, rebuild=False)
    folder = export_cfg.get("dir") or str(Path(cfg.paths.output_dir) / "export")
    exported = export_model(module, folder)
    log.info("run %s: %s, registered as %s; files in %s", run_id, model_uri, name, folder)
    return exported


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
    """evaluate.py mode=advise: with prices, the plan first (study/plan.py: labels to buy, epochs,
    base model, cost, P(reach the target), what each of report.metrics says there); then the
    recommendation and the questions answered, in a few lines on stdout, for `advise.metric`
    (default: the first of report.metrics)."""
    report = ReportSettings.from_config(_node(cfg, "report"))
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
    problems = audit_experiment(cfg.tracking.uri, cfg.tracking.experiment)
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


MODES: dict[str, Callable[[DictConfig], Any]] = {"eval": evaluate, "report": report_mode}
MODES["export"] = export_mode
MODES["external_baseline"] = evaluate_external
MODES["advise"] = advise_mode
MODES["check"] = check_mode


def run_mode(cfg: DictConfig) -> Any:
    mode = cfg.get("mode", "eval")
    if mode not in MODES:
        raise ConfigError(f"mode={mode} is unknown; use one of {', '.join(sorted(MODES))}")
    return MODES[mode](cfg)
