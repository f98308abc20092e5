"""The websocket ``/api/sync_worker/rpc``: submitting runs and waiting for them, fast.

An extension of the embedded server (a Prefect server has no such endpoint; clients fall
back to REST there). One connection per client process carries many concurrent requests:

    client -> {"type": "auth", "token": T | null}          server -> {"type": "auth_success", ...}
    client -> {"type": "create", "request_id": R, "body": {...POST /task_runs/ body...}}
    server -> {"type": "create_result", "request_id": R, "status_code": 201, "result": {...TaskRun...}}
              (with ``"brief": true`` in the create — the ``brief_create`` extension, announced in
              ``auth_success``'s ``extensions`` — the result is only
              ``{"id": ID, "state": {"type": T, "name": N, "timestamp": TS}}``)
              (with ``"parameters_record": "<record text>"`` in the create — the
              ``create_parameters`` extension — the run's parameters record is stored with the
              run, in its transaction, under ``parameters.<task_parameters_id>`` (which the
              body's state must name): what ``PUT /api/storage/parameters.<id>`` before the
              create would store, without that request; a create that is refused stores
              nothing)
    client -> {"type": "wait", "request_id": R, "task_run_id": ID, "timeout": SECONDS}
    server -> {"type": "wait_result", "request_id": R, "status_code": 200, "result": {...TaskRun...}}
              (sent when the run reaches a terminal state, or with the run as it is when
              ``timeout`` seconds passed first — default 60, at most 300 — after which the
              server forgets the wait; 404 with "detail" for an unknown run)

Errors answer ``status_code`` 4xx/5xx with a ``detail``, as REST does. Why: a REST create
costs the client most of a millisecond of CPU in ``requests`` and the server an HTTP parse;
a message on an open socket costs a fraction of that, and a ``wait`` answered at the commit
of the final state replaces polling.

Threads: simple-websocket's reader thread handles the requests of each read itself (no hand-off
to another thread) and commits the creates among them together, in one transaction when nobody
else commits, then sends the replies it committed. A reply committed by another connection's
thread (a wait answered at the final state's commit) is sent by that thread when the socket
takes it at once (:func:`.sockets.send_soon`, never blocking), else through the connection's
outbox. What one group commit sends to this connection (the replies to the creates it carried,
the wait replies of runs that finished in it) goes out in one write.
"""
from __future__ import annotations

import heapq
import json
import logging
import threading
import time
from typing import Any

from simple_websocket.errors import ConnectionClosed

from sync_worker.jsoncodec import dumps_str

from .core import Conflict, Core, NotFound
from .database import DatabaseClosed, StorageError
from .models import ValidationError
from .validation import check_uuid
from .sockets import (
    PREFECT_VIOLATION,
    Close,
    OneAtATime,
    Outbox,
    SubscriptionRegistry,
    WebSocket,
    authenticate,
    decode,
    send_soon,
    serve_socket,
)

logger = logging.getLogger("sync_worker.server.rpc")

#: Most waits one connection may have outstanding (each holds a callback in the server).
MAX_WAITS = 10_000
#: A wait's server-side timeout when the client names none, and the most it may name: a
#: wait is answered and forgotten after it, so registrations never accumulate.
DEFAULT_WAIT_TIMEOUT = 60.0
MAX_WAIT_TIMEOUT = 300.0
#: announced in ``auth_success``: ``brief_create`` = a create with ``"brief": true`` is answered
#: with the run's id and state only; ``create_parameters`` = a create may carry the run's
#: parameters record (``"parameters_record"``)
EXTENSIONS = ("brief_create", "create_parameters")


def handle_rpc(environ: dict[str, Any], core: Core, registry: SubscriptionRegistry,
               max_message_size: int | None) -> None:
    """Serve one rpc connection until it ends (runs in the HTTP handler thread)."""

    def serve(ws: WebSocket, peer: str) -> None:
        authenticate(ws, core, {"extensions": list(EXTENSIONS)})
        channel = RpcChannel(ws, core, peer)
        try:
            channel.run()
        finally:
            channel.cancel_waits()

    serve_socket(environ, registry, max_message_size, "rpc", serve)


class RpcChannel:
    """One rpc connection: the reader thread handles the requests of each read and commits
    their creates together (inline when no other commit runs), and sends the replies it
    committed right after; the outbox's sender thread sends the replies committed by other
    threads (never block a committer on a slow client's socket) and expires waits; the
    handler thread waits for the end and closes the connection (with a protocol
    violation's code)."""

    def __init__(self, ws: WebSocket, core: Core, peer: str) -> None:
        self.ws = ws
        self.core = core
        self.peer = peer
        self._lock = threading.Lock()  # guards _deadlines
        self.outbox = Outbox(ws, "sync-worker-rpc-send", tick=self._tick, due=self._next_due,
                             lost=ws.shutdown, flush_on_close=True)
        # request_id -> cancel function of an outstanding wait (a client that gave up on one
        # just ignores its late answer; the server forgets it when the run ends or on close)
        self._waits: dict[str, Any] = {}
        # (deadline, request_id, run_id) of the outstanding waits, expired by the sender thread
        self._deadlines: list[tuple[float, str, str]] = []
        self._done = threading.Event()
        self._close: Close | None = None  # a protocol violation read by the reader thread
        # what arrived, handled in the reader thread (or a thread that wakes the connection)
        self._on_messages = OneAtATime(self._drain)

    def run(self) -> None:
        logger.debug("rpc connection from %s", self.peer)
        self.outbox.start()
        try:
            self.ws.event.attach(self._on_messages)
            # the reader may end without a last set() (e.g. after refusing an oversized
            # message): also watch the thread itself
            while not self._done.wait(0.25):
                if not self.ws.thread.is_alive():
                    break
            if self._close is not None:
                raise self._close  # closed by serve_socket, from this thread
        finally:
            self.outbox.close()

    def _drain(self) -> None:
        buffer = self.ws.input_buffer
        try:
            # replies committed by this thread are sent by it, after the commit of the creates
            # gathered from this read (one transaction); a wait commits the creates before it
            # first (it may be for one of them)
            with self.outbox.direct():
                while buffer and self._close is None and not self._done.is_set():
                    wait = None
                    with self.core.db.gathering():
                        while buffer and self._close is None and not self._done.is_set():
                            value = decode(buffer.pop(0))
                            if value.get("type") == "wait":
                                wait = value
                                break
                            self._handle(value)
                    if wait is not None:
                        self._handle(wait)
        except Close as close:
            if self._close is None:
                self._close = close
            self._done.set()
        except (ConnectionClosed, OSError):
            self._done.set()
        except Exception:  # a bug: drop this connection, keep the server
            logger.exception("error handling an rpc message from %s", self.peer)
            if self._close is None:
                self._close = Close(1011, "Internal server error")
            self._done.set()
        if not self.ws.connected:
            self._done.set()

    def _handle(self, value: dict[str, Any]) -> None:
        kind = value.get("type")
        request_id = value.get("request_id")
        if kind not in ("create", "wait"):
            raise Close(PREFECT_VIOLATION, "Protocol violation: expected 'create' or 'wait'")
        if not isinstance(request_id, str) or not request_id:
            raise Close(PREFECT_VIOLATION, "Protocol violation: 'request_id' must be a non-empty string")
        if kind == "create":
            self._create(request_id, value.get("body"), value.get("brief") is True, value.get("parameters_record"))
        else:
            self._wait(request_id, value.get("task_run_id"), value.get("timeout"))

    def _create(self, request_id: str, body: Any, brief: bool = False, parameters_record: Any = None) -> None:
        def done(text: str | None, error: BaseException | None) -> None:
            if error is None:
                self._reply("create_result", request_id, 201, result=text)
            elif isinstance(error, Conflict):
                self._reply("create_result", request_id, 409, detail=str(error))
            elif isinstance(error, DatabaseClosed):
                self._reply("create_result", request_id, 503, detail="Server is shutting down")
            elif isinstance(error, StorageError):  # disk full (507), database locked (503)
                self._reply("create_result", request_id, error.status, detail=error.detail)
            else:
                logger.error("rpc create failed: %r", error)
                self._reply("create_result", request_id, 500, detail=f"Internal error: {type(error).__name__}")

        try:
            self.core.create_task_run_async(body, done, brief=brief, parameters_record=parameters_record)
        except ValidationError as exc:
            self._reply("create_result", request_id, 422, detail=exc.detail)
        except DatabaseClosed as exc:
            done(None, exc)

    def _wait(self, request_id: str, run_id: Any, timeout: Any = None) -> None:
        if not isinstance(run_id, str) or not run_id:
            self._reply("wait_result", request_id, 422, detail="task_run_id: Input should be a valid string")
            return
        try:
            run_id = check_uuid(run_id, ["task_run_id"])  # as REST reads a run id
        except ValidationError as exc:
            self._reply("wait_result", request_id, 422, detail=exc.detail)
            return
        if timeout is None:
            timeout = DEFAULT_WAIT_TIMEOUT
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout <= MAX_WAIT_TIMEOUT:
            self._reply("wait_result", request_id, 422,
                        detail=f"timeout: Input should be a number of seconds from 0 to {MAX_WAIT_TIMEOUT:g}")
            return
        if len(self._waits) >= MAX_WAITS:
            self._reply("wait_result", request_id, 429, detail=f"more than {MAX_WAITS} waits on one connection")
            return

        def finished(text: str | None) -> None:
            self._waits.pop(request_id, None)
            if text is None:  # deleted meanwhile
                self._reply("wait_result", request_id, 404, detail="Task not found")
            else:
                self._reply("wait_result", request_id, 200, result=text)

        self._waits[request_id] = None  # reserved before registering: `finished` may run at once
        try:
            cancel = self.core.when_finished(run_id, finished)
        except NotFound:
            self._waits.pop(request_id, None)
            self._reply("wait_result", request_id, 404, detail="Task not found")
            return
        if request_id in self._waits:
            self._waits[request_id] = cancel
            entry = (time.monotonic() + timeout, request_id, run_id)
            with self._lock:
                heapq.heappush(self._deadlines, entry)
                sooner = self._deadlines[0] is entry
            if sooner:  # the sender's next timeout is sooner now (else it wakes in time anyway)
                self.outbox.poke()

    def _expire_waits(self) -> None:
        """Answer the waits whose timeout passed with the run as it is now, and forget them
        (sender thread)."""
        now = time.monotonic()
        while True:
            with self._lock:
                if not self._deadlines or self._deadlines[0][0] > now:
                    return
                _, request_id, run_id = heapq.heappop(self._deadlines)
            cancel = self._waits.pop(request_id, None)
            if cancel is None:
                continue  # answered already (the run finished)
            cancel()
            found = self.core.db.read_run_text(run_id)  # type: ignore[attr-defined]
            if found is None:
                self._reply("wait_result", request_id, 404, detail="Task not found")
            else:
                self._reply("wait_result", request_id, 200, result=found[0])

    def cancel_waits(self) -> None:
        for cancel in list(self._waits.values()):
            if cancel is not None:
                cancel()
        self._waits.clear()

    def _reply(self, kind: str, request_id: str, status: int, *, result: str | None = None,
               detail: str | None = None) -> None:
        head = f'{{"type":"{kind}","request_id":{dumps_str(request_id)},"status_code":{status},'
        text = head + (f'"result":{result}}}' if result is not None else f'"detail":{json.dumps(detail)}}}')
        # a reply committed by another connection's thread (a wait answered at the final
        # state's commit) goes out from that thread when the socket takes it at once, instead
        # of waking this connection's sender thread (replies are matched by request_id)
        if not self.outbox.direct_here() and not self.outbox.closed:
            send_soon(self.ws, text, self.outbox.post)
            return
        self.outbox.post(text)

    def _next_due(self) -> float | None:
        """Seconds until the next wait expires (the outbox sender's timeout)."""
        with self._lock:
            return self._deadlines[0][0] - time.monotonic() if self._deadlines else None

    def _tick(self, poked: bool) -> None:
        self._expire_waits()
