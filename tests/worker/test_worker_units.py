"""Unit-level behaviour of the execution side that needs no server.

Timeout enforcement, parameter-reading decision, task specs of the CLI, fork safety
(with a real ``os.fork`` in a subprocess) and stop() before start().
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from sync_worker.engine import exception_message
from sync_worker.exceptions import ConfigurationError
from sync_worker.schemas import Scheduled, TaskRun
from sync_worker.tasks import task
from sync_worker.timeouts import TaskRunTimeoutError, call_with_timeout
from sync_worker.worker import (
    TaskWorker,
    load_task,
    run_worker_command,
    should_try_to_read_parameters,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# -- timeouts ------------------------------------------------------------------------------
def _spin(seconds: float) -> str:
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += 1
    return "finished"


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def test_timeout_interrupts_python_code_at_the_deadline():
    reported = []
    started = time.monotonic()
    call = call_with_timeout(_spin, {"seconds": 10}, 0.3, on_timeout=lambda: reported.append(time.monotonic() - started))
    elapsed = time.monotonic() - started
    assert call.timed_out
    assert isinstance(call.exception, TaskRunTimeoutError)
    assert 0.25 <= reported[0] < 1.0
    assert elapsed < 2.0  # interrupted, not run for 10 s


def test_timeout_reports_at_deadline_but_time_sleep_is_interrupted_only_when_it_returns():
    reported = []
    started = time.monotonic()
    call = call_with_timeout(_sleep, {"seconds": 1.5}, 0.2, on_timeout=lambda: reported.append(time.monotonic() - started))
    elapsed = time.monotonic() - started
    assert call.timed_out
    assert reported[0] < 0.8  # the TimedOut report does not wait for the sleep
    assert elapsed >= 1.4  # but the thread (and its slot) is busy until time.sleep returns
    assert isinstance(call.exception, TaskRunTimeoutError)  # raised when it returned to Python


def test_no_timeout_when_the_function_finishes_in_time():
    call = call_with_timeout(lambda x: x * 2, {"x": 21}, 5, on_timeout=lambda: pytest.fail("timed out"))
    assert not call.timed_out
    assert call.result == 42
    assert call.exception is None


def test_timeout_keeps_function_exceptions():
    def boom():
        raise KeyError("nope")

    call = call_with_timeout(boom, {}, 5, on_timeout=lambda: pytest.fail("timed out"))
    assert isinstance(call.exception, KeyError)
    assert exception_message(call.exception) == "Task run encountered an exception KeyError: 'nope'"


# -- parameters ------------------------------------------------------------------------------
@task
def _with_params(x, y=1):
    return x + y


@task
def _without_params():
    return 1


def _run(state_parameters_id: str | None) -> TaskRun:
    return TaskRun(id="r1", name="n", task_key="k", dynamic_key="d", state=Scheduled(task_parameters_id=state_parameters_id))


def test_should_try_to_read_parameters():
    assert should_try_to_read_parameters(_with_params, _run("abc"))
    # Prefect's answer: the function takes parameters (the worker then calls it without
    # arguments when the run names no record)
    assert should_try_to_read_parameters(_with_params, _run(None))
    assert not should_try_to_read_parameters(_without_params, _run("abc"))


# -- CLI task specs ------------------------------------------------------------------------------
def test_load_task_and_clear_errors():
    assert load_task("tests.worker.worker_tasks:add").task_key.endswith("add")
    cases = {
        "no_colon": "is not MODULE:TASK",
        "tests.worker.no_such_module:add": "cannot import module 'tests.worker.no_such_module'",
        "tests.worker.worker_tasks:nope": "has no attribute 'nope'",
        "tests.worker.worker_tasks:plain_function": "is a function, not a task",
    }
    for spec, message in cases.items():
        with pytest.raises(ConfigurationError, match=re.escape(message)):  # the command prints it, exit 2
            run_worker_command([spec], limit=1, status_port=None, timeout=1)


def test_stop_before_start_is_an_error():
    worker = TaskWorker(_with_params)
    with pytest.raises(RuntimeError, match="not yet started"):
        worker.stop()


def test_limit_and_counters_before_start():
    worker = TaskWorker(_with_params, _without_params, limit=3)
    assert worker.limit == 3 and worker.available_tasks == 3 and worker.current_tasks == 0
    assert worker.task_keys == {_with_params.task_key, _without_params.task_key}
    assert worker.in_flight_task_runs == {k: {} for k in worker.task_keys}
    assert worker.finished_task_runs == {k: 0 for k in worker.task_keys}
    unlimited = TaskWorker(_with_params, limit=None)
    assert unlimited.limit is None and unlimited.available_tasks is None and unlimited.current_tasks == 0
    assert worker.client_id == f"{socket.gethostname()}-{os.getpid()}"


# -- fork safety ------------------------------------------------------------------------------
FORK_SCRIPT = textwrap.dedent(
    """
    import logging, os, sys, time, json
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    os.environ["SYNC_WORKER_API_URL"] = "http://127.0.0.1:9/api"   # nothing listens: fine
    from sync_worker.worker import TaskWorker
    from tests.worker.worker_tasks import add
    worker = TaskWorker(add, limit=2).start(block=False)
    assert worker.started
    parent_id = worker.client_id
    pid = os.fork()
    if pid == 0:
        print(json.dumps({"started": worker.started, "client_id": worker.client_id,
                          "parent_client_id": parent_id}), flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
    print(json.dumps({"parent_started": worker.started}), flush=True)
    worker.stop(); worker.join(5)
    """
)


def test_worker_started_before_fork_is_not_running_in_the_child_and_warns():
    proc = subprocess.run(
        [sys.executable, "-c", FORK_SCRIPT], check=False, cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    import json

    child, parent = (json.loads(line) for line in proc.stdout.strip().splitlines())
    assert child["started"] is False
    assert child["client_id"] != child["parent_client_id"]  # the child's own pid
    assert parent["parent_started"] is True
    assert "was started in process" in proc.stderr and "NOT running here" in proc.stderr
    assert "post_fork" in proc.stderr


def test_a_fork_waits_for_a_log_record_being_written(monkeypatch):
    """A fork while another thread writes a log record to stderr gave the child that
    stream's lock, held by a thread the child does not have: the child's first stderr line
    (our "started before it forked" warning) hung forever (CI, once, in the test above). While
    a worker runs, a fork now waits for the record: forced here with a handler whose write is
    held for 0.3 s, the fork returns after it, not during it."""
    import logging

    monkeypatch.setenv("SYNC_WORKER_API_URL", "http://127.0.0.1:9/api")  # nothing listens: fine
    entered, release = threading.Event(), threading.Event()

    class HeldWrite(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            entered.set()
            release.wait(10)

    log = logging.getLogger("tests.worker.fork_while_logging")
    handler = HeldWrite()
    monkeypatch.setattr(log, "handlers", [handler])
    monkeypatch.setattr(log, "propagate", False)
    worker = TaskWorker(_with_params, limit=2).start(block=False)
    writer = threading.Thread(target=log.warning, args=("being written",), daemon=True)
    try:
        writer.start()
        assert entered.wait(10)
        timer = threading.Timer(0.3, release.set)
        timer.start()
        began = time.monotonic()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os._exit(0)
        waited = time.monotonic() - began
        os.waitpid(pid, 0)
        assert waited >= 0.25, f"the fork did not wait for the record being written ({waited:.3f} s)"
    finally:
        release.set()
        worker.stop()
        assert worker.join(10)
        writer.join(10)


def test_worker_thread_count_does_not_grow_when_stopped(monkeypatch):
    before = threading.active_count()
    monkeypatch.setenv("SYNC_WORKER_API_URL", "http://127.0.0.1:9/api")  # nothing listens: fine
    worker = TaskWorker(_with_params, limit=2).start(block=False)
    worker.stop()
    assert worker.join(10)
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= before


def test_retry_timers_fire_when_due_and_flush_runs_the_rest_at_once():
    from sync_worker.prefect_reporting import RetryTimers

    timers = RetryTimers()
    fired: list[str] = []
    timers.schedule(0.05, lambda: fired.append("soon"), "a")
    timers.schedule(60, lambda: fired.append("later-1"), "b")
    timers.schedule(60, lambda: fired.append("later-2"), "c")
    deadline = time.monotonic() + 5
    while "soon" not in fired and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fired == ["soon"]
    assert timers.flush() == 2  # a stopping worker re-queues waiting retries now
    assert sorted(fired) == ["later-1", "later-2", "soon"]
    assert timers.flush() == 0
