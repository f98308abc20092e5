"""The errors sync_worker raises, so callers can catch them by meaning."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from sync_worker._api_errors import APIError, ObjectNotFound, Unauthorized  # noqa: F401

#: subclasses of ``requests.HTTPError``, defined in :mod:`sync_worker._api_errors` and loaded on
#: first use, so that importing this module does not import requests (the server imports it)
_API_ERRORS = ("APIError", "ObjectNotFound", "Unauthorized")


def __getattr__(name: str) -> Any:
    if name in _API_ERRORS:
        from sync_worker import _api_errors

        for other in _API_ERRORS:
            globals()[other] = getattr(_api_errors, other)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API_ERRORS))


class SyncWorkerError(Exception):
    """Base class for sync_worker's own errors."""


class SerializationError(SyncWorkerError, ValueError):
    """A value could not be serialized (parameters at submit time, or a result)."""


class ParameterReadError(SyncWorkerError):
    """A task run's parameters could not be read; the run cannot be executed."""


class TaskRunFailed(SyncWorkerError):
    """The task run ended in a failed state; the message is the server's state message."""

    def __init__(self, message: str, *, state: Any = None, exception_type: Optional[str] = None, traceback: Optional[str] = None):
        super().__init__(message)
        self.state = state
        self.exception_type = exception_type
        self.traceback = traceback

    def __str__(self) -> str:
        text = super().__str__()
        if self.traceback:
            text += "\n\nRemote traceback:\n" + self.traceback
        return text


class ServerUnavailable(SyncWorkerError, ConnectionError):
    """The API could not be reached (connection errors, 5xx) for as long as the caller
    was willing to retry (``SYNC_WORKER_SUBMIT_TIMEOUT`` for submits). A
    ``ConnectionError`` too, so code that forgives network errors treats it as one.

    ``task_run_id``: for a submit, the id the run was created under if one of the
    attempts reached the server before it stopped answering (else None). Look it up before
    submitting again (``TaskRunFuture(exc.task_run_id).state``, ``sync-worker runs show``):
    a new ``.delay()`` is a new run."""

    def __init__(self, message: str, task_run_id: str | None = None) -> None:
        super().__init__(message)
        self.task_run_id = task_run_id


class CredentialsError(SyncWorkerError):
    """The server refused our credentials: retrying will not help."""


class ConfigurationError(SyncWorkerError, ValueError):
    """A setting, option or argument holds a value that cannot be used.

    The message names the setting (``SYNC_WORKER_...``), the option (``--status-port``) or
    the argument (``status_server_port``) and says what to do; the ``sync-worker`` command
    prints it as one line and exits 2. A ``ValueError`` so existing ``except ValueError``
    code keeps working.
    """


class PortUnavailable(ConfigurationError, OSError):
    """A port we were asked to listen on is out of range or already in use.

    Also an ``OSError``, which is what binding a socket raised before this class existed.
    """


class TaskRunCancelled(TaskRunFailed):
    """The task run was cancelled (``future.cancel()``, ``sync-worker runs cancel``): it has no
    result. A subclass of :class:`TaskRunFailed` so that code handling "the run produced no
    result" handles this too; catch it first to tell the two apart."""


class Cancelled(BaseException):
    """Raised inside a task's thread when its run is cancelled while RUNNING.

    A BaseException (like KeyboardInterrupt) so that a task's ``except Exception`` does not
    swallow it. It is raised the way ``timeout_seconds`` interrupts a task
    (:mod:`sync_worker.timeouts`): promptly in Python code, only when a blocking C call
    returns, and never if the task catches it."""
