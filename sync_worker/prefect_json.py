"""Reading Prefect's JSON records: the objects its JSON serializer wraps in envelopes.

Prefect's default JSON serializer (``prefect.serializers.prefect_json_object_encoder``)
writes a value JSON cannot hold as ``{"__class__": "datetime.datetime", "data": "..."}`` and
an exception as ``{"__exc_type__": "builtins.ValueError", "message": "..."}``; its decoder
imports the named class and rebuilds the value with pydantic. A record whose metadata names
that decoder is Prefect's (a Prefect caller's ``.delay()`` with JSON parameters); read as
plain JSON, a ``datetime`` parameter would reach the task as that envelope dict.

Decision: the standard library's value types are rebuilt here, without importing anything
a record names; any other class (a pydantic model, a class of the caller's code) is refused
with :class:`~sync_worker.exceptions.SerializationError` naming it, since rebuilding it
means importing and running code the record chose. Use pickle for such values (Prefect's
``result_serializer="pickle"``, ``SYNC_WORKER_ALLOW_PICKLE`` on the worker).

sync_worker's own JSON records name no decoder (they hold JSON's types only, and a dict that
happens to have a ``"__class__"`` key stays a dict for Prefect's readers too), except a
failure's record, whose ``__exc_type__`` a Prefect caller turns into the exception; read
here, that record (it has a ``traceback``) stays the dict sync_worker wrote.
"""
from __future__ import annotations

import builtins
import datetime
import decimal
import pathlib
import re
import uuid
from typing import Any, Callable

from sync_worker.exceptions import SerializationError

# pydantic writes a timedelta as an ISO 8601 duration: "PT3S", "P1DT2H3M4.5S", "-PT0.5S"
_DURATION = re.compile(r"^(-)?P(?:(\d+(?:\.\d+)?)W)?(?:(\d+(?:\.\d+)?)D)?"
                       r"(?:T(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)S)?)?$")


def _timedelta(text: str) -> datetime.timedelta:
    match = _DURATION.match(text)
    if not match or text in ("P", "-P") or text.endswith("T"):
        raise ValueError(f"not an ISO 8601 duration: {text!r}")
    sign, weeks, days, hours, minutes, seconds = match.groups()
    value = datetime.timedelta(weeks=float(weeks or 0), days=float(days or 0), hours=float(hours or 0),
                               minutes=float(minutes or 0), seconds=float(seconds or 0))
    return -value if sign else value


def _iso(text: str) -> str:
    return text[:-1] + "+00:00" if text.endswith("Z") else text  # (fromisoformat reads "Z" from 3.11 on)


_VALUE_TYPES: dict[str, Callable[[Any], Any]] = {
    "datetime.datetime": lambda data: datetime.datetime.fromisoformat(_iso(data)),
    "datetime.date": datetime.date.fromisoformat,
    "datetime.time": lambda data: datetime.time.fromisoformat(_iso(data)),
    "datetime.timedelta": _timedelta,
    "uuid.UUID": uuid.UUID,
    "decimal.Decimal": decimal.Decimal,
    "pathlib.Path": pathlib.Path,
    "pathlib.PosixPath": pathlib.Path,
    "pathlib.PurePosixPath": pathlib.PurePosixPath,
    "pathlib.WindowsPath": pathlib.PureWindowsPath,
    "pathlib.PureWindowsPath": pathlib.PureWindowsPath,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.tuple": tuple,
    "builtins.bytes": lambda data: data.encode("utf-8"),
    "builtins.complex": complex,
}


def object_hook(value: dict[str, Any]) -> Any:
    """``json.loads(object_hook=...)`` for a record Prefect's JSON serializer wrote."""
    if "__class__" in value:
        name = value["__class__"]
        build = _VALUE_TYPES.get(name) if isinstance(name, str) else None
        if build is None:
            raise SerializationError(
                f"the record holds a {name!r} object, which only Prefect's own decoder rebuilds (by importing "
                "that class); pass JSON values (str, int, float, bool, None, list, dict), standard library "
                "values such as datetime, or use pickle (Prefect's result_serializer='pickle' and "
                "SYNC_WORKER_ALLOW_PICKLE=true on the worker)")
        try:
            return build(value.get("data"))
        except (TypeError, ValueError, ArithmeticError) as exc:
            raise SerializationError(f"the record's {name} value {value.get('data')!r} is not valid: {exc}") from None
    if "__exc_type__" in value and "traceback" not in value:  # (with a traceback: sync_worker's own failure)
        name = value["__exc_type__"]
        module, _, attribute = name.rpartition(".") if isinstance(name, str) else ("", "", "")
        exc_type = getattr(builtins, attribute, None) if module == "builtins" else None
        if isinstance(exc_type, type) and issubclass(exc_type, Exception):
            return exc_type(value.get("message"))
        return Exception(f"{name}: {value.get('message')}")  # its class is not imported for it
    return value
