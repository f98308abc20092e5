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

from sync_worker.exceptions import ObjectNotFound
from sync_worker.schemas import format_datetime

if TYPE_CHECKING:
    from sync_worker.client import Client
    from sync_worker.schemas import State, TaskRun

logger = logging.getLogger("sync_worker.prefect_reporting")

#: Seconds after which a final-state event is POSTed a second time (see FinalStateEvents).
REPEAT_EVENT_AFTER = 8.0


def final_state_event(task_run: TaskRun, state: State) -> dict[str, Any]:
    """The event Prefect's own engine emits when a task run enters ``state``.

    Named after the state *type* (a Prefect caller's filter); the state's own name stays
    in ``validated_state``."""
    state_json = state.to_json()
    state_json.setdefault("message", "")
    return {
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


class FinalStateEvents:
    """POSTs final-state events, and each one again :data:`REPEAT_EVENT_AFTER` s later.

    Why the repeat: Prefect's caller subscribes to ``/api/events/out`` in the background
    and reads the run without waiting for that subscription; an event published before it
    is up is only found again by a backfill from the database, which Prefect's event
    persister fills every few seconds. A run finished inside that window would leave the
    caller asleep until its timeout. The repeat arrives after the subscription is up. It
    needs a new event id: Prefect's pipeline drops an id it has seen (a waiter woken twice
    for one run is harmless). One thread per instance, started on the first event, sends
    both (batched, one POST per API for what is due), so a run's thread never waits for
    an event; :meth:`stop` sends what is pending and ends it.
    """

    def __init__(self, repeat_after: float = REPEAT_EVENT_AFTER) -> None:
        self.repeat_after = repeat_after
        self._cond = threading.Condition()
        self._queue: list[tuple[float, int, Client, dict[str, Any]]] = []  # a heap, soonest first
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._no_events: set[str] = set()  # API URLs that answered 404 to POST /events

    def emit(self, client: Client, task_run: TaskRun, state: State) -> None:
        """Tell a waiting Prefect caller that the run finished: queued for this instance's
        thread, which POSTs it at once (batched with others) and repeats it later. Off the
        run's thread: the state itself is recorded already (REST ``set_state``); only the
        caller's wake-up depends on the event, so the run's thread does not wait for it."""
        if client.api_url in self._no_events:
            return
        event = final_state_event(task_run, state)
        with self._cond:
            if self._stopped:
                stopped = True
            else:
                stopped = False
                now = time.monotonic()
                heapq.heappush(self._queue, (now, next(self._seq), client, event))
                repeat = {**event, "id": str(uuid.uuid4())}
                heapq.heappush(self._queue, (now + self.repeat_after, next(self._seq), client, repeat))
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name="sync-worker-prefect-events",
                                                    daemon=True)
                    self._thread.start()
                self._cond.notify()
        if stopped:
            self.emit_now(client, task_run, state)

    def emit_now(self, client: Client, task_run: TaskRun, state: State) -> None:
        """POST the event once, in this thread (a run executed without a worker)."""
        if client.api_url in self._no_events:
            return
        self._post(client, [final_state_event(task_run, state)])

    def _post(self, client: Client, events: list[dict[str, Any]]) -> None:
        try:
            client.emit_events(events)
        except ObjectNotFound:  # the server has no event intake: do not ask again
            self._no_events.add(client.api_url)
        except Exception as exc:  # noqa: BLE001 - best effort, see emit()
            logger.warning("Could not send %d final-state event(s) to %s: %s", len(events), client.api_url, exc)

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
                due: dict[int, tuple[Client, list[dict[str, Any]]]] = {}
                while self._queue and (self._stopped or self._queue[0][0] <= time.monotonic()):
                    _, _, client, event = heapq.heappop(self._queue)
                    due.setdefault(id(client), (client, []))[1].append(event)
            for client, events in due.values():
                if client.api_url not in self._no_events:
                    self._post(client, events)

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def stop(self, timeout: float | None = None) -> None:
        """Send the pending repeats now and end the thread (waits at most ``timeout``)."""
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


__all__ = ["FinalStateEvents", "PrefectReporting", "REPEAT_EVENT_AFTER", "RetryTimers", "final_state_event"]
