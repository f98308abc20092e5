"""Schema version 4: the state history is stored ``WITHOUT ROWID`` (one b-tree keyed by
(run_seq, seq) instead of a table and an index), and ``ix_task_runs_active`` is gone (recovery
finds the runs workers held key by key through ``ix_task_runs_key_state``).

A version-3 file is migrated on open with its history rows unchanged; the fixture
``tests/fixtures/server-db/schema-v3-memory-index.db`` was written by the server of main at
6e6a9f6 (see the fixtures README)."""
from __future__ import annotations

import shutil
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import requests

from sync_worker.server.database import SCHEMA_VERSION, RunRow, SQLiteDatabase
from sync_worker.server.models import iso

FIXTURE_V3 = Path(__file__).resolve().parent.parent / "fixtures" / "server-db" / "schema-v3-memory-index.db"
DONE = "00000000-0000-4000-8000-000000000004"
QUEUED = "00000000-0000-4000-8000-000000000001"
HISTORY = "SELECT run_seq, seq, state_id, type, name, timestamp, message FROM task_run_states ORDER BY run_seq, seq"


def _connect(path: Path | str) -> sqlite3.Connection:
    return sqlite3.connect(str(path))


def _schema(conn: sqlite3.Connection) -> dict[str, tuple[str, str]]:
    return {name: (tbl, sql or "") for name, tbl, sql in conn.execute("SELECT name, tbl_name, sql FROM sqlite_master")}


def _plan(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...] = ()) -> str:
    return " | ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, params))


def _state(kind: str, when: float) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "type": kind, "name": kind.title(), "timestamp": iso(when), "message": None,
            "data": None, "state_details": {}}


def _new_row(run_id: str, key: str, kind: str, now: float) -> RunRow:
    state = _state(kind, now)
    run = {"id": run_id, "task_key": key, "name": "t", "state_id": state["id"], "state_type": kind,
           "state_name": state["name"], "state": state}
    return RunRow(id=run_id, task_key=key, state_type=kind, run=run)


def _set(tx: Any, run_id: str, kind: str, now: float, holder: str | None = None) -> None:
    row = tx.get_run(run_id)
    row.run["state"] = _state(kind, now)
    row.run["state_id"], row.run["state_type"] = row.run["state"]["id"], kind
    row.state_type, row.holder = kind, holder
    row.touch()
    tx.update_run(row)


def test_a_version_3_file_is_migrated_with_its_history_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "v3.db"
    shutil.copyfile(FIXTURE_V3, path)
    with _connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
        before = conn.execute(HISTORY).fetchall()
        assert "WITHOUT ROWID" not in _schema(conn)["task_run_states"][1]
    conn.close()
    assert len(before) >= 5  # the fixture: 3 queued runs (1 state each), 1 completed (2 states)

    SQLiteDatabase(str(path)).close()

    with _connect(path) as conn:
        schema = _schema(conn)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
        assert " ".join(schema["task_run_states"][1].split()).endswith("WITHOUT ROWID")
        assert conn.execute(HISTORY).fetchall() == before
        assert "task_run_states_v3" not in schema
        assert "ix_task_run_states_run_seq" not in schema and "ix_task_runs_active" not in schema
        assert "ix_task_runs_due" not in schema and "ix_task_runs_queue" not in schema
        assert schema["ix_task_runs_queued"][1].endswith("(task_key, seq, due) WHERE qstate = 1")
        assert schema["ix_task_run_states_finished"][0] == "task_run_states"  # rebuilt on the new table
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


def test_a_migrated_file_serves_and_extends_its_history(server_factory: Any, tmp_path: Path) -> None:
    path = tmp_path / "v3.db"
    shutil.copyfile(FIXTURE_V3, path)
    with _connect(path) as conn:
        expected = [t for (t,) in conn.execute(
            "SELECT type FROM task_run_states WHERE run_seq = (SELECT seq FROM task_runs WHERE id = ?) ORDER BY seq",
            (DONE,))]
    conn.close()
    server = server_factory(database=str(path))

    def states(run_id: str) -> list[str]:
        response = requests.get(f"{server.url}/task_run_states/", params={"task_run_id": run_id}, timeout=10)
        assert response.status_code == 200, response.text
        return [s["type"] for s in response.json()]

    assert states(DONE) == expected == ["SCHEDULED", "COMPLETED"]
    # a migrated run's next states are numbered after its migrated ones, also after a restart
    # (the server then knows nothing of the run in memory)
    for kind in ("RUNNING", "COMPLETED"):
        response = requests.post(f"{server.url}/task_runs/{QUEUED}/set_state",
                                 json={"state": {"type": kind}, "force": True}, timeout=10)
        assert response.status_code == 201, response.text
        server.stop()
        server = server_factory(database=str(path))
    assert states(QUEUED) == ["SCHEDULED", "RUNNING", "COMPLETED"]
    assert requests.delete(f"{server.url}/task_runs/{QUEUED}", timeout=10).status_code == 204
    assert states(QUEUED) == [] and states(DONE) == ["SCHEDULED", "COMPLETED"]


def test_history_rows_are_numbered_per_run_across_restarts_and_reused_run_seqs(tmp_path: Path) -> None:
    path = str(tmp_path / "h.db")
    now = 1_800_000_000.0
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    db = SQLiteDatabase(path)
    try:
        db.write(lambda tx: (tx.insert_run(_new_row(a, "k", "SCHEDULED", now)),
                             tx.insert_run(_new_row(b, "k", "SCHEDULED", now))))
        db.write(lambda tx: _set(tx, a, "RUNNING", now + 1, holder="w"))
    finally:
        db.close()
    db = SQLiteDatabase(path)  # a fresh cache: the row is read back, its last number looked up
    try:
        db.write(lambda tx: _set(tx, a, "COMPLETED", now + 2))
        db.write(lambda tx: _set(tx, a, "COMPLETED", now + 3))  # a new state id, a new row
        assert [s[1] for s in db.read_states(a)] == ["SCHEDULED", "RUNNING", "COMPLETED", "COMPLETED"]
        seq_b = db.read_run(b).seq  # type: ignore[union-attr]
        # b holds the largest seq: deleted, a new run takes the same seq and starts a new history
        db.write(lambda tx: _set(tx, b, "RUNNING", now + 4))
        assert db.write(lambda tx: tx.delete_run(b)) is not None
        c = str(uuid.uuid4())
        assert db.write(lambda tx: tx.insert_run(_new_row(c, "k", "SCHEDULED", now + 5))) == seq_b
        assert [s[1] for s in db.read_states(c)] == ["SCHEDULED"] and db.read_states(b) == []
        rows = db.read_all("SELECT run_seq, seq FROM task_run_states ORDER BY run_seq, seq", [])
        assert rows == [(1, 1), (1, 2), (1, 3), (1, 4), (seq_b, 1)]
    finally:
        db.close()


def test_recovery_finds_the_runs_workers_held_through_the_key_state_index(tmp_path: Path) -> None:
    path = str(tmp_path / "r.db")
    now = 1_800_000_000.0
    held = {}
    db = SQLiteDatabase(path)
    try:
        def fill(tx: Any) -> None:
            for i in range(60):
                run_id, key = str(uuid.uuid4()), f"key-{i % 3}"
                tx.insert_run(_new_row(run_id, key, "SCHEDULED", now))
                kind = ("SCHEDULED", "PENDING", "RUNNING", "COMPLETED", "FAILED")[i % 5]
                if kind != "SCHEDULED":
                    _set(tx, run_id, kind, now + 1, holder=f"w{i}")
                if kind in ("PENDING", "RUNNING"):
                    held[run_id] = (kind, f"w{i}")
        db.write(fill)
    finally:
        db.close()
    db = SQLiteDatabase(path)
    statements: list[str] = []
    db._writer_conn.set_trace_callback(statements.append)
    try:
        info = db.recover()
        db._writer_conn.set_trace_callback(None)
        assert {run_id: (kind, holder) for run_id, kind, holder in info.leased} == held and len(info.leased) == 24
        conn = db._writer_conn
        assert "ix_task_runs_active" not in _schema(conn)
        planned = [(sql, _plan(conn, sql)) for sql in statements if sql.lstrip().upper().startswith(("SELECT", "UPDATE"))]
        plans = [p for _sql, p in planned]
        leased = [p for sql, p in planned if "'PENDING', 'RUNNING'" in sql]
        assert len(leased) == 3 and all("USING INDEX ix_task_runs_key_state (task_key=? AND state_type=?)" in p
                                        for p in leased), leased
        # no statement of recovery reads the whole table
        assert not [p for p in plans if any(part.strip() == "SCAN task_runs" for part in p.split("|"))], plans
    finally:
        db.close()


def test_the_readers_of_the_history_and_of_running_runs_keep_their_plans(tmp_path: Path) -> None:
    """What the history endpoint, the delete, the dashboard's chart and the listing's state
    filter ask, as they ask it (bound values): each one a search on a key or an index."""
    db = SQLiteDatabase(str(tmp_path / "p.db"))
    try:
        conn = db._writer_conn
        assert "PRIMARY KEY (run_seq=?)" in _plan(
            conn, "SELECT state_id, type, name, timestamp, message FROM task_run_states"
                  " WHERE run_seq = (SELECT seq FROM task_runs WHERE id = ?) ORDER BY seq", ("x",))
        assert "TEMP B-TREE" not in _plan(conn, "SELECT * FROM task_run_states WHERE run_seq = ? ORDER BY seq", (1,))
        assert "PRIMARY KEY (run_seq=?)" in _plan(conn, "DELETE FROM task_run_states WHERE run_seq = ?", (1,))
        assert "ix_task_run_states_finished" in _plan(
            conn, "SELECT substr(timestamp, 1, 18) AS bucket, type, count(*) FROM task_run_states "
                  "WHERE (type = 'COMPLETED' OR type = 'FAILED' OR type = 'CRASHED') AND timestamp >= ? "
                  "GROUP BY bucket, type", ("",))
        # the listing's state filter binds its values: it never could use a partial index on
        # state_type; it counts in the (task_key, state_type) index and pages by id, as before
        assert "ix_task_runs_key_state" in _plan(conn, "SELECT count(*) FROM task_runs WHERE ((state_type IN (?, ?)))",
                                                 ("PENDING", "RUNNING"))
    finally:
        db.close()


def test_queued_runs_are_found_through_the_one_queue_index(tmp_path: Path) -> None:
    """The queue index holds the due time: a claim of due runs and recovery's runs not due yet
    (retries) read it, so no second index on ``due`` is written for every queued run."""
    path = str(tmp_path / "q.db")
    now = 1_700_000_000.0  # in the past: due
    db = SQLiteDatabase(path)
    try:
        def fill(tx: Any) -> None:
            for i in range(9):
                row = _new_row(str(uuid.uuid4()), f"key-{i % 2}", "SCHEDULED", now)
                row.qstate, row.due = 1, (4_000_000_000.0 if i % 3 == 0 else now)  # every third: later
                tx.insert_run(row)
        db.write(fill)
        plan = _plan(db._writer_conn, "SELECT seq, id FROM task_runs WHERE task_key = ? AND qstate = 1 AND due <= ?"
                                      " ORDER BY seq LIMIT ?", ("key-0", now, 10))
        assert "USING INDEX ix_task_runs_queued (task_key=?)" in plan and "TEMP B-TREE" not in plan, plan
        taken = db.write(lambda tx: tx.take_queued("key-0", now + 1, 10))
        assert len(taken) == 3 and [seq for seq, _ in taken] == sorted(seq for seq, _ in taken)
    finally:
        db.close()
    db = SQLiteDatabase(path)
    try:
        info = db.recover()
        assert sorted(info.delayed) == [(4_000_000_000.0, "key-0"), (4_000_000_000.0, "key-0"),
                                        (4_000_000_000.0, "key-1")]
        assert sorted(info.queued_keys) == ["key-0", "key-1"]
        assert db.read_all("SELECT count(*) FROM task_runs WHERE qstate = 1", [])[0][0] == 9  # taken: requeued
    finally:
        db.close()
