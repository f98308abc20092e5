"""Fixtures of the worker tests: an environment pointing at a real embedded server, and
workers that are always stopped at teardown (threads) or killed (subprocesses)."""
from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sync_worker.worker import TaskWorker

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def api_env(server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point this process (and subprocess workers) at ``server`` with a fresh store."""
    env = {
        "SYNC_WORKER_API_URL": server.url,
        "SYNC_WORKER_STORAGE": str(tmp_path / "store"),
        "SYNC_WORKER_DRAIN_TIMEOUT": "30",
    }
    for name in ("SYNC_WORKER_API_AUTH_STRING", "PREFECT_API_AUTH_STRING", "SYNC_WORKER_API_KEY", "PREFECT_API_KEY",
                 "SYNC_WORKER_ALLOW_PICKLE", "SYNC_WORKER_FAST_PATH", "SYNC_WORKER_CLIENT_METRICS_ENABLED"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture(params=["fast_path", "rest"])
def state_path(request: pytest.FixtureRequest, api_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test once with states over the socket and once over REST only."""
    if request.param == "rest":
        monkeypatch.setenv("SYNC_WORKER_FAST_PATH", "false")
        api_env["SYNC_WORKER_FAST_PATH"] = "false"
    return request.param


@pytest.fixture
def start_worker() -> Iterator[Callable[..., TaskWorker]]:
    """``start_worker(*tasks, limit=...)``: a non-blocking TaskWorker stopped at teardown."""
    workers: list[TaskWorker] = []

    def start(*tasks: Any, **kwargs: Any) -> TaskWorker:
        worker = TaskWorker(*tasks, **kwargs).start(block=False)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        if worker.started:
            worker.stop()
        assert worker.join(30), "worker did not stop within 30 s"


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen]]:
    """``spawn(args, env)``: a subprocess in the repository root, killed at teardown."""
    procs: list[subprocess.Popen] = []

    def start(args: list[str], env: dict[str, str], **kwargs: Any) -> subprocess.Popen:
        full_env = {**os.environ, **env}
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        proc = subprocess.Popen(args, cwd=kwargs.pop("cwd", REPO), env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, **kwargs)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


@pytest.fixture
def prefect_like(server_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """An embedded server in its Prefect-compatible mode (no extensions announced), the
    client environment pointed at it."""
    server = server_factory(prefect_compatible=True, database=str(tmp_path / "prefect-like.db"))
    for name in ("SYNC_WORKER_API_AUTH_STRING", "PREFECT_API_AUTH_STRING", "SYNC_WORKER_API_KEY", "PREFECT_API_KEY",
                 "SYNC_WORKER_FAST_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SYNC_WORKER_API_URL", server.url)
    monkeypatch.setenv("SYNC_WORKER_STORAGE", str(tmp_path / "store"))
    return server
