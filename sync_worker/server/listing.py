"""Listing, counting and inspecting task runs: ``POST /api/task_runs/filter``,
``POST /api/task_runs/count`` (Prefect 3's request and response shapes) and the queue
statistics behind ``GET /api/sync_worker/stats``.

Why here and not in :mod:`core`: these are read-only queries on committed data, answered
from a reader connection, never from the writer thread, so a slow listing cannot stall
delivery or state changes.

The filter is Prefect's ``TaskRunFilter`` (``id``, ``name``, ``tags``, ``state.type``,
``state.name``, ``start_time``, ``expected_start_time``, ``flow_run_id``, ``subflow_runs``,
``operator`` ``and_``/``or_``) plus one extension, ``task_key: {"any_": [...]}`` (Prefect has no
task-key filter; a Prefect server rejects the field with 422). ``sort`` is one of Prefect's
``TaskRunSort`` values; ties are broken by creation order, newest first. ``limit`` is
0-200 (Prefect's default and maximum, ``PREFECT_API_DEFAULT_LIMIT``), ``offset`` >= 0. The
``flows``/``flow_runs``/``deployments`` filters of Prefect's request are accepted and must be
empty: background runs belong to no flow. Unknown filter fields are refused (422) rather than
silently ignored: a filter that does not filter would list the wrong runs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .models import STATE_TYPES, ValidationError, iso, parse_time
from .validation import SQLITE_MAX_INT

#: Prefect's ``PREFECT_API_DEFAULT_LIMIT``: default and largest ``limit`` of a filter request.
MAX_LIMIT = 200

#: Prefect's ``TaskRunSort`` -> ORDER BY (ties: newest first)
SORTS = {
    "ID_DESC": "id DESC",
    "EXPECTED_START_TIME_ASC": "json_extract(data, '$.expected_start_time') ASC, seq ASC",
    "EXPECTED_START_TIME_DESC": "json_extract(data, '$.expected_start_time') DESC, seq DESC",
    "NAME_ASC": "json_extract(data, '$.name') ASC, seq DESC",
    "NAME_DESC": "json_extract(data, '$.name') DESC, seq DESC",
    "NEXT_SCHEDULED_START_TIME_ASC": "json_extract(data, '$.next_scheduled_start_time') ASC, seq ASC",
    "END_TIME_DESC": "json_extract(data, '$.end_time') DESC, seq DESC",
}

_TOP_LEVEL = {"sort", "limit", "offset", "task_runs", "flows", "flow_runs", "deployments", "work_pools",
              "work_pool_queues"}
_FILTER_FIELDS = {"operator", "id", "name", "tags", "state", "start_time", "expected_start_time", "flow_run_id",
                  "subflow_runs", "task_key"}


@dataclass
class Query:
    """A validated filter as SQL: ``where`` (with ``params``), ``order``, ``limit``, ``offset``."""

    where: str = "1"
    params: list[Any] = field(default_factory=list)
    order: str = SORTS["ID_DESC"]
    limit: int = MAX_LIMIT
    offset: int = 0


def _obj(value: Any, loc: list[Any], allowed: set[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValidationError(loc, "Input should be a valid dictionary (a JSON object)", "dict_type", value)
    # a Prefect client sends every field of its models, unset ones as null: ignore those
    unknown = sorted(k for k in set(value) - allowed if value[k] is not None)
    if unknown:
        raise ValidationError(loc + [unknown[0]], f"Extra inputs are not permitted (known fields: "
                                                   f"{', '.join(sorted(allowed))})", "extra_forbidden")
    return value


def _strings(value: Any, loc: list[Any]) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValidationError(loc, "Input should be a valid list of strings", "list_type", value)
    return value


def _bool(value: Any, loc: list[Any]) -> bool:
    if not isinstance(value, bool):
        raise ValidationError(loc, "Input should be a valid boolean", "bool_type", value)
    return value


def _in(column: str, values: list[str], params: list[Any]) -> str:
    if not values:
        return "0"
    params.extend(values)
    return f"{column} IN ({', '.join('?' * len(values))})"


def _operator(spec: dict[str, Any], loc: list[Any]) -> str:
    operator = spec.get("operator", "and_")
    if operator not in ("and_", "or_"):
        raise ValidationError(loc + ["operator"], "Input should be 'and_' or 'or_'", "enum", operator)
    return operator


def _combine(parts: list[str], operator: str = "and_") -> str:
    """Prefect's ``as_sql_filter``: the parts joined by ``operator``; no part: TRUE."""
    if not parts:
        return "1"
    if len(parts) == 1:
        return parts[0]
    joiner = " AND " if operator == "and_" else " OR "
    return "(" + joiner.join(f"({p})" for p in parts) + ")"


def _time_range(spec: Any, loc: list[Any], column: str, params: list[Any], nullable: bool) -> str:
    allowed = {"before_", "after_", "is_null_"} if nullable else {"before_", "after_"}
    spec = _obj(spec, loc, allowed)
    out: list[str] = []
    # ISO texts of one format (microseconds, Z) compare like the times they stand for
    if spec.get("before_") is not None:
        params.append(iso(parse_time(spec["before_"], loc + ["before_"])))
        out.append(f"{column} <= ?")
    if spec.get("after_") is not None:
        params.append(iso(parse_time(spec["after_"], loc + ["after_"])))
        out.append(f"{column} >= ?")
    if spec.get("is_null_") is not None:
        out.append(f"{column} IS NULL" if _bool(spec["is_null_"], loc + ["is_null_"]) else f"{column} IS NOT NULL")
    return _combine(out)  # always ANDed, whatever the filter's operator (Prefect: no operator here)


def _tags(value: Any, loc: list[Any], params: list[Any]) -> str:
    """Prefect's ``TaskRunFilterTags``: ``all_`` (the run has every tag: one criterion) and
    ``is_null_``, combined by the tags filter's own ``operator``."""
    tags = _obj(value, loc, {"all_", "is_null_", "operator"})
    operator = _operator(tags, loc)
    parts: list[str] = []
    wanted = _strings(tags["all_"], loc + ["all_"]) if tags.get("all_") is not None else []
    if wanted:  # Prefect: an empty all_ is no criterion
        params.extend(wanted)
        parts.append(_combine(["EXISTS (SELECT 1 FROM json_each(task_runs.data, '$.tags') WHERE value = ?)"]
                              * len(wanted)))
    if tags.get("is_null_") is not None:
        empty = "json_array_length(data, '$.tags') = 0"
        parts.append(empty if _bool(tags["is_null_"], loc + ["is_null_"]) else f"NOT ({empty})")
    return _combine(parts, operator)


def _state(value: Any, loc: list[Any], params: list[Any]) -> str:
    """Prefect's ``TaskRunFilterState``: ``type.any_`` and ``name.any_``, combined by the state
    filter's own ``operator``."""
    state = _obj(value, loc, {"type", "name", "operator"})
    operator = _operator(state, loc)
    parts: list[str] = []
    if state.get("type") is not None:
        types = _obj(state["type"], loc + ["type"], {"any_"})
        if types.get("any_") is not None:
            wanted = _strings(types["any_"], loc + ["type", "any_"])
            for i, kind in enumerate(wanted):
                if kind not in STATE_TYPES:
                    raise ValidationError(loc + ["type", "any_", i],
                                          f"Input should be one of {', '.join(sorted(STATE_TYPES))}", "enum", kind)
            parts.append(_in("state_type", wanted, params))
    if state.get("name") is not None:
        names = _obj(state["name"], loc + ["name"], {"any_"})
        if names.get("any_") is not None:
            parts.append(_in("json_extract(data, '$.state_name')", _strings(names["any_"], loc + ["name", "any_"]),
                             params))
    return _combine(parts, operator)


def _flow_run_id(value: Any, loc: list[Any], params: list[Any]) -> str:
    """Prefect's ``TaskRunFilterFlowRunId``. ``is_null_`` defaults to False, which alone means
    "runs WITH a flow run" and beside ``any_`` means nothing (every Prefect client sends it):
    Prefect builds one criterion, ``IS NULL`` if ``is_null_`` is true, else ``IN any_``, else
    ``IS NOT NULL``. ``is_null_: true`` beside ``any_`` is two criteria: with ``operator: or_``
    the runs of those flow runs OR without one; with ``and_`` (the default) Prefect's answer,
    the runs without a flow run (a run in ``any_`` has one: ANDed, nothing would match)."""
    flow = _obj(value, loc, {"any_", "is_null_", "operator"})
    operator = _operator(flow, loc)
    column = "json_extract(data, '$.flow_run_id')"
    is_null = flow.get("is_null_", False)  # Prefect's default: runs WITH a flow run
    if is_null is not None:
        _bool(is_null, loc + ["is_null_"])
    wanted = _strings(flow["any_"], loc + ["any_"]) if flow.get("any_") is not None else None
    if is_null is True:
        if wanted is not None and operator == "or_":
            return _combine([_in(column, wanted, params), f"{column} IS NULL"], operator)
        return f"{column} IS NULL"
    if wanted is not None:
        return _in(column, wanted, params)
    return f"{column} IS NOT NULL" if is_null is False else "1"


def _task_run_filter(value: Any, loc: list[Any], params: list[Any]) -> str:
    """Prefect's ``TaskRunFilter`` as SQL, as Prefect builds it: each field filter is one
    criterion (its own pieces ANDed, or combined by its own ``operator`` for ``tags``,
    ``state`` and ``flow_run_id``; TRUE if it has none), and the top-level ``operator``
    combines those criteria only."""
    spec = _obj(value, loc, _FILTER_FIELDS)
    operator = _operator(spec, loc)
    criteria: list[str] = []
    if spec.get("id") is not None:
        ids = _obj(spec["id"], loc + ["id"], {"any_"})
        parts = []
        if ids.get("any_") is not None:
            parts.append(_in("id", _strings(ids["any_"], loc + ["id", "any_"]), params))
        criteria.append(_combine(parts))
    if spec.get("name") is not None:
        name = _obj(spec["name"], loc + ["name"], {"any_", "like_"})
        parts = []
        if name.get("any_") is not None:
            parts.append(_in("json_extract(data, '$.name')", _strings(name["any_"], loc + ["name", "any_"]), params))
        if name.get("like_") is not None:
            if not isinstance(name["like_"], str):
                raise ValidationError(loc + ["name", "like_"], "Input should be a valid string", "string_type")
            params.append(f"%{name['like_']}%")
            parts.append("json_extract(data, '$.name') LIKE ?")  # case-insensitive for ASCII, as ilike
        criteria.append(_combine(parts))
    if spec.get("task_key") is not None:
        keys = _obj(spec["task_key"], loc + ["task_key"], {"any_"})
        parts = []
        if keys.get("any_") is not None:
            parts.append(_in("task_key", _strings(keys["any_"], loc + ["task_key", "any_"]), params))
        criteria.append(_combine(parts))
    if spec.get("tags") is not None:
        criteria.append(_tags(spec["tags"], loc + ["tags"], params))
    if spec.get("state") is not None:
        criteria.append(_state(spec["state"], loc + ["state"], params))
    if spec.get("start_time") is not None:
        criteria.append(_time_range(spec["start_time"], loc + ["start_time"], "json_extract(data, '$.start_time')",
                                    params, nullable=True))
    if spec.get("expected_start_time") is not None:
        criteria.append(_time_range(spec["expected_start_time"], loc + ["expected_start_time"],
                                    "json_extract(data, '$.expected_start_time')", params, nullable=False))
    if spec.get("flow_run_id") is not None:
        criteria.append(_flow_run_id(spec["flow_run_id"], loc + ["flow_run_id"], params))
    if spec.get("subflow_runs") is not None:
        sub = _obj(spec["subflow_runs"], loc + ["subflow_runs"], {"exists_"})
        # a background run is never the parent of a subflow: exists_ true matches none, false all
        criteria.append("0" if sub.get("exists_") is True else "1")
    if operator == "and_":
        criteria = [c for c in criteria if c != "1"]  # TRUE changes nothing in an AND (and has no parameters)
    return _combine(criteria, operator)


def parse_query(body: Any, *, paged: bool = True) -> Query:
    """Validate a filter/count request body (``None`` = everything)."""
    loc: list[Any] = ["body"]
    body = _obj(body if body is not None else {}, loc, _TOP_LEVEL)
    query = Query()
    for name in ("flows", "flow_runs", "deployments", "work_pools", "work_pool_queues"):
        if body.get(name):
            raise ValidationError(loc + [name], "Background task runs belong to no flow, flow run or deployment: "
                                                "this server only accepts an empty filter here", "value_error")
    query.where = _task_run_filter(body.get("task_runs"), loc + ["task_runs"], query.params)
    if paged:
        sort = body.get("sort", "ID_DESC")
        if sort not in SORTS:
            raise ValidationError(loc + ["sort"], f"Input should be one of {', '.join(SORTS)}", "enum", sort)
        query.order = SORTS[sort]
        limit = body.get("limit", MAX_LIMIT)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= MAX_LIMIT:
            raise ValidationError(loc + ["limit"], f"Input should be a whole number from 0 to {MAX_LIMIT}",
                                  "less_than_equal", limit)
        offset = body.get("offset", 0)
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= SQLITE_MAX_INT:
            raise ValidationError(loc + ["offset"], f"Input should be a whole number from 0 to {SQLITE_MAX_INT}",
                                  "range", offset)
        query.limit, query.offset = limit, offset
    return query


def filter_runs(db: Any, body: Any) -> bytes:
    """The JSON array of matching TaskRuns (texts as stored, not re-serialized)."""
    query = parse_query(body)
    rows = db.read_all(f"SELECT data FROM task_runs WHERE {query.where} ORDER BY {query.order} LIMIT ? OFFSET ?",
                       [*query.params, query.limit, query.offset])
    return ("[" + ",".join(row[0] for row in rows) + "]").encode()


def count_runs(db: Any, body: Any) -> int:
    query = parse_query(body, paged=False)
    rows = db.read_all(f"SELECT count(*) FROM task_runs WHERE {query.where}", query.params)
    return int(rows[0][0])


def _empty_summary(task_key: str) -> dict[str, Any]:
    return {"task_key": task_key, "counts": {}, "total": 0, "oldest_scheduled": None,
            "oldest_scheduled_id": None, "oldest_scheduled_age_seconds": None}


def task_key_summaries(db: Any, now: float) -> dict[str, dict[str, Any]]:
    """Per task key: runs by state type and the oldest waiting run (its id, creation time
    and age). Shared by ``GET /api/sync_worker/stats`` and the dashboard's overview; both
    queries read the index on ``(task_key, state_type)`` only (see database.py)."""
    keys: dict[str, dict[str, Any]] = {}

    def entry(task_key: str) -> dict[str, Any]:
        return keys.setdefault(task_key, _empty_summary(task_key))

    for task_key, state_type, count in db.read_all(
            "SELECT task_key, state_type, count(*) FROM task_runs GROUP BY task_key, state_type", []):
        item = entry(task_key)
        item["counts"][state_type] = count
        item["total"] += count
    # The oldest waiting run: the first in creation order (seq) that is due. A run delayed
    # (countdown/eta) or waiting for its retry is not waiting for a worker yet: counted, it
    # would make a key look stuck. Its age counts from when it became due. The walk reads the
    # key's SCHEDULED runs in seq order through the index and stops at the first due one.
    for task_key, item in keys.items():
        if not item["counts"].get("SCHEDULED"):
            continue
        rows = db.read_all(
            "SELECT id, json_extract(data, '$.created'), due FROM task_runs INDEXED BY ix_task_runs_key_state "
            "WHERE task_key = ? AND state_type = 'SCHEDULED' AND due <= ? ORDER BY seq LIMIT 1", [task_key, now])
        if not rows:
            continue  # none due (or finished since the counts were read)
        run_id, created, due = rows[0]
        item["oldest_scheduled_id"], item["oldest_scheduled"] = run_id, created
        try:
            waiting_since = max(float(parse_time(created, [])), float(due or 0))
        except ValidationError:  # pragma: no cover - we wrote it
            continue
        item["oldest_scheduled_age_seconds"] = round(max(0.0, now - waiting_since), 3)
    return keys


def stats(db: Any, subscribers: Any) -> dict[str, Any]:
    """Per task key: runs by state type, the oldest waiting run, and the subscribed workers
    (client id, address, limit, runs in flight). ``subscribers``: live subscriptions."""
    now = time.time()
    keys = task_key_summaries(db, now)
    workers = []
    for sub in list(subscribers):
        info = worker_info(sub)
        workers.append(info)
        for task_key in info["task_keys"]:
            keys.setdefault(task_key, _empty_summary(task_key))
    for item in keys.values():
        item["workers"] = [info for info in workers if item["task_key"] in info["task_keys"]]
    return {"task_keys": sorted(keys.values(), key=lambda k: k["task_key"]), "workers": workers,
            "time": iso(now)}


def worker_info(sub: Any) -> dict[str, Any]:
    """What a subscription says about its worker (read defensively: a snapshot of live objects)."""
    limit = getattr(sub, "limit", None)
    return {
        "client_id": getattr(sub, "client_id", None),
        "host": getattr(sub, "peer", None),
        "task_keys": list(getattr(sub, "keys", []) or []),
        "limit": limit,
        "in_flight": len(getattr(sub, "leased", ()) or ()) + len(getattr(sub, "_unacked", ()) or ()),
        "delivered": getattr(sub, "delivered", 0),
    }


def subscribed_keys(subscribers: Any) -> set[str]:
    out: set[str] = set()
    for sub in list(subscribers):
        out.update(getattr(sub, "keys", []) or [])
    return out
