"""The benchmark's tasks for every system measured by ``benchmarks/compare.py``.

One module serves all five systems; the environment says which library to import (only that
one is imported, so a missing peer library does not break the others):

- ``COMPARE_SYSTEM``: ``sync_worker`` | ``dramatiq`` | ``celery`` | ``rq`` | ``huey``
- ``COMPARE_REDIS_URL``: the trial's private Redis (Redis-based peers)
- ``COMPARE_HUEY_DB``: the SQLite file of SqliteHuey
- ``COMPARE_DONE_FILE``: every finished task appends one fixed-size line to this file

The body is the same for every system: ``noop`` appends ``"%17.6f\\n" % time.time()`` (18 bytes)
to the done file with one ``O_APPEND`` write and returns None; ``sleep10`` sleeps 10 ms first.
Neither takes a parameter; ``noop_p(x)`` is the no-op with one.
The driver counts finished runs with ``os.stat`` (size // 18) and takes the last line's time as
the end of a drain, without asking the system under test anything (no polling of its API, which
would cost the measured processes CPU).
"""
from __future__ import annotations

import os
import time

SYSTEM = os.environ.get("COMPARE_SYSTEM", "sync_worker")
REDIS_URL = os.environ.get("COMPARE_REDIS_URL", "redis://127.0.0.1:6379/0")
HUEY_DB = os.environ.get("COMPARE_HUEY_DB", "compare-huey.db")
DONE_FILE = os.environ.get("COMPARE_DONE_FILE", "")
QUEUE = "compare"
RECORD_SIZE = 18

_fd: int | None = None
_fd_pid = 0


def _done() -> None:
    """One atomic append per finished task (opened once per process; again after a fork)."""
    global _fd, _fd_pid
    if not DONE_FILE:
        return
    if _fd is None or _fd_pid != os.getpid():
        _fd = os.open(DONE_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        _fd_pid = os.getpid()
    os.write(_fd, b"%17.6f\n" % time.time())


def _noop() -> None:
    _done()


def _noop_p(x: int) -> None:
    """The no-op with one argument (compare.py's ``params`` case)."""
    _done()


def _sleep10() -> None:
    time.sleep(0.01)
    _done()


def _sleep_for(seconds: float) -> None:
    """compare.py's warm-up of several sync_worker workers only: a parameter, unlike the
    measured tasks (a sync_worker run with parameters also writes and reads a record file,
    Prefect's layout; the peers pass arguments inside the message)."""
    time.sleep(seconds)
    _done()


if SYSTEM == "sync_worker":
    from sync_worker import task

    noop = task(task_key="compare.noop")(_noop)
    noop_p = task(task_key="compare.noop_p")(_noop_p)
    sleep10 = task(task_key="compare.sleep10")(_sleep10)
    sleep_for = task(task_key="compare.sleep_for")(_sleep_for)
    noop_r = noop

elif SYSTEM == "dramatiq":
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker
    from dramatiq.results import Results
    from dramatiq.results.backends import RedisBackend

    broker = RedisBroker(url=REDIS_URL)
    broker.add_middleware(Results(backend=RedisBackend(url=REDIS_URL)))
    dramatiq.set_broker(broker)
    noop = dramatiq.actor(_noop, actor_name="noop", queue_name=QUEUE, max_retries=0)
    noop_p = dramatiq.actor(_noop_p, actor_name="noop_p", queue_name=QUEUE, max_retries=0)
    sleep10 = dramatiq.actor(_sleep10, actor_name="sleep10", queue_name=QUEUE, max_retries=0)
    # waited mode: the same body, its result stored (Dramatiq stores none unless asked)
    noop_r = dramatiq.actor(_noop, actor_name="noop_r", queue_name=QUEUE, max_retries=0, store_results=True)

elif SYSTEM == "celery":
    from celery import Celery

    app = Celery("compare_tasks", broker=REDIS_URL, backend=REDIS_URL)
    app.conf.update(task_default_queue=QUEUE, broker_connection_retry_on_startup=True,
                    worker_hijack_root_logger=False)
    noop = app.task(name="compare.noop", ignore_result=True)(_noop)
    noop_p = app.task(name="compare.noop_p", ignore_result=True)(_noop_p)
    sleep10 = app.task(name="compare.sleep10", ignore_result=True)(_sleep10)
    noop_r = app.task(name="compare.noop_r", ignore_result=False)(_noop)

elif SYSTEM == "huey":
    from huey import SqliteHuey

    # store_none: a waiting caller needs a result even for a function returning None
    huey = SqliteHuey("compare", filename=HUEY_DB, store_none=True)
    noop = huey.task(name="noop")(_noop)
    noop_p = huey.task(name="noop_p")(_noop_p)
    sleep10 = huey.task(name="sleep10")(_sleep10)
    noop_r = noop

else:  # rq resolves plain functions by dotted path
    noop = _noop
    noop_p = _noop_p
    sleep10 = _sleep10
    noop_r = _noop
