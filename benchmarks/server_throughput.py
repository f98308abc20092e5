"""Throughput of the embedded server, measured over the wire.

Starts a server (a subprocess by default: it then has its own GIL, as in production), then
- creator process(es): N background runs created over HTTP from K threads, each with its own
  keep-alive connection (stdlib http.client: a light client, so that the server is measured);
- a worker process: a raw websocket-client subscriber that acknowledges each run and drives
  it PENDING -> RUNNING -> COMPLETED through the socket's set_state extension (or REST), from
  a pool of executor threads, like a worker with a concurrency limit. No sync_worker client
  code is involved.

Prints creates/s, deliveries/s, end-to-end runs/s (first create to last COMPLETED) and the
server's CPU time per run. Every run is durable: committed to SQLite before each answer.

Examples:
    python benchmarks/server_throughput.py --runs 20000
    python benchmarks/server_throughput.py --runs 20000 --sequential   # create all, then consume
    python benchmarks/server_throughput.py --set-state rest --synchronous FULL
"""
from __future__ import annotations

import argparse
import atexit
import base64
import http.client
import json
import multiprocessing
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import websocket


def _headers(auth: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    return headers


def _connection(url: str) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


class Worker:
    """A subscriber: acks each run and drives it to COMPLETED from ``concurrency`` threads."""

    def __init__(self, url: str, task_key: str, concurrency: int, set_state: str, auth: str | None,
                 prefetch: int = 1) -> None:
        self.url = url
        self.task_key = task_key
        self.set_state_mode = set_state
        self.auth = auth
        self.concurrency = concurrency
        self.ws = websocket.create_connection(
            url.replace("http://", "ws://", 1) + "/task_runs/subscriptions/scheduled", subprotocols=["prefect"]
        )
        self.ws.send(json.dumps({"type": "auth", "token": auth}))
        reply = json.loads(self.ws.recv())
        assert reply["type"] == "auth_success", reply
        if set_state == "ws" and "set_state" not in reply.get("extensions", []):
            raise SystemExit("server does not offer the set_state extension; use --set-state rest")
        subscribe: dict[str, Any] = {"type": "subscribe", "keys": [task_key], "client_id": f"bench-{os.getpid()}"}
        if prefetch > 1:
            if "prefetch" not in reply.get("extensions", []):
                raise SystemExit("server does not offer the prefetch extension; use --prefetch 1")
            subscribe["prefetch"] = prefetch
        self.ws.send(json.dumps(subscribe))
        self.send_lock = threading.Lock()
        self.work: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.pending: dict[str, Any] = {}
        self.pending_lock = threading.Lock()
        self.delivered = 0
        self.completed = 0
        self.first_delivery = 0.0
        self.last_delivery = 0.0
        self.last_completed = 0.0
        self.done = threading.Event()
        self.expected = 0
        self.failure: str | None = None
        self.counter_lock = threading.Lock()

    def start(self, expected: int) -> None:
        self.expected = expected
        threading.Thread(target=self._read, daemon=True).start()
        for _ in range(self.concurrency):
            threading.Thread(target=self._execute, daemon=True).start()

    def _send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message)
        with self.send_lock:
            self.ws.send(data)

    def _read(self) -> None:
        while not self.done.is_set():
            try:
                message = json.loads(self.ws.recv())
            except (websocket.WebSocketException, OSError, ValueError):
                return  # closed
            if "type" not in message:  # a task run
                now = time.time()
                if not self.first_delivery:
                    self.first_delivery = now
                self.last_delivery = now
                self.delivered += 1
                self._send({"type": "ack"})
                self.work.put(message)
            elif message["type"] == "set_state_result":
                with self.pending_lock:
                    slot = self.pending.pop(message["request_id"])
                slot[1] = message
                slot[0].set()

    def _propose_ws(self, run_id: str, state_type: str) -> dict[str, Any]:
        request_id = uuid.uuid4().hex
        slot: list[Any] = [threading.Event(), None]
        with self.pending_lock:
            self.pending[request_id] = slot
        self._send({"type": "set_state", "request_id": request_id, "task_run_id": run_id,
                    "state": {"type": state_type, "state_details": {"deferred": True}}, "force": False})
        if not slot[0].wait(60):
            raise RuntimeError("no set_state_result within 60 s")
        reply = slot[1]
        if reply["status_code"] != 201:
            raise RuntimeError(f"set_state failed: {reply}")
        return reply["result"]

    def _execute(self) -> None:
        conn = _connection(self.url) if self.set_state_mode == "rest" else None
        headers = _headers(self.auth)
        prefix = urlsplit(self.url).path
        try:
            while True:
                run = self.work.get()
                if run is None:
                    return
                for state_type in ("PENDING", "RUNNING", "COMPLETED"):
                    if conn is None:
                        result = self._propose_ws(run["id"], state_type)
                    else:
                        conn.request("POST", f"{prefix}/task_runs/{run['id']}/set_state",
                                     body=json.dumps({"state": {"type": state_type}, "force": False}),
                                     headers=headers)
                        result = json.loads(conn.getresponse().read())
                    if result["status"] != "ACCEPT":
                        raise RuntimeError(f"{state_type} for {run['id']}: {result['status']}")
                with self.counter_lock:
                    self.completed += 1
                    self.last_completed = time.time()
                    if self.completed >= self.expected:
                        self.done.set()
        except Exception as exc:  # noqa: BLE001 - reported by the parent
            self.failure = repr(exc)
            self.done.set()

    def close(self) -> None:
        self.done.set()
        for _ in range(self.concurrency):
            self.work.put(None)
        try:
            self.ws.send(json.dumps({"type": "quit"}))
            self.ws.close(timeout=1)
        except (websocket.WebSocketException, OSError):
            pass


def _worker_main(url: str, task_key: str, runs: int, concurrency: int, mode: str, auth: str | None,
                 prefetch: int, out: Any) -> None:
    worker = Worker(url, task_key, concurrency, mode, auth, prefetch)
    worker.start(runs)
    out.put(("ready", None))
    finished = worker.done.wait(max(300.0, runs / 20))
    out.put(("done", {
        "finished": finished and worker.failure is None, "failure": worker.failure,
        "delivered": worker.delivered, "completed": worker.completed,
        "first_delivery": worker.first_delivery, "last_delivery": worker.last_delivery,
        "last_completed": worker.last_completed,
    }))
    worker.close()


def _creator_main(url: str, task_key: str, runs: int, threads: int, auth: str | None, go: Any, out: Any) -> None:
    """Create ``runs`` background runs from ``threads`` keep-alive connections."""
    per_thread = [runs // threads + (1 if i < runs % threads else 0) for i in range(threads)]
    errors: list[str] = []
    headers = _headers(auth)
    path = urlsplit(url).path + "/task_runs/"
    connections = [_connection(url) for _ in per_thread]

    def create(conn: http.client.HTTPConnection, count: int) -> None:
        try:
            for _ in range(count):
                body = json.dumps({
                    "name": "bench", "task_key": task_key, "dynamic_key": uuid.uuid4().hex, "flow_run_id": None,
                    "tags": [], "task_inputs": {}, "empirical_policy": {"retries": 0, "retry_delay": 0},
                    "state": {"type": "SCHEDULED", "name": "Scheduled",
                              "state_details": {"deferred": True, "task_parameters_id": str(uuid.uuid4())}},
                })
                conn.request("POST", path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                if response.status != 201:
                    raise RuntimeError(f"create failed: {response.status} {data[:200]!r}")
        except Exception as exc:  # noqa: BLE001 - reported by the parent
            errors.append(repr(exc))

    go.wait()
    started = time.time()
    workers = [threading.Thread(target=create, args=(c, n)) for c, n in zip(connections, per_thread, strict=True)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    out.put(("created", {"started": started, "ended": time.time(), "errors": errors}))


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def start_server(args: argparse.Namespace, db: str) -> tuple[str, Any]:
    if args.url:
        return args.url.rstrip("/"), None
    command = [sys.executable, "-m", "sync_worker.server", "--port", "0", "--db", db, "--log-level", "INFO",
               "--synchronous", args.synchronous]
    env = dict(os.environ)
    if args.auth_string:
        env["SYNC_WORKER_SERVER_AUTH_STRING"] = args.auth_string
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 30
    assert process.stderr is not None
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        match = re.search(r"Serving on (http://\S+/api)", line)
        if match:
            threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()  # drain
            return match.group(1), process
    process.kill()
    raise SystemExit("the server did not start")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + ". See the module docstring for what is measured.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--runs", type=int, default=10000, help="number of task runs")
    parser.add_argument("--threads", type=int, default=4, help="HTTP threads creating runs, per creator process")
    parser.add_argument("--creators", type=int, default=1, help="creator processes (runs are split among them)")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="executor threads of the subscriber proposing states")
    parser.add_argument("--set-state", choices=["ws", "rest"], default="ws",
                        help="report states over the socket's set_state extension or REST")
    parser.add_argument("--prefetch", type=int, default=1,
                        help="runs the server may send before their acks (the embedded server's prefetch "
                             "extension; 1 = the Prefect protocol)")
    parser.add_argument("--sequential", action="store_true",
                        help="create all runs first, then subscribe (measures each side alone)")
    parser.add_argument("--url", help="use an already running server at this API URL instead of starting one")
    parser.add_argument("--auth-string", default=None)
    parser.add_argument("--synchronous", choices=["NORMAL", "FULL"], default="NORMAL",
                        help="SQLite durability of the started server")
    parser.add_argument("--db", help="database file (default: a new temporary file)")
    args = parser.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix="sync-worker-bench-")
    atexit.register(shutil.rmtree, tmp, True)  # the database and files go when the script ends
    db = args.db or os.path.join(tmp, "bench.db")
    url, process = start_server(args, db)
    task_key = f"bench-{uuid.uuid4().hex[:8]}"
    print(f"server {url} ({'subprocess' if process else 'external'}), {args.runs} runs, "
          f"{args.creators}x{args.threads} create threads, {args.concurrency} executor threads, "
          f"prefetch {args.prefetch}, "
          f"set_state over {args.set_state}, synchronous={args.synchronous}, {os.cpu_count()} CPUs")
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    go = ctx.Event()
    per_creator = [args.runs // args.creators + (1 if i < args.runs % args.creators else 0)
                   for i in range(args.creators)]
    creators = [ctx.Process(target=_creator_main, args=(url, task_key, n, args.threads, args.auth_string, go, out))
                for n in per_creator]
    worker = ctx.Process(target=_worker_main,
                         args=(url, task_key, args.runs, args.concurrency, args.set_state, args.auth_string,
                               args.prefetch, out))
    results: dict[str, Any] = {"created": []}
    cpu_before = _cpu_seconds(process.pid) if process else float("nan")
    try:
        for p in creators:
            p.start()
        if args.sequential:
            go.set()
            while len(results["created"]) < len(creators):
                kind, value = out.get(timeout=600)
                results[kind].append(value)
            worker.start()
        else:
            worker.start()
        while "ready" not in results:
            kind, value = out.get(timeout=60)
            if kind == "created":
                results["created"].append(value)
            else:
                results[kind] = value
        go.set()
        while "done" not in results or len(results["created"]) < len(creators):
            kind, value = out.get(timeout=max(600.0, args.runs / 20))
            if kind == "created":
                results["created"].append(value)
            else:
                results[kind] = value
        cpu_after = _cpu_seconds(process.pid) if process else float("nan")
    finally:
        for p in [*creators, worker]:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        if process is not None:
            process.terminate()
            process.wait(timeout=10)
    errors = [e for c in results["created"] for e in c["errors"]]
    done = results["done"]
    if errors or not done["finished"]:
        print(f"FAILED: create errors {errors[:3]}, worker {done}")
        return 1
    created_from = min(c["started"] for c in results["created"])
    created_to = max(c["ended"] for c in results["created"])
    create_seconds = created_to - created_from
    delivery_span = max(done["last_delivery"] - done["first_delivery"], 1e-9)
    start = created_from if not args.sequential else done["first_delivery"]
    end_to_end = done["last_completed"] - start
    print(f"creates:     {args.runs / create_seconds:9.0f} runs/s  ({create_seconds:.2f} s)")
    print(f"deliveries:  {done['delivered'] / delivery_span:9.0f} runs/s  ({delivery_span:.2f} s)")
    label = "consume" if args.sequential else "end to end"
    print(f"{label + ':':12s} {args.runs / end_to_end:9.0f} runs/s  ({end_to_end:.2f} s, "
          f"{'first delivery to last COMPLETED' if args.sequential else 'first create to last COMPLETED'})")
    if process is not None:
        cpu = cpu_after - cpu_before
        print(f"server CPU:  {cpu / args.runs * 1e6:9.0f} us/run  ({cpu:.2f} s for create + deliver + ack "
              f"+ 3 state changes per run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
