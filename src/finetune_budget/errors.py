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
