"""Long-running service helpers: ``critical_service_loop`` and the client metrics server.

A synchronous, thread-based counterpart of ``prefect.utilities.services``: same names,
parameters, defaults and printer messages, so a Prefect user recognises them, but the
workload is a plain callable and the sleeps block the calling thread.

Import cost matters here (workers import this module at start-up): only tenacity is
imported eagerly. requests and websocket-client are never imported by this module
(see :func:`is_intermittent`), and prometheus-client only when a metric is first
touched or the metrics server is started.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import math
import os
import random
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from traceback import format_exception
from types import TracebackType
from typing import TYPE_CHECKING, Any

import tenacity
from tenacity.wait import wait_base

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

__all__ = [
    "ClientMetricsPortInUse",
    "clamped_poisson_interval",
    "critical_service_loop",
    "is_intermittent",
    "start_client_metrics_server",
    "stop_client_metrics_server",
    "wait_clamped_poisson",
]

logger = logging.getLogger("sync_worker.services")


# --------------------------------------------------------------------------------------
# What counts as an intermittent error
# --------------------------------------------------------------------------------------

#: OS-level network failures: a peer that went away or did not answer in time.
_OS_NETWORK_ERRORS = (ConnectionError, socket.timeout, TimeoutError)


def _status_code(exc: BaseException) -> int | None:
    """The HTTP status carried by ``exc`` (its response's, else its own attribute)."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if status is None:
        status = getattr(exc, "status_code", None)
    return status if isinstance(status, int) else None


def loaded_module(name: str) -> Any:
    """The module ``name`` if something imported it already, else None (not imported here).

    A module another thread is still importing is in ``sys.modules`` half made (without the
    names its import has not reached yet): ``import_module`` then waits for that import to
    finish instead of handing it out (a worker whose first REST fallback imported requests
    while its service thread classified an error died of "partially initialized module").
    For a module already loaded it is a dictionary lookup."""
    if name not in sys.modules:
        return None
    return importlib.import_module(name)


#: 5xx answers that are not outages: 501 Not Implemented and 505 HTTP Version Not Supported
#: come from a web server that is not an API server, and come again on every retry.
PERMANENT_5XX = frozenset({501, 505})


def is_intermittent_status(status: int | None) -> bool:
    """Whether an HTTP answer with this status is worth asking again: a 5xx outage."""
    return status is not None and status >= 500 and status not in PERMANENT_5XX


def is_intermittent(exc: BaseException) -> bool:
    """Whether ``exc`` is the kind of failure that is worth retrying later.

    Intermittent: network trouble and server-side outages that usually pass —
    requests' ``ConnectionError``, ``Timeout``, ``ChunkedEncodingError`` and
    ``ContentDecodingError`` (an answer broken off or garbled in transit); an HTTP 5xx (``requests.HTTPError``,
    hence also :class:`sync_worker.exceptions.APIError`, with status >= 500);
    websocket-client's connection-closed, timeout and address errors and a handshake
    refused with a 5xx status; and the OS-level ``ConnectionError`` family
    (refused, reset, aborted, broken pipe) and socket timeouts.

    Everything else is not: a 4xx (including a websocket handshake answered 401/403)
    means our request or credentials are wrong and retrying cannot fix it; a 501 or 505
    (:data:`PERMANENT_5XX`) means some other web server answers at that URL, and asking
    again will not change its answer; any other exception is a bug or a deliberate
    control-flow signal.

    requests and websocket-client are looked up in ``sys.modules`` instead of being
    imported: an exception can only be an instance of their classes if they are already
    loaded, so this costs no import time for code that uses neither.
    """
    requests = loaded_module("requests")
    if requests is not None:
        if isinstance(exc, requests.HTTPError):
            return is_intermittent_status(_status_code(exc))
        # ChunkedEncodingError and ContentDecodingError: the answer broke off or came garbled
        # in transit (httpx's RemoteProtocolError and DecodingError, which Prefect forgives)
        if isinstance(exc, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                            requests.exceptions.ContentDecodingError)):
            return True

    ws_exceptions = loaded_module("websocket._exceptions")
    if ws_exceptions is not None:
        if isinstance(exc, ws_exceptions.WebSocketBadStatusException):
            return is_intermittent_status(_status_code(exc))
        if isinstance(
            exc,
            (
                ws_exceptions.WebSocketConnectionClosedException,
                ws_exceptions.WebSocketTimeoutException,
                ws_exceptions.WebSocketAddressException,
            ),
        ):
            return True

    return isinstance(exc, _OS_NETWORK_ERRORS)


# --------------------------------------------------------------------------------------
# Waits (tenacity strategies)
# --------------------------------------------------------------------------------------


class wait_until_deadline(wait_base):
    """Tenacity wait: ``wait``'s sleep, but none past ``deadline`` (``time.monotonic()``; None:
    no deadline), so that the last attempt is made at the deadline, not a backoff after it."""

    def __init__(self, wait: wait_base, deadline: float | None) -> None:
        self.wait = wait
        self.deadline = deadline

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        sleep = self.wait(retry_state)
        if self.deadline is None:
            return sleep
        return min(sleep, max(0.0, self.deadline - time.monotonic()))


class wait_clamped_poisson(wait_base):
    """Tenacity wait: a Poisson inter-arrival time around another wait's value.

    Many workers started at the same moment with the same interval poll in lock-step;
    drawing each sleep from an exponential distribution (the gaps of a Poisson process)
    spreads them out. The draw is clamped so a sleep is never absurdly short or long:
    with mean ``m`` and ``k = 1 + clamping_factor`` it lies in ``[c*m, k*m)`` where
    ``c = -log2(1 - 2**-k)`` puts as much probability mass between the lower bound and
    the median as between the median and the upper bound (Prefect's choice). ``c`` is
    always above ``1 - clamping_factor``, so ``m*(1-r) < sleep < m*(1+r)`` holds, and the
    mean of the clamped draw stays within about 1% of ``m`` for ``r <= 1``.

    Args:
        mean: the average interval: a number or another tenacity wait (evaluated with
            the same retry state), e.g. ``wait_exponential`` so the backed-off interval
            is jittered too.
        clamping_factor: ``r`` above; must be > 0.
        rng: the random source (a seeded ``random.Random`` makes draws reproducible).
    """

    def __init__(
        self,
        mean: wait_base | float = 1.0,
        clamping_factor: float = 0.3,
        rng: random.Random | None = None,
    ) -> None:
        if not clamping_factor > 0:
            raise ValueError(f"clamping_factor (jitter_range) must be > 0, got {clamping_factor!r}")
        self.mean = mean
        self.clamping_factor = clamping_factor
        self.rng = rng if rng is not None else random.Random()

    def bounds(self, mean: float) -> tuple[float, float]:
        """The ``(lower, upper)`` bounds of a draw around ``mean``."""
        k = 1.0 + self.clamping_factor
        lower_multiple = -math.log1p(-(2.0**-k)) / math.log(2.0)
        return mean * lower_multiple, mean * k

    def draw(self, mean: float) -> float:
        """One clamped exponential draw with the given mean (0 for a mean <= 0)."""
        if mean <= 0:
            return 0.0
        lower, upper = self.bounds(mean)
        # Inverse CDF of the exponential distribution restricted to [lower, upper):
        # draw the survival probability uniformly in (S(upper), S(lower)].
        s_lower, s_upper = math.exp(-lower / mean), math.exp(-upper / mean)
        survival = s_lower - (s_lower - s_upper) * self.rng.random()
        return -mean * math.log(survival)

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        mean = self.mean(retry_state) if callable(self.mean) else float(self.mean)
        return self.draw(mean)


def clamped_poisson_interval(
    average_interval: float, clamping_factor: float = 0.3, *, rng: random.Random | None = None
) -> float:
    """One draw of :class:`wait_clamped_poisson` (same name and arguments as Prefect's)."""
    return wait_clamped_poisson(clamping_factor=clamping_factor, rng=rng).draw(average_interval)


def _no_retrying() -> tenacity.Retrying:
    # RetryCallState wants its manager; we only use the state to feed wait strategies.
    return tenacity.Retrying(stop=tenacity.stop_after_attempt(1), reraise=True)


# --------------------------------------------------------------------------------------
# critical_service_loop
# --------------------------------------------------------------------------------------


def _count_error(exc: BaseException) -> None:
    # Imported on first error only: prometheus-client costs ~75 ms to import.
    from sync_worker.metrics import SERVICE_LOOP_ERRORS

    SERVICE_LOOP_ERRORS.labels(exception=type(exc).__name__).inc()


def critical_service_loop(
    workload: Callable[[], Any],
    interval: float,
    memory: int = 10,
    consecutive: int = 3,
    backoff: int = 1,
    printer: Callable[..., None] = print,
    run_once: bool = False,
    jitter_range: float | None = None,
    *,
    stop_event: threading.Event | None = None,
    sleep: Callable[[float], None] | None = None,
) -> None:
    """Call ``workload`` every ``interval`` seconds, forgiving intermittent errors.

    A worker's service (its subscription) must survive a network blip or a server
    restart, but must not spin forever against a server that is gone. So: errors for
    which :func:`is_intermittent` is true are remembered (the last ``memory`` of them)
    and counted in ``sync_worker_service_loop_errors_total{exception}``; when the last
    ``consecutive`` calls all failed, a summary with one example traceback per exception
    type is printed through ``printer`` and the loop backs off: the interval doubles at
    each backoff (``interval * 2**n``, a tenacity ``wait_exponential``); a successful
    call resets the backoff (and says so through ``printer``). Reaching the consecutive
    error limit for the ``backoff``-th time raises
    ``RuntimeError("Service exceeded error threshold.")`` — with the default
    ``backoff=1`` the first time already does.

    Any other exception propagates at once: a 4xx, a bug, and control-flow exceptions
    such as ``StopTaskWorker`` (raise one from ``workload`` to end the loop).
    ``KeyboardInterrupt``/``SystemExit`` are never caught.

    Args:
        workload: the callable to call (no arguments); it blocks this thread.
        interval: seconds between calls.
        memory: how many recent errors to remember for the summary.
        consecutive: how many consecutive errors start a backoff.
        backoff: how many times the error limit may be reached before giving up.
        printer: a ``print``-like function for the summaries, called with one string
            each time; a logger method (``logger.warning``) works too.
        run_once: return after the first call (after handling its error, if any).
        jitter_range: if set, each sleep is drawn from a clamped Poisson distribution
            (:class:`wait_clamped_poisson`) whose mean is the current interval (backed
            off included, as in Prefect 3.8), bounded to
            ``mean*(1 - jitter_range) < sleep < mean*(1 + jitter_range)``. Must be > 0
            (checked before the first call).
        stop_event: when set, the loop returns before its next call, and at once if it is
            sleeping (the sleep is ``stop_event.wait(seconds)``). A running ``workload``
            is not interrupted.
        sleep: a replacement for the sleep (tests); when given it is used instead of
            waiting on ``stop_event``, which is then only checked between calls.
    """
    if inspect.iscoroutinefunction(workload) or inspect.iscoroutinefunction(type(workload).__call__):
        raise TypeError(f"{getattr(workload, '__qualname__', workload)!r} is a coroutine function: the service "
                        f"loop calls synchronous workloads (its call would only create a coroutine, never run it)")
    backoff_wait = tenacity.wait_exponential(multiplier=interval, exp_base=2)
    wait: wait_base = backoff_wait
    if jitter_range is not None:
        wait = wait_clamped_poisson(backoff_wait, clamping_factor=jitter_range)
    # attempt_number - 1 is the backoff count: wait_exponential gives interval * 2**count.
    wait_state = tenacity.RetryCallState(_no_retrying(), fn=workload, args=(), kwargs={})

    track_record: deque[bool] = deque([True] * consecutive, maxlen=consecutive)
    failures: deque[tuple[BaseException, TracebackType | None]] = deque(maxlen=memory)
    backoff_count = 0
    name = getattr(workload, "__name__", workload)

    while True:
        if stop_event is not None and stop_event.is_set():
            logger.debug("Stopping the service loop of %r: stop requested", name)
            return
        try:
            logger.debug("Starting run of %r", name)
            workload()
        except Exception as exc:
            if not is_intermittent(exc):
                raise
            track_record.append(False)
            failures.append((exc, exc.__traceback__))
            _count_error(exc)
            logger.debug("Run of %r failed with %s", name, type(exc).__name__, exc_info=exc)
        else:
            if backoff_count > 0:
                printer("Resetting backoff due to successful run.")
                backoff_count = 0
            track_record.append(True)

        if not any(track_record):
            printer(f"\nFailed the last {consecutive} attempts. Please check your environment and configuration.")
            printer("Examples of recent errors:\n")
            seen: set[type] = set()
            for error, tb in reversed(failures):  # the most recent example of each type
                if type(error) in seen:
                    continue
                seen.add(type(error))
                printer("".join(format_exception(type(error), error, tb)))
                printer("")  # Prefect calls printer(): same blank line, and logger methods accept it

            backoff_count += 1
            if backoff_count >= backoff:
                raise RuntimeError("Service exceeded error threshold.")

            track_record.extend([True] * consecutive)
            failures.clear()
            wait_state.attempt_number = backoff_count + 1
            printer(
                "Backing off due to consecutive errors, using increased interval of "
                f" {backoff_wait(wait_state)}s."
            )

        if run_once:
            return

        wait_state.attempt_number = backoff_count + 1
        seconds = wait(wait_state)
        if sleep is not None:
            sleep(seconds)
        elif stop_event is not None:
            if stop_event.wait(seconds):
                logger.debug("Stopping the service loop of %r: stop requested", name)
                return
        else:
            time.sleep(seconds)


# --------------------------------------------------------------------------------------
# Client metrics server
# --------------------------------------------------------------------------------------


class ClientMetricsPortInUse(OSError):
    """The client metrics port is taken by another process (or another server)."""


_metrics_lock = threading.Lock()
_metrics_server: tuple[WSGIServer, threading.Thread] | None = None


def start_client_metrics_server(*, addr: str | None = None) -> int | None:
    """Start the process-wide Prometheus ``/metrics`` server, if enabled.

    Enabled by ``SYNC_WORKER_CLIENT_METRICS_ENABLED`` (or Prefect's
    ``PREFECT_CLIENT_METRICS_ENABLED``), on port ``SYNC_WORKER_CLIENT_METRICS_PORT``
    (default 4201). It serves prometheus-client's default registry from a daemon
    thread. Calling it again while it runs does nothing (several workers in one process
    share it); it is safe from several threads.

    Args:
        addr: the address to bind; default ``SYNC_WORKER_CLIENT_METRICS_HOST`` or
            ``127.0.0.1`` (local only: the metrics name your task keys; Prefect binds
            ``0.0.0.0``). Set ``0.0.0.0`` for a Prometheus on another host.

    Returns:
        The port it listens on (useful with port 0), or None when disabled.

    Raises:
        ClientMetricsPortInUse: the port is taken; the message names the settings.
    """
    global _metrics_server
    from sync_worker.settings import get_settings

    if addr is None:
        addr = os.environ.get("SYNC_WORKER_CLIENT_METRICS_HOST") or "127.0.0.1"

    settings = get_settings()
    if not settings.client_metrics_enabled:
        return None
    with _metrics_lock:
        if _metrics_server is None:
            from prometheus_client import start_http_server

            port = settings.client_metrics_port
            try:
                _metrics_server = start_http_server(port=port, addr=addr)
            except OSError as exc:
                if not _is_addr_in_use(exc):
                    raise
                raise ClientMetricsPortInUse(
                    exc.errno,
                    f"client metrics port {port} is in use; set SYNC_WORKER_CLIENT_METRICS_PORT "
                    "to a free port or disable with SYNC_WORKER_CLIENT_METRICS_ENABLED=false",
                ) from exc
            # INFO, with the URL: with SYNC_WORKER_CLIENT_METRICS_PORT=0 this line is the only way to find the port
            host = f"[{addr}]" if ":" in addr else addr
            logger.info("Client metrics server on http://%s:%s/metrics", host, _metrics_server[0].server_port)
        return _metrics_server[0].server_port


def _is_addr_in_use(exc: OSError) -> bool:
    import errno

    return exc.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", errno.EADDRINUSE))


def stop_client_metrics_server() -> None:
    """Stop the client metrics server, if running: shut it down, join its thread and
    release the port (so it can be started again, e.g. by the next test)."""
    global _metrics_server
    with _metrics_lock:
        if _metrics_server is None:
            return
        server, thread = _metrics_server
        _metrics_server = None
        server.shutdown()
        thread.join()
        server.server_close()
