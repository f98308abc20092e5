"""JSON shapes of the wire protocol (as a Prefect 3 server sends them) and input validation.

The server keeps runs as plain dicts in exactly the shape it sends (see
``rest_01_create_task_run_response_201.json``): building dataclasses per request would cost
time for nothing. Validation errors name the field, e.g. ``body.state.type``.
"""
from __future__ import annotations

import os
import random
import time
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from ..ids import uuid4_texts
from . import validation as v
from .validation import _CANONICAL_UUID

STATE_TYPES = frozenset(
    {"SCHEDULED", "PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "CRASHED", "PAUSED", "CANCELLING"}
)
TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "CRASHED"})
DEFAULT_STATE_NAMES = {
    "SCHEDULED": "Scheduled",
    "PENDING": "Pending",
    "RUNNING": "Running",
    "COMPLETED": "Completed",
    "FAILED": "Failed",
    "CANCELLED": "Cancelled",
    "CRASHED": "Crashed",
    "PAUSED": "Paused",
    "CANCELLING": "Cancelling",
}

_STATE_DETAILS_DEFAULTS: dict[str, Any] = {
    "cache_expiration": None,
    "cache_key": None,
    "child_flow_run_id": None,
    "deferred": False,
    "deployment_concurrency_lease_id": None,
    "flow_run_id": None,
    "pause_key": None,
    "pause_reschedule": False,
    "pause_timeout": None,
    "refresh_cache": None,
    "retriable": None,
    "run_input_keyset": None,
    "scheduled_time": None,
    "task_parameters_id": None,
    "task_run_id": None,
    "traceparent": None,
    "transition_id": None,
    "untrackable_result": False,
}
_STATE_DETAILS_KEYS = frozenset(_STATE_DETAILS_DEFAULTS)


class ValidationError(ValueError):
    """Invalid request body. ``loc`` is the path of the offending field."""

    def __init__(self, loc: list[Any], msg: str, kind: str = "value_error", value: Any = None) -> None:
        super().__init__(msg)
        self.loc = loc
        self.msg = msg
        self.kind = kind
        self.value = value
        self.others: list[ValidationError] = []  # further errors found in the same body

    @property
    def detail(self) -> str:
        return "; ".join(f"{'.'.join(str(part) for part in e.loc)}: {e.msg}" for e in [self, *self.others])

    def to_json(self) -> dict[str, Any]:
        return {
            "detail": self.detail,
            "exception_message": "Invalid request received.",
            "exception_detail": [{"loc": e.loc, "msg": e.msg, "type": e.kind} for e in [self, *self.others]],
        }


class _Collector:
    """Runs field validators and keeps going after an error, to report them all at once."""

    def __init__(self) -> None:
        self.errors: list[ValidationError] = []

    def check(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ValidationError as exc:
            self.errors.append(exc)
            return None

    def raise_if_any(self) -> None:
        if self.errors:
            first = self.errors[0]
            first.others = self.errors[1:]
            raise first


UTC = timezone.utc  # noqa: UP017 - datetime.UTC needs Python 3.11; we support 3.9
_second: tuple[int, str] = (-1, "")
_last: tuple[float | None, str] = (None, "")


def iso(ts: float) -> str:
    """Epoch seconds -> ``2026-11-23T15:39:44.735937Z`` (Prefect's format).

    Called several times per state change, mostly with the same ``now`` (the state's
    timestamp, ``updated``, ``end_time``): the last answer is kept, and the date/time part
    is formatted once per second. A :class:`validation.Instant` (a time a client sent) is
    written back as it was read; times before 1970 go through :func:`validation.format_epoch`
    (``int()`` truncates towards zero, and ``strftime`` writes year 1 as ``1``).
    """
    global _second, _last
    if ts.__class__ is float:
        last = _last
        if last[0] == ts:
            return last[1]
    else:
        text = getattr(ts, "text", None)
        if text is not None:
            return text
    if ts < 0 or ts >= 253402300800:
        return v.format_epoch(ts)
    whole = int(ts)
    micros = round((ts - whole) * 1_000_000)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    cached = _second
    if cached[0] != whole:
        cached = _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    text = f"{cached[1]}.{micros:06d}Z"
    if ts.__class__ is float:
        _last = (ts, text)
    return text


_EPOCH_NAIVE = datetime(1970, 1, 1)
_SECOND = timedelta(seconds=1)
#: "YYYY-MM-DDTHH:MM:SS" -> epoch seconds, for the times this server wrote (see parse_time)
_seconds_of: dict[str, int] = {}


def parse_time(value: Any, loc: list[Any]) -> float:
    """An ISO 8601 timestamp (naive = UTC, years 0001-9999) -> epoch seconds
    (a :class:`validation.Instant` that remembers its exact text).

    The server reads back the times it wrote (a run's ``start_time`` at its final state, a
    new run's scheduled time): text in :func:`iso`'s own form whose date/time part was read
    before costs a dictionary look-up instead of :func:`validation.parse_datetime` (the same
    value: whole seconds plus microseconds, divided as ``timedelta.total_seconds`` does)."""
    if value.__class__ is str and len(value) == 27 and value[19] == "." and value[26] == "Z":
        whole = _seconds_of.get(value[:19])
        micros = value[20:26]
        if whole is not None and micros.isascii() and micros.isdigit():
            return v.Instant((whole * 1_000_000 + int(micros)) / 1_000_000, value)
        parsed = v.parse_datetime(value, loc)
        if parsed.text == value:  # our form: remember its date/time part
            if len(_seconds_of) >= 64:
                _seconds_of.clear()
            _seconds_of[value[:19]] = (datetime.fromisoformat(value[:19]) - _EPOCH_NAIVE) // _SECOND
        return parsed
    return v.parse_datetime(value, loc)


def epoch(value: str) -> float:
    """:func:`parse_time` as a plain float (no :class:`validation.Instant`), for a time this
    server wrote (a run's ``start_time``, read back at its final state): the same value, in
    a third of the instructions when its date/time part was read before."""
    if len(value) == 27 and value[26] == "Z" and value[19] == ".":
        whole = _seconds_of.get(value[:19])
        micros = value[20:26]
        if whole is not None and micros.isdigit() and micros.isascii():
            return (whole * 1_000_000 + int(micros)) / 1_000_000
    return float(parse_time(value, []))


_random = random.Random()
_getrandbits = _random.getrandbits
#: ids made ahead, :data:`_ID_BATCH` at a time (:func:`new_id`)
_ids: list[str] = []
_ID_BATCH = 256


def _forked() -> None:
    """In a forked child: a fresh seed, and none of the parent's ids made ahead (the parent
    hands them out too)."""
    _ids.clear()
    _random.seed()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)  # a forked child must not repeat our ids


def new_id() -> str:
    """A random (version 4) UUID. From a seeded PRNG rather than os.urandom: ids need to be
    unique, not secret, and os.urandom is a system call that releases the GIL on the hot path.
    Made :data:`_ID_BATCH` at a time (:func:`sync_worker.ids.uuid4_texts`: about 3,400
    instructions per id, against 9,100 one at a time); ``list.pop`` and ``list.extend`` are atomic, so
    threads share the batch (two threads that find it empty both add one: no id is lost or
    repeated)."""
    while True:
        try:
            return _ids.pop()
        except IndexError:
            _ids.extend(uuid4_texts(_getrandbits(128 * _ID_BATCH), _ID_BATCH))


def _str(body: Mapping[str, Any], name: str, loc: list[Any], *, required: bool = False,
         nullable: bool = True, default: str | None = None, max_length: int = v.MAX_NAME) -> str | None:
    if name not in body:
        if required:
            raise ValidationError(loc + [name], "Field required", "missing")
        return default
    value = body[name]
    if value.__class__ is str and len(value) <= max_length:  # valid: no error location to build
        return value
    if value is None and nullable and not required:
        return None
    if not isinstance(value, str):
        raise ValidationError(loc + [name], "Input should be a valid string", "string_type", value)
    return v.check_length(value, loc + [name], max_length)


def _number(value: Any, loc: list[Any], *, maximum: float = v.MAX_RETRY_DELAY) -> float:
    return v.check_number(value, loc, maximum)


def _uuid_or_none(body: Mapping[str, Any], name: str, loc: list[Any]) -> str | None:
    value = body.get(name)
    return None if value is None else v.check_uuid(value, loc + [name])


def _str_dict(body: Mapping[str, Any], name: str, loc: list[Any]) -> dict[str, Any] | None:
    """A JSON object with bounded keys (labels, task_inputs)."""
    value = _dict(body, name, loc)
    if value is not None:
        if len(value) > v.MAX_ITEMS:
            raise ValidationError(loc + [name], f"At most {v.MAX_ITEMS} entries are allowed", "too_long")
        for key in value:
            v.check_length(key, loc + [name, key[:40]], v.MAX_NAME)
    return value


def _dict(body: Mapping[str, Any], name: str, loc: list[Any]) -> dict[str, Any] | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValidationError(loc + [name], "Input should be a valid dictionary", "dict_type", value)
    return value


def validate_empirical_policy(value: Any, loc: list[Any]) -> dict[str, Any]:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ValidationError(loc, "Input should be a valid dictionary", "dict_type", value)
    retries = value.get("retries")
    if retries is not None:
        v.check_int(retries, loc + ["retries"], v.MAX_RETRIES)
    delay = value.get("retry_delay")
    if isinstance(delay, list):
        if len(delay) > 50:
            raise ValidationError(loc + ["retry_delay"], "Can not configure more than 50 retry delays per task.")
        for i, item in enumerate(delay):
            _number(item, loc + ["retry_delay", i])
    elif delay is not None:
        _number(delay, loc + ["retry_delay"])
    jitter = value.get("retry_jitter_factor")
    if jitter is not None:
        _number(jitter, loc + ["retry_jitter_factor"], maximum=v.MAX_JITTER_FACTOR)
    # deprecated Prefect fields, echoed back: kept only when they are sane
    max_retries = value.get("max_retries", 0)
    if (max_retries is None or isinstance(max_retries, bool) or not isinstance(max_retries, int)
            or not 0 <= max_retries <= v.MAX_RETRIES):
        max_retries = 0
    delay_seconds = value.get("retry_delay_seconds", 0.0)
    if (isinstance(delay_seconds, bool) or not isinstance(delay_seconds, (int, float))
            or not 0 <= delay_seconds <= v.MAX_RETRY_DELAY):
        delay_seconds = 0.0
    return {
        "max_retries": max_retries,
        "retries": retries,
        "retry_delay": delay,
        "retry_delay_seconds": float(delay_seconds),
        "retry_jitter_factor": jitter,
    }


def validate_state(value: Any, loc: list[Any]) -> dict[str, Any]:
    """A proposed state: checks types, keeps the fields we use."""
    if not isinstance(value, dict):
        raise ValidationError(loc, "Input should be a valid dictionary", "dict_type", value)
    if "type" not in value:
        raise ValidationError(loc + ["type"], "Field required", "missing")
    state_type = value["type"]
    if not isinstance(state_type, str) or state_type not in STATE_TYPES:
        raise ValidationError(
            loc + ["type"],
            f"{state_type!r} is not a valid state type; expected one of {', '.join(sorted(STATE_TYPES))}",
            "enum", state_type,
        )
    name = _str(value, "name", loc)
    message = _str(value, "message", loc, max_length=v.MAX_MESSAGE)
    details = _dict(value, "state_details", loc) or {}
    dloc = loc + ["state_details"]
    if details:
        details = dict(details)  # normalized values below replace what the client sent
        for key in ("task_parameters_id", "flow_run_id", "child_flow_run_id", "transition_id",
                    "deployment_concurrency_lease_id"):
            if details.get(key) is not None:  # ids a client turns into storage or database keys
                details[key] = v.check_uuid(details[key], dloc + [key])
        for key in ("deferred", "retriable", "pause_reschedule", "untrackable_result", "refresh_cache"):
            if details.get(key) is not None and not isinstance(details[key], bool):
                raise ValidationError(dloc + [key], "Input should be a valid boolean", "bool_type", details[key])
        for key in ("cache_key", "pause_key", "traceparent"):
            if details.get(key) is not None:
                if not isinstance(details[key], str):
                    raise ValidationError(dloc + [key], "Input should be a valid string", "string_type")
                v.check_length(details[key], dloc + [key], v.MAX_KEY)
        for key in ("cache_expiration", "pause_timeout"):
            if details.get(key) is not None:
                details[key] = v.parse_datetime(details[key], dloc + [key]).text
        if details.get("task_run_id") is not None:
            v.check_uuid(details["task_run_id"], dloc + ["task_run_id"])
    scheduled_time = None
    if details.get("scheduled_time") is not None:
        scheduled_time = parse_time(details["scheduled_time"], dloc + ["scheduled_time"])
        details["scheduled_time"] = scheduled_time.text  # type: ignore[attr-defined]
    return {
        "type": state_type,
        "name": name,
        "message": message,
        "data": value.get("data"),
        "state_details": details,
        "scheduled_time": scheduled_time,
    }


def make_state(state_type: str, run_id: str, now: float, *, name: str | None = None,
               message: str | None = None, data: Any = None, details: Mapping[str, Any] | None = None,
               scheduled_time: float | None = None) -> dict[str, Any]:
    """A full State JSON object as the server returns it."""
    if not details:
        state_details = _STATE_DETAILS_DEFAULTS.copy()
    elif details.keys() <= _STATE_DETAILS_KEYS:  # the usual case: one C-level merge
        state_details = {**_STATE_DETAILS_DEFAULTS, **details}
    else:  # keys we do not know are dropped
        state_details = _STATE_DETAILS_DEFAULTS.copy()
        for key, value in details.items():
            if key in state_details:
                state_details[key] = value
    state_details["task_run_id"] = run_id
    if scheduled_time is not None:
        state_details["scheduled_time"] = iso(scheduled_time)
    return {
        "data": data,
        "id": new_id(),
        "message": message,
        "name": name or DEFAULT_STATE_NAMES[state_type],
        "state_details": state_details,
        "timestamp": iso(now),
        "type": state_type,
    }


def _collect_create(body: dict[str, Any], loc: list[Any]) -> tuple:
    """The fields of a create (see :func:`_read_create`), checked one by one with every
    error collected: raises the first :class:`ValidationError` with the others attached."""
    c = _Collector()
    name = c.check(_str, body, "name", loc, max_length=v.MAX_KEY)
    task_key = c.check(_str, body, "task_key", loc, required=True, max_length=v.MAX_KEY)
    if task_key is not None and not task_key:
        c.errors.append(ValidationError(loc + ["task_key"], "String should have at least 1 character",
                                        "string_too_short", task_key))
    dynamic_key = c.check(_str, body, "dynamic_key", loc, required=True, max_length=v.MAX_KEY)
    run_id = c.check(_uuid_or_none, body, "id", loc)
    flow_run_id = c.check(_uuid_or_none, body, "flow_run_id", loc)
    tags = body.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        c.errors.append(ValidationError(loc + ["tags"], "Input should be a valid list of strings", "list_type", tags))
    elif len(tags) > v.MAX_ITEMS:
        c.errors.append(ValidationError(loc + ["tags"], f"At most {v.MAX_ITEMS} tags are allowed", "too_long"))
    else:
        for i, tag in enumerate(tags):
            c.check(v.check_length, tag, loc + ["tags", i], v.MAX_NAME)
    task_inputs = c.check(_str_dict, body, "task_inputs", loc) or {}
    labels = c.check(_str_dict, body, "labels", loc) or {}
    policy = c.check(validate_empirical_policy, body.get("empirical_policy"), loc + ["empirical_policy"])
    task_version = c.check(_str, body, "task_version", loc)
    cache_key = c.check(_str, body, "cache_key", loc, max_length=v.MAX_KEY)
    cache_expiration = c.check(_str, body, "cache_expiration", loc)
    if cache_expiration is not None:
        cache_expiration = getattr(c.check(v.parse_datetime, cache_expiration, loc + ["cache_expiration"]),
                                   "text", None)
    proposed = None
    if body.get("state") is not None:
        proposed = c.check(validate_state, body["state"], loc + ["state"])
    c.raise_if_any()
    return (name, task_key, dynamic_key, run_id, flow_run_id, tags, task_inputs, labels, policy, task_version,
            cache_key, cache_expiration, proposed)


#: the fields of a create :func:`_common_create` reads; any other field takes :func:`_read_create`
_COMMON_CREATE_KEYS = frozenset({"id", "name", "task_key", "dynamic_key", "flow_run_id", "empirical_policy", "tags",
                                 "labels", "task_inputs", "state"})
_COMMON_POLICY_KEYS = frozenset({"retries", "retry_delay"})
_COMMON_STATE_KEYS = frozenset({"type", "name", "message", "data", "state_details"})
_COMMON_DETAILS_KEYS = frozenset({"deferred", "task_parameters_id"})


def _common_create(body: dict[str, Any]) -> tuple | None:
    """:func:`_read_create`'s fields for the create every client of ours sends (these fields
    only, each valid and of its plain type: a canonical id, a number of retries and a delay, a
    state with ``deferred`` and a parameters id), with a few type and length tests instead of
    the general validators (``build_task_run`` of that body: 11-19 -> 8-12 us, measured side by
    side); None for anything else, which :func:`_read_create` then reads. Both give the same fields for every body this one
    takes (``tests/server/test_server_srv15_create.py``)."""
    if not body.keys() <= _COMMON_CREATE_KEYS:
        return None
    name = body.get("name")
    task_key = body.get("task_key")
    dynamic_key = body.get("dynamic_key")
    run_id = body.get("id")
    if not (name.__class__ is str and len(name) <= v.MAX_KEY and task_key.__class__ is str
            and 0 < len(task_key) <= v.MAX_KEY and dynamic_key.__class__ is str and len(dynamic_key) <= v.MAX_KEY
            and run_id.__class__ is str and _CANONICAL_UUID(run_id) is not None
            and body.get("flow_run_id") is None):
        return None
    tags = body.get("tags")
    if tags is None:
        tags = []
    elif tags.__class__ is not list or tags:  # a tag's checks are _read_create's
        return None
    str_dicts = []
    for field in ("task_inputs", "labels"):
        value = body.get(field)
        if value is None:
            value = {}
        elif value.__class__ is not dict or len(value) > v.MAX_ITEMS:
            return None
        else:
            for key in value:
                if len(key) > v.MAX_NAME:
                    return None
            if not value:
                value = {}
        str_dicts.append(value)
    policy = body.get("empirical_policy")
    retries = delay = None
    if policy is not None:
        if policy.__class__ is not dict or not policy.keys() <= _COMMON_POLICY_KEYS:
            return None
        retries = policy.get("retries")
        delay = policy.get("retry_delay")
        if retries is not None and not (retries.__class__ is int and 0 <= retries <= v.MAX_RETRIES):
            return None
        if delay is not None and not ((delay.__class__ is float or delay.__class__ is int)
                                      and 0 <= delay <= v.MAX_RETRY_DELAY):  # NaN fails both
            return None
    state = body.get("state")
    proposed = None
    if state is not None:
        if state.__class__ is not dict or not state.keys() <= _COMMON_STATE_KEYS:
            return None
        state_type = state.get("type")
        state_name = state.get("name")
        message = state.get("message")
        details = state.get("state_details")
        if not (state_type.__class__ is str and state_type in STATE_TYPES
                and (state_name is None or (state_name.__class__ is str and len(state_name) <= v.MAX_NAME))
                and (message is None or (message.__class__ is str and len(message) <= v.MAX_MESSAGE))):
            return None
        if details is None:
            details = {}
        elif details.__class__ is not dict or not details.keys() <= _COMMON_DETAILS_KEYS:
            return None
        elif details:
            deferred = details.get("deferred")
            parameters_id = details.get("task_parameters_id")
            if deferred is not None and deferred.__class__ is not bool:
                return None
            if parameters_id is not None and not (parameters_id.__class__ is str
                                                  and _CANONICAL_UUID(parameters_id) is not None):
                return None
            details = dict(details)
        proposed = {"type": state_type, "name": state_name, "message": message, "data": state.get("data"),
                    "state_details": details, "scheduled_time": None}
    policy_out = {"max_retries": 0, "retries": retries, "retry_delay": delay, "retry_delay_seconds": 0.0,
                  "retry_jitter_factor": None}
    return (name, task_key, dynamic_key, run_id, None, tags, str_dicts[0], str_dicts[1], policy_out, None,
            None, None, proposed)


def _read_create(body: dict[str, Any], loc: list[Any]) -> tuple | None:
    """The fields of a valid create, with the validators called directly (a create is valid
    nearly always, and the collector's indirection cost more than the checks); None at the
    first error: :func:`_collect_create` then finds and words them all. Both must accept
    exactly the same bodies (``tests/server/test_server_models_fast.py``)."""
    try:
        name = _str(body, "name", loc, max_length=v.MAX_KEY)
        task_key = _str(body, "task_key", loc, required=True, max_length=v.MAX_KEY)
        if not task_key:
            return None
        dynamic_key = _str(body, "dynamic_key", loc, required=True, max_length=v.MAX_KEY)
        run_id = _uuid_or_none(body, "id", loc)
        flow_run_id = _uuid_or_none(body, "flow_run_id", loc)
        tags = body.get("tags") or []
        if not isinstance(tags, list) or len(tags) > v.MAX_ITEMS:
            return None
        for tag in tags:
            if not isinstance(tag, str) or len(tag) > v.MAX_NAME:
                return None
        task_inputs = _str_dict(body, "task_inputs", loc) or {}
        labels = _str_dict(body, "labels", loc) or {}
        policy = validate_empirical_policy(body.get("empirical_policy"), loc + ["empirical_policy"])
        task_version = _str(body, "task_version", loc)
        cache_key = _str(body, "cache_key", loc, max_length=v.MAX_KEY)
        cache_expiration = _str(body, "cache_expiration", loc)
        if cache_expiration is not None:
            cache_expiration = v.parse_datetime(cache_expiration, loc + ["cache_expiration"]).text
        proposed = None
        if body.get("state") is not None:
            proposed = validate_state(body["state"], loc + ["state"])
    except ValidationError:
        return None
    return (name, task_key, dynamic_key, run_id, flow_run_id, tags, task_inputs, labels, policy, task_version,
            cache_key, cache_expiration, proposed)


def build_task_run(body: Any, now: float) -> dict[str, Any]:
    """Validate a create request (rest_01 request shape) and build the stored TaskRun.

    A create without a state gets PENDING (as in Prefect); a SCHEDULED state without a
    scheduled time is scheduled now.
    """
    loc: list[Any] = ["body"]
    if not isinstance(body, dict):
        raise ValidationError(loc, "Input should be a valid dictionary (a JSON object)", "dict_type", body)
    fields = _common_create(body)
    if fields is None:
        fields = _read_create(body, loc)
    if fields is None:  # invalid: report every error, as the collecting path words them
        fields = _collect_create(body, loc)
    (name, task_key, dynamic_key, run_id, flow_run_id, tags, task_inputs, labels, policy, task_version,
     cache_key, cache_expiration, proposed) = fields
    name = name or task_key
    run_id = run_id or new_id()

    if proposed is None:
        proposed = {"type": "PENDING", "name": None, "message": None, "data": None,
                    "state_details": {}, "scheduled_time": None}
    scheduled_time = None
    if proposed["type"] == "SCHEDULED":
        scheduled_time = proposed["scheduled_time"] if proposed["scheduled_time"] is not None else now
    state = make_state(proposed["type"], run_id, now, name=proposed["name"], message=proposed["message"],
                       data=proposed["data"], details=proposed["state_details"], scheduled_time=scheduled_time)
    created = state["timestamp"]  # iso(now)
    expected = created if scheduled_time is None or scheduled_time == now else iso(scheduled_time)
    return {
        "cache_expiration": cache_expiration,
        "cache_key": cache_key,
        "created": created,
        "dynamic_key": dynamic_key,
        "empirical_policy": policy,
        "end_time": None,
        "estimated_run_time": 0.0,
        "estimated_start_time_delta": 0.0,
        "expected_start_time": expected,
        "flow_run_id": flow_run_id,
        "flow_run_run_count": 0,
        "id": run_id,
        "labels": labels,
        "name": name,
        "next_scheduled_start_time": expected if scheduled_time is not None else None,
        "run_count": 0,
        "start_time": None,
        "state_id": state["id"],
        "state_name": state["name"],
        "state_type": state["type"],
        "tags": tags,
        "task_inputs": task_inputs,
        "task_key": task_key,
        "task_version": task_version,
        "total_run_time": 0.0,
        "updated": created,
        "state": state,  # last, as stored and sent (RunRow.dump)
    }


def validate_set_state(body: Any) -> tuple:
    """``{"state": {...}, "force": bool}`` -> (proposed state, force)."""
    if not isinstance(body, dict):
        raise ValidationError(["body"], "Input should be a valid dictionary (a JSON object)", "dict_type", body)
    if "state" not in body:
        raise ValidationError(["body", "state"], "Field required", "missing")
    proposed = validate_state(body["state"], ["body", "state"])
    force = body.get("force", False)
    if force is None:
        force = False
    if not isinstance(force, bool):
        raise ValidationError(["body", "force"], "Input should be a valid boolean", "bool_type", force)
    return proposed, force
