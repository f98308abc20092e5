"""Several workers on one key: which one gets a run. The runs go to the worker connected first
while it has a free credit, and only then to the next (runqueue._preference): a burst stays on
one worker process instead of being spread over all of them, each then waking, framing and
reporting for fewer runs. A run that finds that worker's input unread (usually its final
states, which bring more credit) waits for it to be read, up to the worker's free credits,
instead of going to the next worker (Subscription.reserve). A run that finds the first worker with
no free credit waits for it up to the spill delay (runqueue.SPILL_DELAY), then goes to the next
worker with room (RunQueue._spill)."""
from __future__ import annotations

import time
from typing import Any

from sync_worker.server import runqueue
from tests.helpers import wait_for
from tests.server.test_server_claim_at_create import _complete, _idle
from tests.server.test_server_claim_at_delivery import claiming
from tests.server.test_server_unread_input import _hold_the_reader


def _two_claimers(server: Any, wire: Any, first_credit: int, second_credit: int = 5):
    first = claiming(wire, first_credit, client_id="first")
    wait_for(lambda: len(server.core.subscribers) == 1, timeout=10, message="the first worker listed")
    second = claiming(wire, second_credit, client_id="second")
    _idle(server, 2)
    return first, second


def _first_ones_input_unread(server: Any, wire: Any, first_credit: int, second_credit: int = 5):
    """Two workers; the first one's reader held in the handling of a message, so that what the
    first worker sends next stays unread until ``release`` is set."""
    first, second = _two_claimers(server, wire, first_credit, second_credit)
    entered, release = _hold_the_reader(server, "first")
    first.send({"type": "ack"})  # (nothing to ack: ignored) the reader blocks handling it
    assert entered.wait(10)
    return first, second, release


def _created_and_waiting(wire: Any) -> str:
    run_id = wire.create()["id"]
    time.sleep(0.3)
    assert wire.read(run_id)["state_type"] == "SCHEDULED"  # waiting for the first worker
    return run_id


def _holder(wire: Any, run_id: str) -> str:
    return wire.read(run_id)["state"]["message"]


def test_a_burst_goes_to_the_worker_connected_first_until_its_credit_is_spent(server, wire):
    first, second = _two_claimers(server, wire, 3)
    ids = [wire.create()["id"] for _ in range(5)]
    assert [first.next_run()["id"] for _ in range(3)] == ids[:3]
    assert {second.next_run()["id"] for _ in range(2)} == set(ids[3:])
    first.expect_no_run(0.2)
    assert [_holder(wire, i) for i in ids] == ["Running on first"] * 3 + ["Running on second"] * 2
    # a slot of the first worker frees: the next run is its again, not the second's
    assert _complete(first, ids[0])["result"]["status"] == "ACCEPT"
    _idle(server, 2)
    later = wire.create()["id"]
    assert first.next_run()["id"] == later
    second.expect_no_run(0.2)


def test_a_run_created_while_the_first_worker_delivers_waits_for_it(server, wire):
    """The first worker has room but its delivery holds its lock at the create (its reader
    answering final states, descheduled before letting go): the run waits for that delivery
    to end and goes to the first worker, not to the second."""
    first, second = _two_claimers(server, wire, 3)
    (sub,) = [s for s in list(server.core.subscribers) if s.client_id == "first"]
    with sub._deliver_lock:  # as its own delivery would hold it
        run_id = _created_and_waiting(wire)
        second.expect_no_run(0.1)
    run = first.next_run(timeout=5)
    assert run["id"] == run_id and run["state"]["type"] == "RUNNING" and run["run_count"] == 1
    assert _holder(wire, run_id) == "Running on first"
    second.expect_no_run(0.2)


def test_a_run_waits_for_the_first_workers_unread_input_instead_of_going_to_the_next(server, wire):
    """The first worker has room but said something the server has not read yet: the run is
    queued for it (not claimed at create for the second worker), and it gets the run once its
    input is read."""
    first, second, release = _first_ones_input_unread(server, wire, 5)
    first.send({"type": "ack"})  # unread
    run_id = _created_and_waiting(wire)
    second.expect_no_run(0.1)
    release.set()
    run = first.next_run(timeout=5)
    assert run["id"] == run_id and run["state"]["type"] == "RUNNING" and run["run_count"] == 1
    second.expect_no_run(0.2)


def test_no_more_runs_wait_for_a_worker_than_it_has_free_credits(server, wire):
    """With one free credit, one run waits for the first worker's unread input; the next one
    wakes the second worker, which takes the oldest waiting run at once (runs go out in the
    order they were created), and the first worker takes the other once its input is read:
    nothing waits for the first worker beyond its room while the second has a free slot."""
    first, second, release = _first_ones_input_unread(server, wire, 1, 1)
    first.send({"type": "ack"})  # unread
    older = wire.create()["id"]
    newer = wire.create()["id"]
    run = second.next_run(timeout=5)  # before the first worker's input is read
    assert run["id"] == older and run["state"]["type"] == "RUNNING"
    assert wire.read(newer)["state_type"] == "SCHEDULED"
    release.set()
    assert first.next_run(timeout=5)["id"] == newer
    assert (_holder(wire, older), _holder(wire, newer)) == ("Running on second", "Running on first")


def test_a_run_that_waited_for_a_worker_that_then_leaves_goes_to_the_next_at_once(server, wire):
    """The first worker's unread input was its release and close (it stops): the run that
    waited for it goes to the second worker as soon as that input is read, not after a lease."""
    first, second, release = _first_ones_input_unread(server, wire, 5)
    first.send({"type": "release", "task_run_ids": []})  # unread: the reader is busy
    first.ws.close()
    run_id = _created_and_waiting(wire)
    second.expect_no_run(0.1)
    release.set()
    run = second.next_run(timeout=5)
    assert run["id"] == run_id and run["state"]["type"] == "RUNNING" and run["run_count"] == 1
    assert _holder(wire, run_id) == "Running on second"


def test_a_run_that_waited_for_a_worker_that_was_killed_goes_to_the_next(server, wire):
    """The first worker's connection ends without a word (its process killed) while a run
    waits for its unread input: the second worker gets the run once the end is read."""
    first, second, release = _first_ones_input_unread(server, wire, 5)
    first.send({"type": "ack"})  # unread
    first.ws.sock.close()  # no close frame: as a killed process's socket
    run_id = _created_and_waiting(wire)
    release.set()
    run = second.next_run(timeout=10)
    assert run["id"] == run_id and run["state"]["type"] == "RUNNING"



def _first_worker_reported(server: Any, wire: Any, first: Any, hold: float = 0.0) -> None:
    """The first worker runs one run, holding its slot ``hold`` seconds: the server has
    measured how long its runs hold a slot (``Subscription.slot_seconds``)."""
    run_id = wire.create()["id"]
    assert first.next_run()["id"] == run_id
    time.sleep(hold)
    assert _complete(first, run_id)["result"]["status"] == "ACCEPT"
    (sub,) = [s for s in list(server.core.subscribers) if s.client_id == "first"]
    assert sub.slot_seconds is not None and sub.slot_seconds >= hold
    _idle(server, 2)


def test_a_run_waits_for_the_busy_first_worker_up_to_the_spill_delay_then_goes_to_the_next(server, wire,
                                                                                            monkeypatch):
    """The first worker's runs come back quickly, its one slot is taken and the second worker
    waits idle: a new run waits for the first worker, which gets it when its slot frees within
    the delay; a run that finds the first worker still busy when the delay ends goes to the
    second worker then, not sooner and not never."""
    monkeypatch.setattr(runqueue, "QUICK_SLOT_SECONDS", 10.0)  # (2 ms) this test's runs count as quick
    server.core.queue.spill_delay = 1.0  # (5 ms by default) long enough to watch the run wait
    first, second = _two_claimers(server, wire, 1)
    _first_worker_reported(server, wire, first)
    held = wire.create()["id"]
    assert first.next_run()["id"] == held
    waiting = _created_and_waiting(wire)  # first: no free credit; second: idle with five
    second.expect_no_run(0.2)
    assert _complete(first, held)["result"]["status"] == "ACCEPT"  # brings the first one's credit back
    run = first.next_run(timeout=5)
    assert run["id"] == waiting and run["state"]["type"] == "RUNNING"
    second.expect_no_run(0.2)
    assert _holder(wire, waiting) == "Running on first"
    # the first worker stays busy: the next run goes to the second worker once the delay is over
    created_at = time.monotonic()
    spilled = wire.create()["id"]
    run = second.next_run(timeout=10)
    waited = time.monotonic() - created_at
    assert run["id"] == spilled and run["state"]["type"] == "RUNNING"
    assert _holder(wire, spilled) == "Running on second"
    assert 0.9 <= waited < 5, waited


def test_runs_of_a_first_worker_whose_runs_take_long_go_to_the_next_worker_at_once(server, wire):
    """The first worker's runs hold their slot longer than QUICK_SLOT_SECONDS (here 0.3 s):
    waiting for it would only leave the second worker idle, so a run created while the first
    worker is busy goes to the second one at once."""
    server.core.queue.spill_delay = 5.0
    first, second = _two_claimers(server, wire, 1)
    _first_worker_reported(server, wire, first, hold=0.3)
    busy = wire.create()["id"]
    assert first.next_run()["id"] == busy
    created_at = time.monotonic()
    run_id = wire.create()["id"]
    run = second.next_run(timeout=10)
    assert run["id"] == run_id and time.monotonic() - created_at < 2.5
    assert _holder(wire, run_id) == "Running on second"
