"""What a real Prefect 3.8.8 server does, asserted with plain requests + websocket-client.

These are the facts sync_worker's client and worker are built on (see the team's
prefect-facts notes): how runs are claimed, retried and re-queued, what the parameter
record looks like, and what wakes a Prefect caller waiting on ``future.result()``. If a
Prefect upgrade changes one of them, the test that pins it fails here, before the
interoperability tests fail in some harder-to-read way.
"""
from __future__ import annotations

import base64
import json
import pickle
import textwrap
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest
from prefect_support import TRACE_TASK_RUN_READS, prefect_api

PREFECT_TASKS = '''
from prefect import task

@task
def add_one(x: int) -> int:
    return x + 1
'''


# ----------------------------------------------------------------------------- helpers


def _create_run(server, key: str, *, retries: int = 0, parameters_id: str | None = None) -> dict:
    details: dict = {"deferred": True}
    if parameters_id:
        details["task_parameters_id"] = parameters_id
    body = {
        "name": key, "task_key": key, "dynamic_key": f"{key}-{uuid.uuid4().hex}", "flow_run_id": None,
        "empirical_policy": {"retries": retries, "retry_delay": 0}, "tags": [], "task_inputs": {},
        "state": {"type": "SCHEDULED", "name": "Scheduled", "state_details": details},
    }
    response = prefect_api().post(f"{server.api_url}/task_runs/", json=body, headers=server.auth_header(), timeout=30)
    assert response.status_code == 201, response.text
    return response.json()


def _set_state(server, run_id: str, state: dict, force: bool = False) -> dict:
    response = prefect_api().post(
        f"{server.api_url}/task_runs/{run_id}/set_state", json={"state": state, "force": force},
        headers=server.auth_header(), timeout=30,
    )
    assert response.status_code in (200, 201), response.text
    return response.json()


def _read_run(server, run_id: str):
    return prefect_api().get(f"{server.api_url}/task_runs/{run_id}", headers=server.auth_header(), timeout=30)


def _subscribe(server, key: str, timeout: float = 5.0):
    import websocket

    ws = websocket.create_connection(
        server.api_url.replace("http", "ws", 1) + "/task_runs/subscriptions/scheduled",
        subprotocols=["prefect"], timeout=timeout,
    )
    ws.send(json.dumps({"type": "auth", "token": server.auth_string}))
    assert json.loads(ws.recv()) == {"type": "auth_success"}
    ws.send(json.dumps({"type": "subscribe", "keys": [key], "client_id": f"probe-{uuid.uuid4().hex[:8]}"}))
    return ws


def _receive(ws, timeout: float):
    """The next delivered run (acked), or None if nothing arrives within ``timeout``."""
    import websocket

    ws.settimeout(timeout)
    try:
        message = json.loads(ws.recv())
    except websocket.WebSocketTimeoutException:
        return None
    ws.send(json.dumps({"type": "ack"}))
    return message


def _wait_for_state(server, run_id: str, wanted: set[str], timeout: float) -> dict | None:
    """Poll the API until the run's state type is in ``wanted``; the run JSON, or None if it is gone."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        response = _read_run(server, run_id)
        if response.status_code == 404:
            return None
        last = response.json()
        if last["state_type"] in wanted:
            return last
        time.sleep(0.1)
    raise AssertionError(f"run {run_id} not in {wanted} after {timeout}s: {last and last['state']}")


PENDING = {"type": "PENDING", "name": "Pending", "state_details": {"deferred": True}}
RUNNING = {"type": "RUNNING", "name": "Running", "state_details": {"deferred": True}}
FAILED = {"type": "FAILED", "name": "Failed", "message": "boom", "state_details": {"deferred": True}}
COMPLETED = {"type": "COMPLETED", "name": "Completed"}


# ----------------------------------------------------------------------------- orchestration


def test_server_fixture_is_healthy_and_isolated(prefect_server):
    import requests

    assert prefect_server.api_url == f"http://127.0.0.1:{prefect_server.port}/api"
    response = requests.get(f"{prefect_server.api_url}/health", timeout=10)
    assert response.status_code == 200 and response.json() is True
    assert (prefect_server.home / "prefect.db").exists()  # its own database in the temporary PREFECT_HOME


def test_second_pending_is_aborted_so_pending_is_a_claim(prefect_server):
    run = _create_run(prefect_server, f"claim-{uuid.uuid4().hex[:8]}")
    first = _set_state(prefect_server, run["id"], PENDING)
    second = _set_state(prefect_server, run["id"], PENDING)
    assert first["status"] == "ACCEPT"
    assert second["status"] == "ABORT"
    assert "cannot transition to a PENDING state" in second["details"]["reason"]
    # without deferred=true there is no such guard: PENDING is accepted again
    assert _set_state(prefect_server, run["id"], {"type": "PENDING", "name": "Pending"})["status"] == "ACCEPT"


def test_failed_with_retries_left_is_rejected_but_requeued_only_by_an_explicit_scheduled(prefect_server):
    key = f"retry-{uuid.uuid4().hex[:8]}"
    parameters_id = str(uuid.uuid4())
    ws = _subscribe(prefect_server, key)
    try:
        run = _create_run(prefect_server, key, retries=1, parameters_id=parameters_id)
        delivered = _receive(ws, timeout=10)
        assert delivered is not None and delivered["id"] == run["id"]
        assert _set_state(prefect_server, run["id"], PENDING)["status"] == "ACCEPT"
        assert _set_state(prefect_server, run["id"], RUNNING)["status"] == "ACCEPT"

        rejected = _set_state(prefect_server, run["id"], FAILED)
        assert rejected["status"] == "REJECT"
        assert (rejected["state"]["type"], rejected["state"]["name"]) == ("SCHEDULED", "AwaitingRetry")
        # Prefect 3.8.8 drops the deferred flag and the parameters id on AwaitingRetry, so its
        # EnqueueScheduledTasks rule does not put the run back on the queue.
        assert rejected["state"]["state_details"]["deferred"] is False
        assert rejected["state"]["state_details"]["task_parameters_id"] is None
        assert _receive(ws, timeout=2) is None, "Prefect re-queued the retry by itself"

        requeue = {
            "type": "SCHEDULED", "name": "AwaitingRetry", "message": "boom",
            "state_details": {"deferred": True, "task_parameters_id": parameters_id,
                              "scheduled_time": rejected["state"]["state_details"]["scheduled_time"]},
        }
        assert _set_state(prefect_server, run["id"], requeue)["status"] == "ACCEPT"
        again = _receive(ws, timeout=10)
        assert again is not None and again["id"] == run["id"]
        assert again["state"]["name"] == "AwaitingRetry"
        assert again["state"]["state_details"]["task_parameters_id"] == parameters_id
        assert again["run_count"] == 1

        assert _set_state(prefect_server, run["id"], PENDING)["status"] == "ACCEPT"
        assert _set_state(prefect_server, run["id"], RUNNING)["status"] == "ACCEPT"
        final = _set_state(prefect_server, run["id"], FAILED)  # retries exhausted
        assert (final["status"], final["state"]["type"]) == ("ACCEPT", "FAILED")
    finally:
        ws.close()


@pytest.mark.parametrize("with_data", [True, False], ids=["completed-with-result", "completed-without-result"])
def test_a_completed_run_is_protected_only_when_its_state_has_result_data(prefect_server, with_data):
    run = _create_run(prefect_server, f"terminal-{uuid.uuid4().hex[:8]}")
    data = {"storage_key": "somewhere", "expiration": None, "serializer": {"type": "json"},
            "prefect_version": "3.8.8", "storage_block_id": None} if with_data else None
    for state in (PENDING, RUNNING, {**COMPLETED, "data": data}):
        assert _set_state(prefect_server, run["id"], state)["status"] == "ACCEPT"
    again = _set_state(prefect_server, run["id"], PENDING)
    if with_data:
        assert (again["status"], again["state"]["type"]) == ("REJECT", "COMPLETED")
        assert again["details"]["reason"] == "This run is already completed."
    else:  # a worker must check for itself before running it again
        assert (again["status"], again["state"]["type"]) == ("ACCEPT", "PENDING")


# ----------------------------------------------------------------------------- records


def test_prefect_caller_writes_pickled_parameter_record_under_parameters_dir(prefect_server, tmp_path, python_script):
    (tmp_path / "ptasks.py").write_text(PREFECT_TASKS)
    caller = python_script(
        """
        import json
        from ptasks import add_one
        future = add_one.delay(x=1)
        print(json.dumps({"run": str(future.task_run_id), "task_key": add_one.task_key}), flush=True)
        """,
        prefect_server.client_env(),
        name="caller.py",
    ).start()
    result = caller.wait(timeout=90)
    assert result.returncode == 0, result.describe()
    info = result.json_lines()[-1]

    run = _read_run(prefect_server, info["run"]).json()
    assert run["task_key"] == info["task_key"]
    details = run["state"]["state_details"]
    assert run["state_type"] == "SCHEDULED" and details["deferred"] is True
    parameters_id = details["task_parameters_id"]

    path = prefect_server.storage_path / "parameters" / parameters_id
    record = json.loads(path.read_bytes())
    assert record["metadata"]["storage_key"] == parameters_id
    assert record["metadata"]["serializer"]["type"] == "pickle"
    assert record["metadata"]["serializer"]["picklelib"] == "cloudpickle"
    assert record["metadata"]["prefect_version"] == "3.8.8"
    payload = pickle.loads(base64.b64decode(record["result"]))
    assert payload["parameters"] == {"x": 1}
    assert set(payload["context"]) >= {"flow_run_context", "task_run_context", "settings_context"}


@pytest.mark.parametrize(
    ("variant", "record", "executed"),
    [
        ("full", lambda pid: {"metadata": {"storage_key": pid, "expiration": None, "serializer": {"type": "json"},
                                           "prefect_version": "3.8.8", "storage_block_id": None},
                              "result": json.dumps({"parameters": {"x": 41}, "context": {}})}, True),
        ("minimal", lambda pid: {"metadata": {"serializer": {"type": "json"}},
                                 "result": json.dumps({"parameters": {"x": 41}})}, True),
        ("no-serializer", lambda pid: {"metadata": {"storage_key": pid},
                                       "result": json.dumps({"parameters": {"x": 41}})}, False),
    ],
)
def test_prefect_serve_reads_a_json_parameter_record_written_by_hand(
    prefect_server, tmp_path, python_script, variant, record, executed
):
    (tmp_path / "ptasks.py").write_text(PREFECT_TASKS)
    worker = python_script(
        """
        import json
        from prefect.task_worker import serve
        from ptasks import add_one
        print(json.dumps({"task_key": add_one.task_key}), flush=True)
        serve(add_one)
        """,
        prefect_server.client_env(),
        name="pworker.py",
    ).start()
    key = worker.expect("task_key", timeout=60)["task_key"]

    parameters_id = str(uuid.uuid4())
    folder = prefect_server.storage_path / "parameters"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / parameters_id).write_text(json.dumps(record(parameters_id)))
    run = _create_run(prefect_server, key, parameters_id=parameters_id)

    final = _wait_for_state(prefect_server, run["id"], {"COMPLETED", "FAILED"}, timeout=60)
    worker.stop()
    if not executed:
        # the serializer defaults to pickle: Prefect's worker cannot read it and deletes the run
        assert final is None, worker.snapshot()
        return
    assert final is not None and final["state_type"] == "COMPLETED", worker.snapshot()
    data = final["state"]["data"]
    assert Path(data["storage_key"]).is_absolute()  # Prefect stores results under an absolute key
    result_record = json.loads(Path(data["storage_key"]).read_bytes())
    assert pickle.loads(base64.b64decode(result_record["result"])) == 42


# ----------------------------------------------------------------------------- waking a Prefect caller


def test_rest_set_state_does_not_wake_a_prefect_caller_but_a_state_event_does(prefect_server, tmp_path, python_script):
    """Prefect's future.result() waits on /api/events/out only; REST set_state emits no event."""
    (tmp_path / "ptasks.py").write_text(PREFECT_TASKS)
    short_timeout = 10.0
    caller = python_script(
        TRACE_TASK_RUN_READS + textwrap.dedent(f"""
        import json, time
        from ptasks import add_one
        for timeout in ({short_timeout}, 60.0):
            future = add_one.delay(x=1)
            print(json.dumps({{"run": str(future.task_run_id)}}), flush=True)
            started = time.monotonic()
            value = future.result(timeout=timeout)
            print(json.dumps({{"value": value, "waited": time.monotonic() - started}}), flush=True)
        """),
        prefect_server.client_env(),
        name="caller.py",
    ).start()

    result_path = prefect_server.storage_path / f"result-{uuid.uuid4().hex}"
    result_path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"storage_key": str(result_path), "expiration": None, "serializer": {"type": "json"},
                "prefect_version": "3.8.8", "storage_block_id": None}
    result_path.write_text(json.dumps({"metadata": metadata, "result": json.dumps(2)}))

    waits = []
    for with_event in (False, True):
        run_id = caller.expect("run", timeout=60)["run"]
        # result() reads the run once (not final yet), then waits for an event only
        read = caller.expect("read", timeout=60, read=run_id)
        assert read["state"] == "SCHEDULED"
        for state in (PENDING, RUNNING):
            assert _set_state(prefect_server, run_id, state)["status"] == "ACCEPT"
        completed = _set_state(prefect_server, run_id, {**COMPLETED, "data": metadata})
        assert completed["status"] == "ACCEPT"
        if with_event:
            event = {
                "id": completed["state"]["id"], "occurred": completed["state"]["timestamp"],
                "event": "prefect.task-run.Completed",
                "resource": {"prefect.resource.id": f"prefect.task-run.{run_id}",
                             "prefect.state-name": "Completed", "prefect.state-type": "COMPLETED"},
                "related": [],
                "payload": {"intended": {"from": "RUNNING", "to": "COMPLETED"},
                            "validated_state": {"type": "COMPLETED", "name": "Completed", "message": "",
                                                "state_details": {}, "data": metadata}},
            }
            response = prefect_api().post(f"{prefect_server.api_url}/events", json=[event], timeout=30)
            assert response.status_code == 204, response.text
        line = caller.expect("value", timeout=90)
        assert line["value"] == 2
        waits.append(line["waited"])
    assert caller.wait(timeout=30).returncode == 0

    rest_only, with_event = waits
    assert rest_only >= short_timeout, f"woke after {rest_only:.1f}s without an event"
    assert with_event < short_timeout, f"the event did not wake the caller ({with_event:.1f}s)"


def test_an_event_without_client_orchestration_is_not_recorded_as_a_state(prefect_server):
    """An event without prefect.orchestration=client is not recorded as a state (no second writer)."""
    run = _create_run(prefect_server, f"event-{uuid.uuid4().hex[:8]}")
    event = {
        "id": str(uuid.uuid4()), "occurred": datetime.now(timezone.utc).isoformat(),
        "event": "prefect.task-run.Completed",
        "resource": {"prefect.resource.id": f"prefect.task-run.{run['id']}"},
        "payload": {"validated_state": {"type": "COMPLETED", "name": "Completed", "state_details": {}}},
    }
    assert prefect_api().post(f"{prefect_server.api_url}/events", json=[event], timeout=30).status_code == 204
    # the task_run_recorder flushes at once (batch size 1); give it a generous moment
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert _read_run(prefect_server, run["id"]).json()["state_type"] == "SCHEDULED"
        time.sleep(0.25)
