"""The report from MLflow alone: a real tiny sweep (tiny BERT, 2 sizes x 2 seeds x 1..2 epochs) in
a temporary store; the table's gains and ROIs recomputed independently; where-to-stop, the
learning curve, its backtest, the decision card and `evaluate.py mode=advise` on runs written with
a known curve; clear messages for bad input."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY, compose_config, store_uri
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from omegaconf import open_dict
from scipy import stats

from finetune_budget.app.modes import run_mode
from finetune_budget.app.sweep_parent import SweepParentRun
from finetune_budget.errors import DataError
from finetune_budget.report.build import ReportSettings, build_report
from finetune_budget.study.advice import AdviceSettings, gain_ceiling, value_to_gain
from finetune_budget.study.knee import drop_point, worse_with_time
from finetune_budget.study.table import budget_points
from finetune_budget.tracking import query
from finetune_budget.tracking.parent import current_parent
from finetune_budget.training.run import train
from finetune_budget.training.tracker import cost_units

EXPERIMENT = "tiny-sweep"


@pytest.fixture(scope="module", autouse=True)
def _artifacts_in_tmp(tmp_path_factory):
    """MLflow puts a sqlite store's artifacts under ./mlruns: keep them out of the repository."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("cwd"))
        yield


METRICS = ["val/mrr_at_20", "val/recall_at_20", "val/map_at_20"]


def _cfg(tmp, *overrides, experiment=EXPERIMENT, config_name="train"):
    return compose_config(
        [
            *TINY,
            "trainer.limit_val_batches=2",
            "eval.batch_size=64",
            "tracking.save_checkpoint=false",
            "optim.optimizer.lr=3e-3",
            f"tracking.experiment={experiment}",
            *overrides,
        ],
        tmp,
        config_name,
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """8 finished runs: data.n in (32, 64) x seed in (0, 1) x trainer.max_epochs in (1, 2)."""
    tmp = tmp_path_factory.mktemp("report_store")
    runs = {}
    for n in (32, 64):
        for seed in (0, 1):
            for epochs in (1, 2):
                cfg = _cfg(tmp, f"data.n={n}", f"seed={seed}", f"trainer.max_epochs={epochs}")
                runs[(n, seed, epochs)] = train(cfg).run_id
    return tmp, cfg.tracking.uri, runs


def _history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_roi_table_matches_gains_recomputed_from_logged_metrics(store):
    tmp, uri, runs = store
    df = query.roi_table(uri, EXPERIMENT)
    client = MlflowClient(uri)
    assert set(df["run_id"]) == set(runs.values())
    assert len(df) == sum(epochs + 1 for (_, _, epochs) in runs)  # epochs 0..k per run
    for (n, seed, epochs), run_id in runs.items():
        rows = df[df["run_id"] == run_id].set_index("epoch")
        assert list(rows.index) == list(range(epochs + 1))
        assert (rows["n"] == n).all() and (rows["seed"] == seed).all()
        assert (rows["epochs"] == epochs).all()
        seconds = _history(client, run_id, "time/train_s")
        for key in METRICS:
            logged = _history(client, run_id, key)
            name = key.split("/")[1]
            for epoch in range(1, epochs + 1):
                gain = (logged[epoch] - logged[0]) / max(abs(logged[0]), 0.01)
                assert rows.loc[epoch, key] == pytest.approx(logged[epoch])
                assert rows.loc[epoch, f"gain/{name}"] == pytest.approx(gain, abs=1e-12)
                assert rows.loc[epoch, f"roi_label/{name}"] == pytest.approx(gain / n, abs=1e-12)
                assert rows.loc[epoch, f"roi_s/{name}"] == pytest.approx(gain / seconds[epoch])
                assert rows.loc[epoch, "seconds"] == pytest.approx(seconds[epoch])
    # a machine-independent cost per epoch: items seen and training FLOPs, growing with epochs
    for (n, _, epochs), run_id in runs.items():
        flops = _history(client, run_id, "cost/train_flops")
        seen = _history(client, run_id, "data/samples_seen")
        rows = df[df["run_id"] == run_id].set_index("epoch")
        assert rows.loc[epochs, "train_flops"] == pytest.approx(flops[epochs])
        assert rows.loc[epochs, "samples_seen"] == seen[epochs] and seen[1] >= n // 2
        assert flops[1] > 0 and rows.loc[0, "train_flops"] == 0
        if epochs == 2:  # the same items again (continued run): about twice the FLOPs
            assert flops[2] == pytest.approx(2 * flops[1], rel=0.15)
    # the CLI writes the same table
    csv = tmp / "roi.csv"
    assert query.main(["--experiment", EXPERIMENT, "--tracking-uri", uri, "--csv", str(csv)]) == 0
    assert len(pd.read_csv(csv)) == len(df)
    # the 2-epoch runs continued from the 1-epoch runs (same config and seed)
    continued = df.groupby("run_id")["continued"].first()
    assert {rid for (_, _, e), rid in runs.items() if e == 2} == set(continued[continued].index)


def test_report_files_means_intervals_and_mlflow_artifacts(store):
    tmp, uri, runs = store
    out = tmp / "report_out"
    report = build_report(uri, EXPERIMENT, ReportSettings(out_dir=str(out), bootstrap=50))
    assert "gain_vs_items_seen_mrr_at_20.png" in {p.name for p in report.files}
    for name in (
        "roi_table.csv",
        "summary.csv",
        "report.md",
        "report.html",
        "gain_vs_n_mrr_at_20.png",
        "roi_label_vs_n_recall_at_20.png",
        "gain_vs_epoch_map_at_20.png",
        "gain_vs_epoch_map_hits_at_20.png",
        "gain_vs_seconds_mrr_at_20.png",
        "roi_s_vs_seconds_mrr_at_20.png",
    ):
        assert (out / name).is_file(), name
    html = (out / "report.html").read_text()
    # 6 figures for each default metric: mrr, recall, map and map_hits at 20
    assert html.count("data:image/png;base64,") == 6 * 4 and "<img" in html
    assert html.index("class='card'") < html.index("<img")  # the decision comes first
    assert 'src="http' not in html  # self-contained
    md = (out / "report.md").read_text()
    assert "## The answer" in md and "best epoch count per n" in md
    assert "continued from the saved state" in md

    per_seed = pd.read_csv(out / "roi_table.csv")
    # one row per (n, seed, epoch): epoch 1 from the 1-epoch run, epoch 2 from the 2-epoch run
    assert len(per_seed) == 2 * 2 * 2
    for (n, seed, epochs), run_id in runs.items():
        row = per_seed[
            (per_seed["n"] == n) & (per_seed["seed"] == seed) & (per_seed["epoch"] == epochs)
        ]
        assert list(row["run_id"]) == [run_id]
    # means and t-based 95% intervals over the two seeds, recomputed from the MLflow histories
    client = MlflowClient(uri)
    summary = pd.read_csv(out / "summary.csv")
    for n in (32, 64):
        for epoch in (1, 2):
            gains = []
            for seed in (0, 1):
                h = _history(client, runs[(n, seed, epoch)], "val/mrr_at_20")
                gains.append((h[epoch] - h[0]) / max(abs(h[0]), 0.01))
            row = summary[(summary["n"] == n) & (summary["epoch"] == epoch)].iloc[0]
            assert row["seeds"] == 2
            assert row["gain/mrr_at_20"] == pytest.approx(np.mean(gains), abs=1e-12)
            half = stats.t.ppf(0.975, 1) * np.std(gains, ddof=1) / math.sqrt(2)
            assert row["gain/mrr_at_20_ci95"] == pytest.approx(half, abs=1e-12)
            assert row["roi_label/mrr_at_20"] == pytest.approx(np.mean(gains) / n, abs=1e-12)
    # a report run in the experiment holds the files
    run = client.get_run(report.run_id)
    assert run.data.tags["run_type"] == "report" and run.info.status == "FINISHED"
    assert {"report.html", "roi_table.csv"} <= {
        a.path for a in client.list_artifacts(report.run_id)
    }


def test_report_mode_of_evaluate_py(store):
    tmp, uri, _ = store
    cfg = _cfg(
        tmp,
        "mode=report",
        f"report.out_dir={tmp / 'mode_out'}",
        "report.bootstrap=20",
        "report.log_to_mlflow=false",
        config_name="evaluate",
    )
    numbers = run_mode(cfg)
    assert numbers["runs"] == 8 and numbers["points"] == 4
    assert (tmp / "mode_out" / "report.html").is_file()


def test_sweep_parent_run_nests_jobs_and_gets_the_report(tmp_path):
    cfg = compose_config(
        [
            *TINY,
            "trainer.limit_val_batches=2",
            "eval.batch_size=64",
            "tracking.save_checkpoint=false",
            "tracking.experiment=sweep",
            "data.n=32",
        ],
        tmp_path,
    )
    with open_dict(cfg):
        cfg.hydra = {
            "overrides": {"task": ["data.n=32", "trainer.max_epochs=1,2"]},
            "sweep": {"dir": str(tmp_path / "multirun")},
        }
    callback = SweepParentRun(report_settings={"bootstrap": 20})
    callback.on_multirun_start(cfg)
    parent = current_parent()
    assert parent is not None
    child_ids = []
    for epochs in (1, 2):
        with open_dict(cfg):
            cfg.trainer.max_epochs = epochs
        child_ids.append(train(cfg, parent_run_id=current_parent()).run_id)
    callback.on_multirun_end(cfg)
    assert current_parent() is None  # later single runs get no parent
    client = MlflowClient(cfg.tracking.uri)
    for run_id in child_ids:
        assert client.get_run(run_id).data.tags["mlflow.parentRunId"] == parent
    run = client.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.tags["sweep.jobs"] == "2"
    assert "report/report.html" in {a.path for a in client.list_artifacts(parent, "report")}
    assert (tmp_path / "multirun" / "report" / "roi_table.csv").is_file()


def test_bad_input_gives_one_line_messages(store, tmp_path, capsys):
    tmp, uri, runs = store
    with pytest.raises(DataError, match=f"experiment 'nope' not found .*existing: .*{EXPERIMENT}"):
        build_report(uri, "nope", ReportSettings(out_dir=str(tmp_path / "a")))
    assert query.main(["--experiment", "nope", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: experiment 'nope' not found") and err.count("\n") == 1
    # a single budget point
    single = _cfg(tmp_path, "data.n=32", "trainer.max_epochs=1", experiment="single")
    train(single)
    with pytest.raises(DataError, match="one budget point .*sweep data.n or trainer.max_epochs"):
        build_report(single.tracking.uri, "single", ReportSettings(out_dir=str(tmp_path / "b")))
    # runs without an epoch-0 baseline (logged by hand, steps 1..2 only)
    client = MlflowClient(uri)
    exp_id = client.create_experiment("nobase")
    for n in (10, 20):
        run = client.create_run(
            exp_id, tags={"run_type": "train", "task": "t", "model": "m", "data": "d"}
        )
        client.log_batch(
            run.info.run_id,
            metrics=[Metric("val/mrr_at_20", 0.5 + 0.1 * step, 0, step) for step in (1, 2)],
        )
        client.log_param(run.info.run_id, "data.n", str(n))
        client.set_terminated(run.info.run_id)
    with pytest.raises(DataError, match="epoch-0 \\(pretrained\\) metrics"):
        build_report(uri, "nobase", ReportSettings(out_dir=str(tmp_path / "c")))
    with pytest.raises(DataError, match="logged none of val/ndcg_at_5"):
        build_report(
            uri, EXPERIMENT, ReportSettings(out_dir=str(tmp_path / "d"), metrics=["val/ndcg_at_5"])
        )


def test_points_prefer_the_run_whose_budget_ended_there():
    rows = pd.DataFrame(
        {
            "task": "t",
            "model": "m",
            "data": "d",
            "n": 100,
            "seed": 0,
            "run_id": ["long", "long", "long", "short", "short"],
            "epochs": [2, 2, 2, 1, 1],
            "epoch": [0, 1, 2, 0, 1],
            "gain/x": [np.nan, 0.5, 0.7, np.nan, 0.4],
        }
    )
    points = budget_points(rows).set_index("epoch")
    assert points.loc[1, "run_id"] == "short" and points.loc[2, "run_id"] == "long"


def test_drop_point_on_curves_with_known_answers():
    # linear ROI 10 - x: peak 10 at x=0, 30% of it (3) at x=7 exactly
    x = np.arange(0, 11, 2.0)
    drop = drop_point(x, 10 - x, 0.3)
    assert drop.peak_x == 0 and drop.x == pytest.approx(7.0)
    # ROI = 1/x from x=100: falls to 30% of the peak at x = 100 / 0.3
    xs = np.linspace(100, 1000, 2001)
    assert drop_point(xs, 1 / xs, 0.3).x == pytest.approx(100 / 0.3, rel=1e-3)
    # a rise before the peak is skipped; order of the points does not matter
    drop = drop_point([4, 1, 2, 3], [1.0, 1.0, 4.0, 2.0], 0.5)
    assert drop.peak_x == 2 and drop.x == pytest.approx(3.0)
    not_yet = drop_point([1, 2, 3], [3.0, 2.0, 1.5], 0.3)
    assert not not_yet.reached and not_yet.last_fraction == pytest.approx(0.5)
    with pytest.raises(ValueError, match="never positive"):
        drop_point([1, 2], [-1.0, -2.0])
    with pytest.raises(ValueError, match="at least 2"):
        drop_point([1], [1.0])


def test_worse_with_time_finds_the_overfitting_epoch():
    summary = pd.DataFrame(
        {
            "task": "t",
            "model": "m",
            "data": "d",
            "n": 100,
            "epoch": [1, 2, 3, 4],
            "seconds": [10.0, 20.0, 30.0, 40.0],
            "gain/x": [0.10, 0.15, 0.12, 0.13],
            "gain/x_ci95": [0.01, 0.01, 0.01, math.nan],
        }
    )
    worse = worse_with_time(summary, "gain/x", ["task", "model", "data", "n"])
    assert list(worse["epoch"]) == [3]
    assert worse.loc[0, "delta"] == pytest.approx(-0.03)
    assert worse.loc[0, "marginal_roi_s"] == pytest.approx(-0.003)
    assert bool(worse.loc[0, "beyond_noise"])


def power_law(n, a, b, c):
    return a - b * np.power(n, -c)


A, B, C, BASE = 0.3, 2.0, 0.5, 0.5  # gain(n) = 0.3 - 2 n^-0.5 at the best epoch; m0 = 0.5


def _known_runs(uri: str, name: str, sigma: float = 0.002) -> None:
    """Runs logged by hand, 3 seeds: gain(n) + N(0, sigma) at epoch 2, half of it at epoch 1,
    0.05 less at epoch 3 (overfitting); n/100 s per epoch, n items seen per epoch."""
    sizes = (50, 100, 200, 500, 1000, 2000)
    client = MlflowClient(uri)
    exp_id = client.create_experiment(name)
    rng = np.random.default_rng(0)
    for n in sizes:
        for seed in (0, 1, 2):
            final_gain = power_law(n, A, B, C) + rng.normal(0, sigma)
            gains_by_epoch = {1: 0.5 * final_gain, 2: final_gain, 3: final_gain - 0.05}
            run = client.create_run(
                exp_id, tags={"run_type": "train", "task": "t", "model": "m", "data": "d"}
            )
            rid = run.info.run_id
            for key, value in (
                ("data.n", n),
                ("seed", seed),
                ("trainer.max_epochs", 3),
                ("budget.gain_floor", 0.01),
            ):
                client.log_param(rid, key, str(value))
            metrics = [Metric("val/mrr_at_20", BASE, 0, 0), Metric("time/train_s", 0.0, 0, 0)]
            for epoch, g in gains_by_epoch.items():
                metrics += [
                    Metric("val/mrr_at_20", BASE * (1 + g), 0, epoch),
                    Metric("time/train_s", n / 100 * epoch, 0, epoch),
                    Metric("data/samples_seen", n * epoch, 0, epoch),
                ]
            client.log_batch(rid, metrics=metrics)
            client.set_terminated(rid)


def test_report_fits_backtests_and_stops_on_runs_with_a_known_curve(tmp_path):
    uri = store_uri(tmp_path / "known.db")
    _known_runs(uri, "known")
    settings = ReportSettings(
        out_dir=str(tmp_path / "out"),
        metrics=["val/mrr_at_20"],
        data_epoch="best",
        predict_n=[20000],
        bootstrap=100,
        advise=AdviceSettings(calibration="none"),  # the curve's own answers on a known curve
    )
    report = build_report(uri, "known", settings)
    fit = report.fits[(("t", "m", "d"), "val/mrr_at_20")]
    assert fit.family in ("pow3", "pow_err") and fit.extrapolation_ok
    assert fit(20000)[0] == pytest.approx(power_law(20000, A, B, C), abs=0.01)
    # backtest: fitted on n <= 1000, predicted n=2000, measured mean of the 3 seeds there
    bt = report.backtests.set_index("curve").loc["gain vs data.n"]
    measured = report.points.query("n == 2000 and epoch == 2")["gain/mrr_at_20"].mean()
    assert bt["held out"] == 2000 and bt["fitted up to"] == 1000
    assert bt["measured"] == pytest.approx(measured)
    assert bool(bt["covered"]) == (bt["lo"] <= measured <= bt["hi"])
    assert bt["lo"] <= power_law(2000, A, B, C) <= bt["hi"] and bt["trust"] == "high"
    assert report.numbers["backtests"] >= 1
    covered = report.backtests["covered"].dropna().astype(bool)
    assert report.numbers["backtest_coverage"] == pytest.approx(covered.mean())
    # ROI per label = gain(n) / n at the best epoch (2); where it falls to 30% of its peak,
    # by linear interpolation between the measured means
    ns = np.array([50, 100, 200, 500, 1000, 2000], dtype=float)
    expected = drop_point(ns, power_law(ns, A, B, C) / ns, 0.3).x
    assert report.numbers["drop_n/mrr_at_20"] == pytest.approx(expected, rel=0.05)
    text = "\n".join(report.answer)
    assert "In short (mrr_at_20): ROI shrinks by 70% from its highest value after ≈" in text
    assert "best epoch count per n: n=50: 2" in text
    assert (
        "more time made it worse" in text
        and "epoch 2→3" in text
        and "beyond the seed noise" in text
    )
    assert "leave-one-budget-out" in text and "n=20000" in text
    # the decision: the largest gain whose ROI per label is still >= 30% of the peak
    advice = report.advice[(("t", "m", "d"), "val/mrr_at_20")]
    roi = power_law(ns, A, B, C) / ns
    paying = ns[roi >= 0.3 * roi.max()]
    assert advice.n == int(paying.max()) and advice.epochs == 2
    assert advice.gain == pytest.approx(power_law(paying.max(), A, B, C), abs=0.005)
    assert advice.seconds == pytest.approx(paying.max() / 100 * 2)  # items seen / items per s
    assert "not worth it: the gain fell after epoch 2" in advice.more_time.text
    # its model: every run trained 3 epochs, so the best seed at n by its epoch-3 value
    client = MlflowClient(uri)
    at_n = client.search_runs(
        [client.get_experiment_by_name("known").experiment_id], f"params.`data.n` = '{advice.n}'"
    )
    best = max(at_n, key=lambda r: r.data.metrics["val/mrr_at_20"])
    assert (advice.run_id, advice.run_epochs) == (best.info.run_id, 3)
    html = (tmp_path / "out" / "report.html").read_text()
    assert f"data.n = {advice.n}, trainer.max_epochs = 2" in html
    assert "Backtests: " in html and "prediction interval (coverage" in html


@pytest.fixture(scope="module")
def known_store(tmp_path_factory) -> str:
    uri = store_uri(tmp_path_factory.mktemp("known") / "known.db")
    _known_runs(uri, "known", sigma=0.0005)  # the calibration of intervals: test_curves.py
    return uri


@pytest.mark.parametrize(
    "question",
    ["advise.target_gain=0.27", f"advise.target_value={BASE * 1.27}"],
)
def test_advise_mode_answers_from_a_synthetic_experiment(known_store, tmp_path, capsys, question):
    uri = known_store
    cfg = compose_config(
        [
            "mode=advise",
            "tracking.experiment=known",
            "budget.metric=val/mrr_at_20",  # the metric these runs logged
            "report.metrics=[val/mrr_at_20]",
            "advise.data_epoch=best",
            "advise.extra_labels=1000",
            "advise.calibration=none",  # the curve's own answers on a known curve
            question,
        ],
        tmp_path,
        "evaluate",
    )
    with open_dict(cfg):
        cfg.tracking.uri = uri
    (advice,) = run_mode(cfg)
    out = capsys.readouterr().out
    # gain 0.27 = 0.3 - 2 n^-0.5  =>  n = (2 / 0.03)^2 = 4444 labels (beyond the measured 2000)
    need = (B / (A - 0.27)) ** (1 / C)
    labels = advice.answers[0]
    assert labels.value == pytest.approx(need, rel=0.15) and labels.lo < need < labels.hi
    assert advice.n == math.ceil(labels.value)
    # the next 1000 labels at that n: gain(n + 1000) - gain(n)
    buy = power_law(advice.n + 1000, A, B, C) - power_law(advice.n, A, B, C)
    assert advice.more_labels.value == pytest.approx(buy, abs=0.002)
    assert advice.gain == pytest.approx(0.27, abs=0.01)
    lines = out.strip().splitlines()
    assert 3 <= len(lines) <= 10
    assert lines[0].startswith(f"t · m · d · mrr_at_20: train with data.n={advice.n} for")
    assert "labels to reach" in out and "1,000 more labels" in out and "trust:" in out


def test_a_gain_cannot_pass_the_metrics_ceiling_and_values_convert_to_gains():
    # a score <= 1 with baseline 0.8 can gain at most (1 - 0.8) / 0.8 = 25%
    assert gain_ceiling("val/recall_at_20", 0.8) == pytest.approx(0.25)
    # an error >= 0 can fall by at most 100% of its baseline
    assert gain_ceiling("val/mae", 60.0) == pytest.approx(1.0)
    assert gain_ceiling("val/r2", 0.3) is None  # no known bound
    assert value_to_gain("val/mrr_at_20", 0.97, 0.9467) == pytest.approx(0.0233 / 0.9467)
    assert value_to_gain("val/mae", 50.0, 60.0) == pytest.approx(10 / 60)


def test_training_cost_counts_real_tokens_of_text_and_items_of_images():
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [1] * 5 + [0] * 2])
    text = {"input": {"input_ids": torch.zeros(3, 7), "attention_mask": mask}}
    assert cost_units({**text, "labels": torch.arange(3)}) == (3, 7 + 3 + 5)  # padding not counted
    pairs = {"query": text["input"], "positive": text["input"]}
    assert cost_units(pairs) == (3, 2 * 15)
    assert cost_units({"images": torch.zeros(3, 3, 8, 8), "labels": torch.arange(3)}) == (3, 3)


def test_runs_logged_before_map_hits_existed_show_their_map_as_map_hits(tmp_path):
    """A run of the old metrics logged torchmetrics' mAP as val/map_at_20 (no map_hits key)."""
    uri = store_uri(tmp_path / "old.db")
    client = MlflowClient(uri)
    exp_id = client.create_experiment("old")
    logged = {
        "old": {"val/mrr_at_20": (0.5, 0.6), "val/map_at_20": (0.8, 0.9)},
        "new": {
            "val/mrr_at_20": (0.5, 0.6),
            "val/map_at_20": (0.1, 0.2),
            "val/map_hits_at_20": (0.8, 0.9),
        },
    }
    for name, values in logged.items():
        rid = client.create_run(exp_id, tags={"run_type": "train", "task": name}).info.run_id
        client.log_param(rid, "data.n", "100")
        client.log_param(rid, "task.name", name)  # two configs, not one run and its duplicate
        metrics = [Metric("time/train_s", float(e), 0, e) for e in (0, 1)]
        for key, (m0, m1) in values.items():
            metrics += [Metric(key, m0, 0, 0), Metric(key, m1, 0, 1)]
        client.log_batch(rid, metrics=metrics)
        client.set_terminated(rid)
    df = query.roi_table(uri, "old").set_index(["task", "epoch"])
    assert df.loc[("old", 1), "val/map_hits_at_20"] == 0.9
    assert df.loc[("old", 1), "gain/map_hits_at_20"] == pytest.approx((0.9 - 0.8) / 0.8)
    assert math.isnan(df.loc[("old", 1), "val/map_at_20"])
    assert df.loc[("new", 1), "val/map_at_20"] == 0.2
    assert df.loc[("new", 1), "val/map_hits_at_20"] == 0.9


def test_the_report_drawn_in_two_processes_equals_the_one_drawn_in_one(
    known_store, tmp_path, monkeypatch
):
    """The curve fits and figures run half in a forked process (speed/forked.py) where the
    machine has two cores; one process computing everything is the reference: every file the
    same to the byte, the answer the same to the word."""
    from finetune_budget.speed import forked

    if "fork" not in __import__("multiprocessing").get_all_start_methods():
        pytest.skip("no fork here: the report runs in one process anyway")
    reports, files = {}, {}
    for cores in (1, 2):
        monkeypatch.setattr(forked.os, "cpu_count", lambda cores=cores: cores)
        out = tmp_path / f"cores{cores}"
        settings = ReportSettings(out_dir=str(out), metrics=["val/mrr_at_20"], bootstrap=100)
        reports[cores] = build_report(known_store, "known", settings)
        files[cores] = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(files[1]) == sorted(files[2]) and any(n.endswith(".png") for n in files[1])
    for name, content in files[1].items():
        assert files[2][name] == content, name
    assert reports[1].answer == reports[2].answer


def test_a_task_that_fails_in_either_process_fails_the_call():
    from finetune_budget.speed.forked import in_two_processes

    def fail(x):
        raise ValueError(f"bad {x}")

    assert in_two_processes([(abs, (-1,)), (abs, (-2,)), (abs, (-3,))]) == [1, 2, 3]
    if __import__("os").cpu_count() >= 2:  # whichever process takes it, the call raises
        with pytest.raises((RuntimeError, ValueError), match="bad 2"):
            in_two_processes([(abs, (-1,)), (fail, (2,)), (abs, (-3,))])


def _pid_after(seconds: float, i: int) -> tuple[int, int]:
    import os
    import time

    time.sleep(seconds)
    return i, os.getpid()


@pytest.mark.parametrize("cores", [1, 2])
def test_alongside_runs_here_while_the_forked_process_takes_the_tasks(cores, monkeypatch):
    """The sweep logs its model (`alongside`) in this process while the figures are drawn in
    the forked one: alongside's effects are this process's, the results come in task order,
    and the forked process took tasks while alongside ran; one core: alongside, then the
    tasks, all here."""
    import multiprocessing
    import os

    from finetune_budget.speed import forked

    if cores == 2 and "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork here")
    monkeypatch.setattr(forked.os, "cpu_count", lambda: cores)
    done: list[int] = []

    def alongside():
        import time

        time.sleep(1.0)
        done.append(os.getpid())

    results = forked.in_two_processes(
        [(_pid_after, (0.01, i)) for i in range(6)], alongside=alongside
    )
    assert [i for i, _ in results] == list(range(6)) and done == [os.getpid()]
    pids = {pid for _, pid in results}
    if cores == 1:
        assert pids == {os.getpid()}
    else:
        assert pids - {os.getpid()}, "the forked process took none of the tasks"


def test_the_report_and_the_advice_lead_with_the_budget_metric(tmp_path):
    """budget.metric (nDCG@20 by default) comes first in the report's metrics, so the decision
    card and mode=advise answer on the metric the runs were summarised and searched on; a
    budget.metric already in report.metrics is not repeated (conf/report/default.yaml's list)."""
    from omegaconf import OmegaConf

    def metrics(*overrides):
        cfg = compose_config(["mode=report", *overrides], tmp_path, "evaluate")
        node = OmegaConf.to_container(cfg.report, resolve=True)
        return ReportSettings.from_config(node, cfg.budget.metric).metrics

    reported = ["val/mrr_at_20", "val/recall_at_20", "val/map_at_20", "val/map_hits_at_20"]
    assert metrics() == ["val/ndcg_at_20", *reported]
    assert metrics("budget.metric=val/recall_at_20") == [
        "val/recall_at_20", "val/mrr_at_20", "val/map_at_20", "val/map_hits_at_20"
    ]  # fmt: skip
    assert metrics("task=mlm_price")[0] == "probe/r2"  # a task's own budget metric


def test_a_gain_whose_interval_includes_none_says_no_gain_is_shown():
    # the card of the issue: "+0.34% [-0.13%, +0.80%]" must not read as a gain shown
    from finetune_budget.report.html import decision_card
    from finetune_budget.study.advice import Advice

    def card(lo: float) -> Advice:
        return Advice(("t", "m", "d"), "val/mrr_at_20", 400, 3, 0.0034, lo, 0.0080, 12.0,
                      None, None, "untested", "the budget search's choice")  # fmt: skip

    caveat = "no gain is shown at this confidence"
    assert caveat in card(-0.0013).lines()[0] and caveat in decision_card(card(-0.0013))
    assert caveat in card(0.0).lines()[0]  # an interval down to exactly 0 shows no gain either
    assert caveat not in card(0.0010).lines()[0] and caveat not in decision_card(card(0.0010))
    assert caveat not in card(math.nan).lines()[0]  # one seed: no interval, nothing to say
    # the priced plan's first line alike
    from finetune_budget.study.plan import Plan
    from finetune_budget.study.prices import Prices

    def plan(lo: float) -> str:
        return Plan(("t", "m", "d"), "val/mrr_at_20", Prices(label_cost=1.0), 1, (400,), 3,
                    0.0034, lo, 0.0080).lines()[0]  # fmt: skip

    assert caveat in plan(-0.0013) and caveat not in plan(0.0010)


def test_labels_to_a_target_a_falling_curve_never_reaches_say_why():
    # a log-linear curve has no level: "levels off at n/a" said nothing; it falls here
    from finetune_budget.study.advice import _labels_for
    from finetune_budget.study.curves import fit_learning_curve

    n = np.array([100.0, 200.0, 400.0, 800.0])
    gain = np.array([0.030, 0.026, 0.019, 0.015])
    fit = fit_learning_curve(n, gain, families=("loglin",), check=False)
    assert fit.params["b"] < 0  # least squares of gain on ln n: it falls
    data = pd.DataFrame({"n": n, "gain": gain, "seed": 0})
    answer = _labels_for(fit, 0.05, data, "gain", "+5.00%")
    assert answer.value == math.inf
    assert answer.text == "not reached: the fitted curve (loglin) does not rise with more labels"
