"""Worker side of cancelling a RUNNING run: which thread runs which run, and interrupting it.

The embedded server tells the worker holding a run ``{"type": "cancel", "task_run_id": ID}``
over the subscription socket (see ``server/cancellation.py``); the subscription's reader
thread calls :func:`request`. The engine runs each task function through :func:`guard`,
which records the thread it runs in; :func:`request` raises
:class:`sync_worker.exceptions.Cancelled` in that thread with the mechanism
``timeout_seconds`` uses (:func:`sync_worker.timeouts.raise_in_thread`), with the same limits:
prompt in Python code, only when a blocking C call returns, never if the task catches it.
The engine then reports CANCELLED.

Races, and how they end:

- the function catches ``Cancelled`` and returns: the run is reported CANCELLED anyway (its
  result is dropped), as a timeout is reported TimedOut however the function takes it;
- the cancel arrives before the function starts (the run is between delivery and its call):
  it is remembered, and :func:`guard` raises ``Cancelled`` instead of calling the function;
- the cancel arrives as the function returns: an interruption scheduled just before the
  function's thread left :func:`guard` is either delivered inside :func:`guard` (the run is
  reported CANCELLED: it was cancelled while running) or cleared there, so it can never fire
  later in the worker's own code;
- the cancel is for a run this process does not run (finished, or never here): remembered
  for a while (bounded), then forgotten.
"""
from __future__ import annotations

import ctypes
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from sync_worker.exceptions import Cancelled
from sync_worker.timeouts import raise_in_thread

logger = logging.getLogger("sync_worker.cancellation")

#: cancels remembered for runs not (yet) running here
MAX_PENDING = 10_000

_lock = threading.Lock()
_running: dict[str, int] = {}  # run id -> ident of the thread calling its function
#: runs whose thread was sent an interruption while in :func:`guard` (cleared there if it has
#: not fired: the clearing is a ctypes call, ~1 us, made only for these)
_interrupted: set[str] = set()
_pending: OrderedDict[str, None] = OrderedDict()


def request(task_run_id: Any) -> bool:
    """Interrupt the run's function if it runs in this process (True), else remember the
    request in case it is about to start (False)."""
    if not isinstance(task_run_id, str) or not task_run_id:
        logger.warning("Ignoring a cancel message without a task_run_id")
        return False
    with _lock:
        ident = _running.get(task_run_id)
        if ident is not None:
            _interrupted.add(task_run_id)
            raise_in_thread(ident, Cancelled)
            logger.info("Task run %s: cancellation requested; interrupting its thread", task_run_id)
            return True
        _pending[task_run_id] = None
        while len(_pending) > MAX_PENDING:
            _pending.popitem(last=False)
    logger.debug("Task run %s: cancellation requested; it is not running here (yet)", task_run_id)
    return False


def guard(task_run_id: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` made cancellable: call it as ``fn(**kwargs)``."""

    def call(**kwargs: Any) -> Any:
        ident = threading.get_ident()
        with _lock:
            if task_run_id in _pending:
                del _pending[task_run_id]
                raise Cancelled(f"task run {task_run_id} was cancelled before it started")
            _running[task_run_id] = ident
        try:
            value = fn(**kwargs)
        finally:
            with _lock:
                _running.pop(task_run_id, None)
                interrupted = task_run_id in _interrupted
                _interrupted.discard(task_run_id)
            if interrupted:
                # no new interruption can be scheduled now; drop one scheduled just before
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), None)
        if interrupted:
            # cancelled while running, and the function caught the interruption and returned:
            # CANCELLED anyway, as a timeout is TimedOut anyway (cancel() said it cancels)
            raise Cancelled(f"task run {task_run_id} was cancelled while running (its function caught the "
                            "interruption and returned; its result is dropped)")
        return value

    return call


def running() -> list[str]:
    """Run ids whose functions are executing in this process (tests, diagnostics)."""
    with _lock:
        return list(_running)
