"""The embedded server's memory (issue 14: server RSS after 100,000 runs <= 60 MB).

- A final state that no live Prefect subscriber saw is kept for backfill as its run id and
  time only, and a late subscriber still finds it: the backfill builds it from the database.
- 10,000 kept final states (the backfill's count) take a few hundred bytes each, not their
  runs' JSON.
- The server process does not import requests (~6 MB): ``sync_worker.exceptions`` loads its
  ``requests.HTTPError`` subclasses on first use.

Real servers on 127.0.0.1, real websockets; the subprocess test runs ``sync-worker server``'s
own ``main``.
"""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import time
import tracemalloc
import types
import uuid
from pathlib import Path
from typing import Any

import pytest

from sync_worker.server import events
from tests.helpers import free_port, wait_for
from tests.server.test_server_events import create_captured_run, events_out

REPO = Path(__file__).resolve().parents[2]


def finish(wire: Any, run_id: str, state_type: str = "COMPLETED", **state: Any) -> dict[str, Any]:
    """RUNNING, then ``state_type``, over REST; returns the final state as recorded."""
    assert wire.set_state(run_id, "RUNNING").status_code == 201
    response = wire.set_state(run_id, state_type, **state)
    assert response.status_code == 201, response.text
    reply = response.json()
    assert reply["status"] == "ACCEPT", reply
    return reply["state"]


def no_subscribers(server: Any) -> None:
    wait_for(lambda: server.events.stats()["subscribers"] == 0, timeout=10, message="the subscriber to leave")


def shape(value: Any) -> Any:
    """The keys of nested dicts (what a Prefect client parses), not the values."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    return type(value).__name__ if value is not None else None


def test_a_final_state_nobody_watched_is_shelved_and_still_backfilled_whole(server, wire, sockets):
    data = {"storage_key": "/tmp/result", "serializer": {"type": "json"}}
    watched, unwatched = create_captured_run(wire), create_captured_run(wire)
    live = events_out(sockets, server)
    # registered before the final state is published: else it would get it by its own
    # backfill, rebuilt, and the event kept whole below would not be the one it saw
    wait_for(lambda: server.events.stats()["subscribers"] == 1, timeout=10, message="the live subscriber")
    watched_state = finish(wire, watched, data=data)
    [seen_live] = live.events(1)
    live.close()
    no_subscribers(server)

    before = server.events.stats()
    unwatched_state = finish(wire, unwatched, data=data)
    # kept as run id + time: counted as SHELVED_EVENT_BYTES, not as the run's ~2 KB of JSON.
    # Publishing appends the event (counted whole) and then shelves it, after offering it to
    # the subscribers: a snapshot may fall in between, so wait for the publish to be over.
    after = wait_for(lambda: (s := server.events.stats())["events"] == before["events"] + 1
                     and s["event_bytes"] - before["event_bytes"] == events.SHELVED_EVENT_BYTES and s,
                     timeout=10, message="the final state kept shelved (run id + time)")
    assert after["event_bytes"] - before["event_bytes"] == events.SHELVED_EVENT_BYTES

    late = events_out(sockets, server)
    first, second = late.events(2)
    assert first == seen_live  # kept whole: the very event the live subscriber got
    assert second["id"] == unwatched_state["id"] and second["occurred"] == unwatched_state["timestamp"]
    assert second["event"] == "prefect.task-run.Completed"
    assert second["resource"]["prefect.resource.id"] == f"prefect.task-run.{unwatched}"
    validated = second["payload"]["validated_state"]
    assert (validated["type"], validated["name"], validated["data"]) == ("COMPLETED", "Completed", data)
    assert validated["state_details"]["task_run_id"] == unwatched
    assert shape(second) == shape(first)  # the same event, built from the database
    assert watched_state["id"] == first["id"]
    late.expect_nothing(0.3)


def test_a_backfill_skips_deleted_runs_and_announces_a_replaced_final_state_once(server, wire, sockets):
    replaced, deleted, kept = (create_captured_run(wire) for _ in range(3))
    finish(wire, replaced)
    forced = wire.set_state(replaced, "FAILED", force=True, message="forced")
    assert forced.status_code == 201
    failed_state = forced.json()["state"]
    finish(wire, deleted)
    assert wire.http.delete(f"{wire.url}/task_runs/{deleted}", timeout=10).status_code == 204
    kept_state = finish(wire, kept)

    late = events_out(sockets, server)
    got = late.events(2)
    # the replaced run once, with its current state (both of its final states were shelved)
    assert [(e["resource"]["prefect.resource.id"], e["event"], e["id"]) for e in got] == [
        (f"prefect.task-run.{replaced}", "prefect.task-run.Failed", failed_state["id"]),
        (f"prefect.task-run.{kept}", "prefect.task-run.Completed", kept_state["id"]),
    ]
    late.expect_nothing(0.3)


def test_the_backfill_keeps_ten_thousand_final_states_in_a_few_hundred_bytes_each():
    bus = events.EventBus(types.SimpleNamespace(finish_listeners=[], db=None))
    padding = "x" * 1900  # a run's JSON text is ~2 KB
    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        for _ in range(events.MAX_EVENTS):
            run_id = str(uuid.uuid4())
            bus._run_finished(run_id, padding + run_id)  # what Core calls after a final state's commit
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    stats = bus.stats()
    assert stats["events"] == events.MAX_EVENTS  # the count is kept, not cut by the byte budget
    assert stats["event_bytes"] == events.MAX_EVENTS * events.SHELVED_EVENT_BYTES
    per_event = grown / events.MAX_EVENTS
    # 229 bytes measured on CPython 3.11 (was ~2 KB each: the run's text); room for other versions
    assert per_event <= 2 * events.SHELVED_EVENT_BYTES, per_event


def test_importing_sync_worker_exceptions_does_not_import_requests_and_its_http_errors_still_work():
    script = textwrap.dedent("""
        import pickle, sys
        import sync_worker.exceptions as exceptions
        assert "requests" not in sys.modules, "imported by sync_worker.exceptions"
        from sync_worker.exceptions import APIError, ObjectNotFound, Unauthorized
        import requests
        import sync_worker
        error = ObjectNotFound("no such run", status_code=404, detail="Task run not found")
        assert isinstance(error, requests.HTTPError) and isinstance(error, exceptions.SyncWorkerError)
        assert isinstance(error, APIError) and not isinstance(error, Unauthorized)
        assert (error.status_code, error.detail, str(error)) == (404, "Task run not found", "no such run")
        assert sync_worker.ObjectNotFound is exceptions.ObjectNotFound is ObjectNotFound
        assert ObjectNotFound.__module__ == "sync_worker.exceptions"
        assert pickle.loads(pickle.dumps(ObjectNotFound)) is ObjectNotFound
        assert {"APIError", "ObjectNotFound", "Unauthorized", "ConfigurationError"} <= set(dir(exceptions))
        try:
            exceptions.NoSuchError
        except AttributeError as exc:
            assert "NoSuchError" in str(exc)
        else:
            raise AssertionError("no AttributeError")
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@pytest.mark.timeout(90)
def test_a_running_server_has_not_imported_requests(tmp_path):
    """``sync-worker server``'s own main, in a thread of a fresh interpreter: once the server
    answers /api/health, requests (and the client stack) is not among its modules."""
    port = free_port()
    script = textwrap.dedent(f"""
        import os, sys, threading, time, urllib.request
        from sync_worker.cli import main
        args = ["server", "--port", "{port}", "--db", {str(tmp_path / "server.db")!r}, "--log-level", "WARNING"]
        threading.Thread(target=main, args=(args,), daemon=True).start()
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen("http://127.0.0.1:{port}/api/health", timeout=5) as response:
                    assert response.status == 200
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        loaded = sorted(name for name in ("requests", "urllib3", "charset_normalizer", "sync_worker.client",
                                          "sync_worker._api_errors") if name in sys.modules)
        print("loaded:", ",".join(loaded))
        sys.stdout.flush()
        os._exit(0)
    """)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=80,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "loaded:", (done.stdout, done.stderr, time.monotonic() - started)
