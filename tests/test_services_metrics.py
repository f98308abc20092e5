"""The client metrics server: a real HTTP server on a free port, scraped with requests."""
from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client import REGISTRY

from sync_worker import metrics
from sync_worker.services import (
    ClientMetricsPortInUse,
    critical_service_loop,
    start_client_metrics_server,
    stop_client_metrics_server,
)
from tests.helpers import free_port


def scrape(port: int) -> str:
    response = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    response.raise_for_status()
    return response.text


def sample(text: str, series: str) -> float | None:
    """The value of one exposed series (name with labels, as in the exposition text)."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split(" ")[1])
    return None


def port_is_closed(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


@pytest.fixture
def metrics_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """Metrics enabled on a free port; the server is stopped after the test."""
    for name in ("PREFECT_CLIENT_METRICS_ENABLED", "PREFECT_CLIENT_METRICS_PORT"):
        monkeypatch.delenv(name, raising=False)
    port = free_port()
    monkeypatch.setenv("SYNC_WORKER_CLIENT_METRICS_ENABLED", "true")
    monkeypatch.setenv("SYNC_WORKER_CLIENT_METRICS_PORT", str(port))
    stop_client_metrics_server()
    try:
        yield port
    finally:
        stop_client_metrics_server()


def server_threads() -> set[threading.Thread]:
    """Threads running an HTTP server's serve_forever (by name on 3.10+, by target on 3.9)."""

    def serves(t: threading.Thread) -> bool:
        target = getattr(t, "_target", None)
        return "serve_forever" in t.name or getattr(target, "__name__", "") == "serve_forever"

    return {t for t in threading.enumerate() if serves(t)}


def test_scrape_shows_a_counter_moved_by_the_service_loop(metrics_env: int) -> None:
    assert start_client_metrics_server(addr="127.0.0.1") == metrics_env
    series = 'sync_worker_service_loop_errors_total{exception="ConnectionRefusedError"}'
    before = sample(scrape(metrics_env), series) or 0.0

    closed = free_port()

    def workload() -> None:
        socket.create_connection(("127.0.0.1", closed), timeout=5).close()

    for _ in range(2):
        critical_service_loop(workload, 1, run_once=True, printer=pytest.fail)
    text = scrape(metrics_env)
    assert sample(text, series) == before + 2
    # Every metric of the contract is exposed with its Prometheus name and type.
    for line in (
        "# TYPE sync_worker_task_runs_received_total counter",
        "# TYPE sync_worker_task_runs_in_flight gauge",
        "# TYPE sync_worker_free_slots gauge",
        "# TYPE sync_worker_task_run_duration_seconds histogram",
        "# TYPE sync_worker_subscription_reconnects_total counter",
    ):
        assert line in text


def test_a_worker_side_metric_shows_with_its_labels(metrics_env: int) -> None:
    start_client_metrics_server(addr="127.0.0.1")
    key = "tests.test_services_metrics:scraped"
    metrics.RUNS_COMPLETED.labels(task_key=key).inc(3)
    metrics.RUN_DURATION.labels(task_key=key).observe(0.2)
    text = scrape(metrics_env)
    assert sample(text, f'sync_worker_task_runs_completed_total{{task_key="{key}"}}') == 3.0
    assert sample(text, f'sync_worker_task_run_duration_seconds_count{{task_key="{key}"}}') == 1.0


def test_disabled_by_default_starts_nothing(metrics_env: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SYNC_WORKER_CLIENT_METRICS_ENABLED")
    threads = server_threads()
    assert start_client_metrics_server(addr="127.0.0.1") is None
    assert port_is_closed(metrics_env)
    assert server_threads() == threads


def test_prefect_setting_enables_it(metrics_env: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SYNC_WORKER_CLIENT_METRICS_ENABLED")
    monkeypatch.setenv("PREFECT_CLIENT_METRICS_ENABLED", "true")
    assert start_client_metrics_server(addr="127.0.0.1") == metrics_env
    assert "sync_worker_service_loop_errors" in scrape(metrics_env)


def test_starting_twice_is_harmless(metrics_env: int) -> None:
    threads = server_threads()
    assert start_client_metrics_server(addr="127.0.0.1") == metrics_env
    started = server_threads() - threads
    assert len(started) == 1
    # Again, and from many threads at once: the same server, no new thread, no error.
    assert start_client_metrics_server(addr="127.0.0.1") == metrics_env
    with ThreadPoolExecutor(max_workers=8) as pool:
        ports = list(pool.map(lambda _: start_client_metrics_server(addr="127.0.0.1"), range(16)))
    assert ports == [metrics_env] * 16
    assert server_threads() - threads == started
    assert scrape(metrics_env)


def test_stop_joins_the_thread_and_closes_the_port(metrics_env: int) -> None:
    threads = server_threads()
    start_client_metrics_server(addr="127.0.0.1")
    (thread,) = server_threads() - threads
    assert scrape(metrics_env)

    stop_client_metrics_server()
    assert not thread.is_alive()
    assert port_is_closed(metrics_env)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{metrics_env}/metrics", timeout=5)
    stop_client_metrics_server()  # stopping again is harmless

    # The port was released: it can start again on the same port.
    assert start_client_metrics_server(addr="127.0.0.1") == metrics_env
    assert scrape(metrics_env)


def test_default_address_is_local_only(metrics_env: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """(issue 9) The metrics name task keys: bound to 127.0.0.1 unless
    SYNC_WORKER_CLIENT_METRICS_HOST says otherwise."""
    from sync_worker import services

    monkeypatch.delenv("SYNC_WORKER_CLIENT_METRICS_HOST", raising=False)
    start_client_metrics_server()
    assert scrape(metrics_env)
    assert services._metrics_server[0].server_address[0] == "127.0.0.1"
    stop_client_metrics_server()
    monkeypatch.setenv("SYNC_WORKER_CLIENT_METRICS_HOST", "0.0.0.0")
    start_client_metrics_server()
    assert services._metrics_server[0].server_address[0] == "0.0.0.0"
    with socket.create_connection(("127.0.0.1", metrics_env), timeout=5) as conn:
        assert conn.getpeername()[1] == metrics_env


def test_port_in_use_is_a_clear_error(metrics_env: int) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", metrics_env))
        blocker.listen(1)
        with pytest.raises(ClientMetricsPortInUse) as info:
            start_client_metrics_server(addr="127.0.0.1")
    message = str(info.value)
    assert f"client metrics port {metrics_env} is in use" in message
    assert "SYNC_WORKER_CLIENT_METRICS_PORT" in message
    assert "SYNC_WORKER_CLIENT_METRICS_ENABLED=false" in message
    assert isinstance(info.value, OSError)
    # Nothing half-started: once the port is free, starting works.
    assert start_client_metrics_server(addr="127.0.0.1") == metrics_env
    assert scrape(metrics_env)


# ---------------------------------------------------------------------------------------
# End to end: a worker's runs, as a Prometheus scrape sees them
# ---------------------------------------------------------------------------------------


def _poll(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_worker_runs_move_the_scraped_counters(
    metrics_env: int, server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sync_worker.exceptions import TaskRunFailed
    from sync_worker.schemas import StateType
    from sync_worker.tasks import task
    from sync_worker.worker import TaskWorker

    for name in ("SYNC_WORKER_API_AUTH_STRING", "PREFECT_API_AUTH_STRING", "SYNC_WORKER_API_KEY", "PREFECT_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SYNC_WORKER_API_URL", server.url)
    monkeypatch.setenv("SYNC_WORKER_STORAGE", str(tmp_path / "records"))

    # Keys unique to this test run, so the labelled series start from nothing.
    suffix = uuid.uuid4().hex[:8]

    @task(task_key=f"tests.metrics.double.{suffix}")
    def double(x: int) -> int:
        return 2 * x

    @task(task_key=f"tests.metrics.boom.{suffix}")
    def boom() -> None:
        raise ValueError("boom")

    def series(name: str, key: str) -> str:
        return f'{name}{{task_key="{key}"}}'

    baseline = scrape_or_none(metrics_env)
    assert baseline is None  # nothing listens before the worker starts it

    in_flight_before = REGISTRY.get_sample_value("sync_worker_task_runs_in_flight")
    runs = 5
    futures = [double.delay(i) for i in range(runs)]
    failing = boom.delay()
    worker = TaskWorker(double, boom, limit=3).start(block=False)
    try:
        assert [f.result(timeout=60) for f in futures] == [0, 2, 4, 6, 8]
        with pytest.raises(TaskRunFailed):
            failing.result(timeout=60)
        assert failing.state.type == StateType.FAILED
        # The worker started the metrics server (enabled through the environment).
        text = scrape(metrics_env)
        d, b = double.task_key, boom.task_key
        assert sample(text, series("sync_worker_task_runs_received_total", d)) == runs
        assert sample(text, series("sync_worker_task_runs_started_total", d)) == runs
        # A future resolves when the server records COMPLETED; the counter moves just
        # after the worker hears back, so poll briefly.
        assert _poll(lambda: sample(scrape(metrics_env), series("sync_worker_task_runs_completed_total", d)) == runs)
        text = scrape(metrics_env)
        assert sample(text, series("sync_worker_task_run_duration_seconds_count", d)) == runs
        assert sample(text, series("sync_worker_task_runs_failed_total", d)) in (None, 0.0)
        assert sample(text, series("sync_worker_task_runs_received_total", b)) == 1
        assert sample(text, series("sync_worker_task_runs_started_total", b)) == 1
        assert _poll(lambda: sample(scrape(metrics_env), series("sync_worker_task_runs_failed_total", b)) == 1)
        assert sample(scrape(metrics_env), series("sync_worker_task_runs_completed_total", b)) in (None, 0.0)
        assert (sample(text, "sync_worker_subscription_connects_total") or 0) >= 1
    finally:
        worker.stop()
        assert worker.join(30), "worker did not stop within 30 s"
    # Nothing left in flight once the worker has drained.
    assert _poll(lambda: sample(scrape(metrics_env), "sync_worker_task_runs_in_flight") == in_flight_before)


def scrape_or_none(port: int) -> str | None:
    try:
        return scrape(port)
    except requests.ConnectionError:
        return None


def test_labelled_updates_reuse_their_child_and_still_reach_the_registry() -> None:
    """labels() answers from the metric's own dict after the first call; remove()/clear()
    forget it, so a removed series starts again from zero instead of moving a ghost."""
    key = f"tests.cached-{uuid.uuid4().hex}"
    name = "sync_worker_task_runs_started_total"
    child = metrics.RUNS_STARTED.labels(task_key=key)
    assert metrics.RUNS_STARTED.labels(task_key=key) is child
    metrics.RUNS_STARTED.labels(task_key=key).inc()
    metrics.RUNS_STARTED.labels(key).inc(2)
    assert REGISTRY.get_sample_value(name, {"task_key": key}) == 3
    metrics.RUNS_STARTED.remove(key)
    assert REGISTRY.get_sample_value(name, {"task_key": key}) is None
    metrics.RUNS_STARTED.labels(task_key=key).inc()
    assert REGISTRY.get_sample_value(name, {"task_key": key}) == 1
    metrics.RUN_DURATION.labels(task_key=key).observe(0.5)
    metrics.RUN_DURATION.labels(task_key=key).observe(1.5)
    assert REGISTRY.get_sample_value("sync_worker_task_run_duration_seconds_sum", {"task_key": key}) == 2.0
    metrics.RUNS_STARTED.remove(key)
    metrics.RUN_DURATION.remove(key)
    with pytest.raises(ValueError):
        metrics.RUNS_STARTED.labels(task_key=key, other="x")
