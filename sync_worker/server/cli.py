"""Command-line options of the embedded server (``sync-worker server`` / ``python -m sync_worker.server``)."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from sync_worker.cli import LOG_FORMAT, positive_int

logger = logging.getLogger("sync_worker.server.cli")

DEFAULT_DB = str(Path.home() / ".sync_worker" / "server.db")


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be 0-65535 (0 = any free port)")
    return value


def _default_auth_string() -> Any:
    return os.environ.get("SYNC_WORKER_SERVER_AUTH_STRING") or os.environ.get("PREFECT_SERVER_API_AUTH_STRING") or None


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the server's options to ``parser`` and set ``func=run``."""
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; a non-loopback address without "
                             "--auth-string logs a warning)")
    parser.add_argument("--port", type=_port, default=4200, help="port (default 4200; 0 = any free port)")
    parser.add_argument("--db", default=DEFAULT_DB, metavar="PATH",
                        help=f"SQLite database file, created if missing (default {DEFAULT_DB})")
    parser.add_argument("--auth-string", default=_default_auth_string(), metavar="S",
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
    parser.add_argument("--retention", type=_duration, default="7d", metavar="DURATION",
                        help="delete finished runs (and their records on this server) this long after they "
                             "end, e.g. 12h, 7d, 2w; 0 keeps everything (default 7d)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.set_defaults(func=run)


def _duration(text: str) -> float:
    from sync_worker.server.retention import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT, then stop cleanly (exit code 0)."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=args.log_level, format=LOG_FORMAT)
    else:
        root.setLevel(args.log_level)
    logging.getLogger("sync_worker").setLevel(args.log_level)

    from sync_worker.server import Server

    server = Server(host=args.host, port=args.port, database=args.db, auth_string=args.auth_string,
                    lease_timeout=args.lease_timeout, max_deliveries=args.max_deliveries,
                    max_body_size=args.max_body_size, synchronous=args.synchronous,
                    retention=getattr(args, "retention", None))
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        logger.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    from sync_worker.server.database import DatabaseInUse

    try:
        server.start()
    except OSError as exc:
        logger.error("cannot listen on %s:%s: %s", args.host, args.port, exc)
        return 1
    except DatabaseInUse as exc:
        logger.error("cannot start: %s", exc)
        return 1
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
