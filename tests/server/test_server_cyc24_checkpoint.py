"""Checkpoints of the WAL in the checkpointer thread, not in the commits (database.py,
``SQLiteDatabase._checkpoint_loop``): no commit runs SQLite's automatic checkpoint, the WAL stays
bounded under steady commits (its last pass takes the committer's turn, so the WAL starts again
from its beginning), SQLite's own checkpoint far above it bounds the WAL when the thread gets no
turn, writes from several threads all commit while checkpoints come and go, and closing the
database ends the thread."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from sync_worker.server import database
from sync_worker.server.database import SQLiteDatabase
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(120)


def _wal_size(path: Path) -> int:
    wal = Path(str(path) + "-wal")
    return wal.stat().st_size if wal.exists() else 0


def test_commits_do_not_checkpoint_and_the_wal_stays_bounded(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    db = SQLiteDatabase(str(path))
    try:
        assert db._writer_conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == database.WAL_BOUND_PAGES
        # SQLite's automatic checkpoint (in the commit that crosses 1000 pages) is only a far
        # bound on the writer's connection (asserted above); here it is off, so that the
        # checkpointer thread alone keeps the WAL bounded
        db._writer_conn.execute("PRAGMA wal_autocheckpoint=0")
        assert db._checkpointer is not None and db._checkpointer.is_alive()
        blob = b"y" * 3000  # one page at least per commit: 5,000 commits write > 20 MB of WAL frames
        last_passes = 0
        for i in range(5000):
            db.write(lambda tx, i=i: tx.put_record(f"r{i % 50}", blob))
            if i % 500 == 499:
                # The thread runs beside the commits, which go at ~14,000/s here: a host that
                # leaves it without a turn for 0.2 s lets 3,000 commits pile up in the WAL (one
                # CI run: 65.8 MB). Commits wait for it here every 500 (each 500 ask for a
                # checkpoint at least once, CHECKPOINT_BYTES), so what is measured is whether
                # its last pass lets the WAL start again, not how the host schedules threads;
                # test_the_far_bound_holds_when_the_checkpointer_gets_no_turn covers the rest.
                wait_for(lambda seen=last_passes: db._tail_passes > seen, timeout=30, interval=0.001,
                         message="a last pass in the committer's turn")
                last_passes = db._tail_passes
        # bounded (without the committer's turn for the last pass, the WAL never started again
        # from its beginning: > 100 MB here; 8-20 MB measured with it)
        assert _wal_size(path) < 48 * 1024 * 1024, _wal_size(path)
        assert db.read_record("r7") == blob
    finally:
        db.close()


def test_the_far_bound_holds_when_the_checkpointer_gets_no_turn(tmp_path: Path) -> None:
    """A checkpointer thread the host never schedules (or a disk whose syncs take seconds):
    SQLite's own checkpoint at WAL_BOUND_PAGES, on the writer's connection as shipped, still
    keeps the WAL bounded."""
    path = tmp_path / "runs.db"
    db = SQLiteDatabase(str(path))
    asked = db._checkpoint_wanted
    db._checkpoint_wanted = threading.Event()  # requests the thread never sees
    try:
        blob = b"y" * 3000
        for i in range(5000):
            db.write(lambda tx, i=i: tx.put_record(f"r{i % 50}", blob))
        assert db._checkpoint_wanted.is_set(), "the commits asked for checkpoints"
        assert db._tail_passes == 0
        # 4,000 pages of 4 KiB and the commit that crossed them (> 100 MB without the bound)
        assert _wal_size(path) < 48 * 1024 * 1024, _wal_size(path)
        assert db.read_record("r7") == blob
    finally:
        db._checkpoint_wanted = asked
        db.close()
    assert not db._checkpointer.is_alive()


def test_writes_from_threads_all_commit_while_checkpoints_take_turns(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(database, "CHECKPOINT_OPS", 20)  # many checkpoints, many turns taken
    path = tmp_path / "runs.db"
    db = SQLiteDatabase(str(path))
    errors: list[BaseException] = []
    done = threading.Semaphore(0)

    def writer(name: str) -> None:
        try:
            for i in range(600):
                if i % 3:
                    db.write(lambda tx, i=i: tx.put_record(f"{name}-{i}", b"z" * 2000))
                else:  # submitted without waiting, committed by whoever leads
                    db.submit(lambda tx, i=i: tx.put_record(f"{name}-{i}", b"z" * 2000),
                              lambda result, error: errors.append(error) if error else None, inline=i % 2 == 0)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            done.release()

    threads = [threading.Thread(target=writer, args=(f"t{n}",), daemon=True) for n in range(4)]
    try:
        for thread in threads:
            thread.start()
        for _ in threads:
            assert done.acquire(timeout=60), "a write never committed (a turn not handed back?)"
        db.write(lambda tx: None)  # queued after every submitted one: they are committed now
        assert not errors, errors[:3]
        missing = [f"t{n}-{i}" for n in range(4) for i in range(600) if db.read_record(f"t{n}-{i}") is None]
        assert not missing, missing[:5]
    finally:
        db.close()
    assert db._checkpointer is not None
    assert not db._checkpointer.is_alive()


def test_close_ends_the_checkpointer_and_leaves_the_wal_checkpointed(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    db = SQLiteDatabase(str(path))
    for i in range(400):  # a checkpoint asked for (CHECKPOINT_OPS) and more commits after it
        db.write(lambda tx, i=i: tx.put_record(f"r{i}", b"w" * 500))
    db.close()
    assert db._checkpointer is not None and not db._checkpointer.is_alive()
    reopened = SQLiteDatabase(str(path))
    try:
        assert reopened.read_record("r399") == b"w" * 500
    finally:
        reopened.close()


def _row(run_id: str) -> database.RunRow:
    run = {"id": run_id, "task_key": "k", "state": {"id": run_id + "-s1", "type": "SCHEDULED", "name": "Scheduled",
                                                     "timestamp": "2026-01-01T00:00:00.000000Z"}}
    return database.RunRow(id=run_id, task_key="k", state_type="SCHEDULED", run=run)


def test_a_finished_run_leaves_the_run_cache_before_the_runs_still_queued(tmp_path: Path) -> None:
    """When more runs wait than the cache holds (the 10 ms case's backlog), the least recently
    used run is the next one to claim: a finished run goes first instead, so that claims find
    their runs in memory (a miss costs a read, a JSON parse and a history seek)."""
    db = SQLiteDatabase(str(tmp_path / "runs.db"), cache_size=3)
    try:
        for run_id in ("a", "b", "c"):
            db.write(lambda tx, run_id=run_id: tx.insert_run(_row(run_id)))

        def finish(tx: database.Transaction) -> None:
            row = tx.get_run("a")
            assert row is not None
            row.run["state"] = {"id": "a-s2", "type": "COMPLETED", "name": "Completed",
                                "timestamp": "2026-01-01T00:00:01.000000Z"}
            row.state_type = "COMPLETED"
            row.touch()
            tx.update_run(row)

        db.write(finish)
        db.write(lambda tx: tx.insert_run(_row("d")))
        assert list(db._cache) == ["b", "c", "d"]  # "a" (finished) went, not "b" (queued, the oldest)
        # a finished run read again is still found, from the database
        assert db.write(lambda tx: tx.get_run("a")).state_type == "COMPLETED"
        assert db.read_states("a")[-1][1] == "COMPLETED"
    finally:
        db.close()


def test_a_run_finished_after_the_cache_evicted_it_in_the_same_transaction_is_written(tmp_path: Path) -> None:
    """An operation that reads more runs than the cache holds (a bulk change) may finish a run
    the cache has evicted meanwhile: it is written like any other, not refused by the cache."""
    db = SQLiteDatabase(str(tmp_path / "runs.db"), cache_size=2)
    try:
        for run_id in ("a", "b", "c"):
            db.write(lambda tx, run_id=run_id: tx.insert_run(_row(run_id)))

        def finish_all(tx: database.Transaction) -> None:
            rows = [tx.get_run(run_id) for run_id in ("a", "b", "c")]  # "a" evicted by "c"
            for row in rows:
                assert row is not None
                row.run["state"] = {"id": row.id + "-s2", "type": "COMPLETED", "name": "Completed",
                                    "timestamp": "2026-01-01T00:00:01.000000Z"}
                row.run["state_id"] = row.id + "-s2"
                row.state_type = "COMPLETED"
                row.touch()
                tx.update_run(row)

        db.write(finish_all)
        for run_id in ("a", "b", "c"):
            found = db.read_run_text(run_id)
            assert found is not None and found[1] == "COMPLETED"
            assert db.read_states(run_id)[-1][1] == "COMPLETED"
    finally:
        db.close()
