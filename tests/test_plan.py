"""The priced plan (study/plan.py): the learn-optimize-collect choice against hand-computed cases,
the labels needed and the value-maximising n on a known curve, one-line errors for bad prices,
and `evaluate.py mode=advise` printing the same plan the report's card leads with (two base
models, two metrics that disagree)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from conftest import compose_config, store_uri
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from omegaconf import open_dict
from scipy import stats

from finetune_budget.app.modes import run_mode
from finetune_budget.errors import ConfigError
from finetune_budget.report.build import ReportSettings, build_report
from finetune_budget.study.advice import AdviceSettings, advise
from finetune_budget.study.calibration import split_normal_excess
from finetune_budget.study.plan import collect, make_plan, miss_probability
from finetune_budget.study.prices import Prices

A, B, C, BASE = 0.3, 2.0, 0.5, 0.5  # gain(n) = 0.3 - 2 n^-0.5; the pretrained metric 0.5
SIZES = (50, 100, 200, 500, 1000, 2000)


def gain(n, a=A):
    return a - B * np.power(n, -C)


# -- the choice, by hand ------------------------------------------------------------------------
# n_needed is 100, 200 or 400 labels with probabilities 0.5, 0.3, 0.2:
# P(n_needed > 100) = 0.5, P(> 200) = 0.2, P(> 400) = 0. One label costs 1, a miss 500.
NS, SURVIVAL = [100, 200, 400], [0.5, 0.2, 0.0]


def test_one_round_buys_the_labels_with_the_least_cost_plus_expected_penalty():
    # 100: 100 + 500 x 0.5 = 350;  200: 200 + 500 x 0.2 = 300;  400: 400 + 0 = 400
    c = collect(NS, SURVIVAL, label_cost=1.0, penalty=500.0)
    assert c.sizes == (200,) and c.objective == pytest.approx(300.0)
    assert c.p_miss == pytest.approx(0.2) and c.expected_penalty == pytest.approx(100.0)
    # a dearer miss moves the choice to a higher quantile: 200 + 2000 x 0.2 = 600 > 400
    assert collect(NS, SURVIVAL, 1.0, penalty=2000.0).sizes == (400,)
    # training priced too: 10 per 100 labels; 100: 110 + 250, 200: 220 + 100, 400: 440
    c = collect(NS, SURVIVAL, 1.0, compute=[10, 20, 40], penalty=500.0)
    assert c.sizes == (200,) and c.objective == pytest.approx(320.0)


def test_two_rounds_buy_some_then_the_rest_only_while_the_target_is_missed():
    # (q1, q2): 100,100: 350; 100,200: 100 + 0.5 x 100 + 500 x 0.2 = 250; 100,400: 100 + 0.5 x
    # 300 = 250; 200,200: 300; 200,400: 200 + 0.2 x 200 = 240; 400,400: 400
    c = collect(NS, SURVIVAL, 1.0, penalty=500.0, rounds=2)
    assert c.sizes == (200, 400) and c.objective == pytest.approx(240.0)
    assert c.p_miss == 0.0
    # with a training price of 100 per round: 200,400 costs 300 + 0.2 x 300 = 360; 200,200 costs
    # 300 + 100 = 400; 100,400: 200 + 0.5 x 400 = 400; 400,400: 500: still 200 then 400
    c = collect(NS, SURVIVAL, 1.0, compute=[100, 100, 100], penalty=500.0, rounds=2)
    assert c.sizes == (200, 400) and c.objective == pytest.approx(360.0)
    # labels already bought are not paid again: from 200 held, 400 costs 200 (vs 500 x 0.2)
    assert collect(NS, [1.0, 1.0, 0.0], 1.0, penalty=500.0, have=200).sizes == (400,)


def test_the_chance_of_missing_comes_from_the_interval_and_falls_with_more_labels():
    # a split normal with median 0.2 and 90% interval [0.1, 0.4]: P(gain < 0.2) = 0.5,
    # P(gain < 0.1) = 0.05, P(gain < 0.4) = 0.95; a larger n (higher center) misses less
    center, lo, hi = np.array([0.2, 0.2, 0.2]), np.array([0.1] * 3), np.array([0.4] * 3)
    for target, p in ((0.2, 0.5), (0.1, 0.05), (0.4, 0.95)):
        assert miss_probability(center, lo, hi, target, 0.9)[0] == pytest.approx(p, abs=1e-9)
    s = miss_probability(np.array([0.1, 0.3, 0.2]), lo, hi + 0.2, 0.2, 0.9)
    assert s[0] > s[1] and s[2] == s[1]  # never more likely to miss with more labels


@pytest.mark.parametrize("best", [0.05, 0.2, 0.3, 0.5])
def test_the_expected_excess_over_the_best_matches_integration_of_the_split_normal(best):
    # the same split normal (median 0.2, 90% interval [0.1, 0.4]): E[max(G - best, 0)] by
    # numerical integration of its density, each half a normal's half with its own spread
    z = stats.norm.ppf(0.95)
    s_lo, s_hi = 0.1 / z, 0.2 / z
    by_integration = 0.0
    for x in (
        np.linspace(0.2 - 12 * s_lo, 0.2, 200_001),
        np.linspace(0.2, 0.2 + 12 * s_hi, 200_001),
    ):
        density = stats.norm.pdf(x, 0.2, s_lo if x[0] < 0.2 else s_hi)  # the density jumps at 0.2
        by_integration += np.trapezoid(np.maximum(x - best, 0.0) * density, x)
    got = split_normal_excess(best, 0.2, 0.1, 0.4, 0.9)
    assert got == pytest.approx(by_integration, rel=1e-6, abs=1e-9)
    assert split_normal_excess(best, 0.2, np.nan, np.nan, 0.9) == max(0.2 - best, 0.0)


# -- a plan on a known curve ---------------------------------------------------------------------
def known_points(model: str = "m", a: float = A, slow: float = 1.0) -> pd.DataFrame:
    """Budget points of 3 seeds on gain(n) + N(0, 0.0005) at epoch 2 (half of it at epoch 1);
    n / 100 x `slow` seconds per epoch."""
    rng = np.random.default_rng(0)
    rows = []
    for n in SIZES:
        for seed in (0, 1, 2):
            g = gain(n, a) + rng.normal(0, 0.0005)
            for epoch, ge in ((1, 0.5 * g), (2, g)):
                rows.append(
                    {
                        "task": "t",
                        "model": model,
                        "data": "d",
                        "n": n,
                        "seed": seed,
                        "epoch": epoch,
                        "epochs": 2,
                        "seconds": n / 100 * epoch * slow,
                        "samples_seen": n * epoch,
                        "val/mrr_at_20": BASE * (1 + ge),
                        "gain/mrr_at_20": ge,
                        "roi_s/mrr_at_20": ge / (n / 100 * epoch * slow),
                    }
                )
    return pd.DataFrame(rows)


def _advice(**prices):
    s = AdviceSettings(calibration="none", data_epoch="best", bootstrap=100, **prices)
    return advise(known_points(), ("t", "m", "d"), "val/mrr_at_20", BASE, s), s


def test_a_target_beyond_the_measured_labels_is_bought_at_a_high_quantile_of_the_labels_needed():
    a, s = _advice(target_gain=0.27, label_cost=1.0, miss_penalty=50_000.0)
    plan = make_plan(a, s)
    need = (B / (A - 0.27)) ** (1 / C)  # 0.27 = 0.3 - 2 n^-0.5: 4,444 labels
    median, lo, hi = plan.needed
    assert median == pytest.approx(need, rel=0.15) and lo <= median <= hi
    assert plan.n >= median and plan.p_reach >= 0.5  # more than the point estimate
    assert plan.expected_cost == pytest.approx(plan.n * 1.0)  # labels only (no compute price)
    assert plan.epochs == 2 and plan.gain >= 0.27 - 0.01
    # without a penalty: the fewest labels that reach it with P >= level
    s.miss_penalty = None
    lean = make_plan(a, s)
    assert lean.p_reach >= 0.9 and lean.needed == plan.needed
    text = "\n".join(plan.lines())
    assert f"label {plan.n:,} items" in text and "P(reach +27.00%)" in text


def test_a_value_per_gain_buys_where_one_more_label_is_worth_its_price():
    # d/dn [V gain(n)] = V B C n^(-C-1) = label cost  =>  n = (V B C / cost)^(1 / (C + 1))
    value, cost = 10_000.0, 1.0
    a, s = _advice(value_per_gain=value, label_cost=cost)
    plan = make_plan(a, s)
    best = (value * B * C / cost) ** (1 / (C + 1))  # 464 labels, inside the measured range
    assert plan.n == pytest.approx(best, rel=0.15)
    assert plan.net_value == pytest.approx(value * gain(best) - cost * best, rel=0.05)


def test_without_prices_the_advice_stands_and_bad_prices_are_one_line_errors():
    a, s = _advice()
    assert make_plan(a, s).lines() == [
        "plan: t · m · d · mrr_at_20: not priced (advise.label_cost=null): the advice in labels "
        "and seconds stands"
    ]
    with pytest.raises(ConfigError, match=r"advise.label_cost=-1 is not a price") as e:
        AdviceSettings(label_cost=-1).prices  # noqa: B018
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="needs a target to miss"):
        AdviceSettings(label_cost=1, miss_penalty=10).prices  # noqa: B018
    # a compute price where the runs measured no training seconds
    a, s = _advice(target_gain=0.27, label_cost=1.0, compute_cost_per_hour=2.0)
    a.epochs_table["seconds"] = math.nan
    with pytest.raises(ConfigError, match="measured throughput") as e:
        make_plan(a, s)
    assert "\n" not in str(e.value)
    assert Prices(compute_cost_per_hour=3.6).compute_cost(1000) == pytest.approx(1.0)


# -- mode=advise and the report's card ------------------------------------------------------------
def _log_runs(uri: str, name: str) -> None:
    """Two base models on one task and data set, 2 seeds: `small` on gain(n), `big` on a higher
    curve (0.35 - 2 n^-0.5) and three times slower; recall_at_20 of both on gain(n) (for big it
    needs more labels than mrr_at_20 to reach the same gain: it still pays where mrr stops)."""
    client = MlflowClient(uri)
    exp_id = client.create_experiment(name)
    rng = np.random.default_rng(1)
    for model, a, slow in (("small", A, 1.0), ("big", 0.35, 3.0)):
        for n in SIZES:
            for seed in (0, 1):
                g = gain(n, a) + rng.normal(0, 0.0005)
                r = gain(n) + rng.normal(0, 0.0005)
                run = client.create_run(
                    exp_id, tags={"run_type": "train", "task": "t", "model": model, "data": "d"}
                )
                rid = run.info.run_id
                params = {"data.n": n, "seed": seed, "trainer.max_epochs": 2, "model.name": model}
                for key, value in params.items():  # model.name: two configs, not one repeated
                    client.log_param(rid, key, str(value))
                metrics = [
                    Metric("val/mrr_at_20", BASE, 0, 0),
                    Metric("val/recall_at_20", BASE, 0, 0),
                    Metric("time/train_s", 0.0, 0, 0),
                ]
                for epoch, share in ((1, 0.5), (2, 1.0)):
                    metrics += [
                        Metric("val/mrr_at_20", BASE * (1 + share * g), 0, epoch),
                        Metric("val/recall_at_20", BASE * (1 + share * r), 0, epoch),
                        Metric("time/train_s", n / 100 * epoch * slow, 0, epoch),
                        Metric("data/samples_seen", n * epoch, 0, epoch),
                    ]
                client.log_batch(rid, metrics=metrics)
                client.set_terminated(rid)


PRICED = [
    "advise.target_gain=0.27",
    "advise.label_cost=1.0",
    "advise.compute_cost_per_hour=36",
    "advise.miss_penalty=50000",
    "advise.calibration=none",
    "advise.data_epoch=best",
    "+advise.bootstrap=60",  # not in the YAML: fewer refits, a faster test
]


@pytest.mark.slow  # a long integration test: `make test` runs it, `make test-fast` not
def test_advise_mode_prints_the_plan_the_report_card_leads_with(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a sqlite store's artifacts go under ./mlruns
    uri = store_uri(tmp_path / "plan.db")
    _log_runs(uri, "plan")
    metrics = ("budget.metric=val/mrr_at_20", "report.metrics=[val/recall_at_20]")  # as logged
    cfg = compose_config(
        ["mode=advise", "tracking.experiment=plan", *metrics, *PRICED], tmp_path, "evaluate"
    )
    with open_dict(cfg):
        cfg.tracking.uri = uri
    run_mode(cfg)
    printed = capsys.readouterr().out.strip().splitlines()
    plan_lines = printed[: next(i for i, x in enumerate(printed) if x.startswith("t · "))]
    assert printed[0].startswith("plan: t · big · d · mrr_at_20: label ")
    # big reaches +27% at (2 / 0.08)^2 = 625 labels, small at (2 / 0.03)^2 = 4,444: buy big
    assert "buy big" in printed[2] and "big: gain" in printed[2] and "small: gain" in printed[2]
    # for big, recall_at_20 reaches +27% only at 4,444 labels: it alone would buy more
    disagree = next(line for line in plan_lines if "the metrics disagree" in line)
    assert "mrr_at_20 says stop" in disagree and "recall_at_20 says still pays" in disagree

    settings = ReportSettings(
        out_dir=str(tmp_path / "out"),
        metrics=["val/mrr_at_20", "val/recall_at_20"],
        data_epoch="best",
        bootstrap=60,
        log_to_mlflow=False,
        advise=AdviceSettings.from_config(cfg.advise),
    )
    report = build_report(uri, "plan", settings)
    md = (tmp_path / "out" / "report.md").read_text().splitlines()
    at = md.index("## The plan")
    card = [line.removeprefix("- ") for line in md[at + 2 : at + 2 + len(plan_lines)]]
    assert card == plan_lines
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.index("The plan") < page.index("Decision: ")
    assert "(buy this one)" in page and "plan_mrr_at_20" in page
    big = next(p for p in report.plans if p.model == "big")
    assert big.chosen and big.n >= 625 * 0.85
