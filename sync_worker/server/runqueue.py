"""The delivery queue: which queued run goes to which subscriber, and leases.

The queue itself lives in the database (``qstate`` column, indexed per task key in creation
order). In memory there is, per task key, only a bounded heap of ``(seq, id)`` of runs that
are due and loaded ("buffer"); when a key has more runs waiting than the buffer holds, the
extra runs stay in the database (``overflow``) and are loaded in creation order as the buffer
drains. Runs scheduled for later (retries with a delay) are remembered as ``(due, key)`` timers
only. So 100,000 queued runs cost a few hundred ids of memory, not 100,000 run objects.

A run taken for a subscriber is *outstanding* (owned by that subscriber) until it reaches a
terminal state or is scheduled again. When the subscriber's connection drops:

- a run sent but not acknowledged goes straight back to the buffer;
- a run acknowledged (leased) gets a timer of ``lease_timeout`` seconds; when it fires and the
  run is still not finished, it is rescheduled (or marked CRASHED after ``max_deliveries``).

The open connection is the lease's heartbeat: a run whose worker stays connected keeps it
(a pinger drops connections that stop answering pings, so a vanished machine does not hold
its runs forever). A worker that subscribes again with the same ``client_id`` (after a network
blip, or after this server restarted: the claiming client_id is stored with the run) takes
its leases back, so its runs in flight are not delivered to someone else.
Every decision that changes the database runs as an operation in the writer thread; the
in-memory structures are updated after the commit, under :attr:`RunQueue.lock`.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .database import (
    QSTATE_DB,
    QSTATE_MEMORY,
    QSTATE_NONE,
    Database,
    DatabaseClosed,
    RecoveryInfo,
    RunRow,
    Transaction,
)
from .models import TERMINAL
from .orchestration import system_state

logger = logging.getLogger("sync_worker.server.runqueue")

#: owner of runs found PENDING/RUNNING when the server started (their worker's connection
#: died with the previous server process)
RECOVERED = "recovered"

#: a run due within this many seconds counts as due now (timestamps go through ISO 8601 text
#: with microseconds, so "now" read back can be a hair later than the clock it came from)
DUE_TOLERANCE = 0.001

#: How long a run waits for the first worker of its key to have room before a later worker
#: that waits idle gets it (several workers on one key, our protocol, runs that come back
#: quickly: see :func:`_held_for_first`).
SPILL_DELAY = 0.005
#: Runs wait for the first worker only while its runs give their slot back within this many
#: seconds on average (``Subscription.slot_seconds``): no-op runs do (about 0.5-1.5 ms in a
#: drain on 2 cores), 10 ms runs do not, and those spread over every worker at once.
QUICK_SLOT_SECONDS = 0.002


class Waiter:
    """What the queue needs from a subscriber."""

    keys: list[str]
    leased: set[str]
    client_id: str

    def wake(self) -> bool | None:  # pragma: no cover - interface
        """Runs arrived (see :meth:`RunQueue._wake` for the answer)."""
        raise NotImplementedError


class _Key:
    __slots__ = ("due_epoch", "heap", "held_since", "members", "overflow", "refilling", "spill_armed", "waiters")

    def __init__(self) -> None:
        self.heap: list[tuple[int, str]] = []
        self.overflow = False  # due runs of this key may be waiting in the database
        self.refilling = False  # a refill operation is queued in the writer
        # bumped when a delayed run becomes due: a refill that started before must not
        # conclude "nothing more waiting" (the run would wait for the next timer of its key)
        self.due_epoch = 0
        # Which waiting subscriber gets a run (several workers on one key): they are asked in
        # the order of _preference (a free credit first, then the oldest connection), so the
        # first one with a free credit takes the runs of a burst (claimed at create,
        # RunQueue.claim_for; or queued for it while the server has not read its final
        # states, see Subscription.reserve) until its credit is spent, and only then the next:
        # the runs stay on few hot workers (more runs per frame and per commit, fewer
        # wake-ups) and long runs still spill over to every free slot. (Until stop 25 the
        # order was the set's, and a run that found the first worker's final states unread
        # went to the next one.) A most-recently-used order (the
        # worker that last registered first, for claims at create and for wake-ups) was measured
        # and not kept (stop 23, compare.py --workers 1,2,4, two invocations each, alternated):
        # 4 workers drained 0.80x and 0.74x of one worker with it, 0.97x and 0.94x without, and
        # ran 199 % / 163 % of the 10 ms ideal against 220 % / 186 %; 2 workers: no difference.
        self.waiters: set[Waiter] = set()
        # every connected subscriber of the key, oldest first: members[0] is the key's first
        # worker, the one later workers wait for (_held_for_first, RunQueue._wake)
        self.members: list[Waiter] = []
        self.spill_armed = False  # a "spill" timer is pending (RunQueue._arm_spill)
        # since when runs of the key wait for its first worker (None: the buffer emptied since)
        self.held_since: float | None = None


def _preference(waiter: Any) -> tuple[bool, int]:
    """Sort key of the waiters: which one gets a run first. One with a free credit before one
    without, then the oldest connection: the same worker while it has room (see
    ``_Key.waiters``)."""
    room = getattr(waiter, "has_room", None)
    return (room is not None and not room(), getattr(waiter, "rank", 0))


def _in_preference_order(waiters: set[Any]) -> list[Any]:
    return sorted(waiters, key=_preference) if len(waiters) > 1 else list(waiters)


def _held_for_first(key: _Key, waiter: Any) -> bool:
    """Whether a run of ``key`` should wait (up to ``SPILL_DELAY``) for the key's first worker
    rather than go to ``waiter`` now: several workers of our protocol (claim at delivery) on
    the key, ``waiter`` is not the first one, and the first one's runs give their slots back
    within ``QUICK_SLOT_SECONDS`` on average.

    Why: a worker with no-op runs returns its credits within a millisecond or two. A run
    handed meanwhile to an idle later worker costs that one a wake-up, a commit and a frame
    of its own, and its final state comes back alone. Measured (HISTORY, stop 37, 15
    interleaved rounds against the tree without this): drains of 3,000 no-op runs with four
    workers 1.15x as fast, at 0.86x the CPU per run; two workers and 10 ms runs unchanged.
    Longer runs are not held: a 10 ms run waiting for the first worker's slot while another
    worker has one free only waits (holding every run, four workers ran 10 ms tasks about
    5 % slower)."""
    members = key.members
    if len(members) < 2:
        return False
    first = members[0]
    if waiter is first or not getattr(waiter, "claim_at_delivery", False):
        return False
    slot_seconds = getattr(first, "slot_seconds", None)
    return slot_seconds is not None and slot_seconds < QUICK_SLOT_SECONDS and first.claim_at_delivery


#: after a lease's expiry could not be written (database locked, disk full): the next try
LEASE_RETRY_SECONDS = 1.0


class RunQueue:
    def __init__(self, db: Database, *, lease_timeout: float = 30.0, max_deliveries: int = 3,
                 buffer_size: int = 1000, spill_delay: float = SPILL_DELAY) -> None:
        self.db = db
        self.spill_delay = spill_delay
        self.lease_timeout = lease_timeout
        self.max_deliveries = max_deliveries
        self.buffer_size = buffer_size
        self.lock = threading.Lock()
        self._keys: dict[str, _Key] = {}
        self._in_heap: set[str] = set()  # ids queued in a heap (stale heap entries are skipped)
        self._texts: dict[str, str] = {}  # TaskRun JSON of buffered runs: delivery needs no read
        self.outstanding: dict[str, Any] = {}  # run id -> Waiter (or RECOVERED)
        self._recovered_holders: dict[str, str] = {}  # run id -> client_id, for RECOVERED runs
        self._lease_retrying: set[str] = set()  # lease expiries not written yet (logged once each)
        #: called (run id, TaskRun JSON) after the queue itself finished a run (CRASHED)
        self.on_finished: Callable[[str, str], None] | None = None
        self._timers: list[tuple[float, int, str, Any]] = []
        self._timer_seq = itertools.count()
        self._timer_cond = threading.Condition(self.lock)
        self._stopped = False
        self._thread = threading.Thread(target=self._timer_loop, name="sync-worker-queue-timers", daemon=True)
        self._thread.start()

    # -- helpers (lock held) -----------------------------------------------------------------
    def _key(self, task_key: str) -> _Key:
        key = self._keys.get(task_key)
        if key is None:
            key = self._keys[task_key] = _Key()
        return key

    def _push(self, task_key: str, seq: int, run_id: str, text: str | None = None, wake: bool = True) -> None:
        if text is not None:
            self._texts[run_id] = text
        if run_id in self._in_heap:
            return
        key = self._key(task_key)
        heapq.heappush(key.heap, (seq, run_id))
        self._in_heap.add(run_id)
        if wake:
            self._wake(key, 1)

    def _wake(self, key: _Key, count: int | None = None) -> None:
        """Wake one of the key's waiters (``count=1``; every one when None): one run pushed
        wakes one subscriber, not every subscriber of the key -- each woken one takes a lock,
        finds the run gone and waits again, and a thread wake-up costs tens of microseconds of
        the server's one core per run and connection. A woken waiter that takes nothing while
        runs are due (no credit left, closing) passes the wake on (:meth:`pass_on`).

        The one woken is the first by :func:`_preference` that answers: its ``wake()`` returns
        None (woken: it leaves the waiters), True (it takes the run itself once it has read
        its client's input, and stays a waiter: the next run should find it again, not the
        next worker), or False (it cannot take it soon: the next waiter is asked)."""
        waiters = key.waiters
        if not waiters:
            return
        if count is None:
            woken = list(waiters)
            waiters.clear()
            for waiter in woken:
                waiter.wake()
            return
        held = False
        for waiter in _in_preference_order(waiters):
            if _held_for_first(key, waiter):
                held = True  # it waits for the first worker, up to the spill delay
                continue
            answer = waiter.wake()
            if answer is True:
                return
            waiters.discard(waiter)
            if answer is None:
                return
        if held:
            self._arm_spill(key)

    def _arm_spill(self, key: _Key) -> None:
        """Lock held: once runs of ``key`` have waited ``spill_delay`` seconds for its first
        worker (the buffer not emptied meanwhile), they go to any waiter with room
        (:meth:`_spill`). One timer per key at a time: in a drain it fires at most once per
        delay, not once per run."""
        if key.held_since is None:
            key.held_since = time.time()
        if not key.spill_armed:
            key.spill_armed = True
            self._add_timer(key.held_since + self.spill_delay, "spill", key)

    def _spill(self, key: _Key) -> None:
        """Lock held, the spill timer fired: runs that still wait for the first worker after
        the delay go to every waiter with room, the first worker or not."""
        key.spill_armed = False
        waiters = key.waiters
        if not waiters or not self._due_here(key):
            key.held_since = None
            return
        if key.held_since is None or time.time() < key.held_since + self.spill_delay:
            # the buffer emptied since (the runs there now wait anew), or they have not waited
            # the whole delay yet: again at the end of it
            self._arm_spill(key)
            return
        key.held_since = None
        for waiter in _in_preference_order(waiters):
            room = getattr(waiter, "has_room", None)
            if room is not None and not room():
                continue
            if waiter.wake() is not True:
                waiters.discard(waiter)

    def _due_here(self, key: _Key) -> bool:
        """Lock held: whether runs of the key wait (buffered, or in the database)."""
        heap, in_heap = key.heap, self._in_heap
        while heap and heap[0][1] not in in_heap:
            heapq.heappop(heap)  # stale
        return bool(heap) or key.overflow

    def pass_on(self, waiter: Waiter) -> None:
        """``waiter`` was woken for a run and takes none now (no credit, stopping): wake
        another waiter of each of its keys that has runs waiting, so none is left behind."""
        with self.lock:
            for task_key in waiter.keys:
                key = self._keys.get(task_key)
                if key is not None and key.waiters and self._due_here(key):
                    key.waiters.discard(waiter)
                    self._wake(key, 1)

    def _add_timer(self, when: float, kind: str, payload: Any) -> None:
        heapq.heappush(self._timers, (when, next(self._timer_seq), kind, payload))
        self._timer_cond.notify()

    def _release(self, run_id: str) -> None:
        owner = self.outstanding.pop(run_id, None)
        if owner is RECOVERED:
            self._recovered_holders.pop(run_id, None)
        elif owner is not None:
            owner.leased.discard(run_id)

    def _unqueue(self, run_id: str) -> None:
        self._in_heap.discard(run_id)  # its heap entry becomes stale
        self._texts.pop(run_id, None)

    def _maybe_refill(self, task_key: str, key: _Key) -> None:
        if key.overflow and not key.refilling and len(key.heap) <= self.buffer_size // 2:
            key.refilling = True
            try:
                self.db.submit(lambda tx: self._refill_op(tx, task_key))
            except DatabaseClosed:
                key.refilling = False

    # -- called inside write operations (writer thread) -------------------------------------
    def place(self, row: RunRow, now: float) -> None:
        """``row`` is becoming SCHEDULED on the queue (due at ``row.due``): decide where it
        waits, i.e. set ``row.qstate``. Call before writing the row, then :meth:`placed`."""
        with self.lock:
            key = self._key(row.task_key)
            due_now = row.due <= now + DUE_TOLERANCE
            if row.id in self._in_heap or (due_now and not key.overflow and len(key.heap) < self.buffer_size):
                row.qstate = QSTATE_MEMORY
            else:
                row.qstate = QSTATE_DB
                if due_now:
                    key.overflow = True  # runs queued after this one must wait behind it

    def placed(self, tx: Transaction, row: RunRow) -> None:
        """After writing a row :meth:`place` decided on: update memory once committed."""
        run_id, task_key, seq, due = row.id, row.task_key, row.seq, row.due
        if row.qstate == QSTATE_MEMORY:
            text = row.dump()  # as committed (the cached row may change again later)

            def pushed() -> None:
                with self.lock:
                    self._release(run_id)
                    self._push(task_key, seq, run_id, text)  # type: ignore[arg-type]
            tx.after_commit(pushed)
        else:
            def waiting() -> None:
                with self.lock:
                    self._release(run_id)
                    if due > time.time() + DUE_TOLERANCE:
                        self._add_timer(due, "due", task_key)
                    else:
                        key = self._key(task_key)
                        key.overflow = True
                        if key.waiters:
                            self._maybe_refill(task_key, key)
            tx.after_commit(waiting)

    def _refill_op(self, tx: Transaction, task_key: str) -> None:
        with self.lock:
            key = self._key(task_key)
            room = max(self.buffer_size - len(key.heap), 1)
            epoch = key.due_epoch
        now = time.time()  # after reading the epoch: a run due before it bumped is found
        rows = tx.take_queued(task_key, now, room)
        with self.lock:
            if len(rows) < room and key.due_epoch == epoch:
                key.overflow = False

        def loaded() -> None:
            with self.lock:
                key.refilling = False
                for seq, run_id in rows:
                    if run_id not in self.outstanding:
                        self._push(task_key, seq, run_id)
                if key.overflow and len(key.heap) <= self.buffer_size // 2:
                    self._maybe_refill(task_key, key)
        tx.after_commit(loaded)

    def on_commit_failure(self) -> None:
        """After a failed commit the memory may claim runs are loaded that are not: reload."""
        with self.lock:
            for key in self._keys.values():
                key.overflow = True
                key.refilling = False

    # -- after-commit notifications ------------------------------------------------------------
    def release(self, run_id: str) -> None:
        """The run finished or was deleted: nobody owns it, it is not queued."""
        with self.lock:
            self._release(run_id)
            self._unqueue(run_id)

    def unqueue(self, run_id: str) -> None:
        """The run left SCHEDULED (claimed, or changed over REST): not deliverable any more;
        whoever holds it keeps it."""
        with self.lock:
            self._unqueue(run_id)

    # -- subscribers -----------------------------------------------------------------------------
    def take(self, waiter: Waiter) -> tuple[str, str, int, str | None] | None:
        """The oldest due run on the waiter's keys, now outstanding for it, as (id, task key,
        seq, TaskRun JSON or None if it must be read); or None, and the waiter is woken
        (``wake()``) when something arrives."""
        with self.lock:
            best: tuple[int, str] | None = None
            best_key: str | None = None
            in_heap = self._in_heap
            for task_key in waiter.keys:
                key = self._keys.get(task_key)
                if key is None:
                    continue
                heap = key.heap
                while heap and heap[0][1] not in in_heap:
                    heapq.heappop(heap)  # stale: unqueued since it was pushed
                if heap and (best is None or heap[0] < best):
                    best = heap[0]
                    best_key = task_key
                elif not heap and key.overflow:
                    self._maybe_refill(task_key, key)
            if best is None:
                for task_key in waiter.keys:
                    self._key(task_key).waiters.add(waiter)
                return None
            key = self._keys[best_key]  # type: ignore[index]
            heapq.heappop(key.heap)
            if not key.heap:
                key.held_since = None  # nothing waits for the first worker any more
            run_id = best[1]
            in_heap.discard(run_id)
            self.outstanding[run_id] = waiter
            self._maybe_refill(best_key, key)  # type: ignore[arg-type]
            return run_id, best_key, best[0], self._texts.pop(run_id, None)  # type: ignore[return-value]

    def claim_for(self, row: RunRow) -> Any:
        """A background run being created, due now (in its create's transaction, writer
        thread): a subscriber waiting for runs of its key (it found none) that takes runs
        claimed at delivery and has a free credit reserves it (``reserve()``), and the run is
        outstanding and leased to it from now on, as :meth:`take` + :meth:`acked` would make it. Returns that subscriber
        (the create then commits the claim in the same transaction and sends the run after
        the commit), or None: the run is queued as usual. Only when nothing older of its key
        is waiting (delivery stays in creation order)."""
        with self.lock:
            key = self._keys.get(row.task_key)
            if key is None or not key.waiters or key.overflow:
                return None
            heap, in_heap = key.heap, self._in_heap
            while heap and heap[0][1] not in in_heap:
                heapq.heappop(heap)  # stale
            if heap or row.id in in_heap:
                return None
            for waiter in _in_preference_order(key.waiters):
                if _held_for_first(key, waiter):
                    continue  # queued instead: it waits for the first worker (see _wake)
                reserve = getattr(waiter, "reserve", None)
                reserved = reserve() if reserve is not None else False
                if reserved:
                    self.outstanding[row.id] = waiter
                    waiter.leased.add(row.id)
                    return waiter
                if reserved is None:
                    return None  # queued for it: it takes the run once it has read its input
        return None

    def unclaim(self, waiter: Waiter, run_id: str) -> None:
        """Undo :meth:`claim_for` when the create was not committed."""
        with self.lock:
            if self.outstanding.get(run_id) is waiter:
                del self.outstanding[run_id]
            waiter.leased.discard(run_id)

    def join(self, waiter: Waiter) -> None:
        """A subscriber connected: a member of its keys, after the older ones (which one is
        the key's first worker: see :func:`_held_for_first`)."""
        with self.lock:
            for task_key in waiter.keys:
                members = self._key(task_key).members
                if waiter not in members:
                    members.append(waiter)
                    members.sort(key=lambda member: getattr(member, "rank", 0))

    def _leave(self, key: _Key, waiter: Waiter) -> None:
        key.waiters.discard(waiter)
        if waiter in key.members:
            key.members.remove(waiter)

    def forget_waiter(self, waiter: Waiter) -> None:
        """The subscriber takes no more runs (it stopped receiving, or left)."""
        with self.lock:
            for task_key in waiter.keys:
                key = self._keys.get(task_key)
                if key is not None:
                    self._leave(key, waiter)
                    if key.waiters and self._due_here(key):
                        self._wake(key, 1)  # it may have been woken for a run it will not take

    def discard(self, waiter: Waiter, run_id: str) -> None:
        """A taken run turned out not to be deliverable (deleted, or no longer SCHEDULED)."""
        with self.lock:
            waiter.leased.discard(run_id)
            if self.outstanding.get(run_id) is waiter:
                del self.outstanding[run_id]

    def give_back(self, waiter: Waiter, run_id: str, task_key: str, seq: int, text: str | None = None,
                  wake: bool = True) -> None:
        """A run sent to ``waiter`` was not acknowledged (or its claim at delivery was not
        written): back in the buffer at once. ``wake=False``: nobody is woken for it (a claim
        the database refused is tried again by a timer: woken at once, the same subscriber
        tried again at once, over a thousand times a second on a full disk)."""
        with self.lock:
            waiter.leased.discard(run_id)
            if self.outstanding.get(run_id) is waiter:
                del self.outstanding[run_id]
                self._push(task_key, seq, run_id, text, wake=wake)

    def hand_back(self, waiter: Waiter, run_id: str) -> bool:
        """An acknowledged run ``waiter`` will not start: its lease ends now (re-queued, or
        CRASHED past ``max_deliveries``, as when a lease runs out). False if not its run."""
        with self.lock:
            if self.outstanding.get(run_id) is not waiter:
                return False
            self._add_timer(time.time(), "lease", (run_id, waiter))
        return True

    def acked(self, waiter: Waiter, run_id: str) -> None:
        with self.lock:
            if self.outstanding.get(run_id) is waiter:
                waiter.leased.add(run_id)

    def adopt(self, waiter: Waiter, holding: set[str] | None = None) -> int:
        """A worker (re)subscribed: it takes over the leases it held through an earlier
        connection with the same client_id (a network blip, or this server restarted), whose
        lease timers then do nothing. Returns how many.

        ``holding`` (claim_at_delivery): the runs the worker says it still executes or
        reports; only those are taken over. A run claimed at delivery is leased before it is
        sent, so one whose frame was lost with the connection (or with this server) was never
        received: taken over, it would stay RUNNING for as long as the new connection lives.
        Left with its old connection instead, its lease runs out and it is re-queued. (Naming
        runs also keeps two workers of one process, which share a client_id, from taking
        each other's leases.)"""
        client_id = waiter.client_id
        adopted = 0
        with self.lock:
            for run_id, owner in list(self.outstanding.items()):
                if owner is waiter or (holding is not None and run_id not in holding):
                    continue
                if owner is RECOVERED:
                    if self._recovered_holders.get(run_id) != client_id:
                        continue
                    del self._recovered_holders[run_id]
                elif getattr(owner, "client_id", None) != client_id or run_id not in owner.leased:
                    continue  # another worker's, or sent but never acknowledged
                else:
                    owner.leased.discard(run_id)
                self.outstanding[run_id] = waiter
                waiter.leased.add(run_id)
                adopted += 1
        return adopted

    def connection_lost(self, waiter: Waiter) -> None:
        """Start the lease timers of the runs the waiter acknowledged and still holds."""
        with self.lock:
            for task_key in waiter.keys:
                key = self._keys.get(task_key)
                if key is not None:
                    self._leave(key, waiter)
                    if key.waiters and self._due_here(key):
                        self._wake(key, 1)
            if self._stopped:
                return
            when = time.time() + self.lease_timeout
            for run_id in list(waiter.leased):
                if self.outstanding.get(run_id) is waiter:
                    self._add_timer(when, "lease", (run_id, waiter))
            if waiter.leased:
                logger.info("%d run(s) held by a lost connection are re-queued in %.1f s unless they finish",
                            len(waiter.leased), self.lease_timeout)

    # -- leases ----------------------------------------------------------------------------------
    def _lease_expired_op(self, tx: Transaction, run_id: str, owner: Any) -> None:
        with self.lock:
            if self.outstanding.get(run_id) is not owner:
                return  # finished, rescheduled or re-delivered since
        row = tx.get_run(run_id)
        if row is None or row.state_type in TERMINAL:
            tx.after_commit(lambda: self.release(run_id))
            return
        if row.state_type == "CANCELLING":  # being cancelled: final, never delivered again
            from .cancellation import finish_cancelling_op

            finish_cancelling_op(tx, run_id, "Cancelled: the worker holding the run lost its connection "
                                             "before it reported the cancellation.")
            text = row.dump()

            def cancelled() -> None:
                self.release(run_id)
                if self.on_finished is not None:
                    self.on_finished(run_id, text)
            tx.after_commit(cancelled)
            return
        now = time.time()
        row.deliveries += 1
        if row.deliveries >= self.max_deliveries:
            message = (
                f"The run was delivered {row.deliveries} time(s) and each time its worker's connection was lost "
                f"before it finished; not delivering it again (max_deliveries={self.max_deliveries})."
            )
            system_state(row.run, "CRASHED", now, message=message)
            row.state_type = "CRASHED"
            row.qstate = QSTATE_NONE
            row.touch()
            tx.update_run(row)
            text = row.dump()

            def crashed() -> None:
                self.release(run_id)
                if self.on_finished is not None:
                    self.on_finished(run_id, text)
            tx.after_commit(crashed)
            logger.warning("run %s marked CRASHED: %s", run_id, message)
            return
        message = (
            f"Re-queued: the worker holding this run lost its connection and the run did not finish within "
            f"the lease timeout ({self.lease_timeout:g} s); delivery {row.deliveries} of {self.max_deliveries}."
        )
        system_state(row.run, "SCHEDULED", now, message=message, scheduled_time=now, deferred=True)
        row.state_type = "SCHEDULED"
        row.due = now
        row.touch()
        self.place(row, now)
        tx.update_run(row)
        self.placed(tx, row)
        logger.info("run %s: %s", run_id, message)

    # -- timers ----------------------------------------------------------------------------------
    def _timer_loop(self) -> None:
        with self.lock:
            while not self._stopped:
                now = time.time()
                if not self._timers:
                    self._timer_cond.wait()
                    continue
                when = self._timers[0][0]
                if when > now:
                    self._timer_cond.wait(min(when - now, 1.0))
                    continue
                _, _, kind, payload = heapq.heappop(self._timers)
                try:
                    if kind == "due":
                        key = self._key(payload)
                        key.overflow = True
                        key.due_epoch += 1
                        self._maybe_refill(payload, key)
                        self._wake(key)
                    elif kind == "spill":
                        self._spill(payload)
                    elif kind == "lease":
                        run_id, owner = payload
                        if self.outstanding.get(run_id) is owner:
                            self.db.submit(lambda tx, r=run_id, o=owner: self._lease_expired_op(tx, r, o),
                                           lambda _result, error, p=payload: self._lease_written(p, error))
                except DatabaseClosed:
                    return
                except Exception:  # pragma: no cover - keep the timers alive
                    logger.exception("queue timer failed")

    def _lease_written(self, payload: tuple[str, Any], error: BaseException | None) -> None:
        """After a lease's expiry was committed, or not: a run whose expiry could not be
        written (database locked, disk full) tries again in :data:`LEASE_RETRY_SECONDS`.
        Dropped, the run stayed RUNNING for good once the database was writable again."""
        run_id, owner = payload
        with self.lock:
            if (error is None or isinstance(error, DatabaseClosed) or self._stopped
                    or self.outstanding.get(run_id) is not owner):
                self._lease_retrying.discard(run_id)
                return
            self._add_timer(time.time() + LEASE_RETRY_SECONDS, "lease", payload)
            first = run_id not in self._lease_retrying
            self._lease_retrying.add(run_id)
        (logger.warning if first else logger.debug)(
            "could not re-queue run %s after its lease expired (%s); trying again every %g s",
            run_id, error, LEASE_RETRY_SECONDS)

    # -- start/stop ------------------------------------------------------------------------------
    def recover(self, info: RecoveryInfo) -> None:
        """Rebuild memory from the database after a start."""
        with self.lock:
            for task_key in info.queued_keys:
                self._key(task_key).overflow = True
            for due, task_key in info.delayed:
                self._add_timer(due, "due", task_key)
            when = time.time() + self.lease_timeout
            for run_id, _state, holder in info.leased:
                self.outstanding[run_id] = RECOVERED
                if holder:
                    self._recovered_holders[run_id] = holder
                self._add_timer(when, "lease", (run_id, RECOVERED))
        if info.queued_keys or info.leased:
            logger.info("recovered %d key(s) with queued runs and %d run(s) left PENDING/RUNNING "
                        "(re-queued in %.1f s unless they finish)",
                        len(info.queued_keys), len(info.leased), self.lease_timeout)

    def stop(self) -> None:
        with self.lock:
            self._stopped = True
            self._timer_cond.notify_all()
        self._thread.join(timeout=2)

    def stats(self) -> dict[str, int]:
        with self.lock:
            return {
                "buffered": len(self._in_heap),
                "outstanding": len(self.outstanding),
                "timers": len(self._timers),
                "keys": len(self._keys),
            }

