"""Runs read from their JSON field by field (``transport.LazyTaskRun``): a delivered run
has what a worker needs read at once and the rest on first use, and is then the same run
:meth:`TaskRun.from_json` reads; a malformed delivery is refused when it arrives."""
from __future__ import annotations

import copy
import threading

import pytest

from sync_worker.schemas import StateType, TaskRun
from sync_worker.transport import LazyTaskRun

DELIVERED = {
    "id": "0b5d9f1e-0000-4000-8000-000000000000", "name": "noop", "task_key": "bench.noop",
    "dynamic_key": "bench.noop-0b5d9f1e", "run_count": 1, "tags": ["a"], "flow_run_id": None,
    "labels": {"sync-worker.results": "inline"},
    "state": {"type": "RUNNING", "name": "Running", "timestamp": "2026-11-30T03:50:00.123456Z",
              "id": "0b5d9f1e-0000-4000-8000-000000000001",
              "state_details": {"deferred": True, "task_parameters_id": "p-1"}},
    "empirical_policy": {"retries": 2, "retry_delay": 1.5}, "task_inputs": {"x": []},
    "created": "2026-11-30T03:50:00.123456Z", "expected_start_time": "2026-11-30T03:50:00.123456Z",
    "start_time": "2026-11-30T03:50:00.223456Z", "end_time": None, "unknown_field": 1,
}


def test_a_delivered_run_reads_the_rest_on_first_use_and_is_then_the_whole_run():
    run = LazyTaskRun.delivered(copy.deepcopy(DELIVERED))
    assert isinstance(run, TaskRun)
    assert set(vars(run)) == {"id", "name", "task_key", "state", "labels", "parameters_record", "_source"}
    assert run.state.type is StateType.RUNNING and run.state.state_details.task_parameters_id == "p-1"
    assert "_source" in vars(run)  # nothing else read yet
    assert run.empirical_policy.retries == 2
    assert "_source" not in vars(run)
    assert vars(run) == vars(TaskRun.from_json(DELIVERED))


def test_a_parameters_record_delivered_with_the_run_is_read_at_once():
    record = '{"metadata": {}, "result": "{}"}'
    run = LazyTaskRun.delivered({**copy.deepcopy(DELIVERED), "parameters_record": record})
    assert "_source" in vars(run) and run.parameters_record == record
    assert TaskRun.from_json({**DELIVERED, "parameters_record": record}).parameters_record == record
    assert LazyTaskRun.delivered({**copy.deepcopy(DELIVERED), "parameters_record": 5}).parameters_record is None
    assert LazyTaskRun.delivered(copy.deepcopy(DELIVERED)).parameters_record is None
    assert "parameters_record" not in TaskRun.from_json({**DELIVERED, "parameters_record": record}).to_json()


def test_concurrent_first_reads_give_one_consistent_run():
    for _ in range(50):
        run = LazyTaskRun.delivered(copy.deepcopy(DELIVERED))
        state = run.state
        seen: list[object] = []
        def read(run: LazyTaskRun = run, seen: list[object] = seen) -> None:
            seen.append((run.created, run.run_count, run.tags))

        threads = [threading.Thread(target=read) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(set(map(repr, seen))) == 1 and run.state is state  # the state read first is kept


@pytest.mark.parametrize("broken", [
    {"id": None, "task_key": None},  # no task_key
    {"state": {"name": "no type"}},
    {"state": {"type": "NOT_A_STATE"}},
    {"state": {"type": "RUNNING", "timestamp": "yesterday"}},
])
def test_a_malformed_delivery_is_refused_when_it_arrives(broken):
    message = {**copy.deepcopy(DELIVERED), **broken}
    if broken.get("task_key", 0) is None:
        del message["task_key"]
    with pytest.raises((KeyError, TypeError, ValueError)):
        LazyTaskRun.delivered(message)


def test_a_copy_made_by_dataclasses_replace_is_a_whole_run():
    import dataclasses

    run = LazyTaskRun.delivered(copy.deepcopy(DELIVERED))
    moved = dataclasses.replace(run, run_count=2)  # what the Prefect dialect does to a delivered run
    assert moved.run_count == 2 and moved.created == TaskRun.from_json(DELIVERED).created
    assert "_source" not in vars(moved) and moved.state == run.state


def test_a_waited_run_has_its_state_read_and_the_rest_on_first_use():
    run = LazyTaskRun.answered(copy.deepcopy(DELIVERED))
    assert set(vars(run)) == {"id", "state", "_source"}
    assert run.state.type is StateType.RUNNING
    assert run.task_key == "bench.noop" and vars(run) == vars(TaskRun.from_json(DELIVERED))
