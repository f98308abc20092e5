"""Run ``python -m MODULE ARGS...`` with a SIGTERM handled at the worst moment for its main thread.

    python tests/signal_window.py log:"are kept in" sync_worker server --port 0 --db q.db
    python tests/signal_window.py handler sync_worker worker mymodule:task

Why: a Python signal handler runs in the main thread, between two bytecodes of whatever it
was doing, so it may run while that code holds a lock. A handler that took the lock of the
``threading.Event`` the main thread was waiting on (``Event.set()``, or ``wait()`` again)
deadlocked: ``Event.wait`` holds its lock around ``Condition.wait``. In real life the signal
lands there rarely (a script looping on ``Event.wait`` with such a handler hung in 1 of 300
SIGTERMs; the server's CLI hung once in a run of the suite beside busy processes); here it
lands there every time.

Armed by the first argument: ``log:TEXT``, once a log message containing TEXT was emitted;
``handler``, once a Python function is installed as SIGTERM's handler. Then the main thread's
next ``threading.Event.wait`` raises SIGTERM while holding that Event's lock (the handler runs
before ``signal.raise_signal`` returns), or its next ``time.sleep`` raises it before sleeping.
Once only.
"""
from __future__ import annotations

import logging
import runpy
import signal
import sys
import threading
import time

_armed = False
_fired = False
_main = threading.main_thread()


def _arm() -> None:
    global _armed
    if not _fired:
        _armed = True


def _fire_here() -> bool:
    global _armed, _fired
    if _armed and threading.current_thread() is _main:
        _armed, _fired = False, True
        return True
    return False


def _install(trigger: str) -> None:
    if trigger.startswith("log:"):
        text = trigger[len("log:"):]
        original_log = logging.Logger._log

        def _log(self: logging.Logger, level: int, msg: object, args: object, *rest: object, **kwargs: object) -> None:
            original_log(self, level, msg, args, *rest, **kwargs)
            try:
                message = str(msg) % args if args else str(msg)
            except (TypeError, ValueError):
                message = str(msg)
            if text in message:
                _arm()

        logging.Logger._log = _log  # type: ignore[method-assign]
    elif trigger == "handler":
        original_signal = signal.signal

        def _signal(signum: int, handler: object) -> object:
            previous = original_signal(signum, handler)  # type: ignore[arg-type]
            if signum == signal.SIGTERM and callable(handler):
                _arm()
            return previous

        signal.signal = _signal  # type: ignore[assignment]
    else:
        raise SystemExit(f"unknown trigger {trigger!r}: log:TEXT or handler")

    original_wait = threading.Event.wait
    original_sleep = time.sleep

    def wait(self: threading.Event, timeout: float | None = None) -> bool:
        if _fire_here():
            with self._cond:  # type: ignore[attr-defined]  # as Event.wait holds it
                signal.raise_signal(signal.SIGTERM)
        return original_wait(self, timeout)

    def sleep(seconds: float) -> None:
        if _fire_here():
            signal.raise_signal(signal.SIGTERM)
        original_sleep(seconds)

    threading.Event.wait = wait  # type: ignore[method-assign]
    time.sleep = sleep


if __name__ == "__main__":
    _install(sys.argv[1])
    sys.argv = [sys.argv[2], *sys.argv[3:]]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
