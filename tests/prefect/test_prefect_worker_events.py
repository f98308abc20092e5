"""Our worker reports RUNNING and COMPLETED to a real Prefect 3.8.8 server as Prefect's own
worker does: client-side-orchestration events that Prefect's ``task_run_recorder`` records
(issue 12, part 5). The claim stays a REST PENDING; what Prefect's API shows for the runs
is what it shows for runs of Prefect's own worker; a COMPLETED event that never gets
recorded is found by the read-back and proposed over REST.
"""
from __future__ import annotations

import uuid

import pytest
from prefect_support import read_run, settled_history

from tests.helpers import drop_events


def _key(name: str) -> str:
    return f"sw-{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def recorded_events(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Every event our client POSTs (passed on to the server unchanged)."""
    from tests.helpers import record_events

    return record_events(monkeypatch)


def test_running_and_completed_are_events_prefect_records(prefect_server, sync_worker_env, start_worker,
                                                          recorded_events, monkeypatch):
    from sync_worker import task
    from sync_worker.client import Client

    sync_worker_env(prefect_server)
    proposals: list[str] = []
    original = Client.set_task_run_state

    def counting(self, run_id, state, *args, **kwargs):
        proposals.append(state.type.value)
        return original(self, run_id, state, *args, **kwargs)

    monkeypatch.setattr(Client, "set_task_run_state", counting)

    @task(task_key=_key("mul"), tags=["events"])
    def mul(x: int, y: int) -> int:
        return x * y

    futures = [mul.delay(i, 3) for i in range(8)]
    worker = start_worker(mul)
    assert [f.result(timeout=60) for f in futures] == [i * 3 for i in range(8)]
    assert proposals == ["PENDING"] * 8  # the claim; nothing else over REST

    client_events = {e["id"]: e for e in recorded_events if e["resource"].get("prefect.orchestration") == "client"}
    for future in futures:
        run = read_run(prefect_server, future.task_run_id)
        assert (run["state_type"], run["state_name"], run["run_count"]) == ("COMPLETED", "Completed", 1)
        assert run["state_id"] in client_events  # recorded by Prefect's recorder, not proposed
        assert run["start_time"] and run["end_time"] and run["end_time"] >= run["start_time"]
        assert run["state"]["data"]["storage_key"]
        assert run["tags"] == ["events"]
        history = settled_history(prefect_server, future.task_run_id, 4)
        assert [s["name"] for s in history] == ["Scheduled", "Pending", "Running", "Completed"]
        assert history[2]["id"] in client_events and history[3]["id"] in client_events
    assert worker._prefect.events.fallbacks == 0


def test_a_completed_event_prefect_never_records_is_proposed_over_rest(prefect_server, sync_worker_env,
                                                                       start_worker, monkeypatch):
    from sync_worker import task

    sync_worker_env(prefect_server)
    drop_events(monkeypatch, lambda e: e["event"] == "prefect.task-run.Completed"
                and e["resource"].get("prefect.orchestration") == "client")

    @task(task_key=_key("inc"))
    def inc(x: int) -> int:
        return x + 1

    future = inc.delay(41)
    worker = start_worker(inc)
    worker._prefect.events.repeat_after = 1.0
    assert future.result(timeout=60) == 42
    run = read_run(prefect_server, future.task_run_id)
    assert run["state_type"] == "COMPLETED" and run["state"]["data"]["storage_key"]
    assert worker._prefect.events.fallbacks == 1


def test_a_failed_run_with_retries_is_retried_by_prefects_rule(prefect_server, sync_worker_env, start_worker,
                                                               tmp_path):
    """RUNNING went as an event; the failure waits until Prefect recorded it, so Prefect's
    retry rule counts the attempts right: retries=2 -> exactly 3 attempts, run_count 3."""
    from sync_worker import TaskRunFailed, task

    sync_worker_env(prefect_server)
    attempts = tmp_path / "attempts"

    @task(task_key=_key("fails"), retries=2)
    def fails(path: str) -> None:
        with open(path, "a") as handle:
            handle.write("x")
        raise RuntimeError("still broken")

    future = fails.delay(str(attempts))
    start_worker(fails)
    with pytest.raises(TaskRunFailed, match="still broken"):
        future.result(timeout=60)
    run = read_run(prefect_server, future.task_run_id)
    assert (run["state_type"], run["run_count"]) == ("FAILED", 3)
    assert attempts.read_text() == "xxx"


def test_delay_and_the_claim_send_the_scheduled_and_pending_events_prefects_own_do(prefect_server, sync_worker_env,
                                                                                  start_worker, recorded_events):
    """Prefect's ``apply_async`` sends the run's Scheduled event and its task worker a Pending
    event after its claim (shared/prefect-protocol/events_in_task_run_add.json: Scheduled,
    Pending, Running, Completed); Prefect's event feed and automations see the run appear
    and be claimed. Read back from Prefect's own event store."""
    import time

    from prefect_support import prefect_api

    from sync_worker import task

    sync_worker_env(prefect_server)

    @task(task_key=_key("dbl"))
    def dbl(x: int) -> int:
        return 2 * x

    futures = [dbl.delay(i) for i in range(3)]
    start_worker(dbl)
    assert [f.result(timeout=60) for f in futures] == [0, 2, 4]

    def names(run_id: str) -> list[str]:
        body = {"filter": {"resource": {"id": [f"prefect.task-run.{run_id}"]},
                           "occurred": {"since": "2000-01-01T00:00:00Z", "until": "2100-01-01T00:00:00Z"}},
                "limit": 50}
        response = prefect_api().post(f"{prefect_server.api_url}/events/filter", json=body,
                                      headers=prefect_server.auth_header(), timeout=30)
        response.raise_for_status()
        events = sorted(response.json()["events"], key=lambda e: e["occurred"])
        return [e["event"] for e in events if e["resource"].get("prefect.orchestration") == "client"]

    expected = ["prefect.task-run.Scheduled", "prefect.task-run.Pending", "prefect.task-run.Running",
                "prefect.task-run.Completed"]
    for future in futures:
        deadline = time.monotonic() + 30  # Prefect's persister writes events in batches
        while names(future.task_run_id) != expected and time.monotonic() < deadline:
            time.sleep(0.2)
        assert names(future.task_run_id) == expected
        scheduled = next(e for e in recorded_events if e["event"] == "prefect.task-run.Scheduled"
                         and e["resource"]["prefect.resource.id"] == f"prefect.task-run.{future.task_run_id}")
        assert scheduled["payload"]["intended"] == {"from": None, "to": "SCHEDULED"}
        assert scheduled["payload"]["validated_state"]["state_details"]["deferred"] is True
        pending = next(e for e in recorded_events if e["event"] == "prefect.task-run.Pending"
                       and e["resource"]["prefect.resource.id"] == f"prefect.task-run.{future.task_run_id}")
        assert pending["payload"]["intended"] == {"from": "SCHEDULED", "to": "PENDING"}
        history = settled_history(prefect_server, future.task_run_id, 4)
        assert [s["name"] for s in history] == ["Scheduled", "Pending", "Running", "Completed"]  # no state twice
