"""How the server behaves: the embedded server's dialect or a Prefect server's.

The engine (:mod:`sync_worker.engine`) is the state machine of one run and asks its
injected dialect the questions on which the two servers differ. The dialect is chosen
**once per connection**, from what the server announced in ``auth_success``
(:func:`choose_dialect`, called by :mod:`sync_worker.subscription` when it connects):
the embedded server announces its extensions (``set_state``, ``direct_running``, ...), a
Prefect server (and the embedded server's Prefect-compatible mode) announces none.

================================  ==============================  ===============================
question                          :class:`EmbeddedDialect`        :class:`PrefectDialect`
================================  ==============================  ===============================
how is a run claimed?             at delivery: the server commits PENDING with ``deferred``
                                  RUNNING before it sends the     (a second PENDING is ABORTed),
                                  run (``claim_at_delivery``),    then RUNNING
                                  no round trip; else RUNNING is
                                  the claim (the server answers
                                  RUNNING for a RUNNING run
                                  ABORT), one round trip; PENDING
                                  first when the extensions are
                                  switched off
check "already finished" first?   no: the server refuses a        yes: Prefect accepts a claim on
                                  claim on a final run            a FAILED run (or a COMPLETED
                                                                  one without result data)
``AwaitingRetry``                 the server re-queues it         re-proposed with ``deferred``
                                  (``deferred`` state) and        when due, from the worker's
                                  delivers it when due            retry timers (Prefect does not)
where do results go?              inline in the final state when  a record (absolute
                                  the run's creator reads them    ``storage_key``) a Prefect
                                  (:data:`INLINE_RESULTS_LABEL`),  caller can read
                                  else a record
final-state events?               no: the server announces every  yes: a Prefect caller waits for
                                  final state itself              events only
RUNNING and COMPLETED             proposed (socket or REST)       with a worker: sent as events
                                                                  (client-side orchestration, as
                                                                  Prefect's worker), COMPLETED
                                                                  read back later; else REST
failure after a RUNNING event     -                               proposed once Prefect recorded
                                                                  the RUNNING (its retry rule
                                                                  counts from it)
================================  ==============================  ===============================

Prefect-only machinery (events and their repeats, retry timers) is owned by the worker
(:class:`~sync_worker.prefect_reporting.PrefectReporting`) and handed to the dialect;
without one (a run executed on its own) events are sent once and retries happen in the
run's thread.
"""
from __future__ import annotations

import logging
import dataclasses
import time
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Iterable

from sync_worker.schemas import INLINE_RESULTS_LABEL, SetStateStatus, State, StateDetails, StateType
from sync_worker.storage import inline_result, write_result

if TYPE_CHECKING:
    from sync_worker.client import Client
    from sync_worker.engine import TaskRunEngine
    from sync_worker.prefect_reporting import PrefectReporting
    from sync_worker.schemas import TaskRun
    from sync_worker.storage import RecordStore

logger = logging.getLogger("sync_worker.dialects")

#: Seconds a failed run's worker waits for Prefect to record its RUNNING event before
#: deciding the retry itself (:meth:`PrefectDialect.running_recorded`).
RECORDED_WAIT = 10.0

__all__ = ["INLINE_RESULTS_LABEL", "Dialect", "EmbeddedDialect", "PrefectDialect", "choose_dialect",
           "reads_inline_results"]


def reads_inline_results(task_run: TaskRun) -> bool:
    """Whether the run's creator is known to read results carried inline (our own
    submitters mark their runs with :data:`INLINE_RESULTS_LABEL`)."""
    return _INLINE_ITEMS <= task_run.labels.items()  # every item of the label, compared in C


_INLINE_ITEMS = INLINE_RESULTS_LABEL.items()


class Dialect:
    """The questions the engine asks about the server (see the module's table)."""

    name = "?"
    #: The RUNNING proposal is itself the claim (no PENDING round trip).
    claims_with_running = False
    #: Read the run's state before claiming it, and skip it when it is final.
    checks_finished = False
    #: The connection subscribed with ``claim_at_delivery``: the runs it delivers arrive
    #: RUNNING, committed and leased (set by :mod:`sync_worker.subscription` when it opts in).
    claims_at_delivery = False

    def result_data(self, task_run: TaskRun, value: Any, serializer: str, store: RecordStore) -> Any:
        """The final state's ``data`` for ``value`` (raises if it cannot be stored)."""
        return write_result(store, value, serializer=serializer)

    def finished(self, client: Client, task_run: TaskRun, state: State) -> None:
        """The server accepted a final state of ``task_run``."""

    def send_state(self, engine: TaskRunEngine, state: State, final: bool = False) -> bool:
        """Report ``state`` without a round trip (an event), and make it the engine's
        state; False when this server is told states by proposals only."""
        return False

    def claimed(self, engine: TaskRunEngine, delivered: State | None) -> None:
        """The server accepted the engine's PENDING claim of a run delivered in ``delivered``."""

    def running_recorded(self, engine: TaskRunEngine) -> bool:
        """Whether the server shows the RUNNING sent by :meth:`send_state` (or a newer state)."""
        return True

    def awaiting_retry(self, engine: TaskRunEngine, retry: State) -> State | None:
        """The server answered a failure with a non-deferred ``AwaitingRetry``: make sure
        it happens. Returns the state to retry in the run's own thread, or None when the
        retry is taken care of elsewhere."""
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"


class EmbeddedDialect(Dialect):
    """``sync-worker server``: leases, RUNNING as the claim, the server re-queues retries
    and announces final states; small results travel inline when the creator reads them."""

    name = "embedded"

    def __init__(self, *, claims_with_running: bool = True) -> None:
        self.claims_with_running = claims_with_running

    def result_data(self, task_run: TaskRun, value: Any, serializer: str, store: RecordStore) -> Any:
        if reads_inline_results(task_run):
            data = inline_result(value, serializer)
            if data is not None:
                return data
        return write_result(store, value, serializer=serializer)


class PrefectDialect(Dialect):
    """A Prefect 3 server: PENDING claims, "already finished" checked first, results as
    records, final-state events, ``AwaitingRetry`` re-queued by the worker.

    Args:
        reporting: the worker's :class:`~sync_worker.prefect_reporting.PrefectReporting`
            (None for a run executed on its own: events are sent once, retries happen in
            the run's thread).
    """

    name = "prefect"
    claims_with_running = False
    checks_finished = True

    def __init__(self, reporting: PrefectReporting | None = None) -> None:
        self.reporting = reporting

    def send_state(self, engine: TaskRunEngine, state: State, final: bool = False) -> bool:
        """Report ``state`` as Prefect's own engine does (``TaskRunEngine.set_state`` in
        ``prefect.task_engine``): update the run as the state changes it (``run_count`` on
        RUNNING, ``start_time``, ``end_time``, run time) and send the event Prefect's
        ``task_run_recorder`` records (:func:`~sync_worker.prefect_reporting.state_event`).

        Only with a worker's reporting (its thread sends the events, and reads a ``final``
        state back later, proposing it over REST if it was not recorded) and a server that
        takes events; else False and the engine proposes the state over REST."""
        from sync_worker.prefect_reporting import stamp, state_event

        reporting = self.reporting
        if reporting is None or not reporting.events.records_states(engine.client):
            return False
        stamp(state)
        last = engine.state
        if last is not None and last.timestamp is not None and state.timestamp <= last.timestamp:
            state.timestamp = last.timestamp + timedelta(microseconds=1)  # newest timestamp wins on the server
        run_time = engine.total_run_time
        if last is not None and last.type is StateType.RUNNING and last.timestamp is not None:
            run_time += (state.timestamp - last.timestamp).total_seconds()
        run = engine.task_run
        changes: dict[str, Any] = {}
        if state.type is StateType.RUNNING:
            changes["run_count"] = run.run_count + 1
            changes["start_time"] = run.start_time or state.timestamp
        if state.is_terminal() and run.start_time is not None and run.end_time is None:
            changes["end_time"] = state.timestamp
        run = dataclasses.replace(run, **changes) if changes else run
        state.state_details.task_run_id = run.id
        event = state_event(run, last, state, run_time, follows=engine.last_event_id)
        sent = (reporting.events.confirm(engine.client, run, state, event) if final
                else reporting.events.send(engine.client, event))
        if sent:
            engine.task_run, engine.state, engine.total_run_time = run, state, run_time
            engine.last_event_id = event["id"]
            if state.type is StateType.RUNNING:
                engine.running_state = state
        return sent

    def claimed(self, engine: TaskRunEngine, delivered: State | None) -> None:
        """Announce the claim as Prefect's task worker does after its PENDING proposal: the
        Pending state as an event (recorded already; the event is for Prefect's event feed
        and automations), which the run's next event follows. Sent by the worker's events
        thread; nothing without a worker or on a server without an event intake."""
        from sync_worker.prefect_reporting import state_event

        reporting, pending = self.reporting, engine.state
        if (reporting is None or pending is None or pending.id is None or pending.timestamp is None
                or not reporting.events.accepts_events(engine.client)):
            return
        event = state_event(engine.task_run, delivered, pending)
        if reporting.events.send(engine.client, event):
            engine.last_event_id = event["id"]

    def running_recorded(self, engine: TaskRunEngine, timeout: float | None = None) -> bool:
        """Read the run until the server shows this worker's RUNNING event recorded (its
        state is that event's, or newer), at most ``timeout`` (default
        :data:`RECORDED_WAIT`) seconds. Prefect's recorder writes an event shortly after it
        arrives; a failure is rare, so these reads cost the fast path nothing."""
        running = engine.running_state
        if running is None or running.timestamp is None:
            return True
        deadline = time.monotonic() + (RECORDED_WAIT if timeout is None else timeout)
        pause = 0.02
        while True:
            try:
                current = engine.client.read_task_run(engine.task_run.id).state
            except Exception as exc:  # noqa: BLE001 - then RUNNING is proposed
                engine.logger.warning("Could not read %s back: %s", engine.label, exc)
                return False
            if current is not None and (current.id == running.id or (
                    current.timestamp is not None and current.timestamp >= running.timestamp)):
                return True
            if time.monotonic() + pause > deadline:
                engine.logger.warning("The server did not record the RUNNING event of %s within %.0fs; "
                                      "proposing RUNNING", engine.label, RECORDED_WAIT)
                if self.reporting is not None:
                    self.reporting.events.unrecorded(engine.client)
                return False
            time.sleep(pause)  # polling Prefect's REST API: it has no "recorded" notification
            pause = min(pause * 2, 0.5)

    def finished(self, client: Client, task_run: TaskRun, state: State) -> None:
        if self.reporting is not None:
            self.reporting.events.emit(client, task_run, state)
        else:
            from sync_worker.prefect_reporting import FinalStateEvents

            FinalStateEvents().emit_now(client, task_run, state)  # once, no thread (no worker to own one)

    def awaiting_retry(self, engine: TaskRunEngine, retry: State) -> State | None:
        """Put the run back on the Prefect server's queue when the retry is due.

        Proposing the ``AwaitingRetry`` again with ``deferred=True`` and the run's
        ``task_parameters_id`` makes Prefect queue it (and deliver it at once), so the
        proposal is made when due, from the worker's retry timers: no slot is held while
        waiting. Without timers, or if the proposal is refused, the retry happens in the
        run's thread (as Prefect's own engine does it)."""
        due = retry.state_details.scheduled_time
        delivered = engine.task_run.state
        requeue = State(
            StateType.SCHEDULED, retry.name, message=retry.message,
            state_details=StateDetails(
                deferred=True, scheduled_time=due,
                task_parameters_id=delivered.state_details.task_parameters_id if delivered else None,
            ),
        )
        delay = (due - datetime.now(timezone.utc)).total_seconds() if due is not None else 0.0
        if delay > 0:
            if self.reporting is not None:
                self.reporting.retries.schedule(delay, lambda: _requeue(engine, requeue), engine.task_run.id)
                return None
            return retry
        return None if _requeue(engine, requeue) else retry


def _requeue(engine: TaskRunEngine, state: State) -> bool:
    """Propose the retry's SCHEDULED state, unless the run left its AwaitingRetry meanwhile: a
    Prefect server accepts CANCELLED -> SCHEDULED, so a run cancelled while it waited for its
    retry would run again (past its retries). True when nothing more is to be done here."""
    try:
        current = engine.client.read_task_run(engine.task_run.id).state
    except Exception as exc:  # noqa: BLE001 - the proposal below says whether the server is there
        engine.logger.debug("Could not read %s before re-queueing its retry: %s", engine.label, exc)
        current = None
    if current is not None and current.type is not StateType.SCHEDULED:
        engine.logger.info("Retry of %s not re-queued: the run is %s now (%s)", engine.label,
                           current.type.value, current.name)
        return True
    try:
        result = engine.propose(state)
    except Exception as exc:  # noqa: BLE001 - reported; the caller decides what next
        engine.logger.error("Could not re-queue the retry of %s: %s", engine.label, exc)
        return False
    if result.status is not SetStateStatus.ACCEPT:
        engine.logger.error("Server refused to re-queue the retry of %s (%s): %s", engine.label,
                            result.status.value, result.reason)
        return False
    engine.logger.debug("Retry of %s is back on the queue", engine.label)
    return True


def choose_dialect(extensions: Iterable[str], *, fast_path: bool = True,
                   reporting: PrefectReporting | None = None) -> Dialect:
    """The dialect of a connection whose ``auth_success`` announced ``extensions``.

    ``set_state`` announced: the embedded server (whatever ``fast_path`` says: switching
    the socket extensions off changes the transport, not the server's behaviour; RUNNING
    is the claim only with ``direct_running`` announced and the extensions in use).
    Nothing announced: a Prefect server, with the worker's ``reporting``."""
    announced = set(extensions)
    if "set_state" in announced:
        return EmbeddedDialect(claims_with_running=fast_path and "direct_running" in announced)
    return PrefectDialect(reporting)
