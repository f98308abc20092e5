"""The embedded task-run server (HTTP + websocket + SQLite + orchestration).

``from sync_worker.server import Server``. Werkzeug and simple-websocket are imported only
when :class:`Server` is first used, so that importing this package stays cheap.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .server import Server

__all__ = ["Server"]


def __getattr__(name: str) -> Any:
    if name == "Server":
        from .server import Server

        return Server
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
