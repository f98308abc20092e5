"""The final states' index of the state history tests its rows with ORs
(``ix_task_run_states_finished``), not with ``type IN ('COMPLETED', 'FAILED', 'CRASHED')``
(``ix_task_run_states_final``): SQLite evaluates an IN list of three values through a temporary
b-tree it builds for every row written, i.e. for every state a run enters.

The fixture ``tests/fixtures/server-db/schema-v4-final-index.db`` was written by the server of
main at 4458740 (schema version 4, with the old index; see the fixtures README)."""
from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

from sync_worker.server.dashboard import throughput
from sync_worker.server.database import _INSERT_STATE, SCHEMA_VERSION, SQLiteDatabase
from sync_worker.server.models import parse_time

FIXTURE_V4 = Path(__file__).resolve().parent.parent / "fixtures" / "server-db" / "schema-v4-final-index.db"
HISTORY = "SELECT run_seq, seq, state_id, type, name, timestamp, message FROM task_run_states ORDER BY run_seq, seq"
OLD_INDEX = ("CREATE INDEX IF NOT EXISTS ix_task_run_states_final ON task_run_states (timestamp)"
             " WHERE type IN ('COMPLETED', 'FAILED', 'CRASHED')")
FINISHED = ("SELECT count(*) FROM task_run_states INDEXED BY ix_task_run_states_finished"
            " WHERE (type = 'COMPLETED' OR type = 'FAILED' OR type = 'CRASHED') AND timestamp >= ''")


def _indexes(conn: sqlite3.Connection) -> dict[str, str]:
    return {name: sql or "" for name, sql in conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'")}


def _copy(tmp_path: Path) -> Path:
    path = tmp_path / "v4.db"
    shutil.copyfile(FIXTURE_V4, path)
    return path


def test_a_version_4_file_gets_the_new_index_with_its_history_and_version_unchanged(tmp_path: Path) -> None:
    path = _copy(tmp_path)
    conn = sqlite3.connect(str(path))
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 4
    assert "ix_task_run_states_final" in _indexes(conn)
    before = conn.execute(HISTORY).fetchall()
    conn.close()
    # the fixture: 4 runs; one SCHEDULED, then COMPLETED, FAILED and CRASHED after RUNNING
    assert [r[3] for r in before if r[3] not in ("SCHEDULED", "RUNNING")] == ["COMPLETED", "FAILED", "CRASHED"]

    SQLiteDatabase(str(path)).close()

    conn = sqlite3.connect(str(path))
    try:
        indexes = _indexes(conn)
        assert "ix_task_run_states_final" not in indexes
        assert indexes["ix_task_run_states_finished"].endswith(
            "WHERE type = 'COMPLETED' OR type = 'FAILED' OR type = 'CRASHED'")
        # an index change only: an earlier server (version 4) still opens the file
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
        assert conn.execute(HISTORY).fetchall() == before
        assert conn.execute(FINISHED).fetchone()[0] == 3  # built from the existing rows
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


def test_the_dashboard_counts_the_same_final_states_through_the_new_index(tmp_path: Path) -> None:
    path = _copy(tmp_path)
    db = SQLiteDatabase(str(path))
    try:
        last = max(parse_time(ts, []) for (ts,) in db.read_all("SELECT timestamp FROM task_run_states", ()))
        chart = throughput(db, last)
        assert (sum(chart["completed"]), sum(chart["failed"])) == (1, 2)  # FAILED and CRASHED count as failed
        plan = " | ".join(r[3] for r in db._writer_conn.execute(
            "EXPLAIN QUERY PLAN SELECT substr(timestamp, 1, 18) AS bucket, type, count(*) FROM task_run_states "
            "WHERE (type = 'COMPLETED' OR type = 'FAILED' OR type = 'CRASHED') AND timestamp >= ? "
            "GROUP BY bucket, type", ("",)))
        assert "ix_task_run_states_finished" in plan
    finally:
        db.close()


def test_writing_a_state_builds_no_temporary_table(tmp_path: Path) -> None:
    """The point of the change: the statement that records each state opens no ephemeral
    b-tree (it did, for the IN list of the old index's WHERE)."""
    db = SQLiteDatabase(str(tmp_path / "n.db"))
    try:
        conn = db._writer_conn
        program = [op for _addr, op, *_ in conn.execute("EXPLAIN " + _INSERT_STATE, (1, 1, "s", "COMPLETED", None, "", None))]
        assert "OpenEphemeral" not in program and "IdxInsert" in program
        conn.execute(OLD_INDEX)  # as an earlier version would: the same statement opens one again
        program = [op for _addr, op, *_ in conn.execute("EXPLAIN " + _INSERT_STATE, (1, 1, "s", "COMPLETED", None, "", None))]
        assert "OpenEphemeral" in program
    finally:
        db.close()


def test_a_file_an_earlier_version_reopened_loses_the_old_index_again(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    SQLiteDatabase(str(path)).close()
    conn = sqlite3.connect(str(path))
    conn.execute(OLD_INDEX)  # what an earlier version's schema does when it opens the file
    conn.commit()
    conn.close()

    SQLiteDatabase(str(path)).close()

    conn = sqlite3.connect(str(path))
    try:
        indexes = _indexes(conn)
        assert "ix_task_run_states_final" not in indexes and "ix_task_run_states_finished" in indexes
    finally:
        conn.close()
