"""``python -m sync_worker.server`` in a subprocess: serves, logs its URL, exits 0 on SIGTERM."""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

from sync_worker.server.cli import configure_parser


def _start(tmp_path, *extra, env=None):
    process = subprocess.Popen(
        [sys.executable, "-m", "sync_worker.server", "--port", "0", "--db", str(tmp_path / "cli.db"), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    lines: list[str] = []
    found = threading.Event()
    url: list[str] = []

    def read():
        for line in process.stderr:
            lines.append(line)
            match = re.search(r"Serving on (http://\S+/api)", line)
            if match and not url:
                url.append(match.group(1))
                found.set()

    threading.Thread(target=read, daemon=True).start()
    assert found.wait(20), "".join(lines)
    return process, url[0], lines


def test_subprocess_serves_and_stops_on_sigterm(tmp_path):
    process, url, lines = _start(tmp_path)
    try:
        assert requests.get(url + "/health", timeout=5).json() is True
        created = requests.post(url + "/task_runs/", json={"task_key": "k", "dynamic_key": "d"}, timeout=5)
        assert created.status_code == 201
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
    log = "".join(lines)
    assert "SIGTERM" in log
    assert "stopped" in log


def test_subprocess_auth_string_from_environment(tmp_path):
    env = dict(os.environ, PREFECT_SERVER_API_AUTH_STRING="u:p")
    env.pop("SYNC_WORKER_SERVER_AUTH_STRING", None)
    process, url, _ = _start(tmp_path, env=env)
    try:
        assert requests.get(url + "/health", timeout=5).status_code == 401
        assert requests.get(url + "/health", auth=("u", "p"), timeout=5).json() is True
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_non_loopback_without_auth_warns(tmp_path):
    process, _url, lines = _start(tmp_path, "--host", "0.0.0.0")
    try:
        time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert any("WARNING" in line and "auth string" in line for line in lines)


def test_parser_defaults(monkeypatch):
    monkeypatch.setenv("SYNC_WORKER_SERVER_AUTH_STRING", "a:b")
    monkeypatch.setenv("PREFECT_SERVER_API_AUTH_STRING", "ignored")
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args([])
    assert (args.host, args.port, args.lease_timeout, args.max_deliveries) == ("127.0.0.1", 4200, 30.0, 3)
    assert args.auth_string == "a:b"
    assert args.db.endswith(os.path.join(".sync_worker", "server.db"))
    assert args.max_body_size == 10 * 1024 * 1024
    assert args.log_level == "INFO"
    assert callable(args.func)


def test_port_in_use_exits_nonzero(tmp_path, server):
    process = subprocess.run(
        [sys.executable, "-m", "sync_worker.server", "--port", str(server.port), "--db", str(tmp_path / "x.db")],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert process.returncode == 2  # a user mistake: one line naming the option
    assert process.stderr.splitlines()[-1] == (
        f"python -m sync_worker.server: error: server port {server.port} (--host/--port) is in use on 127.0.0.1: "
        "choose another port, or 0 for any free port")
    assert not (tmp_path / "x.db").exists() and not (tmp_path / "x.db.lock").exists()


def test_database_in_use_exits_nonzero(server):
    process = subprocess.run(
        [sys.executable, "-m", "sync_worker.server", "--port", "0", "--db", server.database],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert process.returncode == 2
    assert "another running server (--db)" in process.stderr.splitlines()[-1]


def test_sigterm_handled_while_the_serving_loop_holds_a_lock_stops_the_server(tmp_path):
    """The SIGTERM lands while the main thread, back in its serving loop, holds a lock (see
    tests/signal_window.py): its handler set an Event whose lock wait() held, and the server
    never stopped (seen once in CI-like runs beside busy processes)."""
    window = Path(__file__).resolve().parent.parent / "signal_window.py"
    process = subprocess.run(
        [sys.executable, str(window), "log:are kept in", "sync_worker", "server", "--port", "0",
         "--db", str(tmp_path / "q.db")],
        capture_output=True, text=True, timeout=30, env={**os.environ, "SYNC_WORKER_STORAGE": str(tmp_path / "store")},
    )
    assert process.returncode == 0, process.stderr
    assert "received SIGTERM, shutting down" in process.stderr
    assert "stopped in" in process.stderr


def test_an_empty_auth_string_is_refused_not_served_without_auth(tmp_path):
    """``--auth-string ''`` served without any auth and said nothing."""
    result = subprocess.run([sys.executable, "-m", "sync_worker", "server", "--port", "0", "--auth-string", "",
                             "--db", str(tmp_path / "s.db")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "argument --auth-string: must not be empty" in result.stderr
    assert not (tmp_path / "s.db").exists()
