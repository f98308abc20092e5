"""Throughput of the embedded server, measured over the wire.

Starts a server (a subprocess by default: the server then has its own GIL, as in production),
creates N background runs over HTTP from K threads (keep-alive sessions), and runs a
subscriber (raw websocket-client, no sync_worker client code) that acknowledges each run and
reports PENDING -> RUNNING -> COMPLETED through the socket's set_state extension, from a pool
of executor threads, like a worker with a concurrency limit.

Prints creates/s, deliveries/s and end-to-end runs/s (first create to last COMPLETED).

Examples:
    python benchmarks/server_throughput.py --runs 20000
    python benchmarks/server_throughput.py --runs 20000 --sequential    # create all, then consume
    python benchmarks/server_throughput.py --in-process --set-state rest
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

import requests
import websocket


class Worker:
    """A subscriber: acks each run and drives it to COMPLETED from ``concurrency`` threads."""

    def __init__(self, url: str, task_key: str, concurrency: int, set_state: str, auth: str | None) -> None:
        self.url = url
        self.task_key = task_key
        self.set_state_mode = set_state
        self.auth = auth
        self.ws = websocket.create_connection(
            url.replace("http://", "ws://", 1) + "/task_runs/subscriptions/scheduled", subprotocols=["prefect"]
        )
        self.ws.send(json.dumps({"type": "auth", "token": auth}))
        reply = json.loads(self.ws.recv())
        assert reply["type"] == "auth_success", reply
        if set_state == "ws" and "set_state" not in reply.get("extensions", []):
            raise SystemExit("server does not offer the set_state extension; use --set-state rest")
        self.ws.send(json.dumps({"type": "subscribe", "keys": [task_key], "client_id": f"bench-{os.getpid()}"}))
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
        self.counter_lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.executors = [threading.Thread(target=self._execute, daemon=True) for _ in range(concurrency)]

    def start(self, expected: int) -> None:
        self.expected = expected
        self.reader.start()
        for t in self.executors:
            t.start()

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
                now = time.perf_counter()
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
        slot = [threading.Event(), None]
        with self.pending_lock:
            self.pending[request_id] = slot
        self._send({"type": "set_state", "request_id": request_id, "task_run_id": run_id,
                    "state": {"type": state_type, "state_details": {"deferred": True}}, "force": False})
        if not slot[0].wait(60):
            raise RuntimeError("no set_state_result within 60 s")
        reply = slot[1]
        assert reply["status_code"] == 201, reply
        return reply["result"]

    def _execute(self) -> None:
        session = requests.Session()
        if self.auth:
            session.headers["Authorization"] = "Basic " + base64.b64encode(self.auth.encode()).decode()
        while True:
            run = self.work.get()
            if run is None:
                return
            for state_type in ("PENDING", "RUNNING", "COMPLETED"):
                if self.set_state_mode == "ws":
                    result = self._propose_ws(run["id"], state_type)
                else:
                    response = session.post(f"{self.url}/task_runs/{run['id']}/set_state",
                                            json={"state": {"type": state_type}, "force": False}, timeout=60)
                    result = response.json()
                if result["status"] != "ACCEPT":
                    raise RuntimeError(f"{state_type} for {run['id']}: {result['status']}")
            with self.counter_lock:
                self.completed += 1
                self.last_completed = time.perf_counter()
                if self.completed >= self.expected:
                    self.done.set()

    def close(self) -> None:
        self.done.set()
        for _ in self.executors:
            self.work.put(None)
        try:
            self.ws.send(json.dumps({"type": "quit"}))
            self.ws.close(timeout=1)
        except (websocket.WebSocketException, OSError):
            pass


def create_runs(url: str, task_key: str, runs: int, threads: int, auth: str | None) -> float:
    """Create ``runs`` background runs from ``threads`` keep-alive sessions; returns seconds."""
    per_thread = [runs // threads + (1 if i < runs % threads else 0) for i in range(threads)]
    errors: list[BaseException] = []

    def create(count: int) -> None:
        session = requests.Session()
        if auth:
            session.headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
        body_template = {
            "name": "bench", "task_key": task_key, "flow_run_id": None, "tags": [], "task_inputs": {},
            "empirical_policy": {"retries": 0, "retry_delay": 0},
            "state": {"type": "SCHEDULED", "name": "Scheduled", "state_details": {"deferred": True}},
        }
        try:
            for _ in range(count):
                body = dict(body_template, dynamic_key=uuid.uuid4().hex)
                response = session.post(url + "/task_runs/", data=json.dumps(body),
                                        headers={"Content-Type": "application/json"}, timeout=60)
                if response.status_code != 201:
                    raise RuntimeError(f"create failed: {response.status_code} {response.text}")
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)

    started = time.perf_counter()
    workers = [threading.Thread(target=create, args=(n,)) for n in per_thread]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started


def start_server(args: argparse.Namespace, db: str) -> tuple[str, Any]:
    if args.url:
        return args.url.rstrip("/"), None
    if args.in_process:
        from sync_worker.server import Server

        server = Server(port=0, database=db, auth_string=args.auth_string, synchronous=args.synchronous).start()
        return server.url, server
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


def stop_server(handle: Any) -> None:
    if handle is None:
        return
    if isinstance(handle, subprocess.Popen):
        handle.terminate()
        handle.wait(timeout=10)
    else:
        handle.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + ". See the module docstring for what is measured.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--runs", type=int, default=10000, help="number of task runs")
    parser.add_argument("--threads", type=int, default=4, help="HTTP threads creating runs (keep-alive sessions)")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="executor threads of the subscriber proposing states")
    parser.add_argument("--set-state", choices=["ws", "rest"], default="ws",
                        help="report states over the socket's set_state extension or REST")
    parser.add_argument("--sequential", action="store_true",
                        help="create all runs first, then subscribe (measures each side alone)")
    parser.add_argument("--in-process", action="store_true", help="run the server in this process")
    parser.add_argument("--url", help="use an already running server at this API URL instead")
    parser.add_argument("--auth-string", default=None)
    parser.add_argument("--synchronous", choices=["NORMAL", "FULL"], default="NORMAL")
    parser.add_argument("--db", help="database file (default: a new temporary file)")
    args = parser.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix="sync-worker-bench-")
    db = args.db or os.path.join(tmp, "bench.db")
    url, handle = start_server(args, db)
    task_key = f"bench-{uuid.uuid4().hex[:8]}"
    print(f"server {url} ({'in-process' if args.in_process else 'subprocess' if handle else 'external'}), "
          f"{args.runs} runs, {args.threads} create threads, {args.concurrency} executor threads, "
          f"set_state over {args.set_state}, synchronous={args.synchronous}")
    try:
        if args.sequential:
            create_seconds = create_runs(url, task_key, args.runs, args.threads, args.auth_string)
            worker = Worker(url, task_key, args.concurrency, args.set_state, args.auth_string)
            started = time.perf_counter()
            worker.start(args.runs)
        else:
            worker = Worker(url, task_key, args.concurrency, args.set_state, args.auth_string)
            worker.start(args.runs)
            started = time.perf_counter()
            create_seconds = create_runs(url, task_key, args.runs, args.threads, args.auth_string)
        if not worker.done.wait(max(120.0, args.runs / 50)):
            print(f"TIMEOUT: {worker.completed}/{args.runs} completed, {worker.delivered} delivered")
            return 1
        end_to_end = worker.last_completed - started
        delivery_span = max(worker.last_delivery - worker.first_delivery, 1e-9)
        worker.close()
    finally:
        stop_server(handle)
    print(f"creates:     {args.runs / create_seconds:9.0f} runs/s  ({create_seconds:.2f} s)")
    print(f"deliveries:  {worker.delivered / delivery_span:9.0f} runs/s  ({delivery_span:.2f} s)")
    label = "consume" if args.sequential else "end to end"
    print(f"{label + ':':12s} {args.runs / end_to_end:9.0f} runs/s  ({end_to_end:.2f} s, "
          f"{'after the creates' if args.sequential else 'creates and executions concurrent'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
