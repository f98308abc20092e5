"""sync_worker: background tasks for synchronous Python."""

__version__ = "0.1.0"
