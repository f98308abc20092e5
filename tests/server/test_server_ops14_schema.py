"""A database written by the previous version (with the index ``ix_task_runs_memory``) opens
without it, and the runs that server held in memory when it stopped are queued and delivered
again: recovery now finds them through ``ix_task_runs_key_state`` (they are SCHEDULED).

The fixture ``tests/fixtures/server-db/schema-v3-memory-index.db`` was written by the server
of main at 6e6a9f6 (see the fixtures README)."""
from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from sync_worker.server.database import SCHEMA_VERSION, SQLiteDatabase
from tests.server.conftest import Wire

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "server-db" / "schema-v3-memory-index.db"
QUEUED_ADD = ["00000000-0000-4000-8000-000000000001", "00000000-0000-4000-8000-000000000002"]
QUEUED_MUL = "00000000-0000-4000-8000-000000000003"
DONE = "00000000-0000-4000-8000-000000000004"


def _indexes(path: Path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    finally:
        conn.close()


@pytest.fixture
def old_db(tmp_path: Path) -> Path:
    path = tmp_path / "old.db"
    shutil.copyfile(FIXTURE, path)
    assert "ix_task_runs_memory" in _indexes(path)
    return path


def test_the_fixture_holds_runs_the_old_server_had_in_memory(old_db: Path) -> None:
    conn = sqlite3.connect(old_db)
    try:
        rows = dict(conn.execute("SELECT id, qstate FROM task_runs WHERE state_type = 'SCHEDULED'").fetchall())
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 3 < SCHEMA_VERSION  # migrated on open
    finally:
        conn.close()
    assert rows == {QUEUED_ADD[0]: 2, QUEUED_ADD[1]: 2, QUEUED_MUL: 2}


def test_recovery_queues_the_runs_held_in_memory_again_and_drops_the_index(old_db: Path) -> None:
    db = SQLiteDatabase(str(old_db))
    try:
        info = db.recover()
        assert sorted(info.queued_keys) == ["tests.add", "tests.mul"]
        assert info.leased == [] and info.delayed == []
        qstates = dict(db.read_all("SELECT id, qstate FROM task_runs", []))
        assert qstates == {QUEUED_ADD[0]: 1, QUEUED_ADD[1]: 1, QUEUED_MUL: 1, DONE: 0}
    finally:
        db.close()
    assert "ix_task_runs_memory" not in _indexes(old_db)
    assert {"ix_task_runs_key_state", "ix_task_runs_queued"} <= _indexes(old_db)
    assert "ix_task_runs_active" not in _indexes(old_db)  # dropped at version 4 (test_server_st15_schema.py)


def test_an_old_database_serves_its_queued_runs_in_order(server_factory: Any, old_db: Path,
                                                         make_wire: Any) -> None:
    server = server_factory(database=str(old_db))
    wire: Wire = make_wire(server)
    add = wire.subscribe(["tests.add"], client_id="ops14-add")
    got = [add.next_run(timeout=15)["id"]]
    add.ack()
    got.append(add.next_run(timeout=15)["id"])
    assert got == QUEUED_ADD
    mul = wire.subscribe(["tests.mul"], client_id="ops14-mul")
    assert mul.next_run(timeout=15)["id"] == QUEUED_MUL
    assert wire.read(DONE)["state"]["type"] == "COMPLETED"
    # a new run of the old file's key is queued behind nothing and delivered too
    new = wire.create("tests.mul")
    mul.ack()
    assert mul.next_run(timeout=15)["id"] == new["id"]


def test_a_restart_of_this_version_requeues_its_runs_in_memory(server_factory: Any, tmp_path: Path,
                                                              make_wire: Any) -> None:
    path = tmp_path / "restart.db"
    server = server_factory(database=str(path))
    wire: Wire = make_wire(server)
    runs = [wire.create("tests.add")["id"] for _ in range(3)]
    conn = sqlite3.connect(path)
    try:
        assert {r[0] for r in conn.execute("SELECT qstate FROM task_runs")} == {2}  # buffered in memory
    finally:
        conn.close()
    server.stop()
    assert "ix_task_runs_memory" not in _indexes(path)

    server = server_factory(database=str(path))
    wire = make_wire(server)
    subscriber = wire.subscribe(["tests.add"], client_id="ops14-restart")
    got = []
    for _ in runs:
        got.append(subscriber.next_run(timeout=15)["id"])
        subscriber.ack()
    assert got == runs
