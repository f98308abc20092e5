"""Retention: finished runs older than the retention period are deleted, with their records.

Why: without it the database grows by ~2 KB per finished run forever. ``sync-worker server
--retention 7d`` (the default; ``0`` keeps everything) runs :class:`RetentionSweeper`, a
thread that every ``interval`` seconds deletes finished runs (COMPLETED, FAILED, CANCELLED,
CRASHED) whose ``end_time`` is older than the retention, together with the records this server
stores for them (parameters, result and failure records under ``/api/storage``).

Small batches that never stall delivery: the candidates are found on a reader connection
(never in the writer thread), and each batch of at most :data:`BATCH` runs is one short write
operation in the group commit, so runs being created, delivered and finished in between wait
for at most one batch. The database file stops growing in a steady state because SQLite puts
the pages of deleted rows on its free list and reuses them for new rows (no VACUUM needed;
``auto_vacuum`` stays off so that freed pages are reused rather than returned to the OS); the
WAL file is checkpointed back into the database every 500 operations by the database's
checkpointer thread (``SQLiteDatabase._checkpoint_loop``; SQLite's automatic checkpoint at 4000
pages as a far bound), so it is bounded too.

Records kept elsewhere: result files in a local ``SYNC_WORKER_STORAGE`` directory are not the
server's to delete (it may run on another machine); ``sync-worker storage prune`` is the tool
for those. ``sync-worker runs purge`` calls :func:`purge` on demand (``POST
/api/sync_worker/purge``).
"""
from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from sync_worker.durations import MAX_SECONDS, format_duration, parse_duration  # noqa: F401 - parse_duration re-exported

from .database import DatabaseClosed, Transaction
from .models import TERMINAL, ValidationError, iso

if TYPE_CHECKING:
    from .core import Core

logger = logging.getLogger("sync_worker.server.retention")

#: runs deleted per write operation
BATCH = 200
DEFAULT_RETENTION = 7 * 86400.0
#: server record keys (see storage.ServerStore: "/" becomes ".")
PARAMETERS_RECORD = "parameters."
_RECORD_KEY = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


def record_keys(run: dict[str, Any]) -> list[str]:
    """Keys of the records this server may hold for a run: its parameters, and its result or
    failure record when the state names one by key (not by a local file path)."""
    state = run.get("state") or {}
    keys = []
    params_id = (state.get("state_details") or {}).get("task_parameters_id")
    if params_id:
        keys.append(PARAMETERS_RECORD + str(params_id))
    data = state.get("data")
    if isinstance(data, dict):
        key = data.get("storage_key") or (data.get("metadata") or {}).get("storage_key")
        if isinstance(key, str) and _RECORD_KEY.match(key):
            keys.append(key)
    return keys


def parse_purge(body: Any) -> tuple[float, list[str]]:
    """``{"older_than_seconds": N, "state_types": [...]}`` (states default to all finished ones)."""
    loc: list[Any] = ["body"]
    if not isinstance(body, dict):
        raise ValidationError(loc, "Input should be a JSON object with 'older_than_seconds'", "dict_type", body)
    for key in body:
        if key not in ("older_than_seconds", "state_types"):  # a misspelt filter must not widen a delete
            raise ValidationError(loc + [key], "Extra inputs are not permitted (purge takes older_than_seconds "
                                  "and state_types)", "extra_forbidden", body[key])
    older = body.get("older_than_seconds")
    if isinstance(older, bool) or not isinstance(older, (int, float)) or not 0 <= older <= MAX_SECONDS:
        raise ValidationError(loc + ["older_than_seconds"],
                              f"Input should be a number of seconds from 0 to {MAX_SECONDS:.0f} (100 years)",
                              "range", older)
    states = body.get("state_types") or sorted(TERMINAL)
    if not isinstance(states, list) or not all(isinstance(s, str) for s in states):
        raise ValidationError(loc + ["state_types"], "Input should be a list of state types", "list_type", states)
    for i, state in enumerate(states):
        if state not in TERMINAL:
            raise ValidationError(loc + ["state_types", i], f"Only finished runs can be purged "
                                  f"({', '.join(sorted(TERMINAL))}); cancel a run first", "enum", state)
    return float(older), states


def _delete_op(core: Core, ids: list[str], states: frozenset[str]) -> Any:
    def op(tx: Transaction) -> int:
        deleted = 0
        for run_id in ids:
            row = tx.get_run(run_id)
            if row is None or row.state_type not in states:
                continue
            keys = record_keys(row.run)
            tx.delete_run(run_id)
            for key in keys:
                tx.delete_record(key)
            tx.after_commit(lambda r=run_id: core.queue.release(r))
            deleted += 1
        return deleted
    return op


def purge(core: Core, older_than: float, states: Iterable[str] | None = None, *, batch: int = BATCH,
          stop: threading.Event | None = None, pause: float = 0.0) -> int:
    """Delete finished runs (of ``states``) that ended more than ``older_than`` seconds ago,
    and their server records, ``batch`` at a time; returns how many runs were deleted."""
    wanted = frozenset(states or TERMINAL) & TERMINAL
    if not wanted:
        return 0
    cutoff = iso(time.time() - older_than)
    marks = ", ".join("?" * len(wanted))
    sql = (f"SELECT id FROM task_runs WHERE state_type IN ({marks}) AND "
           f"coalesce(json_extract(data, '$.end_time'), json_extract(data, '$.updated')) <= ? "
           f"ORDER BY seq LIMIT ?")
    total = 0
    while stop is None or not stop.is_set():
        rows = core.db.read_all(sql, [*sorted(wanted), cutoff, batch])  # type: ignore[attr-defined]
        if not rows:
            break
        deleted = core.db.write(_delete_op(core, [r[0] for r in rows], wanted))
        total += deleted
        if len(rows) < batch or deleted == 0:
            break
        if pause:
            time.sleep(pause)  # let other writers in between batches
    if total:
        logger.info("deleted %d finished run(s) that ended before %s", total, cutoff)
    return total


def delete_parameters_when_completed(tx: Transaction, run: dict[str, Any]) -> None:
    """A run that COMPLETED needs its parameters no more (FAILED/CRASHED/CANCELLED runs keep
    them until retention removes the run, for ``runs show`` and ``runs retry``)."""
    state = run.get("state") or {}
    params_id = (state.get("state_details") or {}).get("task_parameters_id")
    if params_id and state.get("type") == "COMPLETED":
        tx.delete_record(PARAMETERS_RECORD + str(params_id))


class RetentionSweeper:
    """The thread behind ``--retention``: a :func:`purge` every ``interval`` seconds."""

    def __init__(self, core: Core, retention: float, interval: float | None = None) -> None:
        self.core = core
        self.retention = retention
        self.interval = interval if interval is not None else min(max(retention / 10.0, 1.0), 60.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sync-worker-retention", daemon=True)
        self.deleted = 0

    def start(self) -> RetentionSweeper:
        self._thread.start()
        logger.info("retention: finished runs are deleted %s after they end (checked every %.0f s)",
                    format_duration(self.retention), self.interval)
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.deleted += purge(self.core, self.retention, stop=self._stop, pause=0.005)
            except DatabaseClosed:
                return
            except Exception:  # pragma: no cover - keep sweeping
                logger.exception("retention sweep failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
