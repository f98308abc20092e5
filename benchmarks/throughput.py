"""End-to-end throughput, latency, worker memory and import time of sync_worker.

Everything runs for real on this machine: the embedded server and one worker are
separate processes (``sync-worker server``, ``sync-worker worker``), this process submits
with ``.delay()``. Each variant gets a fresh server and database.

Measured per variant:
- submit/s: ``.delay()`` calls per second from ``--submitters`` threads;
- end-to-end runs/s: N / (first submit -> worker reports N runs finished), the worker
  already subscribed and idle before the first submit. Every run is durable: created in
  SQLite (WAL) before ``.delay()`` returns, and every state change committed;
- submit->start p50/p95: the server's ``start_time - created`` of every run;
- idle submit->result p50/p95: ``.delay()`` then ``.result()``, one at a time;
- worker RSS: VmHWM (peak) and VmRSS of the worker process at the end.

Variants: ``fast`` (the embedded server's extensions: runs created and awaited over its
rpc socket, delivery with credit flow control, states over the subscription socket) and
``rest`` (Prefect's protocol only: every create and state change an HTTP round trip,
results polled, one run per ack — what a Prefect server gets), and ``stdlib`` (``fast`` with
``SYNC_WORKER_JSON=stdlib`` in the server, the worker and this process's submitting side: the
path without orjson, see ``sync_worker/jsoncodec.py``),
run one after the other in the same invocation so their ratio is meaningful on a noisy
machine. The comparison with Dramatiq, Celery, RQ and Huey (interleaved rounds, medians,
ranges, CPU per process) is ``benchmarks/compare.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # this tree's sync_worker, and bench_tasks


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def start_server(tmp: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sync_worker", "server", "--port", "0", "--db", os.path.join(tmp, "bench.db"),
         "--log-level", "INFO"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=HERE.parent,
    )
    url_holder: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            match = re.search(r"(http://127\.0\.0\.1:\d+/api)", line)
            if match and not url_holder:
                url_holder.append(match.group(1))

    threading.Thread(target=read, daemon=True).start()
    url = wait_until(lambda: url_holder and url_holder[0], 30, "the server to listen")
    return proc, url


def start_worker(url: str, storage: str, limit: int, fast_path: bool, status_port: int) -> subprocess.Popen:
    env = dict(os.environ, SYNC_WORKER_API_URL=url, SYNC_WORKER_STORAGE=storage,
               SYNC_WORKER_FAST_PATH="true" if fast_path else "false",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "sync_worker", "worker", "bench_tasks:noop", "bench_tasks:echo",
         "--limit", str(limit), "--status-port", str(status_port), "--log-level", "WARNING"],
        cwd=HERE, env=env,
    )
    status = f"http://127.0.0.1:{status_port}/status"
    wait_until(lambda: _status(status) is not None, 30, "the worker's status server")
    return proc


def _status(url: str) -> dict | None:
    try:
        return requests.get(url, timeout=2).json()
    except requests.RequestException:
        return None


def finished(status_url: str) -> int:
    status = _status(status_url) or {}
    return sum((status.get("finished") or {}).values())


def rss_mb(pid: int) -> tuple[float, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0]) / 1024
    return fields.get("VmHWM", 0.0), fields.get("VmRSS", 0.0)


def cpu_seconds(pid: int | None = None) -> float:
    """user+system CPU seconds of a process (this one by default): unlike wall time, not
    inflated by other work on a shared machine."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


#: SYNC_WORKER_JSON as this script was started with (the "stdlib" variant overrides it)
_JSON_SETTING = os.environ.get("SYNC_WORKER_JSON")


def run_variant(name: str, fast_path: bool, runs: int, limit: int, submitters: int, samples: int) -> dict:
    import importlib

    from sync_worker import jsoncodec

    # "stdlib": the server and worker inherit the variable; this process's sockets look
    # jsoncodec.dumps/loads up at each call, so reloading the module switches them too
    setting = "stdlib" if name == "stdlib" else _JSON_SETTING
    if setting is None:
        os.environ.pop("SYNC_WORKER_JSON", None)
    else:
        os.environ["SYNC_WORKER_JSON"] = setting
    importlib.reload(jsoncodec)
    from sync_worker.client import Client
    from sync_worker.storage import LocalDirectoryStore

    import bench_tasks

    # the submitting side follows the variant too: "rest" is what a Prefect server gets
    os.environ["SYNC_WORKER_FAST_PATH"] = "true" if fast_path else "false"
    with tempfile.TemporaryDirectory(prefix=f"sync-worker-bench-{name}-") as tmp:
        storage = os.path.join(tmp, "records")
        server, url = start_server(tmp)
        status_port = free_port()
        worker = None
        try:
            worker = start_worker(url, storage, limit, fast_path, status_port)
            status_url = f"http://127.0.0.1:{status_port}/status"
            client = Client(url)
            store = LocalDirectoryStore(storage)
            ids: list[str] = []
            lock = threading.Lock()

            def submit(count: int) -> None:
                mine = [bench_tasks.noop.apply_async(client=client, store=store).task_run_id for _ in range(count)]
                with lock:
                    ids.extend(mine)

            shares = [runs // submitters + (1 if i < runs % submitters else 0) for i in range(submitters)]
            threads = [threading.Thread(target=submit, args=(share,)) for share in shares]
            cpu_before = (cpu_seconds(server.pid), cpu_seconds(worker.pid), cpu_seconds())
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            submitted = time.perf_counter()
            wait_until(lambda: finished(status_url) >= runs, 600, f"{runs} runs to finish", interval=0.002)
            done = time.perf_counter()
            cpu_after = (cpu_seconds(server.pid), cpu_seconds(worker.pid), cpu_seconds())
            cpu_ms = [1000 * (after - before) / runs for before, after in zip(cpu_before, cpu_after, strict=True)]

            sample = ids[:: max(1, len(ids) // 500)]
            start_delays = []
            for run_id in sample:
                run = client.read_task_run(run_id)
                assert run.state.is_completed(), f"{run_id} ended {run.state}"
                start_delays.append((run.start_time - run.created).total_seconds() * 1000)

            latencies = []
            for i in range(samples):
                t0 = time.perf_counter()
                future = bench_tasks.echo.apply_async((i,), client=client, store=store)
                value = future.result(timeout=30)
                latencies.append((time.perf_counter() - t0) * 1000)
                assert value == i
            hwm, rss = rss_mb(worker.pid)
        finally:
            for proc in (worker, server):
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
    return {
        "system": "sync_worker", "variant": name, "runs": runs, "durable": True, "json": jsoncodec.BACKEND,
        "enqueue_per_s": runs / (submitted - started),
        "e2e_runs_per_s": runs / (done - started),
        "start_p50_ms": statistics.median(start_delays), "start_p95_ms": percentile(start_delays, 0.95),
        "latency_p50_ms": statistics.median(latencies), "latency_p95_ms": percentile(latencies, 0.95),
        "worker_rss_mb": rss, "worker_peak_rss_mb": hwm,
        "cpu_ms_per_run": {"server": cpu_ms[0], "worker": cpu_ms[1], "submitter": cpu_ms[2]},
        "loadavg_1m": os.getloadavg()[0],
    }


def import_time_ms(repeat: int = 7) -> float:
    code = "import time; t = time.perf_counter(); import sync_worker; print(time.perf_counter() - t)"
    times = [float(subprocess.check_output([sys.executable, "-c", code], text=True)) for _ in range(repeat)]
    return statistics.median(times) * 1000


def table(rows: list[dict]) -> str:
    base = next((r["e2e_runs_per_s"] for r in rows if r["system"] == "sync_worker" and r["variant"] == "fast"), None)
    head = "| system | variant | durable | submit/s | end-to-end runs/s | vs sync_worker fast | idle p50 / p95 ms | worker RSS MB |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        ratio = f"{r['e2e_runs_per_s'] / base:.2f}x" if base else "-"
        lines.append(
            f"| {r['system']} | {r['variant']} | {'yes' if r.get('durable') else 'no'} | {r['enqueue_per_s']:,.0f} | "
            f"{r['e2e_runs_per_s']:,.0f} | {ratio} | {r['latency_p50_ms']:.1f} / {r['latency_p95_ms']:.1f} | "
            f"{r['worker_rss_mb']:.1f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--runs", type=int, default=5000, help="no-op runs per variant (default 5000)")
    parser.add_argument("--limit", type=int, default=10, help="the worker's concurrency limit (default 10)")
    parser.add_argument("--submitters", type=int, default=4, help="threads calling .delay() (default 4)")
    parser.add_argument("--samples", type=int, default=200, help="sequential runs for idle latency (default 200)")
    parser.add_argument("--variants", default="fast,rest", help="comma-separated: fast, rest, stdlib "
                        "(default fast,rest)")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    args = parser.parse_args()

    rows = []
    for variant in args.variants.split(","):
        rows.append(run_variant(variant, variant in ("fast", "stdlib"), args.runs, args.limit, args.submitters, args.samples))
        print(f"# {variant}: {json.dumps(rows[-1])}", file=sys.stderr)
    imported = import_time_ms()
    if args.json:
        for row in rows:
            print(json.dumps(row))
        print(json.dumps({"import_sync_worker_ms": imported}))
        return 0
    print(table(rows))
    print()
    for r in rows:
        if r["system"] == "sync_worker":
            cpu = r["cpu_ms_per_run"]
            print(f"{r['variant']}: submit->start p50 {r['start_p50_ms']:.1f} ms, p95 {r['start_p95_ms']:.1f} ms; "
                  f"worker peak RSS {r['worker_peak_rss_mb']:.1f} MB; CPU ms per run: server {cpu['server']:.2f}, "
                  f"worker {cpu['worker']:.2f}, submitter {cpu['submitter']:.2f}; JSON {r['json']} "
                  f"(load avg {r['loadavg_1m']:.1f})")
    print(f"import sync_worker: {imported:.1f} ms (median of 7 fresh interpreters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
