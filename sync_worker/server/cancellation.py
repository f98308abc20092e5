"""Cancelling a task run on the embedded server (``POST /api/sync_worker/task_runs/{id}/cancel``).

What happens depends on where the run is:

- SCHEDULED (waiting, delayed, or awaiting a retry), PENDING or PAUSED: it becomes CANCELLED
  at once and is never delivered (a worker that was already sent it is refused when it
  proposes PENDING/RUNNING: a terminal run never runs);
- RUNNING, held by a worker connection (or its lease, after the connection was lost): it
  becomes CANCELLING, and the worker holding it is sent
  ``{"type": "cancel", "task_run_id": ID}`` over its subscription socket; that worker raises
  :class:`sync_worker.exceptions.Cancelled` in the task's thread (the same mechanism, and the
  same limits, as ``timeout_seconds``) and reports CANCELLED. A run still CANCELLING when its
  worker's lease runs out becomes CANCELLED (it is never re-delivered);
- RUNNING without a lease (a client moved it to RUNNING itself: no worker can be told, no
  lease will run out): CANCELLED at once; a late final state from whoever runs it is refused;
- finished (COMPLETED, FAILED, CANCELLED, CRASHED) or already CANCELLING: nothing changes.

The message goes only to subscriptions that use the ``credit`` extension, i.e. sync_worker
workers: a Prefect task worker would take an unknown message for a malformed task run.
The answer says what was done: ``{"status": "cancelled" | "cancelling" | "unchanged",
"notified": bool, "held_by": "connection" | "lease" | null, "task_run": {...}}`` (see
:func:`notify_holder`).
"""
from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

from .core import NotFound
from .database import QSTATE_NONE, Transaction
from .models import TERMINAL
from .orchestration import system_state

if TYPE_CHECKING:
    from .core import Core

logger = logging.getLogger("sync_worker.server.cancellation")

#: states a cancel request ends at once (the run is not executing anywhere)
CANCEL_NOW = frozenset({"SCHEDULED", "PENDING", "PAUSED"})


def cancel_run(core: Core, run_id: str) -> dict[str, Any]:
    queue = core.queue

    def op(tx: Transaction) -> tuple[str, str]:
        row = tx.get_run(run_id)
        if row is None:
            raise NotFound("Task not found")
        current = row.state_type
        if current in TERMINAL or current == "CANCELLING":
            return "unchanged", row.dump()
        now = time.time()
        unleased = False
        if current == "RUNNING":
            with queue.lock:
                unleased = run_id not in queue.outstanding
        if current in CANCEL_NOW or unleased:
            # RUNNING without a lease: no worker connection of this server was given it (a
            # client moved it to RUNNING itself), so no worker can be told to stop and no
            # lease will run out: CANCELLING would be for ever. A late final state from
            # whoever runs it is refused (a finished run stays finished).
            message = (f"Cancelled while {current}: it was not run." if current != "RUNNING" else
                       "Cancelled while RUNNING: no worker connection of this server held it.")
            system_state(row.run, "CANCELLED", now, message=message, deferred=row.background)
            row.state_type = "CANCELLED"
            row.qstate = QSTATE_NONE
            row.holder = None
            row.touch()
            tx.update_run(row)
            text = row.dump()
            tx.after_commit(lambda: queue.release(run_id))
            tx.after_commit(lambda: core._finished(run_id, text))
            return "cancelled", text
        # RUNNING: the worker must stop it
        system_state(row.run, "CANCELLING", now, message="Cancellation requested; waiting for the worker to stop.",
                     deferred=row.background)
        row.state_type = "CANCELLING"
        row.touch()
        tx.update_run(row)
        return "cancelling", row.dump()

    status, text = core.db.write(op)
    notified, held_by = False, None
    if status == "cancelling":
        notified, held_by = notify_holder(core, run_id)
    logger.info("cancel %s: %s%s", run_id, status, " (worker notified)" if notified else "")
    return {"status": status, "notified": notified, "held_by": held_by, "task_run": json.loads(text)}


def notify_holder(core: Core, run_id: str) -> tuple[bool, str | None]:
    """Tell the worker connection holding ``run_id`` to stop it. Returns (told, held by):
    ``"connection"``, a live worker connection (told when it is a sync_worker worker; a
    Prefect worker takes no such message, and the run ends as it reports it); ``"lease"``,
    the lease of a worker whose connection is gone (the lease running out ends it); None,
    nobody."""
    with core.queue.lock:
        holder = core.queue.outstanding.get(run_id)
    if holder is None:
        return False, None
    if getattr(holder, "_closed", True) or getattr(holder, "_done", None) is None or holder._done.is_set():
        return False, "lease"  # (RECOVERED after a restart, or a connection that ended)
    post = getattr(holder, "_post", None)
    if post is None or getattr(holder, "_credit", None) is None:
        return False, "connection"
    post(json.dumps({"type": "cancel", "task_run_id": run_id}))
    return True, "connection"


def finish_cancelling_op(tx: Transaction, run_id: str, message: str) -> bool:
    """A CANCELLING run whose worker is gone: CANCELLED (used by lease expiry and start-up)."""
    row = tx.get_run(run_id)
    if row is None or row.state_type != "CANCELLING":
        return False
    system_state(row.run, "CANCELLED", time.time(), message=message, deferred=row.background)
    row.state_type = "CANCELLED"
    row.qstate = QSTATE_NONE
    row.holder = None
    row.touch()
    tx.update_run(row)
    return True


def recover_cancelling(core: Core) -> int:
    """At start-up: runs left CANCELLING by the previous server process. Their workers'
    connections died with it; their cancellation is final."""
    rows = core.db.read_all("SELECT id FROM task_runs WHERE state_type = 'CANCELLING'", [])  # type: ignore[attr-defined]
    done = 0
    for (run_id,) in rows:
        def op(tx: Transaction, run_id: str = run_id) -> bool:
            ok = finish_cancelling_op(tx, run_id, "Cancelled: the server restarted while the run was being cancelled.")
            if ok:
                tx.after_commit(lambda: core.queue.release(run_id))
            return ok
        done += bool(core.db.write(op))
    return done
