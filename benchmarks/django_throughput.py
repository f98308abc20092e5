"""Django's Tasks framework on sync_worker, measured with the example project.

One embedded server and one ``manage.py sync_worker`` process (separate processes, a
fresh server database, the example's SQLite database in a temporary directory); this
process enqueues ``notes.tasks.create_note`` (one ORM INSERT per run) with
``Task.enqueue()`` and reads the runs back with ``get_result()``.

Printed: enqueue calls/s (one thread), end-to-end runs/s (first enqueue -> last run
SUCCESSFUL, the worker already up), get_result calls/s, and enqueue->start p50/p95 from
the server's timestamps.

    python3 benchmarks/django_throughput.py --runs 500 --limit 4
"""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "django_app"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--limit", type=int, default=4)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="sync-worker-django-bench-"))
    atexit.register(shutil.rmtree, tmp, True)  # the database and files go when the script ends
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "SYNC_WORKER_API_URL": f"http://127.0.0.1:{port}/api",
        "SYNC_WORKER_STORAGE": str(tmp / "store"),
        "DJANGO_DB_PATH": str(tmp / "db.sqlite3"),
        "DJANGO_SETTINGS_MODULE": "mysite.settings",
    }
    os.environ.update(env)
    sys.path[:0] = [str(REPO), str(EXAMPLE)]
    server = subprocess.Popen([sys.executable, "-m", "sync_worker", "server", "--port", str(port),
                               "--db", str(tmp / "server.db"), "--log-level", "WARNING"], env=env)
    worker = None
    try:
        import django
        from django.core.management import call_command

        django.setup()
        call_command("migrate", verbosity=0)
        from notes.tasks import create_note

        from sync_worker.client import get_client
        from sync_worker.tasks import TaskRunFuture

        client = get_client()
        deadline = time.monotonic() + 30
        while not client.health():
            if time.monotonic() > deadline:
                raise SystemExit("server did not start")
            time.sleep(0.05)
        worker = subprocess.Popen([sys.executable, "manage.py", "sync_worker", "--limit", str(args.limit),
                                   "--log-level", "WARNING"], cwd=EXAMPLE, env=env)
        warm = create_note.enqueue("warm-up")  # the worker is up once this one ran
        while not create_note.get_result(warm.id).is_finished:
            time.sleep(0.05)

        started = time.perf_counter()
        results = [create_note.enqueue(f"bench {i}") for i in range(args.runs)]
        enqueued = time.perf_counter() - started
        for result in results:  # the server answers each wait when that run finishes (no polling)
            TaskRunFuture(result.id, client=client).wait(300)
        total = time.perf_counter() - started

        started = time.perf_counter()
        final = [create_note.get_result(r.id) for r in results]
        reads = time.perf_counter() - started
        failed = [r for r in final if r.status != "SUCCESSFUL"]
        delays = sorted((r.started_at - r.enqueued_at).total_seconds() * 1000 for r in final)
        p95 = delays[int(len(delays) * 0.95) - 1]
        print(f"Django {django.get_version()}, Python {sys.version.split()[0]}, {args.runs} runs, --limit {args.limit}")
        print(f"enqueue: {args.runs / enqueued:.0f}/s (one thread)")
        print(f"end to end: {args.runs / total:.0f} runs/s ({total:.2f} s, {len(failed)} not SUCCESSFUL)")
        print(f"get_result: {args.runs / reads:.0f}/s")
        print(f"enqueue->start with all {args.runs} enqueued at once: p50 {statistics.median(delays):.0f} ms, p95 {p95:.0f} ms")
        return 1 if failed else 0
    finally:
        for proc in (worker, server):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()


if __name__ == "__main__":
    sys.exit(main())
