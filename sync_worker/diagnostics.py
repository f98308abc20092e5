"""Turning the low-level symptom of a common configuration slip into an error that says
what to change.

Kept apart from the client and the worker so each of them calls it from exactly one place
(the error mapping, the status server's bind): the checks here run only after something
already failed, so they cost nothing on the normal path.
"""
from __future__ import annotations

import errno
import logging
import os
from collections.abc import Mapping
from urllib.parse import urlsplit

import requests

from sync_worker.exceptions import ConfigurationError, PortUnavailable

logger = logging.getLogger("sync_worker.diagnostics")


class APIURLError(ConfigurationError):
    """The API URL points at a server, but not at its API (most often: ``/api`` missing).

    Raised instead of the 404 the URL produced; the message names the setting and the value
    to set.
    """


def _setting_name(api_url: str) -> tuple[str, str]:
    """(how to call the URL in the message, the variable to set)."""
    for name in ("SYNC_WORKER_API_URL", "PREFECT_API_URL"):
        if os.environ.get(name, "").rstrip("/") == api_url:
            return name, name
    return "the API URL", "SYNC_WORKER_API_URL"


def api_url_error(api_url: str, headers: Mapping[str, str] | None = None, timeout: float = 2.0) -> APIURLError | None:
    """Call this when the server at ``api_url`` answered 404 for an API path.

    Returns an :class:`APIURLError` when ``api_url`` does not end in ``/api`` and
    ``<api_url>/api/health`` answers ``true`` (a healthy sync_worker or Prefect server is
    there: the URL lacks its ``/api``); None otherwise (the 404 stands as it is). One
    ``GET`` with a short timeout, only on this error path.
    """
    api_url = api_url.rstrip("/")
    if urlsplit(api_url).path.endswith("/api"):
        return None
    candidate = f"{api_url}/api"
    try:
        response = requests.get(f"{candidate}/health", headers=dict(headers or {}), timeout=timeout)
        healthy = response.status_code == 200 and response.json() is True
    except (requests.RequestException, ValueError):
        return None
    if not healthy:
        return None
    label, variable = _setting_name(api_url)
    return APIURLError(
        f"{label} is {api_url}, which lacks /api: the server there answers 404 for the task-run API "
        f"but is healthy at {candidate}/health; set {variable}={candidate}"
    )


def port_unavailable(what: str, option: str, host: str, port: int, exc: BaseException) -> PortUnavailable:
    """The error for a listening socket that could not be opened on ``host:port``.

    ``what`` names the server (``status server``), ``option`` the setting or option that
    chose the port (``--status-port / status_server_port``).
    """
    code = getattr(exc, "errno", None)
    if isinstance(exc, OverflowError) or not 0 <= port <= 65535:
        code, message = errno.EINVAL, f"{what} port {port} ({option}) is not a port: use 0-65535 (0 = any free port)"
    elif code == errno.EADDRINUSE:
        message = f"{what} port {port} ({option}) is in use on {host}: choose another port, or 0 for any free port"
    elif code == errno.EACCES:
        message = f"{what} port {port} ({option}) on {host} needs privileges: use a port >= 1024"
    else:
        message = f"{what} cannot listen on {host}:{port} ({option}): {getattr(exc, 'strerror', None) or exc}"
    error = PortUnavailable(message)
    error.errno = code
    return error
