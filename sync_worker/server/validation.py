"""Input limits of the embedded server, and the checks that enforce them before anything is stored.

Why one module: every value a client sends ends up in the database, in a run another client
parses, or in a storage key a worker opens. A value the server accepts must be one it can
store, send back and finish (a ``retry_delay`` of 1e300 once left a run RUNNING forever, a
year-1 ``scheduled_time`` came back in a form no client could parse). So the rules live here,
in one place, and the README's "Input limits" table repeats them:

- JSON: UTF-8, no ``NaN``/``Infinity`` (nor numbers that overflow to them), no lone UTF-16
  surrogates (``"\\ud800"``: SQLite and every other client would choke on them), at most
  :data:`MAX_DEPTH` levels of nesting;
- strings: bounded lengths (:data:`MAX_KEY`, :data:`MAX_NAME`, ...);
- numbers: finite, within documented ranges (:data:`MAX_RETRIES`, :data:`MAX_RETRY_DELAY`, ...);
- datetimes: ISO 8601, years 0001-9999 once converted to UTC, written back exactly
  (microseconds, ``Z``);
- ids that become storage keys (``task_parameters_id``) or database keys (``id``,
  ``flow_run_id``): UUIDs.

Every refusal is a :class:`models.ValidationError` (REST 422, socket ``status_code`` 422)
whose ``detail`` names the field and the rule, or a :class:`JSONRejected` for a body that is
not acceptable JSON at all.
"""
from __future__ import annotations

import json
import math
import re
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

from .. import jsoncodec

#: deepest nesting of arrays/objects in a body or a socket message
MAX_DEPTH = 64
#: task keys, dynamic keys, cache keys, subscription keys
MAX_KEY = 2000
#: run names, state names, task versions, tags, label keys, client ids, request ids
MAX_NAME = 500
#: state messages (a traceback fits)
MAX_MESSAGE = 100_000
#: tags per run, labels per run, keys per subscription
MAX_ITEMS = 1000
#: retries of one run
MAX_RETRIES = 10_000
#: seconds between retries (one year)
MAX_RETRY_DELAY = 365 * 24 * 3600.0
#: the jitter factor spreads a delay by up to +/- this fraction of it
MAX_JITTER_FACTOR = 10.0
#: The largest whole number SQLite stores; a larger one in a query is refused with a 422.
SQLITE_MAX_INT = 2**63 - 1

UTC = timezone.utc  # noqa: UP017 - datetime.UTC needs Python 3.11
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# a \uD800-\uDFFF escape: only then can json.loads produce a lone surrogate
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
#: the canonical spelling of a UUID, which ``str(uuid.UUID(value))`` gives back unchanged
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}").fullmatch
_FRACTION = re.compile(r"(T\d\d:\d\d:\d\d\.)(\d{1,5})(?!\d)")


class JSONRejected(ValueError):
    """A body or message that is not acceptable JSON; ``kind`` says which rule it broke
    (``json``, ``utf8``, ``constant``, ``depth``, ``surrogate``)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def _reject_constant(name: str) -> Any:
    raise JSONRejected("constant", f"{name} is not allowed in JSON (numbers must be finite)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONRejected("constant", f"number {text[:40]} is out of range (numbers must be finite)")
    return value


# built once: json.loads(text, parse_constant=..., parse_float=...) builds a decoder per call
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
_fast_loads = jsoncodec.fast_loads  # orjson's parser, or None (not installed, SYNC_WORKER_JSON=stdlib)
_has_long_number = jsoncodec.has_long_number


def loads(raw: bytes | str, what: str = "body") -> Any:
    """Parse JSON under the rules above; raises :class:`JSONRejected`.

    With orjson (:mod:`sync_worker.jsoncodec`), text it accepts is taken from it: it refuses
    by itself everything these rules refuse except nesting deeper than :data:`MAX_DEPTH`
    (checked below), i.e. ``NaN``/``Infinity``, numbers that overflow, bad UTF-8 and lone
    surrogates (escaped or not). Text it refuses, and text with an integer it would read as a
    float, goes through the stdlib path, so every refusal is worded exactly as without orjson."""
    if _fast_loads is not None:
        data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
        if not _has_long_number(data):
            try:
                value = _fast_loads(data)
            except (ValueError, RecursionError):
                pass  # refused: the stdlib path below says why, in its words
            else:
                if data.count(b"[") + data.count(b"{") > MAX_DEPTH:  # cheap test first: most bodies are flat
                    _check_depth(value, what)
                return value
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JSONRejected("utf8", f"{what} is not valid UTF-8: {exc}") from None
        data = raw
    else:
        text = raw
        data = None
    try:
        if text.startswith("\ufeff"):  # what json.loads checks before it decodes
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        value = _DECODER.decode(text)
    except JSONRejected:
        raise
    except RecursionError:
        raise JSONRejected("depth", f"{what} is nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # JSONDecodeError, and ints longer than Python converts
        raise JSONRejected("json", f"{what} is not valid JSON: {exc}") from None
    if data is None:
        data = text.encode("utf-8", "surrogatepass")
    if data.count(b"[") + data.count(b"{") > MAX_DEPTH:  # cheap test first: most bodies are flat
        _check_depth(value, what)
    if _SURROGATE_ESCAPE.search(data):
        _check_surrogates(value, [what])
    return value


def _check_depth(value: Any, what: str) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise JSONRejected("depth", f"{what} is nested deeper than {MAX_DEPTH} levels")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values() if isinstance(v, (dict, list)))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item if isinstance(v, (dict, list)))


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _path(loc: list[Any]) -> str:
    return ".".join(map(str, loc)).encode("utf-8", "backslashreplace").decode("utf-8")


def close_reason(text: str) -> str:
    """A websocket close reason: at most 123 bytes of UTF-8."""
    data = text.encode("utf-8", "backslashreplace")
    return data[:123].decode("utf-8", "ignore")


def subscribe_problem(keys: list[str], client_id: str) -> str | None:
    """What is wrong with a subscribe message's keys and client_id (bounded sizes), or None."""
    if len(keys) > MAX_ITEMS:
        return f"at most {MAX_ITEMS} 'keys' per subscription"
    if any(len(key) > MAX_KEY for key in keys):
        return f"task keys are at most {MAX_KEY} characters"
    if len(client_id) > MAX_NAME:
        return f"'client_id' is at most {MAX_NAME} characters"
    return None


def _check_surrogates(value: Any, loc: list[Any]) -> None:
    stack = [(value, loc)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if _has_surrogate(item):
                raise JSONRejected("surrogate", f"{_path(where)}: lone UTF-16 surrogates "
                                                "(\\ud800-\\udfff without a pair) are not allowed in strings")
        elif isinstance(item, dict):
            for key, sub in item.items():
                if _has_surrogate(key):
                    raise JSONRejected("surrogate", f"{_path(where)}: lone UTF-16 surrogates "
                                                    "are not allowed in keys")
                stack.append((sub, where + [key]))
        elif isinstance(item, list):
            stack.extend((sub, where + [i]) for i, sub in enumerate(item))


# -- field rules (raise models.ValidationError) ------------------------------------------------
def _error(loc: list[Any], msg: str, kind: str, value: Any = None) -> Exception:
    from .models import ValidationError

    return ValidationError(loc, msg, kind, value)


def check_length(value: str, loc: list[Any], maximum: int, minimum: int = 0) -> str:
    if len(value) < minimum:
        raise _error(loc, f"String should have at least {minimum} character{'s' if minimum > 1 else ''}",
                     "string_too_short")
    if len(value) > maximum:
        raise _error(loc, f"String should have at most {maximum} characters", "string_too_long")
    return value


def check_uuid(value: Any, loc: list[Any]) -> str:
    """A UUID in any of the spellings :class:`uuid.UUID` reads -> its canonical form."""
    if not isinstance(value, str):
        raise _error(loc, "Input should be a valid UUID string", "uuid_type", value)
    if len(value) > 45:
        raise _error(loc, "Input should be a valid UUID (at most 45 characters)", "uuid_parsing")
    if _CANONICAL_UUID(value) is not None:  # already canonical (every id our clients send)
        return value
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise _error(loc, f"Input should be a valid UUID, not {value[:60]!r}", "uuid_parsing", value) from None


def check_number(value: Any, loc: list[Any], maximum: float, minimum: float = 0.0) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or (isinstance(value, float) and not math.isfinite(value))):
        raise _error(loc, "Input should be a valid finite number", "float_type", value)
    if value < minimum:
        raise _error(loc, f"Input should be greater than or equal to {minimum:g}", "greater_than_equal", value)
    if value > maximum:
        raise _error(loc, f"Input should be less than or equal to {maximum:g}", "less_than_equal", value)
    return value


def check_int(value: Any, loc: list[Any], maximum: int, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _error(loc, "Input should be a valid whole number", "int_type", value)
    if not minimum <= value <= maximum:
        raise _error(loc, f"Input should be a whole number from {minimum} to {maximum}", "int_range", value)
    return value


class Instant(float):
    """Epoch seconds that remember the exact ISO 8601 text they were read from, so a time a
    client proposed is written back to the microsecond whatever the year (a float alone
    cannot hold microseconds in year 9999). :func:`models.iso` prints ``text``."""

    text: str

    def __new__(cls, seconds: float, text: str) -> Instant:
        self = super().__new__(cls, seconds)
        self.text = text
        return self


def format_datetime(dt: datetime) -> str:
    """An aware datetime -> ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` in UTC (Prefect's format; 4-digit year)."""
    dt = dt.astimezone(UTC)
    return (f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}"
            f".{dt.microsecond:06d}Z")


def format_epoch(ts: float) -> str:
    """Epoch seconds (any value in years 0001-9999) -> the same format as :func:`format_datetime`."""
    return format_datetime(_EPOCH + timedelta(microseconds=round(ts * 1_000_000)))


def parse_datetime(value: Any, loc: list[Any]) -> Instant:
    """An ISO 8601 timestamp (naive = UTC), years 0001-9999 in UTC -> :class:`Instant`."""
    if not isinstance(value, str):
        raise _error(loc, "Input should be a valid datetime string", "datetime_type", value)
    if len(value) > 64:
        raise _error(loc, "Input should be a valid datetime (at most 64 characters)", "datetime_parsing")
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    # Python 3.10's fromisoformat wants 3 or 6 fraction digits: pad "...:40.5" to "...:40.500000"
    text = _FRACTION.sub(lambda m: m.group(1) + m.group(2).ljust(6, "0"), text, count=1)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise _error(loc, f"Input should be a valid ISO 8601 datetime, not {value!r}", "datetime_parsing",
                     value) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    try:
        utc = parsed.astimezone(UTC)
        # the same instant must also be representable as epoch seconds and back
        seconds = (utc - _EPOCH).total_seconds()
    except (OverflowError, ValueError):
        raise _error(loc, f"Datetime {value!r} is out of range: years 0001-9999 in UTC are accepted",
                     "datetime_range", value) from None
    return Instant(seconds, format_datetime(utc))
