"""The budget tracker: training time (evaluation excluded), samples seen, training FLOPs, metrics,
gains and ROI per epoch, written to MLflow with step = epoch (0 = the pretrained model).

`cost/train_flops` is a machine-independent cost: torch's FlopCounterMode counts the first
training step (forward and backward, matmuls and convolutions), per real token for text batches
(attention mask) or per item otherwise, and every step adds that rate times its tokens or items.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.flop_counter import FlopCounterMode

from finetune_budget.study.roi import gains
from finetune_budget.tracking.mlflow_run import TrackedRun

log = logging.getLogger(__name__)


def cost_units(batch: Any) -> tuple[int, int]:
    """(items, cost units) of a training batch: units are the real tokens of its tokenised texts
    (attention masks) when it holds no images (tensors of 3+ dims), else items."""
    parts = list(batch.values()) if isinstance(batch, dict) else [batch]
    first = parts[0]
    items = first["input_ids"].shape[0] if isinstance(first, dict) else len(first)
    texts = [p for p in parts if isinstance(p, dict) and "attention_mask" in p]
    images = [p for p in parts if isinstance(p, torch.Tensor) and p.dim() >= 3]
    if texts and not images:
        return items, int(sum(int(p["attention_mask"].sum()) for p in texts))
    return items, items


def _sync(module: L.LightningModule) -> None:
    if module.device.type == "cuda":
        torch.cuda.synchronize(module.device)


def _eval_batch_items(batch: Any) -> int:
    """Held-out items in an evaluation batch: every task's eval batch carries their `index`
    (another format counts 0, so its epoch 0 is never cached rather than cached wrongly)."""
    if isinstance(batch, dict) and "index" in batch:
        return len(batch["index"])
    return 0


def held_out_size(trainer: L.Trainer) -> int | None:
    """Items in the validation loaders' datasets (None when a loader has no sized dataset)."""
    loaders = trainer.val_dataloaders
    if loaders is None:
        return None
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    elif not isinstance(loaders, list | tuple):
        loaders = [loaders]
    try:
        return sum(len(loader.dataset) for loader in loaders)
    except (AttributeError, TypeError):
        return None


class BudgetTracker(Callback):
    """Records one row per evaluated epoch in `history` and logs it to the tracked MLflow run.

    max_train_s: stop training once this many seconds of training are spent (None: no cap).
    """

    def __init__(
        self,
        run: TrackedRun | None,
        n_labels: int,
        gain_floor: float = 0.01,
        max_train_s: float | None = None,
    ) -> None:
        self.run = run
        self.n_labels = n_labels
        self.gain_floor = gain_floor
        self.max_train_s = max_train_s
        self.history: list[dict[str, float]] = []
        self.baseline: dict[str, float] = {}
        # how epoch 0 was obtained (the run tags baseline_cached, baseline_key, ...): a run that
        # continues this one's saved state sets them again without evaluating epoch 0
        self.baseline_tags: dict[str, str] = {}
        self.train_s = 0.0
        self.samples_seen = 0
        self.train_flops = 0.0
        self.flops_per_unit: float | None = None  # measured on the first training step
        self._counter: FlopCounterMode | None = None
        self.epoch_loss_sum = 0.0
        self.epoch_batches = 0
        self._train_t0: float | None = None
        self._eval_t0: float | None = None
        # items embedded by the last validation, and the held-out split's size
        self.eval_items_seen = 0
        self.eval_items_total: int | None = None

    # -- state for runs that continue from a saved epoch -----------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.history,
            "baseline": self.baseline,
            "baseline_tags": self.baseline_tags,
            "train_s": self.train_s,
            "samples_seen": self.samples_seen,
            "train_flops": self.train_flops,
            "flops_per_unit": self.flops_per_unit,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])
        self.baseline = dict(state["baseline"])
        self.baseline_tags = dict(state.get("baseline_tags", {}))
        self.train_s = float(state["train_s"])
        self.samples_seen = int(state["samples_seen"])
        self.train_flops = float(state.get("train_flops", 0.0))
        self.flops_per_unit = state.get("flops_per_unit")

    # -- recording -------------------------------------------------------------------------------
    def record(
        self,
        epoch: int,
        metrics: dict[str, float],
        eval_s: float,
        log_to_run: bool = True,
        **extra: float,
    ) -> dict[str, float]:
        """Add the row of `epoch` (0 = pretrained baseline) and log it at step = epoch."""
        if epoch == 0:
            self.baseline = dict(metrics)
        row: dict[str, float] = {"epoch": epoch, **metrics}
        row["time/train_s"] = self.train_s
        row["time/eval_s"] = eval_s
        row["data/samples_seen"] = self.samples_seen
        row["data/n"] = self.n_labels
        if self.train_flops > 0:
            row["cost/train_flops"] = self.train_flops
        row.update(extra)
        if epoch > 0:
            row.update(gains(metrics, self.baseline, self.n_labels, self.train_s, self.gain_floor))
        self.history = [r for r in self.history if r["epoch"] != epoch] + [row]
        if self.run is not None and log_to_run:
            self.run.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
        return row

    # -- timing ----------------------------------------------------------------------------------
    def _stop_train_clock(self, pl_module: L.LightningModule) -> None:
        if self._train_t0 is not None:
            _sync(pl_module)
            self.train_s += time.perf_counter() - self._train_t0
            self._train_t0 = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_loss_sum, self.epoch_batches = 0.0, 0
        _sync(pl_module)
        self._train_t0 = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.flops_per_unit is None and self._counter is None:
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()

    def _stop_counter(self, units: int) -> None:
        counter, self._counter = self._counter, None
        counter.__exit__(None, None, None)
        total = counter.get_total_flops()
        self.flops_per_unit = total / units if units and total else math.nan

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        size, units = cost_units(batch)
        if self._counter is not None:
            self._stop_counter(units)
        if self.flops_per_unit is not None and math.isfinite(self.flops_per_unit):
            self.train_flops += self.flops_per_unit * units * trainer.world_size
        self.samples_seen += size * trainer.world_size
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.epoch_loss_sum += float(loss.detach())
            self.epoch_batches += 1
        if self.max_train_s is not None and self._train_t0 is not None:
            if self.train_s + time.perf_counter() - self._train_t0 >= self.max_train_s:
                log.info("budget.max_train_s=%s reached: stopping training", self.max_train_s)
                trainer.should_stop = True

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_train_clock(pl_module)
        self.eval_items_seen = 0
        self._eval_t0 = time.perf_counter()

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self.eval_items_seen += _eval_batch_items(batch)

    @property
    def eval_complete(self) -> bool:
        """Whether the last validation embedded every held-out item."""
        return self.eval_items_total is not None and self.eval_items_seen == self.eval_items_total

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _sync(pl_module)
        eval_s = time.perf_counter() - (self._eval_t0 or time.perf_counter())
        self.eval_items_total = held_out_size(trainer)
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        fitting = trainer.state.fn == "fit"
        epoch = trainer.current_epoch + 1 if fitting else 0
        extra = {}
        if fitting and self.epoch_batches:
            extra["train/loss_epoch"] = self.epoch_loss_sum / self.epoch_batches
        self.record(epoch, dict(pl_module.eval_metrics), eval_s, **extra)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception) -> None:
        if self._counter is not None:  # leave no FLOP counter active after a failed step
            self._counter.__exit__(None, None, None)
            self._counter = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_train_clock(pl_module)  # when no validation ran this epoch

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Record what the module asks for on the run: `run_tags` (str) and `run_metrics` (at the
        last epoch). Modules never write to MLflow themselves."""
        if self.run is None or not trainer.is_global_zero:
            return
        tags = getattr(pl_module, "run_tags", None)
        if tags:
            self.run.set_tags(tags)
        metrics = getattr(pl_module, "run_metrics", None)
        if metrics:
            step = int(self.history[-1]["epoch"]) if self.history else 0
            self.run.log_metrics(metrics, step=step)
