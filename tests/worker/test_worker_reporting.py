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
