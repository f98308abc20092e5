"""Runs one delivered task run through its states.

::

    read parameters (only if the run has a parameters record and the function takes any)
    propose PENDING (deferred)      ABORT: another worker holds the claim -> skip quietly
                                    REJECT: log, skip
    propose RUNNING                 REJECT (e.g. the run is already terminal) -> skip:
                                    a run is never executed twice
    call the function               (timeout_seconds enforced, see sync_worker.timeouts)
    propose COMPLETED(data=result record) or FAILED(message, data=exception record)
        ACCEPT                      done
        REJECT + SCHEDULED          AwaitingRetry: the server re-delivers the run when the
                                    retry is due; no worker slot is held while waiting
        ABORT                       skip quietly
        WAIT                        sleep details.delay_seconds, propose again (bounded)

Every proposal goes over the subscription socket when the server offers the
``set_state`` extension (one round trip on an open connection) and over REST otherwise;
if the socket breaks mid-proposal the proposal is repeated over REST. The server
orchestrates both identically. A repeated proposal whose first attempt did land is
refused (ABORT/REJECT); the engine recognises its own state by the unique claim marker
it puts in the PENDING and RUNNING messages (and by the message/result of final states)
and carries on instead of skipping a run it holds.

On a Prefect server (no ``set_state`` extension announced) three more steps keep the
same guarantees: the run's current state is read before claiming (Prefect would accept
a claim on a FAILED run), a final-state event is POSTed to ``/api/events`` (Prefect
callers wait for events only), and an ``AwaitingRetry`` is put back on the queue by the
worker's retry timers when due (Prefect does not re-queue it).
"""
from __future__ import annotations

import enum
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Protocol

import tenacity

from sync_worker import cancellation, metrics
from sync_worker.exceptions import (
    Cancelled,
    ObjectNotFound,
    ParameterReadError,
    SerializationError,
)
from sync_worker.schemas import (
    Completed,
    Failed,
    OrchestrationResult,
    Pending,
    Running,
    SetStateStatus,
    State,
    StateDetails,
    StateType,
    TaskRun,
    format_datetime,
)
from sync_worker.services import is_intermittent
from sync_worker.storage import (
    LocalDirectoryStore,
    delete_parameters,
    describe_exception,
    inline_result,
    read_parameters,
    write_result,
)
from sync_worker.timeouts import TaskRunTimeoutError, call_with_timeout

if TYPE_CHECKING:
    from sync_worker.client import Client
    from sync_worker.settings import Settings
    from sync_worker.storage import RecordStore
    from sync_worker.subscription import Subscription
    from sync_worker.tasks import Task

logger = logging.getLogger("sync_worker.engine")

#: How many WAIT answers in a row a proposal tolerates before giving up on the run.
MAX_WAITS = 30
#: Upper bound of one WAIT sleep, whatever the server asks.
MAX_WAIT_SECONDS = 30.0
#: How long a state proposal keeps being retried while the server is unreachable, for an
#: engine run without a worker (a worker passes its own rule: as long as it lives, see
#: ``keep_trying``).
REPORT_RETRY_SECONDS = 60.0
#: Cap of the wait between two attempts of one proposal.
REPORT_MAX_BACKOFF = 5.0


class Outcome(str, enum.Enum):
    """What became of a run on this worker."""

    COMPLETED = "completed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    RETRYING = "retrying"  # failed; the server scheduled a retry
    SKIPPED = "skipped"  # not executed here (claimed elsewhere, terminal, refused)
    CANCELLED = "cancelled"  # cancelled while it ran here (sync_worker.cancellation)


def should_try_to_read_parameters(task: Task[..., Any], task_run: TaskRun) -> bool:
    """Whether a run's parameters must be read from the store before it can run.

    True when the run's state names a parameters record (``task_parameters_id``) and the
    function takes parameters at all; a function without parameters never needs them.
    """
    state = task_run.state
    if state is None or not state.state_details.task_parameters_id:
        return False
    return task.takes_parameters


def exception_message(exc: BaseException) -> str:
    """Prefect's wording of a failed run's message."""
    return f"Task run encountered an exception {type(exc).__name__}: {exc}"


class TaskRunEngine:
    """Executes one task run of ``task``, reporting states to the server.

    Args:
        task: the :class:`~sync_worker.tasks.Task` whose key matches the run.
        task_run: the run as delivered.
        client: REST client (every proposal can fall back to it).
        store: where parameter and result records live.
        settings: for ``allow_pickle`` and ``request_timeout``.
        subscription: the worker's subscription, for the ``set_state`` fast path.
    """

    _parameters_id: str | None = None  # the parameters record read for this run (local files: deleted at COMPLETED)

    def __init__(
        self,
        task: Task[..., Any],
        task_run: TaskRun,
        *,
        client: Client,
        store: RecordStore,
        settings: Settings,
        subscription: Subscription | None = None,
        retry_scheduler: RetryScheduler | None = None,
        on_executed: Callable[[], None] | None = None,
        keep_trying: Callable[[], bool] | None = None,
    ):
        self.task = task
        self.task_run = task_run
        self.client = client
        self.store = store
        self.settings = settings
        self.subscription = subscription
        self.retry_scheduler = retry_scheduler
        #: The embedded server says so in its auth_success (the set_state extension);
        #: otherwise assume a Prefect server, whose orchestration needs the extra steps
        #: marked "Prefect" below.
        self.prefect_server = not (subscription is not None and "set_state" in subscription.server_extensions)
        #: The embedded server answers RUNNING for a run already RUNNING with ABORT, so there
        #: the RUNNING proposal itself is the claim and the PENDING round trip is skipped.
        self.claims_with_running = (
            subscription is not None and "direct_running" in subscription.server_extensions
            and subscription.supports_set_state
        )
        #: Called once the task function has returned, before its final state is reported:
        #: the worker frees the execution slot then, so the next run's delivery overlaps
        #: this run's report.
        self.on_executed = on_executed
        #: Whether a proposal the server could not take (connection lost, 5xx: disk full,
        #: database locked, restarting) is tried again. The worker's rule: as long as it is
        #: not stopped past its drain timeout. Without one: for REPORT_RETRY_SECONDS.
        self.keep_trying = keep_trying
        self.logger = logging.LoggerAdapter(logger, {"task_run_id": task_run.id})
        self.state: State | None = task_run.state
        self.outcome: Outcome | None = None
        self._local_retry: State | None = None
        #: Marks this engine's PENDING/RUNNING proposals, so that a repeated proposal
        #: can recognise the state an earlier attempt already set.
        self.claim = f"{socket.gethostname()}-{os.getpid()} ({uuid.uuid4().hex[:12]})"

    @property
    def _label(self) -> str:
        return f"{self.task_run.name!r} ({self.task_run.id})"

    # -- proposals ---------------------------------------------------------------------
    def propose(self, state: State, force: bool = False) -> OrchestrationResult:
        """Propose ``state``; honours WAIT by sleeping and proposing again (bounded)."""
        state.state_details.task_run_id = self.task_run.id
        for _ in range(MAX_WAITS):
            result = self._send(state, force)
            if result.status in (SetStateStatus.ABORT, SetStateStatus.REJECT) and self._landed(state, result):
                self.logger.debug("%s of %s had already been applied (a repeated proposal)", state.name, self._label)
                result = OrchestrationResult(SetStateStatus.ACCEPT, result.state, {"type": "accept_details"})
            if result.status is not SetStateStatus.WAIT:
                if result.state is not None and result.status is SetStateStatus.ACCEPT:
                    self.state = result.state
                return result
            delay = min(max(result.delay_seconds, 0.0), MAX_WAIT_SECONDS)
            self.logger.debug("Server asked to wait %.2fs before %s for %s", delay, state.name, self._label)
            time.sleep(delay)
        self.logger.warning("Giving up %s for %s after %d WAIT answers", state.name, self._label, MAX_WAITS)
        return result

    def _landed(self, proposed: State, result: OrchestrationResult) -> bool:
        """Whether a refused proposal is in fact already the run's state: ours, applied by
        an earlier attempt whose answer was lost (socket dropped, REST retry after a
        timeout). Recognised by the unique claim marker in the message of PENDING and
        RUNNING, and by the message or result record of final states."""
        if proposed.message is None and proposed.data is None:
            return False
        current = result.state
        if current is None or current.type is not proposed.type:
            if result.status is not SetStateStatus.ABORT or current is not None:
                return False
            try:  # a Prefect server answers ABORT without the current state
                current = self.client.read_task_run(self.task_run.id).state
            except Exception as exc:  # noqa: BLE001 - then it is not recognisably ours
                self.logger.debug("Could not read %s: %s", self._label, exc)
                return False
        return (
            current is not None
            and current.type is proposed.type
            and current.message == proposed.message
            and (proposed.data is None or current.data == proposed.data)
        )

    def _send(self, state: State, force: bool) -> OrchestrationResult:
        """One proposal, tried until the server answers it. The one retry rule of state
        reports: each attempt goes over the subscription socket when it offers
        ``set_state`` and over REST (one request, no retry of its own) otherwise; an
        attempt that fails intermittently (connection lost, timeout, 5xx) is repeated after
        an exponential backoff with jitter (at most :data:`REPORT_MAX_BACKOFF` s) for as long
        as :attr:`keep_trying` says. A repeated proposal that had landed is recognised by
        :meth:`_landed`."""
        started = time.monotonic()

        def stop(retry_state: tenacity.RetryCallState) -> bool:
            if self.keep_trying is not None:
                return not self.keep_trying()
            return time.monotonic() - started >= REPORT_RETRY_SECONDS

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_intermittent),
            wait=tenacity.wait_exponential_jitter(multiplier=0.1, max=REPORT_MAX_BACKOFF),
            stop=stop,
            before_sleep=lambda rs: self.logger.warning(
                "Could not report %s for %s (%s); trying again in %.1fs", state.name, self._label,
                rs.outcome.exception() if rs.outcome else None, rs.next_action.sleep if rs.next_action else 0),
            reraise=True,
        )
        return retrying(self._send_once, state, force)

    def _send_once(self, state: State, force: bool) -> OrchestrationResult:
        """One attempt: over the socket when it offers ``set_state``; if it is not connected
        or breaks before the answer, over REST at once (one request)."""
        sub = self.subscription
        if sub is not None and sub.supports_set_state:
            from sync_worker.subscription import ConnectionLost, FastPathUnavailable

            try:
                return sub.set_state(self.task_run.id, state, force=force, timeout=self.settings.request_timeout)
            except (FastPathUnavailable, ConnectionLost) as exc:
                self.logger.debug("set_state over the socket failed (%s); proposing %s over REST", exc, state.name)
        return self.client.set_task_run_state(self.task_run.id, state, force=force, retry=False)

    # -- the run -----------------------------------------------------------------------
    def run(self) -> Outcome:
        """Take the run through its states; never raises for the run's own failures."""
        try:
            self.outcome = self._run()
        except ObjectNotFound:
            self.logger.warning("Task run %s no longer exists on the server; skipping it", self._label)
            self.outcome = Outcome.SKIPPED
        except Exception:
            self.logger.exception("Could not report the states of task run %s", self._label)
            self.outcome = Outcome.SKIPPED
        return self.outcome

    def _run(self) -> Outcome:
        task, run = self.task, self.task_run
        key = task.task_key
        parameters: dict[str, Any] = {}
        parameter_error: ParameterReadError | None = None
        if should_try_to_read_parameters(task, run):
            assert run.state is not None
            self._parameters_id = run.state.state_details.task_parameters_id
            try:
                payload = read_parameters(
                    self.store, run.state.state_details.task_parameters_id, allow_pickle=self.settings.allow_pickle
                )
                parameters = payload.get("parameters", {})
            except ParameterReadError as exc:
                parameter_error = exc

        if self.prefect_server and self._already_finished():
            return Outcome.SKIPPED
        if (parameter_error is not None or not self.claims_with_running) and not self._claim():
            return Outcome.SKIPPED

        if parameter_error is not None:
            # A retry would read the same bad record: fail for good, with the reason.
            message = f"Task run could not start: {parameter_error}"
            self.logger.error("%s: %s", self._label, message)
            result = self.propose(
                Failed(message, data=self._exception_record(parameter_error), deferred=False), force=True
            )
            if result.status is SetStateStatus.ACCEPT:
                metrics.RUNS_FAILED.labels(task_key=key).inc()
                return Outcome.FAILED
            return Outcome.SKIPPED

        running = self.propose(self._running())
        if running.status is not SetStateStatus.ACCEPT:
            current = running.state
            if current is not None and current.is_terminal():
                self.logger.info("Task run %s is already %s; not running it again", self._label, current.name)
            elif running.status is SetStateStatus.ABORT:
                self.logger.debug("RUNNING aborted for %s: %s", self._label, running.reason)
            else:
                self.logger.warning("Server refused RUNNING for %s (%s): %s", self._label, running.status.value,
                                    running.reason or current)
            return Outcome.SKIPPED

        metrics.RUNS_STARTED.labels(task_key=key).inc()
        self.logger.debug("Running %s", self._label)
        outcome = self._execute(parameters)
        while outcome is Outcome.RETRYING and self._local_retry is not None:
            outcome = self._retry_here(self._local_retry, parameters)
        return outcome

    def _queue_retry(self, retry: State) -> None:
        """Prefect: put an ``AwaitingRetry`` run back on the task queue.

        The embedded server re-queues a run it answered ``AwaitingRetry`` by itself (that
        state is ``deferred``) and delivers it when due. A Prefect server does not (its own
        engine retries in-process): proposing the same state again with ``deferred=True``
        and the run's ``task_parameters_id`` makes it queue the run, and it delivers it at
        once. So the proposal is made when the retry is due, from the worker's retry
        timers, and no slot is held meanwhile. Without timers (a run executed on its own),
        or if the proposal is refused, the retry happens here in-process.
        """
        due = retry.state_details.scheduled_time
        delivered = self.task_run.state
        requeue = State(
            StateType.SCHEDULED, retry.name, message=retry.message,
            state_details=StateDetails(
                deferred=True, scheduled_time=due,
                task_parameters_id=delivered.state_details.task_parameters_id if delivered else None,
            ),
        )
        delay = (due - datetime.now(timezone.utc)).total_seconds() if due is not None else 0.0
        if delay > 0:
            if self.retry_scheduler is not None:
                self.retry_scheduler.schedule(delay, lambda: self._requeue(requeue), self.task_run.id)
            else:
                self._local_retry = retry
        elif not self._requeue(requeue):
            self._local_retry = retry

    def _requeue(self, state: State) -> bool:
        try:
            result = self.propose(state)
        except Exception as exc:  # noqa: BLE001 - reported; the caller decides what next
            self.logger.error("Could not re-queue the retry of %s: %s", self._label, exc)
            return False
        if result.status is not SetStateStatus.ACCEPT:
            self.logger.error("Server refused to re-queue the retry of %s (%s): %s", self._label,
                              result.status.value, result.reason)
            return False
        self.logger.debug("Retry of %s is back on the queue", self._label)
        return True

    def _retry_here(self, retry: State, parameters: dict[str, Any]) -> Outcome:
        """Retry in this thread: the fallback of :meth:`_queue_retry` when the retry
        cannot be put back on a Prefect server's queue. As Prefect's own engine does, it
        waits for the scheduled time, holding the slot, and runs again.
        """
        self._local_retry = None
        scheduled = retry.state_details.scheduled_time
        if scheduled is not None:
            delay = (scheduled - datetime.now(timezone.utc)).total_seconds()
            if delay > 0:
                time.sleep(delay)
        running = self.propose(self._running())
        if running.status is not SetStateStatus.ACCEPT:
            self.logger.warning("Server refused the retry of %s (%s): %s", self._label, running.status.value,
                                running.reason or running.state)
            return Outcome.SKIPPED
        metrics.RUNS_STARTED.labels(task_key=self.task.task_key).inc()
        return self._execute(parameters)

    def _already_finished(self) -> bool:
        """Prefect: a late delivery of a FAILED run, or of a COMPLETED one without result
        data, would be accepted again (Prefect only protects COMPLETED-with-data), so
        read the run's current state first. The embedded server refuses the claim itself."""
        current = self.client.read_task_run(self.task_run.id).state
        if current is not None and current.is_terminal():
            self.logger.info("Task run %s is already %s; not running it again", self._label, current.name)
            return True
        return False

    def _running(self) -> State:
        state = Running()
        state.message = f"Running on {self.claim}"
        return state

    def _claim(self) -> bool:
        """PENDING with ``deferred=True``: the claim that makes a delivery ours."""
        claim = Pending(deferred=True)
        claim.message = f"Claimed by {self.claim}"
        result = self.propose(claim)
        if result.status is SetStateStatus.ACCEPT:
            return True
        if result.status is SetStateStatus.ABORT:
            self.logger.debug("Task run %s is claimed elsewhere (%s); skipping", self._label, result.reason)
        else:
            self.logger.warning("Server refused PENDING for %s (%s): %s", self._label, result.status.value,
                                result.reason or result.state)
        return False

    def _execute(self, parameters: dict[str, Any]) -> Outcome:
        task = self.task
        fn = cancellation.guard(self.task_run.id, task.fn)  # cancellable while it runs
        started = time.monotonic()
        if task.timeout_seconds is not None:
            reported: list[Outcome] = []
            call = call_with_timeout(
                fn, parameters, task.timeout_seconds,
                on_timeout=lambda: reported.append(self._report_timeout()),
                name=f"sync-worker-task-{self.task_run.id}",
            )
            self._observe(started)
            if call.timed_out:
                return reported[0]
            self._executed()
            if call.exception is not None:
                return self._report_failure(call.exception)
            return self._report_success(call.result)
        try:
            value = fn(**parameters)
        except BaseException as exc:  # noqa: BLE001 - SystemExit in a task fails the run, not the worker
            self._observe(started)
            self._executed()
            return self._report_failure(exc)
        self._observe(started)
        self._executed()
        return self._report_success(value)

    def _executed(self) -> None:
        callback, self.on_executed = self.on_executed, None
        if callback is not None:
            callback()

    def _observe(self, started: float) -> None:
        metrics.RUN_DURATION.labels(task_key=self.task.task_key).observe(time.monotonic() - started)

    # -- final states -------------------------------------------------------------------
    def _report_success(self, value: Any) -> Outcome:
        data = None
        if self.task.persist_result:
            try:
                data = self._result_data(value, self.task.result_serializer)
            except Exception as exc:  # noqa: BLE001 - any way the result cannot be kept
                return self._report_unstorable(exc)
        result = self.propose(Completed(data=data))
        return self._final(result, Outcome.COMPLETED)

    def _report_unstorable(self, exc: BaseException) -> Outcome:
        """The function ran but its result cannot be stored: FAILED for good, not retried
        (a retry would repeat the function's side effects and fail the same way)."""
        reason = str(exc) if isinstance(exc, SerializationError) else f"{type(exc).__name__}: {exc}"
        message = f"Task run finished but its result could not be stored, so it is failed without retrying: {reason}"
        self.logger.error("%s: %s", self._label, message)
        result = self.propose(Failed(message, data=self._exception_record(exc), deferred=False), force=True)
        return self._final(result, Outcome.FAILED)

    def _report_failure(self, exc: BaseException) -> Outcome:
        if isinstance(exc, Cancelled):
            return self._report_cancelled(exc)
        if not isinstance(exc, Exception):
            # SystemExit / KeyboardInterrupt raised by the task: still a failure of the run,
            # not of the worker.
            self.logger.warning("Task run %s raised %r", self._label, exc)
        message = exception_message(exc)
        # WARNING with the traceback: whether it is retried is the server's answer (logged next)
        self.logger.warning("%s failed: %s", self._label, message, exc_info=(type(exc), exc, exc.__traceback__))
        result = self.propose(Failed(message, data=self._exception_record(exc), deferred=True))
        return self._final(result, Outcome.FAILED)

    def _forget_parameters(self) -> None:
        """A COMPLETED run needs its parameters no more: delete a local parameters file (the
        embedded server deletes the records it stores itself; FAILED/CRASHED/CANCELLED runs
        keep theirs for ``sync-worker runs show/retry`` until retention removes them)."""
        params_id = self._parameters_id
        if params_id and isinstance(self.store, LocalDirectoryStore):
            try:
                delete_parameters(self.store, params_id)
            except OSError as exc:
                self.logger.debug("Could not delete the parameters of %s: %s", self._label, exc)

    def _report_cancelled(self, exc: Cancelled) -> Outcome:
        """The run was cancelled while it ran here (see :mod:`sync_worker.cancellation`)."""
        self.logger.info("%s cancelled: %s", self._label, exc)
        result = self.propose(State(StateType.CANCELLED, "Cancelled", message=f"Cancelled while running: {exc}"))
        if result.status is SetStateStatus.ACCEPT:
            return Outcome.CANCELLED
        self.logger.warning("Server refused CANCELLED for %s (%s): %s", self._label, result.status.value,
                            result.reason or result.state)
        return Outcome.SKIPPED

    def _report_timeout(self) -> Outcome:
        message = f"Task run exceeded timeout of {self.task.timeout_seconds} second(s)"
        self.logger.error("%s: %s", self._label, message)
        exc = TaskRunTimeoutError(message)
        result = self.propose(Failed(message, name="TimedOut", data=self._exception_record(exc), deferred=True))
        return self._final(result, Outcome.TIMED_OUT)

    def _result_data(self, value: Any, serializer: str) -> Any:
        """The final state's ``data``: inline on the embedded server when small (no file;
        no Prefect caller reads these), else a record in the store."""
        if not self.prefect_server:
            data = inline_result(value, serializer)
            if data is not None:
                return data
        return write_result(self.store, value, serializer=serializer)

    def _exception_record(self, exc: BaseException) -> Any:
        try:
            return self._result_data(describe_exception(exc), "json")
        except Exception as err:  # noqa: BLE001 - the state message still says what happened
            self.logger.warning("Could not store the exception of %s: %s", self._label, err)
            return None

    def _final(self, result: OrchestrationResult, wanted: Outcome) -> Outcome:
        key = self.task.task_key
        if result.status is SetStateStatus.ACCEPT:
            if wanted is Outcome.COMPLETED:
                metrics.RUNS_COMPLETED.labels(task_key=key).inc()
                self._forget_parameters()
            else:
                metrics.RUNS_FAILED.labels(task_key=key).inc()
            if self.prefect_server and result.state is not None:
                emit_final_state_event(self.client, self.task_run, result.state)
            return wanted
        state = result.state
        if result.status is SetStateStatus.REJECT and state is not None and state.type is StateType.SCHEDULED:
            metrics.RUNS_RETRIED.labels(task_key=key).inc()
            self.logger.info("%s will be retried (%s%s)", self._label, state.name,
                             f", at {state.state_details.scheduled_time.isoformat()}"
                             if state.state_details.scheduled_time else "")
            if not state.state_details.deferred:
                self._queue_retry(state)
            return Outcome.RETRYING
        if result.status is SetStateStatus.ABORT:
            self.logger.debug("Final state of %s aborted: %s", self._label, result.reason)
        else:
            self.logger.warning("Server refused the final state of %s (%s): %s", self._label,
                                result.status.value, result.reason or state)
        return Outcome.SKIPPED


class RetryScheduler(Protocol):
    """Runs ``action`` after ``delay`` seconds (the worker's retry timers)."""

    def schedule(self, delay: float, action: Callable[[], Any], name: str) -> None: ...


#: API URLs that answered 404 to POST /events (the embedded server): not asked again.
_NO_EVENTS: set[str] = set()

#: Seconds after which a final-state event is POSTed a second time (see _EventRepeater).
REPEAT_EVENT_AFTER = 8.0


class _EventRepeater:
    """POSTs final-state events a second time, :data:`REPEAT_EVENT_AFTER` seconds later.

    Prefect's caller subscribes to ``/api/events/out`` in the background and reads the
    run without waiting for that subscription; an event published before it is up is
    only found again by a backfill from the database, which Prefect's event persister
    fills every few seconds. A run finished inside that window would leave the caller
    asleep until its timeout. The repeat arrives after the subscription is up. It needs
    a new event id: Prefect's event pipeline drops an id it has seen (a waiter woken twice
    for one run is harmless). One daemon thread, batching one POST per API.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[tuple[float, Client, dict[str, Any]]] = deque()
        self._thread: threading.Thread | None = None

    def add(self, client: Client, event: dict[str, Any]) -> None:
        with self._cond:
            repeat = {**event, "id": str(uuid.uuid4())}
            self._queue.append((time.monotonic() + REPEAT_EVENT_AFTER, client, repeat))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="sync-worker-events", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                delay = self._queue[0][0] - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                due: dict[int, tuple[Client, list[dict[str, Any]]]] = {}
                while self._queue and self._queue[0][0] <= time.monotonic():
                    _, client, event = self._queue.popleft()
                    due.setdefault(id(client), (client, []))[1].append(event)
            for client, events in due.values():
                try:
                    client.emit_events(events)
                except Exception as exc:  # noqa: BLE001 - the first POST went through; this is a courtesy
                    logger.debug("Repeating %d final-state event(s) failed: %s", len(events), exc)

    def forget(self) -> None:
        """After a fork: the thread is the parent's; the queue is not ours to send."""
        self._cond = threading.Condition()
        self._queue.clear()
        self._thread = None


_REPEATER = _EventRepeater()
os.register_at_fork(after_in_child=_REPEATER.forget)


def emit_final_state_event(client: Client, task_run: TaskRun, state: State) -> None:
    """Prefect: tell a waiting Prefect caller that the run finished.

    A Prefect server records REST ``set_state`` but emits no task-run event for it, and
    ``PrefectDistributedFuture.result()`` waits only for events (``/api/events/out``):
    without this it returns at its timeout, or never. The event is named after the state
    *type* (the caller's filter), the real name stays in ``validated_state``.
    """
    if client.api_url in _NO_EVENTS:
        return
    state_json = state.to_json()
    state_json.setdefault("message", "")
    event = {
        "id": state.id or str(uuid.uuid4()),
        "occurred": format_datetime(state.timestamp or datetime.now(timezone.utc)),
        "event": f"prefect.task-run.{state.type.value.capitalize()}",
        "resource": {
            "prefect.resource.id": f"prefect.task-run.{task_run.id}",
            "prefect.resource.name": task_run.name,
            "prefect.state-name": state.name,
            "prefect.state-type": state.type.value,
        },
        "related": [],
        "payload": {
            "intended": {"from": "RUNNING", "to": state.type.value},
            "initial_state": {"type": "RUNNING", "name": "Running", "message": "", "state_details": {}},
            "validated_state": state_json,
        },
    }
    try:
        client.emit_events([event])
    except ObjectNotFound:
        _NO_EVENTS.add(client.api_url)
        return
    except Exception as exc:  # noqa: BLE001 - the state is recorded; only the caller's wake-up is late
        logger.warning("Could not send the final-state event of task run %s: %s", task_run.id, exc)
    _REPEATER.add(client, event)


def run_task_run(task: Task[..., Any], task_run: TaskRun, **options: Any) -> Outcome:
    """Run one delivered task run; ``options`` are :class:`TaskRunEngine`'s keywords."""
    return TaskRunEngine(task, task_run, **options).run()


__all__ = ["Outcome", "TaskRunEngine", "exception_message", "run_task_run", "should_try_to_read_parameters"]
