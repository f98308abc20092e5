"""Slow and idle clients are timed out, and many slow uploads do not fill the memory."""
from __future__ import annotations

import argparse
import json
import socket
import threading
import time

import pytest
import requests
import websocket
from tests.server.conftest import read_close

from sync_worker.server import sockets
from sync_worker.server.cli import configure_parser

pytestmark = pytest.mark.timeout(120)


def connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


def closed_within(sock: socket.socket, seconds: float) -> bytes:
    """Everything the server sent until it closed the connection; fails if it stays open."""
    sock.settimeout(seconds)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
    except ConnectionResetError:
        return data
    except TimeoutError:
        raise AssertionError(f"connection still open after {seconds} s; got {data[:200]!r}") from None


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_idle_keep_alive_connections_are_closed(server_factory):
    server = server_factory(idle_timeout=0.5)
    with connect(server) as sock:
        sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        started = time.monotonic()
        data = closed_within(sock, 10)
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"true")
        assert time.monotonic() - started < 5
    with connect(server) as silent:  # never sends a byte
        assert closed_within(silent, 10) == b""


def test_slowloris_headers_are_cut_off(server_factory):
    server = server_factory(request_timeout=1.0)
    with connect(server) as sock:
        sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        started = time.monotonic()
        with pytest.raises((AssertionError, OSError)):
            for _ in range(40):  # a byte every 0.25 s resets any per-read timeout, not the deadline
                sock.sendall(b"a")
                time.sleep(0.25)
            raise AssertionError("still open")
        assert time.monotonic() - started < 6


def test_a_body_that_does_not_arrive_is_408(server_factory):
    server = server_factory(request_timeout=1.0)
    with connect(server) as sock:
        sock.sendall(b"POST /api/task_runs/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"task_key\": ")
        data = closed_within(sock, 10)
    assert data.startswith(b"HTTP/1.1 408") or data == b"", data  # 408, or dropped by the watchdog
    assert requests.get(server.url + "/health", timeout=10).json() is True


def test_200_slow_clients_are_all_dropped_and_others_are_served(server_factory):
    server = server_factory(request_timeout=2.0)
    before = rss()
    socks = []
    try:
        for _ in range(200):
            sock = connect(server)
            sock.sendall(b"POST /api/task_runs/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-")
            socks.append(sock)
        with_clients = rss()
        # bystanders are served meanwhile
        assert requests.get(server.url + "/health", timeout=10).json() is True
        started = time.monotonic()
        for sock in socks:
            closed_within(sock, max(0.1, 15 - (time.monotonic() - started)))
        print(f"200 slow clients: test process RSS {before / 2**20:.0f} -> {with_clients / 2**20:.0f} MiB, "
              f"all dropped {time.monotonic() - started:.1f} s after the last one connected")
    finally:
        for sock in socks:
            sock.close()
    assert requests.get(server.url + "/health", timeout=10).json() is True


def test_many_half_sent_large_bodies_do_not_fill_the_memory(server_factory):
    server = server_factory(request_timeout=20.0)
    size = 10 * 1024 * 1024
    before = rss()
    socks = []
    answers: list[bytes] = []
    lock = threading.Lock()

    def slow_upload() -> None:
        sock = connect(server)
        socks.append(sock)
        try:
            sock.sendall(b"POST /api/task_runs/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % size)
            chunk = b" " * 65536
            for _ in range(size // 2 // len(chunk)):
                sock.sendall(chunk)
        except OSError:
            pass
        sock.settimeout(0.5)
        try:
            data = sock.recv(200)
        except OSError:
            data = b""
        with lock:
            answers.append(data)

    threads = [threading.Thread(target=slow_upload) for _ in range(50)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        grown = rss() - before
        busy = sum(1 for a in answers if a.startswith(b"HTTP/1.1 503"))
        print(f"50 half-sent 10 MiB bodies: RSS grew by {grown / 2**20:.0f} MiB; {busy} answered 503 busy")
        assert grown < 200 * 2**20, grown / 2**20
        assert busy >= 30
        assert requests.get(server.url + "/health", timeout=10).json() is True
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.parametrize("path", ["/task_runs/subscriptions/scheduled", "/sync_worker/rpc"])
def test_a_websocket_that_does_not_authenticate_is_closed_1008(server, monkeypatch, path):
    monkeypatch.setattr(sockets, "HANDSHAKE_TIMEOUT", 0.5)
    ws = websocket.create_connection(server.url.replace("http", "ws") + path, subprotocols=["prefect"], timeout=10)
    started = time.monotonic()
    code, reason = read_close(ws)
    assert code == 1008 and "Expected 'auth' message within 0.5 s" in reason
    assert time.monotonic() - started < 5


def test_a_subscription_that_does_not_subscribe_is_closed_1008(server, monkeypatch):
    monkeypatch.setattr(sockets, "HANDSHAKE_TIMEOUT", 0.5)
    ws = websocket.create_connection(server.url.replace("http", "ws") + "/task_runs/subscriptions/scheduled",
                                     subprotocols=["prefect"], timeout=10)
    ws.send(json.dumps({"type": "auth", "token": None}))
    assert json.loads(ws.recv())["type"] == "auth_success"
    code, reason = read_close(ws)
    assert code == 1008 and "Expected 'subscribe' message" in reason


def test_established_websockets_are_not_cut_by_the_request_timeout(server_factory, make_wire):
    server = server_factory(request_timeout=0.5, idle_timeout=0.5)
    wire = make_wire(server)
    subscriber = wire.subscribe()
    time.sleep(1.5)  # longer than both timeouts: a subscription waits for runs for as long as it likes
    run = wire.create()
    assert subscriber.next_run()["id"] == run["id"]


def test_server_timeout_options():
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args(["--ping-interval", "5", "--request-timeout", "30", "--idle-timeout", "10"])
    assert (args.ping_interval, args.request_timeout, args.idle_timeout) == (5.0, 30.0, 10.0)
    defaults = parser.parse_args([])
    assert (defaults.ping_interval, defaults.request_timeout, defaults.idle_timeout) == (20.0, 60.0, 60.0)
