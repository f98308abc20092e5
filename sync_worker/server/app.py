"""The WSGI application: routing (werkzeug.routing) and the REST endpoints under ``/api``.

Hand-written rather than Flask: the request path is short (route, auth, read body, call
:class:`core.Core`, serialize), which matters at thousands of requests per second.
Every error is a JSON object with a ``detail`` saying what was wrong.
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from werkzeug.exceptions import MethodNotAllowed
from werkzeug.exceptions import NotFound as RouteNotFound
from werkzeug.routing import Map, RequestRedirect, Rule

from .core import Conflict, Core, NotFound, parse_json_body
from .database import DatabaseClosed, StorageError
from .events import EventBus, handle_events_in, handle_events_out, validate_logs
from .models import ValidationError, validate_set_state
from .validation import check_uuid
from .rpc import handle_rpc
from .subscriptions import SubscriptionRegistry, handle_websocket

logger = logging.getLogger("sync_worker.server.app")

RECORD_KEY = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
#: what ``GET /api/admin/version`` answers: the Prefect server version whose wire protocol this
#: server speaks (the captures in shared/prefect-protocol). Prefect clients check that the
#: major version matches theirs before they use a server.
PREFECT_API_VERSION = "3.8.8"
UPGRADED = "sync_worker.upgraded"  # environ flag: the connection now belongs to a websocket
CLOSE = "sync_worker.close"  # environ flag: close the HTTP connection after this response

StartResponse = Callable[..., Any]
#: the dashboard's endpoints (404 when it is turned off; cancel stays: `sync-worker runs cancel` uses it)
_UI_ENDPOINTS = frozenset({"ui_index", "ui_static", "ui_overview", "ui_runs", "ui_run", "retry"})
Response = tuple[str, list[tuple[str, str]], bytes]

_JSON = "application/json"
_STATUS = {
    200: "200 OK", 201: "201 Created", 204: "204 No Content", 400: "400 Bad Request",
    401: "401 Unauthorized", 404: "404 Not Found", 405: "405 Method Not Allowed", 408: "408 Request Timeout",
    409: "409 Conflict",
    411: "411 Length Required", 413: "413 Content Too Large", 415: "415 Unsupported Media Type",
    422: "422 Unprocessable Entity",
    426: "426 Upgrade Required", 500: "500 Internal Server Error", 501: "501 Not Implemented",
    503: "503 Service Unavailable",
    507: "507 Insufficient Storage",
}


#: request bodies being received at once may hold at most this many bytes (or 4 x the body
#: limit if larger): many slow uploads wait their turn (503) instead of filling the memory
MIN_BODY_BUDGET = 64 * 1024 * 1024
_CHUNK = 64 * 1024


class ChunkTooLarge(OSError):
    """A chunked body announced a chunk larger than the body limit (``max_chunk`` of the
    server's chunked input): refused at once with 413, not read until a timeout."""


def _refuse_encodings(environ: dict[str, Any]) -> None:
    """A body we cannot decode is refused by name (RFC 9112 6.1: 501 for a transfer coding the
    server does not implement; RFC 7694: 415 for a content coding). Unchecked, a gzip body was
    read as no body, or as JSON, and answered 422 "needs a JSON body", which sent the user
    looking at their JSON."""
    codings = [c.strip().lower() for c in environ.get("HTTP_TRANSFER_ENCODING", "").split(",") if c.strip()]
    if codings and codings != ["chunked"]:
        environ[CLOSE] = True  # the body's length is not known: the connection cannot go on
        raise HTTPError(501, f"Transfer-Encoding {environ['HTTP_TRANSFER_ENCODING']!r} is not supported: "
                             "send the body as it is, with Content-Length or 'Transfer-Encoding: chunked'")
    content = environ.get("HTTP_CONTENT_ENCODING", "").strip().lower()
    if content and content != "identity":
        environ[CLOSE] = True  # (its body is not read)
        raise HTTPError(415, f"Content-Encoding {environ['HTTP_CONTENT_ENCODING']!r} is not supported: "
                             "send the JSON body uncompressed")


def _read_chunks(stream: Any, limit: int) -> bytes:
    """Up to ``limit`` bytes, read as they arrive (``read(limit)`` would allocate all of
    ``limit`` at once, for a client that may send a fraction of it)."""
    parts: list[bytes] = []
    left = limit
    while left > 0:
        part = stream.read(min(_CHUNK, left))
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


class BodyBudget:
    """Bytes of request bodies being received, bounded (see :data:`MIN_BODY_BUDGET`)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def reserve(self, size: int, environ: dict[str, Any]) -> Iterator[None]:
        with self._lock:
            if self.used + size > self.limit and self.used > 0:
                environ[CLOSE] = True  # the body is not read
                raise HTTPError(503, f"Server busy: {self.used} bytes of request bodies are being received; "
                                     "retry in a moment", {"retry_after": 1})
            self.used += size
        try:
            yield
        finally:
            with self._lock:
                self.used -= size


class HTTPError(Exception):
    def __init__(self, code: int, detail: str, extra: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.extra = extra or {}


def _json(code: int, body: Any) -> Response:
    data = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
    return _STATUS[code], [("Content-Type", _JSON), ("Content-Length", str(len(data)))], data


def _error(code: int, detail: str, extra: dict[str, Any] | None = None) -> Response:
    body = {"detail": detail}
    if extra:
        body.update(extra)
    return _json(code, body)


class App:
    """WSGI callable. ``max_body_size`` bounds request bodies (413 beyond it)."""

    def __init__(self, core: Core, registry: SubscriptionRegistry, max_body_size: int,
                 events: EventBus | None = None) -> None:
        self.core = core
        self.events = events if events is not None else EventBus(core)
        self.registry = registry
        self.max_body_size = max_body_size
        self.bodies = BodyBudget(max(MIN_BODY_BUDGET, 4 * max_body_size))
        self.url_map = Map(
            [
                Rule("/api/health", endpoint="health", methods=["GET"]),
                Rule("/api/admin/version", endpoint="version", methods=["GET"]),
                Rule("/api/csrf-token", endpoint="csrf", methods=["GET"]),
                Rule("/api/task_runs/", endpoint="create", methods=["POST"]),
                Rule("/api/task_runs/subscriptions/scheduled", endpoint="subscribe", methods=["GET"]),
                # operating the queue (listing.py, cancellation.py, retention.py)
                Rule("/api/task_runs/filter", endpoint="filter", methods=["POST"]),
                Rule("/api/task_runs/count", endpoint="count", methods=["POST"]),
                Rule("/api/task_run_states/", endpoint="task_run_states", methods=["GET"]),
                Rule("/api/sync_worker/stats", endpoint="stats", methods=["GET"]),
                Rule("/api/sync_worker/workers", endpoint="workers", methods=["GET"]),
                Rule("/api/sync_worker/task_runs/<run_id>/cancel", endpoint="cancel", methods=["POST"]),
                Rule("/api/sync_worker/purge", endpoint="purge", methods=["POST"]),
                Rule("/api/sync_worker/rpc", endpoint="rpc", methods=["GET"]),
                Rule("/api/task_runs/<run_id>", endpoint="read", methods=["GET"]),
                Rule("/api/task_runs/<run_id>", endpoint="delete", methods=["DELETE"]),
                Rule("/api/task_runs/<run_id>/set_state", endpoint="set_state", methods=["POST"]),
                Rule("/api/storage/<key>", endpoint="record_put", methods=["PUT"]),
                Rule("/api/storage/<key>", endpoint="record_get", methods=["GET"]),
                Rule("/api/storage/<key>", endpoint="record_delete", methods=["DELETE"]),
                # Prefect's events and the small endpoints its client calls (see events.py)
                Rule("/api/events/in", endpoint="events_in", methods=["GET"]),
                Rule("/api/events/out", endpoint="events_out", methods=["GET"]),
                Rule("/api/events", endpoint="events_post", methods=["POST"]),
                Rule("/api/admin/storage", endpoint="admin_storage", methods=["GET"]),
                Rule("/api/logs/", endpoint="logs", methods=["POST"]),
                # the dashboard (dashboard.py): its page, its files and the JSON its pages read
                Rule("/", endpoint="ui_index", methods=["GET"]),
                Rule("/ui/<name>", endpoint="ui_static", methods=["GET"]),
                Rule("/api/sync_worker/dashboard/overview", endpoint="ui_overview", methods=["GET"]),
                Rule("/api/sync_worker/dashboard/runs", endpoint="ui_runs", methods=["GET"]),
                Rule("/api/sync_worker/dashboard/runs/<run_id>", endpoint="ui_run", methods=["GET"]),
                Rule("/api/sync_worker/task_runs/<run_id>/retry", endpoint="retry", methods=["POST"]),
            ],
            strict_slashes=False,
            merge_slashes=False,
        )
        self._adapter = self.url_map.bind("localhost")
        self._handlers: dict[str, Callable[..., Response]] = {
            "health": self.health,
            "version": self.version,
            "csrf": self.csrf,
            "create": self.create,
            "read": self.read,
            "delete": self.delete,
            "set_state": self.set_state,
            "record_put": self.record_put,
            "record_get": self.record_get,
            "record_delete": self.record_delete,
            "events_post": self.events_post,
            "admin_storage": self.admin_storage,
            "logs": self.logs,
            "filter": self.filter_runs,
            "count": self.count_runs,
            "stats": self.stats,
            "task_run_states": self.task_run_states,
            "workers": self.workers,
            "cancel": self.cancel,
            "purge": self.purge,
            "ui_index": self.ui_index,
            "ui_static": self.ui_static,
            "ui_overview": self.ui_overview,
            "ui_runs": self.ui_runs,
            "ui_run": self.ui_run,
            "retry": self.retry,
        }
        self.ui = True  # the dashboard at / (Server(ui=False), `sync-worker server --no-ui`: off)
        self._ui_files: Any = None

    # -- WSGI ------------------------------------------------------------------------------------
    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        try:
            status, headers, body = self.dispatch(environ)
        except Exception:  # pragma: no cover - a bug; keep serving
            logger.exception("error handling %s %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"))
            environ[CLOSE] = True
            status, headers, body = _error(500, "Internal server error")
        if environ.get(UPGRADED):
            return []
        if environ.get(CLOSE):
            headers.append(("Connection", "close"))
        start_response(status, headers)
        return [body]

    def dispatch(self, environ: dict[str, Any]) -> Response:
        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO") or "/"
        try:
            endpoint, args = self._adapter.match(path, method)
        except RouteNotFound:
            self._discard_body(environ)
            return _error(404, f"Not found: {method} {path}")
        except MethodNotAllowed as exc:
            self._discard_body(environ)
            allowed = ", ".join(sorted(exc.valid_methods or []))
            return _error(405, f"Method {method} not allowed for {path} (allowed: {allowed})")
        except RequestRedirect:  # pragma: no cover - strict_slashes is off
            self._discard_body(environ)
            return _error(404, f"Not found: {method} {path}")
        if endpoint == "subscribe":
            return self.subscribe(environ)
        if endpoint == "rpc":
            if self.core.prefect_compatible:  # as a Prefect server: no such endpoint
                self._discard_body(environ)
                return _error(404, f"Not found: {method} {path}")
            return self.subscribe(environ, handler=handle_rpc)
        if endpoint in ("events_in", "events_out"):  # authenticated in-band, as Prefect does
            handle = handle_events_in if endpoint == "events_in" else handle_events_out
            return self.subscribe(environ, handler=lambda env, core, _registry, size: handle(env, core, self.events, size))
        if endpoint in _UI_ENDPOINTS and not self.ui:
            self._discard_body(environ)
            return _error(404, f"Not found: {method} {path} (the dashboard is turned off: --no-ui)")
        if not self.core.check_authorization(environ.get("HTTP_AUTHORIZATION")) and not self._browser_authorized(
                environ):
            self._discard_body(environ)
            if endpoint in ("ui_index", "ui_static"):
                from .dashboard import unauthorized_page

                return unauthorized_page()
            return _error(401, "Unauthorized: this server requires 'Authorization: Basic <base64 of the auth "
                               "string>' (set SYNC_WORKER_API_AUTH_STRING / PREFECT_API_AUTH_STRING)",
                          {"exception_message": "Unauthorized"})
        if "run_id" in args:  # any spelling uuid.UUID reads (upper case, no dashes), as Prefect's API takes
            try:
                args = {**args, "run_id": check_uuid(args["run_id"], ["path", "id"])}
            except ValidationError as exc:
                self._discard_body(environ)
                return _json(422, exc.to_json())
        try:
            return self._handlers[endpoint](environ, **args)
        except HTTPError as exc:
            return _error(exc.code, exc.detail, exc.extra)
        except ValidationError as exc:
            return _json(422, exc.to_json())
        except NotFound as exc:
            return _error(404, str(exc))
        except Conflict as exc:
            return _error(409, str(exc))
        except DatabaseClosed:
            environ[CLOSE] = True
            return _error(503, "Server is shutting down")
        except StorageError as exc:  # disk full (507), database locked (503)
            return _error(exc.status, exc.detail)

    # -- bodies ----------------------------------------------------------------------------------
    def _read_body(self, environ: dict[str, Any]) -> bytes:
        _refuse_encodings(environ)
        stream = environ["wsgi.input"]
        length_text = environ.get("CONTENT_LENGTH")
        if environ.get("wsgi.input_terminated"):  # chunked
            with self.bodies.reserve(self.max_body_size + 1, environ):
                if hasattr(stream, "max_chunk"):
                    stream.max_chunk = self.max_body_size
                try:
                    data = _read_chunks(stream, self.max_body_size + 1)
                except ChunkTooLarge:
                    environ[CLOSE] = True
                    raise HTTPError(413, f"Request body is larger than the limit of {self.max_body_size} bytes "
                                         "(sync-worker server --max-body-size)") from None
                except TimeoutError:
                    environ[CLOSE] = True
                    raise HTTPError(408, "Request body not received in time") from None
                except (OSError, ValueError) as exc:
                    environ[CLOSE] = True  # the rest of the stream cannot be framed
                    raise HTTPError(400, f"Malformed chunked request body: {exc}") from None
            if len(data) > self.max_body_size:
                environ[CLOSE] = True
                raise HTTPError(413, f"Request body is larger than the limit of {self.max_body_size} bytes "
                                     "(sync-worker server --max-body-size)")
            return data
        if not length_text:
            return b""
        try:
            length = int(length_text)
            if length < 0:
                raise ValueError
        except ValueError:
            environ[CLOSE] = True
            raise HTTPError(400, f"Invalid Content-Length header: {length_text!r}") from None
        if length > self.max_body_size:
            environ[CLOSE] = True  # the body is not read: this connection cannot be reused
            raise HTTPError(413, f"Request body of {length} bytes is larger than the limit of "
                                 f"{self.max_body_size} bytes (sync-worker server --max-body-size)")
        if not length:
            return b""
        with self.bodies.reserve(length, environ):
            try:
                data = _read_chunks(stream, length)
            except OSError:  # timed out (slow client), reset
                environ[CLOSE] = True
                raise HTTPError(408, "Request body not received in time") from None
        if len(data) < length:
            environ[CLOSE] = True
            raise HTTPError(400, "Request body is shorter than its Content-Length")
        return data

    def _discard_body(self, environ: dict[str, Any]) -> None:
        """Consume an unused body so the keep-alive connection stays in sync."""
        try:
            self._read_body(environ)
        except HTTPError:
            environ[CLOSE] = True

    def _json_body(self, environ: dict[str, Any]) -> Any:
        raw = self._read_body(environ)
        if not raw:
            raise ValidationError(["body"], "Field required: the request needs a JSON body", "missing")
        value, error = parse_json_body(raw)
        if error is not None:
            raise HTTPError(422, error, {"exception_message": "Invalid request received."})
        return value

    def _optional_json_body(self, environ: dict[str, Any]) -> None:
        """Read an unused body but refuse malformed JSON, so a garbled request changes nothing."""
        raw = self._read_body(environ)
        if raw.strip():
            _value, error = parse_json_body(raw)
            if error is not None:
                raise HTTPError(422, error, {"exception_message": "Invalid request received."})

    # -- endpoints -------------------------------------------------------------------------------
    def health(self, environ: dict[str, Any]) -> Response:
        self._discard_body(environ)
        return _json(200, b"true")

    def version(self, environ: dict[str, Any]) -> Response:
        self._discard_body(environ)
        return _json(200, json.dumps(PREFECT_API_VERSION))

    def csrf(self, environ: dict[str, Any]) -> Response:
        """Prefect clients ask for a CSRF token before their first change; this answer (the
        one of a Prefect server with CSRF protection off) makes them stop asking."""
        self._discard_body(environ)
        return _error(422, "CSRF protection is disabled.")

    def create(self, environ: dict[str, Any]) -> Response:
        body = self._json_body(environ)
        if environ.get("HTTP_X_SYNC_WORKER_BRIEF") == "1":  # the brief create answer: {id, state}
            return _json(201, self.core.create_task_run(body, brief=True))
        return _json(201, self.core.create_task_run(body))

    def read(self, environ: dict[str, Any], run_id: str) -> Response:
        self._discard_body(environ)
        return _json(200, self.core.read_task_run(run_id))

    def delete(self, environ: dict[str, Any], run_id: str) -> Response:
        self._discard_body(environ)
        self.core.delete_task_run(run_id)
        return _STATUS[204], [("Content-Length", "0")], b""

    def set_state(self, environ: dict[str, Any], run_id: str) -> Response:
        proposed, force = validate_set_state(self._json_body(environ))
        return _json(201, self.core.set_state(run_id, proposed, force))

    def _record_key(self, key: str) -> str:
        if not RECORD_KEY.match(key):
            raise HTTPError(422, f"Invalid storage key {key!r}: use 1-200 characters from A-Z a-z 0-9 . _ -")
        return key

    def record_put(self, environ: dict[str, Any], key: str) -> Response:
        data = self._read_body(environ)
        self.core.put_record(self._record_key(key), data)
        return _STATUS[204], [("Content-Length", "0")], b""

    def record_get(self, environ: dict[str, Any], key: str) -> Response:
        self._discard_body(environ)
        data = self.core.read_record(self._record_key(key))
        return _STATUS[200], [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(data)))], data

    def record_delete(self, environ: dict[str, Any], key: str) -> Response:
        self._discard_body(environ)
        self.core.delete_record(self._record_key(key))
        return _STATUS[204], [("Content-Length", "0")], b""

    def events_post(self, environ: dict[str, Any]) -> Response:
        """Prefect's ``POST /api/events``: a batch of events (recorded as on /api/events/in)."""
        self.events.ingest_body(self._json_body(environ))
        return _STATUS[204], [("Content-Length", "0")], b""

    def admin_storage(self, environ: dict[str, Any]) -> Response:
        """Prefect's client asks for the server's default result storage block: none here."""
        self._discard_body(environ)
        return _json(200, b'{"default_result_storage_block_id":null}')

    def logs(self, environ: dict[str, Any]) -> Response:
        """Prefect's workers send their task logs here. They are validated and DROPPED (this
        server keeps no logs: storage grows with live work, not history); 201 as Prefect."""
        count = validate_logs(self._json_body(environ))
        self.events.dropped_logs += count
        return _json(201, b"null")

    # -- operating the queue ---------------------------------------------------------------------
    def _optional_json_body(self, environ: dict[str, Any]) -> Any:
        raw = self._read_body(environ)
        if not raw.strip():
            return None
        value, error = parse_json_body(raw)
        if error is not None:
            raise HTTPError(422, error, {"exception_message": "Invalid request received."})
        return value

    def filter_runs(self, environ: dict[str, Any]) -> Response:
        from .listing import filter_runs

        return _json(200, filter_runs(self.core.db, self._optional_json_body(environ)))

    def count_runs(self, environ: dict[str, Any]) -> Response:
        from .listing import count_runs

        return _json(200, count_runs(self.core.db, self._optional_json_body(environ)))

    def task_run_states(self, environ: dict[str, Any]) -> Response:
        from .history import task_run_states

        self._discard_body(environ)
        return _json(200, task_run_states(self.core.db, environ.get("QUERY_STRING", "")))

    def stats(self, environ: dict[str, Any]) -> Response:
        from .listing import stats

        self._discard_body(environ)
        return _json(200, stats(self.core.db, self.core.subscribers))

    def workers(self, environ: dict[str, Any]) -> Response:
        """The subscribed workers only (cheap: no database query)."""
        from .listing import worker_info

        self._discard_body(environ)
        return _json(200, [worker_info(sub) for sub in list(self.core.subscribers)])

    def cancel(self, environ: dict[str, Any], run_id: str) -> Response:
        from .cancellation import cancel_run

        self._optional_json_body(environ)
        return _json(200, cancel_run(self.core, run_id))

    def purge(self, environ: dict[str, Any]) -> Response:
        from .retention import parse_purge, purge

        older_than, states = parse_purge(self._optional_json_body(environ))
        return _json(200, {"deleted": purge(self.core, older_than, states)})

    # -- the dashboard (dashboard.py) -----------------------------------------------------------
    def _browser_authorized(self, environ: dict[str, Any]) -> bool:
        from .dashboard import basic_matches

        return basic_matches(self.core.auth_string, environ.get("HTTP_AUTHORIZATION"))

    def _static(self, name: str) -> Response:
        from .dashboard import StaticFiles

        if self._ui_files is None:
            self._ui_files = StaticFiles()
        answer = self._ui_files.response(name)
        if answer is None:
            raise HTTPError(404, f"Not found: dashboard file {name!r}")
        return answer

    def ui_index(self, environ: dict[str, Any]) -> Response:
        self._discard_body(environ)
        return self._static("index.html")

    def ui_static(self, environ: dict[str, Any], name: str) -> Response:
        self._discard_body(environ)
        return self._static(name)

    def ui_overview(self, environ: dict[str, Any]) -> Response:
        from .dashboard import overview

        self._discard_body(environ)
        return _json(200, overview(self.core.db, self.core.subscribers))

    def ui_runs(self, environ: dict[str, Any]) -> Response:
        from .dashboard import list_runs

        self._discard_body(environ)
        return _json(200, list_runs(self.core.db, environ.get("QUERY_STRING", "")))

    def ui_run(self, environ: dict[str, Any], run_id: str) -> Response:
        from .dashboard import run_details

        self._discard_body(environ)
        return _json(200, run_details(self.core.db, run_id))

    def retry(self, environ: dict[str, Any], run_id: str) -> Response:
        from .dashboard import retry_run

        self._optional_json_body(environ)
        return _json(201, retry_run(self.core, run_id))

    def subscribe(self, environ: dict[str, Any], handler: Callable[..., None] = handle_websocket) -> Response:
        if "websocket" not in environ.get("HTTP_UPGRADE", "").lower() or "werkzeug.socket" not in environ:
            self._discard_body(environ)
            return _error(426, "This endpoint is a websocket: connect with a websocket client "
                               "(subprotocol 'prefect')")
        environ[UPGRADED] = True
        handler(environ, self.core, self.registry, self.max_body_size)
        return "101 Switching Protocols", [], b""
