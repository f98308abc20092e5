"""The ``claim_at_delivery`` extension on the wire: the server commits RUNNING before it sends a
run, so the worker sends no ack and no RUNNING proposal; old clients (no opt-in) and the
Prefect-compatible mode are unaffected."""
from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest

from tests.helpers import wait_for
from tests.server.conftest import Subscriber, read_close


def claiming(wire, credit: int, keys=None, client_id: str = "claimer", **extra: Any) -> Subscriber:
    ws = wire.connect()
    ws.send(json.dumps({"type": "auth", "token": None}))
    reply = json.loads(ws.recv())
    assert "claim_at_delivery" in reply["extensions"]
    ws.send(json.dumps({"type": "subscribe", "keys": keys or ["tests.add"], "client_id": client_id,
                        "credit": credit, "claim_at_delivery": True, **extra}))
    subscriber = Subscriber(ws, reply)
    wire._sockets.append(subscriber)
    return subscriber


def _answer(subscriber: Subscriber, request_id: str, timeout: float = 10.0) -> dict[str, Any]:
    subscriber.ws.settimeout(timeout)
    while True:
        message = json.loads(subscriber.ws.recv())  # (not recv(): it would hand back _pending first)
        if message.get("type") == "set_state_result" and message.get("request_id") == request_id:
            return message
        subscriber._pending.append(message)


def _states(wire, run_id: str) -> list[tuple[str, str]]:
    response = wire.http.get(f"{wire.url}/task_run_states/", params={"task_run_id": run_id}, timeout=10)
    return [(s["type"], s["name"]) for s in response.json()]


def test_runs_arrive_running_and_committed(wire):
    ids = [wire.create()["id"] for _ in range(3)]
    subscriber = claiming(wire, 2)
    delivered = [subscriber.next_run() for _ in range(2)]
    assert [run["id"] for run in delivered] == ids[:2]
    for run in delivered:
        assert (run["state"]["type"], run["state"]["name"], run["run_count"]) == ("RUNNING", "Running", 1)
        assert run["state"]["message"] == "Running on claimer"
        # the parameters id is carried over to the RUNNING state the worker reads it from
        assert run["state"]["state_details"]["task_parameters_id"]
        stored = wire.read(run["id"])  # durable before it was sent
        assert stored["state"]["id"] == run["state"]["id"] and stored["state_type"] == "RUNNING"
        assert _states(wire, run["id"]) == [("SCHEDULED", "Scheduled"), ("RUNNING", "Running")]
    subscriber.expect_no_run(0.3)  # credit spent; the third waits
    assert wire.read(ids[2])["state_type"] == "SCHEDULED"


def test_final_state_with_credit_brings_the_next_run_and_no_ack_is_needed(wire):
    ids = [wire.create()["id"] for _ in range(3)]
    subscriber = claiming(wire, 1)
    for expected in ids:
        run = subscriber.next_run()
        assert run["id"] == expected and run["state"]["type"] == "RUNNING"
        request_id = uuid.uuid4().hex
        subscriber.send({"type": "set_state", "request_id": request_id, "task_run_id": run["id"],
                         "state": {"type": "COMPLETED"}, "credit": 1})
        answer = _answer(subscriber, request_id)  # the next run may come first: kept for next_run()
        assert answer["result"]["status"] == "ACCEPT"
    assert [wire.read(i)["state_type"] for i in ids] == ["COMPLETED"] * 3
    assert [wire.read(i)["run_count"] for i in ids] == [1, 1, 1]


def test_a_running_proposed_anyway_is_aborted_not_counted_twice(wire):
    run_id = wire.create()["id"]
    subscriber = claiming(wire, 1)
    assert subscriber.next_run()["id"] == run_id
    assert subscriber.set_state(run_id, "RUNNING")["result"]["status"] == "ABORT"
    assert wire.read(run_id)["run_count"] == 1


def test_a_run_claimed_at_delivery_is_leased(server_factory, make_wire):
    wire = make_wire(server_factory(lease_timeout=0.5))
    run_id = wire.create()["id"]
    subscriber = claiming(wire, 1, client_id="dies")
    assert subscriber.next_run()["id"] == run_id
    subscriber.close()  # never finishes it
    other = claiming(wire, 1, client_id="other")
    again = other.next_run(timeout=15)
    assert again["id"] == run_id and again["state"]["type"] == "RUNNING" and again["run_count"] == 2
    names = [name for _, name in _states(wire, run_id)]
    assert names[-1] == "Retrying" and "Scheduled" in names[1:]  # re-queued by the lease, claimed again


def test_release_with_ids_hands_back_unstarted_runs(wire):
    ids = [wire.create()["id"] for _ in range(3)]
    stopping = claiming(wire, 3, client_id="stopping")
    delivered = [stopping.next_run()["id"] for _ in range(3)]
    assert delivered == ids
    stopping.send({"type": "release", "task_run_ids": ids[1:]})  # ids[0] is executing
    other = claiming(wire, 5, client_id="other")
    taken = sorted(other.next_run()["id"] for _ in range(2))
    assert taken == sorted(ids[1:])
    for run_id in ids[1:]:
        run = wire.read(run_id)
        assert run["run_count"] == 1 and run["state"]["message"] == "Running on other"
        assert [t for t, _ in _states(wire, run_id)] == ["SCHEDULED", "RUNNING", "SCHEDULED", "RUNNING"]
    assert wire.read(ids[0])["state_type"] == "RUNNING"  # still the stopping worker's
    other.expect_no_run(0.3)
    stopping.expect_no_run(0.3)  # released: nothing more for it


def test_a_run_cancelled_while_queued_is_not_claimed(wire):
    first, second = wire.create()["id"], wire.create()["id"]
    response = wire.http.post(f"{wire.url}/task_runs/{first}/set_state",
                              json={"state": {"type": "CANCELLED"}, "force": True}, timeout=10)
    assert response.json()["status"] == "ACCEPT"
    subscriber = claiming(wire, 2)
    assert subscriber.next_run()["id"] == second
    subscriber.expect_no_run(0.3)
    assert wire.read(first)["state_type"] == "CANCELLED"


def test_old_clients_are_unaffected(wire):
    run_id = wire.create()["id"]
    subscriber = wire.subscribe()  # no opt-in: Prefect's protocol
    run = subscriber.next_run()
    assert run["id"] == run_id and run["state"]["type"] == "SCHEDULED"
    subscriber.ack()
    assert wire.read(run_id)["state_type"] == "SCHEDULED"


@pytest.mark.parametrize("subscribe, words", [
    ({"claim_at_delivery": True}, "requires 'credit'"),
    ({"claim_at_delivery": "yes", "credit": 1}, "true or false"),
    ({"batch_delivery": True, "credit": 1}, "requires 'claim_at_delivery'"),
])
def test_bad_opt_in_closes_with_4001(wire, subscribe, words):
    ws = wire.connect()
    ws.send(json.dumps({"type": "auth", "token": None}))
    ws.recv()
    ws.send(json.dumps({"type": "subscribe", "keys": ["k"], "client_id": "c", **subscribe}))
    code, reason = read_close(ws)
    assert code == 4001 and words in reason


def test_credit_in_set_state_needs_the_opt_in(wire):
    subscriber = wire.subscribe()
    subscriber.send({"type": "set_state", "request_id": "r", "task_run_id": str(uuid.uuid4()),
                     "state": {"type": "COMPLETED"}, "credit": 1})
    code, reason = subscriber.close_code()
    assert code == 4001 and "claim_at_delivery" in reason


def test_prefect_compatible_server_ignores_the_opt_in(server_factory, make_wire, tmp_path):
    wire = make_wire(server_factory(prefect_compatible=True, database=str(tmp_path / "compat.db")))
    run_id = wire.create()["id"]
    ws = wire.connect()
    ws.send(json.dumps({"type": "auth", "token": None}))
    assert json.loads(ws.recv()) == {"type": "auth_success"}
    ws.send(json.dumps({"type": "subscribe", "keys": ["tests.add"], "client_id": "c", "credit": 1,
                        "claim_at_delivery": True}))
    run = json.loads(ws.recv())
    assert run["id"] == run_id and run["state"]["type"] == "SCHEDULED"
    ws.close()


def test_many_runs_claimed_in_batches_each_once(wire):
    ids = {wire.create()["id"] for _ in range(60)}
    subscriber = claiming(wire, 16)
    seen: list[str] = []
    started = time.monotonic()
    while len(seen) < 60:
        run = subscriber.next_run()
        assert run["state"]["type"] == "RUNNING"
        seen.append(run["id"])
        subscriber.send({"type": "set_state", "request_id": run["id"], "task_run_id": run["id"],
                         "state": {"type": "COMPLETED"}, "credit": 1})
    assert len(set(seen)) == 60 and set(seen) == ids and time.monotonic() - started < 60
    wait_for(lambda: all(wire.read(i)["state_type"] == "COMPLETED" for i in ids), timeout=30,
             message="every run COMPLETED")
    assert all(wire.read(i)["run_count"] == 1 for i in ids)


def test_batch_delivery_sends_runs_claimed_together_in_one_frame(wire):
    ids = [wire.create()["id"] for _ in range(5)]
    subscriber = claiming(wire, 4, batch_delivery=True)
    assert "batch_delivery" in subscriber.auth_reply["extensions"]
    frame = subscriber.recv()
    assert frame["type"] == "task_runs"
    assert [run["id"] for run in frame["task_runs"]] == ids[:4]
    assert all(run["state"]["type"] == "RUNNING" for run in frame["task_runs"])
    subscriber.send({"type": "set_state", "request_id": "a", "task_run_id": ids[0], "state": {"type": "COMPLETED"},
                     "credit": 1})
    # the answer and the next run may come in either order (the grant is read before the commit)
    messages = [subscriber.recv(), subscriber.recv()]
    assert [m.get("request_id") for m in messages if m.get("type") == "set_state_result"] == ["a"]
    single = next(m for m in messages if "type" not in m)  # one run ready: sent alone, as a plain TaskRun
    assert single["id"] == ids[4] and single["state"]["type"] == "RUNNING"


def test_a_delivery_lost_with_its_worker_does_not_use_up_a_retry(server_factory, make_wire):
    """A claim at delivery is RUNNING before the function starts: a worker killed or paused
    after the delivery (its lease ran out) cost the run a retry, and a task with
    ``retries=1`` that then failed once ended FAILED without being retried (crash soak)."""
    wire = make_wire(server_factory(lease_timeout=0.5))
    run_id = wire.create(empirical_policy={"retries": 1, "retry_delay": 0})["id"]
    lost = claiming(wire, 1, client_id="dies")
    assert lost.next_run()["id"] == run_id
    lost.close()  # never starts it
    other = claiming(wire, 1, client_id="other")
    again = other.next_run(timeout=15)
    assert again["id"] == run_id and again["run_count"] == 2  # the history still counts the lost RUNNING
    failed = other.set_state(run_id, "FAILED", message="boom")["result"]
    assert (failed["status"], failed["state"]["name"]) == ("REJECT", "AwaitingRetry")  # its one retry
    other.send({"type": "credit", "n": 1})  # the slot it freed
    retried = other.next_run(timeout=15)
    assert retried["id"] == run_id and retried["run_count"] == 3
    final = other.set_state(run_id, "FAILED", message="boom again")["result"]
    assert (final["status"], final["state"]["type"]) == ("ACCEPT", "FAILED")  # and no more


def test_a_reconnect_naming_no_run_gets_a_lost_delivery_again(server_factory, make_wire):
    """A run is leased before its frame is sent: if the frame is lost with the connection, the
    worker's next connection (same client_id) must not hold it unknowingly, RUNNING for as long
    as that connection lives. Naming what it holds, it does not take that run over: the old
    lease runs out and the run is delivered again."""
    wire = make_wire(server_factory(lease_timeout=1.0))
    run_id = wire.create()["id"]
    first = claiming(wire, 1, client_id="blip")
    assert first.next_run()["id"] == run_id
    first.close()  # as if the frame never arrived
    again = claiming(wire, 1, client_id="blip", holding=[])
    run = again.next_run(timeout=15)
    assert run["id"] == run_id and run["state"]["type"] == "RUNNING" and run["run_count"] == 2
    assert again.set_state(run_id, "COMPLETED")["result"]["status"] == "ACCEPT"


def test_a_reconnect_keeps_the_runs_it_names(server_factory, make_wire):
    wire = make_wire(server_factory(lease_timeout=1.0))
    held, lost = wire.create()["id"], wire.create()["id"]
    first = claiming(wire, 2, client_id="blip")
    assert sorted(first.next_run()["id"] for _ in range(2)) == sorted([held, lost])
    first.close()
    again = claiming(wire, 0, client_id="blip", holding=[held])  # no credit: nothing new for it
    other = claiming(wire, 1, client_id="other")
    run = other.next_run(timeout=15)
    assert run["id"] == lost and run["run_count"] == 2  # the one not named went back to the queue
    other.expect_no_run(2.0)  # the named one stays with its worker past the lease, and it finishes it
    assert again.set_state(held, "COMPLETED")["result"]["status"] == "ACCEPT"
    assert wire.read(held)["run_count"] == 1


@pytest.mark.parametrize("holding", ["abc", [1], {"id": "x"}])
def test_bad_holding_closes_with_4001(wire, holding):
    subscriber = claiming(wire, 1, holding=holding)
    code, reason = read_close(subscriber.ws)
    assert code == 4001 and "'holding'" in reason


def _listed_limits(wire) -> list[int]:
    response = wire.http.get(f"{wire.url}/sync_worker/workers", timeout=10)
    return [w["limit"] for w in response.json()]


def test_a_worker_naming_its_limit_is_listed_with_it(server_factory, make_wire):
    """A worker that reconnects with runs still reporting has free slots the server cannot tell
    from held runs: credit 4 and four held runs were listed as limit 8 for a ``--limit 4``
    worker. The limit it names is what is listed; without one, the server's estimate."""
    wire = make_wire(server_factory())
    held = [wire.create()["id"] for _ in range(4)]
    first = claiming(wire, 4, client_id="blip")
    assert sorted(first.next_run()["id"] for _ in range(4)) == sorted(held)
    first.close()
    again = claiming(wire, 4, client_id="blip", holding=held, limit=4)
    wait_for(lambda: _listed_limits(wire) == [4], timeout=10, message="the listed limit")
    again.close()
    estimate = claiming(wire, 4, client_id="old", holding=held[:2])
    wait_for(lambda: _listed_limits(wire) == [6], timeout=10, message="the listed limit")
    estimate.close()


@pytest.mark.parametrize("limit", [0, -1, "4", 2.5, True])
def test_bad_limit_closes_with_4001(wire, limit):
    subscriber = claiming(wire, 1, limit=limit)
    code, reason = read_close(subscriber.ws)
    assert code == 4001 and "'limit'" in reason


def test_a_lease_expiring_while_the_database_is_locked_is_re_queued_once_it_is_writable(
        server_factory, make_wire, tmp_path, monkeypatch, caplog):
    """The expiry's write failed (another process held the database) and the timer was
    dropped without a word: the run stayed RUNNING for good, 12 lease periods later."""
    import sqlite3

    from sync_worker.server import database

    monkeypatch.setattr(database, "BUSY_TIMEOUT", 0.2)
    path = tmp_path / "locked.db"
    wire = make_wire(server_factory(lease_timeout=0.5, database=str(path)))
    run_id = wire.create()["id"]
    gone = claiming(wire, 1, client_id="gone")
    assert gone.next_run()["id"] == run_id
    locker = sqlite3.connect(str(path), timeout=0, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        gone.close()
        wait_for(lambda: f"could not re-queue run {run_id} after its lease expired" in caplog.text, timeout=30,
                 message="the expiry refused by the locked database")
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    other = claiming(wire, 1, client_id="other")
    run = other.next_run(timeout=15)
    assert run["id"] == run_id and run["run_count"] == 2
    assert caplog.text.count(f"could not re-queue run {run_id}") == 1  # then DEBUG while it lasts


def test_a_claim_the_database_refuses_is_tried_again_once_a_second_not_in_a_loop(server_factory, make_wire,
                                                                                 monkeypatch):
    """On a full disk each refused claim gave its run back to the queue, which woke the same
    subscriber at once: 1,100-1,700 attempts (and WARNING lines) a second, a log that kept
    the disk full. Now the retry timer's second is kept."""
    from sync_worker.server.database import StorageError

    server = server_factory()
    wire = make_wire(server)
    core = server.core
    original = core.claim_at_delivery
    attempts: list[float] = []
    refusing = {"until": time.monotonic() + 1.6}

    def full_disk(run_ids, holder, before=None, inline_parameters=False):
        if time.monotonic() < refusing["until"]:
            attempts.append(time.monotonic())
            return [StorageError(507, "disk full: cannot write to the database") for _ in run_ids]
        return original(run_ids, holder, before, inline_parameters)

    monkeypatch.setattr(core, "claim_at_delivery", full_disk)
    first = wire.create()["id"]  # queued: the subscriber claims it at delivery
    subscriber = claiming(wire, 5, client_id="full")
    wait_for(lambda: attempts, timeout=10, message="the first claim refused")
    connection = server.queue._keys["tests.add"].members[0]
    for _ in range(30):  # as each run created meanwhile does: it tried again at once each time
        connection.wake()
        time.sleep(0.02)
    run = subscriber.next_run(timeout=15)
    assert run["id"] == first and run["state"]["type"] == "RUNNING"
    assert 1 <= len(attempts) <= 4, len(attempts)
