"""``sync-worker demo``: the whole system end to end on one machine, in one command.

It starts the embedded server (temporary SQLite database, free port), a worker in a
separate process — as you would run it in production — submits a batch of runs from this
process, and prints what came back. Nothing to set up beforehand.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sync_worker.tasks import task


@task(task_key="sync_worker.demo.add")
def add(x: int, y: int) -> int:
    return x + y


@task(task_key="sync_worker.demo.flaky", retries=2, retry_delay_seconds=0.2)
def flaky(marker: str) -> str:
    """Fails on its first attempt, then succeeds: shows a retry through the server's queue."""
    path = Path(marker)
    if not path.exists():
        path.write_text("failed once")
        raise RuntimeError("first attempt fails on purpose")
    return "succeeded after a retry"


@task(task_key="sync_worker.demo.divide")
def divide(x: float, y: float) -> float:
    return x / y


def _say(text: str = "") -> None:
    print(text, flush=True)


def run_demo(runs: int = 20, limit: int | None = 10, log_level: str = "ERROR") -> int:
    """Run the demo; ``limit`` is the worker's concurrency limit (None: no limit, as
    ``sync-worker worker --limit none``)."""
    from sync_worker.cli_support import require_server_extra
    from sync_worker.exceptions import TaskRunFailed

    require_server_extra("sync-worker demo")
    from sync_worker.server import Server

    with tempfile.TemporaryDirectory(prefix="sync-worker-demo-") as tmp:
        server = Server(host="127.0.0.1", port=0, database=os.path.join(tmp, "demo.db")).start()
        os.environ["SYNC_WORKER_API_URL"] = server.url
        os.environ["SYNC_WORKER_STORAGE"] = os.path.join(tmp, "records")
        shown_limit = "none" if limit is None else str(limit)
        _say(f"embedded server: {server.url} (database {tmp}/demo.db)")
        worker = subprocess.Popen(
            [sys.executable, "-m", "sync_worker", "worker", "sync_worker.demo:add", "sync_worker.demo:flaky",
             "sync_worker.demo:divide", "--limit", shown_limit, "--log-level", log_level],
            env=dict(os.environ),
        )
        _say(f"worker process: pid {worker.pid}, limit {shown_limit}")
        try:
            started = time.perf_counter()
            futures = [add.delay(i, i * i) for i in range(runs)]
            retried = flaky.delay(os.path.join(tmp, "flaky-marker"))
            failing = divide.delay(1, 0)
            _say(f"submitted {runs + 2} runs in {time.perf_counter() - started:.3f}s")
            _say()
            for i, future in enumerate(futures):
                _say(f"  add({i}, {i * i}) = {future.result(timeout=60)}")
            _say(f"  flaky(...) = {retried.result(timeout=60)!r} (state {retried.state.name}, "
                 f"after {retried.task_run.run_count} attempts)")
            try:
                divide_result = failing.result(timeout=60)
                _say(f"  divide(1, 0) unexpectedly returned {divide_result!r}")
                return 1
            except TaskRunFailed as exc:
                _say(f"  divide(1, 0) failed as expected: {exc.state.message}")
            elapsed = time.perf_counter() - started
            _say()
            _say(f"{runs + 2} runs finished in {elapsed:.3f}s")
        finally:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
            try:
                code = worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                code = worker.wait()
            server.stop()
        _say(f"worker stopped (exit code {code}); server stopped")
        return 0 if code == 0 else 1
