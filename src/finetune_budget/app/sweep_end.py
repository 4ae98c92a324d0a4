"""A sweep's end (tracking.log_model=auto): the model of the run the sweep's report recommends,
logged to that run (from the weights kept, the checkpoint, or rebuilt: app.runs)."""

from __future__ import annotations

import logging

from mlflow.tracking import MlflowClient

from finetune_budget.app.runs import log_model_of_run
from finetune_budget.export.logged import LOGGED_MODEL_TAG, check_log_model_option

log = logging.getLogger(__name__)


def sweep_choices(config, children: list, advice: dict | None = None) -> list[tuple[str, str]]:
    """The runs whose model a sweep logs, with why: the run each decision card of the report
    recommends (its data.n, its epochs, the best seed there); where the report recommends none,
    or names a budget no run ended at, the sweep's best finished run by `budget.metric`."""
    metric = config.budget.metric
    done = [
        r
        for r in children
        if r.info.status == "FINISHED"
        and r.data.tags.get("run_type") == "train"
        and metric in r.data.metrics
    ]
    chosen: list[tuple[str, str]] = []
    cards = [a for (_, m), a in (advice or {}).items() if m == metric]
    for advice in cards:
        if advice.run_id and advice.run_id not in {c[0] for c in chosen}:
            why = f"recommended: data.n={advice.n}, {advice.epochs} epochs"
            if advice.run_epochs != advice.epochs:
                why += (
                    f"; no run ended there, this one trained {advice.run_epochs} "
                    f"(retrain with trainer.max_epochs={advice.epochs} for that model)"
                )
            chosen.append((advice.run_id, why))
    if not chosen and done:
        best = max(done, key=lambda r: r.data.metrics[metric])
        why = "no run at the recommended budget" if cards else "no recommendation"
        chosen.append((best.info.run_id, f"best {metric} ({why})"))
    return chosen


def log_sweep_choice(
    config, parent_run_id: str, children: list, advice: dict | None = None
) -> list[str]:
    """At a sweep's end (tracking.log_model=auto): log the model of the run the sweep's report
    recommends (`sweep_choices`; `advice`: the report's, by (group, metric)). Returns the ids of
    the runs whose model was logged."""
    if check_log_model_option(config.tracking.log_model) != "auto":
        return []  # true: every job logged its own; false: none
    client = MlflowClient(config.tracking.uri)
    logged = []
    for run_id, why in sweep_choices(config, children, advice):
        try:
            uri = log_model_of_run(
                config.tracking.uri, run_id, config.tracking.get("registered_model")
            )
        except Exception as e:  # noqa: BLE001 - the sweep's runs are done; keep them
            log.warning("run %s (%s): model not logged: %s: %s", run_id, why, type(e).__name__, e)
            client.set_tag(parent_run_id, "log_model.error", f"{e}"[:5000])
            continue
        logged.append(run_id)
        client.set_tag(parent_run_id, "logged_model_run", ",".join(logged))
        client.set_tag(parent_run_id, "logged_model_why", why)
        client.set_tag(parent_run_id, LOGGED_MODEL_TAG, uri)
        log.info("the sweep's model: run %s (%s), logged as %s", run_id, why, uri)
    return logged
