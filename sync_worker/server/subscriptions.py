"""The websocket ``/api/task_runs/subscriptions/scheduled`` (Prefect 3 protocol + extensions).

Per connection there are three threads:

- simple-websocket's reader thread handles each message as it arrives (:meth:`Subscription._on_messages`):
  an ack sends the next run right away; ``set_state`` requests (the extension) that arrived
  together are committed together, in this thread when no other commit is running, and
  answered from it; ``quit`` and protocol violations end the connection;
- the HTTP handler thread authenticates, reads the subscription, then waits for the end and
  cleans up (the unacknowledged run goes back to the queue, acknowledged ones start their
  lease timers);
- the connection's :class:`~.sockets.Outbox` sender thread delivers a run when one arrives
  for an idle connection and sends answers committed by other threads (answers committed by
  the reader thread itself are sent by it, see :meth:`.sockets.Outbox.direct`).

Answers to ``set_state`` may come back in any order (matched by ``request_id``). What one commit
sends to a connection goes out in one write: the answers to the set_state requests of a read and
the runs their commit claimed (:meth:`.Outbox.flush_mine`), and what the after-commit work of a
group commit sends to other connections (:func:`.sockets.coalescing`).

Flow control: as in Prefect, a connection holds one run at a time by default, and each ack
lets the next one go. The ``credit`` extension, offered in ``auth_success``, lifts that:

- ``credit``: ``"credit": N`` in the subscribe message: the server sends up to N runs
  without waiting for acks (one credit each) and more only when the client grants them with
  ``{"type": "credit", "n": K}``. A worker grants one credit per free execution slot, so
  delivery is pipelined and a busy worker never holds a run it cannot start (the
  sync_worker worker uses this one). ``"limit": N`` next to it names the worker's slots,
  which the server shows (``/api/workers``, ``sync-worker status``, the dashboard); without
  it the server estimates them from the credit and ``holding``.

Acks keep their meaning (they turn a delivered run into a leased one) and
acknowledge the oldest unacknowledged run.

``claim_at_delivery`` (offered in ``auth_success``; a client opts in with
``"claim_at_delivery": true`` in its subscribe message, together with ``credit``): the server
commits RUNNING for each run before it sends it (named "Running", message "Running on
<client_id>", ``run_count`` + 1) and the run is leased to the connection at once, so the
worker sends neither an ack nor a RUNNING proposal — one commit and two frames fewer per run.
Runs delivered together are claimed in one group commit. A run that is not SCHEDULED any more
when its turn comes is skipped; when the claim cannot be written (disk full, database
locked) the run stays queued and delivery is tried again a second later. With this
extension, ``set_state`` may carry ``"credit": N`` (the final state of a run grants the slot
it frees in the same frame), and ``{"type": "release", "task_run_ids": [...]}`` hands back
runs that were delivered (RUNNING) but not started: they are SCHEDULED again, at once, and
the delivery is not counted. Clients that do not ask for it get the Prefect protocol as before.
A claim-at-delivery subscribe message may name ``"holding": [run ids]``, the runs the worker
still executes or reports: when it reconnects, it takes over the leases of only those; any
other run claimed for its client_id (its frame lost with the connection, or with a server
that restarted) keeps its old lease, which runs out, and is re-queued — instead of staying
RUNNING, held unknowingly by the new connection.

Claim at create (no wire change): a run created while a claim_at_delivery connection of its key
waits for runs (it found nothing to take) with a free credit is claimed for that connection in the
create's own transaction (:meth:`.Core._create_op`, :meth:`.RunQueue.claim_for`): one commit
instead of the create's and then the claim's, and the committing thread sends the run right
after it (:func:`.sockets.send_soon`, never blocking; the sender thread when the socket does
not take it at once) instead of waking this connection's sender thread. The run is leased to
the connection from the claim on, as a claim at delivery is. A connection that stopped
receiving or ended before that commit never gets it: the run is SCHEDULED again at once
(:meth:`Subscription._send_claimed`); a create that is not committed gives the credit back. The
runs one transaction claimed for a connection go out together (one frame with batch_delivery).

``batch_delivery`` (offered in ``auth_success``; opt in with ``"batch_delivery": true`` next to
``claim_at_delivery``): runs claimed together are sent in one frame,
``{"type": "task_runs", "task_runs": [run, ...]}`` (a single run is still sent alone, as a
plain TaskRun), instead of one frame per run.

``inline_parameters`` (offered in ``auth_success``; opt in with ``"inline_parameters": true`` next
to ``claim_at_delivery``): a run whose parameters record this server stores (``PUT
/api/storage/parameters.<task_parameters_id>``, or a create that carried it, see :mod:`.rpc`)
is delivered with the record's text in an extra field of the run's JSON,
``"parameters_record": "<record>"`` (records up to 64 KiB; a larger one is left to the worker's
store), read in the claim's transaction: the worker makes no request for it. Records kept
elsewhere (a local ``SYNC_WORKER_STORAGE`` directory) are not the server's: those runs arrive
without the field.

``brief_set_state`` (offered in ``auth_success``; asked per request with ``"brief": true`` in a
``set_state`` message): when the proposal is accepted, the answer's ``result`` is just
``{"status": "ACCEPT"}``: no ``state`` (about 1 KB: the whole state with its result record) and
no ``details``. Any other answer (REJECT, WAIT, ABORT, an error status) is the full one, as
without it; ``brief`` other than ``true`` is ignored, as for ``brief_create``. The sync_worker
worker asks for it for the final state it sends without waiting (a COMPLETED claimed at
delivery), whose ACCEPT it only counts: the answer it reads and parses is ~90 bytes instead of
~1.1 KB.
"""
from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from simple_websocket.errors import ConnectionClosed

from sync_worker.jsoncodec import dumps_str

from .core import Core, NotFound, claim_proposal
from .sockets import (
    GOING_AWAY,
    NORMAL,
    OneAtATime,
    Outbox,
    POLICY_VIOLATION,
    PREFECT_VIOLATION,
    PROTOCOL_ERROR,
    UNSUPPORTED_DATA,
    SubscriptionRegistry,
    WebSocket,
    authenticate,
    serve_socket,
)
from .sockets import Close as _Close
from .sockets import close_socket as _close
from .sockets import decode as _decode
from . import sockets, validation
from .database import QSTATE_MEMORY, DatabaseClosed, StorageError
from .models import ValidationError, validate_state
from .validation import check_uuid

logger = logging.getLogger("sync_worker.server.subscriptions")

#: Extensions offered in ``auth_success`` (Prefect clients ignore the field): ``set_state``
#: (proposals over this socket), ``credit`` (flow control, see the module docstring), ``direct_running`` (RUNNING proposed for a RUNNING run is answered ABORT, so
#: RUNNING alone claims a run).
#: ``release`` (``{"type": "release"}``: a stopping worker takes no more runs on this
#: connection and hands back every run delivered and not acknowledged, at once; the
#: connection stays open as the lease of its acknowledged runs).
#: ``release_run`` (``{"type": "release", "task_run_id": ID}``: one acknowledged run its
#: worker will not start, e.g. its claim could not be recorded, is re-queued now instead of
#: at the end of its lease).
#: ``claim_at_delivery`` (RUNNING committed at delivery, see the module docstring).
#: ``batch_delivery`` (runs claimed together sent in one frame).
#: ``brief_set_state`` (a ``set_state`` with ``"brief": true`` that is accepted is answered
#: ``"result": {"status": "ACCEPT"}``, without the state, see the module docstring).
#: ``inline_parameters`` (runs claimed at delivery carry the parameters record this server
#: holds for them, see the module docstring).
EXTENSIONS = ["set_state", "credit", "direct_running", "release", "release_run", "claim_at_delivery",
              "batch_delivery", "brief_set_state", "inline_parameters"]
#: seconds before delivery is tried again after a claim could not be written
CLAIM_RETRY_DELAY = 1.0
#: Most runs one connection may be granted, whatever credit it asks for.
MAX_CREDIT = 1000
#: Most run ids a worker may name in its subscribe message's ``holding``.
MAX_HOLDING = 100_000
#: set_state requests of one connection that may await their answers; past this the server
#: stops reading that connection until answers have been sent
MAX_UNANSWERED = 256


_ranks = itertools.count()


def handle_websocket(environ: dict[str, Any], core: Core, registry: SubscriptionRegistry,
                     max_message_size: int | None) -> None:
    """Serve one subscription connection until it ends (runs in the HTTP handler thread)."""

    def serve(ws: WebSocket, peer: str) -> None:
        if ws.subprotocol == "prefect":
            # lease_timeout: how long a run acknowledged on a lost connection stays this
            # worker's; a worker reconnects within it (its backoff is capped below it)
            announce = {} if core.prefect_compatible else {
                "extensions": EXTENSIONS, "lease_timeout": core.queue.lease_timeout}
            authenticate(ws, core, announce)
        elif core.auth_string is not None:
            raise _Close(PROTOCOL_ERROR, "'prefect' subprotocol required when auth is configured")
        keys, client_id, credit, claim, batch, inline, holding, limit = _read_subscribe(
            ws, not core.prefect_compatible)
        Subscription(ws, core, keys, client_id, peer, credit, claim_at_delivery=claim, batch_delivery=batch,
                     holding=holding, inline_parameters=inline, limit=limit).run()

    serve_socket(environ, registry, max_message_size, "subscription", serve)


def _read_subscribe(ws: WebSocket, extensions: bool = True
                    ) -> tuple[list[str], str, int | None, bool, bool, bool, set[str] | None, int | None]:
    message = ws.receive(timeout=sockets.HANDSHAKE_TIMEOUT)
    if message is None and ws.connected:
        raise _Close(POLICY_VIOLATION, f"Expected 'subscribe' message within {sockets.HANDSHAKE_TIMEOUT:g} s")
    value = _decode(message)
    if value.get("type") != "subscribe":
        raise _Close(PREFECT_VIOLATION, "Protocol violation: expected 'subscribe' message")
    keys = value.get("keys")
    if not keys:
        raise _Close(PREFECT_VIOLATION, "Protocol violation: expected 'keys' in subscribe message")
    if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
        raise _Close(PREFECT_VIOLATION, "Protocol violation: 'keys' must be a list of task key strings")
    client_id = value.get("client_id")
    if not client_id:
        raise _Close(PREFECT_VIOLATION, "Protocol violation: expected 'client_id' in subscribe message")
    if not isinstance(client_id, str):
        raise _Close(PREFECT_VIOLATION, "Protocol violation: 'client_id' must be a string")
    problem = validation.subscribe_problem(keys, client_id)
    if problem:
        raise _Close(PREFECT_VIOLATION, validation.close_reason(f"Protocol violation: {problem}"))
    credit = value.get("credit")
    if credit is not None and (not isinstance(credit, int) or isinstance(credit, bool) or credit < 0):
        raise _Close(PREFECT_VIOLATION, "Protocol violation: 'credit' must be a whole number >= 0")
    limit = value.get("limit") if credit is not None else None
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise _Close(PREFECT_VIOLATION, "Protocol violation: 'limit' must be a whole number >= 1")
    claim, batch = (_flag(value, "claim_at_delivery"), _flag(value, "batch_delivery")) if extensions else (False, False)
    if claim and credit is None:
        raise _Close(PREFECT_VIOLATION, "Protocol violation: 'claim_at_delivery' requires 'credit'")
    if batch and not claim:
        raise _Close(PREFECT_VIOLATION, "Protocol violation: 'batch_delivery' requires 'claim_at_delivery'")
    inline = _flag(value, "inline_parameters") if extensions else False
    if inline and not claim:
        raise _Close(PREFECT_VIOLATION, "Protocol violation: 'inline_parameters' requires 'claim_at_delivery'")
    holding = value.get("holding") if claim else None
    if holding is not None and (not isinstance(holding, list) or len(holding) > MAX_HOLDING
                                or not all(isinstance(i, str) for i in holding)):
        raise _Close(PREFECT_VIOLATION, f"Protocol violation: 'holding' must be a list of at most {MAX_HOLDING} "
                                        "run ids")
    return (list(dict.fromkeys(keys)), client_id, credit, claim, batch, inline,
            None if holding is None else set(holding), limit)


def _flag(value: dict[str, Any], name: str) -> bool:
    flag = value.get(name)
    if flag is None:
        return False
    if not isinstance(flag, bool):
        raise _Close(PREFECT_VIOLATION, f"Protocol violation: '{name}' must be true or false")
    return flag


class Subscription:
    """One subscribed worker connection (a :class:`runqueue.Waiter`).

    Threads: the HTTP handler thread waits in :meth:`run` until the connection ends and then
    cleans up; simple-websocket's reader thread handles each incoming message
    (:meth:`_on_messages`) and, on an ack, sends the next run itself; the outbox's sender
    thread sends ``set_state_result`` answers committed by other threads and delivers a run
    when one arrives for an idle connection.
    """

    def __init__(self, ws: WebSocket, core: Core, keys: list[str], client_id: str, peer: str,
                 credit: int | None = None, claim_at_delivery: bool = False,
                 batch_delivery: bool = False, holding: set[str] | None = None,
                 inline_parameters: bool = False, limit: int | None = None) -> None:
        #: claim_at_delivery: the runs the worker says it holds when it (re)subscribes
        #: (see RunQueue.adopt); None: every lease of its client_id is taken over
        self.holding = holding
        self.claim_at_delivery = claim_at_delivery
        self.batch_delivery = batch_delivery
        #: runs delivered to it carry the parameters record this server holds for them
        self.inline_parameters = inline_parameters
        # runs it may hold at once (stats): the limit it names; else its free slots plus the
        # runs it holds when it reconnects while running some (an estimate: a run that is
        # still reporting holds no slot, so it may count twice)
        if limit is not None:
            self.limit = limit
        else:
            self.limit = (credit + len(holding or ())) if credit is not None else 1
        self.rank = next(_ranks)  # older connections get runs first (runqueue._preference)
        self.connected_at = time.time()  # shown by the dashboard
        self.ws = ws
        self.core = core
        self.queue = core.queue
        self.keys = keys
        self.client_id = client_id
        self.peer = peer
        self.leased: set[str] = set()
        self._cond = threading.Condition()
        # answers committed by other threads, and deliveries when the queue wakes us
        self.outbox = Outbox(ws, f"sync-worker-ws-send-{client_id}", tick=self._tick, sent=self._answered,
                             lost=self._lost)
        if claim_at_delivery:
            ws.on_read = self._after_read  # a delivery deferred until the client's input was read
        # delivered runs awaiting their ack, oldest first: id -> (id, key, seq, text)
        self._unacked: OrderedDict[str, tuple[str, str, int, str | None]] = OrderedDict()
        # ``None``: Prefect's protocol, one run awaiting its ack at a time.
        # A number: the credit extension (runs that may still be sent before a grant).
        self._credit = None if credit is None else min(credit, MAX_CREDIT)
        self._closed = False
        self._quitting = False
        self._done = threading.Event()
        self._close_request: tuple[int, str] | None = None
        # what arrived, handled in the reader thread; never blocks a caller other than the
        # one handling messages (the stopping server calls it to wake a connection)
        self._on_messages = OneAtATime(self._drain)
        self._granted = False
        self._grant_pending = 0  # credit read with set_state messages, not usable yet (_apply_grant)
        self._unanswered = 0  # set_state requests whose answer is not sent yet
        self._held_back = False  # the reader waits until fewer are unanswered (notify then)
        self._batch: list[tuple[str, dict[str, Any], bool, Callable[..., None], bool]] = []
        self._deliver_lock = threading.Lock()
        self.delivered = 0
        #: the RUNNING proposal of a claim for this connection (a claim at a run's create)
        self.claim_state = claim_proposal(client_id) if claim_at_delivery else None
        # runs claimed at their create whose frame the committing thread could not send at
        # once: the sender thread sends them
        self._reserved_texts: list[str] = []
        # claims at create reserved and not settled yet (committed and sent, or undone), and
        # the runs of those committed so far: the runs claimed by one transaction go out
        # together, when its last one settles (one frame with batch_delivery)
        self._claiming = 0
        self._claimed: list[tuple[str, str]] = []
        self._deferred = 0  # runs the queue left waiting for this connection (wake) since it last took runs
        self._retry_claims_at = 0.0  # (monotonic) a refused claim is tried again then, not before
        #: how long a run holds a slot of this worker, from its frame sent to its state read
        #: (moving average, seconds; None until measured): whether later workers of its keys
        #: wait for it (runqueue._held_for_first)
        self.slot_seconds: float | None = None
        self._sent_at: dict[str, float] = {}  # run id -> when it was sent (claim_at_delivery)

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other

    def has_room(self) -> bool:
        """Whether flow control lets a run go now (read without the lock: it only orders the
        waiters, see ``runqueue._preference``)."""
        credit = self._credit
        return not self._unacked if credit is None else credit > 0

    # -- Waiter ----------------------------------------------------------------------------------
    def wake(self) -> bool | None:
        """The queue has runs for us (or a deferred delivery is due): wake the sender thread,
        unless the worker said something the reader has not read yet (claim_at_delivery):
        then :meth:`_tick` would only return (see there), and the reader wakes us again once
        it has read it (``ws.on_read``; ``input_pending`` arranged that). Checked here, in
        the waking thread, it saves a thread wake-up: in a drain most creates find the
        worker's final states unread (their run is queued) and woke the sender thread for
        nothing (measured: 2,131 wake-ups for 5,000 runs, 64 of which claimed a run).

        With several workers on the key (:meth:`.RunQueue._wake`): True when the reader
        will take the run (the connection still waits for runs), up to as many runs as it has
        free credits (:meth:`reserve`); False past them (the queue wakes the next waiter);
        None when the sender thread was woken.

        True too while a claim the database refused waits for its retry (``_retry_claims_at``):
        each run created meanwhile woke the sender thread, which tried its claim at once: on
        a full disk, over a thousand refused commits and WARNING lines a second."""
        if self._claims_paused():
            return True
        if self.claim_at_delivery and not self._reserved_texts and self.ws.input_pending():
            if self._deferred < (self._credit or 0):
                self._deferred += 1
                return True
            return False
        self.outbox.poke()
        return None

    # -- claim at create (see Core._create_op and RunQueue.claim_for) ----------------------------
    def reserve(self) -> bool | None:
        """Under the queue's lock, in a create's transaction: take one credit for a run being
        created for this connection, if it takes claimed runs, has a free credit and is not
        delivering right now (its own delivery reads the credit it may use; never block
        here: this runs in the committing thread).

        Whether it already holds runs does not matter: it waits for runs of this key (it
        looked and found none) with a free slot, and the alternative is waking its sender
        thread, which commits the claim apart. Claiming here for busy workers too costs one
        commit and one thread wake-up less per run, and keeps the runs of a burst on the
        first waiting worker that has room (RunQueue.claim_for asks the waiters in a stable
        order) instead of spreading them one per worker connection, each then with its own
        frames and final-state commits. Measured with 4 worker processes (drain): about a
        fifth less CPU per run for the server and workers together.

        None: not now, but the run should wait for this connection: it has a free credit and
        the worker said something the reader has not read yet (usually final states, which
        bring more credit), or its own delivery holds its lock at this instant (the wake
        that follows the queued run reaches it once that delivery ends). The reader takes
        the queued run right after reading the unread input, in the commit of those final
        states (``input_pending`` arranged that the reader delivers then). Giving the run to
        the next worker instead spread a drain over every worker process, each then waking,
        framing and reporting for fewer runs (measured, drains of 3,000 runs with 2 and 4
        workers: the first one got 48-71 % of the runs before, 93-99 % with this). At most
        as many runs wait so as the connection has free credits (``_deferred``, counted by
        :meth:`wake` as the queue wakes it for them, reset when it takes runs); the rest go
        to the next worker, so a run does not wait for one worker while another has a free
        slot and this one's are taken (10 ms tasks on 4 workers)."""
        if not self.claim_at_delivery:
            return False
        if not self._credit or self._quitting or self._closed:
            return False  # (read again below, under the lock; this spares the peek)
        if self.ws.input_pending():  # (e.g. a release: not claimed then, see _tick)
            return None if self._deferred < self._credit else False
        if not self._deliver_lock.acquire(blocking=False):
            # delivering right now (usually the reader, after final states that brought this
            # credit): queued for it (see above). Passed to the next worker, a run left this
            # one with a free slot whenever its reader was descheduled between answering and
            # letting go of the lock (a burst-preference test failed 2 times in 25 beside
            # three busy processes).
            return None
        try:
            with self._cond:
                if self._closed or self._quitting or not self._credit or self._done.is_set():
                    return False
                self._credit -= 1
                self._claiming += 1
                return True
        finally:
            self._deliver_lock.release()

    def unreserve(self) -> None:
        """The create that reserved a credit was not committed: the credit is free again."""
        with self._cond:
            self._credit = min((self._credit or 0) + 1, MAX_CREDIT)
            self._claiming -= 1
            runs = self._settled()
        if runs:
            self._send_claimed(runs)
        self.wake()  # a run queued meanwhile may be waiting for it

    def deliver_reserved(self, run_id: str, text: str) -> None:
        """After the commit of a create that claimed its run for this connection (in the
        committing thread, which must never block on this client): the runs one transaction
        claimed are sent together when the last of them settles (:meth:`_send_claimed`)."""
        with self._cond:
            self._claiming -= 1
            self._claimed.append((run_id, text))
            runs = self._settled()
        if runs:
            self._send_claimed(runs)

    def _settled(self) -> list[tuple[str, str]]:
        """Under ``self._cond``: the claimed runs to send now (all of them settled)."""
        if self._claiming or not self._claimed:
            return []
        runs, self._claimed = self._claimed, []
        return runs

    def _send_claimed(self, runs: list[tuple[str, str]]) -> None:
        """Send runs claimed at their create, from this (committing) thread when the socket
        takes them at once, else from the sender thread. A connection that stopped receiving
        or ended in between never gets them: they are SCHEDULED again at once (as a
        ``release`` naming them would), not left to their lease."""
        with self._cond:
            gone = self._closed or self._quitting or self._done.is_set()
        if gone:
            try:
                self.core.release_claimed_async([run_id for run_id, _text in runs], self.client_id)
            except DatabaseClosed:  # recovered with the next start (RUNNING, held by client_id)
                pass
            return
        self.delivered += len(runs)
        self._sending([run_id for run_id, _text in runs])
        for text in self._run_frames([text for _id, text in runs]):
            sockets.send_soon(self.ws, text, self._send_later)

    def _sending(self, run_ids: list[str]) -> None:
        """Runs claimed for this worker are being sent: their slot time starts (:meth:`_slot_freed`)."""
        sent_at = self._sent_at
        if len(sent_at) > 4 * MAX_CREDIT:  # runs handed back or lost never report: forget them
            sent_at.clear()
        now = time.monotonic()
        for run_id in run_ids:
            sent_at[run_id] = now

    def _slot_freed(self, run_id: Any) -> None:
        """The worker reported on a run sent to it: update :attr:`slot_seconds`."""
        sent = self._sent_at.pop(run_id, None) if type(run_id) is str else None
        if sent is not None:
            seconds = time.monotonic() - sent
            average = self.slot_seconds
            self.slot_seconds = seconds if average is None else average + (seconds - average) / 8

    def _run_frames(self, texts: list[str]) -> list[str]:
        """The messages that deliver these runs: one ``task_runs`` frame for several with
        ``batch_delivery``, else one plain TaskRun each."""
        if self.batch_delivery and len(texts) > 1:
            return ['{"type":"task_runs","task_runs":[' + ",".join(texts) + "]}"]
        return texts

    def _send_later(self, text: str) -> None:
        """A claimed run's frame the committing thread could not send at once: the sender
        thread sends it."""
        with self._cond:
            self._reserved_texts.append(text)
        self.outbox.poke()

    # -- lifecycle -------------------------------------------------------------------------------
    def run(self) -> None:
        logger.info("Task worker %r (%s) subscribed to task keys %r", self.client_id, self.peer, self.keys)
        self.queue.join(self)
        adopted = self.queue.adopt(self, self.holding)
        self.holding = None
        if adopted:
            logger.info("Task worker %r reconnected: it keeps the lease of %d run(s) it holds", self.client_id,
                        adopted)
        self.outbox.start(poked=True)  # delivers what is already queued
        reason = "connection closed"
        self.core.subscribers.add(self)
        try:
            self.ws.event.attach(self._on_messages)
            # simple-websocket's reader can end without a last set() (e.g. after refusing an
            # oversized message): also watch the thread itself.
            while not self._done.wait(0.25):
                if not self.ws.thread.is_alive():
                    break
            request = self._close_request
            if request is not None:
                code, reason = request
                reason = reason or "quit"
                self._stop_sending()
                if code != NORMAL:
                    logger.info("closing subscription of %r: %s (%d)", self.client_id, reason, code)
                _close(self.ws, code, "" if code == NORMAL else request[1])
        finally:
            self.core.subscribers.discard(self)
            self._stop_sending()
            self.queue.forget_waiter(self)
            for in_flight in self._take_unacked():
                self.queue.give_back(self, *in_flight)
            self.queue.connection_lost(self)
            logger.info("Task worker %r (%s) disconnected (%s) after %d deliveries", self.client_id, self.peer,
                        reason, self.delivered)

    def _stop_sending(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self.outbox.close()

    def _lost(self) -> None:
        self._done.set()

    def _request_close(self, code: int, reason: str) -> None:
        """Ask the handler thread to close the connection (never close from the reader thread:
        simple-websocket would mark the connection open again after our callback)."""
        if self._close_request is None:
            self._close_request = (code, reason)
        self._done.set()

    # -- receiving (simple-websocket's reader thread) ---------------------------------------------
    def _drain(self) -> None:
        buffer = self.ws.input_buffer
        try:
            while buffer and not self._done.is_set():
                message = buffer.pop(0)
                try:
                    self._handle(message)
                except _Close as close:
                    self._request_close(close.code, close.reason)
                except (ConnectionClosed, OSError):
                    self._done.set()
                except Exception:  # a bug: drop this connection, keep the server
                    logger.exception("error handling a message from %r", self.client_id)
                    self._request_close(1011, "Internal server error")
        finally:
            self._delivering(self._after_messages)
        if not self.ws.connected:
            self._done.set()

    def _after_messages(self) -> None:
        """Reader thread, after the messages of a read: commit their set_state requests, and
        deliver what the credit they carried lets go."""
        if self._granted and self.claim_at_delivery and self._batch:
            # final states carrying credit: they and the next claim in one commit
            self._granted = False
            self._flush_and_deliver()
        else:
            self._flush_set_states()
            if self._granted:  # credit that came with set_state messages
                self._granted = False
                self._apply_grant()
                self._try_deliver()

    def _delivering(self, deliver: Callable[[], None]) -> None:
        """Reader thread: ``deliver`` (commits and sends), its errors ending this connection
        only: a lost socket ends it, a closing database is the server's own stop, anything
        else (a storage error reading a run, a bug) closes it with 1011 and keeps the server."""
        try:
            deliver()
        except (ConnectionClosed, OSError):
            self._done.set()
        except DatabaseClosed:
            pass
        except Exception:
            logger.exception("error delivering to %r", self.client_id)
            self._request_close(1011, "Internal server error")

    def _apply_grant(self) -> None:
        """Reader thread: the credit that this read's ``set_state`` messages carried becomes
        usable (see :meth:`_set_state`). Called holding the delivery lock when the final states
        and the claims go in one commit, so that no other thread claims with it first."""
        grant, self._grant_pending = self._grant_pending, 0
        if grant:
            with self._cond:
                self._credit = min((self._credit or 0) + grant, MAX_CREDIT)

    def _flush_set_states(self) -> None:
        """Commit the set_state requests read so far (together: one transaction for all the
        messages that arrived at once), then send the answers this thread committed (those
        committed by the writer thread go through the outbox)."""
        batch, self._batch = self._batch, []
        if batch:
            with self.outbox.direct():
                try:
                    self.core.set_states_async(batch, holder=self.client_id)
                except DatabaseClosed as exc:
                    for _run_id, _proposed, _force, done, _brief in batch:
                        done(None, exc)

    def _flush_and_deliver(self) -> None:
        """claim_at_delivery: commit the set_state requests read so far together with the
        claim of the runs their credit lets go (one transaction), send the answers, then the
        runs; deliver more if more credit is left. With nothing due, just the set_states."""
        with self._deliver_lock:
            self._apply_grant()
            taken = self._take_for_claim()
            if not taken:
                self._flush_set_states()
                return
            batch, self._batch = self._batch, []
            with self.outbox.direct():
                more = self._claim_and_send(taken, batch)
            while more and self._deliver_claimed():
                pass

    def _handle(self, message: Any) -> None:
        value = _decode(message)
        kind = value.get("type")
        if kind == "ack":
            with self._cond:
                oldest = next(iter(self._unacked.values()), None)  # only this thread removes entries
            if oldest is None:
                logger.debug("ack from %r with no run awaiting one; ignored", self.client_id)
                return
            # leased before it leaves the unacknowledged runs: a connection closing in between
            # then gives it back instead of losing it
            # (never call the queue while holding self._cond: the queue calls wake())
            self.queue.acked(self, oldest[0])
            with self._cond:
                self._unacked.pop(oldest[0], None)
            if self._credit is None:
                self._try_deliver()
        elif kind == "credit":
            n = value.get("n", 1)
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise _Close(PREFECT_VIOLATION, "Protocol violation: 'n' must be a whole number >= 0")
            with self._cond:
                if self._credit is None:
                    raise _Close(PREFECT_VIOLATION, "Protocol violation: 'credit' without credit in subscribe")
                self._credit = min(self._credit + n, MAX_CREDIT)
            self._try_deliver()
        elif kind == "set_state":
            self._set_state(value)
        elif kind == "release" and "task_run_id" in value:
            run_id = value["task_run_id"]
            if not isinstance(run_id, str) or not run_id:
                raise _Close(PREFECT_VIOLATION, "Protocol violation: 'task_run_id' must be a run id")
            if self.queue.hand_back(self, run_id):
                logger.info("Task worker %r handed back run %s unstarted", self.client_id, run_id)
        elif kind == "release":
            ids = value.get("task_run_ids")
            if ids is not None and (not self.claim_at_delivery or not isinstance(ids, list)
                                    or len(ids) > MAX_CREDIT or not all(isinstance(i, str) for i in ids)):
                raise _Close(PREFECT_VIOLATION, "Protocol violation: 'task_run_ids' must be a list of run ids "
                                                "(with claim_at_delivery)")
            with self._cond:
                self._quitting = True  # no delivery after this (see _deliver_one)
            released = self._take_unacked()
            for in_flight in released:
                self.queue.give_back(self, *in_flight)
            self.queue.forget_waiter(self)
            claimed = 0
            if ids:
                try:
                    claimed = self.core.release_claimed(ids, self.client_id)
                except StorageError as exc:  # they stay RUNNING and leased: the lease brings them back
                    logger.warning("could not hand back the runs of %r: %s", self.client_id, exc)
            logger.info("Task worker %r stopped receiving; %d run(s) handed back", self.client_id,
                        len(released) + claimed)
        elif kind == "quit":
            with self._cond:
                self._quitting = True
            for in_flight in self._take_unacked():
                self.queue.give_back(self, *in_flight)
            self._request_close(NORMAL, "")
        else:
            raise _Close(PREFECT_VIOLATION, "Protocol violation: expected 'ack' message")

    def _set_state(self, value: dict[str, Any]) -> None:
        grant = value.get("credit")
        if grant is not None:  # claim_at_delivery: the final state frees a slot, in the same frame
            if not self.claim_at_delivery or not isinstance(grant, int) or isinstance(grant, bool) or grant < 0:
                raise _Close(PREFECT_VIOLATION, "Protocol violation: 'credit' in set_state must be a whole number "
                                                ">= 0 (with claim_at_delivery)")
            # usable once this read's set_states are flushed (_apply_grant), not before: else
            # the sender thread, woken meanwhile, could claim the next run with it in a commit
            # of its own, ahead of the final state that freed the slot
            self._grant_pending += grant
            self._granted = True
        # Backpressure: a client that sends requests faster than it reads the answers stops
        # being read (TCP pushes back on it) instead of filling the server's memory and the
        # database queue that everybody shares.
        if self._unanswered + len(self._batch) >= MAX_UNANSWERED:
            self._flush_set_states()  # (their answers are what we are about to wait for)
        with self._cond:
            if self.ws.shared:  # one thread reads every connection: never wait, stop reading this one
                if self._unanswered >= MAX_UNANSWERED:
                    self._held_back = True
                    self.ws.hold("answers", True)
            else:
                while self._unanswered >= MAX_UNANSWERED and not self._closed and not self._done.is_set():
                    self._held_back = True
                    self._cond.wait(0.5)
                self._held_back = False
            if self._closed or self._done.is_set():
                return
            self._unanswered += 1
        request_id = value.get("request_id")
        run_id = value.get("task_run_id")
        if self._sent_at:
            self._slot_freed(run_id)
        try:
            if not isinstance(request_id, (str, int)) or isinstance(request_id, bool):
                raise ValidationError(["request_id"], "Input should be a valid string", "string_type")
            if not isinstance(run_id, str) or not run_id:
                raise ValidationError(["task_run_id"], "Input should be a valid string", "string_type")
            run_id = check_uuid(run_id, ["task_run_id"])  # as REST reads a run id
            if "state" not in value:
                raise ValidationError(["state"], "Field required", "missing")
            proposed = validate_state(value["state"], ["state"])
            force = value.get("force", False)
            if force is None:
                force = False
            if not isinstance(force, bool):
                raise ValidationError(["force"], "Input should be a valid boolean", "bool_type")
        except ValidationError as exc:
            self._post(json.dumps({"type": "set_state_result", "request_id": request_id, "status_code": 422,
                                   "detail": exc.detail}))
            return

        rid = dumps_str(request_id) if type(request_id) is str else json.dumps(request_id)
        prefix = f'{{"type":"set_state_result","request_id":{rid},'
        brief = value.get("brief") is True

        def done(result: str | None, error: BaseException | None) -> None:
            if error is None:  # asked brief and accepted: result is core.BRIEF_ACCEPT
                self._post(f'{prefix}"status_code":201,"result":{result}}}')
                return
            if isinstance(error, NotFound):
                code, detail = 404, "Task not found"
            elif isinstance(error, DatabaseClosed):
                code, detail = 503, "Server is shutting down"
            elif isinstance(error, StorageError):  # disk full (507), database locked (503)
                code, detail = error.status, error.detail
            else:
                logger.error("set_state for %s failed: %r", run_id, error)
                code, detail = 500, f"Internal error: {type(error).__name__}"
            self._post(f'{prefix}"status_code":{code},"detail":{json.dumps(detail)}}}')

        self._batch.append((run_id, proposed, force, done, brief))  # committed by _flush_set_states

    def _answered(self, count: int) -> None:
        with self._cond:
            self._unanswered -= count
            if self._held_back:  # the reader waits for answers to go out (see _set_state)
                self._cond.notify_all()
                if self.ws.shared and self._unanswered < MAX_UNANSWERED:
                    self._held_back = False
                    self.ws.hold("answers", False)

    def _take_unacked(self) -> list[tuple[str, str, int, str | None]]:
        with self._cond:
            runs = list(self._unacked.values())
            self._unacked.clear()
        return runs

    def _may_send(self) -> bool:
        """Under ``self._cond``: whether flow control lets one more run go."""
        if self._credit is None:
            return not self._unacked  # Prefect's protocol: one run awaiting its ack
        return self._credit > 0

    def _post(self, message: str) -> None:
        """An answer: sent by this thread after its commit when it is the reader committing
        inline (see :meth:`_flush_set_states`); committed by another thread (the database's
        writer, or another connection's reader leading the commit), sent by that thread when
        the socket takes it at once (:func:`.sockets.send_soon`), else by the outbox's sender
        thread -- a thread wake-up less per answer, which with several worker connections is
        most of them."""
        outbox = self.outbox
        if not outbox.direct_here() and not outbox.closed:
            sockets.send_soon(self.ws, message, outbox.post, self._answered)
            return
        outbox.post(message)

    # -- sending ---------------------------------------------------------------------------------
    def _tick(self, poked: bool) -> None:
        """Outbox sender thread, after its sends: deliver when the queue woke us."""
        if poked:
            if self._reserved_texts:
                with self._cond:
                    texts, self._reserved_texts = self._reserved_texts, []
                self.ws.send_many(texts)  # a failed send: the lease brings the runs back
            if self.claim_at_delivery and self.ws.input_pending():
                # The worker said something the reader has not read yet (a busy server): it
                # may be its ``release`` (or close) as it stops. A run claimed now would be
                # leased to a worker that never sees it, RUNNING until the lease ends. Read
                # first: the reader wakes this thread again once it has (ws.on_read).
                return
            self._try_deliver()

    def _after_read(self) -> None:
        """``ws.on_read``: the reader thread read and handled the worker's input that a
        delivery was deferred for (:meth:`_tick`, :meth:`wake`). The delivery is made here,
        in the reader thread, as after the final states it reads (:meth:`_drain`), instead
        of waking the sender thread for it: that one usually found nothing left to send (the
        final states' own delivery took the runs) -- measured, 581 sender wake-ups per 5,000
        runs of a drain, 3 of which claimed a run. Runs claimed at create waiting for the
        sender thread still wake it."""
        if self._reserved_texts or not self.ws.lean:  # (the lean path ended: maybe a close)
            self.outbox.poke()
            return
        if self.ws.input_pending():
            return  # more came meanwhile: again after the reader has read it
        self._delivering(self._try_deliver)

    def _try_deliver(self) -> None:
        """Send runs while flow control allows (any thread; one sender at a time)."""
        with self._deliver_lock:
            if self.claim_at_delivery:
                while self._deliver_claimed():
                    pass
                return
            while self._deliver_one():
                pass

    def _take_due(self, limit: int) -> list[tuple[str, str, int, str | None]]:
        """Up to ``limit`` due runs taken from the queue for this connection (the stale ones
        dropped), as (id, key, seq, text or None). None while a refused claim waits for its
        retry (see :meth:`wake`)."""
        taken: list[tuple[str, str, int, str | None]] = []
        if self._claims_paused():
            return taken
        while len(taken) < limit:
            one = self.queue.take(self)
            if one is None:
                break
            if one[3] is None:  # loaded from the database: check it is still deliverable
                found = self.core.db.read_run_text(one[0])  # type: ignore[attr-defined]
                if found is None or found[1] != "SCHEDULED" or found[2] != QSTATE_MEMORY:
                    self.queue.discard(self, one[0])
                    continue
            taken.append(one)
        return taken

    def _deliver_claimed(self) -> bool:
        """claim_at_delivery: take as many runs as the credit allows, commit RUNNING for all
        of them together, send them; True if some were sent (call again)."""
        taken = self._take_for_claim()
        return bool(taken) and self._claim_and_send(taken)

    def _take_for_claim(self) -> list[tuple[str, str, int, str | None]]:
        """The due runs the credit lets go now (none once closed or quitting)."""
        with self._cond:
            refused = self._closed or self._quitting or not self._credit
            limit = self._credit or 0
        if refused:
            self.queue.pass_on(self)  # in case it was this connection that a run woke
            return []
        self._deferred = 0
        taken = self._take_due(limit)
        if not taken:
            return []
        with self._cond:
            closed = self._closed or self._quitting
        if closed:
            for run in taken:
                self.queue.give_back(self, *run)
            return []
        return taken

    def _claim_and_send(self, taken: list[tuple[str, str, int, str | None]],
                        before: list[tuple[str, dict[str, Any], bool, Callable[..., None]]] | None = None) -> bool:
        """Commit RUNNING for ``taken`` (after the set_state requests ``before``, in the same
        transaction), send this thread's answers, then the runs; True to call again."""
        for run in taken:  # leased before the commit: a connection lost meanwhile starts their lease
            self.queue.acked(self, run[0])
        try:
            claimed = self.core.claim_at_delivery([run[0] for run in taken], self.client_id, before,
                                                  self.inline_parameters)
        except DatabaseClosed as exc:
            for run in taken:
                self.queue.give_back(self, *run)
            for _run_id, _proposed, _force, done, _brief in before or ():
                done(None, exc)
            raise
        with self._cond:
            gone = self._closed or self._quitting
        if gone:  # the worker stopped receiving (or left) during the commit: not sent, hand them back now
            self.outbox.flush_mine()  # the answers to ``before``
            self._release_unsent(taken, claimed)
            return False
        texts: list[str] = []
        sent_ids: list[str] = []
        failed: BaseException | None = None
        for run, result in zip(taken, claimed, strict=True):
            if isinstance(result, BaseException):  # not written: the run stays queued
                failed = result
                self.queue.give_back(self, *run, wake=False)  # (the timer below tries again)
            elif result is None:  # deleted or not SCHEDULED any more
                self.queue.discard(self, run[0])
            else:
                texts.append(result)
                sent_ids.append(run[0])
        with self._cond:
            self._credit = max(0, (self._credit or 0) - len(texts))
        self._sending(sent_ids)
        # the answers to ``before`` first, then the runs, in one write (a failed send: the
        # lease brings the runs back)
        self.outbox.flush_mine(then=self._run_frames(texts))
        self.delivered += len(texts)
        if failed is not None:
            logger.warning("could not claim runs for %r at delivery (%s); trying again in %g s", self.client_id,
                           failed, CLAIM_RETRY_DELAY)
            self._retry_claims_at = time.monotonic() + CLAIM_RETRY_DELAY
            timer = threading.Timer(CLAIM_RETRY_DELAY, self._retry_claims)
            timer.daemon = True
            timer.start()
            return False
        return bool(texts) or len(taken) > 0

    def _claims_paused(self) -> bool:
        """A claim the database refused waits for its retry (:data:`CLAIM_RETRY_DELAY`)."""
        return bool(self._retry_claims_at) and time.monotonic() < self._retry_claims_at

    def _retry_claims(self) -> None:
        self._retry_claims_at = 0.0
        self.wake()

    def _release_unsent(self, taken: list[tuple[str, str, int, str | None]],
                        claimed: list[str | BaseException | None]) -> None:
        """Runs claimed for this connection after it stopped receiving: SCHEDULED again at once
        (as a ``release`` naming them would), instead of leased to a worker that never got them
        (whose next connection, same client_id, would adopt them and hold them unknowingly)."""
        ids = []
        for run, result in zip(taken, claimed, strict=True):
            if isinstance(result, BaseException):
                self.queue.give_back(self, *run)
            elif result is None:
                self.queue.discard(self, run[0])
            else:
                ids.append(run[0])
        if ids:
            try:
                self.core.release_claimed(ids, self.client_id)
            except (StorageError, DatabaseClosed) as exc:  # they stay RUNNING and leased: the lease brings them back
                logger.warning("could not hand back the runs claimed for %r: %s", self.client_id, exc)

    def _deliver_one(self) -> bool:
        """Send one run if flow control allows and one is due; True if one was sent."""
        with self._cond:
            refused = self._closed or self._quitting or not self._may_send()
        if refused:
            self.queue.pass_on(self)  # in case it was this connection that a run woke
            return False
        while True:
            taken = self.queue.take(self)
            if taken is None:
                return False  # registered as a waiter: wake() will call us again
            run_id, task_key, seq, text = taken
            if text is None:  # loaded from the database, not created/queued in this process
                found = self.core.db.read_run_text(run_id)  # type: ignore[attr-defined]
                if found is None or found[1] != "SCHEDULED" or found[2] != QSTATE_MEMORY:
                    self.queue.discard(self, run_id)  # deleted or claimed since it was queued
                    continue
                text = found[0]
            with self._cond:
                closed = self._closed or self._quitting
                if not closed:
                    self._unacked[run_id] = (run_id, task_key, seq, text)
                    if self._credit is not None:
                        self._credit -= 1
            if closed:
                self.queue.give_back(self, run_id, task_key, seq, text)
                return False
            try:
                self.ws.send(text)
            except (ConnectionClosed, OSError):
                with self._cond:
                    self._unacked.pop(run_id, None)
                self.queue.give_back(self, run_id, task_key, seq, text)
                raise
            self.delivered += 1
            return True


#: What other modules import from here (the plumbing itself lives in :mod:`.sockets`).
__all__ = [
    "EXTENSIONS", "GOING_AWAY", "NORMAL", "POLICY_VIOLATION", "PREFECT_VIOLATION", "PROTOCOL_ERROR",
    "UNSUPPORTED_DATA", "Subscription", "SubscriptionRegistry", "WebSocket", "handle_websocket", "serve_socket",
]
