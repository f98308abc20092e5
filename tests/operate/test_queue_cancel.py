"""Cancellation end to end: ``future.cancel()``, ``sync-worker runs cancel`` and the REST call,
before and during a run, with real workers (threads and a subprocess) on a real server."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import requests
import websocket

from sync_worker.client import Client
from sync_worker.exceptions import ObjectNotFound, TaskRunCancelled, TaskRunFailed
from sync_worker.schemas import StateType
from sync_worker.tasks import TaskRunFuture
from tests.operate import queue_tasks as qt
from tests.operate.test_queue_cli import cli
from tests.helpers import wait_for

REPO = Path(__file__).resolve().parents[2]


def test_cancel_a_waiting_run_it_is_never_delivered(api_env, start_worker):
    cancelled = qt.nobody.delay("never")
    assert cancelled.cancel() is True
    assert cancelled.state.type is StateType.CANCELLED
    with pytest.raises(TaskRunCancelled) as info:
        cancelled.result(timeout=10)
    assert isinstance(info.value, TaskRunFailed)
    assert "Cancelled while SCHEDULED" in str(info.value)
    start_worker(qt.nobody, limit=2)
    assert qt.nobody.delay("later").result(timeout=30) == "later"
    run = Client().read_task_run(cancelled.task_run_id)
    assert run.state.type is StateType.CANCELLED and run.run_count == 0


def test_cancel_a_delayed_run_it_is_never_delivered(api_env, start_worker):
    start_worker(qt.stamp, limit=2)
    cancelled = qt.stamp.apply_async(("cancelled",), countdown=0.5)
    after = qt.stamp.apply_async(("after",), countdown=0.8)
    assert cancelled.cancel() is True
    assert after.result(timeout=30)["label"] == "after"  # due after the cancelled one
    run = Client().read_task_run(cancelled.task_run_id)
    assert run.state.type is StateType.CANCELLED and run.run_count == 0


def test_cancel_a_finished_run_changes_nothing(api_env, start_worker):
    start_worker(qt.add, limit=1)
    future = qt.add.delay(1, 2)
    assert future.result(timeout=30) == 3
    assert future.cancel() is False
    assert future.state.type is StateType.COMPLETED
    assert future.result() == 3
    with pytest.raises(ObjectNotFound):
        Client().cancel_task_run("00000000-0000-0000-0000-000000000000")


@pytest.mark.parametrize("timeout_seconds", [None, 120])
def test_cancel_a_running_run_interrupts_its_thread(api_env, start_worker, tmp_path, timeout_seconds):
    slow = qt.slow.with_options(timeout_seconds=timeout_seconds)
    worker = start_worker(slow, qt.add, limit=2)
    marker = str(tmp_path / "marker")
    future = slow.delay(marker, 60)
    wait_for(lambda: os.path.exists(marker), 30, "the run started")
    started = time.monotonic()
    assert future.cancel() is True
    with pytest.raises(TaskRunCancelled):
        future.result(timeout=30)
    assert time.monotonic() - started < 10
    assert not os.path.exists(marker + ".done")
    run = Client().read_task_run(future.task_run_id)
    assert run.state.type is StateType.CANCELLED and run.run_count == 1
    assert run.state.message == "Cancelled while running"  # no dangling ": " (the exception has no text)
    assert qt.add.delay(2, 2).result(timeout=30) == 4  # the worker goes on, its slot is free again
    assert worker.started


def test_a_run_whose_function_catches_the_cancel_ends_cancelled(api_env, start_worker, tmp_path):
    """cancel() said True, yet the run ended COMPLETED and result() returned the value when
    the function caught the interruption: it is CANCELLED anyway, as a timeout is TimedOut."""
    start_worker(qt.stubborn, limit=1)
    marker = str(tmp_path / "marker")
    future = qt.stubborn.delay(marker, 60)
    wait_for(lambda: os.path.exists(marker), 30, "the run started")
    assert future.cancel() is True
    with pytest.raises(TaskRunCancelled):
        future.result(timeout=30)
    state = Client().read_task_run(future.task_run_id).state
    assert state.type is StateType.CANCELLED
    assert "its function caught the interruption and returned" in state.message


def test_runs_cancel_stops_a_run_in_a_worker_subprocess(api_env, spawn, tmp_path):
    proc = spawn([sys.executable, "-m", "sync_worker", "worker", "tests.operate.queue_tasks:slow", "--limit", "2"],
                 api_env)
    marker = str(tmp_path / "marker")
    future = qt.slow.delay(marker, 60)
    wait_for(lambda: os.path.exists(marker), 60, "the run started in the subprocess")
    out = cli(api_env, "runs", "cancel", future.task_run_id)
    assert out.returncode == 0, out.stderr
    assert "CANCELLING (its worker was told to stop it)" in out.stdout
    with pytest.raises(TaskRunCancelled):
        future.result(timeout=30)
    assert not os.path.exists(marker + ".done")
    assert proc.poll() is None  # the worker process lives on


def _subscribe(server, keys, credit=None):
    ws = websocket.create_connection(server.url.replace("http", "ws") + "/task_runs/subscriptions/scheduled",
                                     subprotocols=["prefect"], timeout=10)
    ws.send(json.dumps({"type": "auth", "token": None}))
    assert json.loads(ws.recv())["type"] == "auth_success"
    message = {"type": "subscribe", "keys": keys, "client_id": "raw-test"}
    if credit is not None:
        message["credit"] = credit
    ws.send(json.dumps(message))
    return ws


def _running_on_a_raw_worker(server, monkeypatch, tmp_path) -> tuple[Client, TaskRunFuture, websocket.WebSocket]:
    """A run delivered to a raw sync_worker-style subscriber (``credit``), acknowledged, RUNNING."""
    monkeypatch.setenv("SYNC_WORKER_STORAGE", str(tmp_path / "store"))
    client = Client(server.url)
    future = qt.nobody.apply_async(("x",), client=client)
    ws = _subscribe(server, ["queue.nobody"], credit=1)
    assert json.loads(ws.recv())["id"] == future.task_run_id
    ws.send(json.dumps({"type": "ack"}))
    assert requests.post(f"{server.url}/task_runs/{future.task_run_id}/set_state", timeout=10,
                         json={"state": {"type": "RUNNING", "name": "Running"}}).json()["status"] == "ACCEPT"
    return client, future, ws


def test_running_run_cancelled_and_worker_lost_ends_cancelled_not_redelivered(server_factory, tmp_path,
                                                                              monkeypatch):
    server = server_factory(lease_timeout=0.5)
    client, future, ws = _running_on_a_raw_worker(server, monkeypatch, tmp_path)
    run = {"id": future.task_run_id}
    answer = client.cancel_task_run(run["id"])
    assert answer["status"] == "cancelling" and answer["notified"] is True
    assert answer["task_run"]["state"]["type"] == "CANCELLING"
    assert json.loads(ws.recv()) == {"type": "cancel", "task_run_id": run["id"]}
    assert client.cancel_task_run(run["id"])["status"] == "unchanged"
    ws.close()  # the worker vanishes without reporting
    wait_for(lambda: client.read_task_run(run["id"]).state.type is StateType.CANCELLED, 20, "CANCELLED")
    assert "lost its connection" in client.read_task_run(run["id"]).state.message
    ws2 = _subscribe(server, ["queue.nobody"], credit=1)
    ws2.settimeout(1.0)
    with pytest.raises(websocket.WebSocketTimeoutException):
        ws2.recv()  # not delivered again
    ws2.close()
    with pytest.raises(TaskRunCancelled):
        TaskRunFuture(run["id"], client=client).result(timeout=5)


def test_a_prefect_style_subscriber_is_not_sent_cancel_messages(server, monkeypatch, tmp_path):
    monkeypatch.setenv("SYNC_WORKER_STORAGE", str(tmp_path / "store"))
    client = Client(server.url)
    future = qt.nobody.apply_async(("x",), client=client)
    ws = _subscribe(server, ["queue.nobody"])  # Prefect's protocol: no extensions
    assert json.loads(ws.recv())["id"] == future.task_run_id
    ws.send(json.dumps({"type": "ack"}))
    requests.post(f"{server.url}/task_runs/{future.task_run_id}/set_state",
                  json={"state": {"type": "RUNNING", "name": "Running"}}, timeout=10)
    out = cli({"SYNC_WORKER_API_URL": server.url}, "runs", "cancel", future.task_run_id)
    assert out.returncode == 0, out.stderr
    assert "CANCELLING (its worker cannot be told to stop it (not a sync_worker worker); the run ends as that " \
           "worker reports)" in out.stdout  # not "no worker connection holds it": one does
    assert client.read_task_run(future.task_run_id).state.type is StateType.CANCELLING
    ws.settimeout(0.5)
    with pytest.raises(websocket.WebSocketTimeoutException):
        ws.recv()
    # the worker reports what happened; CANCELLING accepts its final state
    result = requests.post(f"{server.url}/task_runs/{future.task_run_id}/set_state",
                           json={"state": {"type": "CANCELLED", "name": "Cancelled"}}, timeout=10).json()
    assert result["status"] == "ACCEPT"
    ws.close()


def test_a_run_left_cancelling_by_a_stopped_server_is_cancelled_at_start(server_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("SYNC_WORKER_STORAGE", str(tmp_path / "store"))
    database = str(tmp_path / "c.db")
    first = server_factory(database=database)
    client = Client(first.url)
    future = qt.nobody.apply_async(("x",), client=client)
    ws = _subscribe(first, ["queue.nobody"], credit=1)
    json.loads(ws.recv())
    ws.send(json.dumps({"type": "ack"}))
    requests.post(f"{first.url}/task_runs/{future.task_run_id}/set_state",
                  json={"state": {"type": "RUNNING", "name": "Running"}}, timeout=10)
    assert client.cancel_task_run(future.task_run_id)["status"] == "cancelling"
    first.stop()
    ws.close()
    second = server_factory(database=database)
    run = Client(second.url).read_task_run(future.task_run_id)
    assert run.state.type is StateType.CANCELLED
    assert "server restarted" in run.state.message


def test_a_running_run_no_worker_was_given_is_cancelled_at_once(server, monkeypatch, tmp_path):
    """A client moved the run to RUNNING itself (no worker connection of this server was given
    it): no worker can be told and no lease will run out, so CANCELLING would be for ever (the
    dashboard's buttons then off, Retry refused). It ends CANCELLED at once, and a late final
    state from whoever runs it is refused."""
    monkeypatch.setenv("SYNC_WORKER_STORAGE", str(tmp_path / "store"))
    client = Client(server.url)
    future = qt.nobody.apply_async(("x",), client=client)
    for state in ("PENDING", "RUNNING"):
        answer = requests.post(f"{server.url}/task_runs/{future.task_run_id}/set_state",
                               json={"state": {"type": state}}, timeout=10).json()
        assert answer["status"] == "ACCEPT", answer
    answer = client.cancel_task_run(future.task_run_id)
    assert answer["status"] == "cancelled" and answer["task_run"]["state"]["type"] == "CANCELLED"
    assert "no worker connection of this server held it" in answer["task_run"]["state"]["message"]
    late = requests.post(f"{server.url}/task_runs/{future.task_run_id}/set_state",
                         json={"state": {"type": "COMPLETED"}}, timeout=10).json()
    assert late["status"] == "REJECT"
    assert client.read_task_run(future.task_run_id).state.type is StateType.CANCELLED
    out = cli({"SYNC_WORKER_API_URL": server.url}, "runs", "retry", future.task_run_id)
    assert out.returncode == 0, out.stderr  # a finished run can be retried


def test_cancelling_a_run_whose_workers_connection_is_gone_says_the_lease_ends_it(server_factory, tmp_path,
                                                                                  monkeypatch):
    server = server_factory(lease_timeout=30)
    _client, future, ws = _running_on_a_raw_worker(server, monkeypatch, tmp_path)
    ws.close()
    wait_for(lambda: not server.core.subscribers, 10, "the connection gone")
    out = cli({"SYNC_WORKER_API_URL": server.url}, "runs", "cancel", future.task_run_id, "--json")
    assert out.returncode == 0, out.stderr
    [item] = json.loads(out.stdout)
    assert (item["status"], item["worker_notified"], item["held_by"]) == ("cancelling", False, "lease")
    from sync_worker.runs_cli import _cancelling_how

    assert _cancelling_how(False, "lease") == \
        "its worker's connection is gone; it ends CANCELLED when its lease runs out"
