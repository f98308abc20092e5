"""Example tasks, shared by ``submit_and_wait.py`` and a worker process.

The task keys are explicit: the default key is ``module.function``, and this module is
imported as ``tasks`` by the script but as ``examples.tasks`` by
``sync-worker worker examples.tasks:add`` — an explicit key makes both agree.
"""
from __future__ import annotations

import random
import time

from sync_worker import task


@task(task_key="examples.add")
def add(x: int, y: int) -> int:
    return x + y


@task(task_key="examples.slow_square", timeout_seconds=10)
def slow_square(x: int) -> int:
    time.sleep(random.uniform(0.01, 0.1))
    return x * x


@task(task_key="examples.flaky", retries=10, retry_delay_seconds=0.1)
def flaky(x: int) -> int:
    """Fails 30% of the time; the server schedules retries (0.1 s apart)."""
    if random.random() < 0.3:
        raise RuntimeError("flaky failure, will be retried")
    return x
