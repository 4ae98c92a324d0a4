"""Past one machine (docs/scale_out.md): sweeps as separate processes through Hydra's submitit
launcher, a PostgreSQL store behind an MLflow tracking server shared by two Optuna workers, the
SLURM launcher's request for multi-node DDP, torchrun's and SLURM's environments, optuna-dashboard.

The PostgreSQL tests start a throwaway cluster (scripts/pg_test_cluster.sh) and an MLflow server
(scripts/mlflow_server.sh) on 127.0.0.1 and stop them; they skip where PostgreSQL is not installed,
and fail instead with FINETUNE_BUDGET_REQUIRE_SERVICES=1 (.ci/run sets it).
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import optuna
import pandas as pd
import pytest
from conftest import CONF, DATA_DIR, ROOT, TINY, offline_env, requires_data, run_workers
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.utils import instantiate
from lightning.pytorch.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from submitit.core.utils import UncompletedJobError
from submitit.slurm.slurm import SlurmExecutor

from finetune_budget.app import cli, launchers
from finetune_budget.app.cli import is_main_process
from finetune_budget.app.launchers import group_epoch_budgets
from finetune_budget.errors import ConfigError
from hydra_plugins.finetune_budget_launcher.launcher import LocalLauncher, SlurmLauncher

FAST = (
    *TINY,
    "trainer.limit_val_batches=2",
    "eval.batch_size=64",
    "logger=none",
    "callbacks.lr_monitor=null",
    "trainer.enable_progress_bar=false",
    f"paths.data_dir={DATA_DIR}",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout_s: float) -> bytes:
    """The body of `url` once it answers 200, polling for up to timeout_s."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return r.read()
        except OSError as e:
            last = e
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout_s} s ({last})")


def _compose(*overrides: str) -> DictConfig:
    """conf/train.yaml with its hydra node (the launcher), outside a Hydra run."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


# -- grouping a config's epoch budgets into one submitit job --------------------------------------
def test_epoch_budgets_of_one_config_share_a_job_in_increasing_order() -> None:
    jobs = [
        ["data.n=100", "trainer.max_epochs=3"],
        ["data.n=100", "trainer.max_epochs=1"],
        ["data.n=500", "trainer.max_epochs=1"],
        ["data.n=100", "trainer.max_epochs=2"],
        ["data.n=500", "trainer.max_epochs=2"],
        ["data.n=500", "seed=1", "trainer.max_epochs=1"],  # another seed: another config
        ["data.n=100", "trainer.max_epochs=4"],  # not continuable (say, optim.schedule=cosine)
        ["data.n=100"],  # no epoch budget in its overrides
    ]
    continuable = [True] * 6 + [False, True]
    # by hand: n=100 epochs 1, 2, 3 (indices 1, 3, 0); n=500 epochs 1, 2 (2, 4); the rest alone
    assert group_epoch_budgets(jobs, continuable) == [[1, 3, 0], [2, 4], [5], [6], [7]]


def test_the_order_of_overrides_does_not_split_a_group() -> None:
    jobs = [["seed=0", "data.n=100", "trainer.max_epochs=2"], ["data.n=100", "seed=0",
            "trainer.max_epochs=1"]]  # fmt: skip
    assert group_epoch_budgets(jobs, [True, True]) == [[1, 0]]


class _Job:
    def __init__(self, job_id: str, results: list | None) -> None:
        self.job_id, self._results = job_id, results
        self.paths = SimpleNamespace(stderr=f"/x/{job_id}_0_log.err")

    def done(self) -> bool:
        return True

    def results(self) -> list:
        if self._results is None:  # what submitit raises for a job SLURM killed
            raise UncompletedJobError(f"Job {self.job_id} (task: 0) with path x\nhas not produced")
        return [self._results]


def test_a_group_whose_process_died_fails_its_jobs_and_the_sweep_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    launcher = LocalLauncher(
        submitit_folder=str(tmp_path), timeout_min=1, parallel="auto", gpu_memory_per_job_gb=8.0
    )  # as conf/hydra/launcher/local.yaml builds it
    launcher.config = OmegaConf.create(
        {"hydra": {"sweep": {"dir": str(tmp_path)}}, "trainer": {"devices": 1}}
    )
    jobs = [["data.n=1", "trainer.max_epochs=1"], ["data.n=2", "trainer.max_epochs=1"],
            ["data.n=1", "trainer.max_epochs=2"]]  # fmt: skip
    done = [JobReturn(status=JobStatus.COMPLETED, _return_value=v) for v in (0.5, 0.7)]

    class Executor:  # the local launcher submits one process per family (group of jobs)
        families: list[list[int]] = []

        def submit(self, fn, jobs, *rest):
            self.families.append([num for _, num in jobs])
            if len(self.families) == 1:
                return _Job("11", [(done[0], []), (done[1], ["DataError: bad"])])
            return _Job("12", None)

    monkeypatch.setattr(launcher, "_continuable", lambda overrides: [True] * len(overrides))
    monkeypatch.setattr(launcher, "_executor", lambda: Executor())
    monkeypatch.setattr(cli, "FAILED_JOBS", [])
    returns = launcher.launch(jobs, initial_job_idx=0)
    assert Executor.families == [[0, 2], [1]]
    assert [r.return_value for r in returns[::2]] == [0.5, 0.7]  # jobs 0 and 2, in job order
    assert math.isnan(returns[1].return_value)
    assert cli.FAILED_JOBS == [
        "DataError: bad",
        "submitit job 12 ended without a result (UncompletedJobError: Job 12 (task: 0) with "
        "path x); its log: /x/12_0_log.err",
    ]


# -- the SLURM launcher's request and the DDP environments ---------------------------------------
def test_slurm_launcher_requests_one_task_per_device_on_every_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # no srun here
    monkeypatch.setattr(launchers.shutil, "which", lambda name: f"/usr/bin/{name}")  # nor sbatch

    cfg = _compose(
        "hydra/launcher=slurm",
        "trainer=ddp",
        "trainer.devices=4",
        "trainer.num_nodes=2",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.timeout_min=30",
        f"hydra.sweep.dir={tmp_path}",
    )
    launcher_cfg = cfg.hydra.launcher
    assert launcher_cfg.tasks_per_node == cfg.trainer.devices == 4
    assert launcher_cfg.nodes == cfg.trainer.num_nodes == 2
    params = OmegaConf.to_container(launcher_cfg, resolve=True)
    assert (
        params.pop("_target_") == "hydra_plugins.finetune_budget_launcher.launcher.SlurmLauncher"
    )
    executor = SlurmLauncher(**params)._executor()
    sbatch = executor._executor._make_submission_file_text("python -m x", "uid")
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=30",
    ):
        assert line in sbatch.splitlines(), sbatch


def test_slurm_launcher_without_slurm_says_what_to_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launchers.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="sbatch is not on PATH.*hydra/launcher=local"):
        SlurmLauncher(submitit_folder="x")._executor()


def test_default_runs_ask_slurm_for_one_task_on_one_node() -> None:
    cfg = _compose("hydra/launcher=slurm")
    assert (cfg.hydra.launcher.nodes, cfg.hydra.launcher.tasks_per_node) == (1, 1)
    assert cfg.trainer.num_nodes == 1


def _trainer(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], *overrides: str):
    for key in [k for k in os.environ if k.startswith(("SLURM_", "TORCHELASTIC_"))]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = _compose(
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "trainer.default_root_dir=.",
        *overrides,
    )
    return instantiate(cfg.trainer, logger=False, enable_progress_bar=False)


def test_torchrun_environment_sets_rank_and_world_size(monkeypatch: pytest.MonkeyPatch) -> None:
    # what `torchrun --nnodes 1 --nproc_per_node 2 train.py trainer=ddp ...` gives its 2nd process
    env = {
        "TORCHELASTIC_RUN_ID": "test",
        "RANK": "1",
        "LOCAL_RANK": "1",
        "GROUP_RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
    }
    trainer = _trainer(monkeypatch, env, "trainer.devices=2")
    assert isinstance(trainer.strategy.cluster_environment, TorchElasticEnvironment)
    assert (trainer.global_rank, trainer.local_rank, trainer.world_size) == (1, 1, 2)
    assert not is_main_process()  # so it prints nothing and leaves MLflow to rank 0


def test_slurm_environment_of_a_two_node_job(monkeypatch: pytest.MonkeyPatch) -> None:
    # the 4th of 4 tasks of `sbatch --nodes=2 --ntasks-per-node=2` (srun sets these)
    env = {
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NAME": "train",
        "SLURM_NTASKS": "4",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_NNODES": "2",
        "SLURM_NODELIST": "node[1-2]",
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
    }
    trainer = _trainer(monkeypatch, env, "trainer.devices=2", "trainer.num_nodes=2")
    assert isinstance(trainer.strategy.cluster_environment, SLURMEnvironment)
    assert (trainer.global_rank, trainer.node_rank, trainer.local_rank) == (3, 1, 1)
    assert trainer.world_size == 4
    # more devices than SLURM started tasks on the node: Lightning's launch refuses, naming both
    wrong = _trainer(monkeypatch, env, "trainer.devices=4", "trainer.num_nodes=2")
    with pytest.raises(ValueError, match=r"devices=4.*ntasks-per-node=2"):
        wrong.strategy.launcher.launch(lambda: None)


# -- optuna-dashboard ----------------------------------------------------------------------------
def test_make_dashboard_serves_the_study(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="dash", storage=storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1) ** 2, n_trials=2)
    port = _free_port()
    proc = subprocess.Popen(
        ["make", "-s", "dashboard", f"OPTUNA_STORAGE={storage}", f"DASHBOARD_PORT={port}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        body = _get(f"http://127.0.0.1:{port}/api/studies", timeout_s=90)
        studies = json.loads(body)["study_summaries"]
        assert [s["study_name"] for s in studies] == ["dash"]
        assert b"<html" in _get(f"http://127.0.0.1:{port}/dashboard", timeout_s=10).lower()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


# -- PostgreSQL behind an MLflow server, and sweeps as separate processes ------------------------
def _postgres_missing() -> str | None:
    if not glob.glob("/usr/lib/postgresql/*/bin/pg_ctl") and not os.environ.get("PG_BIN"):
        return (
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/pg_ctl): "
            "apt install postgresql"
        )
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: initdb needs a non-root user"
    return None


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster: its URL without a database (append /optuna or /mlflow)."""
    reason = _postgres_missing()
    if reason:
        if os.environ.get("FINETUNE_BUDGET_REQUIRE_SERVICES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    folder = tempfile.mkdtemp(prefix="finetune-budget-pg-")  # under /tmp: the postgres user
    port = _free_port()  # can reach it when the tests run as root
    script = str(ROOT / "scripts" / "pg_test_cluster.sh")
    out = subprocess.run([script, "start", folder, str(port)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    try:
        yield f"postgresql://finetune_budget@127.0.0.1:{port}"
    finally:
        subprocess.run([script, "stop", folder], capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def tracking_server(postgres: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 with the PostgreSQL backend; artifacts on local disk."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    script = str(ROOT / "scripts" / "mlflow_server.sh")
    port = _free_port()
    out = subprocess.run(
        [script, "start", str(folder), str(port), f"{postgres}/mlflow"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        subprocess.run([script, "stop", str(folder)], capture_output=True, timeout=60)


def _runs(uri: str, experiment: str, query: str = "") -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment} in {uri}"
    return client.search_runs([exp.experiment_id], query, max_results=1000)


@pytest.mark.slow
@requires_data("clinc150")
def test_submitit_sweep_runs_separate_processes_into_the_tracking_server(
    tracking_server: str, tmp_path: Path
) -> None:
    experiment = "scale-out-sweep"
    sweep_dir = tmp_path / "multirun"
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        "hydra/launcher=local",
        *FAST,
        "data.n=32,99999",  # 99999 > the training items: that group's jobs fail
        "trainer.max_epochs=1..2",
        "tracking.save_checkpoint=false",
        f"tracking.uri={tracking_server}",
        f"tracking.experiment={experiment}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.sweep.dir={sweep_dir}",
        "hydra.callbacks.sweep_parent.report=false",  # the report is built below, by evaluate.py
    ]
    out = subprocess.run(
        cmd, cwd=ROOT, env=offline_env(), capture_output=True, text=True, timeout=900
    )
    log = out.stdout + out.stderr
    assert out.returncode == 1, log[-6000:]  # the failures came back from the job processes
    assert "4 jobs in 2 submitit jobs" in log
    assert "error in job #2: data.n=99999 is larger than the 15000 training items" in log
    # two processes (one per data.n), each with its result, none of them the launching process
    results = sorted(sweep_dir.glob(".submitit/*/*_result.pkl"))
    assert len(results) == 2, results

    runs = _runs(tracking_server, experiment, "tags.run_type = 'train'")
    by_budget = {(r.data.params["data.n"], r.data.params["trainer.max_epochs"]): r for r in runs}
    assert {k: r.info.status for k, r in by_budget.items()} == {
        ("32", "1"): "FINISHED",
        ("32", "2"): "FINISHED",
        ("99999", "1"): "FAILED",
        ("99999", "2"): "FAILED",
    }
    (parent,) = _runs(tracking_server, experiment, "tags.run_type = 'sweep'")
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    # the 2-epoch job ran after the 1-epoch job in its process and continued its state
    one, two = by_budget["32", "1"], by_budget["32", "2"]
    assert two.data.tags.get("continued_from") == one.info.run_id
    client = MlflowClient(tracking_server)
    first = [m.value for m in client.get_metric_history(one.info.run_id, "val/mrr_at_20")]
    again = [m.value for m in client.get_metric_history(two.info.run_id, "val/mrr_at_20")]
    assert again[:2] == first  # epochs 0 and 1 of the 2-epoch run are the 1-epoch run's

    # the report, read from the server only
    report_dir = tmp_path / "report"
    out = subprocess.run(
        [
            sys.executable,
            "evaluate.py",
            "mode=report",
            f"tracking.uri={tracking_server}",
            f"tracking.experiment={experiment}",
            f"report.out_dir={report_dir}",
            f"hydra.run.dir={tmp_path / 'report-run'}",
        ],
        cwd=ROOT,
        env=offline_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    table = pd.read_csv(report_dir / "roi_table.csv")
    # epoch 1 from the 1-epoch run, epoch 2 from the 2-epoch run; the failed runs left out
    assert sorted(zip(table["n"], table["epoch"], table["run_id"], strict=True)) == [
        (32, 1, one.info.run_id),
        (32, 2, two.info.run_id),
    ]
    (report_run,) = _runs(tracking_server, experiment, "tags.run_type = 'report'")
    artifacts = {a.path for a in client.list_artifacts(report_run.info.run_id)}
    assert {"report.html", "roi_table.csv"} <= artifacts  # uploaded through the server


@pytest.mark.slow
@requires_data("clinc150")
def test_two_tune_workers_share_a_postgres_study_through_the_tracking_server(
    postgres: str, tracking_server: str, tmp_path: Path
) -> None:
    experiment, storage = "scale-out-search", f"{postgres}/optuna"
    run_workers(
        [
            [
                sys.executable,
                "tune.py",
                "hparams_search=tiny",
                *FAST,
                "budget.continue_shorter_runs=false",
                "tune.pruner=none",
                "hydra.sweeper.n_trials=4",
                "data.n=32",
                "trainer.max_epochs=1",
                f"tune.worker={w}",
                f"hydra.sweeper.storage={storage}",
                f"tracking.uri={tracking_server}",
                f"tracking.experiment={experiment}",
                f"paths.cache_dir={tmp_path / 'cache'}",
                f"hydra.run.dir={tmp_path / f'worker{w}'}",
            ]
            for w in (0, 1)
        ]
    )
    study = optuna.load_study(study_name="tiny", storage=storage)
    trials = study.trials
    assert 4 <= len(trials) <= 5  # a worker may start one while the other ends the 4th
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    by_worker = {w: {t.number for t in trials if t.user_attrs["worker"] == w} for w in (0, 1)}
    assert by_worker[0] and by_worker[1] and not by_worker[0] & by_worker[1]
    runs = _runs(tracking_server, experiment, "tags.run_type = 'trial'")
    assert {r.info.run_id for r in runs} == {t.user_attrs["mlflow_run_id"] for t in trials}
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {
        study.user_attrs["mlflow_parent_run_id"]
    }
    assert all(r.info.status == "FINISHED" for r in runs)
    # each trial's run holds what it was given and what it scored
    for t in trials:
        run = next(r for r in runs if r.info.run_id == t.user_attrs["mlflow_run_id"])
        assert float(run.data.params["optim.optimizer.lr"]) == t.params["optim.optimizer.lr"]
        assert run.data.metrics["best/ndcg_at_20"] == pytest.approx(t.value)
