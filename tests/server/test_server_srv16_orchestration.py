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


def _ids(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both paths draw the new state's id from the same counter."""
    from sync_worker.server import orchestration

    counter = iter(range(10**9))

    def fake_id() -> str:
        return f"00000000-0000-4000-8000-{next(counter):012d}"

    monkeypatch.setattr(models, "new_id", fake_id)
    monkeypatch.setattr(orchestration, "new_id", fake_id)


_STATES = ["SCHEDULED", "PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "CRASHED", "PAUSED", "CANCELLING"]


def _proposals() -> list[dict]:
    out = []
    for state_type in _STATES:
        for extra in [{}, {"name": "Custom", "message": "m"}, {"name": "Running"}, {"data": {"storage_key": "k"}},
                      {"state_details": {"task_parameters_id": "6bcedf04-25d5-4772-9051-acf2df390289"}},
                      {"state_details": {"deferred": True, "retriable": False}},
                      {"state_details": {"scheduled_time": "2026-11-30T20:01:02.123456Z"}},
                      {"state_details": {"unknown_key": 1, "deferred": False}}]:
            out.append(models.validate_state({"type": state_type, **extra}, ["state"]))
    out.append(claim_proposal("w-1"))
    return out


def _runs(now: float) -> list[dict]:
    """Runs in every state, with and without a start time and a parameters id."""
    runs = []
    for state_type in _STATES:
        for started in (None, now - 3.25):
            for parameters in (True, False):
                run = _created(now - 5)
                if not parameters:
                    run["state"]["state_details"]["task_parameters_id"] = None
                run["state"] = dict(run["state"], type=state_type, name=state_type.title())
                run["state_type"] = state_type
                run["run_count"] = 0 if state_type in ("SCHEDULED", "PENDING") else 1
                run["start_time"] = None if started is None else models.iso(started)
                run["empirical_policy"]["retries"] = 2
                runs.append(run)
    return runs


@pytest.mark.parametrize("force", [False, True])
def test_the_plain_accept_gives_what_the_general_path_gives(monkeypatch, force):
    """Every (current state, proposal) pair: the run afterwards and the decision are the same
    with the plain-accept path as with the general one (disabled by emptying its targets)."""
    import copy

    from sync_worker.server import orchestration

    _ids(monkeypatch)
    now = time.time()
    taken = 0
    for run in _runs(now):
        for proposed in _proposals():
            for background in (True, False):
                fast_run, general_run = copy.deepcopy(run), copy.deepcopy(run)
                monkeypatch.setattr(orchestration, "_PLAIN_TARGETS", orchestration._PLAIN_TARGETS)
                before = json_of(proposed)
                fast = orchestrate(fast_run, proposed, force, now, background)
                monkeypatch.setattr(orchestration, "_PLAIN_TARGETS", frozenset())
                general = orchestrate(general_run, proposed, force, now, background)
                assert json_of(proposed) == before  # neither path changes the proposal
                monkeypatch.undo()
                _ids(monkeypatch)
                if fast.changed and fast.status == ACCEPT and proposed["type"] in orchestration._PLAIN_TARGETS \
                        and not set(proposed["state_details"]) - models._STATE_DETAILS_KEYS:
                    taken += 1
                assert list(fast_run) == list(general_run)
                assert json_of(fast_run) == json_of(general_run), (run["state"]["type"], proposed)
                assert (fast.status, fast.details, fast.changed, fast.queue, fast.due) == \
                    (general.status, general.details, general.changed, general.queue, general.due)
                assert json_of(fast.state) == json_of(general.state)
    assert taken > 100


def json_of(value) -> str:
    """The stored text (key order included), with the counter's ids the same on both sides."""
    import json
    import re

    return re.sub(r"00000000-0000-4000-8000-\d{12}", "ID", json.dumps(value, default=repr))
