"""Two cores for the report: its curve fits and figures are seconds of single-threaded numpy and
matplotlib each. `in_two_processes(tasks)` runs the tasks in this process and a forked one (it
shares this one's memory, so only the results are pickled back): each takes the next task not yet
taken, so neither waits on the other's longer tasks. The results are the same as one process
computing them all, in order. `alongside`, where given, runs in this process first, while the
forked one starts on the tasks (the sweep logs its chosen model while the figures are drawn).
One process where the machine has one core or no fork, in a daemonic process, or where
`speed.forked_report=false` (the same results, serially, `alongside` first).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from typing import Any

from finetune_budget.speed.switches import enabled

Task = tuple[Callable[..., Any], tuple]  # a function and its arguments


def _take(tasks: Sequence[Task], taken) -> dict[int, Any]:
    """Run the tasks not yet taken (`taken`: the shared index of the next one), one at a time."""
    results: dict[int, Any] = {}
    while True:
        with taken.get_lock():
            i = taken.value
            taken.value += 1
        if i >= len(tasks):
            return results
        function, args = tasks[i]
        results[i] = function(*args)


def _take_and_send(tasks: Sequence[Task], taken, sender) -> None:
    try:
        result = ("ok", _take(tasks, taken))
    except BaseException as e:  # noqa: BLE001 - the parent raises it
        with taken.get_lock():  # no more tasks for anyone: the call fails anyway
            taken.value = len(tasks)
        result = ("error", f"{type(e).__name__}: {e}")
    sender.send(result)


def _forks() -> bool:
    return (
        enabled("forked_report")
        and (os.cpu_count() or 1) >= 2
        and "fork" in multiprocessing.get_all_start_methods()
        and not multiprocessing.current_process().daemon  # a daemonic process may not fork
    )


def in_two_processes(
    tasks: Sequence[Task], alongside: Callable[[], Any] | None = None
) -> list[Any]:
    """Each task's result, in the order of `tasks`."""
    if (len(tasks) < 2 and alongside is None) or not tasks or not _forks():
        if alongside is not None:
            alongside()
        return [function(*args) for function, args in tasks]
    context = multiprocessing.get_context("fork")
    taken = context.Value("l", 0)
    receiver, sender = context.Pipe(duplex=False)
    worker = context.Process(target=_take_and_send, args=(tasks, taken, sender), daemon=True)
    worker.start()
    sender.close()
    try:
        if alongside is not None:
            alongside()
        mine = _take(tasks, taken)
    except BaseException:
        with taken.get_lock():  # the forked process stops after its current task
            taken.value = len(tasks)
        raise
    finally:
        try:
            status, theirs = receiver.recv()
        except EOFError:
            status, theirs = "error", f"the forked process exited with code {worker.exitcode}"
        worker.join()
    if status != "ok":
        raise RuntimeError(f"a task of the forked process failed: {theirs}")
    results = {**mine, **theirs}
    return [results[i] for i in range(len(tasks))]
