"""Listing and inspection end to end: ``POST /api/task_runs/filter`` and ``/count`` in Prefect's
shapes, ``GET /api/sync_worker/stats``, against a real embedded server with a real worker."""
from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest
import requests

from sync_worker.client import Client
from sync_worker.exceptions import TaskRunFailed
from tests.operate import queue_tasks as qt
from tests.helpers import wait_for


@pytest.fixture
def populated(api_env, start_worker):
    """5 completed adds, 2 failed booms, 3 runs waiting for a key nobody serves."""
    worker = start_worker(qt.add, qt.boom, limit=4)
    adds = [qt.add.delay(i, 1) for i in range(5)]
    booms = [qt.boom.delay(f"bad {i}") for i in range(2)]
    waiting = [qt.nobody.delay(i) for i in range(3)]
    assert [f.result(timeout=30) for f in adds] == [1, 2, 3, 4, 5]
    for future in booms:
        with pytest.raises(TaskRunFailed):
            future.result(timeout=30)
    return {"adds": adds, "booms": booms, "waiting": waiting, "worker": worker}


def _post(server, path, body):
    return requests.post(server.url + path, json=body, timeout=10)


def test_filter_by_state_type_task_key_and_name(server, populated):
    client = Client(server.url)
    completed = client.filter_task_runs({"task_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}})
    assert sorted(r["id"] for r in completed) == sorted(f.task_run_id for f in populated["adds"])
    assert all(r["state"]["type"] == "COMPLETED" and r["task_key"] == "queue.add" for r in completed)

    failed = client.filter_task_runs({"task_runs": {"state": {"name": {"any_": ["Failed"]}}}})
    assert sorted(r["id"] for r in failed) == sorted(f.task_run_id for f in populated["booms"])

    waiting = client.filter_task_runs({"task_runs": {"task_key": {"any_": ["queue.nobody"]}}})
    assert sorted(r["id"] for r in waiting) == sorted(f.task_run_id for f in populated["waiting"])
    assert {r["state"]["type"] for r in waiting} == {"SCHEDULED"}

    by_name = client.filter_task_runs({"task_runs": {"name": {"like_": "BOO"}}})  # case-insensitive
    assert len(by_name) == 2
    tagged = client.filter_task_runs({"task_runs": {"tags": {"all_": ["math"]}}})
    assert len(tagged) == 5
    untagged = client.filter_task_runs({"task_runs": {"tags": {"is_null_": True}}})
    assert len(untagged) == 5
    either = client.filter_task_runs({"task_runs": {"operator": "or_", "task_key": {"any_": ["queue.boom"]},
                                                    "state": {"type": {"any_": ["SCHEDULED"]}}}})
    assert len(either) == 5
    # what a Prefect client sends: every field of its models, the unset ones null
    prefect_style = {"sort": "EXPECTED_START_TIME_DESC", "limit": 15, "offset": 0, "flows": None, "flow_runs": None,
                     "deployments": None,
                     "task_runs": {"operator": "and_", "id": None, "name": None, "tags": None, "start_time": None,
                                   "subflow_runs": None, "flow_run_id": None, "future_field": None,
                                   "state": {"operator": "and_", "type": {"any_": ["FAILED"]}, "name": None}}}
    assert len(client.filter_task_runs(prefect_style)) == 2
    one = populated["adds"][0].task_run_id
    assert [r["id"] for r in client.filter_task_runs({"task_runs": {"id": {"any_": [one]}}})] == [one]


def test_sort_limit_offset_and_count(server, populated):
    client = Client(server.url)
    assert client.count_task_runs() == 10
    assert client.count_task_runs({"task_runs": {"state": {"type": {"any_": ["FAILED", "SCHEDULED"]}}}}) == 5
    newest_first = client.filter_task_runs({"sort": "EXPECTED_START_TIME_DESC"})
    assert len(newest_first) == 10
    times = [r["expected_start_time"] for r in newest_first]
    assert times == sorted(times, reverse=True)
    page1 = client.filter_task_runs({"sort": "EXPECTED_START_TIME_DESC", "limit": 4})
    page2 = client.filter_task_runs({"sort": "EXPECTED_START_TIME_DESC", "limit": 4, "offset": 4})
    assert [r["id"] for r in page1 + page2] == [r["id"] for r in newest_first[:8]]
    by_name = client.filter_task_runs({"sort": "NAME_ASC"})
    assert [r["name"] for r in by_name] == sorted(r["name"] for r in by_name)
    ended = client.filter_task_runs({"sort": "END_TIME_DESC", "task_runs": {"start_time": {"is_null_": False}}})
    assert len(ended) == 7
    # time ranges: everything was created in the last minute, nothing is expected tomorrow
    now = datetime.now(timezone.utc)
    recent = {"task_runs": {"expected_start_time": {"after_": (now - timedelta(minutes=1)).isoformat()}}}
    assert client.count_task_runs(recent) == 10
    later = {"task_runs": {"expected_start_time": {"after_": (now + timedelta(days=1)).isoformat()}}}
    assert client.count_task_runs(later) == 0
    # background runs have no flow run: Prefect's flow_run_id filter default (is_null_=False) excludes them
    assert client.count_task_runs({"task_runs": {"flow_run_id": {"is_null_": True}}}) == 10
    assert client.count_task_runs({"task_runs": {"flow_run_id": {}}}) == 0


@pytest.mark.parametrize("body, field", [
    ({"limit": 201}, "limit"),
    ({"limit": -1}, "limit"),
    ({"offset": -5}, "offset"),
    ({"offset": 2**70}, "offset"),  # past SQLite's integers: 422, not a 500
    ({"sort": "RANDOM"}, "sort"),
    ({"task_runs": {"state": {"type": {"any_": ["DONE"]}}}}, "any_"),
    ({"task_runs": {"colour": {"any_": ["red"]}}}, "colour"),
    ({"task_runs": {"expected_start_time": {"after_": "yesterday"}}}, "after_"),
    ({"task_runs": {"operator": "xor_"}}, "operator"),
    ({"flow_runs": {"id": {"any_": ["x"]}}}, "flow_runs"),
    ([1, 2], "body"),
])
def test_bad_filters_get_422_naming_the_field(server, body, field):
    for path in ("/task_runs/filter", "/task_runs/count"):
        if path.endswith("count") and field in ("limit", "offset", "sort"):
            continue
        response = _post(server, path, body)
        assert response.status_code == 422, response.text
        assert field in response.json()["detail"]


def test_filter_without_body_lists_everything_and_bad_json_is_422(server, api_env):
    qt.nobody.delay(1)
    response = requests.post(server.url + "/task_runs/filter", timeout=10)
    assert response.status_code == 200 and len(response.json()) == 1
    assert requests.post(server.url + "/task_runs/count", data=b"{", timeout=10,
                         headers={"Content-Type": "application/json"}).status_code == 422
    # a body without a JSON content type is refused before it is read (the browser rule)
    assert requests.post(server.url + "/task_runs/count", data=b"{}", timeout=10).status_code == 415


def test_a_delayed_run_is_not_the_oldest_waiting_one(server, api_env):
    """A run delayed by a day is not waiting for a worker: it does not make its key look stuck
    (the overview, ``sync-worker status``); the oldest waiting run is the first one due."""
    client = Client(server.url)

    def nobody() -> dict:
        return {k["task_key"]: k for k in client.read_stats()["task_keys"]}["queue.nobody"]

    qt.nobody.apply_async((1,), countdown=86400)
    assert nobody()["counts"] == {"SCHEDULED": 1}
    assert nobody()["oldest_scheduled_id"] is None and nobody()["oldest_scheduled_age_seconds"] is None
    due = qt.nobody.delay(2)
    assert nobody()["oldest_scheduled_id"] == due.task_run_id
    assert 0 <= nobody()["oldest_scheduled_age_seconds"] < 60


def test_stats_counts_oldest_scheduled_and_workers(server, populated):
    client = Client(server.url)
    time.sleep(0.05)  # the oldest waiting run has an age > 0
    stats = client.read_stats()
    keys = {k["task_key"]: k for k in stats["task_keys"]}
    assert keys["queue.add"]["counts"] == {"COMPLETED": 5}
    assert keys["queue.boom"]["counts"] == {"FAILED": 2}
    assert keys["queue.nobody"]["counts"] == {"SCHEDULED": 3}
    first = requests.get(f"{server.url}/task_runs/{populated['waiting'][0].task_run_id}", timeout=10).json()
    assert keys["queue.nobody"]["oldest_scheduled"] == first["created"]
    assert keys["queue.nobody"]["oldest_scheduled_age_seconds"] > 0
    assert keys["queue.nobody"]["workers"] == []
    [worker] = keys["queue.add"]["workers"]
    assert worker["client_id"] == populated["worker"].client_id
    assert worker["host"].startswith("127.0.0.1")
    assert worker["limit"] == 4 and worker["in_flight"] == 0
    assert sorted(worker["task_keys"]) == ["queue.add", "queue.boom"]
    assert [w["client_id"] for w in client.read_workers()] == [worker["client_id"]]


def test_stats_shows_runs_in_flight(server, api_env, start_worker, tmp_path):
    start_worker(qt.slow, limit=3)
    futures = [qt.slow.delay(str(tmp_path / f"m{i}"), 1.0) for i in range(2)]
    client = Client(server.url)
    wait_for(lambda: all((tmp_path / f"m{i}").exists() for i in range(2)), 20, "both runs started")
    [worker] = client.read_workers()
    assert worker["in_flight"] == 2
    for future in futures:
        future.result(timeout=30)
    wait_for(lambda: client.read_workers()[0]["in_flight"] == 0, 10, "no run in flight")
