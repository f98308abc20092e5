"""The embedded task-run server: lifecycle (start/stop/serve_forever) and the HTTP layer.

HTTP is Werkzeug's threaded server (one thread per connection) with a request handler that
keeps HTTP/1.1 connections alive: Werkzeug's own handler closes every connection after one
response, which would cost a TCP handshake and a thread start per request. Our WSGI app
always reads the whole request body (or asks for the connection to be closed), which is what
makes keep-alive safe here.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import sys
import threading
import time
from http import HTTPStatus
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote

from werkzeug.serving import DechunkedInput, ThreadedWSGIServer, WSGIRequestHandler

from .app import CLOSE, UPGRADED, App, ChunkTooLarge
from .core import Core
from .database import DatabaseFileError, SQLiteDatabase
from .events import EventBus
from .runqueue import RunQueue
from .security import RequestGuard
from .sockets import coalescing, handshake_problem
from .subscriptions import SubscriptionRegistry

logger = logging.getLogger("sync_worker.server.server")

DEFAULT_MAX_BODY_SIZE = 10 * 1024 * 1024
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
#: runs the database keeps parsed in memory (its write-through cache; about 7 KB each). A run
#: is created, claimed and finished within moments, so a few hundred cover the work in
#: flight; the database's default of 2,000 cost the server about 10 MB of resident memory.
RUN_CACHE_SIZE = 500


MAX_HEADERS = 100


class _ServerDatabase(SQLiteDatabase):
    """The server's database: what the after-commit work of one group commit sends to one
    socket (answers to several set_state requests, the rpc wait replies of several finished
    runs, runs claimed at their create) goes out in one write (:func:`.sockets.coalescing`)
    instead of one system call and one wake-up of the client per message."""

    def _run_batch(self, conn: Any, batch: Any) -> None:
        with coalescing():
            super()._run_batch(conn, batch)


class _Headers:
    """Request headers: case-insensitive ``get``, ``items`` in arrival order."""

    __slots__ = ("_items", "_lower")

    def __init__(self) -> None:
        self._items: list[tuple[str, str]] = []
        self._lower: dict[str, str] = {}

    def add(self, name: str, value: str) -> None:
        self._items.append((name, value))
        self._lower.setdefault(name.lower(), value)

    def get(self, name: str, default: Any = None) -> Any:
        return self._lower.get(name.lower(), default)

    def items(self) -> list[tuple[str, str]]:
        return self._items

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._lower


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
        """Read one request and answer it.

        Replaces http.server's parsing (which builds an ``email.message.Message`` per request,
        a large share of the cost of a small request) with a plain header loop.
        """
        self.close_connection = True
        server = self.server
        if server.closing:
            return
        conn = self.connection
        try:
            # idle keep-alive connections (and connections that never send anything) are
            # closed after idle_timeout; from the first byte on, the whole request must
            # arrive within request_timeout (the watchdog enforces the total, the socket
            # timeout each read and write)
            conn.settimeout(server.idle_timeout)
            if not self.rfile.peek(1):
                return
            conn.settimeout(server.request_timeout)
            server.watch(conn, time.monotonic() + server.request_timeout)
            line = self.rfile.readline(65537)
        except (TimeoutError, OSError, ValueError):
            return
        if not line:
            return
        if len(line) > 65536:
            self._reject(414, "Request line too long")
            return
        try:
            if not self._parse(line):
                return
        except (TimeoutError, OSError, ValueError):
            self._reject(408, f"Request headers not received within {server.request_timeout:g} s")
            return
        try:
            self.run_wsgi()
        except OSError:  # the client went away, or did not read the answer in time
            self.close_connection = True
        finally:
            server.unwatch(conn)

    def _parse(self, line: bytes) -> bool:
        self.raw_requestline = line
        self.requestline = text = line.decode("iso-8859-1").rstrip("\r\n")
        words = text.split()
        if len(words) != 3 or not words[2].startswith("HTTP/1."):
            self.command, self.path, self.request_version = "", "", "HTTP/1.0"
            self._reject(400, f"Bad request line {text[:100]!r}")
            return False
        self.command, self.path, self.request_version = words
        headers = _Headers()
        rfile = self.rfile
        for _ in range(MAX_HEADERS + 1):
            raw = rfile.readline(65537)
            if raw in (b"\r\n", b"\n", b""):
                break
            if len(raw) > 65536:
                self._reject(431, "Header line too long")
                return False
            name, sep, value = raw.decode("iso-8859-1").partition(":")
            if not sep or not name or name != name.strip():
                self._reject(400, f"Malformed header line {raw[:100]!r}")
                return False
            headers.add(name, value.strip())
        else:
            self._reject(431, f"More than {MAX_HEADERS} headers")
            return False
        self.headers = headers  # type: ignore[assignment]
        connection = headers.get("Connection", "").lower()
        if self.request_version == "HTTP/1.0":
            self.close_connection = "keep-alive" not in connection
        else:
            self.close_connection = "close" in connection
        return True

    def _reject(self, code: int, detail: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        body = json.dumps({"detail": detail}).encode()
        self.close_connection = True
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
        try:
            self.wfile.write(
                f"HTTP/1.1 {code} {HTTPStatus(code).phrase}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n".encode("latin-1") + body
            )
        except OSError:
            pass

    def make_environ(self) -> dict[str, Any]:
        """The WSGI environ (what werkzeug's handler builds, minus what this app never reads)."""
        path, _, query = self.path.partition("?")
        if "%" in path:
            path = unquote(path, "latin-1")
        server_address = self.server.server_address
        environ: dict[str, Any] = {
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": self.rfile,
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            "werkzeug.socket": self.connection,
            "REQUEST_METHOD": self.command,
            "SCRIPT_NAME": "",
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "REMOTE_ADDR": self.client_address[0] if self.client_address else "<local>",
            "REMOTE_PORT": self.client_address[1] if self.client_address else 0,
            "SERVER_NAME": server_address[0],
            "SERVER_PORT": str(server_address[1]),
            "SERVER_PROTOCOL": self.request_version,
        }
        for name, value in self.headers.items():
            if "_" in name:
                continue  # as werkzeug: "_" and "-" would be ambiguous
            key = name.upper().replace("-", "_")
            if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                key = "HTTP_" + key
            if key in environ:
                value = f"{environ[key]},{value}"
            environ[key] = value
        if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
            environ["wsgi.input_terminated"] = True
            environ["wsgi.input"] = _BoundedDechunkedInput(self.rfile)
        return environ

    def run_wsgi(self) -> None:
        if "websocket" in self.headers.get("Upgrade", "").lower():
            # a websocket lives as long as it likes: its own handshake and ping timeouts apply
            self.server.unwatch(self.connection)
            self.connection.settimeout(None)
        if self.headers.get("Expect", "").lower().strip(" \t") == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        environ = self.make_environ()
        if self.command == "GET" and "websocket" in environ.get("HTTP_UPGRADE", "").lower():
            # a malformed opening handshake is answered here, before a websocket handler takes
            # the connection (wsproto would raise there: no answer, and a logged traceback)
            problem = handshake_problem(environ)
            if problem is not None:
                code, detail, headers = problem
                logger.info("refused websocket upgrade GET %s from %s (%d): %s", environ["PATH_INFO"][:200],
                            environ["REMOTE_ADDR"], code, detail)
                self._reject(code, detail, headers)
                return
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

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        if logger.isEnabledFor(5):
            logger.log(5, "%s %s %s", self.command, self.path, code)

    def log_error(self, format: str, *args: Any) -> None:
        logger.debug("http: " + format, *args)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("http: " + format, *args)


class _BoundedDechunkedInput(DechunkedInput):
    """Werkzeug's chunked-body reader with a bounded chunk-size line (its own reads a line of
    any length into memory), refusing a chunk larger than ``max_chunk`` (set by the app to
    its body limit) as soon as its size line is read."""

    max_chunk: int | None = None

    def read_chunk_len(self) -> int:
        line = self._rfile.readline(1026)
        if len(line) > 1024 or not line.endswith(b"\n"):
            raise OSError("Invalid chunk header (a chunk size line of at most 1024 bytes was expected)")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise OSError("Invalid chunk header") from None
        if size < 0:
            raise OSError("Negative chunk length not allowed")
        if self.max_chunk is not None and size > self.max_chunk:
            raise ChunkTooLarge(f"a chunk of {size} bytes")
        return size


class _HTTPServer(ThreadedWSGIServer):
    """Werkzeug's threaded server (what ``make_server(threaded=True)`` builds), tracking open
    connections so that :meth:`Server.stop` can close idle keep-alive ones."""

    def __init__(self, *args: Any, request_timeout: float = 60.0, idle_timeout: float = 60.0,
                 **kwargs: Any) -> None:
        self.closing = False
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self._conn_lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._deadlines: dict[socket.socket, float] = {}
        self._watchdog: threading.Thread | None = None
        super().__init__(*args, **kwargs)

    def watch(self, sock: socket.socket, deadline: float) -> None:
        """Drop ``sock`` if the request it is reading is not complete by ``deadline``
        (a client that trickles bytes resets every socket timeout, not this one)."""
        with self._conn_lock:
            self._deadlines[sock] = deadline
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch_loop, name="sync-worker-http-watchdog",
                                                  daemon=True)
                self._watchdog.start()

    def unwatch(self, sock: socket.socket) -> None:
        with self._conn_lock:
            self._deadlines.pop(sock, None)

    def _watch_loop(self) -> None:
        while not self.closing:
            time.sleep(min(0.5, self.request_timeout / 4))
            now = time.monotonic()
            with self._conn_lock:
                late = [sock for sock, deadline in self._deadlines.items() if deadline <= now]
                for sock in late:
                    del self._deadlines[sock]
            for sock in late:
                logger.info("closing a connection whose request did not arrive within %g s", self.request_timeout)
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def track(self, sock: socket.socket, thread: threading.Thread) -> None:
        with self._conn_lock:
            self._conns[sock] = thread

    def untrack(self, sock: socket.socket) -> None:
        with self._conn_lock:
            self._conns.pop(sock, None)
            self._deadlines.pop(sock, None)

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
        database: path of the SQLite file (created if missing; its directory must exist, except
            for the default ``~/.sync_worker/server.db``). A new Server on the same file
            rebuilds the queue from it. A file that is not one of our databases is refused
            with :class:`.database.DatabaseFileError`.
        auth_string: require ``Authorization: Basic base64(auth_string)`` on REST and this
            token in the websocket auth message. None = no auth.
        lease_timeout: seconds a run held by a worker whose connection dropped waits before it
            is delivered again.
        max_deliveries: deliveries after which such a run is marked CRASHED instead.
        max_body_size: largest request body / websocket message, in bytes (413 beyond).
        synchronous: SQLite ``synchronous`` pragma: NORMAL survives a crash of this process,
            FULL also survives power loss (slower).
        buffer_size: run ids per task key kept in memory; more wait in the database.
        ping_interval: seconds between websocket pings; a subscriber that does not answer
            one before the next is disconnected (so a vanished worker's leases start to run
            out even without a TCP reset). None disables.
        request_timeout: seconds a request (line, headers and body) has to arrive once its first
            byte did (408 or a closed connection beyond; bounds slow clients).
        idle_timeout: seconds an idle keep-alive connection stays open.
        allowed_hosts, allowed_origins: ``Host`` names and ``Origin`` values accepted besides
            this server's own (see :mod:`.security`; ``"*"`` accepts any).
        ui: serve the dashboard at ``/`` (see :mod:`.dashboard`); False answers 404 there.
        prefect_compatible: announce no extension and serve no rpc socket: clients use
            Prefect's protocol only, as with a Prefect server (for testing that path).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 4200, database: str = "", auth_string: str | None = None,
                 lease_timeout: float = 30.0, max_deliveries: int = 3, max_body_size: int = DEFAULT_MAX_BODY_SIZE,
                 synchronous: str = "NORMAL", buffer_size: int = 1000, ping_interval: float | None = 20.0,
                 allowed_hosts: Iterable[str] = (), allowed_origins: Iterable[str] = (),
                 request_timeout: float = 60.0, idle_timeout: float = 60.0,
                 retention: float | None = None,
                 prefect_compatible: bool = False, ui: bool = True) -> None:
        self._default_database = not database  # its directory is created; an explicit one's must exist
        if not database:
            database = os.path.join(os.path.expanduser("~"), ".sync_worker", "server.db")
        if lease_timeout <= 0:
            raise ValueError("lease_timeout must be > 0")
        if max_deliveries < 1:
            raise ValueError("max_deliveries must be >= 1")
        if max_body_size < 1:
            raise ValueError("max_body_size must be >= 1")
        if database == ":memory:" or database.startswith("file::memory:"):
            raise ValueError("the server needs a database file (its connections cannot share an in-memory "
                             "database); use a temporary file instead")
        self.host = host
        self.port = port
        self.database = database
        self.auth_string = auth_string or None
        self.lease_timeout = lease_timeout
        self.max_deliveries = max_deliveries
        self.max_body_size = max_body_size
        self.synchronous = synchronous
        self.buffer_size = buffer_size
        self.ping_interval = ping_interval
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self.allowed_hosts = list(allowed_hosts)
        self.allowed_origins = list(allowed_origins)
        # retention.py: seconds finished runs are kept (None = the 7-day default, 0 = forever)
        from .retention import DEFAULT_RETENTION

        self.retention = DEFAULT_RETENTION if retention is None else retention
        if self.retention < 0:
            raise ValueError("retention must be >= 0 (0 keeps every run)")
        self._sweeper: Any = None
        self.prefect_compatible = prefect_compatible
        self.ui = ui  # the dashboard at / (dashboard.py)
        self.db: SQLiteDatabase | None = None
        self.queue: RunQueue | None = None
        self.core: Core | None = None
        self.events: EventBus | None = None  # Prefect's event endpoints (events.py)
        self._http: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._registry = SubscriptionRegistry(ping_interval)
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
        if self._default_database:
            os.makedirs(os.path.dirname(os.path.abspath(self.database)), exist_ok=True)
        self.db = _ServerDatabase(self.database, synchronous=self.synchronous, cache_size=RUN_CACHE_SIZE)
        self.queue = RunQueue(self.db, lease_timeout=self.lease_timeout, max_deliveries=self.max_deliveries,
                              buffer_size=self.buffer_size)
        self.db._on_commit_failure = self.queue.on_commit_failure  # type: ignore[method-assign]
        try:
            from .cancellation import recover_cancelling

            try:  # reads the whole queue: the first reads of pages past the file's header
                self.queue.recover(self.db.recover())
                self.core = Core(self.db, self.queue, self.auth_string)
                recover_cancelling(self.core)
            except sqlite3.DatabaseError as exc:
                raise DatabaseFileError(f"database {self.database} is corrupted or unreadable: {exc} (restore it "
                                        "from a backup, or start on a new file)") from None
            self.core.prefect_compatible = self.prefect_compatible
            app = App(self.core, self._registry, self.max_body_size)
            app.ui = self.ui
            self.events = app.events
            app = RequestGuard(app, self.host, self.allowed_hosts, self.allowed_origins)
            listener = _bind(self.host, self.port)
            try:
                http = _HTTPServer(self.host, self.port, app, _RequestHandler, fd=listener.fileno(),
                                   request_timeout=self.request_timeout, idle_timeout=self.idle_timeout)
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
        if self.retention > 0:
            from .retention import RetentionSweeper

            self._sweeper = RetentionSweeper(self.core, self.retention).start()
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
        if self._sweeper is not None:
            self._sweeper.stop()
        http = self._http
        if http is not None:
            http.closing = True
            http.shutdown()  # the accept loop ends (serve_forever closes the listening socket)
        if self._thread is not None:
            self._thread.join(timeout=2)
        self._registry.close_all()
        if self.events is not None:
            self.events.close()
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

