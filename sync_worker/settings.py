"""Settings read from the environment.

Every setting has a ``SYNC_WORKER_`` variable and, where Prefect has an equivalent, falls
back to the ``PREFECT_`` variable so that a Prefect user's environment just works.

:func:`get_settings` is called on every ``.delay()``, so it must cost next to nothing, and a
variable changed at run time (tests, scripts, ``monkeypatch.setenv``) must still count on the
next call. Both hold because the parsed :class:`Settings` are cached keyed on the *values of
the variables read* (:data:`VARIABLES`): each call looks those ~20 names up (one dict lookup
each in ``os.environ``'s own byte mapping) and parses again only when one of them changed. No
explicit invalidation is needed, and there is none to forget.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional
from urllib.parse import urlsplit

from sync_worker.exceptions import ConfigurationError

DEFAULT_API_URL = "http://127.0.0.1:4200/api"
DEFAULT_METRICS_PORT = 4201

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class SettingsError(ConfigurationError):
    """An environment variable holds a value that cannot be used (the message names it).

    A :class:`~sync_worker.exceptions.ConfigurationError`, hence also a ``ValueError``."""


def _lookup(env: Mapping[str, str], *names: str) -> tuple[Optional[str], Optional[str]]:
    for name in names:
        value = env.get(name)
        if value is not None:
            return name, value
    return None, None


def _str(env: Mapping[str, str], *names: str, default: Optional[str] = None) -> Optional[str]:
    _, value = _lookup(env, *names)
    return default if value is None or value == "" else value


def _bool(env: Mapping[str, str], *names: str, default: bool) -> bool:
    name, value = _lookup(env, *names)
    if value is None:
        return default
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise SettingsError(f"{name}={value!r} is not a boolean (use true/false, 1/0, yes/no, on/off)")


def _number(env: Mapping[str, str], *names: str, default: float, kind: type = float) -> float:
    name, value = _lookup(env, *names)
    if value is None or value.strip() == "":
        return default
    try:
        return kind(value)
    except ValueError:
        raise SettingsError(f"{name}={value!r} is not a {'whole number' if kind is int else 'number'}") from None


@dataclass(frozen=True)
class Settings:
    """A snapshot of the configuration.

    Attributes:
        api_url: base URL of the API, ending in ``/api``.
        auth_string: ``user:password`` sent as HTTP Basic auth (and as the websocket token).
        api_key: sent as a Bearer token (Prefect Cloud style); the auth string wins if both.
        storage: where parameter and result records live: a directory path, or
            ``server`` for the API's own storage endpoint (no shared disk needed). Falls
            back to Prefect's ``PREFECT_RESULTS_LOCAL_STORAGE_PATH`` so that sync_worker and
            Prefect clients on one machine share their records.
        allow_pickle: whether records written with the pickle serializer may be read.
            Off by default: unpickling data from a queue executes code.
        delete_failed_submissions: delete a run whose task is unknown or whose
            parameters cannot be read (Prefect's behaviour), instead of leaving it.
        request_timeout: seconds for one HTTP request to the API.
        client_metrics_enabled / client_metrics_port: the Prometheus client metrics
            server started by workers.
        drain_timeout: seconds a stopping worker waits for in-flight runs.
        submit_timeout: seconds ``.delay()`` keeps retrying a create through connection
            errors and 5xx answers (creates are idempotent by their run id) before it raises
            :class:`~sync_worker.exceptions.ServerUnavailable`.
        fast_path: use the embedded server's extensions when it offers them (states and
            creates over websockets, credit flow control); off, every call is Prefect's REST.
            The one switch of the transport: read through the :class:`~sync_worker.client.
            Client` made with these settings, by its rpc socket and by the subscription.
    """

    api_url: str = DEFAULT_API_URL
    auth_string: Optional[str] = None
    api_key: Optional[str] = None
    storage: str = str(Path.home() / ".sync_worker" / "storage")
    allow_pickle: bool = False
    delete_failed_submissions: bool = True
    request_timeout: float = 30.0
    client_metrics_enabled: bool = False
    client_metrics_port: int = DEFAULT_METRICS_PORT
    drain_timeout: float = 30.0
    submit_timeout: float = 10.0
    fast_path: bool = True

    @property
    def uses_server_storage(self) -> bool:
        return self.storage == "server"


#: Every environment variable :func:`get_settings` reads: the key of its cache.
VARIABLES = (
    "SYNC_WORKER_API_URL", "PREFECT_API_URL",
    "SYNC_WORKER_API_AUTH_STRING", "PREFECT_API_AUTH_STRING",
    "SYNC_WORKER_API_KEY", "PREFECT_API_KEY",
    "SYNC_WORKER_STORAGE", "PREFECT_RESULTS_LOCAL_STORAGE_PATH", "PREFECT_LOCAL_STORAGE_PATH",
    "SYNC_WORKER_ALLOW_PICKLE",
    "SYNC_WORKER_DELETE_FAILED_SUBMISSIONS", "PREFECT_TASKS_SCHEDULING_DELETE_FAILED_SUBMISSIONS",
    "SYNC_WORKER_REQUEST_TIMEOUT", "PREFECT_API_REQUEST_TIMEOUT",
    "SYNC_WORKER_CLIENT_METRICS_ENABLED", "PREFECT_CLIENT_METRICS_ENABLED",
    "SYNC_WORKER_CLIENT_METRICS_PORT", "PREFECT_CLIENT_METRICS_PORT",
    "SYNC_WORKER_DRAIN_TIMEOUT",
    "SYNC_WORKER_SUBMIT_TIMEOUT",
    "SYNC_WORKER_FAST_PATH",
)

_ENVIRON = os.environ
#: ``os.environ`` keeps its variables in a dict of encoded keys; looking the encoded names up
#: there directly costs ~1 µs for all of them (``os.environ.get`` encodes each name first).
_ENVIRON_DATA: Optional[dict] = getattr(os.environ, "_data", None)
_ENCODED = tuple(os.environ.encodekey(name) for name in VARIABLES) if hasattr(os.environ, "encodekey") else None
#: key -> settings; a few entries (os.environ, plus e.g. the Django backend's merged mappings),
#: emptied when it grows past :data:`_CACHE_SIZE`. Dict operations are atomic: no lock.
_cache: dict = {}
_CACHE_SIZE = 16


def _cache_key(env: Optional[Mapping[str, str]]) -> tuple:
    if env is None and os.environ is _ENVIRON and _ENVIRON_DATA is not None and _ENCODED is not None:
        return (True, *map(_ENVIRON_DATA.get, _ENCODED))
    source = os.environ if env is None else env
    return (False, *map(source.get, VARIABLES))


def get_settings(env: Optional[Mapping[str, str]] = None) -> Settings:
    """The settings from ``env`` (default: ``os.environ``).

    Cached on the values of :data:`VARIABLES`: calling it again is a few dozen lookups, and a
    changed variable is seen on the next call. Invalid values raise every time (errors are not
    cached)."""
    key = _cache_key(env)
    settings = _cache.get(key)
    if settings is None:
        settings = _read(os.environ if env is None else env)
        if len(_cache) >= _CACHE_SIZE:
            _cache.clear()
        _cache[key] = settings
    return settings


def _read(env: Mapping[str, str]) -> Settings:
    """Parse and check every setting (see :func:`get_settings`)."""
    defaults = Settings()
    return _checked(env, Settings(
        api_url=_str(env, "SYNC_WORKER_API_URL", "PREFECT_API_URL", default=defaults.api_url).rstrip("/"),
        auth_string=_str(env, "SYNC_WORKER_API_AUTH_STRING", "PREFECT_API_AUTH_STRING"),
        api_key=_str(env, "SYNC_WORKER_API_KEY", "PREFECT_API_KEY"),
        storage=_str(env, "SYNC_WORKER_STORAGE", "PREFECT_RESULTS_LOCAL_STORAGE_PATH", "PREFECT_LOCAL_STORAGE_PATH",
                     default=defaults.storage),
        allow_pickle=_bool(env, "SYNC_WORKER_ALLOW_PICKLE", default=defaults.allow_pickle),
        delete_failed_submissions=_bool(
            env,
            "SYNC_WORKER_DELETE_FAILED_SUBMISSIONS",
            "PREFECT_TASKS_SCHEDULING_DELETE_FAILED_SUBMISSIONS",
            default=defaults.delete_failed_submissions,
        ),
        request_timeout=_number(env, "SYNC_WORKER_REQUEST_TIMEOUT", "PREFECT_API_REQUEST_TIMEOUT", default=defaults.request_timeout),
        client_metrics_enabled=_bool(
            env,
            "SYNC_WORKER_CLIENT_METRICS_ENABLED",
            "PREFECT_CLIENT_METRICS_ENABLED",
            default=defaults.client_metrics_enabled,
        ),
        client_metrics_port=int(
            _number(
                env,
                "SYNC_WORKER_CLIENT_METRICS_PORT",
                "PREFECT_CLIENT_METRICS_PORT",
                default=defaults.client_metrics_port,
                kind=int,
            )
        ),
        drain_timeout=_number(env, "SYNC_WORKER_DRAIN_TIMEOUT", default=defaults.drain_timeout),
        submit_timeout=_number(env, "SYNC_WORKER_SUBMIT_TIMEOUT", default=defaults.submit_timeout),
        fast_path=_bool(env, "SYNC_WORKER_FAST_PATH", default=defaults.fast_path),
    ))


def api_url_problem(url: str) -> Optional[str]:
    """What is wrong with an API URL (None: nothing), said after the URL itself."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0-65535
    except ValueError as exc:  # "[::1" (an IPv6 address not closed), ":99999", ":abc"
        return f"is not a valid URL ({exc}); for example http://127.0.0.1:4200/api"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "is not an http(s) URL (for example http://127.0.0.1:4200/api)"
    return None


def _checked(env: Mapping[str, str], settings: Settings) -> Settings:
    """What parsing alone lets through: a URL without a scheme, a negative timeout, a port
    past 65535. Only values read from the environment can fail (the defaults are valid), and
    the error names the variable the value came from."""

    def refuse(names: tuple[str, ...], why: str) -> None:
        name, value = _lookup(env, *names)
        raise SettingsError(f"{name}={value!r} {why}")

    problem = api_url_problem(settings.api_url)
    if problem:
        refuse(("SYNC_WORKER_API_URL", "PREFECT_API_URL"), problem)
    if not (math.isfinite(settings.request_timeout) and settings.request_timeout > 0):
        refuse(("SYNC_WORKER_REQUEST_TIMEOUT", "PREFECT_API_REQUEST_TIMEOUT"), "must be a number of seconds > 0")
    if not (math.isfinite(settings.drain_timeout) and settings.drain_timeout >= 0):
        refuse(("SYNC_WORKER_DRAIN_TIMEOUT",), "must be a number of seconds >= 0")
    if not (math.isfinite(settings.submit_timeout) and settings.submit_timeout > 0):
        refuse(("SYNC_WORKER_SUBMIT_TIMEOUT",), "must be a number of seconds > 0")
    if not 0 <= settings.client_metrics_port <= 65535:
        refuse(("SYNC_WORKER_CLIENT_METRICS_PORT", "PREFECT_CLIENT_METRICS_PORT"), "is not a port (0-65535)")
    return settings
