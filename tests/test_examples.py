"""Every command of examples/README.md, run as written (bash, real server, real worker and
gunicorn processes), so that the documentation cannot drift from what works.

What the test does differently from a user, and why:
- ``sync-worker server &`` is not run: a server on port 4200 would collide with other
  tests and other checkouts. A fresh server on a free port stands in for it, and
  ``SYNC_WORKER_API_URL`` points the commands at it, as the README says to do for another
  server.
- ``pip install '.[examples]'`` is not run (no network in tests): the test checks that the
  extra exists and lists every third-party module the examples import.
- ``sync-worker``, ``python3`` and ``gunicorn`` are the ones of the Python running the tests
  (small scripts first on PATH), with this checkout on PYTHONPATH: nothing is installed.
- gunicorn listens on a free port (``GUNICORN_BIND``, documented), which replaces ``8000``
  in the ``curl`` lines, and ``<task_run_id>`` is the id the first ``curl`` printed.
"""
from __future__ import annotations

import ast
import configparser
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


def bash_blocks() -> list[list[str]]:
    text = (EXAMPLES / "README.md").read_text()
    return [block.splitlines() for block in re.findall(r"```bash\n(.*?)```", text, re.S)]


def without_comment(line: str) -> str:
    return re.sub(r"\s+#.*$", "", line).strip()


def comment(line: str) -> str:
    return line.split("#", 1)[1].strip()


@pytest.fixture
def user_env(tmp_path, server) -> dict[str, str]:
    """A shell environment as after ``pip install '.[examples]'``, pointed at ``server``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shims = {
        "sync-worker": f'exec "{sys.executable}" -m sync_worker "$@"',
        "python3": f'exec "{sys.executable}" "$@"',
        "python": f'exec "{sys.executable}" "$@"',
        "gunicorn": f'exec "{sys.executable}" -m gunicorn "$@"',
    }
    for name, body in shims.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNC_WORKER_", "PREFECT_", "GUNICORN_"))}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(REPO),
        SYNC_WORKER_API_URL=server.url,
        SYNC_WORKER_STORAGE=str(tmp_path / "store"),
    )
    return env


def test_install_line_names_an_extra_with_everything_the_examples_import():
    install = bash_blocks()[0]
    assert install == ["python3 -m pip install '.[examples]'"]
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    extra = {re.split(r"[<>=!~ ]", line.strip())[0].lower()
             for line in config["options.extras_require"]["examples"].splitlines() if line.strip()}
    assert {"flask", "gunicorn", "werkzeug", "simple-websocket"} <= extra  # gunicorn: the command
    # examples/django_app has its own install line (the 'django' extra, see its README)
    sources = [p for p in EXAMPLES.rglob("*.py") if "django_app" not in p.parts]
    local = {p.stem for p in sources}
    imported = set()
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - local - {"sync_worker"}
    assert third_party and third_party <= extra


def test_submit_and_wait_as_documented(user_env):
    block = bash_blocks()[1]
    assert block[0].startswith("sync-worker server &")
    script = "\n".join(["set -e", "trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT", *block[1:]])
    result = subprocess.run(["bash", "-c", script], cwd=REPO, env=user_env, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    # both ways (worker threads in the script; a separate worker process) ran every run
    assert result.stdout.count("30/30 succeeded in ") == 2, result.stdout + result.stderr
    assert "add(4, 4) = 8" in result.stdout and "slow_square(3,) = 9" in result.stdout
    # the worker process was started from examples/ as written and said what it serves
    assert re.search(r"Starting task worker \S+ \(limit 10, server \S+\) for task\(s\): "
                     r"examples\.add \| examples\.flaky \| examples\.slow_square", result.stderr), result.stderr


def _gunicorn_port(process: subprocess.Popen, lines: list[str]) -> tuple[int, threading.Thread]:
    """gunicorn's port (from its 'Listening at' line) and the thread reading its stderr."""
    found: list[int] = []
    event = threading.Event()

    def read() -> None:
        for line in process.stderr:
            lines.append(line)
            match = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", line)
            if match and not found:
                found.append(int(match.group(1)))
                event.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert event.wait(60), "gunicorn did not start:\n" + "".join(lines)
    return found[0], reader


def test_flask_app_under_gunicorn_as_documented(user_env):
    block = [line for line in bash_blocks()[2] if line.strip()]
    assert block[0].startswith("sync-worker server &")
    cd, gunicorn_line, *curls = block[1:]
    assert cd.startswith("cd ") and without_comment(gunicorn_line).endswith("&") and len(curls) == 2
    cwd = REPO / without_comment(cd)[3:]
    env = {**user_env, "GUNICORN_BIND": "127.0.0.1:0"}
    process = subprocess.Popen(["bash", "-c", without_comment(gunicorn_line).rstrip("&").strip()], cwd=cwd, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines: list[str] = []
    reader = None
    try:
        port, reader = _gunicorn_port(process, lines)

        def curl(line: str, **values: str) -> dict:
            command = without_comment(line).replace("127.0.0.1:8000", f"127.0.0.1:{port}")
            for placeholder, value in values.items():
                command = command.replace(f"<{placeholder}>", value)
            result = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                                    timeout=60)
            assert result.returncode == 0, result.stderr
            return json.loads(result.stdout)

        submitted = curl(curls[0])
        assert set(submitted) == set(json.loads(comment(curls[0]).replace('"..."', '""')))
        answer = curl(curls[1], task_run_id=submitted["task_run_id"])
        assert answer == json.loads(comment(curls[1]))
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # gunicorn's graceful stop; worker_exit drains the TaskWorkers
        process.wait(timeout=60)
        if reader is not None:
            reader.join(timeout=30)  # the rest of gunicorn's log
    assert process.returncode == 0, "".join(lines)
    assert "".join(lines).count("started in gunicorn worker") == 2  # one TaskWorker per gunicorn worker
