"""Enforcing ``timeout_seconds`` for synchronous functions running in worker threads.

Python cannot kill a thread. What it can do is raise an exception *asynchronously* in
another thread (``PyThreadState_SetAsyncExc``): the exception is raised in that thread the
next time it executes Python bytecode and the interpreter checks for pending work
(function calls, loop iterations). So a timed-out task is interrupted:

- promptly while it runs Python code (loops, function calls, pure-Python libraries);
- only when it *returns to Python* if it is inside one blocking C call. Measured on
  CPython 3.11: ``time.sleep(3)`` interrupted at 0.5 s raises after the full 3 s (the
  sleep is not woken: async exceptions are not signals); ``threading.Event().wait(3)``
  and ``Lock.acquire`` likewise; ``for _ in range(30): time.sleep(0.1)`` raises within
  one 0.1 s step. A blocking socket read, a long C-extension computation (numpy, a
  regex) or a database driver call is interrupted only when it returns; one that never
  returns is never interrupted.
- never, if the function catches the exception (``except BaseException``/``except
  TimeoutError`` and carries on): the run is reported TimedOut anyway.

So :func:`call_with_timeout` does not depend on the interruption to *report*: the run
is reported at the deadline (the caller's ``on_timeout``), and the function's thread is
interrupted where Python can. The thread keeps its execution slot until the function
really returns, so the worker's concurrency limit counts threads actually busy.
"""
from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("sync_worker.timeouts")


class TaskRunTimeoutError(TimeoutError):
    """Raised inside a task's thread when its ``timeout_seconds`` has passed."""


def raise_in_thread(thread_id: int, exc_type: type[BaseException]) -> bool:
    """Schedule ``exc_type`` to be raised in the thread ``thread_id``; True if it was found."""
    modified = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc_type))
    if modified > 1:  # pragma: no cover - cannot happen with a valid id; undo as the C API asks
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), None)
        return False
    return modified == 1


def _clear_pending(thread_id: int) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), None)


class TimedCall:
    """The outcome of :func:`call_with_timeout`."""

    def __init__(self) -> None:
        self.result: Any = None
        self.exception: BaseException | None = None
        self.timed_out = False
        self.done = threading.Event()


def call_with_timeout(
    fn: Callable[..., Any],
    kwargs: dict[str, Any],
    timeout: float,
    *,
    on_timeout: Callable[[], None],
    name: str = "sync-worker-task",
) -> TimedCall:
    """Call ``fn(**kwargs)`` in a new thread; at ``timeout`` seconds call ``on_timeout``
    (here, in the caller's thread), interrupt the function where possible, then wait
    for the thread to end. Returns the outcome; ``timed_out`` tells whether the deadline
    passed before the function finished (its result or exception is then ignored)."""
    outcome = TimedCall()
    lock = threading.Lock()
    finished = False

    def target() -> None:
        nonlocal finished
        tid = threading.get_ident()
        try:
            try:
                outcome.result = fn(**kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the engine
                outcome.exception = exc
            with lock:
                finished = True
            # An interruption scheduled just before ``finished`` was set may still be
            # pending: clear it so it cannot fire in threading's own shutdown code.
            _clear_pending(tid)
        except TaskRunTimeoutError:
            with lock:
                finished = True
        finally:
            outcome.done.set()

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    if not outcome.done.wait(timeout):
        with lock:
            if not finished:
                outcome.timed_out = True
                raise_in_thread(thread.ident, TaskRunTimeoutError)
        if outcome.timed_out:
            on_timeout()
            if not outcome.done.is_set():
                logger.debug("Timed-out task thread %s still running; waiting for it to return", name)
    outcome.done.wait()
    thread.join()
    return outcome
