"""JSON shapes of the wire protocol (as a Prefect 3 server sends them) and input validation.

The server keeps runs as plain dicts in exactly the shape it sends (see
``rest_01_create_task_run_response_201.json``): building dataclasses per request would cost
time for nothing. Validation errors name the field, e.g. ``body.state.type``.
"""
from __future__ import annotations

import math
import os
import random
import time
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

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


def iso(ts: float) -> str:
    """Epoch seconds -> ``2026-11-23T15:39:44.735937Z`` (Prefect's format).

    Called several times per state change: the date/time part is formatted once per second.
    """
    global _second
    whole = int(ts)
    micros = round((ts - whole) * 1_000_000)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    cached = _second
    if cached[0] != whole:
        cached = _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{cached[1]}.{micros:06d}Z"


def parse_time(value: Any, loc: list[Any]) -> float:
    """An ISO 8601 timestamp (naive = UTC) -> epoch seconds."""
    if not isinstance(value, str):
        raise ValidationError(loc, "Input should be a valid datetime string", "datetime_type", value)
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValidationError(loc, f"Input should be a valid datetime, not {value!r}", "datetime_parsing", value) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


_random = random.Random()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_random.seed)  # a forked child must not repeat our ids


def new_id() -> str:
    """A random (version 4) UUID. From a seeded PRNG rather than os.urandom: ids need to be
    unique, not secret, and os.urandom is a system call that releases the GIL on the hot path."""
    return str(uuid.UUID(int=_random.getrandbits(128), version=4))


# -- small validators ------------------------------------------------------------------------
def _str(body: Mapping[str, Any], name: str, loc: list[Any], *, required: bool = False,
         nullable: bool = True, default: str | None = None) -> str | None:
    if name not in body:
        if required:
            raise ValidationError(loc + [name], "Field required", "missing")
        return default
    value = body[name]
    if value is None and nullable and not required:
        return None
    if not isinstance(value, str):
        raise ValidationError(loc + [name], "Input should be a valid string", "string_type", value)
    return value


def _number(value: Any, loc: list[Any], *, minimum: float | None = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValidationError(loc, "Input should be a valid number", "float_type", value)
    if minimum is not None and value < minimum:
        raise ValidationError(loc, f"Input should be greater than or equal to {minimum:g}", "greater_than_equal", value)
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
    if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int) or retries < 0):
        raise ValidationError(loc + ["retries"], "Input should be a whole number >= 0", "int_type", retries)
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
        _number(jitter, loc + ["retry_jitter_factor"])
    max_retries = value.get("max_retries", 0)
    if max_retries is None or isinstance(max_retries, bool) or not isinstance(max_retries, int):
        max_retries = 0
    delay_seconds = value.get("retry_delay_seconds", 0.0)
    if isinstance(delay_seconds, bool) or not isinstance(delay_seconds, (int, float)):
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
    message = _str(value, "message", loc)
    details = _dict(value, "state_details", loc) or {}
    for key in ("task_parameters_id", "scheduled_time"):
        if details.get(key) is not None and not isinstance(details[key], str):
            raise ValidationError(loc + ["state_details", key], "Input should be a valid string", "string_type", details[key])
    for key in ("deferred", "retriable"):
        if details.get(key) is not None and not isinstance(details[key], bool):
            raise ValidationError(loc + ["state_details", key], "Input should be a valid boolean", "bool_type", details[key])
    scheduled_time = None
    if details.get("scheduled_time") is not None:
        scheduled_time = parse_time(details["scheduled_time"], loc + ["state_details", "scheduled_time"])
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
    state_details = dict(_STATE_DETAILS_DEFAULTS)
    if details:
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


def build_task_run(body: Any, now: float) -> dict[str, Any]:
    """Validate a create request (rest_01 request shape) and build the stored TaskRun.

    A create without a state gets PENDING (as in Prefect); a SCHEDULED state without a
    scheduled time is scheduled now.
    """
    loc: list[Any] = ["body"]
    if not isinstance(body, dict):
        raise ValidationError(loc, "Input should be a valid dictionary (a JSON object)", "dict_type", body)
    c = _Collector()
    name = c.check(_str, body, "name", loc)
    task_key = c.check(_str, body, "task_key", loc, required=True)
    if task_key is not None and not task_key:
        c.errors.append(ValidationError(loc + ["task_key"], "String should have at least 1 character",
                                        "string_too_short", task_key))
    if task_key is not None and len(task_key) > 2000:
        c.errors.append(ValidationError(loc + ["task_key"], "String should have at most 2000 characters",
                                        "string_too_long"))
    dynamic_key = c.check(_str, body, "dynamic_key", loc, required=True)
    run_id = c.check(_str, body, "id", loc)
    if run_id is not None:
        try:
            run_id = str(uuid.UUID(run_id))
        except ValueError:
            c.errors.append(ValidationError(loc + ["id"], "Input should be a valid UUID", "uuid_parsing", run_id))
    flow_run_id = c.check(_str, body, "flow_run_id", loc)
    tags = body.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        c.errors.append(ValidationError(loc + ["tags"], "Input should be a valid list of strings", "list_type", tags))
    task_inputs = c.check(_dict, body, "task_inputs", loc) or {}
    labels = c.check(_dict, body, "labels", loc) or {}
    policy = c.check(validate_empirical_policy, body.get("empirical_policy"), loc + ["empirical_policy"])
    task_version = c.check(_str, body, "task_version", loc)
    cache_key = c.check(_str, body, "cache_key", loc)
    cache_expiration = c.check(_str, body, "cache_expiration", loc)
    proposed = None
    if body.get("state") is not None:
        proposed = c.check(validate_state, body["state"], loc + ["state"])
    c.raise_if_any()
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
    created = iso(now)
    expected = iso(scheduled_time) if scheduled_time is not None else created
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
        "state": state,
        "state_id": state["id"],
        "state_name": state["name"],
        "state_type": state["type"],
        "tags": tags,
        "task_inputs": task_inputs,
        "task_key": task_key,
        "task_version": task_version,
        "total_run_time": 0.0,
        "updated": created,
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
