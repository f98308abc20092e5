#!/usr/bin/env python3
"""The embedded server's per-run operations alone: no sockets, no frames, no threads but the
database's own.

Why: the server's CPU per run in a drain is operations (validation, orchestration, SQLite and its
commits) plus messaging; this measures the first part of two source trees side by side, so that
a change to ``server/{core,models,orchestration,database}.py`` can be judged without the noise of
a whole drain on a shared machine.

The core is set up as the server's app sets it up (with its event bus listening for final
states), without the sockets. Modes (each in a fresh subprocess per tree and round, with a fresh SQLite file):
- ``drain``: creates gathered ``--batch`` at a time (as an rpc connection's burst is), then the
  claims of those runs queued together with the final states (COMPLETED) of the previous batch
  (as a claim-at-delivery subscription sends them, asked brief as a worker does when the server
  announces ``brief_set_state``): about 2 / batch commits per run;
- ``idle``: one run at a time, claimed at create for an idle claim-at-delivery subscriber (one
  commit: insert + claim), then its COMPLETED state (a second commit): the idle path's two
  commits.

Two measures:
- CPU ms per run (``time.process_time``), interleaved rounds, median and range;
- ``--instructions``: instructions per run counted by valgrind (callgrind): the difference of a
  long and a short run, divided by the difference in runs. It does not depend on the load of the
  machine, so it tells a few per cent apart where CPU time cannot; it is slow (minutes);
- ``--wal``: WAL frames (database pages written by the commits) per run, with checkpoints off.

Examples:
    python3 benchmarks/server_ops.py --src /tmp/base,. --rounds 5
    python3 benchmarks/server_ops.py --src /tmp/base,. --mode idle --instructions
    python3 benchmarks/server_ops.py --src /tmp/base,. --wal --runs 3000
"""
from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


#: a version-4 UUID's text from 16 bytes split as 4, 2, 2, 2, 2 and 4 bytes (see :func:`_ids`)
_UUID_FORMAT = "%08x-%04x-%04x-%04x-%04x%08x".__mod__


def _ids(count: int) -> list[str]:
    """``count`` random version-4 UUID texts made in C (one PRNG draw, one ``struct`` unpack,
    one ``%`` per id, no Python frame per id): the bodies' ids are the harness's own work, and
    ``uuid.uuid4()`` (a system call and a Python ``UUID.__init__`` each) was about 2.5 % of the
    instructions counted per run."""
    bits = random.getrandbits(128 * count)
    clear = int.from_bytes(b"\xff\xff\xff\xff\xff\xff\x0f\xff\x3f\xff\xff\xff\xff\xff\xff\xff" * count, "big")
    set_ = int.from_bytes(b"\x00\x00\x00\x00\x00\x00\x40\x00\x80\x00\x00\x00\x00\x00\x00\x00" * count, "big")
    return list(map(_UUID_FORMAT, struct.iter_unpack(">IHHHHI", (bits & clear | set_).to_bytes(16 * count, "big"))))


def _bodies(count: int) -> list[dict[str, Any]]:
    """``count`` creates as ``.delay()`` sends them (3 ids each)."""
    ids = _ids(3 * count)
    return [{"dynamic_key": "echo-" + ids[i].replace("-", ""), "empirical_policy": {"retries": 0, "retry_delay": 0},
             "flow_run_id": None, "name": "echo", "tags": [], "task_inputs": {"x": []}, "task_key": "echo-1",
             "id": ids[i + 1],
             "state": {"name": "Scheduled", "type": "SCHEDULED",
                       "state_details": {"deferred": True, "task_parameters_id": ids[i + 2]}}}
            for i in range(0, 3 * count, 3)]


class Ops:
    """The server's core on a fresh SQLite file, set up as the server's app sets it up (its event
    bus listening for final states), without the sockets: the children of this script and of
    ``cycle_ops.py`` (the tree under test first on sys.path before it is made)."""

    def __init__(self, prefix: str, cache_size: int, wal: bool) -> None:
        from sync_worker.server import database
        from sync_worker.server.core import Core
        from sync_worker.server.events import EventBus
        from sync_worker.server.models import validate_state
        from sync_worker.server.runqueue import RunQueue

        self.tmp = tempfile.mkdtemp(prefix=prefix)
        self.path = os.path.join(self.tmp, "ops.db")
        if wal:  # no checkpoints: the WAL file keeps every frame written, so its growth counts them
            # (a tree with a checkpointer thread: never triggered; SQLite's own: off below)
            database.CHECKPOINT_OPS = database.CHECKPOINT_BYTES = float("inf")
        self.db = database.SQLiteDatabase(self.path, cache_size=cache_size)
        if wal:
            self.db._writer_conn.execute("PRAGMA wal_autocheckpoint=0")
        self.page = self.db._writer_conn.execute("PRAGMA page_size").fetchone()[0]
        self.queue = RunQueue(self.db, lease_timeout=60)
        self.core = Core(self.db, self.queue)
        EventBus(self.core)  # as the server's app does: every final state is announced to it
        self.completed = validate_state({"type": "COMPLETED", "name": "Completed", "state_details": {},
                                         "data": {"storage_key": "result.abc", "serializer": "json"}}, ["state"])
        self.errors: list[BaseException] = []

    def check(self, result: Any, error: BaseException | None) -> None:
        """The callback of every operation: its error kept for :meth:`close`."""
        if error is not None:
            self.errors.append(error)

    def wal_size(self) -> int:
        return os.path.getsize(self.path + "-wal")

    def frames_since(self, wal_size: int) -> float:
        """WAL frames written since the WAL had ``wal_size`` bytes (a frame: 24-byte header + page)."""
        return (self.wal_size() - wal_size) / (self.page + 24)

    def close(self) -> None:
        """Fails the child if an operation failed; else stops the queue, closes the database and
        removes the file."""
        if self.errors:
            raise SystemExit(f"{len(self.errors)} operations failed, the first: {self.errors[0]!r}")
        self.queue.stop()
        self.db.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def child(src: str, mode: str, runs: int, batch: int, warmup: int, wal: bool = False) -> None:
    """Runs in a subprocess with ``src`` first on sys.path; prints ``cpu_ms_per_run`` (and
    ``wal_frames_per_run`` with ``wal``)."""
    sys.path.insert(0, src)
    from sync_worker.server.core import claim_proposal

    ops = Ops("sync-worker-server-ops-", 500, wal)
    db, core, completed, check = ops.db, ops.core, ops.completed, ops.check

    def drain(count: int) -> None:
        previous: list[str] = []
        for start in range(0, count, batch):
            ids = []
            with db.gathering():
                for body in _bodies(min(batch, count - start)):
                    ids.append(body["id"])
                    core.create_task_run_async(body, check, brief=True)
            finals = [(run_id, completed, False, check, True) for run_id in previous]
            claimed = core.claim_at_delivery(ids, "bench-1", before=finals)
            if not all(isinstance(text, str) for text in claimed):
                raise SystemExit(f"a claim failed: {claimed}")
            previous = ids
        core.claim_at_delivery([], "bench-1", before=[(r, completed, False, check, True) for r in previous])

    class IdleSubscriber:
        """What RunQueue.claim_for needs of an idle claim-at-delivery subscription."""

        def __init__(self) -> None:
            self.keys = ["echo-1"]
            self.leased: set[str] = set()
            self.client_id = "bench-1"
            self.claim_state = claim_proposal("bench-1")
            self.delivered: list[str] = []

        def reserve(self) -> bool:
            return True

        def unreserve(self) -> None:
            pass

        def deliver_reserved(self, run_id: str, text: str) -> None:
            self.delivered.append(run_id)

        def wake(self) -> None:
            pass

    subscriber = IdleSubscriber()

    def idle(count: int) -> None:
        for body in _bodies(count):
            delivered = len(subscriber.delivered)
            with db.gathering():
                core.create_task_run_async(body, check, brief=True)
            if len(subscriber.delivered) == delivered:
                # not committed inline: queued behind another committer (the checkpointer's
                # turn, in trees that have one); its commit is done when this returns
                db.write(lambda tx: None)
            run_id = subscriber.delivered[-1]
            core.set_states_async([(run_id, completed, False, check, True)], holder="bench-1")
            subscriber.leased.discard(run_id)

    if mode == "idle":
        if ops.queue.take(subscriber) is not None:
            raise SystemExit("the queue was not empty")
    work = drain if mode == "drain" else idle
    work(warmup)
    wal_before = ops.wal_size()
    started = time.process_time()
    work(runs)
    db.write(lambda tx: None)  # queued after the last batch: its callbacks have run when this returns
    cpu = time.process_time() - started
    frames = ops.frames_since(wal_before)
    if mode == "idle" and len(subscriber.delivered) != runs + warmup:
        raise SystemExit(f"claimed at create: {len(subscriber.delivered)} of {runs + warmup}")
    ops.close()
    print(f"cpu_ms_per_run {1000 * cpu / runs:.4f}")
    if wal:
        print(f"wal_frames_per_run {frames / runs:.4f}")


def _child_cmd(src: str, args: argparse.Namespace, runs: int) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--_child", src, "--mode", args.mode, "--runs", str(runs),
            "--batch", str(args.batch), "--warmup", str(args.warmup)] + (["--wal"] if args.wal else [])


def _child_figure(src: str, args: argparse.Namespace, name: str) -> float:
    """Run the measuring child once and read the figure it prints as ``name value``."""
    out = subprocess.run(_child_cmd(src, args, args.runs), capture_output=True, text=True, timeout=600)
    found = re.search(name + r" ([\d.]+)", out.stdout)
    if not found:
        raise SystemExit(f"{src}: {out.stdout}{out.stderr}")
    return float(found.group(1))


def cpu_per_run(src: str, args: argparse.Namespace) -> float:
    return _child_figure(src, args, "cpu_ms_per_run")


def wal_frames_per_run(src: str, args: argparse.Namespace) -> float:
    return _child_figure(src, args, "wal_frames_per_run")


def instructions_per_run(src: str, args: argparse.Namespace) -> float:
    def count(runs: int) -> int:
        cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *_child_cmd(src, args, runs)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if out.returncode != 0:
            raise SystemExit(f"{src}: the child failed under valgrind: {out.stderr[-2000:]}")
        found = re.search(r"Collected : (\d+)", out.stderr)
        if not found:
            raise SystemExit(f"{src}: valgrind said {out.stderr[-2000:]}")
        return int(found.group(1))

    short, long = args.runs // 4, args.runs
    return (count(long) - count(short)) / (long - short)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", default=os.path.dirname(HERE),
                        help="comma list of source trees (default: this one)")
    parser.add_argument("--mode", choices=["drain", "idle"], default="drain")
    parser.add_argument("--runs", type=int, default=None, help="runs measured (default 5000; 800 with --instructions)")
    parser.add_argument("--batch", type=int, default=3, help="drain: runs per create burst (default 3)")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--instructions", action="store_true", help="count instructions with valgrind (one round)")
    parser.add_argument("--wal", action="store_true",
                        help="count the WAL frames (pages written) per run instead: no checkpoints, one round; "
                             "they do not depend on the load")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.runs is None:
        args.runs = 800 if args.instructions else 5000
    if args._child:
        child(args._child, args.mode, args.runs, args.batch, args.warmup, args.wal)
        return 0
    trees = [os.path.abspath(s) for s in args.src.split(",")]
    load = os.getloadavg()[0]
    if args.instructions:
        if shutil.which("valgrind") is None:
            raise SystemExit("--instructions needs valgrind")
        for src in trees:
            print(f"{src}: {instructions_per_run(src, args):,.0f} instructions per run ({args.mode})", flush=True)
        return 0
    if args.wal:
        for src in trees:
            print(f"{src}: {wal_frames_per_run(src, args):.3f} WAL frames per run ({args.mode}, batch {args.batch})",
                  flush=True)
        return 0
    results: dict[str, list[float]] = {src: [] for src in trees}
    for _ in range(args.rounds):
        for src in trees:
            results[src].append(cpu_per_run(src, args))
    print(f"mode {args.mode}, {args.runs} runs, batch {args.batch}, {args.rounds} interleaved rounds, "
          f"load average {load:.1f} before / {os.getloadavg()[0]:.1f} after")
    for src, values in results.items():
        print(f"{src}: CPU {statistics.median(values):.3f} ms/run ({min(values):.3f}-{max(values):.3f})")
    if len(trees) > 1:
        first = results[trees[0]]
        for src in trees[1:]:
            ratios = [b / a for a, b in zip(first, results[src], strict=True)]
            print(f"{src} / {trees[0]}: {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) per round")
    return 0


if __name__ == "__main__":
    sys.exit(main())
