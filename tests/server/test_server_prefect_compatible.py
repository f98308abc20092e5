"""``Server(prefect_compatible=True)`` answers proposals as Prefect 3.8.8's server does (its
BackgroundTaskPolicy for ``deferred`` proposals, CoreTaskPolicy otherwise), over REST and on the
subscription socket; the captured Prefect exchange is replayed against it."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from tests.server.conftest import Wire


@pytest.fixture
def compat(server_factory, tmp_path, make_wire) -> Wire:
    server = server_factory(prefect_compatible=True, database=str(tmp_path / "compat.db"))
    return make_wire(server)


def _propose(wire: Wire, run_id: str, state_type: str, force: bool = False, **state: Any) -> dict[str, Any]:
    response = wire.set_state(run_id, state_type, force=force, **state)
    assert response.status_code == 201, response.text
    return response.json()


def _shape(answer: dict[str, Any]) -> tuple[Any, ...]:
    state = answer["state"] or {}
    return (answer["status"], state.get("type"), state.get("name"), answer["details"].get("type"),
            answer["details"].get("reason"), (state.get("state_details") or {}).get("deferred"))


def test_the_captured_prefect_exchange_gets_prefects_answers(compat, protocol):
    body = protocol("rest_01_create_task_run_request.json")
    body = {**body, "dynamic_key": body["dynamic_key"] + "-replay"}
    response = compat.http.post(compat.url + "/task_runs/", json=body, timeout=10)
    assert response.status_code == 201, response.text
    run_id = response.json()["id"]
    for step in ("02_set_state_pending", "03_set_state_running", "04_set_state_failed_with_retries_left",
                 "05_set_state_running_again", "06_set_state_completed", "07_set_state_running_after_completed"):
        request = protocol(f"rest_{step}_request.json")
        expected = protocol(f"rest_{step}_response_201.json")
        response = compat.http.post(f"{compat.url}/task_runs/{run_id}/set_state", json=request, timeout=10)
        assert response.status_code == 201, response.text
        assert _shape(response.json()) == _shape(expected), step
    # Prefect reset run_count when the run left COMPLETED (rest_07's "Running", not "Rerunning")
    assert compat.read(run_id)["run_count"] == 1


def test_second_deferred_pending_is_aborted_with_prefects_reason(compat):
    run = compat.create()
    assert _propose(compat, run["id"], "PENDING", state_details={"deferred": True})["status"] == "ACCEPT"
    second = _propose(compat, run["id"], "PENDING", state_details={"deferred": True})
    assert second["status"] == "ABORT"
    assert second["details"] == {"type": "abort_details",
                                 "reason": "This run is in a PENDING state and cannot transition to a PENDING state."}
    assert second["state"]["type"] == "PENDING"
    # a PENDING without ``deferred`` goes through Prefect's CoreTaskPolicy: no such rule there
    assert _propose(compat, run["id"], "PENDING")["status"] == "ACCEPT"


def test_running_twice_is_accepted_as_rerunning(compat):
    run = compat.create()
    _propose(compat, run["id"], "PENDING", state_details={"deferred": True})
    assert _propose(compat, run["id"], "RUNNING")["state"]["name"] == "Running"
    again = _propose(compat, run["id"], "RUNNING")
    assert (again["status"], again["state"]["name"]) == ("ACCEPT", "Rerunning")
    assert compat.read(run["id"])["run_count"] == 2


def test_running_straight_from_scheduled(compat):
    run = compat.create()
    answer = _propose(compat, run["id"], "RUNNING")
    assert (answer["status"], answer["state"]["type"], answer["state"]["name"]) == ("ACCEPT", "RUNNING", "Running")
    later = (datetime.now(timezone.utc) + timedelta(seconds=30)).isoformat()
    future = compat.create(state={"type": "SCHEDULED", "name": "Scheduled",
                                  "state_details": {"deferred": True, "scheduled_time": later}})
    wait = _propose(compat, future["id"], "RUNNING")
    assert wait["status"] == "WAIT"
    assert wait["details"]["type"] == "wait_details"
    assert 28 <= wait["details"]["delay_seconds"] <= 30
    assert wait["state"]["type"] == "SCHEDULED" and compat.read(future["id"])["state_type"] == "SCHEDULED"


def test_awaiting_retry_is_not_requeued_until_proposed_deferred(compat):
    subscriber = compat.subscribe()
    run = compat.create(empirical_policy={"retries": 1, "retry_delay": 0})
    assert subscriber.next_run()["id"] == run["id"]
    subscriber.ack()
    _propose(compat, run["id"], "PENDING", state_details={"deferred": True})
    _propose(compat, run["id"], "RUNNING")
    retry = _propose(compat, run["id"], "FAILED", message="boom", state_details={"deferred": True})
    assert _shape(retry) == ("REJECT", "SCHEDULED", "AwaitingRetry", "reject_details", "Retrying", False)
    assert retry["state"]["message"] == "boom"
    subscriber.expect_no_run(1.0)  # Prefect: a rejected FAILED queues nothing
    stored = compat.read(run["id"])
    assert (stored["state_type"], stored["state_name"]) == ("SCHEDULED", "AwaitingRetry")
    # what a Prefect-dialect worker does: propose the retry again, deferred -> queued
    requeued = _propose(compat, run["id"], "SCHEDULED", name="AwaitingRetry",
                        state_details={"deferred": True,
                                       "task_parameters_id": run["state"]["state_details"]["task_parameters_id"]})
    assert requeued["status"] == "ACCEPT"
    assert subscriber.next_run()["id"] == run["id"]
    subscriber.ack()
    pending = _propose(compat, run["id"], "PENDING", state_details={"deferred": True})
    assert pending["state"]["state_details"]["task_parameters_id"] == run["state"]["state_details"]["task_parameters_id"]
    running = _propose(compat, run["id"], "RUNNING")
    # Prefect's RenameReruns: "Retrying" only straight from AwaitingRetry, so after the claim
    # (PENDING) it is "Rerunning"
    assert (running["status"], running["state"]["name"]) == ("ACCEPT", "Rerunning")


def test_terminal_states_as_prefect_guards_them(compat):
    failed = compat.create()
    for state_type in ("PENDING", "RUNNING", "FAILED"):
        _propose(compat, failed["id"], state_type)
    # Prefect lets a FAILED run be claimed again (its workers read the run first)
    assert _propose(compat, failed["id"], "PENDING", state_details={"deferred": True})["status"] == "ACCEPT"

    done = compat.create()
    for state_type in ("PENDING", "RUNNING"):
        _propose(compat, done["id"], state_type)
    _propose(compat, done["id"], "COMPLETED", data={"storage_key": "/results/x", "expiration": None,
                                                     "storage_block_id": None, "serializer": {"type": "json"}})
    refused = _propose(compat, done["id"], "RUNNING")
    assert (refused["status"], refused["state"]["type"]) == ("REJECT", "COMPLETED")
    assert refused["details"] == {"type": "reject_details", "reason": "This run is already completed."}
    crashed = _propose(compat, done["id"], "CRASHED")
    assert crashed["status"] == "ABORT" and crashed["details"]["reason"] == "Run is already COMPLETED."
    assert _propose(compat, done["id"], "CRASHED", force=True)["status"] == "ACCEPT"  # MinimalTaskPolicy


def test_the_default_server_keeps_its_own_answers(wire):
    """The same proposals on a server not in compatible mode: the embedded table (ABORT for a
    second RUNNING, REJECT for a late claim of a FAILED run, AwaitingRetry re-queued by itself)."""
    run = wire.create(empirical_policy={"retries": 1, "retry_delay": 0})
    _propose(wire, run["id"], "PENDING")
    _propose(wire, run["id"], "RUNNING")
    assert _propose(wire, run["id"], "RUNNING")["status"] == "ABORT"
    retry = _propose(wire, run["id"], "FAILED")
    assert _shape(retry)[:3] == ("REJECT", "SCHEDULED", "AwaitingRetry") and retry["state"]["state_details"]["deferred"]


def test_compatible_server_on_the_socket_announces_nothing(compat):
    ws = compat.connect()
    ws.send(json.dumps({"type": "auth", "token": None}))
    assert json.loads(ws.recv()) == {"type": "auth_success"}
    ws.close()
