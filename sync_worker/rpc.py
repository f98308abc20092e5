"""The client side of the embedded server's rpc socket (``/api/sync_worker/rpc``).

A process keeps one websocket per :class:`~sync_worker.client.Client`, shared by its
threads: ``.delay()`` sends a ``create`` on it instead of an HTTP request, and
``TaskRunFuture.wait()`` a ``wait`` that the server answers when the run finishes,
instead of polling. Which of the two ways a message takes is decided by
:class:`sync_worker.transport.SubmitTransport`; this module only opens and keeps the
socket. Against a server without the endpoint (a Prefect server), or while the socket
cannot be opened, :meth:`RpcChannel.connection` raises :class:`RpcUnavailable` (nothing
was sent); the answer is remembered, so a Prefect server is asked once.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

import websocket

from sync_worker.sockets import Connection, ConnectionLost, authenticate, open_socket

if TYPE_CHECKING:
    from sync_worker.client import Client

logger = logging.getLogger("sync_worker.rpc")

RPC_PATH = "sync_worker/rpc"

#: After a failed connection attempt, REST is used for this long before trying again.
RETRY_AFTER_SECONDS = 2.0
#: Keep-alive of an idle rpc socket (and how soon a dead one is noticed).
PING_INTERVAL = 15.0


class RpcUnavailable(RuntimeError):
    """The rpc socket cannot be used now; nothing was sent: use REST."""


class RpcChannel:
    """One lazily opened rpc socket of a client (thread-safe)."""

    def __init__(self, client: Client):
        self.client = client
        self.url = client.websocket_url(RPC_PATH)
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._unsupported = False
        self._retry_at = 0.0

    @property
    def unsupported(self) -> bool:
        """The server answered the rpc handshake 403/404: not the embedded server (a Prefect
        server), whose callers do over REST what the rpc socket would do."""
        return self._unsupported

    def connection(self, deadline: float | None = None) -> Connection:
        """The open socket (opened now if need be), whose ``extensions`` are what its
        ``auth_success`` announced; :meth:`Connection.request` sends on it.

        Raises :class:`RpcUnavailable` when there is none (nothing was sent). ``deadline``
        (monotonic): opening it, or waiting for another thread that opens it, ends then.
        """
        wait = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._lock.acquire(timeout=wait):
            raise RpcUnavailable("the rpc socket is being opened by another thread")
        try:
            conn = self._conn
            if conn is not None and not conn.closed.is_set():
                return conn
            if self._unsupported:
                raise RpcUnavailable(f"{self.url} is not served here")
            if time.monotonic() < self._retry_at:
                raise RpcUnavailable("the rpc socket failed recently")
            timeout = min(float(self.client.timeout or 30.0), 10.0)
            if deadline is not None:
                timeout = max(0.05, min(timeout, deadline - time.monotonic()))
            try:
                self._conn = conn = self._open(timeout)
            except RpcUnavailable:
                self._retry_at = time.monotonic() + RETRY_AFTER_SECONDS
                raise
            return conn
        finally:
            self._lock.release()

    def _open(self, timeout: float) -> Connection:
        try:
            ws = open_socket(self.client, self.url, timeout)
        except websocket.WebSocketBadStatusException as exc:
            if exc.status_code in (403, 404):  # a Prefect server: no such endpoint
                self._unsupported = True
                logger.debug("%s answered %s: using REST", self.url, exc.status_code)
            raise RpcUnavailable(f"rpc handshake failed with HTTP {exc.status_code}") from exc
        except (websocket.WebSocketException, OSError) as exc:
            raise RpcUnavailable(f"cannot connect to {self.url}: {exc}") from exc
        try:
            reply = authenticate(ws, self.client)
            if reply.get("type") != "auth_success":
                raise RpcUnavailable(f"rpc auth refused: {reply}")
            ws.settimeout(PING_INTERVAL)
        except Exception as exc:
            ws.shutdown()
            # wrong credentials included: REST then gives the user the proper 401 error
            raise RpcUnavailable(f"rpc handshake failed: {exc}") from exc
        extensions = reply.get("extensions")
        conn = Connection(ws, [str(e) for e in extensions] if isinstance(extensions, list) else [], PING_INTERVAL)
        conn.start()
        logger.debug("rpc socket open to %s", self.url)
        return conn

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort(ConnectionLost("rpc channel closed"))


__all__ = ["ConnectionLost", "RpcChannel", "RpcUnavailable"]
