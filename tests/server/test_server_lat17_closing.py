"""A ``set_state`` read while the server's database is closing (the server is stopping) is
answered 503 "Server is shutting down", as REST answers it, instead of ending the worker's
connection with an internal error (1011)."""
from __future__ import annotations

import json
import uuid

import pytest
from tests.server.test_server_claim_at_delivery import claiming

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("credit", [None, 1])
def test_a_set_state_read_after_the_database_closed_is_answered_503(server, wire, credit):
    run_id = wire.create()["id"]
    subscriber = claiming(wire, 1)
    assert subscriber.next_run()["id"] == run_id
    server.core.db.close()  # what stopping the server does first
    request_id = uuid.uuid4().hex
    message = {"type": "set_state", "request_id": request_id, "task_run_id": run_id, "state": {"type": "COMPLETED"}}
    if credit is not None:  # a final state that frees a slot: committed with the next claim
        message["credit"] = credit
    subscriber.send(message)
    subscriber.ws.settimeout(10)
    answer = json.loads(subscriber.ws.recv())
    assert answer["type"] == "set_state_result" and answer["request_id"] == request_id
    assert answer["status_code"] == 503 and answer["detail"] == "Server is shutting down"
