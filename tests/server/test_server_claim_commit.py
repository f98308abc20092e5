"""claim_at_delivery: a final state that carries credit and the claim of the next due run are
committed in ONE transaction (queued together, adjacent, in one batch), and both the answer
and the next run arrive (the answer first when the reader thread committed them itself; one
committed by the writer thread goes through the outbox, so the order is not promised)."""
from __future__ import annotations

import json
import uuid
from typing import Any

from tests.helpers import wait_for
from tests.server.test_server_claim_at_delivery import claiming

SET_STATE = "Core._set_state_op.<locals>.op"
CLAIM = "Core.claim_at_delivery.<locals>.make_op.<locals>.op"


def _record_batches(server: Any) -> list[list[str]]:
    """Each committed batch as the qualified names of its operations (the real database,
    observed: its batch method wrapped, nothing replaced)."""
    db = server.core.db
    batches: list[list[str]] = []
    original = db._run_batch

    def run_batch(conn, batch):
        batches.append([op.fn.__qualname__ for op in batch])
        return original(conn, batch)

    db._run_batch = run_batch
    return batches


def _frames_after(subscriber, count: int) -> list[dict[str, Any]]:
    """The next ``count`` frames, answers first."""
    subscriber.ws.settimeout(10)
    frames = [json.loads(subscriber.ws.recv()) for _ in range(count)]
    return sorted(frames, key=lambda f: "type" not in f)


def _together(batches: list[list[str]]) -> int:
    """Batches in which a set_state is immediately followed by a claim."""
    return sum(any(a == SET_STATE and b == CLAIM for a, b in zip(batch, batch[1:], strict=False)) for batch in batches)


def test_the_final_state_and_the_next_claim_are_one_commit_and_the_answer_comes_first(server, wire):
    ids = [wire.create()["id"] for _ in range(3)]
    subscriber = claiming(wire, 1)
    run = subscriber.next_run()
    assert run["id"] == ids[0]
    batches = _record_batches(server)
    for expected_next in ids[1:]:
        request_id = uuid.uuid4().hex
        subscriber.send({"type": "set_state", "request_id": request_id, "task_run_id": run["id"],
                         "state": {"type": "COMPLETED"}, "credit": 1})
        answer, following = _frames_after(subscriber, 2)
        assert answer["type"] == "set_state_result" and answer["request_id"] == request_id
        assert answer["result"]["status"] == "ACCEPT"
        assert following["id"] == expected_next and following["state"]["type"] == "RUNNING"
        run = following
    assert _together(batches) == 2, batches
    assert not any(batch == [CLAIM] for batch in batches), batches  # no claim committed on its own
    assert [wire.read(i)["state_type"] for i in ids] == ["COMPLETED", "COMPLETED", "RUNNING"]
    assert [wire.read(i)["run_count"] for i in ids] == [1, 1, 1]


def test_with_nothing_due_the_final_state_is_answered_and_the_credit_kept(server, wire):
    run_id = wire.create()["id"]
    subscriber = claiming(wire, 1)
    assert subscriber.next_run()["id"] == run_id
    request_id = uuid.uuid4().hex
    subscriber.send({"type": "set_state", "request_id": request_id, "task_run_id": run_id,
                     "state": {"type": "COMPLETED"}, "credit": 1})
    (answer,) = _frames_after(subscriber, 1)
    assert answer["request_id"] == request_id and answer["result"]["status"] == "ACCEPT"
    later = wire.create()["id"]  # the credit granted with the final state brings it
    assert subscriber.next_run()["id"] == later
    wait_for(lambda: wire.read(later)["state_type"] == "RUNNING", timeout=5)


def test_a_refused_or_unknown_final_state_with_credit_still_brings_the_next_run(server, wire):
    ids = [wire.create()["id"] for _ in range(2)]
    subscriber = claiming(wire, 1)
    assert subscriber.next_run()["id"] == ids[0]
    unknown = uuid.uuid4().hex
    subscriber.send({"type": "set_state", "request_id": unknown, "task_run_id": str(uuid.uuid4()),
                     "state": {"type": "COMPLETED"}, "credit": 1})
    answer, following = _frames_after(subscriber, 2)
    assert answer["request_id"] == unknown and answer["status_code"] == 404
    assert following["id"] == ids[1] and following["state"]["type"] == "RUNNING"
    assert wire.read(ids[0])["state_type"] == "RUNNING"  # untouched
