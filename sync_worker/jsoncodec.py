"""Compact JSON for protocol messages and stored runs, with orjson when it is installed.

Why: on the embedded server JSON was about a fifth of the CPU per run (a 1.8 KB run is
encoded at every state change: ~30 us with the stdlib's C encoder, ~2 us with orjson; a
message is parsed in ~10 us instead of ~4 us). orjson is an optional extra
(``pip install sync-worker[speedups]``); without it everything works as before, on the
stdlib. ``SYNC_WORKER_JSON=stdlib`` in the environment forces the stdlib (tests and
benchmarks of the pure-Python path).

What stays the same whichever backend runs:

- :func:`dumps` gives compact text (``separators=(",", ":")``) that parses back to the same
  values. Values orjson cannot encode exactly go to the stdlib encoder instead: integers
  beyond 64 bits, non-string keys, subclasses (a ``float`` subclass such as
  ``validation.Instant``, a ``str`` enum), datetimes, dataclasses, lone surrogates. Two kinds
  of value the stdlib refuses are written by orjson: ``uuid.UUID`` (as its text) and a plain
  ``Enum`` (as its value); nothing here sends either. The text may differ from the stdlib's: orjson writes non-ASCII characters as
  UTF-8 (the stdlib writes ``\\u00e9``), ``1e16`` for ``1e+16``, and a non-finite float as
  ``null`` (the stdlib writes ``NaN``). Nothing here sends a non-finite float: the server
  refuses them on input (:mod:`sync_worker.server.validation`), and user results do not go
  through this module (the "json" result serializer and pickle keep the stdlib).
- :func:`loads` gives the same values as ``json.loads`` or raises what ``json.loads`` raises:
  whatever orjson refuses (``NaN``, a BOM, bad UTF-8, lone surrogate escapes, nesting past
  its limit) is parsed again by the stdlib, which answers as it always did; text with a run
  of 19 or more digits (an integer orjson would turn into a float) goes to the stdlib first.
  One difference: orjson reads nesting somewhat deeper than the stdlib's recursion limit lets
  it (the server refuses more than 64 levels on both paths).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

#: "orjson" or "stdlib": what :func:`dumps` and :func:`loads` use in this process
BACKEND = "stdlib"

_orjson: Any = None
if os.environ.get("SYNC_WORKER_JSON", "").strip().lower() != "stdlib":
    try:
        import orjson as _orjson  # type: ignore[no-redef]

        BACKEND = "orjson"
    except ImportError:  # the speedups extra is not installed
        _orjson = None

# 19 digits in a row: the shortest integer orjson reads as a float (below -2**63 or at or
# above 2**64) has 19. Found with a byte translation (digits -> "0", the rest -> " ") and a
# substring search: a regular expression costs ten times more on a 1.5 KB run.
_DIGITS = bytes(48 if 48 <= i <= 57 else 32 for i in range(256))
_LONG_NUMBER = b"0" * 19


def _stdlib_encoder() -> Callable[[Any], str]:
    """``json.dumps(value, separators=(",", ":"))``, minus its per-call set-up: the C encoder
    built once, without the circular-reference bookkeeping (protocol messages and stored runs
    come from JSON or from our own code: they are never circular)."""
    from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]

    if c_make_encoder is None:  # pragma: no cover - an interpreter without the C accelerator
        return lambda value: json.dumps(value, separators=(",", ":"))

    def default(value: Any) -> Any:
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")

    encode = c_make_encoder(None, default, encode_basestring_ascii, None, ":", ",", False, False, True)
    return lambda value: "".join(encode(value, 0))


#: compact JSON text with the stdlib alone, whatever :data:`BACKEND` is
stdlib_dumps = _stdlib_encoder()


#: ``json.dumps`` of a ``str``: the same text (ASCII, escaped) from the C function
#: ``JSONEncoder.encode`` calls for one, without ``json.dumps``'s two Python frames (a third of
#: its instructions): for the ids written into messages built by hand, once per message
dumps_str: Callable[[str], str] = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


def has_long_number(data: bytes) -> bool:
    """True if ``data`` (UTF-8 JSON) holds 19 or more digits in a row: orjson might read an
    integer there as a float, so the stdlib must parse it."""
    return _LONG_NUMBER in data.translate(_DIGITS)


if _orjson is not None:
    _encode = _orjson.dumps
    _decode = _orjson.loads
    _OrjsonDecodeError = _orjson.JSONDecodeError

    # datetimes, dataclasses and subclasses of str/int/dict/list are the stdlib's to encode
    # (or refuse) as it always did; orjson would write them its own way
    _OPTIONS = (_orjson.OPT_PASSTHROUGH_DATETIME | _orjson.OPT_PASSTHROUGH_DATACLASS
                | _orjson.OPT_PASSTHROUGH_SUBCLASS)

    def dumps(value: Any) -> str:
        """Compact JSON text of ``value`` (see the module docstring)."""
        try:
            return _encode(value, option=_OPTIONS).decode("utf-8")
        except TypeError:  # orjson.JSONEncodeError too: big ints, non-str keys, subclasses, surrogates
            return stdlib_dumps(value)

    def loads(text: str | bytes | bytearray) -> Any:
        """``json.loads(text)``: the same values, the same errors."""
        data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
        if not has_long_number(data):
            try:
                return _decode(data)
            except (_OrjsonDecodeError, RecursionError):
                pass  # the stdlib decides, and words the error as it always did
        return json.loads(text)

    #: orjson's parser alone, for a strict parser built on top (``server/validation.py``): call
    #: it only on UTF-8 bytes without a long number (:func:`has_long_number`); it raises a
    #: ``ValueError`` (or ``RecursionError``) for what it refuses. None on the stdlib backend.
    fast_loads: Callable[[bytes], Any] | None = _decode

else:
    dumps = stdlib_dumps
    loads = json.loads  # type: ignore[assignment]
    fast_loads = None  # type: ignore[assignment]
