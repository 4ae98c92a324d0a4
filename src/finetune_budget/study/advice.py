"""The questions a person asks, answered from the measured points and checked learning curves,
each with an interval, the points it rests on and a trust label:

- how many labels to reach a gain X (or a metric value Y)?
- what would the next N labels buy?
- how many epochs (seconds) are worth it at n labels?
- where has ROI fallen to 30% of its peak?

and the decision card that opens the report: recommended data.n and epochs, the expected gain
with its interval, training seconds, what one more doubling of labels or of time would buy.

    python evaluate.py mode=advise tracking.experiment=<name> advise.target_gain=0.05

Time is fitted against items seen (`data/samples_seen`, machine-independent) and converted to
seconds with the throughput the runs measured on this machine (items per training second).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from finetune_budget.study.calibration import CalibratedCurve, load_table
from finetune_budget.study.curves import CurveFit, fit_learning_curve, quiet_numerics
from finetune_budget.study.knee import drop_point
from finetune_budget.study.prices import Prices
from finetune_budget.study.roi import gain_ceiling, metric_name, relative_gain
from finetune_budget.study.significance import NO_GAIN, paying_sizes
from finetune_budget.study.surface import Surface, fit_surface
from finetune_budget.study.table import GROUP, data_curve, items_seen

log = logging.getLogger(__name__)

N_SEED_BOOT = 300


@dataclass
class AdviceSettings:
    """What `conf/advise/default.yaml` holds (see there)."""

    target_gain: float | None = None
    target_value: float | None = None
    extra_labels: int | None = None
    metric: str | None = None
    level: float = 0.9
    share: float = 0.9
    drop_fraction: float = 0.3
    data_epoch: str = "final"
    bootstrap: int = 300  # refits per learning curve
    calibration: str = "shipped"  # intervals beyond the measured labels: shipped | none | <file>
    label_cost: float | None = None  # prices (study/prices.py): null = not priced
    compute_cost_per_hour: float | None = None
    miss_penalty: float | None = None
    value_per_gain: float | None = None
    currency: str = "$"
    rounds: int = 1  # rounds of buying labels the plan spreads them over (study/plan.py)

    @classmethod
    def from_config(cls, node: Any | None) -> AdviceSettings:
        if not node:
            return cls()
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in dict(node).items() if k in known})

    @property
    def has_target(self) -> bool:
        return self.target_gain is not None or self.target_value is not None

    def target_as_gain(self, metric: str, baseline: float, floor: float = 0.01) -> float | None:
        """The target as a relative gain over `baseline` (None: no target): a target_value is
        converted as the runs' gains are (roi.relative_gain, so errors count downwards); the
        engine, the plan and the budget search all read the target here."""
        if self.target_value is not None:
            return value_to_gain(metric, self.target_value, baseline, floor)
        return None if self.target_gain is None else float(self.target_gain)

    @property
    def prices(self) -> Prices:
        """The prices, checked (a one-line ConfigError for ones a plan cannot use)."""
        return Prices(
            label_cost=self.label_cost,
            compute_cost_per_hour=self.compute_cost_per_hour,
            miss_penalty=self.miss_penalty,
            value_per_gain=self.value_per_gain,
            currency=self.currency,
        ).check(self.has_target)


@dataclass
class Answer:
    """One question answered: `value` [lo, hi] (NaN: no answer, `text` says why)."""

    question: str
    text: str
    value: float
    lo: float
    hi: float
    rests_on: str
    trust: str


@dataclass
class Advice:
    """The decision card and the questions answered for one task, model, data set and metric."""

    key: tuple
    metric: str
    n: int | None
    epochs: int | None
    gain: float
    gain_lo: float
    gain_hi: float
    seconds: float
    more_labels: Answer | None
    more_time: Answer | None
    trust: str
    why: str
    answers: list[Answer] = field(default_factory=list)
    data_fit: CurveFit | None = None
    time_fits: dict[int, CurveFit] = field(default_factory=dict)
    epochs_table: pd.DataFrame | None = None
    run_id: str | None = None  # the measured run whose model the recommendation names
    run_epochs: int | None = None  # the epochs that run trained (> epochs: none ended there)
    surface: Surface | None = None  # gain over labels and epochs (the plan's epochs at any n)
    baseline: float = math.nan  # the metric's pretrained value (a target_value's gain)

    def lines(self) -> list[str]:
        """The answer in a few lines (what mode=advise prints)."""
        name = metric_name(self.metric)
        head = f"{' · '.join(map(str, self.key))} · {name}"
        if self.n is None:
            return [f"{head}: {self.why}"]
        out = [
            f"{head}: train with data.n={self.n} for trainer.max_epochs={self.epochs}: expected "
            f"gain {fmt_pct(self.gain)} {_iv(self.gain_lo, self.gain_hi, fmt_pct)}"
            f"{no_gain_shown(self.gain_lo)}, about "
            f"{fmt_secs(self.seconds)} of training here (trust: {self.trust}; {self.why})"
        ]
        for extra in (self.more_labels, self.more_time):
            if extra is not None:
                out.append(f"  {extra.question}: {extra.text} (trust: {extra.trust})")
        for a in self.answers:
            out.append(f"  {a.question}: {a.text} (trust: {a.trust}; rests on {a.rests_on})")
        if self.run_id:
            out.append(
                f"  its model: run {self.run_id} ({self.run_epochs} epochs); "
                f"python evaluate.py mode=export run_id={self.run_id}"
            )
        return out


# -- small helpers --------------------------------------------------------------------------------
def no_gain_shown(lo: float) -> str:
    """The caveat of an expected gain whose interval reaches zero or below ("" where it does
    not, or where there is no interval)."""
    if math.isfinite(lo) and lo <= 0:
        return " (no gain is shown at this confidence: the interval includes none)"
    return ""


def fmt_pct(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{100 * x:+.2f}%"


def fmt_int(x: float) -> str:
    return "∞" if x == math.inf else ("n/a" if not math.isfinite(x) else f"{x:,.0f}")


def fmt_secs(x: float) -> str:
    if not math.isfinite(x):
        return "n/a s"
    return f"{x:.0f} s" if x < 600 else f"{x / 60:.0f} min"


def _iv(lo: float, hi: float, fmt: Callable[[float], str]) -> str:
    if not (math.isfinite(lo) or lo == math.inf) or (math.isnan(hi)):
        return "(no interval)"
    return f"[{fmt(lo)}, {fmt(hi)}]"


def value_to_gain(metric: str, value: float, baseline: float, floor: float = 0.01) -> float:
    """A metric value as a relative gain over the baseline (roi.relative_gain)."""
    return relative_gain(metric, value, baseline, floor)


def _t_half(values: np.ndarray, level: float) -> float:
    v = values[np.isfinite(values)]
    if len(v) < 2:
        return math.nan
    return float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def _seed_boot(
    frame: pd.DataFrame,
    by: str,
    columns: Sequence[str],
    fn: Callable[[np.ndarray, dict[str, np.ndarray]], float],
    level: float,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of fn(budgets, {column: mean per budget}) over resamples of whole
    seeds (NaN with one seed; inf where more than the tail share give no finite answer).
    frame: rows with `seed`, `by` and `columns`."""
    seeds = frame["seed"].dropna().unique()
    if len(seeds) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(seeds), np.full(len(seeds), 1 / len(seeds)), size=N_SEED_BOOT)
    means = {}
    budgets = None
    for col in columns:
        piv = frame.pivot_table(index="seed", columns=by, values=col, aggfunc="mean")
        piv = piv.reindex(seeds)
        budgets = piv.columns.to_numpy(dtype=float)
        values = piv.to_numpy(dtype=float)
        have = np.isfinite(values)
        with np.errstate(invalid="ignore", divide="ignore"):
            means[col] = (counts @ np.where(have, values, 0.0)) / (counts @ have)
    v = np.array([fn(budgets, {c: m[i] for c, m in means.items()}) for i in range(N_SEED_BOOT)])
    q = (1 - level) / 2
    v = np.where(np.isnan(v), np.inf, v)
    lo, hi = np.percentile(v, [100 * q, 100 * (1 - q)])
    return float(lo), float(hi)


def throughput(frame: pd.DataFrame) -> float:
    """Items per training second measured by the runs (median over points with seconds > 0)."""
    s = frame["seconds"].astype(float)
    ok = s > 0
    rate = (items_seen(frame)[ok] / s[ok]).replace([np.inf, -np.inf], np.nan).dropna()
    return float(rate.median()) if len(rate) else math.nan


def _rests_on(frame: pd.DataFrame, by: str) -> str:
    counts = frame.groupby(by)["seed"].nunique()
    seeds = sorted(set(counts))
    label = "data.n" if by == "n" else "epochs"
    vals = ",".join(str(int(v)) for v in counts.index)
    return f"{label}={vals} measured, {'/'.join(map(str, seeds))} seed(s) each"


# -- epochs worth it ------------------------------------------------------------------------------
def _fewest_epochs(epochs: np.ndarray, means: np.ndarray, share: float) -> float:
    ok = np.isfinite(means)
    if not ok.any() or not np.nanmax(means) > 0:
        return math.nan
    return float(epochs[ok][means[ok] >= share * np.nanmax(means)].min())


def _pays_somewhere(data: pd.DataFrame, gain: str, level: float) -> bool:
    """Whether any measured n gained over the pretrained model beyond the seed noise
    (significance.paying_sizes, the search's own test)."""
    points = {
        int(n): dict(zip(g["seed"], g[gain].astype(float), strict=True))
        for n, g in data.groupby("n")
    }
    return bool(paying_sizes(points, level))


def epochs_worth_it(at_n: pd.DataFrame, gain: str, s: AdviceSettings) -> dict[str, float]:
    """The fewest epochs that reach `share` of the best mean gain measured at this n, with a
    seed-bootstrap interval, its seconds (items seen / measured throughput), and the best."""
    by_epoch = at_n.groupby("epoch")[gain].mean()
    e = _fewest_epochs(by_epoch.index.to_numpy(float), by_epoch.to_numpy(float), s.share)
    lo, hi = _seed_boot(
        at_n, "epoch", [gain], lambda x, m: _fewest_epochs(x, m[gain], s.share), s.level
    )
    means = at_n.groupby("epoch")[gain].mean()
    rate = throughput(at_n)
    cost = items_seen(at_n).groupby(at_n["epoch"]).mean()
    seconds = float(cost.get(e, math.nan) / rate) if math.isfinite(e) else math.nan
    return {
        "epochs": e,
        "epochs_lo": lo,
        "epochs_hi": hi,
        "seconds": seconds,
        "best_epoch": float(means.idxmax()),
        "best_gain": float(means.max()),
        "gain_at_epochs": float(means.get(e, math.nan)),
        "max_epoch": float(means.index.max()),
        "items_per_s": rate,
    }


# -- the answers ----------------------------------------------------------------------------------
def _labels_for(fit: CurveFit | None, target: float, data: pd.DataFrame, gain: str, what: str):
    q = f"labels to reach {what}"
    rests = _rests_on(data, "n")
    means = data.groupby("n")[gain].mean()
    reached = means[means >= target]
    if len(reached) and (fit is None or not np.isfinite(fit.budget_for(target)[0])):
        n0 = int(reached.index.min())
        text = f"already measured at data.n={n0} (gain {fmt_pct(means[n0])})"
        return Answer(q, text, n0, n0, n0, rests, "measured")
    if len(reached):  # inside the measured range: the curve interpolates between the points
        x, lo, hi = fit.budget_for(target)
        below = means[means.index < reached.index.min()]
        between = (
            f"between data.n={int(below.index.max())} ({fmt_pct(below.iloc[-1])}) and "
            if len(below)
            else "at or below "
        ) + f"data.n={int(reached.index.min())} ({fmt_pct(reached.iloc[0])}), measured"
        text = f"≈ {fmt_int(x)} labels {_iv(lo, hi, fmt_int)}, {between}"
        return Answer(q, text, x, lo, hi, rests, f"interpolated; curve {fit.trust}")
    if fit is None or not fit.extrapolation_ok:
        why = fit.reason if fit is not None else "no learning curve could be fitted"
        return Answer(q, f"not answered: {why}", math.nan, math.nan, math.nan, rests, "untested")
    x, lo, hi = fit.budget_for(target)
    if not math.isfinite(x):
        if isinstance(fit, CalibratedCurve) and math.isfinite(fit.fit.budget_for(target)[0]):
            text = (
                f"not within {fit.reach_max:g}x the measured labels, where the calibrated "
                f"predictions end ({fit.calibration.describe()})"
            )
            return Answer(q, text, math.inf, lo, math.inf, rests, "untested")
        if math.isfinite(fit.asymptote):
            shape = f"levels off at {fmt_pct(fit.asymptote)}"
        elif fit.params.get("b", 0.0) <= 0:  # loglin, which has no level: it falls or is flat
            shape = "does not rise with more labels"
        else:
            shape = "rises too slowly to reach it"
        text = f"not reached: the fitted curve ({fit.family}) {shape}"
        return Answer(q, text, math.inf, lo, math.inf, rests, fit.trust)
    text = f"≈ {fmt_int(x)} labels {_iv(lo, hi, fmt_int)}"
    return Answer(q, text, x, lo, hi, _with_calibration(rests, fit, x), fit.trust_at(x))


def _with_calibration(rests: str, fit, x: float) -> str:
    """What an answer rests on, with the calibration of its interval where it extrapolates."""
    note = fit.rests_on(x) if isinstance(fit, CalibratedCurve) else ""
    return f"{rests}; {note}" if note else rests


def _more_labels(
    fit: CurveFit | None, n0: float, extra: float, data: pd.DataFrame, gain: str, level: float
) -> Answer:
    """What `extra` more labels buy at n0: measured (seed-paired) where both sizes were run,
    else predicted by the curve (calibrated beyond the measured sizes)."""
    n1 = n0 + extra
    q = f"{fmt_int(extra)} more labels (data.n={fmt_int(n1)})"
    rests = _rests_on(data, "n")
    by = data.pivot_table(index="seed", columns="n", values=gain)
    if n0 in by.columns and n1 in by.columns:
        diff = (by[n1] - by[n0]).to_numpy(dtype=float)
        d = float(np.nanmean(diff))
        half = _t_half(diff, level)
        seeds = int(np.isfinite(diff).sum())
        note = "" if seeds > 1 else " (one seed: seed=0,1,2 gives an interval)"
        text = f"{fmt_pct(d)} more gain {_iv(d - half, d + half, fmt_pct)}, measured{note}"
        return Answer(q, text, d, d - half, d + half, rests, "measured")
    if fit is None:
        return Answer(q, "not answered: no curve", math.nan, math.nan, math.nan, rests, "untested")
    d, lo, hi = fit.difference(n0, n1)
    if not math.isfinite(d):
        return Answer(q, f"not answered: {fit.reason}", d, lo, hi, rests, "untested")
    text = f"{fmt_pct(d)} more gain {_iv(lo, hi, fmt_pct)}"
    return Answer(q, text, d, lo, hi, _with_calibration(rests, fit, n1), fit.trust_at(n1))


def _more_time(
    at_n: pd.DataFrame,
    gain: str,
    epochs: int,
    fit: CurveFit | None,
    s,
    surface: Surface | None = None,
) -> Answer:
    """What doubling the epochs at this n buys: measured (seed-paired) where it was run, else
    predicted by the surface over labels and epochs (the whole grid), else by the
    gain-vs-items-seen curve at this n."""
    e2 = 2 * epochs
    q = f"twice the training ({e2} epochs)"
    rests = _rests_on(at_n, "epoch")
    by = at_n.pivot_table(index="seed", columns="epoch", values=gain)
    means = by.mean()
    best = int(means.idxmax())
    if best < means.index.max() and e2 > best:
        fell = float(means.iloc[-1] - means.max())
        text = (
            f"not worth it: the gain fell after epoch {best} ({fmt_pct(fell)} by epoch "
            f"{int(means.index.max())}), measured"
        )
        return Answer(q, text, fell, math.nan, math.nan, rests, "measured")
    if e2 in by.columns and epochs in by.columns:
        diff = (by[e2] - by[epochs]).to_numpy(dtype=float)
        d = float(np.nanmean(diff))
        half = _t_half(diff, s.level)
        text = f"{fmt_pct(d)} more gain {_iv(d - half, d + half, fmt_pct)}, measured"
        return Answer(q, text, d, d - half, d + half, rests, "measured")
    if surface is not None:
        n = float(at_n["n"].iloc[0])
        d, lo, hi = surface.difference(n, epochs, e2, s.level)
        text = (
            f"{fmt_pct(d)} more gain {_iv(lo, hi, fmt_pct)}, "
            "predicted (surface over labels and epochs)"
        )
        reach = f"; epochs beyond the {surface.e_max:g} measured" if e2 > surface.e_max else ""
        return Answer(q, text, d, lo, hi, f"{rests}{reach}", "predicted")
    if fit is None:
        return Answer(
            q, "not answered: no time curve", math.nan, math.nan, math.nan, rests, "untested"
        )
    cost = items_seen(at_n).groupby(at_n["epoch"]).mean()
    c1 = float(cost.get(epochs, epochs * at_n["n"].iloc[0]))
    d, lo, hi = fit.difference(c1, 2 * c1)
    if not math.isfinite(d):
        return Answer(q, f"not answered: {fit.reason}", d, lo, hi, rests, "untested")
    text = f"{fmt_pct(d)} more gain {_iv(lo, hi, fmt_pct)}, predicted (curve in items seen)"
    return Answer(q, text, d, lo, hi, rests, fit.trust_at(2 * c1))


def _roi_drop_labels(data: pd.DataFrame, gain: str, fit: CurveFit | None, s) -> Answer:
    q = f"ROI per label down to {100 * s.drop_fraction:.0f}% of its peak"
    rests = _rests_on(data, "n")

    def measured(ns: np.ndarray, m: dict[str, np.ndarray]) -> float:
        try:
            d = drop_point(ns, m[gain] / ns, s.drop_fraction)
        except ValueError:
            return math.nan
        return d.x if d.reached else math.nan

    by_n = data.groupby("n")[gain].mean()
    x = measured(by_n.index.to_numpy(float), {gain: by_n.to_numpy(float)})
    if math.isfinite(x):
        lo, hi = _seed_boot(data, "n", [gain], measured, s.level)
        return Answer(
            q,
            f"after ≈ {fmt_int(x)} labels {_iv(lo, hi, fmt_int)}, measured",
            x,
            lo,
            hi,
            rests,
            "measured",
        )
    means = data.groupby("n")[gain].mean()
    roi = means / means.index
    if fit is None or not fit.extrapolation_ok or not roi.max() > 0:
        why = "not within the measured data.n" + ("" if fit is None else f"; {fit.reason}")
        return Answer(q, why, math.nan, math.nan, math.nan, rests, "untested")
    peak, peak_x = float(roi.max()), float(roi.idxmax())
    grid = np.geomspace(peak_x, fit.x_max * 1e3, 600)
    mean, lo_c, hi_c = fit.expected(grid)
    limit = s.drop_fraction * peak

    def first(curve):
        below = np.flatnonzero(curve / grid <= limit)
        return float(grid[below[0]]) if len(below) else math.inf

    x, lo, hi = first(mean), first(lo_c), first(hi_c)
    text = (
        "not within the measured data.n; the curve puts it at "
        f"≈ {fmt_int(x)} {_iv(lo, hi, fmt_int)}"
    )
    return Answer(q, text, x, lo, hi, rests, fit.trust_at(x))


def _roi_drop_seconds(at_n: pd.DataFrame, roi_s: str, s) -> Answer:
    n = int(at_n["n"].iloc[0])
    q = f"ROI per second at n={n} down to {100 * s.drop_fraction:.0f}% of its peak"
    rests = _rests_on(at_n, "epoch")

    def measured(_: np.ndarray, m: dict[str, np.ndarray]) -> float:
        try:
            d = drop_point(m["seconds"], m[roi_s], s.drop_fraction)
        except ValueError:
            return math.nan
        return d.x if d.reached else math.nan

    by_epoch = at_n.groupby("epoch")[[roi_s, "seconds"]].mean()
    x = measured(None, {c: by_epoch[c].to_numpy(float) for c in (roi_s, "seconds")})
    if not math.isfinite(x):
        return Answer(
            q, "not within the measured epochs", math.nan, math.nan, math.nan, rests, "untested"
        )
    lo, hi = _seed_boot(at_n, "epoch", [roi_s, "seconds"], measured, s.level)
    return Answer(
        q, f"after ≈ {fmt_secs(x)} {_iv(lo, hi, fmt_secs)}, measured", x, lo, hi, rests, "measured"
    )


# -- the decision ---------------------------------------------------------------------------------
def still_paying(means: pd.Series, drop_fraction: float) -> pd.Series:
    """The mean gains (index: data.n) whose ROI per label, gain / n, is still at least
    `drop_fraction` of its peak, and above 0: the recommendation is the largest gain among them
    (the budget search stops once its largest n is not among them)."""
    roi = means / means.index
    return means[(roi >= drop_fraction * roi.max()) & (means > 0)]


def advise(
    points: pd.DataFrame,
    key: tuple,
    metric: str,
    baseline: float,
    s: AdviceSettings | None = None,
    floor: float = 0.01,
) -> Advice:
    """Advice for one (task, model, data) from its budget points (table.budget_points rows:
    n, seed, epoch, seconds, samples_seen, gain/<m>, roi_s/<m>, ...) and the metric's epoch-0
    value `baseline`."""
    s = s or AdviceSettings()
    name = metric_name(metric)
    gain, roi_s = f"gain/{name}", f"roi_s/{name}"
    pts = points[(points[GROUP] == pd.Series(key, index=GROUP)).all(axis=1)]
    pts = pts[pts[gain].notna()]
    data = data_curve(pts, metric, s.data_epoch)
    ceiling = gain_ceiling(metric, baseline, floor)

    data_fit = None
    try:
        data_fit = fit_learning_curve(
            data["n"],
            data[gain],
            data["seed"],
            level=s.level,
            ceiling=ceiling,
            n_boot=s.bootstrap,
        )
    except ValueError as e:
        log.info("%s: no learning curve in data.n: %s", name, e)
    table_ = load_table(s.calibration)
    if data_fit is not None and data_fit.extrapolation_ok and table_ is not None:
        data_fit = CalibratedCurve(data_fit, table_)
    surface = None
    try:
        surface = fit_surface(
            pts["n"], pts["epoch"], pts[gain], pts["seed"], ceiling, s.level, n_boot=100
        )
    except ValueError as e:
        log.debug("%s: no surface over labels and epochs: %s", name, e)
    time_fits: dict[int, CurveFit] = {}
    rows = []
    for n, at_n in pts.groupby("n"):
        try:
            time_fits[int(n)] = fit_learning_curve(
                items_seen(at_n),
                at_n[gain],
                at_n["seed"],
                level=s.level,
                ceiling=ceiling,
                n_boot=s.bootstrap,
                axis="more epochs, items seen",
            )
        except ValueError:
            pass
        rows.append({"n": int(n), **epochs_worth_it(at_n, gain, s)})
    table = pd.DataFrame(rows)

    target = s.target_as_gain(metric, baseline, floor)
    what = None if target is None else f"a gain of {fmt_pct(target)}"
    if s.target_value is not None:
        what = f"{name} = {s.target_value:g} (a gain of {fmt_pct(target)})"
    answers = []
    means = data.groupby("n")[gain].mean()
    if target is None and len(means):  # the report asks one step beyond the best measured
        target = 1.25 * float(means.max()) if means.max() > 0 else None
        what = None if target is None else f"{fmt_pct(target)} (1.25x the best measured gain)"
    labels_answer = None
    if target is not None:
        labels_answer = _labels_for(data_fit, target, data, gain, what)
        answers.append(labels_answer)
    answers.append(_roi_drop_labels(data, gain, data_fit, s))

    # the recommendation: the measured n with the largest gain whose ROI per label is still at
    # least drop_fraction of its peak; with a target, the labels the curve says it needs
    roi = means / means.index
    why = ""
    n_rec: float | None = None
    unreached = ""  # a target the curve does not reach: the card then shows what is reachable
    if labels_answer is not None and (s.target_gain is not None or s.target_value is not None):
        if math.isfinite(labels_answer.value):
            n_rec = float(math.ceil(labels_answer.value))
            why = f"the labels to reach {what}"
        else:
            answer = labels_answer.text.removeprefix("not reached: ")
            unreached = f"{what} is not reached: {answer}; reachable instead: "
    if n_rec is not None:
        pass
    elif len(means) and not _pays_somewhere(data, gain, s.level):
        why = f"{NO_GAIN}: keep the pretrained model"
    elif len(means) and roi.max() > 0:
        n_rec = float(still_paying(means, s.drop_fraction).idxmax())
        why = (
            f"the largest gain among the data.n whose ROI per label is still >= "
            f"{100 * s.drop_fraction:.0f}% of its peak"
        )
    else:
        why = "fine-tuning did not improve on the pretrained model at any measured budget"
    why = unreached + why
    found = {
        "answers": answers,
        "data_fit": data_fit,
        "time_fits": time_fits,
        "epochs_table": table,
        "surface": surface,
        "baseline": baseline,
    }
    if n_rec is None:
        nan = math.nan
        none = (None, None, nan, nan, nan, nan, None, None)  # n, epochs, gain (lo, hi), s, more
        return Advice(key, metric, *none, "untested", why, **found)

    measured_n = table["n"].to_numpy(dtype=float)
    near = int(measured_n[np.argmin(np.abs(np.log(measured_n / n_rec)))])
    row = table.set_index("n").loc[near]
    epochs = int(row["epochs"]) if math.isfinite(row["epochs"]) else int(row["best_epoch"])
    at_near = pts[pts["n"] == near]
    if n_rec == near:
        vals = at_near.loc[at_near["epoch"] == epochs, gain].to_numpy(dtype=float)
        g = float(np.mean(vals))
        half = _t_half(vals, s.level)
        g_lo, g_hi, trust = g - half, g + half, "measured"
        seconds = float(row["seconds"])
    else:
        g_arr, lo_arr, hi_arr = data_fit.predict([n_rec])
        g, g_lo, g_hi = float(g_arr[0]), float(lo_arr[0]), float(hi_arr[0])
        trust = data_fit.trust_at(n_rec)
        epochs_near = epochs
        if surface is not None:
            epochs = surface.epochs_worth_it(n_rec, s.share)
        seconds = float(row["seconds"]) * n_rec / near * epochs / epochs_near
        why += (
            f" (predicted; epochs from the surface over labels and epochs, seconds scaled from "
            f"data.n={near})"
            if surface is not None
            else f" (predicted; epochs and seconds scaled from data.n={near})"
        )
        rests_on = data_fit.rests_on(n_rec) if isinstance(data_fit, CalibratedCurve) else ""
        why += f"; {rests_on}" if rests_on else ""  # "": within the measured data.n
    extra = s.extra_labels or n_rec
    more_labels = _more_labels(data_fit, n_rec, extra, data, gain, s.level)
    more_time = _more_time(at_near, gain, epochs, time_fits.get(near), s, surface)
    for n, at_n in pts.groupby("n"):
        if int(n) == near:
            answers.append(_roi_drop_seconds(at_n, roi_s, s))
    if data_fit is not None and trust == "measured":
        trust = f"measured; curve {data_fit.trust}"
    plan = (int(n_rec), epochs, g, g_lo, g_hi, seconds, more_labels, more_time)
    advice = Advice(key, metric, *plan, trust, why, **found)
    advice.run_id, advice.run_epochs = recommended_run(at_near, metric, epochs)
    return advice


def recommended_run(at_n: pd.DataFrame, metric: str, epochs: int) -> tuple[str | None, int | None]:
    """The run whose model the advice names, and the epochs it was trained: among the runs at
    the recommended data.n, those trained for exactly `epochs` epochs (else the fewest epochs
    beyond: a model trained for `epochs` was never kept), the seed with the best `metric` at its
    last epoch. (None, None) without run ids."""
    if "run_id" not in at_n or metric not in at_n:
        return None, None
    final = at_n[(at_n["epoch"] == at_n["epochs"]) & at_n[metric].notna()]
    longer = final[final["epochs"] >= epochs]
    if longer.empty:
        return None, None
    ended = longer[longer["epochs"] == longer["epochs"].min()]
    best = ended.loc[ended[metric].idxmax()]
    return str(best["run_id"]), int(best["epochs"])


def epochs_lines(advice: Advice) -> pd.DataFrame:
    """The compact per-n table: epochs worth it (the fewest reaching `advise.share` of the best
    gain at n) [interval], their seconds, the best epoch and its gain."""
    t = advice.epochs_table
    if t is None or t.empty:
        return pd.DataFrame()
    out = pd.DataFrame({"data.n": t["n"]})
    out["epochs worth it"] = [
        f"{fmt_int(e)} {_iv(lo, hi, fmt_int)}"
        for e, lo, hi in zip(t["epochs"], t["epochs_lo"], t["epochs_hi"], strict=True)
    ]
    out["seconds then"] = [fmt_secs(v) for v in t["seconds"]]
    out["best epoch"] = t["best_epoch"].map(fmt_int)
    out["best gain"] = t["best_gain"].map(fmt_pct)
    out["items/s here"] = t["items_per_s"].map(lambda v: f"{v:.4g}")
    return out


def answers_frame(advices: Sequence[Advice]) -> pd.DataFrame:
    rows = []
    for a in advices:
        for ans in [a.more_labels, a.more_time, *a.answers]:
            if ans is None:
                continue
            rows.append(
                {
                    "task · model · data": " · ".join(map(str, a.key)),
                    "metric": metric_name(a.metric),
                    "question": ans.question,
                    "answer": ans.text,
                    "trust": ans.trust,
                    "rests on": ans.rests_on,
                }
            )
    return pd.DataFrame(rows)


@quiet_numerics
def experiment_advice(
    df: pd.DataFrame, points: pd.DataFrame, metric: str, s: AdviceSettings
) -> list[Advice]:
    """One Advice per (task, model, data) of an experiment: df are the roi_table rows (epoch 0
    gives each baseline), points the budget points."""
    base = df[df["epoch"] == 0].groupby(GROUP)[metric].mean()
    return [
        advise(points, key, metric, float(base.get(key, math.nan)), s)
        for key, _ in points.groupby(GROUP, sort=True)
    ]
