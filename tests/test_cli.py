"""The ``sync-worker`` command as a user meets it: help, the demo, bad arguments."""
from __future__ import annotations

import subprocess
import sys

import pytest

from sync_worker.cli import main


def run(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sync_worker", *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_the_commands():
    result = run("--help")
    assert result.returncode == 0
    for command in ("demo", "server", "worker"):
        assert command in result.stdout


@pytest.mark.parametrize("command,expected", [
    ("worker", ["MODULE:TASK", "--limit", "--status-port", "--timeout"]),
    ("server", ["--host", "--port", "--db", "--auth-string", "--lease-timeout"]),
    ("demo", ["--runs", "--limit"]),
])
def test_subcommand_help(command, expected):
    result = run(command, "--help")
    assert result.returncode == 0
    for option in expected:
        assert option in result.stdout


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "commands" in capsys.readouterr().out


def test_demo_runs_end_to_end():
    result = run("demo", "--runs", "5")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for i in range(5):
        assert f"add({i}, {i * i}) = {i + i * i}" in out
    assert "flaky(...) = 'succeeded after a retry' (state Completed, after 2 attempts)" in out
    assert "divide(1, 0) failed as expected: Task run encountered an exception ZeroDivisionError" in out
    assert "worker stopped (exit code 0)" in out
    # the runs that fail on purpose print no traceback by default; --log-level warning shows them
    assert "Traceback" not in result.stderr, result.stderr


def test_demo_log_level_reaches_the_worker():
    result = run("demo", "--runs", "1", "--log-level", "warning")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ZeroDivisionError: division by zero" in result.stderr and "Traceback" in result.stderr


@pytest.mark.parametrize("spec,message", [
    ("nocolon", "is not MODULE:TASK"),
    ("no_such_module_xyz:task", "cannot import module 'no_such_module_xyz'"),
    ("sync_worker.demo:nothing", "has no attribute 'nothing'"),
    ("sync_worker.demo:run_demo", "not a task"),
])
def test_worker_rejects_bad_task_specs(spec, message):
    result = run("worker", spec, timeout=30)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.parametrize("source,message", [
    ("import not_installed_dependency_xyz\n",
     "importing module 'broken_tasks' failed: ModuleNotFoundError: No module named 'not_installed_dependency_xyz' "
     "(at {path}:1)"),
    ("x = 1\nraise RuntimeError('SETTING missing')\n",
     "importing module 'broken_tasks' failed: RuntimeError: SETTING missing (at {path}:2)"),
    ("def f(:\n", "importing module 'broken_tasks' failed: SyntaxError: "),
    ("import sys\nsys.exit(7)\n", "importing module 'broken_tasks' called sys.exit(7); guard its script code"),
])
def test_worker_with_a_task_module_whose_import_fails_is_one_line(tmp_path, source, message):
    module = tmp_path / "broken_tasks.py"
    module.write_text(source)
    result = subprocess.run([sys.executable, "-m", "sync_worker", "worker", "broken_tasks:job"], capture_output=True,
                            text=True, timeout=30, cwd=tmp_path, env=clean_env(tmp_path))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("sync-worker worker: error: 'broken_tasks:job': " + message.format(path=module))
    assert len(result.stderr.splitlines()) == 1, result.stderr  # no traceback


def test_worker_rejects_a_bad_limit():
    result = run("worker", "sync_worker.demo:add", "--limit", "-3", timeout=30)
    assert result.returncode == 2
    assert "--limit" in result.stderr


# -- user mistakes: one line naming the option or setting, exit code 2 ----------------------------
import json  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402

from sync_worker.cli import build_parser  # noqa: E402
from tests.helpers import clean_env, run_env, server_log_until  # noqa: E402


@pytest.fixture
def taken_port():
    """A port something else listens on."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    yield sock.getsockname()[1]
    sock.close()


@pytest.mark.parametrize("args,line", [
    (["worker", "sync_worker.demo:add", "--status-port", "99999"],
     "sync-worker worker: error: argument --status-port: '99999': must be 0-65535 (0 = any free port) "
     "(see sync-worker worker --help)"),
    (["worker", "sync_worker.demo:add", "--limit", "0"],
     "sync-worker worker: error: argument --limit: '0': must be >= 1 (use --limit none for no limit) "
     "(see sync-worker worker --help)"),
    (["worker", "sync_worker.demo:add", "--limit", "ten"],
     "sync-worker worker: error: argument --limit: 'ten' is not a whole number (or 'none' for no limit) "
     "(see sync-worker worker --help)"),
    (["worker", "sync_worker.demo:add", "--timeout", "soon"],
     "sync-worker worker: error: argument --timeout: 'soon' is not a number (see sync-worker worker --help)"),
    (["server", "--port", "abc"],
     "sync-worker server: error: argument --port: 'abc' is not a port number (0-65535) (see sync-worker server --help)"),
    (["server", "--port", "70000"],
     "sync-worker server: error: argument --port: '70000': must be 0-65535 (0 = any free port) "
     "(see sync-worker server --help)"),
    (["server", "--lease-timeout", "-1"],
     "sync-worker server: error: argument --lease-timeout: '-1': must be a number > 0 (see sync-worker server --help)"),
    (["server", "--max-deliveries", "x"],
     "sync-worker server: error: argument --max-deliveries: 'x' is not a whole number (see sync-worker server --help)"),
    (["demo", "--runs", "0"],
     "sync-worker demo: error: argument --runs: '0': must be a whole number >= 1 (see sync-worker demo --help)"),
    (["runs", "ls", "--api-url", "127.0.0.1:4200/api"],
     "sync-worker runs ls: error: argument --api-url: '127.0.0.1:4200/api' is not an http(s) URL (for example "
     "http://127.0.0.1:4200/api) (see sync-worker runs ls --help)"),
    (["status", "--api-url", "localhost:4200/api"],
     "sync-worker status: error: argument --api-url: 'localhost:4200/api' is not an http(s) URL (for example "
     "http://127.0.0.1:4200/api) (see sync-worker status --help)"),
    (["worker", "sync_worker.demo:add", "--module", "myapp.jobs"],
     "sync-worker worker: error: --module needs --django (it is about a Django project's tasks) "
     "(see sync-worker worker --help)"),
])
def test_bad_options_are_one_line_naming_the_option(tmp_path, args, line):
    result = run_env(clean_env(tmp_path), *args, timeout=30)
    assert result.returncode == 2
    assert result.stderr == line + "\n"  # one line, no usage block, no traceback


@pytest.mark.parametrize("variable,value,message", [
    ("SYNC_WORKER_REQUEST_TIMEOUT", "abc", "SYNC_WORKER_REQUEST_TIMEOUT='abc' is not a number"),
    ("SYNC_WORKER_REQUEST_TIMEOUT", "0", "SYNC_WORKER_REQUEST_TIMEOUT='0' must be a number of seconds > 0"),
    ("PREFECT_API_REQUEST_TIMEOUT", "-5", "PREFECT_API_REQUEST_TIMEOUT='-5' must be a number of seconds > 0"),
    ("SYNC_WORKER_DRAIN_TIMEOUT", "-1", "SYNC_WORKER_DRAIN_TIMEOUT='-1' must be a number of seconds >= 0"),
    ("SYNC_WORKER_ALLOW_PICKLE", "maybe",
     "SYNC_WORKER_ALLOW_PICKLE='maybe' is not a boolean (use true/false, 1/0, yes/no, on/off)"),
    ("SYNC_WORKER_FAST_PATH", "fast",
     "SYNC_WORKER_FAST_PATH='fast' is not a boolean (use true/false, 1/0, yes/no, on/off)"),
    ("SYNC_WORKER_CLIENT_METRICS_PORT", "99999", "SYNC_WORKER_CLIENT_METRICS_PORT='99999' is not a port (0-65535)"),
    ("SYNC_WORKER_CLIENT_METRICS_PORT", "http", "SYNC_WORKER_CLIENT_METRICS_PORT='http' is not a whole number"),
    ("SYNC_WORKER_API_URL", "localhost:4200",
     "SYNC_WORKER_API_URL='localhost:4200' is not an http(s) URL (for example http://127.0.0.1:4200/api)"),
])
def test_bad_settings_are_one_line_naming_the_variable(tmp_path, variable, value, message):
    result = run_env(clean_env(tmp_path, **{variable: value}), "worker", "sync_worker.demo:add", "--timeout", "5",
                     timeout=30)
    assert result.returncode == 2
    assert result.stderr == f"sync-worker worker: error: {message}\n"


def test_status_port_in_use_is_one_line(tmp_path, taken_port):
    result = run_env(clean_env(tmp_path), "worker", "sync_worker.demo:add", "--status-port", str(taken_port),
                     timeout=30)
    assert result.returncode == 2
    assert result.stderr == (
        f"sync-worker worker: error: status server port {taken_port} (--status-port / status_server_port) is in use "
        "on 127.0.0.1: choose another port, or 0 for any free port\n")


def test_server_port_in_use_is_one_line_and_leaves_no_files(tmp_path, taken_port):
    (tmp_path / "data").mkdir()  # an explicit --db needs its directory to exist
    database = tmp_path / "data" / "queue.db"
    result = run_env(clean_env(tmp_path), "server", "--port", str(taken_port), "--db", str(database), timeout=30)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"sync-worker server: error: server port {taken_port} (--host/--port) is in use on 127.0.0.1: "
        "choose another port, or 0 for any free port")
    assert list((tmp_path / "data").iterdir()) == []  # none of the files it created (db, lock, wal, shm)


def test_failed_server_start_keeps_files_that_were_there(tmp_path, taken_port, server_factory):
    database = tmp_path / "queue.db"
    server_factory(database=str(database)).stop()  # a database from an earlier run
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run_env(clean_env(tmp_path), "server", "--port", str(taken_port), "--db", str(database), timeout=30)
    assert result.returncode == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert database.stat().st_size > 0


def test_server_database_in_use_is_one_line(tmp_path, server):
    result = run_env(clean_env(tmp_path), "server", "--port", "0", "--db", server.database, timeout=30)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"sync-worker server: error: cannot start: {server.database} is used by another running server (--db); "
        "stop it or choose another --db")


def test_api_url_without_api_says_what_to_set(tmp_path, server):
    base = server.url[: -len("/api")]
    result = run_env(clean_env(tmp_path, SYNC_WORKER_API_URL=base), "worker", "sync_worker.demo:add",
                     "--timeout", "20", timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"sync-worker worker: error: SYNC_WORKER_API_URL is {base}, which lacks /api: the server there answers 404 "
        f"for the task-run API but is healthy at {server.url}/health; set SYNC_WORKER_API_URL={server.url}")


@pytest.mark.parametrize("fast_path", ["true", "false"])
def test_api_url_without_api_from_python(tmp_path, server, monkeypatch, fast_path):
    """.delay() raises a ConfigurationError that names PREFECT_API_URL when that is what was set."""
    from sync_worker import ConfigurationError
    from sync_worker.client import Client
    from sync_worker.demo import add

    monkeypatch.delenv("SYNC_WORKER_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_API_URL", server.url[: -len("/api")])
    monkeypatch.setenv("SYNC_WORKER_STORAGE", str(tmp_path / "store"))
    monkeypatch.setenv("SYNC_WORKER_FAST_PATH", fast_path)
    with pytest.raises(ConfigurationError, match=re.escape(f"set PREFECT_API_URL={server.url}")):
        add.delay(1, 2)
    # a real 404 behind a correct URL stays ObjectNotFound, without the hint
    from sync_worker import ObjectNotFound

    with Client(api_url=server.url) as client, pytest.raises(ObjectNotFound) as info:
        client.read_task_run("00000000-0000-0000-0000-000000000000")
    assert not isinstance(info.value, ConfigurationError)


def test_serve_from_python_raises_port_unavailable(taken_port):
    from sync_worker import ConfigurationError, PortUnavailable, serve
    from sync_worker.demo import add

    with pytest.raises(PortUnavailable, match=rf"status server port {taken_port} .* is in use") as info:
        serve(add, status_server_port=taken_port, timeout=1)
    assert isinstance(info.value, ConfigurationError) and isinstance(info.value, OSError)
    with pytest.raises(PortUnavailable, match="status server port 99999 .* is not a port: use 0-65535"):
        serve(add, status_server_port=99999, timeout=1)


def test_every_option_of_every_subcommand_has_help():
    parser = build_parser()

    def commands(prefix: str, parser) -> list:  # every (sub)command, nested ones too (runs ls, ...)
        found = []
        for action in parser._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                for name, sub in action.choices.items():
                    found += [(f"{prefix}{name}", sub), *commands(f"{prefix}{name} ", sub)]
        return found

    missing = [
        f"{name} {'/'.join(action.option_strings) or action.dest}"
        for name, sub in commands("", parser)
        for action in sub._actions
        if not action.help or action.help == "==SUPPRESS=="
    ]
    assert missing == []
    assert all(a.help for a in parser._actions if a.option_strings)


# -- logs a user can use -----------------------------------------------------------------------
def test_worker_logs_its_tasks_limit_and_server(tmp_path, server):
    result = run_env(clean_env(tmp_path, SYNC_WORKER_API_URL=server.url), "worker", "sync_worker.demo:add",
                     "sync_worker.demo:flaky", "--limit", "3", "--timeout", "1", timeout=60)
    assert result.returncode == 0, result.stderr
    assert re.search(rf"Starting task worker \S+ \(limit 3, server {re.escape(server.url)}\) for task\(s\): "
                     r"sync_worker\.demo\.add \| sync_worker\.demo\.flaky", result.stderr), result.stderr


def test_worker_logs_json(tmp_path, server):
    result = run_env(clean_env(tmp_path, SYNC_WORKER_API_URL=server.url), "worker", "sync_worker.demo:add",
                     "--limit", "none", "--timeout", "1", "--log-format", "json", timeout=60)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines()]  # every line is one JSON object
    starting = [r for r in records if r["message"].startswith("Starting task worker")]
    assert len(starting) == 1
    assert starting[0]["level"] == "INFO" and starting[0]["logger"] == "sync_worker.worker"
    assert f"(limit none, server {server.url})" in starting[0]["message"]
    assert set(starting[0]) >= {"time", "level", "logger", "message", "process", "thread"}


def test_server_logs_where_its_database_is(tmp_path):
    database = tmp_path / "q.db"
    lines, code = server_log_until(clean_env(tmp_path), ["--port", "0", "--db", str(database)], "are kept in")
    text = "".join(lines)
    assert f"(database {database})" in text
    assert (f"Task runs and parameter/result records (SYNC_WORKER_STORAGE=server) are kept in {database}; "
            "stop the server before copying or deleting it") in text
    assert code == 0


def test_top_level_help_lists_the_exit_codes():
    result = run("--help")
    text = " ".join(result.stdout.split())
    assert "exit codes: 0 done (a worker: stopped with every run finished), 1 a failure at run time" in text
    assert "runs abandoned at the drain timeout" in text and "130 interrupted (a worker: a second Ctrl-C)" in text
