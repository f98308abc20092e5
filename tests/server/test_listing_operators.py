"""The operators of the task-run listing (``POST /api/task_runs/filter`` and ``/count``), as
Prefect 3 builds them (``prefect.server.schemas.filters``): each field filter is one criterion
(``start_time``'s ``after_``/``before_`` stay ANDed), the top-level ``operator`` combines the
fields only, and ``state``/``tags``/``flow_run_id`` combine their own pieces with their own
``operator`` (default ``and_``). Against a real embedded server, runs in several states."""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

FLOW_1 = str(uuid.uuid4())
FLOW_2 = str(uuid.uuid4())


@pytest.fixture
def runs(wire) -> dict[str, str]:
    """name -> run id. Seven runs:

    ====  ==========  ===========  =========================  ==========
    name  task key    tags         state (type / name)        flow run
    ====  ==========  ===========  =========================  ==========
    c1    lst.add     math         COMPLETED / Completed      -
    c2    lst.add     math, x      COMPLETED / Cached         FLOW_1
    f1    lst.boom    -            FAILED / Failed            FLOW_2
    f2    lst.boom    -            FAILED / Failed            -
    r1    lst.slow    x            RUNNING / Running          FLOW_1
    s1    lst.wait    -            SCHEDULED / Scheduled      -
    s2    lst.wait    math         SCHEDULED / Scheduled      -
    ====  ==========  ===========  =========================  ==========
    """
    plan = [("c1", "lst.add", ["math"], ("COMPLETED", "Completed"), None),
            ("c2", "lst.add", ["math", "x"], ("COMPLETED", "Cached"), FLOW_1),
            ("f1", "lst.boom", [], ("FAILED", "Failed"), FLOW_2),
            ("f2", "lst.boom", [], ("FAILED", "Failed"), None),
            ("r1", "lst.slow", ["x"], None, FLOW_1),
            ("s1", "lst.wait", [], "SCHEDULED", None),
            ("s2", "lst.wait", ["math"], "SCHEDULED", None)]
    ids: dict[str, str] = {}
    for name, key, tags, final, flow_run_id in plan:
        run = wire.create(key, tags=tags, flow_run_id=flow_run_id)
        ids[name] = run["id"]
        if final == "SCHEDULED":
            continue
        response = wire.set_state(run["id"], "RUNNING", force=True, name="Running")
        assert response.status_code == 201, response.text
        if final is not None:
            response = wire.set_state(run["id"], final[0], force=True, name=final[1])
            assert response.status_code == 201, response.text
    # the table above is what the server stored
    stored = {name: wire.read(run_id) for name, run_id in ids.items()}
    assert {n: (r["state"]["type"], r["state"]["name"]) for n, r in stored.items()} == {
        "c1": ("COMPLETED", "Completed"), "c2": ("COMPLETED", "Cached"), "f1": ("FAILED", "Failed"),
        "f2": ("FAILED", "Failed"), "r1": ("RUNNING", "Running"), "s1": ("SCHEDULED", "Scheduled"),
        "s2": ("SCHEDULED", "Scheduled")}
    assert {n for n, r in stored.items() if r["start_time"] is not None} == {"c1", "c2", "f1", "f2", "r1"}
    return ids


def _check(wire, runs: dict[str, str], task_runs: dict[str, Any], expected: set[str]) -> None:
    """``/filter`` lists exactly ``expected`` (run names) and ``/count`` counts them."""
    body = {"task_runs": task_runs}
    listed = wire.http.post(wire.url + "/task_runs/filter", json=body, timeout=10)
    assert listed.status_code == 200, listed.text
    names = {name for name, run_id in runs.items() if run_id in {r["id"] for r in listed.json()}}
    assert names == expected, task_runs
    assert len(listed.json()) == len(expected)
    counted = wire.http.post(wire.url + "/task_runs/count", json=body, timeout=10)
    assert counted.status_code == 200, counted.text
    assert counted.json() == len(expected), task_runs


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def test_top_level_or_keeps_a_ranged_field_anded(wire, runs):
    """QA's case: a start-time range in 2030 OR an unknown task key is nothing, not every run
    that has a start time (``after_`` OR ``before_`` would be)."""
    _check(wire, runs, {"operator": "or_", "start_time": {"after_": "2030-01-01T00:00:00Z",
                                                           "before_": "2030-01-02T00:00:00Z"},
                        "task_key": {"any_": ["nonexistent"]}}, set())
    now = datetime.now(timezone.utc)
    started_now = {"after_": _iso(now - timedelta(minutes=5)), "before_": _iso(now + timedelta(minutes=5))}
    _check(wire, runs, {"operator": "or_", "start_time": started_now, "task_key": {"any_": ["lst.wait"]}},
           {"c1", "c2", "f1", "f2", "r1", "s1", "s2"})
    _check(wire, runs, {"operator": "or_", "start_time": {**started_now, "is_null_": True},
                        "task_key": {"any_": ["lst.boom"]}}, {"f1", "f2"})
    _check(wire, runs, {"operator": "or_", "expected_start_time": {"after_": "2030-01-01T00:00:00Z",
                                                                    "before_": "2030-01-02T00:00:00Z"},
                        "tags": {"all_": ["x"]}}, {"c2", "r1"})
    # a nested filter is one criterion of the top-level OR, whatever its own operator
    _check(wire, runs, {"operator": "or_", "state": {"type": {"any_": ["COMPLETED"]}, "name": {"any_": ["Cached"]}},
                        "tags": {"all_": ["x"]}}, {"c2", "r1"})
    # the default, and_, is unchanged
    _check(wire, runs, {"start_time": started_now, "task_key": {"any_": ["lst.add", "lst.slow"]}},
           {"c1", "c2", "r1"})


def test_top_level_or_with_an_empty_field_filter_matches_everything_as_in_prefect(wire, runs):
    """Prefect: a field filter without criteria is TRUE, and TRUE OR anything is everything."""
    everything = {"c1", "c2", "f1", "f2", "r1", "s1", "s2"}
    _check(wire, runs, {"operator": "or_", "state": {}, "task_key": {"any_": ["nonexistent"]}}, everything)
    _check(wire, runs, {"operator": "or_", "subflow_runs": {"exists_": False}, "task_key": {"any_": ["x"]}},
           everything)
    _check(wire, runs, {"operator": "or_", "subflow_runs": {"exists_": True}, "task_key": {"any_": ["lst.boom"]}},
           {"f1", "f2"})
    _check(wire, runs, {"state": {}, "task_key": {"any_": ["lst.boom"]}}, {"f1", "f2"})


def test_state_operator_or(wire, runs):
    _check(wire, runs, {"state": {"operator": "or_", "type": {"any_": ["FAILED"]}, "name": {"any_": ["Completed"]}}},
           {"c1", "f1", "f2"})
    _check(wire, runs, {"state": {"operator": "or_", "type": {"any_": ["RUNNING"]}, "name": {"any_": ["Cached"]}}},
           {"c2", "r1"})
    _check(wire, runs, {"state": {"operator": "or_", "type": {"any_": []}, "name": {"any_": ["Cached"]}}}, {"c2"})
    _check(wire, runs, {"state": {"operator": "or_", "type": None, "name": {"any_": ["Scheduled"]}}}, {"s1", "s2"})
    # and_ (also the default): both
    _check(wire, runs, {"state": {"operator": "and_", "type": {"any_": ["COMPLETED"]}, "name": {"any_": ["Cached"]}}},
           {"c2"})
    _check(wire, runs, {"state": {"type": {"any_": ["FAILED"]}, "name": {"any_": ["Completed"]}}}, set())
    # state OR inside a top-level AND
    _check(wire, runs, {"state": {"operator": "or_", "type": {"any_": ["FAILED"]}, "name": {"any_": ["Completed"]}},
                        "flow_run_id": {"is_null_": True}}, {"c1", "f2"})


def test_tags_operator_or_with_is_null(wire, runs):
    _check(wire, runs, {"tags": {"operator": "or_", "all_": ["math"], "is_null_": True}},
           {"c1", "c2", "s2", "f1", "f2", "s1"})
    # all_ stays one criterion: the run has every tag
    _check(wire, runs, {"tags": {"operator": "or_", "all_": ["math", "x"], "is_null_": True}}, {"c2", "f1", "f2", "s1"})
    _check(wire, runs, {"tags": {"operator": "or_", "all_": ["x"], "is_null_": False}},
           {"c1", "c2", "r1", "s2"})
    # and_ (also the default)
    _check(wire, runs, {"tags": {"operator": "and_", "all_": ["math"], "is_null_": True}}, set())
    _check(wire, runs, {"tags": {"all_": ["math"], "is_null_": False}}, {"c1", "c2", "s2"})
    _check(wire, runs, {"tags": {"all_": ["math", "x"]}}, {"c2"})


def test_flow_run_id_operator_or(wire, runs):
    no_flow_run = {"c1", "f2", "s1", "s2"}
    # or_: the runs of these flow runs OR without a flow run
    _check(wire, runs, {"flow_run_id": {"operator": "or_", "any_": [FLOW_1], "is_null_": True}},
           {"c2", "r1"} | no_flow_run)
    _check(wire, runs, {"flow_run_id": {"operator": "or_", "any_": [FLOW_1, FLOW_2], "is_null_": True}},
           {"c2", "r1", "f1"} | no_flow_run)
    _check(wire, runs, {"flow_run_id": {"operator": "or_", "any_": [], "is_null_": True}}, no_flow_run)
    # is_null_ false is Prefect's default, sent by every Prefect client: beside any_ it adds nothing
    _check(wire, runs, {"flow_run_id": {"operator": "or_", "any_": [FLOW_2], "is_null_": False}}, {"f1"})
    _check(wire, runs, {"flow_run_id": {"operator": "or_", "any_": [FLOW_2]}}, {"f1"})
    _check(wire, runs, {"flow_run_id": {"operator": "or_"}}, {"c2", "f1", "r1"})
    _check(wire, runs, {"flow_run_id": {"operator": "or_", "is_null_": True}}, no_flow_run)
    # and_ (the default) is Prefect's answer: is_null_ true is the runs without a flow run
    _check(wire, runs, {"flow_run_id": {"any_": [FLOW_1], "is_null_": True}}, no_flow_run)
    _check(wire, runs, {"flow_run_id": {"any_": [FLOW_1]}}, {"c2", "r1"})
    _check(wire, runs, {"flow_run_id": {}}, {"c2", "f1", "r1"})


@pytest.mark.parametrize("task_runs, words", [
    ({"state": {"operator": "xor_", "type": {"any_": ["FAILED"]}}}, ("state", "operator")),
    ({"tags": {"operator": "OR", "all_": ["math"]}}, ("tags", "operator")),
    ({"flow_run_id": {"operator": "any", "is_null_": True}}, ("flow_run_id", "operator")),
    ({"flow_run_id": {"is_null_": "yes"}}, ("flow_run_id", "is_null_")),
])
def test_a_bad_nested_operator_is_422(wire, runs, task_runs, words):
    for path in ("/task_runs/filter", "/task_runs/count"):
        response = wire.http.post(wire.url + path, json={"task_runs": task_runs}, timeout=10)
        assert response.status_code == 422, response.text
        detail = str(response.json()["detail"])
        assert all(word in detail for word in words), detail
