#!/usr/bin/env python3
"""Where a create's time goes in the server during a drain (issue 14: the create round trip).

Usage:
    python3 benchmarks/create_breakdown.py                    # this tree, N=3000, 4 threads
    python3 benchmarks/create_breakdown.py --src /tmp/base --runs 5000

Runs one ``drain`` trial of ``benchmarks/compare.py`` (its own server, worker and submitter
threads; the same load as its table) with the server traced. A ``sitecustomize`` placed before
``--src`` on the server's path wraps, in the server process only: the delivery of a read's
messages (``WebSocket._deliver``), the rpc channel's handling of a create and its reply, every
group commit (``SQLiteDatabase._run_batch``) and the sockets' writes. Each event is a
``time.monotonic()`` and a thread name kept in a list, written once at exit (no I/O on the
measured path).

Printed, per create: delivered -> handled -> reply made -> reply written, split by who committed
it (the rpc reader itself, inline, or the writer thread because another commit was in
progress), and every committer's batches (count, operations per batch, duration). The hooks
cost a few microseconds per event, so the rate is a little lower than compare.py's; compare
trees with the same script, side by side.
"""
from __future__ import annotations

import argparse
import collections
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

# The server-side hooks (the server process only: ``sync-worker server`` / ``-m sync_worker server``).
HOOKS = r'''
import atexit, os, pickle, sys, threading, time
if os.environ.get("CREATE_TRACE") and "server" in sys.argv[1:3]:
    _events = []
    _now = time.monotonic

    def _install():
        from sync_worker.server import database, rpc, sockets

        deliver = sockets.WebSocket._deliver
        def _deliver(self, messages):
            self._trace_delivered = _now()
            return deliver(self, messages)
        sockets.WebSocket._deliver = _deliver

        handle = rpc.RpcChannel._handle
        def _handle(self, value):
            if value.get("type") == "create":
                _events.append(("handled", value.get("request_id"), getattr(self.ws, "_trace_delivered", 0.0), _now()))
            return handle(self, value)
        rpc.RpcChannel._handle = _handle

        reply = rpc.RpcChannel._reply
        def _reply(self, kind, request_id, status, **kw):
            if kind == "create_result":
                _events.append(("reply", request_id, _now(), self.outbox.direct_here()))
            return reply(self, kind, request_id, status, **kw)
        rpc.RpcChannel._reply = _reply

        run_batch = database.SQLiteDatabase._run_batch
        def _run_batch(self, conn, batch):
            began = _now()
            try:
                return run_batch(self, conn, batch)
            finally:
                _events.append(("batch", len(batch), began, _now(), threading.current_thread().name))
        database.SQLiteDatabase._run_batch = _run_batch

        def written(messages):
            at = _now()
            for m in messages:
                if isinstance(m, str) and m.startswith('{"type":"create_result","request_id":"'):
                    _events.append(("written", m[38:m.index('"', 38)], at))

        send_many = sockets.WebSocket.send_many
        def _send_many(self, messages):
            result = send_many(self, messages)
            written(messages)
            return result
        sockets.WebSocket.send_many = _send_many

        try_send_many = sockets.WebSocket.try_send_many
        def _try_send_many(self, messages):
            sent = try_send_many(self, messages)
            if sent:
                written(messages)
            return sent
        sockets.WebSocket.try_send_many = _try_send_many

    def _later():  # once the server's modules are imported (sitecustomize runs before them)
        names = ("sync_worker.server.rpc", "sync_worker.server.database", "sync_worker.server.sockets")
        while not all(name in sys.modules for name in names):
            time.sleep(0.001)
        time.sleep(0.05)
        _install()

    threading.Thread(target=_later, daemon=True).start()

    def _dump():
        with open(os.path.join(os.environ["CREATE_TRACE"], f"server-{os.getpid()}.pickle"), "wb") as f:
            pickle.dump(_events, f)

    atexit.register(_dump)
'''


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]


def summary(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return f"p50 {percentile(ms, 0.5):.2f}  p90 {percentile(ms, 0.9):.2f}  mean {statistics.mean(ms):.2f} ms"


def analyse(events: list[tuple]) -> None:
    handled = {e[1]: (e[2], e[3]) for e in events if e[0] == "handled"}
    replies = {e[1]: (e[2], e[3]) for e in events if e[0] == "reply"}
    written: dict[str, float] = {}
    for e in events:
        if e[0] == "written":
            written.setdefault(e[1], e[2])
    batches = sorted((e for e in events if e[0] == "batch"), key=lambda e: e[2])
    rows = []
    for request_id, (delivered, at) in handled.items():
        if request_id in replies and request_id in written:
            made, inline = replies[request_id]
            rows.append((inline, at - delivered, made - at, written[request_id] - made, written[request_id] - delivered))
    if not rows or not batches:
        raise SystemExit("no creates traced: did the server's code change names? (see HOOKS)")
    print(f"creates traced: {len(rows)}")
    for label, subset in (("all", rows), ("committed inline by the rpc reader", [r for r in rows if r[0]]),
                          ("committed by another thread (a commit was in progress)", [r for r in rows if not r[0]])):
        if not subset:
            continue
        print(f"\n{label}: {len(subset)} ({100 * len(subset) / len(rows):.0f} %)")
        for i, step in enumerate(("delivered -> handled", "handled -> reply made (the commit)",
                                  "reply made -> written", "delivered -> written (total)"), start=1):
            print(f"  {step:38s} {summary([r[i] for r in subset])}")
    print("\ngroup commits (the after-commit hooks included):")
    by_thread: dict[str, list[tuple]] = collections.defaultdict(list)
    for e in batches:
        by_thread[e[4]].append(e)
    for name, items in sorted(by_thread.items(), key=lambda kv: -len(kv[1])):
        print(f"  {name[:32]:32s} {len(items):6d} batches, {statistics.mean(e[1] for e in items):5.1f} ops each, "
              f"{summary([e[3] - e[2] for e in items])}")
    # the drain's window: from the first create after the warm-up (the longest pause between
    # two creates) to the last batch
    times = sorted(at for _, at in handled.values())
    gaps = [(times[i + 1] - times[i], i + 1) for i in range(len(times) - 1)]
    start = times[max(gaps)[1]] if gaps and max(gaps)[0] > 0.1 else times[0]
    drain = [e for e in batches if e[2] >= start]
    span = drain[-1][3] - start
    busy = sum(e[3] - e[2] for e in drain)
    print(f"\nduring the drain the database was in a batch {busy:.2f} s of {span:.2f} s ({100 * busy / span:.0f} %)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default=str(HERE.parent), help="the source tree to trace (default: this one)")
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--limit", type=int, default=10)
    args = parser.parse_args()
    src = Path(args.src).resolve()
    if not (src / "sync_worker" / "__init__.py").exists():
        raise SystemExit(f"error: {src} has no sync_worker/ package")
    with tempfile.TemporaryDirectory(prefix="create-breakdown-") as tmp:
        overlay = Path(tmp, "overlay")
        overlay.mkdir()
        (overlay / "sitecustomize.py").write_text(HOOKS)
        (overlay / "sync_worker").symlink_to(src / "sync_worker")
        trace = Path(tmp, "trace")
        trace.mkdir()
        env = dict(os.environ, CREATE_TRACE=str(trace))
        cmd = [sys.executable, str(HERE / "compare.py"), "--_trial", "sync_worker@base", "--src", str(overlay),
               "--tmp-root", tmp, "--runs", str(args.runs), "--short-runs", "1", "--samples", "1",
               "--threads", str(args.threads), "--limit", str(args.limit), "--timeout", "300", "--cases", "drain"]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=overlay, check=False).stdout
        result = [line for line in out.splitlines() if line.startswith("{")]
        print(f"trial: {result[-1] if result else out[-2000:]}")
        files = list(trace.glob("server-*.pickle"))
        if not files:
            raise SystemExit("the server wrote no trace")
        with open(files[0], "rb") as handle:
            analyse(pickle.load(handle))


if __name__ == "__main__":
    main()
