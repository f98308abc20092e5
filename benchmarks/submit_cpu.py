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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20000, help=".delay() calls measured (default 20000)")
    parser.add_argument("--parameters", action="store_true", help="a task with one argument (writes a record)")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top 25 by own time")
    parser.add_argument("--rpc", action="store_true", help="through the real Client and transport (canned rpc answers)")
    parser.add_argument("--wait", action="store_true", help="with --rpc: .delay().result() (canned wait answer)")
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
