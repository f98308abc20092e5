"""Prefect's event endpoints on the embedded server, on the wire (issue 12, parts 1, 2, 4).

Real servers on 127.0.0.1, real websockets (websocket-client), the events Prefect 3.8.8's
worker really sent (tests/fixtures/prefect-protocol/events_in_task_run_add.json) and the filter its
TaskRunWaiter really sent (events_out_waiter_filter.json), with their times moved to now.
"""
from __future__ import annotations

import base64
import copy
import json
import logging
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import requests
import websocket

from tests.helpers import wait_for
from tests.server.conftest import RawSocket, read_close

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "prefect-protocol"
CAPTURED_RUN_ID = "4f262616-f425-4785-b19b-3cdf6c4f5e84"
CAPTURED_TASK_KEY = "add-0c1cc858"
FINAL_NAMES = ["prefect.task-run.Cancelled", "prefect.task-run.Crashed", "prefect.task-run.Completed",
               "prefect.task-run.Failed"]


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def captured_events(run_id: str, start: datetime | None = None) -> list[dict[str, Any]]:
    """The four events of the capture (Scheduled, Pending, Running, Completed) for ``run_id``,
    with new ids and their times moved so that the first one occurs at ``start`` (default now)."""
    with open(FIXTURES / "events_in_task_run_add.json") as f:
        events = json.load(f)["events"]
    start = start or datetime.now(timezone.utc)
    shift = start - _parse(events[0]["occurred"])
    ids: dict[str, str] = {}
    out = []
    for event in copy.deepcopy(events):
        event.pop("received", None)
        ids[event["id"]] = str(uuid.uuid4())
        event["id"] = ids[event["id"]]
        if event["follows"]:
            event["follows"] = ids.get(event["follows"])
        event["occurred"] = _iso(_parse(event["occurred"]) + shift)
        event["resource"]["prefect.resource.id"] = f"prefect.task-run.{run_id}"
        task_run = event["payload"]["task_run"]
        for name in ("start_time", "end_time"):
            if name in task_run:
                task_run[name] = _iso(_parse(task_run[name]) + shift)
        out.append(event)
    return out


def waiter_filter(since: datetime | None = None) -> dict[str, Any]:
    with open(FIXTURES / "events_out_waiter_filter.json") as f:
        message = json.load(f)
    now = datetime.now(timezone.utc)
    message["filter"]["occurred"] = {"since": _iso(since or now - timedelta(minutes=1)),
                                     "until": _iso(now + timedelta(days=365))}
    return message


class EventSocket(RawSocket):
    """A raw /api/events/in or /api/events/out connection (what Prefect's clients do)."""

    def __init__(self, server: Any, path: str, token: Any = None, subprotocol: bool = True,
                 auth: bool = True) -> None:
        url = server.url.replace("http://", "ws://", 1) + path
        self.ws = websocket.create_connection(url, subprotocols=["prefect"] if subprotocol else None, timeout=10)
        self.auth_reply: dict[str, Any] | None = None
        if auth and subprotocol:
            # Prefect's clients ping first, then authenticate
            self.ws.ping(b"hello")
            opcode, data = self.ws.recv_data(control_frame=True)
            assert opcode == websocket.ABNF.OPCODE_PONG and data == b"hello"
            self.ws.send(json.dumps({"type": "auth", "token": token if token is not None else server.auth_string}))

    def authenticated(self) -> EventSocket:
        self.auth_reply = json.loads(self.ws.recv())
        assert self.auth_reply == {"type": "auth_success"}, self.auth_reply
        return self

    def send(self, message: Any) -> None:
        self.ws.send(message if isinstance(message, str) else json.dumps(message))

    def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        self.ws.settimeout(timeout)
        return json.loads(self.ws.recv())

    def events(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        out = []
        for _ in range(count):
            message = self.recv(timeout)
            assert message["type"] == "event", message
            out.append(message["event"])
        return out

    def expect_nothing(self, seconds: float) -> None:
        self.ws.settimeout(seconds)
        try:
            message = self.ws.recv()
        except websocket.WebSocketTimeoutException:
            return
        raise AssertionError(f"unexpected message: {message}")


def events_in(sockets: Any, server: Any) -> EventSocket:
    return sockets(server, "/events/in").authenticated()


def events_out(sockets: Any, server: Any, message: dict[str, Any] | None = None) -> EventSocket:
    sock = sockets(server, "/events/out").authenticated()
    sock.send(message or waiter_filter())
    return sock


def create_captured_run(wire: Any, run_id: str | None = None) -> str:
    run_id = run_id or str(uuid.uuid4())
    wire.create(CAPTURED_TASK_KEY, id=run_id)
    return run_id


def wait_for_state(wire: Any, run_id: str, state_type: str, timeout: float = 10.0) -> dict[str, Any]:
    return wait_for(lambda: (run := wire.read(run_id))["state_type"] == state_type and run, timeout=timeout)


# ----------------------------------------------------------------------------- /api/events/in


def test_a_prefect_workers_events_record_the_run_completed_with_the_state_as_sent(server, wire, sockets):
    run_id = create_captured_run(wire)
    worker = wire.subscribe([CAPTURED_TASK_KEY])
    assert worker.next_run()["id"] == run_id
    worker.ack()
    scheduled, pending, running, completed = captured_events(run_id)
    intake = events_in(sockets, server)
    for event in (scheduled, pending, running):
        intake.send(event)
    run = wait_for_state(wire, run_id, "RUNNING")
    assert run["state"]["id"] == running["id"]
    assert run["run_count"] == 1 and run["start_time"] == running["payload"]["task_run"]["start_time"]

    intake.send(completed)
    run = wait_for_state(wire, run_id, "COMPLETED")
    validated = completed["payload"]["validated_state"]
    assert run["state"]["data"] == validated["data"]  # Prefect's result record metadata, as sent
    assert run["state"]["id"] == completed["id"]
    assert run["state"]["timestamp"] == completed["occurred"]
    assert run["state_name"] == "Completed"
    task_run = completed["payload"]["task_run"]
    assert (run["run_count"], run["start_time"], run["end_time"], run["total_run_time"]) == (
        1, task_run["start_time"], task_run["end_time"], task_run["total_run_time"])


def test_a_run_completed_by_events_is_not_requeued_or_crashed_when_its_worker_disconnects(
    server_factory, make_wire, sockets
):
    server = server_factory(lease_timeout=0.3, max_deliveries=1)
    wire = make_wire(server)
    run_id = create_captured_run(wire)
    worker = wire.subscribe([CAPTURED_TASK_KEY], client_id="prefect-worker")
    assert worker.next_run()["id"] == run_id
    worker.ack()
    intake = events_in(sockets, server)
    for event in captured_events(run_id):
        intake.send(event)
    wait_for_state(wire, run_id, "COMPLETED")
    worker.close()
    wait_for(lambda: server.stats()["subscriptions"] == 0)
    other = wire.subscribe([CAPTURED_TASK_KEY], client_id="other-worker")
    other.expect_no_run(1.5)  # five lease timeouts
    assert wire.read(run_id)["state_type"] == "COMPLETED"
    assert server.stats()["outstanding"] == 0


def test_the_completed_event_arriving_after_the_worker_disconnected_still_releases_the_lease(
    server_factory, make_wire, sockets
):
    server = server_factory(lease_timeout=1.0, max_deliveries=1)
    wire = make_wire(server)
    run_id = create_captured_run(wire)
    worker = wire.subscribe([CAPTURED_TASK_KEY])
    assert worker.next_run()["id"] == run_id
    worker.ack()
    scheduled, pending, running, completed = captured_events(run_id)
    intake = events_in(sockets, server)
    for event in (pending, running):
        intake.send(event)
    wait_for_state(wire, run_id, "RUNNING")
    worker.close()
    wait_for(lambda: server.stats()["subscriptions"] == 0)
    intake.send(completed)  # within the lease timeout
    wait_for_state(wire, run_id, "COMPLETED")
    time.sleep(1.5)  # past the lease timeout: nothing may turn it CRASHED
    assert wire.read(run_id)["state_type"] == "COMPLETED"


def test_a_run_whose_prefect_worker_died_is_delivered_again_with_its_parameters(server_factory, make_wire, sockets):
    """Prefect's Pending/Running events do not name the parameters record; the run keeps it,
    so the next worker can still read the parameters when the lease runs out."""
    server = server_factory(lease_timeout=0.2, max_deliveries=3)
    wire = make_wire(server)
    run_id = create_captured_run(wire)
    worker = wire.subscribe([CAPTURED_TASK_KEY], client_id="dies")
    delivered = worker.next_run()
    parameters_id = delivered["state"]["state_details"]["task_parameters_id"]
    assert delivered["id"] == run_id and parameters_id
    worker.ack()
    scheduled, pending, running, completed = captured_events(run_id)
    intake = events_in(sockets, server)
    intake.send(pending)
    intake.send(running)
    wait_for_state(wire, run_id, "RUNNING")
    worker.close()  # the worker dies mid-run
    again = wire.subscribe([CAPTURED_TASK_KEY], client_id="next").next_run(timeout=15)
    assert again["id"] == run_id and again["state_type"] == "SCHEDULED"
    assert again["state"]["state_details"]["task_parameters_id"] == parameters_id


def test_events_arriving_out_of_order_keep_the_newest_state(server, wire, sockets):
    """Events of one run come over different connections (the submitter's Scheduled event
    may arrive after the worker's); the newest ``occurred`` wins."""
    run_id = create_captured_run(wire)
    scheduled, pending, running, completed = captured_events(run_id)
    intake = events_in(sockets, server)
    out = events_out(sockets, server, {"type": "filter", "filter": {"event": {"name": ["marker"]}}})

    def processed() -> None:
        """Events of one connection are handled in order: once a marker sent after them is
        passed on, they are done."""
        marker = {**captured_events(str(uuid.uuid4()))[0], "event": "marker"}
        intake.send(marker)
        assert out.events(1)[0]["id"] == marker["id"]

    intake.send(running)
    wait_for_state(wire, run_id, "RUNNING")
    for event in (scheduled, pending):  # older: not recorded
        intake.send(event)
    processed()
    run = wire.read(run_id)
    assert run["state_type"] == "RUNNING" and run["state"]["id"] == running["id"]
    intake.send(completed)
    wait_for_state(wire, run_id, "COMPLETED")
    late = copy.deepcopy(running)  # newer, but a final state only takes a newer final state
    late.update(id=str(uuid.uuid4()), occurred=_iso(_parse(completed["occurred"]) + timedelta(seconds=1)))
    for event in (late, running, scheduled, pending):
        intake.send(event)
    processed()
    run = wire.read(run_id)
    assert run["state_type"] == "COMPLETED" and run["state"]["id"] == completed["id"]


def test_a_resent_event_is_recorded_and_passed_on_once(server, wire, sockets):
    run_id = create_captured_run(wire)
    scheduled, pending, running, completed = captured_events(run_id)
    out = events_out(sockets, server)
    intake = events_in(sockets, server)
    intake.send(completed)
    first = out.events(1)[0]
    assert first["id"] == completed["id"] and first["received"]
    intake.close()
    again = events_in(sockets, server)  # Prefect's client re-sends unconfirmed events after a reconnect
    again.send(completed)
    out.expect_nothing(0.5)
    run = wire.read(run_id)
    assert run["state"]["id"] == completed["id"] and run["state_type"] == "COMPLETED"


def test_a_scheduled_event_does_not_requeue_the_run(server, wire, sockets):
    """Prefect retries in-process: its AwaitingRetry (SCHEDULED) event for a run its worker
    holds is recorded but the run is not delivered to anyone else."""
    run_id = create_captured_run(wire)
    worker = wire.subscribe([CAPTURED_TASK_KEY], client_id="prefect-worker")
    assert worker.next_run()["id"] == run_id
    worker.ack()
    scheduled, pending, running, completed = captured_events(run_id)
    intake = events_in(sockets, server)
    intake.send(pending)
    intake.send(running)
    wait_for_state(wire, run_id, "RUNNING")
    base = _parse(running["occurred"])
    retry = copy.deepcopy(scheduled)
    retry.update(id=str(uuid.uuid4()), occurred=_iso(base + timedelta(milliseconds=5)),
                 event="prefect.task-run.AwaitingRetry")
    retry["payload"]["validated_state"].update(name="AwaitingRetry", message="Retry 1/1")
    intake.send(retry)
    run = wait_for_state(wire, run_id, "SCHEDULED")
    assert run["state_name"] == "AwaitingRetry"
    other = wire.subscribe([CAPTURED_TASK_KEY], client_id="other-worker")
    other.expect_no_run(1.0)
    worker.expect_no_run(0.1)  # free again after its ack: it would have been first in line
    rerun = copy.deepcopy(running)
    rerun.update(id=str(uuid.uuid4()), occurred=_iso(base + timedelta(milliseconds=10)))
    rerun["payload"]["validated_state"]["name"] = "Retrying"
    rerun["payload"]["task_run"]["run_count"] = 2
    done = copy.deepcopy(completed)
    done.update(id=str(uuid.uuid4()), occurred=_iso(base + timedelta(milliseconds=20)))
    done["payload"]["task_run"]["run_count"] = 2
    intake.send(rerun)
    intake.send(done)
    run = wait_for_state(wire, run_id, "COMPLETED")
    assert run["run_count"] == 2
    other.expect_no_run(0.5)
    worker.expect_no_run(0.1)


def test_the_submitters_scheduled_event_keeps_a_queued_run_deliverable(server, wire, sockets):
    run_id = create_captured_run(wire)
    scheduled = captured_events(run_id)[0]
    intake = events_in(sockets, server)
    intake.send(scheduled)
    wait_for(lambda: wire.read(run_id)["state"]["id"] == scheduled["id"])
    worker = wire.subscribe([CAPTURED_TASK_KEY])
    assert worker.next_run()["id"] == run_id


def test_a_final_event_wakes_waiters_of_the_run(server, wire, sockets):
    run_id = create_captured_run(wire)
    woken: list[str] = []
    server.core.when_finished(run_id, woken.append)
    intake = events_in(sockets, server)
    completed = captured_events(run_id)[-1]
    intake.send(completed)
    wait_for(lambda: woken)
    assert json.loads(woken[0])["state"]["id"] == completed["id"]


def test_an_invalid_event_is_dropped_with_a_warning_and_the_connection_stays_open(server, wire, sockets, caplog):
    run_id = create_captured_run(wire)
    completed = captured_events(run_id)[-1]
    bad = copy.deepcopy(completed)
    bad["occurred"] = "yesterday"
    intake = events_in(sockets, server)
    with caplog.at_level(logging.WARNING, logger="sync_worker.server.events"):
        intake.send(bad)
        intake.send(completed)
        wait_for_state(wire, run_id, "COMPLETED")
    assert any("event.occurred" in r.getMessage() and "yesterday" in r.getMessage() for r in caplog.records)
    assert wire.read(run_id)["state"]["id"] == completed["id"]


@pytest.mark.parametrize(
    ("message", "reason"),
    [("not json", "Protocol violation: message is not valid JSON"),
     ("[1, 2]", "Protocol violation: expected one event (a JSON object) per message")],
)
def test_a_frame_that_is_not_an_event_closes_the_connection(server, sockets, message, reason):
    intake = events_in(sockets, server)
    intake.send(message)
    code, said = intake.close_code()
    assert code == 1003 and said.startswith(reason), (code, said)  # the JSON error may follow


# ----------------------------------------------------------------------------- handshake and auth


@pytest.mark.parametrize("path", ["/events/in", "/events/out"])
def test_auth_with_the_right_token_and_clear_refusals_without(server_factory, sockets, path):
    server = server_factory(auth_string="s3cret")
    assert sockets(server, path, token="s3cret").authenticated().auth_reply == {"type": "auth_success"}
    for token, reason in ((None, "Auth required but no token provided"), ("wrong", "Invalid token")):
        sock = sockets(server, path, auth=False)
        sock.send({"type": "auth", "token": token})
        assert sock.close_code() == (1008, reason)
    sock = sockets(server, path, auth=False)
    sock.send({"type": "filter", "filter": {}})
    assert sock.close_code() == (1008, "Expected 'auth' message")
    sock = sockets(server, path, subprotocol=False)
    assert sock.close_code() == (1002, "'prefect' subprotocol required when auth is configured")


def test_events_post_needs_the_rest_auth_and_records_like_the_socket(server_factory, make_wire):
    server = server_factory(auth_string="s3cret")
    wire = make_wire(server)
    run_id = create_captured_run(wire)
    completed = captured_events(run_id)[-1]
    assert requests.post(server.url + "/events", json=[completed], timeout=10).status_code == 401
    response = wire.http.post(server.url + "/events", json=[completed], timeout=10)
    assert response.status_code == 204, response.text
    run = wire.read(run_id)
    assert run["state_type"] == "COMPLETED" and run["state"]["data"] == completed["payload"]["validated_state"]["data"]


def test_events_post_refuses_an_invalid_batch_naming_the_field_and_records_nothing(server, wire):
    run_id = create_captured_run(wire)
    completed = captured_events(run_id)[-1]
    bad = copy.deepcopy(completed)
    bad["id"] = "not-a-uuid"
    response = wire.http.post(server.url + "/events", json=[completed, bad], timeout=10)
    assert response.status_code == 422
    assert "body.1.id" in response.json()["detail"]
    assert wire.read(run_id)["state_type"] == "SCHEDULED"
    response = wire.http.post(server.url + "/events", json={"not": "a list"}, timeout=10)
    assert response.status_code == 422 and "list of events" in response.json()["detail"]


# ----------------------------------------------------------------------------- /api/events/out


def test_a_final_state_set_by_a_sync_worker_worker_is_announced_to_prefects_waiter_filter(server, wire, sockets):
    run_id = create_captured_run(wire)
    out = events_out(sockets, server)
    worker = wire.subscribe([CAPTURED_TASK_KEY])
    assert worker.next_run()["id"] == run_id
    worker.ack()
    assert worker.set_state(run_id, "RUNNING")["result"]["status"] == "ACCEPT"
    data = {"storage_key": "/tmp/result", "serializer": {"type": "json"}}
    reply = worker.set_state(run_id, "COMPLETED", data=data)
    state = reply["result"]["state"]
    event = out.events(1)[0]  # RUNNING is not in the waiter's filter: the final state only
    assert event["event"] == "prefect.task-run.Completed"
    assert event["resource"]["prefect.resource.id"] == f"prefect.task-run.{run_id}"
    assert event["id"] == state["id"] and event["occurred"] == state["timestamp"]
    validated = event["payload"]["validated_state"]
    assert (validated["type"], validated["name"], validated["data"]) == ("COMPLETED", "Completed", data)
    uuid.UUID(event["id"])


def test_forced_cancellation_and_failures_are_announced(server, wire, sockets):
    cancelled, failed = create_captured_run(wire), create_captured_run(wire)
    out = events_out(sockets, server)
    assert wire.set_state(cancelled, "CANCELLED", force=True).status_code == 201
    assert wire.set_state(failed, "RUNNING").status_code == 201
    assert wire.set_state(failed, "FAILED", message="boom").status_code == 201
    got = {(e["resource"]["prefect.resource.id"], e["event"]) for e in out.events(2)}
    assert got == {(f"prefect.task-run.{cancelled}", "prefect.task-run.Cancelled"),
                   (f"prefect.task-run.{failed}", "prefect.task-run.Failed")}


def test_a_lease_ending_in_crashed_is_announced(server_factory, make_wire, sockets):
    server = server_factory(lease_timeout=0.2, max_deliveries=1)
    wire = make_wire(server)
    run_id = create_captured_run(wire)
    out = events_out(sockets, server)
    worker = wire.subscribe([CAPTURED_TASK_KEY])
    assert worker.next_run()["id"] == run_id
    worker.ack()
    worker.close()
    event = out.events(1, timeout=15)[0]
    assert event["event"] == "prefect.task-run.Crashed"
    assert event["payload"]["validated_state"]["type"] == "CRASHED"
    assert wire.read(run_id)["state_type"] == "CRASHED"


def test_backfill_since_occurred_since_then_live_events_filtered_by_resource(server, wire, sockets):
    early, late, other = (create_captured_run(wire) for _ in range(3))
    wire.set_state(early, "COMPLETED", force=True)
    wire.set_state(other, "COMPLETED", force=True)
    message = waiter_filter()
    message["filter"]["resource"] = {"id": [f"prefect.task-run.{early}", f"prefect.task-run.{late}"]}
    out = events_out(sockets, server, message)
    assert [e["resource"]["prefect.resource.id"] for e in out.events(1)] == [f"prefect.task-run.{early}"]
    wire.set_state(late, "FAILED", force=True)
    assert [e["resource"]["prefect.resource.id"] for e in out.events(1)] == [f"prefect.task-run.{late}"]
    out.expect_nothing(0.3)


def test_no_backfill_before_occurred_since_or_when_not_wanted(server, wire, sockets):
    run_id = create_captured_run(wire)
    wire.set_state(run_id, "COMPLETED", force=True)
    time.sleep(0.05)
    later = events_out(sockets, server, waiter_filter(since=datetime.now(timezone.utc)))
    unwanted = events_out(sockets, server, {**waiter_filter(), "backfill": False})
    later.expect_nothing(0.3)
    unwanted.expect_nothing(0.1)


def test_events_from_prefects_worker_are_passed_on_with_their_names(server, wire, sockets):
    run_id = create_captured_run(wire)
    message = waiter_filter()
    message["filter"]["event"] = {"prefix": ["prefect.task-run."]}
    out = events_out(sockets, server, message)
    intake = events_in(sockets, server)
    sent = captured_events(run_id)
    for event in sent:
        intake.send(event)
    got = out.events(4)
    assert [e["event"] for e in got] == [e["event"] for e in sent]
    # Prefect's own event is passed on; the server does not announce the final state twice
    out.expect_nothing(0.3)


@pytest.mark.parametrize(
    ("message", "reason"),
    [({"type": "subscribe"}, "Expected 'filter' message"),
     ({"type": "filter", "filter": {"occurred": {"since": "soon"}}}, "Invalid filter: occurred.since"),
     ({"type": "filter", "filter": {"event": {"name": "prefect.task-run.Completed"}}},
      "Invalid filter: event.name: Input should be a valid list of strings")],
)
def test_an_invalid_filter_closes_1002_with_the_reason(server, sockets, message, reason):
    sock = sockets(server, "/events/out").authenticated()
    sock.send(message)
    code, text = sock.close_code()
    assert code == 1002 and text.startswith(reason), text


def test_stopping_the_server_closes_event_connections(server_factory, sockets):
    server = server_factory()
    out = events_out(sockets, server)
    intake = events_in(sockets, server)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 5
    for sock in (out, intake):
        assert sock.close_code()[0] == 1012  # service restart: Prefect's clients reconnect (1001: they stop)


# ----------------------------------------------------------------------------- small endpoints


def test_the_small_endpoints_prefects_client_calls(server, wire):
    response = wire.http.get(server.url + "/admin/storage", timeout=10)
    assert response.status_code == 200 and response.json() == {"default_result_storage_block_id": None}
    response = wire.http.get(server.url + "/csrf-token", params={"client": "abc"}, timeout=10)
    assert response.status_code == 422 and response.json()["detail"] == "CSRF protection is disabled."
    logs = [{"name": "prefect.task_runs", "level": 20, "message": "Finished in state Completed()",
             "timestamp": _iso(datetime.now(timezone.utc)), "task_run_id": str(uuid.uuid4()), "flow_run_id": None}]
    response = wire.http.post(server.url + "/logs/", json=logs, timeout=10)
    assert response.status_code == 201 and response.json() is None
    response = wire.http.post(server.url + "/logs/", json=[{"level": 20}], timeout=10)
    assert response.status_code == 422 and "body.0.name" in response.json()["detail"]


def test_the_small_endpoints_need_the_auth_string(server_factory):
    server = server_factory(auth_string="s3cret")
    for method, path in (("GET", "/admin/storage"), ("POST", "/logs/")):
        assert requests.request(method, server.url + path, json=[], timeout=10).status_code == 401
    header = {"Authorization": "Basic " + base64.b64encode(b"s3cret").decode()}
    assert requests.get(server.url + "/admin/storage", headers=header, timeout=10).status_code == 200


@pytest.mark.parametrize("path", ["/events/in", "/events/out"])
def test_an_events_socket_that_does_not_authenticate_is_closed_1008(server, monkeypatch, path):
    """The same handshake timeout as the other sockets: a silent client does not hold a thread."""
    from sync_worker.server import sockets as server_sockets

    monkeypatch.setattr(server_sockets, "HANDSHAKE_TIMEOUT", 0.5)
    ws = websocket.create_connection(server.url.replace("http", "ws") + path, subprotocols=["prefect"], timeout=10)
    started = time.monotonic()
    code, reason = read_close(ws)
    assert code == 1008 and "Expected 'auth' message within 0.5 s" in reason, (code, reason)
    assert time.monotonic() - started < 5


def test_deeply_nested_json_on_the_events_socket_closes_1008(server, sockets):
    """The server's input limits hold here too: no RecursionError, a documented close code."""
    intake = events_in(sockets, server)
    intake.send("[" * 5000 + "]" * 5000)
    code, reason = intake.close_code()
    assert code == 1008 and "nest" in reason, (code, reason)
