"""A Lightning callback that reports each epoch's value to an Optuna trial and stops the trial
cleanly when the pruner says so.

optuna_integration.PyTorchLightningPruningCallback imports with lightning 2.6, but it raises
TrialPruned inside `fit`, which marks the trial's MLflow run FAILED and skips what `train()` does
after fitting. This callback sets `trainer.should_stop` instead: the run ends FINISHED with every
epoch it trained recorded, and the search marks the trial pruned afterwards (`pruned_epoch`).
"""

from __future__ import annotations

import logging
import math

import lightning as L
import optuna
from lightning.pytorch.callbacks import Callback

from finetune_budget.training.tracker import BudgetTracker

log = logging.getLogger(__name__)


class EpochPruning(Callback):
    """Report `monitor` at step = epoch (1, 2, ...) after each validation; stop when pruned.

    monitor: a key of the budget tracker's per-epoch row (val/*, gain/*, roi_*), or of
    trainer.callback_metrics.
    """

    def __init__(self, trial: optuna.trial.Trial, monitor: str) -> None:
        self.trial = trial
        self.monitor = monitor
        self.pruned_epoch: int | None = None
        self.last_value: float | None = None

    def _value(self, trainer: L.Trainer, epoch: int) -> float | None:
        for callback in trainer.callbacks:
            if isinstance(callback, BudgetTracker):
                rows = [r for r in callback.history if r["epoch"] == epoch]
                if rows and self.monitor in rows[0]:
                    return float(rows[0][self.monitor])
        value = trainer.callback_metrics.get(self.monitor)
        return None if value is None else float(value)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or self.pruned_epoch is not None:
            return
        epoch = trainer.current_epoch + 1
        value = self._value(trainer, epoch)
        if value is None:
            log.warning(
                "trial %d: no %s at epoch %d to report", self.trial.number, self.monitor, epoch
            )
            return
        self.last_value = value
        # NaN (a collapsed model) is reported as it is: Optuna's pruners prune it.
        self.trial.report(value if math.isfinite(value) else float("nan"), step=epoch)
        if self.trial.should_prune():
            log.info(
                "trial %d pruned at epoch %d (%s = %.4g)",
                self.trial.number,
                epoch,
                self.monitor,
                value,
            )
            self.pruned_epoch = epoch
            trainer.should_stop = True
