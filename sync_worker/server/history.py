"""State history of task runs: Prefect's ``GET /api/task_run_states/?task_run_id=...``.

Why kept: ``sync-worker runs show`` and a dashboard need every state a run went through, with
timestamps (the stored run holds only its current state). The database writes one small row per
state a run enters, in the transaction of the state change (see
:meth:`~sync_worker.server.database._SQLiteTransaction.update_run`), and deletes the rows with the
run (``DELETE``, retention, purge). Only type, name, timestamp, message and the state id are kept,
never the state's data (a result): the answer's ``data`` is null and its ``state_details`` carry
the task run id only.
"""
from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from .database import Database
from .models import ValidationError
from .validation import check_uuid

_LOC = ["query", "task_run_id"]


def parse_query(query_string: str) -> str:
    """The ``task_run_id`` query parameter, as a canonical UUID (422 as FastAPI when missing
    or not a UUID)."""
    values = parse_qs(query_string, keep_blank_values=True).get("task_run_id")
    if not values:
        raise ValidationError(_LOC, "Field required", "missing")
    return check_uuid(values[-1], _LOC)


def task_run_states(db: Database, query_string: str) -> list[dict[str, Any]]:
    """The states of a run, oldest first, as Prefect's State objects (an unknown run: ``[]``,
    as Prefect answers)."""
    run_id = parse_query(query_string)
    return [
        {"id": state_id, "type": state_type, "name": name, "timestamp": timestamp, "message": message,
         "data": None, "state_details": {"task_run_id": run_id}}
        for state_id, state_type, name, timestamp, message in db.read_states(run_id)  # type: ignore[attr-defined]
    ]
