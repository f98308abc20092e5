"""One transaction for what the shared reader reads in one pass (SharedReader.pass_context).

What a user would see: a worker's final state and a create that reach the server together are
committed together (one SQLite transaction, not one per connection), and both are answered as
before; the run created is claimed for the worker whose final state freed its slot, in that same
commit. A ``wait`` read right after a create of the same run, in the same pass, finds it (the
creates before a wait are committed first), never a 404.
"""
from __future__ import annotations

import json
import uuid

import pytest
from tests.server.test_server_claim_at_create import CREATE, _idle
from tests.server.test_server_claim_at_delivery import _answer, claiming
from tests.server.test_server_claim_commit import _record_batches
from tests.server.test_server_rpc import call, rpc_socket

pytestmark = pytest.mark.timeout(60)


def _reply(ws, request_id: str) -> dict:
    ws.settimeout(10)
    while True:
        message = json.loads(ws.recv())
        if message.get("request_id") == request_id:
            return message


def test_a_final_state_and_a_create_read_in_one_pass_are_one_commit(server, wire):
    subscriber = claiming(wire, 1)
    _idle(server)
    ws, _ = rpc_socket(wire)
    first = call(ws, {"type": "create", "body": wire.create_body(), "brief": True})["result"]["id"]
    run = subscriber.next_run()
    assert run["id"] == first and run["state"]["type"] == "RUNNING"
    batches = _record_batches(server)
    reader = server._registry.reader
    assert reader is not None
    # Hold the shared reader at the end of its next pass (it takes this lock after each pass),
    # so that the two frames below are both waiting when it next looks: one pass reads both.
    with reader._lock:
        # a pass that ends with this answer sent; after it the reader reads nothing more until
        # it has the lock
        assert call(ws, {"type": "wait", "task_run_id": str(uuid.uuid4()), "timeout": 0})["status_code"] == 404
        done_id = uuid.uuid4().hex
        subscriber.send({"type": "set_state", "request_id": done_id, "task_run_id": first,
                         "state": {"type": "COMPLETED"}, "credit": 1})
        create_id = uuid.uuid4().hex
        ws.send(json.dumps({"type": "create", "request_id": create_id, "body": wire.create_body(), "brief": True}))
    assert _answer(subscriber, done_id)["result"]["status"] == "ACCEPT"
    created = _reply(ws, create_id)
    assert created["status_code"] == 201
    second = subscriber.next_run()  # claimed at its create with the credit the final state carried
    assert second["id"] == created["result"]["id"] and second["state"]["type"] == "RUNNING"
    assert wire.read(first)["state_type"] == "COMPLETED"
    assert wire.read(second["id"])["state_type"] == "RUNNING"
    # one commit for both connections' messages (before: the final state's, then the create's)
    assert len(batches) == 1, batches
    assert len(batches[0]) == 2 and batches[0][1] == CREATE, batches


def test_a_wait_right_after_its_create_in_one_pass_finds_the_run(server, wire):
    ws, _ = rpc_socket(wire)
    run_id = str(uuid.uuid4())
    create_id, wait_id = uuid.uuid4().hex, uuid.uuid4().hex
    reader = server._registry.reader
    with reader._lock:  # both frames are read in one pass (see above)
        assert call(ws, {"type": "wait", "task_run_id": str(uuid.uuid4()), "timeout": 0})["status_code"] == 404
        ws.send(json.dumps({"type": "create", "request_id": create_id, "body": wire.create_body(id=run_id)}))
        ws.send(json.dumps({"type": "wait", "request_id": wait_id, "task_run_id": run_id, "timeout": 0}))
    ws.settimeout(10)
    replies = {m["request_id"]: m for m in (json.loads(ws.recv()) for _ in range(2))}
    created, waited = replies[create_id], replies[wait_id]
    assert created["status_code"] == 201 and created["result"]["id"] == run_id
    # no worker: answered at its timeout with the run as it is (a 404 if the create were not
    # committed before the wait was handled)
    assert waited["status_code"] == 200, waited
    assert waited["result"]["id"] == run_id and waited["result"]["state"]["type"] == "SCHEDULED"
