"""Wire-level helpers for the embedded server's tests: requests + websocket-client only."""
from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
import websocket

from tests.helpers import load_capture, wait_for  # noqa: F401 - wait_for re-exported

SUBSCRIPTION_PATH = "/task_runs/subscriptions/scheduled"


class RawSocket:
    """The end of a raw websocket-client connection (``self.ws``) every test socket shares."""

    ws: websocket.WebSocket

    def close_code(self, timeout: float = 5.0) -> tuple[int, str]:
        """Read until the server closes; returns (code, reason)."""
        self.ws.settimeout(timeout)
        return read_close(self.ws)

    def close(self) -> None:
        try:
            self.ws.close(timeout=1)
        except (OSError, websocket.WebSocketException):
            pass  # already closed by the server


class Subscriber(RawSocket):
    """A raw websocket-client subscription (what a Prefect task worker does)."""

    def __init__(self, ws: websocket.WebSocket, auth_reply: dict[str, Any]) -> None:
        self.ws = ws
        self.auth_reply = auth_reply
        self._pending: list[dict[str, Any]] = []  # messages read while waiting for something else

    def send(self, message: dict[str, Any]) -> None:
        self.ws.send(json.dumps(message))

    def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        if self._pending:
            return self._pending.pop(0)
        self.ws.settimeout(timeout)
        return json.loads(self.ws.recv())

    def next_run(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next task run message (control messages in between are kept for later)."""
        for i, message in enumerate(self._pending):
            if "type" not in message:
                return self._pending.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            self.ws.settimeout(max(0.01, deadline - time.monotonic()))
            message = json.loads(self.ws.recv())
            if "type" not in message:
                return message
            self._pending.append(message)

    def expect_no_run(self, seconds: float) -> None:
        self.ws.settimeout(seconds)
        try:
            message = json.loads(self.ws.recv())
        except websocket.WebSocketTimeoutException:
            return
        raise AssertionError(f"unexpected message: {message}")

    def ack(self) -> None:
        self.send({"type": "ack"})

    def set_state(self, run_id: str, state_type: str, force: bool = False, timeout: float = 10.0,
                  **state: Any) -> dict[str, Any]:
        """Propose a state over the socket (set_state extension); returns the reply message."""
        request_id = uuid.uuid4().hex
        self.send({"type": "set_state", "request_id": request_id, "task_run_id": run_id,
                   "state": {"type": state_type, **state}, "force": force})
        for i, message in enumerate(self._pending):
            if message.get("request_id") == request_id:
                return self._pending.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            self.ws.settimeout(max(0.01, deadline - time.monotonic()))
            message = json.loads(self.ws.recv())
            if message.get("type") == "set_state_result" and message.get("request_id") == request_id:
                return message
            self._pending.append(message)

def read_close(ws: websocket.WebSocket) -> tuple[int, str]:
    """The server's close code and reason. Read with recv_frame, which does not answer the close:
    recv_data would, and under load the server may have dropped the connection already, so the
    answer failed with BrokenPipeError and lost the code (seen once in a full run)."""
    while True:
        frame = ws.recv_frame()
        if frame.opcode == websocket.ABNF.OPCODE_CLOSE:
            data = frame.data
            code = int.from_bytes(data[:2], "big") if len(data) >= 2 else 1005
            return code, data[2:].decode()


class Wire:
    """REST + websocket access to one server."""

    def __init__(self, url: str, auth_string: str | None = None) -> None:
        self.url = url
        self.auth_string = auth_string
        self.http = requests.Session()
        if auth_string:
            self.http.headers["Authorization"] = "Basic " + base64.b64encode(auth_string.encode()).decode()
        self._sockets: list[Subscriber] = []

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1) + SUBSCRIPTION_PATH

    def create_body(self, task_key: str = "tests.add", deferred: bool = True, **overrides: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "name": task_key.rsplit(".", 1)[-1],
            "task_key": task_key,
            "dynamic_key": f"{task_key}-{uuid.uuid4().hex}",
            "empirical_policy": {"retries": 0, "retry_delay": 0},
            "flow_run_id": None,
            "tags": [],
            "task_inputs": {},
            "state": {"type": "SCHEDULED", "name": "Scheduled",
                      "state_details": {"deferred": deferred, "task_parameters_id": str(uuid.uuid4())}},
        }
        body.update(overrides)
        return body

    def create(self, task_key: str = "tests.add", **overrides: Any) -> dict[str, Any]:
        response = self.http.post(self.url + "/task_runs/", json=self.create_body(task_key, **overrides), timeout=10)
        assert response.status_code == 201, response.text
        return response.json()

    def read(self, run_id: str) -> dict[str, Any]:
        response = self.http.get(f"{self.url}/task_runs/{run_id}", timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    def set_state(self, run_id: str, state_type: str, force: bool = False, **state: Any) -> requests.Response:
        return self.http.post(f"{self.url}/task_runs/{run_id}/set_state",
                              json={"state": {"type": state_type, **state}, "force": force}, timeout=10)

    def connect(self, subprotocol: bool = True) -> websocket.WebSocket:
        ws = websocket.create_connection(self.ws_url, subprotocols=["prefect"] if subprotocol else None, timeout=10)
        return ws

    def subscribe(self, keys: list[str] | None = None, client_id: str = "test-client",
                  token: Any = None) -> Subscriber:
        ws = self.connect()
        ws.send(json.dumps({"type": "auth", "token": token if token is not None else self.auth_string}))
        reply = json.loads(ws.recv())
        assert reply["type"] == "auth_success", reply
        ws.send(json.dumps({"type": "subscribe", "keys": keys or ["tests.add"], "client_id": client_id}))
        subscriber = Subscriber(ws, reply)
        self._sockets.append(subscriber)
        return subscriber

    def close(self) -> None:
        for subscriber in self._sockets:
            subscriber.close()
        self.http.close()


@pytest.fixture
def wire(server: Any) -> Iterator[Wire]:
    w = Wire(server.url, server.auth_string)
    yield w
    w.close()


@pytest.fixture
def make_wire() -> Iterator[Callable[..., Wire]]:
    made: list[Wire] = []

    def make(server: Any, auth_string: str | None = None) -> Wire:
        w = Wire(server.url, auth_string if auth_string is not None else server.auth_string)
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()


@pytest.fixture
def protocol() -> Callable[[str], Any]:
    return load_capture


@pytest.fixture
def sockets() -> Iterator[Any]:
    """``sockets(server, "/events/in" or "/events/out")``: event sockets closed at the end."""
    from tests.server.test_server_events import EventSocket

    made: list[Any] = []

    def make(server: Any, path: str, **kwargs: Any) -> Any:
        sock = EventSocket(server, path, **kwargs)
        made.append(sock)
        return sock

    yield make
    for sock in made:
        sock.close()
