"""How fast the dashboard's pages answer with many runs in the database.

Fills a fresh database with ``--runs`` task runs (written straight into SQLite, in the rows
the server itself writes: a run created through the real server is the template; three
history rows per run; 10 task keys; ~85% COMPLETED, 8% FAILED, 5% SCHEDULED, 2% RUNNING;
created over the last 2 hours), starts a real ``Server`` on it, then times every call each
page makes (one keep-alive ``requests`` session, ``--repeat`` times each):

- Overview: ``GET /api/sync_worker/dashboard/overview``
- Runs: the first page; filtered by state, by task key, by a time range; a page deep in the
  table (``before=`` the middle run); the same with filters
- Run: ``GET /api/sync_worker/dashboard/runs/{id}`` of a FAILED run
- the page's files (``/``, ``/ui/app.js``)

    python3 benchmarks/dashboard_pages.py --runs 100000
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import requests  # noqa: E402

from sync_worker.server import Server  # noqa: E402
from sync_worker.server.models import iso  # noqa: E402

STATES = [("COMPLETED", "Completed", 0.85), ("FAILED", "Failed", 0.08), ("SCHEDULED", "Scheduled", 0.05),
          ("RUNNING", "Running", 0.02)]
TRACEBACK = ("Traceback (most recent call last):\n  File \"tasks.py\", line 12, in boom\n    raise ValueError(x)\n"
             "ValueError: boom")


def template(database: str) -> dict:
    """A run as the server stores it (created through the real API)."""
    with Server(port=0, database=database) as server:
        body = {"name": "bench", "task_key": "bench.key", "dynamic_key": "x",
                "state": {"type": "SCHEDULED", "name": "Scheduled", "state_details": {"deferred": True}}}
        created = requests.post(server.url + "/task_runs/", json=body, timeout=10).json()
        requests.delete(server.url + f"/task_runs/{created['id']}", timeout=10)
    return created


def fill(database: str, runs: int, seed: int = 1) -> None:
    base = template(database)
    rng = random.Random(seed)
    now = time.time()
    conn = sqlite3.connect(database)
    columns = "id, task_key, state_type, qstate, due, deliveries, background, data, holder"
    run_rows, state_rows = [], []
    weights = [w for _, _, w in STATES]
    for i in range(runs):
        created = now - 7200 + 7200 * i / runs  # creation order = seq order
        state_type, state_name, _ = rng.choices(STATES, weights)[0]
        run_id = str(uuid.uuid4())
        key = f"bench.task_{i % 10}"
        started = created + rng.random() * 0.5
        ended = started + rng.random() * 2
        run = dict(base, id=run_id, name=f"task_{i % 10}", task_key=key, dynamic_key=str(i), created=iso(created),
                   updated=iso(ended), expected_start_time=iso(created))
        data = None
        if state_type == "FAILED":
            record = {"metadata": {"serializer": {"type": "json"}, "storage_key": None},
                      "result": json.dumps({"type": "ValueError", "message": "boom", "traceback": TRACEBACK})}
            data = record
        history = [("SCHEDULED", "Scheduled", created)]
        if state_type != "SCHEDULED":
            history.append(("RUNNING", "Running", started))
            run.update(start_time=iso(started), run_count=1)
        if state_type in ("COMPLETED", "FAILED"):
            history.append((state_type, state_name, ended))
            run.update(end_time=iso(ended), total_run_time=ended - started)
        state_id = str(uuid.uuid4())
        run["state"] = {"id": state_id, "type": state_type, "name": state_name, "timestamp": iso(history[-1][2]),
                        "message": None, "data": data, "state_details": {"deferred": True, "task_run_id": run_id}}
        run["state_type"], run["state_name"], run["state_id"] = state_type, state_name, state_id
        qstate = 1 if state_type == "SCHEDULED" else 0
        run_rows.append((run_id, key, state_type, qstate, 0, 0, 1, json.dumps(run), None))
        for j, (t, name, ts) in enumerate(history):
            state_rows.append((run_id, j + 1, state_id if j == len(history) - 1 else str(uuid.uuid4()), t, name,
                               iso(ts), None))
    with conn:
        conn.executemany(f"INSERT INTO task_runs ({columns}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", run_rows)
        # the history is keyed by the run's seq and the state's number within the run (schema 4)
        conn.executemany("INSERT INTO task_run_states (run_seq, seq, state_id, type, name, timestamp, message) "
                         "VALUES ((SELECT seq FROM task_runs WHERE id = ?), ?, ?, ?, ?, ?, ?)", state_rows)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def timed(session: requests.Session, url: str, repeat: int) -> tuple[float, float, int]:
    """(median ms, max ms, bytes) of ``repeat`` GETs."""
    times = []
    size = 0
    for _ in range(repeat):
        start = time.perf_counter()
        response = session.get(url, timeout=30)
        times.append((time.perf_counter() - start) * 1000)
        response.raise_for_status()
        size = len(response.content)
    return statistics.median(times), max(times), size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="sync-worker-dashboard-")
    atexit.register(shutil.rmtree, tmp, True)  # the database and files go when the script ends
    database = os.path.join(tmp, "server.db")
    started = time.perf_counter()
    fill(database, args.runs)
    print(f"filled {args.runs} runs in {time.perf_counter() - started:.1f} s "
          f"({os.path.getsize(database) / 1e6:.1f} MB)")
    with Server(port=0, database=database, retention=0) as server:
        root = server.url[:-len("/api")]
        api = server.url + "/sync_worker/dashboard"
        session = requests.Session()
        page = session.get(api + "/runs", timeout=30).json()
        middle = session.get(api + "/runs?limit=1&before=" + str(args.runs // 2), timeout=30).json()["runs"][0]["seq"]
        failed = session.get(api + "/runs?state=FAILED&limit=1", timeout=30).json()["runs"][0]["id"]
        since = iso(time.time() - 3600)
        until = iso(time.time() - 1800)
        assert page["runs"], "no runs listed"
        calls = [
            ("overview", api + "/overview"),
            ("runs: first page", api + "/runs"),
            ("runs: state=FAILED", api + "/runs?state=FAILED"),
            ("runs: state=RUNNING (2%)", api + "/runs?state=RUNNING"),
            ("runs: state=CRASHED (none)", api + "/runs?state=CRASHED"),
            ("runs: task_key (10%)", api + "/runs?task_key=bench.task_3"),
            ("runs: task_key+state=FAILED", api + "/runs?task_key=bench.task_3&state=FAILED"),
            ("runs: last hour..30 min ago", api + f"/runs?since={since}&until={until}"),
            ("runs: deep page (before middle)", api + f"/runs?before={middle}"),
            ("runs: deep page, state=FAILED+key", api + f"/runs?before={middle}&state=FAILED&task_key=bench.task_3"),
            ("runs: newer page (after middle)", api + f"/runs?after={middle}"),
            ("run: a FAILED run", api + f"/runs/{failed}"),
            ("page: /", root + "/"),
            ("page: /ui/app.js", root + "/ui/app.js"),
        ]
        print(f"{'call':40} {'median ms':>10} {'max ms':>8} {'bytes':>8}")
        worst = 0.0
        for name, url in calls:
            median, slowest, size = timed(session, url, args.repeat)
            worst = max(worst, slowest)
            print(f"{name:40} {median:10.1f} {slowest:8.1f} {size:8d}")
        print(f"slowest single call: {worst:.1f} ms ({args.runs} runs, {args.repeat} calls each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
