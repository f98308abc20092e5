"""The brief answer to an accepted ``set_state`` (extension ``brief_set_state``), at the wire level.

A client that saw ``brief_set_state`` in the subscription's ``auth_success`` may add ``"brief":
true`` to a ``set_state``: when the proposal is accepted the answer's ``result`` is
``{"status": "ACCEPT"}`` (no state, no details); every other answer is the full one; ``brief``
other than ``true`` is ignored (as for ``brief_create``).
"""
from __future__ import annotations

import json
import uuid
from typing import Any

from tests.server.conftest import Subscriber
from tests.server.test_server_claim_at_delivery import _answer, claiming


def _propose(subscriber: Subscriber, run_id: str, state: dict[str, Any], **extra: Any) -> dict[str, Any]:
    request_id = uuid.uuid4().hex
    subscriber.send({"type": "set_state", "request_id": request_id, "task_run_id": run_id, "state": state,
                     "force": False, **extra})
    return _answer(subscriber, request_id)


def test_auth_success_offers_brief_set_state(wire):
    subscriber = claiming(wire, 1)
    assert "brief_set_state" in subscriber.auth_reply["extensions"]


def test_an_accepted_brief_proposal_is_answered_with_the_status_alone_and_is_stored(wire):
    subscriber = claiming(wire, 2)
    run_id = wire.create()["id"]
    assert subscriber.next_run()["id"] == run_id
    answer = _propose(subscriber, run_id, {"type": "COMPLETED", "name": "Completed"}, brief=True, credit=1)
    assert answer == {"type": "set_state_result", "request_id": answer["request_id"], "status_code": 201,
                      "result": {"status": "ACCEPT"}}
    stored = wire.read(run_id)
    assert stored["state"]["type"] == "COMPLETED" and stored["state"]["name"] == "Completed"
    # the credit it carried works as without brief: the next run comes
    second = wire.create()["id"]
    assert subscriber.next_run()["id"] == second


def test_a_brief_proposal_that_is_not_accepted_gets_the_full_answer(wire):
    subscriber = claiming(wire, 1)
    run_id = wire.create(empirical_policy={"retries": 1, "retry_delay": 0})["id"]
    assert subscriber.next_run()["id"] == run_id
    answer = _propose(subscriber, run_id, {"type": "FAILED", "name": "Failed"}, brief=True)
    assert answer["status_code"] == 201
    result = answer["result"]
    assert result["status"] == "REJECT"
    assert result["state"]["type"] == "SCHEDULED" and result["state"]["name"] == "AwaitingRetry"
    assert "details" in result


def test_a_brief_proposal_for_an_unknown_run_gets_the_error_answer(wire):
    subscriber = claiming(wire, 1)
    answer = _propose(subscriber, str(uuid.uuid4()), {"type": "COMPLETED"}, brief=True)
    assert answer["status_code"] == 404 and answer["detail"] == "Task not found"
    assert "result" not in answer


def test_without_brief_true_an_accepted_proposal_gets_the_full_answer(wire):
    subscriber = claiming(wire, 4)
    for extra in ({}, {"brief": False}, {"brief": "yes"}, {"brief": 1}, {"brief": None}):
        run_id = wire.create()["id"]
        assert subscriber.next_run()["id"] == run_id
        answer = _propose(subscriber, run_id, {"type": "COMPLETED", "name": "Completed"}, credit=1, **extra)
        assert answer["status_code"] == 201, (extra, answer)
        result = answer["result"]
        assert result["status"] == "ACCEPT", extra
        assert result["state"] == wire.read(run_id)["state"], extra  # the whole state, as stored


def test_brief_answers_are_what_the_client_reads_back_as_json(wire):
    """The brief answer is valid JSON on its own (built as text, not by a serializer)."""
    subscriber = claiming(wire, 1)
    run_id = wire.create()["id"]
    assert subscriber.next_run()["id"] == run_id
    request_id = 'quote"and\\backslash'
    subscriber.send({"type": "set_state", "request_id": request_id, "task_run_id": run_id,
                     "state": {"type": "COMPLETED"}, "brief": True})
    subscriber.ws.settimeout(10)
    raw = subscriber.ws.recv()
    assert json.loads(raw) == {"type": "set_state_result", "request_id": request_id, "status_code": 201,
                               "result": {"status": "ACCEPT"}}
