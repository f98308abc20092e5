"""The worker's flow control on the embedded server (credit extension): it receives no
more runs than it has free slots, so a busy worker leaves the queue to idle workers."""
from __future__ import annotations

import json
import threading

import websocket

from sync_worker import task
from tests.helpers import wait_for

RELEASE = threading.Event()
STARTED: list[int] = []
LOCK = threading.Lock()


@task(task_key="tests.credit.block")
def block(i: int) -> int:
    with LOCK:
        STARTED.append(i)
    RELEASE.wait(30)
    return i


def raw_subscriber(server, keys):
    ws = websocket.create_connection(server.url.replace("http", "ws") + "/task_runs/subscriptions/scheduled",
                                     subprotocols=["prefect"], timeout=10)
    ws.send(json.dumps({"type": "auth", "token": None}))
    assert json.loads(ws.recv())["type"] == "auth_success"
    ws.send(json.dumps({"type": "subscribe", "keys": keys, "client_id": "idle", "credit": 10}))
    return ws


def test_a_busy_worker_holds_no_run_it_cannot_start(server, api_env, start_worker):
    RELEASE.clear()
    STARTED.clear()
    worker = start_worker(block, limit=2)
    futures = [block.delay(i) for i in range(5)]
    wait_for(lambda: len(STARTED) == 2, message="two runs started")
    # Under Prefect's one-run-per-ack flow control the busy worker would now hold a third
    # run unacknowledged; with credit it holds none, so an idle subscriber gets all three.
    idle = raw_subscriber(server, [block.task_key])
    try:
        received = {json.loads(idle.recv())["id"] for _ in range(3)}
    finally:
        idle.close()  # unacknowledged: they go back to the queue
    assert received == {f.task_run_id for f in futures} - {f.task_run_id for f in futures if f.state.name == "Running"}
    assert worker.current_tasks == 2
    RELEASE.set()
    assert sorted(f.result(timeout=30) for f in futures) == [0, 1, 2, 3, 4]


def test_credit_is_returned_when_runs_finish(server, api_env, start_worker):
    RELEASE.set()
    worker = start_worker(block, limit=3)
    futures = [block.delay(i) for i in range(30)]
    assert sorted(f.result(timeout=60) for f in futures) == list(range(30))
    # a caller sees COMPLETED as soon as the server commits it; the worker counts the run a
    # moment later, once the answer is back: wait for it rather than race it
    wait_for(lambda: sum(worker.finished_task_runs.values()) == 30, message="30 runs counted as finished")
