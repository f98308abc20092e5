"""claim_at_delivery: no run is claimed for a connection while what its worker sent is still
unread. A worker that stops sends ``release`` and closes; a busy server whose reader thread
has not read them yet must not claim a run for that connection meanwhile (the worker never
sees it, and it would stay RUNNING for the whole lease). The delivery waits until the reader
has read and handled the input, then happens or not as that input says. (The reader is held
here inside the handling of an earlier message, as a starved thread would be.)"""
from __future__ import annotations

import json
import threading
import time
from typing import Any

from tests.helpers import wait_for
from tests.server.test_server_claim_at_create import _idle
from tests.server.test_server_claim_at_delivery import claiming


def _only_subscriber(server: Any) -> Any:
    """The one subscription (a connection waits in the run queue a moment before it is listed
    among the server's subscribers: wait for that)."""
    wait_for(lambda: len(server.core.subscribers) == 1, timeout=10, message="the subscriber listed")
    (sub,) = list(server.core.subscribers)
    return sub


def _hold_the_reader(server: Any, client_id: str | None = None) -> tuple[threading.Event, threading.Event]:
    """The subscription's reader thread (the one subscription's, or that of ``client_id``)
    blocks in the next message it handles until ``release`` is set (``entered`` is set once
    it is blocked)."""
    if client_id is None:
        sub = _only_subscriber(server)
    else:
        (sub,) = [s for s in list(server.core.subscribers) if s.client_id == client_id]
    handler = sub._on_messages
    original = handler._work
    entered, release = threading.Event(), threading.Event()

    def work() -> None:
        if not entered.is_set():
            entered.set()
            assert release.wait(20)
        original()

    handler._work = work
    return entered, release


def test_a_release_and_close_not_read_yet_get_no_run_claimed_for_the_leaving_worker(server, wire):
    leaving = claiming(wire, 5, client_id="leaving")
    _idle(server)
    entered, release = _hold_the_reader(server)
    leaving.send({"type": "ack"})  # (nothing to ack: ignored) the reader blocks handling it
    assert entered.wait(10)
    leaving.send({"type": "release", "task_run_ids": []})  # unread: the reader is busy
    leaving.ws.close()
    run_id = wire.create()["id"]  # a claim at create, or the sender thread's delivery, would take it
    time.sleep(0.3)
    assert wire.read(run_id)["state_type"] == "SCHEDULED"
    release.set()
    wait_for(lambda: not server.core.subscribers, timeout=10, message="the leaving connection ended")
    assert wire.read(run_id)["state_type"] == "SCHEDULED"  # not RUNNING, leased to nobody
    staying = claiming(wire, 1, client_id="staying")
    run = staying.next_run(timeout=5)  # at once, not after the lease
    assert run["id"] == run_id and run["run_count"] == 1


def test_a_delivery_deferred_for_unread_input_happens_once_it_is_read(server, wire):
    subscriber = claiming(wire, 5)
    _idle(server)
    entered, release = _hold_the_reader(server)
    subscriber.send({"type": "ack"})  # (nothing to ack: ignored) the reader blocks handling it
    assert entered.wait(10)
    subscriber.send({"type": "ack"})  # unread: says nothing about delivery
    run_id = wire.create()["id"]
    time.sleep(0.3)
    assert wire.read(run_id)["state_type"] == "SCHEDULED"  # deferred
    release.set()
    run = subscriber.next_run(timeout=5)
    assert run["id"] == run_id and run["state"]["type"] == "RUNNING"


def test_a_ping_answer_alone_unread_does_not_stall_delivery(server, wire):
    """Input that the reader handles without any message (a pong) still lets the deferred
    delivery go."""
    subscriber = claiming(wire, 5)
    _idle(server)
    entered, release = _hold_the_reader(server)
    subscriber.send({"type": "ack"})  # (nothing to ack: ignored) the reader blocks handling it
    assert entered.wait(10)
    subscriber.ws.pong(b"")  # unsolicited pong frame: read, handled, no message
    run_id = wire.create()["id"]
    time.sleep(0.3)
    release.set()
    run = subscriber.next_run(timeout=5)
    assert run["id"] == run_id and run["state"]["type"] == "RUNNING"
    assert json.loads(json.dumps(run))["run_count"] == 1


def test_a_run_queued_while_the_claimers_input_is_unread_wakes_no_sender_thread(server, wire):
    """The queue's wake-up for a run that could not be claimed at once (the worker's input
    unread) does not wake the subscription's sender thread, which would only find the input
    unread and return; and once the reader has read the input, it delivers the run itself
    instead of waking that thread for it. Two thread wake-ups less for such a create (most
    creates of a drain)."""
    subscriber = claiming(wire, 5)
    _idle(server)
    sub = _only_subscriber(server)
    pokes: list[float] = []
    original_poke = sub.outbox.poke

    def poke() -> None:
        pokes.append(time.monotonic())
        original_poke()

    sub.outbox.poke = poke  # type: ignore[method-assign]
    entered, release = _hold_the_reader(server)
    subscriber.send({"type": "ack"})  # (nothing to ack: ignored) the reader blocks handling it
    assert entered.wait(10)
    subscriber.send({"type": "ack"})  # unread: the run cannot be claimed for it now
    run_id = wire.create()["id"]
    queue = server.core.queue

    def queued() -> bool:
        with queue.lock:  # the queue wakes its waiter under this lock, right after queueing
            return run_id in queue._in_heap

    wait_for(queued, timeout=10, message="the run queued")
    assert pokes == []  # the subscriber was woken (it waited for the key) but not its thread
    release.set()
    run = subscriber.next_run(timeout=5)  # delivered once the input was read
    assert run["id"] == run_id and run["state"]["type"] == "RUNNING"
    assert pokes == []  # by the reader thread


def test_input_pending_once_found_answers_without_a_look_at_the_socket_until_the_read(server, wire):
    """Once ``input_pending`` found unread input, it answers True without looking at the socket
    again until the reader has read that input (and called ``on_read``): the queue asks it for
    each run it queues for a connection. After the read it looks again. (With a reader thread
    per connection, ``SYNC_WORKER_SHARED_READER=0``, it looks every time: see
    ``WebSocket.input_pending``.)"""
    subscriber = claiming(wire, 5)
    _idle(server)
    sub = _only_subscriber(server)
    entered, release = _hold_the_reader(server)
    subscriber.send({"type": "ack"})  # (nothing to ack: ignored) the reader blocks handling it
    assert entered.wait(10)
    subscriber.send({"type": "ack"})  # unread
    wait_for(sub.ws.input_pending, timeout=10, message="the input seen unread")
    looks: list[bool] = []
    peek = sub.ws._peek

    def counted_peek() -> bool:
        looks.append(True)
        return peek()

    sub.ws._peek = counted_peek  # type: ignore[method-assign]
    assert sub.ws.input_pending() and sub.ws.input_pending()
    if sub.ws._shared is None:  # a reader of its own reads without the lock: no shortcut
        assert len(looks) >= 2
        looks.clear()
    else:
        assert looks == []
    release.set()
    wait_for(lambda: not sub.ws.input_pending(), timeout=10, message="the reader read it")
    assert looks  # read: it looks at the socket again


def test_input_read_while_input_pending_looks_at_it_leaves_no_run_waiting(server, wire):
    """The reader reads the worker's input at the moment ``input_pending`` finds it unread. A
    run created afterwards is claimed and delivered at once, not deferred for a read that
    has happened already (it would wait for the worker's next frame: its keep-alive ping,
    15 s later; the idle worker says nothing else)."""
    subscriber = claiming(wire, 5)
    _idle(server)
    sub = _only_subscriber(server)
    ws = sub.ws
    entered, release = _hold_the_reader(server)
    subscriber.send({"type": "ack"})  # (nothing to ack: ignored) the reader blocks handling it
    assert entered.wait(10)
    subscriber.send({"type": "ack"})  # unread
    wait_for(ws.unread_input, timeout=10, message="the second ack in the server's socket")
    read = threading.Event()
    lean_read, peek = ws._lean_read, ws._peek

    def lean_read_and_tell(*args: Any) -> Any:
        try:
            return lean_read(*args)
        finally:
            read.set()

    def peek_racing_the_reader() -> bool:
        found = peek()
        if found and not release.is_set():
            release.set()  # the reader goes on: it handles the first ack, then reads the second
            read.wait(1.0)  # ... now, unless input_pending holds it off until it has answered
        return found

    ws._lean_read = lean_read_and_tell  # type: ignore[method-assign]
    ws._peek = peek_racing_the_reader  # type: ignore[method-assign]
    ws.input_pending()
    assert read.wait(10)
    wait_for(lambda: not ws.unread_input(), timeout=10, message="the reader read the second ack")
    run_id = wire.create()["id"]
    run = subscriber.next_run(timeout=5)
    assert run["id"] == run_id and run["state"]["type"] == "RUNNING"
