"""sync_worker's own client and worker against a real Prefect 3.8.8 server (issue 5, part 1).

``.delay()`` creates the runs on Prefect's API, a sync_worker ``TaskWorker`` in this
process receives them over Prefect's websocket and reports their states over REST; what
a user checks is the return values and what Prefect's API (its UI) shows for the runs.
"""
from __future__ import annotations

import sqlite3
import threading
import time
import uuid

import pytest
from prefect_support import prefect_api, read_run, settled_history, wait_for_run


def _key(name: str) -> str:
    """A key of its own per test: the session's server keeps one in-memory queue per key."""
    return f"sw-{name}-{uuid.uuid4().hex[:8]}"


def test_delay_and_task_worker_complete_runs_on_prefect(prefect_server, sync_worker_env, start_worker):
    from sync_worker import task

    sync_worker_env(prefect_server)

    @task(task_key=_key("add"))
    def add(x: int, y: int) -> int:
        return x + y

    @task(task_key=_key("greet"), tags=["greeting"], retries=2)
    def greet(name: str = "world") -> str:
        return f"hello {name}"

    # Submitted before the worker starts so that no create races the worker's writes
    # (see test_delay_survives_a_busy_prefect_database for that race).
    sums = [add.delay(i, 10) for i in range(5)]
    hello = greet.delay()
    start_worker(add, greet)

    assert [future.result(timeout=60) for future in sums] == [10, 11, 12, 13, 14]
    assert hello.result(timeout=60) == "hello world"

    for future in [*sums, hello]:
        run = read_run(prefect_server, future.task_run_id)
        assert (run["state_type"], run["state_name"]) == ("COMPLETED", "Completed")
        assert run["run_count"] == 1
        assert run["start_time"] and run["end_time"]
        assert run["state"]["data"]["storage_key"]  # the result record, as Prefect's UI/clients expect
        names = [state["name"] for state in settled_history(prefect_server, future.task_run_id, 4)]
        assert names == ["Scheduled", "Pending", "Running", "Completed"]
    greeting = read_run(prefect_server, hello.task_run_id)
    assert (greeting["name"], greeting["tags"], greeting["empirical_policy"]["retries"]) == ("greet", ["greeting"], 2)
    assert read_run(prefect_server, sums[0].task_run_id)["task_inputs"] == {"x": [], "y": []}


def test_runs_delivered_before_their_create_is_readable_are_all_run(prefect_server, sync_worker_env, start_worker):
    """Prefect queues a run for its websocket before its create is readable over REST: the
    worker's first read got 404 for 1-6 runs in 100, took them for deleted ("no longer
    exists on the server; skipping it") and they stayed Scheduled for good."""
    from concurrent.futures import ThreadPoolExecutor

    from sync_worker import task

    sync_worker_env(prefect_server)

    @task(task_key=_key("echo"))
    def echo(i: int) -> int:
        return i

    start_worker(echo, limit=10)  # waiting when the runs are created: each read races its create
    with ThreadPoolExecutor(4) as pool:
        futures = list(pool.map(echo.delay, range(100)))
    assert [future.result(timeout=90) for future in futures] == list(range(100))


def test_failing_task_without_retries_ends_failed_with_the_exception(prefect_server, sync_worker_env, start_worker):
    from sync_worker import TaskRunFailed, task

    sync_worker_env(prefect_server)

    @task(task_key=_key("boom"))
    def boom(message: str) -> None:
        raise ValueError(message)

    future = boom.delay("kaput")
    start_worker(boom)
    with pytest.raises(TaskRunFailed, match="ValueError: kaput"):
        future.result(timeout=60)

    run = read_run(prefect_server, future.task_run_id)
    assert run["state_type"] == "FAILED"
    assert run["state"]["message"] == "Task run encountered an exception ValueError: kaput"
    assert run["run_count"] == 1


def test_retry_goes_back_to_prefects_queue_and_completes(prefect_server, sync_worker_env, start_worker):
    from sync_worker import task

    sync_worker_env(prefect_server)
    attempts: list[int] = []

    @task(task_key=_key("flaky"), retries=2)
    def flaky(x: int) -> int:
        attempts.append(x)
        if len(attempts) == 1:
            raise RuntimeError("first attempt fails")
        return x * 2

    future = flaky.delay(21)
    start_worker(flaky, limit=1)
    run = wait_for_run(prefect_server, future.task_run_id, {"COMPLETED", "FAILED"}, timeout=20)
    assert future.result(timeout=10) == 42
    assert run["state_type"] == "COMPLETED" and run["run_count"] == 2
    assert attempts == [21, 21]  # the parameters were read again for the retry
    names = [state["name"] for state in settled_history(prefect_server, future.task_run_id, 7)]
    # the second attempt is "Retrying", as Prefect's own engine names it (it was "Running")
    assert names[:4] == ["Scheduled", "Pending", "Running", "AwaitingRetry"], str(names)
    assert names[-3:] == ["Pending", "Retrying", "Completed"], str(names)


def test_retries_exhausted_end_failed(prefect_server, sync_worker_env, start_worker):
    from sync_worker import TaskRunFailed, task

    sync_worker_env(prefect_server)
    attempts: list[int] = []

    @task(task_key=_key("always-fails"), retries=1)
    def always_fails() -> None:
        attempts.append(1)
        raise RuntimeError("never works")

    future = always_fails.delay()
    start_worker(always_fails, limit=1)
    run = wait_for_run(prefect_server, future.task_run_id, {"COMPLETED", "FAILED"}, timeout=20)
    assert run["state_type"] == "FAILED" and run["run_count"] == 2
    assert len(attempts) == 2
    with pytest.raises(TaskRunFailed, match="never works"):
        future.result(timeout=10)


@pytest.mark.parametrize(
    "with_data",
    [True, False],
    ids=["completed-with-result", "completed-without-result"],
)
def test_a_late_delivery_of_a_completed_run_is_not_executed(prefect_server, sync_worker_env, start_worker, with_data):
    """The run is completed (through the API) while its delivery is still in Prefect's queue."""
    from sync_worker import task

    sync_worker_env(prefect_server)
    calls: list[int] = []

    @task(task_key=_key("once"))
    def once(x: int) -> int:
        calls.append(x)
        return x

    late = once.delay(1)
    data = {"storage_key": "elsewhere", "expiration": None, "serializer": {"type": "json"},
            "prefect_version": "3.8.8", "storage_block_id": None} if with_data else None
    for state in ({"type": "PENDING", "name": "Pending", "state_details": {"deferred": True}},
                  {"type": "RUNNING", "name": "Running"}, {"type": "COMPLETED", "name": "Completed", "data": data}):
        response = prefect_api().post(f"{prefect_server.api_url}/task_runs/{late.task_run_id}/set_state",
                                      json={"state": state, "force": False}, timeout=30)
        assert response.json()["status"] == "ACCEPT"
    witness = once.delay(2)  # queued behind the late delivery: once it is done, so is the late one
    start_worker(once, limit=1)
    assert witness.result(timeout=60) == 2
    assert calls == [2]
    assert read_run(prefect_server, late.task_run_id)["state_type"] == "COMPLETED"


def test_a_retry_waiting_for_its_delay_does_not_hold_a_slot(prefect_server, sync_worker_env, start_worker):
    """limit=1: while the first run waits 6 s for its retry, the run queued behind it runs at once."""
    from sync_worker import task

    sync_worker_env(prefect_server)
    delay = 6.0
    events: list[tuple[str, float]] = []

    @task(task_key=_key("slot"), retries=1, retry_delay_seconds=delay)
    def job(kind: str) -> str:
        events.append((kind, time.monotonic()))
        if kind == "retry" and sum(1 for name, _ in events if name == "retry") == 1:
            raise RuntimeError("retry me later")
        return kind

    # Both submitted before the worker starts: one key is one FIFO queue on Prefect, so
    # the failing run is delivered first (and no create races the worker: see G8).
    retried = job.delay("retry")
    quick = job.delay("quick")
    start_worker(job, limit=1)
    assert quick.result(timeout=60) == "quick"
    assert retried.result(timeout=60) == "retry"

    first_attempt, quick_at, second_attempt = (at for _, at in events)
    assert [name for name, _ in events] == ["retry", "quick", "retry"]
    assert quick_at - first_attempt < delay / 2, (
        f"the only slot was held for {quick_at - first_attempt:.1f}s by a run waiting {delay}s for its retry"
    )
    assert second_attempt - first_attempt >= delay - 0.5  # the retry still waited its delay
    run = read_run(prefect_server, retried.task_run_id)
    assert (run["state_type"], run["run_count"]) == ("COMPLETED", 2)


def test_delay_survives_a_busy_prefect_database(prefect_server, sync_worker_env):
    """A write lock on Prefect's SQLite database makes its API answer 503 at once (measured:
    0.01 s); Prefect's own client retries. Here the lock is held for one second."""
    from sync_worker import task

    sync_worker_env(prefect_server)

    @task(task_key=_key("busy"))
    def busy(x: int) -> int:
        return x

    locked, release = threading.Event(), threading.Event()

    def hold_lock() -> None:
        connection = sqlite3.connect(str(prefect_server.home / "prefect.db"), timeout=30, isolation_level=None)
        try:
            connection.execute("BEGIN EXCLUSIVE")
            locked.set()
            release.wait(1.0)
            connection.execute("COMMIT")
        finally:
            connection.close()

    holder = threading.Thread(target=hold_lock, daemon=True)
    holder.start()
    assert locked.wait(30)
    started = time.monotonic()
    try:
        future = busy.delay(7)
    finally:
        release.set()
        holder.join(30)
    assert time.monotonic() - started >= 0.5  # it really waited for the lock
    assert read_run(prefect_server, future.task_run_id)["state_type"] == "SCHEDULED"


def test_a_run_cancelled_while_it_waits_for_its_retry_is_not_run_again(prefect_server, sync_worker_env,
                                                                       start_worker):
    """A Prefect server accepts CANCELLED -> SCHEDULED: the worker's retry, re-proposed when
    due, ran a run cancelled meanwhile again (past its retries, ending FAILED). The worker
    reads the run first and leaves a cancelled one alone."""
    from sync_worker import task
    from sync_worker.client import Client
    from sync_worker.exceptions import TaskRunCancelled

    sync_worker_env(prefect_server)
    calls: list[float] = []

    @task(task_key=_key("cancel-retry"), retries=3, retry_delay_seconds=3.0)
    def always_fails() -> None:
        calls.append(time.monotonic())
        raise RuntimeError("fails every time")

    future = always_fails.delay()
    start_worker(always_fails, limit=1)
    client = Client()
    deadline = time.monotonic() + 60
    while client.read_task_run(future.task_run_id).state.name != "AwaitingRetry":
        assert time.monotonic() < deadline, read_run(prefect_server, future.task_run_id)
        time.sleep(0.05)
    assert client.cancel_task_run(future.task_run_id)["status"] == "cancelled"
    time.sleep(6.0)  # the retry was due 3 s after the failure: give it that and more
    assert len(calls) == 1, f"ran {len(calls)} times"
    assert read_run(prefect_server, future.task_run_id)["state_type"] == "CANCELLED"
    with pytest.raises(TaskRunCancelled):
        future.result(timeout=10)
