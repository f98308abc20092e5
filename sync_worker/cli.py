"""The ``sync-worker`` command: ``server``, ``worker`` and ``demo``."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def positive_int(text: str) -> int:
    """argparse type of counts (also used by the server's options)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be a whole number >= 1")
    return value


def _limit(text: str) -> int | None:
    if text.lower() in ("none", "0", "unlimited"):
        return None
    return positive_int(text)


def _add_worker_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "worker",
        help="run a worker that executes background runs of the given tasks",
        description=(
            "Subscribe to the task-run queue of the API at SYNC_WORKER_API_URL (or PREFECT_API_URL, "
            "default http://127.0.0.1:4200/api) and execute runs of the given tasks in a thread pool. "
            "SIGTERM or Ctrl-C stops taking runs and lets in-flight runs finish."
        ),
        epilog="example: sync-worker worker myapp.tasks:send_email myapp.tasks:resize_image --limit 20",
    )
    parser.add_argument("tasks", nargs="+", metavar="MODULE:TASK", help="an importable @task, e.g. myapp.tasks:send_email")
    parser.add_argument("--limit", type=_limit, default=10,
                        help="most runs executing at once (default 10; 'none' for no limit)")
    parser.add_argument("--status-port", type=int, default=None, metavar="PORT",
                        help="serve GET /status (JSON) on 127.0.0.1:PORT")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="stop after this many seconds (default: run until stopped)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    def run(args: argparse.Namespace) -> int:
        from sync_worker.worker import run_worker_command

        return run_worker_command(args.tasks, limit=args.limit, status_port=args.status_port, timeout=args.timeout)

    parser.set_defaults(func=run)


def _add_server_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "server",
        help="run the embedded task-run server (SQLite, no other service needed)",
        description="Serve the task-run API (Prefect 3 wire protocol) backed by a SQLite database.",
    )
    from sync_worker.server.cli import configure_parser

    configure_parser(parser)


def _add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the embedded server, a worker and a batch of runs end to end, and print the results",
        description=(
            "Starts the embedded server on a free port with a temporary database, a worker process, "
            "submits a batch of runs (including one that fails and is retried) and prints the results."
        ),
    )
    parser.add_argument("--runs", type=positive_int, default=20, help="how many runs to submit (default 20)")
    parser.add_argument("--limit", type=positive_int, default=10, help="the worker's concurrency limit (default 10)")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    def run(args: argparse.Namespace) -> int:
        from sync_worker.demo import run_demo

        return run_demo(runs=args.runs, limit=args.limit)

    parser.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sync-worker",
        description="Background tasks for synchronous Python (Prefect 3 task-run protocol).",
    )
    from sync_worker import __version__

    parser.add_argument("--version", action="version", version=f"sync-worker {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_demo_parser(subparsers)
    _add_server_parser(subparsers)
    _add_worker_parser(subparsers)
    from sync_worker.runs_cli import add_runs_parser, add_status_parser, add_storage_parser  # operating the queue

    add_runs_parser(subparsers)
    add_status_parser(subparsers)
    add_storage_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    logging.basicConfig(level=getattr(args, "log_level", "INFO"), format=LOG_FORMAT)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
