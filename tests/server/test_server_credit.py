"""Flow control on the subscription socket: Prefect's one-run-per-ack, and the embedded
server's ``credit`` extension (several runs in flight, but never more than granted)."""
from __future__ import annotations

import json

import pytest
import websocket
from tests.server.conftest import Subscriber, read_close


def subscribe_with_credit(wire, credit, keys=None, client_id="credit-client") -> Subscriber:
    ws = wire.connect()
    ws.send(json.dumps({"type": "auth", "token": None}))
    reply = json.loads(ws.recv())
    assert "credit" in reply["extensions"]
    ws.send(json.dumps({"type": "subscribe", "keys": keys or ["tests.add"], "client_id": client_id, "credit": credit}))
    subscriber = Subscriber(ws, reply)
    wire._sockets.append(subscriber)
    return subscriber


def test_auth_success_announces_the_extensions(wire):
    subscriber = wire.subscribe()
    assert {"set_state", "credit", "direct_running", "release"} <= set(subscriber.auth_reply["extensions"])


def test_without_credit_one_run_at_a_time_as_in_prefect(wire):
    ids = [wire.create()["id"] for _ in range(2)]
    subscriber = wire.subscribe()
    assert subscriber.next_run()["id"] == ids[0]
    subscriber.expect_no_run(0.3)
    subscriber.ack()
    assert subscriber.next_run()["id"] == ids[1]


def test_credit_sends_that_many_runs_without_acks_and_no_more(wire):
    ids = [wire.create()["id"] for _ in range(5)]
    subscriber = subscribe_with_credit(wire, 3)
    assert [subscriber.next_run()["id"] for _ in range(3)] == ids[:3]
    subscriber.expect_no_run(0.3)
    for _ in range(3):
        subscriber.ack()  # acks do not grant credit
    subscriber.expect_no_run(0.3)
    subscriber.send({"type": "credit", "n": 1})
    assert subscriber.next_run()["id"] == ids[3]
    subscriber.expect_no_run(0.3)
    subscriber.send({"type": "credit", "n": 5})
    assert subscriber.next_run()["id"] == ids[4]


def test_zero_credit_receives_nothing_until_granted(wire):
    run_id = wire.create()["id"]
    subscriber = subscribe_with_credit(wire, 0)
    subscriber.expect_no_run(0.3)
    subscriber.send({"type": "credit", "n": 1})
    assert subscriber.next_run()["id"] == run_id


def test_unacknowledged_runs_go_back_at_once_acknowledged_ones_keep_their_lease(wire):
    ids = [wire.create()["id"] for _ in range(3)]
    first = subscribe_with_credit(wire, 3, client_id="first")
    assert [first.next_run()["id"] for _ in range(3)] == ids
    first.ack()  # the oldest (ids[0]) is now leased to "first"
    first.close()
    second = subscribe_with_credit(wire, 10, client_id="second")
    assert sorted([second.next_run()["id"], second.next_run()["id"]]) == sorted(ids[1:])
    second.expect_no_run(0.5)  # ids[0] stays with its lease (30 s by default)


@pytest.mark.parametrize("credit", [-1, "3", 1.5, True])
def test_a_bad_credit_in_subscribe_closes_with_4001(wire, credit):
    ws = wire.connect()
    ws.send(json.dumps({"type": "auth", "token": None}))
    ws.recv()
    ws.send(json.dumps({"type": "subscribe", "keys": ["k"], "client_id": "c", "credit": credit}))
    code, reason = read_close(ws)
    assert code == 4001 and "credit" in reason


def test_a_credit_message_needs_credit_flow_control(wire):
    subscriber = wire.subscribe()
    subscriber.send({"type": "credit", "n": 1})
    code, reason = subscriber.close_code()
    assert code == 4001 and "credit" in reason


def test_a_bad_grant_closes_with_4001(wire):
    subscriber = subscribe_with_credit(wire, 1)
    subscriber.send({"type": "credit", "n": -2})
    code, reason = subscriber.close_code()
    assert code == 4001 and "'n'" in reason


def test_running_is_a_claim_by_itself(wire):
    run_id = wire.create()["id"]
    subscriber = subscribe_with_credit(wire, 1)
    assert subscriber.next_run()["id"] == run_id
    subscriber.ack()
    first = subscriber.set_state(run_id, "RUNNING")
    assert first["result"]["status"] == "ACCEPT"
    assert first["result"]["state"]["type"] == "RUNNING"
    again = subscriber.set_state(run_id, "RUNNING")
    assert again["result"]["status"] == "ABORT"
    assert wire.read(run_id)["run_count"] == 1


def test_release_hands_back_unacknowledged_runs_and_stops_deliveries(server, wire):
    """The ``release`` extension: a stopping worker gives back what it did not start and
    keeps its connection (the lease of what it did start)."""
    ws = wire.connect()
    ws.send(json.dumps({"type": "auth", "token": None}))
    assert "release" in json.loads(ws.recv())["extensions"]
    ws.send(json.dumps({"type": "subscribe", "keys": ["tests.add"], "client_id": "stopping", "credit": 3}))
    runs = [wire.create() for _ in range(3)]
    first, second, third = (json.loads(ws.recv())["id"] for _ in range(3))
    ws.send(json.dumps({"type": "ack"}))  # the first one is started: leased
    ws.send(json.dumps({"type": "release"}))
    ws.send(json.dumps({"type": "credit", "n": 5}))  # ignored after release
    other = wire.subscribe(client_id="other")
    handed_back = {other.next_run()["id"]}
    other.ack()
    handed_back.add(other.next_run()["id"])
    assert handed_back == {second, third}
    other.ack()
    wire.create()  # a new run goes to the other subscriber, never to the released connection
    assert other.next_run()["id"] not in {r["id"] for r in runs}
    ws.settimeout(0.5)
    with pytest.raises(websocket.WebSocketTimeoutException):
        ws.recv()
    assert first not in handed_back
    ws.close()
