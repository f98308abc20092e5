"""SyncWorkerBackend without a worker: validation, enqueue refusals, get_result mapping,
settings, against a real embedded server."""
from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest


def module_level(x: int) -> int:
    return x


def with_context(context: Any, x: int) -> int:
    return x


def without_context_arg(x: int) -> int:
    return x


async def coroutine_task() -> None:
    pass


def _task(func: Any, **options: Any) -> Any:
    from sync_worker.contrib.django.compat import task_backends

    options.setdefault("backend", "default")
    return task_backends[options["backend"]].task_class(func=func, **options)


@pytest.fixture
def backend(api_env: dict[str, str]) -> Any:
    from sync_worker.contrib.django.compat import task_backends

    return task_backends["default"]


def _store_files(api_env: dict[str, str]) -> list[Path]:
    store = Path(api_env["SYNC_WORKER_STORAGE"])
    return [p for p in store.rglob("*") if p.is_file()] if store.exists() else []


def test_backend_is_configured_from_tasks_setting(backend: Any) -> None:
    from sync_worker.contrib.django import SyncWorkerBackend

    assert isinstance(backend, SyncWorkerBackend)
    assert backend.supports_defer and backend.supports_get_result
    assert not backend.supports_priority and not backend.supports_async_task
    assert backend.queues == {"default", "emails"}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: _task(lambda: None), "module level"),
        (lambda: _task(coroutine_task), "async"),
        (lambda: _task(module_level, priority=5), "priority"),
        (lambda: _task(module_level, queue_name="reports"), "Queue 'reports' is not valid"),
        (lambda: _task(without_context_arg, takes_context=True), "first argument of 'context'"),
        (lambda: _task(module_level).using(run_after=datetime(2030, 1, 1)), "aware datetime"),
    ],
    ids=["closure", "coroutine", "priority", "unknown-queue", "context-arg", "naive-run-after"],
)
def test_validate_task_refuses_what_cannot_run(backend: Any, make: Any, message: str) -> None:
    from sync_worker.contrib.django.compat import InvalidTask

    with pytest.raises(InvalidTask, match=message):
        make()


def test_task_defined_in_main_is_refused(backend: Any) -> None:
    from sync_worker.contrib.django.compat import InvalidTask

    def in_main() -> None:
        pass

    in_main.__module__ = "__main__"
    in_main.__qualname__ = "in_main"
    with pytest.raises(InvalidTask, match="__main__: a worker cannot import it"):
        _task(in_main)


def test_non_json_arguments_are_refused_and_nothing_is_stored(backend: Any, api_env: dict[str, str]) -> None:
    task = _task(module_level)
    with pytest.raises(TypeError, match="JSON-serializable"):
        task.enqueue(object())
    with pytest.raises(TypeError, match="JSON-serializable"):
        task.enqueue(float("nan"))
    assert _store_files(api_env) == []


def test_wrong_call_fails_in_the_caller(backend: Any, api_env: dict[str, str]) -> None:
    with pytest.raises(TypeError, match=r"module_level\(\): missing a required argument: 'x'"):
        _task(module_level).enqueue()
    with pytest.raises(TypeError, match="unexpected keyword argument 'y'"):
        _task(with_context, takes_context=True).enqueue(1, y=2)
    assert _store_files(api_env) == []


def test_enqueue_returns_a_ready_result_whose_id_is_the_run_id(backend: Any) -> None:
    from django.utils import timezone

    from notes.tasks import create_note
    from sync_worker.contrib.django.backend import task_key

    before = timezone.now()
    result = create_note.enqueue(text="queued only")
    assert result.status == "READY" and not result.is_finished
    assert result.args == [] and result.kwargs == {"text": "queued only"}
    assert result.attempts == 0 and result.worker_ids == [] and result.errors == []
    assert result.started_at is None and result.finished_at is None
    assert before - timedelta(seconds=5) <= result.enqueued_at <= timezone.now() + timedelta(seconds=5)
    with pytest.raises(ValueError, match="not finished"):
        _ = result.return_value

    run = backend.client.read_task_run(result.id)
    assert run.task_key == task_key("notes.tasks.create_note", "default") == "django:default:notes.tasks.create_note"
    assert run.state.type.value == "SCHEDULED" and run.state.state_details.deferred

    again = create_note.get_result(result.id)
    assert again.id == result.id and again.status == "READY" and again.kwargs == {"text": "queued only"}
    result.refresh()
    assert result.status == "READY"


def test_run_after_becomes_the_scheduled_time(backend: Any) -> None:
    from django.utils import timezone

    from notes.tasks import create_note

    when = (timezone.now() + timedelta(hours=1)).replace(microsecond=0)
    result = create_note.using(run_after=when).enqueue("later")
    run = backend.client.read_task_run(result.id)
    assert run.state.state_details.scheduled_time == when


def test_get_result_of_unknown_or_foreign_run(backend: Any) -> None:
    from notes.tasks import create_note
    from sync_worker import task
    from sync_worker.contrib.django.compat import TaskResultDoesNotExist

    with pytest.raises(TaskResultDoesNotExist):
        backend.get_result("00000000-0000-0000-0000-000000000000")
    with pytest.raises(TaskResultDoesNotExist):
        create_note.get_result("not-a-run-id")

    foreign = task(module_level).delay(1)  # one of our own @task runs: not a Django task's
    with pytest.raises(TaskResultDoesNotExist, match="not of a Django task"):
        backend.get_result(foreign.task_run_id)


def test_get_result_with_the_server_down_raises_server_unavailable(backend: Any, server: Any) -> None:
    """As enqueue() does: a raw requests.ConnectionError before, which a view handling
    ServerUnavailable (the README's advice after a failed enqueue) missed."""
    from notes.tasks import create_note
    from sync_worker.exceptions import ServerUnavailable

    server.stop()
    with pytest.raises(ServerUnavailable, match="read the result of 00000000-") as info:
        create_note.get_result("00000000-0000-0000-0000-000000000000")
    assert info.value.task_run_id == "00000000-0000-0000-0000-000000000000"


def test_a_run_being_cancelled_is_still_running_for_django(backend: Any) -> None:
    """CANCELLING: its worker has not stopped it yet (the task may run for seconds more). It
    was FAILED, with a finished_at that changed once the run was really cancelled."""
    from notes.tasks import create_note
    from sync_worker.schemas import State, StateType, TaskRun

    run = TaskRun(id="6ba2cc65-0000-4000-8000-000000000000", name="create_note", task_key="k", dynamic_key="k-1",
                  state=State(type=StateType.CANCELLING, name="Cancelling"))
    result = backend.to_task_result(create_note, run, [], {}, envelope=None)
    assert result.status == "RUNNING" and result.finished_at is None


def test_get_result_checks_the_task(backend: Any) -> None:
    from notes.tasks import create_note, whoami
    from sync_worker.contrib.django.compat import FRAMEWORK

    result = create_note.enqueue("mismatch")
    mismatch = __import__(FRAMEWORK, fromlist=["exceptions"]).exceptions.TaskResultMismatch
    with pytest.raises(mismatch):
        whoami.get_result(result.id)


def test_options_override_the_environment_and_unknown_options_are_refused(api_env: dict[str, str]) -> None:
    from django.core.exceptions import ImproperlyConfigured

    from sync_worker.contrib.django import SyncWorkerBackend

    backend = SyncWorkerBackend("other", {"OPTIONS": {"API_URL": "http://127.0.0.1:1/api", "STORAGE": "server",
                                                      "FAST_PATH": False}})
    settings = backend.sync_worker_settings
    assert settings.api_url == "http://127.0.0.1:1/api"
    assert settings.uses_server_storage and settings.fast_path is False
    assert SyncWorkerBackend("plain", {}).sync_worker_settings.api_url == api_env["SYNC_WORKER_API_URL"]
    with pytest.raises(ImproperlyConfigured, match="unknown sync_worker OPTIONS API_URLS"):
        SyncWorkerBackend("bad", {"OPTIONS": {"API_URLS": "x"}})


@pytest.mark.parametrize(
    ("qualname", "traceback_text", "expected"),
    [
        ("ValueError", "Traceback...\nValueError: boom", "builtins.ValueError"),
        ("NoteRejected", "Traceback...\nnotes.tasks.NoteRejected: x: y", "notes.tasks.NoteRejected"),
        ("Outer.Inner", "Traceback...\npkg.mod.Outer.Inner", "pkg.mod.Outer.Inner"),
        ("KeyError", "KeyError: 'a'\n\nDuring handling...\nmy.Err: no\n", "builtins.KeyError"),
    ],
)
def test_exception_class_path_from_traceback(django_project: Any, qualname: str, traceback_text: str,
                                             expected: str) -> None:
    from sync_worker.contrib.django.backend import exception_class_path

    assert exception_class_path(qualname, traceback_text) == expected


def test_worker_refuses_unknown_queue_and_other_backends(api_env: dict[str, str], django_project: Any) -> None:
    from sync_worker.contrib.django.worker import build_worker

    with pytest.raises(ValueError, match="queue\\(s\\) reports not in"):
        build_worker(queues=["reports"])
    worker = build_worker(queues=["emails"], limit=1)
    assert "django:emails:notes.tasks.send_digest" in worker.task_keys
    assert "django:emails:notes.tasks.create_note" in worker.task_keys  # .using(queue_name=...) may move any task
    assert not any(key.startswith("django:default:") for key in worker.task_keys)


def test_async_enqueue_and_get_result(backend: Any) -> None:
    """Django's aenqueue/aget_result run our synchronous calls in a thread (sync_to_async)."""
    import asyncio

    from notes.tasks import create_note

    async def enqueue_and_read() -> tuple[Any, Any]:
        result = await create_note.aenqueue("from async code")
        return result, await create_note.aget_result(result.id)

    result, again = asyncio.run(enqueue_and_read())
    assert result.status == again.status == "READY"
    assert again.id == result.id and again.args == ["from async code"]


def test_a_refused_enqueue_over_rest_leaves_no_parameters_record_on_the_server(backend: Any, api_env: dict[str, str],
                                                                               server: Any, monkeypatch: Any) -> None:
    """``STORAGE: "server"`` without the rpc socket (REST): the record is written before the
    create; a create the server refuses must not leave it behind."""
    from notes.tasks import create_note
    from sync_worker.exceptions import APIError
    from sync_worker.server.models import ValidationError

    monkeypatch.setenv("SYNC_WORKER_STORAGE", "server")
    monkeypatch.setenv("SYNC_WORKER_FAST_PATH", "false")

    def refuse(*_args: Any, **_kwargs: Any) -> str:
        raise ValidationError(["body"], "refused for the test")

    monkeypatch.setattr(server.core, "create_task_run", refuse)
    with pytest.raises(APIError) as info:
        create_note.enqueue("never stored")
    assert info.value.status_code == 422
    keys = [row[0] for row in server.core.db.read_all("SELECT key FROM records", [])]
    assert keys == []


def test_an_enqueue_to_an_unreachable_server_keeps_the_parameters_record(backend: Any, api_env: dict[str, str],
                                                                        monkeypatch: Any) -> None:
    """The create's answer may be what was lost: the run may exist, so its arguments stay (as
    ``.delay()`` keeps them); only a refused create (4xx) removes them."""
    import socket

    from notes.tasks import create_note
    from sync_worker.exceptions import ServerUnavailable

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("SYNC_WORKER_API_URL", f"http://127.0.0.1:{port}/api")
    monkeypatch.setenv("SYNC_WORKER_SUBMIT_TIMEOUT", "0.5")
    with pytest.raises(ServerUnavailable):
        create_note.enqueue("kept")
    files = _store_files(api_env)
    assert len(files) == 1 and "kept" in files[0].read_text()


def test_a_refused_enqueue_deletes_its_parameters_record(backend: Any, api_env: dict[str, str], server: Any,
                                                         monkeypatch: Any) -> None:
    from notes.tasks import create_note
    from sync_worker.exceptions import APIError
    from sync_worker.server.models import ValidationError

    def refuse(*_args: Any, **_kwargs: Any) -> str:
        raise ValidationError(["body"], "refused for the test")

    monkeypatch.setattr(server.core, "_create_op", refuse)  # over the rpc socket and over REST
    with pytest.raises(APIError) as info:
        create_note.enqueue("never run")
    assert info.value.status_code == 422
    assert _store_files(api_env) == []


def test_a_bad_option_value_is_named_as_the_setting_it_is_in(api_env: dict[str, str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Not as the SYNC_WORKER_* variable it stands for (which may be set right)."""
    from django.core.exceptions import ImproperlyConfigured

    from notes.tasks import create_note
    from sync_worker.contrib.django import SyncWorkerBackend
    from sync_worker.exceptions import ConfigurationError

    with pytest.raises(ImproperlyConfigured) as caught:
        backend = SyncWorkerBackend("probe", {"OPTIONS": {"API_URL": "127.0.0.1:4200/api"}})
        backend.enqueue(create_note, ["x"], {})
    assert str(caught.value).startswith("TASKS['probe']['OPTIONS']['API_URL']='127.0.0.1:4200/api' is not an "
                                        "http(s) URL")
    assert isinstance(caught.value, ConfigurationError)  # the worker commands: one line, exit 2
    with pytest.raises(ImproperlyConfigured, match=r"^TASKS\['probe'\]\['OPTIONS'\]\['REQUEST_TIMEOUT'\]=-1 must be"):
        SyncWorkerBackend("probe", {"OPTIONS": {"REQUEST_TIMEOUT": -1}}).enqueue(create_note, ["x"], {})
    # a bad variable (no OPTIONS for it) is still named as the variable
    monkeypatch.setenv("SYNC_WORKER_REQUEST_TIMEOUT", "abc")
    with pytest.raises(ConfigurationError, match=r"^SYNC_WORKER_REQUEST_TIMEOUT='abc' is not a number"):
        SyncWorkerBackend("probe", {}).enqueue(create_note, ["x"], {})
    # ... unless OPTIONS set it: then the variable is not used
    assert SyncWorkerBackend("probe", {"OPTIONS": {"REQUEST_TIMEOUT": 5}}).sync_worker_settings.request_timeout == 5
