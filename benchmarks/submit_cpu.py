"""CPU of ``.delay()`` in the submitting process alone, without the network.

The client is replaced by one whose create answers a canned run (what the embedded server
answers), so what is measured is sync_worker's own Python on the submitting side: binding the
arguments, settings, store, the create body, parsing the answer, the future. The network part
(rpc socket, framing) is measured end to end by ``benchmarks/compare.py``.

Run it from the root of the tree to measure (the tree's ``sync_worker`` is imported from the
current directory), e.g. before/after, alternating:
    python3 benchmarks/submit_cpu.py --runs 20000
    (cd /tmp/old-tree && python3 /path/to/benchmarks/submit_cpu.py --runs 20000)
``--parameters`` submits a task with one argument (a parameters record is written to a
temporary directory); ``--profile`` prints cProfile's top functions.

``--rpc``: through the real ``Client`` and its transport instead, the rpc connection replaced
by one that answers at once with the embedded server's answers as JSON text (``json.loads``
included; a brief create answer, announced as the server does); the socket, its framing and
the reader thread's hand-off are still left out. ``--wait`` (with ``--rpc``): every call is
``.delay().result()``, the wait answered with a completed run (what waited callers pay).

``--socket``: the other half: the real rpc socket (``RpcChannel``: framing, the reader thread,
the hand-off to the caller) against a trivial rpc server in a subprocess (this file, raw
sockets, no database) that answers every ``create`` at once with the embedded server's brief
answer. Measured in the submitting process: CPU per request (all its threads), the median
round trip, and the context switches per request of the callers and the reader thread
(``/proc``, Linux). ``--threads N``: N callers at once (default 1). The server's own time is
in the round trip but not in the CPU. Use it to judge a change to the client's socket path
without the embedded server's noise (run it from each tree, alternated, as above).

``--drain``: where a create's round trip goes in a real drain. Starts ``sync-worker server``
and ``sync-worker worker --limit 10`` (this tree), then ``--threads`` callers (default 4, as
``compare.py``) submit ``--runs`` no-op runs over the rpc socket, as the drain case does. The
submitting side is traced in this process (hooks on ``sync_worker.sockets``, nothing changed in
the library): each create's request (``Connection.request`` entered: the frame is built and
written a few tens of µs later), the reader thread's read that brought its answer, the moment
the reader handed the answer over, and the moment the caller ran again. Printed: runs/s and CPU
per run of each process; per create, median (mean) of server + wire, the reader's parse and
dispatch, the caller's wake-up, and the caller's own Python between two creates; how many
answers each read brought; and, for the reads that answered every caller at once (the server
answers the callers' creates together, so a drain moves in lock step), when the k-th caller ran
again after that read. What a caller does between its answer and its next send is then on the
drain's critical path: the next commit of creates waits for those creates, and the callers run
one after another (one GIL). The hooks cost a few µs per create (this process's CPU includes
them).
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time

ANSWER = {
    "id": "0b5d9f1e-0000-4000-8000-000000000000", "name": "noop", "task_key": "bench.noop", "dynamic_key": "x",
    "state": {"type": "SCHEDULED", "name": "Scheduled", "timestamp": "2026-11-30T03:50:00.123456Z",
              "id": "0b5d9f1e-0000-4000-8000-000000000001",
              "state_details": {"deferred": True, "scheduled_time": "2026-11-30T03:50:00.123456Z"}},
    "empirical_policy": {"retries": 0, "retry_delay": 0}, "tags": [], "run_count": 0, "flow_run_id": None,
    "task_inputs": {}, "created": "2026-11-30T03:50:00.123456Z",
    "expected_start_time": "2026-11-30T03:50:00.123456Z", "start_time": None, "end_time": None,
}

#: What the embedded server answers over the rpc socket (captured from one; ``%s``: the run id).
BRIEF_CREATE_REPLY = (
    '{"type": "create_result", "request_id": "1", "status_code": 201, "result": {"id": "%s", "state": '
    '{"type": "SCHEDULED", "name": "Scheduled", "timestamp": "2026-11-30T10:10:34.141569Z"}}}')
WAIT_REPLY = (
    '{"type": "wait_result", "request_id": "2", "status_code": 200, "result": {"cache_expiration": null, '
    '"cache_key": null, "created": "2026-11-30T10:10:34.141569Z", "dynamic_key": "bench.noop-1c52f87f19e04f358aef9ac41a9114d5", '
    '"empirical_policy": {"max_retries": 0, "retries": 0, "retry_delay": 0.0, "retry_delay_seconds": 0.0, '
    '"retry_jitter_factor": null}, "end_time": "2026-11-30T10:10:34.145190Z", "estimated_run_time": 0.0, '
    '"estimated_start_time_delta": 0.0, "expected_start_time": "2026-11-30T10:10:34.141569Z", "flow_run_id": null, '
    '"flow_run_run_count": 0, "id": "%s", "labels": {"sync-worker.results": "inline"}, "name": "noop", '
    '"next_scheduled_start_time": null, "run_count": 1, "start_time": "2026-11-30T10:10:34.143147Z", '
    '"state_id": "feaf4766-0876-418e-88ba-898c7b83f072", "state_name": "Completed", "state_type": "COMPLETED", "tags": [], '
    '"task_inputs": {}, "task_key": "bench.noop", "task_version": null, "total_run_time": 0.002043, '
    '"updated": "2026-11-30T10:10:34.145190Z", "state": {"data": {"metadata": {"storage_key": null, "expiration": null, '
    '"serializer": {"type": "json", "jsonlib": "json", "object_encoder": "prefect.serializers.prefect_json_object_encoder", '
    '"object_decoder": "prefect.serializers.prefect_json_object_decoder", "dumps_kwargs": {}, "loads_kwargs": {}}, '
    '"prefect_version": "3.8.8", "storage_block_id": null}, "result": "null"}, "id": "feaf4766-0876-418e-88ba-898c7b83f072", '
    '"message": null, "name": "Completed", "state_details": {"cache_expiration": null, "cache_key": null, '
    '"child_flow_run_id": null, "deferred": false, "deployment_concurrency_lease_id": null, "flow_run_id": null, '
    '"pause_key": null, "pause_reschedule": false, "pause_timeout": null, "refresh_cache": null, "retriable": null, '
    '"run_input_keyset": null, "scheduled_time": null, "task_parameters_id": null, "task_run_id": "%s", '
    '"traceparent": null, "transition_id": null, "untrackable_result": false}, "timestamp": "2026-11-30T10:10:34.145190Z", '
    '"type": "COMPLETED"}}}')


class CannedConnection:
    """An rpc connection answering at once with :data:`BRIEF_CREATE_REPLY` / :data:`WAIT_REPLY`."""

    extensions = ["brief_create"]

    def request(self, message, timeout, with_owed_credit=False):
        if message["type"] == "create":
            return json.loads(BRIEF_CREATE_REPLY % message["body"]["id"])
        run_id = message["task_run_id"]
        return json.loads(WAIT_REPLY % (run_id, run_id))


def _echo_server() -> None:
    """``--_echo-server``: the trivial rpc server of ``--socket``; prints its port, serves until killed."""
    import base64
    import hashlib
    import socket
    import struct
    import threading

    guid = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def frame(payload: bytes) -> bytes:
        n = len(payload)
        head = bytes([0x81, n]) if n < 126 else bytes([0x81, 126]) + struct.pack("!H", n)
        return head + payload

    def serve(conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(4096)
        head, rest = data.split(b"\r\n\r\n", 1)
        key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key"))
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + base64.b64encode(hashlib.sha1(key + guid).digest())
                     + b"\r\nSec-WebSocket-Protocol: prefect\r\n\r\n")
        buf = bytearray(rest)
        while True:
            out = []
            while len(buf) >= 2:  # every whole frame read so far (client frames are masked)
                length, start = buf[1] & 0x7F, 2
                if length == 126:
                    length, start = int.from_bytes(buf[2:4], "big"), 4
                elif length == 127:
                    length, start = int.from_bytes(buf[2:10], "big"), 10
                end = start + 4 + length
                if len(buf) < max(end, start + 4):  # the header itself may not be whole yet
                    break
                opcode, mask_key = buf[0] & 0x0F, bytes(buf[start:start + 4])
                payload = bytes(b ^ mask_key[i % 4] for i, b in enumerate(buf[start + 4:end]))
                del buf[:end]
                if opcode == 0x8:
                    return
                if opcode == 0x9:
                    out.append(bytes([0x8A, len(payload)]) + payload)
                elif opcode == 0x1:
                    message = json.loads(payload)
                    if message.get("type") == "auth":
                        out.append(frame(b'{"type": "auth_success", "extensions": ["brief_create"]}'))
                    else:
                        reply = json.loads(BRIEF_CREATE_REPLY % message["body"]["id"])
                        reply["request_id"] = message["request_id"]
                        out.append(frame(json.dumps(reply).encode()))
            if out:
                conn.sendall(b"".join(out))
            chunk = conn.recv(65536)
            if not chunk:
                return
            buf += chunk

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    print(listener.getsockname()[1], flush=True)
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def _switches(tid: int | str = "thread-self") -> tuple[int, int]:
    """(voluntary, involuntary) context switches of one thread of this process so far."""
    path = "/proc/thread-self/status" if tid == "thread-self" else f"/proc/self/task/{tid}/status"
    counts = {}
    with open(path) as status:
        for line in status:
            if line.endswith("ctxt_switches\n") or "ctxt_switches:" in line:
                name, value = line.split(":")
                counts[name] = int(value)
    return counts.get("voluntary_ctxt_switches", 0), counts.get("nonvoluntary_ctxt_switches", 0)


def socket_round_trips(runs: int, threads: int) -> int:
    """``--socket``: see the module docstring."""
    import statistics
    import subprocess
    import threading

    from sync_worker.client import Client
    from sync_worker.rpc import RpcChannel
    from sync_worker.schemas import Scheduled, task_run_create

    server = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_echo-server"], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        channel = RpcChannel(Client(f"http://127.0.0.1:{port}/api"))
        conn = channel.connection()
        body = task_run_create(name="noop", task_key="bench.noop", state=Scheduled())

        def request() -> None:
            reply = conn.request({"type": "create", "body": body, "brief": True}, 30)
            assert reply["status_code"] == 201, reply

        for _ in range(500):
            request()
        latencies: list[float] = []
        switches = [0, 0]
        lock = threading.Lock()

        def caller(count: int) -> None:
            before, clock, mine = _switches(), time.perf_counter, []
            for _ in range(count):
                started = clock()
                request()
                mine.append(clock() - started)
            after = _switches()
            with lock:
                latencies.extend(mine)
                switches[0] += after[0] - before[0]
                switches[1] += after[1] - before[1]

        reader = getattr(getattr(conn, "_thread", None), "native_id", None)
        reader_before = _switches(reader) if reader else (0, 0)
        cpu = time.process_time()
        workers = [threading.Thread(target=caller, args=(runs // threads,)) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        cpu = time.process_time() - cpu
        reader_after = _switches(reader) if reader else (0, 0)
        done = len(latencies)
        channel.close()
    finally:
        server.kill()
        server.wait()
    import sync_worker

    print(f"{os.path.dirname(os.path.dirname(os.path.abspath(sync_worker.__file__)))}: {cpu / done * 1e6:.1f} µs CPU "
          f"per rpc create in this process, round trip p50 {statistics.median(latencies) * 1e6:.0f} µs "
          f"({done} requests from {threads} thread(s), trivial server, load {os.getloadavg()[0]:.1f}); "
          f"context switches per request: callers {switches[0] / done:.2f} voluntary + {switches[1] / done:.2f} "
          f"involuntary, reader thread {(reader_after[0] - reader_before[0]) / done:.2f} + "
          f"{(reader_after[1] - reader_before[1]) / done:.2f}")
    return 0


def drain_trace(runs: int, threads: int) -> int:
    """``--drain``: see the module docstring."""
    import bisect
    import collections
    import statistics
    import threading

    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    import throughput

    from sync_worker import sockets
    from sync_worker.client import Client
    from sync_worker.storage import LocalDirectoryStore

    clock = time.perf_counter_ns
    last_read = [0]
    creates: list[tuple[int, int, int, int, int]] = []  # send, read, answer set, caller runs, thread
    mine = threading.local()
    read = sockets.FrameReader._read

    def traced_read(self):  # the reader thread's socket read
        data = read(self)
        last_read[0] = clock()
        return data

    class TracedPending(sockets.Pending):
        __slots__ = ("t_read", "t_set", "t_woke")

        def __init__(self) -> None:
            super().__init__()
            self.t_read = self.t_set = self.t_woke = 0
            mine.pending = self

        def set(self) -> None:
            self.t_read, self.t_set = last_read[0], clock()
            super().set()

        def wait(self, timeout: float) -> bool:
            answered = super().wait(timeout)
            self.t_woke = clock()
            return answered

    request = sockets.Connection.request

    def traced_request(self, message, timeout, with_owed_credit=False):
        sent = clock()
        reply = request(self, message, timeout, with_owed_credit)
        p = mine.pending
        if message.get("type") == "create" and p.t_set:
            creates.append((sent, p.t_read, p.t_set, p.t_woke, threading.get_ident()))
        return reply

    sockets.FrameReader._read = traced_read
    sockets.Pending = TracedPending
    sockets.Connection.request = traced_request
    os.environ["SYNC_WORKER_FAST_PATH"] = "true"
    import bench_tasks

    with tempfile.TemporaryDirectory(prefix="submit-cpu-drain-") as tmp:
        server, url = throughput.start_server(tmp)
        worker = None
        try:
            status_port = throughput.free_port()
            worker = throughput.start_worker(url, os.path.join(tmp, "records"), 10, True, status_port)
            status = f"http://127.0.0.1:{status_port}/status"
            client, store = Client(url), LocalDirectoryStore(os.path.join(tmp, "records"))
            for _ in range(20):  # the socket open and warm
                bench_tasks.noop.apply_async(client=client, store=store)
            throughput.wait_until(lambda: throughput.finished(status) >= 20, 60, "the warm-up runs")
            creates.clear()

            def submit(count: int) -> None:
                for _ in range(count):
                    bench_tasks.noop.apply_async(client=client, store=store)

            callers = [threading.Thread(target=submit, args=(runs // threads,)) for _ in range(threads)]
            total = runs // threads * threads
            cpu0 = (throughput.cpu_seconds(server.pid), throughput.cpu_seconds(worker.pid), throughput.cpu_seconds())
            started = time.perf_counter()
            for caller in callers:
                caller.start()
            for caller in callers:
                caller.join()
            throughput.wait_until(lambda: throughput.finished(status) >= 20 + total, 600, f"{total} runs to finish",
                                  interval=0.002)
            elapsed = time.perf_counter() - started
            cpu1 = (throughput.cpu_seconds(server.pid), throughput.cpu_seconds(worker.pid), throughput.cpu_seconds())
        finally:
            for proc in (worker, server):
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    proc.wait(30)
    cpu = [1000 * (after - before) / total for before, after in zip(cpu0, cpu1, strict=True)]
    print(f"drain of {total} no-op runs from {threads} thread(s): {total / elapsed:,.0f} runs/s; CPU ms per run: server "
          f"{cpu[0]:.3f}, worker {cpu[1]:.3f}, this process {cpu[2]:.3f} (load {os.getloadavg()[0]:.1f})")
    if not creates:
        print("no create was traced (a tree without the traced functions?)")
        return 1

    def line(name: str, values: list[float]) -> str:
        return f"  {statistics.median(values):7.0f} {statistics.mean(values):7.0f}  {name}"

    by_thread: dict[int, list[tuple[int, ...]]] = collections.defaultdict(list)
    for create in creates:
        by_thread[create[4]].append(create)
    between = [(b[0] - a[3]) / 1000 for runs_of in by_thread.values() for a, b in zip(runs_of, runs_of[1:], strict=False)]
    print(f"create round trip, {len(creates)} creates traced, µs:\n   median    mean  step")
    for name, values in (
            ("server + wire (requested -> the reader's read returns)", [(c[1] - c[0]) / 1000 for c in creates]),
            ("reader: frames, JSON, dispatch (read -> answer handed over)", [(c[2] - c[1]) / 1000 for c in creates]),
            ("wake-up (handed over -> the caller runs)", [(c[3] - c[2]) / 1000 for c in creates]),
            ("round trip (requested -> the caller runs)", [(c[3] - c[0]) / 1000 for c in creates]),
            ("caller: its Python between two creates (runs -> next requested)", between or [0.0])):
        print(line(name, values))
    per_read = collections.defaultdict(list)
    for create in creates:
        per_read[create[1]].append(create)
    sizes = collections.Counter(len(v) for v in per_read.values())
    print("answers per read: " + ", ".join(f"{n}: {sizes[n]} reads" for n in sorted(sizes)))
    full = [sorted(c[3] - read_at for c in group) for read_at, group in per_read.items() if len(group) == threads]
    if full and threads > 1:
        ks = [statistics.median(order[k] for order in full) / 1000 for k in range(threads)]
        nexts = []
        sends = {tid: sorted(c[0] for c in runs_of) for tid, runs_of in by_thread.items()}
        for read_at, group in per_read.items():
            if len(group) != threads:
                continue
            after = [s[i] for s in (sends[c[4]] for c in group) if (i := bisect.bisect_right(s, read_at)) < len(s)]
            if len(after) == threads:
                nexts.append((max(after) - read_at) / 1000)
        print(f"reads answering all {threads} callers ({len(full)}): the k-th caller runs again "
              + ", ".join(f"{k:.0f}" for k in ks) + " µs after the read (medians)"
              + (f"; the last of their next creates is requested {statistics.median(nexts):.0f} µs after it" if nexts else ""))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20000, help=".delay() calls measured (default 20000)")
    parser.add_argument("--parameters", action="store_true", help="a task with one argument (writes a record)")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top 25 by own time")
    parser.add_argument("--rpc", action="store_true", help="through the real Client and transport (canned rpc answers)")
    parser.add_argument("--wait", action="store_true", help="with --rpc: .delay().result() (canned wait answer)")
    parser.add_argument("--socket", action="store_true", help="the real rpc socket against a trivial server")
    parser.add_argument("--threads", type=int, default=None,
                        help="with --socket: callers at once (default 1); with --drain: submitting threads (default 4)")
    parser.add_argument("--drain", action="store_true", help="trace the create round trips of a real drain (server + worker)")
    parser.add_argument("--_echo-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._echo_server:
        _echo_server()
        return 0
    sys.path.insert(0, os.getcwd())
    if args.socket:
        return socket_round_trips(args.runs, max(1, args.threads or 1))
    if args.drain:
        return drain_trace(args.runs, max(1, args.threads or 4))
    os.environ["SYNC_WORKER_STORAGE"] = tempfile.mkdtemp(prefix="submit-cpu-")
    import sync_worker.client as client_module
    from sync_worker import task
    from sync_worker.schemas import TaskRun

    class CannedClient:
        def create_task_run(self, body, timeout=None, **options):
            return TaskRun.from_json(ANSWER)

    canned = CannedClient()
    if args.rpc:
        canned = client_module.Client("http://127.0.0.1:9/api")  # never connected: the rpc connection is canned
        connection = CannedConnection()
        canned.transport._connection = lambda: connection
    client_module.get_client = lambda settings=None: canned  # what tasks.apply_async asks for

    @task(task_key="bench.noop")
    def noop() -> None:
        return None

    @task(task_key="bench.echo")
    def echo(x: int) -> int:
        return x

    fn, call_args = (echo, (1,)) if args.parameters else (noop, ())
    wait = args.rpc and args.wait

    def call() -> None:
        future = fn.delay(*call_args)
        if wait:
            future.result()

    for _ in range(200):
        call()
    profile = cProfile.Profile() if args.profile else None
    if profile:
        profile.enable()
    started = time.process_time()
    for _ in range(args.runs):
        call()
    used = time.process_time() - started
    if profile:
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    import sync_worker

    print(f"{os.path.dirname(os.path.dirname(os.path.abspath(sync_worker.__file__)))}: "
          f"{used / args.runs * 1e6:.1f} µs CPU per .delay(){'.result()' if wait else ''} of {fn.name} "
          f"({args.runs} calls{', rpc' if args.rpc else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
