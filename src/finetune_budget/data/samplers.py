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


class LengthBucketBatchSampler(Sampler[list[int]]):
    """Length-aware batches on top of any batch sampler: fewer padding tokens, same guarantees.

    Takes the base sampler's batches of an epoch in pools of `pool` consecutive batches; within a
    pool, cuts each batch into runs of consecutive same-label items (the base's class chunks;
    single items for pairs), sorts the runs by length and refills the pool's batches with the
    same sizes, then shuffles the pool's batch order. So every item the base yields appears
    exactly once per epoch, batch sizes (and, under DDP, equal shapes per rank) are the base's,
    same-label chunks stay together, and the order depends only on (seed, epoch).

    lengths: (N,) token count of each dataset index; labels: (N,) class of each index or None.
    """

    def __init__(
        self,
        base: Sampler[list[int]],
        lengths: Sequence[int],
        labels: Sequence[int] | None = None,
        pool: int = 8,
        seed: int = 0,
    ) -> None:
        self.base = base
        self.lengths = np.asarray(lengths)
        self.labels = None if labels is None else np.asarray(labels)
        self.pool = max(1, int(pool))
        self.seed = int(seed)
        self.epoch = 0

    @property
    def generator(self):
        """The base's random generator (continuation saves and restores it)."""
        inner = getattr(self.base, "sampler", self.base)
        return getattr(inner, "generator", None)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for target in (self.base, getattr(self.base, "sampler", None)):
            if hasattr(target, "set_epoch"):
                target.set_epoch(epoch)

    def _runs(self, batch: list[int]) -> list[list[int]]:
        if self.labels is None:
            return [[i] for i in batch]
        runs: list[list[int]] = []
        for i in batch:
            if runs and self.labels[runs[-1][-1]] == self.labels[i]:
                runs[-1].append(i)
            else:
                runs.append([i])
        return runs

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch, 7919])
        batches = [list(b) for b in self.base]
        for start in range(0, len(batches), self.pool):
            group = batches[start : start + self.pool]
            runs = [r for b in group for r in self._runs(b)]
            runs.sort(key=lambda r: int(self.lengths[r].max()))
            flat = [i for r in runs for i in r]
            out, pos = [], 0
            for b in group:
                out.append(flat[pos : pos + len(b)])
                pos += len(b)
            yield from (out[j] for j in rng.permutation(len(out)))

    def __len__(self) -> int:
        return len(self.base)
