"""Throughput of sync_worker's worker vs Prefect's own TaskWorker on ONE real Prefect server.

    python benchmarks/prefect_compare.py [--runs 200] [--limit 10] [--rounds 3] [--baseline-src DIR]

Needs prefect installed (``tox -e prefect`` installs prefect==3.8.8 + fastapi==0.140.0; or
``pip install prefect==3.8.8 fastapi==0.140.0``). The script starts a Prefect server on a free
127.0.0.1 port with a temporary PREFECT_HOME, and for each side:

1. submits N runs of a no-op task (``.delay()`` in a subprocess), with no worker running;
2. starts the worker in a subprocess (sync_worker: a ``TaskWorker`` with this tree on
   PYTHONPATH, or the ``--baseline-src`` tree; Prefect: ``prefect.task_worker.serve``), all
   with the same concurrency limit;
3. waits until Prefect's API shows all N runs COMPLETED, and computes throughput from the
   API's own timestamps: N / (last end_time - first start_time). Process start-up and
   imports are therefore not counted for either side. CPU per run (from /proc, user +
   system) is reported for the worker process and for the Prefect server process, from the
   first COMPLETED run to the last (start-up not counted), per run completed in that span:
   robust to a loaded machine where runs/s is not.

Rounds are interleaved: each round starts a fresh Prefect server and measures every side on
it, the side that goes first rotating from round to round (machine load drifts). It prints
runs/s and CPU for each side per round, and the median ratio with its range. Every wait is
bounded; the servers and the subprocesses are stopped at the end of each round.
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


def wait_completed(api: str, name: str, n: int, timeout: float, interval: float = 0.25) -> int:
    """Wait until at least ``n`` runs are COMPLETED; how many are."""
    deadline = time.monotonic() + timeout
    done = 0
    while time.monotonic() < deadline:
        done = count_completed(api, name)
        if done >= n:
            return done
        time.sleep(interval if n > 1 else 0.02)
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


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a live process and its live descendants, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry)] = fields
        children.setdefault(int(fields[1]), []).append(int(entry))
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        fields = stats.get(current)
        if fields is not None:
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        todo.extend(children.get(current, []))
    return total


def sync_worker_scripts(home: Path, name: str, n: int, limit: int) -> tuple[Path, Path]:
    """The submit and worker scripts of a sync_worker side (run with its tree on PYTHONPATH)."""
    script(home, f"{name}_tasks.py", f"""
        from sync_worker import task

        @task(name={name!r}, task_key={("bench-" + name)!r})
        def noop() -> None:
            return None
    """)
    submit = script(home, f"{name}_submit.py", f"""
        import time
        from sync_worker import APIError
        from {name}_tasks import noop

        for _ in range({n}):
            for attempt in range(20):  # Prefect on SQLite answers 503 when busy; its own client retries
                try:
                    noop.delay()
                    break
                except APIError as exc:
                    if exc.status_code != 503 or attempt == 19:
                        raise
                    time.sleep(0.05 * (attempt + 1))
    """)
    serve = script(home, f"{name}_serve.py", f"""
        from sync_worker import TaskWorker
        from {name}_tasks import noop

        TaskWorker(noop, limit={limit}).start()
    """)
    return submit, serve


def prefect_scripts(home: Path, n: int, limit: int) -> tuple[Path, Path]:
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
    return submit, serve


def bench_side(side: str, api: str, home: Path, server: subprocess.Popen, n: int, limit: int,
               baseline_src: Path | None) -> dict:
    """Submit ``n`` runs with no worker, then start the side's worker in a subprocess and
    wait until Prefect's API shows them COMPLETED. Returns runs/s (API timestamps) and the
    CPU per run of the worker process and of the Prefect server while the worker ran."""
    env = client_env(api, home)
    if side == "prefect":
        name = PF_NAME
        submit, serve = prefect_scripts(home, n, limit)
    else:
        name = SW_NAME if side == "sync_worker" else SW_NAME + "_baseline"
        tree = Path(__file__).resolve().parents[1] if side == "sync_worker" else baseline_src
        env.update(PYTHONPATH=str(tree), SYNC_WORKER_API_URL=api, SYNC_WORKER_STORAGE=str(home / "storage"))
        submit, serve = sync_worker_scripts(home, name, n, limit)
    subprocess.run([sys.executable, str(submit)], env=env, cwd=str(home), check=True, timeout=max(300, 2 * n),
                   stdout=subprocess.DEVNULL)
    with open(home / f"{side}-worker.log", "wb") as log:
        worker = subprocess.Popen([sys.executable, str(serve)], env=env, cwd=str(home), stdout=subprocess.DEVNULL,
                                  stderr=log, start_new_session=True)
    try:
        # CPU is counted from the first COMPLETED run on (not the worker's imports and
        # start-up), over the runs completed after it
        first = wait_completed(api, name, 1, timeout=max(120, 2 * n))
        worker_before, server_before = proc_cpu(worker.pid), proc_cpu(server.pid)
        wait_completed(api, name, n, timeout=max(120, 2 * n))
        worker_cpu = proc_cpu(worker.pid) - worker_before
        server_cpu = proc_cpu(server.pid) - server_before
    finally:
        stop(worker)
    counted = max(1, n - first)
    return {"runs_per_s": n / span_seconds(api, name), "worker_cpu_ms": 1000 * worker_cpu / counted,
            "server_cpu_ms": 1000 * server_cpu / counted}


def one_round(n: int, limit: int, order: list[str], baseline_src: Path | None) -> dict[str, dict]:
    """Every side, in ``order``, on one fresh Prefect server."""
    with tempfile.TemporaryDirectory(prefix="prefect-compare-") as tmp:
        home = Path(tmp)
        server, api = start_server(home)
        try:
            return {side: bench_side(side, api, home, server, n, limit, baseline_src) for side in order}
        finally:
            stop(server)


def _median(values: list[float]) -> float:
    values = sorted(values)
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200, help="no-op runs per side (default 200)")
    parser.add_argument("--limit", type=int, default=10, help="worker concurrency limit for all (default 10)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds, fresh server each (default 1)")
    parser.add_argument("--baseline-src", type=Path, default=None,
                        help="also measure sync_worker from this tree (e.g. an older commit) in the same rounds")
    args = parser.parse_args()
    sides = ["sync_worker", "prefect"] + (["baseline"] if args.baseline_src else [])
    rounds = []
    for index in range(args.rounds):
        order = sides[index % len(sides):] + sides[:index % len(sides)]  # who goes first rotates
        result = one_round(args.runs, args.limit, order, args.baseline_src)
        row = {"round": index + 1, "order": order}
        for side in sides:
            row[side] = {key: round(value, 2) for key, value in result[side].items()}
        row["ratio"] = round(result["sync_worker"]["runs_per_s"] / result["prefect"]["runs_per_s"], 2)
        if args.baseline_src:
            row["ratio_vs_baseline"] = round(result["sync_worker"]["runs_per_s"] / result["baseline"]["runs_per_s"], 2)
        rounds.append(row)
        print(json.dumps(row), flush=True)
    summary: dict = {"runs": args.runs, "limit": args.limit, "rounds": args.rounds}
    for key in ["ratio"] + (["ratio_vs_baseline"] if args.baseline_src else []):
        values = [r[key] for r in rounds]
        summary[key] = {"median": round(_median(values), 2), "min": min(values), "max": max(values)}
    for side in sides:
        for metric in ("runs_per_s", "worker_cpu_ms", "server_cpu_ms"):
            values = [r[side][metric] for r in rounds]
            summary[f"{side}_{metric}"] = {"median": round(_median(values), 2), "min": min(values), "max": max(values)}
    print(json.dumps(summary))
    ratio = summary["ratio"]
    print(f"ratio sync_worker/Prefect: median {ratio['median']:.2f} over {args.rounds} round(s) "
          f"(range {ratio['min']:.2f}-{ratio['max']:.2f})")
    for side in sides:
        print(f"{side}: {summary[side + '_runs_per_s']['median']:.1f} runs/s, CPU per run: worker "
              f"{summary[side + '_worker_cpu_ms']['median']:.2f} ms, Prefect server "
              f"{summary[side + '_server_cpu_ms']['median']:.2f} ms (medians)")


if __name__ == "__main__":
    main()
