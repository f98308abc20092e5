"""Submitting survives a blip: creates carry a client-chosen run id, so ``.delay()``
repeats them through lost answers, 5xx and a server restart without creating a run twice."""
from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
import requests

from sync_worker.client import Client
from tests.helpers import free_port
from tests.worker import worker_tasks as wt


def _runs(server: Any) -> int:
    """How many runs the server's database holds (read beside the server, as a user could)."""
    with sqlite3.connect(server.database) as conn:
        return conn.execute("SELECT count(*) FROM task_runs").fetchone()[0]


@pytest.fixture(params=["rpc", "rest"])
def transport(request, api_env, monkeypatch) -> str:
    if request.param == "rest":
        monkeypatch.setenv("SYNC_WORKER_FAST_PATH", "false")
    return request.param


def test_a_create_whose_answer_is_lost_is_repeated_and_creates_exactly_one_run(server, transport, monkeypatch):
    core = server.core
    lost = []
    original_sync, original_async = core.create_task_run, core.create_task_run_async

    def commit_then_fail(body, **kwargs):  # REST: the run is stored, the answer is a 500
        text = original_sync(body, **kwargs)
        if not lost:
            lost.append(body["id"])
            raise RuntimeError("injected: the answer is lost after the commit")
        return text

    def commit_then_fail_async(body, callback, **kwargs):  # rpc: likewise (kwargs: brief)
        def done(text, error):
            if error is None and not lost:
                lost.append(body["id"])
                callback(None, RuntimeError("injected: the answer is lost after the commit"))
            else:
                callback(text, error)
        original_async(body, done, **kwargs)

    monkeypatch.setattr(core, "create_task_run", commit_then_fail)
    monkeypatch.setattr(core, "create_task_run_async", commit_then_fail_async)
    future = wt.add.delay(1, 2)
    assert lost == [future.task_run_id]
    assert _runs(server) == 1


def test_delay_retried_across_a_server_restart_creates_exactly_one_run(server_factory, api_env, monkeypatch,
                                                                       tmp_path: Path):
    port = free_port()
    database = str(tmp_path / "restart.db")
    first = server_factory(port=port, database=database)
    monkeypatch.setenv("SYNC_WORKER_API_URL", first.url)
    monkeypatch.setenv("SYNC_WORKER_SUBMIT_TIMEOUT", "60")
    assert wt.add.delay(0, 0).task_run_id  # connected (rpc socket open), then the server goes
    first.stop()
    restarted: list[Any] = []
    timer = threading.Timer(1.5, lambda: restarted.append(server_factory(port=port, database=database)))
    timer.start()
    try:
        future = wt.add.delay(1, 2)  # submitted while the server is down: retried until it is back
    finally:
        timer.join()
    server = restarted[0]
    assert Client(server.url).read_task_run(future.task_run_id).id == future.task_run_id
    assert _runs(server) == 2  # the first run and this one: no duplicate


def test_result_waits_through_a_server_restart(server_factory, api_env, transport, monkeypatch, start_worker,
                                              tmp_path: Path):
    """``future.result(timeout)`` keeps waiting while the server is down and back (its client
    gives up on a read at once here: retry_attempts=1, so only the wait's own rule holds)."""
    from sync_worker.tasks import TaskRunFuture

    port = free_port()
    database = str(tmp_path / "restart.db")
    first = server_factory(port=port, database=database)
    monkeypatch.setenv("SYNC_WORKER_API_URL", first.url)
    run_id = wt.add.delay(20, 22).task_run_id
    first.stop()
    outcome: list[Any] = []
    waiter = threading.Thread(target=lambda: outcome.append(
        TaskRunFuture(run_id, client=Client(first.url, retry_attempts=1)).result(timeout=60)))
    waiter.start()
    waiter.join(1.5)
    assert waiter.is_alive() and outcome == []  # the server is down: still waiting, not failed
    server_factory(port=port, database=database)
    start_worker(wt.add, limit=1)
    waiter.join(60)
    assert outcome == [42]


def test_result_says_the_server_is_unavailable_after_its_timeout(server_factory, api_env, transport, monkeypatch,
                                                                 tmp_path: Path):
    import time

    from sync_worker.exceptions import ServerUnavailable
    from sync_worker.tasks import TaskRunFuture

    first = server_factory(database=str(tmp_path / "gone.db"))
    monkeypatch.setenv("SYNC_WORKER_API_URL", first.url)
    future = TaskRunFuture(wt.add.delay(1, 1).task_run_id, client=Client(first.url, retry_attempts=1))
    first.stop()
    started = time.monotonic()
    with pytest.raises(ServerUnavailable, match=f"Could not read task run {future.task_run_id} from .* within 1.5 s"):
        future.result(timeout=1.5)
    assert 1.4 <= time.monotonic() - started < 5


def test_result_of_a_run_deleted_while_waited_for_ends_at_once(server, api_env, transport):
    """A run deleted while a caller waits (a Prefect worker deletes a run whose parameters it
    cannot read; an operator's DELETE) ends the wait now with ObjectNotFound, over the rpc
    socket as over REST, not when the wait's own timeout runs out."""
    import time

    from sync_worker.exceptions import ObjectNotFound

    future = wt.add.delay(1, 2)  # no worker: it waits
    outcome: list[Any] = []

    def wait() -> None:
        started = time.monotonic()
        try:
            future.result(timeout=30)
        except ObjectNotFound as exc:
            outcome.append((exc, time.monotonic() - started))

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.3)  # (the wait is registered; deleting earlier would be answered at once anyway)
    requests.delete(f"{server.url}/task_runs/{future.task_run_id}", timeout=10).raise_for_status()
    waiter.join(20)
    assert not waiter.is_alive() and len(outcome) == 1, outcome
    assert outcome[0][1] < 5
