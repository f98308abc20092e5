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

Where the server's behaviour differs (how a run is claimed, whether to check that it
is already finished, retries, where results go, final-state events) the engine asks its
injected dialect (:mod:`sync_worker.dialects`), chosen once per connection from what the
server announced. How a proposal travels (socket or REST, one error mapping) is the
transport's business (:mod:`sync_worker.transport`); the one retry rule of state reports
is here (:meth:`TaskRunEngine._send`). A repeated proposal whose first attempt did land
is refused (ABORT/REJECT); the engine recognises its own state by the unique claim marker
it puts in the PENDING and RUNNING messages (and by the message/result of final states)
and carries on instead of skipping a run it holds.

On a Prefect server with a worker (:class:`~sync_worker.dialects.PrefectDialect` with the
worker's reporting), RUNNING and COMPLETED are not proposed: they are reported as Prefect's
own engine reports them, as client-side-orchestration events (:meth:`Dialect.send_state`),
the COMPLETED one read back later and proposed over REST if Prefect did not record it. A
failure is still proposed, once Prefect has recorded the RUNNING event (its retry rule
counts from it); see :meth:`TaskRunEngine._report_failed`.

A run claimed at delivery (the embedded server's ``claim_at_delivery``: it arrives RUNNING,
committed and leased to the worker's connection) skips both PENDING and RUNNING proposals:
it is read, called and its final state proposed.

A run whose claim could not be recorded (the server stayed unreachable until the worker
gave up) ends :attr:`Outcome.UNCLAIMED`: it was not started, and the worker hands it back.
"""
from __future__ import annotations

import enum
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable

import tenacity

from sync_worker import cancellation, exceptions, metrics
from sync_worker.dialects import Dialect, choose_dialect
from sync_worker.exceptions import (
    Cancelled,
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
    StateType,
    TaskRun,
)
from sync_worker.services import is_intermittent
from sync_worker.storage import (
    LocalDirectoryStore,
    delete_parameters,
    describe_exception,
    exception_text,
    read_parameters,
    sendable_text,
)
from sync_worker.timeouts import TaskRunTimeoutError, call_with_timeout
from sync_worker.transport import Transport

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
#: How long a delivered run the server says does not exist (404) is read again before it
#: counts as deleted: Prefect's server can deliver a run before its create is readable.
NOT_YET_READABLE_SECONDS = 5.0


class Outcome(str, enum.Enum):
    """What became of a run on this worker."""

    COMPLETED = "completed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    RETRYING = "retrying"  # failed; the server scheduled a retry
    SKIPPED = "skipped"  # not executed here (claimed elsewhere, terminal, refused)
    CANCELLED = "cancelled"  # cancelled while it ran here (sync_worker.cancellation)
    UNCLAIMED = "unclaimed"  # not started: its claim could not be recorded before the worker gave up
    #: executed; its final state is on its way, the outcome goes to ``on_reported`` (see TaskRunEngine)
    REPORTING = "reporting"
    #: executed; the worker's drain deadline passed before the server took its final state
    #: (no answer, or a 5xx such as a full disk): the server gives the run out again after its lease
    UNCONFIRMED = "unconfirmed"


def should_try_to_read_parameters(task: Task[..., Any], task_run: TaskRun) -> bool:
    """Whether a run's parameters should be read from the store before it can run.

    Prefect's answer: True when the function takes parameters at all (and the run has a
    state whose details can name a record); a function without parameters never needs
    them. A run that should but names no record (``task_parameters_id`` None) was created
    without any: Prefect's worker skips it and leaves it SCHEDULED; this one calls the
    function without arguments, so that it runs with its defaults or fails saying which
    argument is missing.
    """
    return task_run.state is not None and task.takes_parameters


#: Longest state message the engine proposes. The embedded server refuses messages over
#: 100,000 characters (422): a run whose exception text is longer would stay RUNNING, its
#: FAILED refused. The whole text is in the failure's record (``data``) anyway.
MAX_STATE_MESSAGE = 10_000


def short_message(text: str) -> str:
    """``text``, cut to :data:`MAX_STATE_MESSAGE` characters with a note of what was left out."""
    text = sendable_text(text)
    if len(text) <= MAX_STATE_MESSAGE:
        return text
    return text[:MAX_STATE_MESSAGE] + f"... ({len(text) - MAX_STATE_MESSAGE} more characters in the run's result)"


def exception_message(exc: BaseException) -> str:
    """Prefect's wording of a failed run's message (cut: see :data:`MAX_STATE_MESSAGE`)."""
    return short_message(f"Task run encountered an exception {type(exc).__name__}: {exception_text(exc)}")


class TaskRunEngine:
    """Executes one task run of ``task``, reporting states to the server.

    Args:
        task: the :class:`~sync_worker.tasks.Task` whose key matches the run.
        task_run: the run as delivered.
        client: REST client (every proposal can fall back to it).
        store: where parameter and result records live.
        settings: for ``allow_pickle`` and ``request_timeout``.
        subscription: the worker's subscription (its connection carries proposals when
            it offers ``set_state``, and says which dialect applies).
        dialect: how the server behaves (default: the subscription's current one, else
            :func:`~sync_worker.dialects.choose_dialect` of what it announced).
        transport: how proposals travel (default: socket when offered, else REST).
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
        dialect: Dialect | None = None,
        transport: Transport | None = None,
        on_executed: Callable[[], None] | None = None,
        keep_trying: Callable[[], bool] | None = None,
        claimed_at_delivery: bool = False,
        on_reported: Callable[[Outcome], None] | None = None,
        run_later: Callable[[Callable[[], None]], None] | None = None,
        on_ran: Callable[[float], None] | None = None,
    ):
        self.task = task
        self.task_run = task_run
        self.client = client
        self.store = store
        self.settings = settings
        if dialect is None:
            dialect = getattr(subscription, "dialect", None)
        if dialect is None:
            dialect = choose_dialect(getattr(subscription, "server_extensions", ()),
                                     fast_path=bool(getattr(subscription, "supports_set_state", False)))
        #: How this server behaves (claims, retries, results, events).
        self.dialect = dialect
        #: How proposals travel (one attempt each; the retry rule is :meth:`_send`).
        self.transport = transport or Transport(client, subscription)
        #: Called once the task function has returned, before its final state is reported:
        #: the worker frees the execution slot then, so the next run's delivery overlaps
        #: this run's report.
        self.on_executed = on_executed
        #: Whether a proposal the server could not take (connection lost, 5xx: disk full,
        #: database locked, restarting) is tried again. The worker's rule: as long as it is
        #: not stopped past its drain timeout. Without one: for REPORT_RETRY_SECONDS.
        self.keep_trying = keep_trying
        #: The server committed RUNNING when it delivered this run (``claim_at_delivery``):
        #: it is ours already, so no claim and no RUNNING proposal (only if it did arrive
        #: RUNNING; otherwise the usual claim applies).
        self.claimed_at_delivery = (claimed_at_delivery and task_run.state is not None
                                    and task_run.state.type is StateType.RUNNING)
        #: Given: the COMPLETED state of a run claimed at delivery is sent over the socket
        #: without waiting for its answer (:meth:`_report_async`); :meth:`run` returns
        #: :attr:`Outcome.REPORTING` and the outcome is passed to ``on_reported`` once known.
        self.on_reported = on_reported
        #: Where the rest of such a report goes when the answer is not an ACCEPT (a call
        #: that may block, retrying): the worker's run threads; default a thread of its own.
        self.run_later = run_later
        #: Given: called with the seconds the task function took, once it returned or raised
        #: (the worker learns which tasks are long: see TaskWorker._yields_after).
        self.on_ran = on_ran
        self.logger = logging.LoggerAdapter(logger, {"task_run_id": task_run.id})
        self.state: State | None = task_run.state
        self.outcome: Outcome | None = None
        self._local_retry: State | None = None
        #: seconds the run has spent RUNNING here (the task-run payload of state events)
        self.total_run_time = 0.0
        #: RUNNING went as an event (:meth:`Dialect.send_state`): the server may not know it yet
        self._running_sent = False
        #: the RUNNING state this worker sent as an event (what :meth:`Dialect.running_recorded` looks for)
        self.running_state: State | None = None
        #: id of the last state event this engine sent: the next one ``follows`` it, as
        #: Prefect's engine chains them (``TaskRunEngine._last_event``)
        self.last_event_id: str | None = None
        self._started = False  # the function was called (a later failure to report is not "unclaimed")

    _claim_marker: str | None = None

    @property
    def claim(self) -> str:
        """Marks this engine's PENDING/RUNNING proposals, so that a repeated proposal can
        recognise the state an earlier attempt already set (made when first needed: a run
        claimed at delivery proposes neither)."""
        if self._claim_marker is None:
            self._claim_marker = f"{socket.gethostname()}-{os.getpid()} ({uuid.uuid4().hex[:12]})"
        return self._claim_marker

    @property
    def label(self) -> str:
        return f"{self.task_run.name!r} ({self.task_run.id})"

    # -- proposals ---------------------------------------------------------------------
    def propose(self, state: State, force: bool = False, first: OrchestrationResult | None = None) -> OrchestrationResult:
        """Propose ``state``; honours WAIT by sleeping and proposing again (bounded).
        ``first``: the answer to a proposal of it sent already (:meth:`_report_async`)."""
        state.state_details.task_run_id = self.task_run.id
        for _ in range(MAX_WAITS):
            result, first = (first, None) if first is not None else (self._send(state, force), None)
            if result.status in (SetStateStatus.ABORT, SetStateStatus.REJECT) and self._landed(state, result):
                self.logger.debug("%s of %s had already been applied (a repeated proposal)", state.name, self.label)
                result = OrchestrationResult(SetStateStatus.ACCEPT, result.state, {"type": "accept_details"})
            if result.status is not SetStateStatus.WAIT:
                if result.state is not None and result.status is SetStateStatus.ACCEPT:
                    self.state = result.state
                return result
            delay = min(max(result.delay_seconds, 0.0), MAX_WAIT_SECONDS)
            self.logger.debug("Server asked to wait %.2fs before %s for %s", delay, state.name, self.label)
            time.sleep(delay)
        self.logger.warning("Giving up %s for %s after %d WAIT answers", state.name, self.label, MAX_WAITS)
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
                self.logger.debug("Could not read %s: %s", self.label, exc)
                return False
        return (
            current is not None
            and current.type is proposed.type
            and current.message == proposed.message
            and (proposed.data is None or current.data == proposed.data)
        )

    def _send(self, state: State, force: bool) -> OrchestrationResult:
        """One proposal, tried until the server answers it (see :meth:`_send_retrying`).
        The first attempt is made directly: the retry machinery is built only when it
        fails (it was a tenth of the worker's CPU per run when built for every proposal)."""
        started = time.monotonic()
        try:
            return self._send_once(state, force)
        except Exception as exc:
            if not is_intermittent(exc) or (self.keep_trying is not None and not self.keep_trying()):
                raise
            self.logger.warning("Could not report %s for %s (%s); trying again", state.name, self.label, exc)
        return self._send_retrying(state, force, started)

    def _send_retrying(self, state: State, force: bool, started: float) -> OrchestrationResult:
        """One proposal, tried until the server answers it. The one retry rule of state
        reports: each attempt is one :meth:`Transport.set_state` (socket when offered,
        else one REST request; no retry of its own); an attempt that fails intermittently (connection lost, timeout, 5xx) is repeated after
        an exponential backoff with jitter (at most :data:`REPORT_MAX_BACKOFF` s) for as long
        as :attr:`keep_trying` says. A repeated proposal that had landed is recognised by
        :meth:`_landed`."""
        def stop(retry_state: tenacity.RetryCallState) -> bool:
            if self.keep_trying is not None:
                return not self.keep_trying()
            return time.monotonic() - started >= REPORT_RETRY_SECONDS

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_intermittent),
            wait=tenacity.wait_exponential_jitter(multiplier=0.1, max=REPORT_MAX_BACKOFF),
            stop=stop,
            before_sleep=lambda rs: self.logger.warning(
                "Could not report %s for %s (%s); trying again in %.1fs", state.name, self.label,
                rs.outcome.exception() if rs.outcome else None, rs.next_action.sleep if rs.next_action else 0),
            reraise=True,
        )
        return retrying(self._send_once, state, force)

    def _send_once(self, state: State, force: bool) -> OrchestrationResult:
        """One attempt, by the transport (socket when offered, else REST)."""
        return self.transport.set_state(self.task_run.id, state, force=force, timeout=self.settings.request_timeout)

    # -- the run -----------------------------------------------------------------------
    def run(self) -> Outcome:
        """Take the run through its states; never raises for the run's own failures."""
        try:
            outcome = self._run()
            if outcome is Outcome.REPORTING:  # on_reported gets the outcome (maybe has already)
                return outcome
            self.outcome = outcome
        except exceptions.ObjectNotFound:
            self.logger.warning("Task run %s no longer exists on the server; skipping it", self.label)
            self.outcome = Outcome.SKIPPED
        except Exception as exc:
            if not self._started and is_intermittent(exc):
                self.logger.error("Could not claim task run %s (%s); not starting it", self.label, exc)
                self.outcome = Outcome.UNCLAIMED
            else:
                self._log_report_refused(exc)
                self.outcome = Outcome.UNCONFIRMED if self._gave_up(exc) else Outcome.SKIPPED
        return self.outcome

    def _past_deadline(self, exc: BaseException) -> bool:
        """Whether reporting stopped at the worker's drain deadline on a failure that is
        worth retrying (no answer, a 5xx): the state is not on the server."""
        return is_intermittent(exc) and self.keep_trying is not None and not self.keep_trying()

    def _gave_up(self, exc: BaseException) -> bool:
        """:meth:`_past_deadline` for a run whose function was called (abandoned, unconfirmed)."""
        return self._started and self._past_deadline(exc)

    def _log_report_refused(self, exc: BaseException) -> None:
        """The server refused a report (401, 422, ...): its answer says all, one line; anything
        else is unexpected and logged with its traceback."""
        if self._past_deadline(exc):
            # the worker stopped at its drain timeout before the server's answer came: no bug
            self.logger.warning("Stopped before the server answered about task run %s (%s); the server has its "
                                "state, or gives the run to a worker again when its lease expires", self.label, exc)
        elif isinstance(exc, exceptions.SyncWorkerError) and getattr(exc, "status_code", None) is not None:
            self.logger.error("Could not report the states of task run %s: %s", self.label, exc)
        else:
            self.logger.error("Could not report the states of task run %s", self.label, exc_info=exc)

    def _run(self) -> Outcome:
        task, run = self.task, self.task_run
        key = task.task_key
        parameters: dict[str, Any] = {}
        parameter_error: ParameterReadError | None = None
        params_id = run.state.state_details.task_parameters_id if run.state is not None else None
        if params_id and should_try_to_read_parameters(task, run):
            record = run.parameters_record  # came with the run: kept (and deleted) by the server
            self._parameters_id = params_id if record is None else None
            try:
                payload = read_parameters(self.store, params_id, allow_pickle=self.settings.allow_pickle,
                                          record=record)
                parameters = payload.get("parameters", {})
            except ParameterReadError as exc:
                parameter_error = exc

        dialect = self.dialect
        if dialect.checks_finished and self._already_finished():
            return Outcome.SKIPPED
        claimed = self.claimed_at_delivery
        if not claimed and (parameter_error is not None or not dialect.claims_with_running) and not self._claim():
            return Outcome.SKIPPED

        if parameter_error is not None:
            if claimed and not dialect.checks_finished and self._already_finished():
                # a stale delivery (the run finished elsewhere and its parameters went with
                # it): the forced FAILED below would replace its final state
                return Outcome.SKIPPED
            # A retry would read the same bad record: fail for good, with the reason.
            message = f"Task run could not start: {parameter_error}"
            self.logger.error("%s: %s", self.label, message)
            result = self.propose(
                Failed(message, data=self._exception_record(parameter_error), deferred=False), force=True
            )
            if result.status is SetStateStatus.ACCEPT:
                metrics.RUNS_FAILED.labels(task_key=key).inc()
                return Outcome.FAILED
            return Outcome.SKIPPED

        if claimed:
            running = OrchestrationResult(SetStateStatus.ACCEPT, run.state, {})
        else:
            state = self._running()
            self._running_sent = dialect.send_state(self, state)
            running = (OrchestrationResult(SetStateStatus.ACCEPT, state, {}) if self._running_sent
                       else self.propose(state))
        if running.status is not SetStateStatus.ACCEPT:
            current = running.state
            if current is not None and current.is_terminal():
                self.logger.info("Task run %s is already %s; not running it again", self.label, current.name)
            elif running.status is SetStateStatus.ABORT:
                self.logger.debug("RUNNING aborted for %s: %s", self.label, running.reason)
            else:
                self.logger.warning("Server refused RUNNING for %s (%s): %s", self.label, running.status.value,
                                    running.reason or current)
            return Outcome.SKIPPED

        metrics.RUNS_STARTED.labels(task_key=key).inc()
        self.logger.debug("Running %s", self.label)
        outcome = self._execute(parameters)
        while outcome is Outcome.RETRYING and self._local_retry is not None:
            outcome = self._retry_here(self._local_retry, parameters)
        return outcome

    def _retry_here(self, retry: State, parameters: dict[str, Any]) -> Outcome:
        """Retry in this thread: when the dialect cannot put the retry back on the
        server's queue (see :meth:`Dialect.awaiting_retry`). As Prefect's own engine does, it
        waits for the scheduled time, holding the slot, and runs again.
        """
        self._local_retry = None
        self._running_sent = False  # this attempt's states are proposals
        scheduled = retry.state_details.scheduled_time
        if scheduled is not None:
            delay = (scheduled - datetime.now(timezone.utc)).total_seconds()
            if delay > 0:
                time.sleep(delay)
        running = self.propose(self._running())
        if running.status is not SetStateStatus.ACCEPT:
            self.logger.warning("Server refused the retry of %s (%s): %s", self.label, running.status.value,
                                running.reason or running.state)
            return Outcome.SKIPPED
        metrics.RUNS_STARTED.labels(task_key=self.task.task_key).inc()
        return self._execute(parameters)

    def _already_finished(self) -> bool:
        """(Prefect dialect) a late delivery of a FAILED run, or of a COMPLETED one without result
        data, would be accepted again (Prefect only protects COMPLETED-with-data), so
        read the run's current state first. The embedded server refuses the claim itself
        (read here too before a forced report of a claimed run that could not start).

        A 404 is read again for :data:`NOT_YET_READABLE_SECONDS`: Prefect 3.8.8's server
        queues a run for delivery before its create is readable (2-4 runs in 100 were lost,
        left SCHEDULED forever, when the first 404 meant "deleted")."""
        try:  # nearly always readable: no retry policy built per run
            current = self.client.read_task_run(self.task_run.id).state
        except exceptions.ObjectNotFound:
            reading = tenacity.Retrying(
                retry=tenacity.retry_if_exception_type(exceptions.ObjectNotFound),
                wait=tenacity.wait_exponential(multiplier=0.02, max=0.5),
                stop=tenacity.stop_after_delay(NOT_YET_READABLE_SECONDS),
                before_sleep=lambda rs: self.logger.debug(
                    "Task run %s not found yet (delivered before its creation is readable?); reading it again",
                    self.label),
                reraise=True,
            )
            current = reading(self.client.read_task_run, self.task_run.id).state
        if current is not None and current.is_terminal():
            self.logger.info("Task run %s is already %s; not running it again", self.label, current.name)
            return True
        return False

    def _running(self) -> State:
        state = Running()
        delivered = self.task_run.state
        if delivered is not None and delivered.name == "AwaitingRetry":
            # named as Prefect's engine names it (its server renames only what it
            # orchestrates; a RUNNING sent as an event is recorded as named)
            state.name = "Retrying"
        state.message = f"Running on {self.claim}"
        return state

    def _claim(self) -> bool:
        """PENDING with ``deferred=True``: the claim that makes a delivery ours."""
        claim = Pending(deferred=True)
        claim.message = f"Claimed by {self.claim}"
        delivered = self.state
        result = self.propose(claim)
        if result.status is SetStateStatus.ACCEPT:
            self.dialect.claimed(self, delivered)
            return True
        if result.status is SetStateStatus.ABORT:
            self.logger.debug("Task run %s is claimed elsewhere (%s); skipping", self.label, result.reason)
        else:
            self.logger.warning("Server refused PENDING for %s (%s): %s", self.label, result.status.value,
                                result.reason or result.state)
        return False

    def _execute(self, parameters: dict[str, Any]) -> Outcome:
        task = self.task
        fn = task.callable_by_name(task.fn)
        if task.log_prints:
            from sync_worker.printlog import printing_to_log

            fn = printing_to_log(fn, self.label)
        fn = cancellation.guard(self.task_run.id, fn)  # cancellable while it runs
        self._started = True
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
        seconds = time.monotonic() - started
        metrics.RUN_DURATION.labels(task_key=self.task.task_key).observe(seconds)
        if self.on_ran is not None:
            self.on_ran(seconds)

    # -- final states -------------------------------------------------------------------
    def _report_success(self, value: Any) -> Outcome:
        data = None
        if self.task.persist_result:
            try:
                data = self._result_data(value, self.task.result_serializer)
            except Exception as exc:  # noqa: BLE001 - any way the result cannot be kept
                return self._report_unstorable(exc)
        completed = Completed(data=data)
        if self._running_sent and self.dialect.send_state(self, completed, final=True):
            return self._final(OrchestrationResult(SetStateStatus.ACCEPT, completed, {}), Outcome.COMPLETED,
                               announced=True)
        if self._report_async(completed):
            return Outcome.REPORTING
        result = self.propose(completed)
        return self._final(result, Outcome.COMPLETED)

    # -- a final state sent without waiting --------------------------------------------------
    def _report_async(self, completed: State) -> bool:
        """Send the COMPLETED state of a run claimed at delivery over the socket and return
        at once (True), when the worker asked for it (``on_reported``) and the socket carries
        states now: the run thread is free for the next run, and the answer is handled by the
        thread that reads the socket (:meth:`_answered`) instead of waking this one (a thread
        hand-off per run, the largest single cost in the worker's profile after JSON).

        The guarantees are those of :meth:`propose`: an ACCEPT ends the run there; anything
        else (a refusal, WAIT, an error answer, the connection ending first) is handed to a
        run thread (``run_later``), which carries on exactly as :meth:`propose` and :meth:`_final` do
        (the same retry rule, a repeat that landed recognised). The worker keeps the run
        in flight, and its connection open while stopping, until ``on_reported`` is called."""
        if self.on_reported is None or not self.claimed_at_delivery or self._running_sent:
            return False
        completed.state_details.task_run_id = self.task_run.id
        return self.transport.set_state_async(
            self.task_run.id, completed,
            on_result=lambda result, error: self._answered(completed, result, error))

    def _answered(self, completed: State, result: OrchestrationResult | None, error: BaseException | None) -> None:
        """The answer to :meth:`_report_async`'s proposal, in the socket's reader thread (or
        the thread that ended the connection): quick, never blocking. An ACCEPT is recorded
        here (metrics, the local parameters file, ``on_reported``); the rest goes on in a
        run thread (:meth:`_finish_report`): as many as there are run threads at most, as
        when the run threads themselves were waiting for their answers."""
        if error is None and result is not None and result.status is SetStateStatus.ACCEPT:
            outcome = Outcome.COMPLETED
            try:
                if result.state is not None:
                    self.state = result.state
                outcome = self._final(result, Outcome.COMPLETED)
            except Exception:  # noqa: BLE001 - bookkeeping only: the server has the state
                self.logger.exception("Recording the final state of %s", self.label)
            self._reported(outcome)
            return

        def finish() -> None:
            self._finish_report(completed, result, error)

        if self.run_later is not None:
            try:
                self.run_later(finish)
                return
            except RuntimeError:  # the run threads are shut down (stopping): a thread of its own
                pass
        threading.Thread(target=finish, name=f"sync-worker-report-{self.task_run.id}", daemon=True).start()

    def _finish_report(self, completed: State, result: OrchestrationResult | None, error: BaseException | None) -> None:
        """What :meth:`propose` and :meth:`_final` do with an answer other than ACCEPT."""
        outcome = Outcome.SKIPPED
        try:
            if error is not None:
                if not is_intermittent(error) or (self.keep_trying is not None and not self.keep_trying()):
                    raise error
                self.logger.debug("Reporting %s for %s got no answer (%s); proposing it again", completed.name,
                                  self.label, error)
                result = self.propose(completed)
            else:
                result = self.propose(completed, first=result)
            outcome = self._final(result, Outcome.COMPLETED)
        except exceptions.ObjectNotFound:
            self.logger.warning("Task run %s no longer exists on the server; skipping it", self.label)
        except Exception as exc:  # noqa: BLE001 - as run() does
            self._log_report_refused(exc)
            if self._gave_up(exc):
                outcome = Outcome.UNCONFIRMED
        finally:
            self._reported(outcome)

    def _reported(self, outcome: Outcome) -> None:
        self.outcome = outcome
        callback, self.on_reported = self.on_reported, None
        if callback is not None:
            callback(outcome)

    def _report_unstorable(self, exc: BaseException) -> Outcome:
        """The function ran but its result cannot be stored: FAILED for good, not retried
        (a retry would repeat the function's side effects and fail the same way)."""
        reason = exception_text(exc) if isinstance(exc, SerializationError) else \
            f"{type(exc).__name__}: {exception_text(exc)}"
        message = short_message(
            f"Task run finished but its result could not be stored, so it is failed without retrying: {reason}")
        self.logger.error("%s: %s", self.label, message)
        result = self.propose(Failed(message, data=self._exception_record(exc), deferred=False), force=True)
        return self._final(result, Outcome.FAILED)

    def _report_failure(self, exc: BaseException) -> Outcome:
        if isinstance(exc, Cancelled):
            return self._report_cancelled(exc)
        if not isinstance(exc, Exception):
            # SystemExit / KeyboardInterrupt raised by the task: still a failure of the run,
            # not of the worker.
            self.logger.warning("Task run %s raised %r", self.label, exc)
        message = exception_message(exc)
        # WARNING with the traceback: whether it is retried is the server's answer (logged next)
        self.logger.warning("%s failed: %s", self.label, message, exc_info=(type(exc), exc, exc.__traceback__))
        return self._report_failed(Failed(message, data=self._exception_record(exc), deferred=True), Outcome.FAILED)

    def _report_failed(self, failed: State, wanted: Outcome) -> Outcome:
        """A failure that may be retried: proposed, and the server decides the retry (it
        keeps the run's attempt count). When RUNNING went as an event, the server decides
        it right only once it has recorded that event (Prefect's retry rule applies from
        RUNNING, with the ``run_count`` the event set; from PENDING it would take the
        FAILED as final: a lost retry), so the dialect waits for that first (bounded); if
        it is not recorded in time, RUNNING is proposed, then the FAILED.

        Why not decide the retry here, as Prefect's engine does: the count of attempts is
        the server's ``run_count``, which only a recorded RUNNING raises; a worker deciding
        from the delivered count while RUNNING events go unrecorded would retry for ever."""
        if self._running_sent and not self.dialect.running_recorded(self):
            running = self.propose(self._running())
            if running.status is not SetStateStatus.ACCEPT:
                self.logger.warning("Server refused RUNNING for %s before its failure (%s): %s", self.label,
                                    running.status.value, running.reason or running.state)
        return self._final(self.propose(failed), wanted)

    def _forget_parameters(self) -> None:
        """A COMPLETED run needs its parameters no more: delete a local parameters file (the
        embedded server deletes the records it stores itself; FAILED/CRASHED/CANCELLED runs
        keep theirs for ``sync-worker runs show/retry`` until retention removes them)."""
        params_id = self._parameters_id
        if params_id and isinstance(self.store, LocalDirectoryStore):
            try:
                delete_parameters(self.store, params_id)
            except OSError as exc:
                self.logger.debug("Could not delete the parameters of %s: %s", self.label, exc)

    def _report_cancelled(self, exc: Cancelled) -> Outcome:
        """The run was cancelled while it ran here (see :mod:`sync_worker.cancellation`)."""
        text = exception_text(exc)
        why = short_message(f": {text}") if text else ""  # raised into the thread, it carries no text
        self.logger.info("%s cancelled while running%s", self.label, why)
        result = self.propose(State(StateType.CANCELLED, "Cancelled", message=f"Cancelled while running{why}"))
        if result.status is SetStateStatus.ACCEPT:
            return Outcome.CANCELLED
        self.logger.warning("Server refused CANCELLED for %s (%s): %s", self.label, result.status.value,
                            result.reason or result.state)
        return Outcome.SKIPPED

    def _report_timeout(self) -> Outcome:
        message = f"Task run exceeded timeout of {self.task.timeout_seconds} second(s)"
        self.logger.error("%s: %s", self.label, message)
        exc = TaskRunTimeoutError(message)
        return self._report_failed(Failed(message, name="TimedOut", data=self._exception_record(exc), deferred=True),
                                   Outcome.TIMED_OUT)

    def _result_data(self, value: Any, serializer: str) -> Any:
        """The final state's ``data``: where it goes is the dialect's answer."""
        return self.dialect.result_data(self.task_run, value, serializer, self.store)

    def _exception_record(self, exc: BaseException) -> Any:
        try:
            return self._result_data(describe_exception(exc), "json")
        except Exception as err:  # noqa: BLE001 - the state message still says what happened
            self.logger.warning("Could not store the exception of %s: %s", self.label, err)
            return None

    def _final(self, result: OrchestrationResult, wanted: Outcome, announced: bool = False) -> Outcome:
        """``announced``: the final state went as an event already (no ``finished`` event)."""
        key = self.task.task_key
        if result.status is SetStateStatus.ACCEPT:
            if wanted is Outcome.COMPLETED:
                metrics.RUNS_COMPLETED.labels(task_key=key).inc()
                self._forget_parameters()
            else:
                metrics.RUNS_FAILED.labels(task_key=key).inc()
            if result.state is not None and not announced:
                self.dialect.finished(self.client, self.task_run, result.state)
            return wanted
        state = result.state
        if result.status is SetStateStatus.REJECT and state is not None and state.type is StateType.SCHEDULED:
            metrics.RUNS_RETRIED.labels(task_key=key).inc()
            self.logger.info("%s will be retried (%s%s)", self.label, state.name,
                             f", at {state.state_details.scheduled_time.isoformat()}"
                             if state.state_details.scheduled_time else "")
            if not state.state_details.deferred:
                self._local_retry = self.dialect.awaiting_retry(self, state)
            return Outcome.RETRYING
        if result.status is SetStateStatus.ABORT:
            # e.g. its lease ran out during a partition and another worker ran it meanwhile:
            # a line for whoever looks for why a run executed twice
            self.logger.info("Final state of %s not recorded (ABORT): %s", self.label, result.reason)
        else:
            self.logger.warning("Server refused the final state of %s (%s): %s", self.label,
                                result.status.value, result.reason or state)
        return Outcome.SKIPPED


def run_task_run(task: Task[..., Any], task_run: TaskRun, **options: Any) -> Outcome:
    """Run one delivered task run; ``options`` are :class:`TaskRunEngine`'s keywords."""
    return TaskRunEngine(task, task_run, **options).run()


__all__ = ["Outcome", "TaskRunEngine", "exception_message", "run_task_run", "should_try_to_read_parameters"]
