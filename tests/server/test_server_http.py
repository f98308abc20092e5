"""The HTTP layer itself: keep-alive, odd requests, chunked bodies, stopping with idle
connections. Raw sockets, so that what is on the wire is what is tested."""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import requests


def _connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    return sock


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response (the socket's buffered reader keeps what follows for the next call)."""
    reader = _readers.setdefault(sock, sock.makefile("rb"))
    status_line = reader.readline()
    assert status_line, "connection closed"
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while True:
        line = reader.readline().decode("latin-1").rstrip("\r\n")
        if not line:
            break
        name, _, value = line.partition(":")
        headers[name.lower()] = value.strip()
    body = reader.read(int(headers.get("content-length", "0")))
    return status, headers, body


_readers: dict[socket.socket, object] = {}


def test_many_requests_on_one_connection(server):
    with _connect(server) as sock:
        for _ in range(20):
            sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            status, headers, body = _read_response(sock)
            assert (status, body) == (200, b"true")
            assert headers.get("connection") != "close"


def test_pipelined_requests(server):
    with _connect(server) as sock:
        sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 3)
        for _ in range(3):
            assert _read_response(sock)[0] == 200


def test_http_1_0_closes_unless_keep_alive(server):
    with _connect(server) as sock:
        sock.sendall(b"GET /api/health HTTP/1.0\r\n\r\n")
        status, headers, _ = _read_response(sock)
        assert status == 200 and headers["connection"] == "close"
        assert _readers[sock].read(10) == b""


def test_chunked_body(server):
    body = json.dumps({"task_key": "chunked", "dynamic_key": "d"}).encode()
    with _connect(server) as sock:
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:10], body[10:])) + b"0\r\n\r\n"
        sock.sendall(b"POST /api/task_runs/ HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Type: application/json\r\n\r\n" + chunks)
        status, _, response = _read_response(sock)
        assert status == 201, response
        assert json.loads(response)["task_key"] == "chunked"


@pytest.mark.parametrize("size", [b"200000", b"ffffffffffffffffffff"])
def test_a_chunk_announced_larger_than_the_body_limit_is_413_at_once(server_factory, size):
    """The server read on until its request timeout (60 s), then answered 408, or nothing."""
    server = server_factory(max_body_size=1024 * 1024)
    with _connect(server) as sock:
        sock.settimeout(10)
        started = time.monotonic()
        sock.sendall(b"POST /api/task_runs/ HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Type: application/json\r\n\r\n" + size + b"\r\n{")
        status, _, response = _read_response(sock)
        assert status == 413 and b"--max-body-size" in response, response
        assert time.monotonic() - started < 5


@pytest.mark.parametrize("header, status", [
    (b"Transfer-Encoding: gzip, chunked", 501),
    (b"Transfer-Encoding: gzip", 501),
    (b"Content-Encoding: gzip", 415),
])
def test_a_body_in_an_encoding_the_server_cannot_decode_is_refused_by_name(server, header, status):
    """It was read as no body (or as its compressed bytes) and answered 422 "needs a JSON body"."""
    import gzip

    body = gzip.compress(json.dumps({"task_key": "gz", "dynamic_key": "d"}).encode())
    if b"chunked" in header:
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    with _connect(server) as sock:
        sock.sendall(b"POST /api/task_runs/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + header + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        code, headers, response = _read_response(sock)
        assert code == status, response
        assert header.split(b":")[0].decode() in json.loads(response)["detail"]
        assert headers.get("connection") == "close"
    assert requests.post(f"{server.url}/task_runs/filter", json={}, timeout=10).json() == []  # nothing created


def test_expect_100_continue(server):
    body = json.dumps({"task_key": "expect", "dynamic_key": "d"}).encode()
    with _connect(server) as sock:
        sock.sendall(b"POST /api/task_runs/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        assert _read_response(sock)[0] == 100
        sock.sendall(body)
        assert _read_response(sock)[0] == 201


def test_bad_request_line_is_400_json(server):
    with _connect(server) as sock:
        sock.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        status, headers, body = _read_response(sock)
        assert status == 400
        assert "request line" in json.loads(body)["detail"]
        assert headers["connection"] == "close"
    assert requests.get(server.url + "/health").json() is True


def test_malformed_header_is_400(server):
    with _connect(server) as sock:
        sock.sendall(b"GET /api/health HTTP/1.1\r\nno colon here\r\n\r\n")
        assert _read_response(sock)[0] == 400


def test_too_many_headers_is_431(server):
    with _connect(server) as sock:
        headers = b"".join(b"X-H%d: v\r\n" % i for i in range(200))
        sock.sendall(b"GET /api/health HTTP/1.1\r\n" + headers + b"\r\n")
        assert _read_response(sock)[0] == 431


def test_bad_content_length_is_400(server):
    with _connect(server) as sock:
        sock.sendall(b"POST /api/task_runs/ HTTP/1.1\r\nContent-Length: lots\r\n\r\n{}")
        status, _, body = _read_response(sock)
        assert status == 400 and "Content-Length" in json.loads(body)["detail"]


def test_client_disconnect_mid_body_leaves_server_healthy(server):
    with _connect(server) as sock:
        sock.sendall(b"POST /api/task_runs/ HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{\"task_key\":")
    time.sleep(0.1)
    assert requests.get(server.url + "/health").json() is True
    assert requests.get(server.url + "/health").json() is True


def test_stop_with_idle_keep_alive_connections_is_fast(server_factory):
    server = server_factory()
    sessions = [requests.Session() for _ in range(5)]
    for session in sessions:
        assert session.get(server.url + "/health").json() is True  # connection kept open
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 1.0
    for session in sessions:
        session.close()


def test_stop_while_requests_are_running(server_factory):
    server = server_factory()
    errors: list[BaseException] = []
    stop = threading.Event()

    def hammer() -> None:
        session = requests.Session()
        while not stop.is_set():
            try:
                response = session.post(server.url + "/task_runs/", json={"task_key": "k", "dynamic_key": "d"},
                                        timeout=5)
                assert response.status_code in (201, 503), response.text
            except requests.ConnectionError:
                pass  # the server went away: expected
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    started = time.monotonic()
    server.stop()
    elapsed = time.monotonic() - started
    stop.set()
    for t in threads:
        t.join(timeout=10)
    assert not errors, errors[0]
    assert elapsed < 1.5
