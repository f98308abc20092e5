"""Websocket plumbing shared by the client's two sockets (subscription and rpc).

One place for what both need: opening a socket with the same options, Prefect's auth
handshake, the reader thread that demultiplexes answers (matched by ``request_id``) from
task runs, keep-alive pings, and the mapping of close frames to errors. What each socket
means (subscribe and ack; create and wait) lives in :mod:`sync_worker.subscription` and
:mod:`sync_worker.rpc`.
"""
from __future__ import annotations

import json
import logging
import queue
import socket
import struct
import threading
import time
import uuid
from typing import Any

import websocket

from sync_worker.exceptions import CredentialsError, SyncWorkerError
from sync_worker.schemas import TaskRun

logger = logging.getLogger("sync_worker.sockets")

CLOSE_POLICY_VIOLATION = 1008
CLOSE_PROTOCOL_VIOLATION = 4001

AUTH_HINT = (
    "check SYNC_WORKER_API_AUTH_STRING / PREFECT_API_AUTH_STRING (or SYNC_WORKER_API_KEY / "
    "PREFECT_API_KEY) against the server's auth string, and SYNC_WORKER_API_URL / PREFECT_API_URL"
)

class SubscriptionError(SyncWorkerError):
    """The subscription cannot continue and retrying will not help."""


class SubscriptionAuthError(SubscriptionError, CredentialsError):
    """The server refused our credentials (handshake 401/403 or close 1008)."""


class ConnectionLost(ConnectionError):
    """The socket went away (or never came up). Intermittent: the subscription reconnects.

    A ``ConnectionError`` so that ``services.is_intermittent`` and callers that already
    forgive network errors treat it as such.
    """


class Pending:
    """One ``set_state`` request awaiting its answer from the reader thread."""

    __slots__ = ("error", "event", "reply")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reply: dict[str, Any] | None = None
        self.error: BaseException | None = None


class Connection:
    """One authenticated, subscribed socket and the thread that reads it."""

    def __init__(self, ws: websocket.WebSocket, extensions: list[str], ping_interval: float):
        self.ws = ws
        self.extensions = extensions
        self.ping_interval = ping_interval
        self.runs: queue.Queue[Any] = queue.Queue()
        self.closed = threading.Event()
        self.error: BaseException | None = None
        self.uses_credit = False  # subscribed with the credit extension (see Subscription.grant)
        self._pending: dict[str, Pending] = {}
        self._pending_lock = threading.Lock()
        self._pong_due: float | None = None
        self._thread = threading.Thread(target=self._read_loop, name="sync-worker-subscription-reader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def supports_set_state(self) -> bool:
        return "set_state" in self.extensions and not self.closed.is_set()

    def send_json(self, message: dict[str, Any]) -> None:
        """Send one message; websocket-client serialises concurrent sends with its own lock."""
        if self.closed.is_set():
            raise ConnectionLost("subscription socket is closed")
        try:
            self.ws.send(json.dumps(message))
        except (websocket.WebSocketException, OSError) as exc:
            self.abort(ConnectionLost(f"sending on the subscription socket failed: {exc}"))
            raise ConnectionLost(str(exc)) from exc

    def request(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        request_id = uuid.uuid4().hex
        pending = Pending()
        with self._pending_lock:
            if self.closed.is_set():
                raise ConnectionLost("subscription socket is closed")
            self._pending[request_id] = pending
        try:
            self.send_json({**message, "request_id": request_id})
            if not pending.event.wait(timeout):
                raise ConnectionLost(f"no answer to {message.get('type')} within {timeout}s")
        finally:
            with self._pending_lock:
                self._pending.pop(request_id, None)
        if pending.error is not None:
            raise pending.error
        assert pending.reply is not None
        return pending.reply

    def _read_loop(self) -> None:
        try:
            while True:
                try:
                    opcode, data = self.ws.recv_data(control_frame=True)
                except websocket.WebSocketTimeoutException:
                    self._keepalive()
                    continue
                self._pong_due = None  # any traffic proves the link is alive
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    raise close_error(data)
                if opcode in (websocket.ABNF.OPCODE_PING, websocket.ABNF.OPCODE_PONG):
                    continue
                self._dispatch(json.loads(data))
        except BaseException as exc:  # noqa: BLE001 - every way out ends this connection
            if not isinstance(exc, (SubscriptionError, ConnectionLost)):
                exc = ConnectionLost(f"subscription connection lost: {exc!r}")
            self.abort(exc)
        finally:
            self.ws.shutdown()  # close the descriptor (abort() only shuts the socket down)

    def _keepalive(self) -> None:
        now = time.monotonic()
        if self._pong_due is None:
            self._pong_due = now + self.ping_interval
            self.ws.ping()
        elif now >= self._pong_due:
            raise ConnectionLost(f"no traffic from the server for {2 * self.ping_interval:.0f}s (dead link)")

    def _dispatch(self, message: Any) -> None:
        if not isinstance(message, dict):
            logger.warning("Ignoring malformed subscription message: %r", message)
            return
        kind = message.get("type")
        if kind is None:
            try:
                run = TaskRun.from_json(message)
            except (KeyError, TypeError, ValueError) as exc:
                # Nobody can execute it; acknowledging lets the queue move on instead of
                # stalling this subscription behind it forever.
                logger.error("Discarding a malformed task run from the server (%r): %.500r", exc, message)
                self.send_json({"type": "ack"})
                return
            self.runs.put(run)
        elif "request_id" in message:  # the answer to a request (set_state_result, rpc answers)
            with self._pending_lock:
                pending = self._pending.get(str(message.get("request_id")))
            if pending is None:
                logger.debug("Late %s for request %s ignored", kind, message.get("request_id"))
                return
            pending.reply = message
            pending.event.set()
        elif kind == "cancel":  # the embedded server cancels a run this worker holds
            from sync_worker.cancellation import request

            request(message.get("task_run_id"))
        else:
            logger.debug("Ignoring control message of type %r", kind)

    def abort(self, exc: BaseException) -> None:
        """End the connection: wake the consumer and every waiting ``set_state`` caller."""
        with self._pending_lock:
            if self.closed.is_set():
                return
            self.error = exc
            self.closed.set()
            pending = list(self._pending.values())
        for item in pending:
            item.error = ConnectionLost(f"subscription connection lost before the answer: {exc}")
            item.event.set()
        try:
            self.ws.send_close()
        except Exception as err:  # noqa: BLE001 - best effort: the peer may be gone
            logger.debug("Sending close on the subscription socket: %r", err)
        sock = self.ws.sock
        if sock is not None:
            # Wakes the reader thread if it is blocked in recv (ws.abort() would not:
            # send_close already marked the socket disconnected).
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError as err:
                logger.debug("Shutting down the subscription socket: %r", err)
        self.runs.put(END)


END = object()


def open_socket(client: Any, url: str, timeout: float) -> websocket.WebSocket:
    """A websocket to the API with the options every sync_worker socket uses (subscription,
    rpc). Raises websocket-client's errors; callers say what they mean."""
    headers = [f"{name}: {value}" for name, value in client.headers.items()]
    return websocket.create_connection(
        url, timeout=timeout, subprotocols=["prefect"], header=headers, enable_multithread=True,
        # websocket-client's UTF-8 check of incoming frames is pure Python and cost a third
        # of the worker's CPU; json.loads rejects invalid text anyway.
        skip_utf8_validation=True,
    )


def authenticate(ws: websocket.WebSocket, client: Any) -> dict[str, Any]:
    """Send Prefect's auth message; the server's answer (a close frame raises)."""
    ws.send(json.dumps({"type": "auth", "token": client.auth_token}))
    while True:
        opcode, data = ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            raise close_error(data)
        if opcode in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY):
            return json.loads(data)


def close_error(data: bytes) -> BaseException:
    code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else None
    reason = data[2:].decode("utf-8", "replace") if len(data) > 2 else ""
    if code == CLOSE_POLICY_VIOLATION:
        return SubscriptionAuthError(f"The server refused the subscription (close 1008: {reason or 'policy violation'}); {AUTH_HINT}")
    if code == CLOSE_PROTOCOL_VIOLATION:
        return SubscriptionError(f"The server rejected the subscription (close 4001: {reason})")
    return ConnectionLost(f"the server closed the subscription (code {code}, reason {reason!r})")


__all__ = [
    "AUTH_HINT", "CLOSE_POLICY_VIOLATION", "CLOSE_PROTOCOL_VIOLATION", "END", "Connection", "ConnectionLost",
    "SubscriptionAuthError", "SubscriptionError", "authenticate", "close_error", "open_socket",
]
