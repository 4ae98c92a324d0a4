"""Sweeps that survive a crash: finished points are reused, runs left RUNNING by a dead process are
marked KILLED, the ROI table counts each (config, seed) once, parallel sweeps share one store."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from finetune_budget import __version__
from finetune_budget.errors import DataError
from finetune_budget.tracking import query
from finetune_budget.tracking.mlflow_run import experiment_id, mark_stale_runs, process_tags
from finetune_budget.tracking.resume import point_key, save_checkpoint_atomically
from finetune_budget.training.run import run_config, train
from tests.conftest import ROOT, store_uri

EXPERIMENT = "finetune-budget"


@pytest.fixture(autouse=True)
def _artifacts_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _train_runs(uri: str, status: str | None = None) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    query_ = "tags.run_type = 'train'" + (f" and attributes.status = '{status}'" if status else "")
    return client.search_runs([exp.experiment_id], query_, max_results=1000)


def test_a_finished_point_is_reused_and_rerun_forces_a_new_run(tiny_text_cfg):
    cfg = tiny_text_cfg()
    first = train(cfg)
    again = train(tiny_text_cfg())
    assert again.reused and again.run_id == first.run_id
    assert [r["epoch"] for r in again.history] == [0, 1]
    assert again.history[1]["val/mrr_at_20"] == pytest.approx(first.history[1]["val/mrr_at_20"])
    assert len(_train_runs(cfg.tracking.uri)) == 1
    forced = train(tiny_text_cfg("budget.rerun=true"))
    assert not forced.reused and forced.run_id != first.run_id
    assert len(_train_runs(cfg.tracking.uri, "FINISHED")) == 2
    other_seed = train(tiny_text_cfg("seed=1"))
    assert not other_seed.reused


def test_a_point_is_its_config_and_version_not_where_it_is_stored(tiny_text_cfg, make_cfg):
    base = point_key(run_config(tiny_text_cfg()))
    moved = tiny_text_cfg("tracking.run_name=x", "tracking.experiment=other")
    moved.paths.cache_dir = "/elsewhere"
    moved.tracking.uri = "sqlite:///elsewhere.db"
    assert point_key(run_config(moved)) == base
    for change in ("data.n=32", "seed=1", "trainer.max_epochs=2", "optim.optimizer.lr=1e-3"):
        assert point_key(run_config(tiny_text_cfg(change))) != base, change
    assert point_key(run_config(tiny_text_cfg()), version=__version__ + "+1") != base


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_running_runs_of_dead_processes_are_marked_killed(tmp_path):
    uri = store_uri(tmp_path / "mlflow.db")
    client = MlflowClient(uri)
    exp = experiment_id(client, EXPERIMENT, stale_after_s=None)
    host = socket.gethostname()
    dead = client.create_run(exp, tags={"host": host, "pid": str(_dead_pid())}).info.run_id
    alive = client.create_run(exp, tags=process_tags()).info.run_id
    # a pid that runs now, but is another process than the one that wrote the run
    reused_pid = client.create_run(
        exp, tags={"host": host, "pid": str(os.getpid()), "pid_started": "other-boot:1"}
    ).info.run_id
    week_s = 7 * 24 * 3600
    old_ms = int((time.time() - week_s) * 1000)
    far_old = client.create_run(exp, start_time=old_ms, tags={"host": "node-7", "pid": "1"})
    far_new = client.create_run(exp, tags={"host": "node-7", "pid": "1"})

    assert sorted(mark_stale_runs(client, exp, stale_after_s=None)) == sorted([dead, reused_pid])
    status = {r: client.get_run(r).info.status for r in (dead, alive, reused_pid)}
    assert status == {dead: "KILLED", alive: "RUNNING", reused_pid: "KILLED"}
    assert "gone" in client.get_run(dead).data.tags["error"]
    # other hosts' runs: left alone without a timeout, and while younger than it
    assert client.get_run(far_old.info.run_id).info.status == "RUNNING"
    assert mark_stale_runs(client, exp, stale_after_s=3 * 24 * 3600) == [far_old.info.run_id]
    assert client.get_run(far_new.info.run_id).info.status == "RUNNING"
    assert "stale_after_s" in client.get_run(far_old.info.run_id).data.tags["error"]


def test_the_check_reads_the_users_stale_after_s(make_cfg, capsys):
    """`mode=check` calls another host's 2-hour-old RUNNING run left behind under
    tracking.stale_after_s=3600, not under the default of three days."""
    from finetune_budget.app.modes import check_mode

    cfg = make_cfg(f"tracking.experiment={EXPERIMENT}")
    client = MlflowClient(cfg.tracking.uri)
    exp = experiment_id(client, EXPERIMENT, stale_after_s=None)
    two_hours_ago_ms = int((time.time() - 2 * 3600) * 1000)
    client.create_run(exp, start_time=two_hours_ago_ms, tags={"host": "node-7", "pid": "1"})
    assert cfg.tracking.stale_after_s == 3 * 24 * 3600  # conf/train.yaml
    assert check_mode(cfg) == []
    cfg.tracking.stale_after_s = 3600
    with pytest.raises(DataError, match="1 problem"):
        check_mode(cfg)
    [problem] = capsys.readouterr().out.splitlines()[1:]
    assert "left RUNNING" in problem and "stale_after_s=3600" in problem


@pytest.mark.parametrize("n_tags", [2, 101])
def test_steps_and_tags_go_in_one_mlflow_call_where_they_fit(tmp_path, monkeypatch, n_tags):
    """A continued run logs its earlier epochs and how epoch 0 was got in one log_batch; more
    tags than one batch takes (MLflow: 100) still all arrive, in more calls."""
    from finetune_budget.tracking.mlflow_run import TrackedRun

    uri = store_uri(tmp_path / "mlflow.db")
    client = MlflowClient(uri)
    exp = experiment_id(client, EXPERIMENT, stale_after_s=None)
    run_id = client.create_run(exp).info.run_id
    calls = []
    real = client.log_batch
    monkeypatch.setattr(client, "log_batch", lambda *a, **k: calls.append(k) or real(*a, **k))
    steps = {e: {"val/mrr_at_20": 0.5 + e / 10, "time/train_s": 2.0 * e} for e in range(4)}
    tags = {f"tag{i}": i for i in range(n_tags)}
    TrackedRun(client, run_id, exp, uri).log_steps(steps, tags=tags)
    assert len(calls) == (1 if n_tags <= 100 else 3)  # metrics; tags in two batches of <= 100
    history = client.get_metric_history(run_id, "val/mrr_at_20")
    assert sorted((m.step, m.value) for m in history) == [(e, 0.5 + e / 10) for e in range(4)]
    logged = client.get_run(run_id).data.tags
    assert all(logged[f"tag{i}"] == str(i) for i in range(n_tags))


def test_the_roi_table_counts_each_config_and_seed_once_the_latest_run(tiny_text_cfg):
    cfg = tiny_text_cfg()
    train(cfg)
    latest = train(tiny_text_cfg("budget.rerun=true")).run_id
    other_seed = train(tiny_text_cfg("seed=1")).run_id
    df = query.roi_table(cfg.tracking.uri, EXPERIMENT)
    assert sorted(df["run_id"].unique()) == sorted([latest, other_seed])
    assert df.attrs["duplicates_skipped"] == 1
    assert "1 duplicate run(s) skipped" in df.attrs["notes"][0]
    assert len(df[(df["seed"] == 0) & (df["epoch"] == 1)]) == 1


class _FullDisk:
    is_global_zero = True

    def save_checkpoint(self, path, **kwargs):
        Path(path).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")


def test_a_failed_checkpoint_write_keeps_the_earlier_checkpoint(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    path.parent.mkdir()
    path.write_bytes(b"the earlier checkpoint")
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint_atomically(_FullDisk(), path)
    assert path.read_bytes() == b"the earlier checkpoint"
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def _sweep(tmp_path: Path, *overrides: str, store: str = "mlflow.db", name: str = "multirun"):
    return [
        sys.executable,
        "train.py",
        "-m",
        "model=tiny_bert",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "eval.batch_size=64",
        "logger=none",
        "tracking.save_checkpoint=false",
        f"tracking.uri=sqlite:///{tmp_path / store}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.sweep.dir={tmp_path / name}",
        *overrides,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow  # a long integration test: `make test` runs it, `make test-fast` not
def test_a_sweep_killed_mid_job_reruns_only_the_missing_points(tmp_path):
    """kill -9 of a real sweep during its second job, then the same command again."""
    # Epoch states on disk: in-memory states (the default for one process) die with the sweep.
    # data.n=128, not 32: the second job runs long enough to be killed before it saves its own
    # epoch-4 state (at 32 a loaded machine once saw it RUNNING only as it was saving).
    cmd = _sweep(
        tmp_path, "data.n=128", "trainer.max_epochs=1,4", "budget.continuation_store=disk"
    )
    uri = store_uri(tmp_path / "mlflow.db")
    client = MlflowClient(uri)  # the store exists before the sweep starts: no race creating it
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            exp = client.get_experiment_by_name(EXPERIMENT)
            if exp is not None and client.search_runs(
                [exp.experiment_id],
                "params.`trainer.max_epochs` = '4' and attributes.status = 'RUNNING'",
            ):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the sweep ended before its second job could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    (killed,) = _train_runs(uri, "RUNNING")
    (first,) = _train_runs(uri, "FINISHED")

    out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert f"reused run {first.info.run_id}" in text
    assert "1 of 2 points reused" in text
    runs = _train_runs(uri)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert sorted(int(r.data.params["trainer.max_epochs"]) for r in finished) == [1, 4]
    assert {r.info.run_id: r.info.status for r in runs if r not in finished} == {
        killed.info.run_id: "KILLED"
    }
    assert "gone" in client.get_run(killed.info.run_id).data.tags["error"]
    (longer,) = [r for r in finished if r.data.params["trainer.max_epochs"] == "4"]
    assert longer.data.tags.get("continued_from") == first.info.run_id  # the epoch-1 state
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    parents = client.search_runs([exp], "tags.run_type = 'sweep'", order_by=["start_time ASC"])
    assert [p.info.status for p in parents] == ["KILLED", "FINISHED"]
    df = query.roi_table(uri, EXPERIMENT)
    assert df.groupby("epochs")["run_id"].nunique().to_dict() == {1: 1, 4: 1}
    assert df.attrs["duplicates_skipped"] == 0
    swept = query.roi_table(uri, EXPERIMENT, parent_run_id=parents[1].info.run_id)
    assert sorted(swept["run_id"].unique()) == sorted(r.info.run_id for r in finished)


@pytest.mark.slow  # a long integration test: `make test` runs it, `make test-fast` not
def test_two_sweeps_share_one_sqlite_store_and_cache(tmp_path):
    procs = [
        subprocess.Popen(
            _sweep(tmp_path, f"data.n={a},{b}", "trainer.max_epochs=1,2", name=f"multirun{i}"),
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, (a, b) in enumerate([(32, 40), (48, 56)])
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, text in zip(procs, outputs, strict=True):
        assert p.returncode == 0, text[-3000:]
        assert "database is locked" not in text
    uri = store_uri(tmp_path / "mlflow.db")
    runs = _train_runs(uri)
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 8
    points = {(r.data.params["data.n"], r.data.params["trainer.max_epochs"]) for r in runs}
    assert points == {(str(n), str(e)) for n in (32, 40, 48, 56) for e in (1, 2)}
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    parents = client.search_runs([exp], "tags.run_type = 'sweep'")
    assert sorted(p.info.status for p in parents) == ["FINISHED", "FINISHED"]
