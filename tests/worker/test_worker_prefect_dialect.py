"""The Prefect dialect in the default suite: the embedded server in Prefect-compatible mode
announces no extension and serves no rpc socket, so the client behaves exactly as it does
with a Prefect server (states over REST, PENDING claims, Prefect's flow control, stopping
by closing the socket)."""
from __future__ import annotations

import json

import pytest
import websocket

from sync_worker.client import Client
from sync_worker.schemas import StateType
from tests.helpers import wait_for
from tests.worker import worker_tasks as wt


def test_prefect_compatible_server_announces_nothing_and_has_no_rpc(prefect_like):
    ws = websocket.create_connection(prefect_like.url.replace("http", "ws") + "/task_runs/subscriptions/scheduled",
                                     subprotocols=["prefect"], timeout=10)
    ws.send(json.dumps({"type": "auth", "token": None}))
    assert json.loads(ws.recv()) == {"type": "auth_success"}  # exactly Prefect's answer
    ws.close()
    from sync_worker.rpc import RpcUnavailable

    client = Client()
    with pytest.raises(RpcUnavailable):
        client.rpc.connection()
    assert client.rpc._unsupported  # asked once, remembered


def test_runs_complete_with_states_over_rest(prefect_like, start_worker, monkeypatch):
    calls = []
    original = Client.set_task_run_state

    def counting(self, run_id, state, *args, **kwargs):
        calls.append(state.type.value)
        return original(self, run_id, state, *args, **kwargs)

    monkeypatch.setattr(Client, "set_task_run_state", counting)
    worker = start_worker(wt.add, limit=3)
    futures = [wt.add.delay(i, 10) for i in range(20)]
    assert [f.result(timeout=60) for f in futures] == [i + 10 for i in range(20)]
    assert calls.count("PENDING") == 20 and calls.count("RUNNING") == 20 and calls.count("COMPLETED") == 20
    assert not worker._subscription.supports_set_state


def test_retries_then_success(prefect_like, start_worker, tmp_path):
    start_worker(wt.fail_then_succeed)
    attempts = tmp_path / "attempts"
    future = wt.fail_then_succeed.delay(str(attempts), 2)
    assert future.result(timeout=60) == "succeeded on attempt 3"
    assert future.state.type is StateType.COMPLETED


def test_stopping_worker_hands_back_by_closing_its_socket(prefect_like, start_worker):
    wt.GATE.reset()
    stopping = start_worker(wt.gated, limit=1)
    futures = [wt.gated.delay(i) for i in range(3)]
    wait_for(lambda: wt.GATE.current == 1, message="one run executing")
    stopping.stop()
    idle = start_worker(wt.gated, limit=5)
    wait_for(lambda: idle.current_tasks == 2, message="the other worker running the two others")
    wt.GATE.opened.set()
    assert sorted(f.result(timeout=30) for f in futures) == [0, 1, 2]
    assert stopping.join(30) and stopping.finished_task_runs == {"tests.gated": 1}
