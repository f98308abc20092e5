"""Tasks for benchmarks/fault_injection.py: each execution leaves a line in a file."""
import os
import time

from sync_worker import task


@task(task_key="fault.mark")
def mark(i: int, path: str, seconds: float) -> int:
    with open(path, "a") as handle:
        handle.write(f"start {i} {os.getpid()}\n")
    time.sleep(seconds)
    with open(path, "a") as handle:
        handle.write(f"end {i} {os.getpid()}\n")
    return i
