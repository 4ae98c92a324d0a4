"""Two cores for the report: its curve fits and figures are seconds of single-threaded numpy and
matplotlib each. `in_two_processes(tasks)` runs every other task in a forked process (it shares
this one's memory, so only the results are pickled back) while this process runs the rest; the
results are the same as one process computing them all, in order. One process where the machine
has one core or no fork, or in a daemonic process (the same results, serially).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from typing import Any

Task = tuple[Callable[..., Any], tuple]  # a function and its arguments


def _run(tasks: Sequence[Task]) -> list[Any]:
    return [function(*args) for function, args in tasks]


def _run_and_send(tasks: Sequence[Task], sender) -> None:
    try:
        result = ("ok", _run(tasks))
    except BaseException as e:  # noqa: BLE001 - the parent raises it
        result = ("error", f"{type(e).__name__}: {e}")
    sender.send(result)


def in_two_processes(tasks: Sequence[Task]) -> list[Any]:
    """Each task's result, in the order of `tasks`."""
    if len(tasks) < 2 or (os.cpu_count() or 1) < 2:
        return _run(tasks)
    if "fork" not in multiprocessing.get_all_start_methods():
        return _run(tasks)
    if multiprocessing.current_process().daemon:  # a daemonic process may not start children
        return _run(tasks)
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    worker = context.Process(target=_run_and_send, args=(tasks[1::2], sender), daemon=True)
    worker.start()
    sender.close()
    try:
        mine = _run(tasks[0::2])
    finally:
        try:
            status, theirs = receiver.recv()
        except EOFError:
            status, theirs = "error", f"the forked process exited with code {worker.exitcode}"
        worker.join()
    if status != "ok":
        raise RuntimeError(f"a task of the forked process failed: {theirs}")
    return [mine[i // 2] if i % 2 == 0 else theirs[i // 2] for i in range(len(tasks))]
