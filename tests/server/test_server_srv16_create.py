"""srv16's cuts on the create path give the same texts: the brief answer written by hand
(``core._brief_of_built``) equals ``core.brief_json``, the run's ``created``/``expected``
times and its due time are the ones computed from ``iso(now)``, and a claim proposal is
made once per holder and never changed by orchestration."""
from __future__ import annotations

import copy
import json
import time

import pytest

from sync_worker.server import core, models
from sync_worker.server.orchestration import orchestrate

NAMES = [None, "Scheduled", "Pending", "Late", "", 'quo"te', "back\\slash", "tab\there", "new\nline", "caf\u00e9",
         "\u2603 snow", "\U0001f600", "\x00nul", "</script>", "a" * 300]


def _body(name, state_type="SCHEDULED", **details):
    return {"id": models.new_id(), "name": "echo", "task_key": "echo-1", "dynamic_key": "echo-1-abc",
            "state": {"type": state_type, "name": name,
                      "state_details": dict({"deferred": True, "task_parameters_id": models.new_id()}, **details)}}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("state_type", ["SCHEDULED", "PENDING", "RUNNING", "COMPLETED"])
def test_the_brief_answer_by_hand_is_brief_json(name, state_type):
    run = models.build_task_run(_body(name, state_type), time.time())
    assert core._brief_of_built(run) == core.brief_json(run)
    answer = json.loads(core._brief_of_built(run))
    assert answer == {"id": run["id"], "state": {"type": state_type, "name": run["state"]["name"],
                                                 "timestamp": run["state"]["timestamp"]}}


def test_a_create_without_a_state_and_with_extra_fields_answers_the_same():
    for body in [{"task_key": "k", "dynamic_key": "d"},
                 {"task_key": "k", "dynamic_key": "d", "tags": ["a"], "task_version": "1", "id": models.new_id().upper()}]:
        run = models.build_task_run(body, time.time())
        assert core._brief_of_built(run) == core.brief_json(run)


def test_created_and_expected_times():
    now = time.time()
    run = models.build_task_run(_body("Scheduled"), now)
    assert run["created"] == run["updated"] == run["expected_start_time"] == models.iso(now)
    assert run["next_scheduled_start_time"] == models.iso(now)
    assert run["state"]["state_details"]["scheduled_time"] == models.iso(now)
    assert core._parse_due(run["state"], now) == now

    later = "2031-01-02T03:04:05.678901Z"
    run = models.build_task_run(_body("Scheduled", scheduled_time=later), now)
    assert run["created"] == models.iso(now)
    assert run["expected_start_time"] == run["next_scheduled_start_time"] == later
    assert core._parse_due(run["state"], now) == float(models.parse_time(later, []))

    run = models.build_task_run(_body("Pending", "PENDING"), now)
    assert run["expected_start_time"] == run["created"] == models.iso(now)
    assert run["next_scheduled_start_time"] is None


def test_a_claim_proposal_is_made_once_per_holder_and_orchestration_leaves_it_alone():
    first = core.claim_proposal("w-srv16")
    assert core.claim_proposal("w-srv16") is first
    assert first == models.validate_state({"type": "RUNNING", "name": "Running", "message": "Running on w-srv16"},
                                          ["state"])
    kept = copy.deepcopy(first)
    run = models.build_task_run(_body("Scheduled"), time.time())
    orchestrate(run, first, False, time.time(), True)
    assert run["state"]["type"] == "RUNNING" and run["state"]["message"] == "Running on w-srv16"
    assert first == kept
    assert core.claim_proposal("w-other")["message"] == "Running on w-other"
    for i in range(300):  # bounded
        core.claim_proposal(f"w-{i}")
    assert len(core._claim_proposals) <= 256


@pytest.mark.parametrize("request_id", ["r1", 'a"b', "back\\slash", "caf\u00e9", "\U0001f600", "\x00\x1f", "x" * 500,
                                        "\ud800", "</script>"])
def test_an_rpc_reply_writes_the_request_id_as_json_dumps_does(request_id):
    from sync_worker.jsoncodec import dumps_str  # what rpc replies and set_state answers use

    assert dumps_str(request_id) == json.dumps(request_id)
