"""Tasks of the queue-operation tests (importable by subprocess workers as
``tests.operate.queue_tasks``). Keys are explicit so the import name does not matter."""
from __future__ import annotations

import os
import time

from sync_worker.tasks import task


@task(task_key="queue.add", tags=["math"])
def add(x, y):
    return x + y


@task(task_key="queue.stamp")
def stamp(label):
    """Returns the wall-clock time it started (delayed-run tests compare it to the eta)."""
    return {"label": label, "started": time.time()}


@task(task_key="queue.boom")
def boom(message):
    raise ValueError(message)


@task(task_key="queue.nobody")
def nobody(x):  # no worker ever serves this key
    return x


@task(task_key="queue.slow")
def slow(marker, seconds):
    """Runs ``seconds`` in small steps (interruptible), touching ``marker`` when it starts and
    writing ``marker + '.done'`` only if it ran to the end."""
    with open(marker, "w") as handle:
        handle.write(str(os.getpid()))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.02)
    with open(marker + ".done", "w") as handle:
        handle.write("done")
    return seconds


@task(task_key="queue.flaky", retries=1, retry_delay_seconds=0)
def flaky(marker):
    """Fails its first attempt (creating ``marker``) and succeeds on the retry."""
    if not os.path.exists(marker):
        with open(marker, "w") as handle:
            handle.write("failed once")
        raise RuntimeError("first attempt fails")
    return "second attempt"


@task(task_key="queue.stubborn")
def stubborn(marker: str, seconds: float) -> str:
    """Catches the cancellation's interruption and returns as if nothing happened."""
    from sync_worker.exceptions import Cancelled

    with open(marker, "w"):
        pass
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:  # small steps: interruptible
            time.sleep(0.02)
    except Cancelled:
        return "caught it"
    return "slept"
