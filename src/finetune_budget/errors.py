"""Errors a user can fix. Each message is one line that says what is wrong and how to fix it."""

from __future__ import annotations


class BudgetError(Exception):
    """Bad input or configuration: shown as one line, no traceback."""


class DataError(BudgetError):
    """A data set is missing, empty, malformed or smaller than asked for."""


class ModelError(BudgetError):
    """An unknown model name or an unloadable checkpoint."""


class ConfigError(BudgetError):
    """A config value that does not fit (unknown option, wrong combination)."""


class DivergedError(BudgetError):
    """The training loss became NaN or infinite."""


def one_line(error: BaseException) -> str:
    """The error's message on one line. An error re-raised from a DataLoader worker carries the
    worker's whole traceback; its last line holds the original message."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if lines[0].startswith("Caught ") and "worker" in lines[0] and len(lines) > 1:
        last = lines[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return lines[0]
