"""The hot path of orchestration after srv16's cuts: ``models.epoch`` equals ``parse_time``,
and a run's fields after a claim and a final state are the ones the general rules give
(timestamps from the one ``iso(now)`` of the new state)."""
from __future__ import annotations

import random
import time

import pytest

from sync_worker.server import models
from sync_worker.server.core import claim_proposal
from sync_worker.server.orchestration import ACCEPT, ACCEPT_DETAILS, Decision, orchestrate


def _texts() -> list[str]:
    rng = random.Random(16)
    now = time.time()
    ours = [models.iso(now + rng.uniform(-1e6, 1e6)) for _ in range(300)]
    return ours + [
        "2026-11-30T20:01:02.000000Z", "2026-11-30T20:01:02.123456Z", "1970-01-01T00:00:00.000001Z",
        "2026-11-30T20:01:02.12345Z", "2026-11-30T20:01:02Z", "2026-11-30T20:01:02.123456+00:00",
        "2026-11-30T20:01:02.1234567", "0001-01-01T00:00:00.000000Z", "9999-12-31T23:59:59.999999Z",
    ]


@pytest.mark.parametrize("repeat", [1, 2])  # the second time the date/time parts are cached
def test_epoch_is_parse_time_as_a_float(repeat):
    for text in _texts():
        expected = models.parse_time(text, [])
        got = models.epoch(text)
        assert got.__class__ is float
        assert got == float(expected), text


@pytest.mark.parametrize("text", ["2026-11-30T20:01:02.12345xZ", "not a time", "2026-13-30T20:01:02.123456Z",
                                  "\uff12026-11-30T20:01:02.123456Z", "2026-11-30T20:01:02.\uff11\uff12\uff13456Z",
                                  "2026-11-30T20:01:02.-12345Z"])
def test_epoch_answers_odd_text_as_parse_time_does(text):
    try:
        expected = float(models.parse_time(text, []))
    except models.ValidationError as exc:
        with pytest.raises(models.ValidationError) as info:
            models.epoch(text)
        assert info.value.detail == exc.detail
    else:
        assert models.epoch(text) == expected


def _created(now: float) -> dict:
    body = {"id": models.new_id(), "name": "echo", "task_key": "echo-1", "dynamic_key": "echo-1-abc",
            "state": {"type": "SCHEDULED", "name": "Scheduled",
                      "state_details": {"deferred": True, "task_parameters_id": models.new_id()}}}
    return models.build_task_run(body, now)


def test_claim_then_completed_fields():
    now = time.time()
    run = _created(now)
    parameters_id = run["state"]["state_details"]["task_parameters_id"]
    started = now + 0.25
    decision = orchestrate(run, claim_proposal("w-1"), False, started, True)
    assert isinstance(decision, Decision)
    assert (decision.status, decision.details, decision.changed, decision.queue) == (ACCEPT, ACCEPT_DETAILS, True, False)
    assert decision.due == started
    state = run["state"]
    assert state is decision.state
    assert state["type"] == "RUNNING" and state["name"] == "Running" and state["message"] == "Running on w-1"
    assert state["timestamp"] == models.iso(started)
    assert run["start_time"] == run["updated"] == models.iso(started)
    assert run["run_count"] == 1
    assert (run["state_id"], run["state_name"], run["state_type"]) == (state["id"], "Running", "RUNNING")
    assert run["next_scheduled_start_time"] is None and run["end_time"] is None
    assert state["state_details"]["task_parameters_id"] == parameters_id
    assert state["state_details"]["task_run_id"] == run["id"]

    finished = started + 1.5
    completed = models.validate_state({"type": "COMPLETED", "data": {"storage_key": "k"}}, ["state"])
    decision = orchestrate(run, completed, False, finished, True)
    assert (decision.status, decision.changed, decision.queue) == (ACCEPT, True, False)
    assert run["end_time"] == run["updated"] == run["state"]["timestamp"] == models.iso(finished)
    assert run["start_time"] == models.iso(started)
    expected = round(max(0.0, finished - models.parse_time(models.iso(started), [])), 6)
    assert run["total_run_time"] == expected
    assert run["state"]["state_details"]["task_parameters_id"] == parameters_id
    assert run["state_type"] == "COMPLETED" and run["state_name"] == "Completed"


def test_a_second_running_is_retrying_and_keeps_its_start_time():
    now = time.time()
    run = _created(now)
    orchestrate(run, claim_proposal("w-1"), False, now + 1, True)
    failed = models.validate_state({"type": "FAILED"}, ["state"])
    run["empirical_policy"]["retries"] = 1
    decision = orchestrate(run, failed, False, now + 2, True)
    assert decision.status == "REJECT" and run["state"]["name"] == "AwaitingRetry"
    orchestrate(run, claim_proposal("w-2"), False, now + 3, True)
    assert run["state"]["name"] == "Retrying" and run["run_count"] == 2
    assert run["start_time"] == models.iso(now + 1)
    assert run["updated"] == models.iso(now + 3)
