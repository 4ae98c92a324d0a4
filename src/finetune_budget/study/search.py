"""An adaptive budget search: measure a small pilot, fit the learning curve, choose the next
`data.n` (or more epochs) where the answer is decided, stop when more labels stop paying.

    python train.py -m hydra/sweeper=budget                      # MiniLM on CLINC150
    python train.py -m hydra/sweeper=budget data=stsb hydra.sweeper.target_gain=0.05

The Hydra sweeper (`hydra_plugins/budget_sweeper`) only launches jobs and reads their MLflow runs;
everything that decides is here, as plain functions over `Observation`s, so a stub objective can
drive it (tests/test_budget_sweeper.py). The learning curve is `study.curves.fit_learning_curve`
(gain against labelled items, seeds as groups); its `predict` interval is the stated confidence.

One step of the search (`decide`):
1. Stop when the target is reached: the mean gain (or metric value) over seeds at a measured n.
2. Without a target, stop when the advice is decided. By default (`min_roi_per_label` null)
   by the advice engine's own rule (study.advice.still_paying): it recommends the largest gain
   among the sizes whose gain / n is still >= `advise.drop_fraction` of its peak; once the
   largest n measured is below that limit, gain / n only falls further and the answer cannot
   move up. While the last size that pays and the first that does not are more than 1.5x (or
   one allowed size) apart, the size between is measured first. A curve with no gain above 0
   yet has no peak and does not stop. With `min_roi_per_label`: the marginal ROI of the last
   labels added, (gain(n2) - gain(n1)) / (n2 - n1) between the two largest measured n, paired
   by seed (the subsets are nested), has a one-sided t upper bound at `level` below it, after
   an earlier segment paid at least it (a curve still flat at the pilot's sizes does not stop).
3. Stop when the compute budget is spent, `max_steps` steps were run, or every labelled item
   is used (`n_max`: the sweeper sets it to the training set's size at most, so no job asks
   for more items than the data holds; the advice then predicts what labels beyond it buy).
4. More epochs first, when the last epoch at the largest n still added more than
   `min_epoch_gain` (mean over seeds): every measured n is rerun with `epoch_step` more epochs,
   which continues each saved run and costs only the added epochs.
5. Otherwise measure the next n (at most `growth` times the largest measured, or among
   `sizes`): with a target, the smallest n where the fitted curve reaches it; by default, the
   smallest n where the fitted gain / n falls below the limit of 2; with `min_roi_per_label`,
   while the fitted curve's knee (where its marginal ROI falls below the threshold) lies
   above the largest measured n, the candidate nearest below the knee; once past it, the
   smallest n where test 2
   is expected to pass (the fitted ROI per label from the largest measured n plus the paired
   test's half-width from the measured seed-to-seed spread is below the threshold). With no
   such n, or a fit that cannot be trusted to extrapolate, the farthest step allowed (where the
   prediction is least certain). A step whose estimated cost (seconds per item-epoch so far)
   does not fit in the remaining budget is not run.
6. With prices (`advise.label_cost` and `advise.value_per_gain`, or a target with
   `advise.miss_penalty`; study/prices.py), the step chosen in 4 or 5 is run only while its
   expected value of information is at least its cost (`step_value`, `step_cost`): its gain
   predicted as the plan's split normal (the fitted curve's interval; for more epochs, the last
   epoch's gain again per added epoch with the seeds' spread), valued as V x E[max(G - best, 0)]
   (the better model is kept afterwards) or as miss_penalty x P(G >= target) with G the fitted
   gain at the farthest size the search may reach (a step on the way to a target is worth the
   chance of reaching it at all); its cost the labels it adds
   (subsets are nested) and its estimated compute. The summary states what the search cost.
7. Between rounds the intervals' level adapts to the study at hand (adaptive conformal
   inference, Gibbs & Candès 2021; study.calibration.adaptive_alpha): the size a round measured
   counts as a miss (err 1) when its mean gain over seeds fell outside the interval the last
   round predicted for it, else a hit (no interval, e.g. an untrusted fit: not counted); then
   alpha_t += adaptive_gamma x (1 - level - err) and the next round fits and predicts at level
   1 - alpha_t, for the chosen size, the knee and the value of information (whose spread reads
   the adapted interval as one of `level`: that is the coverage it is adapted to hold). The
   stopping test and the advice keep `level`. Each decision records its level and how many
   earlier predictions held (`covered`); adaptive_gamma 0 keeps `level` throughout.

The advice is `study.advice.advise`, the one engine the report's decision card and
`python evaluate.py mode=advise` use, on the search's runs as budget points (`points_frame`):
the same runs give the same recommended data.n and epochs. "Keep the pretrained model" is
data.n=0 (`advised`). `grid_advice` is the same engine on a full grid's runs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from finetune_budget.errors import ConfigError
from finetune_budget.study import advice as engine
from finetune_budget.study.calibration import (
    adaptive_alpha,
    split_normal_cdf,
    split_normal_excess,
)
from finetune_budget.study.curves import fit_learning_curve, quiet_numerics
from finetune_budget.study.prices import Prices
from finetune_budget.study.roi import gain_ceiling, metric_name
from finetune_budget.study.table import GROUP, budget_points

log = logging.getLogger(__name__)

EPOCH_RULES = ("best", "last")


@dataclass(frozen=True)
class SearchSettings:
    """What `conf/hydra/sweeper/budget.yaml` sets (docs/results.md explains each choice)."""

    pilot_n: tuple[int, ...] = (100, 200, 400)
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 3
    epoch_rule: str = "best"  # the gain of a run: at its best epoch, or at its last
    # null: stop by the advice engine's rule (advise.drop_fraction); a number: stop when the
    # marginal gain per added label is below it with `level` confidence
    min_roi_per_label: float | None = None
    target_gain: float | None = None  # relative gain over the pretrained model, e.g. 0.05
    target_value: float | None = None  # or a value of the metric, e.g. 0.97
    compute_budget_s: float | None = None  # wall-clock seconds of the search's jobs
    level: float = 0.9  # confidence of the stopping test and of the intervals
    # how fast the intervals' level follows their misses between rounds (0: fixed at `level`)
    adaptive_gamma: float = 0.05
    max_steps: int = 6  # steps after the pilot
    growth: float = 2.5  # the next n is at most growth x the largest measured n
    n_max: int | None = None  # the largest data.n allowed (null: no cap)
    sizes: tuple[int, ...] | None = None  # choose data.n only among these (null: any)
    min_epoch_gain: float | None = 0.003  # null: never add epochs
    epoch_step: int = 2
    max_epochs: int = 10
    compare_grid: tuple[int, ...] = (100, 200, 500, 1000, 2000, 5000)
    metric: str | None = None  # budget.metric: bounds the fitted gain (study.roi.gain_ceiling)
    # The advice engine's settings and the prices (conf/advise/default.yaml, composed into
    # hydra.sweeper.advise): the search advises with study.advice.advise, as mode=advise does.
    advise: engine.AdviceSettings = field(default_factory=engine.AdviceSettings)

    @classmethod
    def from_config(cls, node: Mapping[str, Any]) -> SearchSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(node) - known - {"_target_"})
        if unknown:
            raise ConfigError(
                f"hydra.sweeper has unknown keys {unknown}; known: {', '.join(sorted(known))}"
            )
        values = {k: v for k, v in node.items() if k in known}
        if "advise" in values and not isinstance(values["advise"], engine.AdviceSettings):
            values["advise"] = engine.AdviceSettings.from_config(values["advise"])
        for key in ("pilot_n", "seeds", "compare_grid", "sizes"):
            if key in values and values[key] is not None:
                values[key] = tuple(int(v) for v in values[key])
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if len(set(self.pilot_n)) < 2 or min(self.pilot_n) <= 0:
            raise ConfigError(
                f"hydra.sweeper.pilot_n={list(self.pilot_n)}: give at least 2 distinct positive "
                "sizes, e.g. [100,200,400]"
            )
        if not self.seeds:
            raise ConfigError("hydra.sweeper.seeds is empty; give e.g. [0,1,2]")
        if self.epoch_rule not in EPOCH_RULES:
            raise ConfigError(
                f"hydra.sweeper.epoch_rule={self.epoch_rule!r}; use one of {EPOCH_RULES}"
            )
        if not 0.5 <= self.level < 1:
            raise ConfigError(f"hydra.sweeper.level={self.level}; use a confidence like 0.9")
        if not 0 <= self.adaptive_gamma < 1:
            raise ConfigError(
                f"hydra.sweeper.adaptive_gamma={self.adaptive_gamma}; use a step in [0, 1), "
                "e.g. 0.05 (0: a fixed level)"
            )
        if self.growth <= 1:
            raise ConfigError(f"hydra.sweeper.growth={self.growth}; use a factor > 1, e.g. 2.5")
        if self.epochs < 1 or self.max_epochs < self.epochs:
            raise ConfigError(
                f"hydra.sweeper.epochs={self.epochs} must be >= 1 and <= "
                f"hydra.sweeper.max_epochs={self.max_epochs}"
            )
        if self.n_max is not None and self.n_max < max(self.pilot_n):
            raise ConfigError(
                f"hydra.sweeper.n_max={self.n_max} is below the pilot's largest n "
                f"{max(self.pilot_n)}; raise n_max or shrink pilot_n"
            )
        if self.target_gain is not None and self.target_value is not None:
            raise ConfigError("set hydra.sweeper.target_gain or target_value, not both")
        self.engine().prices  # noqa: B018  (a one-line ConfigError for prices it cannot use)

    def engine(self) -> engine.AdviceSettings:
        """The advice engine's settings with the search's own target, level and metric, so the
        search stops and advises on the question mode=advise is asked."""
        target = {}
        if self.target_gain is not None or self.target_value is not None:
            target = {"target_gain": self.target_gain, "target_value": self.target_value}
        metric = {"metric": self.metric} if self.metric is not None else {}
        return dataclasses.replace(self.advise, level=self.level, **target, **metric)

    @property
    def prices(self) -> Prices:
        return self.engine().prices


@dataclass(frozen=True)
class Job:
    n: int
    seed: int
    epochs: int

    def overrides(self) -> list[str]:
        return [f"data.n={self.n}", f"seed={self.seed}", f"trainer.max_epochs={self.epochs}"]


@dataclass(frozen=True)
class Observation:
    """One finished run: per epoch (1..epochs) the relative gain, metric value and seconds."""

    n: int
    seed: int
    epochs: int
    gain: Mapping[int, float]
    value: Mapping[int, float] = field(default_factory=dict)
    seconds: Mapping[int, float] = field(default_factory=dict)
    items_seen: Mapping[int, float] = field(default_factory=dict)  # data/samples_seen
    baseline: float = math.nan  # the metric at epoch 0
    run_id: str | None = None
    key: tuple[str, str, str] = ("-", "-", "-")  # (task, model, data), the runs' tags
    cost_s: float = math.nan  # training plus evaluation seconds of the run

    def at(self, rule: str) -> tuple[int, float]:
        """(epoch, gain) by the epoch rule: the best trained epoch, or the last."""
        finite = {e: g for e, g in self.gain.items() if e >= 1 and math.isfinite(g)}
        if not finite:
            return self.epochs, math.nan
        if rule == "last":
            epoch = max(finite)
        else:
            epoch = max(finite, key=lambda e: (finite[e], -e))
        return epoch, finite[epoch]


@dataclass
class Batch:
    """What measuring a list of jobs returned: observations, wall seconds, failed job lines."""

    observations: list[Observation]
    cost_s: float
    failures: list[str] = field(default_factory=list)


@dataclass
class Decision:
    step: int
    action: str  # pilot, measure, more_epochs, stop
    reason: str
    n: list[int] = field(default_factory=list)
    epochs: int = 0
    jobs: list[Job] = field(default_factory=list)
    family: str = ""
    predicted: float = math.nan  # fitted gain at the chosen n, with its interval
    predicted_lo: float = math.nan
    predicted_hi: float = math.nan
    roi_upper: float = math.nan  # upper bound of the last labels' marginal ROI
    roi_threshold: float = math.nan
    spent_s: float = 0.0
    estimated_s: float = math.nan
    value: float = math.nan  # with prices: the step's expected value of information, in money
    cost: float = math.nan  # ... and its cost: the labels it adds and its estimated compute
    level: float = math.nan  # the level of the intervals it was decided with
    covered: str = ""  # earlier predictions measured inside their interval, e.g. "3/4"

    def row(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "jobs"}
        out["n"] = " ".join(str(n) for n in self.n)
        out["jobs"] = len(self.jobs)
        return out


def advised(advice: engine.Advice | None) -> tuple[int, int] | None:
    """(data.n, epochs) the engine recommends; (0, 0) for "keep the pretrained model" (no n)."""
    if advice is None:
        return None
    if advice.n is None:
        return 0, 0
    return int(advice.n), int(advice.epochs or 0)


@dataclass
class SearchResult:
    decisions: list[Decision]
    observations: list[Observation]
    stop_reason: str
    advice: engine.Advice | None  # study.advice.advise on the search's runs: mode=advise's answer
    spent_s: float
    jobs: int
    item_epochs: int
    grid_item_epochs: int
    grid_estimated_s: float
    labels: int = 0  # the labels the search bought: its largest data.n (subsets are nested)
    prices: Prices = field(default_factory=Prices)
    at_edge: bool = False  # stopped because every labelled item was used
    level: float = math.nan  # the intervals' level after the last round (adaptive_gamma)
    covered: int = 0  # predictions measured inside their interval ...
    predictions: int = 0  # ... of those measured

    @property
    def advice_n(self) -> int | None:
        return None if self.advice is None else advised(self.advice)[0]

    @property
    def advice_epochs(self) -> int | None:
        return None if self.advice is None else advised(self.advice)[1]

    def cost(self) -> float:
        """What the search itself cost in money: its labels and its compute (NaN: not priced)."""
        if not self.prices.priced:
            return math.nan
        return self.prices.label_cost * self.labels + self.prices.compute_cost(self.spent_s)

    def summary(self) -> str:
        lines = [f"budget search stopped: {self.stop_reason}"]
        if self.advice is not None:
            head = self.advice.lines()[0]  # the line mode=advise prints
            if self.advice_n == 0 and "keep the pretrained model" not in head:
                head += ": keep the pretrained model"
            lines.append(f"advice: {head}")
            if self.at_edge and self.advice.more_labels is not None:
                more = self.advice.more_labels
                lines.append(
                    f"beyond the data: {more.question}: {more.text} (trust: {more.trust})"
                )
        share = self.item_epochs / self.grid_item_epochs if self.grid_item_epochs else math.nan
        lines.append(
            f"cost: {self.jobs} jobs, {self.item_epochs} item-epochs, {self.spent_s:.0f} s; "
            f"the full grid it replaces: {self.grid_item_epochs} item-epochs "
            f"(~{self.grid_estimated_s:.0f} s at the measured rate), {share:.0%} of it"
        )
        if self.predictions:
            lines.append(
                f"intervals: {self.covered} of {self.predictions} measured predictions inside "
                f"theirs; final level {self.level:.1%} (asked: {self.decisions[0].level:.1%})"
            )
        if self.prices.priced:
            p = self.prices
            compute = (
                f" + compute {p.money(p.compute_cost(self.spent_s))} for {self.spent_s:.0f} s"
                if p.compute_cost_per_hour
                else ""
            )
            lines.append(
                f"the search cost {p.money(self.cost())}: {self.labels} labels "
                f"{p.money(p.label_cost * self.labels)}{compute}"
            )
        return "\n".join(lines)


# --- the measured curve ---------------------------------------------------------------------


def curve_points(
    observations: Sequence[Observation], epochs: int, rule: str
) -> dict[int, dict[int, float]]:
    """{n: {seed: gain}} of the runs with `epochs` epochs (the latest run per n and seed)."""
    out: dict[int, dict[int, float]] = {}
    for obs in observations:
        if obs.epochs != epochs:
            continue
        gain = obs.at(rule)[1]
        if math.isfinite(gain):
            out.setdefault(obs.n, {})[obs.seed] = gain
    return dict(sorted(out.items()))


def segment_rois(points: Mapping[int, Mapping[int, float]]) -> list[float]:
    """Mean marginal ROI per label of each segment (0 -> n1, n1 -> n2, ...): d gain / d n."""
    out, prev_n, prev_g = [], 0, 0.0
    for n, by_seed in points.items():
        mean = float(np.mean(list(by_seed.values())))
        out.append((mean - prev_g) / (n - prev_n))
        prev_n, prev_g = n, mean
    return out


def marginal_roi_bound(
    points: Mapping[int, Mapping[int, float]], level: float
) -> tuple[float, float, int]:
    """(mean, one-sided upper bound at `level`, seeds) of the marginal ROI per label between the
    two largest measured n, paired by seed. With one common seed the bound is the value itself."""
    (n1, a), (n2, b) = list(points.items())[-2:]
    common = sorted(set(a) & set(b))
    if not common:
        return math.nan, math.nan, 0
    d = np.array([(b[s] - a[s]) / (n2 - n1) for s in common])
    mean = float(d.mean())
    if len(d) < 2:
        return mean, mean, 1
    sem = float(d.std(ddof=1)) / math.sqrt(len(d))
    return mean, mean + float(stats.t.ppf(level, len(d) - 1)) * sem, len(d)


def has_risen(points: Mapping[int, Mapping[int, float]], threshold: float) -> bool:
    """Whether ROI per label was at or above the threshold before the last segment: it can only
    have "fallen below" it then (a curve that is still flat at the pilot's sizes, as CLINC150
    is below a few hundred labels, must not stop the search)."""
    return any(r >= threshold for r in segment_rois(points)[:-1])


def roi_threshold(points: Mapping[int, Mapping[int, float]], settings: SearchSettings) -> float:
    """The marginal ROI threshold of the stopping test (`min_roi_per_label`)."""
    return float(settings.min_roi_per_label)


def engine_means(
    observations: Sequence[Observation], epochs: int, settings: SearchSettings
) -> pd.Series:
    """Mean gain over seeds per measured n (index) at the epoch the advice engine reads
    (`advise.data_epoch`: final, else by the search's epoch rule)."""
    rule = "last" if settings.engine().data_epoch == "final" else settings.epoch_rule
    points = curve_points(observations, epochs, rule)
    return pd.Series({n: float(np.mean(list(g.values()))) for n, g in points.items()})


def _between(n_pay: int | None, n_last: int, s: SearchSettings) -> int | None:
    """The size to measure between the largest n that pays and the smallest that does not, or
    None when they are close enough (an allowed size apart, or within 1.5x)."""
    if n_pay is None:
        return None
    if s.sizes:
        inside = [n for n in s.sizes if n_pay < n < n_last]
        if not inside:
            return None
        return min(inside, key=lambda n: abs(math.log(n / math.sqrt(n_pay * n_last))))
    if n_last / n_pay <= 1.5:
        return None
    mid = nice(math.sqrt(n_pay * n_last))
    return mid if n_pay < mid < n_last else None


def target_gain(observations: Sequence[Observation], settings: SearchSettings) -> float | None:
    """The target as a relative gain (a target_value is converted with the runs' baseline): the
    search's own, else the advice engine's (hydra.sweeper.advise.target_*)."""
    asked = settings.engine()
    base = [o.baseline for o in observations if math.isfinite(o.baseline)]
    if asked.target_value is not None and not base:
        return None  # a target value needs the runs' pretrained value
    return asked.target_as_gain(asked.metric or "", float(np.mean(base)) if base else math.nan)


def nice(n: float) -> int:
    """n rounded to two significant digits (1234 -> 1200), at least 1."""
    if n < 10:
        return max(1, round(n))
    digits = 10 ** (int(math.floor(math.log10(n))) - 1)
    return int(round(n / digits) * digits)


def candidates(n_top: int, settings: SearchSettings, count: int = 8) -> list[int]:
    """Sizes above the largest measured n, up to growth x it (and n_max): geometric, or the
    allowed `sizes` in that range (at least the next one)."""
    hi = n_top * settings.growth
    if settings.n_max is not None:
        hi = min(hi, settings.n_max)
    if settings.sizes:
        above = sorted(n for n in set(settings.sizes) if n > n_top)
        return [n for n in above if n <= hi] or above[:1]
    grid = np.geomspace(n_top * 1.25, max(hi, n_top * 1.25), count)
    out = sorted({min(nice(c), int(hi)) for c in grid} - {n_top})
    return [c for c in out if c > n_top] or ([int(hi)] if hi > n_top else [])


# --- one step -------------------------------------------------------------------------------


FitFn = Callable[..., Any]


def default_fit() -> FitFn:
    return fit_learning_curve


def gain_bound(observations: Sequence[Observation], metric: str | None) -> float | None:
    """The largest relative gain `metric` allows over the runs' mean baseline (None: no metric,
    no baseline, or a metric without a known bound): a score <= 1 gains at most (1 - m0) / m0."""
    base = [o.baseline for o in observations if math.isfinite(o.baseline)]
    if metric is None or not base:
        return None
    return gain_ceiling(metric, float(np.mean(base)))


def _fit(
    points: Mapping[int, Mapping[int, float]],
    settings: SearchSettings,
    fit: FitFn,
    observations: Sequence[Observation] = (),
    level: float | None = None,
):
    x = [n for n, by_seed in points.items() for _ in by_seed]
    y = [g for by_seed in points.values() for g in by_seed.values()]
    groups = [s for by_seed in points.values() for s in by_seed]
    ceiling = gain_bound(observations, settings.metric)
    extra = {} if ceiling is None else {"ceiling": ceiling}
    try:
        return fit(
            np.asarray(x, float),
            np.asarray(y, float),
            groups=groups,
            level=settings.level if level is None else level,
            **extra,
        )
    except (ValueError, RuntimeError) as e:  # too few points, a fit that did not converge
        log.info("learning-curve fit failed: %s", e)
        return None


def _rate(observations: Sequence[Observation], spent_s: float, item_epochs: int) -> float:
    """Seconds per item-epoch of the search so far (wall clock, all overheads)."""
    return spent_s / item_epochs if item_epochs else math.nan


def decide(
    observations: Sequence[Observation],
    epochs: int,
    step: int,
    spent_s: float,
    item_epochs: int,
    settings: SearchSettings,
    fit: FitFn,
    level: float | None = None,
) -> Decision:
    """The next step of the search given everything measured so far (see the module docstring).
    level: of the fitted curve's intervals (None: settings.level; run_search adapts it)."""
    s = settings
    points = curve_points(observations, epochs, s.epoch_rule)
    level = s.level if level is None else level
    d = Decision(step, "stop", "", epochs=epochs, spent_s=spent_s, level=level)
    if len(points) < 2:
        d.reason = f"fewer than 2 data.n finished at {epochs} epochs; nothing to fit"
        return d
    means = {n: float(np.mean(list(g.values()))) for n, g in points.items()}
    goal = target_gain(observations, s)
    if goal is not None:
        reached = [n for n, m in means.items() if m >= goal]
        if reached:
            d.reason = f"target gain {goal:.4g} reached at data.n={min(reached)}"
            return d
    if goal is None and s.min_roi_per_label is None:
        # the advice engine's own rule (study.advice.still_paying): the answer is the largest
        # gain among the n whose gain / n is still >= drop_fraction of its peak; once the
        # largest n measured is not among them it is decided (gain / n only falls further),
        # within 1.5x (or the allowed sizes) of where gain / n crosses the limit
        gain_n = engine_means(observations, epochs, s)
        roi = gain_n / gain_n.index
        drop = s.engine().drop_fraction
        n_last = int(gain_n.index.max())
        d.roi_upper = float(roi[n_last])
        d.roi_threshold = drop * float(roi.max()) if roi.max() > 0 else -math.inf
        paying = engine.still_paying(gain_n, drop) if roi.max() > 0 else gain_n.iloc[:0]
        if roi.max() > 0 and n_last not in paying.index:
            n_pay = int(paying.index.max()) if len(paying) else None
            mid = _between(n_pay, n_last, s)
            if mid is None:
                d.reason = (
                    f"the advice is decided: ROI per label (gain / n) at data.n={n_last} is "
                    f"{d.roi_upper:.3g}, below {drop:.0%} of its peak at "
                    f"data.n={int(roi.idxmax())} ({d.roi_threshold:.3g}); larger sizes pay "
                    "less still"
                )
                return d
            d.reason = (
                f"the answer lies between data.n={n_pay} (gain / n still pays) and {n_last} "
                f"(below {d.roi_threshold:.3g})"
            )
            if step > s.max_steps:
                d.reason += f"; max_steps={s.max_steps} steps run"
                return d
            d.action, d.n = "measure", [mid]
            d.jobs = [Job(mid, seed, epochs) for seed in s.seeds]
            d.reason += f": the size between, data.n={mid}"
            rate = _rate(observations, spent_s, item_epochs)
            return _within_budget(d, rate * mid * epochs * len(s.seeds), spent_s, s)
    elif s.min_roi_per_label is not None:
        d.roi_threshold = roi_threshold(points, s)
        mean_roi, d.roi_upper, k = marginal_roi_bound(points, s.level)
    (n1, _), (n2, _) = list(points.items())[-2:]
    if (
        goal is None
        and s.min_roi_per_label is not None
        and d.roi_upper < d.roi_threshold
        and has_risen(points, d.roi_threshold)
    ):
        d.reason = (
            f"ROI per label from data.n={n1} to {n2} is {mean_roi:.3g}, below "
            f"{d.roi_threshold:.3g} with {s.level:.0%} confidence (upper bound {d.roi_upper:.3g}, "
            f"{k} seeds)"
        )
        return d
    if s.compute_budget_s is not None and spent_s >= s.compute_budget_s:
        d.reason = f"compute budget spent ({spent_s:.0f} s of {s.compute_budget_s:.0f} s)"
        return d
    if step > s.max_steps:
        d.reason = f"max_steps={s.max_steps} steps run"
        return d
    n_top = max(points)
    rate = _rate(observations, spent_s, item_epochs)

    more_epochs = _epoch_gain(observations, n_top, epochs)
    if (
        s.min_epoch_gain is not None
        and epochs < s.max_epochs
        and math.isfinite(more_epochs)
        and more_epochs > s.min_epoch_gain
    ):
        new_epochs = min(epochs + s.epoch_step, s.max_epochs)
        d.action, d.epochs, d.n = "more_epochs", new_epochs, list(points)
        d.jobs = [Job(n, seed, new_epochs) for n in points for seed in s.seeds]
        d.reason = (
            f"epoch {epochs} at data.n={n_top} still added {more_epochs:.3g} gain "
            f"(> min_epoch_gain {s.min_epoch_gain}); every n to {new_epochs} epochs"
        )
        added = sum(n * (new_epochs - epochs) for n in points) * len(s.seeds)
        # what the added epochs may buy at n_top: the last epoch's gain again for each, with
        # the seed-to-seed spread of a mean (an upper estimate: epochs' gains shrink)
        z = float(stats.norm.ppf(0.5 + s.level / 2))
        half = z * _seed_sd(points) / math.sqrt(len(s.seeds))  # the level's half-width
        expected = means[n_top] + more_epochs * (new_epochs - epochs)
        d = _within_budget(d, rate * added, spent_s, s)
        span = (expected, expected - half, expected + half)
        return _worth_it(d, span, max(means.values()), goal, 0, s)

    if s.n_max is not None and n_top >= s.n_max:
        d.reason = (
            f"every labelled item available is used (data.n={n_top}, n_max={s.n_max}); the "
            "advice predicts what labels beyond the data would buy"
        )
        return d
    cands = candidates(n_top, s)
    if not cands:
        d.reason = f"no data.n above {n_top} allowed (n_max={s.n_max})"
        return d
    curve = _fit(points, s, fit, observations, level)
    if curve is None or not getattr(curve, "extrapolation_ok", False):
        why = getattr(curve, "reason", "the fit failed") if curve is not None else "fit failed"
        n_next, d.reason = cands[-1], f"fit not trusted to extrapolate ({why}); the largest step"
    else:
        d.family = curve.family
        mean, lo, hi = (np.asarray(a, float) for a in curve.predict(np.asarray(cands, float)))
        knee = fitted_knee(curve, n_top, cands[-1], d.roi_threshold, level)
        if goal is not None:
            hit = [c for c, m in zip(cands, mean, strict=True) if m >= goal]
            what = f"predicted to reach the target gain {goal:.4g}"
        elif s.min_roi_per_label is None:  # where gain / n is predicted to stop paying
            hit = [c for c, m in zip(cands, mean, strict=True) if m / c < d.roi_threshold]
            what = f"the smallest n where gain / n is predicted below {d.roi_threshold:.3g}"
        elif not has_risen(points, d.roi_threshold):  # still flat: look further out
            hit = [cands[-1]]
            what = f"ROI per label has not yet risen to {d.roi_threshold:.3g}: the farthest step"
        elif knee is not None and knee > 1.25 * n_top:  # measure near the predicted knee
            below = [c for c in cands if c <= knee]
            hit = [below[-1] if below else cands[0]]
            what = f"the candidate nearest below the predicted knee (data.n~{nice(knee)})"
        else:  # past the knee: the smallest step where the stopping test is expected to
            # pass: predicted ROI from n_top plus the paired test's expected half-width
            c = np.asarray(cands, float)
            k = len(s.seeds)
            sd = _seed_sd(points)
            t = float(stats.t.ppf(s.level, k - 1)) if k >= 2 else 0.0
            expected = (mean - means[n_top]) / (c - n_top) + t * math.sqrt(2 / k) * sd / (
                c - n_top
            )
            hit = [n for n, r in zip(cands, expected, strict=True) if r < d.roi_threshold]
            what = (
                f"the smallest n where the ROI test from data.n={n_top} is expected to fall "
                f"below {d.roi_threshold:.3g}"
            )
        if hit:
            n_next, d.reason = hit[0], f"{what} at data.n={hit[0]}"
        else:
            n_next = cands[-1]
            d.reason = (
                f"no knee or target predicted up to data.n={n_next}: the farthest step allowed, "
                "where the prediction is least certain"
            )
        i = cands.index(n_next)
        d.predicted, d.predicted_lo, d.predicted_hi = float(mean[i]), float(lo[i]), float(hi[i])
    d.action, d.n = "measure", [n_next]
    d.jobs = [Job(n_next, seed, epochs) for seed in s.seeds]
    d = _within_budget(d, rate * n_next * epochs * len(s.seeds), spent_s, s)
    span = (d.predicted, d.predicted_lo, d.predicted_hi)
    if goal is not None and curve is not None and getattr(curve, "extrapolation_ok", False):
        # a step on the way to the target is worth the chance of reaching it at all: the
        # prediction at the farthest size the search may go (n_max, else growth^steps left)
        far = s.n_max or n_top * s.growth ** (s.max_steps - step + 1)
        span = tuple(float(np.asarray(a)[0]) for a in curve.predict([float(far)]))
    return _worth_it(d, span, max(means.values()), goal, n_next - n_top, s)


def step_value(
    prices: Prices, goal: float | None, span: tuple[float, float, float], best: float, level: float
) -> float:
    """The expected value, in money, of what a step measures when its gain G is predicted as
    span = (center, lo, hi), the `level` interval read as the plan's split normal
    (calibration.split_normal_cdf), and `best` is the best mean gain measured so far (NaN: the
    prices value no gain). With `value_per_gain` V: V x E[max(G - best, 0)] (afterwards the better
    of the two is kept). With a target and `miss_penalty` P: P x P(G >= target) (stopping now
    misses it)."""
    center, lo, hi = span
    if not math.isfinite(center):
        return math.nan
    if goal is not None:
        if prices.miss_penalty is None:
            return math.nan
        return prices.miss_penalty * float(1.0 - split_normal_cdf(goal, center, lo, hi, level))
    if prices.value_per_gain is None:
        return math.nan
    return prices.value_per_gain * float(split_normal_excess(best, center, lo, hi, level))


def step_cost(prices: Prices, new_labels: int, estimated_s: float) -> float:
    """The price of a step: the labels it adds (subsets are nested: only n_next - n_top are
    bought) and its estimated seconds of compute on the measured device."""
    compute = prices.compute_cost(estimated_s) if prices.compute_cost_per_hour else 0.0
    return (prices.label_cost or 0.0) * new_labels + compute


def _worth_it(
    d: Decision,
    span: tuple[float, float, float],
    best: float,
    goal: float | None,
    new_labels: int,
    s: SearchSettings,
) -> Decision:
    """With prices, stop when the step's expected value of information is below its cost."""
    prices = s.prices
    if d.action == "stop" or not prices.priced:
        return d
    d.value = step_value(prices, goal, span, best, s.level)
    d.cost = step_cost(prices, new_labels, d.estimated_s)
    if math.isfinite(d.value) and math.isfinite(d.cost) and d.value < d.cost:
        d.reason = (
            f"the next step ({d.action} data.n={' '.join(map(str, d.n))} "
            f"trainer.max_epochs={d.epochs}) "
            f"is worth {prices.money(d.value)} in expectation and costs "
            f"{prices.money(d.cost)} ({new_labels} labels, ~{d.estimated_s:.0f} s); "
            f"was: {d.reason}"
        )
        d.action, d.jobs = "stop", []
    return d


def _seed_sd(points: Mapping[int, Mapping[int, float]]) -> float:
    """The pooled seed-to-seed standard deviation of the gain over the measured sizes."""
    sq = [np.var(list(g.values()), ddof=1) for g in points.values() if len(g) >= 2]
    return math.sqrt(float(np.mean(sq))) if sq else 0.0


def fitted_knee(curve, lo_n: float, hi_n: float, threshold: float, level: float) -> float | None:
    """The smallest n in [lo_n, hi_n] where the fitted curve's marginal ROI per label
    (d gain / d n, by a 5% finite difference) is below `threshold`; None if nowhere."""
    if curve is None or hi_n <= lo_n:
        return None
    n = np.geomspace(lo_n, hi_n, 64)
    m0 = np.asarray(curve.predict(n, level)[0], float)
    m1 = np.asarray(curve.predict(n * 1.05, level)[0], float)
    below = np.flatnonzero((m1 - m0) / (0.05 * n) < threshold)
    return float(n[below[0]]) if below.size else None


def _epoch_gain(observations: Sequence[Observation], n: int, epochs: int) -> float:
    """Mean over seeds of what the last epoch added at data.n=n (NaN with one epoch)."""
    if epochs < 2:
        return math.nan
    diffs = [
        o.gain[epochs] - o.gain[epochs - 1]
        for o in observations
        if o.n == n and o.epochs == epochs and epochs in o.gain and epochs - 1 in o.gain
    ]
    return float(np.mean(diffs)) if diffs else math.nan


def _within_budget(d: Decision, estimate: float, spent: float, s: SearchSettings) -> Decision:
    d.estimated_s = estimate
    if s.compute_budget_s is not None and spent + estimate > s.compute_budget_s:
        d.reason = (
            f"compute budget: the next step ({d.action} data.n={' '.join(map(str, d.n))}) "
            f"would need ~{estimate:.0f} s, {s.compute_budget_s - spent:.0f} s are left"
        )
        d.action, d.jobs = "stop", []
    return d


# --- the advice and the whole search -----------------------------------------------------------

DEFAULT_METRIC = "val/ndcg_at_20"  # the metric of stub observations (budget.metric's default)


def points_frame(observations: Sequence[Observation], settings: SearchSettings) -> pd.DataFrame:
    """The observations as the budget points mode=advise reads from MLflow (table.budget_points
    of one row per run and trained epoch): the same runs give the engine the same frame."""
    metric = settings.metric or DEFAULT_METRIC
    name = metric_name(metric)
    rows = []
    for o in observations:
        for e, g in sorted(o.gain.items()):
            seconds = o.seconds.get(e, math.nan)
            rows.append(
                {
                    **dict(zip(GROUP, o.key, strict=True)),
                    "run_id": o.run_id,
                    "n": o.n,
                    "seed": o.seed,
                    "epochs": o.epochs,
                    "epoch": e,
                    "seconds": seconds,
                    "samples_seen": o.items_seen.get(e, math.nan),
                    metric: o.value.get(e, math.nan),
                    f"gain/{name}": g,
                    f"roi_s/{name}": g / seconds if seconds > 0 else math.nan,
                }
            )
    frame = pd.DataFrame(rows)
    return budget_points(frame) if len(frame) else frame


@quiet_numerics
def advise(observations: Sequence[Observation], settings: SearchSettings) -> engine.Advice | None:
    """The recommendation on the search's runs: study.advice.advise, the one advice engine (the
    report's decision card and mode=advise use it), asked with the search's settings."""
    frame = points_frame([o for o in observations if o.epochs >= 1], settings)
    if frame.empty:
        return None
    base = [o.baseline for o in observations if math.isfinite(o.baseline)]
    baseline = float(np.mean(base)) if base else math.nan
    metric = settings.metric or DEFAULT_METRIC
    key = tuple(frame[GROUP].iloc[0])  # one search: one task, model and data set
    return engine.advise(frame, key, metric, baseline, settings.engine())


def grid_advice(
    observations: Sequence[Observation], epochs: int, settings: SearchSettings
) -> tuple[int | None, str]:
    """What a full grid at `epochs` epochs advises: the same engine on its runs. (data.n, why);
    0 for "keep the pretrained model"."""
    advice = advise([o for o in observations if o.epochs == epochs], settings)
    if advice is None:
        return None, "no finished runs"
    return advised(advice)[0], advice.why


def replay(observations: Sequence[Observation]) -> Callable[[list[Job]], Batch]:
    """A `measure` that looks jobs up in finished runs (a full grid's) instead of training: the
    search's decisions and cost (the runs' own seconds) on the same measurements as the grid.
    A job the runs do not hold fails the step."""
    found = {(o.n, o.seed, o.epochs): o for o in observations}

    def measure(jobs: list[Job]) -> Batch:
        hits = [found[(j.n, j.seed, j.epochs)] for j in jobs if (j.n, j.seed, j.epochs) in found]
        cost = sum(o.cost_s for o in hits if math.isfinite(o.cost_s))
        lost = [
            f"{' '.join(j.overrides())}: not in the runs"
            for j in jobs
            if (j.n, j.seed, j.epochs) not in found
        ]
        return Batch(hits, cost, lost)

    return measure


def interval_misses(
    observations: Sequence[Observation], decision: Decision, rule: str
) -> list[int]:
    """err of the size `decision` predicted, once its round measured it: [1] where the mean gain
    over seeds fell outside the predicted interval, [0] inside, [] where nothing was predicted
    (the pilot, more epochs, a size between measured ones) or there was no interval (a fit not
    trusted to extrapolate, a reach beyond the calibration)."""
    lo, hi = decision.predicted_lo, decision.predicted_hi
    if decision.action != "measure" or math.isnan(lo) or math.isnan(hi):
        return []
    (n,) = decision.n  # a measure step adds one size
    seeds = curve_points(observations, decision.epochs, rule).get(n)
    if not seeds:
        return []
    return [int(not lo <= float(np.mean(list(seeds.values()))) <= hi)]


def run_search(
    measure: Callable[[list[Job]], Batch],
    settings: SearchSettings,
    fit: FitFn | None = None,
) -> SearchResult:
    """Pilot, then `decide` until it stops. `measure` runs jobs (training, or a stub). After
    each round the intervals' level adapts to the predictions it checked (module docstring, 7)."""
    fit = fit or default_fit()
    s = settings
    epochs = s.epochs
    jobs = [Job(n, seed, epochs) for n in sorted(set(s.pilot_n)) for seed in s.seeds]
    pilot = Decision(0, "pilot", "pilot", sorted(set(s.pilot_n)), epochs, jobs, level=s.level)
    decisions, observations = [pilot], {}
    spent, item_epochs, n_jobs = 0.0, 0, 0
    step = 1
    level, alpha_t, checked = s.level, 1 - s.level, []
    while True:
        batch = measure(jobs)
        spent += batch.cost_s
        n_jobs += len(jobs)
        item_epochs += sum(j.n * j.epochs for j in jobs)
        for obs in batch.observations:
            observations[(obs.n, obs.seed, obs.epochs)] = obs
        obs_list = list(observations.values())
        errs = interval_misses(obs_list, decisions[-1], s.epoch_rule)
        checked += errs
        if errs and s.adaptive_gamma > 0:  # 0: `level` exactly, as without the update
            alpha_t = adaptive_alpha(alpha_t, 1 - s.level, s.adaptive_gamma, errs)
            level = 1 - alpha_t
        if batch.failures:
            d = Decision(step, "stop", f"{len(batch.failures)} job(s) failed: {batch.failures[0]}")
            d.epochs, d.spent_s, d.level = epochs, spent, level
        else:
            d = decide(obs_list, epochs, step, spent, item_epochs, s, fit, level)
        d.covered = f"{checked.count(0)}/{len(checked)}" if checked else ""
        decisions.append(d)
        log.info("budget search step %d: %s (%s)", step, d.action, d.reason)
        if d.action == "stop":
            break
        jobs, epochs, step = d.jobs, d.epochs, step + 1
    grid = sum(s.compare_grid) * len(s.seeds) * epochs
    labels = max((o.n for o in obs_list), default=0)
    return SearchResult(
        decisions,
        obs_list,
        d.reason,
        advise(obs_list, s),
        spent,
        n_jobs,
        item_epochs,
        grid,
        _rate(obs_list, spent, item_epochs) * grid,
        labels,
        s.prices,
        at_edge=s.n_max is not None and labels >= s.n_max,
        level=level,
        covered=checked.count(0),
        predictions=len(checked),
    )


# --- recorded on the sweep's parent run ------------------------------------------------------


def decisions_table(result: SearchResult) -> str:
    """The decisions as a Markdown table."""
    cols = ["step", "action", "n", "epochs", "jobs", "predicted", "predicted_lo", "predicted_hi"]
    cols += ["level", "covered"]
    cols += ["roi_upper", "roi_threshold", "spent_s", "estimated_s", "value", "cost", "reason"]
    rows = [d.row() for d in result.decisions]

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
