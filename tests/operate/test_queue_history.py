"""State history end to end: every state a run enters is recorded by the embedded server and
served by Prefect's ``GET /api/task_run_states/?task_run_id=`` and ``sync-worker runs show``;
purge deletes it with the run; version-1 and version-2 databases are migrated on open."""
from __future__ import annotations

import json
import shutil
import sqlite3
import uuid
from datetime import datetime
from pathlib import Path

import requests

from sync_worker.client import Client
from sync_worker.server.database import SCHEMA_VERSION
from sync_worker.tasks import TaskRunFuture
from tests.operate import queue_tasks as qt
from tests.operate.test_queue_cli import cli

# a claim may go through PENDING or straight to RUNNING (the embedded server's fast path); the
# second attempt's RUNNING is named "Retrying", as Prefect names it
RETRIED = [("SCHEDULED", "Scheduled"), ("RUNNING", "Running"), ("SCHEDULED", "AwaitingRetry"),
           ("RUNNING", "Retrying"), ("COMPLETED", "Completed")]


def _states(server, run_id: str) -> list[dict]:
    response = requests.get(f"{server.url}/task_run_states/", params={"task_run_id": run_id}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def _times(states: list[dict]) -> list[datetime]:
    return [datetime.fromisoformat(s["timestamp"].replace("Z", "+00:00")) for s in states]


def _history_rows(server) -> int:
    return server.db.read_all("SELECT count(*) FROM task_run_states", [])[0][0]


def test_a_retried_run_has_its_whole_history(server, api_env, start_worker, tmp_path):
    start_worker(qt.flaky, limit=1)
    future = qt.flaky.delay(str(tmp_path / "marker"))
    assert future.result(timeout=30) == "second attempt"
    states = _states(server, future.task_run_id)
    got = [(s["type"], s["name"]) for s in states]
    assert [g for g in got if g[0] != "PENDING"] == RETRIED, got
    assert got[0] == ("SCHEDULED", "Scheduled") and got[-1] == ("COMPLETED", "Completed")
    times = _times(states)
    assert times == sorted(times) and times[0] < times[-1]
    assert len({s["id"] for s in states}) == len(states)
    assert all(s["state_details"]["task_run_id"] == future.task_run_id for s in states)
    failed = next(s for s in states if s["name"] == "AwaitingRetry")
    assert "first attempt fails" in (failed["message"] or "")

    out = cli(api_env, "runs", "show", future.task_run_id, "--json")
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)["states"]
    assert [(s["type"], s["name"]) for s in shown] == got
    assert [s["timestamp"] for s in shown] == [s["timestamp"] for s in states]
    durations = [s["duration_seconds"] for s in shown]
    assert all(d is not None and d >= 0 for d in durations[:-1]) and durations[-1] is None

    out = cli(api_env, "runs", "show", future.task_run_id)
    assert out.returncode == 0, out.stderr
    assert "states:" in out.stdout and "AwaitingRetry (SCHEDULED)" in out.stdout
    assert "Running (RUNNING)" in out.stdout and "Retrying (RUNNING)" in out.stdout


def test_a_cancelled_run_history_ends_cancelled(server, api_env):
    future = qt.nobody.delay("never")
    assert future.cancel() is True
    states = _states(server, future.task_run_id)
    assert [s["type"] for s in states] == ["SCHEDULED", "CANCELLED"]


def test_endpoint_errors_as_prefect(server):
    url = f"{server.url}/task_run_states/"
    missing = requests.get(url, timeout=10)
    assert missing.status_code == 422
    assert missing.json()["exception_detail"][0]["loc"] == ["query", "task_run_id"]
    assert requests.get(url, params={"task_run_id": "not-a-uuid"}, timeout=10).status_code == 422
    unknown = requests.get(url, params={"task_run_id": str(uuid.uuid4())}, timeout=10)
    assert unknown.status_code == 200 and unknown.json() == []


def test_purge_deletes_the_history_with_the_run(server, api_env, start_worker):
    start_worker(qt.add, limit=2)
    futures = [qt.add.delay(i, 1) for i in range(3)]
    assert [f.result(timeout=30) for f in futures] == [1, 2, 3]
    waiting = qt.nobody.delay("kept")
    assert _history_rows(server) >= 3 * 3 + 1
    out = cli(api_env, "runs", "purge", "--older-than", "0s")
    assert out.returncode == 0, out.stderr
    for future in futures:
        assert _states(server, future.task_run_id) == []
    assert [s["type"] for s in _states(server, waiting.task_run_id)] == ["SCHEDULED"]
    assert _history_rows(server) == 1


def test_a_version_1_database_is_migrated(server_factory, tmp_path, monkeypatch, start_worker):
    db_path = str(tmp_path / "old.db")
    server = server_factory(database=db_path)
    monkeypatch.setenv("SYNC_WORKER_API_URL", server.url)
    monkeypatch.setenv("SYNC_WORKER_STORAGE", str(tmp_path / "store"))
    monkeypatch.delenv("SYNC_WORKER_FAST_PATH", raising=False)
    old = qt.add.delay(2, 3)  # queued: no worker yet
    server.stop()
    with sqlite3.connect(db_path) as conn:  # back to what a version-1 server wrote
        conn.execute("DROP TABLE task_run_states")
        conn.execute("PRAGMA user_version=1")
    conn.close()

    server = server_factory(database=db_path)
    monkeypatch.setenv("SYNC_WORKER_API_URL", server.url)
    with sqlite3.connect(db_path) as check:
        assert check.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    check.close()
    # the run is kept, its current state starts its history, the next states are recorded
    assert [s["type"] for s in _states(server, old.task_run_id)] == ["SCHEDULED"]
    start_worker(qt.add, limit=1)
    assert TaskRunFuture(old.task_run_id, client=Client(server.url)).result(timeout=30) == 5
    types = [s["type"] for s in _states(server, old.task_run_id)]
    assert types[0] == "SCHEDULED" and types[-1] == "COMPLETED" and "RUNNING" in types


FIXTURE_V2 = Path(__file__).resolve().parent.parent / "fixtures" / "server-db" / "schema-v2.db"


def test_a_version_2_database_is_migrated(server_factory, tmp_path):
    """A database written at schema version 2 (history keyed by the run's text id, see
    tests/fixtures/server-db/README.md) opens with its history intact, keyed by run seq."""
    db_path = tmp_path / "v2.db"
    shutil.copyfile(FIXTURE_V2, db_path)
    server = server_factory(database=str(db_path))
    with sqlite3.connect(db_path) as check:
        assert check.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
        columns = {r[1] for r in check.execute("PRAGMA table_info(task_run_states)")}
        tables = {r[0] for r in check.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    check.close()
    assert "run_seq" in columns and "run_id" not in columns and "task_run_states_v2" not in tables
    done, retried, queued = ("dd948f8b-692f-47a2-ac3c-b1855d29fec1", "369dbc12-bd99-46bc-a087-91211eab2ecc",
                             "07897892-40de-4fcc-b6f2-aa969562ebd0")
    assert [s["type"] for s in _states(server, done)] == ["SCHEDULED", "PENDING", "RUNNING", "COMPLETED"]
    assert [s["name"] for s in _states(server, retried)] == [
        "Scheduled", "Pending", "Running", "AwaitingRetry", "Pending", "Retrying"]
    assert [s["type"] for s in _states(server, queued)] == ["SCHEDULED"]
    # new states are appended to the migrated history
    response = requests.post(f"{server.url}/task_runs/{retried}/set_state",
                             json={"state": {"type": "COMPLETED"}, "force": False}, timeout=10)
    assert response.status_code == 201 and response.json()["status"] == "ACCEPT"
    assert [s["type"] for s in _states(server, retried)][-2:] == ["RUNNING", "COMPLETED"]
    # and deleting a run deletes its history rows only
    assert requests.delete(f"{server.url}/task_runs/{done}", timeout=10).status_code == 204
    assert _states(server, done) == [] and len(_states(server, retried)) == 7
    server.stop()
    server = server_factory(database=str(db_path))  # opening a version-3 file again changes nothing
    assert [s["type"] for s in _states(server, queued)] == ["SCHEDULED"]
    assert len(_states(server, retried)) == 7
