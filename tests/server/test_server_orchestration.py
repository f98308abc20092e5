"""The orchestration table, proposal by proposal, over REST."""
from __future__ import annotations

import pytest

from sync_worker.server.orchestration import RULES, match, retry_delay


def _to(wire, run_id, *types):
    for state_type in types:
        assert wire.set_state(run_id, state_type).status_code == 201


def test_second_pending_claim_is_aborted(wire):
    run = wire.create()
    first = wire.set_state(run["id"], "PENDING").json()
    second = wire.set_state(run["id"], "PENDING").json()
    assert first["status"] == "ACCEPT"
    assert second["status"] == "ABORT"
    assert second["details"]["type"] == "abort_details"
    assert "already PENDING" in second["details"]["reason"]
    _to(wire, run["id"], "RUNNING")
    third = wire.set_state(run["id"], "PENDING").json()
    assert third["status"] == "ABORT" and "already RUNNING" in third["details"]["reason"]


def test_running_twice_is_aborted(wire):
    run = wire.create()
    _to(wire, run["id"], "PENDING", "RUNNING")
    assert wire.set_state(run["id"], "RUNNING").json()["status"] == "ABORT"
    assert wire.read(run["id"])["run_count"] == 1


@pytest.mark.parametrize("terminal", ["COMPLETED", "FAILED", "CANCELLED", "CRASHED"])
@pytest.mark.parametrize("proposed", ["PENDING", "RUNNING"])
def test_terminal_runs_never_start_again(wire, terminal, proposed):
    run = wire.create()
    _to(wire, run["id"], "PENDING", "RUNNING", terminal)
    body = wire.set_state(run["id"], proposed).json()
    assert body["status"] == "REJECT"
    assert body["state"]["type"] == terminal  # the current state comes back
    assert wire.read(run["id"])["state_type"] == terminal


def test_terminal_to_terminal_needs_force(wire):
    run = wire.create()
    _to(wire, run["id"], "PENDING", "RUNNING", "COMPLETED")
    refused = wire.set_state(run["id"], "FAILED").json()
    assert refused["status"] == "REJECT"
    assert "force" in refused["details"]["reason"]
    forced = wire.set_state(run["id"], "FAILED", force=True).json()
    assert forced["status"] == "ACCEPT"
    assert wire.read(run["id"])["state_type"] == "FAILED"


def test_force_accepts_anything_and_can_requeue(wire):
    run = wire.create()
    _to(wire, run["id"], "PENDING", "RUNNING", "COMPLETED")
    body = wire.set_state(run["id"], "SCHEDULED", force=True, state_details={"deferred": True}).json()
    assert body["status"] == "ACCEPT"
    subscriber = wire.subscribe()
    assert subscriber.next_run()["id"] == run["id"]


def test_failed_without_retries_left_is_accepted(wire):
    run = wire.create(empirical_policy={"retries": 0})
    _to(wire, run["id"], "PENDING", "RUNNING")
    body = wire.set_state(run["id"], "FAILED", message="boom").json()
    assert body["status"] == "ACCEPT"
    assert body["state"]["message"] == "boom"
    read = wire.read(run["id"])
    assert read["end_time"] is not None and read["state_type"] == "FAILED"


def test_not_retriable_failure_is_accepted(wire):
    run = wire.create(empirical_policy={"retries": 3})
    _to(wire, run["id"], "PENDING", "RUNNING")
    body = wire.set_state(run["id"], "FAILED", state_details={"retriable": False}).json()
    assert body["status"] == "ACCEPT"


def test_awaiting_retry_keeps_task_parameters_id(wire):
    run = wire.create(empirical_policy={"retries": 1})
    parameters_id = run["state"]["state_details"]["task_parameters_id"]
    _to(wire, run["id"], "PENDING", "RUNNING")
    body = wire.set_state(run["id"], "FAILED").json()
    assert body["state"]["state_details"]["task_parameters_id"] == parameters_id
    scheduled = body["state"]["state_details"]["scheduled_time"]
    assert wire.read(run["id"])["next_scheduled_start_time"] == scheduled


def test_cancel_a_scheduled_run_dequeues_it(wire):
    run = wire.create()
    assert wire.set_state(run["id"], "CANCELLED").json()["status"] == "ACCEPT"
    subscriber = wire.subscribe()
    subscriber.expect_no_run(0.3)


def test_states_get_ids_and_timestamps(wire):
    run = wire.create()
    ids = {run["state"]["id"]}
    for state_type in ("PENDING", "RUNNING", "COMPLETED"):
        state = wire.set_state(run["id"], state_type).json()["state"]
        assert state["id"] not in ids
        ids.add(state["id"])
        assert state["timestamp"].endswith("Z")
        assert state["state_details"]["task_run_id"] == run["id"]


# -- the table itself --------------------------------------------------------------------------
def test_table_first_match():
    assert match("PENDING", "PENDING").action == "ABORT"
    assert match("COMPLETED", "RUNNING").action == "REJECT"
    assert match("RUNNING", "FAILED").action == "RETRY"
    assert match(None, "RUNNING").action == "ACCEPT"
    assert match("SCHEDULED", "PENDING").action == "ACCEPT"
    assert RULES[-1].action == "ACCEPT"


def test_retry_delay_list_and_jitter():
    assert retry_delay({"retry_delay": [1, 2, 3]}, 1) == 1
    assert retry_delay({"retry_delay": [1, 2, 3]}, 3) == 3
    assert retry_delay({"retry_delay": [1, 2, 3]}, 9) == 3
    assert retry_delay({"retry_delay": 4}, 1) == 4
    assert retry_delay({"retry_delay": None}, 1) == 0
    samples = {retry_delay({"retry_delay": 10, "retry_jitter_factor": 0.5}, 1) for _ in range(50)}
    assert all(5 <= s <= 15 for s in samples)
    assert len(samples) > 1


def test_racing_claims_have_exactly_one_winner(wire, server):
    import threading

    import requests

    runs = [wire.create()["id"] for _ in range(20)]
    results: dict[str, list[str]] = {run_id: [] for run_id in runs}
    barrier = threading.Barrier(4)

    def claim() -> None:
        session = requests.Session()
        barrier.wait()
        for run_id in runs:
            body = session.post(f"{server.url}/task_runs/{run_id}/set_state",
                                json={"state": {"type": "PENDING"}}).json()
            results[run_id].append(body["status"])

    threads = [threading.Thread(target=claim) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    for statuses in results.values():
        assert sorted(statuses) == ["ABORT", "ABORT", "ABORT", "ACCEPT"]
