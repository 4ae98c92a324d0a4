"""What every task's DataModule shares: the seeded nested training subset, `n_train`, training
loaders that split each epoch across DDP ranks, held-out loaders that see the whole split, and
the loader settings.

Under DDP (`trainer=ddp`, torchrun, srun) every rank draws the same epoch order (seed, epoch) and
takes its own slice of it (`data.samplers.rank_batches`): across ranks every training item is used
once per epoch, and at every step all ranks hold batches of the same size, which the losses'
all-gathers need. The random streams of a rank (dropout, augmentation, masking) differ by rank:
`training.train` seeds rank r with `seed + r` (nanoGPT's seed_offset). Held-out loaders are not
split: every rank embeds every held-out item (the metrics rank all of them); rank 0 records.
Training batches carry `index`: the training items' ids (positions in the task's data).

Every `conf/data/*.yaml` names its DataModule as `_target_`; `build_datamodule` makes it from the
group's keys (loader keys such as `format` and `path` go on to the data set's loader) and what
other groups decide (tokenizer, image size, eval batch size, seed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import numpy as np
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, open_dict
from torch.utils.data import DataLoader, Dataset, Sampler

from finetune_budget.data.samplers import ClassChunkBatchSampler, ShuffledBatchSampler
from finetune_budget.data.subsets import nested_subset
from finetune_budget.errors import ConfigError

# the keys of a `data` group that BudgetDataModule reads (the training subset and the loaders);
# the others describe the data source
BASE_KEYS = (
    "n", "subset_seed", "batch_size", "samples_per_class", "eval_batch_size", "num_workers", "seed"
)  # fmt: skip


def take_base_keys(keys: dict[str, Any], **defaults: Any) -> dict[str, Any]:
    """The subset and loader settings (BASE_KEYS) taken out of a data group's `keys`, over a
    DataModule's own `defaults`; what stays in `keys` describes the data set for its loader."""
    return {**defaults, **{key: keys.pop(key) for key in BASE_KEYS if key in keys}}


class BudgetDataModule(L.LightningDataModule):
    """Base of every task's DataModule. `subset`: (n,) ids of the training items used, the first
    n of a permutation of `n_total` seeded by `subset_seed` (nested across n). `batch_size` is
    per device; `samples_per_class` applies to class-aware batches."""

    def __init__(
        self,
        n_total: int,
        n: int,
        subset_seed: int = 0,
        *,
        name: str = "the data set",
        batch_size: int = 32,
        samples_per_class: int = 4,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.subset = nested_subset(n_total, n, subset_seed, name=name)
        self.batch_size = int(batch_size)
        self.samples_per_class = int(samples_per_class)
        self.eval_batch_size = int(eval_batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)

    @property
    def n_train(self) -> int:
        """The labelled items this run trains on (`data.n`)."""
        return len(self.subset)

    def world(self) -> tuple[int, int]:
        """(number of processes, this process's global rank); (1, 0) outside a Trainer."""
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def loader_kwargs(self) -> dict[str, Any]:
        trainer = self.trainer
        cuda = trainer is not None and trainer.strategy.root_device.type == "cuda"
        return {
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "pin_memory": cuda,
        }

    def train_sampler(
        self, n_items: int, labels: Sequence[int] | None = None, drop_last: bool = False
    ) -> Sampler[list[int]]:
        """This rank's batches of positions 0..n_items-1: class-aware when `labels` (n_items,)
        are given (`data.samples_per_class` items of a class together), else shuffled."""
        world, rank = self.world()
        if labels is not None:
            return ClassChunkBatchSampler(
                labels, self.batch_size, self.samples_per_class, seed=self.seed,
                drop_last=drop_last, num_replicas=world, rank=rank,
            )  # fmt: skip
        return ShuffledBatchSampler(
            n_items, self.batch_size, seed=self.seed, drop_last=drop_last, num_replicas=world,
            rank=rank,
        )  # fmt: skip

    def train_loader(
        self,
        dataset: Dataset | Sequence[Any],
        collate_fn: Callable[[list[Any]], Any] | None = None,
        labels: Sequence[int] | np.ndarray | None = None,
        drop_last: bool = False,
    ) -> DataLoader:
        """The training loader of `dataset` (one entry per training item, in subset order)."""
        sampler = self.train_sampler(len(dataset), labels, drop_last)
        return DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate_fn, **self.loader_kwargs()
        )

    def eval_loader(
        self,
        dataset: Dataset | Sequence[Any],
        collate_fn: Callable[[list[Any]], Any] | None = None,
        batch_sampler: Sequence[list[int]] | None = None,
    ) -> DataLoader:
        """The whole held-out split on every rank, in order (no distributed sampler)."""
        if batch_sampler is not None:
            return DataLoader(
                dataset, batch_sampler=batch_sampler, collate_fn=collate_fn,
                **self.loader_kwargs(),
            )  # fmt: skip
        return DataLoader(
            dataset, batch_size=self.eval_batch_size, shuffle=False, collate_fn=collate_fn,
            **self.loader_kwargs(),
        )  # fmt: skip


def build_datamodule(
    group: DictConfig, kind: type[BudgetDataModule], use: str, **given: Any
) -> BudgetDataModule:
    """The DataModule the `data` group's `_target_` names, from the group's keys and `given`.

    kind: the DataModule class the task trains on; use: the data options that build one (the
    fix a one-line ConfigError names when `data=` is of another task)."""
    if "_target_" not in group:
        # a config logged before data groups named their DataModule (evaluate.py run_id=<old
        # run>): the task's own kind
        group = group.copy()
        with open_dict(group):
            group["_target_"] = f"{kind.__module__}.{kind.__qualname__}"
    built = get_class(group._target_)
    if not issubclass(built, kind):
        raise ConfigError(
            f"data={group.get('name')} builds {built.__name__}, but this task trains on "
            f"{kind.__name__}; use {use}"
        )
    return instantiate(group, _partial_=True, _convert_="all")(**given)
