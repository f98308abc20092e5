"""The brief create answer (extension ``brief_create``) and bursts of creates on the rpc socket,
at the wire level.

A client that saw ``brief_create`` in the rpc socket's ``auth_success`` may add ``"brief": true``
to a create: the result is then ``{"id", "state": {"type", "name", "timestamp"}}``. Over REST the
same answer is asked with the header ``X-Sync-Worker-Brief: 1``; without it (every Prefect
client) the whole TaskRun is answered, as before.
"""
from __future__ import annotations

import json
import uuid

from tests.server.test_server_frames import text
from tests.server.test_server_rpc import call, rpc_socket


def _brief_of(run: dict) -> dict:
    state = run["state"]
    return {"id": run["id"], "state": {"type": state["type"], "name": state["name"], "timestamp": state["timestamp"]}}


def test_rpc_announces_brief_create(wire):
    ws, auth = rpc_socket(wire)
    try:
        assert auth["type"] == "auth_success" and "brief_create" in auth["extensions"]
    finally:
        ws.close()


def test_a_brief_create_answers_id_and_state_of_the_stored_run(wire):
    ws, _ = rpc_socket(wire)
    try:
        body = wire.create_body("tests.brief")
        reply = call(ws, {"type": "create", "body": body, "brief": True})
        assert reply["type"] == "create_result" and reply["status_code"] == 201
        result = reply["result"]
        assert set(result) == {"id", "state"} and set(result["state"]) == {"type", "name", "timestamp"}
        stored = wire.read(result["id"])
        assert result == _brief_of(stored)
        assert result["state"]["type"] == "SCHEDULED" and result["state"]["name"] == "Scheduled"
        # a run like any other: delivered
        assert wire.subscribe(keys=["tests.brief"]).next_run()["id"] == result["id"]
    finally:
        ws.close()


def test_without_brief_true_the_whole_run_is_answered(wire):
    ws, _ = rpc_socket(wire)
    try:
        for extra in ({}, {"brief": False}, {"brief": "yes"}, {"brief": 1}):
            reply = call(ws, {"type": "create", "body": wire.create_body(), **extra})
            assert reply["status_code"] == 201
            assert reply["result"] == wire.read(reply["result"]["id"])  # the whole TaskRun
    finally:
        ws.close()


def test_a_repeated_brief_create_answers_the_existing_run_and_a_different_one_is_409(wire):
    ws, _ = rpc_socket(wire)
    try:
        body = wire.create_body(id=str(uuid.uuid4()))
        first = call(ws, {"type": "create", "body": body, "brief": True})
        again = call(ws, {"type": "create", "body": body, "brief": True})
        assert first["status_code"] == again["status_code"] == 201
        assert again["result"] == first["result"] == _brief_of(wire.read(body["id"]))
        other = call(ws, {"type": "create", "body": {**wire.create_body(), "id": body["id"]}, "brief": True})
        assert other["status_code"] == 409 and "already exists" in other["detail"]
    finally:
        ws.close()


def test_rest_brief_header(wire):
    url = wire.url + "/task_runs/"
    brief = wire.http.post(url, json=wire.create_body(), headers={"X-Sync-Worker-Brief": "1"}, timeout=10)
    assert brief.status_code == 201
    assert brief.json() == _brief_of(wire.read(brief.json()["id"]))
    for headers in ({}, {"X-Sync-Worker-Brief": "0"}):
        full = wire.http.post(url, json=wire.create_body(), headers=headers, timeout=10)
        assert full.status_code == 201 and full.json() == wire.read(full.json()["id"])
    bad = wire.http.post(url, json={"name": 5}, headers={"X-Sync-Worker-Brief": "1"}, timeout=10)
    assert bad.status_code == 422


def test_a_burst_mixing_good_bad_and_conflicting_creates_and_a_wait_answers_each(wire):
    """One write, several requests: the creates are committed together, yet each is answered
    on its own (an invalid or conflicting one does not affect its neighbours), and a wait for
    a run created earlier in the same burst finds it."""
    ws, _ = rpc_socket(wire)
    try:
        taken = wire.create()["id"]
        good = [wire.create_body("tests.burst", id=str(uuid.uuid4())) for _ in range(5)]
        messages = [
            {"type": "create", "request_id": "g0", "body": good[0]},
            {"type": "create", "request_id": "bad", "body": {"name": 5}},
            {"type": "create", "request_id": "g1", "body": good[1], "brief": True},
            {"type": "create", "request_id": "dup", "body": {**wire.create_body(), "id": taken}},
            {"type": "create", "request_id": "g2", "body": good[2]},
            {"type": "wait", "request_id": "w", "task_run_id": good[2]["id"], "timeout": 0},
            {"type": "create", "request_id": "g3", "body": good[3]},
            {"type": "create", "request_id": "g4", "body": good[4], "brief": True},
        ]
        ws.sock.sendall(b"".join(text(json.dumps(m)) for m in messages))
        ws.settimeout(10)
        replies = {r["request_id"]: r for r in (json.loads(ws.recv()) for _ in messages)}
        assert {k: r["status_code"] for k, r in replies.items()} == {
            "g0": 201, "bad": 422, "g1": 201, "dup": 409, "g2": 201, "w": 200, "g3": 201, "g4": 201}
        assert replies["w"]["result"]["id"] == good[2]["id"]  # found, as it is (timeout 0)
        for i, body in enumerate(good):
            stored = wire.read(body["id"])
            expected = _brief_of(stored) if i in (1, 4) else stored
            assert replies[f"g{i}"]["result"] == expected
    finally:
        ws.close()


def test_a_protocol_violation_after_creates_in_one_write_commits_them_and_closes_4001(wire):
    from tests.server.conftest import read_close

    ws, _ = rpc_socket(wire)
    try:
        bodies = [wire.create_body(id=str(uuid.uuid4())) for _ in range(3)]
        stream = b"".join(text(json.dumps({"type": "create", "request_id": f"c{i}", "body": b}))
                          for i, b in enumerate(bodies))
        ws.sock.sendall(stream + text(json.dumps({"type": "nonsense"})))
        ws.settimeout(10)
        code, _reason = read_close(ws)
        assert code == 4001
        for body in bodies:
            assert wire.read(body["id"])["id"] == body["id"]
    finally:
        ws.close()
