"""REST endpoints of the embedded server, at the wire level."""
from __future__ import annotations

import base64
import json
import socket
import uuid

import pytest
import requests


def _shape(value):
    """Keys (recursively) of a JSON object: the wire shape without the values."""
    if isinstance(value, dict):
        return {key: _shape(item) for key, item in value.items()}
    return None


def test_health(wire):
    response = wire.http.get(wire.url + "/health")
    assert response.status_code == 200
    assert response.json() is True


def test_create_prefect_request_returns_prefect_shape(wire, protocol):
    request = protocol("rest_01_create_task_run_request.json")
    expected = protocol("rest_01_create_task_run_response_201.json")
    response = wire.http.post(wire.url + "/task_runs/", json=request)
    assert response.status_code == 201
    body = response.json()
    assert _shape(body) == _shape(expected)
    assert body["task_key"] == request["task_key"]
    assert body["dynamic_key"] == request["dynamic_key"]
    assert body["tags"] == ["capture"]
    assert body["task_inputs"] == {"x": []}
    assert body["empirical_policy"]["retries"] == 1
    assert body["state"]["type"] == "SCHEDULED"
    assert body["state"]["name"] == "Scheduled"
    details = body["state"]["state_details"]
    assert details["deferred"] is True
    assert details["task_parameters_id"] == request["state"]["state_details"]["task_parameters_id"]
    assert details["task_run_id"] == body["id"]
    assert details["scheduled_time"].endswith("Z")
    assert body["state_id"] == body["state"]["id"]
    assert body["state_type"] == "SCHEDULED"
    assert body["run_count"] == 0
    assert body["created"].endswith("Z")


def test_read_returns_what_was_created(wire):
    created = wire.create()
    assert wire.read(created["id"]) == created


def test_read_missing_is_404_like_prefect(wire, protocol):
    response = wire.http.get(wire.url + "/task_runs/3f6c1fb3-0000-4000-8000-000000000000")
    assert response.status_code == 404
    assert response.json() == protocol("rest_09_read_missing_task_run_response_404.json")


def test_delete(wire):
    created = wire.create()
    response = wire.http.delete(f"{wire.url}/task_runs/{created['id']}")
    assert response.status_code == 204
    assert wire.http.get(f"{wire.url}/task_runs/{created['id']}").status_code == 404
    again = wire.http.delete(f"{wire.url}/task_runs/{created['id']}")
    assert again.status_code == 404
    assert again.json()["detail"] == "Task not found"


def test_create_without_state_is_pending_and_not_queued(wire):
    body = wire.create_body()
    del body["state"]
    response = wire.http.post(wire.url + "/task_runs/", json=body)
    assert response.status_code == 201
    assert response.json()["state"]["type"] == "PENDING"
    subscriber = wire.subscribe()
    subscriber.expect_no_run(0.3)


def test_create_with_client_id(wire):
    run_id = "0b5e3f7e-2d0c-4f52-a4c4-8c1b9c8f9d10"
    body = wire.create_body(id=run_id)
    assert wire.http.post(wire.url + "/task_runs/", json=body).json()["id"] == run_id
    duplicate = wire.http.post(wire.url + "/task_runs/", json=wire.create_body(id=run_id))
    assert duplicate.status_code == 409
    assert run_id in duplicate.json()["detail"]


def test_set_state_sequence_matches_prefect_captures(wire, protocol):
    created = wire.http.post(wire.url + "/task_runs/", json=protocol("rest_01_create_task_run_request.json")).json()
    run_id = created["id"]
    steps = [
        ("rest_02_set_state_pending", "ACCEPT", "PENDING", "Pending"),
        ("rest_03_set_state_running", "ACCEPT", "RUNNING", "Running"),
        ("rest_04_set_state_failed_with_retries_left", "REJECT", "SCHEDULED", "AwaitingRetry"),
        ("rest_02_set_state_pending", "ACCEPT", "PENDING", "Pending"),
        ("rest_05_set_state_running_again", "ACCEPT", "RUNNING", "Retrying"),
        ("rest_06_set_state_completed", "ACCEPT", "COMPLETED", "Completed"),
    ]
    for capture, status, state_type, name in steps:
        request = protocol(f"{capture}_request.json")
        response = wire.http.post(f"{wire.url}/task_runs/{run_id}/set_state", json=request)
        assert response.status_code == 201, response.text
        body = response.json()
        expected = protocol(f"{capture}_response_201.json")
        assert _shape(body) == _shape(expected)
        assert (body["status"], body["state"]["type"], body["state"]["name"]) == (status, state_type, name)
        assert body["details"]["type"] == expected["details"]["type"]
    final = wire.read(run_id)
    assert final["state_type"] == "COMPLETED"
    assert final["run_count"] == 2
    assert final["end_time"] is not None
    assert final["start_time"] is not None


def test_awaiting_retry_keeps_message(wire, protocol):
    run = wire.create(empirical_policy={"retries": 1, "retry_delay": 0})
    wire.set_state(run["id"], "PENDING")
    wire.set_state(run["id"], "RUNNING")
    body = wire.set_state(run["id"], "FAILED", message="Task run encountered an exception ValueError: boom").json()
    assert body["status"] == "REJECT"
    assert body["details"] == {"type": "reject_details", "reason": "Retrying"}
    assert body["state"]["message"] == "Task run encountered an exception ValueError: boom"
    assert body["state"]["name"] == "AwaitingRetry"


# -- bad input ---------------------------------------------------------------------------------
def test_validation_names_the_field(wire):
    response = wire.http.post(wire.url + "/task_runs/", json={"name": 5})
    assert response.status_code == 422
    body = response.json()
    assert "name" in body["detail"]
    assert body["exception_detail"][0]["loc"] == ["body", "name"]

    response = wire.http.post(wire.url + "/task_runs/", json={"name": "x", "dynamic_key": "d"})
    assert response.status_code == 422
    assert response.json()["detail"] == "body.task_key: Field required"


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"tags": "not-a-list"}, "tags"),
        ({"empirical_policy": {"retries": -1}}, "retries"),
        ({"empirical_policy": {"retries": 1, "retry_delay": "soon"}}, "retry_delay"),
        ({"state": {"type": "EXPLODED"}}, "state.type"),
        ({"state": {"name": "no type"}}, "state.type"),
        ({"state": {"type": "SCHEDULED", "state_details": {"scheduled_time": "tomorrow"}}}, "scheduled_time"),
        ({"task_key": ""}, "task_key"),
        ({"id": "not-a-uuid"}, "id"),
    ],
)
def test_create_rejects_bad_fields(wire, overrides, field):
    response = wire.http.post(wire.url + "/task_runs/", json=wire.create_body(**overrides))
    assert response.status_code == 422, response.text
    assert field in response.json()["detail"]


def test_malformed_json_is_422_and_server_keeps_working(wire):
    response = wire.http.post(wire.url + "/task_runs/", data=b"{not json",
                              headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert "not valid JSON" in response.json()["detail"]
    response = wire.http.post(wire.url + "/task_runs/", data=b"[1, 2]", headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert wire.http.get(wire.url + "/health").json() is True


def test_empty_body_is_422(wire):
    response = wire.http.post(wire.url + "/task_runs/")
    assert response.status_code == 422
    assert "body" in response.json()["detail"]


def test_set_state_bad_input(wire):
    run = wire.create()
    url = f"{wire.url}/task_runs/{run['id']}/set_state"
    unknown = wire.http.post(url, json={"state": {"type": "EXPLODED"}})
    assert unknown.status_code == 422
    assert "state.type" in unknown.json()["detail"]
    assert "EXPLODED" in unknown.json()["detail"]
    assert wire.http.post(url, json={"force": True}).status_code == 422
    assert "force" in wire.http.post(url, json={"state": {"type": "PENDING"}, "force": "yes"}).json()["detail"]
    assert wire.http.post(url, data=b"\xff\xfe", headers={"Content-Type": "application/json"}).status_code == 422
    # nothing changed
    assert wire.read(run["id"])["state"] == run["state"]
    missing = wire.http.post(f"{wire.url}/task_runs/{uuid.uuid4()}/set_state", json={"state": {"type": "PENDING"}})
    assert missing.status_code == 404
    assert missing.json()["detail"] == "Task not found"
    not_an_id = wire.http.post(f"{wire.url}/task_runs/nope/set_state", json={"state": {"type": "PENDING"}})
    assert not_an_id.status_code == 422  # as Prefect answers a path that is not a UUID
    assert "Input should be a valid UUID, not 'nope'" in str(not_an_id.json()["detail"])


def test_a_run_id_in_another_spelling_of_its_uuid_finds_the_run(wire):
    """Upper case, or without dashes: uuid.UUID reads both, and so does Prefect's API."""
    run = wire.create()
    for spelling in (run["id"].upper(), run["id"].replace("-", "")):
        response = wire.http.get(f"{wire.url}/task_runs/{spelling}")
        assert response.status_code == 200 and response.json()["id"] == run["id"]
    upper = run["id"].upper()
    assert wire.http.post(f"{wire.url}/task_runs/{upper}/set_state",
                          json={"state": {"type": "PENDING"}}).json()["status"] == "ACCEPT"
    assert wire.http.delete(f"{wire.url}/task_runs/{upper}").status_code == 204
    assert wire.http.get(f"{wire.url}/task_runs/{run['id']}").status_code == 404


def test_oversized_body_is_413(server_factory):
    server = server_factory(max_body_size=1000)
    url = server.url + "/task_runs/"
    response = requests.post(url, data=b"x" * 5000, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert "1000" in response.json()["detail"]
    assert requests.get(server.url + "/health").json() is True


def test_unknown_route_and_method(wire):
    response = wire.http.get(wire.url + "/nothing/here")
    assert response.status_code == 404
    assert "detail" in response.json()
    response = wire.http.put(wire.url + "/task_runs/")
    assert response.status_code == 405
    assert "POST" in response.json()["detail"]


def test_keep_alive_survives_errors(wire):
    """One connection: errors with unread bodies must not desynchronize the next request."""
    sock = socket.create_connection((wire.url.split("//")[1].split(":")[0], int(wire.url.rsplit(":", 1)[1].split("/")[0])))
    try:
        body = b'{"a": 1}'
        request = (b"POST /api/nothing HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                   + b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        sock.sendall(request)
        data = b""
        sock.settimeout(5)
        while data.count(b"HTTP/1.1 ") < 2 or not data.endswith(b"true"):
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        assert data.startswith(b"HTTP/1.1 404")
        assert b"HTTP/1.1 200 OK" in data
    finally:
        sock.close()


def test_websocket_endpoint_without_upgrade(wire):
    response = wire.http.get(wire.url + "/task_runs/subscriptions/scheduled")
    assert response.status_code == 426


# -- storage endpoint -------------------------------------------------------------------------
def test_storage_roundtrip(wire):
    url = wire.url + "/storage/params-1.json"
    assert wire.http.get(url).status_code == 404
    assert wire.http.put(url, data=b"\x00\x01binary").status_code == 204
    response = wire.http.get(url)
    assert response.status_code == 200
    assert response.content == b"\x00\x01binary"
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert wire.http.put(url, data=b"replaced").status_code == 204
    assert wire.http.get(url).content == b"replaced"
    assert wire.http.delete(url).status_code == 204
    assert wire.http.delete(url).status_code == 404
    assert wire.http.get(url).status_code == 404


def test_storage_bad_key(wire):
    response = wire.http.put(wire.url + "/storage/bad%20key", data=b"x")
    assert response.status_code == 422
    assert "key" in response.json()["detail"]
    assert wire.http.put(wire.url + "/storage/" + "k" * 201, data=b"x").status_code == 422


# -- auth ----------------------------------------------------------------------------------------
def test_auth_required_when_configured(server_factory, make_wire):
    server = server_factory(auth_string="admin:s3cret")
    anonymous = requests.get(server.url + "/health")
    assert anonymous.status_code == 401
    assert "Authorization" in anonymous.json()["detail"]
    wrong = requests.get(server.url + "/health",
                         headers={"Authorization": "Basic " + base64.b64encode(b"admin:wrong").decode()})
    assert wrong.status_code == 401
    create = requests.post(server.url + "/task_runs/", json={"task_key": "k", "dynamic_key": "d"})
    assert create.status_code == 401
    w = make_wire(server)
    assert w.http.get(server.url + "/health").json() is True
    run = w.create()
    assert w.read(run["id"])["id"] == run["id"]


def test_auth_off_needs_no_header(wire):
    assert wire.http.headers.get("Authorization") is None
    assert wire.create()["state"]["type"] == "SCHEDULED"


def test_json_error_bodies_are_json(wire):
    for response in (
        wire.http.get(wire.url + "/task_runs/x"),
        wire.http.post(wire.url + "/task_runs/", data=b"nope"),
        wire.http.get(wire.url + "/zzz"),
    ):
        assert response.headers["Content-Type"] == "application/json"
        assert isinstance(json.loads(response.text)["detail"], str)


def test_prefect_client_handshake_endpoints(wire):
    version = wire.http.get(wire.url + "/admin/version")
    assert version.status_code == 200
    assert version.json().split(".")[0] == "3"  # Prefect clients require the same major version
    csrf = wire.http.get(wire.url + "/csrf-token?client=abc")
    assert csrf.status_code == 422
    assert "CSRF protection is disabled." in csrf.text
