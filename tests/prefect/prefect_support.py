"""Helpers shared by the Prefect compatibility tests (imported by the test modules;
fixtures live in conftest.py)."""
from __future__ import annotations

import functools
import time
from typing import Any

from tests.helpers import wait_for

PrefectServer = Any  # conftest.PrefectServer; not imported: "conftest" is ambiguous on sys.path


@functools.cache
def prefect_api() -> Any:
    """A requests session for calls to a real Prefect server that retries a 503 with backoff,
    as Prefect's own client does (it retries 429, 502 and 503): Prefect answers 503 to an
    error it calls retryable, e.g. its SQLite database busy with the workers' writes on a
    loaded machine (seen once in a CI dry run, stop 31, on a create). Only a 503: an error
    that committed nothing. ``raise_on_status=False``: after the last try the test sees the
    answer itself."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    retry = Retry(total=6, connect=0, read=0, status=6, backoff_factor=0.2, status_forcelist=(503,),
                  allowed_methods=None, raise_on_status=False)
    session = requests.Session()
    session.mount("http://", HTTPAdapter(max_retries=retry))
    return session


def read_run(server: PrefectServer, run_id: str) -> dict:
    """The run as Prefect's API shows it."""
    response = prefect_api().get(f"{server.api_url}/task_runs/{run_id}", headers=server.auth_header(), timeout=30)
    response.raise_for_status()
    return response.json()


def state_history(server: PrefectServer, run_id: str) -> list[dict]:
    """All states of a run, oldest first (``GET /api/task_run_states/?task_run_id=``)."""
    response = prefect_api().get(
        f"{server.api_url}/task_run_states/", params={"task_run_id": run_id}, headers=server.auth_header(), timeout=30
    )
    response.raise_for_status()
    return sorted(response.json(), key=lambda state: state["timestamp"])


def settled_history(server: PrefectServer, run_id: str, states: int, timeout: float = 15.0) -> list[dict]:
    """The run's history once it holds at least ``states`` states (or whatever it holds
    after ``timeout`` s, for the test's assertion to show).

    Why a wait: states sent as events are written by Prefect's ``task_run_recorder``, which
    promises no order between two events of one run. In Prefect 3.8.8 (defaults:
    ``batch_size`` 1, consumer concurrency 2) it writes each event in its own transaction,
    two at a time, and puts a batch whose write failed back at the end of its queue, written
    on its next flush (at most ``flush_interval``, 5 s, later). A run's COMPLETED can
    therefore be visible before its RUNNING is: CI saw ``Scheduled, Pending, Completed``
    once (stop 33), with the run COMPLETED by our event; Prefect's own worker sends the same
    two events. The history is whole once both are written."""
    def whole() -> list[dict] | None:
        history = state_history(server, run_id)
        return history if len(history) >= states else None

    try:  # polled: Prefect's recorder has no notification to wait on
        return wait_for(whole, timeout, f"{states} states of run {run_id}", interval=0.05)
    except AssertionError:
        return state_history(server, run_id)


def wait_for_run(server: PrefectServer, run_id: str, state_types: set[str], timeout: float) -> dict | None:
    """Poll the API until the run's state type is in ``state_types``; None if the run was deleted."""
    deadline = time.monotonic() + timeout
    last: dict | None = None
    while True:
        response = prefect_api().get(f"{server.api_url}/task_runs/{run_id}", headers=server.auth_header(), timeout=30)
        if response.status_code == 404:
            return None
        response.raise_for_status()
        last = response.json()
        if last["state_type"] in state_types:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"run {run_id} is {last['state_type']}/{last['state_name']} after {timeout}s, wanted {state_types}: "
                f"{last['state']}"
            )
        time.sleep(0.1)


#: Prepended to a Prefect caller script: prints {"read": <run id>, "state": <type>} each time
#: Prefect's client reads a task run. PrefectDistributedFuture.result() reads the run ONCE
#: before it starts waiting for an event, so that line tells a test, without sleeping,
#: that the caller is now waiting (prefect/futures.py:311-333).
TRACE_TASK_RUN_READS = '''
import json as _json
from prefect.client.orchestration import PrefectClient as _PrefectClient

_original_read_task_run = _PrefectClient.read_task_run


async def _traced_read_task_run(self, *args, **kwargs):
    run = await _original_read_task_run(self, *args, **kwargs)
    print(_json.dumps({"read": str(run.id), "state": run.state.type.value if run.state else None}), flush=True)
    return run


_PrefectClient.read_task_run = _traced_read_task_run
'''


#: Prepended to a Prefect caller script: prints {"subscribed": true} once Prefect's
#: TaskRunWaiter has its /api/events/out subscription up. That subscription is started in
#: the background *before* future.result() reads the run, and is not awaited: an event
#: published before it is up is only found later by its backfill, which reads events the
#: server's event persister has already flushed to the database (every 5 s). With
#: SLOW_EVENT_SUBSCRIPTION_SECONDS set, the subscription comes up that much later, which
#: reproduces that race on purpose.
TRACE_EVENT_SUBSCRIPTION = '''
import asyncio as _asyncio
import json as _json
import os as _os
from prefect.events.clients import PrefectEventSubscriber as _Subscriber

_original_reconnect = _Subscriber._reconnect


async def _traced_reconnect(self):
    await _asyncio.sleep(float(_os.environ.get("SLOW_EVENT_SUBSCRIPTION_SECONDS", "0")))
    await _original_reconnect(self)
    print(_json.dumps({"subscribed": True}), flush=True)


_Subscriber._reconnect = _traced_reconnect
'''
