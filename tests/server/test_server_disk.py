"""Full disks and locked databases: a clear 507/503 over REST and the sockets, recovery by itself
when space returns (and a log line saying so), a one-line refusal to start on a full disk."""
from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
import websocket
from tests.server.conftest import Wire

from sync_worker.server import Server, database

pytestmark = pytest.mark.timeout(120)
ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
BIG = "x" * 50_000  # state data that makes each write larger than what a full WAL has left


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 3 MiB tmpfs (root only: mounting needs it)."""
    if not ROOT:
        pytest.skip("a full disk is simulated with a small tmpfs, which only root can mount")
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def create_body(wire: Wire) -> dict:
    body = wire.create_body()
    body["state"]["data"] = BIG
    return body


def rpc_create(url: str, body: dict) -> dict:
    ws = websocket.create_connection(url.replace("http", "ws") + "/sync_worker/rpc", subprotocols=["prefect"],
                                     timeout=30)
    try:
        ws.send(json.dumps({"type": "auth", "token": None}))
        ws.recv()
        ws.send(json.dumps({"type": "create", "request_id": "r", "body": body}))
        return json.loads(ws.recv())
    finally:
        ws.close()


def test_disk_full_is_507_everywhere_and_recovers_by_itself(small_disk: Path, caplog):
    caplog.set_level(logging.INFO, logger="sync_worker.server.database")
    db = small_disk / "server.db"
    server = Server(port=0, database=str(db)).start()
    wire = Wire(server.url)
    try:
        kept = wire.create()
        subscriber = wire.subscribe()
        assert subscriber.next_run()["id"] == kept["id"]
        filler = fill(small_disk)
        answers = []
        for _ in range(200):
            response = wire.http.post(server.url + "/task_runs/", json=create_body(wire), timeout=30)
            answers.append(response.status_code)
            if response.status_code == 507:
                break
            assert response.status_code == 201, response.text
        assert answers[-1] == 507, answers
        detail = response.json()["detail"]
        assert detail.startswith("disk full") and str(db) in detail
        # the sockets say the same
        reply = rpc_create(server.url, create_body(wire))
        assert reply["status_code"] == 507 and reply["detail"].startswith("disk full"), reply
        reply = subscriber.set_state(kept["id"], "RUNNING", data=BIG)
        assert reply["status_code"] == 507 and str(db) in reply["detail"], reply
        assert wire.read(kept["id"])["state"]["type"] == "SCHEDULED"  # reads still work
        # space returns: the next write succeeds, nobody restarts anything
        filler.unlink()
        freed = time.monotonic()
        while True:
            response = wire.http.post(server.url + "/task_runs/", json=wire.create_body(), timeout=30)
            if response.status_code == 201:
                break
            assert response.status_code == 507 and time.monotonic() - freed < 10, response.text
            time.sleep(0.05)
        recovered = time.monotonic() - freed
        print(f"recovered {recovered * 1000:.0f} ms after the disk was freed")
        reply = subscriber.set_state(kept["id"], "RUNNING")
        assert reply["status_code"] == 201 and reply["result"]["status"] == "ACCEPT"
        messages = [r.getMessage() for r in caplog.records]
        assert any("refused until this is fixed" in m and "disk full" in m for m in messages), messages
        assert any("writable again" in m for m in messages), messages
    finally:
        wire.close()
        server.stop()


def test_starting_on_a_full_disk_is_a_one_line_error(small_disk: Path):
    fill(small_disk)
    db = small_disk / "new.db"
    result = subprocess.run([sys.executable, "-m", "sync_worker", "server", "--port", "0", "--db", str(db)],
                            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 2  # a user-facing start error: exit 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "disk full" in lines[0] and str(db) in lines[0]


def test_a_locked_database_is_503_and_then_served_again(server_factory, monkeypatch, tmp_path: Path):
    monkeypatch.setattr(database, "BUSY_TIMEOUT", 0.5)
    server = server_factory()
    wire = Wire(server.url)
    other = sqlite3.connect(server.database, isolation_level=None, timeout=5)
    try:
        other.execute("BEGIN EXCLUSIVE")  # another program holds the write lock
        response = wire.http.post(server.url + "/task_runs/", json=wire.create_body(), timeout=30)
        assert response.status_code == 503
        assert response.json()["detail"].startswith("database locked") and server.database in response.json()["detail"]
        reply = rpc_create(server.url, wire.create_body())
        assert reply["status_code"] == 503 and "database locked" in reply["detail"]
        other.execute("ROLLBACK")
        created = wire.create()
        assert wire.read(created["id"])["id"] == created["id"]
        assert uuid.UUID(created["id"])
    finally:
        other.close()
        wire.close()


def test_writes_failing_on_and_off_are_summed_up_not_logged_one_by_one(server_factory, monkeypatch, caplog):
    """On a disk nearly full, small commits pass between big ones that fail: each outage logged
    an ERROR and a "writable again" (46-80 pairs per outage in a QA run)."""
    monkeypatch.setattr(database, "BUSY_TIMEOUT", 0.2)
    monkeypatch.setattr(database, "FLAPPING_QUIET_SECONDS", 3.0)
    caplog.set_level(logging.DEBUG, logger="sync_worker.server.database")
    server = server_factory()
    wire = Wire(server.url)
    other = sqlite3.connect(server.database, isolation_level=None, timeout=5)

    def lines() -> list[tuple[int, str]]:
        return [(r.levelno, r.getMessage()) for r in caplog.records
                if r.name == "sync_worker.server.database" and r.levelno >= logging.WARNING]

    try:
        for _ in range(5):  # five outages in a row, a success after each
            other.execute("BEGIN EXCLUSIVE")
            assert wire.http.post(server.url + "/task_runs/", json=wire.create_body(), timeout=30).status_code == 503
            other.execute("ROLLBACK")
            wire.create()
        logged = lines()
        assert [level for level, _ in logged] == [logging.ERROR, logging.WARNING, logging.WARNING], logged
        assert "refused until this is fixed" in logged[0][1] and "writable again" in logged[1][1]
        assert "failing again (on and off" in logged[2][1]
        started = time.monotonic()
        while time.monotonic() - started < 3.2:  # the quiet period passes; the next commit sums up
            time.sleep(0.1)
        wire.create()
        summary = lines()[3:]
        assert len(summary) == 1 and "writable again" in summary[0][1] and "4 more outage(s)" in summary[0][1], summary
        # a later outage is logged as a new one
        other.execute("BEGIN EXCLUSIVE")
        assert wire.http.post(server.url + "/task_runs/", json=wire.create_body(), timeout=30).status_code == 503
        other.execute("ROLLBACK")
        wire.create()
        assert [level for level, _ in lines()[4:]] == [logging.ERROR, logging.WARNING], lines()
    finally:
        other.close()
        wire.close()


def test_the_wal_is_bounded(server_factory):
    server = server_factory()
    conn = server.db._writer_conn
    assert conn.execute("PRAGMA journal_size_limit").fetchone()[0] == database.JOURNAL_SIZE_LIMIT
    wire = Wire(server.url)
    try:
        for _ in range(300):
            wire.http.post(server.url + "/task_runs/", json=create_body(wire), timeout=30)
        wal = Path(server.database + "-wal")
        # ~15 MB were written; checkpoints keep the WAL near its 1000-page autocheckpoint size
        assert wal.stat().st_size < 8 * 1024 * 1024, wal.stat().st_size
    finally:
        wire.close()
    assert requests.get(server.url + "/health", timeout=10).json() is True
