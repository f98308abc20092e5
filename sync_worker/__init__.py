"""sync_worker: background tasks for synchronous Python.

A synchronous, thread-based implementation of Prefect 3's background task system::

    from sync_worker import task, serve

    @task
    def add(x, y):
        return x + y

    future = add.delay(1, 2)      # in your web app or script
    serve(add)                    # in a worker process
    future.result(timeout=10)     # -> 3

The names below are imported on first use, so ``import sync_worker`` stays cheap for a
WSGI app that only needs one of them.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "task": "sync_worker.tasks",
    "Task": "sync_worker.tasks",
    "TaskRunFuture": "sync_worker.tasks",
    "exponential_backoff": "sync_worker.tasks",
    "TaskWorker": "sync_worker.worker",
    "StopTaskWorker": "sync_worker.worker",
    "serve": "sync_worker.worker",
    "should_try_to_read_parameters": "sync_worker.worker",
    "critical_service_loop": "sync_worker.services",
    "start_client_metrics_server": "sync_worker.services",
    "stop_client_metrics_server": "sync_worker.services",
    "Client": "sync_worker.client",
    "get_client": "sync_worker.client",
    "get_settings": "sync_worker.settings",
    "Settings": "sync_worker.settings",
    "SyncWorkerError": "sync_worker.exceptions",
    "APIError": "sync_worker.exceptions",
    "ObjectNotFound": "sync_worker.exceptions",
    "Unauthorized": "sync_worker.exceptions",
    "SerializationError": "sync_worker.exceptions",
    "ParameterReadError": "sync_worker.exceptions",
    "TaskRunFailed": "sync_worker.exceptions",
    "CredentialsError": "sync_worker.exceptions",
    "ConfigurationError": "sync_worker.exceptions",
    "PortUnavailable": "sync_worker.exceptions",
    "TaskRunCancelled": "sync_worker.exceptions",
    "Cancelled": "sync_worker.exceptions",
    "ServerUnavailable": "sync_worker.exceptions",
}

__all__ = [
    "APIError",
    "Cancelled",
    "Client",
    "ConfigurationError",
    "CredentialsError",
    "ObjectNotFound",
    "ParameterReadError",
    "PortUnavailable",
    "SerializationError",
    "ServerUnavailable",
    "Settings",
    "StopTaskWorker",
    "SyncWorkerError",
    "Task",
    "TaskRunCancelled",
    "TaskRunFailed",
    "TaskRunFuture",
    "TaskWorker",
    "Unauthorized",
    "critical_service_loop",
    "exponential_backoff",
    "get_client",
    "get_settings",
    "serve",
    "should_try_to_read_parameters",
    "start_client_metrics_server",
    "stop_client_metrics_server",
    "task",
]


assert sorted(__all__) == sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sync_worker' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from sync_worker.client import Client, get_client
    from sync_worker.exceptions import (
        APIError,
        ConfigurationError,
        Cancelled,
        CredentialsError,
        ObjectNotFound,
        ParameterReadError,
        PortUnavailable,
        SerializationError,
        SyncWorkerError,
        TaskRunCancelled,
        TaskRunFailed,
        Unauthorized,
    )
    from sync_worker.services import critical_service_loop, start_client_metrics_server, stop_client_metrics_server
    from sync_worker.settings import Settings, get_settings
    from sync_worker.tasks import Task, TaskRunFuture, exponential_backoff, task
    from sync_worker.worker import StopTaskWorker, TaskWorker, serve, should_try_to_read_parameters
