"""The websocket subscription to a server's queue of scheduled task runs.

Protocol (Prefect 3, ``/api/task_runs/subscriptions/scheduled``, subprotocol ``prefect``)::

    client -> {"type": "auth", "token": T | null}
    server -> {"type": "auth_success"}            (or close 1008 "...reason...")
    client -> {"type": "subscribe", "keys": [...], "client_id": "host-pid"}
    server -> one task run (full TaskRun JSON), then waits for
    client -> {"type": "ack"}                      before sending the next one

One thread per connection reads the socket. Messages with a ``"type"`` are control
messages (``set_state_result`` answers of the embedded server's ``set_state`` extension);
messages without one are task runs, queued for the consumer (:meth:`Subscription.next_run`,
or iterate the subscription).
Because the reader demultiplexes, several executor threads can propose states over the
same socket (:meth:`Subscription.set_state`) while the service thread waits for runs.

Why ``quit`` is never sent: the server may already have written the next run to the
wire, and a ``quit`` that crosses it loses that run on a Prefect server (it stays
SCHEDULED forever). Closing the socket instead puts an unacknowledged run back on the
queue on both servers, so :meth:`Subscription.close` only ever closes.

Reconnection: connection errors (refused, reset, closed, 5xx handshake, silence on a
dead link detected by pings) are intermittent and retried with exponential backoff and
jitter (tenacity) until :meth:`close` or the stop event. Refused credentials (handshake 401/403, close 1008)
raise :class:`SubscriptionAuthError` at once: retrying cannot fix them.

What the connection offers is learned once per connection, from ``auth_success``: the
embedded server's extensions (``set_state``, ``credit``, ``direct_running``, ``release``,
``release_run``, ``claim_at_delivery``, ``batch_delivery``, ``inline_parameters``) and its
``lease_timeout``; a Prefect server announces none.

``claim_at_delivery`` (used when announced, with ``credit``, and the consumer can run every
key it subscribes to): the server commits RUNNING before it sends a run and leases it at
once, so :meth:`Subscription.ack` sends nothing and the engine proposes no RUNNING. The
reader thread offers each such run to the consumer's ``on_run`` callback (the worker starts
it straight away when a slot is free: one thread hand-off, reader -> executor) and queues
it for :meth:`next_run` otherwise. The credit of a freed slot is owed to the connection and
rides on its next ``set_state`` frame (usually the final state of the run that freed it);
:meth:`flush_credit` sends what no frame carried. :meth:`stop_receiving` names the runs
delivered but not started (``{"type": "release", "task_run_ids": [...]}``): SCHEDULED again
at once; runs still arriving after it are handed back the same way. ``batch_delivery``
(asked for together with it): several runs in one ``{"type": "task_runs"}`` frame.
``inline_parameters`` (the same): a run whose parameters record the server keeps
(``SYNC_WORKER_STORAGE=server``) arrives with it, ``TaskRun.parameters_record``. The
connection's dialect (:mod:`sync_worker.dialects`: how that server behaves) is chosen
then, once, and kept in :attr:`Subscription.dialect`. The client's settings
(``SYNC_WORKER_FAST_PATH=false``) can refuse the extensions, in this one place, through
the client: then every state goes over REST and flow control is Prefect's.
"""
from __future__ import annotations

import json
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import tenacity
import websocket

from sync_worker import metrics
from sync_worker.schemas import OrchestrationResult, State, TaskRun
from sync_worker.sockets import (
    AUTH_HINT,
    END,
    Connection,
    ConnectionLost,
    SubscriptionAuthError,
    SubscriptionError,
    authenticate,
    open_socket,
)
from sync_worker.dialects import Dialect, choose_dialect
from sync_worker.transport import error_for

logger = logging.getLogger("sync_worker.subscription")

SUBSCRIPTION_PATH = "task_runs/subscriptions/scheduled"

_process_has_connected = False
_process_lock = threading.Lock()


class FastPathUnavailable(RuntimeError):
    """No connected socket offers ``set_state`` right now: use REST."""


def _is_intermittent(exc: BaseException) -> bool:
    if isinstance(exc, SubscriptionError):
        return False
    try:
        from sync_worker.services import is_intermittent
    except ImportError:  # pragma: no cover - services.py not there yet
        is_intermittent = None
    if is_intermittent is not None and is_intermittent(exc):
        return True
    return isinstance(exc, (ConnectionError, OSError, websocket.WebSocketException))


def _uses_extensions(client: Any) -> bool:
    settings = getattr(client, "settings", None)
    if settings is None:
        from sync_worker.settings import get_settings

        settings = get_settings()
    return bool(settings.fast_path)


class Subscription:
    """An iterator over the task runs a server delivers for ``keys``.

    Usage (one consumer thread)::

        sub = Subscription(keys, client_id, client=client)
        for task_run in sub:          # blocks; reconnects by itself; ends when closed
            ...                       # reserve capacity first
            sub.ack()                 # then accept it (the server sends the next one)
        sub.close()                   # from any thread

    ``next_run(timeout)`` is the same with a timeout (the worker polls its stop event).
    Moving on without ``ack()`` releases the run: the socket is closed without an ack
    and the server re-queues it.

    Args:
        keys: the task keys to receive runs of.
        client_id: identifies this worker to the server (``host-pid``).
        client: a :class:`sync_worker.client.Client` for the URL and credentials.
        ping_interval: seconds of silence after which a ping is sent; a link silent for
            twice this is considered dead and reconnected.
        max_backoff: cap of the reconnection backoff, in seconds.
        open_timeout: seconds for the handshake (default: the client's timeout, at most 30).
        stop_event: when set, consuming stops (no new connection, :meth:`next_run` returns
            None) but an open connection stays open until :meth:`close`.
    """

    def __init__(
        self,
        keys: Iterable[str],
        client_id: str,
        *,
        client: Any,
        ping_interval: float = 15.0,
        max_backoff: float = 10.0,
        open_timeout: float | None = None,
        credit: Callable[[], int] | None = None,
        stop_event: threading.Event | None = None,
        dialect_for: Callable[[list[str]], Dialect] | None = None,
        on_run: Callable[[TaskRun, Dialect], bool] | None = None,
        claim_at_delivery: Callable[[], bool] | bool = True,
        holding: Callable[[], list[str]] | None = None,
        yields_after: Callable[[TaskRun], bool] | None = None,
        limit: int | None = None,
    ):
        self.keys = sorted(set(keys))
        if not self.keys:
            raise ValueError("a subscription needs at least one task key")
        self.client_id = client_id
        self.client = client
        self.url = client.websocket_url(SUBSCRIPTION_PATH)
        #: Whether the client's settings let it use the server's extensions (the one switch).
        self.fast_path = _uses_extensions(client)
        self.ping_interval = ping_interval
        self.max_backoff = max_backoff
        #: The reconnection backoff's cap: ``max_backoff``, lowered by the lease timeout the
        #: server announces (a quarter of it, plus at most 0.5 s of jitter).
        self.backoff_cap = max_backoff
        self.open_timeout = open_timeout if open_timeout is not None else min(float(client.timeout or 30.0), 30.0)
        self.stop_event = stop_event
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._holding: TaskRun | None = None
        self._holding_conn: Connection | None = None
        self._released = False
        self._extensions: list[str] = []
        self._credit = credit
        self._dialect_for = dialect_for
        self._on_run = on_run
        self._claim_at_delivery = claim_at_delivery
        #: The runs the consumer still executes or reports (claim_at_delivery): named when
        #: subscribing, so that a reconnect takes over only those leases (the server
        #: re-queues a run whose delivery frame was lost with the old connection).
        self._holding_ids = holding
        #: Whether the reader yields the GIL after starting a run that more runs of the same
        #: message follow (see :attr:`Connection.yields_after`).
        self._yields_after = yields_after
        #: The consumer's slots, named in the subscribe message (with ``credit``) so that the
        #: server shows the worker's limit, not its free slots plus the runs it still holds.
        self._limit = limit
        #: How the server of the current connection behaves (:mod:`sync_worker.dialects`),
        #: chosen once per connection from its ``auth_success``; None before the first.
        self.dialect: Dialect | None = None
        self._grant_lock = threading.Lock()
        self.connects = 0
        #: the socket being opened (handshake, auth, subscribe), until it is published or fails
        self._opening: websocket.WebSocket | None = None
        self._opening_aborted = False

    # -- state -----------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def connected(self) -> bool:
        conn = self._conn
        return conn is not None and not conn.closed.is_set()

    @property
    def claims_at_delivery(self) -> bool:
        """Whether the open connection subscribed with ``claim_at_delivery`` (runs arrive
        RUNNING and leased: no ack, no RUNNING proposal)."""
        conn = self._conn
        return conn is not None and conn.claims

    @property
    def holding(self) -> TaskRun | None:
        """The delivered run not acknowledged yet (the server holds the next one back)."""
        return self._holding

    @property
    def supports_set_state(self) -> bool:
        conn = self._conn
        return self.fast_path and conn is not None and conn.supports_set_state

    @property
    def server_extensions(self) -> list[str]:
        """What the server announced in ``auth_success`` (the embedded server:
        ``["set_state"]``; a Prefect server: nothing), whatever ``fast_path`` says."""
        return list(self._extensions)

    # -- connecting --------------------------------------------------------------------
    def _opened(self, ws: websocket.WebSocket) -> None:
        with self._lock:
            if self.closed or self._opening_aborted:
                raise _Closed()
            self._opening = ws

    def abort_opening(self) -> None:
        """Cut short a connection being opened (a server that accepts it and does not answer
        holds the handshake for up to ``open_timeout``, 30 s): the worker stopping with no
        run in flight needs no connection, and its stop should not wait for one. Safe from a
        signal handler (no lock). A connection already published is left alone."""
        self._opening_aborted = True  # (before the read: _open checks it when it publishes)
        ws = self._opening
        sock = getattr(ws, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # the blocked read in _open returns at once
            except OSError:
                pass

    def _open(self) -> Connection:
        if self._stopping():
            raise _Closed()
        try:
            return self._open_socket()
        finally:
            with self._lock:
                self._opening = None

    def _open_socket(self) -> Connection:
        try:
            ws = open_socket(self.client, self.url, self.open_timeout, created=self._opened,
                             cut_short=lambda: self._opening_aborted)
        except websocket.WebSocketBadStatusException as exc:
            if exc.status_code in (401, 403):
                raise SubscriptionAuthError(
                    f"The server refused the subscription handshake at {self.url} "
                    f"(HTTP {exc.status_code}); {AUTH_HINT}"
                ) from exc
            if exc.status_code >= 500:
                raise ConnectionLost(f"subscription handshake failed with HTTP {exc.status_code}") from exc
            from sync_worker.diagnostics import api_url_error  # a URL without /api?

            raise (exc.status_code == 404 and api_url_error(self.client.api_url, self.client.headers)) or SubscriptionError(
                f"subscription handshake at {self.url} failed with HTTP {exc.status_code}") from exc
        except (websocket.WebSocketException, OSError) as exc:
            raise ConnectionLost(f"cannot connect to {self.url}: {exc}") from exc
        holds_grant_lock = False
        try:
            reply = authenticate(ws, self.client)
            if reply.get("type") != "auth_success":
                raise SubscriptionAuthError(
                    f"The server did not accept the subscription's auth message ({reply.get('reason') or reply}); {AUTH_HINT}"
                )
            extensions = list(reply.get("extensions") or [])
            self._learn_lease_timeout(reply.get("lease_timeout"))
            subscribe: dict[str, Any] = {"type": "subscribe", "keys": self.keys, "client_id": self.client_id}
            # Held until the connection is published, so that a grant() cannot fall between
            # counting the free slots and the server knowing about them. Released only by
            # this thread, which took it (``holds_grant_lock``).
            self._grant_lock.acquire()
            holds_grant_lock = True
            granting = self.fast_path and self._credit is not None and "credit" in extensions
            wants_claims = self._claim_at_delivery() if callable(self._claim_at_delivery) else self._claim_at_delivery
            claims = granting and wants_claims and "claim_at_delivery" in extensions
            if granting:
                subscribe["credit"] = max(0, self._credit())
                if self._limit is not None:
                    subscribe["limit"] = self._limit
            if claims:
                subscribe["claim_at_delivery"] = True
                if "batch_delivery" in extensions:
                    subscribe["batch_delivery"] = True
                if "inline_parameters" in extensions:  # records the server keeps come with their runs
                    subscribe["inline_parameters"] = True
                if self._holding_ids is not None:
                    subscribe["holding"] = list(self._holding_ids())
            ws.send(json.dumps(subscribe))
            ws.settimeout(self.ping_interval)
        except BaseException as exc:
            if holds_grant_lock:
                self._grant_lock.release()
            ws.shutdown()
            if isinstance(exc, (websocket.WebSocketException, OSError)):
                raise ConnectionLost(f"subscription handshake with {self.url} failed: {exc}") from exc
            raise
        self._extensions = extensions
        dialect = (self._dialect_for(extensions) if self._dialect_for is not None
                   else choose_dialect(extensions, fast_path=self.fast_path))
        if claims:
            dialect.claims_at_delivery = True
        self.dialect = dialect
        conn = Connection(ws, extensions, self.ping_interval)
        conn.uses_credit = granting
        conn.claims = claims
        conn.dialect = dialect
        if claims and self._on_run is not None:
            on_run = self._on_run
            conn.on_run = lambda run: on_run(run, dialect)
            conn.yields_after = self._yields_after
        try:
            with self._lock:
                if self.closed or self._opening_aborted:
                    ws.shutdown()  # its reader thread never started: nobody else closes it
                    raise _Closed()
                self._conn = conn
                self._opening = None  # published: abort_opening leaves it alone from now on
        finally:
            self._grant_lock.release()
        conn.start()
        self._count_connect()
        logger.info("Subscribed to %s as %s (keys: %s%s%s)", self.url, self.client_id, ", ".join(self.keys),
                    "; set_state over the socket" if self.supports_set_state else "",
                    "; runs claimed at delivery" if claims else "")
        return conn

    def _learn_lease_timeout(self, lease: Any) -> None:
        """Cap the reconnection backoff well below the lease timeout the server announced:
        after a blip or a server restart, a live worker subscribes again (and so keeps the
        runs it is executing) before their leases run out."""
        if isinstance(lease, (int, float)) and not isinstance(lease, bool) and lease > 0:
            self.backoff_cap = max(0.1, min(self.max_backoff, lease / 4))

    def _count_connect(self) -> None:
        global _process_has_connected
        self.connects += 1
        metrics.SUBSCRIPTION_CONNECTS.inc()
        released, self._released = self._released, False
        with _process_lock:
            if _process_has_connected and not released:  # a deliberate release is no lost link
                metrics.SUBSCRIPTION_RECONNECTS.inc()
            _process_has_connected = True

    def _stopping(self) -> bool:
        return self.closed or (self.stop_event is not None and self.stop_event.is_set())

    def _sleep(self, seconds: float) -> None:
        """Backoff sleep that ends early on close() or the stop event."""
        deadline = time.monotonic() + seconds
        while not self._stopping():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closed.wait(min(remaining, 0.1)):
                return

    def _connect_with_backoff(self) -> Connection | None:
        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            delay = state.next_action.sleep if state.next_action else 0
            logger.warning("Subscription to %s unavailable (%s); reconnecting in %.1fs", self.url, exc, delay)

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(lambda exc: not self._stopping() and _is_intermittent(exc)),
            wait=tenacity.wait_exponential(multiplier=0.2, max=self.backoff_cap) + tenacity.wait_random(0, 0.5),
            stop=lambda state: self._stopping(),
            sleep=self._sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            return retrying(self._open)
        except _Closed:
            return None
        except Exception:
            if self._stopping():
                return None
            raise

    # -- consuming ---------------------------------------------------------------------
    def next_run(self, timeout: float | None = None) -> TaskRun | None:
        """The next delivered run, now held until :meth:`ack` or :meth:`release`.

        Connects, and reconnects with backoff, as needed. Returns None after ``timeout``
        seconds without a run, or once the subscription is closed or its ``stop_event``
        is set (the connection then stays open until :meth:`close`: on the embedded
        server it is the lease of the runs acknowledged on it). A run still held from the
        previous call is released first.
        """
        if self._holding is not None:
            self.release()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._stopping():
            conn = self._conn
            if conn is None or conn.closed.is_set():
                if conn is not None:
                    self._drop(conn)
                conn = self._connect_with_backoff()
                if conn is None:
                    return None
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            try:
                item = conn.runs.get(timeout=remaining)
            except queue.Empty:
                return None
            if item is END:
                self._drop(conn)
                continue
            self._holding, self._holding_conn = item, conn
            return item
        return None

    def __iter__(self) -> Iterator[TaskRun]:
        """Delivered runs until closed; moving on without :meth:`ack` releases a run."""
        while True:
            run = self.next_run()
            if run is None:
                return
            try:
                yield run
            finally:
                if self._holding is run:
                    self.release()

    def _drop(self, conn: Connection) -> None:
        self._holding = self._holding_conn = None
        with self._lock:
            if self._conn is conn:
                self._conn = None
        err = conn.error
        if isinstance(err, SubscriptionError):
            raise err
        if isinstance(err, _Released):
            self._released = True
        elif not self.closed:
            logger.warning("Subscription connection lost (%s); reconnecting", err)

    def release(self) -> None:
        """Give the held run back without running it: close its connection without an
        ack, so the server re-queues the run for any subscriber (the next iteration
        reconnects). Done automatically when the consumer moves on without acking.

        Mind that on the embedded server the connection is also the lease of the runs
        acknowledged on it: they are re-queued if they do not finish within the server's
        lease timeout after the connection closed."""
        conn, held = self._holding_conn, self._holding
        self._holding = self._holding_conn = None
        if conn is not None and conn.claims and held is not None and "release_run" in conn.extensions:
            # claimed at delivery: there is no ack to withhold; its lease ends now instead
            logger.debug("Releasing run %s: handing it back", held.id)
            try:
                conn.send_json({"type": "release", "task_run_id": held.id})
            except ConnectionLost:
                pass  # the connection is gone: its lease brings the run back
            return
        if conn is not None:
            logger.debug("Releasing run %s: closing the socket without ack", held.id if held else None)
            conn.abort(_Released("run released without ack"))

    def ack(self) -> None:
        """Accept the held run. Raises :class:`ConnectionLost` if it cannot be sent:
        then the server re-queues the run and the caller must not execute it."""
        conn = self._holding_conn
        if conn is None:
            raise ConnectionLost("no run is held (or its connection is gone)")
        if conn.claims and conn.closed.is_set():
            # claimed on a connection lost since: its lease ends with it (a new connection
            # takes over only the runs the worker executes), and the server delivers it again
            self._holding = self._holding_conn = None
            raise ConnectionLost("its connection was lost while it waited for a free slot")
        if not conn.claims:  # claimed at delivery: already leased, nothing to send
            conn.send_json({"type": "ack"})
        self._holding = self._holding_conn = None

    def grant(self, n: int = 1) -> None:
        """Tell the server ``n`` more runs may be sent (the ``credit`` extension): called
        when an execution slot frees. A no-op on servers without the extension (Prefect's
        one-run-per-ack flow control applies there) and while disconnected (the next
        subscribe message carries the free slots)."""
        with self._grant_lock:
            conn = self._conn
            if conn is None or not conn.uses_credit or conn.closed.is_set() or self._stopping():
                return
            if conn.claims:
                # claim_at_delivery: the next set_state frame (usually the final state of the
                # run that freed the slot) carries it; flush_credit() sends what is left
                conn.owe(n)
                return
            try:
                conn.send_json({"type": "credit", "n": n})
            except ConnectionLost:
                pass  # the reader notices; the reconnect's subscribe counts the free slots

    def flush_credit(self) -> None:
        """Send the credit still owed (claim_at_delivery) in a ``credit`` frame: when no
        ``set_state`` frame took it (a final state sent over REST, a run skipped)."""
        conn = self._conn
        if conn is not None and not conn.owed:
            # nothing owed (the final state's frame took it: the usual case), read without the
            # locks; a slot freed meanwhile is flushed by the run that freed it
            return
        with self._grant_lock:
            conn = self._conn
            if conn is None or not conn.claims or conn.closed.is_set():
                return
            owed = conn.take_owed()
            if not owed or self._stopping():
                return
            try:
                conn.send_json({"type": "credit", "n": owed})
            except ConnectionLost:
                pass  # the reader notices; the reconnect's subscribe counts the free slots

    def stop_receiving(self) -> None:
        """Take no more runs, and hand back those delivered but not acknowledged — from the
        consumer thread (the one that acks), once it has stopped consuming.

        The connection stays open (on the embedded server it is the lease of the runs
        acknowledged on it, and it carries their states): the embedded server's ``release``
        message gives the unacknowledged runs back to its queue and stops deliveries on
        this connection. A server without it (Prefect) puts a run back on its queue when
        the socket closes before the ack, so the socket is closed there (its runs have no
        lease to keep; states go over REST).
        """
        with self._grant_lock:  # no credit granted across this
            conn = self._conn
            held = self._holding if self._holding_conn is conn else None
            self._holding = self._holding_conn = None
        if conn is None or conn.closed.is_set():
            return
        if conn.claims:
            # claimed at delivery (RUNNING, leased): name the runs not started, so that the
            # server makes them SCHEDULED again at once (their delivery not counted)
            ids = conn.stop_taking()
            if held is not None:
                ids.insert(0, held.id)
            try:
                for start in range(0, max(len(ids), 1), 1000):  # the server takes at most 1000 per message
                    conn.send_json({"type": "release", "task_run_ids": ids[start:start + 1000]})
            except ConnectionLost:
                return  # the connection is gone: the leases bring them back
            logger.info("Stopped receiving runs; handed back the runs delivered but not started%s",
                        f" ({len(ids)})" if ids else "")
            return
        if "release" in conn.extensions:
            try:
                conn.send_json({"type": "release"})
            except ConnectionLost:
                return  # the connection is gone: the server gives them back anyway
            handed_back = len(conn.take_queued())  # queued here unacknowledged: the server has them back now
            logger.info("Stopped receiving runs; handed back the runs delivered but not started%s",
                        f" ({handed_back} queued here)" if handed_back else "")
        else:
            logger.info("Stopped receiving runs; closing the subscription socket so that a run delivered "
                        "but not acknowledged goes back to the queue")
            conn.abort(_Released("stopped receiving"))

    def close(self) -> None:
        """Stop the subscription from any thread. Never sends ``quit`` (see module doc):
        an unacknowledged run goes back to the server's queue."""
        with self._lock:
            self._closed.set()
            conn = self._conn
        if conn is not None:
            conn.abort(_Closed())

    # -- the set_state extension -----------------------------------------------------
    def set_state(self, task_run_id: str, state: State, force: bool = False, timeout: float = 30.0) -> OrchestrationResult:
        """Propose a state over the socket (embedded server's ``set_state`` extension).

        Raises :class:`FastPathUnavailable` when no connected socket offers it and
        :class:`ConnectionLost` when the connection breaks before the answer; in both
        cases the caller proposes over REST instead.
        """
        conn = self._conn
        if not self.fast_path or conn is None or not conn.supports_set_state:
            raise FastPathUnavailable("set_state over the socket is not available")
        reply = conn.request(
            {"type": "set_state", "task_run_id": task_run_id, "state": state.to_json(), "force": force},
            timeout=timeout, with_owed_credit=conn.claims,
        )
        status = int(reply.get("status_code") or 0)
        if status in (200, 201):
            return OrchestrationResult.from_json(reply["result"])
        raise error_for(f"set_state of task run {task_run_id} over the socket", status, reply.get("detail"))

    def set_state_async(self, task_run_id: str, state: State, force: bool,
                        on_result: Callable[[OrchestrationResult | None, BaseException | None], None]) -> None:
        """:meth:`set_state` without waiting for the answer: ``on_result(result, None)`` or
        ``on_result(None, error)`` (the errors :meth:`set_state` raises) is called once, by
        the reader thread (or the thread that ends the connection), and must be quick.
        Raises :class:`FastPathUnavailable` / :class:`ConnectionLost` instead (``on_result``
        not called) when it cannot be sent at all."""
        conn = self._conn
        if not self.fast_path or conn is None or not conn.supports_set_state:
            raise FastPathUnavailable("set_state over the socket is not available")

        def answered(reply: dict[str, Any] | None, error: BaseException | None) -> None:
            result = None
            if error is None:
                assert reply is not None
                try:
                    status = int(reply.get("status_code") or 0)
                    if status in (200, 201):
                        result = OrchestrationResult.from_json(reply["result"])
                    else:
                        error = error_for(f"set_state of task run {task_run_id} over the socket", status,
                                          reply.get("detail"))
                except (KeyError, TypeError, ValueError) as exc:
                    error = exc
            on_result(result, error)

        message = {"type": "set_state", "task_run_id": task_run_id, "state": state.to_json(), "force": force}
        if "brief_set_state" in conn.extensions:
            # an ACCEPT is answered without the state (~90 bytes instead of ~1.1 KB): the
            # caller only counts it (TaskRunEngine._answered); any other answer is the full one
            message["brief"] = True
        conn.request_async(message, answered, with_owed_credit=conn.claims)

    def hand_back(self, task_run_id: str) -> bool:
        """Give back one acknowledged run that this worker will not start (its claim could
        not be recorded before the worker gave up): the embedded server's ``release_run``
        extension re-queues it now instead of at the end of its lease. False (nothing
        sent) when the open connection does not offer it or is gone."""
        conn = self._conn
        if conn is None or conn.closed.is_set() or "release_run" not in conn.extensions:
            return False
        try:
            conn.send_json({"type": "release", "task_run_id": task_run_id})
        except ConnectionLost:
            return False
        logger.info("Handed task run %s back to the server's queue (not started here)", task_run_id)
        return True

    def __enter__(self) -> Subscription:  # noqa: PYI034
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Subscription({self.url!r}, keys={self.keys!r})"


class _Released(Exception):
    """Internal: the consumer gave the held run back (see :meth:`Subscription.release`)."""


class _Closed(Exception):
    """Internal: the subscription was closed while connecting."""
