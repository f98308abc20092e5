"""Where Prefect's task API and sync_worker's meet: what code written against
``prefect.task_worker`` and ``prefect.tasks`` sees here (real embedded server, real
subscription, workers as threads)."""
from __future__ import annotations

import logging
import socket
import threading

import pytest
import requests

from sync_worker import exponential_backoff, task
from sync_worker.client import Client
from sync_worker.schemas import StateType
from sync_worker.services import critical_service_loop, is_intermittent
from sync_worker.worker import TaskWorker


@task(task_key="tests.api.dup")
def first_with_key(x: int = 0) -> str:
    return "first"


@task(task_key="tests.api.dup")
def second_with_key(x: int = 0) -> str:
    return "second"


@task(task_key="tests.api.printer", log_prints=True)
def prints_to_log(word: str) -> str:
    print("hello", word)
    print("to stderr", word, file=__import__("sys").stderr)
    return word


@task(task_key="tests.api.plain_printer")
def prints_plainly(word: str) -> str:
    print("plain", word)
    return word


def test_two_tasks_with_one_key_run_the_first_given_and_warn(api_env, start_worker, caplog):
    with caplog.at_level(logging.WARNING, logger="sync_worker.worker"):
        start_worker(first_with_key, second_with_key, limit=2)
    assert "Two tasks have the key 'tests.api.dup'" in caplog.text
    assert first_with_key.delay().result(timeout=30) == "first"
    assert second_with_key.delay().result(timeout=30) == "first"


def test_execute_task_run_of_an_unknown_key_raises_and_leaves_the_run(api_env):
    future = first_with_key.delay(1)  # nobody serves it
    run = Client().read_task_run(future.task_run_id)
    worker = TaskWorker(prints_plainly, limit=1)
    with pytest.raises(KeyError, match="tests.api.dup"):
        worker.execute_task_run(run)
    assert Client().read_task_run(future.task_run_id).state.type is StateType.SCHEDULED  # not deleted


@pytest.mark.parametrize("limit", [2.5, "3", True])
def test_a_limit_that_is_not_an_int_is_refused(limit):
    with pytest.raises(TypeError, match="limit must be an int"):
        TaskWorker(prints_plainly, limit=limit)


def test_log_prints_logs_what_the_function_prints_and_other_tasks_still_print(api_env, start_worker, caplog, capfd):
    start_worker(prints_to_log, prints_plainly, limit=4)
    with caplog.at_level(logging.INFO, logger="sync_worker.task_runs"):
        future = prints_to_log.delay("world")
        assert future.result(timeout=30) == "world"
        assert prints_plainly.delay("words").result(timeout=30) == "words"
    logged = [r.getMessage() for r in caplog.records if r.name == "sync_worker.task_runs"]
    assert logged == [f"Task run 'prints_to_log' ({future.task_run_id}) - hello world"], logged
    out, err = capfd.readouterr()
    assert "hello world" not in out
    assert "to stderr world" in err  # print(..., file=) other than stdout is written as asked
    assert "plain words" in out


def test_state_has_prefects_predicates(api_env, start_worker):
    start_worker(prints_plainly, limit=1)
    future = prints_plainly.delay("x")
    future.result(timeout=30)
    state = future.state
    assert state.is_final() and state.is_completed()
    assert not (state.is_running() or state.is_pending() or state.is_cancelled() or state.is_crashed())


def test_retry_delay_seconds_takes_a_function_of_the_retries():
    @task(retries=3, retry_delay_seconds=exponential_backoff(10))
    def flaky() -> None:
        """Flaky."""

    assert flaky.retry_delay_seconds == [10.0, 20.0, 40.0]
    assert flaky.description == "Flaky."
    assert flaky.with_options(retries=1).retry_delay_seconds == [10.0, 20.0, 40.0]  # computed once, kept


def test_prefect_only_options_are_refused_by_name():
    with pytest.raises(TypeError, match="cache_policy, task_run_name: Prefect task options"):
        task(cache_policy=None, task_run_name="x")(lambda: None)


def test_an_answer_broken_off_in_transit_is_intermittent():
    """A server that promises 100 bytes, sends 7 and closes: requests raises
    ChunkedEncodingError (httpx's RemoteProtocolError, which Prefect's loop forgives)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve_truncated() -> None:
        for _ in range(2):
            conn, _ = listener.accept()
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nContent-Type: application/json\r\n\r\n{\"a\": 1")
            conn.close()

    thread = threading.Thread(target=serve_truncated, daemon=True)
    thread.start()
    try:
        with pytest.raises(requests.exceptions.RequestException) as caught:
            requests.get(f"http://127.0.0.1:{port}/", timeout=5).json()
        assert is_intermittent(caught.value), repr(caught.value)
        printed: list[str] = []
        calls = []

        def poll() -> None:
            calls.append(1)
            requests.get(f"http://127.0.0.1:{port}/", timeout=5).json()

        critical_service_loop(poll, 0.01, run_once=True, printer=printed.append)  # forgiven: returns
        assert calls == [1]
    finally:
        thread.join(10)
        listener.close()


def test_a_coroutine_workload_is_refused():
    async def workload() -> None:
        pass

    with pytest.raises(TypeError, match="coroutine function"):
        critical_service_loop(workload, 0.01, run_once=True)


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


@task(task_key="tests.api.bad_text")
def fails_with_bad_text(kind: str) -> None:
    import os

    if kind == "surrogate":  # a file name that is not UTF-8, as os.fsdecode gives it
        name = os.fsdecode(b"report_\xff.csv")
        raise ValueError(f"cannot parse {name}")
    raise UnprintableError()


@pytest.mark.parametrize("kind", ["surrogate", "unprintable"])
def test_an_exception_whose_text_cannot_be_sent_still_ends_the_run_failed(state_path, start_worker, kind):
    """A lone surrogate in the message (refused by JSON encoders and by the server) or a
    ``__str__`` that raises left the run RUNNING, and every worker restart ran it again."""
    from sync_worker.exceptions import TaskRunFailed

    start_worker(fails_with_bad_text, limit=1)
    future = fails_with_bad_text.delay(kind)
    with pytest.raises(TaskRunFailed) as failed:
        future.result(timeout=30)
    state = future.state
    assert state.type is StateType.FAILED
    if kind == "surrogate":
        assert "cannot parse report_\\udcff.csv" in state.message
        assert "report_\\udcff.csv" in str(failed.value)
    else:
        assert "<str() of the UnprintableError raised RuntimeError>" in state.message
