"""LightningDataModule for text retrieval: the nested training subset and the held-out split."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from finetune_budget.data.base import BudgetDataModule, take_base_keys
from finetune_budget.data.samplers import LengthBucketBatchSampler
from finetune_budget.data.text import TextRetrievalData, load_text_data
from finetune_budget.speed import reuse

TOKENIZE_CHUNK = 4096  # texts a tokenizer call gets (bounds its output's memory)


class TextRetrievalDataModule(BudgetDataModule):
    """Training batches of the first `n` items of a seeded permutation (labels: class-aware,
    {"input": tokenised (B, T), "labels": (B,), "index": (B,)}; pairs: shuffled, {"query",
    "positive": tokenised (B, T), "index"}); eval batches {"input", "index"} of all held-out items,
    sorted by token count so padding stays small. `length_bucket_pool` > 1: training batches of
    similar token length (LengthBucketBatchSampler over the base's class-aware or shuffled
    batches; same items, batch sizes and class chunks).

    Texts are tokenised once per process (the jobs of a sweep share the token ids); a batch is
    its items' ids padded to the longest one, as the tokenizer's `padding=True` pads them."""

    def __init__(
        self,
        data: TextRetrievalData | None = None,
        tokenizer: Any = None,
        *,
        max_length: int = 128,
        length_bucket_pool: int = 0,
        **source: Any,
    ) -> None:
        """data: the loaded data set, or None to load the one `source` describes (the `data`
        group's other keys: format, path, ...; data.text.load_text_data). The subset and loader
        keys (n, subset_seed, batch_size, ...: data.base.BASE_KEYS) go to the base."""
        base = take_base_keys(source)
        if data is None:
            data = load_text_data(source)
        super().__init__(len(data), name=f"{data.name} train", **base)
        self.data = data
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.length_bucket_pool = int(length_bucket_pool)
        self.eval_groups = torch.as_tensor(data.eval_groups)
        self.pad_id = tokenizer.pad_token_id or 0
        self.pad_left = getattr(tokenizer, "padding_side", "right") == "left"
        self.eval_ids = self._token_ids(data.eval_texts, range(len(data.eval_texts)))
        # by token count (not characters): each eval batch pads to nearly its own length
        self._eval_order = sorted(range(len(data.eval_texts)), key=lambda i: len(self.eval_ids[i]))
        self._train_ids: dict[int, np.ndarray] | None = None
        self._positive_ids: dict[int, np.ndarray] | None = None

    def _token_ids(self, texts: list[str], items) -> dict[int, np.ndarray]:
        """{item: token ids (int32) of texts[item], truncated at max_length} for `items`: one
        store per text list and tokenizer in this process, so a sweep's jobs tokenise each item
        once. Tokenised TOKENIZE_CHUNK texts at a time and kept as arrays: the tokenizer's output
        for all of a 100,000-item set at once (its encodings, lists of Python ints) would hold
        several KB an item at its peak."""
        tok = self.tokenizer
        key = (tok.name_or_path, id(tok), self.max_length, len(texts), hash(tuple(texts)))
        store: dict[int, np.ndarray] = reuse.cached("token_ids", key, dict)
        missing = [i for i in items if i not in store]
        for start in range(0, len(missing), TOKENIZE_CHUNK):
            chunk = missing[start : start + TOKENIZE_CHUNK]
            ids = tok([texts[i] for i in chunk], truncation=True, max_length=self.max_length)
            store.update(
                (i, np.asarray(x, dtype=np.int32))
                for i, x in zip(chunk, ids["input_ids"], strict=True)
            )
        return store

    @property
    def train_ids(self) -> dict[int, np.ndarray]:
        if self._train_ids is None:
            self._train_ids = self._token_ids(self.data.train_texts, self.subset.tolist())
        return self._train_ids

    @property
    def positive_ids(self) -> dict[int, np.ndarray]:
        if self._positive_ids is None:
            self._positive_ids = self._token_ids(self.data.train_positives, self.subset.tolist())
        return self._positive_ids

    def _train_lengths(self) -> list[int]:
        """Token count of each training item, in subset order (query + positive for pairs)."""
        items = self.subset.tolist()
        lengths = [len(self.train_ids[i]) for i in items]
        if self.data.kind == "pairs":
            lengths = [a + len(self.positive_ids[i]) for a, i in zip(lengths, items, strict=True)]
        return lengths

    def train_sampler(self, n_items: int, labels=None, drop_last: bool = False) -> Sampler:
        """The base's batches of this rank, length-bucketed when `length_bucket_pool` > 1."""
        sampler = super().train_sampler(n_items, labels, drop_last)
        if self.length_bucket_pool <= 1:
            return sampler
        return LengthBucketBatchSampler(
            sampler, self._train_lengths(), labels, self.length_bucket_pool, self.seed
        )

    def _batch(self, ids: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """`input_ids` padded to the longest item with the tokenizer's pad id and side, and the
        `attention_mask` of the real tokens."""
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):
            span = slice(width - len(seq), width) if self.pad_left else slice(0, len(seq))
            input_ids[row, span] = torch.from_numpy(seq)
            mask[row, span] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def collate_train(self, indices: list[int]) -> dict[str, Any]:
        texts = self._batch([self.train_ids[i] for i in indices])
        if self.data.kind == "pairs":
            return {
                "query": texts,
                "positive": self._batch([self.positive_ids[i] for i in indices]),
                "index": torch.as_tensor(indices),
            }
        return {
            "input": texts,
            "labels": torch.as_tensor([self.data.train_labels[i] for i in indices]),
            "index": torch.as_tensor(indices),
        }

    def collate_eval(self, indices: list[int]) -> dict[str, Any]:
        return {
            "input": self._batch([self.eval_ids[i] for i in indices]),
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
