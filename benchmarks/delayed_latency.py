"""How late a delayed run starts: ``apply_async(countdown=...)`` -> the task's first line.

A real embedded server and a real worker (separate processes); this process submits
``--runs`` runs with countdowns spread over ``--spread`` seconds and reads back when each
one started (the task returns ``time.time()`` at its first line). Lateness = start - eta.
With ``--restart``, the server is stopped right after the submissions and started again on
the same database before the runs are due (durability of the schedule).

    python benchmarks/delayed_latency.py --runs 200 --spread 3
    python benchmarks/delayed_latency.py --runs 200 --spread 6 --restart
"""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from throughput import start_server, wait_until  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--spread", type=float, default=3.0, help="countdowns are 1 s + up to this many seconds")
    parser.add_argument("--restart", action="store_true")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="sync-worker-delayed-")
    atexit.register(shutil.rmtree, tmp, True)  # the database and files go when the script ends
    os.environ["SYNC_WORKER_STORAGE"] = os.path.join(tmp, "store")
    server, url = start_server(tmp)
    os.environ["SYNC_WORKER_API_URL"] = url
    from bench_tasks import started_at

    from sync_worker.client import Client
    from sync_worker.tasks import TaskRunFuture

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)])}

    def start_worker(api_url: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "sync_worker", "worker", "bench_tasks:started_at", "--limit",
                                 "20", "--log-level", "WARNING"], cwd=HERE, env={**env, "SYNC_WORKER_API_URL": api_url})
        wait_until(lambda: Client(api_url).read_workers(), 60, "the worker to subscribe", interval=0.05)
        return proc

    # with --restart the runs are due only after the restart and the worker's start (first at
    # `first` s): the schedule must survive in the database
    first = 8.0 if args.restart else 1.0
    worker = None if args.restart else start_worker(url)
    futures, etas = [], {}
    submitter = Client(url)
    for i in range(args.runs):
        countdown = first + args.spread * i / max(args.runs - 1, 1)
        future = started_at.apply_async((i,), countdown=countdown, client=submitter)
        created = future._last  # the create answer (reading the run again may find it started)
        etas[future.task_run_id] = created.state.state_details.scheduled_time.timestamp()
        futures.append(future)
    if args.restart:
        server.terminate()
        server.wait(30)
        server, url = start_server(tmp)
        worker = start_worker(url)
        assert min(etas.values()) > time.time(), "the restart took longer than the first countdown"
    client = Client(url)
    try:
        lateness = []
        lock = threading.Lock()
        for future in futures:
            started = TaskRunFuture(future.task_run_id, client=client).result(timeout=120)
            with lock:
                lateness.append(started - etas[future.task_run_id])
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(60)
        server.terminate()
        server.wait(60)
    lateness.sort()
    early = sum(1 for x in lateness if x < 0)
    print(f"runs={args.runs} restart={args.restart} early={early} "
          f"lateness ms: p50={1000 * statistics.median(lateness):.1f} "
          f"p95={1000 * lateness[int(0.95 * (len(lateness) - 1))]:.1f} max={1000 * lateness[-1]:.1f} "
          f"min={1000 * lateness[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
