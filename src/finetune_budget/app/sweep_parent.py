"""A parent MLflow run per `-m` sweep: its jobs are nested children; it gets the sweep's report.

Wired in conf/hydra/default.yaml (`hydra.callbacks.sweep_parent`);
`hydra.callbacks.sweep_parent=null` turns it off. on_multirun_start creates the parent and puts
its id in the environment variable FINETUNE_BUDGET_SWEEP_PARENT, which train.py passes to
train(..., parent_run_id=...); on_multirun_end attaches the report of the sweep's runs
(artifacts under `report/`) and finishes it. Single runs (no -m) get no parent.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from finetune_budget.tracking.parent import PARENT_ENV, current_parent

# mlflow is imported where it is used: Hydra builds this callback before every job, and a job's
# config check must not wait for mlflow's import.

log = logging.getLogger(__name__)


class SweepParentRun(Callback):
    """report: attach the sweep's report to the parent at the end (needs 2+ budget points)."""

    def __init__(self, report: bool = True, report_settings: dict[str, Any] | None = None) -> None:
        self.report = report
        self.report_settings = dict(report_settings or {})
        self.run_id: str | None = None
        self.sweep_dir: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from finetune_budget.tracking.mlflow_run import (
            experiment_id,
            mlflow_client,
            process_tags,
        )

        uri, experiment = config.tracking.uri, config.tracking.experiment
        client = mlflow_client(uri)
        overrides = " ".join(OmegaConf.to_container(config.hydra.overrides.task))
        self.sweep_dir = str(config.hydra.sweep.dir)
        tags = {
            "run_type": "sweep",
            "sweep.overrides": overrides[:5000],
            "sweep.dir": self.sweep_dir,
            "command": " ".join(sys.argv)[:5000],
            **process_tags(),
        }
        stale_after_s = config.tracking.stale_after_s
        run = client.create_run(
            experiment_id(client, experiment, stale_after_s=stale_after_s),
            run_name=f"sweep {overrides}"[:250],
            tags=tags,
        )
        self.run_id = run.info.run_id
        os.environ[PARENT_ENV] = self.run_id
        log.info("sweep parent run %s (%s, experiment %s)", self.run_id, uri, experiment)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        run_id = self.run_id or current_parent()
        os.environ.pop(PARENT_ENV, None)
        if run_id is None:
            return
        from mlflow.tracking import MlflowClient

        from finetune_budget.tracking.resume import REUSED_TAG_PREFIX

        client = MlflowClient(config.tracking.uri)
        exp_id = client.get_run(run_id).info.experiment_id
        children = client.search_runs(
            [exp_id], f"tags.`mlflow.parentRunId` = '{run_id}'", max_results=5000
        )
        reused = client.search_runs(
            [exp_id],
            f"tags.`{REUSED_TAG_PREFIX}{run_id}` = 'true'",
            max_results=5000,
        )
        failed = sum(r.info.status != "FINISHED" for r in children)
        jobs = len(children) + len(reused)
        client.set_tag(run_id, "sweep.jobs", str(jobs))
        client.set_tag(run_id, "sweep.failed_jobs", str(failed))
        client.set_tag(run_id, "sweep.reused_jobs", str(len(reused)))
        log.info(
            "%d of %d points reused (finished before; budget.rerun=true trains them again)",
            len(reused),
            jobs,
        )
        from finetune_budget.app.sweep_end import log_sweep_choice

        # tracking.log_model=auto: the model of the run the report recommends, logged while a
        # forked process draws the report's figures
        outcome: list[Exception | None] = []  # the logging's error, or None, once it ran

        def log_choice(advice: dict | None) -> None:
            try:
                log_sweep_choice(config, run_id, children, advice)
            except Exception as e:  # noqa: BLE001 - raised below, not as the report's error
                outcome.append(e)
            else:
                outcome.append(None)

        report = self._attach_report(config, run_id, client, log_choice)
        if not outcome:  # no report, or it stopped before its figures
            log_choice(report.advice if report is not None else None)
        if outcome[0] is not None:
            raise outcome[0]
        from finetune_budget.speed import reuse

        reuse.clear_final_weights()
        client.set_terminated(run_id, "FINISHED")
        log.info("sweep parent run %s finished: %d jobs, %d failed", run_id, jobs, failed)

    def _attach_report(
        self, config: DictConfig, run_id: str, client: Any, alongside: Any = None
    ) -> Any:
        """The sweep's report on its jobs, budget.metric first, attached to its parent."""
        if not self.report:
            return None
        from finetune_budget.errors import BudgetError
        from finetune_budget.report.build import ReportSettings, build_report

        settings = ReportSettings.from_config(self.report_settings, config.budget.metric)
        if settings.out_dir is None:
            settings.out_dir = str(Path(self.sweep_dir or ".") / "report")
        try:
            return build_report(
                config.tracking.uri,
                config.tracking.experiment,
                settings,
                parent_run_id=run_id,
                attach_to_run=run_id,
                alongside=alongside,
            )
        except BudgetError as e:
            log.warning("no report for this sweep: %s", e)
            client.set_tag(run_id, "report.error", str(e)[:5000])
        except Exception as e:  # noqa: BLE001 - the sweep's runs are done; keep them finished
            log.exception("the sweep report failed: %s", e)
            client.set_tag(run_id, "report.error", f"{type(e).__name__}: {e}"[:5000])
