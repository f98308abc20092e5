"""A finished run is always reported: the final state is proposed again through 5xx
answers (disk full, database locked, restarting) and lost connections, over the socket
and over REST, until the server takes it."""
from __future__ import annotations

import threading
from typing import Any

from sync_worker.schemas import StateType
from sync_worker.server.database import DatabaseClosed
from tests.worker import worker_tasks as wt


class FailingFinalStates:
    """The server refuses the first ``failures`` final-state proposals with 503 (as while
    its database is unavailable), over the socket and over REST alike."""

    def __init__(self, server: Any, failures: int) -> None:
        self.left = failures
        self.refused = 0
        self.lock = threading.Lock()
        core = server.core
        original = core._set_state_op

        def op(run_id: str, proposed: dict[str, Any], force: bool, *args: Any) -> Any:
            real = original(run_id, proposed, force, *args)
            if proposed.get("type") not in ("COMPLETED", "FAILED"):
                return real

            def failing(tx: Any) -> Any:
                with self.lock:
                    if self.left > 0:
                        self.left -= 1
                        self.refused += 1
                        raise DatabaseClosed("injected: database unavailable")
                return real(tx)
            return failing

        core._set_state_op = op


def test_final_state_reported_after_a_window_of_5xx_answers(server, state_path, start_worker):
    injected = FailingFinalStates(server, failures=4)
    start_worker(wt.add, limit=2)
    future = wt.add.delay(2, 3)
    assert future.result(timeout=60) == 5
    assert future.state.type is StateType.COMPLETED
    assert injected.refused == 4


def test_a_result_that_cannot_be_stored_fails_the_run_without_retrying(api_env, start_worker):
    from sync_worker.exceptions import TaskRunFailed

    wt.UNSTORABLE_CALLS.clear()
    start_worker(wt.unstorable)
    future = wt.unstorable.delay()
    state = future.wait(timeout=30)
    assert state.type is StateType.FAILED
    assert "could not be stored" in state.message and "type object" in state.message
    assert wt.UNSTORABLE_CALLS == [1]  # retries=2, yet run once: its side effects are not repeated
    try:
        future.result()
    except TaskRunFailed as exc:
        assert "type object" in str(exc)


def test_task_failures_are_logged_as_warnings_with_the_traceback(api_env, start_worker, caplog, tmp_path):
    start_worker(wt.always_fails)
    with caplog.at_level("INFO", logger="sync_worker.engine"):
        future = wt.always_fails.delay(str(tmp_path / "attempts"))
        assert future.wait(timeout=30).type is StateType.FAILED
    failures = [r for r in caplog.records if "failed: Task run encountered an exception RuntimeError" in r.getMessage()]
    assert failures and all(r.levelname == "WARNING" and r.exc_info for r in failures)
    assert "raise RuntimeError" in caplog.text  # the traceback is in the log
