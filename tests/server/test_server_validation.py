"""Validation that leaves no poison: what a client sees for each kind of bad field (REST and
sockets), and that what is accepted can be read back, parsed, and finished."""
from __future__ import annotations

import json
import socket
import uuid

import pytest
import websocket
from tests.server.conftest import read_close

from sync_worker.schemas import parse_datetime
from sync_worker.server import validation

pytestmark = pytest.mark.timeout(60)


def post_raw(wire, path: str, raw: bytes):
    return wire.http.post(wire.url + path, data=raw, headers={"Content-Type": "application/json"}, timeout=10)


def scheduled(wire, when: str, **details):
    body = wire.create_body()
    body["state"]["state_details"].update(scheduled_time=when, **details)
    return body


@pytest.mark.parametrize("policy, field, rule", [
    ({"retries": 3, "retry_delay": 1e300}, "empirical_policy.retry_delay", "less than or equal"),
    ({"retries": 3, "retry_delay": [1, 1e300]}, "empirical_policy.retry_delay.1", "less than or equal"),
    ({"retries": 3, "retry_delay": 1, "retry_jitter_factor": 1e300}, "empirical_policy.retry_jitter_factor",
     "less than or equal"),
    ({"retries": 10 ** 30}, "empirical_policy.retries", "whole number from 0"),
    ({"retries": -1}, "empirical_policy.retries", "whole number from 0"),
])
def test_numbers_out_of_range_are_422_naming_field_and_rule(wire, policy, field, rule):
    response = wire.http.post(wire.url + "/task_runs/", json=wire.create_body(empirical_policy=policy))
    assert response.status_code == 422, response.text
    assert field in response.json()["detail"] and rule in response.json()["detail"]


@pytest.mark.parametrize("raw, rule", [
    (b'{"task_key": "k", "dynamic_key": "d", "empirical_policy": {"retry_delay": 1e400}}', "finite"),
    (b'{"task_key": "k", "dynamic_key": "d", "empirical_policy": {"retry_delay": NaN}}', "NaN"),
    (b'{"task_key": "k", "dynamic_key": "d", "labels": {"x": -Infinity}}', "-Infinity"),
    (b'{"task_key": "k\\ud800", "dynamic_key": "d"}', "body.task_key: lone UTF-16 surrogate"),
    (b'{"task_key": "k", "dynamic_key": "d", "tags": ["ok", "\\udfff"]}', "body.tags.1: lone"),
    (b'{"task_key": "k", "dynamic_key": "d", "labels": {"\\ud800": 1}}', "lone UTF-16 surrogates are not allowed in keys"),
    (b'{"task_key": "k", "dynamic_key": "d", "state": {"type": "SCHEDULED", "data": '
     + b"[" * 990 + b"]" * 990 + b"}}", f"nested deeper than {validation.MAX_DEPTH}"),
    (b'{"task_key": "k", "dynamic_key": "d", "state": {"type": "SCHEDULED", "data": '
     + b"[" * 100000 + b"]" * 100000 + b"}}", "nested deeper"),
], ids=["overflow", "nan", "-infinity", "surrogate", "surrogate-in-list", "surrogate-key", "nested-990",
        "nested-100000"])
def test_json_that_cannot_be_stored_and_served_is_refused(wire, raw, rule):
    response = post_raw(wire, "/task_runs/", raw)
    assert response.status_code == 422, response.text
    assert rule in response.json()["detail"]


def test_escaped_surrogate_pairs_are_fine(wire):
    raw = json.dumps(wire.create_body(name="emoji \U0001f600")).encode()  # ensure_ascii: \ud83d\ude00
    assert b"\\ud83d" in raw
    response = post_raw(wire, "/task_runs/", raw)
    assert response.status_code == 201, response.text
    assert wire.read(response.json()["id"])["name"] == "emoji \U0001f600"


@pytest.mark.parametrize("when, written", [
    ("0001-01-01", "0001-01-01T00:00:00.000000Z"),
    ("1969-07-20T20:17:40.5Z", "1969-07-20T20:17:40.500000Z"),
    ("2000-02-29T23:59:59.999999+02:00", "2000-02-29T21:59:59.999999Z"),
])
def test_past_datetimes_are_written_back_exactly_and_delivered(wire, when, written):
    run = wire.create(**{"state": scheduled(wire, when)["state"]})
    stored = wire.read(run["id"])
    assert stored["state"]["state_details"]["scheduled_time"] == written
    assert stored["expected_start_time"] == written
    parse_datetime(written)  # what our client does with it
    subscriber = wire.subscribe()
    assert subscriber.next_run()["id"] == run["id"]  # due: it is in the past


def test_the_last_accepted_instant_is_kept_to_the_microsecond_and_not_delivered(wire):
    run = wire.create(**{"state": scheduled(wire, "9999-12-31T23:59:59.999999Z")["state"]})
    stored = wire.read(run["id"])
    assert stored["state"]["state_details"]["scheduled_time"] == "9999-12-31T23:59:59.999999Z"
    wire.subscribe().expect_no_run(0.5)
    # it can still be finished: deleted, or forced to a final state
    assert wire.set_state(run["id"], "CANCELLED", force=True).json()["status"] == "ACCEPT"


@pytest.mark.parametrize("when, rule", [
    ("9999-12-31T23:59:59-01:00", "out of range: years 0001-9999 in UTC"),
    ("0001-01-01T00:00:00+01:00", "out of range"),
    ("10000-01-01", "valid ISO 8601"),
    ("tomorrow", "valid ISO 8601"),
    ("2026-01-01T00:00:00" + " " * 100, "at most 64 characters"),
])
def test_datetimes_out_of_range_are_refused_on_create_and_set_state(wire, when, rule):
    response = wire.http.post(wire.url + "/task_runs/", json=scheduled(wire, when))
    assert response.status_code == 422, response.text
    assert "body.state.state_details.scheduled_time" in response.json()["detail"]
    assert rule in response.json()["detail"]
    run = wire.create()
    response = wire.set_state(run["id"], "SCHEDULED", state_details={"scheduled_time": when})
    assert response.status_code == 422
    assert "body.state.state_details.scheduled_time" in response.json()["detail"]
    assert wire.read(run["id"])["state"] == run["state"]  # nothing changed


@pytest.mark.parametrize("value", ["a/b", "..", "x" * 300, "../../etc/passwd", 5])
def test_ids_that_become_storage_keys_must_be_uuids(wire, value):
    body = wire.create_body()
    body["state"]["state_details"]["task_parameters_id"] = value
    response = wire.http.post(wire.url + "/task_runs/", json=body)
    assert response.status_code == 422, response.text
    assert "body.state.state_details.task_parameters_id" in response.json()["detail"]
    assert "UUID" in response.json()["detail"]


def test_uuid_ids_are_stored_in_canonical_form(wire):
    params = uuid.uuid4()
    body = wire.create_body(flow_run_id=None)
    body["state"]["state_details"]["task_parameters_id"] = params.hex.upper()
    run = wire.create(**{k: body[k] for k in ("state",)})
    assert run["state"]["state_details"]["task_parameters_id"] == str(params)


@pytest.mark.parametrize("overrides, field, rule", [
    ({"name": "n" * (validation.MAX_KEY + 1)}, "body.name", f"at most {validation.MAX_KEY}"),
    ({"task_key": "k" * (validation.MAX_KEY + 1)}, "body.task_key", f"at most {validation.MAX_KEY}"),
    ({"dynamic_key": "d" * (validation.MAX_KEY + 1)}, "body.dynamic_key", "at most"),
    ({"tags": ["t"] * (validation.MAX_ITEMS + 1)}, "body.tags", f"At most {validation.MAX_ITEMS}"),
    ({"tags": ["t" * (validation.MAX_NAME + 1)]}, "body.tags.0", f"at most {validation.MAX_NAME}"),
    ({"labels": {"l" * (validation.MAX_NAME + 1): 1}}, "body.labels", "at most"),
    ({"id": "not-a-uuid"}, "body.id", "UUID"),
    ({"flow_run_id": "../x"}, "body.flow_run_id", "UUID"),
    ({"cache_expiration": "soon"}, "body.cache_expiration", "ISO 8601"),
    ({"state": {"type": "SCHEDULED", "message": "m" * (validation.MAX_MESSAGE + 1)}}, "body.state.message",
     "at most"),
])
def test_bounded_lengths_and_ids(wire, overrides, field, rule):
    response = wire.http.post(wire.url + "/task_runs/", json=wire.create_body(**overrides))
    assert response.status_code == 422, response.text
    assert field in response.json()["detail"] and rule in response.json()["detail"]


@pytest.mark.parametrize("chunks", [
    b"zz\r\n{}\r\n0\r\n\r\n",  # not hex
    b"2\r\n{}XX0\r\n\r\n",  # no terminator after the chunk
    b"1" * 5000 + b"\r\n",  # an endless size line
], ids=["not-hex", "no-terminator", "endless-size-line"])
def test_malformed_chunked_bodies_are_400(server, chunks):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /api/task_runs/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" + chunks)
        head = sock.recv(65536).decode("latin-1")
    assert head.startswith("HTTP/1.1 400"), head
    assert "Malformed chunked request body" in head
    assert "Connection: close" in head


def rpc(wire):
    ws = websocket.create_connection(wire.url.replace("http", "ws") + "/sync_worker/rpc",
                                     subprotocols=["prefect"], timeout=10)
    ws.send(json.dumps({"type": "auth", "token": None}))
    assert json.loads(ws.recv())["type"] == "auth_success"
    return ws


def test_rpc_create_applies_the_same_rules(wire):
    ws = rpc(wire)
    try:
        ws.send(json.dumps({"type": "create", "request_id": "r1",
                            "body": wire.create_body(empirical_policy={"retries": 1, "retry_delay": 1e300})}))
        reply = json.loads(ws.recv())
        assert reply["status_code"] == 422 and "empirical_policy.retry_delay" in reply["detail"]
    finally:
        ws.close()


@pytest.mark.parametrize("frame, code, reason", [
    ('{"type": "create", "request_id": "r", "body": ' + "[" * 990 + "]" * 990 + "}", 1008, "nested deeper"),
    ('{"type": "create", "request_id": "r\\ud800", "body": {}}', 1008, "lone UTF-16"),
    ('{"type": "create", "request_id": "r", "body": {"x": NaN}}', 1008, "NaN"),
    ("{nope", 1003, "not valid JSON"),
], ids=["nested", "surrogate", "nan", "garbage"])
def test_rpc_socket_closes_with_a_documented_code(wire, frame, code, reason):
    ws = rpc(wire)
    ws.send(frame)
    got_code, got_reason = read_close(ws)
    assert (got_code, reason in got_reason) == (code, True), got_reason
    assert wire.http.get(wire.url + "/health").json() is True


def test_subscription_socket_closes_on_deep_nesting_and_oversized_subscribe(wire):
    subscriber = wire.subscribe()
    subscriber.ws.send('{"type": "ack", "x": ' + "[" * 500 + "]" * 500 + "}")
    code, reason = subscriber.close_code()
    assert code == 1008 and "nested deeper" in reason
    ws = wire.connect()
    ws.send(json.dumps({"type": "auth", "token": None}))
    ws.recv()
    ws.send(json.dumps({"type": "subscribe", "keys": ["k" * (validation.MAX_KEY + 1)], "client_id": "c"}))
    code, reason = read_close(ws)
    assert code == 4001 and f"at most {validation.MAX_KEY}" in reason


def test_set_state_over_the_socket_applies_the_same_rules(wire):
    run = wire.create()
    subscriber = wire.subscribe()
    assert subscriber.next_run()["id"] == run["id"]
    reply = subscriber.set_state(run["id"], "SCHEDULED", state_details={"scheduled_time": "0000-01-01"})
    assert reply["status_code"] == 422 and "state.state_details.scheduled_time" in reply["detail"]
    reply = subscriber.set_state(run["id"], "SCHEDULED", state_details={"task_parameters_id": "../../x"})
    assert reply["status_code"] == 422 and "task_parameters_id" in reply["detail"]
    assert wire.read(run["id"])["state"]["type"] == "SCHEDULED"
