"""A learning curve in the number of labelled items: gain(n) = a - b * n^(-c), a saturating power
law (a: the gain it approaches, c: how fast). Fitted with scipy's curve_fit; predictions at larger
budgets get a 95% interval from a residual bootstrap, and the fit reports R^2 and RMSE on the
measured points."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit

log = logging.getLogger(__name__)

N_PARAMS = 3


def power_law(n: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    return a - b * np.power(n, -c)


@dataclass
class CurveFit:
    a: float
    b: float
    c: float
    stderr: tuple[float, float, float]  # from the covariance of curve_fit (NaN when undefined)
    r2: float
    rmse: float
    points: int
    distinct_n: int
    predict_n: list[float] = field(default_factory=list)
    predicted: list[float] = field(default_factory=list)
    lower: list[float] = field(default_factory=list)
    upper: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def dof(self) -> int:
        return self.points - N_PARAMS

    def __call__(self, n: np.ndarray | float) -> np.ndarray:
        return power_law(np.asarray(n, dtype=float), self.a, self.b, self.c)

    def formula(self) -> str:
        return f"gain(n) = {self.a:.4g} - {self.b:.4g} * n^(-{self.c:.3g})"


def _fit(n: np.ndarray, y: np.ndarray, p0: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        return curve_fit(
            power_law,
            n,
            y,
            p0=list(p0),
            bounds=([-np.inf, 0.0, 1e-3], [np.inf, np.inf, 5.0]),
            maxfev=20000,
        )


def _initial_guess(n: np.ndarray, y: np.ndarray) -> list[float]:
    span = float(np.ptp(y)) or max(abs(float(np.mean(y))), 1e-3)
    a = float(np.max(y)) + 0.2 * span
    c = 0.5
    b = max((a - float(y[np.argmin(n)])) * float(np.min(n)) ** c, 1e-6)
    return [a, b, c]


def fit_learning_curve(
    n: Sequence[float],
    gain: Sequence[float],
    predict_n: Sequence[float] = (),
    n_boot: int = 500,
    seed: int = 0,
) -> CurveFit:
    """Fit gain(n) = a - b n^-c to measured (n, gain) points (seeds as repeated points).

    Raises ValueError when fewer than 3 distinct n were measured (3 parameters).
    """
    x = np.asarray(n, dtype=float)
    y = np.asarray(gain, dtype=float)
    keep = ~(np.isnan(x) | np.isnan(y)) & (x > 0)
    x, y = x[keep], y[keep]
    distinct = len(np.unique(x))
    if distinct < N_PARAMS:
        raise ValueError(
            f"a learning-curve fit needs at least {N_PARAMS} distinct data.n, got "
            f"{distinct}; sweep more sizes, e.g. data.n=100,300,1000"
        )
    params, cov = _fit(x, y, _initial_guess(x, y))
    fitted = power_law(x, *params)
    resid = y - fitted
    ss_res = float(np.sum(resid**2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan
    stderr = (
        tuple(float(s) for s in np.sqrt(np.clip(np.diag(cov), 0, None)))
        if np.all(np.isfinite(cov))
        else (math.nan,) * 3
    )
    result = CurveFit(
        float(params[0]),
        float(params[1]),
        float(params[2]),
        stderr,
        r2,
        math.sqrt(ss_res / len(y)),
        len(y),
        distinct,
    )
    targets = np.asarray(list(predict_n), dtype=float)
    result.predict_n = targets.tolist()
    result.predicted = power_law(targets, *params).tolist()
    if len(y) <= N_PARAMS:
        result.note = (
            f"exact fit: {len(y)} points for {N_PARAMS} parameters, so no interval and "
            "no check of the fit; add seeds (seed=0,1,2) or more data.n values"
        )
        result.lower = result.upper = [math.nan] * len(targets)
        return result
    # Residual bootstrap: refit to fitted + resampled (scaled) residuals; prediction percentiles.
    rng = np.random.default_rng(seed)
    scale = math.sqrt(len(y) / (len(y) - N_PARAMS))
    draws = []
    for _ in range(n_boot):
        y_star = fitted + scale * rng.choice(resid, size=len(resid), replace=True)
        try:
            p_star, _ = _fit(x, y_star, params)
        except (RuntimeError, ValueError):
            continue
        draws.append(power_law(targets, *p_star))
    if len(draws) < max(20, n_boot // 4):
        result.note = f"the bootstrap converged in {len(draws)} of {n_boot} refits: no interval"
        result.lower = result.upper = [math.nan] * len(targets)
        return result
    sample = np.asarray(draws)
    result.lower = np.percentile(sample, 2.5, axis=0).tolist()
    result.upper = np.percentile(sample, 97.5, axis=0).tolist()
    return result
