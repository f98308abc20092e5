"""Prefect 3.8.8's own client and worker against ``sync-worker server`` (issue 12).

A user with Prefect code points ``PREFECT_API_URL`` at the embedded server instead of
``prefect server start``: Prefect's ``serve()`` executes the runs and reports their states
as events on ``/api/events/in``; Prefect's ``future.result()`` waits on
``/api/events/out``. No Prefect code is patched: callers and workers are plain Prefect
scripts in subprocesses; the server is the ``sync-worker server`` command.

The servers here use a 1 s lease timeout and ``--max-deliveries 1``: a run whose final
state the server failed to record would be marked CRASHED one second after Prefect's
worker disconnects, so "still COMPLETED" is a real check.
"""
from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 60.0
LEASE_TIMEOUT = 1.0
#: a Prefect caller's delay() -> result() took 0.28-1.48 s (24 measurements, 2 cores shared
#: with other jobs, load average 9-15); the issue asks for 2 s. SYNC_WORKER_PREFECT_RESULT_BOUND
#: loosens it on a slower CI machine.
RESULT_BOUND = float(os.environ.get("SYNC_WORKER_PREFECT_RESULT_BOUND", "2.0"))

PREFECT_TASKS = '''
from pathlib import Path

from prefect import task


@task
def add_one(x: int) -> int:
    return x + 1


@task
def boom(x: int) -> int:
    raise ValueError(f"boom-{x}")


@task
def describe(value):
    return repr(value)


@task
def sleepy(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


@task(retries=2, retry_delay_seconds=0.2)
def flaky(counter: str) -> str:
    path = Path(counter)
    attempts = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(attempts))
    if attempts < 3:
        raise RuntimeError(f"attempt {attempts} fails")
    return f"ok after {attempts}"
'''

PREFECT_WORKER = '''
from prefect.task_worker import serve
from ptasks import add_one, boom, flaky, sleepy

serve(add_one, boom, flaky, sleepy)
'''


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SYNC_WORKER_"))}


@dataclass
class EmbeddedServer:
    """A running ``sync-worker server`` subprocess, and the environment Prefect needs for it."""

    api_url: str
    home: Path
    log_path: Path
    process: subprocess.Popen
    auth_string: str | None = None

    def client_env(self, auth_string: str | None = None, **extra: str) -> dict[str, str]:
        """Prefect caller/worker environment: this API, one shared local result storage
        (parameters and results are files there), the tasks module on the path."""
        env = _clean_env()
        env.update(
            PREFECT_API_URL=self.api_url,
            PREFECT_HOME=str(self.home / "prefect-home"),
            PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(self.storage_path),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            DO_NOT_TRACK="1",
            PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW="ignore",
            PYTHONPATH=str(self.home / "tasks"),
        )
        value = auth_string if auth_string is not None else self.auth_string
        if value is not None:
            env["PREFECT_API_AUTH_STRING"] = value
        env.update(extra)
        return env

    @property
    def storage_path(self) -> Path:
        """Prefect's local result storage of the callers and workers (parameters and results)."""
        return self.home / "storage"

    def auth_header(self) -> dict[str, str]:
        if self.auth_string is None:
            return {}
        return {"Authorization": "Basic " + base64.b64encode(self.auth_string.encode()).decode()}

    def read(self, run_id: str) -> dict:
        import requests

        response = requests.get(f"{self.api_url}/task_runs/{run_id}", headers=self.auth_header(), timeout=10)
        response.raise_for_status()
        return response.json()

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError as exc:  # pragma: no cover - diagnostics only
            return f"<cannot read {self.log_path}: {exc}>"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)


def start_embedded_server(home: Path, auth_string: str | None = None, port: int | None = None) -> EmbeddedServer:
    """``port``: that one (a restart on the same address and database), else a free one."""
    import requests

    home.mkdir(parents=True, exist_ok=True)
    (home / "tasks").mkdir(exist_ok=True)
    (home / "tasks" / "ptasks.py").write_text(PREFECT_TASKS)
    port = port or _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    cmd = [sys.executable, "-m", "sync_worker", "server", "--port", str(port), "--db", str(home / "server.db"),
           "--lease-timeout", str(LEASE_TIMEOUT), "--max-deliveries", "1", "--log-level", "DEBUG"]
    env = _clean_env()
    if auth_string is not None:
        cmd += ["--auth-string", auth_string]
    log_path = home / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    server = EmbeddedServer(api_url, home, log_path, process, auth_string)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if requests.get(f"{api_url}/health", headers=server.auth_header(), timeout=2).status_code == 200:
                return server
        except requests.RequestException:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"`{' '.join(cmd)}` did not answer /api/health within {START_TIMEOUT:.0f}s:\n"
                       f"{server.log_tail()}")


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    server = start_embedded_server(tmp_path_factory.mktemp("embedded"))
    yield server
    server.stop()


AUTH_STRING = "prefect-user:s3cret"


@pytest.fixture(scope="module")
def embedded_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    server = start_embedded_server(tmp_path_factory.mktemp("embedded-auth"), auth_string=AUTH_STRING)
    yield server
    server.stop()


def _worker(python_script, server: EmbeddedServer, **env: str):
    return python_script(PREFECT_WORKER, server.client_env(**env), name="pworker.py").start()


def _caller(python_script, server: EmbeddedServer, body: str, auth_string: str | None = None):
    """A Prefect caller script; ``emit(**kw)`` prints one JSON line."""
    source = textwrap.dedent('''
        import json, time
        from ptasks import add_one, boom, flaky, sleepy

        def emit(**kw):
            print(json.dumps(kw), flush=True)

        ''') + textwrap.dedent(body)
    return python_script(source, server.client_env(auth_string), name="caller.py").start()


def _snapshot(server: EmbeddedServer, *scripts) -> str:
    return "\n".join([*(s.snapshot() for s in scripts), "server log:", server.log_tail()])


# ----------------------------------------------------------------------------- Prefect caller + Prefect serve()


def test_prefects_worker_and_a_waiting_caller_go_on_after_the_server_restarts(tmp_path, python_script):
    """The server stops (SIGTERM) and starts again on the same address and database while
    Prefect's ``serve()`` runs a task and a Prefect caller waits for it. The server closes their
    sockets with 1012, as a Prefect server does: Prefect's worker and its caller's event wait
    reconnect after it, and stopped for good after the 1001 sent before (the worker exited; the
    caller woke only at its timeout)."""
    server = start_embedded_server(tmp_path / "restart")
    try:
        worker = _worker(python_script, server)
        caller = _caller(python_script, server, '''
            first = add_one.delay(x=0)
            emit(warm=first.result(timeout=90))
            slow = sleepy.delay(seconds=4.0)
            emit(submitted=str(slow.task_run_id))
            started = time.monotonic()
            emit(slow=slow.result(timeout=90), seconds=time.monotonic() - started)
            emit(after=add_one.delay(x=5).result(timeout=90))
            ''')
        caller.expect("warm", 150)
        run_id = caller.expect("submitted", 30)["submitted"]
        deadline = time.monotonic() + 30
        while server.read(run_id)["state_type"] != "RUNNING":
            assert time.monotonic() < deadline, _snapshot(server, caller, worker)
            time.sleep(0.05)
        port = int(server.api_url.rsplit(":", 1)[1].split("/")[0])
        server.stop()
        server = start_embedded_server(server.home, port=port)
        slow = caller.expect("slow", 90)
        assert slow["slow"] == 4.0 and slow["seconds"] < 45, _snapshot(server, caller, worker)  # not at its timeout
        assert caller.expect("after", 90)["after"] == 6, _snapshot(server, caller, worker)
        assert worker.process.poll() is None, _snapshot(server, caller, worker)
    finally:
        server.stop()


def test_prefect_serve_and_delay_result_returns_the_value_within_2_seconds(embedded, python_script):
    worker = _worker(python_script, embedded)
    caller = _caller(python_script, embedded, '''
        # warm-up: the worker subscribes while this one waits (Prefect's worker takes seconds to start)
        first = add_one.delay(x=0)
        emit(warmup=first.result(timeout=90), run=str(first.task_run_id))
        for x in (1, 2, 3):
            started = time.monotonic()
            future = add_one.delay(x=x)
            value = future.result(timeout=30)
            emit(value=value, x=x, run=str(future.task_run_id), seconds=time.monotonic() - started)
        ''')
    result = caller.wait(timeout=150)
    assert result.returncode == 0, _snapshot(embedded, caller, worker)
    lines = result.json_lines()
    assert lines[0]["warmup"] == 1
    timed = [line for line in lines if "value" in line]
    assert [(line["x"], line["value"]) for line in timed] == [(1, 2), (2, 3), (3, 4)]
    slowest = max(line["seconds"] for line in timed)
    print("delay() -> result() seconds:", [round(line["seconds"], 3) for line in timed])  # shown with -s / -rP
    assert slowest < RESULT_BOUND, f"delay() -> result() took {slowest:.2f}s: {timed}"
    for line in timed:
        run = embedded.read(line["run"])
        assert run["state_type"] == "COMPLETED" and run["run_count"] == 1, run
        assert run["state"]["data"]["storage_key"], run["state"]  # Prefect's result record, as its worker sent it
        assert run["start_time"] and run["end_time"]


def test_prefect_apply_async_and_a_failing_task_raises_in_the_caller(embedded, python_script):
    worker = _worker(python_script, embedded)
    caller = _caller(python_script, embedded, '''
        future = add_one.apply_async(args=(41,))
        emit(value=future.result(timeout=90))
        failing = boom.delay(x=42)
        try:
            failing.result(timeout=60)
            emit(raised=None)
        except Exception as exc:
            emit(raised=repr(exc), type=type(exc).__name__, run=str(failing.task_run_id))
        ''')
    result = caller.wait(timeout=150)
    assert result.returncode == 0, _snapshot(embedded, caller, worker)
    lines = result.json_lines()
    assert lines[0] == {"value": 42}
    assert lines[1]["type"] == "ValueError" and lines[1]["raised"] == "ValueError('boom-42')", lines
    run = embedded.read(lines[1]["run"])
    assert run["state_type"] == "FAILED" and "boom-42" in run["state"]["message"]


def test_prefect_in_process_retries_end_completed(embedded, python_script, tmp_path):
    worker = _worker(python_script, embedded)
    counter = tmp_path / "attempts"
    caller = _caller(python_script, embedded, f'''
        future = flaky.delay({str(counter)!r})
        emit(value=future.result(timeout=90), run=str(future.task_run_id))
        ''')
    result = caller.wait(timeout=150)
    assert result.returncode == 0, _snapshot(embedded, caller, worker)
    line = result.json_lines()[0]
    assert line["value"] == "ok after 3"
    run = embedded.read(line["run"])
    assert run["state_type"] == "COMPLETED" and run["run_count"] == 3, run
    assert counter.read_text() == "3"  # run in-process by Prefect's worker, never delivered again


def test_runs_stay_completed_and_are_not_requeued_after_prefects_worker_disconnects(embedded, python_script):
    import websocket

    worker = _worker(python_script, embedded)
    caller = _caller(python_script, embedded, '''
        futures = [add_one.delay(x=x) for x in range(5)]
        emit(values=[f.result(timeout=90) for f in futures], runs=[str(f.task_run_id) for f in futures],
             key=add_one.task_key)
        ''')
    result = caller.wait(timeout=150)
    assert result.returncode == 0, _snapshot(embedded, caller, worker)
    line = result.json_lines()[0]
    assert line["values"] == [1, 2, 3, 4, 5]
    worker.stop(timeout=30)
    assert worker.process.poll() is not None

    # a worker of ours subscribes to the same key: nothing may be delivered to it
    ws = websocket.create_connection(embedded.api_url.replace("http", "ws", 1) + "/task_runs/subscriptions/scheduled",
                                     subprotocols=["prefect"], timeout=10)
    try:
        ws.send(json.dumps({"type": "auth", "token": None}))
        assert json.loads(ws.recv())["type"] == "auth_success"
        ws.send(json.dumps({"type": "subscribe", "keys": [line["key"]], "client_id": "late-worker"}))
        ws.settimeout(3 * LEASE_TIMEOUT + 1)
        with pytest.raises(websocket.WebSocketTimeoutException):
            message = ws.recv()
            pytest.fail(f"a finished run was delivered again: {message}")
    finally:
        ws.close()
    for run_id in line["runs"]:
        run = embedded.read(run_id)  # three lease timeouts later: not CRASHED, not SCHEDULED
        assert run["state_type"] == "COMPLETED", (run["state"], embedded.log_tail())


def add_one(x: int) -> int:
    """sync_worker's side of Prefect's ``add_one``: same signature, executed by our worker."""
    return x + 1


def test_a_prefect_caller_waiting_on_a_run_a_sync_worker_worker_finished_wakes_up(
    embedded, python_script, sync_worker_env, start_worker
):
    """The server announces the final state our worker set (set_state, not an event) on
    /api/events/out. Prefect's ``future.wait(timeout=60)`` returns as soon as it sees it;
    unwoken, it would return after 60 s. (Reading the *value* back is part 3 of issue 12.)"""
    from sync_worker import task

    sync_worker_env(embedded, SYNC_WORKER_ALLOW_PICKLE="true")  # Prefect pickles the parameters
    caller = _caller(python_script, embedded, '''
        future = add_one.delay(x=1)
        emit(run=str(future.task_run_id), key=add_one.task_key)
        started = time.monotonic()
        future.wait(timeout=60)
        emit(waited=time.monotonic() - started, state=future.state.type.value)
        ''')
    submitted = caller.expect("run", timeout=90)
    start_worker(task(add_one, task_key=submitted["key"]))
    outcome = caller.expect("waited", timeout=120)
    assert outcome["state"] == "COMPLETED", outcome
    assert outcome["waited"] < 30, f"Prefect's caller was not woken: it waited {outcome['waited']:.1f}s"
    assert caller.wait(timeout=30).returncode == 0
    assert embedded.read(submitted["run"])["state_type"] == "COMPLETED"


# ----------------------------------------------------------------------------- with an auth string


def test_with_the_right_auth_string_prefects_serve_and_result_work(embedded_auth, python_script):
    worker = _worker(python_script, embedded_auth)
    caller = _caller(python_script, embedded_auth, '''
        future = add_one.delay(x=9)
        emit(value=future.result(timeout=90), run=str(future.task_run_id))
        failing = boom.delay(x=7)
        try:
            failing.result(timeout=60)
        except ValueError as exc:
            emit(raised=str(exc))
        ''')
    result = caller.wait(timeout=150)
    assert result.returncode == 0, _snapshot(embedded_auth, caller, worker)
    lines = result.json_lines()
    assert lines[0]["value"] == 10 and lines[1] == {"raised": "boom-7"}
    assert embedded_auth.read(lines[0]["run"])["state_type"] == "COMPLETED"


def test_with_a_wrong_auth_string_prefect_fails_clearly(embedded_auth, python_script):
    caller = _caller(python_script, embedded_auth, '''
        add_one.delay(x=1)
        emit(created=True)
        ''', auth_string="prefect-user:wrong")
    result = caller.wait(timeout=90)
    assert result.returncode != 0 and not result.json_lines()
    assert "401 Unauthorized" in result.stderr and "PREFECT_API_AUTH_STRING" in result.stderr, result.stderr[-3000:]

    worker = _worker(python_script, embedded_auth, PREFECT_API_AUTH_STRING="prefect-user:wrong")
    outcome = worker.wait(timeout=90)
    assert outcome.returncode != 0
    assert "Unable to authenticate" in outcome.stderr and "Invalid token" in outcome.stderr, outcome.stderr[-3000:]
