"""Storage of the embedded server: a small interface and its SQLite backend.

Why an interface: the server needs only a handful of operations (insert/read/update/delete a
run, list the queued runs of a key, records for the storage endpoint), so a PostgreSQL backend
can implement the same :class:`Database`/:class:`Transaction` pair later without touching the
HTTP, websocket or orchestration code.

Why one writer at a time: SQLite allows one writer at a time. Every write goes through
:meth:`Database.write`/:meth:`Database.submit`, which hand an operation (a function of a
:class:`Transaction`) to the single committer: the calling thread itself when nothing is
being committed, else the writer thread once the current batch is done. The committer drains
everything that is waiting and runs it in ONE transaction ("group commit"); an operation that fails has written nothing (see
:class:`Transaction`) and does not affect its neighbours. Callers wait for the
COMMIT, so a 201/ACCEPT is only returned for data that is in the database. Under load the cost
of a commit is shared by all operations in the batch.

Because all read-modify-write logic (orchestration) runs *inside* the writer, operations on a
run are serialized: two workers racing to claim the same run cannot both win.

Durability: WAL journal mode with ``synchronous=NORMAL`` (default) survives a crash of the
server process (committed transactions are in the WAL file); an OS crash or power loss may
lose the last transactions. ``synchronous=FULL`` also survives power loss at the cost of one
fsync per group commit.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import queue
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .. import jsoncodec
from .models import TERMINAL

logger = logging.getLogger("sync_worker.server.database")

# Values of the ``qstate`` column: where a queued run currently is.
QSTATE_NONE = 0  # not queued (not SCHEDULED, or not a background run)
QSTATE_DB = 1  # queued, waiting in the database (not loaded into memory yet, or not due)
QSTATE_MEMORY = 2  # queued and loaded into the server's in-memory buffer, or delivered
# A run's qstate is QSTATE_NONE unless it is SCHEDULED: every change out of SCHEDULED sets it
# (recovery relies on it to find the runs of QSTATE_MEMORY without an index of their own).


_UPDATE_RUN = "UPDATE task_runs SET state_type = ?, qstate = ?, due = ?, deliveries = ?, data = ?, holder = ?"
_UPDATE_RUN_BY_SEQ = _UPDATE_RUN + " WHERE seq = ?"
_UPDATE_RUN_BY_ID = _UPDATE_RUN + " WHERE id = ?"


class DatabaseClosed(RuntimeError):
    """The database was closed (the server is stopping)."""


class DatabaseInUse(RuntimeError):
    """Another server already serves this database file."""


class DatabaseFileError(RuntimeError):
    """The database file cannot be used (not SQLite, corrupted, a directory, read-only,
    another application's, a newer schema, a missing directory, a full disk at start-up).
    The message is one line that names the file and what is wrong."""


class StorageError(RuntimeError):
    """A write or read the database refused for a reason outside the request: the disk is full
    (``status`` 507) or the database is locked by another process (503). ``detail`` says
    which, with the path, as REST and the sockets answer it."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


#: ``PRAGMA application_id`` of our databases ("SyWk"): tells them apart from other SQLite files
APPLICATION_ID = 0x5379576B
#: ``PRAGMA user_version``: the schema version, so that a later release can migrate
SCHEMA_VERSION = 4
# Schema history: 1 = task_runs + records; 2 = + task_run_states (every state a run entered,
# written in the transaction of the state change; a version-1 database is migrated on open and
# its runs' current states seed their history); 3 = task_run_states keyed by the run's integer
# ``seq`` instead of its text id (a version-2 history is copied over on open); 4 = task_run_states
# ``WITHOUT ROWID``, its rows stored in the order of their key (run_seq, seq): one b-tree instead
# of a table plus an index on (run_seq, seq), so about one page less written per run (a version-3
# history is copied over on open, in one transaction). A server of an earlier version refuses a
# version-4 file ("made by a newer sync_worker"), as it refuses any newer version: going back
# means restoring a copy of the file from before the upgrade.
#: seconds a write waits for a lock held by another process before answering "database locked"
BUSY_TIMEOUT = 5.0
#: after an outage of writes ends, a new one within this many seconds is counted and summed up
#: once, not logged line by line: on a disk nearly full, small commits pass between big ones
#: that fail, and each outage logged an ERROR and a "writable again" (46-80 pairs per outage)
FLAPPING_QUIET_SECONDS = 60.0
#: the WAL file is truncated back to this size after checkpoints
JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024
#: operations committed between two checkpoints of the WAL into the database (by the
#: checkpointer thread, :meth:`SQLiteDatabase._checkpoint_loop`): a slot cycle's commit (a final
#: state and a claim, ~7 pages) is 2 operations, so about 1,750 pages in the 10 ms case, and
#: fewer in a drain, whose commits carry several operations each (SQLite's own default is
#: 1,000 pages per checkpoint). Each checkpoint has a fixed cost (its passes walk the WAL index,
#: the last one syncs twice): at 150 operations the drain lost 0.90x (0.81-1.07) of its runs/s
#: and the server spent 0.27 instead of 0.22 ms of CPU per run; at 500, 1.00x (0.88-1.16) and
#: the same CPU, the 10 ms case 91 % of ideal in both against 88-89 % without the thread
#: (compare.py --cases drain,short --rounds 7, interleaved, 2026-12-01) ...
CHECKPOINT_OPS = 500
#: ... or run and record bytes written between two checkpoints (large runs and records: their
#: pages, not their count, fill the WAL)
CHECKPOINT_BYTES = 1024 * 1024
#: WAL frames past which a commit checkpoints itself (SQLite's automatic checkpoint), a bound
#: for writes faster than the checkpointer thread's passes; far above where that thread
#: checkpoints (:data:`CHECKPOINT_OPS`), so not reached by steady traffic
WAL_BOUND_PAGES = 4000
#: checkpoint passes beside the commits before the last one in the committer's turn (see
#: :meth:`SQLiteDatabase._checkpoint_loop`)
CHECKPOINT_PASSES = 3
#: a pass that found at most this many frames more than the one before ends the passes
CHECKPOINT_TAIL_FRAMES = 64
_SQLITE_MAGIC = b"SQLite format 3\x00"
_OUR_TABLES = {"task_runs", "records", "task_run_states"}


def storage_error(exc: BaseException, path: str) -> BaseException:
    """A sqlite3 error -> :class:`StorageError` when it is about the disk or a lock (else ``exc``)."""
    if not isinstance(exc, sqlite3.Error):
        return exc
    text = str(exc).lower()
    if "full" in text or getattr(exc, "sqlite_errorcode", None) == 13:  # SQLITE_FULL
        return StorageError(507, f"disk full: cannot write to the database {path} ({exc}); free some space")
    if "locked" in text or "busy" in text:
        return StorageError(503, f"database locked: {path} is locked by another process ({exc}); retry later")
    if "readonly" in text or "read-only" in text:
        return StorageError(503, f"database read-only: cannot write to {path} ({exc})")
    if "disk i/o" in text:
        return StorageError(503, f"disk I/O error on the database {path} ({exc})")
    return exc


def check_database_file(path: str) -> None:
    """Refuse, with one line, what is not (or cannot become) one of our databases, before
    SQLite touches it (it would happily add our tables to any SQLite file)."""
    if os.path.isdir(path):
        raise DatabaseFileError(f"database {path} is a directory, not a database file")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise DatabaseFileError(f"cannot create the database {path}: directory {directory} does not exist")
    if not os.path.exists(path):
        if not os.access(directory, os.W_OK):
            raise DatabaseFileError(f"cannot create the database {path}: directory {directory} is not writable")
        return
    try:
        with open(path, "r+b") as f:  # r+: a read-only file is refused here, not at the first write
            head = f.read(len(_SQLITE_MAGIC))
    except PermissionError:
        raise DatabaseFileError(f"database {path} is read-only (the server needs to write to it)") from None
    except OSError as exc:
        if exc.errno == errno.EROFS:
            raise DatabaseFileError(f"database {path} is on a read-only file system") from None
        raise DatabaseFileError(f"cannot open the database {path}: {exc.strerror or exc}") from None
    if head and head != _SQLITE_MAGIC:
        raise DatabaseFileError(f"{path} is not an SQLite database (it starts with {head[:16]!r}); "
                                "point --db at another file")


#: compact JSON text of a value (``json.dumps(value, separators=(",", ":"))``'s values; the
#: text itself may differ with orjson, see :mod:`sync_worker.jsoncodec`)
dumps = jsoncodec.dumps
#: orjson encodes a whole run (~2 us) faster than a copy without its state plus the state's
#: cached text; the stdlib's encoder (~30 us) does not, and there the state's text is reused
_ENCODE_WHOLE = jsoncodec.BACKEND == "orjson"


@dataclass
class RunRow:
    """One task run as stored: the TaskRun JSON plus the queue bookkeeping columns."""

    id: str
    task_key: str
    state_type: str
    run: dict[str, Any]
    qstate: int = QSTATE_NONE
    due: float = 0.0
    deliveries: int = 0
    background: bool = False
    seq: int | None = None
    holder: str | None = None  # client_id of the worker that claimed it over its socket
    data: str | None = field(default=None, repr=False)  # JSON text of ``run`` when current
    #: id of the last state written to the state history (a new ``state_id`` adds a row)
    recorded_state_id: str | None = field(default=None, repr=False)
    #: ``seq`` of the run's last row of state history (None: not known yet, read when needed)
    history_seq: int | None = field(default=None, repr=False)
    _state: Any = field(default=None, repr=False)  # the state dict ``_state_text`` was made from
    _state_text: str = field(default="", repr=False)

    def state_json(self) -> str:
        """JSON text of the current state (serialized once: it goes into the stored run and
        into the orchestration result)."""
        state = self.run.get("state")
        if state is not self._state:
            self._state = state
            self._state_text = dumps(state)
        return self._state_text

    def dump(self) -> str:
        """The TaskRun JSON text (cached until the row is modified via :meth:`touch`)."""
        if self.data is None:
            run = self.run
            if _ENCODE_WHOLE and next(reversed(run), None) == "state":  # state last: the same text
                self.data = dumps(run)
            else:
                rest = dumps({k: v for k, v in run.items() if k != "state"})
                self.data = f'{rest[:-1]},"state":{self.state_json()}}}'
        return self.data

    def touch(self) -> None:
        """Forget the cached JSON text after ``run`` was modified."""
        self.data = None


class Transaction(ABC):
    """What one write operation may do. Only valid inside the writer thread.

    Contract of an operation: it validates and decides first and writes last, so that when it
    raises, it has written nothing (a failing statement changes nothing in SQLite). This
    spares a SAVEPOINT per operation; other operations of the same group commit are unaffected.
    """

    @abstractmethod
    def get_run(self, run_id: str) -> RunRow | None:
        """The run with this id, or None."""

    @abstractmethod
    def insert_run(self, row: RunRow) -> int:
        """Insert a new run; returns its sequence number (creation order)."""

    @abstractmethod
    def update_run(self, row: RunRow) -> None:
        """Write back a run read with :meth:`get_run` and modified."""

    @abstractmethod
    def delete_run(self, run_id: str) -> RunRow | None:
        """Delete a run; returns what was deleted, or None if it did not exist."""

    @abstractmethod
    def take_queued(self, task_key: str, now: float, limit: int) -> list[tuple[int, str]]:
        """Up to ``limit`` due runs of ``task_key`` waiting in the database, oldest first,
        moved to ``QSTATE_MEMORY``. Returns (seq, id) pairs."""

    @abstractmethod
    def put_record(self, key: str, data: bytes) -> None:
        """Store a blob for the storage endpoint."""

    @abstractmethod
    def delete_record(self, key: str) -> bool:
        """Delete a blob; False if there was none."""

    @abstractmethod
    def get_record(self, key: str) -> bytes | None:
        """A blob as this transaction sees it (None if there is none)."""

    def after_commit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in the writer thread once this operation's writes are committed."""
        self._hooks.append(fn)

    _hooks: list[Callable[[], None]]


@dataclass
class RecoveryInfo:
    """What the server must rebuild in memory when it starts on an existing database."""

    queued_keys: list[str]  # keys with runs waiting in the database
    delayed: list[tuple[float, str]]  # (due, task_key) of queued runs not due yet
    leased: list[tuple[str, str, str | None]]  # (id, state_type, holder) of PENDING/RUNNING runs


class Database(ABC):
    """The storage interface used by the server."""

    @abstractmethod
    def write(self, op: Callable[[Transaction], Any]) -> Any:
        """Run ``op`` in a write transaction, wait for the commit, return its result
        (or raise its exception)."""

    @abstractmethod
    def submit(self, op: Callable[[Transaction], Any],
               callback: Callable[[Any, BaseException | None], None] | None = None,
               inline: bool = False) -> None:
        """Like :meth:`write` without waiting for other writers; ``callback(result, error)`` is
        called after the commit, by the committing thread (this one only if ``inline``)."""

    @contextmanager
    def gathering(self) -> Iterator[None]:
        """Operations this thread submits (:meth:`submit`) inside the block may be held back and
        queued together at its end (committed together when nobody else commits). This
        default gathers nothing."""
        yield

    @abstractmethod
    def read_run(self, run_id: str) -> RunRow | None:
        """A committed snapshot of a run (any thread)."""

    @abstractmethod
    def read_record(self, key: str) -> bytes | None:
        """A stored blob, or None."""

    @abstractmethod
    def recover(self) -> RecoveryInfo:
        """Prepare the database after a (re)start and say what to rebuild in memory."""

    @abstractmethod
    def close(self) -> None:
        """Finish pending writes and close."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS task_runs (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    task_key TEXT NOT NULL,
    state_type TEXT NOT NULL,
    qstate INTEGER NOT NULL DEFAULT 0,
    due REAL NOT NULL DEFAULT 0,
    deliveries INTEGER NOT NULL DEFAULT 0,
    background INTEGER NOT NULL DEFAULT 0,
    data TEXT NOT NULL,
    holder TEXT
);
-- the queue: runs waiting in the database, per key in creation order, with their due time. It
-- also finds the queued runs not due yet (retries) at start-up, by a scan of the queue: version 3
-- had an index of its own for them, (due) WHERE qstate = 1, written for every queued run
DROP INDEX IF EXISTS ix_task_runs_due;
DROP INDEX IF EXISTS ix_task_runs_queue;
CREATE INDEX IF NOT EXISTS ix_task_runs_queued ON task_runs (task_key, seq, due) WHERE qstate = 1;
-- runs loaded in memory (qstate = 2) are found at start-up through ix_task_runs_key_state
-- (they are SCHEDULED): their own index, written at nearly every create and claim, cost a page
-- write in most commits. Databases of earlier versions lose it here, and an earlier version that
-- opens the file again simply builds it again.
DROP INDEX IF EXISTS ix_task_runs_memory;
-- the runs a worker held when the server stopped (PENDING, RUNNING) are found at start-up through
-- ix_task_runs_key_state too, key by key: their own index was written at every claim and final
-- state, and no other query used it (the listing's state filters bind their values, which a
-- partial index cannot match). Dropped from version-3 files on open (version 4).
DROP INDEX IF EXISTS ix_task_runs_active;
-- state history: one small row per state a run entered (deleted with the run), keyed by the
-- run's integer seq and the row's number among the run's states (1, 2, ...: a run's rows are
-- numbered in the order they were written, with gaps after a migration). WITHOUT ROWID: the
-- rows are the b-tree of their key, so a state costs one b-tree insert (a rowid table needed a
-- second one, into an index on (run_seq, seq)). New runs' rows land at the end.
CREATE TABLE IF NOT EXISTS task_run_states (
    run_seq INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    state_id TEXT NOT NULL,
    type TEXT NOT NULL,
    name TEXT,
    timestamp TEXT NOT NULL,
    message TEXT,
    PRIMARY KEY (run_seq, seq)
) WITHOUT ROWID;
-- the dashboard (dashboard.py): runs by key and state, and the runs finished per 10 s. The
-- final states' index tests its rows with ORs, not "type IN ('COMPLETED', 'FAILED', 'CRASHED')"
-- as ix_task_run_states_final did: SQLite evaluates an IN list of three or more values through a
-- temporary b-tree it builds for each row written (three per run: 740k -> 647k instructions per
-- run in benchmarks/server_ops.py --instructions' drain, -12.6 %), and the ORs through three
-- comparisons. The same rows, and the dashboard's query names the same ORs so that it keeps using
-- it. Files of earlier versions lose the old index here (an earlier version that opens the file
-- again builds it again, beside this one: both are correct, and this version drops it again).
CREATE INDEX IF NOT EXISTS ix_task_runs_key_state ON task_runs (task_key, state_type);
DROP INDEX IF EXISTS ix_task_run_states_final;
CREATE INDEX IF NOT EXISTS ix_task_run_states_finished ON task_run_states (timestamp)
    WHERE type = 'COMPLETED' OR type = 'FAILED' OR type = 'CRASHED';
CREATE TABLE IF NOT EXISTS records (
    key TEXT PRIMARY KEY,
    data BLOB NOT NULL
);
"""

_COLUMNS = "seq, id, task_key, state_type, qstate, due, deliveries, background, data, holder"


def _row(values: tuple[Any, ...]) -> RunRow:
    seq, run_id, task_key, state_type, qstate, due, deliveries, background, data, holder = values
    run = jsoncodec.loads(data)
    # the stored state is already in the history (written with it, or seeded by the migration)
    return RunRow(id=run_id, task_key=task_key, state_type=state_type, run=run,
                  qstate=qstate, due=due, deliveries=deliveries, background=bool(background),
                  seq=seq, data=data, holder=holder, recorded_state_id=run.get("state_id"))


class _Gathering:
    """:meth:`SQLiteDatabase.gathering`'s block (one object per database; the state is the
    thread's: ``ops`` the operations gathered, ``depth`` the blocks nested in the outer one)."""

    __slots__ = ("_db",)

    def __init__(self, db: SQLiteDatabase) -> None:
        self._db = db

    def __enter__(self) -> None:
        local = self._db._gathered
        if getattr(local, "ops", None) is not None:  # nested: the outer block submits
            local.depth += 1
            return
        local.ops = []
        local.depth = 0

    def __exit__(self, *exc_info: Any) -> None:
        db = self._db
        local = db._gathered
        if local.depth:
            local.depth -= 1
            return
        ops, local.ops = local.ops, None
        if ops:
            try:
                db.submit_many(ops, inline=True)
            except DatabaseClosed as exc:
                for _op, callback in ops:
                    callback(None, exc)


class _Op:
    __slots__ = ("callback", "error", "event", "fn", "result")

    def __init__(self, fn: Callable[[Transaction], Any],
                 callback: Callable[[Any, BaseException | None], None] | None) -> None:
        self.fn = fn
        self.callback = callback
        self.event: threading.Event | None = None if callback else threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None




#: one row of state history (:meth:`_SQLiteTransaction._record_state`): one per state a run enters
_INSERT_STATE = ("INSERT INTO task_run_states (run_seq, seq, state_id, type, name, timestamp, message)"
                 " VALUES (?, ?, ?, ?, ?, ?, ?)")


class _SQLiteTransaction(Transaction):
    """Transaction on the writer's connection, with a write-through cache of recent runs."""

    def __init__(self, db: SQLiteDatabase) -> None:
        self._db = db
        self._conn = db._writer_conn
        self._hooks = []
        self.touched: list[str] = []

    def get_run(self, run_id: str) -> RunRow | None:
        cache = self._db._cache
        row = cache.get(run_id)
        if row is not None:
            cache.move_to_end(run_id)
            self.touched.append(run_id)
            return row
        values = self._conn.execute(f"SELECT {_COLUMNS} FROM task_runs WHERE id = ?", (run_id,)).fetchone()
        if values is None:
            return None
        row = _row(values)
        self._cache_put(row)
        return row

    def _cache_put(self, row: RunRow) -> None:
        cache = self._db._cache
        cache[row.id] = row
        self.touched.append(row.id)
        if len(cache) > self._db._cache_size:
            cache.popitem(last=False)

    def insert_run(self, row: RunRow) -> int:
        data = row.dump()
        self._db._bytes_since_checkpoint += len(data)
        cur = self._conn.execute(
            "INSERT INTO task_runs (id, task_key, state_type, qstate, due, deliveries, background, data)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (row.id, row.task_key, row.state_type, row.qstate, row.due, row.deliveries,
             int(row.background), data),
        )
        row.seq = cur.lastrowid
        row.history_seq = 0  # a new run: no history yet (a deleted run's rows went with it)
        self._record_state(row)
        self._cache_put(row)
        return row.seq  # type: ignore[return-value]

    def update_run(self, row: RunRow) -> None:
        # by seq (the rowid: one b-tree search) when known, as it is for every row read here
        by_seq = row.seq is not None
        data = row.dump()
        self._db._bytes_since_checkpoint += len(data)
        self._conn.execute(
            _UPDATE_RUN_BY_SEQ if by_seq else _UPDATE_RUN_BY_ID,
            (row.state_type, row.qstate, row.due, row.deliveries, data, row.holder,
             row.seq if by_seq else row.id),
        )
        self.touched.append(row.id)
        if row.run.get("state_id") != row.recorded_state_id:
            self._record_state(row)
        if row.state_type in TERMINAL:
            # a finished run is seldom written again: first out of the cache, not the runs still
            # queued (least recently used, they are the next ones claimed: when more runs wait
            # than the cache holds, each claim evicted the next run to claim, and every claim
            # read its run from the database and its history's last number). Not in the cache
            # any more: an operation that read more runs than it holds evicted it meanwhile.
            cache = self._db._cache
            if row.id in cache:
                cache.move_to_end(row.id, last=False)

    def _record_state(self, row: RunRow) -> None:
        """One row of state history for the run's current state: the same transaction as the
        state change, a few small columns (never the state's data)."""
        state = row.run.get("state")
        if not isinstance(state, dict) or not state.get("id"):
            return
        number = row.history_seq
        if number is None:  # a row read from the database: one seek to the run's last state
            number = self._conn.execute("SELECT max(seq) FROM task_run_states WHERE run_seq = ?",
                                        (row.seq,)).fetchone()[0] or 0
        number += 1
        self._conn.execute(
            _INSERT_STATE,
            (row.seq, number, state["id"], state.get("type") or row.state_type, state.get("name"),
             state.get("timestamp") or "", state.get("message")),
        )
        row.history_seq = number
        row.recorded_state_id = state["id"]

    def delete_run(self, run_id: str) -> RunRow | None:
        row = self.get_run(run_id)
        if row is None:
            return None
        self._conn.execute("DELETE FROM task_runs WHERE seq = ?", (row.seq,))
        self._conn.execute("DELETE FROM task_run_states WHERE run_seq = ?", (row.seq,))
        self._db._cache.pop(run_id, None)
        return row

    def take_queued(self, task_key: str, now: float, limit: int) -> list[tuple[int, str]]:
        rows = self._conn.execute(
            "SELECT seq, id FROM task_runs WHERE task_key = ? AND qstate = 1 AND due <= ? ORDER BY seq LIMIT ?",
            (task_key, now + 0.001, limit),
        ).fetchall()
        if rows:
            self._conn.executemany("UPDATE task_runs SET qstate = 2 WHERE seq = ?", [(seq,) for seq, _ in rows])
            cache = self._db._cache
            for _, run_id in rows:
                cached = cache.get(run_id)
                if cached is not None:
                    cached.qstate = QSTATE_MEMORY
                    self.touched.append(run_id)
        return [(seq, run_id) for seq, run_id in rows]

    def put_record(self, key: str, data: bytes) -> None:
        self._db._bytes_since_checkpoint += len(data)
        self._conn.execute("INSERT OR REPLACE INTO records (key, data) VALUES (?, ?)", (key, data))

    def delete_record(self, key: str) -> bool:
        return self._conn.execute("DELETE FROM records WHERE key = ?", (key,)).rowcount > 0

    def get_record(self, key: str) -> bytes | None:
        values = self._conn.execute("SELECT data FROM records WHERE key = ?", (key,)).fetchone()
        return None if values is None else bytes(values[0])


class SQLiteDatabase(Database):
    """SQLite backend: WAL mode, one writer thread with group commit, pooled readers."""

    def __init__(self, path: str, synchronous: str = "NORMAL", max_batch: int = 1000,
                 cache_size: int = 2000) -> None:
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be OFF, NORMAL, FULL or EXTRA, not {synchronous!r}")
        self.path = path
        self.synchronous = synchronous.upper()
        check_database_file(path)
        # One server per file: two would each deliver the same queued runs.
        try:
            self._lock_file = open(path + ".lock", "a+")  # noqa: SIM115 - held until close()
        except OSError as exc:
            raise DatabaseFileError(f"cannot create the lock file {path}.lock: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise DatabaseInUse(f"{path} is used by another running server") from None
        self._max_batch = max_batch
        self._cache: OrderedDict[str, RunRow] = OrderedDict()
        self._cache_size = cache_size
        self._mutex = threading.Lock()
        self._pending: deque[_Op] = deque()
        self._leading = False  # a thread (a caller, or the writer thread) is committing
        self._stopping = False
        self._handoff = threading.Event()  # the writer thread takes over
        self._idle = threading.Condition(self._mutex)
        self._closed = False
        self._close_lock = threading.Lock()
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._all_readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._failing_since: float | None = None  # first failed commit of the current outage
        self._outage_logged = False  # the current outage's start was logged (so will its end be)
        self._quiet_until = 0.0  # until then, a new outage is counted, not logged (see _note_failure)
        self._quiet_outages = 0
        self._recovering = False  # recover() runs: a failure stops the start, it is no outage
        self._gathered = threading.local()  # .ops: what this thread submits inside gathering()
        self._gathering = _Gathering(self)
        try:
            self._writer_conn = self._open_and_mark()
        except sqlite3.Error as exc:
            self._lock_file.close()
            error = storage_error(exc, path)
            if isinstance(error, StorageError):
                raise DatabaseFileError(f"cannot start on the database {path}: {error.detail}") from None
            raise DatabaseFileError(f"database {path} is corrupted or unreadable: {exc}") from None
        except BaseException:
            self._lock_file.close()
            raise
        # Checkpoints in a thread of their own, not in the commit that crosses SQLite's 1000-page
        # autocheckpoint: that commit took 3-8 ms instead of ~30 us (the copy into the database
        # file and two fsyncs), and every writer and the slot cycles of every worker waited behind
        # it. A PASSIVE checkpoint on another connection runs beside the writer (the sqlite3
        # module lets go of the GIL meanwhile, and WAL lets a writer append while it copies).
        self._ops_since_checkpoint = 0
        self._bytes_since_checkpoint = 0  # (counted by the transactions: run texts and records)
        self._checkpoint_wanted = threading.Event()
        self._tail_wanted = False  # (under _mutex) the checkpointer waits for the committer's turn
        self._tail_turn = False  # the checkpointer has the committer's turn
        self._tail_passes = 0  # last passes run by the checkpointer (each lets the WAL start again)
        self._checkpointer: threading.Thread | None = None
        try:
            # (SQLite's own checkpoint in a commit stays as a bound, far above where the thread
            # checkpoints, for writes faster than the thread's passes)
            self._writer_conn.execute(f"PRAGMA wal_autocheckpoint={WAL_BOUND_PAGES}")
            self._checkpoint_conn = self._connect()
        except sqlite3.Error as exc:  # pragma: no cover - the writer connection just opened
            logger.warning("no checkpointer thread (%s): SQLite checkpoints in the commits", exc)
            self._writer_conn.execute("PRAGMA wal_autocheckpoint=1000")
        else:
            self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="sync-worker-db-checkpoint",
                                                  daemon=True)
            self._checkpointer.start()
        self._writer = threading.Thread(target=self._writer_loop, name="sync-worker-db-writer", daemon=True)
        self._writer.start()

    def _checkpoint_loop(self) -> None:
        """Checkpointer thread: each time the writers have committed :data:`CHECKPOINT_OPS`
        operations, PASSIVE checkpoints on its own connection copy the WAL into the database
        beside the commits (never waiting for them; each pass copies what was committed
        during the one before); then, taking the committer's turn between two batches
        (:meth:`_lead_done`), a last pass on the writer's connection copies the few frames
        committed during the previous one, so that the whole WAL is in the database and the
        next transaction starts it again from its beginning, keeping it bounded (commits
        during every pass would otherwise leave it never wholly copied, growing). The
        committers wait for that last pass only: a few frames and the two syncs, instead of
        the whole checkpoint SQLite's automatic one ran in a commit."""
        conn = self._checkpoint_conn
        while True:
            self._checkpoint_wanted.wait()
            self._checkpoint_wanted.clear()
            if self._tail_turn:  # we lead: no commit runs until _release_lead
                self._tail_turn = False
                try:
                    self._writer_conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self._tail_passes += 1
                except sqlite3.Error as exc:
                    logger.debug("checkpoint failed: %s", exc)
                finally:
                    self._release_lead()
                continue
            if self._stopping:
                break
            try:
                # each pass copies what was committed during the one before, until one found
                # little new (it was short, so little was committed during it): the last pass,
                # the committers' wait, copies about that much
                before = -1
                for _ in range(CHECKPOINT_PASSES):
                    (_busy, log, _copied), = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    if 0 <= log - before <= CHECKPOINT_TAIL_FRAMES:
                        break
                    before = log
            except sqlite3.Error as exc:  # disk trouble: the commits report it; try again next time
                logger.debug("checkpoint failed: %s", exc)
                continue
            with self._mutex:
                if self._closed:
                    continue
                if self._leading:
                    self._tail_wanted = True  # the committer hands us its turn when its batch is done
                    continue
                self._leading = True
            self._tail_turn = True
            self._checkpoint_wanted.set()
        conn.close()

    # -- connections -----------------------------------------------------------------------
    def _open_and_mark(self) -> sqlite3.Connection:
        """The writer connection, on a database that is ours: a new/empty file is marked
        (``application_id``, ``user_version``), one made by an earlier version of this server
        (our tables, no mark) is adopted, anything else is refused before it is changed."""
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT)
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if app_id not in (0, APPLICATION_ID):
                raise DatabaseFileError(f"database {self.path} belongs to another application "
                                        f"(SQLite application_id {app_id:#x}); point --db at another file")
            if app_id == 0 and tables - _OUR_TABLES - {"sqlite_sequence"}:
                names = ", ".join(sorted(tables - _OUR_TABLES))[:200]
                raise DatabaseFileError(f"database {self.path} belongs to another application (tables: {names}); "
                                        "point --db at another file")
            if app_id == APPLICATION_ID and version > SCHEMA_VERSION:
                raise DatabaseFileError(f"database {self.path} has schema version {version}, made by a newer "
                                        f"sync_worker (this one knows up to {SCHEMA_VERSION}); upgrade sync_worker")
            self._configure(conn)
            had_history = "task_run_states" in tables
            conn.execute("BEGIN IMMEDIATE")  # the migration is all or nothing
            try:
                history_by_id = had_history and "run_id" in {
                    r[1] for r in conn.execute("PRAGMA table_info(task_run_states)")}
                history_rowid = had_history and not history_by_id and not _without_rowid(conn, "task_run_states")
                if history_by_id:  # version 2: set aside, copied into the new layout below
                    conn.execute("ALTER TABLE task_run_states RENAME TO task_run_states_v2")
                    _drop_indexes(conn, "task_run_states_v2")
                elif history_rowid:  # version 3: the same, copied into a table WITHOUT ROWID
                    conn.execute("ALTER TABLE task_run_states RENAME TO task_run_states_v3")
                    _drop_indexes(conn, "task_run_states_v3")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                columns = {r[1] for r in conn.execute("PRAGMA table_info(task_runs)")}
                if "holder" not in columns:  # a database made by an earlier version
                    conn.execute("ALTER TABLE task_runs ADD COLUMN holder TEXT")
                if history_by_id:  # version 2 -> 4: the same rows, keyed by the run's seq
                    # (the old table's unique seq numbers the rows: in order within each run)
                    conn.execute(
                        "INSERT INTO task_run_states (run_seq, seq, state_id, type, name, timestamp, message)"
                        " SELECT r.seq, s.seq, s.state_id, s.type, s.name, s.timestamp, s.message"
                        " FROM task_run_states_v2 s JOIN task_runs r ON r.id = s.run_id ORDER BY r.seq, s.seq")
                    conn.execute("DROP TABLE task_run_states_v2")
                    logger.info("database %s migrated from schema version %d to %d (state history keyed by "
                                "run seq)", self.path, version, SCHEMA_VERSION)
                elif history_rowid:  # version 3 -> 4: the same rows and numbers, WITHOUT ROWID
                    conn.execute(
                        "INSERT INTO task_run_states (run_seq, seq, state_id, type, name, timestamp, message)"
                        " SELECT run_seq, seq, state_id, type, name, timestamp, message"
                        " FROM task_run_states_v3 ORDER BY run_seq, seq")
                    conn.execute("DROP TABLE task_run_states_v3")
                    logger.info("database %s migrated from schema version %d to %d (state history WITHOUT "
                                "ROWID)", self.path, version, SCHEMA_VERSION)
                elif not had_history and "task_runs" in tables:  # version 1 -> 4
                    # the runs' current states start their history (earlier states were not kept)
                    conn.execute(
                        "INSERT INTO task_run_states (run_seq, seq, state_id, type, name, timestamp, message)"
                        " SELECT seq, 1, json_extract(data, '$.state.id'), state_type,"
                        " json_extract(data, '$.state.name'), coalesce(json_extract(data, '$.state.timestamp'), ''),"
                        " json_extract(data, '$.state.message') FROM task_runs"
                        " WHERE json_extract(data, '$.state.id') IS NOT NULL ORDER BY seq")
                    logger.info("database %s migrated from schema version %d to %d (state history)",
                                self.path, version, SCHEMA_VERSION)
                if app_id != APPLICATION_ID or version != SCHEMA_VERSION:
                    conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
                    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except BaseException:
            conn.close()
            raise
        return conn

    def _configure(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")
        # WAL bounded: checkpoints every ~1000 pages (SQLite's default) and truncation back
        # to this size after each, instead of a WAL that keeps its largest size forever
        conn.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT)
        self._configure(conn)
        return conn

    def _reader(self) -> sqlite3.Connection:
        try:
            return self._readers.get_nowait()
        except queue.Empty:
            conn = self._connect()
            with self._readers_lock:
                self._all_readers.append(conn)
            return conn

    def _read(self, sql: str, params: Iterable[Any]) -> tuple[Any, ...] | None:
        if self._closed:
            raise DatabaseClosed("the database is closed")
        try:
            conn = self._reader()
        except sqlite3.Error as exc:
            raise storage_error(exc, self.path) from None
        try:
            return conn.execute(sql, tuple(params)).fetchone()
        except sqlite3.Error as exc:
            raise storage_error(exc, self.path) from None
        finally:
            self._readers.put(conn)

    # -- reads -----------------------------------------------------------------------------
    def read_run(self, run_id: str) -> RunRow | None:
        values = self._read(f"SELECT {_COLUMNS} FROM task_runs WHERE id = ?", (run_id,))
        return None if values is None else _row(values)

    def read_run_text(self, run_id: str) -> tuple[str, str, int, str, int] | None:
        """(TaskRun JSON text, state_type, qstate, task_key, seq) without parsing the JSON:
        the delivery path."""
        values = self._read("SELECT data, state_type, qstate, task_key, seq FROM task_runs WHERE id = ?", (run_id,))
        return None if values is None else (values[0], values[1], values[2], values[3], values[4])

    def read_record(self, key: str) -> bytes | None:
        values = self._read("SELECT data FROM records WHERE key = ?", (key,))
        return None if values is None else bytes(values[0])

    def read_all(self, sql: str, params: Iterable[Any]) -> list[tuple[Any, ...]]:
        """All rows of a read-only query, from a reader connection (listing, stats, retention):
        never in the writer thread, so a long query does not delay commits."""
        if self._closed:
            raise DatabaseClosed("the database is closed")
        conn = self._reader()
        try:
            return conn.execute(sql, tuple(params)).fetchall()
        finally:
            self._readers.put(conn)

    def read_states(self, run_id: str) -> list[tuple[str, str, str | None, str, str | None]]:
        """The state history of a run, oldest first: (state_id, type, name, timestamp, message)."""
        return [tuple(r) for r in self.read_all(  # type: ignore[misc]
            "SELECT state_id, type, name, timestamp, message FROM task_run_states"
            " WHERE run_seq = (SELECT seq FROM task_runs WHERE id = ?) ORDER BY seq",
            (run_id,))]

    def count_runs(self, state_type: str | None = None) -> int:
        if state_type is None:
            values = self._read("SELECT count(*) FROM task_runs", ())
        else:
            values = self._read("SELECT count(*) FROM task_runs WHERE state_type = ?", (state_type,))
        return int(values[0]) if values else 0

    # -- writes ----------------------------------------------------------------------------
    # Leader/follower group commit: a thread that submits while no batch is being committed
    # commits itself, right away ("inline"), with whatever else is waiting; operations that
    # arrive meanwhile wait and are committed together in the next batch, by the writer
    # thread. Uncontended writes so cost no thread switch (each one costs latency under the
    # GIL); contended ones are batched as before.
    def write(self, op: Callable[[Transaction], Any]) -> Any:
        item = _Op(op, None)
        self._enqueue(item, inline=True)
        assert item.event is not None
        item.event.wait()
        if item.error is not None:
            raise item.error
        return item.result

    def submit(self, op: Callable[[Transaction], Any],
               callback: Callable[[Any, BaseException | None], None] | None = None,
               inline: bool = False) -> None:
        """``inline=True`` may run the operation (and its callback) in the calling thread:
        only for callers that hold no lock an operation or hook might take."""
        gathered = getattr(self._gathered, "ops", None)
        if gathered is not None:
            gathered.append((op, callback or _ignore))
            return
        self._enqueue(_Op(op, callback or _ignore), inline=inline)

    def gathering(self) -> _Gathering:  # type: ignore[override]
        """What this thread submits inside the block is queued together at its end, inline
        (an rpc connection's burst of creates: one transaction for the burst instead of one
        each). The block's caller must hold no lock an operation or hook might take. A
        closed database answers each gathered callback with :class:`DatabaseClosed`.
        (A plain context manager object, not a generator's: the shared reader enters one per
        pass, and contextlib's machinery cost more than the block's own work.)"""
        return self._gathering

    def submit_many(self, ops: list[tuple[Callable[[Transaction], Any], Callable[[Any, BaseException | None], None]]],
                    inline: bool = False) -> None:
        """:meth:`submit` for several operations, queued together (so committed together
        when nobody else is committing), in order."""
        self._enqueue([_Op(op, callback) for op, callback in ops], inline=inline)

    def _enqueue(self, item: _Op | list[_Op], inline: bool) -> None:
        with self._mutex:
            if self._closed:
                raise DatabaseClosed("the database is closed")
            if isinstance(item, list):
                self._pending.extend(item)
            else:
                self._pending.append(item)
            if self._leading:
                return  # the current leader, or the writer thread after it, commits it
            self._leading = True
            if not inline:
                self._handoff.set()
                return
        # We lead: one batch here, the rest (if anything arrived meanwhile) in the writer.
        try:
            self._run_batch(self._writer_conn, self._take_batch())
        finally:
            self._lead_done()

    def _lead_done(self) -> None:
        """The committer's batch is done: the checkpointer's turn if it waits for one (see
        :meth:`_checkpoint_loop`), else the writer thread's if operations are waiting, else
        nobody leads."""
        with self._mutex:
            if self._turn_to_checkpointer():
                return
        self._release_lead()

    def _turn_to_checkpointer(self) -> bool:
        """(``_mutex`` held, by the committer that leads) Whether the lead went to the
        checkpointer, which waits for it (:meth:`_checkpoint_loop`): it then runs its last pass
        and releases the lead (:meth:`_release_lead`)."""
        if not self._tail_wanted or self._closed:
            return False
        self._tail_wanted = False
        self._tail_turn = True
        self._checkpoint_wanted.set()
        return True

    def _release_lead(self) -> None:
        with self._mutex:
            if self._pending:
                self._handoff.set()
            else:
                self._leading = False
                if self._closed:  # only close() waits for the leader (it set _closed first)
                    self._idle.notify_all()

    def _take_batch(self) -> list[_Op]:
        with self._mutex:
            pending = self._pending
            if len(pending) <= self._max_batch:
                batch = list(pending)
                pending.clear()
            else:
                batch = [pending.popleft() for _ in range(self._max_batch)]
            return batch

    def _writer_loop(self) -> None:
        conn = self._writer_conn
        while True:
            self._handoff.wait()
            self._handoff.clear()
            while True:
                batch = self._take_batch()
                if batch:
                    try:
                        self._run_batch(conn, batch)
                    except Exception:  # pragma: no cover - a bug; keep committing the others
                        logger.exception("group commit failed")
                with self._mutex:
                    if self._turn_to_checkpointer():
                        break
                    if not self._pending:
                        self._leading = False
                        if self._closed:  # only close() waits (see _enqueue)
                            self._idle.notify_all()
                        break
            if self._stopping:
                return

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Op]) -> None:
        hooks: list[tuple[_Op, list[Callable[[], None]]]] = []
        rolled_back: BaseException | None = None
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:  # locked by another process, disk trouble
            error = storage_error(exc, self.path)
            self._note_failure(error)
            for item in batch:
                item.error = error
                self._complete(item)
            return
        for item in batch:
            tx = _SQLiteTransaction(self)
            try:
                item.result = item.fn(tx)
                hooks.append((item, tx._hooks))
            except BaseException as exc:  # noqa: BLE001 - reported to the caller
                # Operations raise before they write (see Transaction), so nothing to undo in
                # the database; the cached rows they touched may have been modified, though.
                # (A statement that failed for lack of space wrote nothing either.)
                for run_id in tx.touched:
                    self._cache.pop(run_id, None)
                item.error = storage_error(exc, self.path)
                hooks.append((item, []))
                if not conn.in_transaction:
                    # SQLite rolled the whole transaction back (it may, on a full disk): what
                    # the batch did so far is gone, and nothing more may run in autocommit mode
                    rolled_back = item.error
                    break
        try:
            if rolled_back is not None:
                raise rolled_back
            conn.execute("COMMIT")
        except (sqlite3.Error, StorageError) as exc:  # disk full and the like
            error = storage_error(exc, self.path)
            if not isinstance(error, StorageError):  # e.g. "no transaction is active": say why
                error = next((i.error for i in batch if isinstance(i.error, StorageError)), error)
            self._note_failure(error)
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self._cache.clear()
            for item in batch:
                if item.error is None:
                    item.error = error
                self._complete(item)
            self._on_commit_failure()
            return
        if self._failing_since is not None or self._quiet_outages:
            self._note_success()
        self._ops_since_checkpoint += len(batch)  # (one committer at a time)
        if self._ops_since_checkpoint >= CHECKPOINT_OPS or self._bytes_since_checkpoint >= CHECKPOINT_BYTES:
            self._ops_since_checkpoint = self._bytes_since_checkpoint = 0
            self._checkpoint_wanted.set()
        for item, item_hooks in hooks:
            for hook in item_hooks:
                try:
                    hook()
                except Exception:  # pragma: no cover - a bug in a hook must not kill the writer
                    logger.exception("after-commit hook failed")
            self._complete(item)

    def _note_failure(self, error: BaseException) -> None:
        """Log the first failure of an outage as an error; the rest of it at debug level."""
        if self._recovering:  # at start-up: the server refuses to start, naming the error
            logger.debug("start-up write failed: %s", error)
            return
        if self._failing_since is not None:
            logger.debug("write failed again: %s", error)
            return
        now = self._failing_since = time.monotonic()
        if now < self._quiet_until:  # an outage soon after the last one ended: on and off
            self._quiet_outages += 1
            self._outage_logged = False
            if self._quiet_outages == 1:
                logger.warning("writes to the database are failing again (on and off: a disk nearly full?): "
                               "%s; outages in the next %.0f s are counted, not logged one by one",
                               error, self._quiet_until - now)
            else:
                logger.debug("writes failing again: %s", error)
            return
        self._outage_logged = True
        logger.error("writes to the database are failing and refused until this is fixed: %s", error)

    def _note_success(self) -> None:
        """A commit went through: end the outage (its line only when its start was logged),
        and once the quiet period is over, sum up the outages it counted."""
        now = time.monotonic()
        if self._failing_since is not None:
            if self._outage_logged:
                logger.warning("database %s is writable again after %.1f s: writes are accepted again",
                               self.path, now - self._failing_since)
                self._quiet_until = now + FLAPPING_QUIET_SECONDS
            self._failing_since = None
        if self._quiet_outages and now >= self._quiet_until:
            logger.warning("database %s is writable again: writes failed in %d more outage(s) in the last "
                           "%.0f s", self.path, self._quiet_outages, FLAPPING_QUIET_SECONDS)
            self._quiet_outages = 0

    def _on_commit_failure(self) -> None:
        """Hook for the server: in-memory queue state may be stale after a failed commit."""

    def _complete(self, item: _Op) -> None:
        if item.event is not None:
            item.event.set()
        else:
            try:
                item.callback(item.result, item.error)  # type: ignore[misc]
            except Exception:  # pragma: no cover
                logger.exception("write callback failed")

    # -- recovery --------------------------------------------------------------------------
    def recover(self) -> RecoveryInfo:
        def op(tx: Transaction) -> RecoveryInfo:
            conn = self._writer_conn
            # Runs that were in the old process's memory (buffered or sent, never claimed)
            # wait in the database again. They are SCHEDULED: found key by key through
            # ix_task_runs_key_state (the SCHEDULED runs of each key, not the whole table).
            all_keys = _task_keys(conn)
            for key in all_keys:
                conn.execute("UPDATE task_runs SET qstate = 1 WHERE task_key = ? AND state_type = 'SCHEDULED'"
                             " AND qstate = 2", (key,))
            self._cache.clear()
            # the keys with runs waiting in the database: one seek each into the queue index,
            # of the keys just listed (not a DISTINCT over every queued run)
            keys = [key for key in all_keys if conn.execute(
                "SELECT 1 FROM task_runs WHERE task_key = ? AND qstate = 1 LIMIT 1", (key,)).fetchone()]
            now = time.time()
            delayed = [(due, key) for due, key in conn.execute(
                "SELECT due, task_key FROM task_runs WHERE qstate = 1 AND due > ?", (now,))]
            # the runs workers held, key by key through ix_task_runs_key_state (no index of their own)
            leased = [(run_id, st, holder) for key in all_keys for run_id, st, holder in conn.execute(
                _LEASED_OF_KEY, (key,))]
            return RecoveryInfo(queued_keys=keys, delayed=delayed, leased=leased)

        self._recovering = True
        try:
            return self.write(op)
        finally:
            self._recovering = False

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            with self._mutex:
                self._closed = True  # no new operations
                # let the current leader (or the writer thread) commit what is pending
                self._idle.wait_for(lambda: not self._leading, timeout=10)
                self._stopping = True
                self._leading = True
            self._handoff.set()
        self._writer.join(timeout=10)
        if self._checkpointer is not None:
            self._checkpoint_wanted.set()  # (_stopping is set: it closes its connection and ends)
            self._checkpointer.join(timeout=10)
        try:
            self._writer_conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error:  # pragma: no cover
            pass
        self._writer_conn.close()
        self._lock_file.close()  # releases the lock
        with self._readers_lock:
            for conn in self._all_readers:
                try:
                    conn.close()
                except sqlite3.Error:  # pragma: no cover
                    pass
            self._all_readers.clear()


def _without_rowid(conn: sqlite3.Connection, table: str) -> bool:
    """Whether ``table`` was created ``WITHOUT ROWID`` (SQLite keeps the statement as written)."""
    found = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
    return found is not None and " ".join(found[0].upper().split()).endswith("WITHOUT ROWID")


def _drop_indexes(conn: sqlite3.Connection, table: str) -> None:
    """Drop the indexes of a table set aside by a migration: their names are those the new
    table's indexes take (``CREATE INDEX IF NOT EXISTS`` would skip them)."""
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ? AND sql IS NOT NULL",
                                (table,)).fetchall():
        conn.execute(f'DROP INDEX "{name}"')


#: the PENDING and RUNNING runs of one task key (recovery: the runs workers held)
_LEASED_OF_KEY = ("SELECT id, state_type, holder FROM task_runs WHERE task_key = ? AND state_type IN ('PENDING', 'RUNNING')"
                  " ORDER BY seq")


def _task_keys(conn: sqlite3.Connection) -> list[str]:
    """Every task key that has runs, one index seek each (ix_task_runs_key_state), not a scan
    of all the runs."""
    keys: list[str] = []
    found = conn.execute("SELECT min(task_key) FROM task_runs").fetchone()[0]
    while found is not None:
        keys.append(found)
        found = conn.execute("SELECT min(task_key) FROM task_runs WHERE task_key > ?", (found,)).fetchone()[0]
    return keys


def _ignore(result: Any, error: BaseException | None) -> None:
    if error is not None and not isinstance(error, DatabaseClosed):
        logger.debug("background write failed: %s", error)
