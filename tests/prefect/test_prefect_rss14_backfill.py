"""Prefect 3.8.8's own ``TaskRunWaiter`` against the embedded server's events backfill.

The embedded server keeps a final state that no live subscriber saw as its run id and time
only, and builds the event from the database when a subscriber asks for a backfill
(``sync_worker/server/events.py``). Prefect's waiter subscribes when a process first waits
and relies on that backfill for runs that finished before: here every run finished before
the waiter's process started, so only the backfill can wake it. No Prefect code is patched.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.prefect

REPO = Path(__file__).resolve().parents[2]
RUNS = 40


def _create_and_finish(api_url: str, state_type: str) -> tuple[str, dict]:
    run_id = str(uuid.uuid4())
    body = {"name": "add", "task_key": "rss14.add", "dynamic_key": f"rss14.add-{run_id}", "id": run_id,
            "empirical_policy": {"retries": 0, "retry_delay": 0}, "flow_run_id": None, "tags": [],
            "state": {"type": "SCHEDULED", "state_details": {"deferred": True}}}
    assert requests.post(f"{api_url}/task_runs/", json=body, timeout=10).status_code == 201
    assert requests.post(f"{api_url}/task_runs/{run_id}/set_state", json={"state": {"type": "RUNNING"}},
                         timeout=10).status_code == 201
    reply = requests.post(f"{api_url}/task_runs/{run_id}/set_state",
                          json={"state": {"type": state_type, "message": f"{state_type.lower()} {run_id}"}},
                          timeout=10).json()
    assert reply["status"] == "ACCEPT", reply
    return run_id, reply["state"]


def test_prefects_task_run_waiter_finds_runs_that_finished_before_it_subscribed(tmp_path):
    from sync_worker.server import Server, events

    server = Server(host="127.0.0.1", port=0, database=str(tmp_path / "server.db")).start()
    try:
        finished = dict(_create_and_finish(server.url, "FAILED" if i % 4 == 3 else "COMPLETED") for i in range(RUNS))
        # nobody was subscribed: every one of them is kept shelved (run id + time only)
        assert server.events.stats()["event_bytes"] == RUNS * events.SHELVED_EVENT_BYTES
        script = textwrap.dedent("""
            import asyncio, json, sys, uuid
            from prefect.task_runs import TaskRunWaiter

            async def main():
                for run_id in sys.argv[1:]:
                    state = await TaskRunWaiter.wait_for_task_run(uuid.UUID(run_id), timeout=30)
                    print(json.dumps({"run": run_id, "type": state and state.type.value,
                                      "id": state and str(state.id), "message": state and state.message}),
                          flush=True)

            asyncio.run(main())
        """)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SYNC_WORKER_"))}
        env.update(PREFECT_API_URL=server.url, PREFECT_HOME=str(tmp_path / "prefect-home"),
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
        done = subprocess.run([sys.executable, "-c", script, *finished], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-4000:]
        got = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        assert [g["run"] for g in got] == list(finished)
        for g in got:
            state = finished[g["run"]]
            assert (g["type"], g["id"], g["message"]) == (state["type"], state["id"], state["message"]), g
    finally:
        server.stop()
