"""A run through train(cfg) in a temporary MLflow store: what a user finds there afterwards."""

from __future__ import annotations

import subprocess
import sys

import lightning as L
import pytest
import yaml
from mlflow.tracking import MlflowClient

from finetune_budget.errors import DataError, DivergedError
from finetune_budget.evaluation import evaluate
from finetune_budget.training import train
from tests.conftest import ROOT

METRICS = ("val/mrr_at_20", "val/recall_at_20", "val/map_at_20")


def _history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_fast_dev_run_of_the_text_task(tiny_text_cfg):
    cfg = tiny_text_cfg("+trainer.fast_dev_run=true")
    result = train(cfg)
    assert [row["epoch"] for row in result.history][0] == 0


def test_a_run_records_params_per_epoch_metrics_roi_config_and_versions(tiny_text_cfg):
    cfg = tiny_text_cfg("trainer.max_epochs=2", "optim.optimizer.lr=1e-3")
    result = train(cfg)
    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["data.n"] == "64" and params["trainer.max_epochs"] == "2"
    assert params["model.name"] == "tiny-bert" and params["seed"] == "0"
    assert run.data.tags["task"] == "text_text" and run.data.tags["data"] == "clinc150"
    assert run.data.tags["versions.torch"] and run.data.tags["versions.transformers"]
    assert run.data.tags["versions.finetune-budget"]
    for key in METRICS:
        assert sorted(_history(client, result.run_id, key)) == [0, 1, 2]
    train_s = _history(client, result.run_id, "time/train_s")
    assert train_s[0] == 0 and 0 < train_s[1] < train_s[2]
    assert _history(client, result.run_id, "data/samples_seen")[2] == 2 * 64
    mrr = _history(client, result.run_id, "val/mrr_at_20")
    gain = _history(client, result.run_id, "gain/mrr_at_20")
    assert gain[2] == pytest.approx((mrr[2] - mrr[0]) / max(mrr[0], 0.01))
    assert _history(client, result.run_id, "roi_label/mrr_at_20")[2] == pytest.approx(gain[2] / 64)
    assert _history(client, result.run_id, "roi_s/mrr_at_20")[2] == pytest.approx(
        gain[2] / train_s[2]
    )
    artifact = client.download_artifacts(result.run_id, "config.yaml")
    logged = yaml.safe_load(open(artifact))
    assert logged["data"]["n"] == 64 and logged["model"]["name"] == "tiny-bert"


def test_fine_tuning_changes_the_metrics_and_lowers_the_loss(tiny_text_cfg):
    cfg = tiny_text_cfg("trainer.max_epochs=3", "optim.optimizer.lr=3e-3", "data.n=256")
    history = train(cfg).history
    losses = [row["train/loss_epoch"] for row in history if row["epoch"] > 0]
    assert losses[-1] < losses[0]
    assert history[-1]["val/mrr_at_20"] != history[0]["val/mrr_at_20"]


def test_the_pretrained_evaluation_is_reused_by_runs_that_share_model_and_split(tiny_text_cfg):
    first = train(tiny_text_cfg("data.n=32"))
    second = train(tiny_text_cfg("data.n=64", "trainer.max_epochs=2"))
    client = MlflowClient(tiny_text_cfg().tracking.uri)
    assert client.get_run(first.run_id).data.tags["baseline_cached"] == "false"
    assert client.get_run(second.run_id).data.tags["baseline_cached"] == "true"
    assert first.history[0]["val/mrr_at_20"] == second.history[0]["val/mrr_at_20"]
    other_split = train(tiny_text_cfg("data.eval_split=test"))
    assert client.get_run(other_split.run_id).data.tags["baseline_cached"] == "false"


def test_a_failed_run_is_marked_failed_with_its_error(tiny_text_cfg):
    cfg = tiny_text_cfg("data.n=100000")
    with pytest.raises(DataError, match="data.n=100000 is larger than the 15000"):
        train(cfg)
    client = MlflowClient(cfg.tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("finetune-budget").experiment_id])
    assert run.info.status == "FAILED"
    assert "data.n=100000" in run.data.tags["error"]


def test_a_diverging_loss_stops_with_a_clear_error_and_keeps_finished_epochs(tiny_text_cfg):
    cfg = tiny_text_cfg(
        "optim.optimizer.lr=1e6",
        "trainer.max_epochs=4",
        "optim.warmup_steps=0",
        "trainer.gradient_clip_val=null",
    )
    with pytest.raises(DivergedError, match="lower optim.optimizer.lr"):
        train(cfg)
    client = MlflowClient(cfg.tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("finetune-budget").experiment_id])
    assert run.info.status == "FAILED"
    assert 0 in _history(client, run.info.run_id, "val/mrr_at_20")


class _Interrupt(L.Callback):
    def on_train_batch_end(self, *args, **kwargs):
        raise KeyboardInterrupt


def test_ctrl_c_marks_the_run_killed(tiny_text_cfg):
    cfg = tiny_text_cfg()
    from finetune_budget import training

    original = training.build_trainer

    def with_interrupt(cfg, tracker, run, extra):
        return original(cfg, tracker, run, [*extra, _Interrupt()])

    training.build_trainer = with_interrupt
    try:
        with pytest.raises((KeyboardInterrupt, SystemExit)):
            train(cfg)
    finally:
        training.build_trainer = original
    client = MlflowClient(cfg.tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("finetune-budget").experiment_id])
    assert run.info.status == "KILLED"


def test_evaluate_scores_a_runs_checkpoint_like_its_last_epoch(tiny_text_cfg, make_cfg):
    cfg = tiny_text_cfg("tracking.save_checkpoint=true", "optim.optimizer.lr=1e-3")
    result = train(cfg)
    eval_cfg = make_cfg(
        "model=tiny_bert",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "trainer.limit_val_batches=2",
        "eval.batch_size=64",
        f"run_id={result.run_id}",
        config_name="evaluate",
    )
    metrics = evaluate(eval_cfg)
    assert metrics["val/mrr_at_20"] == pytest.approx(result.history[-1]["val/mrr_at_20"], abs=1e-5)
    client = MlflowClient(cfg.tracking.uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("finetune-budget").experiment_id],
        filter_string="tags.run_type = 'evaluation'",
    )
    assert len(runs) == 1 and runs[0].data.tags["evaluated_run_id"] == result.run_id


def test_a_failing_job_does_not_stop_the_sweep(tmp_path):
    db = tmp_path / "mlflow.db"
    out = subprocess.run(
        [
            sys.executable,
            "train.py",
            "-m",
            "debug=fast",
            "data.n=99999,32",
            "trainer.precision=32-true",
            "trainer.enable_progress_bar=false",
            f"tracking.uri=sqlite:///{db}",
            f"paths.cache_dir={tmp_path / 'cache'}",
            f"hydra.sweep.dir={tmp_path / 'multirun'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 1
    assert "error: data.n=99999 is larger than the 15000 training items" in log
    assert "Traceback" not in log
    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs(
        [client.get_experiment_by_name("finetune-budget").experiment_id], "tags.run_type = 'train'"
    )  # the sweep's parent run aside
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]
