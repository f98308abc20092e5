"""The client's two axes: the dialect (how the server behaves) chosen once per connection,
Prefect-only machinery owned by the worker, results where the run's creator reads them,
and a run whose claim could not be recorded handed back at once."""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from sync_worker.client import Client
from sync_worker.dialects import EmbeddedDialect, PrefectDialect, choose_dialect
from sync_worker.schemas import EmpiricalPolicy, Scheduled, StateType, task_run_create
from sync_worker.server.database import DatabaseClosed
from sync_worker.settings import get_settings
from sync_worker.storage import get_store, read_result, write_parameters
from sync_worker.tasks import TaskRunFuture
from tests.helpers import wait_for
from tests.worker import worker_tasks as wt


def test_choose_dialect_follows_what_the_server_announced():
    embedded = choose_dialect(["set_state", "credit", "direct_running", "release"])
    assert isinstance(embedded, EmbeddedDialect) and embedded.claims_with_running
    assert not embedded.checks_finished
    # the extensions switched off (SYNC_WORKER_FAST_PATH=false): same server, PENDING claims over REST
    rest = choose_dialect(["set_state", "direct_running"], fast_path=False)
    assert isinstance(rest, EmbeddedDialect) and not rest.claims_with_running
    prefect = choose_dialect([])
    assert isinstance(prefect, PrefectDialect) and prefect.checks_finished and not prefect.claims_with_running


@pytest.mark.parametrize("fast_path", ["true", "false"])
def test_each_connection_of_a_worker_has_its_dialect(api_env, start_worker, monkeypatch, fast_path):
    monkeypatch.setenv("SYNC_WORKER_FAST_PATH", fast_path)
    worker = start_worker(wt.add)
    assert wt.add.delay(1, 1).result(timeout=30) == 2
    dialect = worker._subscription.dialect
    assert isinstance(dialect, EmbeddedDialect)
    assert dialect.claims_with_running is (fast_path == "true")


def _event_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("sync-worker") and "event" in t.name]


def test_prefect_events_belong_to_the_worker_and_stop_with_it(prefect_like, start_worker, monkeypatch):
    """On a server without extensions the worker's Prefect dialect sends a final-state event
    and repeats it later; both are the worker's: stopping it sends the pending repeat and
    leaves no thread behind (it used to be one process-global thread that never ended)."""
    posted: list[str] = []
    original = Client.emit_events

    def counting(self, events, **kwargs):
        posted.extend(event["event"] for event in events if event["event"] == "prefect.task-run.Completed")
        return original(self, events, **kwargs)

    monkeypatch.setattr(Client, "emit_events", counting)
    worker = start_worker(wt.add)
    assert wt.add.delay(2, 2).result(timeout=30) == 4
    dialect = worker._subscription.dialect
    assert isinstance(dialect, PrefectDialect) and dialect.reporting is worker._prefect
    wait_for(lambda: posted == ["prefect.task-run.Completed"], message="the final-state event")
    assert worker._prefect.events.pending == 1  # its read-back and repeat, due in 8 s
    worker.stop()
    assert worker.join(30)
    assert posted == ["prefect.task-run.Completed"] * 2  # the repeat went out at the stop
    assert worker._prefect.events.pending == 0
    assert _event_threads() == []


def test_a_prefect_retry_is_requeued_by_the_workers_timers(prefect_like, start_worker, tmp_path):
    """The Prefect dialect puts an AwaitingRetry back on the queue (the Prefect-compatible
    server, like Prefect, does not when the proposal was not deferred)."""
    worker = start_worker(wt.fail_then_succeed)
    future = wt.fail_then_succeed.delay(str(tmp_path / "attempts"), 1)
    assert future.result(timeout=60) == "succeeded on attempt 2"
    assert worker._prefect.retries.flush() == 0  # fired when due, nothing left waiting


class FailingClaims:
    """The server answers 503 to every claim (PENDING/RUNNING) of one run while ``on``."""

    def __init__(self, server: Any) -> None:
        self.run_id: str | None = None
        self.on = True
        self.refused = 0
        self.lock = threading.Lock()
        core = server.core
        original = core._set_state_op

        def op(run_id: str, proposed: dict[str, Any], force: bool, *args: Any) -> Any:
            real = original(run_id, proposed, force, *args)
            if proposed.get("type") not in ("PENDING", "RUNNING") or run_id != self.run_id:
                return real

            def failing(tx: Any) -> Any:
                with self.lock:
                    if self.on:
                        self.refused += 1
                        raise DatabaseClosed("injected: database unavailable")
                return real(tx)
            return failing

        core._set_state_op = op


@pytest.mark.parametrize("fast_path", ["true", "false"])
def test_a_run_whose_claim_cannot_be_recorded_is_handed_back_at_once(
        server_factory, api_env, start_worker, monkeypatch, fast_path):
    """The worker is stopped while the server refuses the claim of a delivered run: past its
    drain timeout it gives up, and hands the run back (release_run) instead of leaving it to
    the 60 s lease; another worker runs it at once, and the first never executed it."""
    server = server_factory(lease_timeout=60.0, database=str(Path(api_env["SYNC_WORKER_STORAGE"]).parent / "l.db"))
    monkeypatch.setenv("SYNC_WORKER_API_URL", server.url)
    monkeypatch.setenv("SYNC_WORKER_DRAIN_TIMEOUT", "1")
    monkeypatch.setenv("SYNC_WORKER_FAST_PATH", fast_path)
    injected = FailingClaims(server)
    future = wt.mark.delay(5, str(Path(api_env["SYNC_WORKER_STORAGE"]).parent / "marks"))
    injected.run_id = future.task_run_id
    first = start_worker(wt.mark)
    wait_for(lambda: injected.refused >= 1, message="a refused claim")
    first.stop()
    assert first.join(30)
    injected.on = False
    second = start_worker(wt.mark)
    assert future.result(timeout=20) == 5  # the lease would have held it for 60 s
    wait_for(lambda: second.finished_task_runs == {"tests.mark": 1}, message="the second worker counting the run")
    marks = Path(api_env["SYNC_WORKER_STORAGE"]).parent / "marks"
    assert marks.read_text().count("start 5") == 1  # executed once, by the second worker


def _create_without_label(client: Client, task_key: str, parameters: dict[str, Any], retries: int = 0) -> str:
    """A run as another creator (Prefect's ``.delay()``) makes it: no inline-results label."""
    store = get_store(get_settings(), client)
    body = task_run_create(name=task_key, task_key=task_key, empirical_policy=EmpiricalPolicy(retries=retries),
                           state=Scheduled(task_parameters_id=write_parameters(store, parameters)),
                           task_inputs=parameters)
    body.pop("labels")
    return client.create_task_run(body).id


def test_results_are_inline_only_for_runs_our_submitters_created(api_env, start_worker, tmp_path):
    """Our .delay() marks its runs: their results travel inline (no file). A run created
    without the mark (e.g. by Prefect's .delay()) gets records with an ABSOLUTE storage_key
    in the store, values and exceptions, which a Prefect caller reads."""
    start_worker(wt.add, wt.always_fails)
    client = Client()
    store_dir = Path(api_env["SYNC_WORKER_STORAGE"]).resolve()

    ours = wt.add.delay(20, 1)
    assert ours.result(timeout=30) == 21
    data = ours.state.data
    assert set(data) == {"metadata", "result"} and data["result"] == "21"  # the record itself, inline

    foreign = _create_without_label(client, "tests.add", {"x": 40, "y": 2})
    done = TaskRunFuture(foreign, client=client)
    assert done.result(timeout=30) == 42
    metadata = done.state.data
    assert "result" not in metadata
    path = Path(metadata["storage_key"])
    assert path.is_absolute() and path.parent == store_dir and json.loads(path.read_text())["result"] == "42"

    failing = _create_without_label(client, "tests.always_fails", {"path": str(tmp_path / "attempts")})
    failed = TaskRunFuture(failing, client=client)
    failed.wait(timeout=30)
    assert failed.state.type is StateType.FAILED
    record_path = Path(failed.state.data["storage_key"])
    assert record_path.is_absolute() and record_path.parent == store_dir
    described = read_result(get_store(get_settings(), client), failed.state.data)
    assert described["__exc_type__"] == "builtins.RuntimeError", described  # Prefect rebuilds the exception
