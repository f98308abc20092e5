#!/usr/bin/env python3
"""Peer throughput benchmark: Dramatiq, RQ and Celery on a private Redis, side by side.

WHY: this machine (2 cores) is noisy, so sync_worker's throughput is only meaningful as a ratio
to peer systems measured in the same run.  This script is the peer half of that comparison; the
lead's comparison script merges its ``--json`` lines with sync_worker's own numbers.

It sets itself up, idempotently:
- installs ``redis-server`` with apt-get when missing and running as root (else: clear error);
- creates a venv for the peers (default ``~/.cache/sync_worker-bench/peers``) and pip-installs
  pinned ``dramatiq[redis]``, ``rq`` and ``celery[redis]`` into it (sync_worker's venv stays clean);
- starts a PRIVATE redis-server on 127.0.0.1, ephemeral port, temp dir, stopped at the end.
  Default: NO durability (``--save '' --appendonly no``); ``--durable`` uses AOF everysec.

Each system is measured by a subprocess ``<venv>/bin/python peers.py --_inner SYSTEM ...`` (the
libraries live in that venv) that starts ONE worker process, waits until it has processed a
warm-up batch (so it is started and idle), then measures, with the enqueuing in that subprocess:
- enqueue/s: N / time to enqueue N no-op jobs (single thread, while the worker consumes);
- end-to-end runs/s: N / (first enqueue -> last job finished).  "Finished" is signalled by the
  task itself: its only work is ``RPUSH <done-key> "<pid>:<time.time()>"``; we poll ``LLEN``
  every 5 ms and take the LAST task timestamp as the end (so polling adds no error);
- idle latency p50/p95: enqueue one job, ``BLPOP`` its completion signal, 200 times in a row;
- worker RSS: VmRSS/VmHWM from /proc/<pid>/status of the process that ran the tasks (for RQ's
  forking worker: the parent worker process; the per-job work horses are not counted).
Every wait is bounded; on failure the worker's log is printed.  Traffic goes only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_VENV = Path.home() / ".cache" / "sync_worker-bench" / "peers"

# Versions measured and reported; bump deliberately (the venv is re-synced when they differ).
PINS: dict[str, str] = {
    "dramatiq[redis]": "2.2.1",
    "rq": "3.0.0",
    "celery[redis]": "5.7.0",
    "redis": "8.1.0",
}
# Distributions whose installed versions are reported next to the numbers.
REPORTED_DISTS = ("dramatiq", "rq", "celery", "kombu", "redis")

SYSTEMS = ("dramatiq", "rq", "celery")
CONCURRENCY = 10
WARMUP_JOBS = 20
QUEUE = "peers"
DONE_KEY = "peers:done"

# system -> [(variant label, short description)]; RQ is measured twice.
VARIANTS: dict[str, list[tuple[str, str]]] = {
    "dramatiq": [("threads", "dramatiq --processes 1 --threads 10 (prefetch default: 2x threads)")],
    "celery": [("threads", "celery worker --pool threads --concurrency 10 (prefetch multiplier default 4)")],
    "rq": [
        ("fork", "rq worker (default Worker: forks a work horse per job, 1 job at a time)"),
        ("simple", "rq worker --worker-class rq.worker.SimpleWorker (no fork, 1 job at a time)"),
    ],
}


def log(msg: str) -> None:
    """Progress goes to stderr so that --json output on stdout stays machine-readable."""
    print(f"[peers] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- outer: setup


def ensure_redis_server() -> str:
    """Return the redis-server path, installing it with apt-get when missing and we are root."""
    path = shutil.which("redis-server")
    if path:
        return path
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        log("redis-server not found: apt-get update && apt-get install -y redis-server")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update"], check=True, env=env, stdout=sys.stderr)
        subprocess.run(
            ["apt-get", "install", "-y", "redis-server"], check=True, env=env, stdout=sys.stderr
        )
        path = shutil.which("redis-server")
        if path:
            return path
    raise SystemExit(
        "error: redis-server is not on PATH. Install Redis >= 6 "
        "(Debian/Ubuntu: `sudo apt-get install -y redis-server`; macOS: `brew install redis`) "
        "and re-run."
    )


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _installed_versions(python: Path) -> dict[str, str]:
    code = (
        "import json, importlib.metadata as m\n"
        "out = {}\n"
        f"for d in {REPORTED_DISTS!r}:\n"
        "    try:\n"
        "        out[d] = m.version(d)\n"
        "    except m.PackageNotFoundError:\n"
        "        pass\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    if proc.returncode != 0:
        return {}
    return json.loads(proc.stdout)


def _pins_satisfied(versions: dict[str, str]) -> bool:
    return all(versions.get(spec.split("[")[0]) == ver for spec, ver in PINS.items())


def ensure_venv(venv: Path) -> tuple[Path, dict[str, str]]:
    """Create the peers venv and install the pinned peers when needed; return (python, versions)."""
    python = _venv_python(venv)
    if not python.exists():
        log(f"creating peers venv {venv}")
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    versions = _installed_versions(python)
    if not _pins_satisfied(versions):
        reqs = [f"{spec}=={ver}" for spec, ver in PINS.items()]
        log(f"installing into {venv}: {' '.join(reqs)}")
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *reqs],
            check=True,
            timeout=900,
            stdout=sys.stderr,
        )
        versions = _installed_versions(python)
        if not _pins_satisfied(versions):
            raise SystemExit(f"error: peers venv {venv} does not match the pins after install: {versions}")
    return python, versions


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_ping(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class PrivateRedis:
    """A throw-away redis-server on 127.0.0.1:<ephemeral port> in a temp dir."""

    def __init__(self, binary: str, durable: bool) -> None:
        self.binary = binary
        self.durable = durable
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.tmp = ""
        self.version = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout.strip()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def persistence_args(self) -> list[str]:
        if self.durable:
            return ["--save", "", "--appendonly", "yes", "--appendfsync", "everysec"]
        return ["--save", "", "--appendonly", "no"]

    def start(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="peers-redis-")
        logfile = os.path.join(self.tmp, "redis.log")
        for _attempt in range(3):  # the probed port may be taken before redis binds it: retry
            self.port = _free_port()
            cmd = [
                self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--protected-mode", "yes", "--dir", self.tmp, "--logfile", logfile,
                "--daemonize", "no", *self.persistence_args,
            ]  # fmt: skip
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                if _redis_ping(self.port):
                    return
                time.sleep(0.05)
            self._kill()
        tail = Path(logfile).read_text(errors="replace")[-2000:] if os.path.exists(logfile) else ""
        self.stop()
        raise SystemExit(f"error: private redis-server did not start on 127.0.0.1:\n{tail}")

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        self._kill()
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = ""

    def __enter__(self) -> PrivateRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_inner(
    python: Path, system: str, variant: str, redis_url: str, args: argparse.Namespace
) -> dict:
    """Measure one system/variant in a subprocess of the peers venv; return its result dict."""
    cmd = [
        str(python), str(Path(__file__).resolve()), "--_inner", system, "--_variant", variant,
        "--_redis-url", redis_url, "--runs", str(args.runs),
        "--latency-samples", str(args.latency_samples), "--timeout", str(args.timeout),
    ]  # fmt: skip
    # Bound the whole subprocess: startup + warm-up + e2e + latency + shutdown, each bounded inside.
    outer_timeout = 3 * args.timeout + 120
    try:
        proc = subprocess.run(
            cmd, stdout=subprocess.PIPE, text=True, timeout=outer_timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"system": system, "variant": variant, "error": f"timed out after {outer_timeout}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {
            "system": system,
            "variant": variant,
            "error": f"inner run exited {proc.returncode} without a result",
        }
    return json.loads(lines[-1])


def _fmt(value: object, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: list[dict]) -> None:
    header = (
        f"{'system':<9} {'variant':<8} {'conc':>4} {'runs':>6} {'enqueue/s':>10} "
        f"{'e2e runs/s':>10} {'p50 ms':>7} {'p95 ms':>7} {'RSS MB':>7} {'HWM MB':>7} "
        f"{'cpu ms/job':>10} {'drain s':>8} {'load':>5}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        if r.get("error"):
            print(f"{r['system']:<9} {r.get('variant', ''):<8} FAILED: {r['error']}")
            continue
        print(
            f"{r['system']:<9} {r['variant']:<8} {r['concurrency']:>4} {r['runs']:>6} "
            f"{_fmt(r['enqueue_per_s'], '10.0f')} {_fmt(r['e2e_runs_per_s'], '10.0f')} "
            f"{_fmt(r['latency_p50_ms'], '7.2f')} {_fmt(r['latency_p95_ms'], '7.2f')} "
            f"{_fmt(r['worker_rss_mb'], '7.1f')} {_fmt(r['worker_hwm_mb'], '7.1f')} "
            f"{_fmt(r.get('worker_cpu_ms_per_job'), '10.3f')} {_fmt(r.get('drain_after_enqueue_s'), '8.2f')}"
            f" {_fmt(r.get('loadavg_1m_before'), '5.1f')}"
        )


def outer_main(args: argparse.Namespace) -> int:
    started = time.monotonic()
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        raise SystemExit(f"error: --systems must be a comma list of {','.join(SYSTEMS)}; got {args.systems!r}")
    if args.runs < 1 or args.latency_samples < 1:
        raise SystemExit("error: --runs and --latency-samples must be >= 1")

    binary = ensure_redis_server()
    python, versions = ensure_venv(Path(args.venv).expanduser())
    results: list[dict] = []
    with PrivateRedis(binary, args.durable) as redis_srv:
        mode = (
            "DURABLE (--appendonly yes --appendfsync everysec)"
            if args.durable
            else "WITHOUT durability (--save '' --appendonly no)"
        )
        log(f"{redis_srv.version.split(' sha=')[0]}; private on 127.0.0.1:{redis_srv.port}, {mode}")
        log("peers: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + f" (venv {args.venv})")
        for system in systems:
            for variant, desc in VARIANTS[system]:
                log(f"{system}/{variant}: {desc}; runs={args.runs}")
                t0 = time.monotonic()
                res = run_inner(python, system, variant, redis_srv.url, args)
                res.update(
                    system=system,
                    variant=variant,
                    runs=args.runs,
                    durable=args.durable,
                    description=desc,
                    redis_server=redis_srv.version.split(" sha=")[0],
                    versions=versions,
                )
                log(f"{system}/{variant}: done in {time.monotonic() - t0:.1f}s"
                    + (f" -- FAILED: {res['error']}" if res.get("error") else ""))
                results.append(res)
    elapsed = time.monotonic() - started
    if args.json:
        for r in results:
            print(json.dumps(r, sort_keys=True), flush=True)
    else:
        durability = "durable (AOF everysec)" if args.durable else "NOT durable (--save '' --appendonly no)"
        print(f"Peers on a private Redis, {durability}; one worker process each; N={args.runs} no-op jobs.")
        print("peers: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
        print_table(results)
        print(
            "enqueue/s: single-thread enqueue of N while the worker consumes; e2e: N / (first enqueue"
            " -> last task's own completion timestamp); p50/p95: enqueue->completion seen via BLPOP,"
            f" {args.latency_samples} sequential jobs on an idle worker; RSS/HWM: VmRSS/VmHWM of the"
            " process that ran the tasks (RQ fork: the parent worker); cpu ms/job: worker process"
            " tree CPU (incl. reaped children) during the e2e phase / N; drain s: last job finished"
            " minus end of enqueuing (~0 = e2e was bound by the single-thread enqueuer); load: 1-min"
            " load average before the e2e phase (2 cores; other work on the machine shows here)."
        )
        print(f"total wall time: {elapsed:.1f}s")
    log(f"total wall time {elapsed:.1f}s")
    return 1 if any(r.get("error") for r in results) else 0


# --------------------------------------------------------------------------- inner: measurement


def _proc_status(pid: int) -> dict[str, int]:
    """VmRSS/VmHWM in kB from /proc/<pid>/status ({} if the process is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(rest.split()[0])
    except OSError:
        pass
    return out


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def _tree(pid: int) -> list[int]:
    children = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _cpu_seconds(pids: list[int]) -> float:
    """utime+stime+cutime+cstime of the given processes (reaped children, e.g. RQ horses, count)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        total += sum(int(x) for x in fields[11:15])
    return total / ticks


def _worker_cmd(system: str, variant: str, venv_bin: Path, redis_url: str) -> list[str]:
    if system == "dramatiq":
        return [
            str(venv_bin / "dramatiq"), "peer_tasks", "--processes", "1",
            "--threads", str(CONCURRENCY), f"--path={BENCH_DIR}",
        ]  # fmt: skip
    if system == "celery":
        return [
            str(venv_bin / "celery"), "-A", "peer_tasks", "worker", "--pool", "threads",
            "--concurrency", str(CONCURRENCY), "-Q", QUEUE, "--loglevel", "WARNING",
        ]  # fmt: skip
    cmd = [str(venv_bin / "rq"), "worker", "--url", redis_url, "--path", str(BENCH_DIR), "--quiet"]
    if variant == "simple":
        cmd += ["--worker-class", "rq.worker.SimpleWorker"]
    return [*cmd, QUEUE]


class InnerFailure(Exception):
    """A bounded wait expired or the worker died."""


def inner_main(args: argparse.Namespace) -> int:
    system, variant, redis_url = args._inner, args._variant, args._redis_url
    os.environ.update(PEERS_SYSTEM=system, PEERS_REDIS_URL=redis_url, PEERS_DONE_KEY=DONE_KEY)
    sys.path.insert(0, str(BENCH_DIR))
    import redis

    import peer_tasks

    r = redis.Redis.from_url(redis_url)
    r.flushall()  # private server: start every system from an empty Redis

    if system == "dramatiq":
        enqueue = peer_tasks.noop.send
    elif system == "celery":
        enqueue = peer_tasks.noop.delay
    else:
        from rq import Queue

        queue = Queue(QUEUE, connection=redis.Redis.from_url(redis_url))

        def enqueue() -> object:
            return queue.enqueue(peer_tasks.noop)

    workdir = tempfile.mkdtemp(prefix=f"peers-{system}-")
    worker_log = Path(workdir) / "worker.log"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(BENCH_DIR), os.environ.get("PYTHONPATH")])),
        PYTHONUNBUFFERED="1",
    )
    venv_bin = Path(sys.executable).parent
    cmd = _worker_cmd(system, variant, venv_bin, redis_url)
    result: dict = {
        "system": system,
        "variant": variant,
        "runs": args.runs,
        "concurrency": 1 if system == "rq" else CONCURRENCY,
        "worker_cmd": " ".join(Path(cmd[0]).name if i == 0 else c for i, c in enumerate(cmd)),
        "completion_signal": "task RPUSH pid:timestamp to a Redis list; LLEN polled every 5 ms",
    }
    with open(worker_log, "wb") as logf:
        worker = subprocess.Popen(
            cmd, cwd=workdir, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _measure(args, r, enqueue, worker, result)
    except Exception as exc:  # report, with the worker's log, instead of a bare traceback
        result["error"] = f"{type(exc).__name__}: {exc}"
        tail = worker_log.read_text(errors="replace")[-4000:]
        print(f"[peers] {system}/{variant} FAILED: {result['error']}\n--- worker log (tail) ---\n"
              f"{tail}\n--- end worker log ---", file=sys.stderr, flush=True)
    finally:
        _stop_worker(worker)
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return 1 if "error" in result else 0


def _stop_worker(worker: subprocess.Popen[bytes]) -> None:
    """Warm shutdown (SIGTERM to the worker's own process group), then SIGKILL after 15 s."""
    if worker.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(worker.pid, sig)
        except ProcessLookupError:
            return
        try:
            worker.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_done(r, count: int, worker: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        n = r.llen(DONE_KEY)
        if n >= count:
            return
        if worker.poll() is not None:
            raise InnerFailure(f"worker exited with code {worker.returncode} during {what} ({n}/{count} done)")
        if time.monotonic() > deadline:
            raise InnerFailure(f"timeout after {timeout:.0f}s during {what}: {n}/{count} jobs done")
        time.sleep(0.005)


def _measure(args, r, enqueue, worker: subprocess.Popen[bytes], result: dict) -> None:
    n = args.runs
    # 1. Worker started and idle: a warm-up batch must go through (also warms the enqueue side).
    for _ in range(WARMUP_JOBS):
        enqueue()
    _wait_done(r, WARMUP_JOBS, worker, min(args.timeout, 120), "worker start-up/warm-up")
    r.delete(DONE_KEY)
    time.sleep(0.5)  # let start-up work (imports, connection set-up, heartbeats) settle; not a sync

    result["loadavg_1m_before"] = round(os.getloadavg()[0], 2)  # the machine is shared: show noise
    tree = _tree(worker.pid)
    redis_pid = int(r.info("server")["process_id"])
    cpu0, rcpu0 = _cpu_seconds(tree), _cpu_seconds([redis_pid])

    # 2. Enqueue rate and end-to-end throughput.
    t0_wall, t0 = time.time(), time.perf_counter()
    for _ in range(n):
        enqueue()
    enqueue_s = time.perf_counter() - t0
    _wait_done(r, n, worker, args.timeout, "end-to-end run")
    tree = _tree(worker.pid)
    cpu1, rcpu1 = _cpu_seconds(tree), _cpu_seconds([redis_pid])
    signals = [v.decode().split(":") for v in r.lrange(DONE_KEY, 0, -1)]
    last_finished = max(float(ts) for _, ts in signals)
    task_pids = {int(pid) for pid, _ in signals}
    e2e_s = last_finished - t0_wall
    r.delete(DONE_KEY)
    # Drain after the last enqueue: ~0 means e2e was bound by the (single-thread) enqueuing side.
    drain_s = last_finished - (t0_wall + enqueue_s)
    result.update(
        enqueue_s=round(enqueue_s, 4),
        drain_after_enqueue_s=round(drain_s, 4),
        enqueue_per_s=round(n / enqueue_s, 1),
        e2e_s=round(e2e_s, 4),
        e2e_runs_per_s=round(n / e2e_s, 1),
        worker_cpu_ms_per_job=round((cpu1 - cpu0) * 1000 / n, 4),
        redis_cpu_ms_per_job=round((rcpu1 - rcpu0) * 1000 / n, 4),
    )

    # 3. Idle latency: one job at a time, completion seen through BLPOP (no polling delay).
    samples = []
    for i in range(args.latency_samples):
        t = time.perf_counter()
        enqueue()
        got = r.blpop([DONE_KEY], timeout=10)
        if got is None:
            if worker.poll() is not None:
                raise InnerFailure(f"worker exited with code {worker.returncode} during latency run")
            raise InnerFailure(f"latency job {i} not done within 10s")
        samples.append((time.perf_counter() - t) * 1000)
    q = statistics.quantiles(samples, n=100, method="inclusive")
    result.update(
        latency_samples=len(samples),
        latency_p50_ms=round(statistics.median(samples), 3),
        latency_p95_ms=round(q[94], 3),
        latency_max_ms=round(max(samples), 3),
    )

    result["loadavg_1m_after"] = round(os.getloadavg()[0], 2)

    # 4. Memory of the process that ran the tasks (RQ fork: horses are gone -> the parent).
    tree = _tree(worker.pid)
    live_task_pids = [p for p in task_pids if p in tree]
    rss_pid = live_task_pids[0] if len(live_task_pids) == 1 else worker.pid
    st = _proc_status(rss_pid)
    tree_rss = sum(_proc_status(p).get("VmRSS", 0) for p in tree)
    result.update(
        worker_rss_pid_role="process that ran the tasks" if rss_pid in task_pids else "started worker process (parent)",
        worker_rss_mb=round(st.get("VmRSS", 0) / 1024, 1) if st else None,
        worker_hwm_mb=round(st.get("VmHWM", 0) / 1024, 1) if st else None,
        worker_tree_rss_mb=round(tree_rss / 1024, 1),
        worker_tree_processes=len(tree),
        task_processes_seen=len(task_pids),
    )


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="peers.py",
        description=(
            "Measure Dramatiq, RQ and Celery (one worker process each, 10 threads where supported;"
            " RQ twice: forking Worker and SimpleWorker) on N no-op jobs through a private,"
            " non-durable Redis on 127.0.0.1, for side-by-side ratios with sync_worker. Sets up"
            " redis-server (apt-get, as root) and a peers venv itself. Reports enqueue/s,"
            " end-to-end runs/s, idle latency p50/p95 and worker RSS."
        ),
        epilog=(
            "Example: python benchmarks/peers.py --runs 5000 --json > peers.jsonl  "
            "(JSON keys: system, variant, runs, enqueue_per_s, e2e_runs_per_s, latency_p50_ms,"
            " latency_p95_ms, worker_rss_mb, durable, plus extras). Progress goes to stderr."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--runs", type=int, default=5000, help="number of no-op jobs per system (N)")
    p.add_argument(
        "--systems", default=",".join(SYSTEMS), help="comma-separated subset of dramatiq,rq,celery"
    )
    p.add_argument("--venv", default=str(DEFAULT_VENV), help="venv for the peer libraries (created if missing)")
    p.add_argument("--json", action="store_true", help="print one JSON object per system/variant on stdout")
    p.add_argument(
        "--durable",
        action="store_true",
        help="run Redis with --appendonly yes --appendfsync everysec instead of no persistence",
    )
    p.add_argument("--latency-samples", type=int, default=200, help="sequential jobs for p50/p95 latency")
    p.add_argument("--timeout", type=float, default=240, help="bound (s) for each wait phase (e2e drain etc.)")
    # Internal: the per-system measurement, run with the peers venv's python.
    p.add_argument("--_inner", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--_variant", help=argparse.SUPPRESS)
    p.add_argument("--_redis-url", dest="_redis_url", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args._inner:
        return inner_main(args)
    return outer_main(args)


if __name__ == "__main__":
    sys.exit(main())
