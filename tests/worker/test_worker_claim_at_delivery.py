"""The worker on the server's ``claim_at_delivery`` and ``batch_delivery`` extensions (real
server, real worker, real sockets): runs arrive RUNNING and leased, so the worker sends no
ack and no RUNNING proposal; the credit of a freed slot rides on the final state's frame; a
stopping worker names the runs it did not start; a run re-delivered across a lease expiry
is not started twice; a server without the extensions gets the old protocol."""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import websocket

from sync_worker import sockets, task
from sync_worker.client import Client
from sync_worker.subscription import ConnectionLost, Subscription

from tests.helpers import wait_for
from tests.worker import worker_tasks as wt


@pytest.fixture
def frames(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every JSON text frame this process sends on a websocket (subscription and rpc)."""
    sent: list[dict[str, Any]] = []
    original = websocket.WebSocket.send

    def send(self: websocket.WebSocket, payload: Any, opcode: int = websocket.ABNF.OPCODE_TEXT) -> int:
        if opcode == websocket.ABNF.OPCODE_TEXT:
            try:
                sent.append(json.loads(payload))
            except ValueError:
                pass
        return original(self, payload, opcode)

    monkeypatch.setattr(websocket.WebSocket, "send", send)
    original_frame = sockets.text_frame

    def text_frame(payload: bytes, mask_key: bytes) -> bytes:  # Connection.send_json's frames
        sent.append(json.loads(payload))
        return original_frame(payload, mask_key)

    monkeypatch.setattr(sockets, "text_frame", text_frame)
    return sent


def _states(server: Any, run_id: str) -> list[tuple[str, str | None]]:
    response = requests.get(f"{server.url}/task_run_states/", params={"task_run_id": run_id}, timeout=10)
    return [(s["type"], s["message"]) for s in response.json()]


def _subscription_frames(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for f in frames if f.get("type") in ("subscribe", "ack", "set_state", "credit", "release")]


def test_no_ack_and_no_running_proposal_one_running_state_per_run(server, api_env, frames, start_worker):
    worker = start_worker(wt.add, limit=4)
    futures = [wt.add.delay(i, 1) for i in range(12)]
    assert [f.result(timeout=30) for f in futures] == [i + 1 for i in range(12)]
    sent = _subscription_frames(frames)
    subscribe = next(f for f in sent if f["type"] == "subscribe")
    assert subscribe["claim_at_delivery"] is True and subscribe["batch_delivery"] is True
    assert subscribe["credit"] == 4
    assert not [f for f in sent if f["type"] == "ack"]
    proposed = [f["state"]["type"] for f in sent if f["type"] == "set_state"]
    assert "RUNNING" not in proposed and "PENDING" not in proposed
    assert proposed.count("COMPLETED") == 12
    for future in futures:  # the server's claim is the one RUNNING state; the run ran once
        states = _states(server, future.task_run_id)
        assert [s[0] for s in states] == ["SCHEDULED", "RUNNING", "COMPLETED"], states
        assert states[1][1] == f"Running on {worker.client_id}"
        assert future.task_run.run_count == 1


def test_the_freed_slot_rides_on_the_final_state(server, api_env, frames, start_worker):
    start_worker(wt.add, limit=1)
    futures = [wt.add.delay(i, i) for i in range(5)]
    assert [f.result(timeout=30) for f in futures] == [2 * i for i in range(5)]
    sent = _subscription_frames(frames)
    finals = [f for f in sent if f["type"] == "set_state"]
    # one slot: each run's final state gives it back (the next run is delivered on it), and
    # no credit frame of its own is needed
    assert len(finals) == 5 and all(f.get("credit") == 1 for f in finals[:4]), finals
    assert not [f for f in sent if f["type"] == "credit"]


RELEASE = threading.Event()
STARTED: list[int] = []
LOCK = threading.Lock()


@task(task_key="tests.claim.block")
def block(i: int) -> int:
    with LOCK:
        STARTED.append(i)
    RELEASE.wait(30)
    return i


def test_a_busy_worker_is_not_sent_runs_it_cannot_start(server, api_env, start_worker):
    RELEASE.clear()
    STARTED.clear()
    worker = start_worker(block, limit=2)
    futures = [block.delay(i) for i in range(4)]
    try:
        wait_for(lambda: len(STARTED) == 2, message="two runs started")
        time.sleep(0.3)  # (a third run, wrongly sent, would be visible by now)
        states = sorted(f.state.type.value for f in futures)
        assert states == ["RUNNING", "RUNNING", "SCHEDULED", "SCHEDULED"]  # no claim without a free slot
        assert worker.current_tasks == 2
    finally:
        RELEASE.set()
    assert sorted(f.result(timeout=30) for f in futures) == [0, 1, 2, 3]
    assert sorted(STARTED) == [0, 1, 2, 3]


def test_stop_receiving_hands_back_the_runs_claimed_but_not_started(server, api_env):
    """A subscription whose runs all wait for a slot (the consumer's slow path): stopping
    names them in a ``release`` message, and the server makes them SCHEDULED again at once,
    their delivery not counted."""
    runs = [wt.add.delay(i, 0) for i in range(3)]
    with Client() as client:
        subscription = Subscription([wt.add.task_key], "claim-stopper", client=client, credit=lambda: 3,
                                    on_run=lambda run, dialect: False)
        try:
            first = subscription.next_run(timeout=10)  # held by the consumer, as if waiting for a slot
            assert first is not None and subscription.claims_at_delivery
            wait_for(lambda: all(r.state.type.value == "RUNNING" for r in runs), message="all three claimed")
            subscription.stop_receiving()
            wait_for(lambda: all(r.state.type.value == "SCHEDULED" for r in runs), message="all three handed back")
            assert [client.read_task_run(r.task_run_id).run_count for r in runs] == [0, 0, 0]
        finally:
            subscription.close()


def _starts(path: Path, i: int) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.startswith(f"start {i} ")) if path.exists() else 0


def test_a_run_redelivered_after_its_lease_expired_is_not_started_twice(server_factory, tmp_path, monkeypatch,
                                                                         start_worker, caplog):
    caplog.set_level(logging.INFO, logger="sync_worker")
    server = server_factory(lease_timeout=1.0)
    monkeypatch.setenv("SYNC_WORKER_API_URL", server.url)
    monkeypatch.setenv("SYNC_WORKER_STORAGE", str(tmp_path / "store"))
    marks = tmp_path / "marks"
    worker = start_worker(wt.mark, limit=2)  # a free slot for the run when it is delivered again
    long_run = wt.mark.delay(1, str(marks), 12.0)
    wait_for(lambda: worker.current_tasks == 1, message="the long run in flight")
    subscription = worker._subscription
    assert subscription.claims_at_delivery
    connects = subscription.connects
    # the link stays down past the lease timeout: the server re-queues the run and, once the
    # worker is back, delivers it to it again (claimed again) while it still executes here
    original = subscription._open
    down_until = time.monotonic() + 2.5

    def unreachable() -> Any:
        if time.monotonic() < down_until:
            raise ConnectionLost("simulated outage")
        return original()

    monkeypatch.setattr(subscription, "_open", unreachable)
    subscription._conn.abort(ConnectionLost("simulated network outage"))
    wait_for(lambda: subscription.connects > connects, timeout=30, message="the worker reconnected")
    wait_for(lambda: "delivered again while it executes here" in caplog.text, timeout=30,
             message="the run delivered again after its lease expired")
    # the delivery it refused gives its credit back at once: the free slot takes a new run
    # now, not when the long run's final state carries the credit (it did, 8 s later)
    short_run = wt.mark.delay(2, str(marks), 0.0)
    assert short_run.result(timeout=5) == 2
    assert not long_run.state.is_final()
    assert long_run.result(timeout=30) == 1
    time.sleep(1.5)
    assert _starts(marks, 1) == 1, marks.read_text()
    assert long_run.state.type.value == "COMPLETED"


def test_a_server_without_the_extension_gets_acks_and_running_proposals(server_factory, tmp_path, monkeypatch,
                                                                        frames, start_worker):
    from sync_worker.server import subscriptions

    monkeypatch.setattr(subscriptions, "EXTENSIONS",
                        [e for e in subscriptions.EXTENSIONS if e not in ("claim_at_delivery", "batch_delivery")])
    server = server_factory()
    monkeypatch.setenv("SYNC_WORKER_API_URL", server.url)
    monkeypatch.setenv("SYNC_WORKER_STORAGE", str(tmp_path / "store"))
    start_worker(wt.add, limit=2)
    futures = [wt.add.delay(i, 2) for i in range(4)]
    assert [f.result(timeout=30) for f in futures] == [i + 2 for i in range(4)]
    sent = _subscription_frames(frames)
    subscribe = next(f for f in sent if f["type"] == "subscribe")
    assert "claim_at_delivery" not in subscribe and "batch_delivery" not in subscribe
    assert len([f for f in sent if f["type"] == "ack"]) == 4
    assert [f["state"]["type"] for f in sent if f["type"] == "set_state"].count("RUNNING") == 4


def test_runs_claimed_together_arrive_in_one_frame_and_are_all_taken(server, api_env, monkeypatch):
    """batch_delivery: three queued runs, three credits: one ``task_runs`` frame, three runs."""
    from sync_worker.sockets import Connection

    kinds: list[Any] = []
    original = Connection._dispatch

    def dispatch(self: Connection, message: Any) -> None:
        kinds.append(message.get("type") if isinstance(message, dict) else None)
        original(self, message)

    monkeypatch.setattr(Connection, "_dispatch", dispatch)
    runs = [wt.add.delay(i, 0) for i in range(3)]
    with Client() as client:
        subscription = Subscription([wt.add.task_key], "batch-taker", client=client, credit=lambda: 3,
                                    on_run=lambda run, dialect: False)
        try:
            received = [subscription.next_run(timeout=10) for _ in range(3)]
            assert {r.id for r in received if r is not None} == {r.task_run_id for r in runs}
            assert all(r.state.type.value == "RUNNING" for r in received)
            assert kinds.count("task_runs") == 1 and kinds.count(None) == 0, kinds
            subscription.stop_receiving()  # none was started: all three SCHEDULED again
            wait_for(lambda: all(r.state.type.value == "SCHEDULED" for r in runs), message="handed back")
        finally:
            subscription.close()
