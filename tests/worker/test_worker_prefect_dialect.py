"""The Prefect dialect in the default suite: the embedded server in Prefect-compatible mode
announces no extension and serves no rpc socket, so the client behaves exactly as it does
with a Prefect server (states over REST, PENDING claims, Prefect's flow control, stopping
by closing the socket)."""
from __future__ import annotations

import json

import pytest
import websocket

from sync_worker.client import Client
from sync_worker.schemas import StateType
from tests.helpers import drop_events, load_capture, record_events, wait_for
from tests.worker import worker_tasks as wt


def test_prefect_compatible_server_announces_nothing_and_has_no_rpc(prefect_like):
    ws = websocket.create_connection(prefect_like.url.replace("http", "ws") + "/task_runs/subscriptions/scheduled",
                                     subprotocols=["prefect"], timeout=10)
    ws.send(json.dumps({"type": "auth", "token": None}))
    assert json.loads(ws.recv()) == {"type": "auth_success"}  # exactly Prefect's answer
    ws.close()
    from sync_worker.rpc import RpcUnavailable

    client = Client()
    with pytest.raises(RpcUnavailable):
        client.rpc.connection()
    assert client.rpc._unsupported  # asked once, remembered


def test_runs_are_claimed_over_rest_and_report_running_and_completed_as_events(prefect_like, start_worker, monkeypatch):
    """As Prefect's own worker: the claim (PENDING) is a REST proposal, RUNNING and
    COMPLETED are client-side-orchestration events the server records on the run (its
    state is the event's: same id), nothing falls back to REST."""
    calls: list[str] = []
    posted: list[dict] = []
    original_set, original_emit = Client.set_task_run_state, Client.emit_events

    def counting(self, run_id, state, *args, **kwargs):
        calls.append(state.type.value)
        return original_set(self, run_id, state, *args, **kwargs)

    def emitting(self, events, **kwargs):
        posted.extend(events)
        return original_emit(self, events, **kwargs)

    monkeypatch.setattr(Client, "set_task_run_state", counting)
    monkeypatch.setattr(Client, "emit_events", emitting)
    worker = start_worker(wt.add, limit=3)
    futures = [wt.add.delay(i, 10) for i in range(20)]
    assert [f.result(timeout=60) for f in futures] == [i + 10 for i in range(20)]
    assert calls == ["PENDING"] * 20
    assert not worker._subscription.supports_set_state
    recorded = {e["id"]: e for e in posted if e["resource"].get("prefect.orchestration") == "client"}
    assert sorted(e["event"] for e in recorded.values()) == sorted(
        f"prefect.task-run.{name}" for name in ("Scheduled", "Pending", "Running", "Completed") for _ in range(20))
    client = Client()
    for future in futures:
        run = client.read_task_run(future.task_run_id)
        assert run.state.type is StateType.COMPLETED and run.state.id in recorded
        assert run.run_count == 1 and run.start_time is not None and run.end_time >= run.start_time
        event = recorded[run.state.id]
        assert event["payload"]["task_run"]["run_count"] == 1 and event["payload"]["initial_state"]["type"] == "RUNNING"
        history = [s["type"] for s in client.read_task_run_states(future.task_run_id)]
        assert history[-3:] == ["PENDING", "RUNNING", "COMPLETED"]
    assert worker._prefect.events.fallbacks == 0


def _captured_events() -> dict[str, dict]:
    """Prefect 3.8.8's own engine's events for one run (captured on /api/events/in)."""
    return {e["event"]: e for e in load_capture("events_in_task_run_add.json")["events"]}


def test_state_events_have_the_shape_of_prefects_own_and_completed_follows_running(prefect_like, start_worker,
                                                                                    monkeypatch):
    """As Prefect's engine chains them: COMPLETED ``follows`` the RUNNING event, RUNNING the
    PENDING one (the claim; SCHEDULED is sent by ``.delay()``, as Prefect's ``apply_async``
    does), with the same
    resource labels and ``validated_state`` keys as the captured events. The repeat sent later
    to wake late callers has the same labels but ``prefect.orchestration`` (not recorded again).
    Before: no ``follows``, and the repeat lacked the run-count, state-message and
    state-timestamp labels and carried the state's timestamp and task_run_id."""
    posted = record_events(monkeypatch)
    worker = start_worker(wt.add)
    worker._prefect.events.repeat_after = 0.2
    future = wt.add.delay(1, 2)
    assert future.result(timeout=60) == 3
    wait_for(lambda: len([e for e in posted if e["event"] == "prefect.task-run.Completed"]) >= 2, timeout=30,
             message="the COMPLETED event and its repeat")
    captured = _captured_events()
    scheduled = next(e for e in posted if e["event"] == "prefect.task-run.Scheduled")  # sent by .delay()
    pending = next(e for e in posted if e["event"] == "prefect.task-run.Pending")  # the claim, sent by the worker
    running = next(e for e in posted if e["event"] == "prefect.task-run.Running")
    completed, repeat = [e for e in posted if e["event"] == "prefect.task-run.Completed"][:2]
    assert completed["follows"] == running["id"] and running["follows"] == pending["id"]
    assert "follows" not in pending and "follows" not in scheduled
    assert scheduled["payload"]["intended"] == captured["prefect.task-run.Scheduled"]["payload"]["intended"]
    assert pending["payload"]["intended"] == captured["prefect.task-run.Pending"]["payload"]["intended"]
    for ours in (scheduled, pending, running, completed):
        theirs = captured[ours["event"]]
        assert sorted(ours["resource"]) == sorted(theirs["resource"])
        assert sorted(ours["payload"]["validated_state"]) == sorted(theirs["payload"]["validated_state"])
        assert "task_run_id" not in ours["payload"]["validated_state"]["state_details"]
    assert sorted(repeat["resource"]) == sorted(set(captured["prefect.task-run.Completed"]["resource"])
                                                - {"prefect.orchestration"})
    assert sorted(repeat["payload"]["validated_state"]) == sorted(completed["payload"]["validated_state"])
    assert repeat["payload"]["validated_state"]["state_details"] == completed["payload"]["validated_state"]["state_details"]
    assert repeat["id"] != completed["id"]


def test_a_completed_event_the_server_drops_is_proposed_over_rest(prefect_like, start_worker, monkeypatch):
    """The events intake has no acknowledgement: a COMPLETED event that is never recorded
    is found by the read-back and proposed over REST, so the final state is not lost."""
    drop_events(monkeypatch, lambda e: e["event"] == "prefect.task-run.Completed"
                and e["resource"].get("prefect.orchestration") == "client")
    worker = start_worker(wt.add)
    worker._prefect.events.repeat_after = 0.5
    future = wt.add.delay(1, 2)
    client = Client()
    wait_for(lambda: client.read_task_run(future.task_run_id).state.type is StateType.COMPLETED, timeout=30,
             message="the final state proposed over REST after the read-back")
    assert future.result(timeout=30) == 3
    assert worker._prefect.events.fallbacks == 1


def test_retries_then_success(prefect_like, start_worker, tmp_path):
    start_worker(wt.fail_then_succeed)
    attempts = tmp_path / "attempts"
    future = wt.fail_then_succeed.delay(str(attempts), 2)
    assert future.result(timeout=60) == "succeeded on attempt 3"
    assert future.state.type is StateType.COMPLETED


def test_stopping_worker_hands_back_by_closing_its_socket(prefect_like, start_worker):
    wt.GATE.reset()
    stopping = start_worker(wt.gated, limit=1)
    futures = [wt.gated.delay(i) for i in range(3)]
    wait_for(lambda: wt.GATE.current == 1, message="one run executing")
    stopping.stop()
    idle = start_worker(wt.gated, limit=5)
    wait_for(lambda: idle.current_tasks == 2, message="the other worker running the two others")
    wt.GATE.opened.set()
    assert sorted(f.result(timeout=30) for f in futures) == [0, 1, 2]
    assert stopping.join(30) and stopping.finished_task_runs == {"tests.gated": 1}


def test_a_server_that_records_no_state_events_gets_proposals(prefect_like, start_worker, monkeypatch):
    """A server that takes events but never records them (Prefect with its task_run_recorder
    service off): after 3 read-back batches in a row found nothing recorded, the worker
    proposes its states over REST again; every run still ends COMPLETED."""
    from sync_worker.prefect_reporting import UNRECORDED_BATCHES

    original_set = Client.set_task_run_state
    proposals: list[str] = []

    def counting(self, run_id, state, *args, **kwargs):
        proposals.append(state.type.value)
        return original_set(self, run_id, state, *args, **kwargs)

    drop_events(monkeypatch, lambda e: e["resource"].get("prefect.orchestration") == "client")
    monkeypatch.setattr(Client, "set_task_run_state", counting)
    worker = start_worker(wt.add)
    worker._prefect.events.repeat_after = 0.3
    for i in range(UNRECORDED_BATCHES):
        assert wt.add.delay(i, 1).result(timeout=30) == i + 1  # the read-back's proposal
        wait_for(lambda i=i: worker._prefect.events.fallbacks == i + 1, message="the read-back's proposal")
    assert proposals.count("RUNNING") == 0
    assert wt.add.delay(5, 5).result(timeout=30) == 10
    assert proposals[-2:] == ["RUNNING", "COMPLETED"]  # proposed, no read-back needed
    assert worker._prefect.events.fallbacks == UNRECORDED_BATCHES


def test_a_failure_whose_running_event_is_never_recorded_keeps_the_retry_count(prefect_like, start_worker,
                                                                              monkeypatch, tmp_path):
    """The server's retry rule counts attempts from RUNNING. When the RUNNING event is not
    recorded in time, the worker proposes RUNNING before the FAILED: retries=2 still means
    exactly 3 attempts (deciding from the delivered count would retry for ever)."""
    from sync_worker import TaskRunFailed, dialects

    monkeypatch.setattr(dialects, "RECORDED_WAIT", 0.2)
    drop_events(monkeypatch, lambda e: e["event"] == "prefect.task-run.Running")
    start_worker(wt.always_fails)
    attempts = tmp_path / "attempts"
    future = wt.always_fails.delay(str(attempts))
    with pytest.raises(TaskRunFailed):
        future.result(timeout=60)
    run = Client().read_task_run(future.task_run_id)
    assert run.state.type is StateType.FAILED and run.run_count == 3
    assert len(attempts.read_text().splitlines()) == 3


def test_a_read_back_the_server_does_not_answer_is_tried_again(prefect_like, start_worker, monkeypatch):
    """The read-back of a COMPLETED sent as an event is itself a request that can fail: it is
    tried again (every CHECK_RETRY_AFTER s), and the unrecorded state is then proposed."""
    import requests

    from sync_worker import prefect_reporting

    monkeypatch.setattr(prefect_reporting, "CHECK_RETRY_AFTER", 0.2)
    drop_events(monkeypatch, lambda e: e["event"] == "prefect.task-run.Completed"
                and e["resource"].get("prefect.orchestration") == "client")
    original_filter = Client.filter_task_runs
    reads: list[str] = []
    api_url = Client().api_url

    def flaky_filter(self, body=None, **kwargs):
        if self.api_url != api_url:  # another test's worker still reading back (its server is gone)
            return original_filter(self, body, **kwargs)
        reads.append("read")
        if len(reads) == 1:
            raise requests.ConnectionError("server unreachable (test)")
        return original_filter(self, body, **kwargs)

    monkeypatch.setattr(Client, "filter_task_runs", flaky_filter)
    worker = start_worker(wt.add)
    worker._prefect.events.repeat_after = 0.3
    future = wt.add.delay(20, 22)
    assert future.result(timeout=30) == 42
    assert len(reads) == 2 and worker._prefect.events.fallbacks == 1


def test_execute_task_run_on_a_worker_never_started_leaves_no_thread_behind(prefect_like):
    """``execute_task_run`` without ``start()``: the run's states are proposed from the
    calling thread. Before, the worker's event thread was started for it and, the worker
    never being stopped, kept reading the run back (and warning) after its server was gone."""
    import threading

    from sync_worker.worker import TaskWorker

    before = {t for t in threading.enumerate() if t.name == "sync-worker-prefect-events"}
    future = wt.add.delay(20, 22)  # nobody serves it
    worker = TaskWorker(wt.add, limit=1)
    outcome = worker.execute_task_run(Client().read_task_run(future.task_run_id))
    assert outcome.value == "completed"
    assert future.result(timeout=10) == 42
    history = [s["type"] for s in Client().read_task_run_states(future.task_run_id)]
    assert history[-3:] == ["PENDING", "RUNNING", "COMPLETED"]
    after = {t for t in threading.enumerate() if t.name == "sync-worker-prefect-events"}
    assert after <= before
