"""The dashboard: static files at ``/`` and the small JSON endpoints its pages call.

Why one module: the UI (``sync_worker/server/ui/``: one HTML page, one script, one style
sheet; no build step, no CDN, no vendored library) and what it reads from the server change
together. Every page makes ONE read call, answered from a reader connection:

- ``GET /api/sync_worker/dashboard/overview``: per task key the runs by state type and the
  oldest waiting (SCHEDULED) run, the connected workers, and the runs that finished in the
  last 15 minutes per 10 s (COMPLETED; FAILED and CRASHED as "failed"), read from the state
  history (``task_run_states``) through a partial index on the final states' timestamps;
- ``GET /api/sync_worker/dashboard/runs?state=&task_key=&since=&until=&before=&after=&limit=``:
  runs newest first (creation order), paged by position (``before``/``after`` a run's ``seq``)
  rather than by offset, so that every page costs the same at any depth. ``since``/``until``
  bound the creation time (ISO 8601);
- ``GET /api/sync_worker/dashboard/runs/{id}``: the run, its states with the time spent in each,
  its parameters when they are JSON, small and kept on this server (also as the text the page
  shows: JSON.parse would round a big integer), and its result or failure (type, message,
  traceback) when the state carries it inline or names a record on this server.

The runs and the run carry ``run_time``: the time spent RUNNING or CANCELLING summed over the
attempts (not the waits for a retry between them), read from the state history (see
:func:`run_time`).

Actions: ``POST /api/sync_worker/task_runs/{id}/cancel`` (cancellation.py) and
``POST /api/sync_worker/task_runs/{id}/retry`` (here): a new run of the same task with the same
parameters (copied when kept on this server; otherwise the new run names the same parameters
record, which the submitter's store still holds for a run that did not complete).

Security (see README "Dashboard"): the page sends a Content-Security-Policy that allows only
this server's own script, style and ``fetch`` targets; the script inserts nothing as HTML.
With an auth string, the page answers 401 with ``WWW-Authenticate: Basic`` (the browser asks
for it) and the API accepts the browser's Basic credentials: the auth string ``user:password``
is that user name and password; an auth string without ``:`` is the password, with any user
name.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import mimetypes
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from .core import Conflict, Core, NotFound
from .listing import task_key_summaries, worker_info
from .models import STATE_TYPES, TERMINAL, ValidationError, iso, parse_time
from .validation import SQLITE_MAX_INT, check_uuid

logger = logging.getLogger("sync_worker.server.dashboard")

UI_DIR = Path(__file__).resolve().parent / "ui"

#: what the page may load and call: its own files and this server's API, nothing inline
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
UI_HEADERS = [
    ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
    ("Cache-Control", "no-cache"),
]

#: throughput chart: this many seconds, in buckets of BUCKET_SECONDS
WINDOW_SECONDS = 15 * 60
BUCKET_SECONDS = 10
#: runs per page of the Runs table (default and largest)
PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
#: parameters are shown when their JSON has at most this many characters
SHOW_PARAMETERS_LIMIT = 4096
#: results and tracebacks longer than this are cut (the page says so)
SHOW_RESULT_LIMIT = 64 * 1024

Response = tuple[str, list[tuple[str, str]], bytes]


# -- auth ----------------------------------------------------------------------------------------
def basic_matches(auth_string: str | None, header: str | None) -> bool:
    """Does ``header`` carry the browser's Basic credentials for ``auth_string``?

    ``Authorization: Basic base64(auth_string)`` (what sync_worker and Prefect clients send) is
    checked by :meth:`Core.check_authorization`; this accepts, in addition, for an auth string
    without ``:``, ``base64(<any user name>:<auth string>)``: a browser's prompt always sends
    ``user:password``."""
    if auth_string is None or not header or ":" in auth_string:
        return False
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return False
    _user, sep, password = decoded.partition(":")
    return bool(sep) and hmac.compare_digest(password.encode(), auth_string.encode())


def unauthorized_page() -> Response:
    body = (b"<!doctype html><title>sync-worker: authentication required</title>"
            b"<p>This sync-worker server requires its auth string. Reload the page and enter it in the "
            b"browser's prompt (see the README, section Dashboard).</p>")
    return "401 Unauthorized", [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body))),
                                ("WWW-Authenticate", 'Basic realm="sync-worker", charset="UTF-8"'),
                                *UI_HEADERS], body


# -- static files --------------------------------------------------------------------------------
class StaticFiles:
    """The files of ``ui/``, read once (a few kilobytes) and served from memory."""

    def __init__(self, root: Path = UI_DIR) -> None:
        self.files: dict[str, tuple[str, bytes]] = {}
        if root.is_dir():
            for path in sorted(root.iterdir()):
                if path.is_file() and not path.name.startswith("."):
                    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
                    if kind.startswith("text/") or kind in ("application/javascript", "image/svg+xml"):
                        kind += "; charset=utf-8"
                    self.files[path.name] = (kind, path.read_bytes())
        if "index.html" not in self.files:  # pragma: no cover - a broken installation
            logger.warning("dashboard files are missing from %s: the dashboard cannot be served", root)

    def response(self, name: str) -> Response | None:
        item = self.files.get(name)
        if item is None:
            return None
        kind, data = item
        return "200 OK", [("Content-Type", kind), ("Content-Length", str(len(data))), *UI_HEADERS], data


# -- overview ------------------------------------------------------------------------------------
def overview(db: Any, subscribers: Any, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    keys = task_key_summaries(db, now)
    workers = [worker(sub) for sub in list(subscribers)]
    return {"time": iso(now), "task_keys": sorted(keys.values(), key=lambda k: k["task_key"]),
            "workers": sorted(workers, key=lambda w: (w["connected_since"] or "", w["client_id"] or "")),
            "throughput": throughput(db, now)}


def worker(sub: Any) -> dict[str, Any]:
    """What the dashboard shows of a subscribed worker connection."""
    info = worker_info(sub)
    connected = getattr(sub, "connected_at", None)
    info["connected_since"] = iso(connected) if connected else None
    return info


def throughput(db: Any, now: float) -> dict[str, Any]:
    """Runs that entered COMPLETED or FAILED/CRASHED per 10 s over the last 15 minutes, oldest
    bucket first. Buckets are the 10-second slices of UTC time (timestamps are ISO texts:
    their first 18 characters, ``YYYY-MM-DDTHH:MM:S``, name the slice)."""
    end = (int(now) // BUCKET_SECONDS + 1) * BUCKET_SECONDS
    start = end - WINDOW_SECONDS
    names = [iso(start + i * BUCKET_SECONDS)[:18] for i in range(WINDOW_SECONDS // BUCKET_SECONDS)]
    index = {name: i for i, name in enumerate(names)}
    completed = [0] * len(names)
    failed = [0] * len(names)
    for bucket, state_type, count in db.read_all(
            "SELECT substr(timestamp, 1, 18) AS bucket, type, count(*) FROM task_run_states "
            "WHERE (type = 'COMPLETED' OR type = 'FAILED' OR type = 'CRASHED') AND timestamp >= ? "
            "GROUP BY bucket, type", [iso(start)]):
        i = index.get(bucket)
        if i is None:
            continue  # a timestamp in the future, or not in our format
        if state_type == "COMPLETED":
            completed[i] += count
        else:
            failed[i] += count
    return {"start": iso(start), "end": iso(end), "bucket_seconds": BUCKET_SECONDS,
            "completed": completed, "failed": failed}


# -- runs ----------------------------------------------------------------------------------------
def _one(params: dict[str, list[str]], name: str) -> str | None:
    values = [v for v in params.get(name, []) if v != ""]
    return values[-1] if values else None


def _whole(params: dict[str, list[str]], name: str, low: int, high: int = SQLITE_MAX_INT) -> int | None:
    text = _one(params, name)
    if text is None:
        return None
    if not text.isascii():  # int() also reads other scripts' digits ("５")
        raise ValidationError(["query", name], "Input should be a whole number", "int_parsing", text)
    try:
        value = int(text)
    except ValueError:
        raise ValidationError(["query", name], "Input should be a whole number", "int_parsing", text) from None
    if not low <= value <= high:
        raise ValidationError(["query", name], f"Input should be a whole number from {low} to {high}", "range", value)
    return value


def _created_at(db: Any, seq: int) -> str | None:
    rows = db.read_all("SELECT json_extract(data, '$.created') FROM task_runs WHERE seq >= ? ORDER BY seq LIMIT 1",
                       [seq])
    return rows[0][0] if rows else None


def _first_seq_created_after(db: Any, moment: str) -> int:
    """The smallest ``seq`` of a run created at or after ``moment`` (runs are numbered in
    creation order, so a bisection over ``seq`` finds it in ~17 point reads at 100,000 runs)."""
    bounds = db.read_all("SELECT min(seq), max(seq) FROM task_runs", [])
    low, high = bounds[0] if bounds and bounds[0][0] is not None else (1, 0)
    high += 1  # one past the last run: "none created after"
    while low < high:
        middle = (low + high) // 2
        created = _created_at(db, middle)
        if created is None or created >= moment:
            high = middle
        else:
            low = middle + 1
    return low


#: a filtered listing reads the matching runs through the (task_key, state_type) index and sorts
#: them when at most this many match; more matches are found faster by walking the runs newest
#: first (about PAGE_SIZE x runs / matches rows per page)
SORT_AT_MOST = 5000
#: with more task keys than this, filters walk the runs (an IN list of every key is too long)
MAX_KEYS_IN_LIST = 500


def _task_keys(db: Any) -> list[str]:
    """The task keys in the database, in order, one index seek each (at most
    MAX_KEYS_IN_LIST + 1; ``SELECT DISTINCT`` would read the whole index)."""
    keys: list[str] = []
    while len(keys) <= MAX_KEYS_IN_LIST:
        row = db.read_all("SELECT min(task_key) FROM task_runs WHERE task_key > ?", [keys[-1] if keys else ""])
        if not row or row[0][0] is None:
            break
        keys.append(row[0][0])
    return keys


#: the states in which a run's code executes (CANCELLING: until its worker stops it): a run's
#: run time is the time it spent in them
RUNNING_TYPES = ("RUNNING", "CANCELLING")


def run_time(states: list[tuple[str, str]], run: dict[str, Any]) -> dict[str, Any] | None:
    """How long a run has run: ``{"seconds": s, "since": t}`` from its states ``(type,
    timestamp)``, oldest first. ``seconds`` sums the RUNNING and CANCELLING states that have
    ended; ``since`` is the start of the current state when the run is RUNNING or CANCELLING
    (the page adds the time since then, so the answer stays the same while the run runs and
    the page is not redrawn at every poll). None for a run that never ran.

    Why not the run's ``total_run_time``: it is its end time less its first start, which
    counts the waits for a retry (AwaitingRetry) between the attempts."""
    seconds, since, ran = 0.0, None, False
    durations = _durations([timestamp for _type, timestamp in states])
    for i, ((state_type, timestamp), duration) in enumerate(zip(states, durations, strict=True)):
        if state_type not in RUNNING_TYPES:
            continue
        ran = True
        if i + 1 == len(states):
            since = timestamp
        elif duration is not None:  # (None: a time that does not parse; the server wrote them)
            seconds += max(0.0, duration)
    if not ran:
        if run.get("start_time") and run.get("total_run_time"):  # a history that lost its RUNNING rows
            return {"seconds": run["total_run_time"], "since": None}
        return None
    return {"seconds": round(seconds, 6), "since": since}


def _run_times(db: Any, runs: list[tuple[int, dict[str, Any]]]) -> dict[int, dict[str, Any] | None]:
    """:func:`run_time` of a page of runs ``(seq, run)``: one read of the states of the runs
    that have started (the history's key is (run_seq, seq): one seek per run)."""
    started = [seq for seq, run in runs if run.get("start_time")]
    states: dict[int, list[tuple[str, str]]] = {seq: [] for seq, _run in runs}
    if started:
        for run_seq, state_type, timestamp in db.read_all(
                f"SELECT run_seq, type, timestamp FROM task_run_states WHERE run_seq IN "
                f"({', '.join('?' * len(started))}) ORDER BY run_seq, seq", started):
            states[run_seq].append((state_type, timestamp))
    return {seq: run_time(states[seq], run) if run.get("start_time") else None for seq, run in runs}


def list_runs(db: Any, query_string: str) -> dict[str, Any]:
    """A page of runs, newest first, with the number of runs that match (see the module
    docstring). Every query reads an index or walks ``seq`` from a bound: the cost of a page
    does not grow with its depth."""
    params = parse_qs(query_string, keep_blank_values=True)
    state = _one(params, "state")
    if state is not None and state not in STATE_TYPES:
        raise ValidationError(["query", "state"], f"Input should be one of {', '.join(sorted(STATE_TYPES))}",
                              "enum", state)
    task_key = _one(params, "task_key")
    limit = _whole(params, "limit", 1, MAX_PAGE_SIZE) or PAGE_SIZE
    before = _whole(params, "before", 0)
    after = _whole(params, "after", 0, SQLITE_MAX_INT - 1)  # (the page starts at after + 1)
    if before is not None and after is not None:
        raise ValidationError(["query", "after"], "Give 'before' or 'after', not both", "value_error")
    # a time range on the creation time becomes a range of seq (creation order)
    low, high = 0, None
    for name in ("since", "until"):
        text = _one(params, name)
        if text is not None:
            seq = _first_seq_created_after(db, iso(parse_time(text, ["query", name])))
            if name == "since":
                low = seq
            else:
                high = seq
    # the creation-time range, as seq bounds: low inclusive, high exclusive (None: no bound)
    range_sql = "seq >= ?" + (" AND seq < ?" if high is not None else "")
    range_args: list[Any] = [low] + ([high] if high is not None else [])
    filtered = task_key is not None or state is not None
    ranged = bool(low) or high is not None
    keys = ([task_key] if task_key is not None else _task_keys(db)) if filtered or ranged else []
    all_states = sorted(STATE_TYPES)
    where, where_args, source, total = "1", [], "task_runs", None  # where: the filters without the range
    if not filtered:  # every run: walk them by seq
        if not ranged:  # SQLite counts a table in its smallest index
            total = int(db.read_all("SELECT count(*) FROM task_runs", [])[0][0])
        elif len(keys) <= MAX_KEYS_IN_LIST:  # one index seek per (key, state): reads only the range
            total = int(db.read_all(
                f"SELECT count(*) FROM task_runs WHERE task_key IN ({', '.join('?' * len(keys))}) AND state_type IN "
                f"({', '.join('?' * len(all_states))}) AND {range_sql}", [*keys, *all_states, *range_args])[0][0])
    elif len(keys) <= MAX_KEYS_IN_LIST:
        states = [state] if state is not None else all_states
        where = f"task_key IN ({', '.join('?' * len(keys))}) AND state_type IN ({', '.join('?' * len(states))})"
        where_args = [*keys, *states]
        total = int(db.read_all(f"SELECT count(*) FROM task_runs WHERE {where} AND {range_sql}",
                                [*where_args, *range_args])[0][0])
        if total <= SORT_AT_MOST:  # few matches: read them through the index and sort them
            source = "task_runs INDEXED BY ix_task_runs_key_state"
        else:  # many: walk the runs by seq, testing each (``+`` keeps SQLite off the index)
            where = where.replace("task_key IN", "+task_key IN").replace("state_type IN", "+state_type IN")
    else:  # more task keys than an IN list should hold: walk the runs by seq
        where, where_args = "+state_type = ?", [state]

    def between(first: int, last: int | None, order: str, count: int) -> list[tuple[Any, ...]]:
        """Matching runs with first <= seq < last: one range on seq per query (with two lower
        bounds, SQLite would walk from the looser one)."""
        bound = "seq >= ?" + (" AND seq < ?" if last is not None else "")
        return db.read_all(f"SELECT seq, data FROM {source} WHERE {where} AND {bound} ORDER BY seq {order} LIMIT ?",
                           [*where_args, first, *([last] if last is not None else []), count])

    if after is not None:  # a newer page: the runs just after `after`, shown newest first
        rows = between(max(low, after + 1), high, "ASC", limit + 1)
        has_newer = len(rows) > limit
        rows = rows[:limit][::-1]
        has_older = bool(rows) and bool(between(low, rows[-1][0], "DESC", 1))
    else:
        top = before if high is None else (high if before is None else min(high, before))
        rows = between(low, top, "DESC", limit + 1)
        has_older = len(rows) > limit
        rows = rows[:limit]
        has_newer = before is not None and bool(rows) and bool(between(rows[0][0] + 1, high, "ASC", 1))
    read = [(seq, json.loads(data)) for seq, data in rows]
    times = _run_times(db, read)
    runs = []
    for seq, run in read:
        state_obj = run.get("state") or {}
        runs.append({"seq": seq, "id": run.get("id"), "name": run.get("name"), "task_key": run.get("task_key"),
                     "state_type": state_obj.get("type"), "state_name": state_obj.get("name"),
                     "created": run.get("created"), "start_time": run.get("start_time"),
                     "end_time": run.get("end_time"), "run_count": run.get("run_count", 0),
                     "total_run_time": run.get("total_run_time"), "run_time": times[seq]})
    return {"runs": runs, "total": total, "limit": limit,
            "older": runs[-1]["seq"] if runs and has_older else None,
            "newer": runs[0]["seq"] if runs and has_newer else None}


# -- one run -------------------------------------------------------------------------------------
def _record_on_server(db: Any, key: str) -> bytes | None:
    rows = db.read_all("SELECT data FROM records WHERE key = ?", [key.replace("/", ".")])
    return bytes(rows[0][0]) if rows else None


def _decode_record(record: Any) -> tuple[Any, str | None]:
    """(value, None) for a JSON record, (None, why not) otherwise. Never unpickles."""
    try:
        if isinstance(record, (bytes, str)):
            record = json.loads(record)
        serializer = record["metadata"]["serializer"]["type"]
        payload = record["result"]
    except RecursionError:  # a hostile record must not turn the run page into a 500
        return None, "JSON nested too deeply to show"
    except (ValueError, KeyError, TypeError):
        return None, "not a record this server can read"
    if serializer != "json":
        return None, f"serialized with {serializer!r}; not shown (the server never unpickles)"
    try:
        value = json.loads(payload) if isinstance(payload, str) else payload
        json.dumps(value)  # values too deep to encode again are refused here, not as a 500 later
        return value, None
    except RecursionError:
        return None, "JSON nested too deeply to show"
    except ValueError:
        return None, "not valid JSON"


def _parameters(db: Any, run: dict[str, Any]) -> dict[str, Any]:
    """``value`` (the parameters, for API clients), ``note`` (why they are not shown) and
    ``text``: the parameters as the page shows them, written here because the page's
    JSON.parse would turn 2**64 + 1 into the double 18446744073709551616 (null with a note)."""
    details = (run.get("state") or {}).get("state_details") or {}
    params_id = details.get("task_parameters_id")
    if not params_id:
        return {"value": {}, "note": None, "text": "{}"}
    raw = _record_on_server(db, "parameters/" + str(params_id))
    if raw is None:
        if (run.get("state") or {}).get("type") == "COMPLETED":
            return {"value": None, "note": "deleted when the run completed", "text": None}
        return {"value": None, "note": "kept in the submitter's store (SYNC_WORKER_STORAGE), not on this server",
                "text": None}
    value, why = _decode_record(raw)
    if why is not None:
        return {"value": None, "note": why, "text": None}
    parameters = value.get("parameters") if isinstance(value, dict) and "parameters" in value else value
    text = json.dumps(parameters, ensure_ascii=False)  # the limit counts characters, not \u escapes
    if len(text) > SHOW_PARAMETERS_LIMIT:
        return {"value": None, "note": f"{len(text)} characters of JSON: more than {SHOW_PARAMETERS_LIMIT}, not shown",
                "text": None}
    return {"value": parameters, "note": None, "text": json.dumps(parameters, indent=2, ensure_ascii=False)}


def _cut(text: str) -> str:
    if len(text) <= SHOW_RESULT_LIMIT:
        return text
    return text[:SHOW_RESULT_LIMIT] + f"\n... ({len(text) - SHOW_RESULT_LIMIT} more characters not shown)"


def _outcome(db: Any, run: dict[str, Any]) -> dict[str, Any]:
    state = run.get("state") or {}
    if state.get("type") not in TERMINAL:
        return {}
    data = state.get("data")
    if data is None:
        return {"note": "the final state carries no result"}
    if isinstance(data, dict) and "result" in data and "metadata" in data:
        value, why = _decode_record(data)
    elif isinstance(data, dict) and isinstance(data.get("storage_key"), str):
        key = data["storage_key"]
        raw = None if key.startswith("/") else _record_on_server(db, key)
        if raw is None:
            return {"note": f"stored outside this server ({key}); see `sync-worker runs show {run.get('id')}`"}
        value, why = _decode_record(raw)
    else:
        return {"note": "the final state's data names no result"}
    if why is not None:
        return {"note": why}
    if state.get("type") == "COMPLETED":
        text = json.dumps(value, indent=2, default=repr, ensure_ascii=False)  # "é", not "\u00e9"
        return {"result": _cut(text)}
    if isinstance(value, dict) and "traceback" in value:
        return {"error_type": str(value.get("type") or ""), "error_message": _cut(str(value.get("message") or "")),
                "traceback": _cut(str(value.get("traceback") or ""))}
    return {"result": _cut(json.dumps(value, indent=2, default=repr, ensure_ascii=False))}


def _durations(timestamps: list[str]) -> list[float | None]:
    """The seconds from each state's timestamp to the next one's, oldest first (None for the
    last state, and next to a time that does not parse)."""
    times: list[float | None] = []
    for timestamp in timestamps:
        try:
            times.append(float(parse_time(timestamp, [])))
        except ValidationError:
            times.append(None)
    return [end - start if start is not None and end is not None else None
            for start, end in zip(times, times[1:] + [None], strict=True)]


def _history(states: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    durations = _durations([state[3] for state in states])
    return [{"id": state_id, "type": state_type, "name": name, "timestamp": timestamp, "message": message,
             "duration_seconds": round(duration, 6) if duration is not None else None}
            for (state_id, state_type, name, timestamp, message), duration in zip(states, durations, strict=True)]


def run_details(db: Any, run_id: str) -> dict[str, Any]:
    run_id = check_uuid(run_id, ["path", "id"])
    rows = db.read_all("SELECT data FROM task_runs WHERE id = ?", [run_id])
    if not rows:
        raise NotFound("Task not found")
    run = json.loads(rows[0][0])
    states = db.read_states(run_id)
    return {"task_run": run, "states": _history(states), "parameters": _parameters(db, run),
            "outcome": _outcome(db, run), "run_time": run_time([(s[1], s[3]) for s in states], run)}


def retry_run(core: Core, run_id: str) -> dict[str, Any]:
    """A new run of the same task with the same parameters; the old run is left as it is."""
    from sync_worker.schemas import Scheduled

    run_id = check_uuid(run_id, ["path", "id"])
    rows = core.db.read_all("SELECT data FROM task_runs WHERE id = ?", [run_id])  # type: ignore[attr-defined]
    if not rows:
        raise NotFound("Task not found")
    old = json.loads(rows[0][0])
    state = old.get("state") or {}
    if state.get("type") not in TERMINAL:
        raise Conflict(f"Task run {run_id} is {state.get('type')}: only a finished run (COMPLETED, FAILED, "
                       "CANCELLED, CRASHED) can be retried")
    params_id = (state.get("state_details") or {}).get("task_parameters_id")
    new_params_id = params_id
    parameters = "none"
    if params_id:
        raw = _record_on_server(core.db, "parameters/" + params_id)
        if raw is not None:
            new_params_id = str(uuid.uuid4())
            try:
                record = json.loads(raw)
                if isinstance(record.get("metadata"), dict):
                    record["metadata"]["storage_key"] = new_params_id
                raw = json.dumps(record).encode()
            except (ValueError, AttributeError):
                pass  # not ours to fix: copied as it is
            core.put_record(("parameters/" + new_params_id).replace("/", "."), raw)
            parameters = "copied"
        elif state.get("type") == "COMPLETED":
            raise Conflict(f"cannot retry {run_id}: its parameters were deleted when it completed")
        else:
            parameters = "shared"  # in the submitter's store: the new run reads the same record
    body = {
        "name": old.get("name") or old.get("task_key"),
        "task_key": old.get("task_key"),
        "dynamic_key": str(uuid.uuid4()),
        "state": Scheduled(task_parameters_id=new_params_id).to_json(),
        "empirical_policy": old.get("empirical_policy") or {},
        "tags": old.get("tags") or [],
        "labels": old.get("labels") or {},  # e.g. who reads the result (schemas.INLINE_RESULTS_LABEL)
        "task_inputs": old.get("task_inputs") or {},
    }
    new = json.loads(core.create_task_run(body))
    logger.info("retry %s: new run %s (parameters %s)", run_id, new.get("id"), parameters)
    return {"retried": run_id, "task_run": new, "parameters": parameters}
