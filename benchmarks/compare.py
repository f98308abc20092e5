#!/usr/bin/env python3
"""sync_worker next to Dramatiq, Celery, RQ and Huey: interleaved rounds, medians, ranges, CPU.

Usage:
    python3 benchmarks/compare.py            # full: 5 rounds, N=3000
    python3 benchmarks/compare.py --quick    # 3 rounds, N=1000 (about 6-10 minutes on 2 cores)
    python3 benchmarks/compare.py --baseline-src /tmp/old-tree   # also sync_worker from another tree

Systems (each one worker process with 10 threads unless said, same task body, same submitter
threads):
- ``sync_worker``: ``sync-worker server`` (SQLite, durable) + ``sync-worker worker --limit 10``;
- ``dramatiq``: ``dramatiq --processes 1 --threads 10`` on Redis (results middleware on Redis);
- ``celery``: ``celery worker --pool threads --concurrency 10`` on Redis (result backend Redis);
- ``rq``: ``rq worker --worker-class SimpleWorker`` on Redis (RQ has no thread pool: one job at a
  time; its default worker forks per job and is slower still);
- ``sync_worker*K`` (``--workers 1,2,4``): the same server with K worker processes; under the
  table, one worker ÷ K workers per round with a bootstrap interval of its median (whether
  1.0, "as fast", is inside what the rounds support);
- ``huey``: Huey 3.x ``SqliteHuey`` (a SQLite file: the same durability class as ours),
  ``huey_consumer -k thread -w 10 -d 0.005 -m 0.05`` (it polls SQLite; 5-50 ms backoff).
Each trial gets its own fresh server / Redis (``--save '' --appendonly no``: the Redis peers
are NOT durable) / SQLite file, and a worker that has already run a warm-up batch. With K
sync_worker processes, the trial waits until the server lists all K subscribed and then warms
up each of them: the server gives runs to the first worker while it has a free slot, so 20
no-op runs would warm up one worker only, and the others' first runs (their lazy imports and
first allocations) would fall into the measured case; K × limit runs of the ``sleep_for`` task
that sleep 0.2 s instead (its own task: the measured tasks take no parameter), submitted at
once, fill every worker's slots (each worker is checked to have run one).

Rounds are interleaved, and each starts one system later: round 1 runs A B C D E, round 2
B C D E A, round 3 C D E A B, ... (``--order fixed``: A B C D E every round). With a fixed order
the host's bursts of steal fell on the first position in four rounds of five at stop 31 (that
system's trials: a median of 20 % of the CPU time stolen; the next two: 2-3 %), and its system
paid for it in every ratio; rotating spreads such bursts over all of them. With as many rounds as
systems, each takes each position once. Within one trial (one system, one round) the cases run
in this order on the same processes:
- ``drain``: T submitter threads submit N no-op runs between them; runs/s = N / (first submit ->
  the last run finished, as the task itself recorded it);
- ``waited``: T threads each submit a run and wait for its result through the system's own
  API (``.result()``, ``get_result``, ``AsyncResult.get``, ``latest_result``, Huey's
  ``get(blocking=True)``), N runs in all; runs/s = N / wall time;
- ``short``: drain of ``--short-runs`` tasks that sleep 10 ms, limit 10: reported as % of the
  ideal 1,000 runs/s;
- ``latency``: one caller, ``--samples`` sequential submit -> result, p50 / p95;
- ``params``: the drain again with a task that takes one argument (``noop_p(1)``). The peers
  carry arguments inside their message; sync_worker stores a run's parameters as a record
  file in ``SYNC_WORKER_STORAGE`` (Prefect's layout): ``.delay()`` writes it, the worker reads
  it and deletes it at COMPLETED. This case measures what that costs.
CPU per run of each process is read from /proc/<pid>/stat (user+system, children included)
around each case: the server or broker (redis-server for the Redis peers; Huey has none), the
worker (its process tree) and the submitter (the threads of the trial process, from the first
submit until its threads return). CPU is much less distorted by other load than wall time.
Before each trial the driver runs :func:`machine_probe` (a fixed Python + SQLite workload, a
thread hand-off, a short sleep's overshoot: about 0.2 s), printed per round and under the table:
the same code's CPU per run moves with the machine's speed of the moment, which steal alone
does not show.

Peers missing: the script says what to install and skips them:
    python3 -m pip install 'dramatiq[redis]' 'celery[redis]' rq huey redis
    apt-get install -y redis-server
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SYSTEMS = ("sync_worker", "dramatiq", "celery", "rq", "huey")
NEEDS = {"dramatiq": ("dramatiq", "redis"), "celery": ("celery", "redis"), "rq": ("rq", "redis"), "huey": ("huey",)}
REDIS_SYSTEMS = ("dramatiq", "celery", "rq")
#: ``--stdlib-json``: this tree with SYNC_WORKER_JSON=stdlib everywhere (no orjson, the pure path)
STDLIB_SYSTEM = "sync_worker(stdlib)"
#: ``--server-storage``: this tree with SYNC_WORKER_STORAGE=server (records kept by the server)
SERVER_STORAGE_SYSTEM = "sync_worker(server storage)"
#: the variants of this tree: the settings each one gives every process (server, workers, trial)
VARIANT_ENV = {STDLIB_SYSTEM: {"SYNC_WORKER_JSON": "stdlib"}, SERVER_STORAGE_SYSTEM: {"SYNC_WORKER_STORAGE": "server"}}
INSTALL_HINT = ("python3 -m pip install 'dramatiq[redis]' 'celery[redis]' rq huey redis"
                " (and for the Redis peers: apt-get install -y redis-server)")
CASES = ("drain", "waited", "short", "latency", "params")
WARMUP = 20
RECORD_SIZE = 18  # compare_tasks.RECORD_SIZE


def log(message: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- /proc helpers
def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            text = handle.read()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Dramatiq runs its workers in child processes)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime+stime+cutime+cstime of these processes (reaped children count too)."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields:
            total += sum(int(x) for x in fields[11:15])
    return total / os.sysconf("SC_CLK_TCK")


def rss_mb(pids: list[int]) -> float:
    """Sum of VmRSS of these processes, MiB."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def own_cpu() -> float:
    times = os.times()
    return times.user + times.system


def machine_ticks() -> list[int]:
    """The machine's CPU time by kind (the ``cpu`` line of /proc/stat): user nice system idle
    iowait irq softirq steal; empty where there is none."""
    try:
        with open("/proc/stat") as handle:
            return [int(x) for x in handle.readline().split()[1:9]]
    except (OSError, ValueError):
        return []


def steal_pct(before: list[int], after: list[int]) -> float | None:
    """Per cent of the machine's CPU time the hypervisor gave to others between two readings
    (the "steal" of top): on a shared VM the main source of noise in wall time, and the
    reason the cases report CPU per run too."""
    if len(before) < 8 or len(after) < 8:
        return None
    deltas = [b - a for a, b in zip(before[:8], after[:8], strict=True)]
    total = sum(deltas)
    return 100 * deltas[7] / total if total > 0 else None


#: what :func:`machine_probe` encodes, decodes and stores: a TaskRun-sized document
_PROBE_DOC = {"id": "0f8fad5b-d9cb-469f-a165-70867728950e", "name": "probe", "task_key": "probe.noop",
              "state": {"type": "COMPLETED", "name": "Completed", "timestamp": "2026-12-03T12:00:00.000000Z",
                        "message": None}, "tags": ["a", "b"], "task_inputs": {},
              "empirical_policy": {"retries": 0, "retry_delay": None}, "parameters": {"x": list(range(20))}}


def machine_probe(work: int = 2000, handoffs: int = 2000, sleeps: int = 30) -> dict[str, float]:
    """How fast this machine is at the moment, in the three things a run's cycle is made of.

    Why: the same code on the same machine measured 0.78 ms of CPU per waited run at 13:50 UTC
    and 1.11 at 16:09 (2026-12-03), with 0-5 % steal; these figures, taken by the driver
    before each trial (nothing else of the benchmark running), say how much of a difference
    between two tables is the machine. ``python_ms``: CPU time of ``work`` rounds of
    ``json.dumps`` + ``json.loads`` of a TaskRun-sized document and one SQLite INSERT committed
    alone (in memory); ``handoff_us``: the median wall time for one thread to wake another
    (a lock passed back and forth, half a round trip); ``oversleep_us``: the median time a
    ``time.sleep(0.002)`` overshoots (what a sleeping slot waits for its core)."""
    import sqlite3

    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, data TEXT)")
    cpu0 = time.process_time()
    for _ in range(work):
        text = json.dumps(_PROBE_DOC)
        json.loads(text)
        conn.execute("BEGIN")
        conn.execute("INSERT INTO t (data) VALUES (?)", (text,))
        conn.execute("COMMIT")
    python_ms = (time.process_time() - cpu0) * 1000
    conn.close()

    ping, pong = threading.Lock(), threading.Lock()
    ping.acquire()
    pong.acquire()

    def other() -> None:
        for _ in range(handoffs):
            if not ping.acquire(timeout=10):
                return
            pong.release()

    thread = threading.Thread(target=other, daemon=True)
    thread.start()
    trips = []
    for _ in range(handoffs):
        t0 = time.perf_counter()
        ping.release()
        if not pong.acquire(timeout=10):
            break
        trips.append(time.perf_counter() - t0)
    thread.join(10)

    over = []
    for _ in range(sleeps):
        t0 = time.perf_counter()
        time.sleep(0.002)
        over.append(time.perf_counter() - t0 - 0.002)
    return {"python_ms": python_ms,
            "handoff_us": statistics.median(trips) * 1e6 / 2 if trips else float("nan"),  # (a thread stuck 10 s)
            "oversleep_us": statistics.median(over) * 1e6}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.002, alive=None):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if alive is not None:
            for proc in alive:
                if proc.poll() is not None:
                    raise RuntimeError(f"{what}: process {proc.args[:4]} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


# ----------------------------------------------------------------------------- availability
def missing(system: str) -> str | None:
    """Why a system cannot run here (None when it can)."""
    if system.split("*")[0].split("@")[0] == "sync_worker" or system in VARIANT_ENV:
        return None
    absent = [name for name in NEEDS[system] if importlib.util.find_spec(name) is None]
    if absent:
        return f"Python package(s) {', '.join(absent)} not installed"
    if system in REDIS_SYSTEMS and not shutil.which("redis-server"):
        return "redis-server not on PATH"
    return None


# ----------------------------------------------------------------------------- one trial
class Trial:
    """One system in one round: start its processes, run the cases, stop them."""

    def __init__(self, system: str, args: argparse.Namespace) -> None:
        self.system = system
        self.kind = "sync_worker" if system.startswith("sync_worker") else system
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix=f"compare-{system.replace('(', '-').replace(')', '')}-",
                                    dir=args.tmp_root or None)
        self.done_file = os.path.join(self.tmp, "done")
        self.server: subprocess.Popen | None = None  # server or broker
        self.worker: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []  # sync_worker*K: K worker processes
        self.worker_count = int(system.split("*")[1]) if "*" in system else 1
        self.src = Path(args.src).resolve()
        self.env = dict(os.environ, COMPARE_SYSTEM=self.kind, COMPARE_DONE_FILE=self.done_file,
                        COMPARE_HUEY_DB=os.path.join(self.tmp, "huey.db"), PYTHONUNBUFFERED="1",
                        PYTHONPATH=os.pathsep.join([str(self.src), str(HERE)]))
        self.variant_env = VARIANT_ENV.get(system, {})  # server, workers and the submitting trial process
        self.env.update(self.variant_env)
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    # -- processes
    def _spawn(self, name: str, cmd: list[str], **kwargs) -> subprocess.Popen:
        path = Path(self.tmp) / f"{name}.log"
        self.logs.append(path)
        with open(path, "wb") as out:
            proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        py = sys.executable
        limit = str(self.args.limit)
        if self.kind == "sync_worker":
            port = free_port()
            self.server = self._spawn("server", [py, "-m", "sync_worker", "server", "--port", str(port),
                                                 "--db", os.path.join(self.tmp, "sw.db"), "--log-level", "WARNING"],
                                      cwd=self.src)
            url = f"http://127.0.0.1:{port}/api"
            self.env.update(SYNC_WORKER_API_URL=url, SYNC_WORKER_STORAGE=os.path.join(self.tmp, "records"))
            self.env.update(self.variant_env)
            wait_until(lambda: _port_open(port), 60, "the sync_worker server", 0.02, [self.server])
            for i in range(self.worker_count):
                self.workers.append(self._spawn(f"worker{i}", [py, "-m", "sync_worker", "worker", "compare_tasks:noop",
                                                               "compare_tasks:sleep10", "compare_tasks:sleep_for",
                                                               "compare_tasks:noop_p", "--limit", limit,
                                                               "--log-level", "WARNING"], cwd=self.src))
            self.worker = self.workers[0]
        elif self.kind in REDIS_SYSTEMS:
            port = free_port()
            self.server = self._spawn("redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                                "--save", "", "--appendonly", "no", "--dir", self.tmp])
            wait_until(lambda: _port_open(port), 30, "redis-server", 0.02, [self.server])
            self.env["COMPARE_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
            if self.kind == "dramatiq":
                cmd = [py, "-m", "dramatiq", "compare_tasks", "--processes", "1", "--threads", limit,
                       "--queues", "compare"]
            elif self.kind == "celery":
                cmd = [py, "-m", "celery", "-A", "compare_tasks", "worker", "--pool", "threads",
                       "--concurrency", limit, "-Q", "compare", "--loglevel", "WARNING"]
            else:
                cmd = [py, "-m", "rq.cli", "worker", "--url", self.env["COMPARE_REDIS_URL"],
                       "--worker-class", "rq.worker.SimpleWorker", "--quiet", "compare"]
            self.worker = self._spawn("worker", cmd, cwd=self.tmp)
        else:  # huey
            self.worker = self._spawn("worker", [py, "-m", "huey.bin.huey_consumer", "compare_tasks.huey",
                                                 "-k", "thread", "-w", limit, "-d", "0.005", "-m", "0.05", "-C"],
                                      cwd=self.tmp)
        self.workers = self.workers or [self.worker]
        # the submitting side, in this process, with the same environment
        os.environ.update({k: v for k, v in self.env.items() if k.startswith(("COMPARE_", "SYNC_WORKER_"))})
        sys.path[:0] = [str(self.src), str(HERE)]
        import compare_tasks

        self.tasks = compare_tasks
        if self.kind == "rq":
            import redis
            from rq import Queue

            self.queue = Queue("compare", connection=redis.Redis.from_url(self.env["COMPARE_REDIS_URL"]))
        self.submit(WARMUP, "noop")
        wait_until(lambda: self.finished() >= WARMUP, 120, "the warm-up runs", 0.01, self.procs)
        if self.kind == "sync_worker" and self.worker_count > 1:
            self._warm_up_every_worker()

    def _workers_delivered(self) -> list[int]:
        """Runs the server delivered to each subscribed worker so far (its dashboard API)."""
        url = self.env["SYNC_WORKER_API_URL"] + "/sync_worker/dashboard/overview"
        with urllib.request.urlopen(url, timeout=10) as response:
            return [worker["delivered"] for worker in json.load(response)["workers"]]

    def _warm_up_every_worker(self) -> None:
        count = self.worker_count
        wait_until(lambda: len(self._workers_delivered()) >= count, 120, f"{count} workers subscribed", 0.05,
                   self.procs)
        before = self.finished()
        slots = count * self.args.limit
        self._threads(lambda share: [self.tasks.sleep_for.delay(0.2) for _ in range(share)], slots)
        wait_until(lambda: self.finished() >= before + slots, 120, "the warm-up of every worker", 0.01, self.procs)
        idle = [i for i, delivered in enumerate(self._workers_delivered()) if not delivered]
        if idle:
            raise RuntimeError(f"{len(idle)} of {count} workers got no warm-up run")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def log_tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in self.logs if p.exists())

    # -- submitting
    def finished(self) -> int:
        try:
            return os.stat(self.done_file).st_size // RECORD_SIZE
        except FileNotFoundError:
            return 0

    def last_finish(self) -> float:
        with open(self.done_file, "rb") as handle:
            handle.seek(-RECORD_SIZE, os.SEEK_END)
            return max(float(line) for line in handle.read().split())

    def _send(self, name: str, *args):
        fn = getattr(self.tasks, name)
        if self.kind == "sync_worker":
            return fn.delay(*args)
        if self.kind == "dramatiq":
            return fn.send(*args)
        if self.kind == "celery":
            return fn.delay(*args)
        if self.kind == "rq":
            return self.queue.enqueue(fn, *args)
        return fn(*args)  # huey

    def _wait(self, handle) -> None:
        if self.kind == "sync_worker":
            handle.result(timeout=60)
        elif self.kind == "dramatiq":
            handle.get_result(block=True, timeout=60_000)
        elif self.kind == "celery":
            handle.get(timeout=60)
        elif self.kind == "rq":
            result = handle.latest_result(timeout=60)
            if result is None or result.type != result.Type.SUCCESSFUL:
                raise RuntimeError(f"rq job ended {result}")
        else:
            handle.get(blocking=True, timeout=60)

    def submit(self, count: int, name: str, *args) -> None:
        for _ in range(count):
            self._send(name, *args)

    def submit_and_wait(self, count: int, latencies: list[float] | None = None) -> None:
        for _ in range(count):
            started = time.perf_counter()
            self._wait(self._send("noop_r"))
            if latencies is not None:
                latencies.append((time.perf_counter() - started) * 1000)

    # -- cases
    def _threads(self, target, total: int) -> None:
        n = self.args.threads
        shares = [total // n + (1 if i < total % n else 0) for i in range(n)]
        errors: list[BaseException] = []

        def run(share: int) -> None:
            try:
                target(share)
            except BaseException as exc:  # reported by the trial
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(share,)) for share in shares if share]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def measure(self, case: str) -> dict:
        runs = {"drain": self.args.runs, "waited": self.args.runs, "short": self.args.short_runs,
                "latency": self.args.samples, "params": self.args.runs}[case]
        server_pids = [self.server.pid] if self.server else []
        worker_pids = self.worker_pids()
        before_done = self.finished()
        spread = self.kind == "sync_worker" and self.worker_count > 1
        delivered0 = self._workers_delivered() if spread else []
        cpu0 = (cpu_seconds(server_pids), cpu_seconds(worker_pids), own_cpu())
        ticks0 = machine_ticks()
        latencies: list[float] = []
        t0_wall, t0 = time.time(), time.perf_counter()
        if case == "drain":
            self._threads(lambda share: self.submit(share, "noop"), runs)
        elif case == "short":
            self._threads(lambda share: self.submit(share, "sleep10"), runs)
        elif case == "params":
            self._threads(lambda share: self.submit(share, "noop_p", 1), runs)
        elif case == "waited":
            self._threads(self.submit_and_wait, runs)
        else:
            self.submit_and_wait(runs, latencies)
        submitter_cpu = own_cpu() - cpu0[2]
        submitted = time.perf_counter()
        wait_until(lambda: self.finished() >= before_done + runs, self.args.timeout, f"{case}: {runs} runs",
                   0.002, self.procs)
        if case in ("drain", "short", "params"):
            elapsed = self.last_finish() - t0_wall
        else:
            elapsed = time.perf_counter() - t0
        ticks1 = machine_ticks()  # (before the pause below: the case's own time)
        time.sleep(0.3)  # let the last state reports land before reading CPU
        worker_pids = self.worker_pids()
        cpu1 = (cpu_seconds(server_pids), cpu_seconds(worker_pids))
        cpu = {"server": (cpu1[0] - cpu0[0]) * 1000 / runs, "worker": (cpu1[1] - cpu0[1]) * 1000 / runs,
               "submitter": submitter_cpu * 1000 / runs}
        cpu["total"] = sum(cpu.values())
        row = {"runs": runs, "seconds": elapsed, "runs_per_s": runs / elapsed, "cpu_ms": cpu,
               "submit_s": submitted - t0}
        if spread:  # runs each worker got, oldest connection first (the server prefers it)
            after = self._workers_delivered()  # (a worker lost meanwhile shortens the list: zip stops there)
            row["delivered"] = [now - before for now, before in zip(after, delivered0, strict=False)]
        stolen = steal_pct(ticks0, ticks1)
        if stolen is not None:
            row["steal_pct"] = stolen
        if latencies:
            row.update(p50_ms=statistics.median(latencies), p95_ms=percentile(latencies, 0.95))
        return row

    def worker_pids(self) -> list[int]:
        return [pid for worker in self.workers for pid in process_tree(worker.pid)]

    def run(self) -> dict:
        result: dict = {"system": self.system}
        try:
            self.start()
            for case in self.args.cases:
                result[case] = self.measure(case)
            worker_pids = process_tree(self.worker.pid)
            result["worker_rss_mb"] = rss_mb(worker_pids)
            result["worker_processes"] = len(self.worker_pids())
            if self.kind == "sync_worker":
                result["server_rss_mb"] = rss_mb([self.server.pid])
                result["server_runs"] = self.finished()
        except Exception as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
            log(f"{self.system} FAILED: {result['error']}\n{self.log_tail()}")
        finally:
            self.stop()
        return result


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- driver
def run_trial(system: str, args: argparse.Namespace) -> dict:
    """A trial in a fresh interpreter (its own imports, GIL and CPU accounting)."""
    src = args.baseline_src if system.split("*")[0] == "sync_worker@base" else str(REPO)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_trial", system, "--src", src, "--tmp-root", args.tmp_root,
           "--runs", str(args.runs), "--short-runs", str(args.short_runs), "--samples", str(args.samples),
           "--threads", str(args.threads), "--limit", str(args.limit), "--timeout", str(args.timeout),
           "--cases", ",".join(args.cases)]
    budget = 4 * args.timeout + 300
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=budget, check=False, cwd=src)
    except subprocess.TimeoutExpired:
        return {"system": system, "error": f"trial timed out after {budget}s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"system": system, "error": f"trial exited {proc.returncode} without a result"}
    return json.loads(lines[-1])


def import_time_ms(src: str, repeat: int = 7) -> float:
    code = "import time; t = time.perf_counter(); import sync_worker; print(time.perf_counter() - t)"
    times = [float(subprocess.check_output([sys.executable, "-c", code], text=True, cwd=src)) for _ in range(repeat)]
    return statistics.median(times) * 1000


def versions() -> dict[str, str]:
    import importlib.metadata as metadata

    out = {}
    for dist in ("dramatiq", "celery", "rq", "huey", "redis"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    redis_server = shutil.which("redis-server")
    if redis_server:
        text = subprocess.run([redis_server, "--version"], capture_output=True, text=True).stdout
        match = re.search(r"v=(\S+)", text)
        out["redis-server"] = match.group(1) if match else text.strip()
    return out


def _fmt_range(values: list[float], spec: str = ",.0f") -> str:
    return f"{format(statistics.median(values), spec)} ({format(min(values), spec)}–{format(max(values), spec)})"


def median_interval(values: list[float], level: float = 0.90, draws: int = 5000) -> tuple[float, float]:
    """Percentile-bootstrap interval of the median of ``values`` (fixed seed: the same
    rounds always print the same interval).

    Why: "K workers at least as fast as one" is a claim about a ratio whose per-round values
    spread by ±10-25 % on these machines; the median and the range do not say whether 1.0 is
    inside what the rounds support, an interval of the median does."""
    if len(values) < 2:
        return (values[0], values[0]) if values else (float("nan"), float("nan"))
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    cut = int(draws * (1 - level) / 2)
    return medians[cut], medians[draws - 1 - cut]


def summarize(results: list[dict], systems: list[str], args: argparse.Namespace) -> dict:
    """Per system and case: medians and ranges over rounds; ratios ours/peer per round."""
    by_system: dict[str, list[dict]] = {s: [r for r in results if r["system"] == s and "error" not in r]
                                        for s in systems}
    summary: dict = {}
    ours = by_system.get("sync_worker", [])
    for system, rows in by_system.items():
        entry: dict = {"rounds": len(rows), "failed": sum(1 for r in results if r["system"] == system and "error" in r)}
        for case in args.cases:
            rates = [r[case]["runs_per_s"] for r in rows if case in r]
            if not rates:
                continue
            item = {"runs_per_s": rates, "cpu_ms": {k: statistics.median([r[case]["cpu_ms"][k] for r in rows])
                                                    for k in ("server", "worker", "submitter", "total")}}
            if system != "sync_worker" and ours:
                mine = {r["round"]: r for r in ours if case in r}
                pairs = [(mine[p["round"]][case]["runs_per_s"], p[case]["runs_per_s"])
                         for p in rows if p["round"] in mine and case in p]
                item["ratio"] = [a / b for a, b in pairs]
            if case == "latency":
                item["p50_ms"] = [r[case]["p50_ms"] for r in rows]
                item["p95_ms"] = [r[case]["p95_ms"] for r in rows]
            summary.setdefault(system, entry)[case] = item
        summary.setdefault(system, entry)
        if rows:
            entry["worker_rss_mb"] = [r["worker_rss_mb"] for r in rows]
            if "server_rss_mb" in rows[0]:
                entry["server_rss_mb"] = [r["server_rss_mb"] for r in rows]
                entry["server_runs"] = rows[0]["server_runs"]
    return summary


LABELS = {
    "sync_worker": "sync_worker (SQLite, durable)",
    "sync_worker@base": "sync_worker, baseline tree",
    STDLIB_SYSTEM: "sync_worker, stdlib JSON (SYNC_WORKER_JSON=stdlib: no orjson)",
    SERVER_STORAGE_SYSTEM: "sync_worker, records on the server (SYNC_WORKER_STORAGE=server)",
    "dramatiq": "Dramatiq {dramatiq} (Redis, not durable)",
    "celery": "Celery {celery}, threads (Redis, not durable)",
    "rq": "RQ {rq}, SimpleWorker, 1 job at a time (Redis, not durable)",
    "huey": "Huey {huey}, SqliteHuey, threads (SQLite)",
}


def _rate(entry: dict, case: str) -> str:
    return _fmt_range(entry[case]["runs_per_s"]) if case in entry else "–"


def _ratio(system: str, entry: dict, case: str) -> str:
    if system == "sync_worker" or case not in entry or not entry[case].get("ratio"):
        return "–"
    return _fmt_range(entry[case]["ratio"], ".2f") + "×"


def label(system: str, vers: dict[str, str]) -> str:
    if "*" in system:
        tree = ", baseline tree" if system.startswith("sync_worker@base") else ""
        return f"sync_worker{tree}, {system.split('*')[1]} worker processes"
    return LABELS.get(system, system).format(**{k: vers.get(k, "?") for k in ("dramatiq", "celery", "rq", "huey")})


def markdown(summary: dict, args: argparse.Namespace, vers: dict[str, str]) -> str:
    """The README's table: medians with ranges over the rounds; ratios ours/peer from the same round."""
    lines = [
        "| system | drain runs/s | ours ÷ peer, drain | waited runs/s | ours ÷ peer, waited "
        "| CPU ms/run, drain (server + worker + submitter) | 10 ms tasks, % of ideal | idle p50 / p95 ms | worker RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for system, entry in summary.items():
        name = label(system, vers)
        if entry.get("skipped"):
            lines.append(f"| {name} | skipped: {entry['skipped']} | | | | | | | |")
            continue
        if not entry["rounds"]:
            lines.append(f"| {name} | failed in every round | | | | | | | |")
            continue

        cpu = "–"
        if "drain" in entry:
            c = entry["drain"]["cpu_ms"]
            cpu = f"{c['total']:.2f} ({c['server']:.2f} + {c['worker']:.2f} + {c['submitter']:.2f})"
        short = "–"
        if "short" in entry:
            short = _fmt_range([100 * r / 1000 for r in entry["short"]["runs_per_s"]], ".0f") + " %"
        latency = "–"
        if "latency" in entry:
            latency = (f"{statistics.median(entry['latency']['p50_ms']):.1f} / "
                       f"{statistics.median(entry['latency']['p95_ms']):.1f}")
        rss = f"{statistics.median(entry['worker_rss_mb']):.1f}"
        lines.append(f"| {name} | {_rate(entry, 'drain')} | {_ratio(system, entry, 'drain')} | {_rate(entry, 'waited')} | {_ratio(system, entry, 'waited')} | "
                     f"{cpu} | {short} | {latency} | {rss} |")
    return "\n".join(lines)


def extra_lines(summary: dict, results: list[dict], args: argparse.Namespace, import_ms: float) -> list[str]:
    out = []
    for system, entry in summary.items():
        if entry.get("rounds") and "params" in entry:
            c = entry["params"]["cpu_ms"]
            ratio = _ratio(system, entry, "params")
            out.append(f"- one argument per run (``params``), {system}: drain {_rate(entry, 'params')} runs/s"
                       + ("" if ratio == "–" else f", ours ÷ peer {ratio}")
                       + f"; CPU ms/run {c['total']:.2f} ({c['server']:.2f} + {c['worker']:.2f} + {c['submitter']:.2f})")
    for system, entry in summary.items():
        if not system.startswith("sync_worker") or not entry["rounds"]:
            continue
        for case in ("waited", "short", "latency"):
            if case in entry:
                c = entry[case]["cpu_ms"]
                out.append(f"- {system} CPU ms/run, {case}: {c['total']:.2f} (server {c['server']:.2f}, "
                           f"worker {c['worker']:.2f}, submitter {c['submitter']:.2f})")
    for system, entry in summary.items():
        if "*" not in system or not entry.get("rounds"):
            continue
        parts, rounds = [], 0
        one = "sync_worker@base" if system.startswith("sync_worker@base") else "sync_worker"
        for case in ("drain", "waited", "params"):  # (10 ms tasks: K workers have K times the slots)
            ratios = [a["runs_per_s"] / b["runs_per_s"] for a, b in _same_round(results, one, system, case)]
            if ratios:
                low, high = median_interval(ratios)
                rounds = max(rounds, len(ratios))
                parts.append(f"{case} {statistics.median(ratios):.2f}× (90 % interval of the median "
                             f"{low:.2f}–{high:.2f})")
        later = [sum(r["drain"]["delivered"][1:]) for r in results
                 if r["system"] == system and "delivered" in r.get("drain", {})]
        if later:
            parts.append(f"runs the later workers got in the drain {_fmt_range(later)} of {args.runs:,}")
        if parts:
            base = " (baseline tree)" if system.startswith("sync_worker@base") else ""
            out.append(f"- one worker ÷ {system.split('*')[1]} workers{base}, same round, {rounds} rounds, bootstrap: "
                       + "; ".join(parts) + " (above 1.0: one worker faster)")
    out.extend(_against_baseline(results, args))
    ours = summary.get("sync_worker")
    if ours and ours["rounds"]:
        if "server_rss_mb" in ours:
            out.append(f"- sync_worker server RSS after {ours['server_runs']:,} runs: "
                       f"{_fmt_range(ours['server_rss_mb'], '.1f')} MB; worker RSS "
                       f"{_fmt_range(ours['worker_rss_mb'], '.1f')} MB")
    out.append(f"- import sync_worker: {import_ms:.1f} ms (median of 7 fresh interpreters)")
    stolen = [r[case]["steal_pct"] for r in results for case in args.cases
              if isinstance(r.get(case), dict) and "steal_pct" in r[case]]
    if stolen:
        out.append(f"- CPU time the hypervisor gave to other guests during the cases (steal, per cent of this "
                   f"machine's CPU time, every trial and case): {_fmt_range(stolen, '.1f')} %")
    probes = [r["machine"] for r in results if isinstance(r.get("machine"), dict)]
    if probes:
        out.append("- the machine of the moment, measured by the driver before each trial (`machine_probe()`): "
                   f"a fixed Python + SQLite workload {_fmt_range([p['python_ms'] for p in probes], '.1f')} ms "
                   f"of CPU, a thread waking another {_fmt_range([p['handoff_us'] for p in probes], '.0f')} µs, "
                   f"a 2 ms sleep overshooting by {_fmt_range([p['oversleep_us'] for p in probes], '.0f')} µs "
                   "(higher: a slower machine; compare tables only with these alike)")
    for r in results:
        if "error" in r:
            out.append(f"- {r['system']} round {r.get('round')}: FAILED {r['error']}")
    return out


def _same_round(results: list[dict], a: str, b: str, case: str) -> list[tuple[dict, dict]]:
    """(system a's case, system b's case) of every round in which both ran it."""
    rows = {(r["system"], r.get("round", 0)): r for r in results if "error" not in r}
    return [(r[case], rows[(b, rnd)][case]) for (system, rnd), r in sorted(rows.items())
            if system == a and (b, rnd) in rows and case in r and case in rows[(b, rnd)]]


def _against_baseline(results: list[dict], args: argparse.Namespace) -> list[str]:
    """This tree ÷ the baseline tree per round, for each worker count both ran (``--baseline-src``
    with ``--workers``): whether a change to the library moved the figures, with K workers too."""
    out = []
    for ours in sorted({r["system"] for r in results if r["system"] == "sync_worker" or
                        r["system"].startswith("sync_worker*")}):
        base = ours.replace("sync_worker", "sync_worker@base", 1)
        parts, rounds = [], 0
        for case in args.cases:
            pairs = _same_round(results, ours, base, case)
            if not pairs:
                continue
            rounds = max(rounds, len(pairs))
            rates = [a["runs_per_s"] / b["runs_per_s"] for a, b in pairs]
            cpu = [a["cpu_ms"]["total"] / b["cpu_ms"]["total"] for a, b in pairs]
            low, high = median_interval(rates)
            parts.append(f"{case} {statistics.median(rates):.2f}× ({low:.2f}–{high:.2f}), CPU per run "
                         f"{statistics.median(cpu):.2f}×")
        if parts:
            workers = ours.split("*")[1] if "*" in ours else "1"
            out.append(f"- this tree ÷ the baseline tree, {workers} worker(s), same round, {rounds} rounds "
                       "(runs/s with the 90 % bootstrap interval of the median; CPU per run): " + "; ".join(parts))
    return out


TARGETS = "CPU/run ≤ 0.9 ms; drain & waited ≥ 1.0× Dramatiq, ≥ 1.5× Celery, ≥ 2× Huey; 10 ms case ≥ 90 %; idle p50 ≤ 1.5 ms"


def outer(args: argparse.Namespace) -> int:
    systems = [s for s in args.systems.split(",") if s]
    unknown = [s for s in systems if s not in SYSTEMS]
    counts = [int(c) for c in args.workers.split(",") if c.strip()]
    if any(c < 1 for c in counts):
        raise SystemExit("error: --workers takes counts >= 1, e.g. 1,2,4")
    if "sync_worker" in systems:
        at = systems.index("sync_worker") + 1
        systems[at:at] = [f"sync_worker*{c}" for c in counts if c != 1]
    if unknown:
        raise SystemExit(f"error: unknown system(s) {unknown}; choose from {', '.join(SYSTEMS)}")
    if args.baseline_src:
        if not (Path(args.baseline_src) / "sync_worker" / "__init__.py").exists():
            raise SystemExit(f"error: --baseline-src {args.baseline_src} has no sync_worker/ package")
        systems.insert(1, "sync_worker@base")
        if "sync_worker" in systems:  # each worker count of this tree, from the baseline tree too
            for count in counts:
                if count != 1:
                    systems.insert(systems.index(f"sync_worker*{count}") + 1, f"sync_worker@base*{count}")
    if args.stdlib_json and "sync_worker" in systems:
        systems.insert(systems.index("sync_worker") + 1, STDLIB_SYSTEM)
    if args.server_storage and "sync_worker" in systems:
        systems.insert(systems.index("sync_worker") + 1, SERVER_STORAGE_SYSTEM)
    runnable = []
    skipped: dict[str, str] = {}
    for system in systems:
        why = missing(system)
        if why:
            log(f"SKIPPING {system}: {why}. Install the peers with: {INSTALL_HINT}")
            skipped[system] = why
        else:
            runnable.append(system)
    vers = versions()
    load_before = os.getloadavg()
    started = time.monotonic()
    log(f"systems {runnable}; {args.rounds} rounds; N={args.runs}, short={args.short_runs}, samples={args.samples}, "
        f"threads={args.threads}, limit={args.limit}; load average {load_before[0]:.2f}")
    results: list[dict] = []
    for round_no in range(1, args.rounds + 1):
        shift = (round_no - 1) % len(runnable) if args.order == "rotate" and runnable else 0
        for system in runnable[shift:] + runnable[:shift]:
            t0 = time.monotonic()
            probe = machine_probe()
            row = run_trial(system, args)
            row["round"] = round_no
            row["machine"] = probe
            row["loadavg"] = os.getloadavg()[0]
            results.append(row)
            brief = row.get("error") or ", ".join(
                f"{c} {row[c]['runs_per_s']:,.0f}/s cpu {row[c]['cpu_ms']['total']:.2f}ms"
                + (f" steal {row[c]['steal_pct']:.0f}%" if "steal_pct" in row[c] else "") for c in args.cases if c in row)
            log(f"round {round_no} {system}: {brief} ({time.monotonic() - t0:.0f}s; machine: probe "
                f"{probe['python_ms']:.0f} ms CPU, hand-off {probe['handoff_us']:.0f} µs, "
                f"oversleep {probe['oversleep_us']:.0f} µs)")
    import_ms = import_time_ms(str(REPO))
    summary = summarize(results, runnable, args)
    for system, why in skipped.items():
        summary[system] = {"rounds": 0, "failed": 0, "skipped": why}
    elapsed = time.monotonic() - started
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "versions": vers, "results": results,
                                               "summary": summary, "import_ms": import_ms}, indent=1))
    command = "python3 benchmarks/compare.py" + (" --quick" if args.quick else "")
    print(f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with `{command}` "
          f"({' '.join(sys.argv[1:])}): {os.cpu_count()} cores, load average {load_before[0]:.1f} before / "
          f"{os.getloadavg()[0]:.1f} after, {args.rounds} interleaved rounds "
          f"({'each starting one system later' if args.order == 'rotate' else 'the same order in each'}), N={args.runs:,} no-op runs "
          f"per case from {args.threads} submitter threads, limit {args.limit}; {elapsed / 60:.1f} min in all. "
          "Medians over the rounds, (min–max); ratios from the same round.")
    print()
    print(markdown(summary, args, vers))
    print()
    for line in extra_lines(summary, results, args, import_ms):
        print(line)
    print(f"- versions: {', '.join(f'{k} {v}' for k, v in vers.items())}; targets (issue 14): {TARGETS}")
    return 1 if any("error" in r for r in results) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds, N=1000, 500 short runs, 100 samples")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; --quick 3)")
    parser.add_argument("--order", choices=("rotate", "fixed"), default="rotate",
                        help="rotate (default): each round starts one system later; fixed: the same order "
                             "every round")
    parser.add_argument("--runs", type=int, default=None, help="no-op runs per drain / waited case (default 3000)")
    parser.add_argument("--short-runs", type=int, default=None, help="10 ms runs in the short case (default 1000)")
    parser.add_argument("--samples", type=int, default=None, help="sequential runs for idle latency (default 200)")
    parser.add_argument("--threads", type=int, default=4, help="submitter threads, every system (default 4)")
    parser.add_argument("--limit", type=int, default=10, help="worker concurrency, every system (default 10)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list of {', '.join(SYSTEMS)}")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    parser.add_argument("--workers", default="1", help="sync_worker worker processes: a comma list such as "
                        "1,2,4 adds the systems sync_worker*2 and sync_worker*4 (each worker --limit LIMIT)")
    parser.add_argument("--baseline-src", default="", help="a source tree of sync_worker to measure too "
                        "(e.g. `git archive main | tar -x -C /tmp/base`), as system sync_worker@base "
                        "(with --workers, also sync_worker@base*K)")
    parser.add_argument("--stdlib-json", action="store_true", help=f"also measure this tree with SYNC_WORKER_JSON=stdlib "
                        f"in every process (the path without orjson), as system {STDLIB_SYSTEM}")
    parser.add_argument("--server-storage", action="store_true", help="also measure this tree with "
                        f"SYNC_WORKER_STORAGE=server in every process (records kept by the server, see the "
                        f"params case), as system {SERVER_STORAGE_SYSTEM}")
    parser.add_argument("--timeout", type=float, default=300, help="bound in seconds of each case (default 300)")
    parser.add_argument("--json", default="", help="also write every trial and the summary to this file")
    parser.add_argument("--_trial", help=argparse.SUPPRESS)
    parser.add_argument("--src", default=str(REPO), help=argparse.SUPPRESS)
    parser.add_argument("--tmp-root", default="", help=argparse.SUPPRESS)  # the invocation's temporary directory
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quick = args.quick
    for name, full, small in (("rounds", 5, 3), ("runs", 3000, 1000), ("short_runs", 1000, 500),
                              ("samples", 200, 100)):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    args.cases = [c for c in args.cases.split(",") if c] if isinstance(args.cases, str) else args.cases
    bad = [c for c in args.cases if c not in CASES]
    if bad or args.rounds < 1 or args.runs < 1 or args.threads < 1:
        raise SystemExit(f"error: check --cases ({', '.join(CASES)}), --rounds, --runs, --threads")
    if args._trial:
        print(json.dumps(Trial(args._trial, args).run()), flush=True)
        return 0
    # every trial's files (databases, logs, Redis dirs) under one directory, removed at the end
    # even when a trial was killed before it could clean up after itself
    args.tmp_root = tempfile.mkdtemp(prefix="sync-worker-compare-")
    try:
        return outer(args)
    finally:
        shutil.rmtree(args.tmp_root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
