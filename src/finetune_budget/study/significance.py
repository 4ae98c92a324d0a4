"""Whether a gain beats the seed-to-seed noise: the one test the search and the report share."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from scipy import stats

NO_GAIN = "no measured data.n gained over the pretrained model beyond the seed noise"


def paying_sizes(points: Mapping[int, Mapping[int, float]], level: float) -> list[int]:
    """The measured n whose mean gain over seeds is above 0 with `level` confidence for all of
    them together: one-sided t lower bounds at 1 - (1 - level) / k for k sizes (Bonferroni; with
    five sizes of pure noise, one would pass an uncorrected 90% test 41% of the time). One
    seed: its gain above 0."""
    out = []
    each = 1 - (1 - level) / max(len(points), 1)
    for n, by_seed in points.items():
        g = np.asarray(list(by_seed.values()), float)
        if len(g) >= 2:
            lower = g.mean() - stats.t.ppf(each, len(g) - 1) * g.std(ddof=1) / math.sqrt(len(g))
        else:
            lower = float(g.mean()) if len(g) else -math.inf
        if lower > 0:
            out.append(n)
    return out
