"""What a worker process carries (issue 14: worker RSS): a ``sync-worker worker`` without the
client metrics server never imports prometheus-client (nothing could read its registry), one
with it records and serves its metrics as before; the status server's ``http.server`` is
imported only when asked for."""
from __future__ import annotations

import signal
import socket
import sys
import time
import urllib.request

from tests.helpers import wait_for
from tests.worker import perf_tasks

HEAVY = ["prometheus_client", "http.server", "wsgiref.simple_server"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(proc) -> None:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def test_a_cli_worker_without_client_metrics_does_not_import_prometheus(api_env, spawn):
    proc = spawn([sys.executable, "-m", "sync_worker", "worker", "tests.worker.perf_tasks:modules"], api_env)
    assert perf_tasks.modules.delay(HEAVY).result(timeout=60) == []
    _stop(proc)


def test_a_cli_worker_with_client_metrics_records_and_serves_them(api_env, spawn):
    port = _free_port()
    env = {**api_env, "SYNC_WORKER_CLIENT_METRICS_ENABLED": "true", "SYNC_WORKER_CLIENT_METRICS_PORT": str(port)}
    proc = spawn([sys.executable, "-m", "sync_worker", "worker", "tests.worker.perf_tasks:modules"], env)
    assert "prometheus_client" in perf_tasks.modules.delay(HEAVY).result(timeout=60)

    def scraped() -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return None
        line = 'sync_worker_task_runs_completed_total{task_key="tests.perf.modules"} 1.0'
        return text if line in text else None

    wait_for(scraped, message="the completed run in the worker's /metrics")
    _stop(proc)


def test_the_status_server_still_answers_with_its_lazy_import(api_env, spawn):
    port = _free_port()
    proc = spawn([sys.executable, "-m", "sync_worker", "worker", "tests.worker.perf_tasks:modules",
                  "--status-port", str(port)], api_env)
    assert "http.server" in perf_tasks.modules.delay(HEAVY).result(timeout=60)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=10) as response:
        assert response.status == 200 and b'"limit": 10' in response.read().replace(b'"limit":10', b'"limit": 10')
    _stop(proc)


def test_text_frame_is_byte_for_byte_what_websocket_client_sends():
    import os

    from websocket import ABNF

    from sync_worker.sockets import text_frame

    for length in (0, 1, 3, 4, 5, 125, 126, 127, 65535, 65536, 70001):
        payload = os.urandom(length // 2).hex().encode()[:length].ljust(length, b"x")
        key = os.urandom(4)
        frame = ABNF.create_frame(payload.decode(), ABNF.OPCODE_TEXT)
        frame.get_mask_key = lambda _n, key=key: key
        assert text_frame(payload, key) == frame.format(), length
        # and what a server reads back: the payload, unmasked
        assert ABNF.mask(key, text_frame(payload, key)[-length:] if length else b"") == payload


def test_a_run_delivered_while_every_thread_still_reports_starts_at_once(api_env, start_worker, monkeypatch):
    """limit=1: run A gave its slot back and its final state (carrying the credit for B) is
    sent, but A's thread is still busy reporting; B, delivered for that slot, must start now
    on another thread rather than wait for A's (the worker would hold a run it cannot start)."""
    from sync_worker import sockets

    perf_tasks.STARTED.clear()
    held: list[bool] = []
    reports: list[str] = []  # the runs whose final state was sent, in order: A's is the first
    original = sockets.Connection.request

    def is_a(message) -> bool:
        # not ``first.task_run_id``: the worker can finish A before ``delay()`` returns in
        # this thread (the server sends the run as it commits the create), so ``first``
        # may not be bound yet
        if message.get("type") != "set_state":
            return False
        reports.append(message.get("task_run_id"))
        return reports[0] == message.get("task_run_id")

    # (is_a is asked before the frame goes out: asked after, A's thread could be descheduled
    # between its send and the question while B is created, run and reported first)
    def request(self, message, timeout, with_owed_credit=False):
        a = is_a(message)
        reply = original(self, message, timeout, with_owed_credit)
        if a:
            # the frame and its credit went out; this thread keeps "reporting" until B runs
            held.append(wait_until_b())
        return reply

    def wait_until_b() -> bool:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if "b" in perf_tasks.STARTED:
                return True
            time.sleep(0.01)
        return False

    original_async = sockets.Connection.request_async

    def request_async(self, message, on_answer, with_owed_credit=False):
        # the final state sent without waiting for its answer: the same hold, after sending
        a = is_a(message)
        original_async(self, message, on_answer, with_owed_credit)
        if a:
            held.append(wait_until_b())

    monkeypatch.setattr(sockets.Connection, "request", request)
    monkeypatch.setattr(sockets.Connection, "request_async", request_async)
    start_worker(perf_tasks.note_start, limit=1)
    first = perf_tasks.note_start.delay("a")
    assert first.result(timeout=60) == "a"
    second = perf_tasks.note_start.delay("b")
    assert second.result(timeout=60) == "b"
    wait_for(lambda: held, message="run A's report to be let go")
    assert held == [True], "B did not start while A's thread was still reporting"
    assert reports[0] == first.task_run_id
