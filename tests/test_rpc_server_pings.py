"""The embedded server's pinger (one thread for every websocket) outlives a connection it
finds closing: a ping on a connection whose close frame is already out used to raise
wsproto's LocalProtocolError in the pinger, which ended the thread, and from then on no dead
client of that server was ever dropped (seen in the full suite as an unhandled exception in
``sync-worker-ws-pinger``)."""
from __future__ import annotations

import json
import time

import websocket

PING_INTERVAL = 0.2


def _rpc_socket(server) -> websocket.WebSocket:
    ws = websocket.create_connection(server.url.replace("http", "ws") + "/sync_worker/rpc",
                                     subprotocols=["prefect"], timeout=10)
    ws.send(json.dumps({"type": "auth", "token": None}))
    assert json.loads(ws.recv())["type"] == "auth_success"
    return ws


def test_the_pinger_survives_a_connection_it_is_closing_and_still_drops_dead_clients(server_factory):
    server = server_factory(ping_interval=PING_INTERVAL, max_body_size=1000)
    closing = _rpc_socket(server)
    # too big: the server sends its close frame and then lingers a second reading what the
    # client still sends; this client never answers the close, so the pinger meets a
    # connection in wsproto's LOCAL_CLOSING state during several of its rounds
    closing.send(json.dumps({"type": "create", "request_id": "1", "body": {"name": "x" * 2000}}))
    dead = _rpc_socket(server)  # then a client that never reads again: it answers no ping
    try:
        # raw reads (websocket-client would answer the pings): until the server hangs up
        received = b""
        deadline = time.monotonic() + 30
        dead.sock.settimeout(30)
        while time.monotonic() < deadline:
            chunk = dead.sock.recv(65536)
            if not chunk:
                break
            received += chunk
        # dropped by the pinger for not answering its pings (close 1008), not left open
        assert (1008).to_bytes(2, "big") + b"Ping/Pong timeout" in received
    finally:
        dead.shutdown()
        closing.shutdown()


def test_a_client_whose_pong_waits_unread_behind_a_busy_reader_is_not_dropped(server_factory, monkeypatch):
    # The reader thread of a connection handles what it read (commits included) before it
    # reads again: while it is busy, the client's pongs wait unread in the socket. The pinger
    # used to take that for a dead client and close it 1008 "Ping/Pong timeout" (seen in a
    # soak: the worker then stopped, taking the 1008 for refused credentials).
    import threading

    from sync_worker.server import rpc

    release = threading.Event()
    stalled = threading.Event()
    handle = rpc.RpcChannel._handle

    def slow_handle(self, value):
        if value.get("request_id") == "stall":
            stalled.set()
            release.wait(10)  # the reader is held here: nothing of this socket is read
        return handle(self, value)

    monkeypatch.setattr(rpc.RpcChannel, "_handle", slow_handle)
    server = server_factory(ping_interval=PING_INTERVAL)
    ws = _rpc_socket(server)
    ws.settimeout(0.05)
    try:
        # a first request answered: from then on the socket's reader thread handles messages
        ws.send(json.dumps({"type": "wait", "request_id": "first", "task_run_id": "nope", "timeout": 0}))
        ws.settimeout(10)
        assert json.loads(ws.recv())["request_id"] == "first"
        ws.settimeout(0.05)
        ws.send(json.dumps({"type": "wait", "request_id": "stall", "task_run_id": "nope", "timeout": 0}))
        assert stalled.wait(10)
        # the client stays alive: it reads, and websocket-client answers each ping it reads
        deadline = time.monotonic() + 8 * PING_INTERVAL
        pings_answered = 0
        while time.monotonic() < deadline:
            try:
                opcode, _data = ws.recv_data(control_frame=True)
            except websocket.WebSocketTimeoutException:
                continue
            assert opcode != websocket.ABNF.OPCODE_CLOSE, _data
            pings_answered += opcode == websocket.ABNF.OPCODE_PING
        assert pings_answered >= 2  # pongs were sent, and are still unread by the stalled reader
        release.set()
        ws.settimeout(10)
        reply = json.loads(ws.recv())  # the connection is still open and serves the request
        assert reply["request_id"] == "stall" and reply["type"] == "wait_result"
    finally:
        release.set()
        ws.shutdown()


def test_a_ping_whose_pong_cannot_be_sent_ends_the_connection_quietly(server_factory, monkeypatch, caplog):
    """A client that sent a ping and went away before the pong (a broken pipe): no ERROR
    "error reading a websocket connection" with a traceback (seen after a server's SIGSTOP),
    and the server goes on serving."""
    import logging

    from sync_worker.server import sockets

    server = server_factory()
    ws = _rpc_socket(server)
    sent: list[bytes] = []

    def broken_pipe(self, frame: bytes) -> None:
        sent.append(frame)
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sockets.WebSocket, "_send_nowait", broken_pipe)
    with caplog.at_level(logging.DEBUG, logger="sync_worker.server"):
        ws.ping(b"are you there")
        deadline = time.monotonic() + 10
        while not sent and time.monotonic() < deadline:
            time.sleep(0.01)
        ws.shutdown()
        monkeypatch.undo()
        other = _rpc_socket(server)  # the server still serves
        other.close()
    assert sent, "the pong was not attempted"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
