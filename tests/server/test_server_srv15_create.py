"""The create's cheaper paths (issue 14): :func:`models._common_create` reads the create every
client of ours sends with a few type tests and gives exactly the fields the general reader
(:func:`models._read_create`) gives, or None so that the general reader decides (errors worded
as always)."""
from __future__ import annotations

import copy
import math
import uuid
from typing import Any

import pytest

from sync_worker.server import models
from sync_worker.server.models import ValidationError, _common_create, _read_create, build_task_run


def _body(**changes: Any) -> dict[str, Any]:
    """The create body our client sends (``.delay()``, captured), with ``changes``."""
    run_id = str(uuid.uuid4())
    body = {"id": run_id, "name": "noop", "task_key": "compare.noop",
            "dynamic_key": f"compare.noop-{run_id.replace('-', '')}", "flow_run_id": None,
            "empirical_policy": {"retries": 0, "retry_delay": 0.0}, "tags": [],
            "labels": {"sync-worker.results": "inline"}, "task_inputs": {},
            "state": {"type": "SCHEDULED", "name": "Scheduled",
                      "state_details": {"deferred": True, "task_parameters_id": str(uuid.uuid4())}}}
    for key, value in changes.items():
        if value is _DROP:
            body.pop(key, None)
        else:
            body[key] = value
    return body


_DROP = object()

#: bodies the common path takes: it must give what the general reader gives
TAKEN = [
    _body(),
    _body(state={"type": "SCHEDULED", "name": "Scheduled", "state_details": {"deferred": True}}),
    _body(state={"type": "SCHEDULED", "state_details": {}}),
    _body(state={"type": "PENDING", "name": None, "message": "why", "data": {"a": [1]}, "state_details": None}),
    _body(state=None),
    _body(state=_DROP, tags=_DROP, labels=_DROP, task_inputs=_DROP, flow_run_id=_DROP, empirical_policy=_DROP),
    _body(empirical_policy={"retries": 3, "retry_delay": 5}),
    _body(empirical_policy={"retries": None, "retry_delay": None}),
    _body(empirical_policy={}),
    _body(empirical_policy=None),
    _body(tags=None, labels=None, task_inputs=None),
    _body(task_inputs={"x": [], "y": [{"input_type": "parameter", "name": "z"}]}),
    _body(name="é ü 日本 \u2028", task_key="k" * 2000, dynamic_key=""),
    _body(state={"type": "COMPLETED", "name": "n" * 500, "message": "m" * 100_000, "state_details": {"deferred": False}}),
]

#: bodies it leaves to the general reader (valid or not)
LEFT = [
    _body(extra=1),
    _body(name=None),
    _body(name=_DROP),
    _body(name=5),
    _body(task_key=""),
    _body(task_key="k" * 2001),
    _body(dynamic_key="k" * 2001),
    _body(id="0B8A1B2C-1111-4222-8333-444455556666"),  # valid, not canonical
    _body(id="not-a-uuid"),
    _body(id=None),
    _body(flow_run_id=str(uuid.uuid4())),
    _body(tags=["a"]),
    _body(tags="a"),
    _body(labels={"k" * 501: "v"}),
    _body(labels=[]),
    _body(task_inputs={str(i): [] for i in range(1001)}),
    _body(empirical_policy={"retries": True}),
    _body(empirical_policy={"retries": 1.0}),
    _body(empirical_policy={"retries": -1}),
    _body(empirical_policy={"retries": 10_001}),
    _body(empirical_policy={"retry_delay": False}),
    _body(empirical_policy={"retry_delay": math.nan}),
    _body(empirical_policy={"retry_delay": math.inf}),
    _body(empirical_policy={"retry_delay": -0.5}),
    _body(empirical_policy={"retry_delay": [1, 2]}),
    _body(empirical_policy={"retries": 1, "retry_jitter_factor": 0.5}),
    _body(empirical_policy="x"),
    _body(state={"type": "NOPE"}),
    _body(state={"name": "x"}),
    _body(state={"type": "SCHEDULED", "name": 1}),
    _body(state={"type": "SCHEDULED", "message": "m" * 100_001}),
    _body(state={"type": "SCHEDULED", "extra": 1}),
    _body(state={"type": "SCHEDULED", "state_details": {"deferred": 1}}),
    _body(state={"type": "SCHEDULED", "state_details": {"task_parameters_id": "nope"}}),
    _body(state={"type": "SCHEDULED", "state_details": {"scheduled_time": "2030-01-01T00:00:00Z"}}),
    _body(state={"type": "SCHEDULED", "state_details": []}),
    _body(state="SCHEDULED"),
]


@pytest.mark.parametrize("body", TAKEN)
def test_the_common_path_gives_the_general_readers_fields(body):
    original = copy.deepcopy(body)
    fields = _common_create(body)
    assert fields is not None
    assert fields == _read_create(body, ["body"])
    assert body == original  # the body is not modified
    proposed = fields[-1]
    if proposed is not None and body["state"].get("state_details"):
        assert proposed["state_details"] is not body["state"]["state_details"]  # a copy, as validate_state makes


@pytest.mark.parametrize("body", LEFT)
def test_anything_else_is_left_to_the_general_reader(body):
    assert _common_create(body) is None


@pytest.mark.parametrize("body", LEFT)
def test_build_task_run_accepts_and_refuses_as_the_general_reader_does(body, monkeypatch):
    def build(b):
        try:
            return build_task_run(copy.deepcopy(b), 1_790_000_000.25)
        except ValidationError as exc:
            return exc.to_json()

    with_common = build(body)
    monkeypatch.setattr(models, "_common_create", lambda b: None)
    without = build(body)
    if isinstance(with_common, dict) and "detail" in with_common:
        assert with_common == without
    else:
        for run in (with_common, without):  # fresh ids: compare the rest
            run["state"].pop("id"), run.pop("state_id")
            if "id" not in body or body["id"] is None:
                run.pop("id"), run["state"]["state_details"].pop("task_run_id")
        assert with_common == without


@pytest.mark.parametrize("body", TAKEN)
def test_a_run_built_on_the_common_path_is_the_run_built_without_it(body, monkeypatch):
    now = 1_790_000_000.125
    fast = build_task_run(copy.deepcopy(body), now)
    monkeypatch.setattr(models, "_common_create", lambda b: None)
    slow = build_task_run(copy.deepcopy(body), now)
    for run in (fast, slow):
        run["state"].pop("id"), run.pop("state_id")
    assert fast == slow
    assert list(fast) == list(slow)  # the same key order: the stored text is the same
