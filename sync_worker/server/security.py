"""Keeping browsers from driving the server: ``Host``, ``Origin`` and ``Content-Type`` checks.

Why: a server on 127.0.0.1 is reachable by every web page the user opens. A page cannot read
the answers of a cross-origin request, but it can *send* one: a ``text/plain`` POST creates a
run, a websocket to ``ws://127.0.0.1:4200`` from ``http://evil.example`` subscribes, and a page
on a name that the attacker re-points at 127.0.0.1 (DNS rebinding) is even same-origin. So,
before any endpoint runs (REST and both websockets):

- ``Host`` must name this server: ``localhost``, an IP address (a page can only reach an
  address through a name it controls, and then ``Host`` is that name), the address the server
  is bound to, the machine's hostname when bound to a non-loopback address, or a name given
  with ``--allowed-host`` (``*`` turns the check off). A request without ``Host`` (HTTP/1.0
  tools) passes: browsers always send one.
- ``Origin``, when present, must be this server itself (what websocket-client sends by
  default: ``http://<the Host it connects to>``) or one given with ``--allowed-origin``
  (``*`` allows any). Non-browser clients (requests, httpx, Prefect's client) send none.
- a POST with a body must say ``Content-Type: application/json``: the content types a page
  may send without a CORS preflight (``text/plain``, forms) are refused even from browsers
  too old to send ``Origin``.

Refusals are 403 (Host, Origin) and 415 (Content-Type) with a JSON ``detail`` naming the
header, the value and the option that would allow it; the connection is closed (the body is
not read).
"""
from __future__ import annotations

import ipaddress
import json
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Any

from .app import CLOSE

logger = logging.getLogger("sync_worker.server.security")

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::"})

_PHRASES = {403: "403 Forbidden", 415: "415 Unsupported Media Type"}


def _split_host(value: str) -> str:
    """``Host`` header value -> lowercase host name without port or IPv6 brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else value
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _normalize_origin(value: str) -> str:
    return value.strip().rstrip("/").lower()


class RequestGuard:
    """WSGI middleware in front of :class:`app.App` (see the module docstring)."""

    def __init__(self, app: Callable[..., Iterable[bytes]], bind_host: str,
                 allowed_hosts: Iterable[str] = (), allowed_origins: Iterable[str] = ()) -> None:
        self.app = app
        hosts = {_split_host(h) for h in allowed_hosts if h.strip()}
        self.any_host = "*" in hosts
        bound = _split_host(bind_host) if bind_host else ""
        if bound and bound not in WILDCARD_BINDS:
            hosts.add(bound)
        if bound in WILDCARD_BINDS or not _is_loopback(bound):
            try:
                hosts.add(socket.gethostname().lower())
            except OSError:  # pragma: no cover
                pass
        self.hosts = frozenset(hosts | LOOPBACK_NAMES)
        origins = {_normalize_origin(o) for o in allowed_origins if o.strip()}
        self.any_origin = "*" in origins
        self.origins = frozenset(origins)

    def __getattr__(self, name: str) -> Any:  # the wrapped App's attributes (core, registry, ...)
        return getattr(self.app, name)

    def host_allowed(self, host: str) -> bool:
        if self.any_host:
            return True
        name = _split_host(host)
        return name in self.hosts or _is_ip(name)

    def origin_allowed(self, origin: str, host: str | None) -> bool:
        if self.any_origin:
            return True
        normalized = _normalize_origin(origin)
        if normalized in self.origins:
            return True
        if host and normalized in (f"http://{host.strip().lower()}", f"https://{host.strip().lower()}"):
            return True  # this server itself (websocket-client's default Origin)
        return False

    def check(self, environ: dict[str, Any]) -> tuple[int, str] | None:
        """(status, detail) of a refusal, or None."""
        host = environ.get("HTTP_HOST")
        if host is not None and not self.host_allowed(host):
            return 403, (f"Forbidden: Host {host[:200]!r} is not a name of this server (a web page may be "
                         f"trying to reach it through DNS rebinding); to serve it under this name, start "
                         f"it with --allowed-host {_split_host(host)[:200]}")
        origin = environ.get("HTTP_ORIGIN")
        if origin is not None and not self.origin_allowed(origin, host):
            return 403, (f"Forbidden: cross-origin request from Origin {origin[:200]!r} (web pages may "
                         f"not drive this server); to allow this origin, start it with --allowed-origin "
                         f"{origin.strip()[:200]}")
        if environ.get("REQUEST_METHOD") == "POST" and _has_body(environ):
            media = (environ.get("CONTENT_TYPE") or "").split(";", 1)[0].strip().lower()
            if media != "application/json":
                return 415, (f"Unsupported Content-Type {environ.get('CONTENT_TYPE', '')[:100]!r}: "
                             "POST bodies must be sent with 'Content-Type: application/json'")
        return None

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        refusal = self.check(environ)
        if refusal is None:
            return self.app(environ, start_response)
        status, detail = refusal
        logger.warning("refused %s %s from %s: %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"),
                       environ.get("REMOTE_ADDR"), detail)
        environ[CLOSE] = True  # the body (if any) is not read: this connection cannot be reused
        body = json.dumps({"detail": detail}).encode()
        start_response(_PHRASES[status], [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                                          ("Connection", "close")])
        return [body]


def _has_body(environ: dict[str, Any]) -> bool:
    if environ.get("wsgi.input_terminated"):
        return True
    try:
        return int(environ.get("CONTENT_LENGTH") or 0) > 0
    except ValueError:
        return False  # the app answers 400 for a bad Content-Length


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
