"""``@task(log_prints=True)``: what the task's function prints becomes a log record.

Prefect's option, done Prefect's way: ``builtins.print`` is replaced (once, the first time
such a task runs) by a function that, in a thread running a ``log_prints`` task, logs the
printed text at INFO on ``sync_worker.task_runs`` instead of writing it, and otherwise calls
the original ``print``. Scoped per thread (a worker runs several tasks at once, only some of
them ``log_prints``): prints from threads the task starts itself are written as usual, and
so are prints to any ``file=`` other than standard output.
"""
from __future__ import annotations

import builtins
import functools
import io
import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("sync_worker.task_runs")

_original_print = builtins.print
_local = threading.local()
_install_lock = threading.Lock()
_installed = False


def _print(*values: object, sep: str | None = " ", end: str | None = "\n", file: Any = None,
           flush: bool = False) -> None:
    label = getattr(_local, "label", None)
    if label is None or (file is not None and file is not sys.stdout):
        _original_print(*values, sep=sep, end=end, file=file, flush=flush)
        return
    text = io.StringIO()
    _original_print(*values, sep=sep, end="", file=text)
    logger.info("Task run %s - %s", label, text.getvalue())


def _install() -> None:
    global _installed
    with _install_lock:
        if not _installed:
            builtins.print = _print
            _installed = True


def printing_to_log(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
    """``fn``, with what it prints in its own thread logged as the run ``label``'s."""
    _install()

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        outer = getattr(_local, "label", None)
        _local.label = label
        try:
            return fn(*args, **kwargs)
        finally:
            _local.label = outer

    return call


__all__ = ["printing_to_log"]
