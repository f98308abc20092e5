"""Defects found walking through the README as a new user: each command's failure is one
line (or one JSON record) naming the fix, with the exit code the CLI documents (2 for a
mistake in an option or a setting), and what the README says matches what the code does."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import helpers
from tests.helpers import run_env

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
CI_RUN = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()

#: runs ``python -m sync_worker`` with the [server] extra's modules unimportable, as after
#: ``pip install sync_worker`` without ``[server]`` (None in sys.modules makes import fail)
WITHOUT_SERVER_EXTRA = (
    "import runpy, sys\n"
    "for name in ('werkzeug', 'simple_websocket'):\n"
    "    sys.modules[name] = None\n"
    "sys.argv = ['sync-worker'] + sys.argv[1:]\n"
    "runpy.run_module('sync_worker', run_name='__main__', alter_sys=True)\n"
)


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """:func:`tests.helpers.clean_env` with a private home too."""
    return helpers.clean_env(tmp_path, HOME=str(tmp_path), **extra)


# -- r1: no [server] extra ---------------------------------------------------------------------
@pytest.mark.parametrize("args", [["server", "--port", "0"], ["demo"]])
def test_without_the_server_extra_is_one_line_naming_the_install(tmp_path, args):
    if args[0] == "server":
        args = [*args, "--db", str(tmp_path / "s.db")]
    result = subprocess.run([sys.executable, "-c", WITHOUT_SERVER_EXTRA, *args], capture_output=True,
                            text=True, timeout=60, env=clean_env(tmp_path))
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"sync-worker {args[0]}: error: sync-worker {args[0]} needs the [server] extra (werkzeug is not "
        "installed): pip install 'sync_worker[server]'"]
    assert not (tmp_path / "s.db").exists()


# -- r8: a wrong API path ----------------------------------------------------------------------
@pytest.mark.parametrize("log_level", ["INFO", "ERROR"])
def test_api_url_with_a_wrong_path_is_a_setting_mistake(tmp_path, server, log_level):
    url = f"{server.url}/v1"
    result = run_env(clean_env(tmp_path, SYNC_WORKER_API_URL=url), "worker", "sync_worker.demo:add",
                         "--timeout", "20", "--log-level", log_level)
    assert result.returncode == 2, result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"sync-worker worker: error: SYNC_WORKER_API_URL is {url}, which the server "
                           "answers 404 for (the API URL should end in /api"), last
    assert "HTTP 404" in last
    assert result.stderr.count("HTTP 404") == 1  # the error once, not also as a log line


# -- r4: a fatal setting error is printed once ---------------------------------------------------
def test_api_url_without_api_is_printed_once(tmp_path, server):
    base = server.url[: -len("/api")]
    result = run_env(clean_env(tmp_path, SYNC_WORKER_API_URL=base), "worker", "sync_worker.demo:add",
                         "--timeout", "20", "--log-level", "WARNING")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("lacks /api") == 1, result.stderr
    assert result.stderr.splitlines()[-1].startswith(f"sync-worker worker: error: SYNC_WORKER_API_URL is {base}")


# -- r6: --log-format json makes the final error a JSON record too --------------------------------
@pytest.mark.parametrize("args", [
    ["worker", "nosuchmodule:task"],
    ["worker", "sync_worker.demo:add", "--timeout", "20"],  # a run-time setting mistake (API URL)
])
def test_json_log_format_makes_the_error_line_a_record(tmp_path, server, args):
    env = clean_env(tmp_path, SYNC_WORKER_API_URL=server.url[: -len("/api")])
    result = run_env(env, *args, "--log-format", "json")
    assert result.returncode == 2, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    assert records[-1]["level"] == "ERROR"
    assert records[-1]["message"].startswith("sync-worker worker: error: ")
    # and in text format it stays the plain line the README shows
    text = run_env(env, *args)
    assert text.returncode == 2
    assert text.stderr.splitlines()[-1] == records[-1]["message"]


# -- refused credentials: the command's one error line (exit 1), a JSON record with --log-format json
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_refused_credentials_are_the_one_error_line_of_the_command(tmp_path, server_factory, log_format):
    secured = server_factory(auth_string="admin:right")
    env = clean_env(tmp_path, SYNC_WORKER_API_URL=secured.url, SYNC_WORKER_API_AUTH_STRING="admin:wrong")
    result = run_env(env, "worker", "sync_worker.demo:add", "--timeout", "20", "--log-format", log_format)
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.stderr.count("SYNC_WORKER_API_AUTH_STRING") == 1, result.stderr  # once, not also logged
    if log_format == "json":
        records = [json.loads(line) for line in lines]  # every line a record, the last one included
        last = records[-1]["message"]
        assert records[-1]["level"] == "ERROR"
    else:
        last = lines[-1]
    assert last.startswith("sync-worker worker: error: "), last
    assert "SYNC_WORKER_API_AUTH_STRING" in last


# -- r3: storage prune's setting/usage mistakes exit 2 --------------------------------------------
def test_storage_prune_with_a_missing_dir_is_a_usage_mistake(tmp_path):
    missing = tmp_path / "no-such-dir"
    result = run_env(clean_env(tmp_path), "storage", "prune", "--older-than", "7d", "--dir", str(missing))
    assert result.returncode == 2
    assert result.stderr == f"sync-worker storage prune: error: {missing} (--dir) is not a directory\n"


def test_storage_prune_of_server_storage_is_a_usage_mistake(tmp_path):
    result = run_env(clean_env(tmp_path, SYNC_WORKER_STORAGE="server"), "storage", "prune",
                         "--older-than", "7d")
    assert result.returncode == 2
    assert result.stderr.startswith("sync-worker storage prune: error: SYNC_WORKER_STORAGE=server: ")
    assert len(result.stderr.splitlines()) == 1


# -- r5: the client metrics server says where it listens -------------------------------------------
def test_client_metrics_server_logs_its_url(tmp_path, server):
    pytest.importorskip("prometheus_client")
    env = clean_env(tmp_path, SYNC_WORKER_API_URL=server.url, SYNC_WORKER_CLIENT_METRICS_ENABLED="true",
                    SYNC_WORKER_CLIENT_METRICS_PORT="0")
    result = run_env(env, "worker", "sync_worker.demo:add", "--timeout", "2")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "Client metrics server on" in line]
    assert len(lines) == 1, result.stderr
    assert " INFO " in lines[0]
    match = re.search(r"http://127\.0\.0\.1:(\d+)/metrics$", lines[0])
    assert match and int(match.group(1)) > 0, lines[0]


# -- r7 / r2: README sentences -------------------------------------------------------------------
def test_readme_try_it_names_every_preparation_of_ci_run():
    assert "chromium chromium-driver" in CI_RUN and "SYNC_WORKER_REQUIRE_BROWSER=1" in CI_RUN
    try_it = README[README.index("## Try it"):README.index("## Quickstart")]
    assert "Chromium" in try_it and "SYNC_WORKER_REQUIRE_BROWSER=1" in try_it
    assert "plus those two" not in try_it


def test_readme_says_a_running_run_overruns_the_drain_timeout():
    stopping = README[README.index("* **Stopping**"):]
    first_sentence = " ".join(stopping[:stopping.index("The worker commands then")].split())
    assert "still executing at that deadline" in first_sentence and "about 6 s after it" in first_sentence
    row = next(line for line in README.splitlines() if line.startswith("| `SYNC_WORKER_DRAIN_TIMEOUT`"))
    assert "about 6 s after it" in row


# -- w1: an error line of `runs <sub>` / `storage <sub>` names the subcommand the user ran ----------
UNKNOWN_RUN = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"


@pytest.mark.parametrize("args,reason", [
    (["runs", "ls"], "POST /task_runs/filter failed with 404"),
    (["runs", "show", UNKNOWN_RUN], f"GET /task_runs/{UNKNOWN_RUN} failed with 404"),
    (["runs", "retry", UNKNOWN_RUN], f"GET /task_runs/{UNKNOWN_RUN} failed with 404"),
    (["runs", "purge", "--older-than", "7d", "-y"], "POST /sync_worker/purge failed with 404"),
    (["status"], "GET /sync_worker/stats failed with 404"),
])
def test_runs_subcommand_errors_name_the_subcommand(tmp_path, server, args, reason):
    result = run_env(clean_env(tmp_path), *args, "--api-url", f"{server.url}/nope")
    assert result.returncode == 1, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    prog = "sync-worker " + " ".join(args[:2] if args[0] == "runs" else args[:1])
    assert result.stderr.startswith(f"{prog}: error: {reason}"), result.stderr


def test_runs_subcommand_cannot_reach_the_api_names_the_subcommand(tmp_path):
    import socket

    with socket.socket() as unused:  # a port nothing listens on
        unused.bind(("127.0.0.1", 0))
        closed = unused.getsockname()[1]
    result = run_env(clean_env(tmp_path), "runs", "ls", "--api-url", f"http://127.0.0.1:{closed}/api")
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("sync-worker runs ls: error: cannot reach the API"), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_runs_cancel_error_lines_name_the_subcommand(tmp_path, server):
    result = run_env(clean_env(tmp_path), "runs", "cancel", UNKNOWN_RUN, "--api-url", server.url)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        f"sync-worker runs cancel: error: {UNKNOWN_RUN}: POST /sync_worker/task_runs/{UNKNOWN_RUN}/cancel "
        "failed with 404: Task not found"]


# -- w2: a misspelled option: one line naming the subcommand, its --help, and the option meant -----
@pytest.mark.parametrize("args,line", [
    (["worker", "sync_worker.demo:add", "--limt", "3"],
     "sync-worker worker: error: unrecognized arguments: --limt 3; did you mean --limit? "
     "(see sync-worker worker --help)"),
    (["worker", "sync_worker.demo:add", "--staus-port=8081"],
     "sync-worker worker: error: unrecognized arguments: --staus-port=8081; did you mean --status-port? "
     "(see sync-worker worker --help)"),
    (["runs", "ls", "--sate", "FAILED"],
     "sync-worker runs ls: error: unrecognized arguments: --sate FAILED; did you mean --state? "
     "(see sync-worker runs ls --help)"),
    (["storage", "prune", "--older-than", "7d", "--include-params"],
     "sync-worker storage prune: error: unrecognized arguments: --include-params; did you mean "
     "--include-parameters? (see sync-worker storage prune --help)"),
    (["server", "--prot", "4300"],
     "sync-worker server: error: unrecognized arguments: --prot 4300; did you mean --port? "
     "(see sync-worker server --help)"),
    (["demo", "--bogus"],
     "sync-worker demo: error: unrecognized arguments: --bogus (see sync-worker demo --help)"),
    (["runs", "ls", "extra"],
     "sync-worker runs ls: error: unrecognized arguments: extra (see sync-worker runs ls --help)"),
])
def test_misspelled_option_is_one_line_of_the_subcommand(tmp_path, args, line):
    result = run_env(clean_env(tmp_path), *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [line]
    assert result.stdout == ""


# -- w3: demo --limit takes what worker --limit takes ---------------------------------------------
def test_demo_accepts_limit_none_as_the_worker_does(tmp_path):
    for command in ("worker", "demo"):
        text = " ".join(run_env(clean_env(tmp_path), command, "--help").stdout.split())
        assert "or 'none' for no limit" in text, (command, text)
    result = run_env(clean_env(tmp_path), "demo", "--runs", "1", "--limit", "none", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "limit none" in result.stdout
    assert "worker stopped (exit code 0)" in result.stdout
    refused = run_env(clean_env(tmp_path), "demo", "--limit", "0")
    assert refused.returncode == 2
    assert refused.stderr == ("sync-worker demo: error: argument --limit: '0': must be >= 1 (use --limit none "
                              "for no limit) (see sync-worker demo --help)\n")


# -- w4: the retention default reads as the README writes it ---------------------------------------
def test_server_retention_default_is_printed_as_the_readme_writes_it(tmp_path):
    assert "`sync-worker server --retention 7d` (the default;" in README
    help_text = " ".join(run_env(clean_env(tmp_path), "server", "--help").stdout.split())
    assert "(default 7d)" in help_text
    lines, code = helpers.server_log_until(clean_env(tmp_path), ["--port", "0", "--db", str(tmp_path / "q.db")],
                                           "retention:")
    assert code == 0
    logged = next(text for text in lines if "retention:" in text)
    assert "finished runs are deleted 7d after they end" in logged, logged


def test_format_duration_writes_days_not_weeks():
    from sync_worker.durations import format_duration, parse_duration

    assert [format_duration(s) for s in (604800, 1209600, 86400, 5400, 3600, 90, 0.5)] == [
        "7d", "14d", "1d", "90m", "1h", "90s", "0.5s"]
    for text in ("7d", "2w", "12h", "90s"):  # what it writes reads back as the same duration
        assert parse_duration(format_duration(parse_duration(text))) == parse_duration(text)
