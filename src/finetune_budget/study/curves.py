"""Learning curves that are checked: several standard families fitted to (budget, gain) points,
chosen by leave-one-budget-out error, with intervals that carry the seed-to-seed noise and a
backtest (hold out the largest budget, fit the rest, predict it) that labels how far to trust
each prediction.

    fit = fit_learning_curve(n, gain, groups=seed)       # x: labels, items seen, FLOPs, ...
    mean, lo, hi = fit.predict([5000])                   # 90% interval of a measured mean
    fit.backtest.covered, fit.trust                      # did the held-out budget land inside?

Families (x > 0; every family is linear in (a, b) given one shape parameter, so a fit is a
vectorised least-squares solve over a grid of that parameter, refined, with no start values):

    pow3     gain = a - b x^-c                           saturating power law, b >= 0
    pow_err  e(x) = alpha + eta x^gamma on the error     Hoiem et al. 2021, gamma < 0; the error
             (gain = ceiling - e): alpha >= 0,           cannot fall below 0, so the gain cannot
             i.e. the asymptote a <= ceiling             pass the metric's ceiling (needs it)
    exp_sat  gain = a - b exp(-x / s)                    exponential saturation, b >= 0
    loglin   gain = a + b log x                          log-linear (no saturation)

With the metric's ceiling known (a score <= 1 gains at most (1 - m0) / m0), every asymptote a is
kept at or below it, and no prediction or interval bound passes it (loglin included).

Intervals: with several seeds (`groups`), seeds are resampled as wholes (a cluster bootstrap of
the curve); otherwise residuals are resampled. A prediction interval adds the noise of a new
measured mean (resampled residuals over the seeds it averages), and is widened to Student's t
with the fit's residual degrees of freedom. With no budget to spare (fewer distinct budgets than
a family's parameters + 1) nothing is extrapolated and `reason` says what to run.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

log = logging.getLogger(__name__)

FAMILIES = ("pow3", "pow_err", "exp_sat", "loglin")
TRUST = ("high", "medium", "low", "untested")
N_GRID = 240  # shape parameters tried by a fit (then refined)
N_GRID_BOOT = 64  # ... by each bootstrap refit and leave-one-budget-out fold
N_BOOT = 300


def quiet_numerics(fn: Callable) -> Callable:
    """Run `fn` with numpy's floating-point warnings off and RuntimeWarnings sent to the debug
    log: fits try parameters that overflow or divide by zero on purpose, and every answer checks
    its numbers for finiteness itself, so the console shows answers, not numpy's chatter."""

    @functools.wraps(fn)
    def quiet(*args, **kwargs):
        with np.errstate(all="ignore"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            result = fn(*args, **kwargs)
        for w in caught:
            if issubclass(w.category, RuntimeWarning):
                log.debug("%s: %s (%s:%s)", fn.__name__, w.message, w.filename, w.lineno)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return result

    return quiet


@dataclass(frozen=True)
class _Family:
    name: str
    n_params: int
    b_nonneg: bool  # the curve rises with x
    needs_ceiling: bool  # written in the error below the metric's ceiling (pow_err)
    saturates: bool  # has an asymptote a: a <= the metric's ceiling where it is known

    def grid(self, x: np.ndarray, size: int = N_GRID) -> np.ndarray:
        """Shape parameters tried (x scaled so that its smallest value is 1)."""
        if self.name in ("pow3", "pow_err"):
            return np.geomspace(1e-3, 4.0, size)
        if self.name == "exp_sat":
            return np.geomspace(0.02, 30.0 * float(x.max()), size)
        return np.array([1.0])

    def z(self, x: np.ndarray, theta: np.ndarray) -> np.ndarray:
        """The regressor: gain = a + b z(x; theta). x: (N,), theta: (...) -> (..., N)."""
        t = np.asarray(theta, dtype=float)[..., None]
        x = np.asarray(x, dtype=float)
        if self.name in ("pow3", "pow_err"):
            return -np.power(x, -t)
        if self.name == "exp_sat":
            return -np.exp(-x / t)
        return np.broadcast_to(np.log(x), (*t.shape[:-1], x.shape[-1]))


_FAMILY = {
    "pow3": _Family("pow3", 3, True, False, True),
    "pow_err": _Family("pow_err", 3, True, True, True),
    "exp_sat": _Family("exp_sat", 3, True, False, True),
    "loglin": _Family("loglin", 2, False, False, False),
}


def _solve(
    z: np.ndarray, y: np.ndarray, w: np.ndarray, b_nonneg: bool, a_max: float | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Weighted least squares of y = a + b z for every row of y/w and every grid row of z, with
    b >= 0 and a <= a_max where asked. z: (G, N) shared or (B, G, N) per row; y, w: (B, N).
    Returns a, b, grid index, SSE, each (B,), at the best grid row per B."""
    sw = w.sum(1)[:, None]
    wy = w * y
    swy = wy.sum(1)[:, None]
    swyy = (wy * y).sum(1)[:, None]
    if z.ndim == 2:
        swz, swzz, swzy = w @ z.T, w @ (z * z).T, wy @ z.T
    else:
        swz = np.einsum("bn,bgn->bg", w, z)
        swzz = np.einsum("bn,bgn->bg", w, z * z)
        swzy = np.einsum("bn,bgn->bg", wy, z)

    def sse(a, b):
        return swyy - 2 * a * swy - 2 * b * swzy + a * a * sw + 2 * a * b * swz + b * b * swzz

    det = sw * swzz - swz * swz
    ok = det > 1e-12 * np.maximum(sw * swzz, 1e-300)
    with np.errstate(divide="ignore", invalid="ignore"):
        b_u = np.where(ok, (sw * swzy - swz * swy) / np.where(ok, det, 1.0), 0.0)
    a_u = (swy - b_u * swz) / sw
    feasible = ok.copy()
    if b_nonneg:
        feasible &= b_u >= 0
    if a_max is not None:
        feasible &= a_u <= a_max
    # boundary candidates of the convex problem: b = 0, and a = a_max
    a_0 = swy / sw
    if a_max is not None:
        a_0 = np.minimum(a_0, a_max)
    b_0 = np.zeros_like(a_0)
    cands = [
        (np.where(feasible, a_u, 0.0), np.where(feasible, b_u, 0.0), feasible),
        (np.broadcast_to(a_0, swz.shape), np.broadcast_to(b_0, swz.shape), None),
    ]
    if a_max is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            b_c = np.where(swzz > 0, (swzy - a_max * swz) / np.where(swzz > 0, swzz, 1.0), 0.0)
        if b_nonneg:
            b_c = np.maximum(b_c, 0.0)
        cands.append((np.full_like(b_c, a_max), b_c, None))
    best_a = best_b = best_e = None
    for a, b, mask in cands:
        e = sse(a, b)
        if mask is not None:
            e = np.where(mask, e, np.inf)
        if best_e is None:
            best_a, best_b, best_e = np.array(a), np.array(b), e
        else:
            better = e < best_e
            best_a = np.where(better, a, best_a)
            best_b = np.where(better, b, best_b)
            best_e = np.where(better, e, best_e)
    j = np.argmin(best_e, axis=1)
    rows = np.arange(len(j))
    return best_a[rows, j], best_b[rows, j], j, np.maximum(best_e[rows, j], 0.0)


def _fit_one(
    fam: _Family,
    x: np.ndarray,
    y: np.ndarray,
    w: np.ndarray | None = None,
    a_max: float | None = None,
    refine: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit `fam` to (x, y) (x scaled), one fit per row of w (B, N). Returns a, b, theta (B,)."""
    w = np.ones((1, len(x))) if w is None else w
    yy = np.broadcast_to(y, w.shape)
    grid = fam.grid(x)
    a, b, j, _ = _solve(fam.z(x, grid), yy, w, fam.b_nonneg, a_max)
    theta = grid[j]
    if refine and len(grid) > 1:
        for r in range(w.shape[0]):
            lo, hi = grid[max(j[r] - 1, 0)], grid[min(j[r] + 1, len(grid) - 1)]
            fine = np.geomspace(lo, hi, 61)
            rows = slice(r, r + 1)
            a_r, b_r, k, _ = _solve(fam.z(x, fine), yy[rows], w[rows], fam.b_nonneg, a_max)
            a[r], b[r], theta[r] = a_r[0], b_r[0], fine[k[0]]
    return a, b, theta


def _curve(fam: _Family, xs: np.ndarray, a, b, theta) -> np.ndarray:
    """Curves at scaled xs: a, b, theta (B,) -> (B, len(xs))."""
    a, b, theta = (np.atleast_1d(np.asarray(v, dtype=float)) for v in (a, b, theta))
    if fam.name in ("pow3", "pow_err"):
        z = -np.power(xs[None, :], -theta[:, None])
    elif fam.name == "exp_sat":
        z = -np.exp(-xs[None, :] / theta[:, None])
    else:
        z = np.broadcast_to(np.log(xs)[None, :], (len(a), len(xs)))
    return a[:, None] + b[:, None] * z


def _invert(fam: _Family, target: float, a, b, theta) -> np.ndarray:
    """Scaled x where each curve reaches `target` (inf where it never does, 0 if already)."""
    a, b, theta = (np.atleast_1d(np.asarray(v, dtype=float)) for v in (a, b, theta))
    out = np.full(a.shape, np.inf)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if fam.name == "loglin":
            ok = b > 0
            out[ok] = np.exp((target - a[ok]) / b[ok])
            return out
        gap = a - target  # how far the asymptote is above the target
        ok = (gap > 0) & (b > 0)
        if fam.name in ("pow3", "pow_err"):
            out[ok] = np.power(b[ok] / gap[ok], 1.0 / theta[ok])
        else:
            out[ok] = -theta[ok] * np.log(np.minimum(gap[ok] / b[ok], 1.0))
    return out


@dataclass
class Backtest:
    """The largest budget held out, the rest fitted, the held-out mean predicted."""

    x: float  # the held-out budget
    x_fit_max: float  # the largest budget the fit saw
    family: str
    predicted: float
    lo: float
    hi: float
    measured: float  # mean over the seeds measured at x
    seeds: int
    covered: bool | None  # None: no interval (say why in `reason`)
    trust: str  # high / medium / low / untested
    reason: str

    @property
    def error(self) -> float:
        return self.predicted - self.measured

    @property
    def ratio(self) -> float:
        """How far the backtest extrapolated: held-out budget / largest fitted budget."""
        return self.x / self.x_fit_max


@dataclass
class CurveFit:
    """One fitted learning curve. `params` are in the units of x; `cv_error` is the RMSE of
    leave-one-budget-out predictions of each budget's mean; `cv` holds it for every family
    tried. `extrapolation_ok` is False when no budget was left to check the fit (then `reason`
    says what to run) and predictions outside the measured range are NaN."""

    family: str
    params: dict[str, float]
    n_points: int
    cv_error: float
    extrapolation_ok: bool
    reason: str
    level: float = 0.9
    n_budgets: int = 0
    x_min: float = math.nan
    x_max: float = math.nan
    seeds: int = 1  # seeds per budget (typical): what a predicted "measured mean" averages
    cv: dict[str, float] = field(default_factory=dict)
    ceiling: float | None = None
    backtest: Backtest | None = None
    _scale: float = 1.0
    _theta: tuple[float, float, float] = (math.nan, math.nan, math.nan)  # a, b, shape (scaled)
    _draws: np.ndarray | None = field(default=None, repr=False)  # (B, 3) bootstrap curves
    _draw_family: np.ndarray | None = field(default=None, repr=False)  # (B,) index in FAMILIES
    _ref: tuple[float, float, float] = (math.nan, math.nan, math.nan)  # coarse-grid fit
    _noise: np.ndarray | None = field(default=None, repr=False)  # residual pool (inflated)
    _groups: int = 1  # seeds resampled (1: residuals resampled)
    _dof: int = 0

    # -- the curve -------------------------------------------------------------------------------
    @property
    def _fam(self) -> _Family:
        return _FAMILY[self.family]

    def __call__(self, x) -> np.ndarray:
        xs = np.atleast_1d(np.asarray(x, dtype=float)) / self._scale
        return self._bounded(_curve(self._fam, xs, *self._theta)[0])

    def _bounded(self, values: np.ndarray) -> np.ndarray:
        """No gain beyond the metric's ceiling (loglin has no asymptote to cap)."""
        return values if self.ceiling is None else np.minimum(values, self.ceiling)

    def formula(self) -> str:
        p = self.params
        if self.family == "pow3":
            return f"gain = {p['a']:.4g} - {p['b']:.4g} x^-{p['c']:.3g}"
        if self.family == "pow_err":
            return (
                f"error = {p['alpha']:.4g} + {p['eta']:.4g} x^{p['gamma']:.3g} "
                f"(gain = {p['ceiling']:.4g} - error)"
            )
        if self.family == "exp_sat":
            return f"gain = {p['a']:.4g} - {p['b']:.4g} exp(-x/{p['s']:.4g})"
        return f"gain = {p['a']:.4g} + {p['b']:.4g} ln x"

    @property
    def asymptote(self) -> float:
        """The gain the curve approaches (inf for loglin)."""
        return math.inf if self.family == "loglin" else self._theta[0]

    @property
    def trust(self) -> str:
        return self.backtest.trust if self.backtest is not None else "untested"

    def trust_at(self, x: float) -> str:
        """The backtest's label, one level lower where x lies further beyond the largest budget
        than the backtest extrapolated (twice its ratio or more)."""
        label = self.trust
        bt = self.backtest
        if bt is None or x <= self.x_max or label in ("low", "untested"):
            return label
        if x / self.x_max > 2 * bt.ratio:
            return TRUST[TRUST.index(label) + 1]
        return label

    # -- intervals -------------------------------------------------------------------------------
    def _beyond(self, x: np.ndarray) -> np.ndarray:
        tol = 1e-9 * self.x_max
        return (x > self.x_max + tol) | (x < self.x_min - tol)

    def _t_widen(self, level: float) -> float:
        """Residual bootstrap: percentile deviations widened to Student's t with the residual
        degrees of freedom (NaN when none are left: no interval)."""
        q = 0.5 + level / 2
        if self._dof <= 0:
            return math.nan
        if self._groups >= 2:
            return 1.0  # the curve's spread is widened in _curve_draws
        return float(stats.t.ppf(q, self._dof) / stats.norm.ppf(q))

    def _spread(self, level: float) -> float:
        """Seed bootstrap: a mean over G resampled seeds varies (G-1)/G as much as one over G
        new seeds, and its spread is known from G seeds only: sqrt(G/(G-1)) t_{G-1} / z."""
        g = self._groups
        if g < 2:
            return 1.0
        q = 0.5 + level / 2
        return math.sqrt(g / (g - 1)) * float(stats.t.ppf(q, g - 1) / stats.norm.ppf(q))

    def _band(self, center: np.ndarray, draws: np.ndarray, level: float):
        if draws is None or not np.isfinite(self._t_widen(level)):
            nan = np.full(center.shape, np.nan)
            return nan, nan
        q = (1 - level) / 2
        lo, hi = np.nanpercentile(draws, [100 * q, 100 * (1 - q)], axis=0)
        k = self._t_widen(level)
        return center - k * np.maximum(center - lo, 0), center + k * np.maximum(hi - center, 0)

    def _curve_draws(self, xs: np.ndarray, level: float) -> np.ndarray | None:
        if self._draws is None:
            return None
        d, which = self._draws, self._draw_family
        curves = np.empty((len(d), len(xs)))
        for i, name in enumerate(FAMILIES):
            m = which == i
            if m.any():
                curves[m] = _curve(_FAMILY[name], xs / self._scale, *d[m].T)
        # deviations from the same (coarse-grid) estimator applied to the data, around the fit
        ref = _curve(self._fam, xs / self._scale, *self._ref)
        return self(xs)[None, :] + self._spread(level) * (curves - ref)

    def predict(
        self, x, level: float | None = None, seeds: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predicted mean over `seeds` seeds (default: as many as were measured per budget) at
        each x, with the `level` prediction interval of that measured mean: mean, lo, hi (P,).
        NaN beyond the measured budgets where extrapolation_ok is False."""
        level = self.level if level is None else level
        xs = np.atleast_1d(np.asarray(x, dtype=float))
        mean = self(xs)
        draws = self._curve_draws(xs, level)
        if draws is not None and self._noise is not None and len(self._noise):
            k = max(int(seeds or self.seeds), 1)
            rng = np.random.default_rng(1)
            pick = rng.choice(self._noise, size=(draws.shape[0], len(xs), k), replace=True)
            draws = draws + pick.mean(axis=2)
        lo, hi = (self._bounded(v) for v in self._band(mean, draws, level))
        if not self.extrapolation_ok:
            beyond = self._beyond(xs)
            mean, lo, hi = (np.where(beyond, np.nan, v) for v in (mean, lo, hi))
        return mean, lo, hi

    def expected(self, x, level: float | None = None):
        """The curve itself (the expected gain, no measurement noise) with its interval."""
        level = self.level if level is None else level
        xs = np.atleast_1d(np.asarray(x, dtype=float))
        mean = self(xs)
        lo, hi = self._band(mean, self._curve_draws(xs, level), level)
        if not self.extrapolation_ok:
            beyond = self._beyond(xs)
            mean, lo, hi = (np.where(beyond, np.nan, v) for v in (mean, lo, hi))
        return mean, lo, hi

    def difference(self, x0: float, x1: float, level: float | None = None):
        """Expected gain(x1) - gain(x0), with its interval: (mean, lo, hi) floats."""
        level = self.level if level is None else level
        xs = np.array([x0, x1], dtype=float)
        mean = self(xs)
        center = np.array([mean[1] - mean[0]])
        draws = self._curve_draws(xs, level)
        d = None if draws is None else (draws[:, 1] - draws[:, 0])[:, None]
        lo, hi = self._band(center, d, level)
        if not self.extrapolation_ok and self._beyond(xs).any():
            return math.nan, math.nan, math.nan
        return float(center[0]), float(lo[0]), float(hi[0])

    def budget_for(self, target: float, level: float | None = None) -> tuple[float, float, float]:
        """The x at which the expected gain reaches `target`: (x, lo, hi), where lo/hi are where
        the upper/lower end of the curve's interval reach it (inf: not within 10^4 x the largest
        budget, or never). NaN where extrapolation_ok is False and x is beyond the data."""
        x = float(_invert(self._fam, target, *self._theta)[0]) * self._scale
        if not self.extrapolation_ok and (x > self.x_max or not math.isfinite(x)):
            return math.nan, math.nan, math.nan
        grid = np.geomspace(self.x_min, self.x_max * 1e4, 600)
        _, lo, hi = self.expected(grid, level)

        def first(values: np.ndarray) -> float:
            reached = np.flatnonzero(values >= target)
            return float(grid[reached[0]]) if len(reached) else math.inf

        if np.isnan(lo).all():
            return x, math.nan, math.nan
        return x, min(first(hi), x), max(first(lo), x)


# -- fitting ------------------------------------------------------------------------------------
def _clean(x, y, groups) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in length ({len(x)} vs {len(y)})")
    g = np.zeros(len(x), dtype=int) if groups is None else np.asarray(groups).ravel()
    if len(g) != len(x):
        raise ValueError(f"groups has {len(g)} entries for {len(x)} points")
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0)
    _, g_idx = np.unique(g[keep], return_inverse=True)
    return x[keep], y[keep], g_idx


def _next_budgets(x_max: float, k: int, axis: str) -> str:
    """What to run: k more budgets doubling from x_max, as `axis=...` (data.n) or in words."""
    values = ",".join(f"{x_max * 2**i:.0f}" for i in range(1, k + 1))
    return f"{axis}={values}" if axis == "data.n" else f"{axis} {values}"


def _fit_rows(fam: _Family, xs: np.ndarray, y_rows: np.ndarray, w: np.ndarray, cap) -> tuple:
    """One fit per row of y_rows, w (B, N): a coarse grid shared by all rows, then a finer one
    between each row's neighbours of its best. Returns a, b, shape (B,)."""
    grid = fam.grid(xs, N_GRID_BOOT)
    a, b, j, _ = _solve(fam.z(xs, grid), y_rows, w, fam.b_nonneg, cap)
    if len(grid) == 1:
        return a, b, grid[j]
    lo = np.log(grid[np.maximum(j - 1, 0)])
    hi = np.log(grid[np.minimum(j + 1, len(grid) - 1)])
    fine = np.exp(lo[:, None] + (hi - lo)[:, None] * np.linspace(0, 1, 25)[None, :])
    a, b, k, _ = _solve(fam.z(xs, fine), y_rows, w, fam.b_nonneg, cap)
    return a, b, fine[np.arange(len(k)), k]


def _lobo(fam: _Family, xs: np.ndarray, y_rows: np.ndarray, w: np.ndarray, cap) -> np.ndarray:
    """Leave-one-budget-out RMSE per row (B,): each budget's (weighted) mean predicted by a fit
    to the other budgets."""
    errs = []
    for u in np.unique(xs):
        held = xs == u
        w_fit = w.copy()
        w_fit[:, held] = 0.0
        a, b, t = _fit_rows(fam, xs, y_rows, w_fit, cap)
        pred = _curve(fam, np.array([u]), a, b, t)[:, 0]
        wh = w[:, held]
        with np.errstate(invalid="ignore", divide="ignore"):
            measured = (wh * y_rows[:, held]).sum(1) / wh.sum(1)
        errs.append(pred - measured)
    return np.sqrt(np.nanmean(np.square(np.stack(errs, axis=1)), axis=1))


@quiet_numerics
def fit_learning_curve(
    x: Sequence[float],
    y: Sequence[float],
    groups: Sequence | None = None,
    families: Sequence[str] = FAMILIES,
    level: float = 0.9,
    ceiling: float | None = None,
    n_boot: int = N_BOOT,
    seed: int = 0,
    check: bool = True,
    axis: str = "data.n",
) -> CurveFit:
    """Fit gain(x) with each family, keep the one with the lowest leave-one-budget-out error.

    x: (N,) budgets (labels, or a machine-independent cost: items seen, FLOPs); y: (N,) gains;
    groups: (N,) the seed of each point (None: one seed); ceiling: the largest gain the metric
    allows (pow_err needs it; for a metric <= 1 with baseline m0: (1 - m0) / m0).
    check: also run the backtest (hold out the largest budget) and set `backtest` / `trust`.
    axis: how messages name a budget to run (`data.n=...`; other names are written in words).
    Raises ValueError with fewer than 2 distinct budgets.
    """
    unknown = [f for f in families if f not in _FAMILY]
    if unknown:
        raise ValueError(f"unknown curve families {unknown}; use some of {', '.join(FAMILIES)}")
    x, y, g = _clean(x, y, groups)
    budgets = np.unique(x)
    k = len(budgets)
    if k < 2:
        have = f"one budget ({budgets[0]:g})" if k else "no valid points"
        raise ValueError(
            f"a learning curve needs at least 2 distinct budgets, got {have}; measure more, "
            f"e.g. {_next_budgets(budgets[0] if k else 100, 2, axis)}"
        )
    scale = float(budgets[0])
    xs = x / scale
    a_max = None if ceiling is None else float(ceiling)
    cv: dict[str, float] = {}
    notes = []
    usable = [f for f in families if not (_FAMILY[f].needs_ceiling and a_max is None)]
    if len(usable) < len(families):
        notes.append("pow_err skipped: it needs the metric's ceiling")
    for name in usable:
        fam = _FAMILY[name]
        if fam.n_params <= k - 1:
            one = np.ones((1, len(y)))
            cv[name] = float(_lobo(fam, xs, y[None, :], one, a_max if fam.saturates else None)[0])
    seeds = int(round(np.median(np.bincount(np.unique(x, return_inverse=True)[1]))))
    if cv:
        name = min(cv, key=lambda f: (round(cv[f], 12), _FAMILY[f].n_params))
        ok, reason = True, f"chosen by leave-one-budget-out error among {', '.join(cv)}"
        short = [f for f in usable if f not in cv]
        if short:
            reason += (
                f"; {', '.join(short)} need {_FAMILY[short[0]].n_params + 1}+ budgets "
                f"(measured {k})"
            )
    else:
        fitable = [f for f in usable if _FAMILY[f].n_params <= k]
        if not fitable:
            need = min(_FAMILY[f].n_params for f in usable) + 1
            raise ValueError(
                f"{k} budgets are too few for the families {', '.join(usable)} (need {need}); "
                f"measure more, e.g. {_next_budgets(budgets[-1], need - k, axis)}"
            )
        name = min(fitable, key=lambda f: _FAMILY[f].n_params)
        p = _FAMILY[name].n_params
        ok = False
        reason = (
            f"{k} budgets for a {p}-parameter curve ({name}): it passes through every budget "
            f"and cannot be checked, so nothing is extrapolated; measure "
            f"{p + 1 - k} more, e.g. {_next_budgets(budgets[-1], p + 1 - k, axis)}"
        )
    fam = _FAMILY[name]
    cap = a_max if fam.saturates else None
    a, b, t = (float(v[0]) for v in _fit_one(fam, xs, y, a_max=cap))
    resid = y - _curve(fam, xs, a, b, t)[0]
    n = len(y)
    dof = n - fam.n_params
    fit = CurveFit(
        family=name,
        params=_params(name, a, b, t, scale, a_max),
        n_points=n,
        cv_error=cv.get(name, math.nan),
        extrapolation_ok=ok,
        reason="; ".join([reason, *notes]),
        level=level,
        n_budgets=k,
        x_min=float(budgets[0]),
        x_max=float(budgets[-1]),
        seeds=seeds,
        cv=cv,
        ceiling=a_max,
        _scale=scale,
        _theta=(a, b, t),
        _dof=dof,
    )
    if dof > 0:
        infl = math.sqrt(n / dof)
        fit._noise = resid * infl
        fit._groups = int(g.max()) + 1
        fit._ref = tuple(float(v[0]) for v in _fit_rows(fam, xs, y[None, :], np.ones((1, n)), cap))
        fit._draws, fit._draw_family = _bootstrap(
            list(cv), name, xs, y, g, (a, b, t), resid * infl, a_max, n_boot, seed
        )
    else:
        fit.reason += "; the fit is exact (no residual left): no interval"
    if check:
        fit.backtest = backtest(x, y, g, level, families, ceiling, n_boot, seed, axis)
    return fit


def _params(name: str, a: float, b: float, t: float, scale: float, ceiling) -> dict[str, float]:
    """Parameters in the units of x (the fit works on x / scale)."""
    if name == "pow3":
        return {"a": a, "b": b * scale**t, "c": t}
    if name == "pow_err":
        return {"alpha": ceiling - a, "eta": b * scale**t, "gamma": -t, "ceiling": ceiling}
    if name == "exp_sat":
        return {"a": a, "b": b, "s": t * scale}
    return {"a": a - b * math.log(scale), "b": b}


def _bootstrap(
    names: Sequence[str], chosen: str, xs, y, g, theta, resid, a_max, n_boot, seed
) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap curves: (B, 3) refitted (a, b, shape) and (B,) the family of each (index in
    FAMILIES).

    Whole seeds are resampled when there are several, residuals otherwise. In
    every resample each family in `names` is refitted and the one with the lowest
    leave-one-budget-out error is kept, so the spread includes the choice of family."""
    rng = np.random.default_rng(seed)
    n_groups = int(g.max()) + 1
    if n_groups >= 2:
        counts = rng.multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=n_boot)
        w = counts[:, g].astype(float)
        y_rows = np.broadcast_to(y, w.shape)
    else:
        fitted = _curve(_FAMILY[chosen], xs, *theta)[0]
        y_rows = fitted[None, :] + rng.choice(resid, size=(n_boot, len(y)), replace=True)
        w = np.ones_like(y_rows)
    names = list(names) or [chosen]
    params, errors = [], []
    for name in names:
        fam = _FAMILY[name]
        cap = a_max if fam.saturates else None
        params.append(np.stack(_fit_rows(fam, xs, y_rows, w, cap), axis=1))
        errors.append(_lobo(fam, xs, y_rows, w, cap) if len(names) > 1 else np.zeros(n_boot))
    pick = np.argmin(np.nan_to_num(np.stack(errors, axis=1), nan=np.inf), axis=1)
    draws = np.stack(params, axis=0)[pick, np.arange(n_boot)]
    which = np.array([FAMILIES.index(names[i]) for i in pick])
    return draws, which


def backtest(
    x: Sequence[float],
    y: Sequence[float],
    groups: Sequence | None = None,
    level: float = 0.9,
    families: Sequence[str] = FAMILIES,
    ceiling: float | None = None,
    n_boot: int = N_BOOT,
    seed: int = 0,
    axis: str = "data.n",
) -> Backtest:
    """Hold out the largest budget, fit the rest, predict the held-out mean over its seeds.

    trust: `high` (inside the interval and the interval narrower than the measured gain),
    `medium` (inside, but the interval is wider than that), `low` (outside), `untested` (the
    rest could not be fitted with a budget to spare, or gave no interval)."""
    x, y, g = _clean(x, y, groups)
    budgets = np.unique(x)
    if len(budgets) < 2:
        raise ValueError("a backtest needs at least 2 distinct budgets")
    top = float(budgets[-1])
    held = x == top
    measured = float(y[held].mean())
    seeds = int(len(np.unique(g[held])))
    rest_max = float(budgets[-2])

    def untested(reason: str, fam="", p=math.nan, lo=math.nan, hi=math.nan) -> Backtest:
        return Backtest(top, rest_max, fam, p, lo, hi, measured, seeds, None, "untested", reason)

    try:
        fit = fit_learning_curve(
            x[~held], y[~held], g[~held], families, level, ceiling, n_boot, seed, False, axis
        )
    except ValueError as e:
        return untested(f"the budgets below {top:g} cannot be fitted: {e}")
    if not fit.extrapolation_ok:
        return untested(f"without {top:g}: {fit.reason}", fit.family)
    mean, lo, hi = (float(v[0]) for v in fit.predict([top], level, seeds=seeds))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return untested(f"the fit below {top:g} gives no interval", fit.family, mean)
    covered = lo <= measured <= hi
    if not covered:
        trust = "low"
        reason = (
            f"measured {measured:.4g} at {top:g} lies outside the predicted [{lo:.4g}, {hi:.4g}]"
        )
    elif (hi - lo) / 2 <= max(abs(measured), 1e-12):
        trust = "high"
        reason = f"measured {measured:.4g} at {top:g} inside the predicted [{lo:.4g}, {hi:.4g}]"
    else:
        trust = "medium"
        reason = (
            f"measured {measured:.4g} at {top:g} inside the predicted [{lo:.4g}, {hi:.4g}], "
            "but that interval is wider than the gain itself"
        )
    return Backtest(
        top, rest_max, fit.family, mean, lo, hi, measured, seeds, covered, trust, reason
    )
