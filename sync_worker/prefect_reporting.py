"""What a worker does on a Prefect server beyond proposing states: owned by the worker.

A Prefect 3 server orchestrates REST ``set_state`` but two things its own engine does
client-side are missing when another client drives the run:

- **Final-state events.** ``PrefectDistributedFuture.result()`` waits only for task-run
  events (``/api/events/out``); a REST ``set_state`` emits none. :class:`FinalStateEvents`
  POSTs a ``prefect.task-run.<StateType>`` event for each final state, and a second time
  :data:`REPEAT_EVENT_AFTER` seconds later (see the class).
- **Re-queueing retries.** A Prefect server answers a FAILED proposal with retries left
  REJECT + ``AwaitingRetry`` and does not put the run back on the queue (its engine
  retries in-process). :class:`RetryTimers` re-proposes the ``AwaitingRetry`` with
  ``deferred=true`` when the retry is due, which makes the server queue the run.

- **States as events** (client-side orchestration, as Prefect's own worker reports them):
  with a worker, the Prefect dialect sends RUNNING and COMPLETED as
  ``prefect.task-run.<State>`` events carrying the task-run payload Prefect's
  ``task_run_recorder`` upserts (:func:`state_event`), instead of one REST ``set_state``
  (an orchestrated SQLite write on Prefect's server) each. The intake has no
  acknowledgement, so every COMPLETED sent that way is **read back**
  :data:`REPEAT_EVENT_AFTER` s later (one ``POST /task_runs/filter`` for all runs due) and
  proposed over REST (``force``) if the server does not show a final state: a final state
  is not lost while the worker lives (see :class:`FinalStateEvents`).

Both belong to one :class:`~sync_worker.worker.TaskWorker` (:class:`PrefectReporting`):
started with it, stopped with it (pending retries re-queued at once, pending repeats sent),
and forgotten in a forked child. No process-global thread.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable

from sync_worker import exceptions
from sync_worker.schemas import State, format_datetime

if TYPE_CHECKING:
    from sync_worker.client import Client
    from sync_worker.schemas import TaskRun

logger = logging.getLogger("sync_worker.prefect_reporting")

#: Seconds after which a final-state event is POSTed a second time (see FinalStateEvents).
REPEAT_EVENT_AFTER = 8.0


def _event(task_run: TaskRun, state: State, timestamp: datetime, name: str) -> dict[str, Any]:
    """What every task-run state event carries (:func:`final_state_event`, :func:`state_event`):
    Prefect's engine's labels, tags and ``validated_state``; the callers add the rest."""
    message = state.message or ""
    return {
        "id": state.id or str(uuid.uuid4()),
        "occurred": format_datetime(timestamp),
        "event": f"prefect.task-run.{name}",
        "resource": {
            "prefect.resource.id": f"prefect.task-run.{task_run.id}",
            "prefect.resource.name": task_run.name,
            "prefect.run-count": str(task_run.run_count),
            "prefect.state-message": message,
            "prefect.state-name": state.name or "",
            "prefect.state-timestamp": format_datetime(timestamp),
            "prefect.state-type": state.type.value,
        },
        "related": [{"prefect.resource.id": f"prefect.tag.{tag}", "prefect.resource.role": "tag"}
                    for tag in sorted(task_run.tags)],
        "payload": {"validated_state": {"type": state.type.value, "name": state.name, "message": message,
                                        "state_details": _details(state), "data": state.data}},
    }


def final_state_event(task_run: TaskRun, state: State) -> dict[str, Any]:
    """The event that wakes a Prefect caller waiting for ``task_run`` (its ``.result()``):
    the labels and ``validated_state`` of Prefect's own engine event (:func:`state_event`),
    but without ``"prefect.orchestration": "client"``. Sent for a state already recorded
    (proposed over REST, or a repeat of an event, which takes a new id): Prefect's
    ``task_run_recorder`` records only client-orchestrated events, so this one is not
    recorded a second time.

    Named after the state *type* (what a Prefect caller's filter names); the state's own
    name stays in ``validated_state`` and the labels."""
    event = _event(task_run, state, state.timestamp or datetime.now(timezone.utc), state.type.value.capitalize())
    event["payload"] = {
        "intended": {"from": "RUNNING", "to": state.type.value},
        "initial_state": {"type": "RUNNING", "name": "Running", "message": "", "state_details": {}},
        **event["payload"],
    }
    return event


def _task_run_payload(task_run: TaskRun, total_run_time: float) -> dict[str, Any]:
    """``payload.task_run`` as Prefect's engine sends it (``TaskRun.model_dump`` without the
    server-owned fields): what ``task_run_recorder`` upserts on the run's row."""
    payload: dict[str, Any] = {
        "name": task_run.name,
        "task_key": task_run.task_key,
        "dynamic_key": task_run.dynamic_key,
        "empirical_policy": task_run.empirical_policy.to_json(),
        "tags": list(task_run.tags),
        "labels": dict(task_run.labels),
        "run_count": task_run.run_count,
        "total_run_time": total_run_time,
    }
    for name in ("expected_start_time", "start_time", "end_time"):
        value = getattr(task_run, name)
        if value is not None:
            payload[name] = format_datetime(value)
    return payload


def _details(state: State) -> dict[str, Any]:
    return {k: v for k, v in state.state_details.to_json().items() if k not in ("task_run_id", "flow_run_id")}


def state_event(task_run: TaskRun, initial: State | None, state: State, total_run_time: float = 0.0,
                follows: str | None = None) -> dict[str, Any]:
    """The event Prefect's engine emits when it sets ``state`` on ``task_run``
    (``prefect.utilities.engine.emit_task_run_state_change_event`` in Prefect 3.8.8):
    named after the state's *name*, id and ``occurred`` those of the state, and the
    resource marked ``"prefect.orchestration": "client"`` so that Prefect's
    ``task_run_recorder`` records it on the run (newest state timestamp wins there).
    ``task_run`` must already carry what the state changes (``run_count``, times);
    ``follows``: the id of the run's previous event from this engine (ordering hint)."""
    assert state.id is not None and state.timestamp is not None
    event = _event(task_run, state, state.timestamp, f"{state.name}")
    event["resource"]["prefect.orchestration"] = "client"
    event["payload"] = {
        "intended": {"from": initial.type.value if initial else None, "to": state.type.value},
        "initial_state": ({"type": initial.type.value, "name": initial.name, "message": initial.message or "",
                           "state_details": _details(initial)} if initial else None),
        **event["payload"],
        "task_run": _task_run_payload(task_run, total_run_time),
    }
    if follows is not None:
        event["follows"] = follows
    return event


#: Seconds ``.delay()`` waits for the server to take a run's Scheduled event.
ANNOUNCE_TIMEOUT = 2.0


def announce_scheduled(client: Client, task_run: TaskRun) -> None:
    """What Prefect's ``Task.apply_async`` does after its create: the run's Scheduled state
    as a client-orchestrated event, so that Prefect's event feed and automations see the run
    appear. Best effort, and bounded (:data:`ANNOUNCE_TIMEOUT`): the run exists either way,
    and ``.delay()`` must not wait a request timeout on a server that stopped answering."""
    state = task_run.state
    if state is None or state.id is None or state.timestamp is None:  # a brief answer: nothing to announce
        return
    try:
        client.emit_events([state_event(task_run, None, state)],
                           timeout=min(float(client.timeout or ANNOUNCE_TIMEOUT), ANNOUNCE_TIMEOUT))
    except exceptions.ObjectNotFound:  # no event intake
        pass
    except Exception as exc:  # noqa: BLE001 - see above
        logger.warning("Could not send the Scheduled event of task run %s (the run is created): %s",
                       task_run.id, exc)


def stamp(state: State) -> State:
    """Give a client-side state the id and timestamp an event needs (Prefect's states get
    both when created)."""
    if state.id is None:
        state.id = str(uuid.uuid4())
    if state.timestamp is None:
        state.timestamp = datetime.now(timezone.utc)
    return state


#: Runs read back per ``POST /task_runs/filter`` (Prefect's default page limit).
READ_BACK_PAGE = 200
#: Seconds a stopping worker keeps reading back runs whose events it has just sent.
STOP_READ_BACK = 3.0
#: Read-back batches in a row with no state recorded after which states go over REST.
UNRECORDED_BATCHES = 3
#: Seconds before the first new read-back of final states the server did not answer about;
#: doubled on each further failure, up to :data:`CHECK_RETRY_MAX`.
CHECK_RETRY_AFTER = 2.0
CHECK_RETRY_MAX = 60.0


class FinalStateEvents:
    """POSTs task-run events, repeats final-state ones, and confirms states sent as events.

    Why the repeat: Prefect's caller subscribes to ``/api/events/out`` in the background
    and reads the run without waiting for that subscription; an event published before it
    is up is only found again by a backfill from the database, which Prefect's event
    persister fills every few seconds. A run finished inside that window would leave the
    caller asleep until its timeout. The repeat arrives after the subscription is up. It
    needs a new event id: Prefect's pipeline drops an id it has seen (a waiter woken twice
    for one run is harmless), and it is not marked as client-side orchestration, so
    Prefect's recorder does not record the state a second time.

    Why the read-back (:meth:`confirm`): a state sent only as an event has no
    acknowledgement (the intake answers before the recorder writes anything, and a
    recorder that fails drops the event after its retries). When the repeat is due, the
    runs are read back in one ``POST /task_runs/filter``; a run whose server state is not
    final gets the state over REST with ``force`` (the worker holds the claim, so no
    orchestration rule applies; an event recorded later has an older timestamp and does
    not overwrite it). A read-back the server does not answer is tried again while the
    worker lives, after :data:`CHECK_RETRY_AFTER` s doubling up to :data:`CHECK_RETRY_MAX`;
    :meth:`stop` does the pending ones at once (bounded by its timeout). One thread per
    instance, started on the first event, does all of it, batched, so a run's thread never
    waits for an event.
    """

    def __init__(self, repeat_after: float = REPEAT_EVENT_AFTER) -> None:
        self.repeat_after = repeat_after
        self._cond = threading.Condition()
        # a heap, soonest first: (due, seq, client, kind, item); kind "event" (item: the
        # event) or "check" (item: (task_run, state, failed read-backs): read back, then repeat the event)
        self._queue: list[tuple[float, int, Client, str, Any]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._no_events: set[str] = set()  # API URLs that answered 404 to POST /events
        self._unrecorded_batches: dict[str, int] = {}  # API URL -> read-back batches in a row with nothing recorded
        #: final states confirmed by a REST proposal after their event was not recorded in time
        self.fallbacks = 0

    def accepts_events(self, client: Client) -> bool:
        """Whether ``client``'s server takes events (it did not answer 404 to them)."""
        return client.api_url not in self._no_events

    def _push(self, items: list[tuple[float, Client, str, Any]]) -> bool:
        """Queue ``items`` for the thread; False when stopped (nothing queued)."""
        with self._cond:
            if self._stopped:
                return False
            for due, client, kind, item in items:
                heapq.heappush(self._queue, (due, next(self._seq), client, kind, item))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="sync-worker-prefect-events", daemon=True)
                self._thread.start()
            self._cond.notify()
            return True

    def emit(self, client: Client, task_run: TaskRun, state: State) -> None:
        """Tell a waiting Prefect caller that the run finished: queued for this instance's
        thread, which POSTs it at once (batched with others) and repeats it later. Off the
        run's thread: the state itself is recorded already (REST ``set_state``); only the
        caller's wake-up depends on the event, so the run's thread does not wait for it."""
        if not self.accepts_events(client):
            return
        event = final_state_event(task_run, state)
        now = time.monotonic()
        repeat = {**event, "id": str(uuid.uuid4())}
        if not self._push([(now, client, "event", event), (now + self.repeat_after, client, "event", repeat)]):
            self.emit_now(client, task_run, state)

    def send(self, client: Client, event: dict[str, Any]) -> bool:
        """Queue one state event (a RUNNING one) to be POSTed at once; False when stopped."""
        return self._push([(time.monotonic(), client, "event", event)])

    def confirm(self, client: Client, task_run: TaskRun, state: State, event: dict[str, Any]) -> bool:
        """Queue a final state's event, and its read-back + repeat :attr:`repeat_after` s
        later; False when stopped (then the caller proposes the state over REST)."""
        now = time.monotonic()
        return self._push([(now, client, "event", event),
                           (now + self.repeat_after, client, "check", (task_run, state, 0))])

    def emit_now(self, client: Client, task_run: TaskRun, state: State) -> None:
        """POST the event once, in this thread (a run executed without a worker)."""
        if not self.accepts_events(client):
            return
        self._post(client, [final_state_event(task_run, state)])

    def _post(self, client: Client, events: list[dict[str, Any]]) -> bool:
        try:
            client.emit_events(events)
            return True
        except exceptions.ObjectNotFound:  # the server has no event intake: do not ask again
            self._no_events.add(client.api_url)
        except Exception as exc:  # noqa: BLE001 - best effort, see emit(); states are confirmed by check
            logger.warning("Could not send %d task-run event(s) to %s: %s", len(events), client.api_url, exc)
        return False

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopped:
                    self._cond.wait()
                if not self._queue:
                    return
                delay = self._queue[0][0] - time.monotonic()
                if delay > 0 and not self._stopped:
                    self._cond.wait(delay)
                    continue
                stopped = self._stopped
                due: dict[int, tuple[Client, list[dict[str, Any]], list[tuple[TaskRun, State, int]]]] = {}
                while self._queue and (stopped or self._queue[0][0] <= time.monotonic()):
                    _, _, client, kind, item = heapq.heappop(self._queue)
                    batch = due.setdefault(id(client), (client, [], []))
                    (batch[1] if kind == "event" else batch[2]).append(item)
            for client, events, checks in due.values():
                if events and self.accepts_events(client):
                    self._post(client, events)
                if checks:
                    self._check(client, checks, stopped)

    def _read_final(self, client: Client, ids: list[str]) -> set[str]:
        """Which of ``ids`` the server shows in a final state (raises if it does not answer)."""
        final: set[str] = set()
        for start in range(0, len(ids), READ_BACK_PAGE):  # Prefect's filter answers at most 200 a page
            page = ids[start:start + READ_BACK_PAGE]
            runs = client.filter_task_runs({"task_runs": {"id": {"any_": page}}, "limit": len(page)},
                                           retry=False)  # the retry rule is _check's
            final.update(str(run["id"]) for run in runs
                         if (run.get("state") or {}).get("type") in ("COMPLETED", "FAILED", "CANCELLED", "CRASHED"))
        return final

    def _check(self, client: Client, checks: list[tuple[TaskRun, State, int]], stopped: bool) -> None:
        """Read the runs back; propose over REST the final states the server does not show;
        then repeat their events (new ids, not recorded again) to wake late subscribers.
        At the stop the events may have been sent an instant ago: the runs are read again
        for up to :data:`STOP_READ_BACK` s before a state is proposed (a proposal racing its
        own event would leave the state twice in the run's history)."""
        unconfirmed = {check[0].id: check for check in checks}
        deadline = time.monotonic() + (STOP_READ_BACK if stopped else 0.0)
        pause = 0.05
        while unconfirmed:
            try:
                final = self._read_final(client, list(unconfirmed))
            except Exception as exc:  # noqa: BLE001 - unanswered: ask again later (or propose, at the stop)
                tries = max(check[2] for check in unconfirmed.values())
                delay = min(CHECK_RETRY_AFTER * 2 ** tries, CHECK_RETRY_MAX)
                if not stopped and self._push([(time.monotonic() + delay, client, "check", (run, state, n + 1))
                                               for run, state, n in unconfirmed.values()]):
                    logger.warning("Could not read back %d run(s) from %s (%s); trying again in %.0fs",
                                   len(unconfirmed), client.api_url, exc, delay)
                    unconfirmed = {}
                break
            for run_id in final:
                unconfirmed.pop(run_id, None)
            if not unconfirmed or time.monotonic() + pause > deadline:
                break
            time.sleep(pause)  # bounded: waiting for Prefect's recorder, which has no notification
            pause = min(2 * pause, 0.5)
        if unconfirmed and len(unconfirmed) == len(checks):
            self.unrecorded(client)
        elif len(unconfirmed) < len(checks):
            with self._cond:
                self._unrecorded_batches[client.api_url] = 0
        for task_run, state, _ in unconfirmed.values():
            self._propose(client, task_run, state, retry=not stopped)
        if self.accepts_events(client):
            repeats = [{**final_state_event(task_run, state), "id": str(uuid.uuid4())} for task_run, state, _ in checks]
            self._post(client, repeats)

    def unrecorded(self, client: Client) -> None:
        """``client``'s server recorded none of a batch of state events in time (a read-back
        batch, or a failed run's RUNNING); :data:`UNRECORDED_BATCHES` in a row switch it
        back to proposals."""
        with self._cond:
            count = self._unrecorded_batches[client.api_url] = self._unrecorded_batches.get(client.api_url, 0) + 1
        if count == UNRECORDED_BATCHES:
            logger.warning("%s recorded none of the last %d batches of state events (is its task_run_recorder "
                           "service off?); proposing states over REST from now on", client.api_url,
                           UNRECORDED_BATCHES)

    def records_states(self, client: Client) -> bool:
        """Whether states may go to ``client``'s server as events: it takes events and has
        not left :data:`UNRECORDED_BATCHES` read-back batches in a row unrecorded."""
        return self.accepts_events(client) and self._unrecorded_batches.get(client.api_url, 0) < UNRECORDED_BATCHES

    def _propose(self, client: Client, task_run: TaskRun, state: State, retry: bool = True) -> None:
        """A final state whose event the server did not record: proposed over REST (with the
        client's bounded retries, except at the stop: one attempt, the worker is leaving)."""
        rest = State(state.type, state.name, message=state.message, state_details=state.state_details,
                     data=state.data)
        try:
            result = client.set_task_run_state(task_run.id, rest, force=True, retry=retry)
        except Exception as exc:  # noqa: BLE001 - reported: the run stays where the server has it
            logger.error("Could not record the final state %s of %s (%s) on %s: %s", state.name, task_run.name,
                         task_run.id, client.api_url, exc)
            return
        self.fallbacks += 1
        logger.warning("The %s event of %s (%s) was not recorded by %s; proposed it over REST: %s", state.name,
                       task_run.name, task_run.id, client.api_url, result.status.value)

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def stop(self, timeout: float | None = None) -> None:
        """Send pending events, do pending read-backs now and end the thread (waits at
        most ``timeout``)."""
        with self._cond:
            self._stopped = True
            thread = self._thread
            self._cond.notify_all()
        if thread is not None:
            thread.join(timeout)

    def start(self) -> None:
        """(Re)arm after :meth:`stop`, for a worker started again."""
        with self._cond:
            self._stopped = False
            if self._thread is not None and not self._thread.is_alive():
                self._thread = None


class RetryTimers:
    """Timers that put Prefect-server retries back on the queue when they are due.

    Waiting on a timer instead of in the run's thread means a retry holds no slot while it
    waits. A stopping worker fires its pending timers at once (:meth:`flush`): the runs go
    back on the queue (early; the server makes whoever takes them wait) instead of staying
    ``AwaitingRetry`` for ever.
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
        """Run every pending action now; how many there were."""
        with self._lock:
            pending, self._pending = self._pending, {}
        for timer, action in pending.items():
            timer.cancel()
            self._run(action)
        return len(pending)


class PrefectReporting:
    """The Prefect-only machinery of one worker: final-state events and retry timers."""

    def __init__(self) -> None:
        self.events = FinalStateEvents()
        self.retries = RetryTimers()

    def start(self) -> None:
        self.events.start()

    def stop(self, timeout: float | None = None) -> int:
        """Re-queue waiting retries and send pending event repeats now; how many retries."""
        flushed = self.retries.flush()
        self.events.stop(timeout)
        return flushed


__all__ = ["CHECK_RETRY_AFTER", "CHECK_RETRY_MAX", "FinalStateEvents", "PrefectReporting", "REPEAT_EVENT_AFTER",
           "RetryTimers", "final_state_event", "stamp", "state_event"]
