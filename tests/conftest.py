"""Shared fixtures: real embedded servers on 127.0.0.1, port 0, with a tmp_path database.

- ``server``: a started :class:`sync_worker.server.Server`, stopped after the test.
- ``server_factory(**kwargs)``: makes and starts servers (default: port 0 and a database
  file in tmp_path unless ``database=`` is given), stops every one it made at teardown.
  Pass the same ``database=`` path to restart on the same file.
"""
from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    from sync_worker.server import Server

    made: list[Any] = []

    def make(**kwargs: Any) -> Any:
        kwargs.setdefault("host", "127.0.0.1")
        kwargs.setdefault("port", 0)
        kwargs.setdefault("database", str(tmp_path / "server.db"))
        server = Server(**kwargs)
        made.append(server)
        return server.start()

    yield make
    for server in reversed(made):
        server.stop()


@pytest.fixture
def server(server_factory: Callable[..., Any]) -> Any:
    return server_factory()


def pytest_configure(config: pytest.Config) -> None:
    """Run with Ctrl-C as a terminal gives it, whatever started the suite.

    A non-interactive shell starts background commands (``cmd &``) with SIGINT ignored, and
    an ignored signal stays ignored across exec: the worker processes the Ctrl-C tests spawn
    would never see their SIGINT (Python installs no KeyboardInterrupt handler then). The
    worker itself keeps respecting an ignored SIGINT; only the suite resets it.
    """
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    config.addinivalue_line("markers", "slow: takes more than a minute (deselect with -m 'not slow')")
