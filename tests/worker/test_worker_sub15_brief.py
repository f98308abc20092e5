"""The worker on the server's ``brief_set_state`` extension (real server, real worker, real
sockets): the final state it sends without waiting (a COMPLETED claimed at delivery) asks for the
brief answer, whose ACCEPT it only counts; any other answer is the full one and is handled as
before; a server that does not offer the extension gets no ``brief``."""
from __future__ import annotations

import logging
from typing import Any

import pytest
import requests

from sync_worker import sockets

from tests.helpers import wait_for
from tests.worker import worker_tasks as wt
from tests.worker.test_worker_claim_at_delivery import _states, frames  # noqa: F401 - a fixture

_ = frames


@pytest.fixture
def answers(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every ``set_state_result`` the worker's subscription reader reads."""
    seen: list[dict[str, Any]] = []
    original = sockets.Connection._dispatch

    def dispatch(self: sockets.Connection, message: Any) -> None:
        if isinstance(message, dict) and message.get("type") == "set_state_result":
            seen.append(message)
        original(self, message)

    monkeypatch.setattr(sockets.Connection, "_dispatch", dispatch)
    return seen


def _final_states(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for f in frames if f.get("type") == "set_state" and f["state"]["type"] == "COMPLETED"]


def test_final_states_ask_for_the_brief_answer_and_the_runs_are_counted(server, api_env, frames, answers,
                                                                        start_worker):
    worker = start_worker(wt.add, limit=4)
    futures = [wt.add.delay(i, 10) for i in range(12)]
    assert [f.result(timeout=30) for f in futures] == [i + 10 for i in range(12)]
    finals = _final_states(frames)
    assert len(finals) == 12 and all(f.get("brief") is True for f in finals)
    wait_for(lambda: worker.finished_task_runs.get("tests.add") == 12, timeout=30,
             message="the worker counted its 12 runs")
    assert not any(worker.in_flight_task_runs.values())
    brief = [a for a in answers if a.get("result") == {"status": "ACCEPT"}]
    assert len(brief) == 12, answers
    for future in futures:
        assert [s[0] for s in _states(server, future.task_run_id)] == ["SCHEDULED", "RUNNING", "COMPLETED"]


def test_a_refused_brief_final_state_gets_the_full_answer_and_is_handled(server, api_env, frames, answers,
                                                                         start_worker, caplog):
    """The run is deleted while it executes: its COMPLETED is answered 404 (not brief), and the
    worker skips it as it does without the extension."""
    caplog.set_level(logging.WARNING, logger="sync_worker")
    wt.GATE.reset()
    worker = start_worker(wt.gated, limit=2)
    future = wt.gated.delay("doomed")
    wait_for(lambda: wt.GATE.current == 1, timeout=30, message="the run executing")
    response = requests.delete(f"{server.url}/task_runs/{future.task_run_id}", timeout=10)
    assert response.status_code == 204, response.text
    wt.GATE.opened.set()
    wait_for(lambda: worker.finished_task_runs.get("tests.gated") == 1, timeout=30,
             message="the worker done with the deleted run")
    assert [f.get("brief") for f in _final_states(frames)] == [True]
    refused = [a for a in answers if a.get("status_code") == 404]
    assert refused and refused[0]["detail"] == "Task not found" and "result" not in refused[0]
    assert "no longer exists on the server" in caplog.text
    assert not any(worker.in_flight_task_runs.values())


def test_a_server_without_the_extension_gets_no_brief(server_factory, tmp_path, monkeypatch, frames, answers,
                                                      start_worker):
    from sync_worker.server import subscriptions

    monkeypatch.setattr(subscriptions, "EXTENSIONS",
                        [e for e in subscriptions.EXTENSIONS if e != "brief_set_state"])
    server = server_factory()
    monkeypatch.setenv("SYNC_WORKER_API_URL", server.url)
    monkeypatch.setenv("SYNC_WORKER_STORAGE", str(tmp_path / "store"))
    worker = start_worker(wt.add, limit=2)
    futures = [wt.add.delay(i, 3) for i in range(4)]
    assert [f.result(timeout=30) for f in futures] == [i + 3 for i in range(4)]
    finals = _final_states(frames)
    assert len(finals) == 4 and not any("brief" in f for f in finals)
    wait_for(lambda: worker.finished_task_runs.get("tests.add") == 4, timeout=30, message="4 runs counted")
    accepted = [a for a in answers if a.get("status_code") == 201]
    assert len(accepted) == 4 and all(a["result"]["state"]["type"] == "COMPLETED" for a in accepted)
