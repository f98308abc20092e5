"""One shared reader thread for the server's lean websocket connections (sockets.SharedReader).

What a user would see: every connection is served as before, by one reader thread instead of
one per connection, and a client that never reads what the server sends (its answers, its
pongs) stalls only itself: the server stops reading it (TCP pushes back on it) while every
other connection keeps being served.
"""
from __future__ import annotations

import json
import socket
import threading
import time
import uuid

import pytest
import websocket
from tests.server.conftest import wait_for
from tests.server.test_server_rpc import call, rpc_socket

from sync_worker.server import sockets

pytestmark = pytest.mark.timeout(120)


def _reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == sockets.SharedReader.NAME]


def _per_connection_readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if "simple_websocket.Base._thread" in t.name]


def _round_trip(wire, rpc, subscriber) -> None:
    """A create over rpc reaches the subscriber; its states are answered; the rpc wait ends."""
    created = call(rpc, {"type": "create", "body": wire.create_body()})
    assert created["status_code"] == 201
    run_id = created["result"]["id"]
    assert subscriber.next_run(timeout=10)["id"] == run_id
    subscriber.ack()
    waiter = str(uuid.uuid4())
    rpc.send(json.dumps({"type": "wait", "request_id": waiter, "task_run_id": run_id, "timeout": 30}))
    for state in ("PENDING", "RUNNING", "COMPLETED"):
        assert subscriber.set_state(run_id, state, timeout=10)["status_code"] == 201
    rpc.settimeout(10)
    reply = json.loads(rpc.recv())
    assert reply["request_id"] == waiter and reply["result"]["state"]["type"] == "COMPLETED"



def _others_are_served(wire) -> None:
    """Another worker and an rpc caller get three round trips done, promptly."""
    rpc = rpc_socket(wire)[0]
    try:
        started = time.monotonic()
        good = wire.subscribe(client_id="good")
        for _ in range(3):
            _round_trip(wire, rpc, good)
        good.close()
        assert time.monotonic() - started < 20
    finally:
        rpc.close()


def _drop(client) -> None:
    try:
        client.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    client.sock.close()

def test_one_thread_reads_every_rpc_and_subscription_connection(server_factory, make_wire):
    before = len(_per_connection_readers())
    server = server_factory()
    wire = make_wire(server)
    rpcs = [rpc_socket(wire)[0] for _ in range(2)]
    subscribers = [wire.subscribe(keys=[f"tests.k{i}"], client_id=f"c{i}") for i in range(3)]
    try:
        # one reader for the five connections, no reader thread of their own
        assert len(_reader_threads()) == 1
        assert len(_per_connection_readers()) == before
        for i, subscriber in enumerate(subscribers):
            created = call(rpcs[i % 2], {"type": "create", "body": wire.create_body(f"tests.k{i}")})
            assert subscriber.next_run(timeout=10)["id"] == created["result"]["id"]
        subscribers.append(wire.subscribe(client_id="rt"))
        _round_trip(wire, rpcs[0], subscribers[-1])
    finally:
        for ws in rpcs:
            ws.close()
        for subscriber in subscribers:
            subscriber.close()
    # connections gone: nothing is left registered, and the reader thread ends (none left to read)
    wait_for(lambda: len(server._registry) == 0, timeout=10, message="the connections to end")
    wait_for(lambda: server._registry.reader._thread is None, timeout=10, message="the reader thread to end")


def test_per_connection_readers_when_the_shared_reader_is_off(server_factory, make_wire, monkeypatch):
    monkeypatch.setattr(sockets, "SHARED_READER", False)
    server = server_factory()
    assert server._registry.reader is None
    wire = make_wire(server)
    before = len(_per_connection_readers())
    rpc = rpc_socket(wire)[0]
    subscriber = wire.subscribe()
    try:
        assert len(_per_connection_readers()) == before + 2
        _round_trip(wire, rpc, subscriber)
    finally:
        rpc.close()
        subscriber.close()


def _fill_until_blocked(ws: websocket.WebSocket, frame: bytes, within: float) -> int:
    """Send ``frame`` until the socket does not take it for 2 s (the server stopped reading);
    the bytes sent."""
    sent = 0
    ws.sock.settimeout(2.0)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            ws.sock.sendall(frame)
        except (socket.timeout, TimeoutError):
            return sent
        sent += len(frame)
    raise AssertionError(f"the server kept reading a client that reads nothing ({sent} bytes in {within} s)")


def _masked_ping(payload: bytes) -> bytes:
    return websocket.ABNF.create_frame(payload, websocket.ABNF.OPCODE_PING).format()


def test_a_client_that_never_reads_its_pongs_is_held_back_and_stalls_nobody(server_factory, make_wire):
    """The shared reader answers pings without waiting on the client: pongs it cannot send now
    are queued, and past a bound the server stops reading that client (its sends block), while
    another subscriber and an rpc client keep their round trips."""
    server = server_factory(ping_interval=None)
    wire = make_wire(server)
    small = [(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096), (socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)]
    flooder = websocket.create_connection(wire.ws_url, subprotocols=["prefect"], timeout=10, sockopt=small)
    flooder.send(json.dumps({"type": "auth", "token": None}))
    assert json.loads(flooder.recv())["type"] == "auth_success"
    flooder.send(json.dumps({"type": "subscribe", "keys": ["tests.flood"], "client_id": "flooder"}))
    try:
        sent = _fill_until_blocked(flooder, _masked_ping(b"p" * 125) * 64, within=60)
        # held back: about MAX_BACKLOG of pongs queued, plus what the socket buffers hold
        assert sent > sockets.MAX_BACKLOG
        _others_are_served(wire)
    finally:
        _drop(flooder)
    # the flooder's end is seen although its reading was held: its connection goes away
    wait_for(lambda: len(server._registry) <= 1, timeout=15)


def test_a_client_that_never_reads_its_answers_is_held_back_and_stalls_nobody(server_factory, make_wire):
    """set_state requests from a client that never reads its answers: the shared reader never
    waits for them to go out; it stops reading that client (answers queued past a bound, or
    too many unanswered), and serves the others."""
    server = server_factory(ping_interval=None)
    wire = make_wire(server)
    run_id = wire.create("tests.flood")["id"]
    small = [(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096), (socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)]
    flooder = websocket.create_connection(wire.ws_url, subprotocols=["prefect"], timeout=10, sockopt=small)
    flooder.send(json.dumps({"type": "auth", "token": None}))
    assert json.loads(flooder.recv())["type"] == "auth_success"
    flooder.send(json.dumps({"type": "subscribe", "keys": ["tests.flood"], "client_id": "flooder"}))
    request = json.dumps({"type": "set_state", "request_id": "r", "task_run_id": run_id,
                          "state": {"type": "PENDING"}, "force": True})
    frame = websocket.ABNF.create_frame(request, websocket.ABNF.OPCODE_TEXT).format()
    try:
        _fill_until_blocked(flooder, frame * 16, within=60)
        _others_are_served(wire)
    finally:
        _drop(flooder)
    wait_for(lambda: len(server._registry) <= 1, timeout=15)
