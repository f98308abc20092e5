"""The server's per-operation shortcuts give exactly what the long way gives: a create's
fields read directly vs. collected, ids formatted by hand vs. uuid.UUID, times read back
from a cache vs. parsed, the orchestration table looked up vs. scanned, a run encoded whole
vs. in two parts."""
from __future__ import annotations

import copy
import json
import random
import time
import uuid

import pytest

from sync_worker.server import models, orchestration
from sync_worker.server import validation as v
from sync_worker.server.database import RunRow

VALID = {
    "id": "6bcedf04-25d5-4772-9051-acf2df390289", "name": "noop", "task_key": "bench_tasks.noop",
    "dynamic_key": "bench_tasks.noop-6bcedf0425d547729051acf2df390289", "flow_run_id": None,
    "empirical_policy": {"retries": 2, "retry_delay": [1, 2.5], "retry_jitter_factor": 0.5},
    "tags": ["a", "b"], "labels": {"sync-worker.results": "inline"}, "task_inputs": {"x": []},
    "task_version": "1", "cache_key": "ck", "cache_expiration": "2030-01-01T00:00:00Z",
    "state": {"type": "SCHEDULED", "name": "Scheduled", "state_details": {
        "deferred": True, "task_parameters_id": "FC6DC39E-B634-4333-B2E3-BA324B4A5D73",
        "scheduled_time": "2026-11-30T10:00:00.5+01:00"}},
}
BAD_VALUES = [None, "", "x" * 2001, 1, -1, 1.5, True, [], {}, ["x"], {"a": 1}, "not-a-uuid", "2026-13-01",
              [1, 2], [None], ["y" * 501], {"k" * 501: 1}, 10**30, float("1e300"), {"type": "NOPE"}]


def _outcome(body):
    """(fields, None) from the direct reader, or (None, detail) from the collecting one."""
    fast = models._read_create(body, ["body"])
    try:
        slow = models._collect_create(body, ["body"])
    except models.ValidationError as exc:
        assert fast is None, f"the direct reader accepted a body the collector refuses: {exc.detail}"
        return None, exc.detail
    assert fast is not None, f"the direct reader refused a valid body: {body!r:.300}"
    assert fast == slow
    return fast, None


def test_a_valid_create_reads_the_same_both_ways():
    fields, error = _outcome(copy.deepcopy(VALID))
    assert error is None and fields[1] == "bench_tasks.noop"
    assert fields[-1]["state_details"]["task_parameters_id"] == "fc6dc39e-b634-4333-b2e3-ba324b4a5d73"


def test_damaged_creates_are_refused_the_same_way():
    rng = random.Random(1402)
    keys = list(VALID) + ["state.type", "state.name", "state.message", "details.deferred",
                          "details.task_parameters_id", "details.scheduled_time", "details.cache_key",
                          "details.flow_run_id", "policy.retries", "policy.retry_delay", "task_key2"]
    refused = 0
    for _ in range(3000):
        body = copy.deepcopy(VALID)
        for _change in range(rng.randint(1, 3)):
            key = rng.choice(keys)
            value = copy.deepcopy(rng.choice(BAD_VALUES))
            where = body
            state = body.get("state")
            if key.startswith("state."):
                where, key = state, key[6:]
            elif key.startswith("details."):
                where, key = state.get("state_details") if isinstance(state, dict) else None, key[8:]
            elif key.startswith("policy."):
                where, key = body.get("empirical_policy"), key[7:]
            elif key == "task_key2":
                key = "task_key"
            if not isinstance(where, dict):  # replaced by an earlier change
                continue
            if rng.random() < 0.2:
                where.pop(key, None)
            else:
                where[key] = value
        fields, error = _outcome(body)
        refused += error is not None
    assert 500 < refused < 3000  # both kinds were exercised


def test_build_task_run_reports_every_error_at_once():
    body = dict(VALID, task_key="", tags=[1], labels=[])
    with pytest.raises(models.ValidationError) as info:
        models.build_task_run(body, time.time())
    assert info.value.detail == ("body.task_key: String should have at least 1 character; "
                                 "body.tags: Input should be a valid list of strings; "
                                 "body.labels: Input should be a valid dictionary")


def test_new_id_is_what_uuid_gives_for_the_same_bits():
    batch = models._ID_BATCH
    for _ in range(100):
        models._ids.clear()
        state = models._random.getstate()
        made = [models.new_id() for _ in range(3 * batch)]
        models._random.setstate(state)
        expected = []
        for _ in range(3):  # drawn a batch at a time, handed out from the end of the batch
            bits = models._random.getrandbits(128 * batch)
            words = [(bits >> 128 * (batch - 1 - i)) & ((1 << 128) - 1) for i in range(batch)]
            expected += [str(uuid.UUID(int=word, version=4)) for word in reversed(words)]
        assert made == expected
        assert all(uuid.UUID(text).version == 4 for text in made)


@pytest.mark.parametrize("spelling", [
    "6bcedf04-25d5-4772-9051-acf2df390289", "6BCEDF04-25D5-4772-9051-ACF2DF390289", "{6bcedf04-25d5-4772-9051-acf2df390289}",
    "urn:uuid:6bcedf04-25d5-4772-9051-acf2df390289", "6bcedf0425d547729051acf2df390289", "6bcedf04-25d5-4772-9051-acf2df39028",
    "6bcedf04-25d5-4772-9051-acf2df390289\n", " 6bcedf04-25d5-4772-9051-acf2df390289", "6bcedf04_25d5_4772_9051_acf2df390289",
])
def test_check_uuid_is_uuid_canonical_form(spelling):
    try:
        expected = str(uuid.UUID(spelling))
    except ValueError:
        with pytest.raises(models.ValidationError):
            v.check_uuid(spelling, ["id"])
    else:
        assert v.check_uuid(spelling, ["id"]) == expected


def test_parse_time_of_our_own_times_is_parse_datetime():
    rng = random.Random(7)
    now = time.time()
    for _ in range(20000):
        ts = rng.choice([now + rng.uniform(-3, 3), rng.uniform(-62135596800, 253402300799), rng.uniform(0, 4e9)])
        text = models.iso(ts)
        for _again in range(2):  # the second time from the cache
            mine, theirs = models.parse_time(text, []), v.parse_datetime(text, [])
            assert float(mine) == float(theirs) and mine.text == theirs.text == text
    for bad in ("2026-11-30T10:00:00.1234x6Z", "2026-11-30T10:00:00.\u0661\u0662\u0663\u0664\u0665\u0666Z",
                "2026-02-30T10:00:00.123456Z"):
        models.parse_time("2026-11-30T10:00:00.000000Z", [])  # its second is cached
        try:
            theirs = v.parse_datetime(bad, ["t"])
        except models.ValidationError as exc:
            with pytest.raises(models.ValidationError, match="valid ISO 8601"):
                models.parse_time(bad, ["t"])
            assert "valid ISO 8601" in exc.msg
        else:
            assert models.parse_time(bad, ["t"]).text == theirs.text


def test_iso_cache_answers_for_floats_only():
    now = time.time()
    first = models.iso(now)
    assert models.iso(now) == first
    assert models.iso(v.Instant(now, "0001-01-01T00:00:00.000000Z")) == "0001-01-01T00:00:00.000000Z"
    assert models.iso(int(now)) == models.iso(float(int(now)))
    assert models.iso(now + 2e-6) != first  # (1e-6 can round to the same microsecond: ~5 % of clocks)


def test_the_table_lookup_is_the_table():
    for current in orchestration.ANY:
        for proposed in models.STATE_TYPES:
            assert orchestration.match(current, proposed) is orchestration._match(current, proposed)


def test_a_run_encodes_to_the_same_text_whole_or_in_two_parts(monkeypatch):
    run = models.build_task_run(copy.deepcopy(VALID), time.time())
    assert list(run)[-1] == "state"
    texts = set()
    for whole in (True, False):
        monkeypatch.setattr("sync_worker.server.database._ENCODE_WHOLE", whole)
        row = RunRow(id=run["id"], task_key=run["task_key"], state_type="SCHEDULED", run=run)
        texts.add(row.dump())
    assert len(texts) == 1
    assert json.loads(texts.pop()) == json.loads(json.dumps(run))
