"""End to end with the example project: a view enqueues, a `manage.py sync_worker`
subprocess runs the task against the same SQLite database, get_result() reports it."""
from __future__ import annotations

import re
import socket
import sys
import time
from datetime import timedelta
from typing import Any

import pytest

from tests.django.conftest import wait_finished

pytestmark = pytest.mark.timeout(180)


def test_view_enqueues_worker_writes_row_and_result_page_shows_it(start_worker: Any) -> None:
    from django.test import Client

    from notes.models import Note
    from notes.tasks import create_note

    client = Client()
    response = client.post("/notes/", {"text": "written by the worker"})
    assert response.status_code == 302
    result_id = re.fullmatch(r"/results/([^/]+)/", response["Location"]).group(1)
    page = client.get(response["Location"])
    assert page.status_code == 200 and 'id="status">READY<' in page.content.decode()

    worker = start_worker("--limit", "2")
    result = wait_finished(create_note.get_result(result_id))

    assert result.status == "SUCCESSFUL", worker.output()
    note = Note.objects.get(text="written by the worker")
    assert result.return_value == note.id
    assert result.args == ["written by the worker"] and result.kwargs == {}
    read_again = create_note.get_result(result_id)  # the parameters record is gone: read from the result
    assert read_again.args == ["written by the worker"] and read_again.kwargs == {}
    assert read_again.status == "SUCCESSFUL" and read_again.return_value == note.id
    assert result.errors == []
    assert result.attempts == 1 and len(result.worker_ids) == 1 and result.worker_ids[0] != "unknown"
    assert result.enqueued_at <= result.started_at <= result.last_attempted_at <= result.finished_at
    assert result.started_at.tzinfo is not None  # USE_TZ = True: aware datetimes
    page = client.get(f"/results/{result_id}/").content.decode()
    assert 'id="status">SUCCESSFUL<' in page and f'id="value">{note.id}<' in page


def test_failing_task_is_failed_with_class_path_and_traceback(start_worker: Any) -> None:
    from notes.tasks import NoteRejected, create_note

    result = create_note.enqueue("!not allowed")
    worker = start_worker()
    wait_finished(result)

    assert result.status == "FAILED", worker.output()
    (error,) = result.errors
    assert error.exception_class_path == "notes.tasks.NoteRejected"
    assert error.exception_class is NoteRejected
    assert 'raise NoteRejected(f"notes may not start with' in error.traceback
    assert error.traceback.rstrip().endswith("notes.tasks.NoteRejected: notes may not start with '!': '!not allowed'")
    with pytest.raises(ValueError, match="Task failed"):
        _ = result.return_value
    assert result.finished_at is not None


def test_run_after_is_honoured(start_worker: Any) -> None:
    from django.utils import timezone

    from notes.tasks import create_note

    worker = start_worker()
    wait_finished(create_note.enqueue("the worker is up"))  # so the wait below is the schedule's, not startup's

    run_after = timezone.now() + timedelta(seconds=3)
    result = create_note.using(run_after=run_after).enqueue("deferred note")
    assert result.status == "READY"
    wait_finished(result)

    assert result.status == "SUCCESSFUL", worker.output()
    assert result.started_at >= run_after, (result.started_at, run_after)


def test_context_carries_the_result_id_and_attempt(start_worker: Any) -> None:
    from notes.tasks import whoami

    result = whoami.enqueue()
    start_worker()
    wait_finished(result)
    assert result.status == "SUCCESSFUL"
    assert result.return_value == {"id": result.id, "attempt": 1}


def test_worker_serves_only_its_queues(start_worker: Any) -> None:
    from notes.tasks import create_note, send_digest

    digest = send_digest.enqueue("ops@example.com")
    assert digest.task.queue_name == "emails"
    start_worker("--queue", "default")
    wait_finished(create_note.enqueue("default queue note"))
    digest.refresh()
    assert digest.status == "READY"  # this worker does not subscribe to the emails queue at all

    start_worker("--queue", "emails")
    wait_finished(digest)
    assert digest.status == "SUCCESSFUL"
    assert digest.return_value.endswith("note(s) sent to ops@example.com")
    assert digest.task.queue_name == "emails"


def test_orm_after_the_database_closed_the_idle_connection(start_worker: Any) -> None:
    """The database drops the worker thread's connection while it is idle; with
    CONN_MAX_AGE shorter than the database's idle timeout (the Django contract), the next
    run gets a fresh connection because the worker calls close_old_connections() first."""
    from notes.models import Note
    from notes.tasks import count_then_drop_connection, create_note

    worker = start_worker("--limit", "1", env={"DJANGO_CONN_MAX_AGE": "1"})  # one thread: one connection
    first = wait_finished(count_then_drop_connection.enqueue())
    assert first.status == "SUCCESSFUL", worker.output()
    time.sleep(1.2)  # the connection's CONN_MAX_AGE passes while it is idle (what is under test)

    second = wait_finished(create_note.enqueue("after the idle connection was closed"))
    assert second.status == "SUCCESSFUL", (second.errors, worker.output())
    assert Note.objects.filter(text="after the idle connection was closed").exists()


def test_broken_connection_is_not_reused_by_the_next_run(start_worker: Any) -> None:
    """Persistent connections (CONN_MAX_AGE=None): a run that fails on the dead connection
    gets it closed after the run, so the next run on that thread works again."""
    from notes.tasks import count_then_drop_connection, create_note

    worker = start_worker("--limit", "1", env={"DJANGO_CONN_MAX_AGE": "none"})
    assert wait_finished(count_then_drop_connection.enqueue()).status == "SUCCESSFUL", worker.output()
    failed = wait_finished(create_note.enqueue("on a dead connection"))
    assert failed.status == "FAILED"
    assert "closed database" in failed.errors[0].traceback
    recovered = wait_finished(create_note.enqueue("on a fresh connection"))
    assert recovered.status == "SUCCESSFUL", (recovered.errors, worker.output())


def test_transaction_left_open_is_rolled_back(start_worker: Any) -> None:
    from notes.models import Note
    from notes.tasks import create_note, write_without_commit

    worker = start_worker("--limit", "1")
    left_open = wait_finished(write_without_commit.enqueue("never committed"))
    assert left_open.status == "SUCCESSFUL", worker.output()
    assert not Note.objects.filter(text="never committed").exists()
    after = wait_finished(create_note.enqueue("committed after the rollback"))
    assert after.status == "SUCCESSFUL"
    assert Note.objects.filter(text="committed after the rollback").exists()
    assert "left autocommit off" in worker.output()


def test_our_own_task_runs_in_the_django_worker(start_worker: Any) -> None:
    from notes.jobs import count_notes
    from notes.models import Note

    Note.objects.create(text="ours: one")
    future = count_notes.delay("ours:")
    start_worker("--module", "notes.jobs")  # not a tasks.py module: named explicitly
    assert future.result(timeout=60) == 1


def test_cli_worker_with_django_settings_takes_module_and_backend(start_worker: Any) -> None:
    from notes.jobs import count_notes
    from notes.models import Note

    Note.objects.create(text="cli: one")
    future = count_notes.delay("cli:")
    start_worker("worker", "--django", "mysite.settings", "--module", "notes.jobs", "--backend", "default",
                 command=[sys.executable, "-m", "sync_worker"])
    assert future.result(timeout=60) == 1


def test_cli_worker_with_django_settings(start_worker: Any) -> None:
    from notes.tasks import create_note

    import requests

    from tests.helpers import wait_for

    result = create_note.enqueue("via sync-worker worker --django")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    worker = start_worker("worker", "--django", "mysite.settings", "--limit", "1", "--status-port", str(port),
                          command=[sys.executable, "-m", "sync_worker"])
    wait_finished(result)
    assert result.status == "SUCCESSFUL", worker.output()

    def status() -> Any:
        try:
            return requests.get(f"http://127.0.0.1:{port}/status", timeout=5).json()
        except requests.ConnectionError:
            return None

    key = "django:default:notes.tasks.create_note"
    # counted once the worker's thread is done with the run, a moment after its state is reported
    body = wait_for(lambda: (b := status()) is not None and b["finished"].get(key) == 1 and b, timeout=30)
    assert key in body["tasks"] and body["limit"] == 1


def test_sigterm_drains_and_exits_zero(start_worker: Any) -> None:
    from notes.tasks import create_note

    worker = start_worker()
    wait_finished(create_note.enqueue("before SIGTERM"))
    assert worker.stop() == 0, worker.output()
    assert re.search(r"Task worker \S+ stopped\.", worker.output()), worker.output()


def test_server_storage_carries_the_arguments_in_the_create(start_worker: Any, api_env: dict[str, str],
                                                            server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``STORAGE: "server"``: enqueue() makes one request, the create, which carries the
    parameters record; get_result() reads the arguments back from the server's store and the
    worker runs the task with them, then the server deletes the record."""
    from notes.models import Note
    from notes.tasks import create_note
    from sync_worker.client import Client

    monkeypatch.setenv("SYNC_WORKER_STORAGE", "server")
    api_env["SYNC_WORKER_STORAGE"] = "server"
    writes: list[str] = []
    original = Client.write_record
    monkeypatch.setattr(Client, "write_record", lambda client, key, data: (writes.append(key), original(client, key, data)))

    result = create_note.enqueue(text="stored with the run")
    assert writes == []
    key = "parameters." + create_note.get_backend().client.read_task_run(result.id).state.state_details.task_parameters_id
    assert server.core.db.read_record(key) is not None
    assert create_note.get_result(result.id).kwargs == {"text": "stored with the run"}

    worker = start_worker("--limit", "2")
    wait_finished(result)
    assert result.status == "SUCCESSFUL", worker.output()
    assert result.return_value == Note.objects.get(text="stored with the run").id
    assert server.core.db.read_record(key) is None  # deleted with the COMPLETED state
    assert create_note.get_result(result.id).kwargs == {"text": "stored with the run"}  # from the result


def test_a_failed_run_names_the_worker_of_its_only_attempt(start_worker: Any) -> None:
    from notes.tasks import create_note

    worker = start_worker()
    result = wait_finished(create_note.enqueue("!rejected"))
    assert result.status == "FAILED", worker.output()
    assert result.attempts == 1
    assert result.worker_ids == [f"{socket.gethostname()}-{worker.proc.pid}"], worker.output()
    assert create_note.get_result(result.id).worker_ids == result.worker_ids


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"API_URL": "127.0.0.1:4200/api"},
         "TASKS['default']['OPTIONS']['API_URL']='127.0.0.1:4200/api' is not an http(s) URL"),
        ({"REQUEST_TIMEOUT": "30s"}, "TASKS['default']['OPTIONS']['REQUEST_TIMEOUT']='30s' is not a number"),
        ({"API_ULR": "http://127.0.0.1:4200/api"}, "TASKS['default']: unknown sync_worker OPTIONS API_ULR; known: "),
    ],
    ids=["api-url", "request-timeout", "unknown-key"],
)
@pytest.mark.parametrize("command", ["manage.py sync_worker", "sync-worker worker --django"])
def test_a_mistake_in_options_is_one_line_naming_the_setting_and_exit_2(start_worker: Any, tmp_path: Any,
                                                                         options: dict, named: str,
                                                                         command: str) -> None:
    import os

    from tests.django.conftest import EXAMPLE, REPO

    (tmp_path / "bad_options.py").write_text(
        f"from mysite.settings import *  # noqa: F403\nTASKS['default']['OPTIONS'] = {options!r}\n")
    env = {"DJANGO_SETTINGS_MODULE": "bad_options",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(EXAMPLE), str(REPO)])}
    if command == "manage.py sync_worker":
        worker = start_worker("--timeout", "5", env=env)
        prefix = "CommandError: "
    else:
        worker = start_worker("worker", "--django", "bad_options", "--timeout", "5", env=env,
                              command=[sys.executable, "-m", "sync_worker"])
        prefix = "sync-worker worker: error: "
    assert worker.proc.wait(60) == 2, worker.output()
    lines = worker.output().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix + named), worker.output()
    assert "SYNC_WORKER_" not in lines[0]  # the variable is set right; the setting is wrong


@pytest.mark.parametrize("command", ["manage.py sync_worker", "sync-worker worker --django"])
def test_refused_credentials_are_one_line_and_exit_1(start_worker: Any, server_factory: Any, tmp_path: Any,
                                                      command: str) -> None:
    secured = server_factory(auth_string="admin:right", database=str(tmp_path / "secured.db"))
    env = {"SYNC_WORKER_API_URL": secured.url, "SYNC_WORKER_API_AUTH_STRING": "admin:wrong"}
    if command == "manage.py sync_worker":
        worker = start_worker("--timeout", "20", env=env)
        prefix = "CommandError: "
    else:
        env["DJANGO_SETTINGS_MODULE"] = "mysite.settings"
        worker = start_worker("worker", "--django", "mysite.settings", "--timeout", "20", env=env,
                              command=[sys.executable, "-m", "sync_worker"])
        prefix = "sync-worker worker: error: "
    assert worker.proc.wait(60) == 1, worker.output()
    output = worker.output()
    assert output.count("SYNC_WORKER_API_AUTH_STRING") == 1, output  # the error once, not also logged
    last = output.strip().splitlines()[-1]
    assert last.startswith(prefix) and "SYNC_WORKER_API_AUTH_STRING" in last, output
