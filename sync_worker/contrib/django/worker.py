"""The worker of a Django project: finds the project's tasks and runs them safely.

``manage.py sync_worker`` (and ``sync-worker worker --django mysite.settings``) call
:func:`run_django_worker`: after ``django.setup()`` it imports every installed app's
``tasks`` module (as Celery's autodiscovery does), collects the Django tasks of the
chosen backend, and serves each of them on each chosen queue with our TaskWorker. Each
run goes through :func:`make_runner`: database hygiene before and after
(:mod:`sync_worker.contrib.django.db`), the ``TaskContext`` for tasks that take it, and the
return value normalised to JSON as Django's own backends do.
"""
from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterable, Sequence
from types import ModuleType
from typing import Any, Callable

from sync_worker.tasks import Task as SyncTask
from sync_worker.worker import TaskWorker

logger = logging.getLogger("sync_worker.contrib.django")

_current = threading.local()


class DjangoTaskWorker(TaskWorker):
    """A TaskWorker that tells the runner which run it executes (for ``TaskContext``).

    The engine calls the task function in the thread that runs the delivery, so the run
    is kept in a thread-local for that call.
    """

    def _safe_run(self, task: Any, task_run: Any, *args: Any, **kwargs: Any) -> Any:
        _current.task_run = task_run
        try:
            return super()._safe_run(task, task_run, *args, **kwargs)
        finally:
            _current.task_run = None


def current_task_run() -> Any:
    """The run the calling worker thread executes, or None."""
    return getattr(_current, "task_run", None)


def make_runner(django_task: Any, backend: Any, worker_id: Callable[[], str]) -> Callable[..., Any]:
    """The function our engine calls for a run of ``django_task`` (parameters: args, kwargs).

    Its result, the run's result record, is ``{"return_value": ..., "worker_id": ...,
    "args": [...], "kwargs": {...}}``: the worker id is how ``get_result`` knows who ran a
    successful attempt, and the arguments are how it still knows them once the server (or
    the worker, for a local store) has deleted the COMPLETED run's parameters record.
    """
    from sync_worker.contrib.django import db
    from sync_worker.contrib.django.compat import TaskContext, normalize_json, task_finished, task_started

    def run(args: list[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        task_run = current_task_run()
        result = None
        if task_run is not None:
            result = backend.to_task_result(django_task, _as_running(task_run), list(args), dict(kwargs),
                                            running_on=worker_id())
            task_started.send(type(backend), task_result=result)
        error: BaseException | None = None
        db.before_run()
        try:
            if django_task.takes_context:
                if result is None:
                    raise RuntimeError(f"{django_task.module_path} takes a context, but no run is known here")
                value = django_task.call(TaskContext(task_result=result), *args, **kwargs)
            else:
                value = django_task.call(*args, **kwargs)
            return {"return_value": normalize_json(value), "worker_id": worker_id(), "args": list(args),
                    "kwargs": dict(kwargs)}
        except BaseException as exc:
            error = exc
            raise
        finally:
            db.after_run(error)
            if result is not None:
                _send_finished(task_finished, backend, result, error)

    run.__name__ = django_task.name
    run.__qualname__ = django_task.name
    run.__module__ = getattr(django_task.func, "__module__", __name__)
    return run


def _as_running(task_run: Any) -> Any:
    """The delivered run as it is once this attempt started (RUNNING, one more attempt)."""
    import copy
    from datetime import datetime, timezone

    from sync_worker.schemas import State, StateType

    if task_run.state is not None and task_run.state.type is StateType.RUNNING:
        return task_run  # claimed at delivery (embedded server): RUNNING, this attempt already counted
    running = copy.copy(task_run)
    now = datetime.now(timezone.utc)
    running.state = State(StateType.RUNNING, "Running", timestamp=now)
    running.run_count = task_run.run_count + 1
    running.start_time = task_run.start_time or now
    return running


def _send_finished(signal: Any, backend: Any, result: Any, error: BaseException | None) -> None:
    from datetime import datetime, timezone

    from sync_worker.contrib.django.backend import _aware
    from sync_worker.contrib.django.compat import TaskResultStatus

    object.__setattr__(result, "finished_at", _aware(datetime.now(timezone.utc)))
    object.__setattr__(result, "status", TaskResultStatus.FAILED if error else TaskResultStatus.SUCCESSFUL)
    try:
        signal.send(type(backend), task_result=result)
    except Exception:  # noqa: BLE001 - a receiver's bug must not change the run's outcome
        logger.exception("A task_finished receiver failed")


# -- discovery -----------------------------------------------------------------------------
def discover_tasks(backend_alias: str = "default", modules: Iterable[str] = ()) -> tuple[list[Any], list[SyncTask]]:
    """The project's tasks: ``(Django tasks of backend_alias, sync_worker @task tasks)``.

    Every installed app's ``tasks`` module is imported (plus ``modules``), then the
    installed apps' loaded modules are searched for task objects. A task defined
    elsewhere is found if its module is imported by then (name it with ``--module``, or
    import it from the app's ``tasks.py``).
    """
    import importlib

    from django.apps import apps
    from django.utils.module_loading import autodiscover_modules

    from sync_worker.contrib.django.compat import Task

    autodiscover_modules("tasks")
    for name in modules:
        importlib.import_module(name)
    prefixes = [config.name for config in apps.get_app_configs()] + list(modules)
    found: dict[str, Any] = {}
    ours: dict[str, SyncTask] = {}
    for name, module in list(sys.modules.items()):
        if not isinstance(module, ModuleType) or not any(name == p or name.startswith(p + ".") for p in prefixes):
            continue
        for value in list(vars(module).values()):
            if isinstance(value, Task) and value.backend == backend_alias:
                found.setdefault(value.module_path, value)
            elif isinstance(value, SyncTask):
                ours.setdefault(value.task_key, value)
    return [found[path] for path in sorted(found)], [ours[key] for key in sorted(ours)]


def with_db_hygiene(task: SyncTask) -> SyncTask:
    """One of our own ``@task`` tasks, with the same database hygiene as Django tasks."""
    import functools

    from sync_worker.contrib.django import db

    fn = task.fn

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        error: BaseException | None = None
        db.before_run()
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:
            error = exc
            raise
        finally:
            db.after_run(error)

    return SyncTask(
        run, name=task.name, task_key=task.task_key, retries=task.retries,
        retry_delay_seconds=task.retry_delay_seconds, retry_jitter_factor=task.retry_jitter_factor,
        timeout_seconds=task.timeout_seconds, tags=task.tags, persist_result=task.persist_result,
        result_serializer=task.result_serializer,
    )


def build_worker(
    backend_alias: str = "default",
    queues: Sequence[str] | None = None,
    limit: int | None = 10,
    modules: Iterable[str] = (),
) -> DjangoTaskWorker:
    """A (not yet started) worker for the project's tasks on ``queues``.

    Our settings come from the backend's OPTIONS (written to this process's environment,
    so that every part of the worker sees the same server and storage).

    Raises ConfigurationError (a ``ValueError``; the worker commands print it as one line
    and exit 2) for a setup mistake: an unknown backend alias or one that is not ours, a
    mistake in its OPTIONS (named as ``TASKS[alias]['OPTIONS'][key]``) or in a
    ``SYNC_WORKER_*`` variable, a queue not in its QUEUES, no task to serve.
    """
    import os

    from django.core.exceptions import ImproperlyConfigured

    from sync_worker.contrib.django.backend import SyncWorkerBackend, task_key
    from sync_worker.contrib.django.compat import task_backends
    from sync_worker.exceptions import ConfigurationError

    try:
        backend = task_backends[backend_alias]
    except ConfigurationError:
        raise  # OPTIONS that cannot be used (OptionsError): named already
    except ImproperlyConfigured as exc:
        raise ConfigurationError(f"TASKS[{backend_alias!r}]: {exc}") from None
    if not isinstance(backend, SyncWorkerBackend):
        raise ConfigurationError(
            f"TASKS[{backend_alias!r}] uses {type(backend).__module__}.{type(backend).__qualname__}, not "
            "sync_worker.contrib.django.SyncWorkerBackend: nothing for this worker to run"
        )
    backend.sync_worker_settings  # noqa: B018 - a bad value fails here, named as the setting it came from
    os.environ.update(backend.environment)
    chosen = list(queues) if queues else sorted(backend.queues)
    unknown = [q for q in chosen if backend.queues and q not in backend.queues]
    if unknown:
        raise ConfigurationError(f"queue(s) {', '.join(unknown)} not in TASKS[{backend_alias!r}]['QUEUES'] "
                                 f"({', '.join(sorted(backend.queues))})")
    django_tasks, own_tasks = discover_tasks(backend_alias, modules)
    if not django_tasks and not own_tasks:
        raise ConfigurationError(
            f"no tasks found for backend {backend_alias!r}: define them with @task in a tasks.py module of an "
            "app in INSTALLED_APPS (or pass --module)"
        )
    worker_box: list[DjangoTaskWorker] = []

    def worker_id() -> str:
        return worker_box[0].client_id

    sync_tasks = [
        SyncTask(make_runner(django_task, backend, worker_id), name=django_task.name,
                 task_key=task_key(django_task.module_path, queue))
        for django_task in django_tasks
        for queue in chosen
    ]
    sync_tasks += [with_db_hygiene(t) for t in own_tasks]
    worker = DjangoTaskWorker(*sync_tasks, limit=limit)
    worker_box.append(worker)
    logger.info("Serving %d Django task(s) on queue(s) %s: %s; %d sync_worker task(s): %s", len(django_tasks),
                ", ".join(chosen), ", ".join(t.module_path for t in django_tasks) or "-", len(own_tasks),
                ", ".join(t.task_key for t in own_tasks) or "-")
    return worker


def run_django_worker(
    backend_alias: str = "default",
    queues: Sequence[str] | None = None,
    limit: int | None = 10,
    timeout: float | None = None,
    modules: Iterable[str] = (),
    status_port: int | None = None,
) -> int:
    """Serve until stopped (SIGTERM/Ctrl-C drain in-flight runs); the exit status.

    A setup mistake raises ConfigurationError (see :func:`build_worker`; also a status port
    that cannot be used): ``sync-worker worker --django`` prints it as one line and exits
    2, and so does ``manage.py sync_worker``. An error that ends the worker (refused
    credentials) propagates too: both print it as one line and exit 1."""
    from django.core.exceptions import ImproperlyConfigured

    from sync_worker.exceptions import ConfigurationError
    from sync_worker.worker import run_until_stopped

    try:
        worker = build_worker(backend_alias, queues, limit, modules)
    except ConfigurationError:
        raise
    except (ValueError, ImproperlyConfigured) as exc:
        raise ConfigurationError(str(exc)) from None
    return run_until_stopped(worker, status_port, timeout)


def run_for_settings(settings_module: str, **options: Any) -> int:
    """``sync-worker worker --django mysite.settings``: set up Django, then serve."""
    import os

    os.environ["DJANGO_SETTINGS_MODULE"] = settings_module
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as manage.py would: the project's packages
    try:
        import django
    except ImportError:
        sys.stderr.write("sync-worker worker: error: --django needs Django: python3 -m pip install django "
                         "(Django 5.2 with django-tasks, or Django >= 6.0)\n")
        return 2
    try:
        django.setup()
    except Exception as exc:  # noqa: BLE001 - a settings module that does not load: say which and why
        sys.stderr.write(f"sync-worker worker: error: --django {settings_module}: Django could not be set up: "
                         f"{type(exc).__name__}: {exc}\n")
        return 2
    return run_django_worker(**options)
