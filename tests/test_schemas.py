"""The dataclasses read every message captured from a real Prefect 3.8.8 server."""
from __future__ import annotations

import json
import uuid
from datetime import timezone

import pytest

from tests.helpers import load_capture

from sync_worker.schemas import (
    Failed,
    OrchestrationResult,
    Pending,
    Scheduled,
    SetStateStatus,
    State,
    StateType,
    TaskRun,
    parse_datetime,
    task_run_create,
)

def load(name: str):
    """A capture from tests/fixtures/prefect-protocol (missing one is an error, not a skip)."""
    return load_capture(name)


def test_task_run_from_websocket_message():
    run = TaskRun.from_json(load("ws_04_server_task_run.json"))
    assert run.id == "4b72b76b-6ece-481a-bf80-174f923729ab"
    assert run.task_key == "capture_task-641f46e9"
    assert run.state.type is StateType.SCHEDULED
    assert run.state.state_details.deferred is True
    assert run.state.state_details.task_parameters_id == "88fca30a-5071-4dbc-974c-5b5e3d4737b9"
    assert run.empirical_policy.retries == 1
    assert run.created.tzinfo is not None and run.created.utcoffset().total_seconds() == 0
    assert run.tags == ["capture"]


@pytest.mark.parametrize(
    "name,status,state_type,state_name",
    [
        ("rest_02_set_state_pending_response_201.json", SetStateStatus.ACCEPT, StateType.PENDING, "Pending"),
        ("rest_03_set_state_running_response_201.json", SetStateStatus.ACCEPT, StateType.RUNNING, "Running"),
        ("rest_04_set_state_failed_with_retries_left_response_201.json", SetStateStatus.REJECT, StateType.SCHEDULED, "AwaitingRetry"),
        ("rest_05_set_state_running_again_response_201.json", SetStateStatus.ACCEPT, StateType.RUNNING, "Retrying"),
        ("rest_06_set_state_completed_response_201.json", SetStateStatus.ACCEPT, StateType.COMPLETED, "Completed"),
    ],
)
def test_orchestration_results(name, status, state_type, state_name):
    result = OrchestrationResult.from_json(load(name))
    assert result.status is status
    assert result.state.type is state_type
    assert result.state.name == state_name


def test_awaiting_retry_carries_reason_and_time():
    result = OrchestrationResult.from_json(load("rest_04_set_state_failed_with_retries_left_response_201.json"))
    assert result.reason == "Retrying"
    assert result.state.state_details.scheduled_time == parse_datetime("2026-11-23T15:39:44.808767Z")
    assert result.state.message == "Task run encountered an exception ValueError: boom"


@pytest.mark.parametrize(
    "state,capture",
    [
        (Pending(), "rest_02_set_state_pending_request.json"),
        (State(StateType.RUNNING), "rest_03_set_state_running_request.json"),
        (State(StateType.COMPLETED), "rest_06_set_state_completed_request.json"),
    ],
)
def test_proposals_match_what_prefect_sends(state, capture):
    assert {"state": state.to_json(), "force": False} == load(capture)


def test_failed_proposal_is_deferred_so_prefect_requeues_the_retry():
    body = Failed("Task run encountered an exception ValueError: boom").to_json()
    expected = load("rest_04_set_state_failed_with_retries_left_request.json")["state"]
    assert {k: v for k, v in body.items() if k != "state_details"} == expected
    assert body["state_details"] == {"deferred": True}


def test_create_body_has_the_fields_prefect_sends():
    expected = load("rest_01_create_task_run_request.json")
    body = task_run_create(
        name="capture_task",
        task_key="capture_task-641f46e9",
        state=Scheduled(task_parameters_id="88fca30a-5071-4dbc-974c-5b5e3d4737b9"),
        tags=["capture"],
        task_inputs={"x": 1},
    )
    # plus the run's id, chosen by the client (Prefect's TaskRunCreate accepts it): a repeated
    # create names the same run; and labels (accepted too), marking runs whose creator reads
    # inline results (sync_worker.dialects)
    assert set(body) == set(expected) | {"id", "labels"}
    assert body["labels"] == {"sync-worker.results": "inline"}
    assert str(uuid.UUID(body["id"])) == body["id"]
    assert body["state"] == expected["state"]
    assert body["task_inputs"] == expected["task_inputs"]
    assert body["dynamic_key"].startswith("capture_task-641f46e9-")


def test_unknown_fields_are_ignored_and_round_trip():
    data = load("rest_08_read_task_run_response_200.json")
    data["a_field_from_the_future"] = {"x": 1}
    data["state"]["another_one"] = 1
    run = TaskRun.from_json(data)
    again = TaskRun.from_json(json.loads(json.dumps(run.to_json())))
    assert again == run
    assert run.run_count == 1 and run.start_time is not None


def test_datetimes_are_utc_and_written_with_z():
    parsed = parse_datetime("2026-11-23T15:39:44.735115Z")
    assert parsed.tzinfo == timezone.utc
    state = State(StateType.SCHEDULED, timestamp=parsed)
    assert state.to_json()["timestamp"] == "2026-11-23T15:39:44.735115Z"


def test_unknown_state_type_is_an_error():
    with pytest.raises(ValueError):
        State.from_json({"type": "EXPLODED"})
