"""The embedded server's rpc socket (/api/sync_worker/rpc): create and wait, at the wire level."""
from __future__ import annotations

import json
import uuid

import websocket
from tests.server.conftest import read_close


def rpc_connect(wire, token=None):
    ws = websocket.create_connection(wire.url.replace("http", "ws") + "/sync_worker/rpc",
                                     subprotocols=["prefect"], timeout=10)
    ws.send(json.dumps({"type": "auth", "token": token if token is not None else wire.auth_string}))
    return ws


def rpc_socket(wire, token=None):
    ws = rpc_connect(wire, token)
    return ws, json.loads(ws.recv())


def call(ws, message):
    request_id = uuid.uuid4().hex
    ws.send(json.dumps({**message, "request_id": request_id}))
    reply = json.loads(ws.recv())
    assert reply["request_id"] == request_id
    return reply


def test_create_over_rpc_is_delivered_like_a_rest_create(wire):
    ws, auth = rpc_socket(wire)
    assert auth["type"] == "auth_success"
    reply = call(ws, {"type": "create", "body": wire.create_body()})
    assert reply["type"] == "create_result" and reply["status_code"] == 201
    run = reply["result"]
    assert run["state"]["type"] == "SCHEDULED" and run["state"]["state_details"]["deferred"] is True
    assert wire.read(run["id"])["id"] == run["id"]
    subscriber = wire.subscribe()
    assert subscriber.next_run()["id"] == run["id"]


def test_invalid_create_is_a_422_naming_the_field(wire):
    ws, _ = rpc_socket(wire)
    reply = call(ws, {"type": "create", "body": {"name": 5}})
    assert reply["status_code"] == 422 and "task_key" in reply["detail"]


def test_many_creates_on_one_socket_are_answered_by_request_id(wire):
    ws, _ = rpc_socket(wire)
    ids = [uuid.uuid4().hex for _ in range(50)]
    for request_id in ids:
        ws.send(json.dumps({"type": "create", "request_id": request_id, "body": wire.create_body()}))
    replies = [json.loads(ws.recv()) for _ in ids]
    assert sorted(r["request_id"] for r in replies) == sorted(ids)
    assert {r["status_code"] for r in replies} == {201}
    assert len({r["result"]["id"] for r in replies}) == 50


def test_wait_is_answered_when_the_run_finishes(wire):
    run_id = wire.create()["id"]
    ws, _ = rpc_socket(wire)
    ws.send(json.dumps({"type": "wait", "request_id": "w1", "task_run_id": run_id}))
    ws.settimeout(0.3)
    try:
        early = ws.recv()
    except websocket.WebSocketTimeoutException:
        early = None
    assert early is None, f"answered before the run finished: {early}"
    for state in ("PENDING", "RUNNING", "COMPLETED"):
        assert wire.set_state(run_id, state).status_code in (200, 201)
    ws.settimeout(10)
    reply = json.loads(ws.recv())
    assert reply["request_id"] == "w1" and reply["status_code"] == 200
    assert reply["result"]["state"]["type"] == "COMPLETED"


def test_wait_on_a_finished_run_is_answered_at_once_and_unknown_runs_are_404(wire):
    run_id = wire.create()["id"]
    wire.set_state(run_id, "CANCELLED", force=True)
    ws, _ = rpc_socket(wire)
    assert call(ws, {"type": "wait", "task_run_id": run_id})["result"]["state"]["type"] == "CANCELLED"
    missing = call(ws, {"type": "wait", "task_run_id": str(uuid.uuid4())})
    assert missing["status_code"] == 404 and missing["detail"] == "Task not found"


def test_rpc_needs_the_auth_string(server_factory, make_wire):
    wire = make_wire(server_factory(auth_string="admin:pw"), auth_string="admin:pw")
    code, reason = read_close(rpc_connect(wire, token="admin:wrong"))
    assert code == 1008 and reason == "Invalid token"
    _ws, auth = rpc_socket(wire)
    assert auth["type"] == "auth_success"


def test_garbage_closes_the_rpc_socket_with_4001(wire):
    ws, _ = rpc_socket(wire)
    ws.send(json.dumps({"type": "hello", "request_id": "x"}))
    code, reason = read_close(ws)
    assert code == 4001 and "create" in reason


def test_wait_is_answered_when_a_lease_runs_out_into_crashed(server_factory, make_wire):
    server = server_factory(lease_timeout=0.3, max_deliveries=1)
    wire = make_wire(server)
    run = wire.create()
    holder = wire.subscribe(client_id="doomed")
    holder.next_run()
    holder.ack()
    holder.set_state(run["id"], "PENDING")
    ws, _auth = rpc_socket(wire)
    ws.send(json.dumps({"type": "wait", "request_id": "w", "task_run_id": run["id"]}))
    holder.ws.close()  # the worker dies: one delivery allowed, so the run is marked CRASHED
    ws.settimeout(10)
    reply = json.loads(ws.recv())
    assert reply["type"] == "wait_result" and reply["status_code"] == 200
    assert reply["result"]["state"]["type"] == "CRASHED"


def test_no_wait_accumulation_a_wait_times_out_on_the_server_and_is_forgotten(server, wire):
    from tests.helpers import wait_for

    run = wire.create()  # nobody runs it
    ws, _ = rpc_socket(wire)
    request_ids = []
    for _ in range(20):
        request_id = uuid.uuid4().hex
        request_ids.append(request_id)
        ws.send(json.dumps({"type": "wait", "request_id": request_id, "task_run_id": run["id"], "timeout": 0.3}))
    answers = [json.loads(ws.recv()) for _ in range(20)]
    assert sorted(a["request_id"] for a in answers) == sorted(request_ids)
    assert all(a["status_code"] == 200 and a["result"]["state"]["type"] == "SCHEDULED" for a in answers)
    wait_for(lambda: run["id"] not in server.core._finish_waiters, message="the waits forgotten")
    reply = call(ws, {"type": "wait", "task_run_id": run["id"], "timeout": "soon"})
    assert reply["status_code"] == 422 and "timeout" in reply["detail"]
    ws.close()

