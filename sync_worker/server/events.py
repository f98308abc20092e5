"""Prefect's event endpoints on the embedded server: ``/api/events/in``, ``/api/events/out``
and ``POST /api/events``.

Why: Prefect 3.8's own task engine reports task-run states as *events* (client-side
orchestration) on the websocket ``/api/events/in``, and Prefect's callers wait for a run's
final state on ``/api/events/out``. Without these two, Prefect's ``serve()`` runs a task
on this server but the server never learns how it ended, and Prefect's ``future.result()``
never wakes.

Intake (``/api/events/in``, and the same rules for ``POST /api/events``):

- the socket speaks Prefect's handshake: subprotocol ``prefect``, the client's ping is
  answered, ``{"type": "auth", "token": T}`` -> ``{"type": "auth_success"}`` (close 1008 with
  a reason on a missing/wrong token); then one event (JSON object) per text frame.
- an event that is not valid (no id, bad ``occurred``, no ``prefect.resource.id`` ...) is
  dropped with a warning in the server log naming the field; the connection stays open.
  Prefect's client re-sends every unconfirmed event after a reconnect, so closing the
  socket on one bad event would only repeat it forever. A frame that is not a JSON object
  closes the connection (1003): that client does not speak this protocol.
- ``prefect.task-run.*`` events whose resource says ``"prefect.orchestration": "client"``
  (what Prefect's engine sends) are recorded on the run, as Prefect's task-run recorder
  does: the state is ``payload.validated_state`` (its ``data`` kept as sent), with the event
  id as state id and ``occurred`` as timestamp; ``run_count``, ``start_time``,
  ``end_time`` and ``total_run_time`` come from ``payload.task_run``. The newest
  ``occurred`` wins (events of one run come over different connections: the submitter's
  Scheduled event may arrive after the worker's Running), an event id already recorded is
  ignored (clients re-send after a reconnect), and a run in a final state only takes a
  newer final state. A final state releases the worker's lease (the run is not re-queued
  or CRASHED when that worker disconnects) and wakes rpc waiters; a SCHEDULED state (the
  submitter's initial event, Prefect's in-process ``AwaitingRetry``) never (re-)queues the
  run: Prefect's engine retries in-process. Events for runs this server does not know are
  only passed on (this server has no flow runs; Prefect's recorder would create the run).
- every valid event, recorded or not, is passed on to ``/api/events/out`` subscribers.

Out (``/api/events/out``): ping -> auth -> ``auth_success`` (in-band only: Prefect's
subscriber sends no Authorization header), then ``{"type": "filter", "filter": EventFilter,
"backfill": true}``; the server sends ``{"type": "event", "event": ...}`` for every matching
event: first the backfill (events since ``filter.occurred.since``, at most 15 minutes back,
oldest first), then live ones; any false ``backfill`` (``null``, ``0``) means none. An invalid
filter closes with 1002 and the reason, as Prefect does. A ``prefect.task-run.<Completed|Failed|Cancelled|Crashed>`` event is emitted
for every final state this server records however it got there (a worker's ``set_state``,
``force``, a lease running out into CRASHED, cancellation), so a Prefect caller waiting on a
run that a sync_worker worker finished wakes up too.

The filter is matched as Prefect 3.8.8's server matches a live event (its ``includes``):

- refused: unknown keys at any level (Prefect's filter models forbid extras: a misspelt
  criterion would otherwise match everything), ``id.id`` entries that are not UUIDs,
  ``text.query`` over 200 characters, ``order`` other than ``ASC``/``DESC``, a ``null``
  ``occurred``/``id``/``order``, wrong types.
- ``occurred``: ``since`` at most 15 minutes back (the default); given an ``occurred``
  object, ``until`` defaults to the moment the filter is read, so later events are not sent.
  Without ``occurred`` ``until`` stays open (Prefect would close it too; see EventFilter).
- ``id.id``: compared as UUIDs (any spelling). ``event``: exact names and prefixes.
- labels (``resource``, ``related``, ``any_resource``): each value an fnmatch glob (``*``,
  ``?``), ``!glob`` negated, a label matches if any of its values does (``[]``: nothing); a
  label the resource lacks never matches. ``related``/``any_resource`` may be lists (all must
  match). ``related`` is applied as Prefect's backfill query does (its live stream ignores it).
- ``text.query``: Prefect's parser: terms and ``"phrases"`` OR-ed, ``+term`` required,
  ``-term``/``!term`` excluded, case-insensitive substrings of the event name, the label
  values (not keys) of the resource and related resources, and ``str(payload)``.

Events are kept in memory only (the last :data:`MAX_EVENTS`, at most
:data:`MAX_BACKFILL_SECONDS` old, at most about :data:`MAX_EVENT_BYTES`): they are a
notification stream, the run's state is in the database. A server restart loses the backfill;
a Prefect caller that waits across it reads the run again when its ``result(timeout=...)``
expires.

The backfill's size (decision, stop 20): a late Prefect subscriber must still find every
final state of the last 15 minutes, up to the last :data:`MAX_EVENTS` (10,000) events. That
is what Prefect's own ``TaskRunWaiter`` relies on: it subscribes once per process, when the
first future is waited on, and re-subscribes after a lost connection, each time with a
backfill; a final state it misses leaves a ``result()`` without timeout waiting for ever.
Keeping the count and the 15 minutes costs little memory because a final state that no live
subscriber looked at is kept *shelved*: its run id and time only (about
:data:`SHELVED_EVENT_BYTES`), not its run's JSON (about 2 KB, which is what made the backfill
the largest holder of the server's memory). A backfill reads such runs back from the database
and builds their events from the run's current state. Consequences, by design: a run deleted
since (retention, purge, ``DELETE``) is not in the backfill, and a run whose final state was
replaced by a newer one is announced once, with its current state; a run no longer final
(forced back to SCHEDULED) is not announced. Events that came in over ``/api/events/in``, and
final states a live subscriber saw, are kept whole, within :data:`MAX_EVENT_BYTES`.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from fnmatch import fnmatchcase
from typing import Any

import simple_websocket
from simple_websocket.errors import ConnectionClosed

from . import sockets
from .core import Core
from .database import QSTATE_NONE, DatabaseClosed, Transaction
from .sockets import POLICY_VIOLATION, PROTOCOL_ERROR, SERVICE_RESTART, UNSUPPORTED_DATA
from .sockets import Close as _Close
from .sockets import WebSocket as _Socket
from .models import DEFAULT_STATE_NAMES, STATE_TYPES, TERMINAL, ValidationError, iso, make_state, parse_time
from .validation import close_reason

logger = logging.getLogger("sync_worker.server.events")

#: events kept for backfill (newest), and how far back a subscriber may ask (Prefect's
#: PREFECT_EVENTS_MAXIMUM_WEBSOCKET_BACKFILL default: 15 minutes)
MAX_EVENTS = 10_000
MAX_BACKFILL_SECONDS = 15 * 60.0
#: and at most about this many bytes (an event kept whole is counted as its JSON text, a
#: final state kept whole as its run's JSON text, ~2 KB; a shelved one as SHELVED_EVENT_BYTES).
#: With no Prefect subscriber connected, the 10,000 newest final states take ~2.3 MB shelved.
MAX_EVENT_BYTES = 8 * 1024 * 1024
#: what a shelved final-state event (run id + time, see the module docstring) is counted as:
#: measured 229 bytes with tracemalloc (the object, its time, its run id, its deque slot)
SHELVED_EVENT_BYTES = 230
#: event ids remembered to make intake idempotent
MAX_SEEN_IDS = 50_000
#: events a subscriber may have waiting to be sent; a subscriber that falls this far
#: behind is disconnected (Prefect's subscriber reconnects and backfills)
MAX_OUTBOX = 10_000

TRY_AGAIN_LATER = 1013

TASK_RUN_PREFIX = "prefect.task-run."


# --------------------------------------------------------------------------- events


class Event:
    """A validated event: the JSON object to pass on plus what filters look at."""

    __slots__ = ("data", "id", "name", "occurred", "resource", "related", "size", "_source", "_text")

    def __init__(self, data: dict[str, Any], occurred: float, size: int = 0) -> None:
        self.data: dict[str, Any] | None = data
        self.size = size  # approximate JSON size in bytes, for the backfill buffer's budget
        self.id: str = data["id"]
        self.name: str = data["event"]
        self.occurred = occurred
        self.resource: dict[str, str] = data["resource"]
        self.related: list[dict[str, str]] = data["related"]
        self._source: str | None = None
        self._text: str | None = None

    def materialize(self) -> bool:
        """Make sure the fields are there (see :class:`_FinalStateEvent`); False if it cannot."""
        return True

    def text(self) -> str:
        if self._text is None:
            self._text = json.dumps(self.data, separators=(",", ":"))
        return self._text


_NO_LABELS: dict[str, str] = {}  # shared by unbuilt final-state events; never mutated (replaced when built)
_NO_RELATED: list[dict[str, str]] = []


class _FinalStateEvent(Event):
    """The announcement of a final state, built only when somebody looks at it (a live
    subscriber, or a backfill): on the commit path, where every final state passes, it is
    one small object; parsing the run and building the event costs tens of microseconds.

    Once published and seen by no live subscriber it is *shelved* (:meth:`shelve`): the run's
    text is let go and only ``run_id`` and ``occurred`` stay; a backfill builds the event
    again from the database (:meth:`EventBus.subscribe`)."""

    __slots__ = ("run_id",)

    def __init__(self, run_id: str, run_text: str, now: float) -> None:  # (no super().__init__: built lazily)
        self.data = None
        self.run_id = run_id
        self._source = run_text
        self._text = None
        self.size = len(run_text)
        # not earlier than the state's timestamp (set before the commit); exact once built
        self.occurred = now
        self.id = self.name = ""
        self.resource = _NO_LABELS
        self.related = _NO_RELATED

    def shelve(self) -> bool:
        """Let the run's text go unless the event was built (a live subscriber has it); True
        if shelved now."""
        if self.data is not None or self._source is None:
            return False
        self._source = None
        return True

    def materialize(self) -> bool:
        if self.data is not None:
            return True
        source = self._source
        if source is None:
            return False
        try:
            data = final_state_event(json.loads(source))
            occurred = parse_time(data["occurred"], [])
        except (ValueError, KeyError, TypeError, ValidationError):  # pragma: no cover - we wrote the run
            logger.exception("cannot build a final-state event from %.200s", source)
            self._source = None
            return False
        self.id, self.name, self.occurred = data["id"], data["event"], occurred
        self.resource, self.related = data["resource"], data["related"]
        self.data = data  # last: other threads take a set ``data`` to mean "built"
        self._source = None
        return True

    def text(self) -> str:
        self.materialize()
        return super().text()


def _uuid(value: Any, loc: list[Any]) -> str:
    if not isinstance(value, str):
        raise ValidationError(loc, "Input should be a valid UUID string", "uuid_type", value)
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ValidationError(loc, f"Input should be a valid UUID, not {value[:60]!r}", "uuid_parsing") from None


def _resource(value: Any, loc: list[Any]) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValidationError(loc, "Input should be a valid dictionary of string labels", "dict_type", value)
    for key, label in value.items():
        if not isinstance(label, str):
            raise ValidationError(loc + [key], "Input should be a valid string", "string_type", label)
    resource_id = value.get("prefect.resource.id")
    if not resource_id:
        raise ValidationError(loc, "Resources must include a non-empty prefect.resource.id label", "value_error")
    return value


def validate_event(value: Any, loc: list[Any], now: float, size: int = 0) -> Event:
    """One event as Prefect's ``Event`` schema has it; ``received`` is set to ``now``."""
    if not isinstance(value, dict):
        raise ValidationError(loc, "Input should be a valid dictionary (an event object)", "dict_type", value)
    if "id" not in value:
        raise ValidationError(loc + ["id"], "Field required", "missing")
    event_id = _uuid(value["id"], loc + ["id"])
    if "occurred" not in value:
        raise ValidationError(loc + ["occurred"], "Field required", "missing")
    occurred = parse_time(value["occurred"], loc + ["occurred"])
    name = value.get("event")
    if not isinstance(name, str) or not name:
        raise ValidationError(loc + ["event"], "Field required: a non-empty event name", "missing")
    resource = _resource(value.get("resource"), loc + ["resource"])
    related = value.get("related") or []
    if not isinstance(related, list):
        raise ValidationError(loc + ["related"], "Input should be a valid list", "list_type", related)
    for i, item in enumerate(related):
        _resource(item, loc + ["related", i])
    payload = value.get("payload") or {}
    if not isinstance(payload, dict):
        raise ValidationError(loc + ["payload"], "Input should be a valid dictionary", "dict_type", payload)
    follows = value.get("follows")
    if follows is not None:
        follows = _uuid(follows, loc + ["follows"])
    data = {
        "occurred": value["occurred"],
        "event": name,
        "resource": resource,
        "related": related,
        "payload": payload,
        "id": event_id,
        "follows": follows,
        "received": iso(now),
    }
    return Event(data, occurred, size)


def _task_run_id(event: Event) -> str | None:
    """The run an event of Prefect's client-side orchestration is about, else None."""
    if not event.name.startswith(TASK_RUN_PREFIX) or event.resource.get("prefect.orchestration") != "client":
        return None
    resource_id = event.resource["prefect.resource.id"]
    if not resource_id.startswith(TASK_RUN_PREFIX):
        return None
    try:
        return str(uuid.UUID(resource_id[len(TASK_RUN_PREFIX):]))
    except ValueError:
        return None


def _event_state(event: Event, run_id: str) -> dict[str, Any]:
    """The run state an event records (``payload.validated_state``); ValidationError if the
    payload has none that is valid."""
    loc = ["payload", "validated_state"]
    value = event.data["payload"].get("validated_state")
    if not isinstance(value, dict):
        raise ValidationError(loc, "Field required: a task-run event needs the state it validated", "missing")
    state_type = value.get("type")
    if state_type not in STATE_TYPES:
        raise ValidationError(loc + ["type"], f"{state_type!r} is not a valid state type", "enum", state_type)
    details = value.get("state_details") or {}
    if not isinstance(details, dict):
        raise ValidationError(loc + ["state_details"], "Input should be a valid dictionary", "dict_type", details)
    name = value.get("name")
    message = value.get("message")
    state = make_state(state_type, run_id, event.occurred,
                       name=name if isinstance(name, str) and name else DEFAULT_STATE_NAMES[state_type],
                       message=message if isinstance(message, str) else None,
                       data=value.get("data"), details=details)
    state["id"] = event.id
    state["timestamp"] = iso(event.occurred)
    return state


_RUN_FIELDS = ("run_count", "start_time", "end_time", "total_run_time")


def _apply_state(run: dict[str, Any], state: dict[str, Any], event: Event) -> None:
    run["state"] = state
    run["state_id"] = state["id"]
    run["state_name"] = state["name"]
    run["state_type"] = state["type"]
    run["updated"] = iso(time.time())
    if state["type"] == "SCHEDULED":
        scheduled = state["state_details"].get("scheduled_time")
        if scheduled:
            run["next_scheduled_start_time"] = scheduled
            run["expected_start_time"] = scheduled
    else:
        run["next_scheduled_start_time"] = None
    task_run = event.data["payload"].get("task_run")
    if isinstance(task_run, dict):
        for name in _RUN_FIELDS:
            if name in task_run and task_run[name] is not None:
                run[name] = task_run[name]
    if state["type"] in TERMINAL and not run.get("end_time"):
        run["end_time"] = state["timestamp"]


def final_state_event(run: dict[str, Any]) -> dict[str, Any]:
    """The ``prefect.task-run.<Type>`` event announcing a final state this server recorded.

    Named after the state *type* (what Prefect's TaskRunWaiter filters on: a COMPLETED
    state named "Cached" still wakes it); the real name is in the resource and the state.
    """
    state = run["state"]
    state_type = state["type"]
    message = state.get("message") or ""
    return {
        "occurred": state["timestamp"],
        "event": TASK_RUN_PREFIX + state_type.title(),
        "resource": {
            "prefect.resource.id": TASK_RUN_PREFIX + run["id"],
            "prefect.resource.name": str(run.get("name") or run.get("task_key") or ""),
            "prefect.run-count": str(run.get("run_count", 0)),
            "prefect.state-message": message,
            "prefect.state-name": state["name"],
            "prefect.state-timestamp": state["timestamp"],
            "prefect.state-type": state_type,
            "prefect.orchestration": "server",
        },
        "related": [],
        "payload": {
            "intended": {"from": None, "to": state_type},
            "initial_state": None,
            "validated_state": {
                "type": state_type,
                "name": state["name"],
                "message": message,
                "state_details": state.get("state_details") or {},
                "data": state.get("data"),
            },
            "task_run": {name: run.get(name) for name in ("name", "task_key", "dynamic_key", *_RUN_FIELDS)},
        },
        "id": state["id"],
        "follows": None,
        "received": iso(time.time()),
    }


# --------------------------------------------------------------------------- filters
#
# Prefect 3.8.8's server-side EventFilter (prefect/server/events/filters.py): its models
# refuse unknown keys (extra="forbid"), and a subscriber is matched with their ``includes``.


def _fields(value: Any, loc: str, allowed: frozenset[str]) -> dict[str, Any]:
    """A filter object's keys, refusing unknown ones: a misspelt criterion must not be
    silently ignored (the subscriber would get every event)."""
    if not isinstance(value, dict):
        raise ValueError(f"{loc}: Input should be a valid dictionary")
    for key in value:
        if key not in allowed:
            where = f"{loc}.{key}" if loc != "filter" else str(key)
            raise ValueError(f"{where[:60]}: Extra inputs are not permitted")
    return value


def _str_list(value: Any, loc: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{loc}: Input should be a valid list of strings")
    return value


def _labels(value: Any, loc: str) -> dict[str, list[str]] | None:
    """Prefect's ResourceSpecification: label -> a pattern or a list of patterns."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{loc}: Input should be a valid dictionary of labels")
    labels: dict[str, list[str]] = {}
    for key, expected in value.items():
        values = [expected] if isinstance(expected, str) else expected
        if not isinstance(values, list) or not all(isinstance(item, str) for item in values):
            raise ValueError(f"{loc}.{key}: Input should be a string or a list of strings")
        labels[key] = values
    return labels


_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})


def _bool(value: Any, loc: str) -> bool:
    """A boolean as pydantic (lax) reads one: ``distinct`` is one and Prefect refuses others."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    raise ValueError(f"{loc}: Input should be a valid boolean")


_NUMBER = re.compile(r"[0-9]+(\.[0-9]*)?")


def _time(value: Any, loc: str) -> float:
    """``occurred.since``/``until``: ISO 8601, or epoch seconds (milliseconds past 2e10), as
    pydantic reads a datetime."""
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        number = float(value)
    if number is not None:
        return number / 1000 if abs(number) > 2e10 else number
    try:
        return float(parse_time(value, loc.split(".")))
    except ValidationError as exc:
        raise ValueError(exc.detail) from None


def _label_matches(actual: str | None, patterns: list[str]) -> bool:
    """Prefect's label matching: each pattern is an fnmatch glob (``*``, ``?``, ``[...]``),
    ``!pattern`` matches what the glob does not; the label matches if ANY pattern does (an
    empty list: nothing). A label the resource lacks never matches, negated or not."""
    if actual is None:
        return False
    return any((not fnmatchcase(actual, p[1:])) if p.startswith("!") else fnmatchcase(actual, p)
               for p in patterns)


_RESOURCE_KEYS = frozenset({"id", "id_prefix", "labels", "distinct"})
_RELATED_KEYS = frozenset({"id", "role", "resources_in_roles", "labels"})
_ANY_RESOURCE_KEYS = frozenset({"id", "id_prefix", "labels"})


class _ResourceFilter:
    """``resource``, one ``related`` or one ``any_resource`` criterion: all its parts must
    match one resource."""

    def __init__(self, value: Any, loc: str, keys: frozenset[str]) -> None:
        fields = _fields(value, loc, keys)
        self.ids = _str_list(fields.get("id"), f"{loc}.id")
        self.prefixes = _str_list(fields.get("id_prefix"), f"{loc}.id_prefix")
        self.roles = _str_list(fields.get("role"), f"{loc}.role")
        self.in_roles: list[tuple[str, str]] | None = None
        pairs = fields.get("resources_in_roles")
        if pairs is not None:
            if not isinstance(pairs, list) or not all(
                    isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) for s in p) for p in pairs):
                raise ValueError(f"{loc}.resources_in_roles: Input should be a list of [resource id, role] pairs")
            self.in_roles = [(p[0], p[1]) for p in pairs]
        self.labels = _labels(fields.get("labels"), f"{loc}.labels")
        if "distinct" in fields:
            _bool(fields["distinct"], f"{loc}.distinct")  # validated only: it orders a query

    def matches(self, resource: dict[str, str]) -> bool:
        resource_id = resource.get("prefect.resource.id", "")
        if self.ids and resource_id not in self.ids:
            return False
        if self.prefixes and not any(resource_id.startswith(p) for p in self.prefixes):
            return False
        role = resource.get("prefect.resource.role")
        if self.roles and role not in self.roles:
            return False
        if self.in_roles and (resource_id, role) not in self.in_roles:
            return False
        if self.labels and not all(_label_matches(resource.get(k), v) for k, v in self.labels.items()):
            return False
        return True


def _resource_filters(value: Any, loc: str, keys: frozenset[str]) -> list[_ResourceFilter]:
    """``related``/``any_resource``: one criterion or a list of them (all must match)."""
    if value is None:
        return []
    if isinstance(value, list):
        return [_ResourceFilter(item, f"{loc}.{i}", keys) for i, item in enumerate(value)]
    return [_ResourceFilter(value, loc, keys)]


class TextQuery:
    """Prefect's text search query (server/utilities/text_search_parser.py): plain terms
    and ``"quoted phrases"`` are OR-ed, ``+term`` is required, ``-term``/``!term`` excluded;
    case-insensitive substrings. A sign followed by a space (or nothing) is ignored; inside a
    phrase ``\\"`` is a quote and ``\\\\`` a backslash."""

    def __init__(self, query: str) -> None:
        self.include: list[str] = []
        self.required: list[str] = []
        self.exclude: list[str] = []
        by_sign = {"": self.include, "+": self.required, "-": self.exclude, "!": self.exclude}
        i, n = 0, len(query)
        while i < n:
            if query[i].isspace():
                i += 1
                continue
            sign = ""
            if query[i] in "-!+":
                if i + 1 == n or query[i + 1].isspace():
                    i += 1  # a lone sign
                    continue
                sign = query[i]
                i += 1
            if query[i] == '"':
                end = i + 1
                while end < n and query[end] != '"':
                    end += 2 if query[end] == "\\" and end + 1 < n else 1
                term = _UNESCAPE.sub(r"\1", query[i + 1:end])  # an unclosed phrase runs to the end
                i = end + 1
                if not term.strip():
                    continue
            else:
                end = i
                while end < n and not query[end].isspace() and query[end] != '"':
                    end += 1
                term, i = query[i:end], end
            by_sign[sign].append(term.lower())

    def matches(self, text: str) -> bool:
        """``text``: already lower-cased."""
        if self.include and not any(term in text for term in self.include):
            return False
        if any(term in text for term in self.exclude):
            return False
        return all(term in text for term in self.required)


_UNESCAPE = re.compile(r'\\(["\\])')


def _searchable_text(event: Event) -> str:
    """What Prefect's text filter searches: the event name, the label VALUES of the resource
    and related resources (not their keys) and ``str(payload)`` (Python's repr), lower-cased."""
    parts = [event.name, *event.resource.values()]
    for related in event.related:
        parts.extend(related.values())
    parts.append(str(event.data["payload"] if event.data is not None else {}))
    return " ".join(parts).lower()


_FILTER_KEYS = frozenset({"occurred", "event", "resource", "related", "any_resource", "id", "text", "order"})
_OCCURRED_KEYS = frozenset({"since", "until"})
_EVENT_KEYS = frozenset({"prefix", "exclude_prefix", "name", "exclude_name"})
MAX_TEXT_QUERY = 200  # Prefect's EventTextFilter.query max_length


class EventFilter:
    """Prefect's server-side ``EventFilter`` (what ``/api/events/out`` subscribers send);
    ValueError names a bad field, as Prefect refuses the filter (1002 ``Invalid filter``).

    Time window: ``since`` defaults to 15 minutes back and is never earlier (Prefect's default,
    180 days, clamped to PREFECT_EVENTS_MAXIMUM_WEBSOCKET_BACKFILL); with an ``occurred``
    object, ``until`` defaults to *now* (Prefect's default: later events are not delivered).
    Without ``occurred`` at all ``until`` is open (deliberate: Prefect would close it at now,
    so such a subscriber would get no live event; Prefect's own client always sends
    ``occurred`` with ``until`` a year ahead)."""

    def __init__(self, value: Any, now: float) -> None:
        fields = _fields(value, "filter", _FILTER_KEYS)
        earliest = now - MAX_BACKFILL_SECONDS
        self.since = earliest
        self.until = float("inf")
        if "occurred" in fields:
            occurred = _fields(fields["occurred"], "occurred", _OCCURRED_KEYS)
            if "since" in occurred:
                self.since = max(_time(occurred["since"], "occurred.since"), earliest)
            self.until = _time(occurred["until"], "occurred.until") if "until" in occurred else now
        event = fields.get("event")
        event = {} if event is None else _fields(event, "event", _EVENT_KEYS)
        self.prefixes = _str_list(event.get("prefix"), "event.prefix")
        self.exclude_prefixes = _str_list(event.get("exclude_prefix"), "event.exclude_prefix")
        self.names = set(_str_list(event.get("name"), "event.name") or ()) or None
        self.exclude_names = set(_str_list(event.get("exclude_name"), "event.exclude_name") or ()) or None
        resource = fields.get("resource")
        self.resource = None if resource is None else _ResourceFilter(resource, "resource", _RESOURCE_KEYS)
        self.related = _resource_filters(fields.get("related"), "related", _RELATED_KEYS)
        self.any_resource = _resource_filters(fields.get("any_resource"), "any_resource", _ANY_RESOURCE_KEYS)
        self.ids: set[str] | None = None
        if "id" in fields:
            ids = _str_list(_fields(fields["id"], "id", frozenset({"id"})).get("id"), "id.id")
            try:
                self.ids = {str(uuid.UUID(i)) for i in ids or ()} or None  # any UUID spelling
            except ValueError:
                raise ValueError("id.id: Input should be a list of valid UUIDs") from None
        self.text: TextQuery | None = None
        if fields.get("text") is not None:
            query = _fields(fields["text"], "text", frozenset({"query"})).get("query")
            if not isinstance(query, str):
                raise ValueError("text.query: Field required: a string")
            if len(query) > MAX_TEXT_QUERY:
                raise ValueError(f"text.query: String should have at most {MAX_TEXT_QUERY} characters")
            self.text = TextQuery(query)
        if "order" in fields and fields["order"] not in ("ASC", "DESC"):
            raise ValueError("order: Input should be 'ASC' or 'DESC'")  # events are sent oldest first anyway

    def matches(self, event: Event) -> bool:
        if event.data is None and not event.materialize():
            return False
        if not self.since <= event.occurred <= self.until:
            return False
        name = event.name
        if self.names is not None and name not in self.names:
            return False
        if self.exclude_names is not None and name in self.exclude_names:
            return False
        if self.prefixes and not any(name.startswith(p) for p in self.prefixes):
            return False
        if self.exclude_prefixes and any(name.startswith(p) for p in self.exclude_prefixes):
            return False
        if self.ids is not None and event.id.lower() not in self.ids:
            return False
        if self.resource is not None and not self.resource.matches(event.resource):
            return False
        resources = [event.resource, *event.related]
        if not all(any(f.matches(r) for r in resources) for f in self.any_resource):
            return False
        if not all(any(f.matches(r) for r in event.related) for f in self.related):
            return False
        if self.text is not None and not self.text.matches(_searchable_text(event)):
            return False
        return True


# --------------------------------------------------------------------------- the bus


class _Subscriber:
    """One ``/api/events/out`` connection: matching events wait in an outbox that the
    connection's handler thread sends."""

    def __init__(self, event_filter: EventFilter) -> None:
        self.filter = event_filter
        self.cond = threading.Condition()
        self.outbox: deque[Event] = deque()
        self.overflowed = False
        self.closed = False

    def offer(self, event: Event) -> None:
        if not self.filter.matches(event):
            return
        with self.cond:
            if len(self.outbox) >= MAX_OUTBOX:
                self.overflowed = True
            else:
                self.outbox.append(event)
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()


class EventBus:
    """Event intake (recording task-run states), the backfill buffer and live subscribers."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self._lock = threading.Lock()
        self._events: deque[Event] = deque()
        self._event_bytes = 0
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._subscribers: set[_Subscriber] = set()
        self._sockets: set[simple_websocket.Server] = set()
        self._no_sockets = threading.Condition(self._lock)
        self.closing = False
        self.dropped_logs = 0
        core.finish_listeners.append(self._run_finished)

    # -- publishing --------------------------------------------------------------------------
    def publish(self, event: Event) -> None:
        """Keep ``event`` for backfill and offer it to every live subscriber."""
        now = time.time()
        if not event.size:
            event.size = len(event.text())
        with self._lock:
            self._keep(event, now)
            subscribers = list(self._subscribers)
        for subscriber in subscribers:
            subscriber.offer(event)
        if isinstance(event, _FinalStateEvent):
            self._shelve(event)

    def _keep(self, event: Event, now: float) -> None:
        """Under ``self._lock``: append ``event`` for backfill, dropping the oldest past the
        limits."""
        events = self._events
        events.append(event)
        self._event_bytes += event.size
        while events and (len(events) > MAX_EVENTS or self._event_bytes > MAX_EVENT_BYTES
                          or events[0].occurred < now - MAX_BACKFILL_SECONDS - 60):
            dropped = events.popleft()
            self._event_bytes -= dropped.size
            dropped.size = -1  # gone from the buffer: not counted again by _shelve

    def _shelve(self, event: _FinalStateEvent) -> None:
        """Keep a final state nobody looked at as run id + time only (module docstring)."""
        with self._lock:
            self._shelve_locked(event)

    def _shelve_locked(self, event: _FinalStateEvent) -> None:
        if event.shelve() and event.size > 0:
            self._event_bytes -= event.size - SHELVED_EVENT_BYTES
            event.size = SHELVED_EVENT_BYTES

    def _run_finished(self, run_id: str, text: str) -> None:
        """Core hook (writer thread, after the commit): a final state was recorded. With no
        live subscriber (the usual case) it is kept and shelved under one hold of the lock:
        what :meth:`publish` and :meth:`_shelve` do in turn, without the second hold and the
        offers to nobody."""
        event = _FinalStateEvent(run_id, text, time.time())
        with self._lock:
            if not self._subscribers:
                self._keep(event, event.occurred)
                self._shelve_locked(event)
                return
        self.publish(event)

    def _remember(self, event_id: str) -> bool:
        """False if the id was seen before."""
        with self._lock:
            if event_id in self._seen:
                return False
            self._seen[event_id] = None
            if len(self._seen) > MAX_SEEN_IDS:
                self._seen.popitem(last=False)
            return True

    def _forget(self, event_id: str) -> None:
        with self._lock:
            self._seen.pop(event_id, None)

    # -- intake ------------------------------------------------------------------------------
    def ingest(self, event: Event) -> None:
        """Record a validated event (task-run state) and pass it on; idempotent on its id."""
        if not self._remember(event.id):
            logger.debug("event %s (%s) already received; ignored", event.id, event.name)
            return
        run_id = _task_run_id(event)
        if run_id is not None:
            try:
                state = _event_state(event, run_id)
            except ValidationError as exc:
                logger.warning("task-run event %s (%s) not recorded: %s", event.id, event.name, exc.detail)
            else:
                try:
                    self.core.db.write(self._record_op(run_id, state, event))
                except BaseException:
                    self._forget(event.id)  # not recorded: a re-sent copy must be taken
                    raise
        self.publish(event)

    def _record_op(self, run_id: str, state: dict[str, Any], event: Event) -> Callable[[Transaction], None]:
        core = self.core
        queue = core.queue

        def op(tx: Transaction) -> None:
            row = tx.get_run(run_id)
            if row is None:
                logger.debug("event %s is about task run %s, which this server does not have", event.id, run_id)
                return
            current = row.run.get("state") or {}
            if current.get("id") == event.id:
                return  # recorded before (the client re-sent it)
            try:
                current_time = parse_time(current.get("timestamp"), [])
            except ValidationError:
                current_time = 0.0
            new_type = state["type"]
            if event.occurred <= current_time:
                logger.debug("task run %s: %s event %s is older than its %s state; not recorded", run_id,
                             new_type, event.id, row.state_type)
                return
            if row.state_type in TERMINAL and new_type not in TERMINAL:
                logger.debug("task run %s is %s; %s event %s not recorded", run_id, row.state_type, new_type,
                             event.id)
                return
            previous = row.state_type
            details = state["state_details"]
            if not details.get("task_parameters_id"):
                # as orchestration does: a run re-queued later (its worker died) must still
                # find its parameters, and Prefect's events name them only when scheduling
                details["task_parameters_id"] = (current.get("state_details") or {}).get("task_parameters_id")
            _apply_state(row.run, state, event)
            row.state_type = new_type
            row.touch()
            if new_type == "SCHEDULED":
                pass  # never (re-)queued by an event: a queued run stays queued, a held one held
            elif new_type in TERMINAL:
                row.qstate = QSTATE_NONE
                row.holder = None
                text = row.dump()
                tx.after_commit(lambda: queue.release(run_id))
                tx.after_commit(lambda: core._finished(run_id, text, announce=False))
            elif row.qstate != QSTATE_NONE:
                row.qstate = QSTATE_NONE
                tx.after_commit(lambda: queue.unqueue(run_id))
            tx.update_run(row)
            logger.debug("task run %s: %s -> %s (event %s)", run_id, previous, new_type, event.id)

        return op

    def ingest_body(self, body: Any) -> int:
        """``POST /api/events``: a list of events, all validated before any is recorded."""
        if not isinstance(body, list):
            raise ValidationError(["body"], "Input should be a valid list of events", "list_type", body)
        now = time.time()
        events = [validate_event(item, ["body", i], now) for i, item in enumerate(body)]
        for event in events:
            self.ingest(event)
        return len(events)

    # -- subscribers -------------------------------------------------------------------------
    def subscribe(self, event_filter: EventFilter, backfill: bool) -> tuple[_Subscriber, list[Event]]:
        """Register a subscriber and return the backfill, atomically: an event published
        meanwhile is in exactly one of the two."""
        subscriber = _Subscriber(event_filter)
        with self._lock:  # a copy only: matching may build events, not while publishers wait
            kept = list(self._events) if backfill else []
            self._subscribers.add(subscriber)
        past: list[Event] = []
        announced: set[str] = set()  # event ids: a run rebuilt twice (same current state) is sent once
        try:
            for event in kept:
                if isinstance(event, _FinalStateEvent) and event.data is None:
                    if event.occurred < event_filter.since:
                        continue  # its state's timestamp is not later than ``occurred``
                    # built from its text if not shelved yet (being published right now)
                    if not event.materialize():
                        rebuilt = self._rebuild(event.run_id)
                        if rebuilt is None:
                            continue
                        event = rebuilt
                if event.id not in announced and event_filter.matches(event):
                    past.append(event)
                    announced.add(event.id)
        except BaseException:
            self.unsubscribe(subscriber)
            raise
        past.sort(key=lambda e: e.occurred)
        return subscriber, past

    def _rebuild(self, run_id: str) -> Event | None:
        """The final-state event of a shelved run, built from its committed row; None if the
        run is gone (retention, purge) or no longer in a final state."""
        try:
            row = self.core.db.read_run(run_id)
        except DatabaseClosed:
            raise _Close(SERVICE_RESTART, "Server is shutting down") from None
        if row is None or row.state_type not in TERMINAL:
            return None
        data = final_state_event(row.run)
        try:
            occurred = parse_time(data["occurred"], [])
        except ValidationError:  # pragma: no cover - we wrote the run
            logger.exception("cannot rebuild the final-state event of run %s", run_id)
            return None
        return Event(data, occurred)

    def unsubscribe(self, subscriber: _Subscriber) -> None:
        with self._lock:
            self._subscribers.discard(subscriber)

    def add_socket(self, ws: simple_websocket.Server) -> bool:
        with self._lock:
            if self.closing:
                return False
            self._sockets.add(ws)
            return True

    def remove_socket(self, ws: simple_websocket.Server) -> None:
        with self._lock:
            self._sockets.discard(ws)
            if not self._sockets:
                self._no_sockets.notify_all()

    def close(self, timeout: float = 1.5) -> None:
        """Server stopping: every events connection is closed (1012) by its own handler
        thread, which notices within a quarter of a second; waits for that (bounded), then
        closes what is left itself."""
        with self._lock:
            self.closing = True
            subscribers = list(self._subscribers)
        for subscriber in subscribers:
            subscriber.close()
        with self._lock:
            self._no_sockets.wait_for(lambda: not self._sockets, timeout=timeout)
            sockets = list(self._sockets)
        for ws in sockets:
            _close(ws, SERVICE_RESTART, "Server is shutting down", wait=False)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"events": len(self._events), "event_bytes": self._event_bytes,
                    "subscribers": len(self._subscribers), "dropped_logs": self.dropped_logs}


# --------------------------------------------------------------------------- websockets


def _close(ws: simple_websocket.Server, code: int, reason: str, wait: bool = True) -> None:
    try:
        ws.close(code, reason)
    except (ConnectionClosed, OSError):
        pass
    if wait:
        ws.thread.join(timeout=1.0)  # let the client answer the close frame
    try:
        ws.sock.shutdown(2)
    except OSError:
        pass


def _receive_json(ws: _Socket, bus: EventBus, sized: bool = False, within: float | None = None,
                  expected: str = "message") -> Any:
    """The next message as JSON (None when the connection ended); with ``sized``, a
    (value, message length) pair. ``within``: seconds it may take before the connection is
    closed 1008 (the handshake: a client that never authenticates must not hold a thread)."""
    deadline = None if within is None else time.monotonic() + within
    while True:
        if bus.closing:
            raise _Close(SERVICE_RESTART, "Server is shutting down")
        message = ws.receive(timeout=0.25)
        if message is None:
            if not ws.connected or not ws.thread.is_alive():
                return (None, 0) if sized else None
            if deadline is not None and time.monotonic() >= deadline:
                raise _Close(POLICY_VIOLATION, f"Expected {expected} within {within:g} s")
            continue
        value = sockets.parse(message)
        return (value, len(message)) if sized else value


def _handshake(ws: _Socket, core: Core, bus: EventBus) -> bool:
    """Prefect's accept_prefect_socket: with subprotocol ``prefect`` the first message must
    be ``auth``; without it the connection is refused when auth is configured, else served
    as a legacy client. False if the connection ended first."""
    if ws.subprotocol != "prefect":
        if core.auth_string is not None:
            raise _Close(PROTOCOL_ERROR, "'prefect' subprotocol required when auth is configured")
        return True
    try:
        value = _receive_json(ws, bus, within=sockets.HANDSHAKE_TIMEOUT, expected="'auth' message")
    except _Close as close:
        if close.code in (SERVICE_RESTART, POLICY_VIOLATION):
            raise
        value = {}
    if value is None:
        return False
    if not isinstance(value, dict) or value.get("type") != "auth":
        raise _Close(POLICY_VIOLATION, "Expected 'auth' message")
    if core.auth_string is not None:
        token = value.get("token")
        if not token:
            raise _Close(POLICY_VIOLATION, "Auth required but no token provided")
        if not core.check_token(token):
            raise _Close(POLICY_VIOLATION, "Invalid token")
    ws.send('{"type":"auth_success"}')
    return True


def _serve(environ: dict[str, Any], core: Core, bus: EventBus, max_message_size: int | None, what: str,
           serve: Callable[[_Socket], None]) -> None:
    ws = _Socket(environ, subprotocols=["prefect"], max_message_size=max_message_size)
    peer = environ.get("REMOTE_ADDR", "?")
    if not bus.add_socket(ws):
        _close(ws, SERVICE_RESTART, "Server is shutting down")
        return
    try:
        if _handshake(ws, core, bus):
            serve(ws)
    except _Close as close:
        logger.info("closing %s connection from %s: %s (%d)", what, peer, close.reason, close.code)
        _close(ws, close.code, close.reason)
    except ConnectionClosed:
        pass
    except Exception:  # pragma: no cover - a bug: drop this connection, keep the server
        logger.exception("error serving %s connection from %s", what, peer)
        _close(ws, 1011, "Internal server error")
    finally:
        bus.remove_socket(ws)
        try:
            ws.sock.shutdown(2)
        except OSError:
            pass
        ws.thread.join(timeout=1.0)


def handle_events_in(environ: dict[str, Any], core: Core, bus: EventBus, max_message_size: int | None) -> None:
    """``/api/events/in``: one event per frame, until the client closes."""
    peer = environ.get("REMOTE_ADDR", "?")

    def serve(ws: _Socket) -> None:
        received = 0
        while True:
            value, size = _receive_json(ws, bus, sized=True)
            if value is None:
                break
            if not isinstance(value, dict):
                raise _Close(UNSUPPORTED_DATA, "Protocol violation: expected one event (a JSON object) per message")
            try:
                event = validate_event(value, ["event"], time.time(), size)
            except ValidationError as exc:
                logger.warning("dropped an invalid event from %s: %s", peer, exc.detail)
                continue
            try:
                bus.ingest(event)
            except DatabaseClosed:
                raise _Close(SERVICE_RESTART, "Server is shutting down") from None
            received += 1
        logger.debug("events connection from %s ended after %d event(s)", peer, received)

    _serve(environ, core, bus, max_message_size, "events-in", serve)


def handle_events_out(environ: dict[str, Any], core: Core, bus: EventBus, max_message_size: int | None) -> None:
    """``/api/events/out``: a filter, then the matching events (backfill first)."""

    def serve(ws: _Socket) -> None:
        message = _receive_json(ws, bus, within=sockets.HANDSHAKE_TIMEOUT, expected="'filter' message")
        if message is None:
            return
        if not isinstance(message, dict) or message.get("type") != "filter":
            raise _Close(PROTOCOL_ERROR, "Expected 'filter' message")
        try:
            event_filter = EventFilter(message.get("filter"), time.time())
        except ValueError as exc:
            raise _Close(PROTOCOL_ERROR, close_reason(f"Invalid filter: {exc}")) from None
        backfill = bool(message.get("backfill", True))  # Prefect: any false value (null, 0) means none
        subscriber, past = bus.subscribe(event_filter, backfill)
        try:
            for event in past:
                ws.send(f'{{"type":"event","event":{event.text()}}}')
            _send_live(ws, subscriber)
        finally:
            bus.unsubscribe(subscriber)

    _serve(environ, core, bus, max_message_size, "events-out", serve)


def _send_live(ws: _Socket, subscriber: _Subscriber) -> None:
    while True:
        with subscriber.cond:
            while not subscriber.outbox and not subscriber.closed and not subscriber.overflowed:
                subscriber.cond.wait(0.25)
                if not ws.connected or not ws.thread.is_alive():
                    return
            if subscriber.closed:
                raise _Close(SERVICE_RESTART, "Server is shutting down")
            if subscriber.overflowed:
                raise _Close(TRY_AGAIN_LATER, f"More than {MAX_OUTBOX} events waiting to be sent to this "
                                              "subscriber; reconnect to backfill")
            events = list(subscriber.outbox)
            subscriber.outbox.clear()
        for event in events:
            ws.send(f'{{"type":"event","event":{event.text()}}}')


def validate_logs(body: Any) -> int:
    """``POST /api/logs/``: a list of log objects (Prefect's LogCreate). Returns how many."""
    if not isinstance(body, list):
        raise ValidationError(["body"], "Input should be a valid list of logs", "list_type", body)
    for i, item in enumerate(body):
        if not isinstance(item, dict):
            raise ValidationError(["body", i], "Input should be a valid dictionary (a log object)", "dict_type", item)
        for name in ("name", "message"):
            if not isinstance(item.get(name), str):
                raise ValidationError(["body", i, name], "Field required: a string", "missing")
        if "level" in item and (isinstance(item["level"], bool) or not isinstance(item["level"], int)):
            raise ValidationError(["body", i, "level"], "Input should be a valid integer", "int_type", item["level"])
    return len(body)
