"""The gain surface over labels and epochs (study/surface.py): known surfaces recovered, held-out
cells predicted within their intervals."""

from __future__ import annotations

import numpy as np
import pytest

from finetune_budget.study.surface import effective_data, fit_surface, held_out_cells

SIZES = np.array([100, 200, 400, 800, 1600, 3200], dtype=float)
EPOCHS = np.arange(1, 6, dtype=float)


def truth(n, e, a=0.06, b=0.8, c=0.5, r=2.0, k=0.3):
    return a - b * effective_data(n, e, r) ** -c - k * (e - 1) / n


def grid(seeds: int):
    n, e, s = np.meshgrid(SIZES, EPOCHS, np.arange(seeds), indexing="ij")
    return n.ravel(), e.ravel(), s.ravel()


def test_effective_data_by_hand():
    # R = 2, e = 3: 100 (1 + 2 (1 - exp(-1))) = 226.42; R = 0: repeats add nothing
    assert effective_data(100.0, 3.0, 2.0) == pytest.approx(100 * (1 + 2 * (1 - np.exp(-1))))
    assert effective_data(100.0, 3.0, 0.0) == 100.0
    assert effective_data(100.0, 1.0, 5.0) == 100.0  # one epoch is the data itself


def test_a_known_surface_is_recovered_and_extrapolated():
    n, e, s = grid(1)
    surface = fit_surface(n, e, truth(n, e), s, ceiling=1.0, n_boot=0)
    # beyond the grid in both directions: twice the labels, and 8 epochs
    for at_n, at_e in ((6400.0, 3.0), (800.0, 8.0), (12800.0, 5.0)):
        assert surface(at_n, at_e) == pytest.approx(truth(at_n, at_e), abs=1e-3)


@pytest.mark.slow  # a long integration test: `make test` runs it, `make test-fast` not
def test_held_out_cells_land_in_their_intervals():
    rng = np.random.default_rng(0)
    n, e, s = grid(3)
    y = truth(n, e) + rng.normal(0, 0.002, n.size)
    rows = held_out_cells(n, e, y, s, ceiling=1.0, n_boot=60)
    assert len(rows) == len(SIZES) * len(EPOCHS)
    assert np.mean([r["covered"] for r in rows]) >= 0.8  # the 90% intervals, by the bar
    for r in rows:
        assert r["lo"] <= r["predicted"] <= r["hi"]


def test_a_surface_needs_sizes_and_epochs():
    with pytest.raises(ValueError, match="3\\+ sizes and 2\\+ epoch counts"):
        fit_surface([100, 200, 400], [1, 1, 1], [0.01, 0.02, 0.03])
