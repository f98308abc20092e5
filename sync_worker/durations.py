"""Durations written by people (``90s``, ``15m``, ``1h``, ``7d``, ``2w``): ``--since``,
``--older-than``, ``--retention``. A plain number is seconds."""
from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.IGNORECASE)
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
#: The longest duration accepted: 100 years (36500d). Longer ones reach before year 1 when
#: taken from now, which no date type holds; no run is that old anyway.
MAX_SECONDS = 36500 * 86400.0


def parse_duration(text: str) -> float:
    """``"90"``/``"90s"``, ``"15m"``, ``"1h"``, ``"7d"``, ``"2w"`` -> seconds; ValueError otherwise."""
    match = _DURATION.match(str(text))
    if not match and str(text).strip().startswith("-") and _DURATION.match(str(text).strip()[1:]):
        raise ValueError(f"invalid duration {text!r}: a duration has no sign (write {str(text).strip()[1:]})")
    if not match:
        raise ValueError(f"invalid duration {text!r}: use a number with an optional unit s, m, h, d or w "
                         "(e.g. 90s, 15m, 1h, 7d)")
    seconds = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if seconds > MAX_SECONDS:
        raise ValueError(f"invalid duration {text!r}: at most 36500d (100 years)")
    return seconds


def attach_signed_values(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """``--since -5m`` -> ``--since=-5m``: argparse takes a value that starts with ``-`` (and is
    not a plain negative number) for an option and stops with "expected one argument", which
    does not tell the user what is wrong; joined, the option's own check names the value."""
    out: list[str] = []
    for token in argv:
        if out and out[-1] in options and re.match(r"^-\d", token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def format_duration(seconds: float) -> str:
    """The largest whole unit up to days: 604800 -> ``7d``, 5400 -> ``90m``, 90 -> ``90s``.

    Never weeks: the README and ``--help`` write the retention default as ``7d``, so the
    server's log says ``7d`` too (``2w`` is still accepted as input and is written ``14d``)."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"
