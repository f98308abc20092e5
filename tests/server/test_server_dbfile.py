"""Database files: the server marks its own and refuses, with one line naming the file and what
is wrong, anything it should not write to."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from sync_worker.server import Server
from sync_worker.server.database import APPLICATION_ID, SCHEMA_VERSION, DatabaseFileError

pytestmark = pytest.mark.timeout(60)
ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


def start_cli(db: str) -> subprocess.CompletedProcess:
    """``sync-worker server --db DB`` as a user runs it; it must exit at once."""
    return subprocess.run([sys.executable, "-m", "sync_worker", "server", "--port", "0", "--db", db],
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)


def assert_one_line_refusal(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)  # a user mistake: exit 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_a_file_that_is_not_sqlite_is_refused(tmp_path: Path):
    db = tmp_path / "notes.txt"
    db.write_text("my notes, not a database\n" * 10)
    assert_one_line_refusal(start_cli(str(db)), str(db), "is not an SQLite database")
    assert db.read_text().startswith("my notes")  # untouched


def test_a_corrupted_database_is_refused(tmp_path: Path):
    db = tmp_path / "server.db"
    db.write_bytes(b"SQLite format 3\x00" + os.urandom(8192))
    assert_one_line_refusal(start_cli(str(db)), str(db), "corrupted")


def test_a_directory_is_refused(tmp_path: Path):
    assert_one_line_refusal(start_cli(str(tmp_path)), str(tmp_path), "is a directory")


def test_an_explicit_db_in_a_missing_directory_is_refused(tmp_path: Path):
    db = tmp_path / "nope" / "server.db"
    assert_one_line_refusal(start_cli(str(db)), str(db), f"directory {tmp_path / 'nope'} does not exist")
    assert not (tmp_path / "nope").exists()


def test_another_applications_database_is_refused_and_left_unchanged(tmp_path: Path):
    db = tmp_path / "app.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    conn.commit()
    conn.close()
    assert_one_line_refusal(start_cli(str(db)), str(db), "belongs to another application (tables: users)")
    conn = sqlite3.connect(db)
    assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")] == ["users"]
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # not switched to WAL
    conn.close()


def test_a_database_marked_by_another_application_is_refused(tmp_path: Path):
    db = tmp_path / "other.db"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA application_id=1234")
    conn.execute("CREATE TABLE task_runs (x)")
    conn.commit()
    conn.close()
    with pytest.raises(DatabaseFileError, match="application_id 0x4d2"):
        Server(port=0, database=str(db)).start()


def test_a_newer_schema_is_refused(tmp_path: Path):
    db = tmp_path / "server.db"
    Server(port=0, database=str(db)).start().stop()
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(DatabaseFileError, match=f"schema version {SCHEMA_VERSION + 1}, made by a newer"):
        Server(port=0, database=str(db)).start()


def test_databases_are_marked_and_earlier_unmarked_ones_adopted(tmp_path: Path):
    db = tmp_path / "server.db"
    Server(port=0, database=str(db)).start().stop()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    # a database made before the mark existed: our tables, application_id 0
    conn.execute("PRAGMA application_id=0")
    conn.execute("PRAGMA user_version=0")
    conn.close()
    Server(port=0, database=str(db)).start().stop()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    conn.close()


def test_the_default_location_is_created(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    server = Server(port=0)
    assert server.database == str(tmp_path / ".sync_worker" / "server.db")
    server.start().stop()
    assert (tmp_path / ".sync_worker" / "server.db").exists()


@pytest.fixture
def readonly_db(tmp_path: Path):
    """A database the server may not write: a read-only mount when root (root writes 0444
    files), else a 0444 file."""
    if not ROOT:
        db = tmp_path / "server.db"
        Server(port=0, database=str(db)).start().stop()
        db.chmod(0o444)
        yield db, "read-only"
        db.chmod(0o644)
        return
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        db = mount / "server.db"
        Server(port=0, database=str(db)).start().stop()
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        yield db, "read-only file system"
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def test_a_read_only_database_is_refused(readonly_db):
    db, what = readonly_db
    assert_one_line_refusal(start_cli(str(db)), str(db), what)


def test_a_database_damaged_past_its_header_is_refused(tmp_path: Path):
    """Its header is fine, so it opens; the pages the start-up reads are not (the queue's
    rebuild read them with a traceback)."""
    db = tmp_path / "server.db"
    server = Server(host="127.0.0.1", port=0, database=str(db)).start()
    try:
        from sync_worker.client import Client
        from sync_worker.schemas import Scheduled, task_run_create

        client = Client(server.url)
        for i in range(200):
            client.create_task_run(task_run_create(name="t", task_key=f"k{i % 7}", state=Scheduled(),
                                                   empirical_policy={}, tags=["x" * 100]))
        client.close()
    finally:
        server.stop()
    with open(db, "r+b") as handle:
        handle.seek(8192)
        handle.write(b"\xff" * 8192)
    assert_one_line_refusal(start_cli(str(db)), str(db), "corrupted or unreadable")
