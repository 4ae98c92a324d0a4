"""The console speaks to the user (console.py): the libraries' chatter goes to the job's log file,
the project's lines and the problems reach the console."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import store_uri

from finetune_budget.console import CONSOLE_LEVELS, ENV_DEFAULTS, PACKAGE_DIR, quiet_libraries

ROOT = Path(__file__).resolve().parents[1]
CHATTER = (
    "litlogger",
    "GPU available",
    "TPU available",
    "LOAD REPORT",
    "MISSING",
    "Creating initial MLflow database tables",
    "is deprecated",
    "Saving model to",
    "Writing model shards",
    "Loading weights",
    "Downloading artifacts",
)


@pytest.fixture
def job_logging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[io.StringIO, Path]]:
    """The root logger as Hydra's job logging sets it (a console and the job's log file); the
    loggers, warnings hook and environment that quiet_libraries changes restored afterwards."""
    for key, value in ENV_DEFAULTS.items():
        monkeypatch.setenv(key, os.environ.get(key, value))
    root = logging.getLogger()
    saved_root = (root.handlers[:], root.level)
    loggers = {name: logging.getLogger(name) for name in CONSOLE_LEVELS}
    saved = {n: (lg.handlers[:], lg.propagate, lg.level) for n, lg in loggers.items()}
    hf_bars = None
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_bars = hf_logging.is_progress_bar_enabled()
    console, path = io.StringIO(), tmp_path / "train.log"
    stream, file_handler = logging.StreamHandler(console), logging.FileHandler(path)
    for handler in (stream, file_handler):
        handler.setFormatter(logging.Formatter("[%(name)s][%(levelname)s] - %(message)s"))
    root.handlers = [stream, file_handler]
    root.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings():  # restores warnings.showwarning
            warnings.simplefilter("always")
            yield console, path
    finally:
        file_handler.close()
        root.handlers, root.level = saved_root
        for name, (handlers, propagate, level) in saved.items():
            loggers[name].handlers, loggers[name].propagate = handlers, propagate
            loggers[name].setLevel(level)
        if hf_bars:
            hf_logging.enable_progress_bar()


def test_library_chatter_goes_to_the_log_file_and_problems_to_the_console(job_logging):
    console, log_file = job_logging
    quiet_libraries()
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    rank_zero.info("GPU available: False, used: False")
    rank_zero.info("💡 Tip: For seamless cloud logging, try installing litlogger")
    logging.getLogger("transformers.modeling_utils").warning("BertModel LOAD REPORT: MISSING")
    logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
    lib = "/venv/lib/python3.11/site-packages/lightning/pytorch/utilities/_pytree.py"
    warnings.warn_explicit(
        "`isinstance(treespec, LeafSpec)` is deprecated", DeprecationWarning, lib, 21
    )
    # what the user must see: the project's lines and warnings, the libraries' real problems
    logging.getLogger("finetune_budget.training.run").info("epoch 0 embedded 1024 held-out items")
    logging.getLogger("mlflow.tracking").warning("the artifact store cannot be reached")
    logging.getLogger("lightning.pytorch.trainer").error("the checkpoint cannot be written")
    warnings.warn_explicit("tokenizer has no pad token", UserWarning, lib, 30)
    ours = f"{PACKAGE_DIR}/training/run.py"
    warnings.warn_explicit("budget.max_train_s is deprecated", DeprecationWarning, ours, 9)

    shown, kept = console.getvalue(), log_file.read_text()
    for line in ("GPU available", "litlogger", "LOAD REPORT", "Creating initial", "LeafSpec"):
        assert line not in shown
        assert line in kept
    for line in (
        "epoch 0 embedded",
        "artifact store cannot be reached",
        "checkpoint cannot be written",
        "no pad token",
        "budget.max_train_s is deprecated",
    ):
        assert shown.count(line) == 1, line  # once: not also through a library's own handler
        assert line in kept


@pytest.mark.slow  # a long integration test: `make test` runs it, `make test-fast` not
def test_a_run_started_elsewhere_prints_its_lines_and_table_and_logs_the_chatter(tmp_path):
    """`python <checkout>/train.py` from another folder: it finds the data beside the checkout,
    and its console holds the project's lines and table only."""
    cmd = [
        sys.executable, str(ROOT / "train.py"), "model=tiny_bert", "data.n=32",
        "trainer.max_epochs=1", "trainer.limit_val_batches=2", "trainer.accelerator=cpu",
        "trainer.precision=32-true", "trainer.enable_progress_bar=false", "logger=none",
        "tracking.log_model=true", f"tracking.uri={store_uri(tmp_path / 'mlflow.db')}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    console = out.stdout + out.stderr
    assert out.returncode == 0, console[-3000:]
    for line in CHATTER:
        assert line not in console, line
    loggers = re.findall(r"^\[[^\]]*\]\[([\w.]+)\]\[\w+\]", console, flags=re.MULTILINE)
    assert loggers and all(name.startswith("finetune_budget") for name in loggers), loggers
    assert re.search(r"^MLflow run \w+ \(sqlite:", console, flags=re.MULTILINE)
    assert re.search(r"^epoch +val/mrr_at_20", console, flags=re.MULTILINE)  # the table
    kept = (tmp_path / "run" / "train.log").read_text()
    for line in ("litlogger", "GPU available", "LOAD REPORT"):
        assert line in kept, line
