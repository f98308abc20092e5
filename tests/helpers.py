"""Helpers every test module may import (``from tests.helpers import wait_for``).

One place for them so that a fix to one (a bound, a message) reaches every test.
"""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any, Callable

#: Captures of a real Prefect 3.8.8 server's wire protocol, kept in the repository so that
#: no test depends on files outside it.
PROTOCOL_DIR = Path(__file__).resolve().parent / "fixtures" / "prefect-protocol"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers that must be told a port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, message: str = "condition",
             interval: float = 0.02) -> Any:
    """Poll ``condition`` until it returns something truthy (returned) or ``timeout`` seconds
    pass (AssertionError naming ``message``). Bounds are generous: the machine is shared."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def load_capture(name: str) -> Any:
    """One captured Prefect protocol message or body (``tests/fixtures/prefect-protocol``)."""
    with open(PROTOCOL_DIR / name) as handle:
        return json.load(handle)


def drop_events(monkeypatch: Any, drop: Callable[[dict], bool]) -> None:
    """Make ``Client.emit_events`` lose the events for which ``drop(event)`` is true (as an
    event intake without acknowledgement may) and pass the others on."""
    from sync_worker.client import Client

    original = Client.emit_events

    def emit(self: Client, events: list) -> None:
        kept = [event for event in events if not drop(event)]
        if kept:
            original(self, kept)

    monkeypatch.setattr(Client, "emit_events", emit)
