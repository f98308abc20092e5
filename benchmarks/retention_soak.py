"""Soak: many runs with parameters through one embedded server with a short retention.

Shows that storage grows with live work, not with history: the database file (plus its WAL),
the record store directory and the server's memory level off instead of growing with the
number of runs. Everything is real: ``sync-worker server --retention ...`` and
``sync-worker worker`` are separate processes; this process submits ``bench.echo(i)`` (one
parameters record per run) in chunks and waits for each chunk to finish.

    python benchmarks/retention_soak.py --runs 100000 --retention 20s

Samples (start, every tenth of the runs, end, and after one more retention period):
runs submitted, runs in the database, database + WAL bytes, store directory bytes and files,
server VmRSS, and its RssAnon (heap: Python objects, SQLite's page caches, malloc arenas) and
RssFile (mapped files: the interpreter, shared libraries).

``--src DIR`` runs the server and the worker from another source tree (e.g. an extracted
baseline) so that two trees can be compared in the same session: run this script once per tree
and one at a time (the soak is CPU-heavy). The temporary directory (database, store) is removed
at the end unless ``--keep`` is given.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
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


def dir_size(path: Path) -> tuple[int, int]:
    total = files = 0
    for root, _dirs, names in os.walk(path):
        for name in names:
            try:
                total += (Path(root) / name).stat().st_size
                files += 1
            except FileNotFoundError:
                pass
    return total, files


def db_size(path: str) -> int:
    return sum(os.path.getsize(p) for p in (path, path + "-wal", path + "-shm") if os.path.exists(p))


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of a process, in KiB (0 when not readable)."""
    found = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            name = line.split(":", 1)[0]
            if name in found:
                found[name] = int(line.split()[1])
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--retention", default="20s")
    parser.add_argument("--chunk", type=int, default=2000, help="runs submitted before waiting for them")
    parser.add_argument("--submitters", type=int, default=4)
    parser.add_argument("--limit", type=int, default=20, help="the worker's concurrency limit")
    parser.add_argument("--src", default=str(REPO),
                        help="source tree the server and the worker run from (default: this one)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    src = Path(args.src).resolve()
    if not (src / "sync_worker" / "server").is_dir():
        parser.error(f"--src {args.src}: not a sync_worker source tree (no sync_worker/server in it)")

    from sync_worker.durations import parse_duration

    retention = parse_duration(args.retention)
    tmp = tempfile.mkdtemp(prefix="sync-worker-soak-")
    store = Path(tmp) / "store"
    store.mkdir()
    os.environ["SYNC_WORKER_STORAGE"] = str(store)
    db = os.path.join(tmp, "bench.db")
    # throughput.start_server has no --retention: start ours the same way, with it
    import throughput

    original = subprocess.Popen

    def popen_with_retention(cmd, *a, **kw):
        if cmd[:4] == [sys.executable, "-m", "sync_worker", "server"]:
            cmd = [*cmd, "--retention", args.retention]
            kw["cwd"] = src  # ``python -m sync_worker`` imports the tree it runs in
        return original(cmd, *a, **kw)

    throughput.subprocess.Popen = popen_with_retention  # type: ignore[attr-defined]
    try:
        server, url = start_server(tmp)
    finally:
        throughput.subprocess.Popen = original  # type: ignore[attr-defined]
    os.environ["SYNC_WORKER_API_URL"] = url
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(src)])}
    worker = subprocess.Popen([sys.executable, "-m", "sync_worker", "worker", "bench_tasks:echo", "--limit",
                               str(args.limit), "--log-level", "WARNING"], cwd=HERE, env=env)
    from bench_tasks import echo

    from sync_worker.client import Client

    client = Client(url)
    wait_until(lambda: client.read_workers(), 60, "the worker to subscribe", interval=0.05)
    samples: list[dict] = []
    started = time.monotonic()

    def sample(label: str, submitted: int) -> None:
        size, files = dir_size(store)
        rss = rss_kib(server.pid)
        samples.append({"at": label, "submitted": submitted, "runs_in_db": client.count_task_runs(),
                        "db_bytes": db_size(db), "store_bytes": size, "store_files": files,
                        "server_rss_kib": rss["VmRSS"], "server_anon_kib": rss["RssAnon"],
                        "server_file_kib": rss["RssFile"], "elapsed_s": round(time.monotonic() - started, 1)})
        if not args.json:
            print(json.dumps(samples[-1]), flush=True)

    unfinished = {"task_runs": {"state": {"type": {"any_": ["SCHEDULED", "PENDING", "RUNNING"]}}}}
    sample("start", 0)
    submitted = 0
    every = max(args.runs // 10, 1)
    next_sample = every
    try:
        while submitted < args.runs:
            n = min(args.chunk, args.runs - submitted)
            per = [n // args.submitters + (1 if i < n % args.submitters else 0) for i in range(args.submitters)]

            def submit(count: int, base: int) -> None:
                for i in range(count):
                    echo.delay(base + i)

            threads, base = [], submitted
            for count in per:
                threads.append(threading.Thread(target=submit, args=(count, base)))
                base += count
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            submitted += n
            wait_until(lambda: client.count_task_runs(unfinished) == 0, 600, "the chunk to finish", interval=0.1)
            if submitted >= next_sample:
                sample(f"{100 * submitted // args.runs}%", submitted)
                next_sample += every
        time.sleep(retention + max(retention / 10, 1) * 2 + 1)
        sample("after one more retention period", submitted)
    finally:
        worker.terminate()
        worker.wait(60)
        server.terminate()
        server.wait(60)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps({"runs": args.runs, "retention": args.retention, "src": str(src), "samples": samples},
                         indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
