"""The examples run as a user would run them: the script, and the Flask app under gunicorn
with a TaskWorker started in each gunicorn worker by the post_fork hook."""
from __future__ import annotations

import re
import signal
import sys
import time

import requests

from tests.worker.conftest import REPO

EXAMPLES = REPO / "examples"


def test_submit_and_wait_script_with_in_process_worker(api_env, spawn):
    proc = spawn([sys.executable, str(EXAMPLES / "submit_and_wait.py"), "--runs", "5", "--with-worker"], api_env)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, out + err
    assert "add(4, 4) = 8" in out
    assert "slow_square(3,) = 9" in out
    assert "15/15 succeeded" in out


def _listening_port(proc) -> int:
    """gunicorn logs 'Listening at: http://127.0.0.1:PORT' on stderr."""
    deadline = time.monotonic() + 30
    seen = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        match = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", line)
        if match:
            return int(match.group(1))
    raise AssertionError("gunicorn did not start:\n" + "".join(seen))


def test_flask_app_under_gunicorn_submits_and_returns_results(api_env, spawn):
    env = {**api_env, "GUNICORN_BIND": "127.0.0.1:0", "GUNICORN_WORKERS": "2", "TASK_WORKER_LIMIT": "2"}
    proc = spawn([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"], env,
                 cwd=EXAMPLES / "flask_app")
    port = _listening_port(proc)
    base = f"http://127.0.0.1:{port}"

    submitted = requests.post(f"{base}/multiply", params={"x": 6, "y": 7}, timeout=10)
    assert submitted.status_code == 202
    run_id = submitted.json()["task_run_id"]
    answer = requests.get(f"{base}/result/{run_id}", params={"wait": 20}, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"state": "COMPLETED", "result": 42.0}

    ids = [requests.post(f"{base}/welcome", params={"address": f"u{i}@example.com"}, timeout=10).json()["task_run_id"]
           for i in range(10)]
    results = [requests.get(f"{base}/result/{i}", params={"wait": 20}, timeout=30).json() for i in ids]
    assert [r["result"] for r in results] == [f"welcome email sent to u{i}@example.com" for i in range(10)]

    proc.send_signal(signal.SIGTERM)  # gunicorn's graceful stop; worker_exit stops the TaskWorkers
    proc.wait(timeout=30)
    assert proc.returncode == 0
    log = proc.stderr.read()
    assert log.count("started in gunicorn worker") == 2  # one TaskWorker per gunicorn worker (post_fork)
