"""Delayed runs end to end: ``apply_async(countdown=...)`` / ``apply_async(eta=...)`` against a real
embedded server and real workers; durable across a server restart; no worker slot held."""
from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest

from sync_worker.client import Client
from sync_worker.schemas import StateType
from tests.operate import queue_tasks as qt

#: how late a due run may start in these tests (the README gives the measured figure; this
#: bound is generous because the machine running the tests is shared)
LATE = 1.0


def test_countdown_creates_a_scheduled_run_delivered_when_due(api_env, start_worker):
    start_worker(qt.stamp, limit=2)
    before = time.time()
    future = qt.stamp.apply_async(("late",), countdown=1.5)
    state = future.task_run.state
    assert state.type is StateType.SCHEDULED
    eta = state.state_details.scheduled_time.timestamp()
    assert before + 1.5 <= eta <= time.time() + 1.5
    time.sleep(0.5)
    assert future.task_run.state.type is StateType.SCHEDULED  # not delivered early
    result = future.result(timeout=30)
    assert eta <= result["started"] <= eta + LATE


def test_eta_with_an_aware_datetime(api_env, start_worker):
    start_worker(qt.stamp, limit=1)
    eta = datetime.now(timezone(timedelta(hours=2))) + timedelta(seconds=1)  # any zone: it is a moment
    future = qt.stamp.apply_async(kwargs={"label": "eta"}, eta=eta)
    assert future.task_run.state.state_details.scheduled_time == eta
    result = future.result(timeout=30)
    assert eta.timestamp() <= result["started"] <= eta.timestamp() + LATE


def test_an_eta_in_the_past_runs_now(api_env, start_worker):
    start_worker(qt.stamp, limit=1)
    future = qt.stamp.apply_async(("past",), eta=datetime.now(timezone.utc) - timedelta(hours=1))
    assert future.result(timeout=30)["label"] == "past"


@pytest.mark.parametrize("kwargs, error, text", [
    ({"eta": datetime.now() + timedelta(seconds=5)}, TypeError, "aware datetime"),
    ({"eta": "2030-01-01T00:00:00Z"}, TypeError, "must be a datetime"),
    ({"countdown": 1, "eta": datetime.now(timezone.utc)}, TypeError, "not both"),
    ({"countdown": -1}, ValueError, ">= 0"),
    ({"countdown": "5"}, TypeError, "number of seconds"),
])
def test_bad_countdown_or_eta_creates_nothing(api_env, server, kwargs, error, text):
    with pytest.raises(error, match=text):
        qt.stamp.apply_async(("x",), **kwargs)
    assert Client(server.url).count_task_runs() == 0


def test_a_waiting_delayed_run_holds_no_worker_slot(api_env, start_worker, server):
    start_worker(qt.stamp, limit=1)
    delayed = qt.stamp.apply_async(("delayed",), countdown=2.0)
    now = qt.stamp.delay("now")
    finished_now = now.result(timeout=30)
    assert finished_now["label"] == "now"  # the one slot was free for it
    [worker] = Client(server.url).read_workers()
    assert worker["in_flight"] == 0
    assert delayed.task_run.state.type is StateType.SCHEDULED
    result = delayed.result(timeout=30)
    assert result["started"] > finished_now["started"]


def test_delayed_runs_survive_a_server_restart(server_factory, tmp_path, monkeypatch, start_worker):
    monkeypatch.setenv("SYNC_WORKER_STORAGE", str(tmp_path / "store"))
    database = str(tmp_path / "restart.db")
    first = server_factory(database=database)
    future = qt.stamp.apply_async(("durable",), countdown=2.5, client=Client(first.url))
    eta = future.task_run.state.state_details.scheduled_time.timestamp()
    first.stop()
    second = server_factory(database=database)
    monkeypatch.setenv("SYNC_WORKER_API_URL", second.url)
    start_worker(qt.stamp, limit=1)
    client = Client(second.url)
    assert client.read_task_run(future.task_run_id).state.type is StateType.SCHEDULED
    from sync_worker.tasks import TaskRunFuture

    result = TaskRunFuture(future.task_run_id, client=client).result(timeout=30)
    assert result["label"] == "durable"
    assert eta <= result["started"] <= eta + LATE


def test_many_delayed_runs_of_one_key_none_is_left_behind(api_env, start_worker):
    """Runs falling due while the queue is loading earlier ones are not left waiting for the
    next timer of their key (the last ones have no next timer: they would wait forever)."""
    start_worker(qt.stamp, limit=10)
    futures = [qt.stamp.apply_async((str(i),), countdown=0.5 + i / 100) for i in range(100)]
    etas = [f._last.state.state_details.scheduled_time.timestamp() for f in futures]
    results = [f.result(timeout=60) for f in futures]
    lateness = [results[i]["started"] - etas[i] for i in range(len(futures))]
    assert min(lateness) >= 0  # never early
    assert max(lateness) < 5 * LATE  # generous: shared machine
