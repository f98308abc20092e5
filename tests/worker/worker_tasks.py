"""Tasks used by the worker tests.

Importable by subprocess workers as ``tests.worker.worker_tasks`` (the repository root is
on their PYTHONPATH). Keys are explicit so that the module's import name does not matter.
Cross-process observations go through files named by the test (append-only lines).
"""
from __future__ import annotations

import os
import threading
import time

from sync_worker.tasks import task


@task(task_key="tests.add")
def add(x, y):
    return x + y


def plain_function():
    return 1


# -- concurrency probe (threads of one process) -------------------------------------------
class Probe:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.current = 0
        self.max_seen = 0
        self.calls = 0

    def reset(self) -> None:
        with self.lock:
            self.current = self.max_seen = self.calls = 0


PROBE = Probe()


@task(task_key="tests.probe")
def probe(seconds):
    with PROBE.lock:
        PROBE.current += 1
        PROBE.calls += 1
        PROBE.max_seen = max(PROBE.max_seen, PROBE.current)
    try:
        time.sleep(seconds)
    finally:
        with PROBE.lock:
            PROBE.current -= 1
    return seconds


# -- a gate: runs that hold their slot until the test opens it ------------------------------
class Gate:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.opened = threading.Event()
        self.current = 0
        self.max_seen = 0
        self.calls = 0

    def reset(self) -> None:
        with self.lock:
            self.opened = threading.Event()
            self.current = self.max_seen = self.calls = 0


GATE = Gate()


@task(task_key="tests.gated")
def gated(tag):
    with GATE.lock:
        GATE.current += 1
        GATE.calls += 1
        GATE.max_seen = max(GATE.max_seen, GATE.current)
        opened = GATE.opened
    try:
        opened.wait(60)
    finally:
        with GATE.lock:
            GATE.current -= 1
    return tag


# -- attempts counted in a file ---------------------------------------------------------------
def _append(path, line):
    with open(path, "a") as handle:
        handle.write(line + "\n")


def _count(path):
    try:
        with open(path) as handle:
            return sum(1 for _ in handle)
    except FileNotFoundError:
        return 0


@task(task_key="tests.fail_then_succeed", retries=3)
def fail_then_succeed(path, failures):
    _append(path, str(os.getpid()))
    attempt = _count(path)
    if attempt <= failures:
        raise ValueError(f"attempt {attempt} fails")
    return f"succeeded on attempt {attempt}"


@task(task_key="tests.always_fails", retries=2)
def always_fails(path):
    _append(path, "attempt")
    raise RuntimeError("this task always fails")


@task(task_key="tests.spin", timeout_seconds=0.5)
def spin(seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass
    return "not interrupted"


@task(task_key="tests.mark")
def mark(i, path, seconds=0.0):
    """Record that run ``i`` was executed by this process."""
    _append(path, f"start {i} {os.getpid()}")
    if seconds:
        time.sleep(seconds)
    _append(path, f"end {i} {os.getpid()}")
    return i


# -- stopping the worker from inside a task --------------------------------------------------
CURRENT_WORKER = {}


@task(task_key="tests.stop_worker")
def stop_worker():
    CURRENT_WORKER["worker"].stop()
    time.sleep(0.2)  # the run finishes after stop(): it must still be reported
    return "stopped from inside"


@task(task_key="tests.pickled", result_serializer="pickle")
def pickled(x):
    return x


@task(task_key="tests.sleep_marked")
def sleep_marked(i, path, seconds):
    """Record the start, then sleep (a long run for stop tests)."""
    _append(path, f"start {i} {os.getpid()}")
    time.sleep(seconds)
    _append(path, f"end {i} {os.getpid()}")
    return i


UNSTORABLE_CALLS = []


@task(task_key="tests.unstorable", retries=2)
def unstorable():
    UNSTORABLE_CALLS.append(1)
    return object()  # not JSON: the result cannot be stored


@task(task_key="tests.loaded_modules")
def loaded_modules(names):
    """Which of ``names`` the worker process has imported (its memory follows from them)."""
    import sys

    return [name for name in names if name in sys.modules]


@task(task_key="tests.loud_failure")
def loud_failure(size):
    """Fails with an exception whose text is ``size`` characters long."""
    raise ValueError("x" * size)
