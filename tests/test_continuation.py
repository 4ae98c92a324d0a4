"""Epoch budgets that cost one run: a k-epoch job continued from a finished j-epoch job gives the
metrics of training k epochs from scratch, and its MLflow run shows epochs 0..k."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from finetune_budget.training import continuation
from finetune_budget.training.continuation import (
    MEMORY,
    EpochStore,
    continuation_key,
    why_not_continuable,
)
from finetune_budget.training.run import run_config, train
from finetune_budget.training.sweep_states import SweepStates

METRICS = ("val/mrr_at_20", "val/recall_at_20", "val/map_at_20")


@pytest.fixture(scope="module", autouse=True)
def _artifacts_in_tmp(tmp_path_factory):
    """MLflow puts a sqlite store's artifacts under ./mlruns: keep them out of the repository."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("cwd"))
        yield


@pytest.fixture(autouse=True)
def _empty_memory_store():
    MEMORY.clear()  # each test starts like a fresh process
    yield
    MEMORY.clear()


def _by_epoch(history: list[dict[str, float]]) -> dict[int, dict[str, float]]:
    return {int(r["epoch"]): r for r in history}


@pytest.mark.parametrize(
    ("data", "store"), [("clinc150", "memory"), ("stsb", "memory"), ("clinc150", "disk")]
)
def test_continued_run_equals_training_from_scratch(tiny_text_cfg, tmp_path, data, store):
    # `stsb` pairs use a RandomSampler with its own generator; clinc150 a (seed, epoch) sampler.
    common = (
        f"data={data}",
        "data.n=48",
        "trainer.limit_val_batches=1",
        "optim.warmup_steps=3",
        f"budget.continuation_store={store}",
    )
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
    assert tags["continuation_store"] == store
    assert tags["continuation_exact"] == "true"
    # memory: nothing on disk; disk: the state file and no temp files
    files = sorted(p.name for p in (Path(tmp_path) / "cache").rglob("*.ckpt*"))
    assert files == ([] if store == "memory" else ["epoch_3.ckpt"])
    assert "continued_from" not in client.get_run(scratch.run_id).data.tags
    steps = [m.step for m in client.get_metric_history(continued.run_id, "val/mrr_at_20")]
    assert sorted(steps) == [0, 1, 2, 3]
    logged = {m.step: m.value for m in client.get_metric_history(continued.run_id, "time/train_s")}
    assert logged[3] == pytest.approx(times[2])


def test_after_a_job_that_continued_a_state_fails_the_next_one_trains_from_the_start(
    tiny_text_cfg, caplog
):
    """The job that continues a kept state trains its tensors in place: if it fails, the state
    is not continued from again, and the next job of that config trains from the start, with
    the metrics of training from scratch."""
    import logging

    import lightning as L

    class LostNode(L.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.current_epoch == 1:  # the epoch after the state it continued, one step in
                raise RuntimeError("lost the node")

    common = (
        "data.n=48",
        "trainer.limit_val_batches=1",
        "optim.warmup_steps=3",
        "budget.continuation_store=memory",
    )
    train(tiny_text_cfg(*common, "trainer.max_epochs=1"))
    with pytest.raises(RuntimeError, match="lost the node"):
        train(tiny_text_cfg(*common, "trainer.max_epochs=3"), callbacks=[LostNode()])
    with caplog.at_level(logging.WARNING):
        after = train(tiny_text_cfg(*common, "trainer.max_epochs=2"))
    assert "did not finish" in caplog.text
    client = MlflowClient(tiny_text_cfg().tracking.uri)
    assert "continued_from" not in client.get_run(after.run_id).data.tags
    scratch = train(
        tiny_text_cfg(*common, "trainer.max_epochs=2", "budget.continue_shorter_runs=false")
    )
    for key in METRICS:
        for epoch in (1, 2):
            assert _by_epoch(after.history)[epoch][key] == pytest.approx(
                _by_epoch(scratch.history)[epoch][key], abs=1e-6
            ), (key, epoch)
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a job that continues and finishes: no warning
        longer = train(tiny_text_cfg(*common, "trainer.max_epochs=4"))
    assert client.get_run(longer.run_id).data.tags.get("continued_from") == after.run_id
    assert "changed after its job ended" not in caplog.text


def test_a_continued_run_takes_epoch_0_from_the_state_it_continues(tiny_text_cfg, monkeypatch):
    from finetune_budget.training import run as training

    common = ("data.n=48", "trainer.limit_val_batches=1")
    short = train(tiny_text_cfg(*common, "trainer.max_epochs=1"))
    evaluated = []
    monkeypatch.setattr(
        training, "evaluate_baseline", lambda *a, **k: evaluated.append(1)
    )  # would leave epoch 0 empty
    continued = train(tiny_text_cfg(*common, "trainer.max_epochs=2"))
    assert evaluated == []  # neither evaluated again nor looked up in the cache
    client = MlflowClient(tiny_text_cfg().tracking.uri)
    for key in METRICS:
        epoch0 = {m.step: m.value for m in client.get_metric_history(continued.run_id, key)}[0]
        assert epoch0 == _by_epoch(short.history)[0][key]
    tags = [client.get_run(r.run_id).data.tags for r in (short, continued)]
    for tag in ("baseline_cached", "baseline_key", "baseline_items"):
        assert tags[1][tag] == tags[0][tag]


def test_store_keeps_only_the_latest_epoch_and_shorter_runs_start_again(tiny_text_cfg):
    common = ("data.n=32", "trainer.limit_val_batches=1", "budget.continuation_store=disk")
    cfg2 = tiny_text_cfg("trainer.max_epochs=2", *common)
    train(cfg2)
    store = EpochStore(cfg2.paths.cache_dir)
    key = continuation_key(run_config(cfg2))
    assert store.get(key).epoch == 2
    one = train(tiny_text_cfg("trainer.max_epochs=1", *common))
    client = MlflowClient(cfg2.tracking.uri)
    assert "continued_from" not in client.get_run(one.run_id).data.tags  # no state with j < 1
    assert store.get(key).epoch == 2  # the shorter run does not replace the longer state
    assert [p.name for p in (store.root / key).glob("*.ckpt")] == ["epoch_2.ckpt"]
    # another seed or n is another key
    assert key != continuation_key(
        run_config(tiny_text_cfg("trainer.max_epochs=2", *common, "seed=1"))
    )


@pytest.mark.parametrize(
    "change",
    [
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=3",
        "trainer.precision=bf16-mixed",
    ],
)
def test_key_changes_with_what_is_computed_but_not_with_bookkeeping(tiny_text_cfg, change):
    base = continuation_key(run_config(tiny_text_cfg("trainer.max_epochs=2")))
    assert continuation_key(run_config(tiny_text_cfg("trainer.max_epochs=2", change))) != base
    for same in (
        "trainer.max_epochs=7",
        "tracking.experiment=other",
        "budget.continuation_store=disk",
    ):
        assert continuation_key(run_config(tiny_text_cfg(same))) == base, same


def test_key_changes_with_the_data_file_and_the_package_version(
    tiny_text_cfg, tmp_path, monkeypatch
):
    data = tmp_path / "faq.csv"
    data.write_text("text,label\na,x\nb,x\nc,y\nd,y\n")
    cfg = tiny_text_cfg("data=custom_text", f"data.train_path={data}")
    before = continuation_key(run_config(cfg))
    data.write_text("text,label\na,x\nb,x\nc,y\nd,y\ne,y\n")  # edited in place: same path
    assert continuation_key(run_config(cfg)) != before
    after_edit = continuation_key(run_config(cfg))
    monkeypatch.setattr(continuation, "installed_versions", lambda names: {"torch": "0.0-other"})
    assert continuation_key(run_config(cfg)) != after_edit


def test_epochs_as_the_outer_axis_still_continue_and_the_sweep_end_cleans_up(tiny_text_cfg):
    """4 configs in flight (more than continuation_max_configs=2): every one still continues."""
    cfg = tiny_text_cfg("budget.continuation_max_configs=2")
    sweep = SweepStates()
    sweep.on_multirun_start(cfg)
    seeds, runs = range(4), {}
    for epochs in (1, 2):  # the outer axis
        for seed in seeds:
            common = ("data.n=16", "trainer.limit_val_batches=1", "trainer.limit_train_batches=1")
            runs[epochs, seed] = train(
                tiny_text_cfg(*common, f"seed={seed}", f"trainer.max_epochs={epochs}")
            )
    client = MlflowClient(cfg.tracking.uri)
    for seed in seeds:
        tags = client.get_run(runs[2, seed].run_id).data.tags
        assert tags.get("continued_from") == runs[1, seed].run_id, seed
    assert len(MEMORY.states) == 4
    sweep.on_multirun_end(cfg)
    assert len(MEMORY.states) == 0
    assert not list(Path(cfg.paths.cache_dir).rglob("*.ckpt"))


def test_memory_states_past_the_limit_move_to_disk_and_still_continue(tiny_text_cfg):
    common = ("data.n=16", "trainer.limit_val_batches=1", "budget.continuation_memory_mb=0.001")
    cfg = tiny_text_cfg(*common)
    sweep = SweepStates()
    sweep.on_multirun_start(cfg)
    first = [train(tiny_text_cfg(*common, f"seed={s}", "trainer.max_epochs=1")) for s in (0, 1)]
    assert len(MEMORY.states) == 1  # the older one moved to disk
    assert len(list(Path(cfg.paths.cache_dir).rglob("epoch_1.ckpt"))) == 1
    again = [train(tiny_text_cfg(*common, f"seed={s}", "trainer.max_epochs=2")) for s in (0, 1)]
    client = MlflowClient(cfg.tracking.uri)
    for a, b in zip(first, again, strict=True):
        assert client.get_run(b.run_id).data.tags.get("continued_from") == a.run_id
    sweep.on_multirun_end(cfg)
    assert not list(Path(cfg.paths.cache_dir).rglob("*.ckpt"))


def test_runs_with_loader_workers_and_augmentation_are_tagged_not_exact(make_cfg):
    from finetune_budget.training.continuation import why_not_exact

    assert why_not_exact(make_cfg("task=image_image", "data.num_workers=2")) is not None
    assert why_not_exact(make_cfg("task=image_image", "data.num_workers=0")) is None
    assert why_not_exact(make_cfg("data.num_workers=2")) is None  # text: nothing random in workers


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


def test_disk_store_keeps_the_states_of_the_most_recent_earlier_configs_only(tmp_path):
    store = EpochStore(tmp_path, max_keys=2)
    for i, key in enumerate(["a", "b", "c"]):
        store.put(key, 1, f"run-{key}", _FakeTrainer())
        os.utime(store.root / key / "state.json", (1000 + i, 1000 + i))
    store.put("c", 2, "run-c2", _FakeTrainer())  # the newest, and one more: "a" goes
    assert store.get("a") is None
    assert store.get("b").epoch == 1
    assert (store.get("c").epoch, store.get("c").run_id) == (2, "run-c2")
    assert sorted(p.name for p in (store.root / "c").iterdir()) == ["epoch_2.ckpt", "state.json"]


@pytest.mark.parametrize(
    ("mode", "launcher", "expected"),
    [
        ("MULTIRUN", "hydra._internal.core_plugins.basic_launcher.BasicLauncher", "memory"),
        ("MULTIRUN", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "disk"),
        ("RUN", "hydra._internal.core_plugins.basic_launcher.BasicLauncher", "memory"),
    ],
)
def test_auto_store_is_memory_in_process_and_disk_for_launchers_of_other_processes(
    tiny_text_cfg, mode, launcher, expected
):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from finetune_budget.training.continuation import store_kind
    from tests.conftest import CONF

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = mode
        cfg.hydra.launcher = {"_target_": launcher}
    HydraConfig.instance().set_config(cfg)
    try:
        assert store_kind(cfg) == expected
        assert store_kind(tiny_text_cfg("budget.continuation_store=disk")) == "disk"
    finally:
        HydraConfig.instance().cfg = None


def test_a_kept_state_is_the_finished_jobs_tensors_and_the_job_that_continues_it_owns_it(
    tmp_path,
):
    """No copy when a job's state is kept (the job is over), nor when the next job loads it:
    load_state_dict copies the weights into that job's module, so the kept weights stay as they
    were, and AdamW takes the kept moments as they are and updates them in place, so the state
    is that job's from then on. Where that job does not finish (it would replace the state with
    its own), the changed state is not continued from again; nor is a state whose kept weights
    changed afterwards."""
    import torch

    from finetune_budget.training.continuation import EpochStore, MemoryStore

    def finished_job(weight: float) -> dict:
        net = torch.nn.Linear(3, 1, bias=False)
        with torch.no_grad():
            net.weight.fill_(weight)
        opt = torch.optim.AdamW(net.parameters(), lr=0.1)
        net(torch.ones(1, 3)).sum().backward()
        opt.step()
        kept = {"state_dict": {k: v.detach() for k, v in net.state_dict().items()}}
        kept["optimizer_states"] = [opt.state_dict()]
        return kept

    store, spill = MemoryStore(), EpochStore(tmp_path)
    kept = finished_job(1.0)
    before = copy.deepcopy(kept)
    store.put("k", 2, "run-a", kept, limit_mb=100, spill=spill)
    assert store.states["k"][1]["state_dict"]["weight"] is kept["state_dict"]["weight"]
    # the next job: a fresh module and optimizer loading the state, one more step in place
    loaded = store.checkpoint("k")
    assert loaded is not kept and loaded["optimizer_states"][0] is not kept["optimizer_states"][0]
    job = torch.nn.Linear(3, 1, bias=False)
    job.load_state_dict(loaded["state_dict"])
    job_opt = torch.optim.AdamW(job.parameters(), lr=0.1)
    job_opt.load_state_dict(loaded["optimizer_states"][0])
    assert (
        job_opt.state[job.weight]["exp_avg"] is kept["optimizer_states"][0]["state"][0]["exp_avg"]
    )
    job(torch.ones(1, 3)).sum().backward()
    job_opt.step()
    # the step equals one from a copy of the state: AdamW's update by hand from the kept moments
    b1, b2, lr, eps, wd = 0.9, 0.999, 0.1, 1e-8, 0.01
    m = b1 * before["optimizer_states"][0]["state"][0]["exp_avg"] + (1 - b1) * 1.0
    v = b2 * before["optimizer_states"][0]["state"][0]["exp_avg_sq"] + (1 - b2) * 1.0
    w = before["state_dict"]["weight"] * (1 - lr * wd)
    w = w - lr * (m / (1 - b1**2)) / ((v / (1 - b2**2)).sqrt() + eps)
    torch.testing.assert_close(job.weight.detach(), w)
    torch.testing.assert_close(kept["optimizer_states"][0]["state"][0]["exp_avg"], m)
    assert torch.equal(kept["state_dict"]["weight"], before["state_dict"]["weight"])
    assert store.get("k") is None and "k" not in store.states  # the job did not finish
    # a state whose kept weights changed after its job ended is not continued from either
    other = finished_job(2.0)
    store.put("k2", 1, "run-b", other, limit_mb=100, spill=spill)
    assert store.get("k2") is not None
    other["state_dict"]["weight"].mul_(2.0)
    assert store.get("k2") is None and "k2" not in store.states
