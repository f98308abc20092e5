"""Retention end to end: finished runs and their server records are deleted after the retention
period while a workload runs; parameters go when a run COMPLETES; ``--retention`` parsing;
``future.result(timeout)`` says when no worker serves the key."""
from __future__ import annotations

import threading
import time

import pytest

from sync_worker.client import Client
from sync_worker.exceptions import TaskRunFailed
from sync_worker.schemas import StateType
from tests.operate import queue_tasks as qt
from tests.operate.test_queue_cli import cli
from tests.worker.worker_helpers import wait_for


def _records(server) -> int:
    return server.db.read_all("SELECT count(*) FROM records", [])[0][0]


@pytest.fixture
def short_retention(server_factory, tmp_path, monkeypatch):
    server = server_factory(retention=1.0)  # swept every second
    monkeypatch.setenv("SYNC_WORKER_API_URL", server.url)
    monkeypatch.setenv("SYNC_WORKER_STORAGE", "server")  # parameters are records on the server
    for name in ("SYNC_WORKER_API_AUTH_STRING", "PREFECT_API_AUTH_STRING", "SYNC_WORKER_FAST_PATH"):
        monkeypatch.delenv(name, raising=False)
    return server


def test_parameters_of_completed_runs_are_deleted_failed_ones_kept(server_factory, monkeypatch, start_worker):
    server = server_factory(retention=0)  # keep runs: only the parameter rule acts
    monkeypatch.setenv("SYNC_WORKER_API_URL", server.url)
    monkeypatch.setenv("SYNC_WORKER_STORAGE", "server")
    start_worker(qt.add, qt.boom, limit=4)
    assert [qt.add.delay(i, i).result(timeout=30) for i in range(5)] == [0, 2, 4, 6, 8]
    assert _records(server) == 0
    failed = qt.boom.delay("kept for runs show / runs retry")
    with pytest.raises(TaskRunFailed):
        failed.result(timeout=30)
    assert _records(server) == 1
    waiting = qt.nobody.delay(1)
    assert _records(server) == 2
    assert waiting.state.type is StateType.SCHEDULED
    time.sleep(1.5)  # retention=0: nothing is ever swept
    assert Client(server.url).count_task_runs() == 7


def test_finished_runs_and_records_are_deleted_while_a_workload_runs(short_retention, start_worker):
    server = short_retention
    client = Client(server.url)
    start_worker(qt.add, qt.boom, limit=8)
    old_failed = qt.boom.delay("old")
    with pytest.raises(TaskRunFailed):
        old_failed.result(timeout=30)
    waiting = qt.nobody.delay("not finished: kept")
    stop = threading.Event()
    errors: list[BaseException] = []
    done = [0]

    def workload() -> None:
        i = 0
        while not stop.is_set():
            try:
                assert qt.add.delay(i, 1).result(timeout=30) == i + 1
                done[0] += 1
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return
            i += 1

    threads = [threading.Thread(target=workload) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: client.count_task_runs({"task_runs": {"id": {"any_": [old_failed.task_run_id]}}}) == 0,
                 30, "the old failed run deleted by retention")
        wait_for(lambda: done[0] > 50, 60, "the workload went on")
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert not errors, errors
    assert client.read_task_run(waiting.task_run_id).state.type is StateType.SCHEDULED
    # everything that finished goes within retention + one sweep; only the waiting run stays
    wait_for(lambda: client.count_task_runs() == 1, 30, "all finished runs deleted")
    assert _records(server) == 1  # the waiting run's parameters
    assert server._sweeper.deleted >= done[0]


def test_retention_option_of_the_server_command():
    out = cli({}, "server", "--retention", "soon", "--port", "0")
    assert out.returncode == 2 and "invalid duration 'soon'" in out.stderr
    out = cli({}, "server", "--help")
    text = " ".join(out.stdout.split())
    assert "--retention DURATION" in text and "0 keeps everything (default 7d)" in text


def test_result_timeout_says_no_worker_is_subscribed(api_env, start_worker, tmp_path):
    future = qt.nobody.delay(1)
    with pytest.raises(TimeoutError, match="no worker is subscribed to task key 'queue.nobody'"):
        future.result(timeout=0.3)
    start_worker(qt.slow, limit=1)
    busy = qt.slow.delay(str(tmp_path / "m1"), 3)
    queued = qt.slow.delay(str(tmp_path / "m2"), 0)
    with pytest.raises(TimeoutError) as info:
        queued.result(timeout=0.5)
    assert "no worker is subscribed" not in str(info.value)
    assert "still Scheduled" in str(info.value)
    busy.result(timeout=30)
    queued.result(timeout=30)
