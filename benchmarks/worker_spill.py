#!/usr/bin/env python3
"""Drains with one worker, one worker beside an idle second worker process (subscribed to
another task key), and two workers, in interleaved rounds: runs/s, CPU per run of each
process kind, and how many runs each worker got (the server's dashboard API).

Why: with two workers a drain of no-op runs is a few per cent slower than with one; this
separates what a second process costs while idle from what the runs it takes cost.
Each trial is `compare.py`'s own (fresh server, warm-up, the same task module).

    python3 benchmarks/worker_spill.py --rounds 5
    python3 benchmarks/worker_spill.py --rounds 4 --src /tmp/other-tree --modes one,two
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = ("one", "idle", "two")


def trial(mode: str, src: str, runs: int) -> dict:
    sys.path.insert(0, HERE)
    import compare

    args = compare.build_parser().parse_args(["--systems", "sync_worker", "--runs", str(runs)])
    args.short_runs, args.samples, args.cases, args.tmp_root, args.src = 1000, 200, ["drain"], "", src
    run = compare.Trial("sync_worker*2" if mode == "two" else "sync_worker", args)
    try:
        run.start()
        if mode == "idle":
            run._spawn("idle-worker", [sys.executable, "-m", "sync_worker", "worker", "compare_tasks:noop_p",
                                       "--limit", str(args.limit), "--log-level", "WARNING"], cwd=run.src)
            compare.wait_until(lambda: len(run._workers_delivered()) >= 2, 60, "the idle worker", 0.05, run.procs)
        before = run._workers_delivered()
        row = run.measure("drain")
        after = run._workers_delivered()
    finally:
        run.stop()
    return {"mode": mode, "src": src, "runs_per_s": round(row["runs_per_s"]),
            "cpu_ms": {k: round(v, 3) for k, v in row["cpu_ms"].items()},
            "delivered": sorted((b - a for a, b in zip(before, after, strict=True)), reverse=True),
            "steal_pct": round(row["steal_pct"], 1) if "steal_pct" in row else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--runs", type=int, default=3000, help="no-op runs per drain (default 3000)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    parser.add_argument("--src", default=os.path.dirname(HERE),
                        help="comma list of sync_worker source trees, each measured in every round")
    parser.add_argument("--_trial", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._trial:
        print(json.dumps(trial(args._trial[0], args._trial[1], args.runs)), flush=True)
        return 0
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown mode(s): {', '.join(sorted(unknown))}")
    for number in range(1, args.rounds + 1):
        for src in args.src.split(","):
            for mode in modes:  # each trial in a fresh interpreter: its own imports and CPU accounting
                proc = subprocess.run([sys.executable, __file__, "--runs", str(args.runs), "--_trial", mode,
                                       os.path.abspath(src)], stdout=subprocess.PIPE, text=True, timeout=900,
                                      check=False, cwd=os.path.abspath(src))
                lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
                print(f"round {number}", lines[-1] if lines else f"{mode} {src}: failed ({proc.returncode})",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
