"""On the embedded server the subscription connection is the lease of the runs a worker
acknowledged: a full worker keeps it open, a stopping worker keeps it open until its
runs finished, and a worker that reconnects (same client_id) keeps its leases. Otherwise
a long run would be re-delivered, and executed again, while still running."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from sync_worker.client import Client

from tests.worker import worker_tasks as wt
from tests.helpers import wait_for


def _starts(path: Path, i: int) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.startswith(f"start {i} ")) if path.exists() else 0


def test_a_full_worker_keeps_the_lease_of_its_long_run(server_factory, tmp_path, monkeypatch, start_worker):
    server = server_factory(lease_timeout=1.0)
    monkeypatch.setenv("SYNC_WORKER_API_URL", server.url)
    monkeypatch.setenv("SYNC_WORKER_STORAGE", str(tmp_path / "store"))
    marks = tmp_path / "marks"
    busy = start_worker(wt.mark, limit=1)
    long_run = wt.mark.delay(1, str(marks), 4.0)
    wait_for(lambda: busy.current_tasks == 1, message="the long run in flight")
    waiting = wt.mark.delay(2, str(marks))  # held, unacknowledged, by the full worker
    start_worker(wt.mark, limit=1)
    assert long_run.result(timeout=30) == 1
    assert waiting.result(timeout=30) == 2
    time.sleep(1.5)
    assert _starts(marks, 1) == 1, marks.read_text()  # executed once, not re-queued by a lease timer


def test_a_long_run_keeps_its_lease_when_its_worker_reconnects(server_factory, tmp_path, monkeypatch, start_worker):
    from sync_worker.subscription import ConnectionLost

    server = server_factory(lease_timeout=1.0)
    monkeypatch.setenv("SYNC_WORKER_API_URL", server.url)
    monkeypatch.setenv("SYNC_WORKER_STORAGE", str(tmp_path / "store"))
    marks = tmp_path / "marks"
    worker = start_worker(wt.mark, limit=2)  # a free slot for the run if it were re-delivered
    long_run = wt.mark.delay(1, str(marks), 4.0)
    wait_for(lambda: worker.current_tasks == 1, message="the long run in flight")
    subscription = worker._subscription
    connects = subscription.connects
    subscription._conn.abort(ConnectionLost("simulated network blip"))  # the worker reconnects at once
    wait_for(lambda: subscription.connects > connects, message="the worker reconnected")
    assert long_run.result(timeout=30) == 1
    time.sleep(1.5)
    assert _starts(marks, 1) == 1, marks.read_text()  # the server kept the lease for the same client_id


def test_a_worker_that_reconnects_while_running_is_listed_with_its_limit(server, api_env, tmp_path, start_worker):
    """The server lists a worker's limit (dashboard, ``sync-worker status``) as its free slots
    plus the runs it says it holds when it subscribes again; its free slots alone were shown
    (limit 3 for a ``--limit 5`` worker running two runs)."""
    from sync_worker.client import Client
    from sync_worker.subscription import ConnectionLost

    marks = tmp_path / "marks"
    worker = start_worker(wt.mark, limit=5)
    runs = [wt.mark.delay(i, str(marks), 3.0) for i in range(2)]
    wait_for(lambda: worker.current_tasks == 2, message="two runs in flight")
    subscription = worker._subscription
    connects = subscription.connects
    subscription._conn.abort(ConnectionLost("simulated network blip"))
    wait_for(lambda: subscription.connects > connects, message="the worker reconnected")
    client = Client(server.url)
    try:
        wait_for(lambda: [w["limit"] for w in client.read_workers()] == [5], timeout=10,
                 message=f"the worker listed with limit 5: {client.read_workers()}")
    finally:
        client.close()
    assert [r.result(timeout=30) for r in runs] == [0, 1]


def test_a_stopping_worker_keeps_its_connection_until_its_runs_finished(api_env, start_worker, tmp_path):
    marks = tmp_path / "marks"
    worker = start_worker(wt.mark, limit=1)
    long_run = wt.mark.delay(1, str(marks), 1.5)
    held = wt.mark.delay(2, str(marks))  # delivered, not acknowledged: the worker is full
    wait_for(lambda: worker.current_tasks == 1, message="the long run in flight")
    subscription = worker._subscription
    worker.stop()
    time.sleep(0.5)
    assert subscription.connected  # still the lease of the run in flight
    assert worker.join(20)
    assert not subscription.connected  # closed after the drain
    assert long_run.result(timeout=5) == 1
    assert held.state.type.value == "SCHEDULED"  # handed back to the queue, not lost
    assert _starts(marks, 2) == 0


def test_reconnect_backoff_is_capped_below_the_announced_lease_timeout(server_factory, tmp_path, monkeypatch,
                                                                       start_worker):
    server = server_factory(lease_timeout=2.0)
    monkeypatch.setenv("SYNC_WORKER_API_URL", server.url)
    monkeypatch.setenv("SYNC_WORKER_STORAGE", str(tmp_path / "store"))
    worker = start_worker(wt.add, limit=1)
    assert wt.add.delay(1, 1).result(timeout=30) == 2
    subscription = worker._subscription
    assert subscription.max_backoff == 10.0
    # a quarter of the lease (plus at most 0.5 s of jitter): back well within the lease
    assert subscription.backoff_cap == 0.5


@pytest.mark.slow
def test_final_state_reported_after_a_75_s_outage(server_factory, tmp_path, monkeypatch, start_worker):
    """The server is away 75 s (longer than any fixed reporting budget) while a run
    finishes: the live worker keeps its final state, comes back within the lease, and
    reports it; the run is executed once."""
    from sync_worker.schemas import StateType
    from tests.helpers import free_port

    port, database = free_port(), str(tmp_path / "outage.db")
    server = server_factory(port=port, database=database, lease_timeout=5.0)
    monkeypatch.setenv("SYNC_WORKER_API_URL", server.url)
    monkeypatch.setenv("SYNC_WORKER_STORAGE", str(tmp_path / "store"))
    marks = tmp_path / "marks"
    start_worker(wt.mark, limit=2)
    future = wt.mark.delay(1, str(marks), 3.0)
    wait_for(lambda: _starts(marks, 1) == 1, message="the run executing")
    server.stop()
    time.sleep(75)  # the outage itself: what is measured is what happens after it
    restarted = server_factory(port=port, database=database, lease_timeout=5.0)
    wait_for(lambda: Client(restarted.url).read_task_run(future.task_run_id).state.type is StateType.COMPLETED,
             timeout=60, message="the final state reported after the outage")
    time.sleep(6)  # past the lease of the recovered run: it must not be delivered again
    assert _starts(marks, 1) == 1, marks.read_text()


@pytest.mark.parametrize("storage", ["server", "local"])
def test_a_worker_paused_past_its_lease_does_not_start_the_run_delivered_before_the_pause(
        server_factory, tmp_path, monkeypatch, start_worker, storage):
    """SIGSTOP (a debugger, a suspended laptop) longer than the lease: the server drops the
    connection, re-queues the run claimed on it and another worker finishes it. On SIGCONT
    the paused worker found the delivery (and the close behind it) in its socket and ran the
    function a second time; with local parameter records (deleted by the worker that ran
    it) it reported FAILED "could not start" with force, over COMPLETED."""
    import os
    import signal
    import subprocess
    import sys

    from tests.worker.conftest import REPO

    server = server_factory(lease_timeout=1.0, ping_interval=0.5)
    env = {**os.environ, "SYNC_WORKER_API_URL": server.url, "PYTHONPATH": str(REPO),
           "SYNC_WORKER_STORAGE": "server" if storage == "server" else str(tmp_path / "store")}
    for name, value in env.items():
        if name.startswith("SYNC_WORKER_"):
            monkeypatch.setenv(name, value)
    marks, log = tmp_path / "marks", tmp_path / "paused.log"
    with open(log, "w") as out:
        paused = subprocess.Popen([sys.executable, "-m", "sync_worker", "worker", "tests.worker.worker_tasks:mark",
                                   "--limit", "1"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "Subscribed to" in log.read_text(), timeout=30, message="the worker subscribed")
        paused.send_signal(signal.SIGSTOP)
        future = wt.mark.delay(1, str(marks))
        client = Client()
        wait_for(lambda: client.read_task_run(future.task_run_id).state.type.value == "RUNNING",
                 message="the run claimed at its delivery to the paused worker")
        start_worker(wt.mark, limit=1)  # gets it once the lease has run out
        assert future.result(timeout=30) == 1
        paused.send_signal(signal.SIGCONT)
        wait_for(lambda: "Not starting 1 run(s) delivered just before the server dropped the connection"
                 in log.read_text(), timeout=30, message=f"the stale delivery refused:\n{log.read_text()}")
        wait_for(lambda: log.read_text().count("Subscribed to") == 2, timeout=30, message="the worker reconnected")
        assert _starts(marks, 1) == 1, marks.read_text()
        state = client.read_task_run(future.task_run_id).state
        assert state.type.value == "COMPLETED", state
    finally:
        paused.send_signal(signal.SIGCONT)
        paused.kill()
        paused.wait(10)
