"""Helpers every test module may import (``from tests.helpers import wait_for``).

One place for them so that a fix to one (a bound, a message) reaches every test.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
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


def record_events(monkeypatch: Any) -> list[dict]:
    """Every event our client POSTs from now on (passed on to the server unchanged)."""
    from sync_worker.client import Client

    posted: list[dict] = []
    original = Client.emit_events

    def emitting(self: Any, events: list[dict], *args: Any, **kwargs: Any) -> Any:
        posted.extend(events)
        return original(self, events, *args, **kwargs)

    monkeypatch.setattr(Client, "emit_events", emitting)
    return posted


def drop_events(monkeypatch: Any, drop: Callable[[dict], bool]) -> None:
    """Make ``Client.emit_events`` lose the events for which ``drop(event)`` is true (as an
    event intake without acknowledgement may) and pass the others on."""
    from sync_worker.client import Client

    original = Client.emit_events

    def emit(self: Client, events: list, *args: Any, **kwargs: Any) -> None:
        kept = [event for event in events if not drop(event)]
        if kept:
            original(self, kept, *args, **kwargs)

    monkeypatch.setattr(Client, "emit_events", emit)


class Relay:
    """A TCP relay on 127.0.0.1 in front of ``port``, for network faults a real link has:
    :meth:`hold` stops forwarding in both directions while every connection stays open (a
    partition, a blackholed route: nothing is refused, nothing arrives), :meth:`release`
    forwards again. ``url`` is the API URL through it."""

    def __init__(self, port: int) -> None:
        import threading

        self._target = port
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = False
        self._sockets: list[socket.socket] = []
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/api"
        threading.Thread(target=self._accept, name="test-relay", daemon=True).start()

    def hold(self) -> None:
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    def _accept(self) -> None:
        import threading

        while not self._closed:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self._target))
            self._sockets += [downstream, upstream]
            for source, sink in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            if not data:
                for sock in (source, sink):
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                return
            while not self._flowing.wait(0.1):  # held: the bytes wait here, as on a dead route
                if self._closed:
                    return
            try:
                sink.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self._closed = True
        self._flowing.set()
        self._listener.close()
        for sock in self._sockets:
            try:
                sock.close()
            except OSError:
                pass


def clean_env(tmp_path: Any, **extra: str) -> dict[str, str]:
    """This environment without sync_worker/Prefect settings, a private store, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNC_WORKER_", "PREFECT_"))}
    env["SYNC_WORKER_STORAGE"] = str(tmp_path / "store")
    env.update(extra)
    return env


def server_log_until(env: dict[str, str], args: list[str], marker: str,
                     timeout: float = 30) -> tuple[list[str], int]:
    """Start ``python -m sync_worker server ARGS``, read its log until a line holds
    ``marker`` (at most ``timeout`` s), stop it with SIGTERM; the lines read and its exit code."""
    import signal
    import threading

    process = subprocess.Popen([sys.executable, "-m", "sync_worker", "server", *args], stderr=subprocess.PIPE,
                               text=True, env=env)
    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        for text in process.stderr:
            lines.append(text)
            if marker in text:
                found.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert found.wait(timeout), "".join(lines)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    return lines, process.returncode


def run_env(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``python -m sync_worker ARGS`` in ``env``, its output captured."""
    return subprocess.run([sys.executable, "-m", "sync_worker", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
