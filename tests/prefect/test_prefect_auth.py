"""A Prefect 3.8.8 server started with PREFECT_SERVER_API_AUTH_STRING (issue 5, part 4).

With the right auth string (SYNC_WORKER_API_AUTH_STRING, or Prefect's PREFECT_API_AUTH_STRING)
everything works as without auth; with a wrong or missing one the user gets a clear error
that names the setting, at once, instead of retries or a hang.
"""
from __future__ import annotations

import base64
import json
import time
import uuid

import pytest
from prefect_support import read_run, wait_for_run


def _key(name: str) -> str:
    return f"sw-auth-{name}-{uuid.uuid4().hex[:8]}"


def double(x: int) -> int:
    return 2 * x


# ----------------------------------------------------------------------------- what the server answers


def test_server_rejects_rest_without_or_with_wrong_basic_auth(prefect_auth_server):
    import requests

    url = f"{prefect_auth_server.api_url}/task_runs/{uuid.uuid4()}"
    wrong = "Basic " + base64.b64encode(b"sync-worker:wrong").decode()
    for headers in ({}, {"Authorization": wrong}, {"Authorization": f"Bearer {prefect_auth_server.auth_string}"}):
        response = requests.get(url, headers=headers, timeout=30)
        assert response.status_code == 401, headers
        assert response.json() == {"exception_message": "Unauthorized"}
    assert requests.get(url, headers=prefect_auth_server.auth_header(), timeout=30).status_code == 404
    # the health check stays open (load balancers, our fixture)
    assert requests.get(f"{prefect_auth_server.api_url}/health", timeout=30).status_code == 200


@pytest.mark.parametrize(
    ("token", "reason"),
    [(None, "Auth required but no token provided"), ("sync-worker:wrong", "Invalid token")],
)
def test_websocket_closes_1008_on_a_missing_or_wrong_token(prefect_auth_server, token, reason):
    import websocket

    ws = websocket.create_connection(
        prefect_auth_server.api_url.replace("http", "ws", 1) + "/task_runs/subscriptions/scheduled",
        subprotocols=["prefect"], timeout=10,
    )
    try:
        ws.send(json.dumps({"type": "auth", "token": token}))
        opcode, data = ws.recv_data(control_frame=True)
    finally:
        ws.close()
    assert opcode == websocket.ABNF.OPCODE_CLOSE
    assert int.from_bytes(data[:2], "big") == 1008
    assert data[2:].decode() == reason


def test_websocket_without_the_prefect_subprotocol_is_refused_at_the_handshake(prefect_auth_server):
    import websocket

    with pytest.raises(websocket.WebSocketBadStatusException) as caught:
        websocket.create_connection(
            prefect_auth_server.api_url.replace("http", "ws", 1) + "/task_runs/subscriptions/scheduled", timeout=10
        )
    assert caught.value.status_code == 403


# ----------------------------------------------------------------------------- sync_worker with auth


def test_delay_and_worker_work_with_the_right_auth_string(prefect_auth_server, sync_worker_env, start_worker):
    from sync_worker import task

    sync_worker_env(prefect_auth_server)  # sets SYNC_WORKER_API_AUTH_STRING
    doubled = task(double, task_key=_key("double"))
    futures = [doubled.delay(x) for x in (1, 2, 3)]
    start_worker(doubled)
    assert [future.result(timeout=60) for future in futures] == [2, 4, 6]
    assert read_run(prefect_auth_server, futures[0].task_run_id)["state_type"] == "COMPLETED"


def test_prefects_auth_string_variable_is_honoured(prefect_auth_server, sync_worker_env, start_worker):
    from sync_worker import task

    sync_worker_env(prefect_auth_server, auth_variable="PREFECT_API_AUTH_STRING")
    doubled = task(double, task_key=_key("double-prefect-var"))
    future = doubled.delay(21)
    start_worker(doubled)
    assert future.result(timeout=60) == 42


@pytest.mark.parametrize("auth_string", ["sync-worker:wrong", None], ids=["wrong", "missing"])
def test_delay_with_a_wrong_or_missing_auth_string_raises_unauthorized(prefect_auth_server, sync_worker_env, auth_string):
    from sync_worker import Unauthorized, task

    sync_worker_env(prefect_auth_server, auth_string=auth_string)
    doubled = task(double, task_key=_key("double-denied"))
    started = time.monotonic()
    with pytest.raises(Unauthorized) as caught:
        doubled.delay(1)
    assert time.monotonic() - started < 10, "an auth failure must not be retried"
    assert caught.value.status_code == 401
    assert "SYNC_WORKER_API_AUTH_STRING" in str(caught.value)


@pytest.mark.parametrize(
    ("auth_string", "reason"),
    [("sync-worker:wrong", "Invalid token"), (None, "Auth required but no token provided")],
    ids=["wrong", "missing"],
)
def test_worker_with_a_wrong_or_missing_auth_string_stops_with_a_clear_error(
    prefect_auth_server, sync_worker_env, auth_string, reason
):
    from sync_worker import CredentialsError, TaskWorker, task

    sync_worker_env(prefect_auth_server, auth_string=auth_string)
    worker = TaskWorker(task(double, task_key=_key("double-worker-denied")))
    started = time.monotonic()
    with pytest.raises(CredentialsError) as caught:
        worker.start(timeout=30)
    assert time.monotonic() - started < 20, "refused credentials must not be retried"
    message = str(caught.value)
    assert reason in message
    assert "SYNC_WORKER_API_AUTH_STRING" in message


def test_prefect_caller_with_auth_is_served_by_a_sync_worker(
    prefect_auth_server, tmp_path, python_script, sync_worker_env, start_worker
):
    from sync_worker import task

    (tmp_path / "ptasks.py").write_text(
        "from prefect import task\n\n@task\ndef double(x: int) -> int:\n    return 2 * x\n"
    )
    caller = python_script(
        """
        import json
        from ptasks import double
        future = double.delay(x=5)
        print(json.dumps({"task_key": double.task_key, "run": str(future.task_run_id)}), flush=True)
        """,
        prefect_auth_server.client_env(),  # PREFECT_API_AUTH_STRING for Prefect's client
        name="caller.py",
    ).start()
    submitted = caller.expect("run", timeout=60)
    assert caller.wait(timeout=60).returncode == 0

    sync_worker_env(prefect_auth_server, SYNC_WORKER_ALLOW_PICKLE="true")
    start_worker(task(double, task_key=submitted["task_key"]))
    run = wait_for_run(prefect_auth_server, submitted["run"], {"COMPLETED", "FAILED"}, timeout=60)
    assert run is not None and run["state_type"] == "COMPLETED", run and run["state"]
