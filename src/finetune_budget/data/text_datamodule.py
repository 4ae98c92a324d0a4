"""LightningDataModule for text retrieval: the nested training subset and the held-out split."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from finetune_budget.data.base import BudgetDataModule
from finetune_budget.data.samplers import LengthBucketBatchSampler
from finetune_budget.data.text import TextRetrievalData


class TextRetrievalDataModule(BudgetDataModule):
    """Training batches of the first `n` items of a seeded permutation (labels: class-aware,
    {"input": tokenised (B, T), "labels": (B,), "index": (B,)}; pairs: shuffled, {"query",
    "positive": tokenised (B, T), "index"}); eval batches {"input", "index"} of all held-out items,
    sorted by token count so padding stays small. `length_bucket_pool` > 1: training batches of
    similar token length (LengthBucketBatchSampler over the base's class-aware or shuffled
    batches; same items, batch sizes and class chunks)."""

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
        super().__init__(
            len(data), n, subset_seed, name=f"{data.name} train", batch_size=batch_size,
            samples_per_class=samples_per_class, eval_batch_size=eval_batch_size,
            num_workers=num_workers, seed=seed,
        )  # fmt: skip
        self.data = data
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.length_bucket_pool = int(length_bucket_pool)
        self.eval_groups = torch.as_tensor(data.eval_groups)
        # by token count (not characters): each eval batch pads to nearly its own length
        eval_lengths = self._token_counts(data.eval_texts)
        self._eval_order = sorted(range(len(data.eval_texts)), key=eval_lengths.__getitem__)

    def _token_counts(self, texts: list[str]) -> list[int]:
        """Tokens of each text, capped at max_length."""
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        return [len(x) for x in ids]

    def _train_lengths(self) -> list[int]:
        """Token count of each training item, in subset order (query + positive for pairs)."""
        d, items = self.data, self.subset.tolist()
        lengths = self._token_counts([d.train_texts[i] for i in items])
        if d.kind == "pairs":
            positives = self._token_counts([d.train_positives[i] for i in items])
            lengths = [a + b for a, b in zip(lengths, positives, strict=True)]
        return lengths

    def train_sampler(self, n_items: int, labels=None, drop_last: bool = False) -> Sampler:
        """The base's batches of this rank, length-bucketed when `length_bucket_pool` > 1."""
        sampler = super().train_sampler(n_items, labels, drop_last)
        if self.length_bucket_pool <= 1:
            return sampler
        return LengthBucketBatchSampler(
            sampler, self._train_lengths(), labels, self.length_bucket_pool, self.seed
        )

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
                "index": torch.as_tensor(indices),
            }
        return {
            "input": self._tokenize(texts),
            "labels": torch.as_tensor([d.train_labels[i] for i in indices]),
            "index": torch.as_tensor(indices),
        }

    def collate_eval(self, indices: list[int]) -> dict[str, Any]:
        return {
            "input": self._tokenize([self.data.eval_texts[i] for i in indices]),
            "index": torch.as_tensor(indices),
        }

    def train_dataloader(self) -> DataLoader:
        items = self.subset.tolist()
        if self.data.kind == "labels":
            labels = [self.data.train_labels[i] for i in items]
            return self.train_loader(items, self.collate_train, labels=labels)
        # in-batch negatives: no short last batch (a batch of one pair has no negative)
        return self.train_loader(items, self.collate_train, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader(self._eval_order, self.collate_eval)
