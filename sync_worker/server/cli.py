"""Command-line options of the embedded server (``sync-worker server`` / ``python -m sync_worker.server``)."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from sync_worker.cli import positive_int
from sync_worker.cli_support import (
    add_logging_options,
    configure_logging,
    port,
    positive_float,
    removed_on_failure,
    require_server_extra,
)

logger = logging.getLogger("sync_worker.server.cli")

DEFAULT_DB = str(Path.home() / ".sync_worker" / "server.db")
#: How soon the serving loop notices a SIGTERM/SIGINT its handler noted (seconds).
SIGNAL_POLL_SECONDS = 0.25


_positive_float = positive_float  # option types whose errors name the option and the value
_port = port


def _default_auth_string() -> Any:
    return os.environ.get("SYNC_WORKER_SERVER_AUTH_STRING") or os.environ.get("PREFECT_SERVER_API_AUTH_STRING") or None


def _auth_string(text: str) -> str:
    """``--auth-string``: not empty (an empty one would serve without any auth, silently)."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty (leave the option out to serve without auth)")
    return text


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the server's options to ``parser`` and set ``func=run``."""
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; a non-loopback address without "
                             "--auth-string logs a warning)")
    parser.add_argument("--port", type=_port, default=4200, help="port (default 4200; 0 = any free port)")
    parser.add_argument("--db", default=DEFAULT_DB, metavar="PATH",
                        help=f"SQLite database file, created if missing; its directory must exist "
                             f"(default {DEFAULT_DB}, directory created)")
    parser.add_argument("--auth-string", type=_auth_string, default=_default_auth_string(), metavar="S",
                        help="require HTTP Basic auth with this string (and it as the websocket token); "
                             "default from SYNC_WORKER_SERVER_AUTH_STRING or PREFECT_SERVER_API_AUTH_STRING")
    parser.add_argument("--lease-timeout", type=_positive_float, default=30.0, metavar="SECONDS",
                        help="seconds before a run held by a disconnected worker is delivered again (default 30)")
    parser.add_argument("--max-deliveries", type=positive_int, default=3, metavar="N",
                        help="deliveries to lost workers after which a run is marked CRASHED (default 3)")
    parser.add_argument("--max-body-size", type=positive_int, default=10 * 1024 * 1024, metavar="BYTES",
                        help="largest request body or websocket message (default 10 MiB)")
    parser.add_argument("--synchronous", choices=["NORMAL", "FULL"], default="NORMAL",
                        help="SQLite durability: NORMAL survives a server crash, FULL also power loss "
                             "(default NORMAL)")
    parser.add_argument("--ping-interval", type=_positive_float, default=20.0, metavar="SECONDS",
                        help="seconds between websocket pings; a worker that misses one is disconnected and "
                             "its leases start to run out (default 20)")
    parser.add_argument("--request-timeout", type=_positive_float, default=60.0, metavar="SECONDS",
                        help="seconds a request's headers and body have to arrive (default 60)")
    parser.add_argument("--idle-timeout", type=_positive_float, default=60.0, metavar="SECONDS",
                        help="seconds an idle keep-alive connection stays open (default 60)")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="also answer requests whose Host is NAME (repeatable; '*' = any). By default "
                             "only localhost, IP addresses and the bound address are answered, so that web "
                             "pages cannot reach the server through DNS rebinding")
    parser.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                        help="also accept requests and websockets sent with this Origin, e.g. "
                             "https://dashboard.example (repeatable; '*' = any). By default requests from "
                             "web pages (with a foreign Origin) are refused")
    parser.add_argument("--retention", type=_duration, default="7d", metavar="DURATION",
                        help="delete finished runs (and their records on this server) this long after they "
                             "end, e.g. 12h, 7d, 2w; 0 keeps everything (default 7d)")
    parser.add_argument("--no-ui", dest="ui", action="store_false",
                        help="do not serve the dashboard at / (by default it is served on the same port; "
                             "with --auth-string it asks for it)")
    add_logging_options(parser)
    parser.set_defaults(func=run)


def _duration(text: str) -> float:
    from sync_worker.server.retention import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT, then stop cleanly (exit code 0)."""
    configure_logging(args.log_level, getattr(args, "log_format", "text"))
    require_server_extra("sync-worker server")

    from sync_worker.server import Server

    server = Server(host=args.host, port=args.port, database="" if args.db == DEFAULT_DB else args.db, auth_string=args.auth_string,
                    lease_timeout=args.lease_timeout, max_deliveries=args.max_deliveries,
                    max_body_size=args.max_body_size, synchronous=args.synchronous,
                    allowed_hosts=args.allowed_host, allowed_origins=args.allowed_origin,
                    ping_interval=args.ping_interval, request_timeout=args.request_timeout,
                    idle_timeout=args.idle_timeout,
                    retention=getattr(args, "retention", None), ui=getattr(args, "ui", True))
    received: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        # Only noted (list.append takes no lock): a handler runs on top of whatever the main
        # thread was doing, maybe holding the lock it would take. An Event set here deadlocked
        # when the signal came while the loop below held the Event's lock inside wait().
        received.append(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    from sync_worker.server.database import DatabaseFileError, DatabaseInUse

    from sync_worker.exceptions import ConfigurationError

    # user mistakes are one line and exit code 2 (sync_worker.cli_support.run_command); a start
    # that fails leaves none of the database files behind that it created itself
    database = os.path.abspath(args.db)
    try:
        with removed_on_failure([os.path.dirname(database), database, database + ".lock",
                                 database + "-wal", database + "-shm"]):
            server.start()
    except DatabaseInUse as exc:
        raise ConfigurationError(f"cannot start: {exc} (--db); stop it or choose another --db") from exc
    except DatabaseFileError as exc:
        raise ConfigurationError(f"cannot start: {exc} (--db)") from exc
    except OSError as exc:
        from sync_worker.diagnostics import port_unavailable

        raise port_unavailable("server", "--host/--port", args.host, args.port, exc) from exc
    if server.ui:
        logger.info("Dashboard: %s/", server.url[:-len("/api")])
    logger.info("Task runs and parameter/result records (SYNC_WORKER_STORAGE=server) are kept in %s; "
                "stop the server before copying or deleting it", database)
    try:
        while not received:
            time.sleep(SIGNAL_POLL_SECONDS)
        logger.info("received %s, shutting down", signal.Signals(received[0]).name)
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
