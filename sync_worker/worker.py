"""The task worker: receives background runs of its tasks and executes them in threads.

``TaskWorker`` and ``serve`` mirror ``prefect.task_worker`` (names, parameters, defaults,
the ``/status`` JSON), without asyncio. Per worker:

- a **service thread** runs a blocking loop under
  :func:`sync_worker.services.critical_service_loop`: it iterates the websocket
  subscription, and for each delivered run *reserves a free slot first, then acks*.
  Reserving before the ack is the backpressure: the server holds the next run back until
  the ack, so a worker whose slots are all busy takes nothing more and an idle worker gets
  the runs. The protocol still hands a full worker the next run right after its last
  ack: that one run waits, unacknowledged, for this worker's first free slot (if the
  worker stops first, closing the socket re-queues it). Handing it back by closing the
  socket was tried and rejected: on the embedded server the open connection is the
  lease of the runs in flight, so closing it would get long runs re-delivered to
  another worker while they are still running here.
- an **executor**, ``ThreadPoolExecutor(max_workers=limit)``, runs each run through the
  engine (:mod:`sync_worker.engine`).

Two ways to run it::

    serve(add, send_email, limit=10)         # blocks: a worker process
    TaskWorker(add).start()                  # same, without the status server

    worker = TaskWorker(add).start(block=False)   # in a WSGI app: returns at once,
    ...                                           # the worker runs in its own threads
    worker.stop(); worker.join(30)

    with TaskWorker(add) as worker:          # non-blocking start, stop + drain on exit
        ...

Stopping (``stop()``, SIGTERM, ``timeout``, Ctrl-C) stops taking runs at once and lets
in-flight runs finish. ``stop()`` never waits, so it is safe from any thread, from a
signal handler and from inside a task; ``join()`` waits for the drain.

Forking: a worker's threads do not survive ``os.fork()``. A worker started in a parent
(e.g. at import time under ``gunicorn --preload``) is marked stopped in the child, with a
WARNING. Start workers *after* the fork: in gunicorn's ``post_fork`` hook (see
``examples/flask_app/gunicorn.conf.py``) or lazily on first use in the app.
"""
from __future__ import annotations

import datetime as _dt
import http.server
import importlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable

from sync_worker import metrics
from sync_worker.engine import Outcome, run_task_run, should_try_to_read_parameters
from sync_worker.services import critical_service_loop, start_client_metrics_server
from sync_worker.settings import Settings, get_settings
from sync_worker.tasks import Task

if TYPE_CHECKING:
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


class StopTaskWorker(Exception):
    """Raised when the task worker is stopped.

    It is raised inside the worker's service thread, after :meth:`TaskWorker.stop`, to
    unwind the service loop (``critical_service_loop`` lets it through: it is not an
    intermittent error). User code does not need to catch it: ``stop()`` itself never
    raises it in the caller, so calling ``stop()`` from a task or a view is safe.
    """


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


_workers: weakref.WeakSet[TaskWorker] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for worker in list(_workers):
        worker._forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _RetryTimers:
    """Timers that put Prefect-server retries back on the queue when they are due.

    A Prefect server does not re-queue a run it answered ``AwaitingRetry``; the engine
    does it by proposing the state again when the retry is due (see
    ``TaskRunEngine._queue_retry``). Waiting on a timer instead of in the run's thread
    means a retry holds no slot while it waits. A stopping worker fires its pending
    timers at once (``flush``): the runs go back on the queue (early; the server
    makes whoever takes them wait) instead of staying ``AwaitingRetry`` for ever.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[threading.Timer, Callable[[], Any]] = {}

    def schedule(self, delay: float, action: Callable[[], Any], name: str) -> None:
        timer = threading.Timer(delay, lambda: self._fire(timer))
        timer.name = f"sync-worker-retry-{name}"
        timer.daemon = True
        with self._lock:
            self._pending[timer] = action
        timer.start()

    def _fire(self, timer: threading.Timer) -> None:
        with self._lock:
            action = self._pending.pop(timer, None)
        if action is not None:
            self._run(action)

    @staticmethod
    def _run(action: Callable[[], Any]) -> None:
        try:
            action()
        except Exception:  # noqa: BLE001 - one retry must not take the worker down
            logger.exception("Re-queueing a retry failed")

    def flush(self) -> int:
        with self._lock:
            pending, self._pending = self._pending, {}
        for timer, action in pending.items():
            timer.cancel()
            self._run(action)
        return len(pending)


class TaskWorker:
    """Serves tasks: runs their background runs as the server delivers them.

    Args:
        tasks: the :class:`~sync_worker.tasks.Task` objects to serve (other objects are
            skipped with a warning).
        limit: the most runs executing at once; ``None`` for no limit. Defaults to 10.
        client: the REST client (default: one built from the settings).
        fast_path: report states over the subscription socket when the server offers it
            (default: ``SYNC_WORKER_FAST_PATH``, on); REST otherwise.
    """

    def __init__(
        self,
        *tasks: Task[..., Any],
        limit: int | None = 10,
        client: Client | None = None,
        fast_path: bool | None = None,
    ):
        if limit is not None and limit < 1:
            raise ValueError("limit must be >= 1, or None for no limit")
        self.tasks: list[Task[..., Any]] = []
        for t in tasks:
            if not isinstance(t, Task):
                logger.warning("Skipping %r: not a task (decorate the function with @task)", t)
                continue
            self.tasks.append(t)
        self.task_keys: set[str] = {t.task_key for t in self.tasks}
        self._tasks_by_key = {t.task_key: t for t in self.tasks}
        self._limit = limit
        self._client_arg = client
        self.fast_path = fast_path

        self._started_at: _dt.datetime | None = None
        self.stopping = False

        self._lock = threading.RLock()
        self._slots = threading.Semaphore(limit) if limit else None
        self._reserved = 0
        self.in_flight_task_runs: dict[str, dict[str, _dt.datetime]] = {k: {} for k in self.task_keys}
        self.finished_task_runs: dict[str, int] = {k: 0 for k in self.task_keys}

        self._settings: Settings | None = None
        self._client: Client | None = None
        self._store: RecordStore | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._subscription: Subscription | None = None
        self._service_thread: threading.Thread | None = None
        self._stop_event = threading.Event()
        self._done = threading.Event()
        self._done.set()
        self._error: BaseException | None = None
        self._retry_timers = _RetryTimers()
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
        if self._limit is not None:
            return self._reserved
        return sum(len(runs) for runs in self.in_flight_task_runs.values())

    @property
    def available_tasks(self) -> int | None:
        return None if self._limit is None else self._limit - self._reserved

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
        """
        self._begin()
        if not block:
            return self
        previous = None
        in_main = threading.current_thread() is threading.main_thread()
        if in_main:
            previous = signal.signal(signal.SIGTERM, self.handle_sigterm)
        try:
            if not self._done.wait(timeout):
                logger.info("Task worker timed out after %s seconds. Exiting...", timeout)
                self.stop()
                self._drain()
        except KeyboardInterrupt:
            logger.info("Task worker interrupted, stopping...")
            self.stop()
            self._drain()
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        if self._error is not None:
            raise self._error
        return self

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
                self.task_keys, self.client_id, client=self._client, fast_path=self.fast_path,
                credit=self._free_slots,
                stop_event=self._stop_event,
            )
            self._executor = ThreadPoolExecutor(
                max_workers=self._limit, thread_name_prefix="sync-worker-run"
            )
            self._stop_event.clear()
            self._done.clear()
            self._error = None
            self.stopping = False
            self._started_at = _now()
            self._ever_started = True
            if self._limit is not None:
                metrics.FREE_SLOTS.inc(self._limit - self._reserved)
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
            self._stop_event.set()
        logger.info("Stopping task worker %s...", self.client_id)

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the worker has stopped and its in-flight runs finished; True if so."""
        return self._done.wait(timeout)

    def _drain(self) -> bool:
        timeout = self.settings.drain_timeout
        if self.join(timeout):
            return True
        with self._lock:
            abandoned = [run for runs in self.in_flight_task_runs.values() for run in runs]
        logger.warning("Drain timeout (%ss) passed with %d run(s) still running: %s", timeout, len(abandoned),
                       ", ".join(abandoned))
        return False

    def handle_sigterm(self, signum: int, frame: object) -> None:
        """SIGTERM: stop taking runs, let in-flight runs finish (at most
        ``SYNC_WORKER_DRAIN_TIMEOUT`` seconds), then exit with status 0.

        Installed by a blocking :meth:`start` in the main thread; raises ``SystemExit``
        there. If runs are still going after the drain timeout the process exits with
        status 1 at once (its non-daemon executor threads would otherwise keep it alive).
        """
        logger.info("SIGTERM received, initiating graceful shutdown...")
        self.stop()
        if self._drain():
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
            critical_service_loop(
                self._serve_subscription, interval=1.0, printer=logger.warning, stop_event=self._stop_event,
                jitter_range=0.3,
            )
            logger.info("Task worker stopped.")
        except StopTaskWorker:
            logger.info("Task worker stopped.")
        except BaseException as exc:  # noqa: BLE001 - reported by start()/join()
            self._error = exc
            logger.error("Task worker %s failed: %s", self.client_id, exc)
        finally:
            with self._lock:
                self.stopping = True
                self._started_at = None
            self._stop_event.set()
            executor = self._executor
            if executor is not None:
                executor.shutdown(wait=True)
            # Only now: on the embedded server the open connection is the lease of the
            # runs that were in flight. A run delivered but not acknowledged goes back to
            # the queue when it closes.
            if self._subscription is not None:
                self._subscription.close()
            flushed = self._retry_timers.flush()
            if flushed:
                logger.info("Put %d waiting retr%s back on the queue early", flushed, "y" if flushed == 1 else "ies")
            if self._client is not None and self._client is not self._client_arg:
                self._client.close()  # our own connection pool; the next start() makes a new one
                self._client = self._store = None
            if self._limit is not None:
                metrics.FREE_SLOTS.dec(self._limit - self._reserved)
            self._done.set()

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
        if task is None:
            if self._ack(task_run):
                self._unknown_task(task_run)
                self._subscription.grant()  # it took no slot
            return
        if not self._reserve_slot():
            return  # stopping: never acked, it goes back to the queue when the socket closes
        if not self._ack(task_run):
            self._release_slot()
            return
        self._submit(task, task_run)

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

    def _reserve_slot(self) -> bool:
        """Take a slot, waiting for one; False if the worker is stopping."""
        if self._slots is not None:
            while not self._slots.acquire(timeout=_SLOT_POLL_SECONDS):
                if self._stop_event.is_set():
                    return False
        with self._lock:
            self._reserved += 1
        if self._limit is not None:
            metrics.FREE_SLOTS.dec()
        return True

    def _release_slot(self, grant_credit: bool = False) -> None:
        with self._lock:
            self._reserved -= 1
        if self._slots is not None:
            self._slots.release()
        if self._limit is not None:
            metrics.FREE_SLOTS.inc()
        subscription = self._subscription
        if grant_credit and subscription is not None:
            subscription.grant()

    def _free_slots(self) -> int:
        """Credit for a new subscription: the slots free now (a fixed window without a limit)."""
        if self._limit is None:
            return UNLIMITED_CREDIT
        with self._lock:
            return max(0, self._limit - self._reserved)

    def _submit(self, task: Task[..., Any], task_run: TaskRun) -> None:
        with self._lock:
            self.in_flight_task_runs.setdefault(task.task_key, {})[task_run.id] = _now()
        metrics.RUNS_IN_FLIGHT.inc()
        assert self._executor is not None
        self._executor.submit(self._safe_run, task, task_run, True)

    def _safe_run(self, task: Task[..., Any], task_run: TaskRun, delivered: bool = False) -> Outcome | None:
        outcome = None
        released = False

        def release_slot() -> None:
            # once the function returned (engine's on_executed) or at the end, whichever first;
            # a slot freed by a delivered run is worth one more delivery (credit extension)
            nonlocal released
            if not released:
                released = True
                self._release_slot(grant_credit=delivered)

        try:
            assert self._client is not None and self._store is not None
            outcome = run_task_run(
                task, task_run, client=self._client, store=self._store, settings=self.settings,
                subscription=self._subscription, retry_scheduler=self._retry_timers, on_executed=release_slot,
            )
            logger.debug("Task run %s finished here: %s", task_run.id, outcome.value)
        except BaseException:
            logger.exception("Failed to submit task run %r", task_run.id)
        finally:
            with self._lock:
                self.in_flight_task_runs.setdefault(task.task_key, {}).pop(task_run.id, None)
                self.finished_task_runs[task.task_key] = self.finished_task_runs.get(task.task_key, 0) + 1
            metrics.RUNS_IN_FLIGHT.dec()
            release_slot()
        return outcome

    def execute_task_run(self, task_run: TaskRun) -> Outcome | None:
        """Execute one given run now, in the calling thread, within the limit (it waits
        for a free slot). Works whether or not the worker is started."""
        self._settings = self._settings or get_settings()
        self._ensure_resources()
        task = self._tasks_by_key.get(task_run.task_key)
        metrics.RUNS_RECEIVED.labels(task_key=task_run.task_key).inc()
        if task is None:
            self._unknown_task(task_run)
            return None
        self._reserve_slot()
        with self._lock:
            self.in_flight_task_runs.setdefault(task.task_key, {})[task_run.id] = _now()
        metrics.RUNS_IN_FLIGHT.inc()
        return self._safe_run(task, task_run)

    # -- fork safety ---------------------------------------------------------------------
    def _forget_after_fork(self) -> None:
        """In a forked child: the parent's threads, sockets and pool are not ours."""
        was_running = self.started or not self._done.is_set()
        self._lock = threading.RLock()
        self._slots = threading.Semaphore(self._limit) if self._limit else None
        self._reserved = 0
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
        self._retry_timers = _RetryTimers()  # the parent's timer threads are not here
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

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0].rstrip("/") != "/status":
                self._send(404, {"detail": "Not Found"})
                return
            self._send(200, status_payload(task_worker))

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
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
    status_server = None
    if status_server_port is not None:
        status_server = create_status_server(task_worker, status_server_port)
        threading.Thread(target=status_server.serve_forever, name="sync-worker-status", daemon=True).start()
        logger.info("Status server on http://127.0.0.1:%s/status", status_server.server_address[1])
    try:
        task_worker.start(timeout=timeout)
    except StopTaskWorker:
        logger.info("Task worker stopped.")
    finally:
        if status_server is not None:
            status_server.shutdown()
            status_server.server_close()


# -- the CLI's worker command --------------------------------------------------------------
class TaskSpecError(ValueError):
    """A ``MODULE:TASK`` argument that does not name a task."""


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
        raise
    value: Any = module
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise TaskSpecError(f"{spec!r}: module {module_name!r} has no attribute {attribute!r}") from None
    if not isinstance(value, Task):
        raise TaskSpecError(
            f"{spec!r} is a {type(value).__name__}, not a task: decorate it with @sync_worker.task"
        )
    return value


def run_worker_command(
    task_specs: list[str], limit: int | None = 10, status_port: int | None = None, timeout: float | None = None
) -> int:
    """``sync-worker worker MODULE:TASK ...``: load the tasks, serve them; the exit code."""
    from sync_worker.exceptions import CredentialsError

    try:
        tasks = [load_task(spec) for spec in task_specs]
    except TaskSpecError as exc:
        sys.stderr.write(f"sync-worker worker: error: {exc}\n")  # as sync_worker.cli_support prints
        return 2
    try:
        serve(*tasks, limit=limit, status_server_port=status_port, timeout=timeout)
    except CredentialsError as exc:
        sys.stderr.write(f"sync-worker worker: error: {exc}\n")  # as sync_worker.cli_support prints
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
