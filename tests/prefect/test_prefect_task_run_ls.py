"""``prefect task-run ls`` (Prefect 3.8.8's own CLI, unpatched) against ``sync-worker server``.

The listing endpoint (``POST /api/task_runs/filter``) answers in Prefect's shapes, so the
command a Prefect user already knows lists the embedded server's runs, with Prefect's own
filters (``--state-type``, ``--state``, ``--limit``) applied by the server.
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.helpers import load_capture
from tests.prefect.test_prefect_on_embedded_server import EmbeddedServer, start_embedded_server


@pytest.fixture(scope="module")
def listed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EmbeddedServer, list[str], str]]:
    """A server with three SCHEDULED runs of one key (no worker serves it) and one CANCELLED run."""
    server = start_embedded_server(tmp_path_factory.mktemp("task-run-ls"))
    try:
        body = load_capture("rest_01_create_task_run_request.json")
        body["state"]["state_details"].pop("task_parameters_id", None)  # no parameters record needed
        scheduled = []
        for _ in range(3):
            response = requests.post(f"{server.api_url}/task_runs/", json=body, timeout=10)
            assert response.status_code == 201, response.text
            scheduled.append(response.json()["id"])
        response = requests.post(f"{server.api_url}/task_runs/", json=body, timeout=10)
        cancelled = response.json()["id"]
        assert requests.post(f"{server.api_url}/sync_worker/task_runs/{cancelled}/cancel", json={}, timeout=10).status_code == 200
        yield server, scheduled, cancelled
    finally:
        server.stop()


def _prefect(server: EmbeddedServer, *args: str) -> subprocess.CompletedProcess:
    prefect = Path(sys.executable).with_name("prefect")
    command = [str(prefect)] if prefect.exists() else [sys.executable, "-m", "prefect"]
    return subprocess.run([*command, "task-run", "ls", *args], env=server.client_env(), capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_prefect_task_run_ls_lists_the_runs_of_the_embedded_server(listed):
    server, scheduled, cancelled = listed
    result = _prefect(server, "-o", "json")
    assert result.returncode == 0, result.stderr
    runs = {run["id"]: run for run in json.loads(result.stdout)}
    assert set(runs) == {*scheduled, cancelled}
    assert {runs[run_id]["state_type"] for run_id in scheduled} == {"SCHEDULED"}
    assert runs[cancelled]["state_type"] == "CANCELLED"
    assert {run["task_key"] for run in runs.values()} == {"capture_task-641f46e9"}

    table = _prefect(server)  # the table a person reads
    assert table.returncode == 0, table.stderr
    assert "Task Runs" in table.stdout and "No task runs found" not in table.stdout


def test_prefect_task_run_ls_filters_are_applied_by_the_server(listed):
    server, scheduled, cancelled = listed
    result = _prefect(server, "--state-type", "CANCELLED", "-o", "json")
    assert result.returncode == 0, result.stderr
    assert [run["id"] for run in json.loads(result.stdout)] == [cancelled]

    result = _prefect(server, "--state-type", "SCHEDULED", "--limit", "2", "-o", "json")
    assert result.returncode == 0, result.stderr
    runs = json.loads(result.stdout)
    assert len(runs) == 2 and {run["id"] for run in runs} <= set(scheduled)

    result = _prefect(server, "--state-type", "COMPLETED")
    assert result.returncode == 0, result.stderr
    assert "No task runs found" in result.stdout
