"""Prediction intervals calibrated by how far they reach.

A learning curve fitted to the budgets measured so far is asked about budgets beyond them. Its own
bootstrap interval carries the seed noise, not how wrong the curve's shape may be 2x, 4x or 8x
beyond the largest measured budget; fitted to a few points of one seed it claims a precision
nothing supports, and power laws fitted to pilots predict too high (Mahmood et al., CVPR 2022).

Here a prediction at reach f = x / x_max (x_max: the largest budget the fit saw) gets its
interval from split conformal prediction on rolling backtests of measured studies (each study's
curve fitted on its first k budgets, every larger budget predicted, for every k, each seed alone
and all seeds together). A backtest's score is its signed error in units of the gain already
measured or of the curve's own unpredictability, whichever is larger:

    r = (measured - predicted) / scale,     scale = max(|fit(x_max)|, w * cv, SCALE_FLOOR)

with cv the fit's leave-one-budget-out error (CurveFit.cv_error) and w a table's `cv_weight`
(CV_WEIGHT for tables written now; 0, the gain alone, for older ones). Pilots whose gains are
still noise around zero (CelebA's after one epoch) have a gain near 0 and a cv as large as their
noise: in units of the gain alone, the rise that follows is dozens of units and no table made
from curves that had started can cover it; in units of the noise it can. w = 2 was chosen from 0,
1, 1.5, 2 and 3 by leave-one-study-out coverage on the four measured studies (docs/results.md).

Scores are binned by reach, REACH_BINS: (1, 2], (2, 4], (4, 8], (8, 16], and within each by how
much of the curve the fit saw (Mondrian conformal prediction, SIZE_STRATA: at most 4 sizes, or 5
and more, counted by seen_sizes: at most one per doubling of the fit's span, so that 5 sizes
between 100 and 400 count as the 3 of 100, 200, 400). A curve through 3 or 4 pilot sizes misses
more, and further low, than one through 6: pooled, the many well-fitted curves narrow the pilots'
intervals and pull their correction towards zero. A
stratum's reach bin computed from fewer than MIN_STUDIES studies is the pooled bin instead (with
one or two studies a stratum's quantiles are those studies' habits, not a calibration). In a bin
of m scores, the interval of level 1 - alpha is [p + q_lo * scale, p + q_hi * scale] with q_lo
the floor((m + 1) alpha / 2)-th and q_hi the ceil((m + 1)(1 - alpha / 2))-th smallest score
(split conformal, each tail at alpha / 2: no bound where m is too small), and the point
prediction is moved by the median score, p + q_mid * scale, so that a curve family's habit of
predicting too high or too low is taken out.

Those quantiles hold where the bin's backtests are: at `ReachBin.at`, the median of their
reaches (the bins' upper edges, 2x, 4x, 8x, 16x, where the grids double). Between those, and from
the fit's own interval at its largest size (reach 1, no correction) to the first, each quantile
is linear in log reach (reach_quantiles): a label count just past the measured ones is neither
moved by the median of predictions twice as far nor given their width, and no answer steps where
the reach crosses a bin's edge. Tables written before `at` keep each bin's quantiles throughout
the bin. Beyond the last bin there is no calibrated interval.

The package ships a table (calibration.json beside this module) computed from the project's
measured studies; `scripts/calibrate_curves.py` refreshes it from MLflow stores. Every
calibrated answer names the table it rests on (`Calibration.describe`). Pure: no I/O here except
reading and writing that table.

Between the rounds of a budget search the level itself is adapted (`adaptive_alpha`, adaptive
conformal inference, Gibbs & Candès 2021): each round's measured gain that the last round's
interval missed lowers the miscoverage asked of the next interval, each one it held raises it, so
the share of misses over the rounds tends to the one the user asked for however wrong the curve's
own interval is. A table calibrated on other studies cannot know the study at hand; its misses can.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy import stats

from finetune_budget.study.curves import CurveFit, fit_learning_curve

REACH_BINS = (1.0, 2.0, 4.0, 8.0, 16.0)
ALPHA_RANGE = (0.005, 0.5)  # the miscoverage an adapted interval may ask: a level of 50-99.5%
SCALE_FLOOR = 0.002  # a relative gain of 0.2%: the unit of error where nothing was gained yet
CV_WEIGHT = 2.0  # the unit of error: at least this many times the fit's leave-one-budget-out error
SIZE_STRATA = ((0, 4), (5, None))  # fits on at most 4 sizes, and on 5 or more (None: no end)
MIN_STUDIES = 3  # a stratum's reach bin from fewer studies than this is the pooled bin
SHIPPED = Path(__file__).with_name("calibration.json")


@dataclass(frozen=True)
class Case:
    """One backtest: a curve fitted up to x_fit_max predicted the measured mean at x."""

    study: str  # what was predicted, e.g. "clinc150 · mrr_at_20 · epoch 3 · seed 0"
    group: str  # the study a leave-one-study-out calibration leaves out (the data set)
    x_fit_max: float
    x: float
    predicted: float
    measured: float
    scale: float  # the unit of its score (error_scale)
    gain: float = math.nan  # the fit's gain at x_fit_max: the unit coverage_table reports in
    sizes: int = 0  # how many sizes the fit saw (seen_sizes); 0: not known, the pooled bins

    @property
    def reach(self) -> float:
        return self.x / self.x_fit_max

    @property
    def score(self) -> float:
        return (self.measured - self.predicted) / self.scale


@dataclass
class ReachBin:
    """The calibrated quantiles of the scores of one reach bin (lo, hi]."""

    lo: float
    hi: float
    cases: int
    q_lo: float
    q_mid: float
    q_hi: float
    pooled: bool = False  # a stratum's bin that is the pooled one (too few studies of its own)
    at: float = math.nan  # the median reach of its cases, where its quantiles hold (NaN: all)

    @property
    def label(self) -> str:
        return f"{self.lo:g}-{self.hi:g}x"


@dataclass
class Stratum:
    """The reach bins of the fits on min_sizes to max_sizes measured sizes (None: no upper end)."""

    min_sizes: int
    max_sizes: int | None
    bins: list[ReachBin]

    def holds(self, sizes: int) -> bool:
        return self.min_sizes <= sizes and (self.max_sizes is None or sizes <= self.max_sizes)

    @property
    def label(self) -> str:
        if self.max_sizes is None:
            return f"fits on {self.min_sizes} or more sizes"
        return f"fits on at most {self.max_sizes} sizes"

    def to_dict(self) -> dict:
        return {
            "min_sizes": self.min_sizes,
            "max_sizes": self.max_sizes,
            "bins": [asdict(b) for b in self.bins],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Stratum:
        return cls(int(d["min_sizes"]), d["max_sizes"], [ReachBin(**b) for b in d["bins"]])


@dataclass
class Calibration:
    """Per reach bin, where measured means fell around the curves' predictions: pooled over all
    fits (`bins`) and per stratum of the fits' number of sizes (`strata`; none in older tables)."""

    level: float
    bins: list[ReachBin]
    groups: list[str] = field(default_factory=list)  # the studies it was computed from
    source: str = ""
    cv_weight: float = 0.0  # the unit its scores are in (error_scale); 0: tables before it
    strata: list[Stratum] = field(default_factory=list)

    def stratum_for(self, sizes: int) -> Stratum | None:
        """The stratum of fits on `sizes` sizes (None: the pooled bins judge it)."""
        return next((s for s in self.strata if sizes and s.holds(sizes)), None)

    def bins_for(self, sizes: int = 0) -> list[ReachBin]:
        stratum = self.stratum_for(sizes)
        return stratum.bins if stratum else self.bins

    def bin_for(self, reach: float, sizes: int = 0) -> ReachBin | None:
        for b in self.bins_for(sizes):
            if b.lo < reach <= b.hi + 1e-9:
                return b
        return None

    def describe(self, reach: float | None = None, sizes: int = 0) -> str:
        """What an interval rests on: `calibrated on 576 backtests at 1-2x (fits on at most 4
        sizes) of clinc150, stsb`."""
        studies = ", ".join(self.groups) or "no study"
        if reach is None:
            total = sum(b.cases for b in self.bins)
            return f"calibrated on {total} backtests of {studies}"
        b = self.bin_for(reach, sizes)
        if b is None:
            return f"{reach:.1f}x the measured labels: beyond every calibrated reach"
        stratum = self.stratum_for(sizes)
        of = "" if stratum is None or b.pooled else f" ({stratum.label})"
        return f"calibrated on {b.cases} backtests at {b.label}{of} of {studies}"

    def interval(
        self,
        predicted: np.ndarray,
        scale: float,
        reach: np.ndarray,
        sizes: int = 0,
        start: tuple[float, float] = (0.0, 0.0),
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(center, lo, hi) of predictions at `reach` (arrays of one shape) of a fit on `sizes`
        sizes (0: the pooled bins); `start`: the fit's own interval at its largest size (reach
        1), in units of `scale` around its prediction, where the calibrated one begins
        (reach_quantiles).
        NaN where no bin holds the reach, -inf / inf where a bin has too few cases for a bound."""
        predicted = np.asarray(predicted, dtype=float)
        reach = np.broadcast_to(np.asarray(reach, dtype=float), predicted.shape)
        q_lo, q_mid, q_hi = reach_quantiles(self.bins_for(sizes), reach, start)
        lo, hi = predicted + q_lo * scale, predicted + q_hi * scale
        return np.clip(predicted + q_mid * scale, lo, hi), lo, hi

    def to_dict(self) -> dict:
        return {
            "level": self.level,
            "groups": self.groups,
            "source": self.source,
            "cv_weight": self.cv_weight,
            "bins": [asdict(b) for b in self.bins],
            "strata": [s.to_dict() for s in self.strata],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        bins = [ReachBin(**b) for b in d["bins"]]
        groups, source = list(d.get("groups", [])), d.get("source", "")
        strata = [Stratum.from_dict(s) for s in d.get("strata", [])]
        cv_weight = float(d.get("cv_weight", 0.0))
        return cls(float(d["level"]), bins, groups, source, cv_weight, strata)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path = SHIPPED) -> Calibration:
        return cls.from_dict(json.loads(Path(path).read_text()))


def seen_sizes(x_min: float, x_max: float, n_budgets: int) -> int:
    """How many sizes a fit saw, for its stratum: its number of sizes, but at most as many as a
    doubling grid over its span (1 + floor(log2(x_max / x_min))). The measured studies double, so
    there the two are one; a denser grid (100, 141, 200, 283, 400) has seen no more of the curve
    than 100, 200, 400, and its backtests miss like theirs."""
    if n_budgets < 1 or not x_min > 0 or not x_max >= x_min:
        return max(n_budgets, 0)
    return min(n_budgets, 1 + math.floor(math.log2(x_max / x_min) + 1e-9))


def reach_quantiles(
    bins: Sequence[ReachBin], reach: np.ndarray, start: tuple[float, float] = (0.0, 0.0)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q_lo, q_mid, q_hi) at each reach, in units of the scale. Each bin's quantiles stand at its
    cases' median reach `at`; between those, and from (start[0], 0, start[1]) at reach 1 (the
    fit's own interval, no correction) to the first, they are linear in log reach, and beyond the
    last `at` they are the last bin's. A bound stays the bin's own where a neighbour's is
    infinite. Without `at` in every bin (tables before it): each bin's quantiles throughout it.
    NaN outside every bin."""
    reach = np.asarray(reach, dtype=float)
    step = [np.full(reach.shape, np.nan) for _ in range(3)]
    for b in bins:
        inside = (reach > b.lo) & (reach <= b.hi + 1e-9)
        for out, q in zip(step, (b.q_lo, b.q_mid, b.q_hi), strict=True):
            out[inside] = q
    known = [b for b in bins if math.isfinite(b.q_mid)]
    if not known or any(not math.isfinite(b.at) for b in known):
        return tuple(step)
    xs = np.log([1.0] + [b.at for b in known])
    held = np.isfinite(step[1])  # within some bin's reach
    out = []
    names = ("q_lo", "q_mid", "q_hi")
    for first, name, stepped in zip((start[0], 0.0, start[1]), names, step, strict=True):
        ys = np.array([first] + [getattr(b, name) for b in known])
        with np.errstate(divide="ignore", invalid="ignore"):
            smooth = np.interp(np.log(np.where(held, reach, 1.0)), xs, ys)
        out.append(np.where(held & np.isfinite(smooth), smooth, stepped))
    return tuple(out)


def shipped() -> Calibration | None:
    """The table shipped with the package (None where it is missing)."""
    return load_table("shipped")


@functools.cache
def load_table(spec: str = "shipped") -> Calibration | None:
    """`advise.calibration`: `shipped` (the package's table), `none`, or a table's file."""
    if spec in (None, "", "none", "None"):
        return None
    path = SHIPPED if spec == "shipped" else Path(spec)
    if not path.is_file():
        if spec == "shipped":
            return None
        raise FileNotFoundError(
            f"advise.calibration={spec}: no such file; use shipped, none or a table written by "
            "scripts/calibrate_curves.py"
        )
    return Calibration.load(path)


def conformal_ranks(m: int, level: float) -> tuple[int, int]:
    """The ranks (1-based) of split conformal's bounds among m scores, alpha / 2 in each tail:
    floor((m + 1) alpha / 2) and ceil((m + 1)(1 - alpha / 2)); 0 or m + 1: no such score."""
    alpha = 1.0 - level
    k_lo = math.floor((m + 1) * alpha / 2 + 1e-9)  # 1e-9: (1 - 0.9) / 2 * 20 is 0.99999...
    k_hi = math.ceil((m + 1) * (1 - alpha / 2) - 1e-9)
    return k_lo, k_hi


def conformal_bounds(scores: Sequence[float], level: float) -> tuple[float, float, float]:
    """(q_lo, median, q_hi) of split conformal prediction with alpha / 2 in each tail: the
    scores at conformal_ranks among the m sorted (-inf / inf where m is too small for a rank)."""
    s = np.sort(np.asarray(scores, dtype=float))
    m = len(s)
    if m == 0:
        return -math.inf, math.nan, math.inf
    k_lo, k_hi = conformal_ranks(m, level)
    lo = float(s[k_lo - 1]) if k_lo >= 1 else -math.inf
    hi = float(s[k_hi - 1]) if k_hi <= m else math.inf
    return lo, float(np.median(s)), hi


def split_normal(center, lo, hi, level: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(center, s_lo, s_hi): the split normal with median `center` whose `level` central interval
    is [lo, hi] is a normal's half with spread s_lo below the median and one with s_hi above it,
    each holding half the mass (0 where an end is missing: the point mass at `center`)."""
    center, lo, hi = (np.asarray(v, dtype=float) for v in (center, lo, hi))
    z = stats.norm.ppf(0.5 + level / 2)
    with np.errstate(invalid="ignore"):
        s_lo = np.nan_to_num(np.maximum(center - lo, 0.0) / z)
        s_hi = np.nan_to_num(np.maximum(hi - center, 0.0) / z)
    return center, s_lo, s_hi


def split_normal_cdf(x: float, center, lo, hi, level: float) -> np.ndarray:
    """P(gain <= x) under that split normal; NaN center: 1 (missed)."""
    center, s_lo, s_hi = split_normal(center, lo, hi, level)
    spread = np.where(x < center, s_lo, s_hi)
    with np.errstate(invalid="ignore", divide="ignore"):
        cdf = stats.norm.cdf((x - center) / np.where(spread > 0, spread, np.nan))
    point = np.where(x < center, 0.0, 1.0)
    cdf = np.where(np.isfinite(cdf), cdf, point)
    return np.where(np.isfinite(center), cdf, 1.0)


def split_normal_mean(center, lo, hi, level: float) -> np.ndarray:
    """The mean of that split normal: center + sqrt(2 / pi) (s_hi - s_lo)."""
    center, s_lo, s_hi = split_normal(center, lo, hi, level)
    return center + math.sqrt(2 / math.pi) * (s_hi - s_lo)


def split_normal_excess(best: float, center, lo, hi, level: float) -> np.ndarray:
    """E[max(G - best, 0)] for G under that split normal: what keeping the better of G and
    `best` adds. With d = center - best:
    best >= center: s_hi phi(-d / s_hi) + d (1 - Phi(-d / s_hi));
    best < center: s_lo phi(d / s_lo) + d Phi(d / s_lo) + (s_hi - s_lo) phi(0)
    (s_lo = s_hi: the normal's d Phi(d/s) + s phi(d/s)). Without an interval: max(d, 0)."""
    center, s_lo, s_hi = split_normal(center, lo, hi, level)
    d = center - best
    with np.errstate(invalid="ignore", divide="ignore"):
        above = s_hi * stats.norm.pdf(-d / s_hi) + d * stats.norm.sf(-d / s_hi)
        below = (
            s_lo * stats.norm.pdf(d / s_lo)
            + d * stats.norm.cdf(d / s_lo)
            + (s_hi - s_lo) * stats.norm.pdf(0.0)
        )
    above = np.where(s_hi > 0, above, 0.0)  # best >= center: only the upper half reaches past it
    below = np.where(s_lo > 0, below, d + s_hi * stats.norm.pdf(0.0))
    return np.where(d <= 0, above, below)


def adaptive_alpha(alpha_t: float, alpha: float, gamma: float, errs: Sequence[int]) -> float:
    """The miscoverage the next interval asks for, after checking the last ones (adaptive
    conformal inference, Gibbs & Candès 2021): for each err in turn (1: the measured value fell
    outside its interval, 0: inside) alpha_t + gamma (alpha - err), clipped to ALPHA_RANGE.

    alpha is the miscoverage wanted (1 - level). A miss moves alpha_t down by gamma (1 - alpha),
    a hit up by gamma alpha, so alpha_t stands still where misses occur at rate alpha: intervals
    that miss more often than asked widen until they do not. The clip keeps a run of misses
    from asking for an interval no fit can give (alpha_t <= 0: an infinite one)."""
    lo, hi = ALPHA_RANGE
    for err in errs:
        alpha_t = min(max(alpha_t + gamma * (alpha - err), lo), hi)
    return alpha_t


def study_weighted_bounds(
    scores: Sequence[float], groups: Sequence[str], level: float
) -> tuple[float, float, float]:
    """(q_lo, median, q_hi) as conformal_bounds, each study's scores weighing as much as each
    other study's (a study with more sizes, metrics or epochs does not outvote the others): the
    weighted quantiles at conformal_bounds' ranks for m scores, m the fewest of a study (one
    study: conformal_bounds itself; -inf / inf where that rank does not exist)."""
    s = np.asarray(scores, dtype=float)
    g = np.asarray(groups)
    if len(s) == 0:
        return -math.inf, math.nan, math.inf
    names, counts = np.unique(g, return_counts=True)
    weight = 1.0 / counts[np.searchsorted(names, g)] / len(names)
    order = np.argsort(s)
    s, cum = s[order], np.cumsum(weight[order])
    m = int(counts.min())
    k_lo, k_hi = conformal_ranks(m, level)
    tail, top = k_lo / m, k_hi / m  # conformal_bounds' ranks as shares of the weight

    def at(q: float) -> float:
        return float(s[min(np.searchsorted(cum, q - 1e-12), len(s) - 1)])

    lo = at(tail) if tail > 0 else -math.inf
    hi = at(top) if top <= 1 + 1e-12 else math.inf
    return lo, at(0.5), hi


def calibrate(
    cases: Sequence[Case],
    level: float = 0.9,
    leave_out: str | None = None,
    bins: Sequence[float] = REACH_BINS,
    source: str = "",
    weigh_studies: bool = False,
    cv_weight: float = CV_WEIGHT,
    strata: Sequence[tuple[int, int | None]] = SIZE_STRATA,
) -> Calibration:
    """The calibration of `cases` (without those of study group `leave_out`); weigh_studies:
    each study's cases weigh as much as each other study's (study_weighted_bounds); cv_weight:
    the unit the cases' scales are in (that of the curve_predictor which made them); strata:
    (min, max) sizes of the fits each stratum's bins are computed from (none: pooled bins only),
    a bin of fewer than MIN_STUDIES studies taking the pooled bin's place."""
    kept = [c for c in cases if c.group != leave_out]

    def reach_bins(of: list[Case]) -> list[tuple[ReachBin, int]]:
        """Each reach bin of `of`, with the number of studies its cases come from."""
        out = []
        for lo, hi in zip(bins[:-1], bins[1:], strict=True):
            inside = [c for c in of if lo < c.reach <= hi + 1e-9]
            scores, groups = [c.score for c in inside], [c.group for c in inside]
            if weigh_studies:
                q_lo, q_mid, q_hi = study_weighted_bounds(scores, groups, level)
            else:
                q_lo, q_mid, q_hi = conformal_bounds(scores, level)
            at = float(np.median([c.reach for c in inside])) if inside else math.nan
            out.append((ReachBin(lo, hi, len(scores), q_lo, q_mid, q_hi, at=at), len(set(groups))))
        return out

    pooled = [b for b, _ in reach_bins(kept)]
    stratified = []
    for min_sizes, max_sizes in strata:
        stratum = Stratum(min_sizes, max_sizes, [])
        mine = [c for c in kept if c.sizes and stratum.holds(c.sizes)]
        for (own, studies), whole in zip(reach_bins(mine), pooled, strict=True):
            stratum.bins.append(own if studies >= MIN_STUDIES else replace(whole, pooled=True))
        stratified.append(stratum)
    groups = sorted({c.group for c in kept})
    return Calibration(level, pooled, groups, source, cv_weight, stratified)


Predictor = Callable[
    [np.ndarray, np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, float, float]
]


def rolling_cases(
    x: Sequence[float],
    y: Sequence[float],
    seeds: Sequence[int],
    predictor: Predictor,
    study: str,
    group: str,
    min_budgets: int = 3,
    per_seed: bool = True,
) -> list[Case]:
    """Rolling backtests of one study's curve: for every k >= min_budgets, the fit on its k
    smallest budgets predicts the mean measured at every larger budget, for all seeds together
    and (per_seed) for each seed alone.

    predictor(x_fit, y_fit, seeds_fit, x_new) -> (predictions at x_new, scale, gain): the curve,
    the scale of its errors (see the module docstring) and its gain at its largest budget; it
    raises ValueError where no curve fits.
    """
    x, y, g = (np.asarray(v) for v in (x, y, seeds))
    x, y = x.astype(float), y.astype(float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y, g = x[keep], y[keep], g[keep]
    samples = [("all seeds", np.ones(len(x), dtype=bool))]
    if per_seed and len(np.unique(g)) > 1:
        samples += [(f"seed {s}", g == s) for s in np.unique(g)]
    cases = []
    for name, rows in samples:
        budgets = np.unique(x[rows])
        for k in range(min_budgets, len(budgets)):
            fit_rows = rows & (x <= budgets[k - 1])
            later = budgets[k:]
            try:
                pred, scale, gain = predictor(x[fit_rows], y[fit_rows], g[fit_rows], later)
            except ValueError:
                continue
            for xb, p in zip(later, np.atleast_1d(pred), strict=True):
                if not math.isfinite(float(p)):
                    continue
                measured = float(y[rows & (x == xb)].mean())
                cases.append(
                    Case(
                        f"{study} · {name}",
                        group,
                        float(budgets[k - 1]),
                        float(xb),
                        float(p),
                        measured,
                        float(scale),
                        float(gain),
                        seen_sizes(float(budgets[0]), float(budgets[k - 1]), k),
                    )
                )
    return cases


def coverage_table(
    cases: Sequence[Case], calibrations: dict[str, Calibration] | Calibration
) -> list[dict]:
    """Per reach bin: cases, the share inside their calibrated interval, the signed error of the
    raw and of the corrected point predictions (mean of predicted - measured; above 0, the
    predictions were optimistic) and the median interval width, both in units of the gain the
    fit had at its largest budget (at least SCALE_FLOOR; a case without one: its scale), one unit
    for tables of any cv_weight. `calibrations`: one for all cases, or one per study group
    (leave-one-study-out: each case judged by the calibration that did not see its study)."""
    rows = []
    for lo, hi in zip(REACH_BINS[:-1], REACH_BINS[1:], strict=True):
        inside, raw, fixed, widths, n = 0, [], [], [], 0
        for c in cases:
            if not lo < c.reach <= hi + 1e-9:
                continue
            cal = calibrations if isinstance(calibrations, Calibration) else calibrations[c.group]
            center, ilo, ihi = (
                float(v[0])
                for v in cal.interval(
                    np.array([c.predicted]), c.scale, np.array([c.reach]), c.sizes
                )
            )
            if not math.isfinite(center):
                continue
            n += 1
            inside += ilo <= c.measured <= ihi
            unit = gain_unit(c.gain) if math.isfinite(c.gain) else c.scale
            raw.append((c.predicted - c.measured) / unit)
            fixed.append((center - c.measured) / unit)
            widths.append((ihi - ilo) / unit)
        rows.append(
            {
                "reach": f"{lo:g}-{hi:g}x",
                "cases": n,
                "coverage": inside / n if n else math.nan,
                "signed_error_raw": float(np.mean(raw)) if n else math.nan,
                "signed_error_corrected": float(np.mean(fixed)) if n else math.nan,
                "median_width": float(np.median(widths)) if n else math.nan,
            }
        )
    return rows


# -- a fitted curve whose answers beyond the measured budgets are calibrated ---------------------
def curve_predictor(
    ceiling: float | None = None,
    cv_weight: float = CV_WEIGHT,
    combine: Callable[[CurveFit, np.ndarray, tuple], np.ndarray] | None = None,
) -> Predictor:
    """The predictor of rolling_cases for report.curves.fit_learning_curve (families chosen by
    leave-one-budget-out error, as every answer chooses them), its errors in error_scale's unit.
    combine(fit, x_new, (x_fit, y_fit, seeds_fit)): another point prediction from that fit and
    its points (default: the fit itself).
    A backtest reads the fit's point prediction and leave-one-budget-out error, never its
    bootstrap interval, so one bootstrap draw is all it fits."""

    def predict(x_fit, y_fit, seeds_fit, x_new):
        fit = fit_learning_curve(x_fit, y_fit, seeds_fit, ceiling=ceiling, n_boot=1, check=False)
        if not fit.extrapolation_ok:
            raise ValueError(fit.reason)
        points = (x_fit, y_fit, seeds_fit)
        pred = fit(x_new) if combine is None else combine(fit, np.asarray(x_new, float), points)
        return pred, error_scale(fit, cv_weight), float(fit(fit.x_max)[0])

    return predict


def gain_unit(gain: float) -> float:
    """The unit of error in the gain alone (tables of cv_weight 0): |gain| at the fit's largest
    budget, at least SCALE_FLOOR."""
    return max(abs(gain), SCALE_FLOOR)


def error_scale(fit: CurveFit, cv_weight: float = CV_WEIGHT) -> float:
    """The unit of a fit's errors: its gain at its largest budget or cv_weight times its
    leave-one-budget-out error, whichever is larger (at least SCALE_FLOOR)."""
    cv = fit.cv_error if math.isfinite(fit.cv_error) else 0.0
    return max(gain_unit(float(fit(fit.x_max)[0])), cv_weight * cv)


class CalibratedCurve:
    """A CurveFit whose predictions beyond its largest budget take their center and interval from
    a Calibration (within the measured budgets: the fit's own). Everything else is the fit's."""

    def __init__(self, fit: CurveFit, calibration: Calibration) -> None:
        self.fit = fit
        self.calibration = calibration
        self.scale = error_scale(fit, calibration.cv_weight)
        self.sizes = seen_sizes(fit.x_min, fit.x_max, fit.n_budgets)  # its stratum's count

    def __getattr__(self, name: str):
        # only what the instance lacks reaches here; while unpickling (the forked report sends
        # fits between processes) it has nothing yet, and asking self.fit would recurse
        if name.startswith("__") or name in ("fit", "calibration", "scale", "sizes"):
            raise AttributeError(name)
        return getattr(self.fit, name)

    def __call__(self, x) -> np.ndarray:
        """The fitted curve itself (its calibrated center: `predict`)."""
        return self.fit(x)

    @property
    def reach_max(self) -> float:
        return self.calibration.bins[-1].hi

    def rests_on(self, x: float) -> str:
        """The calibration an answer at x rests on ("" within the measured budgets)."""
        if x <= self.fit.x_max * (1 + 1e-9):
            return ""
        return self.calibration.describe(x / self.fit.x_max, self.sizes)

    def _calibrated(self, xs: np.ndarray, mean, lo, hi, own: Callable[[], tuple]):
        """The fit's (mean, lo, hi) at xs, calibrated beyond its largest size; own(): the fit's
        (mean, lo, hi) at that size, where the calibrated interval begins (asked only where some
        x lies beyond it)."""
        beyond = xs > self.fit.x_max * (1 + 1e-9)
        if beyond.any():
            p, own_lo, own_hi = (float(v[0]) for v in own())
            start = tuple(
                (v - p) / self.scale if math.isfinite(v - p) else 0.0 for v in (own_lo, own_hi)
            )
            center, low, high = self.calibration.interval(
                self.fit(xs[beyond]),
                self.scale,
                xs[beyond] / self.fit.x_max,
                self.sizes,
                start,
            )
            bound = self.fit._bounded
            mean, lo, hi = (np.array(v, dtype=float) for v in (mean, lo, hi))
            mean[beyond], lo[beyond], hi[beyond] = bound(center), bound(low), bound(high)
        return mean, lo, hi

    def predict(self, x, level: float | None = None, seeds: int | None = None):
        xs = np.atleast_1d(np.asarray(x, dtype=float))
        own = lambda: self.fit.predict([self.fit.x_max], level, seeds)  # noqa: E731
        return self._calibrated(xs, *self.fit.predict(xs, level, seeds), own)

    def expected(self, x, level: float | None = None):
        xs = np.atleast_1d(np.asarray(x, dtype=float))
        own = lambda: self.fit.expected([self.fit.x_max], level)  # noqa: E731
        return self._calibrated(xs, *self.fit.expected(xs, level), own)

    def difference(self, x0: float, x1: float, level: float | None = None):
        if max(x0, x1) <= self.fit.x_max * (1 + 1e-9):
            return self.fit.difference(x0, x1, level)
        mean, lo, hi = self.expected([x0, x1], level)
        return float(mean[1] - mean[0]), float(lo[1] - hi[0]), float(hi[1] - lo[0])

    def budget_for(self, target: float, level: float | None = None):
        """x where the calibrated center reaches `target`, with where the interval's upper / lower
        end reach it (inf: not within the calibrated reach, nor by the curve at all)."""
        grid = np.geomspace(self.fit.x_min, self.fit.x_max * self.reach_max, 800)
        mean, lo, hi = self.expected(grid, level)

        def first(values: np.ndarray) -> float:
            reached = np.flatnonzero(np.nan_to_num(values, nan=-np.inf) >= target)
            return float(grid[reached[0]]) if len(reached) else math.inf

        return first(mean), first(hi), first(lo)
