"""LightningDataModule for image retrieval: class-aware training batches of the nested subset,
and the held-out images, each embedded once per evaluation."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from finetune_budget.data.images import ImageDataset, ImageRetrievalData, check_readable
from finetune_budget.data.samplers import ClassChunkBatchSampler
from finetune_budget.data.subsets import nested_subset
from finetune_budget.errors import DataError
from finetune_budget.models.vision import image_transforms


class ImageRetrievalDataModule(L.LightningDataModule):
    """Training batches {"images": (B, 3, S, S), "labels": (B,)} of the first `n` training images
    of a seeded permutation, `samples_per_class` images of a class together; eval batches
    {"images": (B, 3, S, S), "index": (B,)} over all held-out images."""

    def __init__(
        self,
        data: ImageRetrievalData,
        n: int,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        subset_seed: int = 0,
        batch_size: int = 32,
        samples_per_class: int = 4,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        augment: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.data = data
        self.subset = nested_subset(
            len(data.train_paths), n, subset_seed, name=f"{data.name} training images"
        )
        if len(data.eval_paths) < 2:
            raise DataError(f"{data.name}: fewer than 2 held-out images; add images or classes")
        self.batch_size = batch_size
        self.samples_per_class = samples_per_class
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.eval_groups = torch.as_tensor(data.eval_groups)
        train_paths = [data.train_paths[i] for i in self.subset]
        check_readable(train_paths + data.eval_paths)
        self.train_set = ImageDataset(
            train_paths,
            data.train_labels[self.subset],
            image_transforms(image_size, train=augment, mean=mean, std=std),
            key="labels",
        )
        self.eval_set = ImageDataset(
            data.eval_paths,
            range(len(data.eval_paths)),
            image_transforms(image_size, train=False, mean=mean, std=std),
            key="index",
        )

    @property
    def n_train(self) -> int:
        return len(self.subset)

    def _loader_kwargs(self) -> dict[str, Any]:
        trainer = self.trainer
        cuda = trainer is not None and trainer.strategy.root_device.type == "cuda"
        return {
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "pin_memory": cuda,
        }

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = ClassChunkBatchSampler(
            self.train_set.values, self.batch_size, self.samples_per_class, seed=self.seed,
            num_replicas=world, rank=rank,
        )  # fmt: skip
        return DataLoader(self.train_set, batch_sampler=sampler, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        # Every rank embeds the whole held-out split (no distributed sampler): metrics need all.
        return DataLoader(
            self.eval_set, batch_size=self.eval_batch_size, shuffle=False, **self._loader_kwargs()
        )
