"""Submit a batch of background runs and wait for their results.

Needs a server (``sync-worker server``) and, unless ``--with-worker`` is given, a worker::

    python3 -m pip install '.[examples]'                    # once, from the repository root
    sync-worker server &                                    # http://127.0.0.1:4200/api
    sync-worker worker examples.tasks:add examples.tasks:slow_square examples.tasks:flaky &
    python3 examples/submit_and_wait.py --runs 20

    python3 examples/submit_and_wait.py --with-worker       # worker threads in this process

SYNC_WORKER_API_URL points both sides at another server. Submitter and worker must share
the parameter/result store: the same ``SYNC_WORKER_STORAGE`` directory, or
``SYNC_WORKER_STORAGE=server`` to keep records on the embedded server.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tasks import add, flaky, slow_square

from sync_worker import TaskRunFailed, TaskWorker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="runs of each task (default 10)")
    parser.add_argument("--with-worker", action="store_true", help="run a worker in this process")
    parser.add_argument("--timeout", type=float, default=60, help="seconds to wait for all results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    worker = TaskWorker(add, slow_square, flaky, limit=10) if args.with_worker else None
    with worker if worker is not None else contextlib.nullcontext():
        started = time.monotonic()
        futures = []
        for i in range(args.runs):
            futures.append(("add", (i, i), add.delay(i, i)))
            futures.append(("slow_square", (i,), slow_square.delay(i)))
            futures.append(("flaky", (i,), flaky.delay(i)))
        print(f"submitted {len(futures)} runs in {time.monotonic() - started:.2f}s")

        deadline = started + args.timeout
        failures = 0
        for name, call_args, future in futures:
            try:
                value = future.result(timeout=max(0.1, deadline - time.monotonic()))
                print(f"{name}{call_args} = {value!r}")
            except (TaskRunFailed, TimeoutError) as exc:  # retries exhausted, or not finished in time
                failures += 1
                print(f"{name}{call_args} failed: {str(exc).splitlines()[0]}")
        print(f"{len(futures) - failures}/{len(futures)} succeeded in {time.monotonic() - started:.2f}s")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
