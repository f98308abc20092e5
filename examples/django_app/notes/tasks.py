"""The example's background tasks: Django's @task, run by `manage.py sync_worker`."""
from django.db import connection, transaction

from notes.models import Note

try:  # Django >= 6.0
    from django.tasks import task
except ImportError:  # Django 5.2 + django-tasks
    from django_tasks import task


class NoteRejected(Exception):
    """Raised by a task on purpose: the example's failure."""


@task
def create_note(text: str) -> int:
    """Write a row with the ORM; the id is the task's return value."""
    if text.startswith("!"):
        raise NoteRejected(f"notes may not start with '!': {text!r}")
    return Note.objects.create(text=text).id


@task(queue_name="emails")
def send_digest(address: str) -> str:
    """On the "emails" queue: only a worker serving that queue runs it."""
    return f"{Note.objects.count()} note(s) sent to {address}"


@task(takes_context=True)
def whoami(context) -> dict:
    """A task that receives Django's TaskContext."""
    return {"id": context.task_result.id, "attempt": context.attempt}


@task
def count_then_drop_connection() -> int:
    """Uses the ORM, then closes the raw database connection behind Django's back: what a
    database (or a proxy in front of it) does to a connection idle for too long."""
    count = Note.objects.count()
    connection.connection.close()
    return count


@task
def write_without_commit(text: str) -> int:
    """Turns autocommit off and writes without committing: the worker must roll it back."""
    transaction.set_autocommit(False)
    Note.objects.create(text=text)
    return Note.objects.count()


@task
def wait_for_file(path: str, timeout: float = 60.0, started: str = "") -> bool:
    """Runs until the file ``path`` exists (at most ``timeout`` seconds; True if it came):
    a run that stays in flight as long as the tests need (a web process stopped under it).
    It creates the file ``started`` first, if named: the sign that its body runs (RUNNING
    on the server means only that a worker claimed it)."""
    import os
    import time

    if started:
        open(started, "w").close()
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True
