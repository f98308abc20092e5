"""The create body and state parsing built without their objects (the submitter's and the
worker's per-run CPU) say exactly what the objects said."""
from __future__ import annotations

import datetime as dt
import uuid

import pytest

from sync_worker.schemas import (
    EmpiricalPolicy,
    OrchestrationResult,
    Scheduled,
    SetStateStatus,
    State,
    StateType,
    new_run_id,
    policy_json,
    scheduled_json,
    task_run_create,
)
from sync_worker.storage import make_record


def test_new_run_id_is_a_uuid4_in_its_own_text():
    ids = {new_run_id() for _ in range(5000)}
    assert len(ids) == 5000
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122


@pytest.mark.parametrize("parameters_id", [None, "b0c1"])
@pytest.mark.parametrize("when", [None, dt.datetime(2026, 11, 30, 13, 0, 5, 123456, tzinfo=dt.timezone.utc)])
def test_scheduled_json_is_what_the_state_object_writes(parameters_id, when):
    built = scheduled_json(parameters_id, when)
    written = Scheduled(task_parameters_id=parameters_id, scheduled_time=when).to_json()
    assert built == written
    assert list(built) == list(written) and list(built["state_details"]) == list(written["state_details"])


@pytest.mark.parametrize("policy", [EmpiricalPolicy(), EmpiricalPolicy(3, [1.0, 2.0], 0.5), EmpiricalPolicy(1, 2.5)])
def test_policy_json_is_what_the_policy_object_writes(policy):
    assert policy_json(policy.retries, policy.retry_delay, policy.retry_jitter_factor) == policy.to_json()


def test_task_run_create_takes_objects_or_their_json_alike():
    from_objects = task_run_create(name="n", task_key="k", state=Scheduled(task_parameters_id="p"),
                                   empirical_policy=EmpiricalPolicy(2, 1.0), id="0b5d9f1e-0000-4000-8000-000000000000",
                                   dynamic_key="dk")
    from_json = task_run_create(name="n", task_key="k", state=scheduled_json("p"), empirical_policy=policy_json(2, 1.0, None),
                                id="0b5d9f1e-0000-4000-8000-000000000000", dynamic_key="dk")
    assert from_objects == from_json
    body = task_run_create(name="n", task_key="k", state=scheduled_json())
    assert uuid.UUID(body["id"]).version == 4
    assert body["dynamic_key"] == "k-" + uuid.UUID(body["id"]).hex
    assert body["empirical_policy"] == EmpiricalPolicy().to_json()


def test_states_read_from_json_keep_their_types_and_errors():
    answer = {"status": "REJECT", "details": {"reason": "r"}, "state": {
        "type": "SCHEDULED", "name": "AwaitingRetry", "timestamp": "2026-11-30T10:10:34.145190Z", "id": 7,
        "state_details": {"deferred": True, "task_run_id": "r1", "scheduled_time": "2026-11-30T10:10:35Z",
                          "task_parameters_id": None}}}
    result = OrchestrationResult.from_json(answer)
    assert result.status is SetStateStatus.REJECT and result.reason == "r"
    state = result.state
    assert state.type is StateType.SCHEDULED and state.name == "AwaitingRetry" and state.id == "7"
    assert state.timestamp == dt.datetime(2026, 11, 30, 10, 10, 34, 145190, tzinfo=dt.timezone.utc)
    assert state.state_details.scheduled_time == dt.datetime(2026, 11, 30, 10, 10, 35, tzinfo=dt.timezone.utc)
    assert state.state_details.task_run_id == "r1" and state.state_details.task_parameters_id is None
    assert State.from_json({"type": "COMPLETED"}).name == "Completed"
    assert State("RUNNING").type is StateType.RUNNING
    for bad in ("DONE", None, ["COMPLETED"]):
        with pytest.raises(ValueError):
            State.from_json({"type": bad})
    with pytest.raises(ValueError):
        OrchestrationResult.from_json({"status": "MAYBE"})


def test_a_none_result_record_is_the_json_serializers():
    assert make_record(None)["result"] == "null"
    assert make_record(None) == {**make_record(0), "result": "null"}


def test_run_ids_of_a_forked_child_are_not_its_parents():
    import os

    new_run_id()  # the parent holds a block of random bytes now
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(write_end, "".join(new_run_id() for _ in range(10)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        child = pipe.read().decode()
    os.waitpid(pid, 0)
    parent = "".join(new_run_id() for _ in range(10))
    assert len(child) == len(parent) == 360
    assert not {child[i:i + 36] for i in range(0, 360, 36)} & {parent[i:i + 36] for i in range(0, 360, 36)}
