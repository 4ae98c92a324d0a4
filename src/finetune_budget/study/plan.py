"""The priced plan: how many labels to buy (in how many rounds), how many epochs, which base model,
what it costs and the chance it falls short of the target.

    python evaluate.py mode=advise tracking.experiment=<name> \
        advise.label_cost=0.40 advise.compute_cost_per_hour=2.5 advise.target_gain=0.05 \
        advise.miss_penalty=5000

The distribution of the labels needed. The calibrated learning curve (study/calibration.py)
gives, at each n, the gain of one model trained there as a center with a `level` interval:
the curve's own seed bootstrap within the measured labels, the calibration table's conformal
interval at each reach beyond them. That predictive distribution is read as a split normal
(median at the center, each side's spread from its end of the interval: (center - lo) / z and
(hi - center) / z, z the normal quantile of the level). The runs of one person are one draw of
the curve, so a draw is taken comonotone across n (one quantile u at every n); the labels needed
to reach the target then satisfy

    P(n_needed > n) = P(gain(n) < target) = F_n(target)

(made non-increasing in n by a running minimum; beyond the calibrated reach, where nothing is
promised, the target counts as missed).

The choice (Mahmood et al., NeurIPS 2022, "learn-optimize-collect"). With a target and a
`miss_penalty`, buy cumulative sizes q_1 <= ... <= q_R over R rounds, each after the runs of
the one before say the target is not reached yet, minimising

    E[cost] = sum_t S(q_{t-1}) [label_cost (q_t - q_{t-1}) + compute(q_t)] + penalty S(q_R)

with S(n) = P(n_needed > n), S(q_0) = 1 and compute(q) the price of training q labels for the
epochs the surface says are worth it (no new training where a round buys nothing). With one round
that is the n minimising label_cost n + compute(n) + penalty P(n_needed > n): a high quantile of
n_needed. Solved exactly on a grid of n by dynamic programming; with several rounds the plan's
first purchase is what to buy now, the later ones are where it expects to go (buy, measure,
rerun mode=advise: `next_purchase` is that policy, which bench/collection_policies.py runs).
A target without a penalty: the fewest labels whose P(reach) is at least `level`. With
`value_per_gain` and no target: the n maximising value_per_gain E[gain(n)] - cost(n).

Pure: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from finetune_budget.study.advice import (
    Advice,
    AdviceSettings,
    fmt_int,
    fmt_pct,
    fmt_secs,
    no_gain_shown,
)
from finetune_budget.study.calibration import (
    CalibratedCurve,
    split_normal_cdf,
    split_normal_mean,
)
from finetune_budget.study.curves import CurveFit
from finetune_budget.study.prices import Prices
from finetune_budget.study.roi import metric_name

GRID_POINTS = 240  # sizes of n the plan considers, geometric from the smallest measured
REACH_LIMIT = 16.0  # without a calibration table: how far beyond the measured n a plan may go


# -- the distribution of the labels needed --------------------------------------------------------
def gain_distribution(fit: CurveFit | CalibratedCurve, ns: np.ndarray, level: float):
    """(center, lo, hi) of the gain of one model trained on each of `ns` labels: the calibrated
    prediction (NaN center: beyond what the fit may answer)."""
    center, lo, hi = fit.predict(np.asarray(ns, dtype=float), level=level, seeds=1)
    return (np.asarray(v, dtype=float) for v in (center, lo, hi))


def miss_probability(center, lo, hi, target: float, level: float) -> np.ndarray:
    """S(n) = P(n_needed > n) on a grid of increasing n: P(gain(n) < target), non-increasing."""
    s = split_normal_cdf(target, center, lo, hi, level)
    return np.minimum.accumulate(s)


def needed_quantile(ns: np.ndarray, survival: np.ndarray, q: float) -> float:
    """The q-quantile of n_needed: the smallest n with P(n_needed <= n) >= q (inf: not on the
    grid)."""
    hit = np.flatnonzero(1.0 - survival >= q - 1e-12)
    return float(ns[hit[0]]) if len(hit) else math.inf


# -- the choice -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Collection:
    """Cumulative sizes to buy per round, with the expected cost of the policy and its parts."""

    sizes: tuple[float, ...]
    expected_cost: float  # labels + compute, each round weighted by the chance it is needed
    expected_penalty: float
    p_miss: float  # P(n_needed > the last size)

    @property
    def objective(self) -> float:
        return self.expected_cost + self.expected_penalty


def collect(
    ns: Sequence[float],
    survival: Sequence[float],
    label_cost: float,
    compute: Sequence[float] | None = None,
    penalty: float = 0.0,
    rounds: int = 1,
    have: float = 0.0,
) -> Collection:
    """The learn-optimize-collect choice on a grid: cumulative sizes q_1 <= ... <= q_rounds (each
    from `ns`, at least `have`, the labels already bought) minimising
    sum_t S(q_{t-1}) [label_cost (q_t - q_{t-1}) + compute(q_t)] + penalty S(q_R), S(q_0) = 1.

    ns: (G,) increasing sizes; survival: (G,) P(n_needed > n) there, given that `have` labels
    did not reach the target; compute: (G,) price of training on each size (0 without)."""
    ns = np.asarray(ns, dtype=float)
    surv = np.asarray(survival, dtype=float)
    comp = np.zeros_like(ns) if compute is None else np.asarray(compute, dtype=float)
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    ok = ns >= have
    ns, surv, comp = ns[ok], surv[ok], comp[ok]
    g = len(ns)
    if g == 0:
        raise ValueError(f"no size on the grid at or above the {have:g} labels already bought")
    # J[j]: expected cost from the round after the one that bought ns[j] on, in absolute terms
    j_next = penalty * surv  # after the last round
    choice = []
    for _ in range(rounds - 1):
        # from q_prev = ns[i]: buy ns[j] >= ns[i] (j == i: nothing more, no training)
        step = label_cost * (ns[None, :] - ns[:, None]) + comp[None, :]
        step = np.where(np.eye(g, dtype=bool), 0.0, step)
        total = surv[:, None] * step + j_next[None, :]
        total = np.where(np.triu(np.ones((g, g), dtype=bool)), total, np.inf)
        best = np.argmin(total, axis=1)
        choice.append(best)
        j_next = total[np.arange(g), best]
    first = label_cost * (ns - have) + comp + j_next
    idx = [int(np.argmin(first))]
    for best in reversed(choice):
        idx.append(int(best[idx[-1]]))
    sizes = tuple(float(ns[i]) for i in idx)
    # the parts: each round's purchase weighted by the chance the target was still missed
    cost, prev_s, prev = 0.0, 1.0, have
    for k, i in enumerate(idx):
        if k == 0 or ns[i] > prev:
            cost += prev_s * (label_cost * (ns[i] - prev) + comp[i])
        prev_s, prev = float(surv[i]), float(ns[i])
    return Collection(sizes, cost, penalty * float(surv[idx[-1]]), float(surv[idx[-1]]))


# -- one plan -------------------------------------------------------------------------------------
@dataclass
class Verdict:
    """What one metric says at the plan's n: `stop` or `still pays`, and what it would advise."""

    metric: str
    says: str
    more: float
    lo: float
    hi: float
    advises: int | None
    text: str


@dataclass
class Plan:
    """The priced plan for one (task, model, data) and metric: what to buy and what it brings."""

    key: tuple
    metric: str
    prices: Prices
    rounds: int
    sizes: tuple[int, ...] = ()  # cumulative labels per round (one round: the labels to buy)
    epochs: int | None = None
    gain: float = math.nan  # expected gain at the last size, with its interval
    gain_lo: float = math.nan
    gain_hi: float = math.nan
    p_reach: float = math.nan  # P(gain at the last size >= target)
    target: float | None = None  # the target as a relative gain
    target_text: str = ""
    label_spend: float = math.nan  # expected, over the rounds that are needed
    compute_spend: float = math.nan
    expected_cost: float = math.nan
    expected_penalty: float = math.nan
    net_value: float = math.nan  # value_per_gain E[gain] - cost (without a target)
    needed: tuple[float, float, float] = (math.nan, math.nan, math.nan)  # median, 5%, 95%
    seconds: float = math.nan  # training at the last size for `epochs` epochs, here
    seconds_per_epoch: float = math.nan
    seconds_per_label_epoch: float = math.nan  # measured here: the models' common axis
    rule: str = ""
    why: str = ""  # why there is no plan (sizes empty)
    curve: pd.DataFrame | None = None  # n, epochs, cost, gain, lo, hi: the figure's line
    verdicts: list[Verdict] = field(default_factory=list)
    chosen: bool | None = None  # among several base models: the one to buy (None: no choice)
    comparison: str = ""

    @property
    def n(self) -> int | None:
        return self.sizes[-1] if self.sizes else None

    @property
    def objective(self) -> float:
        """What the plan minimises (cost + expected penalty), or -net value."""
        if math.isfinite(self.net_value):
            return -self.net_value
        return self.expected_cost + (
            self.expected_penalty if math.isfinite(self.expected_penalty) else 0.0
        )

    @property
    def model(self) -> str:
        return str(self.key[1])

    def lines(self) -> list[str]:
        """The plan in a few lines (what mode=advise prints first, and the card leads with)."""
        m = self.prices.money
        head = f"{' · '.join(map(str, self.key))} · {metric_name(self.metric)}"
        if not self.sizes:
            return [f"plan: {head}: {self.why}"]
        n = self.sizes[-1]
        if len(self.sizes) > 1 and len(set(self.sizes)) > 1:
            steps = " → ".join(f"{s:,}" for s in self.sizes)
            buy = (
                f"label {self.sizes[0]:,} now (round 1 of {self.rounds}), train, rerun "
                f"mode=advise; planned {steps} labels while the target is missed"
            )
        else:
            buy = f"label {n:,} items"
        first = (
            f"plan: {head}: {buy}, train {self.epochs} epochs (trainer.max_epochs={self.epochs}): "
            f"expected gain {fmt_pct(self.gain)} "
            f"[{fmt_pct(self.gain_lo)}, {fmt_pct(self.gain_hi)}]{no_gain_shown(self.gain_lo)} "
            f"at data.n={n:,}"
        )
        out = [first]
        cost = (
            f"  cost {m(self.expected_cost)} expected (labels {m(self.label_spend)} + compute "
            f"{m(self.compute_spend)}, {fmt_secs(self.seconds)} of training here)"
        )
        if self.target is not None:
            cost += f"; P(reach {self.target_text}) = {100 * self.p_reach:.0f}%"
            med, lo, hi = self.needed
            cost += f"; labels needed: {fmt_int(med)} [{fmt_int(lo)}, {fmt_int(hi)}]"
        elif math.isfinite(self.net_value):
            cost += f"; net value {m(self.net_value)}"
        out.append(cost + f" ({self.rule})")
        if self.comparison:
            out.append(f"  {self.comparison}")
        said = {v.says for v in self.verdicts}
        if len(said) > 1:
            out.append(
                "  the metrics disagree at data.n="
                f"{n:,}: " + "; ".join(v.text for v in self.verdicts)
            )
        elif self.verdicts:
            out.append(
                f"  every metric says {self.verdicts[0].says} at data.n={n:,} ("
                + ", ".join(metric_name(v.metric) for v in self.verdicts)
                + ")"
            )
        return out


def seconds_per_label_epoch(advice: Advice) -> float:
    """Training seconds per label and epoch measured here (median over the measured n)."""
    t = advice.epochs_table
    if t is None or t.empty or "seconds" not in t:
        return math.nan
    per = t["seconds"] / (t["n"] * t["epochs"])
    per = per[np.isfinite(per) & (per > 0)]
    return float(per.median()) if len(per) else math.nan


def epochs_at(advice: Advice, share: float) -> Callable[[float], int]:
    """Epochs worth it at n: from the surface over labels and epochs, else the nearest measured
    n's (epochs_worth_it)."""
    if advice.surface is not None:
        return lambda n: int(advice.surface.epochs_worth_it(n, share))
    t = advice.epochs_table
    if t is None or t.empty:
        return lambda n: int(advice.epochs or 1)
    ns = t["n"].to_numpy(float)
    es = np.where(np.isfinite(t["epochs"]), t["epochs"], t["best_epoch"]).astype(float)
    return lambda n: int(es[np.argmin(np.abs(np.log(ns / n)))])


def target_gain(s: AdviceSettings, metric: str, baseline: float) -> tuple[float | None, str]:
    """The person's target as a relative gain, and how to name it (None: no target)."""
    g = s.target_as_gain(metric, baseline)
    if s.target_value is not None:
        return g, f"{metric_name(metric)} = {s.target_value:g}"
    return g, "" if g is None else fmt_pct(g)


def size_grid(fit: CurveFit | CalibratedCurve, have: float = 0.0) -> np.ndarray:
    """Whole sizes from the smallest measured n (or `have`) to the furthest calibrated reach."""
    reach = fit.reach_max if isinstance(fit, CalibratedCurve) else REACH_LIMIT
    lo = max(float(fit.x_min), have, 1.0)
    grid = np.unique(np.round(np.geomspace(lo, fit.x_max * reach, GRID_POINTS)))
    return grid[grid >= lo]


def plan_curve(
    fit: CurveFit | CalibratedCurve,
    target: float | None,
    prices: Prices,
    sec_per_label_epoch: float,
    epochs: Callable[[float], int],
    level: float,
    have: float = 0.0,
) -> pd.DataFrame:
    """Per size on the grid: epochs, training seconds, cost (labels + compute), the gain's
    center, interval and mean, and P(n_needed > n) given `have` labels missed the target."""
    ns = size_grid(fit, have)
    center, lo, hi = gain_distribution(fit, ns, level)
    es = np.array([epochs(n) for n in ns], dtype=float)
    seconds = ns * es * sec_per_label_epoch
    compute = np.array([prices.compute_cost(s) if math.isfinite(s) else 0.0 for s in seconds])
    frame = pd.DataFrame(
        {
            "n": ns,
            "epochs": es,
            "seconds": seconds,
            "compute": compute,
            "cost": (prices.label_cost or 0.0) * ns + compute,
            "gain": center,
            "lo": lo,
            "hi": hi,
            "mean": split_normal_mean(center, lo, hi, level),
        }
    )
    if target is not None:
        surv = miss_probability(center, lo, hi, target, level)
        if have > 0 and surv[0] > 0:  # given that `have` (the grid's first size) missed it
            surv = np.minimum(surv / surv[0], 1.0)
        frame["miss"] = surv
    return frame


def choose(
    curve: pd.DataFrame,
    prices: Prices,
    target: float | None,
    rounds: int,
    level: float,
    have: float = 0.0,
) -> tuple[Collection | None, float, str]:
    """(the collection, net value, the rule named) on a plan_curve; None: nothing to choose."""
    ns = curve["n"].to_numpy(float)
    label_cost = prices.label_cost or 0.0
    if target is not None and prices.miss_penalty is not None:
        c = collect(
            ns,
            curve["miss"],
            label_cost,
            curve["compute"],
            prices.miss_penalty,
            rounds,
            have,
        )
        return c, math.nan, "the least expected cost + miss_penalty x P(miss)"
    if target is not None:
        miss = curve["miss"].to_numpy(float)
        ok = np.flatnonzero(1.0 - miss >= level - 1e-12)
        i = int(ok[0]) if len(ok) else len(ns) - 1
        cost = label_cost * (ns[i] - have) + float(curve["compute"].iloc[i])
        rule = f"the fewest labels with P(reach) >= {100 * level:.0f}% (no advise.miss_penalty)"
        return Collection((float(ns[i]),), cost, math.nan, float(miss[i])), math.nan, rule
    if prices.value_per_gain is not None:
        net = prices.value_per_gain * curve["mean"].to_numpy(float) - curve["cost"].to_numpy(float)
        net = np.where(np.isfinite(net), net, -np.inf)
        i = int(np.argmax(net))
        cost = float(curve["cost"].iloc[i])
        rule = "the largest expected value_per_gain x gain - cost"
        return Collection((float(ns[i]),), cost, math.nan, math.nan), float(net[i]), rule
    return None, math.nan, ""


def next_purchase(
    fit: CurveFit | CalibratedCurve,
    target: float,
    prices: Prices,
    rounds_left: int,
    have: float,
    sec_per_label_epoch: float = 0.0,
    epochs: Callable[[float], int] = lambda n: 1,
    level: float = 0.9,
) -> Collection:
    """The collection policy's plan from here: the total labels to hold after each round left
    (`sizes[0]`: after this one) and the chance it misses the target, from the curve fitted to
    everything measured so far (`have` labels missed the target)."""
    curve = plan_curve(fit, target, prices, sec_per_label_epoch, epochs, level, have)
    c, _, _ = choose(curve, prices, target, rounds_left, level, have)
    return c


def make_plan(advice: Advice, s: AdviceSettings, baseline: float | None = None) -> Plan:
    """The plan for one Advice (its calibrated data curve, surface and measured seconds) at the
    settings' prices; no prices: no plan (the advice in labels and seconds stands)."""
    plan = Plan(advice.key, advice.metric, s.prices, max(int(s.rounds), 1))
    prices = plan.prices
    if not prices.priced:
        plan.why = "not priced (advise.label_cost=null): the advice in labels and seconds stands"
        return plan
    base = advice.baseline if baseline is None else baseline
    target, plan.target_text = target_gain(s, advice.metric, base)
    plan.target = target
    if target is None and prices.value_per_gain is None:
        plan.why = (
            "priced, but nothing to weigh the cost against: give a target (advise.target_gain "
            "and advise.miss_penalty) or advise.value_per_gain"
        )
        return plan
    fit = advice.data_fit
    if fit is None or not fit.extrapolation_ok:
        plan.why = "no learning curve to plan on: " + (
            "too few data.n measured" if fit is None else fit.reason
        )
        return plan
    per = seconds_per_label_epoch(advice)
    prices.check(target is not None, throughput=1.0 / per if per > 0 else math.nan)
    per = per if math.isfinite(per) else 0.0
    plan.seconds_per_label_epoch = per
    curve = plan_curve(fit, target, prices, per, epochs_at(advice, s.share), s.level)
    c, net, plan.rule = choose(curve, prices, target, plan.rounds, s.level)
    plan.curve = curve
    row = curve.set_index("n").loc[c.sizes[-1]]
    plan.sizes = tuple(int(v) for v in c.sizes)
    plan.epochs = int(row["epochs"])
    plan.gain, plan.gain_lo, plan.gain_hi = (float(row[k]) for k in ("gain", "lo", "hi"))
    plan.seconds = float(row["seconds"])
    plan.seconds_per_epoch = plan.seconds / plan.epochs if plan.epochs else math.nan
    plan.expected_cost, plan.expected_penalty, plan.net_value = (
        c.expected_cost,
        c.expected_penalty,
        net,
    )
    plan.label_spend, plan.compute_spend = _spend(curve, c, prices)
    if target is not None:
        surv = curve["miss"].to_numpy(float)
        ns = curve["n"].to_numpy(float)
        plan.p_reach = 1.0 - c.p_miss
        plan.needed = tuple(needed_quantile(ns, surv, q) for q in (0.5, 0.05, 0.95))
    return plan


def _spend(curve: pd.DataFrame, c: Collection, prices: Prices) -> tuple[float, float]:
    """Expected labels and compute spend of a collection (rounds weighted as in `collect`)."""
    at = curve.set_index("n")
    labels = compute = 0.0
    prev, prev_s = 0.0, 1.0
    for k, q in enumerate(c.sizes):
        if k == 0 or q > prev:
            labels += prev_s * (prices.label_cost or 0.0) * (q - prev)
            compute += prev_s * float(at.loc[q, "compute"])
        prev = q
        prev_s = float(at.loc[q, "miss"]) if "miss" in at else 0.0
    return labels, compute


# -- several models, several metrics --------------------------------------------------------------
def verdicts(n: int, by_metric: Mapping[str, Advice], s: AdviceSettings) -> list[Verdict]:
    """Per metric, the plan it alone would make at the same prices and target: `still pays`
    where it would buy more labels than n, else `stop`; with what one more doubling of n buys in
    it."""
    out = []
    for metric, a in by_metric.items():
        own = make_plan(a, s)
        fit, name = a.data_fit, metric_name(metric)
        d, lo, hi = (math.nan,) * 3 if fit is None else fit.difference(n, 2 * n)
        says = "still pays" if own.n is not None and own.n > n else "stop"
        alone = f"alone it plans data.n={own.n:,}" if own.n is not None else own.why
        more = f"doubling to {2 * n:,}: {fmt_pct(d)} [{fmt_pct(lo)}, {fmt_pct(hi)}]"
        out.append(
            Verdict(metric, says, d, lo, hi, own.n, f"{name} says {says} ({alone}; {more})")
        )
    return out


def compare(plans: Sequence[Plan]) -> None:
    """Among plans of several base models for one task and data set, name the one to buy (the
    least expected cost + penalty, or the largest net value), on the same axes."""
    made = [p for p in plans if p.sizes]
    if len(made) < 2:
        return
    best = min(made, key=lambda p: p.objective)
    m = best.prices.money
    parts = []
    for p in made:
        p.chosen = p is best
        to_target = f", labels to target {fmt_int(p.needed[0])}" if p.target is not None else ""
        per_k = 1000 * p.seconds_per_label_epoch  # an epoch of 1,000 labels, on this device
        worth = (
            f"net value {m(p.net_value)}"
            if math.isfinite(p.net_value)
            else f"expected cost + penalty {m(p.objective)}"
        )
        parts.append(
            f"{p.model}: gain {fmt_pct(p.gain)}{to_target}, {fmt_secs(per_k)} and "
            f"{m(p.prices.compute_cost(per_k))} per epoch of 1,000 labels here, {worth}"
        )
    text = "base models: " + "; ".join(parts) + f": buy {best.model}"
    for p in made:
        p.comparison = text


def experiment_plans(
    advices: Mapping[tuple[tuple, str], Advice], s: AdviceSettings, metric: str
) -> list[Plan]:
    """One plan per (task, model, data) on `metric` (advices keyed by (key, metric), as the
    report holds them), the base models of each task and data set compared, each plan with what
    every metric says at its n."""
    plans = [make_plan(a, s) for (k, m), a in advices.items() if m == metric]
    for p in plans:
        if p.n is not None:  # the plan's metric first, then the others in their order
            by_metric = {metric: advices[(p.key, metric)]}
            by_metric |= {m: a for (k, m), a in advices.items() if k == p.key}
            p.verdicts = verdicts(p.n, by_metric, s) if len(by_metric) > 1 else []
    groups: dict[tuple, list[Plan]] = {}
    for p in plans:
        groups.setdefault((p.key[0], *p.key[2:]), []).append(p)
    for group in groups.values():
        compare(group)
    return plans
