"""Tasks used by the worker tests (importable by subprocess workers as tests.worker.worker_tasks)."""
from __future__ import annotations

from sync_worker.tasks import task


@task(task_key="tests.worker_tasks.add")
def add(x, y):
    return x + y


def plain_function():
    return 1
