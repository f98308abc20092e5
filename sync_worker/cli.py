"""The ``sync-worker`` command: ``server``, ``worker`` and ``demo``."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sync_worker.exceptions import ConfigurationError, SyncWorkerError

# option types, logging and error handling shared by every subcommand (positive_int and
# LOG_FORMAT are also imported from here by the server's options)
from sync_worker.cli_support import (
    COMMAND_PROG,
    LOG_FORMAT,  # noqa: F401
    ArgumentParser,
    add_logging_options,
    configure_logging,
    port,
    positive_float,
    positive_int,
    run_command,
    worker_limit,
)


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
    parser.add_argument("tasks", nargs="*", metavar="MODULE:TASK", help="an importable @task, e.g. myapp.tasks:send_email")
    parser.add_argument("--limit", type=worker_limit, default=10, metavar="N",
                        help="most runs executing at once: a whole number >= 1 (default 10), or 'none' for no limit")
    parser.add_argument("--status-port", type=port, default=None, metavar="PORT",
                        help="serve GET /status (JSON) on 127.0.0.1:PORT (0 = any free port)")
    parser.add_argument("--timeout", type=positive_float, default=None, metavar="SECONDS",
                        help="stop after this many seconds (default: run until stopped)")
    add_logging_options(parser)
    # Django projects: the same worker as `manage.py sync_worker` (sync_worker.contrib.django)
    parser.add_argument("--django", metavar="SETTINGS_MODULE", default=None,
                        help="set up this Django settings module and serve the project's tasks instead of MODULE:TASK")
    parser.add_argument("--queue", action="append", dest="queues", metavar="QUEUE",
                        help="with --django: serve this queue (repeatable; default: every queue in QUEUES)")
    parser.add_argument("--module", action="append", dest="modules", default=[], metavar="MODULE",
                        help="with --django: also import this module for tasks (repeatable; every installed "
                             "app's tasks module is imported anyway)")
    parser.add_argument("--backend", default=None, metavar="ALIAS",
                        help="with --django: the TASKS alias to serve (default 'default')")

    def run(args: argparse.Namespace) -> int:
        from sync_worker.worker import run_worker_command

        if args.django:
            if args.tasks:
                parser.error("give either MODULE:TASK arguments or --django, not both")
            from sync_worker.contrib.django.worker import run_for_settings

            return run_for_settings(args.django, queues=args.queues, limit=args.limit, timeout=args.timeout,
                                    status_port=args.status_port, modules=args.modules,
                                    backend_alias=args.backend or "default")
        if not args.tasks:
            parser.error("the following arguments are required: MODULE:TASK (or --django SETTINGS_MODULE)")
        for given, name in ((args.queues, "--queue"), (args.modules, "--module"), (args.backend, "--backend")):
            if given:
                parser.error(f"{name} needs --django (it is about a Django project's tasks)")

        try:
            return run_worker_command(args.tasks, limit=args.limit, status_port=args.status_port,
                                      timeout=args.timeout)
        except SyncWorkerError as exc:
            wrong_path = _wrong_api_path(exc)
            if wrong_path is None:
                raise
            raise wrong_path from exc

    parser.set_defaults(func=run)


def _status_code(exc: BaseException) -> int | None:
    """The HTTP status behind a failed API call or websocket handshake (None for anything else)."""
    for error in (exc, exc.__cause__):
        code = getattr(error, "status_code", None)
        if isinstance(code, int):
            return code
    return None


def _wrong_api_path(exc: SyncWorkerError) -> ConfigurationError | None:
    """A 404 for the task-run API means the API URL names the wrong path (``/api/v1``, ...):
    a setting mistake (exit 2) that names the URL and the setting, not a run-time failure."""
    if isinstance(exc, ConfigurationError) or _status_code(exc) != 404:
        return None
    if getattr(exc, "detail", None) == "Task not found":  # the route exists: a run that is gone
        return None
    from sync_worker.diagnostics import _setting_name
    from sync_worker.settings import get_settings

    api_url = get_settings().api_url
    label, variable = _setting_name(api_url)
    return ConfigurationError(
        f"{label} is {api_url}, which the server answers 404 for (the API URL should end in /api, "
        f"e.g. http://host:4200/api); set {variable} to the server's API URL ({exc})")


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
    parser.add_argument("--limit", type=worker_limit, default=10, metavar="N",
                        help="the worker's concurrency limit, as worker --limit takes it: a whole number >= 1 "
                             "(default 10), or 'none' for no limit")
    # ERROR: the demo's failing and retried runs fail on purpose, their tracebacks are noise here
    add_logging_options(parser, default_level="ERROR")

    def run(args: argparse.Namespace) -> int:
        from sync_worker.demo import run_demo

        return run_demo(runs=args.runs, limit=args.limit, log_level=args.log_level)

    parser.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="sync-worker",
        description="Background tasks for synchronous Python (Prefect 3 task-run protocol).",
        epilog="exit codes: 0 done (a worker: stopped with every run finished), 1 a failure at run time (e.g. "
               "refused credentials; a worker: runs abandoned at the drain timeout), 2 a mistake in an option or a "
               "SYNC_WORKER_* setting (one line naming it), 130 interrupted (a worker: a second Ctrl-C)",
    )
    from sync_worker import __version__

    parser.add_argument("--version", action="version", version=f"sync-worker {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command")
    _add_demo_parser(subparsers)
    _add_server_parser(subparsers)
    _add_worker_parser(subparsers)
    from sync_worker.runs_cli import add_runs_parser, add_status_parser, add_storage_parser  # operating the queue

    add_runs_parser(subparsers)
    add_status_parser(subparsers)
    add_storage_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from sync_worker.durations import attach_signed_values

    parser = build_parser()
    argv = attach_signed_values(list(sys.argv[1:] if argv is None else argv),
                                ("--since", "--older-than", "--retention"))
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    configure_logging(getattr(args, "log_level", "INFO"), getattr(args, "log_format", "text"))
    # the innermost command run (``sync-worker runs ls``) names its error lines, as argparse's do
    return run_command(args.func, args, getattr(args, COMMAND_PROG, None) or f"{parser.prog} {args.command}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
