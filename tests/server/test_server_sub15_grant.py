"""The credit a final state carries (claim_at_delivery) is usable only once the reader flushes
that read's set_states: the connection's sender thread, woken in between, cannot claim the
next run with it in a commit of its own ahead of the final state. Before, that happened now and
then under load (test_server_claim_commit failed 3 times in 25): the claim went alone, then the
final state alone -- two commits instead of one."""
from __future__ import annotations

import threading
import uuid
from typing import Any

from sync_worker.server import subscriptions
from tests.server.test_server_claim_at_delivery import claiming
from tests.server.test_server_claim_commit import CLAIM, SET_STATE, _frames_after, _record_batches


def test_a_sender_woken_while_the_final_state_is_read_does_not_claim_with_its_credit(server, wire, monkeypatch):
    ticked = threading.Event()
    tick, set_state = subscriptions.Subscription._tick, subscriptions.Subscription._set_state

    def traced_tick(self: Any, poked: bool) -> None:
        try:
            tick(self, poked)
        finally:
            if poked:
                ticked.set()

    def woken_between(self: Any, value: dict[str, Any]) -> None:
        set_state(self, value)
        # the sender thread runs a delivery round now, before the reader flushes this read
        ticked.clear()
        self.outbox.poke()
        assert ticked.wait(10), "the sender thread did not tick"

    monkeypatch.setattr(subscriptions.Subscription, "_tick", traced_tick)
    monkeypatch.setattr(subscriptions.Subscription, "_set_state", woken_between)
    ids = [wire.create()["id"] for _ in range(2)]
    subscriber = claiming(wire, 1)  # (after the patches: its outbox binds _tick when it is made)
    run = subscriber.next_run()
    assert run["id"] == ids[0]
    batches = _record_batches(server)
    request_id = uuid.uuid4().hex
    subscriber.send({"type": "set_state", "request_id": request_id, "task_run_id": run["id"],
                     "state": {"type": "COMPLETED"}, "credit": 1})
    answer, following = _frames_after(subscriber, 2)
    assert answer["request_id"] == request_id and answer["result"]["status"] == "ACCEPT"
    assert following["id"] == ids[1] and following["state"]["type"] == "RUNNING"
    assert batches == [[SET_STATE, CLAIM]]  # one commit, not the claim alone and then the final state
    assert [wire.read(i)["state_type"] for i in ids] == ["COMPLETED", "RUNNING"]
