"""A malformed websocket upgrade (no or a bad Sec-WebSocket-Key / Sec-WebSocket-Version, ...)
is answered with an HTTP error naming what is wrong (400; 426 and ``Sec-WebSocket-Version: 13``
for an unsupported version), logged in one line without a traceback, and the server goes on
serving. Raw sockets, so that what is on the wire is what is tested. Also: the rpc socket
closes 1002 without the ``prefect`` subprotocol when auth is configured, as the others do."""
from __future__ import annotations

import json
import logging
import socket

import pytest
import websocket
from tests.server.conftest import read_close

PATHS = ["/api/task_runs/subscriptions/scheduled", "/api/sync_worker/rpc", "/api/events/in"]
KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's sample nonce: 16 bytes in base64

# (headers beyond Host/Connection/Upgrade, expected status, words the detail must contain)
CASES = {
    "no-key-no-version": ({}, 400, ["Sec-WebSocket-Key", "Sec-WebSocket-Version"]),
    "no-version": ({"Sec-WebSocket-Key": KEY}, 400, ["missing header 'Sec-WebSocket-Version'"]),
    "no-key": ({"Sec-WebSocket-Version": "13"}, 400, ["missing header 'Sec-WebSocket-Key'"]),
    "version-8": ({"Sec-WebSocket-Key": KEY, "Sec-WebSocket-Version": "8"}, 426, ["version '8'", "13"]),
    "short-key": ({"Sec-WebSocket-Key": "short", "Sec-WebSocket-Version": "13"}, 400,
                  ["Sec-WebSocket-Key", "16 bytes", "'short'"]),
    "key-not-base64": ({"Sec-WebSocket-Key": "!" * 24, "Sec-WebSocket-Version": "13"}, 400,
                       ["Sec-WebSocket-Key", "16 bytes"]),
    "bad-extension-offer": ({"Sec-WebSocket-Key": KEY, "Sec-WebSocket-Version": "13",
                             "Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits=abc"}, 400,
                            ["Bad websocket handshake"]),
}


def _raw_upgrade(server, path: str, headers: dict[str, str]) -> tuple[str, dict[str, str], bytes]:
    """Send one upgrade request; returns (status line, headers, body) of the answer, which
    must come, and the connection must then be closed."""
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{server.port}", "Connection: Upgrade",
             "Upgrade: websocket", *(f"{name}: {value}" for name, value in headers.items())]
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data, "the connection was closed without an answer"
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    answer_headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        answer_headers[name.strip().lower()] = value.strip()
    assert len(body) == int(answer_headers["content-length"])
    return status_line, answer_headers, body


def _assert_still_serving(wire) -> None:
    """A normal subscription on the same server still gets its run."""
    subscriber = wire.subscribe()
    run = wire.create()
    assert subscriber.next_run()["id"] == run["id"]


def _assert_quiet_log(caplog, path: str) -> None:
    records = [r for r in caplog.records if r.name.startswith("sync_worker")]
    assert not [r for r in records if r.exc_info or r.levelno >= logging.WARNING], \
        [(r.levelname, r.getMessage()) for r in records]
    assert not any("Traceback" in r.getMessage() for r in records)
    about = [r for r in records if path in r.getMessage()]
    assert len(about) == 1, [r.getMessage() for r in about]  # the refusal, in one line
    assert about[0].levelno <= logging.INFO and "refused websocket upgrade" in about[0].getMessage()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("path", PATHS)
def test_bad_upgrade_is_answered_not_dropped(server, wire, caplog, path, case):
    caplog.set_level(logging.DEBUG, logger="sync_worker")
    headers, status, words = CASES[case]
    status_line, answer_headers, body = _raw_upgrade(server, path, headers)
    assert status_line.split()[:2] == ["HTTP/1.1", str(status)], status_line
    assert answer_headers["content-type"] == "application/json"
    assert answer_headers["connection"] == "close"
    detail = json.loads(body)["detail"]
    for word in words:
        assert word in detail, detail
    if status == 426 or "Sec-WebSocket-Version'" in detail:
        assert answer_headers["sec-websocket-version"] == "13"
    _assert_still_serving(wire)
    _assert_quiet_log(caplog, path)


def test_many_bad_upgrades_then_normal_sockets(server, wire, caplog):
    caplog.set_level(logging.DEBUG, logger="sync_worker")
    for _ in range(20):
        for path in PATHS:
            assert _raw_upgrade(server, path, {})[0].startswith("HTTP/1.1 400 ")
    _assert_still_serving(wire)
    rpc = websocket.create_connection(server.url.replace("http", "ws") + "/sync_worker/rpc",
                                      subprotocols=["prefect"], timeout=10)
    try:
        rpc.send(json.dumps({"type": "auth", "token": None}))
        assert json.loads(rpc.recv())["type"] == "auth_success"
    finally:
        rpc.close()
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]


def test_good_raw_upgrade_is_still_accepted(server):
    lines = [f"GET {PATHS[0]} HTTP/1.1", f"Host: 127.0.0.1:{server.port}", "Connection: keep-alive, Upgrade",
             "Upgrade: websocket", f"Sec-WebSocket-Key: {KEY}", "Sec-WebSocket-Version: 13",
             "Sec-WebSocket-Protocol: prefect"]
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk
            data += chunk
    assert data.startswith(b"HTTP/1.1 101 ")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in data  # RFC 6455's sample answer


def test_rpc_without_subprotocol_is_1002_when_auth_is_configured(server_factory):
    server = server_factory(auth_string="a:b")
    ws = websocket.create_connection(server.url.replace("http", "ws") + "/sync_worker/rpc", timeout=10)
    try:
        assert read_close(ws) == (1002, "'prefect' subprotocol required when auth is configured")
    finally:
        ws.close()
    ws = websocket.create_connection(server.url.replace("http", "ws") + "/sync_worker/rpc",
                                     subprotocols=["prefect"], timeout=10)
    try:
        ws.send(json.dumps({"type": "auth", "token": "a:b"}))
        assert json.loads(ws.recv())["type"] == "auth_success"
    finally:
        ws.close()


def test_rpc_without_subprotocol_still_served_without_auth(server):
    ws = websocket.create_connection(server.url.replace("http", "ws") + "/sync_worker/rpc", timeout=10)
    try:
        ws.send(json.dumps({"type": "auth", "token": None}))
        assert json.loads(ws.recv())["type"] == "auth_success"
    finally:
        ws.close()


def test_a_handshake_message_that_never_came_on_a_closed_connection_is_no_error():
    """receive() may time out just as the client goes away (None, and not connected): that
    is the end of the connection, which serve_socket ends quietly, not a bug (it raised
    AttributeError in the JSON decoder, logged as an error with a traceback)."""
    from simple_websocket.errors import ConnectionClosed

    from sync_worker.server import sockets

    with pytest.raises(ConnectionClosed):
        sockets.decode(None)
    with pytest.raises(ConnectionClosed):
        sockets.parse(None)
