"""What one commit sends to one connection goes out in one write (no wire change: the same
frames, written together): the answers to the state changes a subscription's read carried and
the runs their commit claimed; the rpc wait replies of several runs that finished in one commit
of another connection's thread. One system call and one wake-up of the client's reader instead
of one per message. Observed on the real server: its sockets' send methods wrapped, nothing
replaced."""
from __future__ import annotations

import json
import os
import uuid
from typing import Any

from sync_worker import framing
from sync_worker.server.sockets import WebSocket
from tests.helpers import wait_for
from tests.server.test_server_claim_at_delivery import claiming
from tests.server.test_server_claim_commit import _record_batches
from tests.server.test_server_rpc import call, rpc_socket


def _record_writes(monkeypatch: Any) -> list[Any]:
    """Each write of the server's sockets from now on, as (how, the kinds of the messages it
    carried in order): ``type`` of a message, or ``run`` for a TaskRun."""
    writes: list[Any] = []

    def kinds(messages) -> list[str]:
        return [json.loads(m).get("type", "run") for m in messages]

    send_many, try_send_many, send = WebSocket.send_many, WebSocket.try_send_many, WebSocket.send

    def recorded_send_many(self, messages):
        writes.append(["send", kinds(messages)])
        return send_many(self, messages)

    def recorded_try_send_many(self, messages):
        entry = ["trying", kinds(messages)]
        writes.append(entry)  # before the client can see it (the test reads the list then)
        sent = try_send_many(self, messages)
        entry[0] = "try_send" if sent else "refused"
        return sent

    def recorded_send(self, data):
        if isinstance(data, str):
            writes.append(["send", kinds([data])])
        return send(self, data)

    monkeypatch.setattr(WebSocket, "send_many", recorded_send_many)
    monkeypatch.setattr(WebSocket, "try_send_many", recorded_try_send_many)
    monkeypatch.setattr(WebSocket, "send", recorded_send)
    return writes


def _send_together(subscriber, messages: list[dict[str, Any]]) -> None:
    """Several client frames in one TCP write (so the server reads them in one read)."""
    frames = [framing.text_frame(json.dumps(m).encode(), os.urandom(4)) for m in messages]
    subscriber.ws.sock.sendall(b"".join(frames))


def _completed(run_id: str, **extra: Any) -> dict[str, Any]:
    return {"type": "set_state", "request_id": uuid.uuid4().hex, "task_run_id": run_id,
            "state": {"type": "COMPLETED"}, **extra}


def test_the_answers_of_one_commit_and_the_runs_it_claimed_go_out_in_one_write(server, wire, monkeypatch):
    subscriber = claiming(wire, 2)
    created = [wire.create()["id"] for _ in range(4)]
    held = [subscriber.next_run()["id"], subscriber.next_run()["id"]]
    assert held == created[:2]  # the credit (2) holds the other two back
    wait_for(lambda: server.core.queue.stats()["buffered"] == 2, timeout=10, message="two runs queued")
    batches = _record_batches(server)
    writes = _record_writes(monkeypatch)
    _send_together(subscriber, [_completed(run_id, credit=1) for run_id in held])
    frames = [subscriber.recv() for _ in range(4)]
    assert sorted(f.get("type", "run") for f in frames) == ["run", "run", "set_state_result", "set_state_result"]
    assert [f["id"] for f in frames if "type" not in f] == created[2:]
    assert len(batches) == 1  # the two final states and the two claims: one commit
    assert writes == [["send", ["set_state_result", "set_state_result", "run", "run"]]]


def test_wait_replies_of_runs_finished_in_one_commit_reach_their_client_in_one_write(server, wire, monkeypatch):
    creator, _ = rpc_socket(wire)
    ids = [call(creator, {"type": "create", "body": wire.create_body(), "brief": True})["result"]["id"]
           for _ in range(3)]
    subscriber = claiming(wire, 3)
    runs = sorted(subscriber.next_run()["id"] for _ in range(3))
    assert runs == sorted(ids)
    for run_id in ids:
        creator.send(json.dumps({"type": "wait", "request_id": run_id, "task_run_id": run_id, "timeout": 30}))
    wait_for(lambda: sum(len(v) for v in server.core._finish_waiters.values()) == 3, timeout=10,
             message="the waits registered")
    batches = _record_batches(server)
    writes = _record_writes(monkeypatch)
    _send_together(subscriber, [_completed(run_id) for run_id in ids])
    creator.settimeout(10)
    replies = [json.loads(creator.recv()) for _ in range(3)]
    assert sorted(r["request_id"] for r in replies) == sorted(ids)
    assert all(r["status_code"] == 200 and r["result"]["state"]["type"] == "COMPLETED" for r in replies)
    assert len(batches) == 1  # the three final states: one commit, by the subscription's reader
    wait_for(lambda: len(writes) == 2 and writes[0][0] != "trying", timeout=10, message="the answers sent")
    assert ["try_send", ["wait_result"] * 3] in writes  # one write, never blocking
    assert ["send", ["set_state_result"] * 3] in writes  # (the subscriber's answers: one write too)
