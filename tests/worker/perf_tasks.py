"""Tasks of tests/worker/test_worker_perf.py (importable by subprocess workers)."""
from __future__ import annotations

import sys

from sync_worker.tasks import task


@task(task_key="tests.perf.modules")
def modules(names):
    """Which of ``names`` the worker process has imported."""
    return sorted(name for name in names if name in sys.modules)


STARTED: list[str] = []


@task(task_key="tests.perf.note_start")
def note_start(tag):
    """Records that it started (in-process workers only)."""
    STARTED.append(tag)
    return tag
