"""The console speaks to the user: the run's progress, its table and its answers. The libraries'
chatter (Lightning's tips and device lines, transformers' load reports, MLflow's store set-up,
Optuna's trial lines, deprecation notes about the libraries' own internals) goes to the job's log
file only (`<output_dir>/<job>.log`, where Hydra's job logging writes); the libraries' errors and
the warnings that name a real problem still reach the console.

The entry points call `quiet_console()` at start-up (before the heavy imports: environment
defaults and the warnings hook) and the jobs `quiet_libraries()` once the libraries are imported
(MLflow and transformers install their own console handlers when imported). Imports nothing heavy.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import TextIO

# logger -> the lowest level that still reaches the console (all of it reaches the job's log).
CONSOLE_LEVELS = {
    "lightning": logging.WARNING,
    "lightning.pytorch": logging.WARNING,
    "lightning.fabric": logging.WARNING,
    "lightning_fabric": logging.WARNING,
    "pytorch_lightning": logging.WARNING,
    "mlflow": logging.WARNING,
    "sentence_transformers": logging.WARNING,
    "optuna": logging.WARNING,  # its trial lines: tune.py prints its own and the trials' table
    # its warnings are load reports (a pooler the embedding does not use reported MISSING) and
    # notes on its own API; a load that fails raises
    "transformers": logging.ERROR,
    "py.warnings": logging.WARNING,
}
# the least a logger records (to the log file): transformers' INFO dumps every config it reads
RECORD_LEVELS = {"transformers": logging.WARNING}
# warnings about the libraries' internals, which the user cannot act on: log file only
QUIET_WARNINGS: tuple[type[Warning], ...] = (
    DeprecationWarning,
    PendingDeprecationWarning,
    FutureWarning,
)
QUIET_WARNING_NAMES = ("PossibleUserWarning",)  # Lightning's "may or may not be a problem"
# Environment defaults (a variable the user set wins), for what runs before quiet_libraries can
# route it: MLflow's INFO lines before a job's log file exists (a sweep's parent run),
# transformers imported after it (its handler's level), and the progress bars of weight files
# written and read (transformers and huggingface_hub read it when imported) and of MLflow's
# artifact downloads (a sweep's end logs its model).
ENV_DEFAULTS = {
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
PACKAGE_DIR = str(Path(__file__).resolve().parent)


class JobLogHandler(logging.Handler):
    """Hands a library's record to the root logger's handlers as they are at that moment (Hydra
    sets them per job): to the file handlers always, to the console only from `console_level`
    up. Without root handlers, records from `console_level` up go to stderr."""

    def __init__(self, console_level: int) -> None:
        super().__init__()
        self.console_level = console_level

    def emit(self, record: logging.LogRecord) -> None:
        loud = record.levelno >= self.console_level
        handlers = logging.getLogger().handlers
        if not handlers:
            if loud and logging.lastResort is not None:
                logging.lastResort.handle(record)
            return
        for handler in handlers:
            if (loud or isinstance(handler, logging.FileHandler)) and (
                record.levelno >= handler.level
            ):
                handler.handle(record)


def is_quiet_warning(category: type[Warning], filename: str) -> bool:
    """A library's note about its own internals (never one raised by this package)."""
    if filename.startswith(PACKAGE_DIR):
        return False
    return issubclass(category, QUIET_WARNINGS) or any(
        cls.__name__ in QUIET_WARNING_NAMES for cls in category.__mro__
    )


def show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """warnings.showwarning: through the `py.warnings` logger, so the job's log file keeps every
    warning and the console only those that are not quiet (is_quiet_warning)."""
    if file is not None:  # written to a given stream: as Python does
        _SHOW_WARNING(message, category, filename, lineno, file, line)
        return
    text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
    level = logging.INFO if is_quiet_warning(category, filename) else logging.WARNING
    logging.getLogger("py.warnings").log(level, "%s", text)


_SHOW_WARNING = warnings.showwarning


def quiet_console() -> None:
    """At start-up, before the heavy imports: environment defaults (a variable the user set
    wins), warnings through the log (show_warning) and the `py.warnings` logger routed."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    warnings.showwarning = show_warning
    _route("py.warnings")


def quiet_libraries() -> None:
    """Once the libraries are imported (idempotent): their loggers write to the job's log file and
    to the console from CONSOLE_LEVELS up; transformers' own handler and progress bars off."""
    quiet_console()
    if "transformers" in sys.modules:  # else ENV_DEFAULTS hold when it is imported
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()
        hf_logging.disable_progress_bar()
    for name in CONSOLE_LEVELS:
        _route(name)


def _route(name: str) -> None:
    logger = logging.getLogger(name)
    logger.handlers = [JobLogHandler(CONSOLE_LEVELS[name])]
    logger.propagate = False
    logger.setLevel(RECORD_LEVELS.get(name, logging.INFO))
