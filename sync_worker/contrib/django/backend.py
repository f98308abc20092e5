"""``SyncWorkerBackend``: Django's Tasks framework on a sync_worker server.

::

    TASKS = {
        "default": {
            "BACKEND": "sync_worker.contrib.django.SyncWorkerBackend",
            "QUEUES": ["default", "emails"],          # optional (Django's default: ["default"])
            "OPTIONS": {"API_URL": "http://127.0.0.1:4200/api", "STORAGE": "server"},
        }
    }

``enqueue()`` stores the call's arguments as a parameters record and creates a SCHEDULED
deferred run on the server (the same run ``@task.delay()`` creates; with ``"STORAGE":
"server"`` the create carries the record, as ``.delay()``'s does); the returned
``TaskResult``'s id is the run id. A worker started with ``manage.py sync_worker``
executes it. ``get_result(id)`` reads the run back and maps it to a ``TaskResult``.

Each (queue, task) pair is its own task key, ``django:<queue>:<module path>``: a worker
subscribes to the keys of the queues it serves, so ``--queue emails`` takes nothing else.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import re
from datetime import datetime
from datetime import timezone as dt_timezone
from typing import Any, Mapping

from django.conf import settings as django_settings
from django.core.exceptions import ImproperlyConfigured
from django.utils import timezone
from django.utils.module_loading import import_string

from sync_worker.contrib.django.compat import (
    BaseTaskBackend,
    InvalidTask,
    Task,
    TaskError,
    TaskResult,
    TaskResultDoesNotExist,
    TaskResultStatus,
    normalize_json,
    task_enqueued,
)
from sync_worker.exceptions import ConfigurationError, ObjectNotFound
from sync_worker.schemas import EmpiricalPolicy, Scheduled, StateType, TaskRun, task_run_create
from sync_worker.settings import Settings, SettingsError, get_settings

logger = logging.getLogger("sync_worker.contrib.django")

#: Task keys of Django tasks: ``django:<queue>:<module path>`` (a module path has no ":").
KEY_PREFIX = "django:"

#: OPTIONS keys and the environment variables they stand for. An option set in
#: ``TASKS[...]["OPTIONS"]`` wins over the environment; anything not set falls back to our
#: usual settings (``SYNC_WORKER_*``, then ``PREFECT_*``).
OPTION_VARIABLES = {
    "API_URL": "SYNC_WORKER_API_URL",
    "AUTH_STRING": "SYNC_WORKER_API_AUTH_STRING",
    "API_KEY": "SYNC_WORKER_API_KEY",
    "STORAGE": "SYNC_WORKER_STORAGE",
    "REQUEST_TIMEOUT": "SYNC_WORKER_REQUEST_TIMEOUT",
    "DRAIN_TIMEOUT": "SYNC_WORKER_DRAIN_TIMEOUT",
    "FAST_PATH": "SYNC_WORKER_FAST_PATH",
}

#: The worker id of a run's earlier attempts, which the server does not keep.
UNKNOWN_WORKER = "unknown"

#: ``to_task_result(envelope=...)`` not given: the result is read there (``None`` is a result)
_UNREAD: Any = object()

_STATUS = {
    StateType.SCHEDULED: TaskResultStatus.READY,
    StateType.PENDING: TaskResultStatus.READY,
    StateType.PAUSED: TaskResultStatus.READY,
    StateType.RUNNING: TaskResultStatus.RUNNING,
    StateType.COMPLETED: TaskResultStatus.SUCCESSFUL,
    StateType.FAILED: TaskResultStatus.FAILED,
    StateType.CRASHED: TaskResultStatus.FAILED,
    StateType.CANCELLED: TaskResultStatus.FAILED,
    StateType.CANCELLING: TaskResultStatus.RUNNING,  # still executing until its worker stops it
}

_CLAIM = re.compile(r"^(?:Running on|Claimed by) (\S+)")


def task_key(module_path: str, queue_name: str) -> str:
    """The sync_worker task key of a Django task on a queue."""
    return f"{KEY_PREFIX}{queue_name}:{module_path}"


def parse_task_key(key: str) -> tuple[str, str] | None:
    """``(module path, queue)`` of a Django task key; None for any other key."""
    if not key.startswith(KEY_PREFIX):
        return None
    queue, sep, module_path = key[len(KEY_PREFIX):].rpartition(":")
    if not sep or not module_path:
        return None
    return module_path, queue


class OptionsError(ImproperlyConfigured, ConfigurationError):
    """A ``TASKS[alias]["OPTIONS"]`` mistake: an unknown key, or a value that cannot be used.

    Django's ``ImproperlyConfigured``, and our ``ConfigurationError`` (a ``ValueError``), so
    the worker commands print it as one line and exit 2. The message names the setting."""


def settings_environment(options: Mapping[str, Any]) -> dict[str, str]:
    """The ``SYNC_WORKER_*`` variables that OPTIONS stand for; ValueError for unknown keys."""
    unknown = sorted(set(options) - set(OPTION_VARIABLES))
    if unknown:
        raise ValueError(
            f"unknown sync_worker OPTIONS {', '.join(unknown)}; known: {', '.join(sorted(OPTION_VARIABLES))}"
        )
    env = {}
    for name, value in options.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        env[OPTION_VARIABLES[name]] = str(value)
    return env


class SyncWorkerBackend(BaseTaskBackend):
    """A Django Tasks backend whose runs live on a sync_worker (or Prefect 3) server."""

    supports_defer = True
    supports_get_result = True
    supports_async_task = False
    #: The embedded server delivers runs of a key oldest-due first; it has no priorities,
    #: so a task with a priority other than 0 is refused (InvalidTask) instead of ignored.
    supports_priority = False

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        try:
            self.environment = settings_environment(self.options)
        except ValueError as exc:
            raise OptionsError(f"TASKS[{alias!r}]: {exc}") from None
        try:  # the OPTIONS alone: a mistake there is named as the setting it is in
            get_settings(dict(self.environment))
        except SettingsError as exc:
            raise self._named_in_options(exc) from None

    def _named_in_options(self, exc: SettingsError) -> Exception:
        """``exc`` (which names a ``SYNC_WORKER_*`` variable) naming the OPTIONS key instead,
        when the bad value came from there; else ``exc`` itself."""
        text = str(exc)
        for key, variable in OPTION_VARIABLES.items():
            if variable not in self.environment:
                continue
            prefix = f"{variable}={self.environment[variable]!r} "
            if text.startswith(prefix):
                return OptionsError(f"TASKS[{self.alias!r}]['OPTIONS'][{key!r}]={self.options[key]!r} "
                                    f"{text[len(prefix):]}")
        return exc

    # -- configuration ------------------------------------------------------------------
    @property
    def sync_worker_settings(self) -> Settings:
        """Our settings: the environment, overridden by this backend's OPTIONS (read on
        each use, like :func:`sync_worker.settings.get_settings`)."""
        try:
            return get_settings({**os.environ, **self.environment})
        except SettingsError as exc:
            raise self._named_in_options(exc) from None

    @property
    def client(self) -> Any:
        """The process-wide client for these settings (a forked child makes its own)."""
        from sync_worker.client import get_client

        return get_client(self.sync_worker_settings)

    @property
    def store(self) -> Any:
        from sync_worker.storage import get_store

        settings = self.sync_worker_settings
        return get_store(settings, self.client)

    # -- validation ---------------------------------------------------------------------
    def validate_task(self, task: Task) -> None:
        """Django's checks, plus what a worker in another process needs to find the task."""
        super().validate_task(task)
        module = getattr(task.func, "__module__", None)
        if module in (None, "__main__"):
            raise InvalidTask(
                f"Task {task.func.__qualname__} is defined in __main__: a worker cannot import it. "
                "Define tasks in an importable module (for example myapp/tasks.py)."
            )
        if ":" in task.queue_name:
            raise InvalidTask(f"Queue name {task.queue_name!r} must not contain ':'.")

    # -- enqueue ------------------------------------------------------------------------
    def enqueue(self, task: Task, args: Any, kwargs: Any) -> TaskResult:
        """Create the run on the server; nothing is created if the arguments are not JSON."""
        from sync_worker.storage import discard_parameters_of_refused_create, stage_parameters

        self.validate_task(task)
        args, kwargs = list(args), dict(kwargs)
        self._check_call(task, args, kwargs)
        try:
            parameters = {"args": normalize_json(args), "kwargs": normalize_json(kwargs)}
            json.dumps(parameters, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{task.module_path}: task arguments must be JSON-serializable ({exc})") from exc

        scheduled_time = None
        if task.run_after is not None:
            run_after = task.run_after
            if timezone.is_naive(run_after):  # USE_TZ = False: Django's local time
                run_after = timezone.make_aware(run_after)
            scheduled_time = run_after.astimezone(dt_timezone.utc)

        client, store = self.client, self.store
        parameters_id, record = stage_parameters(store, client, parameters)
        body = task_run_create(
            name=task.name,
            task_key=task_key(task.module_path, task.queue_name),
            state=Scheduled(task_parameters_id=parameters_id, scheduled_time=scheduled_time),
            empirical_policy=EmpiricalPolicy(),
            tags=["django", f"queue:{task.queue_name}"],
        )
        try:
            task_run = client.create_task_run(body, parameters_record=record)
        except BaseException as exc:
            # also when the create was to carry the record: without the rpc socket it was PUT first
            discard_parameters_of_refused_create(store, parameters_id, exc)
            raise
        result = self.to_task_result(task, task_run, parameters["args"], parameters["kwargs"])
        logger.debug("Enqueued %s as run %s", task.module_path, task_run.id)
        task_enqueued.send(type(self), task_result=result)
        return result

    @staticmethod
    def _check_call(task: Task, args: list[Any], kwargs: dict[str, Any]) -> None:
        """A wrong call fails in the caller, as calling the function would, not in a worker."""
        try:
            signature = inspect.signature(task.func)
        except (TypeError, ValueError):  # pragma: no cover - builtins have none
            return
        bind_args = [None, *args] if task.takes_context else args
        try:
            signature.bind(*bind_args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{task.module_path}(): {exc}") from None

    # -- results ------------------------------------------------------------------------
    def get_result(self, result_id: str) -> TaskResult:
        """The run ``result_id`` as a TaskResult; TaskResultDoesNotExist if there is none."""
        try:
            task_run = self.client.read_task_run(str(result_id))
        except ObjectNotFound:
            raise TaskResultDoesNotExist(result_id) from None
        except Exception as exc:
            if getattr(exc, "status_code", None) in (404, 422):  # not a run id at all
                raise TaskResultDoesNotExist(result_id) from None
            # a server that cannot be reached: ServerUnavailable, as enqueue() raises (a raw
            # requests error before, which a view handling ServerUnavailable missed)
            from sync_worker.client import raise_unavailable

            raise_unavailable(self.client, f"read the result of {result_id}", exc, str(result_id))
        parsed = parse_task_key(task_run.task_key)
        if parsed is None:
            raise TaskResultDoesNotExist(f"{result_id} is a run of {task_run.task_key!r}, not of a Django task")
        module_path, queue_name = parsed
        try:
            task = import_string(module_path)
        except ImportError as exc:
            raise TaskResultDoesNotExist(f"{result_id}: cannot import its task {module_path!r}: {exc}") from None
        if not isinstance(task, Task):
            raise TaskResultDoesNotExist(f"{result_id}: {module_path} is not a Django task")
        if task.queue_name != queue_name or task.backend != self.alias:
            task = dataclasses.replace(task, queue_name=queue_name, backend=self.alias)
        successful = task_run.state is not None and _STATUS.get(task_run.state.type) is TaskResultStatus.SUCCESSFUL
        envelope = self._read_value(task_run) if successful else _UNREAD
        if isinstance(envelope, dict) and "args" in envelope and "kwargs" in envelope:
            # the runner's result carries them: a COMPLETED run's parameters record is deleted
            args, kwargs = list(envelope["args"] or []), dict(envelope["kwargs"] or {})
        else:
            args, kwargs = self._read_arguments(task_run)
        return self.to_task_result(task, task_run, args, kwargs, envelope=envelope)

    def _read_arguments(self, task_run: TaskRun) -> tuple[list[Any], dict[str, Any]]:
        from sync_worker.exceptions import ParameterReadError
        from sync_worker.storage import read_parameters

        key = task_run.state.state_details.task_parameters_id if task_run.state else None
        if not key:
            return [], {}
        try:
            parameters = read_parameters(self.store, key).get("parameters", {})
        except ParameterReadError as exc:
            logger.debug("Arguments of run %s not readable: %s", task_run.id, exc)
            return [], {}
        return list(parameters.get("args") or []), dict(parameters.get("kwargs") or {})

    def to_task_result(self, task: Task, task_run: TaskRun, args: list[Any], kwargs: dict[str, Any],
                       *, running_on: str | None = None, envelope: Any = _UNREAD) -> TaskResult:
        """Map a run to Django's TaskResult.

        ``worker_ids`` has one entry per attempt (``run_count``, counted by the server at
        each RUNNING); the last one is the worker of the current or last attempt (the
        RUNNING message, a successful result, or for a failed run the last RUNNING message
        of its state history), earlier ones read ``"unknown"``. ``last_attempted_at`` is the current attempt's start while RUNNING,
        else the first start (``start_time``): Django tasks are not retried, so these agree
        unless a worker died and the run was delivered again. ``envelope``: the successful
        run's result when the caller has read it already.
        """
        state = task_run.state
        state_type = state.type if state is not None else StateType.SCHEDULED
        status = _STATUS.get(state_type, TaskResultStatus.READY)
        errors: list[Any] = []
        return_value = None
        last_worker = running_on
        if state is not None and state.message:
            match = _CLAIM.match(state.message)
            if match:
                last_worker = match.group(1)
        if status is TaskResultStatus.SUCCESSFUL:
            if envelope is _UNREAD:
                envelope = self._read_value(task_run)
            if isinstance(envelope, dict) and "return_value" in envelope:
                return_value = envelope["return_value"]
                last_worker = envelope.get("worker_id") or last_worker
            else:  # a run completed by something else than our runner
                return_value = envelope
        elif status is TaskResultStatus.FAILED:
            errors.append(self._error(task_run))
            if last_worker is None and task_run.run_count:
                last_worker = self._last_claim(task_run)
        attempts = task_run.run_count
        if running_on is not None:
            attempts = max(attempts, 1)
        worker_ids = [UNKNOWN_WORKER] * attempts
        if attempts and last_worker:
            worker_ids[-1] = last_worker
        last_attempted_at = task_run.start_time
        if state_type is StateType.RUNNING and state is not None and state.timestamp is not None:
            last_attempted_at = state.timestamp
        finished_at = task_run.end_time if status in (TaskResultStatus.SUCCESSFUL, TaskResultStatus.FAILED) else None
        if finished_at is None and status in (TaskResultStatus.SUCCESSFUL, TaskResultStatus.FAILED) and state:
            finished_at = state.timestamp
        result = TaskResult(
            task=task,
            id=task_run.id,
            status=status,
            enqueued_at=_aware(task_run.created),
            started_at=_aware(task_run.start_time),
            finished_at=_aware(finished_at),
            last_attempted_at=_aware(last_attempted_at),
            args=args,
            kwargs=kwargs,
            backend=self.alias,
            errors=errors,
            worker_ids=worker_ids,
        )
        object.__setattr__(result, "_return_value", return_value)
        return result

    def _last_claim(self, task_run: TaskRun) -> str | None:
        """The worker of a failed run's last attempt: the message of the last RUNNING (or
        claimed) state in its history ("Running on <worker id>"); None if unknown."""
        try:
            states = self.client.read_task_run_states(str(task_run.id))
        except Exception as exc:  # noqa: BLE001 - the worker stays "unknown"; the rest of the result holds
            logger.debug("No state history for run %s: %s", task_run.id, exc)
            return None
        for state in reversed(states if isinstance(states, list) else []):
            match = _CLAIM.match(str((state or {}).get("message") or "")) if isinstance(state, dict) else None
            if match:
                return match.group(1)
        return None

    def _read_value(self, task_run: TaskRun) -> Any:
        from sync_worker.storage import read_result

        assert task_run.state is not None
        return read_result(self.store, task_run.state.data)

    def _error(self, task_run: TaskRun) -> Any:
        """The failure as Django's TaskError: the exception's class path and traceback."""
        from sync_worker.storage import read_result

        state = task_run.state
        assert state is not None
        details: dict[str, Any] = {}
        try:
            stored = read_result(self.store, state.data)
            if isinstance(stored, dict):
                details = stored
        except Exception as exc:  # noqa: BLE001 - the state's message still says what happened
            logger.debug("No failure record for run %s: %s", task_run.id, exc)
        traceback_text = details.get("traceback") or state.message or f"run ended {state.name}"
        class_path = exception_class_path(details.get("type"), traceback_text)
        if class_path is None:
            class_path = "sync_worker.exceptions.TaskRunFailed"
        return TaskError(exception_class_path=class_path, traceback=traceback_text)


def exception_class_path(qualname: str | None, traceback_text: str) -> str | None:
    """``module.QualName`` of the exception a traceback ends with.

    The failure record keeps the class's qualified name; its module is read from the
    traceback's last line for that class (Python prints ``module.QualName: message``, or
    just ``QualName`` for builtins).
    """
    if not qualname:
        return None
    pattern = re.compile(r"^((?:[A-Za-z_][\w]*\.)*)" + re.escape(qualname) + r"(?::|$)")
    for line in reversed(traceback_text.splitlines()):
        match = pattern.match(line)
        if match:
            module = match.group(1).rstrip(".")
            return f"{module or 'builtins'}.{qualname}"
    return f"builtins.{qualname}" if "." not in qualname else qualname


def _aware(value: datetime | None) -> datetime | None:
    """Django keeps aware datetimes with USE_TZ, naive local ones without."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt_timezone.utc)
    if getattr(django_settings, "USE_TZ", True):
        return value
    return timezone.make_naive(value)
