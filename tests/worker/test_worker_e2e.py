"""End to end: real embedded server, real websocket subscription, workers as threads.

Most tests run twice (``state_path``): states reported over the subscription socket's
``set_state`` extension, and over REST only (``SYNC_WORKER_FAST_PATH=false``).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client import REGISTRY

from sync_worker.client import Client
from sync_worker.exceptions import ObjectNotFound, TaskRunFailed
from sync_worker.schemas import StateType
from sync_worker.tasks import Task
from sync_worker.worker import TaskWorker, serve
from tests.worker import worker_tasks as wt
from tests import helpers
from tests.helpers import wait_for


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels or None) or 0.0


class RestCalls:
    """Counts Client.set_task_run_state calls (the REST path of state proposals)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        original = Client.set_task_run_state

        def counting(client: Client, *args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return original(client, *args, **kwargs)

        monkeypatch.setattr(Client, "set_task_run_state", counting)


def test_500_runs_complete_with_correct_results(state_path, start_worker, monkeypatch, capsys):
    rest = RestCalls(monkeypatch)
    completed_before = _sample("sync_worker_task_runs_completed_total", task_key="tests.add")
    start_worker(wt.add, limit=10)
    started = time.monotonic()
    futures = [wt.add.delay(i, 1000) for i in range(500)]
    results = [f.result(timeout=120) for f in futures]
    elapsed = time.monotonic() - started
    assert results == [i + 1000 for i in range(500)]
    assert all(f.state.type is StateType.COMPLETED for f in futures)
    # counted by the worker's thread after the server's answer, which may come after the
    # waiting future saw the final state: wait for the count, do not race it
    wait_for(lambda: _sample("sync_worker_task_runs_completed_total", task_key="tests.add") - completed_before == 500,
             message="500 runs counted completed")
    if state_path == "fast_path":
        assert rest.count == 0  # every state went over the socket
    else:
        assert rest.count == 3 * 500  # PENDING, RUNNING, COMPLETED per run
    with capsys.disabled():
        print(f"\n[measured] 500 runs submitted+completed ({state_path}): {elapsed:.2f}s")


def test_retries_then_success(state_path, start_worker, tmp_path):
    start_worker(wt.fail_then_succeed)
    attempts = tmp_path / "attempts"
    future = wt.fail_then_succeed.delay(str(attempts), 2)
    assert future.result(timeout=30) == "succeeded on attempt 3"
    assert len(attempts.read_text().splitlines()) == 3
    assert future.state.type is StateType.COMPLETED


def test_retries_exhausted_fail_and_result_raises(state_path, start_worker, tmp_path):
    retried_before = _sample("sync_worker_task_runs_retried_total", task_key="tests.always_fails")
    start_worker(wt.always_fails)
    attempts = tmp_path / "attempts"
    future = wt.always_fails.delay(str(attempts))
    with pytest.raises(TaskRunFailed) as info:
        future.result(timeout=30)
    assert "Task run encountered an exception RuntimeError: this task always fails" in str(info.value)
    assert "Remote traceback" in str(info.value) and "raise RuntimeError" in str(info.value)
    assert info.value.exception_type == "RuntimeError"
    assert future.state.type is StateType.FAILED
    assert len(attempts.read_text().splitlines()) == 3  # 1 + retries=2
    # the second retry is counted after the server's AwaitingRetry answer, which may come after
    # the third attempt (another worker thread) already failed for good
    wait_for(lambda: _sample("sync_worker_task_runs_retried_total", task_key="tests.always_fails") - retried_before == 2,
             message="2 retries counted")


def test_timeout_marks_the_run_timed_out(state_path, start_worker):
    start_worker(wt.spin)
    started = time.monotonic()
    future = wt.spin.delay(30)
    state = future.wait(timeout=20)
    assert time.monotonic() - started < 10
    assert state.type is StateType.FAILED
    assert state.name == "TimedOut"
    assert state.message == "Task run exceeded timeout of 0.5 second(s)"
    with pytest.raises(TaskRunFailed, match="exceeded timeout"):
        future.result()


def test_never_more_than_limit_runs_at_once(api_env, start_worker):
    wt.GATE.reset()
    # The gauges are process-wide: measure this worker's part of them.
    free_before = _sample("sync_worker_free_slots")
    in_flight_before = _sample("sync_worker_task_runs_in_flight")
    worker = start_worker(wt.gated, limit=3)
    wait_for(lambda: _sample("sync_worker_free_slots") == free_before + 3, message="the worker's 3 free slots")
    futures = [wt.gated.delay(i) for i in range(30)]
    # the runs hold their slots until the gate opens: the worker is full and stays full
    wait_for(lambda: wt.GATE.current == 3, message="3 runs executing")
    assert worker.current_tasks == 3 and worker.available_tasks == 0
    assert _sample("sync_worker_free_slots") == free_before
    assert _sample("sync_worker_task_runs_in_flight") == in_flight_before + 3
    wt.GATE.opened.set()
    assert [f.result(timeout=60) for f in futures] == list(range(30))
    assert wt.GATE.calls == 30
    assert wt.GATE.max_seen == 3  # reached, never exceeded
    # a run counts as finished once its final state is reported and its slot given back
    wait_for(lambda: worker.finished_task_runs == {"tests.gated": 30}, message="30 runs finished")
    assert worker.current_tasks == 0 and worker.available_tasks == 3
    assert _sample("sync_worker_free_slots") == free_before + 3
    assert _sample("sync_worker_task_runs_in_flight") == in_flight_before


def test_stop_from_another_thread(api_env):
    worker = TaskWorker(wt.add)
    thread = threading.Thread(target=worker.start, daemon=True)
    thread.start()
    wait_for(lambda: worker.started, message="worker started")
    assert wt.add.delay(1, 2).result(timeout=20) == 3
    worker.stop()
    thread.join(10)
    assert not thread.is_alive()
    assert not worker.started and worker.stopping


def test_stop_from_inside_a_task(api_env):
    worker = TaskWorker(wt.stop_worker, wt.add)
    wt.CURRENT_WORKER["worker"] = worker
    thread = threading.Thread(target=worker.start, daemon=True)
    thread.start()
    wait_for(lambda: worker.started, message="worker started")
    future = wt.stop_worker.delay()
    thread.join(20)
    assert not thread.is_alive(), "start() did not return after stop() from a task"
    assert future.result(timeout=5) == "stopped from inside"  # reported although stop() came first
    late = wt.add.delay(1, 1)
    time.sleep(0.5)
    assert late.state.type is StateType.SCHEDULED  # a stopped worker takes nothing more


def test_blocking_start_returns_after_timeout(api_env, caplog):
    worker = TaskWorker(wt.add)
    caplog.set_level(logging.INFO, logger="sync_worker.worker")
    started = time.monotonic()
    worker.start(timeout=1.0)
    assert 0.9 <= time.monotonic() - started < 10
    assert not worker.started
    assert "Task worker timed out after 1.0 seconds" in caplog.text


def test_context_manager_starts_and_stops(api_env):
    with TaskWorker(wt.add) as worker:
        assert worker.started
        assert wt.add.delay(2, 3).result(timeout=20) == 5
    assert not worker.started and worker.join(0)


def test_unknown_task_key_is_logged_and_deleted(api_env, start_worker, caplog):
    caplog.set_level(logging.WARNING, logger="sync_worker.worker")
    stranger = Task(wt.plain_function, task_key="tests.stranger")
    worker = TaskWorker(wt.add)
    worker.task_keys.add("tests.stranger")  # subscribed to a key it has no task for
    worker.start(block=False)
    try:
        future = stranger.delay()
        client = Client()
        wait_for(lambda: _gone(client, future.task_run_id), message="run deleted")
        assert "not found in task worker registry" in caplog.text
        assert wt.add.delay(1, 1).result(timeout=20) == 2  # the worker carries on
    finally:
        worker.stop()
        worker.join(20)


def test_unknown_task_key_is_kept_when_deleting_is_off(api_env, caplog, monkeypatch):
    monkeypatch.setenv("SYNC_WORKER_DELETE_FAILED_SUBMISSIONS", "false")
    caplog.set_level(logging.WARNING, logger="sync_worker.worker")
    stranger = Task(wt.plain_function, task_key="tests.stranger")
    worker = TaskWorker(wt.add)
    worker.task_keys.add("tests.stranger")
    worker.start(block=False)
    try:
        future = stranger.delay()
        wait_for(lambda: "not found in task worker registry" in caplog.text, message="the warning")
        assert wt.add.delay(1, 1).result(timeout=20) == 2
        assert future.state.type is StateType.SCHEDULED  # left alone, not deleted, not run
    finally:
        worker.stop()
        worker.join(20)


def _gone(client: Client, task_run_id: str) -> bool:
    try:
        client.read_task_run(task_run_id)
    except ObjectNotFound:
        return True
    return False


def test_unreadable_parameters_fail_the_run_with_the_reason(state_path, start_worker):
    start_worker(wt.pickled)
    future = wt.pickled.delay({"a": 1})  # parameters written with pickle; the worker refuses it
    with pytest.raises(TaskRunFailed) as info:
        future.result(timeout=20)
    message = str(info.value)
    assert message.startswith("Task run could not start: cannot read parameters")
    assert "SYNC_WORKER_ALLOW_PICKLE=true" in message
    assert future.state.type is StateType.FAILED


def test_pickled_parameters_run_when_allowed(api_env, start_worker, monkeypatch):
    monkeypatch.setenv("SYNC_WORKER_ALLOW_PICKLE", "true")
    start_worker(wt.pickled)
    assert wt.pickled.delay({"a": {1, 2}}).result(timeout=20) == {"a": {1, 2}}


def test_status_server_json(api_env, free_port):
    wt.PROBE.reset()
    thread = threading.Thread(target=serve, args=(wt.probe, wt.add),
                              kwargs={"limit": 2, "status_server_port": free_port, "timeout": 8}, daemon=True)
    thread.start()
    futures = [wt.probe.delay(1.5) for _ in range(3)]
    url = f"http://127.0.0.1:{free_port}/status"
    status = wait_for(lambda: _status_with_two_in_flight(url), message="status with 2 runs in flight")
    assert set(status) == {"client_id", "started_at", "stopping", "limit", "current", "available", "tasks",
                           "finished", "in_flight"}
    assert status["limit"] == 2 and status["current"] == 2 and status["available"] == 0
    assert status["stopping"] is False and status["started_at"]
    assert status["tasks"] == ["tests.add", "tests.probe"]
    assert status["client_id"].endswith(f"-{os.getpid()}")
    assert set(status["in_flight"]["tests.probe"]) <= {f.task_run_id for f in futures}
    assert status["finished"] == {"tests.add": 0, "tests.probe": 0}
    assert requests.get(f"http://127.0.0.1:{free_port}/nope", timeout=5).status_code == 404
    for method in ("POST", "PUT", "DELETE", "HEAD"):  # as Prefect's (FastAPI) status server answers
        answer = requests.request(method, url, timeout=5)
        assert answer.status_code == 405, (method, answer.text)
        assert answer.text == ("" if method == "HEAD" else '{"detail": "Method Not Allowed"}')
    [f.result(timeout=20) for f in futures]
    finished = wait_for(lambda: requests.get(url, timeout=5).json()["finished"]["tests.probe"] == 3, message="3 finished")
    assert finished
    thread.join(20)
    assert not thread.is_alive()


def _status_with_two_in_flight(url: str) -> Any:
    try:
        status = requests.get(url, timeout=5).json()
    except requests.ConnectionError:
        return None
    return status if len(status["in_flight"].get("tests.probe", {})) == 2 else None


@pytest.fixture
def free_port() -> int:
    return helpers.free_port()


def test_execute_task_run_runs_one_given_run(api_env):
    future = wt.add.delay(20, 22)  # nobody serves it
    worker = TaskWorker(wt.add, limit=1)
    run = Client().read_task_run(future.task_run_id)
    outcome = worker.execute_task_run(run)
    assert outcome.value == "completed"
    assert future.result(timeout=5) == 42
    assert worker.finished_task_runs == {"tests.add": 1}
    assert worker.execute_task_run(run).value == "skipped"  # terminal: never run twice
    assert worker.finished_task_runs == {"tests.add": 2}


def test_fast_path_failure_mid_flight_falls_back_to_rest(api_env, monkeypatch):
    from sync_worker.engine import run_task_run
    from sync_worker.settings import get_settings
    from sync_worker.storage import get_store
    from sync_worker.subscription import ConnectionLost

    class BrokenSocket:
        supports_set_state = True
        server_extensions = ["set_state"]
        calls = 0

        def set_state(self, *args: Any, **kwargs: Any) -> Any:
            BrokenSocket.calls += 1
            raise ConnectionLost("socket dropped before the answer")

    rest = RestCalls(monkeypatch)
    future = wt.add.delay(1, 2)
    client = Client()
    run = client.read_task_run(future.task_run_id)
    outcome = run_task_run(wt.add, run, client=client, store=get_store(get_settings(), client),
                           settings=get_settings(), subscription=BrokenSocket())
    assert outcome.value == "completed"
    assert future.result(timeout=5) == 3
    assert BrokenSocket.calls == 3 and rest.count == 3


def test_lost_answers_are_recognised_when_the_proposal_is_repeated(api_env, tmp_path):
    """The socket applies each proposal but drops before the answer: the REST repeat is
    refused (the state is already there) and the engine recognises its own claim."""
    from sync_worker.engine import run_task_run
    from sync_worker.settings import get_settings
    from sync_worker.storage import get_store
    from sync_worker.subscription import ConnectionLost

    client = Client()

    class LostAnswers:
        supports_set_state = True
        server_extensions = ["set_state"]
        applied: list[str] = []

        def set_state(self, task_run_id: str, state: Any, force: bool = False, timeout: float = 0) -> Any:
            result = client.set_task_run_state(task_run_id, state, force=force)
            LostAnswers.applied.append(f"{state.type.value}:{result.status.value}")
            raise ConnectionLost("socket dropped after the server applied the state")

    marks = tmp_path / "marks"
    future = wt.mark.delay(7, str(marks))
    run = client.read_task_run(future.task_run_id)
    outcome = run_task_run(wt.mark, run, client=client, store=get_store(get_settings(), client),
                           settings=get_settings(), subscription=LostAnswers())
    assert LostAnswers.applied == ["PENDING:ACCEPT", "RUNNING:ACCEPT", "COMPLETED:ACCEPT"]
    assert outcome.value == "completed"  # not skipped as "claimed elsewhere"
    assert future.result(timeout=5) == 7
    assert marks.read_text().count("start 7") == 1  # executed once


def test_wrong_credentials_stop_the_worker_with_a_clear_error(server_factory, api_env, monkeypatch, caplog):
    secured = server_factory(auth_string="admin:right", database=str(Path(api_env["SYNC_WORKER_STORAGE"]).parent / "auth.db"))
    monkeypatch.setenv("SYNC_WORKER_API_URL", secured.url)
    monkeypatch.setenv("SYNC_WORKER_API_AUTH_STRING", "admin:wrong")
    from sync_worker.subscription import SubscriptionAuthError

    worker = TaskWorker(wt.add)
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="sync_worker"), pytest.raises(SubscriptionAuthError) as info:
        worker.start(timeout=20)
    assert time.monotonic() - started < 10  # no endless retry
    assert "SYNC_WORKER_API_AUTH_STRING" in str(info.value) and "PREFECT_API_AUTH_STRING" in str(info.value)
    assert not worker.started
    # raised to the caller, not also logged as an error (the command would show it twice)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    background = TaskWorker(wt.add).start(block=False)  # a WSGI app's worker: the error is kept
    assert background.join(10)
    assert isinstance(background.error, SubscriptionAuthError) and not background.started
    # and logged: nobody else would see it
    failed = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(failed) == 1 and "failed" in failed[0] and "SYNC_WORKER_API_AUTH_STRING" in failed[0], failed


def test_right_credentials_work(server_factory, api_env, monkeypatch, start_worker):
    secured = server_factory(auth_string="admin:right", database=str(Path(api_env["SYNC_WORKER_STORAGE"]).parent / "auth.db"))
    monkeypatch.setenv("SYNC_WORKER_API_URL", secured.url)
    monkeypatch.setenv("SYNC_WORKER_API_AUTH_STRING", "admin:right")
    start_worker(wt.add)
    assert wt.add.delay(2, 2).result(timeout=20) == 4


def test_worker_survives_a_server_restart(server_factory, tmp_path, monkeypatch, start_worker, capsys):
    database = str(tmp_path / "restart.db")
    first = server_factory(database=database)
    port = first.port
    monkeypatch.setenv("SYNC_WORKER_API_URL", first.url)
    monkeypatch.setenv("SYNC_WORKER_STORAGE", str(tmp_path / "store"))
    monkeypatch.delenv("SYNC_WORKER_FAST_PATH", raising=False)
    reconnects_before = _sample("sync_worker_subscription_reconnects_total")
    worker = start_worker(wt.add, wt.mark)
    assert wt.add.delay(1, 1).result(timeout=20) == 2
    marks = tmp_path / "marks"
    in_flight = wt.mark.delay(0, str(marks), 2.0)  # running while the server goes away
    wait_for(lambda: marks.exists(), message="run started")
    first.stop()
    second = server_factory(database=database, port=port)
    assert second.port == port
    queued = [wt.add.delay(i, i) for i in range(20)]
    assert [f.result(timeout=60) for f in queued] == [2 * i for i in range(20)]
    assert in_flight.result(timeout=60) == 0  # the in-flight run reported its end after the restart
    assert worker.started
    assert _sample("sync_worker_subscription_reconnects_total") > reconnects_before


def _open_sockets() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:  # the descriptor listdir itself used
            pass
    return count


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_start_stop_cycles_do_not_leak_sockets_or_threads(api_env):
    def cycle() -> None:
        worker = TaskWorker(wt.add)
        worker.start(block=False)
        assert wt.add.delay(1, 1).result(timeout=20) == 2
        worker.stop()
        assert worker.join(20)

    cycle()  # warm up: the submitter's own keep-alive connection
    sockets, threads = _open_sockets(), threading.active_count()
    for _ in range(10):
        cycle()
    wait_for(lambda: threading.active_count() <= threads, timeout=10, message="threads to end")
    assert _open_sockets() <= sockets + 1


def test_start_serves_the_client_metrics_when_enabled(api_env, start_worker, free_port, monkeypatch):
    from sync_worker.services import stop_client_metrics_server

    monkeypatch.setenv("SYNC_WORKER_CLIENT_METRICS_ENABLED", "true")
    monkeypatch.setenv("SYNC_WORKER_CLIENT_METRICS_PORT", str(free_port))
    try:
        start_worker(wt.add)
        assert wt.add.delay(3, 4).result(timeout=20) == 7
        scrape = requests.get(f"http://127.0.0.1:{free_port}/metrics", timeout=5).text
        assert 'sync_worker_task_runs_completed_total{task_key="tests.add"}' in scrape
        assert "sync_worker_subscription_connects_total" in scrape
    finally:
        stop_client_metrics_server()


def test_an_exception_with_a_huge_message_ends_the_run_failed(state_path, start_worker):
    """The server refuses a state message over 100,000 characters (422): the FAILED of a task
    whose exception text is longer was refused, the run stayed RUNNING and the worker's thread
    died on a TypeError (two engine methods had one name). The message is cut; the failure's
    record keeps the whole text."""
    start_worker(wt.loud_failure, wt.add)
    future = wt.loud_failure.delay(150_000)
    with pytest.raises(TaskRunFailed) as info:
        future.result(timeout=30)
    state = future.state
    assert state.type is StateType.FAILED
    assert len(state.message) < 10_100 and state.message.endswith("more characters in the run's result)")
    assert str(info.value).count("x") >= 150_000  # the whole text, from the failure's record
    assert wt.add.delay(1, 2).result(timeout=30) == 3  # the worker goes on


def test_a_report_the_server_refuses_is_one_log_line_and_the_worker_goes_on(server, api_env, start_worker,
                                                                            monkeypatch, caplog):
    """A final state refused with a 4xx (over REST: the server's orchestration raising inside
    a socket's batch is another path): the answer is logged as one line, without a traceback,
    and the worker goes on (the refusal's handler had the name of another engine method and
    died on a TypeError)."""
    import logging

    from sync_worker.server.models import ValidationError

    monkeypatch.setenv("SYNC_WORKER_FAST_PATH", "false")

    refused: list[str] = []
    original = server.core._set_state_op

    def refuse_the_first_completed(run_id, proposed, force, *args, **kwargs):
        if proposed.get("type") == "COMPLETED" and not refused:
            refused.append(run_id)
            raise ValidationError(["body", "state"], "refused for the test")
        return original(run_id, proposed, force, *args, **kwargs)

    monkeypatch.setattr(server.core, "_set_state_op", refuse_the_first_completed)
    start_worker(wt.add, limit=1)
    with caplog.at_level(logging.ERROR, logger="sync_worker"):
        wt.add.delay(1, 1)
        wait_for(lambda: any("Could not report the states of task run" in r.getMessage() for r in caplog.records),
                 timeout=30, message="the refusal logged")
        assert wt.add.delay(2, 2).result(timeout=30) == 4  # the worker goes on
    [line] = [r for r in caplog.records if "Could not report the states" in r.getMessage()]
    assert "refused for the test" in line.getMessage() and line.exc_info is None


@pytest.mark.parametrize("timeout", [None, 30])
def test_varargs_kwargs_and_positional_only_are_passed_back_as_bound(api_env, start_worker, timeout):
    """``f(*args, **kwargs)`` was called with ``args=[...]`` and ``kwargs={...}`` as keywords."""
    from sync_worker import task

    @task(task_key="e2e.spread", timeout_seconds=timeout)
    def spread(a, /, b, *args, c=0, **kwargs):
        return {"a": a, "b": b, "args": list(args), "c": c, "kwargs": kwargs}

    start_worker(spread)
    assert spread.delay(1, 2, 3, 4, c=5, d=6).result(timeout=30) == \
        {"a": 1, "b": 2, "args": [3, 4], "c": 5, "kwargs": {"d": 6}}
    assert spread.delay(1, b=2).result(timeout=30) == {"a": 1, "b": 2, "args": [], "c": 0, "kwargs": {}}
