"""sync_worker's own @task inside a Django project (served by `manage.py sync_worker` too)."""
from sync_worker import task

from notes.models import Note


@task
def count_notes(prefix: str = "") -> int:
    return Note.objects.filter(text__startswith=prefix).count()
