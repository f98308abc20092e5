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
================================  ==============================  ===============================

Prefect-only machinery (events and their repeats, retry timers) is owned by the worker
(:class:`~sync_worker.prefect_reporting.PrefectReporting`) and handed to the dialect;
without one (a run executed on its own) events are sent once and retries happen in the
run's thread.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone
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

__all__ = ["INLINE_RESULTS_LABEL", "Dialect", "EmbeddedDialect", "PrefectDialect", "choose_dialect",
           "reads_inline_results"]


def reads_inline_results(task_run: TaskRun) -> bool:
    """Whether the run's creator is known to read results carried inline (our own
    submitters mark their runs with :data:`INLINE_RESULTS_LABEL`)."""
    return all(task_run.labels.get(key) == value for key, value in INLINE_RESULTS_LABEL.items())


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
