"""Epoch budgets that cost one run: a k-epoch job continues from the saved epoch-j state (j < k)
of a finished job with the same config and seed instead of training from scratch.

    python train.py -m data.n=100,500 trainer.max_epochs=1..4   # 4 epochs per n, not 10

Valid only when the learning-rate schedule does not depend on `trainer.max_epochs`
(`optim.schedule=warmup_constant`): then a k-epoch run is exactly the first k epochs of any longer
run. The state (model, optimizer, scheduler, loops, the BudgetTracker's history and training time,
the RNG states and the train sampler's generator) is a Lightning checkpoint under
`paths.cache_dir/continuation/<key>/`, keyed by a hash of the resolved config without
`trainer.max_epochs`; only the latest epoch's state per key is kept.
`budget.continue_shorter_runs=false` turns it off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from finetune_budget.config import flatten
from finetune_budget.tracking.budget_tracker import BudgetTracker
from finetune_budget.tracking.mlflow_run import TrackedRun

log = logging.getLogger(__name__)

# Schedules whose learning rate at step s does not depend on the total number of steps.
EPOCH_FREE_SCHEDULES = ("warmup_constant",)
# Config keys that do not change what the first epochs of a run compute.
IGNORED_PREFIXES = (
    "trainer.max_epochs",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.default_root_dir",
    "trainer.log_every_n_steps",
    "paths.",
    "tracking.run_name",
    "tracking.save_checkpoint",
    "tracking.log_model",
    "tracking.registered_model",
    "budget.continue_shorter_runs",
    "budget.continuation_max_configs",
    "hydra.",
)


def continuation_key(config: dict[str, Any]) -> str:
    """A hash of the resolved run config without `trainer.max_epochs` (and bookkeeping keys)."""
    flat = {k: v for k, v in flatten(config).items() if not k.startswith(IGNORED_PREFIXES)}
    blob = json.dumps(flat, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def why_not_continuable(cfg: DictConfig) -> str | None:
    """None when a run of `cfg` may continue from (and save) an epoch state, else the reason."""
    if not cfg.get("budget", {}).get("continue_shorter_runs", False):
        return "budget.continue_shorter_runs is false"
    schedule = cfg.optim.get("schedule", "warmup_constant")
    if schedule not in EPOCH_FREE_SCHEDULES:
        return f"optim.schedule={schedule} depends on trainer.max_epochs"
    if cfg.budget.get("max_train_s") is not None:
        return "budget.max_train_s stops runs by time, not by epochs"
    if cfg.trainer.get("max_steps", -1) not in (-1, None):
        return "trainer.max_steps is set"
    if (
        str(cfg.trainer.get("devices", 1)) not in ("1", "[0]")
        or cfg.trainer.get("num_nodes", 1) != 1
    ):
        return "more than one device (or devices=auto)"
    return None


@dataclass
class SavedState:
    key: str
    epoch: int
    run_id: str
    path: Path


class EpochStore:
    """`<cache_dir>/continuation/<key>/state.json` + `epoch_<j>.ckpt`, the latest epoch only.

    max_keys: keep the states of at most this many configs (the most recently saved); older ones
    are deleted, so a long hyperparameter search does not fill the disk.
    """

    def __init__(self, cache_dir: str | Path, max_keys: int = 10) -> None:
        self.root = Path(cache_dir).expanduser() / "continuation"
        self.max_keys = max(1, int(max_keys))

    def get(self, key: str) -> SavedState | None:
        meta = self.root / key / "state.json"
        try:
            info = json.loads(meta.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        path = self.root / key / info["file"]
        if not path.is_file():
            return None
        return SavedState(key, int(info["epoch"]), str(info["run_id"]), path)

    def put(self, key: str, epoch: int, run_id: str, trainer: L.Trainer) -> SavedState | None:
        """Save the trainer's state at `epoch` unless a later epoch of this key is stored."""
        old = self.get(key)
        if old is not None and old.epoch >= epoch:
            return old
        folder = self.root / key
        folder.mkdir(parents=True, exist_ok=True)
        name = f"epoch_{epoch}.ckpt"
        tmp = folder / f".{name}.{os.getpid()}.tmp"
        trainer.save_checkpoint(tmp)
        tmp.replace(folder / name)
        meta_tmp = folder / f".state.json.{os.getpid()}.tmp"
        meta_tmp.write_text(json.dumps({"epoch": epoch, "run_id": run_id, "file": name}))
        meta_tmp.replace(folder / "state.json")
        for stale in folder.glob("epoch_*.ckpt"):  # bounded disk use: the latest epoch only
            if stale.name != name:
                stale.unlink(missing_ok=True)
        log.info("saved the epoch-%d state for longer runs of this config (%s)", epoch, folder)
        self._evict(keep=key)
        return SavedState(key, epoch, run_id, folder / name)

    def _evict(self, keep: str) -> None:
        def saved_at(folder: Path) -> float:
            try:
                return (folder / "state.json").stat().st_mtime
            except OSError:
                return 0.0

        folders = sorted(
            (f for f in self.root.iterdir() if f.is_dir() and f.name != keep),
            key=saved_at,
            reverse=True,
        )
        for old in folders[self.max_keys - 1 :]:
            shutil.rmtree(old, ignore_errors=True)
            log.info(
                "removed the saved epoch state %s (budget.continuation_max_configs)", old.name
            )


def _train_generator(trainer: L.Trainer) -> torch.Generator | None:
    loader = trainer.train_dataloader
    if loader is None:
        return None
    for attr in ("sampler", "batch_sampler"):
        generator = getattr(getattr(loader, attr, None), "generator", None)
        if isinstance(generator, torch.Generator):
            return generator
    return None


class ContinuationState(Callback):
    """Carries what Lightning's checkpoint leaves out: the global RNG states and the generator of a
    random train sampler (so epoch j+1 draws the same batches and dropout masks), and logs the
    restored epochs 1..j to the new MLflow run."""

    def __init__(self, tracker: BudgetTracker, run: TrackedRun | None) -> None:
        self.tracker = tracker
        self.run = run
        self._trainer: L.Trainer | None = None
        self._loaded: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        generator = _train_generator(self._trainer) if self._trainer is not None else None
        rng = _collect_rng_states(include_cuda=torch.cuda.is_available())
        kind, keys, pos, has_gauss, gauss = rng["numpy"]  # plain types: loads with weights_only
        rng["numpy"] = (kind, keys.tolist(), int(pos), int(has_gauss), float(gauss))
        return {
            "rng": rng,
            "sampler_generator": generator.get_state() if generator is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Lightning restores callbacks before it creates the train iterator, which draws from the
        # global RNG: set it now, as a run going on from epoch j would have it at that point.
        rng = dict(state["rng"])
        kind, keys, pos, has_gauss, gauss = rng["numpy"]
        rng["numpy"] = (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss)
        _set_rng_states(rng)
        self._loaded = state

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._loaded is None:
            return
        state, self._loaded = self._loaded, None
        generator = _train_generator(trainer)  # a sampler draws its order at the first batch
        if generator is not None and state.get("sampler_generator") is not None:
            generator.set_state(state["sampler_generator"])
        if self.run is not None:
            for row in sorted(self.tracker.history, key=lambda r: r["epoch"]):
                if row["epoch"] > 0:
                    self.run.log_metrics(
                        {k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"])
                    )


class Continuation:
    """What train() asks: the checkpoint to continue from (or None), the callback, and saving.

    cont = Continuation(cfg, config, tracker, run)
    trainer = build_trainer(..., [*cont.callbacks])
    trainer.fit(module, datamodule=dm, ckpt_path=cont.ckpt_path)
    cont.save(trainer)
    """

    def __init__(
        self, cfg: DictConfig, config: dict[str, Any], tracker: BudgetTracker, run: TrackedRun
    ) -> None:
        self.reason = why_not_continuable(cfg)
        self.max_epochs = int(cfg.trainer.max_epochs)
        self.run = run
        self.key = continuation_key(config)
        self.store = EpochStore(
            cfg.paths.cache_dir, cfg.budget.get("continuation_max_configs", 10)
        )
        self.source: SavedState | None = None
        self.callbacks: list[Callback] = []
        if self.reason is not None:
            log.debug("epoch continuation off: %s", self.reason)
            return
        self.callbacks = [ContinuationState(tracker, run)]
        saved = self.store.get(self.key)
        if saved is not None and 0 < saved.epoch < self.max_epochs:
            self.source = saved
            log.info(
                "continuing from epoch %d of run %s (same config and seed) up to epoch %d",
                saved.epoch,
                saved.run_id,
                self.max_epochs,
            )
            run.set_tags(
                {
                    "continued_from": saved.run_id,
                    "continued_from_epoch": saved.epoch,
                    "continuation_key": self.key,
                }
            )
        else:
            run.set_tags({"continuation_key": self.key})

    @property
    def ckpt_path(self) -> str | None:
        return str(self.source.path) if self.source is not None else None

    def save(self, trainer: L.Trainer) -> None:
        """Keep this run's final state for longer runs of the same config (a finished run only)."""
        if self.reason is not None or trainer.interrupted:
            return
        if trainer.current_epoch != self.max_epochs:  # stopped early: not an epoch budget's end
            return
        if trainer.is_global_zero:
            try:
                self.store.put(self.key, self.max_epochs, self.run.run_id, trainer)
            except Exception as e:  # noqa: BLE001 - the run itself succeeded; only reuse is lost
                log.warning(
                    "could not save the epoch state for longer runs (%s: %s); they will "
                    "train from scratch",
                    type(e).__name__,
                    e,
                )


def describe(cfg: DictConfig) -> str:
    """One line for logs and docs: whether runs of `cfg` continue, and why not."""
    reason = why_not_continuable(cfg)
    return "continues shorter runs" if reason is None else f"from scratch ({reason})"
