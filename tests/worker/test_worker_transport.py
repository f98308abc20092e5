"""How a message travels: one Transport per worker sends state proposals over the
subscription socket when the open connection offers ``set_state`` and over REST otherwise,
with ONE error mapping for both paths (``transport.error_for``) and no retry of its own."""
from __future__ import annotations

import pytest

from sync_worker.client import Client
from sync_worker.exceptions import APIError, ObjectNotFound
from sync_worker.schemas import Pending, Running, SetStateStatus, State, StateType
from sync_worker.subscription import Subscription
from sync_worker.transport import Transport
from tests.worker import worker_tasks as wt

MISSING = "00000000-0000-0000-0000-000000000000"


def _refusals(transport: Transport) -> list[tuple[type, int]]:
    out = []
    for run_id, state in ((MISSING, Running()), ("not-a-run-id", Running()),
                          (MISSING, State(StateType.SCHEDULED, "Scheduled", message="x" * 100_000))):
        with pytest.raises(APIError) as caught:
            transport.set_state(run_id, state)
        out.append((type(caught.value), caught.value.status_code))
    return out


def test_socket_and_rest_answers_map_to_the_same_errors(api_env):
    client = Client()
    rest = _refusals(Transport(client))
    sub = Subscription([wt.add.task_key], "t-1", client=client)
    wt.add.delay(1, 2)
    try:
        run = sub.next_run(timeout=30)
        assert run is not None
        sub.ack()
        transport = Transport(client, sub)
        assert transport.states_over_socket
        socket = _refusals(transport)
        assert transport.set_state(run.id, Pending()).status is SetStateStatus.ACCEPT
    finally:
        sub.close()
    assert rest[0] == (ObjectNotFound, 404)
    assert socket == rest, (socket, rest)


def test_a_transport_makes_one_attempt(api_env, monkeypatch):
    """No retry inside the transport: the caller (the engine) owns the one retry rule."""
    import requests

    calls = []

    def refuse(self, method, path, **kwargs):
        calls.append(path)
        raise requests.ConnectionError("refused")

    monkeypatch.setattr(Client, "request", refuse)
    with pytest.raises(requests.ConnectionError):
        Transport(Client()).set_state(MISSING, Running())
    assert len(calls) == 1
