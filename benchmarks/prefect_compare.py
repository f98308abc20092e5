"""Throughput of sync_worker's worker vs Prefect's own TaskWorker on ONE real Prefect server.

    python benchmarks/prefect_compare.py [--runs 200] [--limit 10] [--rounds 3]

Needs prefect installed (``tox -e prefect`` installs prefect==3.8.8 + fastapi==0.140.0; or
``pip install prefect==3.8.8 fastapi==0.140.0``). The script starts a Prefect server on a free
127.0.0.1 port with a temporary PREFECT_HOME, and for each side:

1. submits N runs of a no-op task (sync_worker: ``.delay()`` in this process; Prefect:
   ``.delay()`` in a subprocess), with no worker running;
2. starts the worker (sync_worker: a ``TaskWorker`` in this process; Prefect:
   ``prefect.task_worker.serve`` in a subprocess), both with the same concurrency limit;
3. waits until Prefect's API shows all N runs COMPLETED, and computes throughput from the
   API's own timestamps: N / (last end_time - first start_time). Process start-up and
   imports are therefore not counted for either side.

Rounds are interleaved: each round starts a fresh Prefect server and measures both sides on
it, the side that goes first alternating from round to round (machine load drifts). It prints
runs/s for each side per round, and the median ratio with its range. Every wait is bounded;
the servers and the subprocesses are stopped at the end of each round.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import datetime
from pathlib import Path

import requests

SW_NAME = "noop_sync_worker"
PF_NAME = "noop_prefect"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SYNC_WORKER_"))}


def start_server(home: Path, timeout: float = 120) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = clean_env()
    env.update(
        PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_UI_ENABLED="false",
        DO_NOT_TRACK="1", PREFECT_SERVER_LOGGING_LEVEL="WARNING",
        PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false", PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED="false",
        PREFECT_SERVER_SERVICES_FOREMAN_ENABLED="false",
    )
    with open(home / "server.log", "wb") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
             "--no-ui", "--analytics-off"],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    api = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"prefect server exited: {(home / 'server.log').read_text()[-3000:]}")
        try:
            if requests.get(f"{api}/health", timeout=2).ok:
                return process, api
        except requests.RequestException:
            pass
        time.sleep(0.2)
    stop(process)
    raise SystemExit(f"prefect server not healthy within {timeout}s")


def stop(process: subprocess.Popen, timeout: float = 15) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


def client_env(api: str, home: Path) -> dict[str, str]:
    env = clean_env()
    env.update(PREFECT_API_URL=api, PREFECT_HOME=str(home), PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(home / "storage"),
               DO_NOT_TRACK="1", PREFECT_LOGGING_LEVEL="WARNING", PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW="ignore")
    return env


def count_completed(api: str, name: str) -> int:
    body = {"task_runs": {"name": {"any_": [name]}, "state": {"type": {"any_": ["COMPLETED"]}}}}
    return requests.post(f"{api}/task_runs/count", json=body, timeout=30).json()


def wait_completed(api: str, name: str, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    done = 0
    while time.monotonic() < deadline:
        done = count_completed(api, name)
        if done >= n:
            return
        time.sleep(0.25)
    raise SystemExit(f"only {done}/{n} {name} runs COMPLETED after {timeout}s")


def span_seconds(api: str, name: str) -> float:
    """Last end_time - first start_time over the runs, from Prefect's API."""
    starts, ends, offset = [], [], 0
    while True:
        body = {"task_runs": {"name": {"any_": [name]}}, "limit": 200, "offset": offset}
        page = requests.post(f"{api}/task_runs/filter", json=body, timeout=30).json()
        for run in page:
            if run["start_time"] and run["end_time"]:
                starts.append(datetime.fromisoformat(run["start_time"].replace("Z", "+00:00")))
                ends.append(datetime.fromisoformat(run["end_time"].replace("Z", "+00:00")))
        if len(page) < 200:
            break
        offset += 200
    return (max(ends) - min(starts)).total_seconds()


def script(home: Path, name: str, source: str) -> Path:
    path = home / name
    path.write_text(textwrap.dedent(source))
    return path


def bench_sync_worker(api: str, home: Path, n: int, limit: int) -> float:
    os.environ.update(SYNC_WORKER_API_URL=api, SYNC_WORKER_STORAGE=str(home / "storage"))
    from sync_worker import APIError, TaskWorker, task

    @task(name=SW_NAME, task_key="bench-noop-sync-worker")
    def noop() -> None:
        return None

    for _ in range(n):
        for attempt in range(20):  # Prefect on SQLite answers 503 when busy; its own client retries
            try:
                noop.delay()
                break
            except APIError as exc:
                if exc.status_code != 503 or attempt == 19:
                    raise
                time.sleep(0.05 * (attempt + 1))
    worker = TaskWorker(noop, limit=limit).start(block=False)
    try:
        wait_completed(api, SW_NAME, n, timeout=max(120, n))
    finally:
        worker.stop()
        worker.join(30)
    return span_seconds(api, SW_NAME)


def bench_prefect(api: str, home: Path, n: int, limit: int) -> float:
    env = client_env(api, home)
    script(home, "bench_tasks.py", f"""
        from prefect import task

        @task(name={PF_NAME!r})
        def noop() -> None:
            return None
    """)
    submit = script(home, "bench_submit.py", f"""
        from bench_tasks import noop
        for _ in range({n}):
            noop.delay()
    """)
    serve = script(home, "bench_serve.py", f"""
        from prefect.task_worker import serve
        from bench_tasks import noop
        serve(noop, limit={limit})
    """)
    subprocess.run([sys.executable, str(submit)], env=env, cwd=str(home), check=True, timeout=max(300, 2 * n),
                   stdout=subprocess.DEVNULL)
    with open(home / "prefect-worker.log", "wb") as log:
        worker = subprocess.Popen([sys.executable, str(serve)], env=env, cwd=str(home), stdout=subprocess.DEVNULL,
                                  stderr=log, start_new_session=True)
    try:
        wait_completed(api, PF_NAME, n, timeout=max(120, 2 * n))
    finally:
        stop(worker)
    return span_seconds(api, PF_NAME)


def one_round(n: int, limit: int, prefect_first: bool) -> tuple[float, float]:
    """(ours, theirs) runs/s on one fresh Prefect server."""
    with tempfile.TemporaryDirectory(prefix="prefect-compare-") as tmp:
        home = Path(tmp)
        server, api = start_server(home)
        try:
            if prefect_first:
                theirs = bench_prefect(api, home, n, limit)
                ours = bench_sync_worker(api, home, n, limit)
            else:
                ours = bench_sync_worker(api, home, n, limit)
                theirs = bench_prefect(api, home, n, limit)
        finally:
            stop(server)
    return n / ours, n / theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200, help="no-op runs per side (default 200)")
    parser.add_argument("--limit", type=int, default=10, help="worker concurrency limit for both (default 10)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds, fresh server each (default 1)")
    args = parser.parse_args()
    rounds = []
    for index in range(args.rounds):
        ours_rate, theirs_rate = one_round(args.runs, args.limit, prefect_first=index % 2 == 1)
        rounds.append({"round": index + 1, "sync_worker_runs_per_s": round(ours_rate, 1),
                       "prefect_runs_per_s": round(theirs_rate, 1), "ratio": round(ours_rate / theirs_rate, 2)})
        print(json.dumps(rounds[-1]), flush=True)
    ratios = sorted(r["ratio"] for r in rounds)
    median = ratios[len(ratios) // 2] if len(ratios) % 2 else (ratios[len(ratios) // 2 - 1] + ratios[len(ratios) // 2]) / 2
    print(json.dumps({"runs": args.runs, "limit": args.limit, "rounds": args.rounds,
                      "median_ratio": round(median, 2), "min_ratio": ratios[0], "max_ratio": ratios[-1]}))
    print(f"ratio sync_worker/Prefect: median {median:.2f} over {args.rounds} round(s) "
          f"(range {ratios[0]:.2f}-{ratios[-1]:.2f})")


if __name__ == "__main__":
    main()
