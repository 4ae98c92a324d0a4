"""LightningDataModule for image retrieval: class-aware training batches of the nested subset,
and the held-out images, each embedded once per evaluation."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from finetune_budget.data.base import BudgetDataModule
from finetune_budget.data.images import (
    ImageDataset,
    ImageRetrievalData,
    check_readable,
    load_image_data,
)
from finetune_budget.errors import DataError
from finetune_budget.models.vision import image_transforms


class ImageRetrievalDataModule(BudgetDataModule):
    """Training batches {"images": (B, 3, S, S), "labels": (B,), "index": (B,)} of the first `n`
    training images of a seeded permutation, `samples_per_class` images of a class together; eval
    batches {"images": (B, 3, S, S), "index": (B,)} over all held-out images."""

    def __init__(
        self,
        data: ImageRetrievalData | None = None,
        *,
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
        **source: Any,
    ) -> None:
        """data: the loaded images, or None to load the ones `source` describes (the `data`
        group's other keys: format, csv, root, ...; data.images.load_image_data)."""
        if data is None:
            data = load_image_data(source)
        super().__init__(
            len(data.train_paths), n, subset_seed, name=f"{data.name} training images",
            batch_size=batch_size, samples_per_class=samples_per_class,
            eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed,
        )  # fmt: skip
        self.data = data
        if len(data.eval_paths) < 2:
            raise DataError(f"{data.name}: fewer than 2 held-out images; add images or classes")
        self.eval_groups = torch.as_tensor(data.eval_groups)
        train_paths = [data.train_paths[i] for i in self.subset]
        check_readable(train_paths + data.eval_paths)
        self.train_set = ImageDataset(
            train_paths,
            data.train_labels[self.subset],
            image_transforms(image_size, train=augment, mean=mean, std=std),
            key="labels",
            ids=self.subset.tolist(),
        )
        self.eval_set = ImageDataset(
            data.eval_paths,
            range(len(data.eval_paths)),
            image_transforms(image_size, train=False, mean=mean, std=std),
            key="index",
        )

    def train_dataloader(self) -> DataLoader:
        return self.train_loader(self.train_set, labels=self.train_set.values)

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader(self.eval_set)
