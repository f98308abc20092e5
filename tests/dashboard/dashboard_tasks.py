"""Tasks of the dashboard tests (keys are explicit so the import name does not matter)."""
from __future__ import annotations

import os

from sync_worker.tasks import task

#: a task name a careless page would turn into markup (and an alert)
XSS_NAME = "<img src=x onerror=alert(1)>"


@task(task_key="dash.add")
def add(x, y):
    return x + y


@task(task_key="dash.boom")
def boom(message):
    raise ValueError(message)


@task(task_key="dash.idle")
def idle(x):  # no worker serves this key: its runs wait
    return x


@task(task_key="dash.once", retries=0)
def fails_once(marker):
    """Fails while ``marker`` does not exist (creating it), then succeeds: the first run
    fails, a retry of it completes."""
    if not os.path.exists(marker):
        with open(marker, "w") as handle:
            handle.write("failed once")
        raise RuntimeError("the first attempt fails")
    return "completed on the retry"


@task(task_key="dash.xss", name=XSS_NAME)
def xss(text):
    raise ValueError(text)


#: a right-to-left override: shown raw, it turns the rest of its line around ("evil.exe" ...)
BIDI = "\u202e"


@task(task_key="dash.bidi" + BIDI + "gpj.exe")
def bidi(text):
    raise ValueError("bad " + BIDI + text)
