"""Class-aware batches: a few items of one class together, so every anchor has positives."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class ClassChunkBatchSampler(Sampler[list[int]]):
    """Yields batches of `batch_size` indices built from chunks of `per_class` same-label items.

    Every item appears exactly once per epoch (an epoch sees n items), the order depends only on
    (seed, epoch), and with `num_replicas > 1` each rank takes every num_replicas-th batch.
    labels: (N,) class ids of the training subset.
    """

    def __init__(
        self,
        labels: Sequence[int],
        batch_size: int,
        per_class: int,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        self.labels = np.asarray(labels)
        self.batch_size = int(batch_size)
        self.per_class = max(1, int(per_class))
        self.seed = int(seed)
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        chunks: list[list[int]] = []
        for label in np.unique(self.labels):
            members = np.flatnonzero(self.labels == label)
            rng.shuffle(members)
            chunks += [
                members[i : i + self.per_class].tolist()
                for i in range(0, len(members), self.per_class)
            ]
        order = rng.permutation(len(chunks))
        flat = [i for c in order for i in chunks[c]]
        batches = [flat[i : i + self.batch_size] for i in range(0, len(flat), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.num_replicas > 1:
            usable = len(batches) - len(batches) % self.num_replicas
            batches = batches[self.rank : usable : self.num_replicas]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches()

    def __len__(self) -> int:
        return len(self._batches())
