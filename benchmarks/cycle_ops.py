#!/usr/bin/env python3
"""The server's commit of one slot cycle alone (the 10 ms / limit 10 case after submission):
the final state (COMPLETED, brief, with credit) of one run and the claim at delivery of the
next, one transaction, as :meth:`.Subscription._flush_and_deliver` commits it; no sockets.

Why: latency_breakdown.py --short shows "the commit (final state + claim)" as the largest
server step of the slot cycle; this measures it in one process, per cycle, for two source
trees interleaved (CPU µs per cycle, WAL frames per cycle), and can profile it.

    python3 benchmarks/cycle_ops.py --src /tmp/base24,. --rounds 5
    python3 benchmarks/cycle_ops.py --src . --profile
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def child(src: str, runs: int, warmup: int, profile: bool, wal: bool) -> None:
    sys.path.insert(0, src)
    sys.path.insert(1, HERE)
    from server_ops import Ops, _bodies

    ops = Ops("sync-worker-cycle-ops-", 2000, wal)
    db, core, completed, check = ops.db, ops.core, ops.completed, ops.check

    def create(count: int) -> list[str]:
        ids: list[str] = []
        bodies = _bodies(count)
        for start in range(0, count, 50):
            with db.gathering():
                for body in bodies[start:start + 50]:
                    ids.append(body["id"])
                    core.create_task_run_async(body, check, brief=True)
        return ids

    def cycles(ids: list[str]) -> None:
        previous = None
        for run_id in ids:
            before = [] if previous is None else [(previous, completed, False, check, True)]
            claimed = core.claim_at_delivery([run_id], "bench-1", before=before)
            if not isinstance(claimed[0], str):
                raise SystemExit(f"a claim failed: {claimed}")
            previous = run_id
        core.claim_at_delivery([], "bench-1", before=[(previous, completed, False, check, True)])

    cycles(create(warmup))
    ids = create(runs)
    wal_before = ops.wal_size()
    if profile:
        import cProfile
        import pstats
        prof = cProfile.Profile()
        prof.enable()
        cycles(ids)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(35)
    started = time.process_time()
    if not profile:
        cycles(ids)
    cpu = time.process_time() - started
    frames = ops.frames_since(wal_before)
    ops.close()
    print(f"cpu_us_per_cycle {1e6 * cpu / runs:.2f}")
    if wal:
        print(f"wal_frames_per_cycle {frames / runs:.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", default=".")
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--wal", action="store_true", help="WAL frames per cycle (checkpoints off)")
    parser.add_argument("--instructions", action="store_true", help="instructions per cycle (callgrind)")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        child(args._child, args.runs, args.warmup, args.profile, args.wal)
        return 0
    srcs = [os.path.abspath(s) for s in args.src.split(",")]

    def cmd(src: str, runs: int) -> list[str]:
        return [sys.executable, os.path.abspath(__file__), "--_child", src, "--runs", str(runs),
                "--warmup", str(args.warmup)] + (["--wal"] if args.wal else []) + (["--profile"] if args.profile else [])

    if args.profile:
        subprocess.run(cmd(srcs[0], args.runs))
        return 0
    if args.instructions:
        for src in srcs:
            counts = []
            for runs in (args.runs // 4, args.runs):
                out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *cmd(src, runs)],
                                     capture_output=True, text=True)
                counts.append(int(re.search(r"Collected : (\d+)", out.stderr).group(1)))
            print(f"{src}: {(counts[1] - counts[0]) / (args.runs - args.runs // 4):,.0f} instructions per cycle")
        return 0
    results: dict[str, list[float]] = {s: [] for s in srcs}
    wals: dict[str, list[float]] = {s: [] for s in srcs}
    for _ in range(args.rounds):
        for src in srcs:
            out = subprocess.run(cmd(src, args.runs), capture_output=True, text=True)
            found = re.search(r"cpu_us_per_cycle ([\d.]+)", out.stdout)
            if not found:
                raise SystemExit(out.stdout + out.stderr)
            results[src].append(float(found.group(1)))
            w = re.search(r"wal_frames_per_cycle ([\d.]+)", out.stdout)
            if w:
                wals[src].append(float(w.group(1)))
    for src in srcs:
        v = results[src]
        extra = f", WAL frames/cycle {statistics.median(wals[src]):.3f}" if wals[src] else ""
        print(f"{src}: CPU µs per cycle median {statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f}){extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
