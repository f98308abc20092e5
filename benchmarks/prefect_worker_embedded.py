"""Prefect's own TaskWorker against `sync-worker server` and against `prefect server start`.

    python benchmarks/prefect_worker_embedded.py [--runs 200] [--rounds 5] [--limit 10]

Needs prefect installed (``tox -e prefect`` installs prefect==3.8.8 + fastapi==0.140.0; run
it with ``.tox/prefect/bin/python``). Both servers are started once, on free 127.0.0.1
ports with temporary homes; then, ``--rounds`` times, alternating the two servers:

1. a Prefect script submits N runs of a no-op Prefect task with Prefect's ``.delay()``;
2. Prefect's ``prefect.task_worker.serve(noop, limit=L)`` starts in a subprocess;
3. the script polls the runs (``GET /api/task_runs/{id}``, the same on both servers) until
   all are COMPLETED. A round in which no run completes for ``--stall-timeout`` seconds is a
   STALL (the worker deadlocked or lost runs): it is reported and the worker killed.

Throughput comes from the API's own timestamps: N / (last end_time - first start_time), so
process start-up is not counted. Prints one JSON line per round and a summary (median
runs/s per server, stalls).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
# the Prefect plumbing both Prefect benchmarks share (processes, environment, scripts)
from prefect_compare import clean_env, client_env, free_port, stop  # noqa: E402
from prefect_compare import script as write  # noqa: E402


def wait_healthy(process: subprocess.Popen, api: str, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited: {log.read_text()[-3000:]}")
        try:
            if requests.get(f"{api}/health", timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    stop(process)
    raise SystemExit(f"server not healthy within {timeout}s: {log.read_text()[-3000:]}")


def start_prefect_server(home: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = clean_env()
    env.update(
        PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_UI_ENABLED="false",
        DO_NOT_TRACK="1", PREFECT_SERVER_LOGGING_LEVEL="WARNING",
        PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false", PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED="false",
        PREFECT_SERVER_SERVICES_FOREMAN_ENABLED="false",
    )
    log = home / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
             "--no-ui", "--analytics-off"],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    api = f"http://127.0.0.1:{port}/api"
    wait_healthy(process, api, log)
    return process, api


def start_embedded_server(home: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = home / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "sync_worker", "server", "--port", str(port), "--db", str(home / "server.db"),
             "--log-level", "WARNING"],
            env=clean_env(), cwd=str(REPO), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    api = f"http://127.0.0.1:{port}/api"
    wait_healthy(process, api, log)
    return process, api


def one_round(api: str, home: Path, n: int, limit: int, stall_timeout: float) -> dict:
    """Submit n runs, start Prefect's worker, wait; returns the round's figures."""
    env = client_env(api, home)
    write(home, "bench_tasks.py", """
        from prefect import task

        @task
        def noop() -> None:
            return None
    """)
    submit = write(home, "bench_submit.py", f"""
        import json
        from bench_tasks import noop
        print(json.dumps([str(noop.delay().task_run_id) for _ in range({n})]))
    """)
    serve = write(home, "bench_serve.py", f"""
        from prefect.task_worker import serve
        from bench_tasks import noop
        serve(noop, limit={limit})
    """)
    done = subprocess.run([sys.executable, str(submit)], env=env, cwd=str(home), check=True, timeout=max(300, 2 * n),
                          stdout=subprocess.PIPE, text=True)
    pending = set(json.loads(done.stdout.strip().splitlines()[-1]))
    runs: dict[str, dict] = {}
    http = requests.Session()
    with open(home / "prefect-worker.log", "ab") as log:
        worker = subprocess.Popen([sys.executable, str(serve)], env=env, cwd=str(home), stdout=subprocess.DEVNULL,
                                  stderr=log, start_new_session=True)
    stalled = False
    try:
        last_progress = time.monotonic()
        while pending:
            for run_id in list(pending):
                run = http.get(f"{api}/task_runs/{run_id}", timeout=30).json()
                if run["state_type"] == "COMPLETED":
                    runs[run_id] = run
                    pending.discard(run_id)
                    last_progress = time.monotonic()
            if not pending:
                break
            if time.monotonic() - last_progress > stall_timeout:
                stalled = True
                break
            time.sleep(0.25)
    finally:
        if stalled:
            worker.kill()
            worker.wait(15)
        else:
            stop(worker)
    result: dict = {"completed": len(runs), "stalled": stalled}
    if runs:
        starts = [datetime.fromisoformat(r["start_time"].replace("Z", "+00:00")) for r in runs.values()]
        ends = [datetime.fromisoformat(r["end_time"].replace("Z", "+00:00")) for r in runs.values()]
        span = (max(ends) - min(starts)).total_seconds()
        result.update(seconds=round(span, 3), runs_per_s=round(len(runs) / span, 1) if span > 0 else None)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200, help="no-op runs per round (default 200)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per server (default 5)")
    parser.add_argument("--limit", type=int, default=10, help="Prefect worker's concurrency limit (default 10)")
    parser.add_argument("--stall-timeout", type=float, default=60.0,
                        help="seconds without a completed run after which a round counts as stalled (default 60)")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"embedded": [], "prefect": []}
    with tempfile.TemporaryDirectory(prefix="prefect-worker-embedded-") as tmp:
        homes = {name: Path(tmp) / name for name in results}
        for home in homes.values():
            home.mkdir()
        servers = {"embedded": start_embedded_server(homes["embedded"]), "prefect": start_prefect_server(homes["prefect"])}
        try:
            for round_no in range(1, args.rounds + 1):
                for name in ("embedded", "prefect"):
                    figures = one_round(servers[name][1], homes[name], args.runs, args.limit, args.stall_timeout)
                    results[name].append(figures)
                    print(json.dumps({"round": round_no, "server": name, **figures}), flush=True)
        finally:
            for process, _api in servers.values():
                stop(process)
    summary = {}
    for name, rounds in results.items():
        rates = [r["runs_per_s"] for r in rounds if not r["stalled"] and r.get("runs_per_s")]
        summary[name] = {"rounds": len(rounds), "stalls": sum(r["stalled"] for r in rounds),
                         "median_runs_per_s": round(statistics.median(rates), 1) if rates else None,
                         "min_runs_per_s": min(rates) if rates else None, "max_runs_per_s": max(rates) if rates else None}
    print(json.dumps({"runs": args.runs, "limit": args.limit, "summary": summary}))


if __name__ == "__main__":
    main()
