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
"""
from __future__ import annotations

import argparse
import cProfile
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20000, help=".delay() calls measured (default 20000)")
    parser.add_argument("--parameters", action="store_true", help="a task with one argument (writes a record)")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top 25 by own time")
    args = parser.parse_args()

    sys.path.insert(0, os.getcwd())
    os.environ["SYNC_WORKER_STORAGE"] = tempfile.mkdtemp(prefix="submit-cpu-")
    import sync_worker.client as client_module
    from sync_worker import task
    from sync_worker.schemas import TaskRun

    class CannedClient:
        def create_task_run(self, body, timeout=None, **options):
            return TaskRun.from_json(ANSWER)

    canned = CannedClient()
    client_module.get_client = lambda settings=None: canned  # what tasks.apply_async asks for

    @task(task_key="bench.noop")
    def noop() -> None:
        return None

    @task(task_key="bench.echo")
    def echo(x: int) -> int:
        return x

    fn, call_args = (echo, (1,)) if args.parameters else (noop, ())
    for _ in range(200):
        fn.delay(*call_args)
    profile = cProfile.Profile() if args.profile else None
    if profile:
        profile.enable()
    started = time.process_time()
    for _ in range(args.runs):
        fn.delay(*call_args)
    used = time.process_time() - started
    if profile:
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    import sync_worker

    print(f"{os.path.dirname(os.path.dirname(os.path.abspath(sync_worker.__file__)))}: "
          f"{used / args.runs * 1e6:.1f} µs CPU per .delay() of {fn.name} ({args.runs} calls)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
