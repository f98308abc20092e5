#!/usr/bin/env python3
"""The worker's CPU per run in compare.py's short case (10 ms tasks, limit 10), split.

Usage:
    python3 benchmarks/worker_short_cpu.py --rounds 6 --baseline-src /tmp/base24
    python3 benchmarks/worker_short_cpu.py --rounds 3 --task noop        # the drain, for contrast

Per trial (a fresh server and worker, started by compare.py's ``Trial`` from each tree, the
trees interleaved A B A B ...): ``--runs`` sleep10 runs submitted from 4 threads, then the
worker process's user and system CPU per run (``/proc/PID/stat``), its voluntary and
involuntary context switches per run (summed over its threads, ``/proc/PID/task/*/status``:
each is a thread going to sleep or being preempted: the wake-ups a run costs), and the runs/s
as compare.py computes it. Prints every trial, then the medians and ranges per tree.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _worker_stats(pid: int) -> dict[str, float]:
    """user and system seconds of ``pid`` and the context switches of its live threads."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    out = {"user": int(fields[11]) / tick, "sys": int(fields[12]) / tick, "vol": 0.0, "invol": 0.0}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            text = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("voluntary_ctxt_switches"):
                out["vol"] += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches"):
                out["invol"] += int(line.split()[1])
    return out


def trial(src: str, runs: int, tmp_root: str, task: str = "sleep10") -> dict:
    sys.path[:0] = [str(HERE)]
    import compare

    args = argparse.Namespace(src=src, limit=10, threads=4, timeout=300, tmp_root=tmp_root, cases=["short"],
                              runs=runs, short_runs=runs, samples=0)
    t = compare.Trial("sync_worker", args)
    try:
        t.start()
        pid = t.worker.pid
        before_done = t.finished()
        s0 = _worker_stats(pid)
        t0_wall = time.time()
        t._threads(lambda share: t.submit(share, task), runs)
        compare.wait_until(lambda: t.finished() >= before_done + runs, 300, "short runs", 0.002, t.procs)
        elapsed = t.last_finish() - t0_wall
        time.sleep(0.3)
        s1 = _worker_stats(pid)
    finally:
        t.stop()
    per = {k: (s1[k] - s0[k]) / runs for k in s0}
    return {"runs_per_s": runs / elapsed, "user_us": per["user"] * 1e6, "sys_us": per["sys"] * 1e6,
            "vol": per["vol"], "invol": per["invol"], "load": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument("--baseline-src", default=None)
    parser.add_argument("--task", choices=("sleep10", "noop"), default="sleep10",
                        help="noop: compare.py's drain case instead (no-op runs), for the same split")
    parser.add_argument("--_trial", help=argparse.SUPPRESS)
    parser.add_argument("--tmp-root", default=None)
    args = parser.parse_args()
    if args._trial:
        print(json.dumps(trial(args._trial, args.runs, args.tmp_root, args.task)))
        return
    trees = {"this": str(REPO)}
    if args.baseline_src:
        trees["base"] = str(Path(args.baseline_src).resolve())
    tmp_root = tempfile.mkdtemp(prefix="worker-short-cpu-")
    rows: dict[str, list[dict]] = {name: [] for name in trees}
    for r in range(args.rounds):
        for name, src in trees.items():
            out = subprocess.run([sys.executable, __file__, "--_trial", src, "--runs", str(args.runs),
                                  "--tmp-root", tmp_root, "--task", args.task], capture_output=True, text=True, cwd=src, check=False)
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            if not lines:
                print(f"round {r + 1} {name}: failed\n{out.stderr[-2000:]}")
                continue
            row = json.loads(lines[-1])
            rows[name].append(row)
            print(f"round {r + 1} {name}: {row['runs_per_s']:.0f} runs/s, worker user {row['user_us']:.0f} + sys "
                  f"{row['sys_us']:.0f} us/run, context switches {row['vol']:.2f} + {row['invol']:.2f}/run, "
                  f"load {row['load']:.1f}", flush=True)
    for name, found in rows.items():
        if not found:
            continue
        def fmt(key: str, spec: str, found: list[dict] = found) -> str:
            values = [row[key] for row in found]
            return f"{format(statistics.median(values), spec)} ({format(min(values), spec)}-{format(max(values), spec)})"
        total = [{"t": row["user_us"] + row["sys_us"]} for row in found]
        tot = [t["t"] for t in total]
        print(f"{name}: {len(found)} trials; runs/s {fmt('runs_per_s', '.0f')}; worker CPU us/run "
              f"{statistics.median(tot):.0f} ({min(tot):.0f}-{max(tot):.0f}) = user {fmt('user_us', '.0f')} + sys "
              f"{fmt('sys_us', '.0f')}; voluntary switches/run {fmt('vol', '.2f')}, involuntary {fmt('invol', '.2f')}")


if __name__ == "__main__":
    main()
