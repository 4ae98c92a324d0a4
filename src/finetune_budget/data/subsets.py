"""Nested training subsets: the first n of one seeded permutation, so n=100 lies inside n=500."""

from __future__ import annotations

import numpy as np

from finetune_budget.errors import DataError


def nested_subset(total: int, n: int, seed: int, *, name: str = "the data set") -> np.ndarray:
    """Indices of n of `total` items: the first n of `permutation(total)` under `seed`.

    The same seed gives the same permutation for every n, so subsets are nested.
    """
    if total <= 0:
        raise DataError(f"{name} has no training items; check the file and its columns")
    if n is None or int(n) <= 0:
        raise DataError(f"data.n={n} must be a positive number of labelled items (<= {total})")
    if int(n) > total:
        raise DataError(
            f"data.n={n} is larger than the {total} training items of {name}; use data.n<={total}"
        )
    order = np.random.default_rng(int(seed)).permutation(total)
    return order[: int(n)]
