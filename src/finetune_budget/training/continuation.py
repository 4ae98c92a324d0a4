"""Epoch budgets that cost one run: a k-epoch job continues from the saved epoch-j state (j < k)
of a finished job with the same config and seed instead of training from scratch.

    python train.py -m data.n=100,500 trainer.max_epochs=1..4   # 4 epochs per n, not 10

Valid only when the learning-rate schedule does not depend on `trainer.max_epochs`
(`optim.schedule=warmup_constant`): then a k-epoch run is exactly the first k epochs of any longer
run. The state (model, optimizer, scheduler, loops, the BudgetTracker's history and training time,
the RNG states and the train sampler's generator) is a Lightning checkpoint keyed by a hash of
everything that changes what is computed (the resolved config without `trainer.max_epochs`, run
options and bookkeeping keys: identity.continuation_key; the resolved precision, package
versions, data file fingerprints); only the latest epoch's state per key is kept.

Where states live (`budget.continuation_store`):
- `memory` (what `auto` picks when the jobs run in this process: Hydra's basic launcher, a single
  run, `train()` called from Python): a process-wide dict, nothing written to disk. Past
  `budget.continuation_memory_mb` the oldest states move to disk, never dropped.
- `disk` (what `auto` picks for launchers that run jobs in other processes: submitit, joblib,
  ...): `paths.cache_dir/continuation/<key>/`, written to a temp file and renamed.
A sweep's states are removed when the sweep ends (sweep_states.py, a Hydra callback in
conf/hydra/default.yaml). `budget.continue_shorter_runs=false` turns continuation off.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig

from finetune_budget import identity
from finetune_budget.config import installed_versions, resolve_precision
from finetune_budget.errors import ConfigError
from finetune_budget.tracking.mlflow_run import TrackedRun
from finetune_budget.tracking.parent import SWEEP_ENV
from finetune_budget.training.tracker import BudgetTracker

log = logging.getLogger(__name__)

# Schedules whose learning rate at step s does not depend on the total number of steps.
EPOCH_FREE_SCHEDULES = ("warmup_constant",)
# Packages whose version changes what a run computes.
KEY_PACKAGES = ("finetune-budget", "torch", "transformers", "lightning", "open_clip_torch", "timm")
STORES = ("auto", "memory", "disk")
MEMORY_SCHEME = "memory://"


def continuation_key(config: dict[str, Any]) -> str:
    """A hash of everything that changes what a run computes, except `trainer.max_epochs` (the
    keys and roles are in identity.py): the resolved run config, the resolved precision (`auto`
    differs by machine), package versions, and fingerprints (names, sizes, mtimes) of the data
    files and folders and the weights packages the config names."""
    trainer = config.get("trainer", {})
    precision = resolve_precision(trainer.get("precision"), trainer.get("accelerator", "auto"))
    return identity.continuation_key(config, precision, installed_versions(KEY_PACKAGES))


def why_not_continuable(cfg: DictConfig) -> str | None:
    """None when a run of `cfg` may continue from (and save) an epoch state, else the reason."""
    if not cfg.budget.continue_shorter_runs:
        return "budget.continue_shorter_runs is false"
    schedule = cfg.optim.schedule
    if schedule not in EPOCH_FREE_SCHEDULES:
        return f"optim.schedule={schedule} depends on trainer.max_epochs"
    if cfg.budget.get("max_train_s") is not None:
        return "budget.max_train_s stops runs by time, not by epochs"
    if cfg.trainer.get("max_steps") not in (-1, None):
        return "trainer.max_steps is set"
    if str(cfg.trainer.devices) not in ("1", "[0]") or cfg.trainer.num_nodes != 1:
        return "more than one device (or devices=auto)"
    return None


def why_not_exact(cfg: DictConfig) -> str | None:
    """None when a continued run equals training from scratch, else the reason it may not.

    Loader worker processes start afresh in a continued run, so randomness drawn inside them
    (image augmentation, MLM masking) is not restored; text tokenisation draws none.
    """
    workers = int(cfg.data.num_workers or 0)
    if workers > 0 and cfg.task.name != "text_text":
        return (
            f"data.num_workers={workers}: random augmentation or masking in loader worker "
            "processes is not restored (data.num_workers=0 makes it exact)"
        )
    return None


def hydra_launch() -> str:
    """How this job was started: `python` (no Hydra: tests, tune.py), `single` (no -m),
    `in_process` (-m with Hydra's basic launcher), `other_processes` (submitit, joblib, ...)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return "python"
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode != RunMode.MULTIRUN:
            return "single"
        target = str(hydra_cfg.launcher.get("_target_", ""))
        return "in_process" if target.endswith("BasicLauncher") else "other_processes"
    except Exception:  # noqa: BLE001 - no Hydra context: a plain Python call
        return "python"


def jobs_in_other_processes() -> bool:
    """True when Hydra's launcher runs this sweep's jobs in other processes (submitit, joblib)."""
    return hydra_launch() == "other_processes"


def store_kind(cfg: DictConfig) -> str:
    kind = str(cfg.budget.continuation_store)
    if kind not in STORES:
        raise ConfigError(f"budget.continuation_store={kind} is unknown; use auto, memory or disk")
    if kind == "auto":
        return "disk" if jobs_in_other_processes() else "memory"
    return kind


@dataclass
class SavedState:
    key: str
    epoch: int
    run_id: str
    path: str  # a file, or memory://<key>


def _tensors(tree: Any) -> Iterator[torch.Tensor]:
    """The tensors of a checkpoint dict (nested dicts, lists and tuples)."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors(v)
    elif isinstance(tree, list | tuple):
        for v in tree:
            yield from _tensors(v)


def _versions_sum(tree: Any) -> int:
    """The sum of the tensors' in-place version counters (any in-place change raises it)."""
    return sum(t._version for t in _tensors(tree))


def _nbytes(tree: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(tree))


class EpochStore:
    """`<cache_dir>/continuation/<key>/state.json` + `epoch_<j>.ckpt`, the latest epoch only.

    max_keys: keep at most this many states of earlier sweeps and runs (the most recently
    saved); states of the running sweep are never removed before its end.
    """

    def __init__(self, cache_dir: str | Path, max_keys: int = 10) -> None:
        self.root = Path(cache_dir).expanduser() / "continuation"
        self.max_keys = max(1, int(max_keys))

    def _meta(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.root / key / "state.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def get(self, key: str) -> SavedState | None:
        info = self._meta(key)
        if info is None:
            return None
        path = self.root / key / info["file"]
        if not path.is_file():
            return None
        return SavedState(key, int(info["epoch"]), str(info["run_id"]), str(path))

    def write(self, key: str, epoch: int, run_id: str, save: Any) -> SavedState:
        """`save(path)` writes the checkpoint; temp file + rename, so a crash leaves no half."""
        folder = self.root / key
        folder.mkdir(parents=True, exist_ok=True)
        name = f"epoch_{epoch}.ckpt"
        tmp = folder / f".{name}.{os.getpid()}.tmp"
        save(tmp)
        tmp.replace(folder / name)
        meta = {"epoch": epoch, "run_id": run_id, "file": name, "sweep": os.environ.get(SWEEP_ENV)}
        meta_tmp = folder / f".state.json.{os.getpid()}.tmp"
        meta_tmp.write_text(json.dumps(meta))
        meta_tmp.replace(folder / "state.json")
        for stale in folder.glob("epoch_*.ckpt"):  # bounded disk use: the latest epoch only
            if stale.name != name:
                stale.unlink(missing_ok=True)
        log.info("saved the epoch-%d state for longer runs of this config (%s)", epoch, folder)
        self._evict(keep=key)
        return SavedState(key, epoch, run_id, str(folder / name))

    def put(self, key: str, epoch: int, run_id: str, trainer: L.Trainer) -> SavedState | None:
        """Save the trainer's state at `epoch` unless a later epoch of this key is stored."""
        old = self.get(key)
        if old is not None and old.epoch >= epoch:
            return old
        return self.write(key, epoch, run_id, trainer.save_checkpoint)

    def _evict(self, keep: str) -> None:
        sweep = os.environ.get(SWEEP_ENV)

        def saved_at(folder: Path) -> float:
            try:
                return (folder / "state.json").stat().st_mtime
            except OSError:
                return 0.0

        others = [
            f
            for f in self.root.iterdir()
            if f.is_dir()
            and f.name != keep
            and (sweep is None or (self._meta(f.name) or {}).get("sweep") != sweep)
        ]
        for old in sorted(others, key=saved_at, reverse=True)[self.max_keys - 1 :]:
            shutil.rmtree(old, ignore_errors=True)
            log.warning(
                "removed the saved epoch state %s of an earlier run "
                "(budget.continuation_max_configs=%d)",
                old.name,
                self.max_keys,
            )

    def remove_sweep(self, sweep: str) -> int:
        """Delete the states the sweep `sweep` saved; returns how many."""
        if not self.root.is_dir():
            return 0
        gone = 0
        for folder in self.root.iterdir():
            if folder.is_dir() and (self._meta(folder.name) or {}).get("sweep") == sweep:
                shutil.rmtree(folder, ignore_errors=True)
                gone += 1
        return gone


class MemoryStore:
    """The epoch states of this process's runs, as checkpoint dicts. A finished job's state is
    kept as it is (its tensors: nothing changes them once the job is over; their in-place
    version counters are recorded and checked). A later job that loads it gets those tensors,
    not copies: loading copies the weights into the job's module, and AdamW takes its moments as
    they are and updates them in place (a copy would cost every job a pass over the weights and
    both moments). From then on the state is that job's: it replaces it with its own when it
    finishes (the store keeps one state per key, the latest epoch), and where it does not
    finish, the changed version counters drop the state at the next `get`. Past `limit_mb` the
    oldest move to `spill` (an EpochStore)."""

    def __init__(self) -> None:
        # key -> (state, checkpoint, its bytes, its tensors' version counters summed)
        self.states: OrderedDict[str, tuple[SavedState, dict[str, Any], int, int]] = OrderedDict()

    def get(self, key: str) -> SavedState | None:
        entry = self.states.get(key)
        if entry is None:
            return None
        if _versions_sum(entry[1]) != entry[3]:  # changed in place: not trusted
            log.warning(
                "the epoch state %s changed after its job ended (a job that continued from it "
                "did not finish): not continued",
                key,
            )
            self.states.pop(key)
            return None
        return entry[0]

    def checkpoint(self, key: str) -> dict[str, Any]:
        """The kept state for the job that continues it: new containers, the kept tensors."""
        kept = self.states[key][1]
        return copy.deepcopy(kept, memo={id(t): t for t in _tensors(kept)})

    def put(
        self,
        key: str,
        epoch: int,
        run_id: str,
        checkpoint: dict[str, Any],
        limit_mb: float,
        spill: EpochStore,
    ) -> SavedState:
        state = SavedState(key, epoch, run_id, MEMORY_SCHEME + key)
        self.states.pop(key, None)
        self.states[key] = (state, checkpoint, _nbytes(checkpoint), _versions_sum(checkpoint))
        while len(self.states) > 1 and self.nbytes() > limit_mb * 2**20:
            old_key, (old, ckpt, _, _) = self.states.popitem(last=False)
            spill.write(old_key, old.epoch, old.run_id, lambda p, c=ckpt: torch.save(c, p))
            log.info(
                "epoch states past budget.continuation_memory_mb=%s: moved %s to disk",
                limit_mb,
                old_key,
            )
        return state

    def nbytes(self) -> int:
        return sum(entry[2] for entry in self.states.values())

    def clear(self) -> int:
        n = len(self.states)
        self.states.clear()
        return n


MEMORY = MemoryStore()  # process-wide: the jobs of an in-process sweep share it


class StateIO(TorchCheckpointIO):
    """Lightning's torch checkpoint I/O, plus `memory://<key>` paths served from MEMORY."""

    def __init__(self, on_save: Any = None) -> None:
        self.on_save = on_save

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if str(path).startswith(MEMORY_SCHEME):
            self.on_save(checkpoint)
            return
        super().save_checkpoint(checkpoint, path, storage_options)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        if str(path).startswith(MEMORY_SCHEME):
            return MEMORY.checkpoint(str(path).removeprefix(MEMORY_SCHEME))
        return super().load_checkpoint(path, weights_only=weights_only)


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
        if self.run is not None:  # epochs 0..j of the run it continues, and how epoch 0 was got
            self.run.log_steps(
                {
                    int(row["epoch"]): {k: v for k, v in row.items() if k != "epoch"}
                    for row in self.tracker.history
                },
                tags=self.tracker.baseline_tags,
            )


class Continuation:
    """What train() asks: the checkpoint to continue from (or None), the callback, the checkpoint
    I/O plugin, and saving.

    cont = Continuation(cfg, config, tracker, run)
    trainer = build_trainer(..., [*cont.callbacks], plugins=cont.plugins)
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
        self.kind = store_kind(cfg)
        self.memory_mb = float(cfg.budget.continuation_memory_mb)
        self.disk = EpochStore(cfg.paths.cache_dir, cfg.budget.continuation_max_configs)
        self.source: SavedState | None = None
        self.callbacks: list[Callback] = []
        self.plugins: list[Any] = []
        if self.reason is not None:
            log.debug("epoch continuation off: %s", self.reason)
            return
        self.callbacks = [ContinuationState(tracker, run)]
        self.plugins = [StateIO(self._keep_in_memory)]
        saved = MEMORY.get(self.key) or self.disk.get(self.key)
        inexact = why_not_exact(cfg)
        tags: dict[str, Any] = {
            "continuation_key": self.key,
            "continuation_store": self.kind,
            "continuation_exact": "false" if inexact else "true",
        }
        if inexact:
            tags["continuation_inexact_reason"] = inexact
        if saved is not None and 0 < saved.epoch < self.max_epochs:
            self.source = saved
            log.info(
                "continuing from epoch %d of run %s (same config and seed) up to epoch %d",
                saved.epoch,
                saved.run_id,
                self.max_epochs,
            )
            tags.update({"continued_from": saved.run_id, "continued_from_epoch": saved.epoch})
        run.set_tags(tags)

    @property
    def ckpt_path(self) -> str | None:
        return self.source.path if self.source is not None else None

    def _keep_in_memory(self, checkpoint: dict[str, Any]) -> None:
        MEMORY.put(
            self.key, self.max_epochs, self.run.run_id, checkpoint, self.memory_mb, self.disk
        )

    def save(self, trainer: L.Trainer) -> None:
        """Keep this run's final state for longer runs of the same config (a finished run only)."""
        if self.reason is not None or trainer.interrupted:
            return
        if trainer.current_epoch != self.max_epochs:  # stopped early: not an epoch budget's end
            return
        if not trainer.is_global_zero:
            return
        if self.source is None:  # else the kept state is the older one this job trained on
            old = MEMORY.get(self.key) or self.disk.get(self.key)
            if old is not None and old.epoch >= self.max_epochs:
                return  # a shorter run never replaces a longer state
        if self.kind == "memory" and hydra_launch() == "single":
            return  # `python train.py` without -m: no later job in this process
        try:
            if self.kind == "memory":
                trainer.save_checkpoint(MEMORY_SCHEME + self.key)  # -> StateIO -> MEMORY
            else:
                self.disk.put(self.key, self.max_epochs, self.run.run_id, trainer)
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
