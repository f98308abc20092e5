"""One transaction for what the shared reader reads in one pass (SharedReader.pass_context).

What a user would see: a worker's final state and a create that reach the server together are
committed together (one SQLite transaction, not one per connection), and both are answered as
before; the run created is claimed for the worker whose final state freed its slot, in that same
commit. A ``wait`` read right after a create of the same run, in the same pass, finds it (the
creates before a wait are committed first), never a 404.
"""
from __future__ import annotations

import json
import os
import select
import threading
import uuid

import pytest
from tests.helpers import wait_for
from tests.server.test_server_claim_at_create import CREATE, _idle
from tests.server.test_server_claim_at_delivery import _answer, claiming
from tests.server.test_server_claim_commit import _record_batches
from tests.server.test_server_rpc import call, rpc_socket

from sync_worker import framing

pytestmark = pytest.mark.timeout(60)


def _reply(ws, request_id: str) -> dict:
    ws.settimeout(10)
    while True:
        message = json.loads(ws.recv())
        if message.get("request_id") == request_id:
            return message


def _frames_together(ws, messages: list[dict]) -> None:
    """Several client frames in one TCP write (the server reads them with one read)."""
    ws.sock.sendall(b"".join(framing.text_frame(json.dumps(m).encode(), os.urandom(4)) for m in messages))


def test_a_final_state_and_a_create_read_in_one_pass_are_one_commit(server, wire, monkeypatch):
    subscriber = claiming(wire, 1)
    _idle(server)
    ws, _ = rpc_socket(wire)
    first = call(ws, {"type": "create", "body": wire.create_body(), "brief": True})["result"]["id"]
    run = subscriber.next_run()
    assert run["id"] == first and run["state"]["type"] == "RUNNING"
    # Hold the shared reader before its next select, send the two frames, and let it go once
    # both are readable on the server's side: that select finds both, one pass reads both.
    reader = server._registry.reader
    entered, gate = threading.Event(), threading.Event()
    select_now = reader._selector.select

    def held(timeout=None):
        entered.set()
        gate.wait(20)
        return select_now(timeout)

    monkeypatch.setattr(reader._selector, "select", held)
    assert entered.wait(10)  # (the select in progress ends within its 1 s timeout)
    batches = _record_batches(server)
    done_id = uuid.uuid4().hex
    subscriber.send({"type": "set_state", "request_id": done_id, "task_run_id": first,
                     "state": {"type": "COMPLETED"}, "credit": 1})
    create_id = uuid.uuid4().hex
    ws.send(json.dumps({"type": "create", "request_id": create_id, "body": wire.create_body(), "brief": True}))
    ends = [connection.sock for connection in list(server._registry._sockets)]
    assert len(ends) == 2
    wait_for(lambda: len(select.select(ends, [], [], 0)[0]) == 2, timeout=10, message="both frames at the server")
    monkeypatch.setattr(reader._selector, "select", select_now)
    gate.set()
    assert _answer(subscriber, done_id)["result"]["status"] == "ACCEPT"
    created = _reply(ws, create_id)
    assert created["status_code"] == 201
    second = subscriber.next_run()  # claimed at its create with the credit the final state carried
    assert second["id"] == created["result"]["id"] and second["state"]["type"] == "RUNNING"
    assert wire.read(first)["state_type"] == "COMPLETED"
    assert wire.read(second["id"])["state_type"] == "RUNNING"
    # one commit for both connections' messages (before: the final state's, then the create's)
    assert len(batches) == 1, batches
    # the final state first, then the end of its hold on claims by other threads, then the create
    assert batches[0][0] == "Core._set_state_op.<locals>.op" and batches[0][-1] == CREATE, batches
    assert len(batches[0]) == 3, batches


def test_a_wait_right_after_its_create_in_one_pass_finds_the_run(server, wire):
    ws, _ = rpc_socket(wire)
    run_id = str(uuid.uuid4())
    create_id, wait_id = uuid.uuid4().hex, uuid.uuid4().hex
    _frames_together(ws, [{"type": "create", "request_id": create_id, "body": wire.create_body(id=run_id)},
                          {"type": "wait", "request_id": wait_id, "task_run_id": run_id, "timeout": 0}])
    ws.settimeout(10)
    replies = {m["request_id"]: m for m in (json.loads(ws.recv()) for _ in range(2))}
    created, waited = replies[create_id], replies[wait_id]
    assert created["status_code"] == 201 and created["result"]["id"] == run_id
    # no worker: answered at its timeout with the run as it is (a 404 if the create were not
    # committed before the wait was handled)
    assert waited["status_code"] == 200, waited
    assert waited["result"]["id"] == run_id and waited["result"]["state"]["type"] == "SCHEDULED"


def test_while_a_final_state_waits_for_the_end_of_the_pass_no_other_thread_claims_with_its_credit(
        server, wire, monkeypatch):
    """The credit a final state carries is usable at once by the creates of the same pass (they
    commit after it, in the same transaction), but not by a create another client commits
    meanwhile: that claim would be committed ahead of the final state that freed the slot."""
    subscriber = claiming(wire, 1)
    _idle(server)
    ws, _ = rpc_socket(wire)
    first = call(ws, {"type": "create", "body": wire.create_body(), "brief": True})["result"]["id"]
    assert subscriber.next_run()["id"] == first
    reader = server._registry.reader
    entered, gate = threading.Event(), threading.Event()
    select_now = reader._selector.select

    def held_select(timeout=None):
        entered.set()
        gate.wait(20)
        return select_now(timeout)

    monkeypatch.setattr(reader._selector, "select", held_select)
    assert entered.wait(10)
    done_id, create_id = uuid.uuid4().hex, uuid.uuid4().hex
    subscriber.send({"type": "set_state", "request_id": done_id, "task_run_id": first,
                     "state": {"type": "COMPLETED"}, "credit": 1})
    ws.send(json.dumps({"type": "create", "request_id": create_id, "body": wire.create_body(), "brief": True}))
    ends = [connection.sock for connection in list(server._registry._sockets)]
    wait_for(lambda: len(select.select(ends, [], [], 0)[0]) == 2, timeout=10, message="both frames at the server")
    # the pass reads the final state (gathered), then stops in the rpc create's handler
    in_pass, go_on = threading.Event(), threading.Event()
    create_now = server.core.create_task_run_async

    def held_create(*args, **kwargs):
        in_pass.set()
        go_on.wait(20)
        return create_now(*args, **kwargs)

    monkeypatch.setattr(server.core, "create_task_run_async", held_create)
    monkeypatch.setattr(reader._selector, "select", select_now)
    gate.set()
    assert in_pass.wait(10)
    try:
        other = wire.create()["id"]  # over REST: an HTTP thread commits it while the pass is held
        assert wire.read(other)["state_type"] == "SCHEDULED"  # queued, not claimed with that credit
        assert wire.read(first)["state_type"] == "RUNNING"  # (the final state is not committed yet)
    finally:
        go_on.set()
    assert _answer(subscriber, done_id)["result"]["status"] == "ACCEPT"
    created = _reply(ws, create_id)
    assert created["status_code"] == 201
    # once the final state is committed, the credit goes to the oldest queued run (the REST one;
    # the rpc create queued behind it: delivery keeps creation order), claimed in a later commit
    delivered = subscriber.next_run()
    assert delivered["id"] == other and delivered["state"]["type"] == "RUNNING"
    assert wire.read(created["result"]["id"])["state_type"] == "SCHEDULED"
