"""``sync-worker runs ...`` and ``sync-worker status`` as a user runs them: real subprocesses of
the command against a real embedded server with a real worker."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from sync_worker.client import Client
from sync_worker.exceptions import TaskRunFailed
from sync_worker.tasks import TaskRunFuture
from tests.operate import queue_tasks as qt
from tests.helpers import wait_for

REPO = Path(__file__).resolve().parents[2]


def cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    full = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "sync_worker", *args], cwd=REPO, env=full, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def runs(api_env, start_worker):
    worker = start_worker(qt.add, qt.boom, limit=2)
    done = [qt.add.delay(i, 10) for i in range(3)]
    failed = qt.boom.delay("it broke")
    waiting = [qt.nobody.delay(i) for i in range(2)]
    assert [f.result(timeout=30) for f in done] == [10, 11, 12]
    with pytest.raises(TaskRunFailed):
        failed.result(timeout=30)
    return {"done": done, "failed": failed, "waiting": waiting, "worker": worker}


def test_ls_table_json_and_filters(api_env, runs):
    out = cli(api_env, "runs", "ls")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["ID", "TASK", "KEY"]
    assert len(lines) == 1 + 6
    assert runs["failed"].task_run_id in out.stdout

    out = cli(api_env, "runs", "ls", "--state", "failed", "--json")
    assert out.returncode == 0, out.stderr
    assert [r["id"] for r in json.loads(out.stdout)] == [runs["failed"].task_run_id]

    out = cli(api_env, "runs", "ls", "--task", "queue.nobody", "--state", "SCHEDULED", "--since", "1h", "--json")
    assert sorted(r["id"] for r in json.loads(out.stdout)) == sorted(f.task_run_id for f in runs["waiting"])

    out = cli(api_env, "runs", "ls", "--limit", "2", "--json")
    assert len(json.loads(out.stdout)) == 2

    out = cli(api_env, "runs", "ls", "--state", "DONE")
    assert out.returncode == 2 and "unknown state 'DONE'" in out.stderr
    out = cli(api_env, "runs", "ls", "--since", "yesterday")
    assert out.returncode == 2 and "invalid duration" in out.stderr


def test_a_signed_duration_is_read_or_named(api_env, runs):
    """``--since -5m`` is "5 minutes ago" (argparse stopped at it with "expected one argument");
    a sign elsewhere is named as the mistake."""
    out = cli(api_env, "runs", "ls", "--task", "queue.nobody", "--since", "-1h", "--json")
    assert out.returncode == 0, out.stderr
    assert sorted(r["id"] for r in json.loads(out.stdout)) == sorted(f.task_run_id for f in runs["waiting"])
    out = cli(api_env, "runs", "purge", "--older-than", "-5m", "-y")
    assert out.returncode == 2 and "a duration has no sign (write 5m)" in out.stderr, out.stderr


def test_show_failed_run_has_parameters_and_traceback(api_env, runs):
    out = cli(api_env, "runs", "show", runs["failed"].task_run_id)
    assert out.returncode == 0, out.stderr
    assert "Failed (FAILED)" in out.stdout
    assert 'parameters:      {"message": "it broke"}' in out.stdout
    assert "ValueError: it broke" in out.stdout and "traceback:" in out.stdout

    out = cli(api_env, "runs", "show", runs["done"][1].task_run_id, "--json")
    shown = json.loads(out.stdout)
    assert shown["result"] == 11
    assert shown["task_run"]["state"]["type"] == "COMPLETED"
    out = cli(api_env, "runs", "show", runs["failed"].task_run_id, "--json")
    assert json.loads(out.stdout)["parameters"] == {"message": "it broke"}


def test_show_unknown_run_is_an_error(api_env, runs):
    out = cli(api_env, "runs", "show", "00000000-0000-0000-0000-000000000000")
    assert out.returncode == 1
    assert "404" in out.stderr and "Task not found" in out.stderr


def test_retry_submits_a_new_run_with_the_same_parameters(api_env, runs):
    out = cli(api_env, "runs", "retry", runs["failed"].task_run_id, "--json")
    assert out.returncode == 0, out.stderr
    new_id = json.loads(out.stdout)["task_run_id"]
    assert new_id != runs["failed"].task_run_id
    with pytest.raises(TaskRunFailed, match="ValueError: it broke"):
        TaskRunFuture(new_id).result(timeout=30)


def test_retry_of_a_completed_run_says_its_parameters_are_gone(api_env, runs):
    store = Path(api_env["SYNC_WORKER_STORAGE"]) / "parameters"
    params_id = runs["done"][2].state.state_details.task_parameters_id
    wait_for(lambda: not (store / params_id).exists(), 10, "the worker deleted the parameters")
    out = cli(api_env, "runs", "retry", runs["done"][2].task_run_id)
    assert out.returncode == 1
    assert "its parameters are gone" in out.stderr and "COMPLETED has its parameters deleted" in out.stderr


def test_retry_of_a_run_not_finished_is_refused_and_creates_nothing(api_env, runs):
    waiting = runs["waiting"][0].task_run_id
    before = len(Client().filter_task_runs({"limit": 100}))
    out = cli(api_env, "runs", "retry", waiting)
    assert out.returncode == 1
    assert f"cannot retry {waiting}: it is SCHEDULED; only a finished run" in out.stderr
    assert f"sync-worker runs cancel {waiting}" in out.stderr
    assert len(Client().filter_task_runs({"limit": 100})) == before


def test_cancel_waiting_runs_and_finished_ones_are_left_alone(api_env, runs):
    ids = [f.task_run_id for f in runs["waiting"]]
    out = cli(api_env, "runs", "cancel", *ids, runs["done"][0].task_run_id)
    assert out.returncode == 0, out.stderr
    for run_id in ids:
        assert f"{run_id}: CANCELLED" in out.stdout
    assert f"{runs['done'][0].task_run_id}: not cancelled, it is already COMPLETED" in out.stdout
    client = Client()
    assert {client.read_task_run(i).state.type.value for i in ids} == {"CANCELLED"}
    out = cli(api_env, "runs", "cancel", "00000000-0000-0000-0000-000000000000", "--json")
    assert out.returncode == 1
    assert json.loads(out.stdout)[0]["status"] == "error"


def test_purge_deletes_finished_runs_of_the_given_states(api_env, runs):
    client = Client()
    out = cli(api_env, "runs", "purge", "--older-than", "1h")
    assert out.returncode == 0 and "deleted 0 finished run(s)" in out.stdout
    out = cli(api_env, "runs", "purge", "--older-than", "0s", "--state", "COMPLETED", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"deleted": 3}
    assert client.count_task_runs() == 3  # the failed run and the two waiting ones
    out = cli(api_env, "runs", "purge", "--older-than", "0", "--state", "SCHEDULED")
    assert out.returncode == 2 and "'SCHEDULED' is not a finished state" in out.stderr  # refused before sending
    assert client.count_task_runs() == 3
    response = requests.post(api_env["SYNC_WORKER_API_URL"] + "/sync_worker/purge",
                             json={"older_than_seconds": 0, "state_types": ["SCHEDULED"]}, timeout=10)
    assert response.status_code == 422 and "Only finished runs can be purged" in response.text
    # a misspelt key ("states") was ignored: the purge deleted every finished run
    response = requests.post(api_env["SYNC_WORKER_API_URL"] + "/sync_worker/purge",
                             json={"older_than_seconds": 0, "states": ["CANCELLED"]}, timeout=10)
    assert response.status_code == 422 and "Extra inputs are not permitted" in response.text
    assert client.count_task_runs() == 3
    # a duration reaching before year 1: one line, nothing sent (it was a 500 from the server)
    out = cli(api_env, "runs", "purge", "--older-than", "99999999999d", "-y")
    assert out.returncode == 2 and "at most 36500d (100 years)" in out.stderr and "Traceback" not in out.stderr
    response = requests.post(api_env["SYNC_WORKER_API_URL"] + "/sync_worker/purge", json={"older_than_seconds": 1e15},
                             timeout=10)
    assert response.status_code == 422 and "older_than_seconds" in response.text
    assert client.count_task_runs() == 3


def test_purge_at_a_terminal_asks_first(api_env, runs):
    """A person at a terminal confirms (a slip such as --older-than 0 deletes every finished
    run); scripts (stdin not a terminal) and -y do not ask."""
    import pty

    def at_terminal(answer: str, *extra: str) -> tuple[int, str]:
        leader, follower = pty.openpty()
        try:
            proc = subprocess.Popen([sys.executable, "-m", "sync_worker", "runs", "purge", "--older-than", "0",
                                     *extra], cwd=REPO, env={**os.environ, **api_env, "PYTHONPATH": str(REPO)},
                                    stdin=follower, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            os.write(leader, answer.encode())
            out, _err = proc.communicate(timeout=60)
            return proc.returncode, out
        finally:
            os.close(leader)
            os.close(follower)

    client = Client()
    code, out = at_terminal("n\n")
    assert code == 1 and "nothing deleted" in out
    assert "Delete every COMPLETED, FAILED, CANCELLED, CRASHED run that ended more than 0 s ago" in out
    assert client.count_task_runs() == 6
    code, out = at_terminal("", "-y")
    assert code == 0 and "Delete every" not in out and "deleted 4 finished run(s)" in out
    assert client.count_task_runs() == 2  # the two waiting runs


def test_status_shows_queues_and_workers(api_env, runs):
    out = cli(api_env, "status")
    assert out.returncode == 0, out.stderr
    table = {line.split()[0]: line.split() for line in out.stdout.splitlines() if line.startswith("queue.")}
    # TASK KEY SCHEDULED RUNNING COMPLETED FAILED CANCELLED OLDEST WORKERS
    assert table["queue.add"][1:6] == ["0", "0", "3", "0", "0"] and table["queue.add"][7] == "1"
    assert table["queue.boom"][4] == "1"
    assert table["queue.nobody"][1] == "2" and table["queue.nobody"][7] == "0"
    assert runs["worker"].client_id in out.stdout
    out = cli(api_env, "status", "--json")
    assert len(json.loads(out.stdout)["workers"]) == 1


def test_commands_say_when_the_server_is_down(api_env, server):
    server.stop()
    out = cli(api_env, "status")
    assert out.returncode == 1
    assert "cannot reach the API" in out.stderr
    # one line, in the same form as every other sync-worker error
    assert out.stderr.startswith("sync-worker status: error: cannot reach the API") and out.stderr.count("\n") == 1


def test_commands_say_in_one_line_when_the_answer_breaks_off_or_never_comes(api_env):
    """An answer cut mid-body, or none at all: a 90-line traceback (ChunkedEncodingError,
    ReadTimeout) where a refused connection got one line."""
    import socket
    import threading

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)

        def cut_answers() -> None:  # each request gets half an answer, then the connection ends
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n[{")
                conn.close()

        threading.Thread(target=cut_answers, daemon=True).start()
        env = {**api_env, "SYNC_WORKER_API_URL": f"http://127.0.0.1:{listener.getsockname()[1]}/api",
               "SYNC_WORKER_REQUEST_TIMEOUT": "1"}
        for command in (("status",), ("runs", "ls")):
            out = cli(env, *command)
            assert out.returncode == 1, out.stderr
            assert out.stderr.startswith(f"sync-worker {' '.join(command)}: error: cannot reach the API"), out.stderr
            assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_help_shows_examples():
    out = cli({}, "runs", "ls", "--help")
    assert out.returncode == 0 and "examples:" in out.stdout and "--since 1h" in out.stdout
    out = cli({}, "status", "--help")
    assert "examples:" in out.stdout


def test_show_and_ls_print_control_characters_as_escapes(api_env, start_worker):
    """A task's message is written by whoever called it: its escape sequences (clear the
    screen, set the window title, hide text) reach the operator's terminal as visible escapes,
    not as commands."""
    start_worker(qt.boom, limit=1)
    hostile = "oops \x1b[2J\x1b]0;owned-title\x07\x1b[8mhidden"
    failed = qt.boom.delay(hostile)
    with pytest.raises(TaskRunFailed):
        failed.result(timeout=30)
    shown = cli(api_env, "runs", "show", failed.task_run_id)
    assert shown.returncode == 0, shown.stderr
    listed = cli(api_env, "runs", "ls", "--state", "FAILED")
    assert listed.returncode == 0, listed.stderr
    for out in (shown.stdout, listed.stdout):
        assert "\x1b" not in out and "\x07" not in out
    assert "oops \\x1b[2J\\x1b]0;owned-title\\x07\\x1b[8mhidden" in shown.stdout
    assert "Traceback (most recent call last):\n" in shown.stdout  # the traceback keeps its lines


def test_output_into_a_closed_pipe_ends_quietly(api_env, runs):
    """``sync-worker runs ls | head -1``: the reader leaves early; the command ends as one ended
    by SIGPIPE (141), without a BrokenPipeError traceback."""
    full = {**os.environ, **api_env, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "sync_worker", "runs", "ls"], cwd=REPO, env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the command has written anything: its first write finds no reader
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 141 and b"Traceback" not in err and b"BrokenPipe" not in err, err


@pytest.mark.parametrize("args,message", [
    (["runs", "ls", "--limit", "x"], "argument --limit: 'x' is not a whole number"),
    (["runs", "purge", "--older-than", "1d", "--state", "RUNNING", "--yes"],
     "argument --state: 'RUNNING' is not a finished state: purge deletes runs in COMPLETED, FAILED, CANCELLED, CRASHED"),
])
def test_option_mistakes_are_one_line_and_exit_2(args, message):
    out = cli({"SYNC_WORKER_API_URL": "http://127.0.0.1:9/api"}, *args)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
