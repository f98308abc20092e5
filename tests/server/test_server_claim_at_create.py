"""Claim at create: a background run created while a ``claim_at_delivery`` subscriber of its key
is idle with a free credit is claimed for it in the create's own transaction (one commit, not a
create commit and then a claim commit) and sent after that commit. On the wire the subscriber
sees what a claim at delivery gives (RUNNING, "Running on <client_id>", run_count 1, durable
before it arrives); the creator's answer is the run as created. Credit, order, and a subscriber
that stops receiving in between are covered here; the frames a committing thread could only
start (a subscriber that does not read) stay whole and in order."""
from __future__ import annotations

import json
import socket
import time
import uuid
from typing import Any

import websocket

from tests.helpers import wait_for
from tests.server.test_server_claim_at_delivery import _answer, _states, claiming
from tests.server.test_server_claim_commit import _record_batches
from tests.server.test_server_rpc import call, rpc_socket

CREATE = "Core._create_op.<locals>.op"


def _idle(server: Any, count: int = 1, key: str = "tests.add") -> None:
    """Wait until ``count`` subscribers wait for runs of ``key`` (they looked and found none)."""
    queue = server.core.queue

    def waiting() -> bool:
        with queue.lock:
            entry = queue._keys.get(key)
            return entry is not None and len(entry.waiters) >= count
    wait_for(waiting, timeout=10, message=f"{count} idle subscriber(s)")


def _complete(subscriber, run_id: str, credit: int = 1) -> dict[str, Any]:
    request_id = uuid.uuid4().hex
    subscriber.send({"type": "set_state", "request_id": request_id, "task_run_id": run_id,
                     "state": {"type": "COMPLETED"}, "credit": credit})
    return _answer(subscriber, request_id)


def test_a_run_created_for_an_idle_claimer_is_claimed_in_the_creates_own_commit(server, wire):
    subscriber = claiming(wire, 1)
    _idle(server)
    batches = _record_batches(server)
    created = wire.create()
    assert created["state"]["type"] == "SCHEDULED"  # the answer: the run as created
    run = subscriber.next_run()
    assert run["id"] == created["id"]
    assert (run["state"]["type"], run["state"]["name"], run["run_count"]) == ("RUNNING", "Running", 1)
    assert run["state"]["message"] == "Running on claimer"
    assert run["state"]["state_details"]["task_parameters_id"] == created["state"]["state_details"]["task_parameters_id"]
    stored = wire.read(run["id"])  # durable before it was sent
    assert stored["state_type"] == "RUNNING" and stored["state"]["id"] == run["state"]["id"]
    assert _states(wire, run["id"]) == [("SCHEDULED", "Scheduled"), ("RUNNING", "Running")]
    assert batches == [[CREATE]]  # one commit; no claim committed apart
    assert _complete(subscriber, run["id"])["result"]["status"] == "ACCEPT"
    assert wire.read(run["id"])["run_count"] == 1


def test_over_rpc_the_run_arrives_and_the_create_is_answered_after_one_commit(server, wire):
    subscriber = claiming(wire, 1)
    _idle(server)
    ws, _ = rpc_socket(wire)
    batches = _record_batches(server)
    reply = call(ws, {"type": "create", "body": wire.create_body(), "brief": True})
    assert reply["status_code"] == 201 and reply["result"]["state"]["type"] == "SCHEDULED"
    run = subscriber.next_run()
    assert run["id"] == reply["result"]["id"] and run["state"]["type"] == "RUNNING"
    assert batches == [[CREATE]]
    # the wait of the creator is answered at the final state's commit
    request_id = uuid.uuid4().hex
    ws.send(json.dumps({"type": "wait", "request_id": request_id, "task_run_id": run["id"], "timeout": 10}))
    _complete(subscriber, run["id"])
    answer = json.loads(ws.recv())
    assert answer["request_id"] == request_id and answer["result"]["state"]["type"] == "COMPLETED"


def test_the_credit_bounds_claims_at_create_and_queued_runs_keep_their_order(server, wire):
    subscriber = claiming(wire, 1)
    _idle(server)
    first = wire.create()["id"]
    assert subscriber.next_run()["id"] == first
    later = [wire.create()["id"] for _ in range(2)]  # no credit left: queued
    subscriber.expect_no_run(0.3)
    assert [wire.read(i)["state_type"] for i in later] == ["SCHEDULED", "SCHEDULED"]
    _complete(subscriber, first)
    assert subscriber.next_run()["id"] == later[0]
    _complete(subscriber, later[0])
    assert subscriber.next_run()["id"] == later[1]
    _complete(subscriber, later[1])
    _idle(server)
    last = wire.create()["id"]  # idle again: claimed at its create
    run = subscriber.next_run()
    assert run["id"] == last and run["state"]["type"] == "RUNNING"


def test_a_claimer_that_holds_runs_and_has_room_gets_a_new_run_in_the_creates_own_commit(server, wire):
    """A worker busy with runs, waiting for more with a free slot: the next run is claimed for
    it at its create (one commit), not queued, woken for and claimed apart; the credit still
    bounds it (no room left: queued, and delivered when a final state frees a slot)."""
    subscriber = claiming(wire, 3)
    _idle(server)
    held = wire.create()["id"]
    assert subscriber.next_run()["id"] == held
    for _ in range(2):
        _idle(server)  # holding runs, waiting for more
        batches = _record_batches(server)
        created = wire.create()["id"]
        run = subscriber.next_run()
        assert run["id"] == created and run["state"]["type"] == "RUNNING" and run["run_count"] == 1
        assert batches == [[CREATE]]  # one commit: no claim committed apart
        assert _states(wire, created) == [("SCHEDULED", "Scheduled"), ("RUNNING", "Running")]
    last = wire.create()["id"]  # three held, credit 3: no room
    subscriber.expect_no_run(0.3)
    assert wire.read(last)["state_type"] == "SCHEDULED"
    assert _complete(subscriber, held)["result"]["status"] == "ACCEPT"
    assert subscriber.next_run()["id"] == last


def test_two_idle_claimers_each_get_runs_within_their_credit_never_the_same(server, wire):
    one = claiming(wire, 1, client_id="one")
    two = claiming(wire, 1, client_id="two")
    _idle(server, 2)
    ids = [wire.create()["id"] for _ in range(3)]
    got = {one.next_run()["id"], two.next_run()["id"]}
    assert got == set(ids[:2])
    one.expect_no_run(0.2)
    two.expect_no_run(0.1)
    assert wire.read(ids[2])["state_type"] == "SCHEDULED"
    holders = {wire.read(i)["state"]["message"] for i in ids[:2]}
    assert holders == {"Running on one", "Running on two"}


def test_a_claimer_that_stopped_receiving_gets_no_run_at_create(server, wire):
    first = claiming(wire, 5, client_id="leaving")
    _idle(server)
    first.send({"type": "release", "task_run_ids": []})
    wait_for(lambda: all(s._quitting for s in server.core.subscribers), timeout=10, message="release handled")
    run_id = wire.create()["id"]
    first.expect_no_run(0.3)
    assert wire.read(run_id)["state_type"] == "SCHEDULED"
    second = claiming(wire, 1, client_id="staying")
    assert second.next_run()["id"] == run_id


def test_a_claimer_that_stops_receiving_between_the_claim_and_the_commit_gets_it_back_at_once(server, wire):
    """The claim was decided for a subscriber (its credit taken, the run leased to it) and the
    subscriber stopped receiving before the create committed: the run is not sent, and is
    SCHEDULED again at once (not left RUNNING for the lease), its claim not counted."""
    subscriber = claiming(wire, 1, client_id="leaving")
    _idle(server)
    queue = server.core.queue
    original = queue.claim_for

    def claim_for(row):
        waiter = original(row)
        if waiter is not None:
            waiter._quitting = True  # what a ``release`` read right now does
        return waiter

    queue.claim_for = claim_for
    run_id = wire.create()["id"]
    queue.claim_for = original
    wait_for(lambda: wire.read(run_id)["state_type"] == "SCHEDULED", timeout=10, message="handed back")
    stored = wire.read(run_id)
    assert stored["run_count"] == 0 and "Handed back unstarted by leaving" in stored["state"]["message"]
    subscriber.expect_no_run(0.2)
    other = claiming(wire, 1, client_id="other")
    run = other.next_run()
    assert run["id"] == run_id and run["run_count"] == 1


def test_a_create_whose_claim_cannot_be_written_fails_whole_and_the_credit_comes_back(server, wire):
    """The claim is written in the create's transaction: when it cannot be, the create
    writes nothing (its client retries) and the subscriber's credit is free again."""
    subscriber = claiming(wire, 1)
    _idle(server)
    core = server.core
    original = core._set_state_op
    body = wire.create_body()

    def set_state_op(run_id, proposed, force, *args):
        real = original(run_id, proposed, force, *args)
        if run_id != body["id"]:
            return real

        def failing(tx):
            real(tx)  # written, then the statement after it fails: all of it is undone
            raise OSError("injected: disk trouble")
        return failing

    body["id"] = str(uuid.uuid4())
    core._set_state_op = set_state_op
    try:
        response = wire.http.post(wire.url + "/task_runs/", json=body, timeout=10)
    finally:
        core._set_state_op = original
    assert response.status_code >= 500
    assert wire.http.get(f"{wire.url}/task_runs/{body['id']}", timeout=10).status_code == 404
    subscriber.expect_no_run(0.2)
    _idle(server)
    retried = wire.http.post(wire.url + "/task_runs/", json=body, timeout=10)
    assert retried.status_code == 201
    run = subscriber.next_run()
    assert run["id"] == body["id"] and run["state"]["type"] == "RUNNING" and run["run_count"] == 1
    assert _states(wire, run["id"]) == [("SCHEDULED", "Scheduled"), ("RUNNING", "Running")]


def test_answers_sent_by_committing_threads_to_a_client_that_does_not_read_stay_whole(server, wire):
    """rpc waits answered at the final states' commits (in the subscription's thread) to a
    client that reads nothing for a while: the committing thread sends what the socket takes
    without blocking, a frame it could only start is finished before any other, the rest go
    through the connection's sender thread; every answer arrives once, whole."""
    creator, _ = rpc_socket(wire)
    count = 300
    ids = [call(creator, {"type": "create", "body": wire.create_body(tags=["x" * 40] * 20), "brief": True})
           ["result"]["id"] for _ in range(count)]
    waiter = websocket.create_connection(wire.url.replace("http", "ws") + "/sync_worker/rpc", subprotocols=["prefect"],
                                         timeout=10, sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 4096),))
    waiter.send(json.dumps({"type": "auth", "token": None}))
    json.loads(waiter.recv())
    requests = {uuid.uuid4().hex: run_id for run_id in ids}
    for request_id, run_id in requests.items():
        waiter.send(json.dumps({"type": "wait", "request_id": request_id, "task_run_id": run_id, "timeout": 60}))
    wait_for(lambda: sum(len(v) for v in server.core._finish_waiters.values()) == count, timeout=10,
             message="the waits registered")
    channel_ws = list(server._registry._sockets)  # the two rpc connections
    started = []
    for ws in channel_ws:
        ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        original = ws.try_send_many  # (what try_send calls too)

        def try_send_many(messages, ws=ws, original=original):
            sent = original(messages)
            started.append("started" if sent and ws._tail is not None else "sent" if sent else "handed over")
            return sent
        ws.try_send_many = try_send_many
    subscriber = claiming(wire, 1000)
    for _ in range(count):
        run = subscriber.next_run()
        subscriber.send({"type": "set_state", "request_id": uuid.uuid4().hex, "task_run_id": run["id"],
                         "state": {"type": "COMPLETED"}})
    wait_for(lambda: all(wire.read(i)["state_type"] == "COMPLETED" for i in ids[-3:]), timeout=20,
             message="the runs completed")
    time.sleep(0.2)  # let the socket buffers fill
    waiter.settimeout(10)
    answers = [json.loads(waiter.recv()) for _ in range(count)]
    assert sorted(a["request_id"] for a in answers) == sorted(requests)
    assert all(a["status_code"] == 200 and a["result"]["id"] == requests[a["request_id"]] for a in answers)
    assert all(a["result"]["state"]["type"] == "COMPLETED" for a in answers)
    assert "started" in started, "no frame was only started: the test did not fill the socket"
    assert "handed over" in started  # and some went through the sender thread


def test_a_run_wakes_one_subscriber_and_one_that_cannot_take_it_passes_the_wake_on(server, wire):
    """A pushed run wakes one waiting subscriber of its key, not all. One that cannot take it
    (here a Prefect-protocol subscriber still holding an unacknowledged run of another key)
    passes the wake on, so the other subscriber of the key gets the run at once."""
    busy = wire.subscribe(keys=["tests.one", "tests.two"], client_id="busy")
    idle = wire.subscribe(keys=["tests.two"], client_id="idle")
    _idle(server, 1, key="tests.one")
    _idle(server, 2, key="tests.two")
    held = wire.create("tests.one")["id"]
    assert busy.next_run()["id"] == held  # not acknowledged: it may take nothing else
    for _ in range(3):
        run_id = wire.create("tests.two")["id"]
        assert idle.next_run(timeout=5)["id"] == run_id
        idle.ack()
    busy.expect_no_run(0.2)
