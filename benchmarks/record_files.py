#!/usr/bin/env python3
"""What one parameters record file costs on this machine's filesystem, and how deleting them
changes the cost of the next ones.

Usage:
    python3 benchmarks/record_files.py                   # 6 rounds of 3,000, in a new dir under /tmp
    python3 benchmarks/record_files.py --dir /var/tmp --rounds 10 --count 5000

A run with parameters costs sync_worker one file in ``SYNC_WORKER_STORAGE`` (Prefect's record
layout): ``.delay()`` writes it (``write_parameters``), the worker reads it
(``read_parameters``) and deletes it when the run is COMPLETED (``delete_parameters``). Each
round here does the same with the library's own functions, in one thread: write ``--count``
records, read them all, delete them all, and prints the CPU time per file of each step.

Why rounds: on ext4 **without a journal** (as on the machines these benchmarks ran on:
``/proc/fs/jbd2`` lists nothing), the kernel's inode allocator passes over inodes deleted in
the last minutes (``find_inode_bit`` / ``recently_deleted``), so every file deleted makes the
next creates slower, until those inodes age. A journaled ext4, XFS or tmpfs does not do this;
the rounds then stay flat.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sync_worker.storage import LocalDirectoryStore, delete_parameters, read_parameters, write_parameters  # noqa: E402


def journal_note(path: str) -> str:
    """Which filesystem ``path`` is on, and whether any ext4 journal runs on this machine."""
    best = ("?", "?")
    with open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if path.startswith(fields[1]) and len(fields[1]) >= len(best[0]):
                best = (fields[1], fields[2])
    journals = os.listdir("/proc/fs/jbd2") if os.path.isdir("/proc/fs/jbd2") else []
    return f"{best[1]} mounted at {best[0]}; ext4 journals running: {', '.join(journals) or 'none'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to make the store (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--count", type=int, default=3000, help="records per round")
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix="record-files-", dir=args.dir)
    store = LocalDirectoryStore(root)
    print(f"store {root}: {journal_note(os.path.realpath(root))}")
    print("round | write µs/file | read µs/file | delete µs/file   (CPU time, one thread)")
    try:
        for round_no in range(1, args.rounds + 1):
            t0 = time.process_time()
            keys = [write_parameters(store, {"x": i}) for i in range(args.count)]
            t1 = time.process_time()
            for key in keys:
                read_parameters(store, key)
            t2 = time.process_time()
            for key in keys:
                delete_parameters(store, key)
            t3 = time.process_time()
            per = [1e6 * (b - a) / args.count for a, b in ((t0, t1), (t1, t2), (t2, t3))]
            print(f"{round_no:5d} | {per[0]:13.0f} | {per[1]:12.0f} | {per[2]:14.0f}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
