"""The in-process worker: runs in the web process itself, for single-process deployments.

Opt in with ``SYNC_WORKER_IN_PROCESS = True`` (or a dict of :func:`start_in_process_worker`
keywords, e.g. ``{"limit": 4, "queues": ["default"]}``). ``AppConfig.ready()`` runs in
every process that sets Django up, and in most of them a worker would be wrong:

- ``manage.py migrate``, ``shell``, ``test``, ``sync_worker``...: no worker (the last one is
  the worker);
- ``manage.py runserver`` with the autoreloader runs two processes: the parent only
  watches files and restarts the child; the worker starts in the child (``RUN_MAIN=true``)
  and is started again with it after each reload;
- gunicorn/uwsgi: ``ready()`` may run in the master before it forks (``--preload``); a
  worker's threads do not survive ``fork()``, so the worker is started lazily, on the first
  request each serving process handles (``request_started``), never in the master.

Each serving process runs its own worker (4 gunicorn workers = 4 task workers, each with
``limit`` slots). A process that is killed takes its in-flight runs with it; the
embedded server delivers them again when the lease runs out. For anything bigger than
one process, run ``manage.py sync_worker`` as its own service instead.
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from typing import Any

logger = logging.getLogger("sync_worker.contrib.django")

_lock = threading.Lock()
_worker: Any = None
_worker_pid: int | None = None
_options: dict[str, Any] = {}


def _command() -> str | None:
    """The manage.py subcommand this process runs, or None (a WSGI server, a script)."""
    argv = sys.argv
    if argv and os.path.basename(argv[0]) in ("manage.py", "django-admin", "django-admin.py") and len(argv) > 1:
        return argv[1]
    if len(argv) > 2 and argv[0].endswith("django") and argv[1:2] == ["-m"]:  # pragma: no cover
        return argv[2]
    return None


def install(options: Any) -> None:
    """Called from ``AppConfig.ready()``: decide whether this process gets a worker."""
    global _options
    _options = dict(options) if isinstance(options, dict) else {}
    command = _command()
    if command is not None and command != "runserver":
        return
    if command == "runserver":
        if "--noreload" not in sys.argv and os.environ.get("RUN_MAIN") != "true":
            return  # the autoreloader's parent: it serves nothing
        start_in_process_worker(**_options)
        return
    from django.core.signals import request_started

    request_started.connect(_start_on_request, dispatch_uid="sync_worker_in_process")


def _start_on_request(**_kwargs: Any) -> None:
    if _worker is None or _worker_pid != os.getpid():
        start_in_process_worker(**_options)


def start_in_process_worker(backend: str = "default", queues: list[str] | None = None,
                            limit: int | None = 4) -> Any:
    """Start (once per process) a non-blocking worker for the project's tasks; returns it."""
    global _worker, _worker_pid
    with _lock:
        if _worker is not None and _worker_pid == os.getpid() and _worker.started:
            return _worker
        from sync_worker.contrib.django.worker import build_worker

        worker = build_worker(backend, queues, limit)
        worker.start(block=False)
        _worker, _worker_pid = worker, os.getpid()
        atexit.register(_stop, worker)
        logger.info("In-process task worker started in process %s", _worker_pid)
        return worker


def _stop(worker: Any) -> None:
    if worker.started:
        worker.stop()
    worker.join(worker.settings.drain_timeout)
