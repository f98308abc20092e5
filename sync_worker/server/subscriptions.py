"""The websocket ``/api/task_runs/subscriptions/scheduled`` (Prefect 3 protocol + extensions).

Per connection there are three threads:

- simple-websocket's reader thread handles each message as it arrives (:meth:`Subscription._on_messages`):
  an ack sends the next run right away; ``set_state`` requests (the extension) that arrived
  together are committed together, in this thread when no other commit is running, and
  answered from it; ``quit`` and protocol violations end the connection;
- the HTTP handler thread authenticates, reads the subscription, then waits for the end and
  cleans up (the unacknowledged run goes back to the queue, acknowledged ones start their
  lease timers);
- a sender thread delivers a run when one arrives for an idle connection and sends answers
  committed by other threads.

Answers to ``set_state`` may come back in any order (matched by ``request_id``).

Flow control: as in Prefect, a connection holds one run at a time by default, and each ack
lets the next one go. The ``credit`` extension, offered in ``auth_success``, lifts that:

- ``credit``: ``"credit": N`` in the subscribe message: the server sends up to N runs
  without waiting for acks (one credit each) and more only when the client grants them with
  ``{"type": "credit", "n": K}``. A worker grants one credit per free execution slot, so
  delivery is pipelined and a busy worker never holds a run it cannot start (the
  sync_worker worker uses this one).

Acks keep their meaning (they turn a delivered run into a leased one) and
acknowledge the oldest unacknowledged run.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import simple_websocket
from simple_websocket.errors import ConnectionClosed
from wsproto.events import Ping, TextMessage

from .core import Core, NotFound
from .database import QSTATE_MEMORY, DatabaseClosed
from .models import ValidationError, validate_state

logger = logging.getLogger("sync_worker.server.subscriptions")

POLICY_VIOLATION = 1008
UNSUPPORTED_DATA = 1003
PROTOCOL_ERROR = 1002
GOING_AWAY = 1001
NORMAL = 1000
PREFECT_VIOLATION = 4001

#: Extensions offered in ``auth_success`` (Prefect clients ignore the field): ``set_state``
#: (proposals over this socket), ``credit`` (flow control, see the module docstring), ``direct_running`` (RUNNING proposed for a RUNNING run is answered ABORT, so
#: RUNNING alone claims a run).
#: ``release`` (``{"type": "release"}``: a stopping worker takes no more runs on this
#: connection and hands back every run delivered and not acknowledged, at once; the
#: connection stays open as the lease of its acknowledged runs).
EXTENSIONS = ["set_state", "credit", "direct_running", "release"]
#: Most runs one connection may be granted, whatever credit it asks for.
MAX_CREDIT = 1000
#: set_state requests of one connection that may await their answers; past this the server
#: stops reading that connection until answers have been sent
MAX_UNANSWERED = 256


class _Signal:
    """The ``event_class`` given to simple-websocket, whose reader thread calls ``set()`` each
    time a message arrived (or the connection closed).

    Until :meth:`attach` it is a plain Event: the handler thread reads the auth and subscribe
    messages with ``ws.receive()``. After it, ``set()`` runs the attached callback right in the
    reader thread, so an ack or a set_state is handled without waking another thread first
    (each thread hop costs latency under the GIL, and one run is in flight per connection).
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._callback: Callable[[], None] | None = None

    def set(self) -> None:
        callback = self._callback
        if callback is None:
            self._event.set()
        else:
            callback()

    def clear(self) -> None:
        self._event.clear()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)

    def attach(self, callback: Callable[[], None]) -> None:
        self._callback = callback
        callback()  # what arrived before


class WebSocket(simple_websocket.Server):
    """simple-websocket server socket whose sends are thread-safe and complete (sendall)."""

    event: _Signal

    def __init__(self, environ: dict[str, Any], **kwargs: Any) -> None:
        self.send_lock = threading.Lock()
        self.ping_failures = 0
        super().__init__(environ, event_class=_Signal, **kwargs)

    def send(self, data: Any) -> None:
        with self.send_lock:
            if not self.connected:
                raise ConnectionClosed(self.close_reason, self.close_message)
            self.sock.sendall(self.ws.send(TextMessage(data=data)))

    def close(self, reason: int | None = None, message: str | None = None) -> None:
        # A send blocked on a client that does not read holds the lock: give up on the close
        # frame then (the caller drops the connection anyway).
        if not self.send_lock.acquire(timeout=0.5):
            raise ConnectionClosed(reason, message)
        try:
            super().close(reason, message)
        finally:
            self.send_lock.release()

    def ping(self) -> bool:
        """Send a ping without ever blocking (the pinger serves every connection); False if
        it could not be sent now."""
        if not self.send_lock.acquire(blocking=False):
            return False  # a send is in progress: the connection is busy, not dead
        try:
            if not self.connected:
                return False
            frame = self.ws.send(Ping())
            try:
                sent = self.sock.send(frame, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return False  # the client does not read: its pong will be missing
            if sent < len(frame):  # half a frame on the wire: this stream is unusable
                self.shutdown()
                return False
            return True
        finally:
            self.send_lock.release()

    def shutdown(self) -> None:
        """Unblock the reader thread and drop the TCP connection."""
        self.connected = False
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _Close(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _decode(message: Any) -> dict[str, Any]:
    if isinstance(message, bytes):
        try:
            message = message.decode("utf-8")
        except UnicodeDecodeError:
            raise _Close(UNSUPPORTED_DATA, "Protocol violation: messages must be UTF-8 JSON text") from None
    try:
        value = json.loads(message)
    except ValueError:
        raise _Close(UNSUPPORTED_DATA, "Protocol violation: message is not valid JSON") from None
    if not isinstance(value, dict):
        raise _Close(PREFECT_VIOLATION, "Protocol violation: expected a JSON object") from None
    return value


class SubscriptionRegistry:
    """Live connections, so that stopping the server can close them, and their keep-alive.

    One thread pings every connection each ``ping_interval`` seconds and drops the ones that
    did not answer the previous ping (a worker that vanished without closing its TCP
    connection must not keep its leases forever). simple-websocket can ping by itself, but
    then each of its reader threads polls the socket before every read: one more system
    call per message.
    """

    def __init__(self, ping_interval: float | None = None) -> None:
        self._lock = threading.Lock()
        self._sockets: set[WebSocket] = set()
        self.closing = False
        self.ping_interval = ping_interval
        self._stop = threading.Event()
        self._pinger: threading.Thread | None = None

    def add(self, ws: WebSocket) -> bool:
        with self._lock:
            if self.closing:
                return False
            self._sockets.add(ws)
            if self.ping_interval and self._pinger is None:
                self._pinger = threading.Thread(target=self._ping_loop, name="sync-worker-ws-pinger", daemon=True)
                self._pinger.start()
            return True

    def _ping_loop(self) -> None:
        assert self.ping_interval
        while not self._stop.wait(self.ping_interval):
            with self._lock:
                sockets = list(self._sockets)
            for ws in sockets:
                if not ws.connected:
                    continue
                if not ws.pong_received or ws.ping_failures >= 3:
                    logger.info("closing a subscription connection that did not answer a ping within %g s",
                                self.ping_interval)
                    try:
                        ws.close(POLICY_VIOLATION, "Ping/Pong timeout")
                    except (ConnectionClosed, OSError):
                        pass
                    ws.shutdown()
                    ws.event.set()
                    continue
                ws.pong_received = False  # before sending: the pong may beat us back
                try:
                    sent = ws.ping()
                except OSError:
                    sent = False
                if sent:
                    ws.ping_failures = 0
                else:  # busy sending, or the client reads nothing: tolerated 3 times
                    ws.pong_received = True
                    ws.ping_failures += 1

    def remove(self, ws: WebSocket) -> None:
        with self._lock:
            self._sockets.discard(ws)

    def close_all(self) -> None:
        with self._lock:
            self.closing = True
            sockets = list(self._sockets)
        self._stop.set()
        for ws in sockets:
            try:
                ws.close(GOING_AWAY, "Server is shutting down")
            except (ConnectionClosed, OSError):
                pass
            ws.shutdown()
            ws.event.set()  # wake whoever waits on this connection

    def __len__(self) -> int:
        with self._lock:
            return len(self._sockets)


def serve_socket(environ: dict[str, Any], registry: SubscriptionRegistry, max_message_size: int | None,
                 what: str, serve: Callable[[WebSocket, str], None]) -> None:
    """Accept a websocket (subprotocol ``prefect``), run ``serve(ws, peer)`` in this HTTP
    handler thread until the connection ends, and close it with the code and reason of a
    protocol violation (:class:`_Close`) raised by ``serve``."""
    ws = WebSocket(environ, subprotocols=["prefect"], max_message_size=max_message_size)
    peer = environ.get("REMOTE_ADDR", "?")
    if not registry.add(ws):
        _close(ws, GOING_AWAY, "Server is shutting down")
        return
    try:
        try:
            serve(ws, peer)
        except _Close as close:
            logger.info("closing %s connection from %s: %s (%d)", what, peer, close.reason, close.code)
            _close(ws, close.code, close.reason)
        except ConnectionClosed:
            pass
    finally:
        registry.remove(ws)
        ws.shutdown()
        ws.thread.join(timeout=1.0)


def handle_websocket(environ: dict[str, Any], core: Core, registry: SubscriptionRegistry,
                     max_message_size: int | None) -> None:
    """Serve one subscription connection until it ends (runs in the HTTP handler thread)."""

    def serve(ws: WebSocket, peer: str) -> None:
        if ws.subprotocol == "prefect":
            _authenticate(ws, core)
        elif core.auth_string is not None:
            raise _Close(PROTOCOL_ERROR, "'prefect' subprotocol required when auth is configured")
        keys, client_id, credit = _read_subscribe(ws)
        Subscription(ws, core, keys, client_id, peer, credit).run()

    serve_socket(environ, registry, max_message_size, "subscription", serve)


def _close(ws: WebSocket, code: int, reason: str) -> None:
    try:
        ws.close(code, reason)
    except (ConnectionClosed, OSError):
        return
    # Give the client a moment to answer the close frame before dropping the connection.
    ws.thread.join(timeout=1.0)


def _authenticate(ws: WebSocket, core: Core) -> None:
    message = ws.receive()
    try:
        value = _decode(message)
    except _Close:
        value = {}
    if value.get("type") != "auth":
        raise _Close(POLICY_VIOLATION, "Expected 'auth' message")
    if core.auth_string is not None:
        token = value.get("token")
        if not token:
            raise _Close(POLICY_VIOLATION, "Auth required but no token provided")
        if not core.check_token(token):
            raise _Close(POLICY_VIOLATION, "Invalid token")
    # lease_timeout: how long a run acknowledged on a lost connection stays this worker's;
    # a worker reconnects within it (its backoff is capped below it) to keep its runs
    ws.send(json.dumps({"type": "auth_success", "extensions": EXTENSIONS,
                        "lease_timeout": core.queue.lease_timeout}))


def _read_subscribe(ws: WebSocket) -> tuple[list[str], str, int | None]:
    value = _decode(ws.receive())
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
    credit = value.get("credit")
    if credit is not None and (not isinstance(credit, int) or isinstance(credit, bool) or credit < 0):
        raise _Close(PREFECT_VIOLATION, "Protocol violation: 'credit' must be a whole number >= 0")
    return list(dict.fromkeys(keys)), client_id, credit


class Subscription:
    """One subscribed worker connection (a :class:`runqueue.Waiter`).

    Threads: the HTTP handler thread waits in :meth:`run` until the connection ends and then
    cleans up; simple-websocket's reader thread handles each incoming message
    (:meth:`_on_messages`) and, on an ack, sends the next run itself; a sender thread sends
    ``set_state_result`` answers and delivers a run when one arrives for an idle connection.
    """

    def __init__(self, ws: WebSocket, core: Core, keys: list[str], client_id: str, peer: str,
                 credit: int | None = None) -> None:
        self.ws = ws
        self.core = core
        self.queue = core.queue
        self.keys = keys
        self.client_id = client_id
        self.peer = peer
        self.leased: set[str] = set()
        self._cond = threading.Condition()
        self._outbox: deque[str] = deque()  # JSON texts to send
        self._woken = True
        # delivered runs awaiting their ack, oldest first: id -> (id, key, seq, text)
        self._unacked: OrderedDict[str, tuple[str, str, int, str | None]] = OrderedDict()
        # ``None``: Prefect's protocol, one run awaiting its ack at a time.
        # A number: the credit extension (runs that may still be sent before a grant).
        self._credit = None if credit is None else min(credit, MAX_CREDIT)
        self._closed = False
        self._quitting = False
        self._done = threading.Event()
        self._close_request: tuple[int, str] | None = None
        self._drain_lock = threading.Lock()
        self._draining: int | None = None  # ident of the thread handling messages right now
        self._direct: list[str] = []  # answers to send by that thread once its commit is done
        self._again = False
        self._unanswered = 0  # set_state requests whose answer is not sent yet
        self._batch: list[tuple[str, dict[str, Any], bool, Callable[..., None]]] = []
        self._deliver_lock = threading.Lock()
        self.delivered = 0

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other

    # -- Waiter ----------------------------------------------------------------------------------
    def wake(self) -> None:
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    # -- lifecycle -------------------------------------------------------------------------------
    def run(self) -> None:
        logger.info("Task worker %r (%s) subscribed to task keys %r", self.client_id, self.peer, self.keys)
        adopted = self.queue.adopt(self)
        if adopted:
            logger.info("Task worker %r reconnected: it keeps the lease of %d run(s) it holds", self.client_id,
                        adopted)
        sender = threading.Thread(target=self._send_loop, name=f"sync-worker-ws-send-{self.client_id}", daemon=True)
        sender.start()
        reason = "connection closed"
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
                sender.join(timeout=2)
                if code != NORMAL:
                    logger.info("closing subscription of %r: %s (%d)", self.client_id, reason, code)
                _close(self.ws, code, "" if code == NORMAL else request[1])
        finally:
            self._stop_sending()
            sender.join(timeout=2)
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

    def _request_close(self, code: int, reason: str) -> None:
        """Ask the handler thread to close the connection (never close from the reader thread:
        simple-websocket would mark the connection open again after our callback)."""
        if self._close_request is None:
            self._close_request = (code, reason)
        self._done.set()

    # -- receiving (simple-websocket's reader thread) ---------------------------------------------
    def _on_messages(self) -> None:
        """Handle what arrived. Never blocks a caller other than the one handling messages:
        a thread that finds another one at work leaves a note (``_again``) that the other
        one reads before it stops (the stopping server calls this to wake a connection)."""
        self._again = True
        while self._again:
            if not self._drain_lock.acquire(blocking=False):
                return
            try:
                self._draining = threading.get_ident()
                while self._again:
                    self._again = False
                    self._drain()
            finally:
                self._draining = None
                self._drain_lock.release()

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
            try:
                self._flush_set_states()
            except (ConnectionClosed, OSError):
                self._done.set()
        if not self.ws.connected:
            self._done.set()

    def _flush_set_states(self) -> None:
        """Commit the set_state requests read so far (together: one transaction for all the
        messages that arrived at once), then send the answers this thread committed."""
        batch, self._batch = self._batch, []
        if batch:
            try:
                self.core.set_states_async(batch, holder=self.client_id)
            except DatabaseClosed as exc:
                for _run_id, _proposed, _force, done in batch:
                    done(None, exc)
        while self._direct:
            self.ws.send(self._direct.pop(0))
            self._answered(1)

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
        elif kind == "release":
            with self._cond:
                self._quitting = True  # no delivery after this (see _deliver_one)
            released = self._take_unacked()
            for in_flight in released:
                self.queue.give_back(self, *in_flight)
            self.queue.forget_waiter(self)
            logger.info("Task worker %r stopped receiving; %d run(s) handed back", self.client_id, len(released))
        elif kind == "quit":
            with self._cond:
                self._quitting = True
            for in_flight in self._take_unacked():
                self.queue.give_back(self, *in_flight)
            self._request_close(NORMAL, "")
        else:
            raise _Close(PREFECT_VIOLATION, "Protocol violation: expected 'ack' message")

    def _set_state(self, value: dict[str, Any]) -> None:
        # Backpressure: a client that sends requests faster than it reads the answers stops
        # being read (TCP pushes back on it) instead of filling the server's memory and the
        # database queue that everybody shares.
        if self._unanswered + len(self._batch) >= MAX_UNANSWERED:
            self._flush_set_states()  # (their answers are what we are about to wait for)
        with self._cond:
            while self._unanswered >= MAX_UNANSWERED and not self._closed and not self._done.is_set():
                self._cond.wait(0.5)
            if self._closed or self._done.is_set():
                return
            self._unanswered += 1
        request_id = value.get("request_id")
        run_id = value.get("task_run_id")
        try:
            if not isinstance(request_id, (str, int)) or isinstance(request_id, bool):
                raise ValidationError(["request_id"], "Input should be a valid string", "string_type")
            if not isinstance(run_id, str) or not run_id:
                raise ValidationError(["task_run_id"], "Input should be a valid string", "string_type")
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

        prefix = f'{{"type":"set_state_result","request_id":{json.dumps(request_id)},'

        def done(result: str | None, error: BaseException | None) -> None:
            if error is None:
                reply = f'{prefix}"status_code":201,"result":{result}}}'
                if self._draining == threading.get_ident():
                    # committed inline by this connection's own message handler: it sends the
                    # answer itself right after (not here: a send that blocks on a client that
                    # does not read must not hold up the other writers)
                    self._direct.append(reply)
                else:
                    self._post(reply)
                return
            if isinstance(error, NotFound):
                code, detail = 404, "Task not found"
            elif isinstance(error, DatabaseClosed):
                code, detail = 503, "Server is shutting down"
            else:
                logger.error("set_state for %s failed: %r", run_id, error)
                code, detail = 500, f"Internal error: {type(error).__name__}"
            self._post(f'{prefix}"status_code":{code},"detail":{json.dumps(detail)}}}')

        self._batch.append((run_id, proposed, force, done))  # committed by _flush_set_states

    def _answered(self, count: int) -> None:
        with self._cond:
            self._unanswered -= count
            self._cond.notify_all()

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
        with self._cond:
            if self._closed:
                return
            self._outbox.append(message)
            self._cond.notify_all()

    # -- sending ---------------------------------------------------------------------------------
    def _send_loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._closed and not self._outbox and not self._woken:
                        self._cond.wait()
                    if self._closed:
                        return
                    messages = list(self._outbox)
                    self._outbox.clear()
                    woken, self._woken = self._woken, False
                for message in messages:
                    self.ws.send(message)
                if messages:
                    self._answered(len(messages))
                if woken:
                    self._try_deliver()
        except (ConnectionClosed, OSError):
            self._done.set()
        except DatabaseClosed:
            return
        except Exception:  # pragma: no cover - a bug: drop the connection, the worker reconnects
            logger.exception("subscription sender of %r failed", self.client_id)
            self._done.set()

    def _try_deliver(self) -> None:
        """Send runs while flow control allows (any thread; one sender at a time)."""
        with self._deliver_lock:
            while self._deliver_one():
                pass

    def _deliver_one(self) -> bool:
        """Send one run if flow control allows and one is due; True if one was sent."""
        with self._cond:
            if self._closed or self._quitting or not self._may_send():
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
