"""Tasks: what a run fine-tunes and on what, one module per task."""

from __future__ import annotations

from finetune_budget.tasks.task import TASKS, TaskParts, build_task

__all__ = ["TASKS", "TaskParts", "build_task"]
