"""Seeded, bounded fuzzing of the embedded server (REST bodies and frames on both sockets) with a
normal workload running beside it, and the poison test: every run the server accepts can be
driven to a final state.

What a user would see is asserted: no answer >= 500 (and no close code outside the README's
table), no workload run lost or run twice, and every accepted run served and finished.
``SYNC_WORKER_FUZZ_SEED`` / ``SYNC_WORKER_FUZZ_N`` change the seed and the number of cases.
"""
from __future__ import annotations

import collections
import copy
import json
import os
import random
import threading
import time
import uuid
from typing import Any

import pytest
import requests
import websocket
from tests.server.conftest import Wire

from sync_worker.schemas import TaskRun

pytestmark = pytest.mark.timeout(240)

SEED = int(os.environ.get("SYNC_WORKER_FUZZ_SEED", "20261130"))
N = int(os.environ.get("SYNC_WORKER_FUZZ_N", "1500"))
#: close codes a bad frame may get (README "Websocket close codes")
DOCUMENTED_CLOSE_CODES = {1000, 1002, 1003, 1007, 1008, 1009, 4001}

NASTY: list[Any] = [
    None, True, False, 0, -1, 1, 2 ** 31, 2 ** 63, 10 ** 30, -(10 ** 30), 1e300, -1e300, 1e-300, 0.5, -0.0,
    "", " ", "a/b", "..", "../../etc/passwd", "/dev/zero", "x" * 300, "y" * 5000, "\u0000", "\ud800", "\udfff",
    "\U0001f600", "é", "SCHEDULED", "PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "CRASHED",
    "PAUSED", "CANCELLING", "EXPLODED", "0001-01-01", "1969-07-20T20:17:40.5Z", "9999-12-31T23:59:59-01:00",
    "9999-12-31T23:59:59.999999Z", "2026-01-01T00:00:00+14:00", "2000-13-45", "now", str(uuid.uuid4()),
    str(uuid.uuid4()).upper(), uuid.uuid4().hex, [], [1, 2, 3], ["a", None], {}, {"a": 1}, {"type": "SCHEDULED"},
    [[[[[[[[[[[[]]]]]]]]]]]], float("nan"), float("inf"),
]


def nasty(rng: random.Random) -> Any:
    choice = rng.random()
    if choice < 0.05:
        depth = rng.choice([10, 70, 300, 995])
        return json.loads("[" * depth + "]" * depth) if depth < 900 else {"deep": depth}
    if choice < 0.1:
        return rng.uniform(-1e6, 1e6)
    return copy.deepcopy(rng.choice(NASTY))  # never share a list/dict between mutations


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for key, sub in value.items():
            out.extend(paths(sub, prefix + (key,)))
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            out.extend(paths(sub, prefix + (i,)))
    return out


def mutate(value: Any, rng: random.Random) -> Any:
    """A deep copy of ``value`` with 1-3 structural mutations (replace, delete, add a key)."""
    value = json.loads(json.dumps(value))
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(paths(value))
        if not path:
            if rng.random() < 0.1:
                value = nasty(rng)
            continue
        parent = value
        for part in path[:-1]:
            parent = parent[part]
        last = path[-1]
        r = rng.random()
        if r < 0.6:
            parent[last] = nasty(rng)
        elif r < 0.8 and isinstance(parent, dict):
            del parent[last]
        elif isinstance(parent, dict):
            parent[rng.choice(["extra", "retries", "retry_delay", "scheduled_time", "task_parameters_id",
                               "deferred", "data", "type"])] = nasty(rng)
    return value


def encode(value: Any, rng: random.Random) -> bytes:
    """JSON text (NaN/Infinity allowed, lone surrogates escaped), sometimes damaged at byte level."""
    if isinstance(value, dict) and "deep" in value and len(value) == 1 and isinstance(value["deep"], int):
        depth = value["deep"]
        return b'{"task_key":"k","dynamic_key":"d","tags":' + b"[" * depth + b"]" * depth + b"}"
    raw = json.dumps(value, allow_nan=True).encode()
    r = rng.random()
    if r < 0.08 and raw:
        cut = rng.randrange(len(raw))
        raw = raw[:cut]
    elif r < 0.16 and raw:
        i = rng.randrange(len(raw))
        raw = raw[:i] + bytes([rng.randrange(256)]) + raw[i + 1:]
    elif r < 0.2:
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))
    return raw


class Workload:
    """Creates runs on its own key over REST while a raw subscriber runs each one (RUNNING ->
    COMPLETED over the socket); counts every execution by run id."""

    KEY = "fuzz.workload"

    def __init__(self, url: str, total: int) -> None:
        self.wire = Wire(url)
        self.total = total
        self.created: list[str] = []
        self.executed: collections.Counter[str] = collections.Counter()
        self.foreign: list[str] = []  # runs of other creators that landed on our key
        self.errors: list[str] = []
        self.stop = threading.Event()

    def create_loop(self) -> None:
        try:
            for _ in range(self.total):
                if self.stop.is_set():
                    return
                self.created.append(self.wire.create(self.KEY)["id"])
                time.sleep(0.005)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(f"create: {exc!r}")

    def work_loop(self) -> None:
        try:
            subscriber = self.wire.subscribe([self.KEY], client_id="fuzz-workload")
            while not self.stop.is_set() or len(self.executed) < len(self.created):
                try:
                    run = subscriber.next_run(timeout=0.5)
                except websocket.WebSocketTimeoutException:
                    if self.stop.is_set() and len(self.executed) >= len(self.created):
                        return
                    continue
                subscriber.ack()
                reply = subscriber.set_state(run["id"], "RUNNING")
                if reply["status_code"] != 201 or reply["result"]["status"] != "ACCEPT":
                    self.errors.append(f"RUNNING for {run['id']}: {reply}")
                    continue
                self.executed[run["id"]] += 1
                if run["id"] not in set(self.created):
                    self.foreign.append(run["id"])
                reply = subscriber.set_state(run["id"], "COMPLETED")
                if reply["status_code"] != 201:
                    self.errors.append(f"COMPLETED for {run['id']}: {reply}")
        except Exception as exc:  # noqa: BLE001
            self.errors.append(f"worker: {exc!r}")


def create_body(rng: random.Random) -> dict[str, Any]:
    return {
        "name": "fuzz", "task_key": "fuzz.target", "dynamic_key": f"fuzz-{rng.random()}",
        "empirical_policy": {"retries": 2, "retry_delay": [0, 1], "retry_jitter_factor": 0.5},
        "flow_run_id": None, "tags": ["a", "b"], "labels": {"l": 1}, "task_inputs": {"x": []},
        "cache_key": None, "cache_expiration": None, "task_version": "1",
        "state": {"type": "SCHEDULED", "name": "Scheduled", "message": None, "data": None,
                  "state_details": {"deferred": True, "task_parameters_id": str(uuid.UUID(int=rng.getrandbits(128))),
                                    "scheduled_time": None}},
    }


def set_state_body(rng: random.Random) -> dict[str, Any]:
    return {"state": {"type": rng.choice(["PENDING", "RUNNING", "COMPLETED", "FAILED", "SCHEDULED"]),
                      "name": None, "message": "m", "data": {"storage_key": "k"},
                      "state_details": {"scheduled_time": "2026-01-01T00:00:00Z", "retriable": True}},
            "force": False}


class Tally:
    def __init__(self) -> None:
        self.codes: collections.Counter[Any] = collections.Counter()
        self.server_errors: list[str] = []
        self.lock = threading.Lock()

    def add(self, where: str, code: Any, sample: Any) -> None:
        with self.lock:
            self.codes[(where, code)] += 1
            bad = code >= 500 if isinstance(code, int) and code < 1000 else code not in DOCUMENTED_CLOSE_CODES
            if bad and len(self.server_errors) < 20:
                self.server_errors.append(f"{where} -> {code}: {str(sample)[:300]}")


def fuzz_rest(url: str, rng: random.Random, tally: Tally, accepted: list[str]) -> None:
    http = requests.Session()
    targets: list[str] = []
    for i in range(N):
        body = mutate(create_body(rng), rng)
        raw = encode(body, rng)
        response = http.post(url + "/task_runs/", data=raw, headers={"Content-Type": "application/json"}, timeout=30)
        tally.add("POST /task_runs/", response.status_code, raw[:200])
        if response.status_code == 201:
            run_id = response.json()["id"]
            accepted.append(run_id)
            targets.append(run_id)
        if response.status_code >= 400:
            assert isinstance(response.json()["detail"], str) and response.json()["detail"]
        run_id = rng.choice(targets) if targets and rng.random() < 0.9 else rng.choice(
            [str(uuid.uuid4()), "..", "x" * 300, "%00", "a%2Fb"])
        raw = encode(mutate(set_state_body(rng), rng), rng)
        response = http.post(f"{url}/task_runs/{run_id}/set_state", data=raw,
                             headers={"Content-Type": "application/json"}, timeout=30)
        tally.add("POST set_state", response.status_code, raw[:200])
        if i % 10 == 0:
            key = rng.choice(["ok-key", "..", "a" * 250, "%2e%2e", "k%00", uuid.uuid4().hex])
            response = http.put(f"{url}/storage/{key}", data=raw, timeout=30)
            tally.add("PUT storage", response.status_code, key)
            response = http.get(f"{url}/task_runs/{rng.choice([run_id, key])}", timeout=30)
            tally.add("GET task_run", response.status_code, key)
    http.close()


def ws_connect(url: str, path: str) -> websocket.WebSocket:
    ws = websocket.create_connection(url.replace("http", "ws") + path, subprotocols=["prefect"], timeout=30)
    ws.send(json.dumps({"type": "auth", "token": None}))
    assert json.loads(ws.recv())["type"] == "auth_success"
    return ws


def fuzz_rpc(url: str, rng: random.Random, tally: Tally, accepted: list[str]) -> None:
    ws = ws_connect(url, "/sync_worker/rpc")
    for i in range(N):
        if rng.random() < 0.9:  # a good envelope, a mutated body
            frame = {"type": "create", "request_id": f"r{i}", "body": mutate(create_body(rng), rng)}
        else:
            frame = mutate({"type": rng.choice(["create", "wait"]), "request_id": f"r{i}",
                            "task_run_id": str(uuid.uuid4()), "body": create_body(rng)}, rng)
        raw = encode(frame, rng)
        ws.send(raw, opcode=websocket.ABNF.OPCODE_TEXT if rng.random() < 0.9 else websocket.ABNF.OPCODE_BINARY)
        while True:
            try:
                kind, reply = _recv_close_aware(ws)
            except (websocket.WebSocketException, OSError):
                kind, reply = "close", 1006
            if kind != "control":
                break
        if kind == "close":
            tally.add("rpc close", reply, raw[:200])
            try:
                ws.close(timeout=1)
            except (websocket.WebSocketException, OSError):
                pass
            ws = ws_connect(url, "/sync_worker/rpc")
            continue
        if reply.get("type") is None:
            tally.add("rpc odd", 999, reply)
            continue
        tally.add(f"rpc {reply['type']}", reply["status_code"], raw[:200])
        if reply["type"] == "create_result" and reply["status_code"] == 201:
            accepted.append(reply["result"]["id"])
    ws.close()


def _recv_close_aware(ws: websocket.WebSocket) -> tuple[str, Any]:
    """('message', dict) or ('close', code)."""
    opcode, data = ws.recv_data(control_frame=True)
    if opcode == websocket.ABNF.OPCODE_CLOSE:
        return "close", int.from_bytes(data[:2], "big") if len(data) >= 2 else 1005
    if opcode in (websocket.ABNF.OPCODE_PING, websocket.ABNF.OPCODE_PONG):
        return "control", None
    return "message", json.loads(data)


def fuzz_subscription(url: str, rng: random.Random, tally: Tally, targets: list[str]) -> None:
    def subscribe() -> websocket.WebSocket:
        ws = ws_connect(url, "/task_runs/subscriptions/scheduled")
        ws.send(json.dumps({"type": "subscribe", "keys": ["fuzz.nothing-here"], "client_id": "fuzz-sub"}))
        return ws

    ws = subscribe()
    for i in range(N):
        run_id = rng.choice(targets) if targets else str(uuid.uuid4())
        good = {"type": "set_state", "request_id": f"s{i}", "task_run_id": run_id,
                "state": set_state_body(rng)["state"], "force": False}
        frame = mutate(good, rng) if rng.random() < 0.95 else mutate(
            {"type": "subscribe", "keys": ["k"], "client_id": "c"}, rng)
        raw = encode(frame, rng)
        ws.send(raw, opcode=websocket.ABNF.OPCODE_TEXT)
        # a frame that is not a set_state gets no answer unless it closes the connection:
        # a ping proves the server has read it
        ws.ping(b"p")
        while True:
            try:
                kind, value = _recv_close_aware(ws)
            except (websocket.WebSocketException, OSError):
                kind, value = "close", 1006
            if kind == "close":
                tally.add("subscription close", value, raw[:200])
                try:
                    ws.close(timeout=1)
                except (websocket.WebSocketException, OSError):
                    pass
                ws = subscribe()
                break
            if kind == "control":
                break
            if value.get("type") == "set_state_result":
                tally.add("subscription set_state_result", value["status_code"], raw[:200])
                continue
            tally.add("subscription odd", 999, value)
    ws.close()


def test_fuzz_rest_and_sockets_with_a_workload(server_factory):
    server = server_factory(lease_timeout=2.0)
    rng = random.Random(SEED)
    tally = Tally()
    accepted: list[str] = []
    workload = Workload(server.url, total=200)
    threads = [threading.Thread(target=workload.create_loop), threading.Thread(target=workload.work_loop)]
    for thread in threads:
        thread.start()
    started = time.monotonic()
    try:
        rest_accepted: list[str] = []
        fuzzers = [
            threading.Thread(target=fuzz_rest, args=(server.url, random.Random(rng.random()), tally, rest_accepted)),
            threading.Thread(target=fuzz_rpc, args=(server.url, random.Random(rng.random()), tally, accepted)),
        ]
        for fuzzer in fuzzers:
            fuzzer.start()
        for fuzzer in fuzzers:
            fuzzer.join(timeout=200)
        fuzz_subscription(server.url, random.Random(rng.random()), tally, rest_accepted[:200])
    finally:
        threads[0].join(timeout=60)
        workload.stop.set()
        threads[1].join(timeout=60)
        workload.wire.close()
    elapsed = time.monotonic() - started
    summary = {f"{where} {code}": n for (where, code), n in sorted(tally.codes.items(), key=str)}
    print(f"fuzz seed={SEED} n={N} in {elapsed:.1f} s: {json.dumps(summary, indent=1)}")
    print(f"workload: {len(workload.created)} created, {sum(workload.executed.values())} executions")
    assert not tally.server_errors, tally.server_errors
    assert not workload.errors, workload.errors
    assert len(workload.created) == 200
    twice = [run_id for run_id, n in workload.executed.items() if n > 1]
    lost = [run_id for run_id in workload.created if workload.executed[run_id] == 0]
    assert (twice, lost) == ([], [])
    assert sum(tally.codes.values()) >= 3 * N
    assert server.running
    assert requests.get(server.url + "/health", timeout=10).json() is True


def drive_to_final(wire: Wire, run_id: str) -> str:
    """Act as a worker (REST): claim, run, fail (exercising the retry policy it was accepted
    with), then finish; returns the final state type. Every answer must be < 500 and every
    run the server sends back must parse in our client."""
    url = f"{wire.url}/task_runs/{run_id}/set_state"
    for _attempt in range(5):
        run = wire.read(run_id)
        TaskRun.from_json(run)
        current = run["state"]["type"]
        if current in ("COMPLETED", "FAILED", "CANCELLED", "CRASHED"):
            return current
        steps = ["PENDING", "RUNNING", "FAILED"] if _attempt == 0 else ["PENDING", "RUNNING", "COMPLETED"]
        for step in steps:
            response = wire.http.post(url, json={"state": {"type": step}}, timeout=10)
            assert response.status_code == 201, response.text
            TaskRun.from_json({**run, "state": response.json()["state"]})
    return wire.read(run_id)["state"]["type"]


def test_poison_every_accepted_run_reaches_a_final_state(server_factory):
    """Mutated creates (fields only: this is about what is accepted); each accepted one is
    then run like a worker would, retries included, and must finish."""
    server = server_factory()
    wire = Wire(server.url)
    rng = random.Random(SEED + 1)
    accepted: list[str] = []
    refused = 0
    try:
        for _ in range(max(200, N // 3)):
            body = mutate(create_body(rng), rng)
            response = wire.http.post(server.url + "/task_runs/", data=json.dumps(body, allow_nan=True),
                                      headers={"Content-Type": "application/json"}, timeout=10)
            assert response.status_code < 500, response.text
            if response.status_code == 201:
                accepted.append(response.json()["id"])
            else:
                refused += 1
        assert len(accepted) > 50 and refused > 50, (len(accepted), refused)
        finals = collections.Counter(drive_to_final(wire, run_id) for run_id in accepted)
        print(f"poison: {len(accepted)} accepted, {refused} refused, final states {dict(finals)}")
        assert set(finals) <= {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}, finals
    finally:
        wire.close()
