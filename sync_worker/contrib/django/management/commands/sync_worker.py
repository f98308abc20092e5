"""``python manage.py sync_worker [--limit N] [--queue Q ...] [--backend ALIAS]``."""
from __future__ import annotations

import logging
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from sync_worker.cli_support import LOG_FORMAT, one_line, port, positive_float, worker_limit


class Command(BaseCommand):
    help = (
        "Run a sync_worker task worker for this project's Django tasks (TASKS backend "
        "sync_worker.contrib.django.SyncWorkerBackend). SIGTERM or Ctrl-C stops taking runs and "
        "lets in-flight runs finish."
    )
    requires_system_checks: Any = []

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--limit", type=worker_limit, default=10, metavar="N",
                            help="most runs executing at once: a whole number >= 1 (default 10), or 'none' for no limit")
        parser.add_argument("--queue", action="append", dest="queues", metavar="QUEUE",
                            help="serve this queue (repeatable; default: every queue of the backend's QUEUES)")
        parser.add_argument("--backend", default="default", metavar="ALIAS",
                            help="the TASKS alias to serve (default 'default')")
        parser.add_argument("--module", action="append", dest="modules", default=[], metavar="MODULE",
                            help="also import this module to find tasks (repeatable)")
        parser.add_argument("--status-port", type=port, default=None, metavar="PORT",
                            help="serve GET /status (JSON) on 127.0.0.1:PORT")
        parser.add_argument("--timeout", type=positive_float, default=None, metavar="SECONDS",
                            help="stop after this many seconds (default: run until stopped)")
        parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    def handle(self, *args: Any, **options: Any) -> None:
        from sync_worker.contrib.django.worker import run_django_worker
        from sync_worker.exceptions import ConfigurationError, SyncWorkerError

        if not logging.getLogger().handlers and not logging.getLogger("sync_worker").handlers:
            logging.basicConfig(format=LOG_FORMAT)  # unless the project's LOGGING already did
        logging.getLogger("sync_worker").setLevel(options["log_level"])
        try:
            status = run_django_worker(backend_alias=options["backend"], queues=options["queues"],
                                       limit=options["limit"], timeout=options["timeout"],
                                       modules=options["modules"], status_port=options["status_port"])
        except ConfigurationError as exc:  # a setup mistake: one line naming it, exit 2 (as sync-worker does)
            raise CommandError(" ".join(str(exc).split()), returncode=2) from None
        except SyncWorkerError as exc:  # what ended the worker (refused credentials): one line, exit 1
            raise CommandError(one_line(exc), returncode=1) from None
        if status:
            raise CommandError(f"sync_worker worker exited with status {status}", returncode=status)
