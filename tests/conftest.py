"""Shared fixtures: configs composed the way train.py composes them, with a temporary MLflow store,
output and cache directories, and tiny random models."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
DATA_DIR = Path(os.environ.get("FINETUNE_BUDGET_DATA_DIR", ROOT.parent / "shared" / "data"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# pytest-xdist workers (make test) share the cores: each worker's torch gets its share of threads
# instead of every worker starting one thread per core. Set before torch is imported.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))


@functools.cache
def _empty_store() -> Path:
    """An MLflow SQLite store with its tables made, once per test process: MLflow's schema
    migrations take seconds for each new store, a copy of the file milliseconds."""
    from mlflow.tracking import MlflowClient

    folder = tempfile.mkdtemp(prefix="empty-mlflow-")
    atexit.register(shutil.rmtree, folder, True)  # the test process's copy source, not kept
    path = Path(folder) / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def store_uri(db: Path) -> str:
    """`sqlite:///<db>`; where the file does not exist yet it starts as a copy of an empty store
    (what MLflow would make on first use, made once)."""
    if not db.exists():
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_empty_store(), db)
    return f"sqlite:///{db}"


def offline_env() -> dict[str, str]:
    """The environment of a script a test starts: offline hub, one thread per process."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }


def run_train_py(
    tmp_path: Path, *overrides: str, timeout: float = 600
) -> subprocess.CompletedProcess:
    """`python train.py <overrides>` as a user runs it, into tmp_path's MLflow store (mlflow.db),
    cache, run and sweep folders, without a progress bar."""
    cmd = [
        sys.executable,
        "train.py",
        *overrides,
        "trainer.enable_progress_bar=false",
        f"tracking.uri={store_uri(tmp_path / 'mlflow.db')}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'outputs'}",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
    ]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def run_workers(commands: Sequence[Sequence[str]], timeout: float = 900) -> list[str]:
    """Start the commands at once (search workers), wait for all; their outputs. Fails the test
    with their last lines when any exits non-zero."""
    procs = [
        subprocess.Popen(
            list(cmd),
            cwd=ROOT,
            env=offline_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for cmd in commands
    ]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert codes == [0] * len(procs), "\n".join(o[-6000:] for o in outputs)
    return outputs


def compose_config(
    overrides: Sequence[str], tmp_path: Path, config_name: str = "train"
) -> DictConfig:
    """conf/<config_name>.yaml with overrides, paths and tracking pointed into tmp_path."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.data_dir = str(DATA_DIR)
        cfg.paths.output_dir = str(tmp_path / "output")
        cfg.paths.cache_dir = str(tmp_path / "cache")
        cfg.tracking.uri = store_uri(tmp_path / "mlflow.db")
        if not any(o.startswith("tracking.log_model=") for o in overrides):
            cfg.tracking.log_model = False  # logging a model costs seconds; tests opt in
        if "trainer" in cfg:
            cfg.trainer.enable_progress_bar = False
    return cfg


@pytest.fixture(autouse=True)
def _no_hydra_run_left_over():
    """A test that sets Hydra's run config (test_scale_out's launcher tests) would leave it set
    for the next test of its worker, which then runs as a job of `python train.py` without -m
    (no epoch state kept for later jobs): each test starts outside a Hydra run, as a process
    does."""
    yield
    HydraConfig.instance().cfg = None


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    def make(*overrides: str, config_name: str = "train") -> DictConfig:
        return compose_config(overrides, tmp_path, config_name)

    return make


TINY = ("model=tiny_bert", "trainer.accelerator=cpu", "trainer.precision=32-true")


@pytest.fixture
def tiny_text_cfg(make_cfg) -> Callable[..., DictConfig]:
    """Tiny random BERT on a small CLINC150 subset, one epoch, a short held-out slice."""

    def make(*overrides: str) -> DictConfig:
        return make_cfg(
            *TINY,
            "data.n=64",
            "trainer.max_epochs=1",
            "trainer.limit_val_batches=2",
            "eval.batch_size=64",
            "tracking.save_checkpoint=false",
            *overrides,
        )

    return make


def requires_data(*names: str):
    missing = [n for n in names if not (DATA_DIR / n).exists()]
    return pytest.mark.skipif(
        bool(missing), reason=f"data sets not found in {DATA_DIR}: {missing}"
    )


# The order `make test`'s two pytest-xdist workers take the test files in (`--dist loadfile
# --no-loadscope-reorder`: one file per worker at a time; xdist hands a worker its next file once
# its current one has 2 or fewer tests left). The long files first, so that the short ones fill
# the end and both workers finish together (they ended within 3 s of each other in the runs timed
# per test); files that start several processes at once (M) alternate with files of one process
# (S), so that two of them seldom run together and oversubscribe the two cores. Worker seconds
# per file: three runs of `--durations=0` on the 2-core machine. Files not listed run after, in
# their usual order.
FILE_ORDER = (
    "test_performance.py",  # S 134-141 s
    "test_scale_out.py",  # M 71-85 s
    "test_session_invariants.py",  # S 103-127 s
    "test_ddp.py",  # M 65-80 s
    "test_session_longer.py",  # S 149-214 s
    "test_resume.py",  # M 42-85 s
    "test_mlm_price.py",  # S 59-72 s
    "test_tuning.py",  # M 40-57 s
    "test_config.py",  # S 35-55 s
    "test_image_image.py",  # S 41-47 s
    "test_ui_check.py",  # S 39-66 s
    "test_text_image.py",  # M 42-53 s
    "test_budget_sweeper.py",  # S 37-39 s
    "test_families.py",  # M 29-33 s
    "test_report.py",  # S 25-28 s
    "test_continuation.py",  # S 21-27 s
    "test_plan.py",  # S 11-15 s
    "test_surface.py",  # S 20-27 s
    "test_training.py",  # S 15-16 s
    "test_export.py",  # S 14-20 s
    "test_errors.py",  # S 13-15 s
    "test_console.py",  # S 9 s
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the files in FILE_ORDER, the rest after in their usual order."""
    rank = {name: i for i, name in enumerate(FILE_ORDER)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
