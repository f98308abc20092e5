"""The final state of a run claimed at delivery is sent without waiting for its answer (real
server, real worker, real sockets): the run thread is free at once and the socket's reader
handles the answer. What must still hold: an answer that never comes (the connection ends
first) gets the state proposed again and reported once; a stopping worker keeps its
connection open until the answers of the states it sent are in."""
from __future__ import annotations

import threading
import time
from typing import Any

from sync_worker import sockets
from sync_worker.engine import Outcome
from sync_worker.schemas import StateType

from tests.helpers import wait_for
from tests.worker import worker_tasks as wt


def test_a_final_state_whose_connection_ends_before_the_answer_is_reported_once(api_env, start_worker, monkeypatch):
    sent: list[dict[str, Any]] = []
    original = sockets.Connection.request_async

    def request_async(self, message, on_answer, with_owed_credit=False):
        original(self, message, on_answer, with_owed_credit)
        if message.get("type") == "set_state" and not sent:
            sent.append(message)
            self.abort(sockets.ConnectionLost("injected: connection lost before the answer"))

    monkeypatch.setattr(sockets.Connection, "request_async", request_async)
    worker = start_worker(wt.add, limit=2)
    future = wt.add.delay(2, 3)
    assert future.result(timeout=60) == 5
    # the frame reaches the server (and the waiting caller its answer) before the run thread
    # is back from sending it and records it here: wait for that, do not assume it
    wait_for(lambda: sent, message="the final state sent without waiting")
    assert sent[0]["state"]["type"] == "COMPLETED"
    assert future.state.type is StateType.COMPLETED
    wait_for(lambda: worker.finished_task_runs.get("tests.add") == 1, message="the run counted finished")
    time.sleep(0.2)  # nothing else comes: counted once
    assert worker.finished_task_runs.get("tests.add") == 1
    assert not any(worker.in_flight_task_runs.values())


def test_a_stopping_worker_waits_for_the_answer_to_a_final_state_it_sent(api_env, start_worker, monkeypatch):
    outcomes: list[Outcome] = []
    answer_held = threading.Event()
    original_dispatch = sockets.Connection._dispatch

    def dispatch(self, message):
        if isinstance(message, dict) and message.get("type") == "set_state_result" and not answer_held.is_set():
            answer_held.set()
            time.sleep(1.0)  # the answer is late: the worker is stopped meanwhile
        original_dispatch(self, message)

    monkeypatch.setattr(sockets.Connection, "_dispatch", dispatch)
    worker = start_worker(wt.add, limit=2)
    original_run_done = worker._run_done

    def run_done(task, task_run, delivered):
        outcomes.append(task_run.id)
        original_run_done(task, task_run, delivered)

    monkeypatch.setattr(worker, "_run_done", run_done)
    future = wt.add.delay(1, 1)
    wait_for(answer_held.is_set, message="the final state's answer")
    worker.stop()
    assert worker.join(30)
    assert outcomes == [future.task_run_id]  # handled before the worker counted itself stopped
    assert worker.finished_task_runs.get("tests.add") == 1
    assert future.result(timeout=30) == 2
