"""Parameters records kept by the server travel with their runs, at the wire level.

``create_parameters`` (rpc socket): a create may carry ``"parameters_record"``, stored with the
run in its transaction under ``parameters.<task_parameters_id>``; a refused create stores
nothing. ``inline_parameters`` (subscription, with ``claim_at_delivery``): a run whose record
the server keeps is delivered with it in ``"parameters_record"``, whether it was claimed at
delivery or at its create.
"""
from __future__ import annotations

import json
import uuid

import pytest

from tests.server.conftest import read_close
from tests.server.test_server_claim_at_create import CREATE, _idle
from tests.server.test_server_claim_at_delivery import claiming
from tests.server.test_server_claim_commit import _record_batches
from tests.server.test_server_rpc import call, rpc_socket

RECORD = json.dumps({"metadata": {"storage_key": "k", "serializer": {"type": "json"}},
                     "result": json.dumps({"parameters": {"x": 1, "y": "é"}, "context": {}})}, ensure_ascii=False)


def _params_id(body: dict) -> str:
    return body["state"]["state_details"]["task_parameters_id"]


def _stored(wire, params_id: str):
    response = wire.http.get(f"{wire.url}/storage/parameters.{params_id}", timeout=10)
    return response.content.decode() if response.status_code == 200 else response.status_code


def _create(wire, ws, body: dict, record=RECORD) -> dict:
    return call(ws, {"type": "create", "body": body, "brief": True, "parameters_record": record})


def test_both_sockets_announce_their_extension(wire):
    ws, auth = rpc_socket(wire)
    try:
        assert "create_parameters" in auth["extensions"]
    finally:
        ws.close()
    assert "inline_parameters" in claiming(wire, 1, inline_parameters=True).auth_reply["extensions"]


def test_a_create_with_its_record_stores_both(wire):
    ws, _ = rpc_socket(wire)
    try:
        body = wire.create_body(id=str(uuid.uuid4()))
        reply = _create(wire, ws, body)
        assert reply["status_code"] == 201 and reply["result"]["id"] == body["id"]
        assert _stored(wire, _params_id(body)) == RECORD
        assert wire.read(body["id"])["state"]["state_details"]["task_parameters_id"] == _params_id(body)
        again = _create(wire, ws, body)  # a repeat (its answer lost): the same run, the record kept
        assert again["status_code"] == 201 and again["result"]["id"] == body["id"]
        assert _stored(wire, _params_id(body)) == RECORD
    finally:
        ws.close()


@pytest.mark.parametrize("record, state_details, detail", [
    (5, None, "parameters_record: Input should be a valid string"),
    ({"metadata": {}}, None, "parameters_record: Input should be a valid string"),
    (RECORD, {"deferred": True}, "task_parameters_id: Field required"),
])
def test_a_create_whose_record_cannot_be_stored_is_refused_and_stores_nothing(wire, record, state_details, detail):
    ws, _ = rpc_socket(wire)
    try:
        body = wire.create_body(id=str(uuid.uuid4()))
        params_id = _params_id(body)
        if state_details is not None:
            body["state"]["state_details"] = state_details
        reply = _create(wire, ws, body, record)
        assert reply["status_code"] == 422 and detail in reply["detail"]
        assert wire.http.get(f"{wire.url}/task_runs/{body['id']}", timeout=10).status_code == 404
        assert _stored(wire, params_id) == 404
    finally:
        ws.close()


def test_a_create_refused_as_a_conflict_stores_no_record(wire):
    ws, _ = rpc_socket(wire)
    try:
        first = wire.create_body(id=str(uuid.uuid4()))
        assert _create(wire, ws, first)["status_code"] == 201
        other = wire.create_body(id=first["id"])  # another run with that id: 409
        reply = _create(wire, ws, other)
        assert reply["status_code"] == 409
        assert _stored(wire, _params_id(other)) == 404
    finally:
        ws.close()


def test_runs_claimed_at_delivery_carry_the_record_the_server_keeps(wire):
    ws, _ = rpc_socket(wire)
    try:
        with_record = wire.create_body()
        _create(wire, ws, with_record)
        put = wire.create_body()  # its record PUT over REST, as a client without the extension does
        assert wire.http.put(f"{wire.url}/storage/parameters.{_params_id(put)}", data=RECORD.encode(),
                             timeout=10).status_code == 204
        assert call(ws, {"type": "create", "body": put})["status_code"] == 201
        elsewhere = wire.create_body()  # its record in a local directory: not the server's
        assert call(ws, {"type": "create", "body": elsewhere})["status_code"] == 201
        large = wire.create_body()  # over 64 KiB: left to the worker's store
        big = json.dumps({"metadata": {}, "result": "x" * (64 * 1024)})
        assert _create(wire, ws, large, big)["status_code"] == 201
    finally:
        ws.close()
    subscriber = claiming(wire, 4, inline_parameters=True)
    runs = {_params_id(run): run for run in (subscriber.next_run() for _ in range(4))}
    assert runs[_params_id(with_record)]["parameters_record"] == RECORD
    assert runs[_params_id(put)]["parameters_record"] == RECORD
    assert "parameters_record" not in runs[_params_id(elsewhere)]
    assert "parameters_record" not in runs[_params_id(large)] and _stored(wire, _params_id(large)) == big
    assert all(run["state"]["type"] == "RUNNING" for run in runs.values())


def test_a_run_claimed_at_its_create_carries_its_record(server, wire):
    subscriber = claiming(wire, 1, inline_parameters=True)
    _idle(server)  # waiting with a free credit: the next create is claimed for it
    ws, _ = rpc_socket(wire)
    batches = _record_batches(server)
    try:
        body = wire.create_body()
        assert _create(wire, ws, body)["status_code"] == 201
    finally:
        ws.close()
    run = subscriber.next_run()
    assert batches == [[CREATE]]  # claimed in the create's own commit
    assert run["state"]["type"] == "RUNNING" and run["parameters_record"] == RECORD


def test_without_the_opt_in_runs_come_without_records(wire):
    ws, _ = rpc_socket(wire)
    try:
        bodies = [wire.create_body(), wire.create_body()]
        for body in bodies:
            _create(wire, ws, body)
    finally:
        ws.close()
    claimer = claiming(wire, 1)
    assert "parameters_record" not in claimer.next_run()
    claimer.close()
    plain = wire.subscribe(client_id="prefect-like")  # Prefect's protocol: ack per run
    assert "parameters_record" not in plain.next_run()


def test_the_record_is_deleted_when_its_run_completes(wire):
    ws, _ = rpc_socket(wire)
    try:
        body = wire.create_body()
        run_id = _create(wire, ws, body)["result"]["id"]
    finally:
        ws.close()
    subscriber = claiming(wire, 1, inline_parameters=True)
    assert subscriber.next_run()["parameters_record"] == RECORD
    assert subscriber.set_state(run_id, "COMPLETED")["result"]["status"] == "ACCEPT"
    assert _stored(wire, _params_id(body)) == 404


@pytest.mark.parametrize("extra, reason", [
    ({"inline_parameters": True}, "'inline_parameters' requires 'claim_at_delivery'"),
    ({"inline_parameters": "yes", "credit": 1, "claim_at_delivery": True}, "'inline_parameters' must be true or false"),
])
def test_a_wrong_opt_in_closes_the_connection(wire, extra, reason):
    ws = wire.connect()
    try:
        ws.send(json.dumps({"type": "auth", "token": None}))
        assert json.loads(ws.recv())["type"] == "auth_success"
        ws.send(json.dumps({"type": "subscribe", "keys": ["tests.add"], "client_id": "c", **extra}))
        code, text = read_close(ws)
        assert code == 4001 and reason in text
    finally:
        ws.close()


def test_deleting_a_run_deletes_the_record_the_server_keeps_for_it(wire):
    """``DELETE /api/task_runs/{id}`` (a user, or a worker that does not know the task):
    nothing refers to the run's parameters record any more, so it goes with the run."""
    body = wire.create_body(id=str(uuid.uuid4()))
    ws, _ = rpc_socket(wire)
    try:
        assert _create(wire, ws, body)["status_code"] == 201
    finally:
        ws.close()
    other = wire.create_body(id=str(uuid.uuid4()))
    wire.http.put(f"{wire.url}/storage/parameters.{_params_id(other)}", data=RECORD.encode(), timeout=10)
    assert wire.http.post(f"{wire.url}/task_runs/", json=other, timeout=10).status_code == 201
    assert wire.http.delete(f"{wire.url}/task_runs/{body['id']}", timeout=10).status_code == 204
    assert _stored(wire, _params_id(body)) == 404
    assert _stored(wire, _params_id(other)) == RECORD  # another run's record is left alone
    assert wire.http.get(f"{wire.url}/task_runs/{body['id']}", timeout=10).status_code == 404
