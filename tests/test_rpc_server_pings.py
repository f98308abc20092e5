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
