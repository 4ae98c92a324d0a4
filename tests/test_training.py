"""A run through train(cfg) in a temporary MLflow store: what a user finds there afterwards."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from finetune_budget.app.model_modes import evaluate
from finetune_budget.errors import DataError, DivergedError
from finetune_budget.training.run import train
from tests.conftest import run_train_py

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


def _write_labelled_csv(path, labels: int, per_label: int, offset: int = 0) -> str:
    """A `text,label` CSV: each item is its label's word among four random filler words."""
    rng = np.random.default_rng(offset + per_label)
    filler = "red green blue cold warm tall short fast slow old new big small dark light".split()
    rows = ["text,label"]
    for label in range(labels):
        for _ in range(per_label):
            words = [f"topic{label + offset}", *rng.choice(filler, 4)]
            rows.append(f"{' '.join(rng.permutation(words))},l{label + offset}")
    path.write_text("\n".join(rows) + "\n")
    return str(path)


@pytest.fixture
def small_text_cfg(tiny_text_cfg, tmp_path):
    """Tiny BERT on a small labelled CSV: 100 held-out items in 7 batches of 16 (fast to
    evaluate in full); the whole held-out split unless a test limits it."""
    train_csv = _write_labelled_csv(tmp_path / "train.csv", labels=10, per_label=10)
    eval_csv = _write_labelled_csv(tmp_path / "heldout.csv", labels=10, per_label=10, offset=10)

    def make(*overrides: str):
        return tiny_text_cfg(
            "data=custom_text",
            f"data.train_path={train_csv}",
            f"data.eval_path={eval_csv}",
            "data.n=50",
            "data.samples_per_class=2",
            "eval.batch_size=16",
            "trainer.limit_val_batches=null",
            *overrides,
        )

    return make


def _tag(cfg, result, key: str) -> str:
    return MlflowClient(cfg.tracking.uri).get_run(result.run_id).data.tags[key]


def test_epoch_0_is_cached_only_when_complete_and_recomputed_when_what_it_computes_changes(
    small_text_cfg, tmp_path
):
    short = train(small_text_cfg("trainer.limit_val_batches=2"))
    cfg = small_text_cfg()
    assert _tag(cfg, short, "baseline_cached") == "false"
    assert _tag(cfg, short, "baseline_items") == "32/100"  # 2 batches of 16
    # the full run after the short one recomputes epoch 0 on every held-out item
    full = train(cfg)
    assert _tag(cfg, full, "baseline_cached") == "false"
    assert _tag(cfg, full, "baseline_items") == "100/100"
    assert full.history[0]["val/mrr_at_20"] != short.history[0]["val/mrr_at_20"]
    # a run that differs only in training budget reuses it
    again = train(small_text_cfg("data.n=80", "trainer.max_epochs=2"))
    assert _tag(cfg, again, "baseline_cached") == "true"
    assert again.history[0] == {**full.history[0], "data/n": 80}
    other_precision = train(small_text_cfg("trainer.precision=bf16-mixed"))
    assert _tag(cfg, other_precision, "baseline_cached") == "false"
    # the held-out file changes (same path): its fingerprint changes, epoch 0 is recomputed
    _write_labelled_csv(tmp_path / "heldout.csv", labels=10, per_label=12, offset=10)
    changed = train(cfg)
    assert _tag(cfg, changed, "baseline_cached") == "false"
    assert _tag(cfg, changed, "baseline_items") == "120/120"


def test_the_baseline_key_follows_file_and_folder_contents_and_the_metrics_version(
    tmp_path, monkeypatch
):
    from finetune_budget.training import baseline_cache
    from finetune_budget.training.baseline_cache import baseline_key

    folder = tmp_path / "images" / "person_a"
    folder.mkdir(parents=True)
    (folder / "1.jpg").write_bytes(b"x" * 10)

    def key() -> str:
        data = {"format": "folder", "root": str(tmp_path / "images"), "n": 10}
        return baseline_key("image_image", {"name": "m"}, data, {"top_k": 20}, {}, None)

    first = key()
    assert key() == first
    (folder / "2.jpg").write_bytes(b"y" * 10)  # a new image in the folder
    second = key()
    assert second != first
    (folder / "2.jpg").write_bytes(b"y" * 11)  # an image's content (size) changes
    assert key() != second
    third = key()
    monkeypatch.setattr(baseline_cache, "METRICS_VERSION", baseline_cache.METRICS_VERSION + 1)
    assert key() != third


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
    from finetune_budget.training import run as training

    original = training.build_trainer

    def with_interrupt(cfg, tracker, run, extra, **kwargs):
        return original(cfg, tracker, run, [*extra, _Interrupt()], **kwargs)

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


@pytest.mark.slow  # a long integration test: `make test` runs it, `make test-fast` not
def test_a_failing_job_does_not_stop_the_sweep(tmp_path):
    db = tmp_path / "mlflow.db"
    out = run_train_py(
        tmp_path, "-m", "debug=fast", "data.n=99999,32", "trainer.precision=32-true", timeout=300
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
