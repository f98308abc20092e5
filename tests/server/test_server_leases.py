"""Delivery guarantees: unacked runs come back at once, leased runs after lease_timeout,
max_deliveries ends in CRASHED, and a restart rebuilds everything from the database."""
from __future__ import annotations

import time

import websocket
from tests.helpers import wait_for


def test_unacked_run_goes_back_when_connection_closes(server_factory, make_wire):
    server = server_factory(lease_timeout=30)
    w = make_wire(server)
    first = w.subscribe(client_id="first")
    run = w.create()
    assert first.next_run()["id"] == run["id"]
    first.ws.close()
    second = w.subscribe(client_id="second")
    started = time.monotonic()
    assert second.next_run()["id"] == run["id"]
    assert time.monotonic() - started < 5  # no lease wait
    assert w.read(run["id"])["state"]["name"] == "Scheduled"


def test_acked_run_of_dropped_worker_is_redelivered_after_lease(server_factory, make_wire):
    server = server_factory(lease_timeout=0.5, max_deliveries=3)
    w = make_wire(server)
    first = w.subscribe(client_id="first")
    run = w.create()
    assert first.next_run()["id"] == run["id"]
    first.ack()
    assert first.set_state(run["id"], "PENDING")["result"]["status"] == "ACCEPT"
    assert first.set_state(run["id"], "RUNNING")["result"]["status"] == "ACCEPT"
    second = w.subscribe(client_id="second")
    first.ws.close()
    dropped = time.monotonic()
    again = second.next_run(timeout=10)
    assert time.monotonic() - dropped >= 0.45
    assert again["id"] == run["id"]
    assert again["state"]["type"] == "SCHEDULED"
    assert "lost its connection" in again["state"]["message"]
    assert "delivery 1 of 3" in again["state"]["message"]
    second.ack()
    # the new holder can claim and finish it
    assert second.set_state(run["id"], "PENDING")["result"]["status"] == "ACCEPT"
    assert second.set_state(run["id"], "RUNNING")["result"]["state"]["name"] == "Retrying"
    assert second.set_state(run["id"], "COMPLETED")["result"]["status"] == "ACCEPT"


def test_run_finished_before_lease_expires_is_not_redelivered(server_factory, make_wire):
    server = server_factory(lease_timeout=0.5)
    w = make_wire(server)
    first = w.subscribe(client_id="first")
    run = w.create()
    first.next_run()
    first.ack()
    first.set_state(run["id"], "PENDING")
    first.set_state(run["id"], "RUNNING")
    first.ws.close()
    # the worker finishes over REST (e.g. after reconnecting)
    assert w.set_state(run["id"], "COMPLETED").json()["status"] == "ACCEPT"
    second = w.subscribe(client_id="second")
    second.expect_no_run(1.0)
    assert w.read(run["id"])["state_type"] == "COMPLETED"


def test_open_connection_keeps_the_lease(server_factory, make_wire):
    server = server_factory(lease_timeout=0.3)
    w = make_wire(server)
    holder = w.subscribe(client_id="holder")
    run = w.create()
    holder.next_run()
    holder.ack()
    holder.set_state(run["id"], "PENDING")
    holder.set_state(run["id"], "RUNNING")
    other = w.subscribe(client_id="other")
    other.expect_no_run(1.0)
    assert w.read(run["id"])["state_type"] == "RUNNING"


def test_max_deliveries_marks_crashed(server_factory, make_wire):
    server = server_factory(lease_timeout=0.3, max_deliveries=2)
    w = make_wire(server)
    run = w.create()
    for attempt in range(2):
        subscriber = w.subscribe(client_id=f"doomed-{attempt}")
        assert subscriber.next_run()["id"] == run["id"]
        subscriber.ack()
        subscriber.set_state(run["id"], "PENDING")
        subscriber.set_state(run["id"], "RUNNING")
        subscriber.ws.close()
        if attempt == 0:
            wait_for(lambda: w.read(run["id"])["state_type"] == "SCHEDULED", timeout=10)
    final = wait_for(lambda: (r := w.read(run["id"]))["state_type"] == "CRASHED" and r, timeout=10)
    assert "delivered 2 time(s)" in final["state"]["message"]
    assert "max_deliveries=2" in final["state"]["message"]
    assert final["end_time"] is not None
    late = w.subscribe(client_id="late")
    late.expect_no_run(0.6)


def test_acked_but_never_started_run_is_redelivered(server_factory, make_wire):
    server = server_factory(lease_timeout=0.3)
    w = make_wire(server)
    first = w.subscribe(client_id="first")
    run = w.create()
    first.next_run()
    first.ack()
    first.ws.close()
    second = w.subscribe(client_id="second")
    assert second.next_run()["id"] == run["id"]


def test_restart_with_queued_runs_delivers_all_in_order(server_factory, make_wire, tmp_path):
    db = str(tmp_path / "restart.db")
    first = server_factory(database=db)
    w = make_wire(first)
    created = [w.create()["id"] for _ in range(50)]
    first.stop()
    second = server_factory(database=db)
    w2 = make_wire(second)
    subscriber = w2.subscribe()
    delivered = []
    for _ in created:
        delivered.append(subscriber.next_run()["id"])
        subscriber.ack()
    assert delivered == created
    subscriber.expect_no_run(0.3)


def test_restart_requeues_sent_but_unacked_run(server_factory, make_wire, tmp_path):
    db = str(tmp_path / "restart.db")
    first = server_factory(database=db)
    w = make_wire(first)
    subscriber = w.subscribe()
    run = w.create()
    assert subscriber.next_run()["id"] == run["id"]
    first.stop()
    second = server_factory(database=db)
    again = make_wire(second).subscribe()
    assert again.next_run()["id"] == run["id"]


def test_restart_gives_running_runs_the_lease_treatment(server_factory, make_wire, tmp_path):
    db = str(tmp_path / "restart.db")
    first = server_factory(database=db, lease_timeout=0.5)
    w = make_wire(first)
    subscriber = w.subscribe()
    running, finished = w.create(), w.create()
    for run in (running, finished):
        assert subscriber.next_run()["id"] == run["id"]
        subscriber.ack()
        subscriber.set_state(run["id"], "PENDING")
        subscriber.set_state(run["id"], "RUNNING")
    first.stop()
    started = time.monotonic()  # the recovered runs' lease clock starts when the server starts
    second = server_factory(database=db, lease_timeout=0.5)
    w2 = make_wire(second)
    # the old worker reports one run finished within the lease
    assert w2.set_state(finished["id"], "COMPLETED").json()["status"] == "ACCEPT"
    fresh = w2.subscribe(client_id="fresh")
    redelivered = fresh.next_run(timeout=10)
    assert redelivered["id"] == running["id"]
    assert time.monotonic() - started >= 0.5  # not before the lease (a lower bound: load cannot break it)
    assert "lost its connection" in redelivered["state"]["message"]
    fresh.ack()
    fresh.expect_no_run(0.8)
    assert w2.read(finished["id"])["state_type"] == "COMPLETED"


def test_retry_delay_is_honoured_and_run_redelivered(wire):
    subscriber = wire.subscribe()
    # delays far apart, so that a loaded host (a stall of a second) cannot make one look like the other
    run = wire.create(empirical_policy={"retries": 2, "retry_delay": [2.0, 0.1]})
    subscriber.next_run()
    subscriber.ack()
    subscriber.set_state(run["id"], "PENDING")
    subscriber.set_state(run["id"], "RUNNING")
    rejected = subscriber.set_state(run["id"], "FAILED", message="boom")["result"]
    assert rejected["status"] == "REJECT" and rejected["state"]["name"] == "AwaitingRetry"
    failed_at = time.monotonic()
    again = subscriber.next_run(timeout=10)
    assert time.monotonic() - failed_at >= 1.9
    assert again["id"] == run["id"] and again["state"]["name"] == "AwaitingRetry"
    subscriber.ack()
    subscriber.set_state(run["id"], "PENDING")
    assert subscriber.set_state(run["id"], "RUNNING")["result"]["state"]["name"] == "Retrying"
    second = subscriber.set_state(run["id"], "FAILED", message="boom again")["result"]
    assert second["status"] == "REJECT"
    failed_at = time.monotonic()
    assert subscriber.next_run(timeout=10)["id"] == run["id"]
    assert time.monotonic() - failed_at < 1.5  # the second delay of the list (0.1 s), not the first
    subscriber.ack()
    subscriber.set_state(run["id"], "PENDING")
    subscriber.set_state(run["id"], "RUNNING")
    final = subscriber.set_state(run["id"], "FAILED", message="third time")["result"]
    assert final["status"] == "ACCEPT" and final["state"]["type"] == "FAILED"
    assert wire.read(run["id"])["run_count"] == 3


def test_delayed_retry_survives_restart(server_factory, make_wire, tmp_path):
    db = str(tmp_path / "restart.db")
    first = server_factory(database=db)
    w = make_wire(first)
    run = w.create(empirical_policy={"retries": 1, "retry_delay": 1.0})
    w.set_state(run["id"], "PENDING")
    w.set_state(run["id"], "RUNNING")
    assert w.set_state(run["id"], "FAILED").json()["state"]["name"] == "AwaitingRetry"
    first.stop()
    second = server_factory(database=db)
    subscriber = make_wire(second).subscribe()
    try:
        subscriber.expect_no_run(0.3)
    except websocket.WebSocketTimeoutException:
        pass
    assert subscriber.next_run(timeout=10)["id"] == run["id"]


def test_silent_subscriber_is_dropped_by_ping_and_its_runs_redelivered(server_factory, make_wire):
    """A worker that stops answering (no FIN, no reads) loses its connection at the next ping,
    and its leased run is delivered again after the lease."""
    server = server_factory(ping_interval=0.3, lease_timeout=0.3)
    w = make_wire(server)
    silent = w.subscribe(client_id="silent")
    run = w.create()
    assert silent.next_run()["id"] == run["id"]
    silent.ack()
    silent.set_state(run["id"], "PENDING")
    # from now on the silent client never reads again, so it never answers a ping
    other = w.subscribe(client_id="other")
    # (the other client answers pings: websocket-client does so whenever it reads)
    again = other.next_run(timeout=10)
    assert again["id"] == run["id"]


def test_reconnecting_worker_keeps_its_leases(server_factory, make_wire):
    server = server_factory(lease_timeout=0.3)
    w = make_wire(server)
    first = w.subscribe(client_id="host-1")
    run = w.create()
    first.next_run()
    first.ack()
    first.set_state(run["id"], "PENDING")
    first.set_state(run["id"], "RUNNING")
    first.ws.close()  # a network blip
    again = w.subscribe(client_id="host-1")  # the same worker is back
    other = w.subscribe(client_id="host-2")
    other.expect_no_run(1.0)  # well past the lease: not re-delivered
    assert again.set_state(run["id"], "COMPLETED")["result"]["status"] == "ACCEPT"


def test_reconnect_under_another_client_id_does_not_take_leases(server_factory, make_wire):
    server = server_factory(lease_timeout=0.3)
    w = make_wire(server)
    first = w.subscribe(client_id="host-1")
    run = w.create()
    first.next_run()
    first.ack()
    first.set_state(run["id"], "PENDING")
    first.ws.close()
    stranger = w.subscribe(client_id="host-2")
    assert stranger.next_run(timeout=10)["id"] == run["id"]


def test_worker_reconnecting_after_server_restart_keeps_its_leases(server_factory, make_wire, tmp_path):
    db = str(tmp_path / "restart.db")
    first = server_factory(database=db, lease_timeout=0.5)
    w = make_wire(first)
    holder = w.subscribe(client_id="host-1")
    run = w.create()
    holder.next_run()
    holder.ack()
    holder.set_state(run["id"], "PENDING")
    holder.set_state(run["id"], "RUNNING")
    first.stop()
    second = server_factory(database=db, lease_timeout=0.5)
    w2 = make_wire(second)
    back = w2.subscribe(client_id="host-1")
    other = w2.subscribe(client_id="host-2")
    other.expect_no_run(1.2)
    assert back.set_state(run["id"], "COMPLETED")["result"]["status"] == "ACCEPT"
