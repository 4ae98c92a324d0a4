"""Training batch samplers that split each epoch across DDP ranks: class-aware batches (a few
items of one class together, so every anchor has positives) and plain shuffled batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler


class EpochCounter:
    """The epoch a batch sampler draws. Lightning calls `set_epoch` on a loader's
    `batch_sampler.sampler` (not on the batch sampler) at every epoch start, also when a run
    resumes from a checkpoint; so the batch samplers below keep theirs there."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)


def rank_batches(
    order: Sequence[int],
    batch_size: int,
    num_replicas: int = 1,
    rank: int = 0,
    drop_last: bool = False,
) -> list[list[int]]:
    """One epoch's item order (the same on every rank) -> this rank's batches.

    The order is cut into rounds of `num_replicas * batch_size` items; in each round rank r takes
    items r*B .. (r+1)*B-1. So at every step all ranks hold batches of one size: the all-gathers
    of the losses see equal shapes and rank r's items sit at offset r*B, and across ranks every
    item is used once. The last, incomplete round of R < num_replicas*B items is dropped with
    `drop_last` (unless it is the only one), else split evenly (R // num_replicas items per rank;
    the last R % num_replicas items of the epoch, fewer than num_replicas, are left out). With one
    process and drop_last=False nothing is left out. Like torch's DistributedSampler with
    drop_last, but it keeps batches of consecutive items (class chunks stay together).
    """
    step = batch_size * num_replicas
    full = len(order) // step * step
    batches = [
        list(order[s + rank * batch_size : s + (rank + 1) * batch_size])
        for s in range(0, full, step)
    ]
    rest = order[full:]
    share = len(rest) // num_replicas
    if share and (not drop_last or not batches):
        batches.append(list(rest[rank * share : (rank + 1) * share]))
    return batches


class _EpochBatches(Sampler[list[int]]):
    """A batch sampler whose epoch's batches depend only on (seed, epoch): subclasses give the
    epoch's item order (`_order`); `rank_batches` cuts it into this rank's batches."""

    def __init__(
        self,
        batch_size: int,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.drop_last, self.num_replicas, self.rank = drop_last, num_replicas, rank
        self.sampler = EpochCounter()  # Lightning sets the epoch here

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def _order(self, rng: np.random.Generator) -> list[int]:
        raise NotImplementedError

    def _batches(self) -> list[list[int]]:
        order = self._order(np.random.default_rng([self.seed, self.epoch]))
        return rank_batches(order, self.batch_size, self.num_replicas, self.rank, self.drop_last)

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches()

    def __len__(self) -> int:
        return len(self._batches())


class ShuffledBatchSampler(_EpochBatches):
    """Batches of a random order of `n` items that depends only on (seed, epoch), split across
    `num_replicas` ranks by `rank_batches` (pairs, masked-LM chunks: any item may go with any)."""

    def __init__(self, n: int, batch_size: int, **epochs: Any) -> None:
        """epochs: _EpochBatches' seed, drop_last, num_replicas and rank."""
        super().__init__(batch_size, **epochs)
        self.n = int(n)

    def _order(self, rng: np.random.Generator) -> list[int]:
        return rng.permutation(self.n).tolist()


class ClassChunkBatchSampler(_EpochBatches):
    """Yields batches of `batch_size` indices built from chunks of `per_class` same-label items.

    Every item appears exactly once per epoch (an epoch sees n items), the order depends only on
    (seed, epoch), and with `num_replicas > 1` the ranks split it as `rank_batches` says (equal
    batch sizes at every step; fewer than num_replicas items of an epoch dropped).
    labels: (N,) class ids of the training subset.
    """

    def __init__(
        self, labels: Sequence[int], batch_size: int, per_class: int, **epochs: Any
    ) -> None:
        """epochs: _EpochBatches' seed, drop_last, num_replicas and rank."""
        super().__init__(batch_size, **epochs)
        self.labels = np.asarray(labels)
        self.per_class = max(1, int(per_class))

    def _order(self, rng: np.random.Generator) -> list[int]:
        chunks: list[list[int]] = []
        for label in np.unique(self.labels):
            members = np.flatnonzero(self.labels == label)
            rng.shuffle(members)
            chunks += [
                members[i : i + self.per_class].tolist()
                for i in range(0, len(members), self.per_class)
            ]
        order = rng.permutation(len(chunks))
        return [i for c in order for i in chunks[c]]


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
        self._epoch = 0

    @property
    def sampler(self) -> object | None:
        """The base's epoch holder: Lightning calls `batch_sampler.sampler.set_epoch`."""
        return getattr(self.base, "sampler", None)

    @property
    def epoch(self) -> int:
        return int(getattr(self.base, "epoch", self._epoch))

    @property
    def generator(self):
        """The base's random generator, if it has one (continuation saves and restores it)."""
        return getattr(self.sampler, "generator", None)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

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
