"""A small synchronous REST client for the task-run API (embedded server or Prefect 3).

One ``requests.Session`` is shared by all threads of a process (its connection pool is
thread-safe), so a worker with ten busy threads keeps ten warm keep-alive connections
instead of opening one per state change. It is made on the first HTTP request: a worker or a
submitter on the embedded server's sockets may never make one, and requests with urllib3 and
charset_normalizer is ~9 MB of a process's resident memory (a worker's RSS: ~35 MB with it).

How creates and waits travel (the embedded server's rpc socket, or REST) is decided by
the client's :class:`~sync_worker.transport.SubmitTransport` (``client.transport``); the
retry rules are written down once, in :mod:`sync_worker.transport`.

Retries: reads, deletes, record writes and state proposals are retried on connection
errors and 5xx answers with exponential backoff and jitter (tenacity). Proposals are safe
to retry because the server orchestrates them: a proposal that did land the first time is
answered REJECT the second time, which the engine treats as "already there". Creates are
idempotent by the run id the client puts in the body (both servers answer a repeated
create with the run it made), so a create is retried on connection errors, 429 and 5xx for
up to ``SYNC_WORKER_SUBMIT_TIMEOUT`` seconds, then :class:`ServerUnavailable` is raised.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable, Dict, NoReturn, Optional, Tuple, TypeVar
from urllib.parse import urlsplit, urlunsplit

import tenacity

from sync_worker import exceptions
from sync_worker.schemas import OrchestrationResult, State, StateType, TaskRun
from sync_worker.settings import Settings, get_settings
from sync_worker.transport import SubmitTransport, error_for

if TYPE_CHECKING:
    import requests

    from sync_worker.exceptions import APIError

logger = logging.getLogger("sync_worker.client")

T = TypeVar("T")

#: How many connections one client keeps per host: enough for a worker's threads.
POOL_SIZE = 64


def _status(exc: BaseException) -> int | None:
    """The status of an API error answer; None for anything else. Looked up without
    importing requests: an API error can only exist once requests is loaded."""
    if "sync_worker._api_errors" in sys.modules and isinstance(exc, exceptions.APIError):
        return exc.status_code
    return None


def _is_retryable(exc: BaseException) -> bool:
    """The one rule of what is worth another attempt (:func:`sync_worker.services.is_intermittent`):
    connection errors and timeouts, an answer broken off or garbled in transit (requests'
    ``ChunkedEncodingError``: raised raw to ``.result()`` and ``.delay()`` before), a 5xx."""
    from sync_worker.services import is_intermittent

    return is_intermittent(exc)


def raise_unavailable(client: "Client", doing: str, exc: BaseException,
                      task_run_id: str | None = None) -> NoReturn:
    """Raise ``exc`` as the user should see it (call it in the ``except`` block): a
    connection error or a 5xx left after the retries as :class:`ServerUnavailable` saying
    what could not be done and where (a raw ``requests`` error named neither, and code
    written for ``ServerUnavailable`` after a submit missed it); anything else as it is."""
    if not _is_retryable(exc):
        raise exc
    raise exceptions.ServerUnavailable(
        f"Could not {doing} at {client.api_url} ({exc}); is the server running and answering? "
        "(SYNC_WORKER_API_URL)", task_run_id=task_run_id) from exc


def _create_retryable(exc: BaseException) -> bool:
    return _is_retryable(exc) or _status(exc) == 429


def _retry_policy(predicate: Callable[[BaseException], bool], attempts: int) -> tenacity.Retrying:
    """Exponential backoff with jitter, ``attempts`` tries, for errors ``predicate`` accepts."""
    return tenacity.Retrying(
        retry=tenacity.retry_if_exception(predicate),
        stop=tenacity.stop_after_attempt(max(1, attempts)),
        wait=tenacity.wait_exponential_jitter(multiplier=0.1, max=5.0),
        before_sleep=_log_retry,
        reraise=True,
    )


def _log_retry(retry_state: tenacity.RetryCallState) -> None:
    exc = retry_state.outcome.exception() if retry_state.outcome else None
    logger.warning(
        "API call failed (%s), retrying in %.1fs (attempt %d)",
        exc, retry_state.next_action.sleep if retry_state.next_action else 0, retry_state.attempt_number,
    )


class Client:
    """REST client for ``/api/task_runs`` and the embedded server's ``/api/storage``.

    Args default to the environment (:func:`sync_worker.settings.get_settings`).
    ``retry_attempts`` bounds the retries of idempotent calls; set it to 1 to fail fast.
    """

    def __init__(
        self,
        api_url: Optional[str] = None,
        auth_string: Optional[str] = None,
        api_key: Optional[str] = None,
        timeout: Optional[float] = None,
        *,
        retry_attempts: int = 6,
        settings: Optional[Settings] = None,
    ):
        settings = settings or get_settings()
        #: The settings this client was made with (its rpc socket follows them too).
        self.settings = settings
        self.api_url = (api_url or settings.api_url).rstrip("/")
        self.auth_string = auth_string if auth_string is not None else settings.auth_string
        self.api_key = api_key if api_key is not None else settings.api_key
        self.timeout = timeout if timeout is not None else settings.request_timeout
        self._auth_headers: Dict[str, str] = {}
        if self.auth_string:
            token = base64.b64encode(self.auth_string.encode()).decode()
            self._auth_headers["Authorization"] = f"Basic {token}"
        elif self.api_key:
            self._auth_headers["Authorization"] = f"Bearer {self.api_key}"
        self._session: Optional[requests.Session] = None  # made by the first HTTP request
        self._session_lock = threading.Lock()
        #: How this client's creates and waits travel (rpc socket or REST).
        self.transport = SubmitTransport(self)
        self._retrying = _retry_policy(_is_retryable, retry_attempts)

    # -- plumbing ---------------------------------------------------------------------
    @property
    def auth_token(self) -> Optional[str]:
        """What the websocket ``auth`` message carries: the auth string, else the API key."""
        return self.auth_string or self.api_key

    @property
    def headers(self) -> Dict[str, str]:
        """Headers for connections made outside the session (the websocket handshake)."""
        return dict(self._auth_headers)

    def _http(self) -> requests.Session:
        """The session, made on first use (see the module's docstring)."""
        session = self._session
        if session is not None:
            return session
        with self._session_lock:
            if self._session is None:
                import requests
                from requests.adapters import HTTPAdapter

                session = requests.Session()
                # Proxies from the environment are resolved once here; with trust_env on,
                # requests would re-read every *_proxy variable (and ~/.netrc) on each call,
                # which costs more CPU than the rest of a small request.
                session.proxies.update(requests.utils.get_environ_proxies(self.api_url))
                session.trust_env = False
                adapter = HTTPAdapter(pool_connections=4, pool_maxsize=POOL_SIZE)
                session.mount("http://", adapter)
                session.mount("https://", adapter)
                session.headers.update({"Accept": "application/json"})
                session.headers.update(self._auth_headers)
                self._session = session
            return self._session

    def websocket_url(self, path: str) -> str:
        parts = urlsplit(f"{self.api_url}/{path.lstrip('/')}")
        scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
        return urlunsplit((scheme, parts.netloc, parts.path, parts.query, ""))

    def request(self, method: str, path: str, *, json_body: Any = None, data: Optional[bytes] = None,
                headers: Optional[Dict[str, str]] = None, timeout: Optional[float] = None) -> requests.Response:
        """One HTTP request to the API (no retry); error answers raise :func:`error_for`'s
        exceptions, connection errors ``requests.ConnectionError``/``Timeout``. ``timeout``:
        seconds for this request (default ``SYNC_WORKER_REQUEST_TIMEOUT``)."""
        body = data
        request_headers = dict(headers or {})
        if json_body is not None:
            body = json.dumps(json_body).encode()
            request_headers["Content-Type"] = "application/json"
        response = self._http().request(
            method, f"{self.api_url}{path}", data=body, headers=request_headers,
            timeout=self.timeout if timeout is None else timeout,
        )
        if response.status_code >= 400:
            if response.status_code == 404:  # a URL without /api? (checked only on this error path)
                from sync_worker.diagnostics import api_url_error

                raise api_url_error(self.api_url, self.headers) or _api_error(method, path, response)
            raise _api_error(method, path, response)
        return response

    @property
    def rpc(self) -> Any:
        """The embedded server's rpc socket (:mod:`sync_worker.rpc`) of this client's
        transport; None when this client's settings refuse the extensions
        (``SYNC_WORKER_FAST_PATH``)."""
        return self.transport.channel

    def _retried(self, call: Callable[[], T]) -> T:
        return self._retrying(call)

    # -- task runs --------------------------------------------------------------------
    def create_task_run(self, body: Dict[str, Any], timeout: Optional[float] = None, *,
                        brief: bool = False, parameters_record: Optional[bytes] = None) -> TaskRun:
        """Create a run from a body built by :func:`sync_worker.schemas.task_run_create`.

        Each attempt is one :meth:`SubmitTransport.create <sync_worker.transport.SubmitTransport.create>`
        (the rpc socket when there is one, else ``POST /task_runs/``). The one retry rule of
        creates: connection errors, 429 and 5xx are tried again (exponential backoff with
        jitter) until ``timeout`` seconds (default ``SYNC_WORKER_SUBMIT_TIMEOUT``) have passed
        since the first attempt, then :class:`ServerUnavailable` is raised. Safe because the
        body carries the run's ``id``: a repeat of a create that did land answers the same
        run. ``brief=True``: the caller needs the run's id and state only (``.delay()``),
        see :meth:`~sync_worker.transport.SubmitTransport.create`. ``parameters_record``: the
        run's parameters record, kept by the embedded server under the body's
        ``task_parameters_id`` (``SYNC_WORKER_STORAGE=server``): carried by the create itself
        when the server offers it, else written before the create.
        """
        if "id" not in body:
            body = {**body, "id": str(uuid.uuid4())}
        limit = self.settings.submit_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit  # each attempt's requests wait at most until then (a hung server)
        try:
            try:  # the first attempt directly: the retry machinery is built only when it fails
                return self.transport.create(body, brief=brief, parameters_record=parameters_record, deadline=deadline)
            except Exception as exc:
                if not _create_retryable(exc) or time.monotonic() >= deadline:
                    raise
                logger.warning("Creating task run %s failed (%s); trying again", body["id"], exc)
            from sync_worker.services import wait_until_deadline

            retrying = tenacity.Retrying(
                retry=tenacity.retry_if_exception(_create_retryable),
                stop=lambda _state: time.monotonic() >= deadline,
                wait=wait_until_deadline(tenacity.wait_exponential_jitter(multiplier=0.1, max=2.0), deadline),
                before_sleep=_log_retry,
                reraise=True,
            )
            return retrying(self.transport.create, body, brief=brief, parameters_record=parameters_record,
                            deadline=deadline)
        except Exception as exc:
            if not _create_retryable(exc):
                raise
            run_id = body["id"]
            if _status(exc) is not None:  # the server answered, with 429 or 5xx: it runs, and says why
                hint = ("the server is running but could not take it (its log says why); set "
                        "SYNC_WORKER_SUBMIT_TIMEOUT to wait longer")
            else:
                hint = ("is the server running and answering? Set SYNC_WORKER_API_URL to its address, or "
                        "SYNC_WORKER_SUBMIT_TIMEOUT to wait longer")
            # an attempt may have reached a server that then stopped answering: the run may exist
            hint += f"; if an attempt reached the server the run exists: look up {run_id} before submitting again"
            raise exceptions.ServerUnavailable(
                f"Could not submit task run {run_id} to {self.api_url} within {limit:g} s ({exc}); {hint}",
                task_run_id=run_id) from exc

    def emit_events(self, events: list[Dict[str, Any]], timeout: Optional[float] = None) -> None:
        """``POST /events``: Prefect's event intake (its callers wait for state-change events)."""
        self.request("POST", "/events", json_body=events, timeout=timeout)

    def read_task_run(self, task_run_id: str) -> TaskRun:
        response = self._retried(lambda: self.request("GET", f"/task_runs/{task_run_id}"))
        return TaskRun.from_json(response.json())

    def delete_task_run(self, task_run_id: str) -> None:
        self._retried(lambda: self.request("DELETE", f"/task_runs/{task_run_id}"))

    def set_task_run_state(self, task_run_id: str, state: State, force: bool = False, *,
                           retry: bool = True) -> OrchestrationResult:
        """Propose a state. ``retry=False``: one request, for callers with their own retry
        rule (the engine's), so that no retry loop runs inside another."""
        body = {"state": state.to_json(), "force": force}

        def call() -> requests.Response:
            return self.request("POST", f"/task_runs/{task_run_id}/set_state", json_body=body)

        response = self._retried(call) if retry else call()
        return OrchestrationResult.from_json(response.json())

    # -- operating the queue (runs_cli.py; filter/count also work against Prefect) --------------
    def read_task_run_states(self, task_run_id: str) -> list:
        """``GET /task_run_states/?task_run_id=`` (Prefect's): the run's State dicts, oldest first."""
        return self._retried(lambda: self.request(
            "GET", f"/task_run_states/?task_run_id={task_run_id}")).json()

    def filter_task_runs(self, body: Optional[Dict[str, Any]] = None, *, retry: bool = True) -> list:
        """``POST /task_runs/filter`` (Prefect's TaskRunFilter/sort/limit/offset): TaskRun dicts.
        ``retry=False``: one request, for callers with their own retry rule."""
        def call() -> requests.Response:
            return self.request("POST", "/task_runs/filter", json_body=body or {})

        return (self._retried(call) if retry else call()).json()

    def count_task_runs(self, body: Optional[Dict[str, Any]] = None) -> int:
        return int(self._retried(lambda: self.request("POST", "/task_runs/count", json_body=body or {})).json())

    def read_stats(self) -> Dict[str, Any]:
        """The embedded server's queue statistics (``GET /sync_worker/stats``)."""
        return self._retried(lambda: self.request("GET", "/sync_worker/stats")).json()

    def read_workers(self) -> list:
        """The embedded server's subscribed workers (``GET /sync_worker/workers``)."""
        return self.request("GET", "/sync_worker/workers").json()

    def purge_task_runs(self, older_than_seconds: float, state_types: Optional[list] = None) -> int:
        body = {"older_than_seconds": older_than_seconds, "state_types": state_types or []}
        return int(self.request("POST", "/sync_worker/purge", json_body=body).json()["deleted"])

    def cancel_task_run(self, task_run_id: str) -> Dict[str, Any]:
        """Cancel a run: ``{"status": "cancelled"|"cancelling"|"unchanged", "task_run": {...}}``.

        The embedded server cancels a waiting run at once and asks the worker of a running one
        to stop it (see ``server/cancellation.py``). A Prefect server has no such call: the run
        is forced to CANCELLED unless it is finished, which is what Prefect itself offers (its
        worker is not interrupted; a late report of that worker is then refused or overrides it).
        """
        try:
            return self._retried(lambda: self.request("POST", f"/sync_worker/task_runs/{task_run_id}/cancel")).json()
        except exceptions.APIError as exc:
            missing_route = exc.status_code == 405 or (
                exc.status_code == 404 and exc.detail != "Task not found")
            if not missing_route:
                raise
        run = self.read_task_run(task_run_id)
        if run.state is not None and run.state.is_terminal():
            return {"status": "unchanged", "notified": False, "task_run": run.to_json()}
        state = State(StateType.CANCELLED, "Cancelled", message="Cancelled by request.")
        self.set_task_run_state(task_run_id, state, force=True)
        return {"status": "cancelled", "notified": False, "task_run": self.read_task_run(task_run_id).to_json()}

    def health(self) -> bool:
        """True when the server answers its health check; raises on auth errors."""
        import requests

        try:
            response = self.request("GET", "/health")
        except (requests.ConnectionError, requests.Timeout):
            return False
        except exceptions.APIError as exc:
            if isinstance(exc, exceptions.Unauthorized):
                raise
            return False
        return response.json() is True

    # -- records (embedded server only) ---------------------------------------------
    def write_record(self, key: str, data: bytes, *, retry: bool = True, timeout: Optional[float] = None) -> None:
        """``PUT /storage/{key}``. ``retry=False``: one request, for callers with their own
        retry rule (a create's, which writes its parameters record first)."""
        def call() -> requests.Response:
            return self.request("PUT", f"/storage/{key}", data=data,
                                headers={"Content-Type": "application/octet-stream"}, timeout=timeout)

        self._retried(call) if retry else call()

    def read_record(self, key: str) -> bytes:
        return self._retried(lambda: self.request("GET", f"/storage/{key}")).content

    def delete_record(self, key: str) -> None:
        self._retried(lambda: self.request("DELETE", f"/storage/{key}"))

    # -- lifecycle --------------------------------------------------------------------
    def close(self) -> None:
        with self._session_lock:
            session, self._session = self._session, None
        if session is not None:
            session.close()
        self.transport.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.api_url!r})"


def _api_error(method: str, path: str, response: requests.Response) -> APIError:
    try:
        payload = response.json()
    except ValueError:
        payload = _not_an_api_answer(response)
    detail = payload
    if isinstance(payload, dict):
        detail = payload.get("detail") or payload.get("exception_detail") or payload.get("exception_message") or payload
    return error_for(f"{method} {path}", response.status_code, detail, response)


def _not_an_api_answer(response: requests.Response) -> str:
    """What to say of an error answer that is not JSON: one short line, never a whole page
    (a proxy's or another web server's error page is not the API's)."""
    text = response.text
    if "html" in response.headers.get("Content-Type", "").lower() or text.lstrip()[:1] == "<":
        title = re.search(r"<title[^>]*>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
        named = f" ({' '.join(title.group(1).split())[:120]})" if title else ""
        return (f"an HTML page{named}, not an API answer: is {response.url.split('?')[0]} on a sync_worker "
                "or Prefect server's API?")
    line = " ".join(text.split())
    return line[:300] + ("…" if len(line) > 300 else "")


#: one client per configuration: keyed by the whole Settings value (a frozen dataclass), not
#: by the API address alone, which handed a client made for other settings (e.g.
#: SYNC_WORKER_FAST_PATH=1) to a process whose settings had changed since (seen in the test
#: suite, when a server's port was used again by a later test's server)
_default_clients: Dict[Settings, Client] = {}
_default_lock = threading.Lock()


def get_client(settings: Optional[Settings] = None) -> Client:
    """The process-wide client for these settings, so repeated ``.delay()`` calls reuse
    one connection pool. Forgotten in a forked child: sockets must not be shared."""
    global _last_client
    settings = settings or get_settings()
    last = _last_client
    if last is not None and last[0] is settings:  # the same settings object as last time (cached)
        return last[1]
    with _default_lock:
        client = _default_clients.get(settings)
        if client is None:
            client = _default_clients[settings] = Client(settings=settings)
        _last_client = (settings, client)
        return client


#: (settings, client) of the last :func:`get_client` call: ``.delay()`` asks on every call,
#: with the settings object :func:`get_settings` keeps while the environment is unchanged
_last_client: Optional[Tuple[Settings, Client]] = None


def _forget_clients_after_fork() -> None:
    global _default_lock, _last_client
    _default_lock = threading.Lock()
    _default_clients.clear()
    _last_client = None


os.register_at_fork(after_in_child=_forget_clients_after_fork)
