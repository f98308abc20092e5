"""sync_worker.jsoncodec (orjson when installed, the stdlib otherwise) and the server's strict
parser on top of it: the same values and the same refusals, word for word, on both paths;
and the whole system on the stdlib path (SYNC_WORKER_JSON=stdlib) end to end."""
from __future__ import annotations

import enum
import json
import math
import os
import random
import subprocess
import sys
import time
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path

import pytest

from sync_worker import jsoncodec
from sync_worker.server import validation
from sync_worker.server.models import build_task_run, make_state

REPO = Path(__file__).resolve().parent.parent

needs_orjson = pytest.mark.skipif(jsoncodec.BACKEND != "orjson", reason="orjson is not installed (or "
                                                                       "SYNC_WORKER_JSON=stdlib)")

RUN = build_task_run({"task_key": "k", "dynamic_key": "d", "tags": ["a"], "labels": {"x": "y"},
                      "state": {"type": "SCHEDULED", "state_details": {"deferred": True}}}, time.time())


class Sub(float):
    pass


class StrSub(str):
    pass


class StrEnum(str, enum.Enum):
    A = "a"


VALUES = [
    RUN,
    {"type": "set_state", "request_id": "r1", "state": make_state("RUNNING", "id", time.time()), "force": False},
    {"a": "é ☃ 😀", "b": "\u2028<>&\x7f\x1f\x00"},  # non-ASCII: UTF-8 with orjson, \u escapes with the stdlib
    [0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 1.5, -0.0, 1e16, 1e-7, 1e300, 123456789.123, True, False, None],
    [2**64, -(2**63) - 1, 10**40],  # integers orjson cannot write: the stdlib does
    {1: "int key", None: "none key"},  # keys orjson refuses: the stdlib converts them
    [Sub(2.5)],  # a float subclass (validation.Instant is one)
    [StrEnum.A, StrSub("s")], OrderedDict(b=1, a=2),  # other subclasses: the stdlib's way
    ["lone \ud800 surrogate"],  # orjson refuses it, the stdlib escapes it
    [[[[[[[[[[]]]]]]]]]], {}, [], "", "x",
]


@pytest.mark.parametrize("value", VALUES, ids=range(len(VALUES)))
def test_dumps_is_compact_and_reads_back_as_the_same_value(value):
    text = jsoncodec.dumps(value)
    assert isinstance(text, str)
    assert text == jsoncodec.stdlib_dumps(value) or jsoncodec.BACKEND == "orjson"
    # what json.loads gives for the stdlib's own compact text
    assert json.loads(text) == json.loads(json.dumps(value, separators=(",", ":")))
    assert ", " not in text.replace('", "', "") and ": " not in text.replace('": "', "")


@pytest.mark.parametrize("value", [
    [2**64, -(2**63) - 1], {1: "int key", None: "none key"}, [Sub(2.5)], [StrEnum.A, StrSub("s")],
    OrderedDict(b=1, a=2), ["lone \ud800 surrogate"],
], ids=["big-int", "key", "float-sub", "str-sub", "dict-sub", "surrogate"])
def test_what_orjson_would_write_differently_is_the_stdlib_text(value):
    assert jsoncodec.dumps(value) == json.dumps(value, separators=(",", ":"))


def test_dumps_of_an_ascii_run_is_the_stdlib_text():
    """A run (ids, timestamps, keys in ASCII) is the same text on both paths: stored runs and
    answers do not change with the backend."""
    assert jsoncodec.dumps(RUN) == json.dumps(RUN, separators=(",", ":"))
    assert jsoncodec.stdlib_dumps(RUN) == json.dumps(RUN, separators=(",", ":"))


def test_dumps_refuses_what_json_refuses():
    with pytest.raises(TypeError, match="not JSON serializable"):
        jsoncodec.dumps({"a": {1, 2}})
    with pytest.raises(TypeError, match="not JSON serializable"):  # orjson would write it
        jsoncodec.dumps({"at": datetime.now(timezone.utc)})
    with pytest.raises(TypeError, match="not JSON serializable"):
        jsoncodec.stdlib_dumps(object())


TEXTS = [
    '{"a": 1, "b": [1.5, -0, -0.0, 1E5, 1e-400, "x"], "c": null, "d": true}',
    '[18446744073709551615, 18446744073709551616, -9223372036854775808, -9223372036854775809]',
    "[123456789012345678901234567890, 0.1234567890123456789]",
    '["\\ud83d\\ude00", "\\u00e9", "é"]',
    '["\\ud800"]', '["\\udc00"]', '["\\ud800\\u0041"]',
    "[NaN]", "[Infinity]", "[-Infinity]", "[1e400]",
    "\ufeff[1]", "[1] x", "", " ", "[", '{"a" 1}', '["a\x01"]', "[01]",
    '{"a": 1, "a": 2}', " [1] \n", "[" * 70 + "]" * 70,
]  # (nesting past the stdlib's recursion limit: orjson reads some deeper; the strict parser refuses both)


def _outcome(fn, arg):
    try:
        return ("ok", fn(arg))
    except (ValueError, RecursionError) as exc:
        return ("error", type(exc).__name__, str(exc))


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
@pytest.mark.parametrize("kind", ["str", "bytes"])
def test_loads_gives_what_json_loads_gives(text, kind):
    raw = text if kind == "str" else text.encode("utf-8")
    mine, theirs = _outcome(jsoncodec.loads, raw), _outcome(json.loads, raw)
    assert mine == theirs
    if mine[0] == "ok":  # same types too (an int stays an int)
        assert json.dumps(mine[1]) == json.dumps(theirs[1])


def test_loads_bad_utf8_bytes_is_json_loads_error():
    for raw in (b'"\xff"', b'["\xed\xa0\x80"]', b"\xef\xbb\xbf[1]"):
        assert _outcome(jsoncodec.loads, raw) == _outcome(json.loads, raw)


def test_floats_read_back_exactly():
    rng = random.Random(14)
    values = [rng.uniform(-1e6, 1e6) for _ in range(2000)] + [rng.random() * 10 ** rng.randint(-300, 300)
                                                               for _ in range(2000)]
    values += [5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, 0.1, 0.2, 0.3]
    text = json.dumps(values)
    parsed = jsoncodec.loads(text)
    assert all(a == b and type(a) is type(b) for a, b in zip(parsed, values, strict=True))
    assert jsoncodec.loads(jsoncodec.dumps(values)) == values
    digits = ["0." + "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 17))) + f"e{rng.randint(-30, 30)}"
              for _ in range(2000)]
    assert jsoncodec.loads("[" + ",".join(digits) + "]") == [float(d) for d in digits]


def test_has_long_number():
    assert jsoncodec.has_long_number(b"[1234567890123456789]")
    assert not jsoncodec.has_long_number(b"[123456789012345678, 1.5e300, \"2026-11-30T10:00:00.123456Z\"]")


# -- the server's strict parser: the same answer with and without orjson ----------------------
STRICT = TEXTS + [
    '{"task_key": "k", "dynamic_key": "d", "empirical_policy": {"retry_delay": NaN}}',
    '{"x": ["ok", {"y": "\\ud800"}]}', '{"\\udfff": 1}', '{"x": "\\ud83d\\ude00"}',
    '{"x": 1e309}', '{"x": -1e309}', '{"x": 1' + "0" * 5000 + "}",
    "[" * 64 + "]" * 64, "[" * 65 + "]" * 65, '{"a":' * 65 + "1" + "}" * 65, "[" * 990 + "]" * 990,
    "[" * 1100 + "]" * 1100, "[" * 5000 + "]" * 5000,
]


def _strict(raw, fast):
    saved = validation._fast_loads
    validation._fast_loads = fast
    try:
        return ("ok", json.dumps(validation.loads(raw, "message")))
    except validation.JSONRejected as exc:
        return ("rejected", exc.kind, exc.detail)
    finally:
        validation._fast_loads = saved


@needs_orjson
@pytest.mark.parametrize("text", STRICT, ids=range(len(STRICT)))
@pytest.mark.parametrize("kind", ["str", "bytes"])
def test_strict_loads_same_with_and_without_orjson(text, kind):
    raw = text if kind == "str" else text.encode("utf-8", "surrogatepass")
    assert _strict(raw, jsoncodec.fast_loads) == _strict(raw, None)


@needs_orjson
def test_strict_loads_same_on_random_damaged_messages():
    rng = random.Random(1414)
    base = [json.dumps({"type": "create", "request_id": f"r{i}", "body": {
        "task_key": "k", "dynamic_key": str(i), "tags": ["é", "\U0001f600"], "n": [i, i * 1.5, -i, 10 ** (i % 25)],
        "s": {"type": "SCHEDULED", "state_details": {"deferred": True}}}}, ensure_ascii=i % 2 == 0).encode()
        for i in range(60)]
    for _ in range(3000):
        data = bytearray(rng.choice(base))
        for _damage in range(rng.randint(0, 3)):
            pos = rng.randrange(len(data))
            data[pos:pos + rng.randint(0, 2)] = bytes(rng.choice(b'[]{}",:\\u0123456789eE.-+ \xff\xed\xa0ntfNIa')
                                                      for _ in range(rng.randint(0, 3)))
        raw = bytes(data)
        assert _strict(raw, jsoncodec.fast_loads) == _strict(raw, None), raw


def test_strict_loads_refusals_are_worded_as_before():
    cases = {
        b"[NaN]": ("constant", "NaN is not allowed in JSON (numbers must be finite)"),
        b"[1e400]": ("constant", "number 1e400 is out of range (numbers must be finite)"),
        b'["\\ud800"]': ("surrogate", "message.0: lone UTF-16 surrogates (\\ud800-\\udfff without a pair) "
                                      "are not allowed in strings"),
        b"[" * 65 + b"]" * 65: ("depth", "message is nested deeper than 64 levels"),
        b"\xff": ("utf8", "message is not valid UTF-8: 'utf-8' codec can't decode byte 0xff in position 0: "
                          "invalid start byte"),
        b"\xef\xbb\xbf[1]": ("json", "message is not valid JSON: Unexpected UTF-8 BOM (decode using utf-8-sig): "
                                     "line 1 column 1 (char 0)"),
    }
    for fast in {jsoncodec.fast_loads, None}:
        for raw, expected in cases.items():
            assert _strict(raw, fast) == ("rejected", *expected), raw
    assert math.isinf(float("1e400"))  # (the rule above is about this)


# -- the stdlib path, forced ----------------------------------------------------------------------
def _python(code: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_env_var_forces_the_stdlib():
    env = dict(os.environ, SYNC_WORKER_JSON="stdlib")
    result = _python("from sync_worker import jsoncodec; from sync_worker.server import validation, database; "
                     "import json; print(jsoncodec.BACKEND, validation._fast_loads, jsoncodec.loads is json.loads, "
                     "database.dumps is jsoncodec.stdlib_dumps)", env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["stdlib", "None", "True", "True"]


def test_whole_system_on_the_stdlib_path():
    """Server, worker (a subprocess: it inherits the variable) and submitter without orjson:
    ``sync-worker demo`` creates, delivers, runs, retries and fails runs over the fast path."""
    env = dict(os.environ, SYNC_WORKER_JSON="stdlib")
    code = ("import sys; from sync_worker import jsoncodec; assert jsoncodec.BACKEND == 'stdlib'; "
            "from sync_worker.cli import main; sys.exit(main(['demo', '--runs', '5']))")
    result = _python(code, env, timeout=150)
    assert result.returncode == 0, result.stdout + result.stderr
    for i in range(5):
        assert f"add({i}, {i * i}) = {i + i * i}" in result.stdout
    assert "flaky(...) = 'succeeded after a retry' (state Completed, after 2 attempts)" in result.stdout
    assert "divide(1, 0) failed as expected" in result.stdout
    assert "worker stopped (exit code 0)" in result.stdout
