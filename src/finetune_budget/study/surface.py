"""Gain over labels and epochs together: one surface fitted to the whole (data.n, epochs) grid.

Repeated epochs act as fresh data with diminishing returns (Muennighoff et al., NeurIPS 2023):
e epochs over n labels are worth

    D(n, e) = n (1 + R (1 - exp(-(e - 1) / R)))          R >= 0: the repeats worth having

fresh labels. The gain follows a saturating power law in them with a "pre-power" offset d for
the small data where fine-tuning barely moves yet (Lin et al., ICML 2024: B / (D_l + D^b) + E),
and a penalty for epochs that overfit small data:

    gain(n, e) = a - b / (d + D^c) - k (e - 1) / n      b >= 0, c > 0, d >= 0, k >= 0, a <= ceiling

(d = 0: the plain power law a - b D^-c). For each (c, R, d) on a grid the model is linear in
(a, b, k): a weighted least-squares solve under the sign constraints (every active set of the few
constraints, batched), the best (c, R) refined once. Seeds
are resampled as wholes for the interval of the surface (a cluster bootstrap; with one seed, the
residuals are), and the residuals add the noise of a new measured mean. `held_out_cells` refits
without each (n, e) cell and predicts it: the check that the surface generalises across the grid.

    surface = fit_surface(n, epochs, gain, seeds, ceiling=...)
    mean, lo, hi = surface.predict([2000], [4])
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

C_GRID = np.geomspace(0.02, 3.0, 30)
R_GRID = np.concatenate([[0.0], np.geomspace(0.05, 40.0, 24)])
D_GRID = np.array([0.0, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0])  # in units of (n / smallest n)^c
N_BOOT = 200


def effective_data(n, e, r) -> np.ndarray:
    """D(n, e): e epochs over n labels as fresh labels (R = 0: repeats add nothing). Broadcasts:
    R may be an array of grid values, (G, 1) against (N,) points."""
    n, e, r = (np.asarray(v, dtype=float) for v in (n, e, r))
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        repeats = r * (1.0 - np.exp(-(e - 1.0) / np.where(r > 0, r, 1.0)))
    return n * (1.0 + np.where(r > 0, repeats, 0.0))


def _design(n, e, shape, scale):
    """Columns [1, -1 / (d + (D/scale)^c), -(e-1)/(n/scale)] of the model at shape (c, R, d);
    each of c, R, d a number or a (G, 1) array of grid values: (..., N, 3)."""
    c, r, dl = shape
    x = effective_data(n, e, r) / scale
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        z = -1.0 / (dl + np.power(x, c))
    overfit = np.broadcast_to(-(np.asarray(e, dtype=float) - 1.0) / (n / scale), x.shape)
    return np.stack([np.ones_like(x), z, overfit], axis=-1)


ACTIVE_SETS = [
    active for k in range(4) for active in itertools.combinations(range(3), k)
]  # which of a <= a_max (0), b >= 0 (1), k >= 0 (2) hold with equality


def _fit(n, e, y, w, a_max, scale, grid=None):
    """(shape, beta, sse) of the best shape (c, R, d) of `grid` under the constraints: for every
    grid point and every active set of the constraints, the weighted least-squares solve with
    those coefficients at their bounds (a batched 3x3 solve), the best feasible one kept."""
    if grid is None:
        grid = list(itertools.product(C_GRID, R_GRID, D_GRID))
    grid = np.array(grid)
    c, r, dl = grid[:, 0], grid[:, 1], grid[:, 2]
    x = _design(n, e, (c[:, None], r[:, None], dl[:, None]), scale)  # (G, N, 3)
    bounds = np.array([a_max if a_max is not None else np.nan, 0.0, 0.0])
    best_sse = np.full(len(grid), np.inf)
    best_beta = np.full((len(grid), 3), np.nan)
    for active in ACTIVE_SETS:
        if 0 in active and a_max is None:
            continue
        free = [j for j in range(3) if j not in active]
        beta = np.zeros((len(grid), 3))
        for j in active:
            beta[:, j] = bounds[j]
        target = y[None, :] - (x[:, :, list(active)] @ bounds[list(active)] if active else 0.0)
        if free:
            xf = x[:, :, free]
            a = np.einsum("gni,n,gnj->gij", xf, w, xf)
            b = np.einsum("gni,n,gn->gi", xf, w, target)
            a = a + 1e-12 * np.trace(a, axis1=1, axis2=2)[:, None, None] * np.eye(len(free))
            try:
                beta[:, free] = np.linalg.solve(a, b[..., None])[..., 0]
            except np.linalg.LinAlgError:
                continue
        ok = (beta[:, 1] >= -1e-12) & (beta[:, 2] >= -1e-12)
        if a_max is not None:
            ok &= beta[:, 0] <= a_max + 1e-12
        resid = y[None, :] - np.einsum("gni,gi->gn", x, beta)
        sse = np.where(ok & np.isfinite(resid).all(axis=1), (w * resid**2).sum(axis=1), np.inf)
        better = sse < best_sse
        best_sse = np.where(better, sse, best_sse)
        best_beta = np.where(better[:, None], beta, best_beta)
    i = int(np.argmin(best_sse))
    if not np.isfinite(best_sse[i]):
        return None, None, math.inf
    return (float(c[i]), float(r[i]), float(dl[i])), best_beta[i], float(best_sse[i])


@dataclass
class Surface:
    """A fitted gain(n, e) surface (see the module docstring)."""

    shape: tuple[float, float, float]  # c, R, d
    beta: np.ndarray  # a, b (in units of n / scale), k
    scale: float
    ceiling: float | None
    level: float = 0.9
    n_max: float = math.nan
    e_max: float = math.nan
    seeds: int = 1
    _draws: list = field(default_factory=list, repr=False)  # bootstrap (shape, beta)
    _noise: np.ndarray | None = field(default=None, repr=False)
    _ref: tuple = (None, None)  # the coarse-grid fit (shape, beta) the draws deviate from
    _groups: int = 1

    def __call__(self, n, e) -> np.ndarray:
        n, e = np.broadcast_arrays(np.asarray(n, dtype=float), np.asarray(e, dtype=float))
        out = _design(n, e, self.shape, self.scale) @ self.beta
        return out if self.ceiling is None else np.minimum(out, self.ceiling)

    def formula(self) -> str:
        a, b, k = self.beta
        c, r, dl = self.shape
        return (
            f"gain = {a:.4g} - {b * self.scale**c:.4g} / ({dl * self.scale**c:.4g} + D^{c:.3g})"
            f" - {k * self.scale:.4g} (e-1)/n, D = n (1 + {r:.3g} (1 - exp(-(e-1)/{r:.3g})))"
        )

    def _spread(self, level: float) -> float:
        """A mean over G resampled seeds varies (G-1)/G as much as one over G new seeds, and its
        spread is known from G seeds only: deviations widened by sqrt(G/(G-1)) t_{G-1} / z."""
        g = self._groups
        if g < 2:
            return 1.0
        q = 0.5 + level / 2
        return math.sqrt(g / (g - 1)) * float(stats.t.ppf(q, g - 1) / stats.norm.ppf(q))

    def _deviations(self, n: np.ndarray, e: np.ndarray, level: float) -> np.ndarray | None:
        """(B, ...) bootstrap surfaces at (n, e), widened around the fit (None: no draws)."""
        if not self._draws:
            return None
        curves = np.stack([_design(n, e, shape, self.scale) @ b for shape, b in self._draws])
        ref = _design(n, e, self._ref[0], self.scale) @ self._ref[1]
        return self(n, e) + self._spread(level) * (curves - ref)

    def difference(self, n: float, e0: float, e1: float, level: float | None = None):
        """gain(n, e1) - gain(n, e0) with its interval: (mean, lo, hi) floats."""
        level = self.level if level is None else level
        ns, es = np.array([n, n], dtype=float), np.array([e0, e1], dtype=float)
        mean = self(ns, es)
        d = float(mean[1] - mean[0])
        draws = self._deviations(ns, es, level)
        if draws is None:
            return d, math.nan, math.nan
        if self.ceiling is not None:
            draws = np.minimum(draws, self.ceiling)
        q = (1 - level) / 2
        lo, hi = np.percentile(draws[:, 1] - draws[:, 0], [100 * q, 100 * (1 - q)])
        return d, min(float(lo), d), max(float(hi), d)

    def epochs_worth_it(self, n: float, share: float = 0.9) -> int:
        """The fewest epochs (1 .. the most measured) whose gain at n reaches `share` of the best
        of them on the surface."""
        es = np.arange(1, int(self.e_max) + 1, dtype=float)
        gains = self(np.full(es.shape, float(n)), es)
        best = float(gains.max())
        if best <= 0:
            return int(es[int(np.argmax(gains))])
        return int(es[np.flatnonzero(gains >= share * best)[0]])

    def predict(self, n, e, level: float | None = None, seeds: int | None = None):
        """The mean over `seeds` seeds measured at (n, e), with its interval: mean, lo, hi."""
        level = self.level if level is None else level
        n, e = np.broadcast_arrays(
            np.atleast_1d(np.asarray(n, dtype=float)), np.atleast_1d(np.asarray(e, dtype=float))
        )
        mean = self(n, e)
        curves = self._deviations(n, e, level)
        if curves is None:
            nan = np.full(mean.shape, np.nan)
            return mean, nan, nan
        if self.ceiling is not None:
            curves = np.minimum(curves, self.ceiling)
        if self._noise is not None and len(self._noise):
            k = max(int(seeds or self.seeds), 1)
            rng = np.random.default_rng(1)
            pick = rng.choice(self._noise, size=(len(curves), *mean.shape, k), replace=True)
            curves = curves + pick.mean(axis=-1)
        q = (1 - level) / 2
        lo, hi = np.percentile(curves, [100 * q, 100 * (1 - q)], axis=0)
        return mean, np.minimum(lo, mean), np.maximum(hi, mean)


def fit_surface(
    n: Sequence[float],
    epochs: Sequence[float],
    gain: Sequence[float],
    seeds: Sequence | None = None,
    ceiling: float | None = None,
    level: float = 0.9,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> Surface:
    """Fit gain(n, e) to every measured (n, epochs, seed) point. Raises ValueError with fewer
    than 3 sizes or fewer than 2 epoch counts (a surface needs both directions)."""
    n, e, y = (np.asarray(v, dtype=float).ravel() for v in (n, epochs, gain))
    g = np.zeros(len(n), dtype=int) if seeds is None else np.asarray(seeds).ravel()
    keep = np.isfinite(n) & np.isfinite(e) & np.isfinite(y) & (n > 0) & (e >= 1)
    n, e, y, g = n[keep], e[keep], y[keep], g[keep]
    if len(np.unique(n)) < 3 or len(np.unique(e)) < 2:
        raise ValueError(
            f"a surface over labels and epochs needs 3+ sizes and 2+ epoch counts, got "
            f"{len(np.unique(n))} and {len(np.unique(e))}"
        )
    _, g = np.unique(g, return_inverse=True)
    scale = float(n.min())
    w = np.ones(len(y))
    (c, r, dl), beta, sse = _fit(n, e, y, w, ceiling, scale)
    ci = int(np.argmin(np.abs(C_GRID - c)))
    ri = int(np.argmin(np.abs(R_GRID - r)))
    fine_c = np.geomspace(C_GRID[max(ci - 1, 0)], C_GRID[min(ci + 1, len(C_GRID) - 1)], 9)
    lo_r, hi_r = R_GRID[max(ri - 1, 0)], R_GRID[min(ri + 1, len(R_GRID) - 1)]
    fine = list(itertools.product(fine_c, np.linspace(lo_r, hi_r, 9), [dl]))
    shape, beta, sse = _fit(n, e, y, w, ceiling, scale, fine)
    per_budget = np.bincount(np.unique(np.stack([n, e]), axis=1, return_inverse=True)[1])
    surface = Surface(
        shape,
        beta,
        scale,
        ceiling,
        level,
        float(n.max()),
        float(e.max()),
        int(round(np.median(per_budget))),
    )
    dof = len(y) - 5
    if dof > 0:
        resid = y - surface(n, e)
        surface._noise = resid * math.sqrt(len(y) / dof)
        groups = int(g.max()) + 1
        rng = np.random.default_rng(seed)
        coarse = list(itertools.product(C_GRID[::3], R_GRID[::3], D_GRID))
        surface._ref = _fit(n, e, y, w, ceiling, scale, coarse)[:2]
        surface._groups = groups
        fitted = surface(n, e)
        for _ in range(n_boot):
            if groups >= 2:  # whole seeds resampled
                counts = rng.multinomial(groups, np.full(groups, 1 / groups))
                yb, wb = y, counts[g].astype(float)
            else:  # one seed: residuals resampled
                yb, wb = fitted + rng.choice(surface._noise, len(y), replace=True), w
            shape_b, beta_b, _ = _fit(n, e, yb, wb, ceiling, scale, coarse)
            if beta_b is not None:
                surface._draws.append((shape_b, beta_b))
    return surface


def held_out_cells(
    n, epochs, gain, seeds, ceiling: float | None = None, level: float = 0.9, n_boot: int = 60
) -> list[dict]:
    """Each (n, e) cell of the grid left out, the surface fitted to the others, the cell's mean
    over its seeds predicted: n, epochs, predicted, lo, hi, measured, covered."""
    n, e, y = (np.asarray(v, dtype=float).ravel() for v in (n, epochs, gain))
    g = np.asarray(seeds).ravel()
    rows = []
    for cell_n, cell_e in sorted(set(zip(n.tolist(), e.tolist(), strict=True))):
        held = (n == cell_n) & (e == cell_e)
        try:
            s = fit_surface(n[~held], e[~held], y[~held], g[~held], ceiling, level, n_boot)
        except ValueError:
            continue
        k = len(np.unique(g[held]))
        mean, lo, hi = (float(v[0]) for v in s.predict([cell_n], [cell_e], seeds=k))
        measured = float(y[held].mean())
        rows.append(
            {
                "n": cell_n,
                "epochs": cell_e,
                "predicted": mean,
                "lo": lo,
                "hi": hi,
                "measured": measured,
                "covered": bool(lo <= measured <= hi),
            }
        )
    return rows
