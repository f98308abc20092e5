"""The server's operations, independent of HTTP and websockets.

REST handlers (``app.py``) and the subscription socket (``subscriptions.py``) both call these,
so a state proposed over REST and one proposed over the socket's ``set_state`` extension go
through the same orchestration, in the database writer thread.
"""
from __future__ import annotations

import base64
import hmac
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from .database import QSTATE_MEMORY, QSTATE_NONE, Database, RunRow, Transaction
from .database import dumps as _dumps
from .models import DEFAULT_STATE_NAMES, TERMINAL, ValidationError, build_task_run, parse_time, validate_state
from .orchestration import ACCEPT_DETAILS, orchestrate, orchestrate_prefect
from .retention import PARAMETERS_RECORD, delete_parameters_when_completed, record_keys
from .runqueue import RunQueue

logger = logging.getLogger("sync_worker.server.core")

#: the text of :data:`.orchestration.ACCEPT_DETAILS` (every accepted proposal's details)
_ACCEPT_DETAILS = _dumps(ACCEPT_DETAILS)
#: the result of an accepted proposal asked for ``answer="brief"`` (``brief_set_state``)
BRIEF_ACCEPT = '{"status":"ACCEPT"}'
#: Largest parameters record sent inside a delivered run (``inline_parameters``); a larger
#: one is read by the worker from its store. The client's bound for carrying a record in a
#: create, :data:`sync_worker.storage.INLINE_PARAMETERS_LIMIT`, is the same (not imported:
#: the server does not load the client's storage module).
INLINE_PARAMETERS_LIMIT = 64 * 1024


def with_parameters_record(text: str, record: str) -> str:
    """A delivered run's JSON with its parameters record added (``"parameters_record"``)."""
    return f'{text[:-1]},"parameters_record":{_dumps(record)}}}'


def held_parameters(tx: Transaction, run: dict[str, Any]) -> str | None:
    """The parameters record this server stores for ``run``, as text, when it is small
    enough to travel with the run (:data:`INLINE_PARAMETERS_LIMIT`; else None: the worker
    reads it from its store)."""
    params_id = run["state"]["state_details"].get("task_parameters_id")
    if not params_id:
        return None
    data = tx.get_record(PARAMETERS_RECORD + params_id)
    if data is None or len(data) > INLINE_PARAMETERS_LIMIT:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


class NotFound(LookupError):
    """No such task run / record."""


class Conflict(ValueError):
    """A task run with this id already exists."""


class Core:
    def __init__(self, db: Database, queue: RunQueue, auth_string: str | None = None) -> None:
        self.db = db
        self.queue = queue
        # run id -> callbacks waiting for the run to reach a terminal state (rpc "wait")
        self._finish_waiters: dict[str, list[Callable[[str | None], None]]] = {}
        self._finish_lock = threading.Lock()
        queue.on_finished = self._finished  # a lease running out into CRASHED wakes waiters too
        #: called (run id, TaskRun JSON) after every final state, in the committing thread
        #: (keep them short): the events module announces them to Prefect's callers
        self.finish_listeners: list[Callable[[str, str], None]] = []
        # live worker subscriptions (listing.stats, cancellation messages); added/removed by
        # subscriptions.Subscription.run
        self.subscribers: set[Any] = set()
        self.auth_string = auth_string
        #: Prefect-compatible mode: announce no extension, serve no rpc socket and answer
        #: proposals with Prefect's rules (:func:`.orchestration.orchestrate_prefect`), so that
        #: clients behave as with a Prefect server (their Prefect dialect gets exercised).
        self.prefect_compatible = False
        self._basic = (
            ("Basic " + base64.b64encode(auth_string.encode()).decode()).encode() if auth_string else None
        )

    # -- auth ----------------------------------------------------------------------------------
    def check_authorization(self, header: str | None) -> bool:
        """REST: ``Authorization: Basic base64(auth_string)`` (constant-time comparison)."""
        if self._basic is None:
            return True
        if not header:
            return False
        return hmac.compare_digest(header.strip().encode("utf-8", "replace"), self._basic)

    def check_token(self, token: Any) -> bool:
        """Websocket auth message token == auth string (constant-time comparison)."""
        if self.auth_string is None:
            return True
        if not isinstance(token, str):
            return False
        return hmac.compare_digest(token.encode("utf-8", "replace"), self.auth_string.encode())

    # -- task runs -------------------------------------------------------------------------------
    def create_task_run(self, body: Any, brief: bool = False, parameters_record: Any = None) -> str:
        """Validate and store a run (queued when SCHEDULED + deferred); returns its JSON text
        (``brief``: only ``{"id", "state": {"type", "name", "timestamp"}}``, see :func:`brief_json`).

        Idempotent by the client-chosen ``id``: repeating a create whose answer was lost
        returns the run it created (same id, same task key and dynamic key) instead of a
        409, so clients can retry creates safely. A different run with that id is a 409.

        ``parameters_record``: the run's parameters record (text), stored with the run in
        its transaction under ``parameters.<task_parameters_id>`` (as ``PUT
        /api/storage/parameters.<id>`` would, one request fewer; see :mod:`.rpc`)."""
        op, undo = self._create_op(body, brief, parameters_record)
        try:
            return self.db.write(op)
        except BaseException:
            undo()
            raise

    def create_task_run_async(self, body: Any, callback: Callable[[str | None, BaseException | None], None],
                              brief: bool = False, parameters_record: Any = None) -> None:
        """:meth:`create_task_run` without waiting: ``callback(run_text, error)`` after the
        commit (see :meth:`set_states_async`). Invalid bodies raise ValidationError here.
        Inside ``db.gathering()`` the commit waits for the end of the block."""
        op, undo = self._create_op(body, brief, parameters_record)

        def done(result: Any, error: BaseException | None) -> None:
            if error is not None:
                undo()
            callback(None if error else result, error)

        self.db.submit(op, done, inline=True)

    def _create_op(self, body: Any, brief: bool = False, parameters_record: Any = None
                   ) -> tuple[Callable[[Transaction], str], Callable[[], None]]:
        """The create's write operation, and what undoes its claim when it was not committed.

        Claim at create: a background run due now, with an idle ``claim_at_delivery``
        subscriber of its key that has a free credit (:meth:`.RunQueue.claim_for`), is
        claimed for it in the create's own transaction (RUNNING, exactly as
        :meth:`claim_at_delivery` claims) and sent to it after that one commit, instead of
        being queued, waking the subscriber and committing the claim apart. The create is
        answered with the run as created (SCHEDULED)."""
        now = time.time()
        run = build_task_run(body, now)
        state = run["state"]
        record = _parameters_record(parameters_record, state)
        background = state["type"] == "SCHEDULED" and bool(state["state_details"].get("deferred"))
        row = RunRow(id=run["id"], task_key=run["task_key"], state_type=state["type"], run=run,
                     background=background)
        if background:
            row.due = _parse_due(state, now)
        text = row.dump()
        answer = _brief_of_built(run) if brief else text
        queue = self.queue
        claimed: list[Any] = []  # the subscriber the op claimed the run for

        def op(tx: Transaction) -> str:
            if background:
                queue.place(row, now)
            try:
                tx.insert_run(row)
            except sqlite3.IntegrityError:
                existing = tx.get_run(row.id)
                if existing is not None and _same_create(existing.run, run):
                    logger.debug("create of task run %s repeated: answering the existing run", row.id)
                    return brief_json(existing.run) if brief else existing.dump()
                raise Conflict(f"A task run with id {row.id} already exists") from None
            if record is not None:
                tx.put_record(record[0], record[1])
            if background:
                waiter = None
                if row.qstate == QSTATE_MEMORY and not self.prefect_compatible:
                    waiter = queue.claim_for(row)
                if waiter is None:
                    queue.placed(tx, row)
                else:
                    claimed.append(waiter)
                    try:
                        self._set_state_op(row.id, waiter.claim_state, False, waiter.client_id, False)(tx)
                    except BaseException:
                        tx.delete_run(row.id)  # an operation that raises has written nothing
                        raise
                    delivered = row.dump()
                    if record is not None and waiter.inline_parameters and len(record[1]) <= INLINE_PARAMETERS_LIMIT:
                        delivered = with_parameters_record(delivered, parameters_record)
                    tx.after_commit(lambda: waiter.deliver_reserved(row.id, delivered))
            logger.debug("created task run %s (%s) in state %s", row.id, row.task_key, row.state_type)
            return answer

        def undo() -> None:
            if claimed:
                waiter = claimed.pop()
                queue.unclaim(waiter, row.id)
                waiter.unreserve()

        return op, undo

    def read_task_run(self, run_id: str) -> str:
        row = self.db.read_run(run_id)
        if row is None:
            raise NotFound("Task not found")
        return row.dump()

    def delete_task_run(self, run_id: str) -> None:
        queue = self.queue

        def op(tx: Transaction) -> bool:
            row = tx.delete_run(run_id)
            if row is None:
                return False
            for key in record_keys(row.run):  # its records here go with it, as retention's do
                tx.delete_record(key)
            tx.after_commit(lambda: queue.release(run_id))
            tx.after_commit(lambda: self.deleted(run_id))
            return True

        if not self.db.write(op):
            raise NotFound("Task not found")
        logger.debug("deleted task run %s", run_id)

    def _set_state_op(self, run_id: str, proposed: dict[str, Any], force: bool,
                      holder: str | None = None, answer: bool | str = True) -> Callable[[Transaction], str]:
        """The write operation; its result is the orchestration result as JSON text.
        ``holder``: client_id of the subscription the proposal came over (it holds the run).
        ``answer=False``: the caller never reads the result (a claim: it sends the run), so
        the text is not made and the result is ``""``; ``answer="brief"``: the caller answers
        an ACCEPT without the state (``brief_set_state``), so an ACCEPT's result is
        :data:`BRIEF_ACCEPT` and the state's JSON is not made (any other result is the full
        text). Callers pass it by position (tests wrap this method with
        ``(run_id, proposed, force, *args)``)."""
        queue = self.queue

        def op(tx: Transaction) -> str:
            row = tx.get_run(run_id)
            if row is None:
                raise NotFound("Task not found")
            now = time.time()
            previous = row.state_type
            if self.prefect_compatible:
                decision = orchestrate_prefect(row.run, proposed, force, now)
            else:
                decision = orchestrate(row.run, proposed, force, now, row.background, row.deliveries)
            if decision.changed:
                new_type = decision.state["type"]
                row.state_type = new_type
                if new_type in ("PENDING", "RUNNING"):
                    if holder is not None:
                        row.holder = holder
                else:
                    row.holder = None
                row.touch()
                if decision.queue:
                    row.due = decision.due
                    queue.place(row, now)
                else:
                    row.qstate = QSTATE_NONE
                tx.update_run(row)
                if decision.queue:
                    queue.placed(tx, row)
                elif new_type in TERMINAL:
                    delete_parameters_when_completed(tx, row.run)  # retention.py
                    tx.after_commit(lambda: queue.release(run_id))
                    text = row.dump()
                    tx.after_commit(lambda: self._finished(run_id, text))
                else:
                    tx.after_commit(lambda: queue.unqueue(run_id))
                logger.debug("task run %s: %s -> %s (%s, proposed %s%s)", run_id, previous, new_type,
                             decision.status, proposed["type"], ", forced" if force else "")
            else:
                logger.debug("task run %s: %s proposed in %s -> %s", run_id, proposed["type"], previous,
                             decision.status)
            if not answer:
                return ""
            if answer == "brief" and decision.status == "ACCEPT":
                return BRIEF_ACCEPT
            # decision.state is the run's current state in every case (new, or kept)
            details = decision.details
            return (f'{{"status":"{decision.status}","state":{row.state_json()},'
                    f'"details":{_ACCEPT_DETAILS if details is ACCEPT_DETAILS else _dumps(details)}}}')

        return op

    # -- claim at delivery (subscription extension) ----------------------------------------------
    def claim_at_delivery(self, run_ids: list[str], holder: str,
                          before: list[tuple[str, dict[str, Any], bool, Callable[..., None], bool]] | None = None,
                          inline_parameters: bool = False) -> list[str | BaseException | None]:
        """RUNNING for runs about to be delivered to the subscription ``holder``, committed
        before they are sent (durable before delivered: the worker sends no RUNNING proposal
        of its own). One operation per run, queued together (so committed together when
        nobody else commits). Returns, per run, the TaskRun JSON to send (now RUNNING), None
        when the run is not SCHEDULED any more (deleted, cancelled), or the write's error.

        ``before``: proposals of the same holder (as for :meth:`set_states_async`) queued
        ahead of the claims, so that the final states that freed the slots and the claim of
        the next runs are one commit, not two.

        ``inline_parameters``: each run's JSON carries the parameters record this server
        holds for it (:func:`held_parameters`), read in the claim's transaction."""
        results: list[str | BaseException | None] = [None] * len(run_ids)
        left = [len(run_ids)]
        lock = threading.Lock()
        # held until the last claim's callback releases it: a lock, not an Event (whose
        # Condition costs more to make, set and wait on; the claims are mostly committed by
        # this very thread, before it waits)
        finished = threading.Lock()
        finished.acquire()
        proposed = claim_proposal(holder)

        def make_op(run_id: str) -> Callable[[Transaction], str | None]:
            set_running = self._set_state_op(run_id, proposed, False, holder, False)

            def op(tx: Transaction) -> str | None:
                row = tx.get_run(run_id)
                if row is None or row.state_type != "SCHEDULED":
                    return None
                set_running(tx)  # SCHEDULED -> RUNNING: accepted by the table
                if inline_parameters:
                    record = held_parameters(tx, row.run)
                    if record is not None:
                        return with_parameters_record(row.dump(), record)
                return row.dump()

            return op

        def make_callback(index: int) -> Callable[[Any, BaseException | None], None]:
            def callback(result: Any, error: BaseException | None) -> None:
                results[index] = error if error is not None else result
                with lock:
                    left[0] -= 1
                    if left[0] == 0:
                        finished.release()

            return callback

        ops = [(self._set_state_op(run_id, proposed_, force, holder, "brief" if brief else True), callback)
               for run_id, proposed_, force, callback, brief in before or ()]
        ops += [(make_op(run_id), make_callback(i)) for i, run_id in enumerate(run_ids)]
        if not ops:
            return results
        self.db.submit_many(ops, inline=True)  # type: ignore[attr-defined]
        if run_ids:
            finished.acquire()
        return results

    def release_claimed(self, run_ids: list[str], holder: str) -> int:
        """Runs claimed at delivery by ``holder`` that it hands back unstarted (a stopping
        worker): RUNNING -> SCHEDULED again and queued at once; the claim's ``run_count`` and
        the delivery are not counted. Runs in another state or held by another connection
        are left alone. Returns how many went back."""
        return self.db.write(self._release_op(run_ids, holder))

    def release_claimed_async(self, run_ids: list[str], holder: str) -> None:
        """:meth:`release_claimed` without waiting (after-commit hooks may call it: the
        writer thread commits it). When it cannot be written, the lease brings the runs back."""
        self.db.submit(self._release_op(run_ids, holder))

    def _release_op(self, run_ids: list[str], holder: str) -> Callable[[Transaction], int]:
        from .orchestration import system_state

        queue = self.queue

        def op(tx: Transaction) -> int:
            count = 0
            now = time.time()
            for run_id in run_ids:
                row = tx.get_run(run_id)
                if row is None or row.state_type != "RUNNING" or row.holder != holder:
                    continue
                run_count = max(0, row.run.get("run_count", 1) - 1)
                system_state(row.run, "SCHEDULED", now, message=f"Handed back unstarted by {holder}",
                             scheduled_time=now, deferred=True)
                row.run["run_count"] = run_count
                row.state_type = "SCHEDULED"
                row.holder = None
                row.due = now
                row.touch()
                queue.place(row, now)
                tx.update_run(row)
                queue.placed(tx, row)
                count += 1
            return count

        return op

    # -- waiting for a run to finish (rpc "wait") ---------------------------------------------------
    def when_finished(self, run_id: str, callback: Callable[[str | None], None]) -> Callable[[], None]:
        """Call ``callback(run_text)`` once the run is in a terminal state (at once if it is),
        or ``callback(None)`` once it is deleted.

        Raises NotFound for an unknown run. Returns a function that cancels the wait.
        Terminal states set by orchestration notify waiters, and so does a lease running
        out into CRASHED.
        """
        with self._finish_lock:  # registered before the check: a commit in between still finds it
            self._finish_waiters.setdefault(run_id, []).append(callback)
        found = self.db.read_run_text(run_id)  # type: ignore[attr-defined]
        if (found is None or found[1] in TERMINAL) and self._unregister(run_id, callback):
            if found is None:
                raise NotFound("Task not found")
            callback(found[0])

        def cancel() -> None:
            self._unregister(run_id, callback)

        return cancel

    def _unregister(self, run_id: str, callback: Callable[[str | None], None]) -> bool:
        with self._finish_lock:
            callbacks = self._finish_waiters.get(run_id)
            if not callbacks or callback not in callbacks:
                return False
            callbacks.remove(callback)
            if not callbacks:
                del self._finish_waiters[run_id]
            return True

    def deleted(self, run_id: str) -> None:
        """A run was deleted (``DELETE``): its waiters learn it now, not at the end of their
        wait (a Prefect worker deletes a run whose parameters it cannot read)."""
        self._wake_waiters(run_id, None)

    def _wake_waiters(self, run_id: str, text: str | None) -> None:
        if run_id not in self._finish_waiters:  # the common case: nobody waits (checked again below)
            return
        with self._finish_lock:
            callbacks = self._finish_waiters.pop(run_id, [])
        for callback in callbacks:
            try:
                callback(text)
            except Exception:  # pragma: no cover - a waiter's bug must not break the commit path
                logger.exception("wait callback of %s failed", run_id)

    def _finished(self, run_id: str, text: str, announce: bool = True) -> None:
        """A run reached a final state: tell the listeners (unless ``announce`` is False: the
        state came from an event, which is passed on itself) and wake its waiters."""
        if announce:
            for listener in self.finish_listeners:
                try:
                    listener(run_id, text)
                except Exception:  # pragma: no cover - a listener's bug must not break the commit path
                    logger.exception("finish listener failed for %s", run_id)
        self._wake_waiters(run_id, text)

    def set_state(self, run_id: str, proposed: dict[str, Any], force: bool) -> str:
        """Orchestrate a proposed state; returns the orchestration result as JSON text."""
        return self.db.write(self._set_state_op(run_id, proposed, force))

    def set_states_async(self, proposals: list[tuple[str, dict[str, Any], bool, Callable[..., None], bool]],
                         holder: str | None = None) -> None:
        """Orchestrate proposals without waiting for other writers, in order, committed
        together when possible: ``proposals`` are (run_id, proposed, force, callback, brief),
        and ``callback(result_text, error)`` (``brief``: an ACCEPT's text is :data:`BRIEF_ACCEPT`) runs after the commit, in this thread if it committed
        itself, else in the thread that did (keep it short). Call it holding no lock that
        operations or hooks take."""
        self.db.submit_many(
            [(self._set_state_op(run_id, proposed, force, holder, "brief" if brief else True), callback)
             for run_id, proposed, force, callback, brief in proposals],
            inline=True,
        )

    # -- records ---------------------------------------------------------------------------------
    def put_record(self, key: str, data: bytes) -> None:
        self.db.write(lambda tx: tx.put_record(key, data))

    def read_record(self, key: str) -> bytes:
        data = self.db.read_record(key)
        if data is None:
            raise NotFound(f"No record with key {key!r}")
        return data

    def delete_record(self, key: str) -> None:
        if not self.db.write(lambda tx: tx.delete_record(key)):
            raise NotFound(f"No record with key {key!r}")


def _parse_due(state: dict[str, Any], now: float) -> float:
    scheduled = state["state_details"].get("scheduled_time")
    if not scheduled or scheduled == state["timestamp"]:  # due now (the timestamp is iso(now))
        return now
    try:
        return parse_time(scheduled, [])
    except ValidationError:  # pragma: no cover - validated on the way in
        return now


def parse_json_body(raw: bytes) -> tuple[Any, str | None]:
    """(value, None) or (None, error message) for a request body."""
    from .validation import JSONRejected, loads

    try:
        return loads(raw, "Request body"), None
    except JSONRejected as exc:
        return None, exc.detail




#: holder -> its claim proposal (:func:`claim_proposal`); a proposal is never modified
_claim_proposals: dict[str, dict[str, Any]] = {}


def claim_proposal(holder: str) -> dict[str, Any]:
    """The RUNNING proposal a claim at delivery commits for the subscription ``holder``
    (made once per holder: every burst of claims asks for it; orchestration only reads it)."""
    proposal = _claim_proposals.get(holder)
    if proposal is None:
        proposal = validate_state({"type": "RUNNING", "name": "Running", "message": f"Running on {holder}"},
                                  ["state"])
        if len(_claim_proposals) >= 256:
            _claim_proposals.clear()
        _claim_proposals[holder] = proposal
    return proposal


def _parameters_record(record: Any, state: dict[str, Any]) -> tuple[str, bytes] | None:
    """The key and bytes a create's ``parameters_record`` is stored under (None: none given)."""
    if record is None:
        return None
    if not isinstance(record, str):
        raise ValidationError(["parameters_record"], "Input should be a valid string", "string_type", record)
    params_id = state["state_details"].get("task_parameters_id")
    if not params_id:
        raise ValidationError(["body", "state", "state_details", "task_parameters_id"],
                              "Field required: the run's parameters_record is stored under it", "missing")
    try:
        return PARAMETERS_RECORD + params_id, record.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(["parameters_record"], "Input should be valid UTF-8 text", "string_unicode") from None


def brief_json(run: dict[str, Any]) -> str:
    """The brief create answer (``brief_create``, TEAM's negotiated extension): the run's id
    and the few fields of its state a submitter looks at, instead of the whole TaskRun (about
    1.5 KB the client would parse for nothing)."""
    state = run.get("state") or {}
    return _dumps({"id": run["id"], "state": {"type": state.get("type"), "name": state.get("name"),
                                              "timestamp": state.get("timestamp")}})


#: the JSON text of the default state names (a brief answer's usual ``name``)
_NAME_TEXTS = {name: _dumps(name) for name in DEFAULT_STATE_NAMES.values()}


def _brief_of_built(run: dict[str, Any]) -> str:
    """:func:`brief_json` of a run :func:`.models.build_task_run` has just built, by hand: its
    id is a canonical UUID, its state's type one of the state types and its timestamp
    ``iso(now)``, so only the name (the client's) needs encoding. The same text
    (``tests/server/test_server_srv16_create.py``), in a third of the instructions."""
    state = run["state"]
    name = state["name"]
    name_text = _NAME_TEXTS.get(name) or _dumps(name)
    return (f'{{"id":"{run["id"]}","state":{{"type":"{state["type"]}","name":{name_text},'
            f'"timestamp":"{state["timestamp"]}"}}}}')


def _same_create(existing: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether a create names the run that already has its id (a repeated create): same
    task key and dynamic key (unique per create on Prefect's client and ours)."""
    return existing.get("task_key") == new.get("task_key") and existing.get("dynamic_key") == new.get("dynamic_key")
