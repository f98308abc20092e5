"""How a message travels: REST, or one of the embedded server's sockets.

Two objects answer "how do I send this", each learning what the server offers once, when
its socket opens:

- :class:`SubmitTransport`, one per :class:`~sync_worker.client.Client` (``client.transport``):
  creates and waits. Over the rpc socket (:mod:`sync_worker.rpc`) when the server serves
  one and ``SYNC_WORKER_FAST_PATH`` allows it, else REST. A server without the endpoint (a
  Prefect server) is asked once and remembered; a socket that could not be opened is tried
  again after :data:`sync_worker.rpc.RETRY_AFTER_SECONDS`, REST meanwhile. What the rpc
  socket's ``auth_success`` announced (``brief_create``) holds for that connection.
- :class:`Transport`, one per worker: state proposals. Over the subscription socket when
  the connection that is open now announced the ``set_state`` extension (learned once per
  connection by :mod:`sync_worker.subscription`) and ``SYNC_WORKER_FAST_PATH`` allows it,
  otherwise over REST.

One error mapping for every path (:func:`error_for`): an answer with an error status,
whether it came as an HTTP response, an rpc reply or a ``set_state_result`` frame,
raises the same exception (:class:`~sync_worker.exceptions.Unauthorized` for 401/403,
:class:`~sync_worker.exceptions.ObjectNotFound` for 404,
:class:`~sync_worker.exceptions.APIError` otherwise, with ``status_code`` and ``detail``).
A socket that breaks (or stays silent) before the answer is not an error of the request:
the attempt is made again over REST at once (the server carries out both identically; a
repeated create names the same run id and is answered with the run it made, and a repeat
of a proposal that did land is recognised by the engine).

The one retry rule: the transports never retry. Each call is **one attempt** (at most one
request per way: socket, then REST); the caller that knows what a repeat means owns the
only retry loop:

- state proposals: the engine (:meth:`sync_worker.engine.TaskRunEngine._send`) repeats an
  attempt that failed intermittently (connection lost, timeout, 5xx) with exponential
  backoff and jitter for as long as the worker keeps its lease (``keep_trying``);
- creates: :meth:`Client.create_task_run` repeats connection errors, 429 and 5xx with
  exponential backoff and jitter for ``SYNC_WORKER_SUBMIT_TIMEOUT`` seconds, then raises
  :class:`~sync_worker.exceptions.ServerUnavailable`;
- reads, deletes and record writes: the client's bounded retry of idempotent calls. A
  wait is a sequence of reads: :meth:`SubmitTransport.wait` waits in chunks (pushed over
  the socket, else polled over REST), each read being one such call.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, Optional

import tenacity

from sync_worker import exceptions
from sync_worker.schemas import TERMINAL_STATES, State, TaskRun, parameters_record_text

if TYPE_CHECKING:
    import requests

    from sync_worker.client import Client
    from sync_worker.exceptions import APIError
    from sync_worker.rpc import RpcChannel
    from sync_worker.schemas import OrchestrationResult
    from sync_worker.sockets import Connection

logger = logging.getLogger("sync_worker.transport")

CREDENTIALS_HINT = (
    " — check SYNC_WORKER_API_AUTH_STRING / PREFECT_API_AUTH_STRING (or the API key) "
    "against the server's auth string"
)


def error_for(what: str, status: int, detail: Any, response: Optional[requests.Response] = None) -> APIError:
    """The exception for an error answer, whichever way it travelled (the one mapping)."""
    message = f"{what} failed with {status}: {detail}"
    if status in (401, 403):
        return exceptions.Unauthorized(message + CREDENTIALS_HINT, status_code=status, detail=detail, response=response)
    if status == 404:
        return exceptions.ObjectNotFound(message, status_code=status, detail=detail, response=response)
    return exceptions.APIError(message, status_code=status, detail=detail, response=response)


#: The rpc extension of a create answered ``{"id", "state"}`` instead of the whole run.
BRIEF_CREATE = "brief_create"
#: The rpc extension of a create that carries the run's parameters record.
CREATE_PARAMETERS = "create_parameters"
#: Polling of a wait where no rpc socket is offered (a Prefect server, or
#: ``SYNC_WORKER_FAST_PATH=false``): start fast (a no-op run completes in a few
#: milliseconds), back off to at most ``POLL_MAX`` seconds between reads.
POLL_INITIAL = 0.001
POLL_MAX = 0.25
#: A pushed wait is answered when the run finishes, or after this many seconds with the
#: run as it is (the server then forgets it: nothing accumulates however long a caller
#: waits); the wait goes on with a new request.
PUSHED_WAIT_CHUNK = 30.0
#: How long past a pushed wait's own timeout its answer may take before the socket counts
#: as silent (then the run is read over REST once and the wait goes on).
PUSHED_WAIT_GRACE = 5.0
#: How long past its timeout a wait may take for its last answer: the server's answer to
#: the last chunk, or the read of the run at the deadline (a stopped server must not hold
#: ``result(timeout=3)`` for a grace and a request timeout: it took 38 s).
LAST_READ_SECONDS = 1.0
#: a wait whose server does not answer tries again after at most this many seconds
WAIT_RETRY_MAX = 2.0

_UNSET: Any = object()


class SubmitTransport:
    """Sends a client's creates and waits: the rpc socket when the server offers it, else REST.

    Args:
        client: the client that owns it; its settings (``SYNC_WORKER_FAST_PATH``), its
            timeout and its REST requests are the ones used.
    """

    def __init__(self, client: Client) -> None:
        self.client = client
        self._channel = _UNSET
        self._lock = threading.Lock()

    @property
    def channel(self) -> Optional[RpcChannel]:
        """The rpc socket (made on first use, by one thread: one socket per client); None
        when the client's settings refuse the embedded server's extensions."""
        if self._channel is _UNSET:
            with self._lock:
                if self._channel is _UNSET:
                    from sync_worker.rpc import RpcChannel

                    self._channel = RpcChannel(self.client) if self.client.settings.fast_path else None
        return self._channel

    def on_prefect_server(self) -> bool:
        """Whether the server refused the rpc socket as only a Prefect server does (known
        after the first create; False with ``SYNC_WORKER_FAST_PATH=0``, which never asks)."""
        channel = self._channel
        return channel is not _UNSET and channel is not None and channel.unsupported

    def _connection(self, deadline: Optional[float] = None) -> Optional[Connection]:
        """The open rpc connection, or None: this attempt goes over REST."""
        channel = self.channel
        if channel is None:
            return None
        from sync_worker.rpc import RpcUnavailable

        try:
            return channel.connection(deadline)
        except RpcUnavailable as exc:
            logger.debug("no rpc socket (%s): using REST", exc)
            return None

    def _rpc(self, conn: Connection, message: Dict[str, Any], what: str, timeout: float) -> Any:
        """The ``result`` of one rpc request; error answers raise :func:`error_for`'s
        exceptions, a socket that breaks or stays silent ``ConnectionLost``."""
        reply = conn.request(message, timeout)
        status = int(reply.get("status_code") or 500)
        if status >= 400:
            raise error_for(what, status, reply.get("detail"))
        return reply.get("result")

    def _seconds_left(self, deadline: Optional[float], floor: float = 0.05) -> float:
        """A request's timeout: ``SYNC_WORKER_REQUEST_TIMEOUT``, but not past ``deadline``
        (monotonic; a create's submit timeout, a wait's timeout) by more than ``floor``: a
        server that accepts connections and never answers (stopped, swapping) must not hold
        ``.delay()`` or ``result(timeout=)`` for a request timeout per try."""
        timeout = float(self.client.timeout or 30.0)
        if deadline is None:
            return timeout
        return max(floor, min(timeout, deadline - time.monotonic()))

    def create(self, body: Dict[str, Any], *, brief: bool = False,
               parameters_record: Optional[bytes] = None, deadline: Optional[float] = None) -> TaskRun:
        """One attempt at creating the run ``body`` describes (it carries the run's ``id``).

        ``brief``: the caller needs the run's id and state only; a connection that
        announced ``brief_create`` then answers ``{"id", "state"}`` (the state's type,
        name and timestamp), and the run returned is ``body`` with that id and state (the
        state details of the proposed state kept when the server's state is that one;
        ``created`` and the other fields only the server makes are None). A brief answer
        whose run is finished already (a repeated create of a run that ran meanwhile) is
        followed by one read of the whole run: its final state carries the result.
        REST creates keep the whole answer: REST carries creates only while the rpc
        socket is unavailable (or switched off with every other extension), so a shorter
        answer there would save nothing measurable.

        ``parameters_record``: the run's parameters record for the server to keep (see
        :meth:`Client.create_task_run <sync_worker.client.Client.create_task_run>`): in the
        create's message when the connection announced ``create_parameters`` (stored in the
        create's transaction), else written first with ``PUT /storage/parameters.<id>``.
        ``deadline`` (monotonic): no request of this attempt waits past it.
        """
        conn = self._connection(deadline)
        if conn is not None:
            brief = brief and BRIEF_CREATE in conn.extensions
            message = {"type": "create", "body": body, "brief": True} if brief else {"type": "create", "body": body}
            if parameters_record is not None:
                from sync_worker.storage import INLINE_PARAMETERS_LIMIT

                if CREATE_PARAMETERS in conn.extensions and len(parameters_record) <= INLINE_PARAMETERS_LIMIT:
                    message["parameters_record"] = parameters_record.decode("utf-8")
                else:  # no websocket message grows without bound: a larger record has a request of its own
                    self._write_parameters(body, parameters_record, deadline)
                    parameters_record = None
            from sync_worker.sockets import ConnectionLost

            try:
                result = self._rpc(conn, message, "POST /task_runs/", self._seconds_left(deadline))
            except ConnectionLost as exc:
                logger.debug("create over the rpc socket got no answer (%s); over REST", exc)
            else:
                return self._brief_run(body, result) if brief else TaskRun.from_json(result)
        if parameters_record is not None:
            self._write_parameters(body, parameters_record, deadline)
        return TaskRun.from_json(self.client.request("POST", "/task_runs/", json_body=body,
                                                     timeout=self._seconds_left(deadline)).json())

    def _write_parameters(self, body: Dict[str, Any], record: bytes, deadline: Optional[float] = None) -> None:
        """The record a create could not carry, written before it: one request, part of the
        create's attempt, which the create's rule retries (a repeat of a create that landed
        writes the same bytes again)."""
        from sync_worker.storage import PARAMETERS_PREFIX, ServerStore

        key = PARAMETERS_PREFIX + body["state"]["state_details"]["task_parameters_id"]
        self.client.write_record(ServerStore.remote_key(key), record, retry=False, timeout=self._seconds_left(deadline))

    def _brief_run(self, body: Dict[str, Any], result: Dict[str, Any]) -> TaskRun:
        state, proposed = result.get("state") or {}, body.get("state") or {}
        if state.get("type") == proposed.get("type") and state.get("name") == proposed.get("name"):
            state = {**proposed, **state}  # the state we proposed, as the server stamped it
        run_id = str(result.get("id") or body["id"])
        if state.get("type") in _TERMINAL_TYPES:
            return TaskRun.from_json(self.client.request("GET", f"/task_runs/{run_id}").json())
        return BriefRun(run_id, {**body, **result, "state": state})

    def wait(self, task_run_id: str, timeout: Optional[float] = None) -> TaskRun:
        """The run once it is finished, or as it is after ``timeout`` seconds (None: no limit).

        Pushed over the rpc socket in chunks of at most :data:`PUSHED_WAIT_CHUNK` s (each
        answered when the run finishes or the chunk ends; nothing stays registered on the
        server); a chunk whose answer does not come (socket broken or silent) is followed
        by one read over REST at once. Without the socket, polled over REST. A server that
        cannot be reached (connection errors, 5xx) is tried again until ``timeout`` (a
        restart does not end the wait); after it, :class:`~sync_worker.exceptions.ServerUnavailable`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        try:  # the first attempt directly: the retry machinery is built only when it fails
            return self._wait_until(task_run_id, deadline)
        except Exception as exc:
            from sync_worker.client import _is_retryable

            if not _is_retryable(exc):
                raise
            first = exc

        def unanswered(error: BaseException | None, delay: float) -> None:
            logger.warning("Waiting for task run %s: the server at %s did not answer (%s); trying again in %.1f s",
                           task_run_id, self.client.api_url, error, delay)

        from sync_worker.services import wait_until_deadline

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(_is_retryable),
            stop=lambda _state: deadline is not None and time.monotonic() >= deadline,
            wait=wait_until_deadline(tenacity.wait_exponential_jitter(multiplier=0.1, max=WAIT_RETRY_MAX), deadline),
            before_sleep=lambda state: unanswered(state.outcome.exception() if state.outcome else None,
                                                  state.next_action.sleep if state.next_action else 0),
            reraise=True,
        )
        try:
            if deadline is not None and time.monotonic() >= deadline:
                raise first
            unanswered(first, 0)
            return retrying(self._wait_until, task_run_id, deadline)
        except Exception as exc:
            if not _is_retryable(exc):
                raise
            raise exceptions.ServerUnavailable(
                f"Could not read task run {task_run_id} from {self.client.api_url} within {timeout:g} s ({exc}); "
                "the run itself may be fine: wait again once the server is back") from exc

    def _wait_until(self, task_run_id: str, deadline: Optional[float]) -> TaskRun:
        run: Optional[TaskRun] = None
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return run if run is not None else self._read(task_run_id, deadline)
            conn = self._connection(deadline)
            if conn is None:
                return self._poll(task_run_id, None if deadline is None else max(0.0, deadline - time.monotonic()))
            chunk = PUSHED_WAIT_CHUNK if remaining is None else min(PUSHED_WAIT_CHUNK, remaining)
            last_chunk = remaining is not None and remaining <= PUSHED_WAIT_CHUNK
            grace = min(PUSHED_WAIT_GRACE, LAST_READ_SECONDS) if last_chunk else PUSHED_WAIT_GRACE
            from sync_worker.sockets import ConnectionLost

            try:
                run = LazyTaskRun.answered(self._rpc(conn, {"type": "wait", "task_run_id": task_run_id,
                                                            "timeout": chunk},
                                                     "wait for task run", chunk + grace))
            except ConnectionLost as exc:
                logger.debug("wait over the rpc socket got no answer (%s); reading the run over REST", exc)
                run = self._read(task_run_id, deadline)
            if _finished(run):
                return run

    def _read(self, task_run_id: str, deadline: Optional[float] = None) -> TaskRun:
        """One read of the run (no retry: :meth:`wait`'s rule is the one), ending at most
        :data:`LAST_READ_SECONDS` past ``deadline``: the bound of the whole wait, so a read
        after a last chunk that got no answer (which had that second already) gets almost
        none (it was a second more: ``result(timeout=1)`` took 3 s against a silent link)."""
        timeout = self._seconds_left(None if deadline is None else deadline + LAST_READ_SECONDS)
        return TaskRun.from_json(self.client.request("GET", f"/task_runs/{task_run_id}", timeout=timeout).json())

    def _poll(self, task_run_id: str, timeout: Optional[float]) -> TaskRun:
        """Read the run over REST until it is finished or ``timeout`` seconds passed."""
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_result(lambda run: not _finished(run)),
            wait=tenacity.wait_exponential(multiplier=POLL_INITIAL, min=POLL_INITIAL, max=POLL_MAX),
            stop=tenacity.stop_after_delay(timeout) if timeout is not None else tenacity.stop_never,
            retry_error_callback=lambda retry_state: retry_state.outcome.result(),
        )
        return retrying(self._read, task_run_id, None if timeout is None else time.monotonic() + timeout)

    def close(self) -> None:
        """Close the rpc socket, if one was opened."""
        if self._channel not in (_UNSET, None):
            self._channel.close()


def _finished(run: TaskRun) -> bool:
    return run.state is not None and run.state.is_terminal()


_TERMINAL_TYPES = frozenset(state_type.value for state_type in TERMINAL_STATES)


class _ReadOnFirstUse:
    """A field of :class:`LazyTaskRun`: reads the run's JSON on first use. A non-data
    descriptor: once read, the instance's own value is found first (no call)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, run: Any, owner: Any = None) -> Any:
        if run is None:
            return self
        run._read()
        return run.__dict__[self.name]


class LazyTaskRun(TaskRun):
    """A :class:`TaskRun` whose fields other than those ``known`` are read from its JSON
    (``source``) when one of them is first asked for, then all at once by
    :meth:`TaskRun.from_json`; from then on it holds the same fields as a run read at once.

    Why: a run's JSON has a dozen fields (four timestamps, the retry policy, ...) that the
    hot paths never look at: ``.delay()`` needs the id, a worker on the embedded server the
    id, name, key, state and labels. Reading them all was about a fifth of the submitter's
    CPU per ``.delay()`` and a tenth of the worker's per run (py-spy). A field that cannot
    be read raises when it is first asked for, as :meth:`TaskRun.from_json` would have
    when the run arrived."""

    def __init__(self, source: Optional[Dict[str, Any]] = None, **known: Any) -> None:
        if source is None:  # built as a TaskRun is, every field given (dataclasses.replace)
            TaskRun.__init__(self, **known)
            return
        self.__dict__.update(known)
        self._source = source

    def _read(self) -> None:
        fields = self.__dict__
        source = fields.get("_source")
        if source is None:
            return
        # every field set before the source goes: a thread reading at the same time finds
        # either the source (and reads it too, changing nothing) or every field
        for key, value in vars(TaskRun.from_json(source)).items():
            fields.setdefault(key, value)
        fields.pop("_source", None)

    @classmethod
    def answered(cls, answer: Dict[str, Any]) -> LazyTaskRun:
        """A run as a wait answers it: its id and state read now (what a waiting caller
        looks at), the rest when asked for."""
        state = answer.get("state")
        return cls(answer, id=str(answer["id"]), state=State.from_json(state) if state else None)

    @classmethod
    def delivered(cls, message: Dict[str, Any]) -> LazyTaskRun:
        """A run as a server delivers it (the whole run's JSON): what a worker needs read
        now (id, name, key, state, labels, the parameters record that came with it; a
        malformed one raises KeyError, TypeError or ValueError here, as
        :meth:`TaskRun.from_json` does), the rest when asked for."""
        state = message.get("state")
        return cls(message, id=str(message["id"]), name=message.get("name") or "", task_key=message["task_key"],
                   state=State.from_json(state) if state else None, labels=dict(message.get("labels") or {}),
                   parameters_record=parameters_record_text(message))


for _field in dataclasses.fields(TaskRun):
    setattr(LazyTaskRun, _field.name, _ReadOnFirstUse(_field.name))


class BriefRun(LazyTaskRun):
    """The run a brief create answer describes (see :meth:`SubmitTransport.create`): its
    id known, the rest read when asked for (:class:`LazyTaskRun`). It is never finished (a
    brief answer naming a finished run is replaced by a read of the whole run), which its
    ``unfinished`` attribute says without reading anything (a copy made by
    ``dataclasses.replace`` has none: its state may be another)."""

    def __init__(self, run_id: Optional[str] = None, source: Optional[Dict[str, Any]] = None, **known: Any) -> None:
        if source is None:
            super().__init__(None, **known)
            return
        super().__init__(source, id=run_id, unfinished=True)


class Transport:
    """Sends a worker's state proposals: socket when the open connection offers it, else REST.

    Args:
        client: the REST client (and its settings: ``SYNC_WORKER_FAST_PATH`` is read
            through it, by the subscription).
        subscription: the worker's subscription, whose current connection says whether
            ``set_state`` may go over the socket (None: REST only).
    """

    def __init__(self, client: Client, subscription: Any = None) -> None:
        self.client = client
        self.subscription = subscription

    @property
    def states_over_socket(self) -> bool:
        """Whether the next proposal goes over the subscription socket."""
        sub = self.subscription
        return sub is not None and bool(sub.supports_set_state)

    def set_state(self, task_run_id: str, state: State, *, force: bool = False,
                  timeout: float = 30.0) -> OrchestrationResult:
        """One attempt at proposing ``state`` (no retry here: see the module docstring).

        Over the socket when :attr:`states_over_socket`; if the socket is not connected
        or breaks before the answer, over REST at once (one request). Error answers raise
        :func:`error_for`'s exceptions on both paths; connection errors of the REST request
        propagate (``requests.ConnectionError``/``Timeout``) for the caller's retry rule.
        """
        if self.states_over_socket:
            from sync_worker.sockets import ConnectionLost
            from sync_worker.subscription import FastPathUnavailable

            try:
                return self.subscription.set_state(task_run_id, state, force=force, timeout=timeout)
            except (FastPathUnavailable, ConnectionLost) as exc:
                logger.debug("set_state over the socket failed (%s); proposing %s over REST", exc, state.name)
        return self.client.set_task_run_state(task_run_id, state, force=force, retry=False)

    def set_state_async(self, task_run_id: str, state: State, *, force: bool = False,
                        on_result: Any) -> bool:
        """Send ``state`` over the socket without waiting for the answer: True if sent, and
        then ``on_result(result, error)`` is called once, by the thread that reads the
        socket (see :meth:`Subscription.set_state_async`). False (nothing sent) when the
        socket does not carry states now: the caller proposes with :meth:`set_state`."""
        if not self.states_over_socket:
            return False
        from sync_worker.sockets import ConnectionLost
        from sync_worker.subscription import FastPathUnavailable

        try:
            self.subscription.set_state_async(task_run_id, state, force, on_result)
        except (FastPathUnavailable, ConnectionLost) as exc:
            logger.debug("set_state over the socket failed (%s); %s is proposed the usual way", exc, state.name)
            return False
        return True

    def hand_back(self, task_run_id: str) -> bool:
        """Give an acknowledged run back to the queue now, unstarted (the embedded
        server's ``release_run`` extension). False when the open connection cannot
        (a Prefect server, no connection): then the server's own rules apply (the lease
        on the embedded server)."""
        sub = self.subscription
        return sub is not None and sub.hand_back(task_run_id)


__all__ = ["BriefRun", "LazyTaskRun", "SubmitTransport", "Transport", "error_for"]
