"""Epoch budgets that cost one run: a k-epoch job continued from a finished j-epoch job gives the
metrics of training k epochs from scratch, and its MLflow run shows epochs 0..k."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from finetune_budget.continuation import EpochStore, continuation_key, why_not_continuable
from finetune_budget.training import run_config, train

METRICS = ("val/mrr_at_20", "val/recall_at_20", "val/map_at_20")


@pytest.fixture(scope="module", autouse=True)
def _artifacts_in_tmp(tmp_path_factory):
    """MLflow puts a sqlite store's artifacts under ./mlruns: keep them out of the repository."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("cwd"))
        yield


def _by_epoch(history: list[dict[str, float]]) -> dict[int, dict[str, float]]:
    return {int(r["epoch"]): r for r in history}


@pytest.mark.parametrize("data", ["clinc150", "stsb"])
def test_continued_run_equals_training_from_scratch(tiny_text_cfg, tmp_path, data):
    # `stsb` pairs use a RandomSampler with its own generator; clinc150 a (seed, epoch) sampler.
    common = (f"data={data}", "data.n=48", "trainer.limit_val_batches=1", "optim.warmup_steps=3")
    short = train(tiny_text_cfg(*common, "trainer.max_epochs=1"))
    continued = train(tiny_text_cfg(*common, "trainer.max_epochs=3"))
    scratch = train(
        tiny_text_cfg(*common, "trainer.max_epochs=3", "budget.continue_shorter_runs=false")
    )

    cont, ref = _by_epoch(continued.history), _by_epoch(scratch.history)
    assert sorted(cont) == sorted(ref) == [0, 1, 2, 3]
    for epoch in (1, 2, 3):
        for key in METRICS:
            assert cont[epoch][key] == pytest.approx(ref[epoch][key], abs=1e-5), (epoch, key)
    assert cont[3]["train/loss_epoch"] == pytest.approx(ref[3]["train/loss_epoch"], rel=1e-4)
    assert cont[3]["data/samples_seen"] == ref[3]["data/samples_seen"]
    # elapsed training time carries over: cumulative, increasing across the epochs of both runs
    times = [cont[e]["time/train_s"] for e in (1, 2, 3)]
    assert times[0] == pytest.approx(_by_epoch(short.history)[1]["time/train_s"])
    assert times == sorted(times) and times[0] > 0

    client = MlflowClient(tiny_text_cfg().tracking.uri)
    tags = client.get_run(continued.run_id).data.tags
    assert tags["continued_from"] == short.run_id
    assert tags["continued_from_epoch"] == "1"
    assert "continued_from" not in client.get_run(scratch.run_id).data.tags
    steps = [m.step for m in client.get_metric_history(continued.run_id, "val/mrr_at_20")]
    assert sorted(steps) == [0, 1, 2, 3]
    logged = {m.step: m.value for m in client.get_metric_history(continued.run_id, "time/train_s")}
    assert logged[3] == pytest.approx(times[2])


def test_store_keeps_only_the_latest_epoch_and_shorter_runs_start_again(tiny_text_cfg):
    cfg2 = tiny_text_cfg("trainer.max_epochs=2", "data.n=32", "trainer.limit_val_batches=1")
    train(cfg2)
    store = EpochStore(cfg2.paths.cache_dir)
    key = continuation_key(run_config(cfg2))
    assert store.get(key).epoch == 2
    one = train(tiny_text_cfg("trainer.max_epochs=1", "data.n=32", "trainer.limit_val_batches=1"))
    client = MlflowClient(cfg2.tracking.uri)
    assert "continued_from" not in client.get_run(one.run_id).data.tags  # no state with j < 1
    assert store.get(key).epoch == 2  # the shorter run does not replace the longer state
    assert [p.name for p in (store.root / key).glob("*.ckpt")] == ["epoch_2.ckpt"]
    # another seed or n is another key
    assert key != continuation_key(
        run_config(
            tiny_text_cfg(
                "trainer.max_epochs=2", "data.n=32", "trainer.limit_val_batches=1", "seed=1"
            )
        )
    )


def test_schedules_that_depend_on_max_epochs_run_from_scratch(tiny_text_cfg):
    assert why_not_continuable(tiny_text_cfg()) is None
    assert "depends on trainer.max_epochs" in why_not_continuable(
        tiny_text_cfg("optim.schedule=linear")
    )
    assert "false" in why_not_continuable(tiny_text_cfg("budget.continue_shorter_runs=false"))
    common = ("optim.schedule=cosine", "data.n=32", "trainer.limit_val_batches=1")
    train(tiny_text_cfg(*common, "trainer.max_epochs=1"))
    two = train(tiny_text_cfg(*common, "trainer.max_epochs=2"))
    tags = MlflowClient(tiny_text_cfg().tracking.uri).get_run(two.run_id).data.tags
    assert "continued_from" not in tags
    assert not (EpochStore(tiny_text_cfg().paths.cache_dir).root).exists()


class _FakeTrainer:
    def save_checkpoint(self, path):
        Path(path).write_bytes(b"state")


def test_store_keeps_the_states_of_the_most_recent_configs_only(tmp_path):
    store = EpochStore(tmp_path, max_keys=2)
    for i, key in enumerate(["a", "b", "c"]):
        store.put(key, 1, f"run-{key}", _FakeTrainer())
        os.utime(store.root / key / "state.json", (1000 + i, 1000 + i))
    store.put("c", 2, "run-c2", _FakeTrainer())  # the newest, and one more: "a" goes
    assert store.get("a") is None
    assert store.get("b").epoch == 1
    assert (store.get("c").epoch, store.get("c").run_id) == (2, "run-c2")
    assert sorted(p.name for p in (store.root / "c").iterdir()) == ["epoch_2.ckpt", "state.json"]
