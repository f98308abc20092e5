"""The task worker: receives background runs of its tasks and executes them in threads.

``TaskWorker`` and ``serve`` mirror ``prefect.task_worker`` (names, parameters, defaults,
the ``/status`` JSON), without asyncio. Per worker:

- a **service thread** iterates the websocket subscription (which reconnects by itself,
  see :mod:`sync_worker.subscription`), and for each delivered run *reserves a free slot
  first, then acks*.
  Reserving before the ack is the backpressure. On the embedded server the worker
  subscribes with the ``credit`` extension (one credit per free slot), so a full worker
  holds no run it cannot start; under Prefect's one-run-per-ack protocol a full worker
  holds the next run, unacknowledged, until a slot frees. The open connection is the
  lease of the runs in flight on the embedded server: it stays open until they are done.
- an **executor** of daemon threads runs each run through the engine
  (:mod:`sync_worker.engine`); :class:`Slots` is the one count of what executes (at most
  ``limit`` runs at once). Up to ``2 * limit`` threads, made when needed: a thread whose run
  gave its slot back may still be reporting that run's final state.

On a server that offers ``claim_at_delivery`` (the embedded server) the runs arrive already
RUNNING and leased, and the subscription's reader thread hands each one straight to the
executor when a slot is free (:meth:`TaskWorker._start_delivered`): no ack, no RUNNING
proposal, no service-thread hop; the freed slot's credit travels with the run's final state.
The service thread then only handles the rare run that finds no free slot (it waits for one,
as above), and stopping.

Two ways to run it::

    serve(add, send_email, limit=10)         # blocks: a worker process
    TaskWorker(add).start()                  # same, without the status server

    worker = TaskWorker(add).start(block=False)   # in a WSGI app: returns at once,
    ...                                           # the worker runs in its own threads
    worker.stop(); worker.join(30)

    with TaskWorker(add) as worker:          # non-blocking start, stop + drain on exit
        ...

Stopping (``stop()``, SIGTERM, ``timeout``, Ctrl-C) stops taking runs at once: no more
credit is granted, runs delivered but not started are handed back (the embedded server's
``release`` message; closing the socket on a Prefect server), and in-flight runs finish,
their states reported, within ``SYNC_WORKER_DRAIN_TIMEOUT`` on every path. "stopped" is
logged after the drain. ``stop()`` never waits, so it is safe from any thread, from a
signal handler and from inside a task; ``join()`` waits for the drain.

Forking: a worker's threads do not survive ``os.fork()``. A worker started in a parent
(e.g. at import time under ``gunicorn --preload``) is marked stopped in the child, with a
WARNING. Start workers *after* the fork: in gunicorn's ``post_fork`` hook (see
``examples/flask_app/gunicorn.conf.py``) or lazily on first use in the app.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import importlib
import json
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Callable, NoReturn

from sync_worker import metrics
from sync_worker.dialects import Dialect, choose_dialect
from sync_worker.engine import REPORT_MAX_BACKOFF, Outcome, run_task_run, should_try_to_read_parameters
from sync_worker.exceptions import ConfigurationError
from sync_worker.prefect_reporting import PrefectReporting
from sync_worker.services import start_client_metrics_server
from sync_worker.settings import Settings, get_settings
from sync_worker.tasks import Task
from sync_worker.transport import Transport

if TYPE_CHECKING:
    import http.server

    from sync_worker.client import Client
    from sync_worker.schemas import TaskRun
    from sync_worker.storage import RecordStore
    from sync_worker.subscription import Subscription

logger = logging.getLogger("sync_worker.worker")

__all__ = [
    "StopTaskWorker",
    "TaskWorker",
    "create_status_server",
    "run_worker_command",
    "serve",
    "should_try_to_read_parameters",
]

#: Runs a worker without a limit lets the server send ahead (the credit extension).
UNLIMITED_CREDIT = 100

#: How often a service thread waiting for a free slot checks whether it should stop.
_SLOT_POLL_SECONDS = 0.1
#: How soon a blocking start() in the main thread acts on a SIGTERM its handler noted, and
#: how often a drain run by the handler itself looks whether the worker has finished.
_SIGNAL_POLL_SECONDS = 0.25
#: a stop that has no run left to wait for may take this long to close the worker's
#: connection and threads, whatever ``SYNC_WORKER_DRAIN_TIMEOUT`` says (0 included)
_STOP_GRACE_SECONDS = 5.0
#: past the drain deadline, how long the stop waits for run threads before it abandons
#: them: one report backoff, after which a thread that is only claiming or reporting its
#: run has seen the deadline and given up (a run's function is not waited for)
_ABANDON_GRACE_SECONDS = REPORT_MAX_BACKOFF + 1.0

#: A task whose recent runs took at least this long (the function alone, a moving average)
#: is "long": after handing one of its runs to a run thread with more runs of the same
#: message to hand out, the subscription's reader yields the GIL (see
#: :meth:`TaskWorker._yields_after`).
_LONG_RUN_SECONDS = 0.001


class StopTaskWorker(Exception):
    """Raised when the task worker is stopped.

    It is raised inside the worker's service thread, after :meth:`TaskWorker.stop`, to
    unwind the service loop (``critical_service_loop`` lets it through too: it is not an
    intermittent error). User code does not need to catch it: ``stop()`` itself never
    raises it in the caller, so calling ``stop()`` from a task or a view is safe.
    """


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


_workers: weakref.WeakSet[TaskWorker] = weakref.WeakSet()


#: Seconds a fork waits, in all, for log records being written by other threads (see below).
_FORK_WAITS_FOR_LOGGING = 2.0
_held_for_fork: list[Any] = []


def _logging_locks() -> list[Any]:
    """The locks of every handler of the root logger and of the named loggers."""
    loggers = [logging.getLogger()] + [logger for logger in list(logging.Logger.manager.loggerDict.values())
                                       if isinstance(logger, logging.Logger)]
    handlers = {id(h): h for logger in loggers for h in list(logger.handlers)}
    return [h.lock for h in handlers.values() if getattr(h, "lock", None) is not None]


def _before_fork() -> None:
    """While a worker runs here, a fork waits until no log record is being written.

    A thread of ours writing a record to stderr holds the stream's buffer lock during the
    write; forked at that moment, the child inherits that lock held by a thread it does not
    have, and its first write to stderr (our "started before it forked" warning, or any log
    line of the app) hangs forever (seen once in CI: the fork test's child never exited).
    logging re-creates its handlers' locks in the child, not the stream's: holding every
    handler's lock across the fork (a record is written under it) keeps the stream free.
    Bounded: a handler still busy after :data:`_FORK_WAITS_FOR_LOGGING` s is not waited for."""
    if not any(worker.started for worker in list(_workers)):
        return
    deadline = time.monotonic() + _FORK_WAITS_FOR_LOGGING
    for lock in _logging_locks():
        if lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            _held_for_fork.append(lock)


def _after_fork_in_parent() -> None:
    while _held_for_fork:
        _held_for_fork.pop().release()


def _after_fork_in_child() -> None:
    _held_for_fork.clear()  # logging gave the child new handler locks: these are the parent's
    for worker in list(_workers):
        worker._forget_after_fork()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


class SlotError(RuntimeError):
    """A slot was released that was not held (a bug: the limit would be exceeded)."""


class Slots:
    """Execution slots: the one source of truth for how many runs may execute at once.

    ``limit`` slots (no limit: ``None``), each tied to the id of the run that holds it, with
    the ``free_slots`` gauge updated under the same lock. A run holds at most one slot and
    releasing a slot twice (or one never taken) is refused instead of silently raising the
    limit: ``release`` returns False then.

    One lock and a count, not a ``BoundedSemaphore``: that one is pure Python (a
    ``Condition`` and its lock per call) and every run took and gave back a permit besides
    this lock, ~5 us of the worker's CPU per run. Only :meth:`acquire` (which may wait)
    waits on the condition; :meth:`release` notifies it only when someone waits.
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        self._waiting = 0  # threads in acquire() waiting for a slot
        self._held: dict[str, _dt.datetime] = {}
        self._counted = False  # whether our free slots are in the gauge now

    def count_in_gauge(self, on: bool) -> None:
        """Add (worker started) or remove (worker done) our free slots to/from the gauge."""
        if self.limit is None:
            return
        with self._lock:
            if on == self._counted:
                return
            self._counted = on
            free = self.limit - len(self._held)
            metrics.FREE_SLOTS.inc(free if on else -free)

    def acquire(self, run_id: str, should_stop: Callable[[], bool] | None = None,
                timeout: float | None = None) -> bool:
        """Take a slot for ``run_id``, waiting for one; False if ``should_stop()`` turns true
        (polled every :data:`_SLOT_POLL_SECONDS`) or ``timeout`` passes first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        limit = self.limit
        while True:
            with self._lock:
                if limit is None or len(self._held) < limit:
                    return self._hold(run_id)
                self._waiting += 1
                try:
                    self._freed.wait(_SLOT_POLL_SECONDS if deadline is None
                                     else max(0.0, min(_SLOT_POLL_SECONDS, deadline - time.monotonic())))
                finally:
                    self._waiting -= 1
                if len(self._held) < limit:
                    return self._hold(run_id)
            # still full: stop or time out now? (asked without the lock held)
            if (should_stop is not None and should_stop()) or (
                    deadline is not None and time.monotonic() >= deadline):
                return False

    def try_acquire(self, run_id: str) -> bool:
        """Take a slot for ``run_id`` if one is free now, without waiting (the subscription's
        reader thread, which must never block: it carries the answers that free slots)."""
        with self._lock:
            if self.limit is not None and len(self._held) >= self.limit:
                return False
            return self._hold(run_id)

    def _hold(self, run_id: str) -> bool:
        """Tie a free slot to ``run_id`` (refused if that run holds one already). Under the lock."""
        held = self._held
        if run_id in held:
            raise SlotError(f"task run {run_id} already holds a slot")
        held[run_id] = _now()
        if self._counted and self.limit is not None:
            metrics.FREE_SLOTS.dec()
        return True

    def release(self, run_id: str) -> bool:
        """Give ``run_id``'s slot back; False (and nothing changes) if it held none."""
        with self._lock:
            if self._held.pop(run_id, None) is None:
                return False
            if self._counted and self.limit is not None:
                metrics.FREE_SLOTS.inc()
            if self._waiting:
                self._freed.notify()
        return True

    def held_ids(self) -> set[str]:
        """The runs holding a slot: from before their claim until their function returned."""
        with self._lock:
            return set(self._held)

    @property
    def held(self) -> int:
        with self._lock:
            return len(self._held)

    @property
    def free(self) -> int | None:
        if self.limit is None:
            return None
        with self._lock:
            return self.limit - len(self._held)


class _RunThreads:
    """The executor: at most ``size`` daemon threads running submitted calls in order.

    Not ``ThreadPoolExecutor``: its threads are joined when the interpreter exits, so a
    task that never returns would keep a stopped worker's process alive past the drain
    timeout (Ctrl-C would wait for it however long it takes). Daemon threads let the drain
    timeout be the last word; runs abandoned that way are re-delivered by the server.

    Calls travel through a ``queue.SimpleQueue`` (its put/get are C code, no ``Condition``
    per hand-off); the lock only counts idle threads, to start one when none is idle.
    """

    def __init__(self, size: int | None, name: str) -> None:
        self._size = size
        self._name = name
        self._lock = threading.Lock()
        self._calls: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0  # threads waiting for a call that no submitted call is promised to yet
        self._shutdown = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit after shutdown")
            if self._idle > 0:
                self._idle -= 1  # that thread takes this call
            elif self._size is None or len(self._threads) < self._size:
                thread = threading.Thread(target=self._loop, name=f"{self._name}_{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()
            # else: every thread is busy; the first one free takes it
            self._calls.put((fn, args))

    def _loop(self) -> None:
        while True:
            call = self._calls.get()
            if call is None:  # shutdown: the calls queued before it are done
                return
            fn, args = call
            try:
                fn(*args)
            except BaseException:  # noqa: BLE001 - the call reports its own errors
                logger.exception("Unexpected error in a run thread")
            finally:
                del call, fn, args
            with self._lock:
                self._idle += 1

    def shutdown(self, wait: bool = True, timeout: float | None = None) -> bool:
        """No more submissions; with ``wait``, until queued calls are done (True) or
        ``timeout`` passes (False)."""
        with self._lock:
            if not self._shutdown:
                self._shutdown = True
                for _ in self._threads:
                    self._calls.put(None)  # after every queued call: FIFO
            threads = list(self._threads)
        if not wait:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in threads:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            thread.join(remaining)
            if thread.is_alive():
                return False
        return True


class TaskWorker:
    """Serves tasks: runs their background runs as the server delivers them.

    Args:
        tasks: the :class:`~sync_worker.tasks.Task` objects to serve (other objects are
            skipped with a warning).
        limit: the most runs executing at once; ``None`` for no limit. Defaults to 10.
        client: the REST client (default: one built from the settings).
    """

    def __init__(
        self,
        *tasks: Task[..., Any],
        limit: int | None = 10,
        client: Client | None = None,
    ):
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise TypeError(f"limit must be an int >= 1, or None for no limit (got {limit!r})")
        if limit is not None and limit < 1:
            raise ValueError("limit must be >= 1, or None for no limit")
        self.tasks: list[Task[..., Any]] = []
        #: a key's run is executed by the first task given with that key, as Prefect's
        #: worker does (``TaskWorker(t, t.with_options(retries=3))`` runs ``t``)
        self._tasks_by_key: dict[str, Task[..., Any]] = {}
        for t in tasks:
            if not isinstance(t, Task):
                logger.warning("Skipping %r: not a task (decorate the function with @task)", t)
                continue
            self.tasks.append(t)
            first = self._tasks_by_key.setdefault(t.task_key, t)
            if first is not t:
                logger.warning("Two tasks have the key %r; its runs execute %s, the first given",
                               t.task_key, getattr(first.fn, "__qualname__", first.fn))
        self.task_keys: set[str] = set(self._tasks_by_key)
        #: per task key, a moving average of the seconds its function took (:meth:`_ran`)
        #: (written by the run threads, read by the reader: a float per key, no lock needed)
        self._run_seconds: dict[str, float] = {}
        self._limit = limit
        self._client_arg = client

        self._started_at: _dt.datetime | None = None
        self.stopping = False

        self._lock = threading.RLock()
        self._runs_done = threading.Condition(self._lock)  # notified when a run leaves in_flight
        self._slots = Slots(limit)
        self.in_flight_task_runs: dict[str, dict[str, _dt.datetime]] = {k: {} for k in self.task_keys}
        self.finished_task_runs: dict[str, int] = {k: 0 for k in self.task_keys}

        self._settings: Settings | None = None
        self._client: Client | None = None
        self._store: RecordStore | None = None
        self._executor: _RunThreads | None = None
        self._subscription: Subscription | None = None
        self._service_thread: threading.Thread | None = None
        self._stop_event = threading.Event()
        self._done = threading.Event()
        self._done.set()
        #: the runs the last stop abandoned at the drain timeout (the worker commands exit 1)
        self._abandoned_at_drain: list[str] = []
        self._join_warned = False  # join() said, once per stop, what it left behind (see join)
        #: runs executed here whose final state the server had not taken by the drain deadline
        self._unconfirmed: list[str] = []
        #: set just before ``_done``: ``_done.set()`` takes the Event's lock, which the main
        #: thread a SIGTERM handler interrupted may hold; this flag needs none (see
        #: :meth:`_drain_polling`)
        self._finished = True
        #: a blocking start() waits in the main thread: the SIGTERM handler only notes the signal
        self._main_waiting = False
        self._sigterm_noted = False
        self._error: BaseException | None = None
        self._start_raises_errors = False  # a blocking start() waits: it raises what ends the service
        #: Prefect-only machinery (final-state events, retry timers), used by the Prefect
        #: dialect of this worker's connections; started and stopped with the worker.
        self._prefect = PrefectReporting()
        self._transport: Transport | None = None
        self._pid = os.getpid()
        _workers.add(self)

    # -- Prefect's read-only view ----------------------------------------------------
    @property
    def client_id(self) -> str:
        """``host-pid``, computed on each call so a forked child reports its own pid."""
        return f"{socket.gethostname()}-{os.getpid()}"

    @property
    def started_at(self) -> _dt.datetime | None:
        return self._started_at

    @property
    def started(self) -> bool:
        return self._started_at is not None

    @property
    def limit(self) -> int | None:
        return self._limit

    @property
    def current_tasks(self) -> int | None:
        """Runs holding a slot (with a limit) or in flight (without one)."""
        return self._slots.held

    @property
    def available_tasks(self) -> int | None:
        return self._slots.free

    @property
    def error(self) -> BaseException | None:
        """The error that ended the service (e.g. refused credentials), if one did."""
        return self._error

    @property
    def settings(self) -> Settings:
        return self._settings or get_settings()

    # -- lifecycle ---------------------------------------------------------------------
    def start(self, timeout: float | None = None, *, block: bool = True) -> TaskWorker:
        """Start serving.

        Blocking (default): returns when the worker is stopped (``stop()``, SIGTERM,
        Ctrl-C) or after ``timeout`` seconds (logged; not an error), once in-flight runs
        have finished. Called from the main thread it installs a SIGTERM handler
        (:meth:`handle_sigterm`) for the duration.

        ``block=False``: returns the worker at once, running in its own threads (for WSGI
        apps and scripts that go on doing other things); no signal handler is installed
        (the host, e.g. gunicorn, owns signals). Stop it with :meth:`stop` and
        :meth:`join`, or use the worker as a context manager.

        Raises the error that ended the service (e.g. refused credentials) in blocking
        mode; in non-blocking mode it is logged and kept in :attr:`error`.

        Ctrl-C stops the worker as :meth:`stop` does and waits for the drain, at most
        ``SYNC_WORKER_DRAIN_TIMEOUT`` seconds; then ``start`` returns. If runs are still
        going at the drain timeout they are abandoned (their threads are daemons; the
        server re-delivers the runs) and ``KeyboardInterrupt`` propagates, as it does on a
        second Ctrl-C during the drain: a cold stop that hands back the runs not started
        (the ``sync-worker worker`` command exits 1 in the first case, 130 in the second:
        see :func:`run_until_stopped`).
        """
        if not block:
            self._start_raises_errors = False
            self._begin()
            return self
        self._start_raises_errors = True
        previous = None
        in_main = threading.current_thread() is threading.main_thread()
        if in_main:
            # before the service starts: a SIGTERM as soon as it connects (a supervisor's
            # quick restart) found the default action and killed the process, no drain
            self._sigterm_noted = False
            self._main_waiting = True
            previous = signal.signal(signal.SIGTERM, self.handle_sigterm)
        try:
            presses = 0
            if in_main:
                presses = self._begin_holding_ctrl_c()
            else:
                self._begin()
            try:
                if presses:  # Ctrl-C while it began: handled as any other below
                    if presses > 1:
                        self.stop()  # the second press of the two: a cold stop
                    raise KeyboardInterrupt
                if not (self._wait_in_main(timeout) if in_main else self._done.wait(timeout)):
                    logger.info("Task worker timed out after %s seconds. Exiting...", timeout)
                    self.stop()
                    self._drain()
            except KeyboardInterrupt:
                # a drain was under way (SIGTERM, stop(), timeout), or a SIGTERM noted and about
                # to start one: as a second Ctrl-C
                if self.stopping or self._sigterm_noted:
                    self._cold_stop()
                    raise
                try:
                    logger.info("Task worker interrupted, stopping (press Ctrl-C again to stop at once)...")
                    self.stop()
                    drained = self._drain()
                except KeyboardInterrupt:
                    self._cold_stop()
                    raise
                if not drained:
                    raise  # runs abandoned at the drain timeout: interrupted, not a clean stop
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
                self._main_waiting = False
        if self._error is not None:
            raise self._error
        return self

    def _wait_in_main(self, timeout: float | None) -> bool:
        """start()'s wait in the main thread: True once the worker is done, False after
        ``timeout``; a SIGTERM noted by :meth:`handle_sigterm` meanwhile is acted on here
        (stop, drain, exit), outside the handler."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            step = _SIGNAL_POLL_SECONDS if deadline is None else \
                min(_SIGNAL_POLL_SECONDS, max(0.0, deadline - time.monotonic()))
            if self._done.wait(step):
                return True
            if self._sigterm_noted:
                logger.info("SIGTERM received, initiating graceful shutdown...")
                self._exit_after_drain(self._drain)
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def _begin_holding_ctrl_c(self) -> int:
        """:meth:`_begin` with a Ctrl-C held back until it returns; how many came. Its
        last step starts the service thread, which may connect before ``Thread.start()``
        returns: a Ctrl-C then escaped ``start()``'s handling (the command exited 130 with
        no word, the worker half started). A SIGINT handler other than Python's default
        (the host's own, or SIG_IGN in a background job) is left as it is."""
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            self._begin()
            return 0
        pressed: list[int] = []
        signal.signal(signal.SIGINT, lambda signum, _frame: pressed.append(signum))
        try:
            self._begin()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        return len(pressed)

    def _begin(self) -> None:
        with self._lock:
            if self.started or not self._done.is_set():
                raise RuntimeError("This task worker is already running; stop() and join() it before starting again")
            if not self.task_keys:
                raise ValueError("TaskWorker needs at least one task to serve")
            self._settings = get_settings()
            self._ensure_resources()
            from sync_worker.subscription import Subscription

            self._subscription = Subscription(
                self.task_keys, self.client_id, client=self._client,
                credit=self._free_slots,
                stop_event=self._stop_event,
                dialect_for=self._dialect_for,
                on_run=self._start_delivered,
                claim_at_delivery=self._claims_at_delivery,
                holding=self._held_run_ids,
                yields_after=self._yields_after_run,
                limit=self.limit,
            )
            self._transport = Transport(self._client, self._subscription)
            self._prefect.start()
            # Twice as many threads as slots (made only when needed): a run thread keeps
            # reporting its run's final state after the run gave its slot back (the credit
            # for the next run rides on that report), so a run delivered for that slot
            # must not wait for the thread (a busy worker holds no run it cannot start).
            self._executor = _RunThreads(None if self._limit is None else 2 * self._limit, "sync-worker-run")
            self._stop_event.clear()
            self._drain_deadline = None
            self._abandoned_at_drain = []
            self._join_warned = False
            self._unconfirmed = []
            self._finished = False
            self._done.clear()
            self._error = None
            self.stopping = False
            self._started_at = _now()
            self._ever_started = True
            self._slots.count_in_gauge(True)
            self._pid = os.getpid()
            try:
                start_client_metrics_server()
            except OSError as exc:
                logger.warning("Client metrics server not started: %s", exc)
            keys = " | ".join(sorted(self.task_keys))
            logger.info("Starting task worker %s (limit %s, server %s) for task(s): %s", self.client_id,
                        self._limit or "none", getattr(self._client, "api_url", "?"), keys)
            self._service_thread = threading.Thread(target=self._service, name="sync-worker-service", daemon=True)
            self._service_thread.start()

    _ever_started = False

    def _ensure_resources(self) -> None:
        if self._client is None:
            if self._client_arg is not None:
                self._client = self._client_arg
            else:
                from sync_worker.client import Client

                self._client = Client(settings=self._settings)
        if self._store is None:
            from sync_worker.storage import get_store

            self._store = get_store(self.settings, self._client)

    def stop(self) -> None:
        """Stop taking runs. Returns at once (safe from any thread, a signal handler or a
        task); in-flight runs go on and finish. Use :meth:`join` to wait for them.

        The subscription socket stays open until the in-flight runs have finished (on the
        embedded server it is their lease: closing it early would get long runs delivered
        to another worker), then it is closed without ``quit``: a run delivered but not
        acknowledged goes back to the server's queue instead of being lost.
        """
        with self._lock:
            if self._done.is_set() and not self._ever_started:
                raise RuntimeError("Task worker has not yet started. Please start the task worker by calling .start()")
            if self.stopping or self._done.is_set():
                return
            self.stopping = True
            self._started_at = None
            self._drain_deadline = time.monotonic() + self.settings.drain_timeout
            self._stop_event.set()
        logger.info("Stopping task worker %s...", self.client_id)
        subscription = self._subscription
        if subscription is not None and not self._held_run_ids():
            # nothing to keep a lease for: a connection still being opened to a server that
            # does not answer would hold the stop for its open timeout (up to 30 s)
            subscription.abort_opening()

    _drain_deadline: float | None = None

    def _keeps_trying(self) -> bool:
        """The engine's retry rule for reporting states: a run executed here is reported
        whatever the server answers in between, until the worker is stopped past its drain
        timeout (then the process may be gone any moment; the server's lease takes over)."""
        deadline = self._drain_deadline
        return deadline is None or not self._stop_event.is_set() or time.monotonic() < deadline

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the worker has stopped; True once it has (its runs finished, or the
        ones still going at the drain timeout were abandoned: logged by id, and the
        ``sync-worker worker`` command exits 1 then), False after ``timeout``.

        Returning False after the drain timeout of a stop, it logs (once per stop) the runs
        still running or reporting: the usual caller (``stop(); join(DRAIN_TIMEOUT)`` in a
        WSGI server's exit hook) lets its process end right after, before the service
        thread's own line about them, which comes a report backoff later."""
        if self._done.wait(timeout):
            return True
        self._note_left_behind()
        return False

    def _note_left_behind(self) -> None:
        """Past the drain deadline of a stop, once: log the runs still running or reporting
        (see :meth:`join`; the context manager's exit too, whose process a WSGI server may
        end at any moment from then on)."""
        deadline = self._drain_deadline
        if (not self.stopping or self._join_warned or deadline is None or time.monotonic() < deadline
                or self._abandoned_at_drain):
            return
        held = self._held_run_ids()
        if not held:
            return  # nothing left behind: the connection is closing
        self._join_warned = True
        running, reporting = self._running_and_reporting(held)
        logger.warning("Drain timeout (%gs, SYNC_WORKER_DRAIN_TIMEOUT) passed with %d run(s) still running%s and %d "
                       "whose final state the server has not confirmed%s; if this process ends now, the server "
                       "gives them to a worker again once their lease expires, so they may run twice",
                       self.settings.drain_timeout, len(running), f" ({', '.join(running)})" if running else "",
                       len(reporting), f" ({', '.join(reporting)})" if reporting else "")

    def _drain(self) -> bool:
        """Wait for the stop to finish: True if every run did, False if runs were abandoned
        at the drain timeout (by the service thread, which gives up at the deadline
        :meth:`stop` set, or here when it is not done by then). One deadline per stop: a
        later stop path (Ctrl-C during a SIGTERM's drain) does not start it again. With no
        run left to wait for, :data:`_STOP_GRACE_SECONDS` is enough (a connection still
        being opened to a server that does not answer is not worth the drain timeout)."""
        timeout = self.settings.drain_timeout
        deadline = (self._drain_deadline or time.monotonic() + timeout) + _ABANDON_GRACE_SECONDS + _STOP_GRACE_SECONDS
        idle_since: float | None = None
        while not self._done.wait(min(_SIGNAL_POLL_SECONDS, max(0.0, deadline - time.monotonic()))):
            self._note_left_behind()
            now = time.monotonic()
            if self._held_run_ids():
                idle_since = None
            elif idle_since is None:
                idle_since = now
            elif now - idle_since >= _STOP_GRACE_SECONDS:
                logger.info("Stopped with no run left running; not waiting for the connection to close")
                return True
            if now >= deadline:
                return self._drain_timed_out(timeout)
        return not self._abandoned_at_drain

    def _drain_polling(self) -> bool:
        """:meth:`_drain` for a signal handler: looks at a plain attribute every
        :data:`_SIGNAL_POLL_SECONDS` instead of waiting on ``_done``, whose lock the main
        thread the handler interrupted may be holding (see :meth:`handle_sigterm`)."""
        timeout = self.settings.drain_timeout
        deadline = ((self._drain_deadline or time.monotonic() + timeout)  # as in _drain
                    + _ABANDON_GRACE_SECONDS + _STOP_GRACE_SECONDS)
        while not self._finished:
            if time.monotonic() >= deadline:
                return self._drain_timed_out(timeout)
            time.sleep(_SIGNAL_POLL_SECONDS)
        return not self._abandoned_at_drain

    def _running_and_reporting(self, runs: list[str]) -> tuple[list[str], list[str]]:
        """``runs`` split into those executing (holding a slot) and those only reporting."""
        executing = self._slots.held_ids()
        return [run for run in runs if run in executing], [run for run in runs if run not in executing]

    def _drain_timed_out(self, timeout: float) -> bool:
        """Note (and log, once per stop) the runs abandoned at the drain timeout; False."""
        if self._abandoned_at_drain:
            return False  # noted already (the service thread, or another stop path)
        abandoned = self._held_run_ids()
        with self._lock:
            abandoned += [run for run in self._unconfirmed if run not in abandoned]
        self._abandoned_at_drain = abandoned
        running, unreported = self._running_and_reporting(abandoned)
        if running:
            logger.warning("Drain timeout (%gs, SYNC_WORKER_DRAIN_TIMEOUT) passed with %d run(s) still running, "
                           "abandoned: %s; the server gives them to a worker again once their lease expires, so "
                           "they may run twice", timeout, len(running), ", ".join(running))
        if unreported:
            logger.warning("Drain timeout (%gs, SYNC_WORKER_DRAIN_TIMEOUT) passed with %d run(s) executed here whose "
                           "final state the server has not confirmed (unreachable?): %s; unless it got it, the "
                           "server gives them to a worker again once their lease expires, so they may run twice",
                           timeout, len(unreported), ", ".join(unreported))
        if not abandoned:
            logger.warning("Drain timeout (%gs, SYNC_WORKER_DRAIN_TIMEOUT) passed before the worker's connection "
                           "closed; no run was left running", timeout)
        return False

    def _cold_stop(self) -> None:
        """Second Ctrl-C: stop now. Closing the subscription hands back the runs delivered
        but not started; the runs executing are abandoned (re-delivered after their lease)."""
        with self._lock:
            abandoned = [run for runs in self.in_flight_task_runs.values() for run in runs]
        logger.warning("Cold stop: abandoning %d running run(s)%s", len(abandoned),
                       f": {', '.join(abandoned)}" if abandoned else "")
        subscription = self._subscription
        if subscription is not None:
            subscription.close()

    def handle_sigterm(self, signum: int, frame: object) -> None:
        """SIGTERM: stop taking runs, let in-flight runs finish (at most
        ``SYNC_WORKER_DRAIN_TIMEOUT`` seconds), then exit with status 0.

        Installed by a blocking :meth:`start` in the main thread; raises ``SystemExit``
        there. If runs are still going after the drain timeout the process exits with
        status 1 at once (its non-daemon executor threads would otherwise keep it alive).

        A handler runs on top of whatever the main thread was doing, which may be holding
        the very lock the handler would take: the handler that set and waited on the Event
        that start() waits on deadlocked when the signal came while start() held that
        Event's lock (between two bytecodes of ``Event.wait``). So under a blocking
        :meth:`start` this only notes the signal, and start() does the rest within
        :data:`_SIGNAL_POLL_SECONDS`. Installed by the application itself (a worker started
        with ``block=False``), it stops and drains here, waiting without taking a lock.
        """
        if self._main_waiting:
            self._sigterm_noted = True
            return
        logger.info("SIGTERM received, initiating graceful shutdown...")
        self._exit_after_drain(self._drain_polling)

    def _exit_after_drain(self, drain: Callable[[], bool]) -> NoReturn:
        self.stop()
        if drain():
            raise SystemExit(0)
        logging.shutdown()
        os._exit(1)

    def __enter__(self) -> TaskWorker:  # noqa: PYI034
        return self.start(block=False)

    def __exit__(self, *exc_info: object) -> None:
        if self.started:
            self.stop()
        self._drain()

    # -- the service thread ------------------------------------------------------------
    def _service(self) -> None:
        try:
            # Not wrapped in critical_service_loop: the subscription reconnects by itself
            # (one retry rule, its backoff capped below the server's lease timeout); what
            # reaches here is not worth retrying (refused credentials, a protocol error).
            self._serve_subscription()
        except StopTaskWorker:
            pass
        except BaseException as exc:  # noqa: BLE001 - reported by start()/join()
            self._error = exc
            # A blocking start() raises it to its caller (the worker command prints it as its
            # one error line); a worker started with block=False has no caller to raise to.
            log = logger.debug if self._start_raises_errors else logger.error
            log("Task worker %s failed: %s", self.client_id, exc)
        finally:
            with self._lock:
                self.stopping = True
                self._started_at = None
            if self._drain_deadline is None:
                self._drain_deadline = time.monotonic() + self.settings.drain_timeout
            self._stop_event.set()
            if self._subscription is not None:
                # From this thread, the only one that acks: no ack can cross the hand-back.
                self._subscription.stop_receiving()
            executor = self._executor
            # at most until the drain deadline, however the stop came (stop() from any
            # thread or task, a signal, a timeout): a run that never returns is abandoned
            # (its thread is a daemon; the server re-delivers the run after its lease)
            # (plus one report backoff: a run thread still claiming or reporting its run sees
            # the deadline at its next attempt, gives up and hands an unstarted run back)
            if executor is not None and not executor.shutdown(
                    wait=True, timeout=max(0.0, self._drain_deadline + _ABANDON_GRACE_SECONDS - time.monotonic())):
                self._drain_timed_out(self.settings.drain_timeout)
            if not self._wait_for_reports() or self._unconfirmed:
                # final states sent over a link that then went silent (a partition): their
                # runs may be given to another worker once their lease expires
                self._drain_timed_out(self.settings.drain_timeout)
            # Only now: on the embedded server the open connection is the lease of the
            # runs that were in flight. A run delivered but not acknowledged goes back to
            # the queue when it closes.
            if self._subscription is not None:
                self._subscription.close()
            flushed = self._prefect.stop(timeout=max(0.0, self._drain_deadline - time.monotonic()))
            if flushed:
                logger.info("Put %d waiting retr%s back on the queue early", flushed, "y" if flushed == 1 else "ies")
            if self._client is not None and self._client is not self._client_arg:
                self._client.close()  # our own connection pool; the next start() makes a new one
                self._client = self._store = None
            self._slots.count_in_gauge(False)
            logger.info("Task worker %s stopped.", self.client_id)  # only now: after the drain
            self._finished = True
            self._done.set()

    def _dialect_for(self, extensions: list[str]) -> Dialect:
        """The dialect of a new connection (see :mod:`sync_worker.dialects`): chosen once,
        from what the server announced; a Prefect server's gets this worker's events and
        retry timers."""
        subscription = self._subscription
        fast_path = subscription.fast_path if subscription is not None else self.settings.fast_path
        # only a running worker's: a worker never started (execute_task_run) has nobody to
        # stop its event thread, so its runs propose every state from the calling thread
        reporting = self._prefect if self.started else None
        return choose_dialect(extensions, fast_path=bool(fast_path), reporting=reporting)

    def _serve_subscription(self) -> None:
        subscription = self._subscription
        assert subscription is not None
        while not self._stop_event.is_set():
            task_run = subscription.next_run(timeout=_SLOT_POLL_SECONDS)
            if task_run is not None:
                self._receive(task_run)
        raise StopTaskWorker

    def _receive(self, task_run: TaskRun) -> None:
        metrics.RUNS_RECEIVED.labels(task_key=task_run.task_key).inc()
        logger.info("Received task run: %s - %s", task_run.id, task_run.name)
        task = self._tasks_by_key.get(task_run.task_key)
        subscription = self._subscription
        assert subscription is not None
        if task is None:
            if self._ack(task_run):
                self._unknown_task(task_run)
                subscription.grant()  # it took no slot
            return
        try:
            reserved = self._slots.acquire(task_run.id, should_stop=self._stop_event.is_set)
        except SlotError:
            # delivered again while it still executes here (its lease ran out during a
            # long disconnection): it is ours; take it back without running it twice
            logger.warning("Task run %s was delivered again while it executes here; not starting it twice",
                           task_run.id)
            if self._ack(task_run):
                subscription.grant()  # it took no slot
                # now: with claims at delivery the grant waits for a set_state frame to carry
                # it, and the next one may be this run's final state, long after (a free slot
                # stayed unused until then)
                subscription.flush_credit()
            return
        if not reserved:
            return  # stopping: never acked; stop_receiving() hands it back
        dialect = subscription.dialect  # of the connection that delivered it (this thread connects)
        if self._stop_event.is_set() or not self._ack(task_run):
            self._slots.release(task_run.id)
            return
        self._submit(task, task_run, dialect)

    def _held_run_ids(self) -> list[str]:
        """The runs this worker executes or is still reporting (tracked from submission to
        the final report): named when it subscribes again (see Subscription)."""
        with self._lock:
            return [run_id for runs in self.in_flight_task_runs.values() for run_id in runs]

    def _claims_at_delivery(self) -> bool:
        """Whether a new connection opts in to ``claim_at_delivery`` (when the server offers
        it): only if this worker can run every key it subscribes to. A run of a key it has
        no task for must stay SCHEDULED (not RUNNING) while it is held, as before."""
        return all(key in self._tasks_by_key for key in self.task_keys)

    def _start_delivered(self, task_run: TaskRun, dialect: Dialect) -> bool:
        """A run claimed at delivery, straight from the subscription's reader thread to the
        executor (one thread hand-off instead of reader -> service thread -> executor): True
        if started. False when it needs the service thread's slower path (no slot free now,
        an unknown task, the run executing here already, stopping); it is queued for it."""
        if self._stop_event.is_set():
            return False
        task = self._tasks_by_key.get(task_run.task_key)
        if task is None:
            return False
        try:
            if not self._slots.try_acquire(task_run.id):
                return False
        except SlotError:
            return False
        metrics.RUNS_RECEIVED.labels(task_key=task_run.task_key).inc()
        logger.info("Received task run: %s - %s", task_run.id, task_run.name)
        try:
            self._submit(task, task_run, dialect)
        except RuntimeError:  # the executor shut down meanwhile (stopping): not started
            self._slots.release(task_run.id)
            with self._lock:
                self.in_flight_task_runs.setdefault(task.task_key, {}).pop(task_run.id, None)
                metrics.RUNS_IN_FLIGHT.dec()
            return False
        return True

    def _yields_after(self, task: Task[..., Any]) -> bool:
        """Whether the subscription's reader yields the GIL after handing out a run of
        ``task`` that more runs of the same message follow (batch delivery; see
        :attr:`sync_worker.sockets.Connection.yields_after`). Without it, the run thread
        just woken waits for the GIL until the reader has handed out the rest of them, and
        its function starts that much later. Yielding costs a GIL round trip (25-70 us more
        worker CPU per run measured), which a long run is worth (10 ms runs, limit 10: 1.04x
        and 1.01x the runs per second in two sets of 16 toggled rounds) and a no-op run is
        not (an unconditional yield cost the drain 3-10 %): so only for tasks whose runs
        recently took :data:`_LONG_RUN_SECONDS`. Never after the last run of a message: the
        reader releases the GIL in its next read anyway (a yield there was one more thread
        switch per run in the 10 ms case: 6.4 -> 5.75 voluntary switches per run)."""
        return self._run_seconds.get(task.task_key, 0.0) >= _LONG_RUN_SECONDS

    def _yields_after_run(self, task_run: TaskRun) -> bool:
        task = self._tasks_by_key.get(task_run.task_key)
        return task is not None and self._yields_after(task)

    def _ran(self, task_key: str, seconds: float) -> None:
        """A run's function took ``seconds`` (the engine's measure, the function alone: not
        the waits for the GIL before it): into the task's moving average."""
        self._run_seconds[task_key] = 0.75 * self._run_seconds.get(task_key, seconds) + 0.25 * seconds

    def _ack(self, task_run: TaskRun) -> bool:
        from sync_worker.subscription import ConnectionLost

        assert self._subscription is not None
        try:
            self._subscription.ack()
        except ConnectionLost as exc:
            logger.info("Could not acknowledge %s (%s); the server will deliver it again", task_run.id, exc)
            return False
        return True

    def _unknown_task(self, task_run: TaskRun) -> None:
        logger.warning("Task %r (key %r) not found in task worker registry.", task_run.name, task_run.task_key)
        if self.settings.delete_failed_submissions:
            assert self._client is not None
            logger.info("Deleting task run %s of unknown task %r", task_run.id, task_run.task_key)
            try:
                self._client.delete_task_run(task_run.id)
            except Exception as exc:  # noqa: BLE001 - logged; the worker carries on
                logger.warning("Could not delete task run %s: %s", task_run.id, exc)

    def _free_slots(self) -> int:
        """Credit for a new subscription: the slots free now (a fixed window without a
        limit); none once the worker is stopping."""
        if self._stop_event.is_set():
            return 0
        free = self._slots.free
        return UNLIMITED_CREDIT if free is None else max(0, free)

    def _track(self, task: Task[..., Any], task_run: TaskRun) -> None:
        with self._lock:
            self.in_flight_task_runs.setdefault(task.task_key, {})[task_run.id] = _now()
            metrics.RUNS_IN_FLIGHT.inc()

    def _submit(self, task: Task[..., Any], task_run: TaskRun, dialect: Dialect | None) -> None:
        self._track(task, task_run)
        assert self._executor is not None
        self._executor.submit(self._safe_run, task, task_run, True, dialect)

    def _safe_run(self, task: Task[..., Any], task_run: TaskRun, delivered: bool = False,
                  dialect: Dialect | None = None) -> Outcome | None:
        outcome = None
        released = False

        def release_slot() -> None:
            # once, when the function returned (engine's on_executed) or at the end, whichever
            # first; a slot freed by a delivered run is worth one more delivery (credit
            # extension), unless the worker is stopping
            nonlocal released
            if released:
                return
            released = True
            if self._slots.release(task_run.id) and delivered and not self._stop_event.is_set():
                subscription = self._subscription
                if subscription is not None:
                    subscription.grant()

        try:
            assert self._client is not None and self._store is not None
            transport = self._transport or Transport(self._client, self._subscription)
            if dialect is None:  # execute_task_run: the connection's, if there is one
                subscription = self._subscription
                dialect = subscription.dialect if subscription is not None and subscription.dialect else \
                    self._dialect_for([])
            claimed = delivered and dialect is not None and dialect.claims_at_delivery
            outcome = run_task_run(
                task, task_run, client=self._client, store=self._store, settings=self.settings,
                subscription=self._subscription, dialect=dialect, transport=transport, on_executed=release_slot,
                keep_trying=self._keeps_trying, claimed_at_delivery=claimed,
                # the final state's answer is handled by the socket's reader: this thread is free now
                on_reported=(lambda outcome: self._reported(task, task_run, delivered, outcome)) if claimed else None,
                run_later=self._run_later, on_ran=functools.partial(self._ran, task.task_key),
            )
            logger.debug("Task run %s finished here: %s", task_run.id, outcome.value)
            if outcome is Outcome.UNCLAIMED and delivered:
                # not started, and the worker gave up claiming it: give it back now rather
                # than leave it to the lease (embedded server; elsewhere the server's rules)
                transport.hand_back(task_run.id)
        except BaseException:
            logger.exception("Failed to submit task run %r", task_run.id)
        finally:
            release_slot()
            if outcome is not Outcome.REPORTING:  # else when the answer comes (on_reported)
                self._reported(task, task_run, delivered, outcome)
        return outcome

    def _reported(self, task: Task[..., Any], task_run: TaskRun, delivered: bool, outcome: Outcome | None) -> None:
        if outcome is Outcome.UNCONFIRMED:  # abandoned at the drain deadline (see _drain_timed_out)
            with self._lock:
                self._unconfirmed.append(task_run.id)
        self._run_done(task, task_run, delivered)

    def _run_later(self, fn: Callable[[], None]) -> None:
        """On a run thread (the rest of a report whose answer was not an ACCEPT); raises
        RuntimeError when the run threads are shut down."""
        executor = self._executor
        if executor is None:
            raise RuntimeError("no run threads")
        executor.submit(fn)

    def _run_done(self, task: Task[..., Any], task_run: TaskRun, delivered: bool) -> None:
        """A run is reported (or given up): no longer in flight. Called by its run thread, or,
        when its final state went without waiting (:attr:`Outcome.REPORTING`), by the thread
        that handled the answer."""
        if delivered and self._subscription is not None:
            self._subscription.flush_credit()  # credit no set_state frame carried
        # after the slot: a run counted finished has given its slot back
        with self._lock:
            self.in_flight_task_runs.setdefault(task.task_key, {}).pop(task_run.id, None)
            self.finished_task_runs[task.task_key] = self.finished_task_runs.get(task.task_key, 0) + 1
            metrics.RUNS_IN_FLIGHT.dec()
            self._runs_done.notify_all()

    def _wait_for_reports(self) -> bool:
        """Once the run threads are done: the final states still waiting for their answer
        (sent without waiting, :attr:`Outcome.REPORTING`), until the drain deadline. Their
        answers come over the subscription, which stays open until then. False if some
        are still unanswered at the deadline."""
        with self._runs_done:
            while any(self.in_flight_task_runs.values()):
                remaining = (self._drain_deadline or 0.0) - time.monotonic()
                if remaining <= 0:
                    return False
                self._runs_done.wait(remaining)
        return True

    def execute_task_run(self, task_run: TaskRun) -> Outcome | None:
        """Execute one given run now, in the calling thread, within the limit (it waits
        for a free slot, shared with the runs the worker receives). Works whether or not
        the worker is started. Raises :class:`SlotError` if that run is already executing
        in this worker, and ``KeyError`` if none of its tasks has the run's key: the run is
        left as it is (a run the server delivers with an unknown key is deleted instead,
        per ``SYNC_WORKER_DELETE_FAILED_SUBMISSIONS``; one passed here by mistake is not)."""
        task = self._tasks_by_key.get(task_run.task_key)
        if task is None:
            raise KeyError(f"task run {task_run.id} has the task key {task_run.task_key!r}, which none of this "
                           f"worker's tasks has ({', '.join(sorted(self.task_keys)) or 'no tasks'})")
        self._settings = self._settings or get_settings()
        self._ensure_resources()
        metrics.RUNS_RECEIVED.labels(task_key=task_run.task_key).inc()
        self._slots.acquire(task_run.id)
        self._track(task, task_run)
        return self._safe_run(task, task_run)

    # -- fork safety ---------------------------------------------------------------------
    def _forget_after_fork(self) -> None:
        """In a forked child: the parent's threads, sockets and pool are not ours."""
        was_running = self.started or not self._done.is_set()
        self._lock = threading.RLock()
        self._runs_done = threading.Condition(self._lock)
        self._slots = Slots(self._limit)
        self.in_flight_task_runs = {k: {} for k in self.task_keys}
        self._started_at = None
        self.stopping = False
        self._client = None if self._client_arg is None else self._client_arg
        self._store = None
        self._executor = None
        self._subscription = None
        self._service_thread = None
        self._stop_event = threading.Event()
        self._done = threading.Event()
        self._done.set()
        self._finished = True
        self._main_waiting = False
        self._prefect = PrefectReporting()  # the parent's timer and event threads are not here
        self._transport = None
        if was_running:
            logger.warning(
                "TaskWorker for %s was started in process %s before it forked; its threads do not "
                "exist in this child process (pid %s), so it is NOT running here. Start the worker "
                "after the fork: in gunicorn's post_fork hook, or lazily in the app (do not start it "
                "at import time with --preload).",
                ", ".join(sorted(self.task_keys)), self._pid, os.getpid(),
            )

    def __repr__(self) -> str:
        return f"<TaskWorker {self.client_id} tasks={sorted(self.task_keys)} limit={self._limit}>"


# -- status server -------------------------------------------------------------------------
def status_payload(task_worker: TaskWorker) -> dict[str, Any]:
    """The ``GET /status`` document, as Prefect's task worker serves it."""
    started_at = task_worker.started_at
    with task_worker._lock:
        in_flight = {
            key: {str(run): start.isoformat() for run, start in runs.items()}
            for key, runs in task_worker.in_flight_task_runs.items()
        }
        finished = dict(task_worker.finished_task_runs)
    return {
        "client_id": task_worker.client_id,
        "started_at": started_at.isoformat() if started_at else None,
        "stopping": task_worker.stopping,
        "limit": task_worker.limit,
        "current": task_worker.current_tasks,
        "available": task_worker.available_tasks,
        "tasks": sorted(task_worker.task_keys),
        "finished": finished,
        "in_flight": in_flight,
    }


def create_status_server(task_worker: TaskWorker, port: int = 0, host: str = "127.0.0.1") -> http.server.ThreadingHTTPServer:
    """An HTTP server answering ``GET /status``; call ``serve_forever`` in a thread."""
    import http.server  # imported here: only with --status-port (0.5-0.7 MB of a worker's RSS)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0].rstrip("/") != "/status":
                self._send(404, {"detail": "Not Found"})
                return
            self._send(200, status_payload(task_worker))

        def _not_allowed(self) -> None:  # FastAPI's answer (Prefect's status server) to another method
            if self.path.split("?", 1)[0].rstrip("/") != "/status":
                self._send(404, {"detail": "Not Found"})
                return
            self._send(405, {"detail": "Method Not Allowed"})

        do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _not_allowed

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("status server: " + format, *args)

    try:
        server = http.server.ThreadingHTTPServer((host, port), Handler)
    except (OSError, OverflowError) as exc:  # a port in use or out of range: say which option
        from sync_worker.diagnostics import port_unavailable

        raise port_unavailable("status server", "--status-port / status_server_port", host, port, exc) from exc
    server.daemon_threads = True
    return server


@contextlib.contextmanager
def status_server_running(task_worker: TaskWorker, port: int | None) -> Iterator[None]:
    """Serve ``GET /status`` on 127.0.0.1:``port`` (nothing when ``port`` is None) for the
    duration of the block: what ``serve()`` and the Django worker both do around ``start()``."""
    if port is None:
        yield
        return
    server = create_status_server(task_worker, port)
    threading.Thread(target=server.serve_forever, name="sync-worker-status", daemon=True).start()
    logger.info("Status server on http://127.0.0.1:%s/status", server.server_address[1])
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def serve(
    *tasks: Task[..., Any],
    limit: int | None = 10,
    status_server_port: int | None = None,
    timeout: float | None = None,
) -> None:
    """Serve the tasks until stopped: a blocking worker with an optional status server.

    Args:
        tasks: the tasks to serve. Their runs are submitted with ``.delay()``.
        limit: the most runs executing at once (default 10; ``None``: no limit).
        status_server_port: serve ``GET /status`` (JSON) on ``127.0.0.1:<port>``.
        timeout: return after this many seconds (default: run until stopped).

    Raises:
        PortUnavailable: ``status_server_port`` is out of range or in use (a
            :class:`~sync_worker.exceptions.ConfigurationError`, and an ``OSError``).
        SettingsError: a ``SYNC_WORKER_*`` variable holds a value that cannot be used.

    Example::

        from sync_worker import task, serve

        @task
        def say(message: str):
            print(message)

        serve(say)
    """
    task_worker = TaskWorker(*tasks, limit=limit)
    with status_server_running(task_worker, status_server_port):
        try:
            task_worker.start(timeout=timeout)
        except StopTaskWorker:
            logger.info("Task worker stopped.")


def run_until_stopped(task_worker: TaskWorker, status_port: int | None, timeout: float | None) -> int:
    """Serve as :func:`serve` does; the exit status of the worker commands (``sync-worker
    worker``, ``manage.py sync_worker``): 0 when a stop (SIGTERM, one Ctrl-C, ``--timeout``)
    saw every run finish; 1 when runs were abandoned at the drain timeout; 130 on a second
    Ctrl-C (a cold stop). An error that ends the service (refused credentials) propagates,
    for the command to print as its one error line."""
    with status_server_running(task_worker, status_port):
        try:
            task_worker.start(timeout=timeout)
        except KeyboardInterrupt:
            return 1 if task_worker._abandoned_at_drain else 130
        except StopTaskWorker:
            pass
    return 1 if task_worker._abandoned_at_drain else 0


# -- the CLI's worker command --------------------------------------------------------------
class TaskSpecError(ConfigurationError):
    """A ``MODULE:TASK`` argument that does not name a task (a user mistake: the command
    prints it as one line and exits 2)."""


def load_task(spec: str) -> Task[..., Any]:
    """Import ``module:attribute`` (attribute may be dotted) and check it is a Task."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise TaskSpecError(f"{spec!r} is not MODULE:TASK (for example myapp.tasks:send_email)")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: tasks in the current project
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise TaskSpecError(f"{spec!r}: cannot import module {module_name!r} ({exc})") from exc
        raise TaskSpecError(_import_failed(spec, module_name, exc)) from exc
    except Exception as exc:  # the module's own code failed (SyntaxError, a missing setting, ...)
        raise TaskSpecError(_import_failed(spec, module_name, exc)) from exc
    except SystemExit as exc:  # the module calls sys.exit() when imported (a script's main code)
        raise TaskSpecError(f"{spec!r}: importing module {module_name!r} called sys.exit({exc.code!r}); "
                            "guard its script code with `if __name__ == \"__main__\":`") from None
    value: Any = module
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise TaskSpecError(f"{spec!r}: module {module_name!r} has no attribute {attribute!r}") from None
    if not isinstance(value, Task):
        raise TaskSpecError(
            f"{spec!r} is {_a(type(value).__name__)}, not a task: decorate it with @sync_worker.task"
        )
    return value


def _a(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _import_failed(spec: str, module_name: str, exc: BaseException) -> str:
    """One line for a task module whose import raised: the error and where (the innermost
    frame, or a SyntaxError's own file and line)."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames and not isinstance(exc, SyntaxError) else ""
    return f"{spec!r}: importing module {module_name!r} failed: {type(exc).__name__}: {exc}{where}"


def _record_metrics_if_served() -> None:
    """A worker process without the client metrics server has no way to show its metrics
    (no host application serves its registry): it does not record them, and so never
    imports prometheus-client (0.9 MB of its RSS, measured). A bad setting is left to
    :func:`serve` to report."""
    try:
        enabled = get_settings().client_metrics_enabled
    except Exception:  # noqa: BLE001 - serve() raises it with its message
        return
    if not enabled:
        metrics.record_in_this_process(False)


def run_worker_command(
    task_specs: list[str], limit: int | None = 10, status_port: int | None = None, timeout: float | None = None
) -> int:
    """``sync-worker worker MODULE:TASK ...``: load the tasks, serve them; the exit code.

    A spec that names no task raises :class:`TaskSpecError`, and an error that ends the
    worker (refused credentials) propagates: the command prints either as its one error
    line (:func:`sync_worker.cli_support.run_command`, a JSON record with ``--log-format
    json``)."""
    tasks = [load_task(spec) for spec in task_specs]
    _record_metrics_if_served()
    return run_until_stopped(TaskWorker(*tasks, limit=limit), status_port, timeout)
