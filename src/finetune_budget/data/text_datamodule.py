"""LightningDataModule for text retrieval: the nested training subset and the held-out split."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from finetune_budget.data.samplers import ClassChunkBatchSampler, LengthBucketBatchSampler
from finetune_budget.data.subsets import nested_subset
from finetune_budget.data.text import TextRetrievalData


class TextRetrievalDataModule(L.LightningDataModule):
    """Training batches of the first `n` items of a seeded permutation; eval batches of all
    held-out items, sorted by length so padding stays small (each batch carries the items'
    `index`)."""

    def __init__(
        self,
        data: TextRetrievalData,
        tokenizer: Any,
        n: int,
        subset_seed: int = 0,
        batch_size: int = 32,
        samples_per_class: int = 4,
        eval_batch_size: int = 256,
        max_length: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        length_bucket_pool: int = 0,
    ) -> None:
        super().__init__()
        self.data = data
        self.tokenizer = tokenizer
        self.subset = nested_subset(len(data), n, subset_seed, name=f"{data.name} train")
        self.batch_size = batch_size
        self.samples_per_class = samples_per_class
        self.eval_batch_size = eval_batch_size
        self.max_length = max_length
        self.num_workers = num_workers
        self.seed = seed
        self.length_bucket_pool = length_bucket_pool  # > 1: LengthBucketBatchSampler's pool
        self.eval_groups = torch.as_tensor(data.eval_groups)
        # by token count (not characters): each eval batch pads to nearly its own length
        eval_lengths = self._token_counts(data.eval_texts)
        self._eval_order = sorted(range(len(data.eval_texts)), key=eval_lengths.__getitem__)

    @property
    def n_train(self) -> int:
        return len(self.subset)

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(
            self.tokenizer(
                texts,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
        )

    def collate_train(self, indices: list[int]) -> dict[str, Any]:
        d = self.data
        texts = [d.train_texts[i] for i in indices]
        if d.kind == "pairs":
            return {
                "query": self._tokenize(texts),
                "positive": self._tokenize([d.train_positives[i] for i in indices]),
            }
        return {
            "input": self._tokenize(texts),
            "labels": torch.as_tensor([d.train_labels[i] for i in indices]),
        }

    def collate_eval(self, indices: list[int]) -> dict[str, Any]:
        return {
            "input": self._tokenize([self.data.eval_texts[i] for i in indices]),
            "index": torch.as_tensor(indices),
        }

    def _token_counts(self, texts: list[str]) -> list[int]:
        """Tokens of each text, capped at max_length."""
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        return [len(x) for x in ids]

    def _train_lengths(self, items: list[int]) -> list[int]:
        """Token count of each training item (query + positive for pairs)."""
        d = self.data
        lengths = self._token_counts([d.train_texts[i] for i in items])
        if d.kind == "pairs":
            positives = self._token_counts([d.train_positives[i] for i in items])
            lengths = [a + b for a, b in zip(lengths, positives, strict=True)]
        return lengths

    def _bucketed(self, sampler: Any, items: list[int], labels: list[int] | None) -> Any:
        if self.length_bucket_pool <= 1:
            return sampler
        return LengthBucketBatchSampler(
            sampler, self._train_lengths(items), labels, self.length_bucket_pool, self.seed
        )

    def _loader_kwargs(self) -> dict[str, Any]:
        return {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0}

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        items = self.subset.tolist()
        if self.data.kind == "labels":
            labels = [self.data.train_labels[i] for i in items]
            sampler = ClassChunkBatchSampler(
                labels,
                self.batch_size,
                self.samples_per_class,
                seed=self.seed,
                num_replicas=world,
                rank=rank,
            )
            return DataLoader(
                items,
                batch_sampler=self._bucketed(sampler, items, labels),
                collate_fn=self.collate_train,
                **self._loader_kwargs(),
            )
        generator = torch.Generator().manual_seed(self.seed)
        if self.length_bucket_pool > 1:
            pairs = BatchSampler(
                RandomSampler(items, generator=generator),
                self.batch_size,
                drop_last=len(items) > self.batch_size,
            )
            return DataLoader(
                items,
                batch_sampler=self._bucketed(pairs, items, None),
                collate_fn=self.collate_train,
                **self._loader_kwargs(),
            )
        return DataLoader(
            items,
            batch_size=self.batch_size,
            sampler=RandomSampler(items, generator=generator),
            collate_fn=self.collate_train,
            drop_last=len(items) > self.batch_size,
            **self._loader_kwargs(),
        )

    def val_dataloader(self) -> DataLoader:
        # Every rank embeds the whole held-out split (no distributed sampler): metrics need all.
        return DataLoader(
            self._eval_order,
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=self.collate_eval,
            **self._loader_kwargs(),
        )
