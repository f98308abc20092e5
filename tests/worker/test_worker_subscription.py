"""The websocket subscription on its own: handshake errors, backoff, the never-quit rule,
and the set_state extension against the embedded server."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from sync_worker.client import Client
from sync_worker.exceptions import ObjectNotFound
from sync_worker.schemas import Pending, Running, SetStateStatus, StateType
from sync_worker.subscription import FastPathUnavailable, Subscription, SubscriptionAuthError
from tests.worker import worker_tasks as wt


class _Status(BaseHTTPRequestHandler):
    """Answers every request (websocket upgrades included) with the server's status."""

    def do_GET(self) -> None:  # noqa: N802
        self.server.hits += 1  # type: ignore[attr-defined]
        self.send_response(self.server.status)  # type: ignore[attr-defined]
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def status_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Status)
    server.hits = 0  # type: ignore[attr-defined]
    server.status = 401  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _client(server: ThreadingHTTPServer) -> Client:
    return Client(api_url=f"http://127.0.0.1:{server.server_address[1]}/api", auth_string="user:pass")


def test_handshake_401_raises_at_once_naming_the_settings(status_server):
    sub = Subscription(["k"], "c-1", client=_client(status_server))
    started = time.monotonic()
    with pytest.raises(SubscriptionAuthError) as info:
        next(iter(sub))
    assert time.monotonic() - started < 5
    assert status_server.hits == 1  # not retried
    assert "HTTP 401" in str(info.value)
    assert "SYNC_WORKER_API_AUTH_STRING" in str(info.value) and "PREFECT_API_AUTH_STRING" in str(info.value)


def test_handshake_503_is_retried_with_backoff_until_closed(status_server):
    status_server.status = 503
    sub = Subscription(["k"], "c-1", client=_client(status_server), max_backoff=0.2)
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(list(sub)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while status_server.hits < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert status_server.hits >= 4  # kept trying
    sub.close()
    thread.join(5)
    assert not thread.is_alive() and results == [[]]  # iteration simply ends


def test_close_without_ack_gives_the_run_to_another_subscriber(api_env):
    client = Client()
    first = Subscription([wt.add.task_key], "first-1", client=client)
    future = wt.add.delay(1, 2)
    runs = iter(first)  # keep the iterator: dropping it releases the held run
    delivered = next(runs)
    assert delivered.id == future.task_run_id
    assert first.holding is not None
    first.close()  # no ack, no quit: the run goes back to the queue
    second = Subscription([wt.add.task_key], "second-1", client=client)
    try:
        runs_b = iter(second)
        again = next(runs_b)
        assert again.id == future.task_run_id
        second.ack()
    finally:
        second.close()


def test_set_state_over_the_socket(api_env):
    client = Client()
    sub = Subscription([wt.add.task_key], "c-2", client=client)
    future = wt.add.delay(2, 3)
    try:
        runs = iter(sub)
        run = next(runs)
        sub.ack()
        assert sub.supports_set_state
        assert sub.set_state(run.id, Pending()).status is SetStateStatus.ACCEPT
        result = sub.set_state(run.id, Running())
        assert result.status is SetStateStatus.ACCEPT and result.state.type is StateType.RUNNING
        assert client.read_task_run(future.task_run_id).state.type is StateType.RUNNING  # same as REST sees
        assert sub.set_state(run.id, Pending()).status is SetStateStatus.ABORT  # the claim is taken
        with pytest.raises(ObjectNotFound):
            sub.set_state("00000000-0000-0000-0000-000000000000", Running())
    finally:
        sub.close()
    with pytest.raises(FastPathUnavailable):
        sub.set_state(future.task_run_id, Running())


def test_fast_path_switched_off_by_environment(api_env, monkeypatch):
    monkeypatch.setenv("SYNC_WORKER_FAST_PATH", "false")
    sub = Subscription([wt.add.task_key], "c-3", client=Client())
    wt.add.delay(1, 1)
    try:
        runs = iter(sub)
        next(runs)
        sub.ack()
        assert not sub.supports_set_state
        with pytest.raises(FastPathUnavailable):
            sub.set_state("x", Running())
    finally:
        sub.close()


def test_an_idle_link_is_kept_alive_by_pings(api_env):
    sub = Subscription(["tests.nothing"], "idle-1", client=Client(), ping_interval=0.3)
    thread = threading.Thread(target=lambda: list(sub), daemon=True)
    thread.start()
    time.sleep(2.0)  # several ping intervals without any run
    try:
        assert sub.connects == 1 and sub.connected  # pings answered: no reconnect
    finally:
        sub.close()
        thread.join(5)


class SilentServer:
    """A websocket server that authenticates, then never says anything again (no pongs
    either): a link that died without a FIN, as behind a dropped NAT entry."""

    def __init__(self, after_auth: bytes = b"", auth_reply: bytes | None = None, end: bool = False) -> None:
        import socket

        self.after_auth = after_auth
        self.end = end  # end the stream (FIN) after ``after_auth``, as a killed server's kernel does
        payload = b'{"type": "auth_success"}'
        self.auth_reply = bytes([0x81, len(payload)]) + payload if auth_reply is None else auth_reply
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.conns: list[Any] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import base64
        import hashlib
        import socket

        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            self.conns.append(conn)
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096)
            key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
                       if line.lower().startswith(b"sec-websocket-key"))
            accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Protocol: prefect\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
            conn.sendall(self.auth_reply + self.after_auth)  # then silence
            if self.end:
                conn.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()
        for conn in self.conns:
            conn.close()


def test_a_dead_link_is_detected_by_missing_pongs_and_reconnected():
    silent = SilentServer()
    client = Client(api_url=f"http://127.0.0.1:{silent.port}/api")
    sub = Subscription(["k"], "c-dead", client=client, ping_interval=0.3, max_backoff=0.2)
    thread = threading.Thread(target=lambda: list(sub), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while silent.accepted < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert silent.accepted >= 2  # gave up on the silent link and connected again
    finally:
        sub.close()
        thread.join(5)
        silent.close()
    assert not thread.is_alive()


def _close_frame(code: int, reason: str) -> bytes:
    payload = code.to_bytes(2, "big") + reason.encode()
    return bytes([0x88, len(payload)]) + payload


@pytest.mark.parametrize("close", [
    # our server closes 1008 "Ping/Pong timeout" when a worker stalled past its ping interval
    # (seen in a soak on a loaded machine): the credentials were accepted, so the worker must
    # connect again, as Prefect's client does, not stop for good blaming its API key
    {"after_auth": _close_frame(1008, "Ping/Pong timeout")},
    # and 1008 "Expected 'auth' message within 5 s" in place of auth_success: our auth did not
    # reach the server in time (a link stalled one way during a reconnect); the worker
    # stopped for good, blaming credentials the server does not even check
    {"auth_reply": _close_frame(1008, "Expected 'auth' message within 5 s")},
], ids=["ping-pong-timeout", "auth-not-in-time"])
def test_a_1008_that_is_no_refusal_reconnects_instead_of_stopping_for_bad_credentials(close):
    server = SilentServer(**close)
    client = Client(api_url=f"http://127.0.0.1:{server.port}/api")
    sub = Subscription(["k"], "c-1008", client=client, ping_interval=5, max_backoff=0.2)
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            list(sub)
        except BaseException as exc:  # noqa: BLE001 - what the test asserts on
            errors.append(exc)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while server.accepted < 3 and not errors and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not errors
        assert server.accepted >= 3  # closed after auth each time, connected again each time
    finally:
        sub.close()
        thread.join(5)
        server.close()
    assert not thread.is_alive() and not errors


def test_a_1008_in_place_of_auth_success_still_refuses_the_credentials():
    server = SilentServer(auth_reply=_close_frame(1008, "Invalid token"))
    client = Client(api_url=f"http://127.0.0.1:{server.port}/api")
    sub = Subscription(["k"], "c-bad-token", client=client, ping_interval=5, max_backoff=0.2)
    try:
        with pytest.raises(SubscriptionAuthError, match="Invalid token"):
            list(sub)
        assert server.accepted == 1  # not retried: the credentials will not get better
    finally:
        sub.close()
        server.close()


def test_a_run_claimed_on_a_connection_lost_since_is_not_acknowledged(api_env):
    """A claimed run queued for a free slot while its connection was lost: the new
    connection does not take it over (only runs the worker executes are named), so its lease
    ends and the server delivers it again. Acknowledged, the worker would start it too."""
    from sync_worker.subscription import ConnectionLost

    sub = Subscription([wt.add.task_key], "lost-1", client=Client(), credit=lambda: 1)
    future = wt.add.delay(1, 2)
    try:
        runs = iter(sub)
        run = next(runs)
        assert run.id == future.task_run_id
        conn = sub._holding_conn
        assert conn is not None and conn.claims
        conn.abort(ConnectionLost("simulated network blip"))
        with pytest.raises(ConnectionLost, match="lost while it waited for a free slot"):
            sub.ack()
        assert sub.holding is None
    finally:
        sub.close()


def _text_frame(message: dict[str, Any]) -> bytes:
    import json

    payload = json.dumps(message).encode()
    assert len(payload) < 126
    return bytes([0x81, len(payload)]) + payload


@pytest.mark.parametrize("close, started", [
    # the server gave up on this worker (no pong): a paused worker finds the delivery and
    # this close together when it resumes; the run is no longer its own (run elsewhere)
    (_close_frame(1008, "Ping/Pong timeout"), False),
    # the server stops (or is killed: a bare end of stream) right after a delivery: the run
    # is kept, and named when the worker subscribes again (refused, it lost an attempt to
    # a lease that ran out after the restart, seen in a crash soak)
    (_close_frame(1012, "Server is shutting down"), True),
    (b"", True),
], ids=["1008-dropped", "1012-restart", "end-of-stream"])
def test_a_delivery_followed_by_the_close_is_started_unless_the_server_dropped_the_worker(close, started):
    run_id = "5f0c5a5e-0000-4000-8000-000000000001"
    delivery = _text_frame({"id": run_id, "name": "t", "task_key": "k", "state": None})
    server = SilentServer(after_auth=delivery + close, end=not close)
    client = Client(api_url=f"http://127.0.0.1:{server.port}/api")
    sub = Subscription(["k"], "c-drop", client=client, ping_interval=5, max_backoff=0.2)
    received: list[str] = []
    thread = threading.Thread(target=lambda: received.extend(run.id for run in sub), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while server.accepted < 3 and time.monotonic() < deadline:  # delivered, closed, again
            time.sleep(0.02)
        assert server.accepted >= 3
    finally:
        sub.close()
        thread.join(5)
        server.close()
    assert (run_id in received) is started, received
