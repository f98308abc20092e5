"""The embedded task-run server: lifecycle (start/stop/serve_forever) and the HTTP layer.

HTTP is Werkzeug's threaded server (one thread per connection) with a request handler that
keeps HTTP/1.1 connections alive: Werkzeug's own handler closes every connection after one
response, which would cost a TCP handshake and a thread start per request. Our WSGI app
always reads the whole request body (or asks for the connection to be closed), which is what
makes keep-alive safe here.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

from .app import CLOSE, UPGRADED, App
from .core import Core
from .database import SQLiteDatabase
from .runqueue import RunQueue
from .subscriptions import SubscriptionRegistry

logger = logging.getLogger("sync_worker.server.server")

DEFAULT_MAX_BODY_SIZE = 10 * 1024 * 1024
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class _RequestHandler(WSGIRequestHandler):
    """Keep-alive WSGI request handler; one complete response per ``write``."""

    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # pragma: no cover
            pass
        self.server.track(self.connection, threading.current_thread())

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def handle_one_request(self) -> None:
        if self.server.closing:
            self.close_connection = True
            return
        super().handle_one_request()

    def run_wsgi(self) -> None:
        if self.headers.get("Expect", "").lower().strip(" \t") == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        environ = self.make_environ()
        response: list[Any] = []

        def start_response(status: str, headers: list[Any], exc_info: Any = None) -> Any:
            response[:] = [status, headers]
            return None

        try:
            chunks = self.server.app(environ, start_response)
            body = b"".join(chunks)
        except Exception:  # pragma: no cover - App catches everything itself
            logger.exception("unhandled error in WSGI app")
            self.close_connection = True
            return
        if environ.get(UPGRADED):
            self.close_connection = True  # the socket belonged to the websocket
            return
        if environ.get(CLOSE) or self.server.closing:
            self.close_connection = True
        status, headers = response
        lines = [f"HTTP/1.1 {status}\r\n".encode("latin-1")]
        for name, value in headers:
            lines.append(f"{name}: {value}\r\n".encode("latin-1"))
        if self.close_connection and not environ.get(CLOSE):
            lines.append(b"Connection: close\r\n")
        lines.append(b"\r\n")
        lines.append(body)
        self.wfile.write(b"".join(lines))
        self.log_request(status.split(" ", 1)[0], len(body))

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        if logger.isEnabledFor(5):
            logger.log(5, "%s %s %s", self.command, self.path, code)

    def log_error(self, format: str, *args: Any) -> None:
        logger.debug("http: " + format, *args)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("http: " + format, *args)


class _HTTPServer(ThreadedWSGIServer):
    """Werkzeug's threaded server (what ``make_server(threaded=True)`` builds), tracking open
    connections so that :meth:`Server.stop` can close idle keep-alive ones."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.closing = False
        self._conn_lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}
        super().__init__(*args, **kwargs)

    def track(self, sock: socket.socket, thread: threading.Thread) -> None:
        with self._conn_lock:
            self._conns[sock] = thread

    def untrack(self, sock: socket.socket) -> None:
        with self._conn_lock:
            self._conns.pop(sock, None)

    def connections(self) -> dict[socket.socket, threading.Thread]:
        with self._conn_lock:
            return dict(self._conns)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except BaseException:
        sock.close()
        raise
    return sock


class Server:
    """The embedded task-run server.

    Args:
        host, port: where to listen (port 0 = any free port; see :attr:`port`).
        database: path of the SQLite file (created if missing). A new Server on the same
            file rebuilds the queue from it.
        auth_string: require ``Authorization: Basic base64(auth_string)`` on REST and this
            token in the websocket auth message. None = no auth.
        lease_timeout: seconds a run held by a worker whose connection dropped waits before it
            is delivered again.
        max_deliveries: deliveries after which such a run is marked CRASHED instead.
        max_body_size: largest request body / websocket message, in bytes (413 beyond).
        synchronous: SQLite ``synchronous`` pragma: NORMAL survives a crash of this process,
            FULL also survives power loss (slower).
        buffer_size: run ids per task key kept in memory; more wait in the database.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 4200, database: str = "", auth_string: str | None = None,
                 lease_timeout: float = 30.0, max_deliveries: int = 3, max_body_size: int = DEFAULT_MAX_BODY_SIZE,
                 synchronous: str = "NORMAL", buffer_size: int = 1000) -> None:
        if not database:
            database = os.path.join(os.path.expanduser("~"), ".sync_worker", "server.db")
        if lease_timeout <= 0:
            raise ValueError("lease_timeout must be > 0")
        if max_deliveries < 1:
            raise ValueError("max_deliveries must be >= 1")
        if max_body_size < 1:
            raise ValueError("max_body_size must be >= 1")
        self.host = host
        self.port = port
        self.database = database
        self.auth_string = auth_string or None
        self.lease_timeout = lease_timeout
        self.max_deliveries = max_deliveries
        self.max_body_size = max_body_size
        self.synchronous = synchronous
        self.buffer_size = buffer_size
        self.db: SQLiteDatabase | None = None
        self.queue: RunQueue | None = None
        self.core: Core | None = None
        self._http: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._registry = SubscriptionRegistry()
        self._lock = threading.Lock()
        self._started = False
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        host = self.host
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/api"

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> Server:
        """Open the database, rebuild the queue, start listening; returns once listening."""
        with self._lock:
            if self._started:
                raise RuntimeError("this Server was already started")
            self._started = True
        if self.host not in LOOPBACK and not self.auth_string:
            logger.warning("listening on %s without an auth string: anyone who can reach this port can "
                           "create and read task runs (set an auth string)", self.host)
        directory = os.path.dirname(os.path.abspath(self.database))
        os.makedirs(directory, exist_ok=True)
        self.db = SQLiteDatabase(self.database, synchronous=self.synchronous)
        self.queue = RunQueue(self.db, lease_timeout=self.lease_timeout, max_deliveries=self.max_deliveries,
                              buffer_size=self.buffer_size)
        self.db._on_commit_failure = self.queue.on_commit_failure  # type: ignore[method-assign]
        try:
            self.queue.recover(self.db.recover())
            self.core = Core(self.db, self.queue, self.auth_string)
            app = App(self.core, self._registry, self.max_body_size)
            listener = _bind(self.host, self.port)
            try:
                http = _HTTPServer(self.host, self.port, app, _RequestHandler, fd=listener.fileno())
            finally:
                listener.close()  # the server holds its own duplicate of the descriptor
        except BaseException:
            self.queue.stop()
            self.db.close()
            raise
        self._http = http
        self.port = http.server_address[1]
        self._thread = threading.Thread(target=self._serve, name="sync-worker-server", daemon=True)
        self._thread.start()
        logger.info("Serving on %s (database %s)", self.url, self.database)
        return self

    def _serve(self) -> None:
        assert self._http is not None
        self._http.serve_forever(poll_interval=0.05)

    def serve_forever(self) -> None:
        """Start (if needed) and block until :meth:`stop` is called (e.g. by a signal handler)."""
        if not self._started:
            self.start()
        while not self._stopped.wait(0.5):
            pass

    def stop(self) -> None:
        """Stop listening, close every connection (websockets included), join threads, close
        the database. Idempotent."""
        with self._lock:
            if not self._started or self._stopped.is_set():
                self._stopped.set()
                return
            self._stopped.set()
        started = time.monotonic()
        http = self._http
        if http is not None:
            http.closing = True
            http.shutdown()  # the accept loop ends (serve_forever closes the listening socket)
        if self._thread is not None:
            self._thread.join(timeout=2)
        self._registry.close_all()
        threads: list[threading.Thread] = []
        if http is not None:
            for sock, thread in http.connections().items():
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                threads.append(thread)
        if self.queue is not None:
            self.queue.stop()
        deadline = time.monotonic() + 2.0
        current = threading.current_thread()
        for thread in threads:
            if thread is not current:
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if self.db is not None:
            self.db.close()
        logger.info("Server on %s stopped in %.2f s", self.url, time.monotonic() - started)

    @property
    def running(self) -> bool:
        return self._started and not self._stopped.is_set()

    def stats(self) -> dict[str, Any]:
        """Queue counters (for tests and benchmarks)."""
        out: dict[str, Any] = dict(self.queue.stats()) if self.queue else {}
        out["subscriptions"] = len(self._registry)
        return out

    def __enter__(self) -> Server:  # noqa: PYI034 - Python 3.9 has no typing.Self
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Server(url={self.url!r}, database={self.database!r})"

