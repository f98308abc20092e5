"""gunicorn settings that run a sync_worker TaskWorker inside every gunicorn worker.

The worker is created and started in ``post_fork``, i.e. in the gunicorn worker process
after it was forked: threads do not survive a fork, so a TaskWorker started in the
master (for example at import time with ``--preload``) would not run in the workers
(sync_worker logs a WARNING if that happens). ``start(block=False)`` returns at once and
installs no signal handler: gunicorn keeps its own. ``worker_exit`` stops taking runs and
lets in-flight runs finish (at most SYNC_WORKER_DRAIN_TIMEOUT seconds).

Needs gunicorn and Flask: ``python3 -m pip install '.[examples]'`` from the repository root.
"""
from __future__ import annotations

import os

bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("GUNICORN_WORKERS", "2"))
threads = int(os.environ.get("GUNICORN_THREADS", "4"))
worker_class = "gthread"
timeout = 30

_task_worker = None


def post_fork(server, worker):
    global _task_worker
    from jobs import ALL_TASKS

    from sync_worker import TaskWorker

    _task_worker = TaskWorker(*ALL_TASKS, limit=int(os.environ.get("TASK_WORKER_LIMIT", "4")))
    _task_worker.start(block=False)
    server.log.info("TaskWorker %s started in gunicorn worker %s", _task_worker.client_id, worker.pid)


def worker_exit(server, worker):
    if _task_worker is not None and _task_worker.started:
        _task_worker.stop()
        _task_worker.join(float(os.environ.get("SYNC_WORKER_DRAIN_TIMEOUT", "30")))
