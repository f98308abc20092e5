"""``@task``, ``Task.delay`` and ``TaskRunFuture``: the submitting side.

``send_email.delay(to="a@b.c")`` binds the arguments against the function's signature
(a wrong call fails here, in the caller, not later in a worker), stores the parameters as
a record, creates a SCHEDULED *deferred* run on the server, and returns a future at once.
A worker serving the task's key picks the run up.
"""
from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from sync_worker.durations import MAX_SECONDS
from sync_worker.exceptions import SerializationError, TaskRunCancelled, TaskRunFailed
from sync_worker.schemas import (
    EmpiricalPolicy,
    State,
    StateType,
    TaskRun,
    policy_json,
    scheduled_json,
    task_run_create,
)
from sync_worker.settings import get_settings
from sync_worker.storage import (
    SERIALIZERS,
    RecordStore,
    discard_parameters_of_refused_create,
    get_store,
    read_result,
    stage_parameters,
)

if TYPE_CHECKING:
    from typing_extensions import ParamSpec

    from sync_worker.client import Client

    P = ParamSpec("P")
else:
    P = TypeVar("P")

R = TypeVar("R")

logger = logging.getLogger("sync_worker.tasks")

def exponential_backoff(backoff_factor: float) -> Callable[[int], list[float]]:
    """Retry delays that double: ``backoff_factor * 2 ** attempt`` seconds for each retry
    (Prefect's ``prefect.tasks.exponential_backoff``), for ``retry_delay_seconds=``."""

    def retry_backoff_calculator(retries: int) -> list[float]:
        return [backoff_factor * max(0, 2**r) for r in range(retries)]

    return retry_backoff_calculator


def default_task_key(fn: Callable[..., Any]) -> str:
    """``module.qualname``: stable across processes and restarts.

    A function defined in a script run as ``python jobs.py`` lives in ``__main__``; the
    worker imports it as ``jobs``. Using the script's file name for ``__main__`` makes
    both sides compute the same key.
    """
    module = fn.__module__
    if module == "__main__":
        main_file = getattr(sys.modules.get("__main__"), "__file__", None)
        if main_file:
            module = os.path.splitext(os.path.basename(main_file))[0]
    return f"{module}.{fn.__qualname__}"


class Task(Generic[P, R]):
    """A function that can run in the background.

    Calling the task runs the function inline. ``delay``/``apply_async`` submit a run.
    ``result_serializer`` ("json" or "pickle") is used for both the parameters and the
    result, as Prefect does. ``timeout_seconds`` is enforced by the worker.
    """

    def __init__(
        self,
        fn: Callable[P, R],
        *,
        name: str | None = None,
        task_key: str | None = None,
        retries: int = 0,
        retry_delay_seconds: float | Sequence[float] | Callable[[int], Sequence[float]] = 0,
        retry_jitter_factor: float | None = None,
        timeout_seconds: float | None = None,
        tags: Iterable[str] | None = None,
        persist_result: bool = True,
        result_serializer: str = "json",
        description: str | None = None,
        version: str | None = None,
        log_prints: bool = False,
        **prefect_only: Any,
    ):
        if prefect_only:
            raise TypeError(
                f"@task got {', '.join(sorted(prefect_only))}: Prefect task options that sync_worker does not "
                f"implement. It takes: name, task_key, retries, retry_delay_seconds, retry_jitter_factor, "
                f"timeout_seconds, tags, persist_result, result_serializer, description, version, log_prints")
        if not callable(fn):
            raise TypeError(f"@task needs a function, got {fn!r}")
        if inspect.iscoroutinefunction(fn):
            raise TypeError(f"{fn.__qualname__} is a coroutine function: sync_worker runs synchronous functions only")
        if retries < 0:
            raise ValueError("retries must be >= 0")
        if result_serializer not in SERIALIZERS:
            raise ValueError(f"result_serializer must be one of {SERIALIZERS}, got {result_serializer!r}")
        if retry_jitter_factor is not None and retry_jitter_factor < 0:
            raise ValueError("retry_jitter_factor must be >= 0")
        self.fn = fn
        self.name = name or fn.__name__
        self.task_key = task_key or default_task_key(fn)
        self.retries = retries
        if callable(retry_delay_seconds):  # as Prefect: a function of the retries, e.g. exponential_backoff(10)
            retry_delay_seconds = retry_delay_seconds(retries)
        self.retry_delay_seconds = (
            [float(d) for d in retry_delay_seconds] if isinstance(retry_delay_seconds, (list, tuple)) else float(retry_delay_seconds)
        )
        self.description = description if description is not None else inspect.getdoc(fn)
        self.version = version
        self.log_prints = bool(log_prints)
        self.retry_jitter_factor = retry_jitter_factor
        self.timeout_seconds = timeout_seconds
        self.tags = sorted(set(tags or ()))
        self.persist_result = persist_result
        self.result_serializer = result_serializer
        self._signature = inspect.signature(fn)
        self._spread = any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY)
                           for p in self._signature.parameters.values())  # see callable_by_name
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Task {self.name} key={self.task_key!r}>"

    def with_options(self, **options: Any) -> Task[P, R]:
        """A copy of this task with some options changed."""
        current = {
            "name": self.name, "task_key": self.task_key, "retries": self.retries,
            "retry_delay_seconds": self.retry_delay_seconds, "retry_jitter_factor": self.retry_jitter_factor,
            "timeout_seconds": self.timeout_seconds, "tags": self.tags, "persist_result": self.persist_result,
            "result_serializer": self.result_serializer, "description": self.description, "version": self.version,
            "log_prints": self.log_prints,
        }
        current.update(options)
        return Task(self.fn, **current)

    @property
    def takes_parameters(self) -> bool:
        """Whether the function has parameters at all (a worker reads a run's parameters
        record only then)."""
        return bool(self._signature.parameters)

    def callable_by_name(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` called as ``call(**parameters)`` with the stored parameters: as it is, unless
        the signature has ``*args``, ``**kwargs`` or positional-only parameters, which are
        passed back the way they were bound (Prefect's ``parameters_to_args_kwargs``): called
        with keywords, ``f(*args)`` got ``args=[...]`` as a keyword."""
        if not self._spread:
            return fn
        signature = self._signature

        def call(**parameters: Any) -> Any:
            bound = signature.bind_partial()
            bound.arguments = parameters
            return fn(*bound.args, **bound.kwargs)

        return call

    def bind(self, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
        """The call's parameters by name, defaults applied; TypeError for a wrong call."""
        if not args and not kwargs and not self._signature.parameters:
            return {}
        try:
            bound = self._signature.bind(*args, **(kwargs or {}))
        except TypeError as exc:
            raise TypeError(f"{self.name}(): {exc}") from None
        bound.apply_defaults()
        return dict(bound.arguments)

    # -- submitting -------------------------------------------------------------------
    def delay(self, *args: P.args, **kwargs: P.kwargs) -> TaskRunFuture[R]:
        """Submit a background run with these arguments; returns at once."""
        return self.apply_async(args, kwargs)

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        client: Client | None = None,
        store: RecordStore | None = None,
        countdown: float | None = None,
        eta: datetime | None = None,
    ) -> TaskRunFuture[R]:
        """Submit a background run. Nothing is created if the parameters cannot be stored.

        ``countdown=seconds`` or ``eta=aware datetime`` (not both) delay the run: it is created
        SCHEDULED with that ``scheduled_time`` and the embedded server delivers it when due (it
        waits in the server's database, holding no worker slot, and survives a server
        restart). A Prefect server ignores ``scheduled_time`` for background runs and delivers
        at once (see README, "Delayed runs").
        """
        scheduled_time = scheduled_time_from(countdown, eta)
        parameters = self.bind(args or (), kwargs)
        if client is None or store is None:  # the settings only say which ones (read per call: ~2 % of a .delay())
            settings = get_settings()
            if client is None:
                from sync_worker.client import get_client

                client = get_client(settings)
            store = store or get_store(settings, client)

        parameters_id = record = None
        if parameters:
            parameters_id, record = stage_parameters(store, client, parameters, self.result_serializer)
        body = task_run_create(  # state and policy as JSON: no objects built only to be written
            name=self.name,
            task_key=self.task_key,
            state=scheduled_json(parameters_id, scheduled_time),
            empirical_policy=policy_json(self.retries, self.retry_delay_seconds, self.retry_jitter_factor),
            tags=self.tags,
            task_inputs=parameters,
        )
        try:
            task_run = client.create_task_run(body, brief=True, parameters_record=record)
        except BaseException as exc:
            if parameters_id:
                discard_parameters_of_refused_create(store, parameters_id, exc)
            raise
        if client.transport.on_prefect_server():
            from sync_worker.prefect_reporting import announce_scheduled

            announce_scheduled(client, task_run)
        logger.debug("Submitted %s run %s", self.name, task_run.id)
        return TaskRunFuture(task_run.id, client=client, store=store, task_run=task_run)

    @property
    def empirical_policy(self) -> EmpiricalPolicy:
        return EmpiricalPolicy(
            retries=self.retries, retry_delay=self.retry_delay_seconds, retry_jitter_factor=self.retry_jitter_factor
        )


def scheduled_time_from(countdown: float | None, eta: datetime | None) -> datetime | None:
    """The ``scheduled_time`` of ``apply_async(countdown=...)`` / ``apply_async(eta=...)``."""
    if countdown is not None and eta is not None:
        raise TypeError("apply_async(): pass countdown or eta, not both")
    if countdown is not None:
        if isinstance(countdown, bool) or not isinstance(countdown, (int, float)):
            raise TypeError(f"apply_async(): countdown must be a number of seconds, not {countdown!r}")
        if countdown != countdown or countdown < 0:  # NaN, negative
            raise ValueError(f"apply_async(): countdown must be >= 0 seconds, not {countdown!r}")
        if countdown > MAX_SECONDS:  # inf, 1e12: past what a datetime (and the server) can hold
            raise ValueError(f"apply_async(): countdown must be at most {MAX_SECONDS / 86400:.0f} days, "
                             f"not {countdown!r} seconds")
        return datetime.now(timezone.utc) + timedelta(seconds=countdown)
    if eta is not None:
        if not isinstance(eta, datetime):
            raise TypeError(f"apply_async(): eta must be a datetime, not {type(eta).__name__}")
        if eta.tzinfo is None or eta.tzinfo.utcoffset(eta) is None:
            raise TypeError("apply_async(): eta must be an aware datetime (with a tzinfo, e.g. "
                            "datetime.now(timezone.utc) + timedelta(minutes=5)); a naive datetime is ambiguous")
        try:
            return eta.astimezone(timezone.utc)
        except OverflowError:  # datetime.max with a negative offset: past year 9999 in UTC
            raise ValueError(f"apply_async(): eta {eta.isoformat()} is past what a datetime can hold in UTC") from None
    return None


@overload
def task(fn: Callable[P, R]) -> Task[P, R]: ...


@overload
def task(
    *,
    name: str | None = ...,
    task_key: str | None = ...,
    retries: int = ...,
    retry_delay_seconds: float | Sequence[float] | Callable[[int], Sequence[float]] = ...,
    retry_jitter_factor: float | None = ...,
    timeout_seconds: float | None = ...,
    tags: Iterable[str] | None = ...,
    persist_result: bool = ...,
    result_serializer: str = ...,
    description: str | None = ...,
    version: str | None = ...,
    log_prints: bool = ...,
) -> Callable[[Callable[P, R]], Task[P, R]]: ...


def task(fn: Callable[..., Any] | None = None, **options: Any) -> Any:
    """Make a function a background task: ``@task`` or ``@task(retries=3, ...)``."""
    if fn is None:
        return lambda f: Task(f, **options)
    return Task(fn, **options)


#: a result record missing when its COMPLETED state is read is looked for again this many
#: times, this far apart: Prefect's worker writes it after it reports the state, and Prefect's
#: own futures wait the same way (``prefect.states._get_state_result_data_with_retries``)
RESULT_RECORD_ATTEMPTS = 10
RESULT_RECORD_WAIT = 0.25


def _read_result_written_late(store: RecordStore, data: Any, allow_pickle: bool) -> Any:
    import tenacity

    from sync_worker.storage import RecordNotFound

    try:  # nearly always there: no retry policy built for it (7.6 µs a result)
        return read_result(store, data, allow_pickle=allow_pickle)
    except RecordNotFound:
        pass
    for attempt in tenacity.Retrying(stop=tenacity.stop_after_attempt(RESULT_RECORD_ATTEMPTS - 1),
                                     wait=tenacity.wait_fixed(RESULT_RECORD_WAIT),
                                     retry=tenacity.retry_if_exception_type(RecordNotFound), reraise=True):
        with attempt:
            return read_result(store, data, allow_pickle=allow_pickle)
    raise AssertionError("unreachable")  # pragma: no cover


class TaskRunFuture(Generic[R]):
    """A handle on a submitted run: poll its state, wait for it, fetch its result."""

    def __init__(self, task_run_id: str, *, client: Client | None = None, store: RecordStore | None = None,
                 task_run: TaskRun | None = None):
        self.task_run_id = task_run_id
        if client is None:
            from sync_worker.client import get_client

            client = get_client()
        self._client = client
        self._store = store
        self._last: TaskRun | None = task_run

    def __repr__(self) -> str:
        return f"<TaskRunFuture {self.task_run_id} {self._last.state if self._last else ''}>"

    @property
    def task_run(self) -> TaskRun:
        """The run as the server last reported it (refreshed unless already finished)."""
        if self._last is None or not self._finished(self._last):
            try:
                self._last = self._client.read_task_run(self.task_run_id)
            except Exception as exc:
                from sync_worker.client import raise_unavailable

                raise_unavailable(self._client, f"read task run {self.task_run_id}", exc, self.task_run_id)
        assert self._last is not None
        return self._last

    @property
    def state(self) -> State:
        state = self.task_run.state
        assert state is not None
        return state

    @staticmethod
    def _finished(task_run: TaskRun) -> bool:
        if getattr(task_run, "unfinished", False):  # a brief create answer: known, nothing to read
            return False
        return task_run.state is not None and task_run.state.is_terminal()

    def wait(self, timeout: float | None = None) -> State:
        """Block until the run is finished or ``timeout`` seconds passed; return its state.

        A run waiting for a retry (``AwaitingRetry``) is not finished. How the wait travels
        (pushed over the embedded server's rpc socket, else polled over REST) is the
        client's transport's business (:meth:`sync_worker.transport.SubmitTransport.wait`).
        """
        run = self._last
        if run is None or not self._finished(run):
            run = self._last = self._client.transport.wait(self.task_run_id, timeout)
        assert run.state is not None
        return run.state

    def result(self, timeout: float | None = None, raise_on_failure: bool = True) -> R:
        """The task's return value.

        Raises TimeoutError if the run is not finished within ``timeout``; raises
        :class:`TaskRunFailed` (with the remote traceback) if it failed, or returns that
        exception when ``raise_on_failure=False``.
        """
        state = self.wait(timeout)
        if not state.is_terminal():
            raise TimeoutError(f"task run {self.task_run_id} is still {state.name} after {timeout}s"
                               + self._why_waiting(state))
        settings = get_settings()
        store = self._store or get_store(settings, self._client)
        if state.type is StateType.COMPLETED:
            return _read_result_written_late(store, state.data, settings.allow_pickle)
        error = self._failure(state, store)
        if raise_on_failure:
            raise error
        return error  # type: ignore[return-value]

    def cancel(self) -> bool:
        """Cancel the run. A run that has not started is never delivered (True); a running
        one is interrupted by its worker (``Cancelled`` raised in the task's thread) and ends
        CANCELLED (True); a finished one is left alone (False). ``result()`` then raises
        :class:`TaskRunCancelled`."""
        try:
            answer = self._client.cancel_task_run(self.task_run_id)
        except Exception as exc:
            from sync_worker.client import raise_unavailable

            raise_unavailable(self._client, f"cancel task run {self.task_run_id}", exc, self.task_run_id)
        self._last = TaskRun.from_json(answer["task_run"])
        return answer.get("status") in ("cancelled", "cancelling")

    def _why_waiting(self, state: State) -> str:
        """``": no worker is subscribed to task key 'x'"`` when the embedded server says so."""
        if state.type is not StateType.SCHEDULED:
            return ""
        task_key = self._last.task_key if self._last is not None else None
        try:
            workers = self._client.read_workers()
        except Exception:  # a Prefect server, or no answer: we cannot tell
            return ""
        if task_key and not any(task_key in (w.get("task_keys") or []) for w in workers):
            return f": no worker is subscribed to task key {task_key!r}"
        return ""

    def _failure(self, state: State, store: RecordStore) -> TaskRunFailed:
        details: dict[str, Any] = {}
        try:
            stored = read_result(store, state.data)
            if isinstance(stored, dict):
                details = stored
        except Exception as exc:  # the failure record is a courtesy; the state message is the fact
            logger.debug("No failure record for %s: %s", self.task_run_id, exc)
        message = state.message or f"task run {self.task_run_id} ended {state.name}"
        if state.type is StateType.CANCELLED:
            return TaskRunCancelled(message, state=state)
        return TaskRunFailed(message, state=state, exception_type=details.get("type"), traceback=details.get("traceback"))


__all__ = ["Task", "TaskRunFuture", "task", "default_task_key", "exponential_backoff", "SerializationError"]
