"""Families in parallel (hydra/launcher=local): a sweep's independent config families (the jobs
that differ only in trainer.max_epochs continue one another; different data.n do not) run at once,
each in its own process pinned to a GPU or given its share of the cores, with continuation intact
and one MLflow parent. docs/scale_out.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DATA_DIR, ROOT, TINY, offline_env, requires_data, store_uri
from mlflow.tracking import MlflowClient

from finetune_budget.app.launchers import family_slots
from finetune_budget.errors import ConfigError


def test_a_cpu_machine_runs_one_family_per_core_with_one_thread_each() -> None:
    assert family_slots("auto", families=3, cores=2) == [(None, 1), (None, 1)]
    assert family_slots("auto", families=1, cores=2) == [(None, 2)]  # one family keeps both
    assert family_slots(1, families=3, cores=2) == [(None, 2)]


def test_gpus_take_as_many_families_as_their_free_memory_holds_spread_over_devices() -> None:
    # 20 GB free at 8 GB a family: 2 on GPU 0; 9 GB: 1 on GPU 1; 16 cores shared by the 3
    assert family_slots("auto", 5, 16, [20.0, 9.0], 8.0) == [(0, 5), (1, 5), (0, 5)]
    # a full GPU still runs one family; no more slots than families
    assert family_slots("auto", 1, 16, [2.0], 8.0) == [(0, 16)]
    # no more processes than cores
    assert len(family_slots("auto", 30, 4, [80.0], 8.0)) == 4


@pytest.mark.parametrize("bad", [0, -1, "two"])
def test_a_bad_parallel_says_what_to_give(bad: object) -> None:
    with pytest.raises(
        ConfigError, match="hydra.launcher.parallel=.*give an integer >= 1, or auto"
    ):
        family_slots(bad, families=2, cores=2)  # type: ignore[arg-type]


@pytest.mark.slow
@requires_data("clinc150")
def test_two_families_run_at_once_and_each_continues_its_own_runs(tmp_path: Path) -> None:
    uri = store_uri(tmp_path / "mlflow.db")
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        "hydra/launcher=local",
        "hydra.launcher.parallel=2",
        *TINY,
        "trainer.limit_val_batches=2",
        "eval.batch_size=64",
        "logger=none",
        "trainer.enable_progress_bar=false",
        f"paths.data_dir={DATA_DIR}",
        "data.n=32,48",
        "trainer.max_epochs=1..2",
        "tracking.save_checkpoint=false",
        f"tracking.uri={uri}",
        "tracking.experiment=families",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
        "hydra.callbacks.sweep_parent.report=false",
    ]
    out = subprocess.run(
        cmd, cwd=ROOT, env=offline_env(), capture_output=True, text=True, timeout=900
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    assert "2 families in 2 processes at a time" in log, log[-3000:]

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("families")
    runs = client.search_runs([exp.experiment_id], "tags.run_type = 'train'")
    by = {(r.data.params["data.n"], r.data.params["trainer.max_epochs"]): r for r in runs}
    assert sorted(by) == [("32", "1"), ("32", "2"), ("48", "1"), ("48", "2")]
    assert {r.info.status for r in runs} == {"FINISHED"}
    (parent,) = client.search_runs([exp.experiment_id], "tags.run_type = 'sweep'")
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    for n in ("32", "48"):  # within a family, the 2-epoch run continued the 1-epoch run
        one, two = by[n, "1"], by[n, "2"]
        assert two.data.tags.get("continued_from") == one.info.run_id
        first = [m.value for m in client.get_metric_history(one.info.run_id, "val/mrr_at_20")]
        again = [m.value for m in client.get_metric_history(two.info.run_id, "val/mrr_at_20")]
        assert again[:2] == first
    # at once: each family's first run started before the other family's last run ended
    span = {n: (by[n, "1"].info.start_time, by[n, "2"].info.end_time) for n in ("32", "48")}
    assert span["32"][0] < span["48"][1] and span["48"][0] < span["32"][1], span
