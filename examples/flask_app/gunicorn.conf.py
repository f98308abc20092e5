"""gunicorn settings that run a sync_worker TaskWorker inside every gunicorn worker.

The worker is created and started in ``post_fork``, i.e. in the gunicorn worker process
after it was forked: threads do not survive a fork, so a TaskWorker started in the
master (for example at import time with ``--preload``) would not run in the workers
(sync_worker logs a WARNING if that happens). ``start(block=False)`` returns at once and
installs no signal handler: gunicorn keeps its own. ``worker_exit`` stops taking runs and
lets in-flight runs finish (at most SYNC_WORKER_DRAIN_TIMEOUT seconds).

The drain must end before gunicorn kills the process: the master kills a worker
``graceful_timeout`` seconds after a shutdown or reload, and ``timeout`` seconds after its
last heartbeat on a recycle (``max_requests``): a worker in ``worker_exit`` sends none. A
run killed that way is run again once its lease expires, with no line in the log. So the
drain timeout defaults here to 5 s less than both (half of them when they are under 10 s),
from gunicorn's settings as given, in this file, on the command line or in
GUNICORN_CMD_ARGS; a drain timeout you set yourself is kept, and warned about if it is not
below them.

Needs gunicorn and Flask: ``python3 -m pip install '.[examples]'`` from the repository root.
"""
from __future__ import annotations

import os

bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("GUNICORN_WORKERS", "2"))
threads = int(os.environ.get("GUNICORN_THREADS", "4"))
worker_class = "gthread"
timeout = 30
graceful_timeout = 30

_task_worker = None


def post_fork(server, worker):
    global _task_worker
    from jobs import ALL_TASKS

    from sync_worker import TaskWorker

    # gunicorn kills a draining worker after min(timeout, graceful_timeout) (see above): the
    # drain ends before that, unless SYNC_WORKER_DRAIN_TIMEOUT is set (then it is warned about)
    kill_after = min(server.cfg.timeout, server.cfg.graceful_timeout)
    if "SYNC_WORKER_DRAIN_TIMEOUT" not in os.environ:  # (this process only: set after the fork)
        os.environ["SYNC_WORKER_DRAIN_TIMEOUT"] = str(max(0.0, kill_after - min(5.0, kill_after / 2)))
    _task_worker = TaskWorker(*ALL_TASKS, limit=int(os.environ.get("TASK_WORKER_LIMIT", "4")))
    _task_worker.start(block=False)
    server.log.info("TaskWorker %s started in gunicorn worker %s (drain timeout %gs)", _task_worker.client_id,
                    worker.pid, _task_worker.settings.drain_timeout)
    if _task_worker.settings.drain_timeout >= kill_after:
        server.log.warning("SYNC_WORKER_DRAIN_TIMEOUT (%gs) is not below gunicorn's timeout/graceful_timeout "
                           "(%ss): gunicorn may kill a draining worker, and its runs run again after their lease",
                           _task_worker.settings.drain_timeout, kill_after)


def worker_exit(server, worker):
    if _task_worker is not None and _task_worker.started:
        _task_worker.stop()
        # at most the drain timeout; runs still going then are logged by id (they run again
        # after their lease)
        try:
            _task_worker.join(_task_worker.settings.drain_timeout)
        except BaseException:  # a second Ctrl-C: gunicorn's quick exit breaks into the drain
            left = [run for runs in _task_worker.in_flight_task_runs.values() for run in runs]
            server.log.warning("Drain interrupted: abandoning %d run(s)%s; the server gives them to a worker "
                               "again once their lease expires", len(left), f": {', '.join(left)}" if left else "")
            raise
