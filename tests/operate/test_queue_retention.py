"""Retention end to end: finished runs and their server records are deleted after the retention
period while a workload runs; parameters go when a run COMPLETES; ``--retention`` parsing;
``future.result(timeout)`` says when no worker serves the key."""
from __future__ import annotations

import json
import threading
import time

import pytest

from sync_worker.client import Client
from sync_worker.exceptions import TaskRunFailed
from sync_worker.schemas import StateType
from sync_worker.storage import dump_record
from tests.operate import queue_tasks as qt
from tests.operate.test_queue_cli import cli
from tests.helpers import wait_for


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
    # refused at the start, not by every sweep after it (OverflowError, logged each minute)
    out = cli({}, "server", "--retention", "99999999999d", "--port", "0")
    assert out.returncode == 2 and "at most 36500d (100 years)" in out.stderr
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


def test_local_parameter_files_of_completed_runs_are_deleted(api_env, start_worker, tmp_path):
    store = tmp_path / "store" / "parameters"
    start_worker(qt.add, qt.boom, limit=2)
    assert qt.add.delay(1, 2).result(timeout=30) == 3
    # the worker deletes it once the server accepted COMPLETED (the caller may see that first)
    wait_for(lambda: list(store.iterdir()) == [], 10, "the parameters file deleted")
    failed = qt.boom.delay("keep my parameters")
    with pytest.raises(TaskRunFailed):
        failed.result(timeout=30)
    waiting = qt.nobody.delay(3)
    params = {p.name for p in store.iterdir()}
    assert params == {failed.state.state_details.task_parameters_id,
                      waiting.state.state_details.task_parameters_id}


def test_storage_prune_deletes_old_result_files_and_keeps_parameters(tmp_path):
    import os

    store = tmp_path / "results"
    (store / "parameters").mkdir(parents=True)
    old_result, new_result, old_params = store / "r-old", store / "r-new", store / "parameters" / "p-old"
    for path in (old_result, new_result, old_params):
        path.write_bytes(dump_record({"a": 1}))
    week_ago = time.time() - 8 * 86400
    os.utime(old_result, (week_ago, week_ago))
    os.utime(old_params, (week_ago, week_ago))
    out = cli({}, "storage", "prune", "--older-than", "7d", "--dir", str(store), "--json")
    assert out.returncode == 0, out.stderr
    assert '"deleted": 1' in out.stdout
    assert not old_result.exists() and new_result.exists() and old_params.exists()
    out = cli({}, "storage", "prune", "--older-than", "7d", "--dir", str(store), "--include-parameters")
    assert out.returncode == 0 and "deleted 1 record file(s)" in out.stdout
    assert not old_params.exists() and new_result.exists()
    out = cli({}, "storage", "prune", "--older-than", "7d", "--dir", str(tmp_path / "missing"))
    assert out.returncode == 2 and "is not a directory" in out.stderr  # a usage mistake


def test_storage_prune_deletes_only_record_files(tmp_path):
    """A mistaken --dir (a home, /etc) loses nothing: prune deletes record files only, never
    another file, a folder's contents or a symlink's target."""
    import os

    mistaken = tmp_path / "home"
    (mistaken / "sub").mkdir(parents=True)
    (mistaken / "parameters").mkdir()
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep me")
    files = {
        mistaken / "notes.txt": "my notes",
        mistaken / "config": "x = 1",
        mistaken / "data.json": '{"metadata": 1}',  # JSON, but not a record
        mistaken / "sub" / "r-deep": dump_record(1).decode(),  # a record, but below the store
        mistaken / "parameters" / "p-old": dump_record({"parameters": {}}).decode(),
    }
    record = mistaken / "r-old"
    files[record] = dump_record(1).decode()
    for path, text in files.items():
        path.write_text(text)
    (mistaken / "link").symlink_to(target)
    week_ago = time.time() - 8 * 86400
    for path in [*files, target]:
        os.utime(path, (week_ago, week_ago))
    out = cli({}, "storage", "prune", "--older-than", "7d", "--dir", str(mistaken), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["deleted"] == 1
    assert not record.exists()
    assert all(path.exists() for path in files if path != record)
    assert (mistaken / "link").is_symlink() and target.read_text() == "keep me"
    out = cli({}, "storage", "prune", "--older-than", "7d", "--dir", str(mistaken / "sub" / ".."), "--include-parameters")
    assert out.returncode == 0 and "deleted 1 record file(s)" in out.stdout  # the parameters record
    assert "left alone" in out.stdout
    assert (mistaken / "notes.txt").read_text() == "my notes"
    out = cli({}, "storage", "prune", "--older-than", "7d", "--dir", str(mistaken / "sub" / ".."))
    assert "holds no record files" in out.stderr
