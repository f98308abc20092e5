"""Workers as real processes (``python -m sync_worker worker ...``): SIGTERM drains,
two workers share a key, the CLI's exit codes."""
from __future__ import annotations

import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from sync_worker.schemas import StateType
from tests.worker import worker_tasks as wt
from tests.helpers import wait_for


def worker_command(*specs: str, limit: int = 10, extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "sync_worker", "worker", *specs, "--limit", str(limit), *extra]


def lines(path: Path, prefix: str) -> list[tuple[int, int]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        kind, i, pid = line.split()
        if kind == prefix:
            out.append((int(i), int(pid)))
    return out


def test_sigterm_lets_in_flight_runs_finish_and_exits_0(api_env, spawn, tmp_path, start_worker):
    marks = tmp_path / "marks"
    proc = spawn(worker_command("tests.worker.worker_tasks:mark", limit=3), api_env)
    futures = [wt.mark.delay(i, str(marks), 2.0) for i in range(6)]
    wait_for(lambda: len(lines(marks, "start")) == 3, message="3 runs in flight")
    time.sleep(0.2)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=40)
    assert proc.returncode == 0, err
    assert time.monotonic() - sent < 10
    started = {i for i, _ in lines(marks, "start")}
    ended = {i for i, _ in lines(marks, "end")}
    assert len(started) == 3 and started == ended  # in-flight runs finished, nothing new started
    by_index = dict(enumerate(futures))
    for i in started:
        assert by_index[i].wait(5).type is StateType.COMPLETED
    assert "SIGTERM received, initiating graceful shutdown" in err
    # The runs it did not start were not lost: another worker completes them.
    start_worker(wt.mark, limit=3)
    assert sorted(f.result(timeout=60) for f in futures) == list(range(6))


def test_two_worker_processes_share_one_key_each_run_once(api_env, spawn, tmp_path):
    marks = tmp_path / "marks"
    procs = [spawn(worker_command("tests.worker.worker_tasks:mark", limit=2), api_env) for _ in range(2)]
    futures = [wt.mark.delay(i, str(marks), 0.05) for i in range(60)]
    assert [f.result(timeout=90) for f in futures] == list(range(60))
    starts = lines(marks, "start")
    assert Counter(i for i, _ in starts) == Counter(range(60))  # each run executed exactly once
    pids = Counter(pid for _, pid in starts)
    assert set(pids) == {p.pid for p in procs}  # both workers took a share
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        assert proc.returncode == 0


def test_cli_worker_with_timeout_exits_0_and_bad_spec_exits_2(api_env, spawn):
    proc = spawn(worker_command("tests.worker.worker_tasks:add", extra=("--timeout", "1")), api_env)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Task worker timed out after 1.0 seconds" in err
    bad = spawn(worker_command("tests.worker.worker_tasks:plain_function"), api_env)
    _, err = bad.communicate(timeout=30)
    assert bad.returncode == 2
    assert "is a function, not a task" in err


def test_sigterm_with_runs_past_the_drain_timeout_exits_1(api_env, spawn, tmp_path):
    marks = tmp_path / "marks"
    env = {**api_env, "SYNC_WORKER_DRAIN_TIMEOUT": "1"}
    proc = spawn(worker_command("tests.worker.worker_tasks:mark", limit=2), env)
    future = wt.mark.delay(0, str(marks), 30.0)
    wait_for(lambda: len(lines(marks, "start")) == 1, message="the run in flight")
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1  # runs abandoned: not a clean exit
    assert time.monotonic() - sent < 10  # bounded by the drain timeout, not the 30 s run
    assert "Drain timeout (1s, SYNC_WORKER_DRAIN_TIMEOUT) passed with 1 run(s) still running, abandoned: " \
        + future.task_run_id in err


def test_sigterm_handled_while_start_holds_a_lock_drains_and_exits_0(api_env, spawn):
    """The SIGTERM lands while start(), waiting in the main thread, holds the lock of the
    Event it waits on (see tests/signal_window.py): the handler that drained on that Event
    deadlocked there; the worker now only notes the signal in the handler."""
    window = Path(__file__).resolve().parent.parent / "signal_window.py"
    proc = spawn([sys.executable, str(window), "handler", "sync_worker", "worker", "tests.worker.worker_tasks:add"],
                 api_env)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "SIGTERM received, initiating graceful shutdown" in err
    assert "stopped." in err


def test_handle_sigterm_called_while_its_caller_holds_the_done_lock_exits_0(api_env, start_worker):
    """handle_sigterm installed by the application for a worker started with block=False,
    the signal landing while the main thread holds the lock of the Event that join() waits
    on: it drains without taking that lock, then raises SystemExit(0)."""
    worker = start_worker(wt.add)
    outcome: list[BaseException] = []

    def interrupted_join() -> None:
        with worker._done._cond:  # where Event.wait holds it between two of its bytecodes
            try:
                worker.handle_sigterm(signal.SIGTERM, None)
            except BaseException as exc:  # noqa: BLE001 - what the handler raised is the result
                outcome.append(exc)

    thread = threading.Thread(target=interrupted_join, daemon=True)
    thread.start()
    thread.join(30)
    deadlocked = thread.is_alive()
    if deadlocked:  # a plain Lock: any thread may release it, so that the teardown ends
        worker._done._cond.release()
    assert not deadlocked, "handle_sigterm deadlocked on the lock its caller held"
    assert len(outcome) == 1 and isinstance(outcome[0], SystemExit) and outcome[0].code == 0, outcome
    assert worker.join(10)


def test_ctrl_c_stops_taking_runs_and_finishes_in_flight_ones(api_env, spawn, tmp_path):
    marks = tmp_path / "marks"
    proc = spawn(worker_command("tests.worker.worker_tasks:mark", limit=1), api_env)
    first = wt.mark.delay(0, str(marks), 1.0)
    wait_for(lambda: len(lines(marks, "start")) == 1, message="the run in flight")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Task worker interrupted, stopping" in err
    assert first.wait(5).type is StateType.COMPLETED


PRELOAD_APP = '''
from sync_worker import TaskWorker
from jobs import ALL_TASKS
from app import app  # noqa: F401

# The anti-pattern: a worker started at import time, in the gunicorn master (--preload).
worker = TaskWorker(*ALL_TASKS, limit=1).start(block=False)
'''


def test_gunicorn_preload_with_a_worker_started_at_import_warns_in_each_child(api_env, spawn, tmp_path):
    (tmp_path / "preload_app.py").write_text(PRELOAD_APP)
    flask_app = Path(__file__).resolve().parents[2] / "examples" / "flask_app"
    env = {**api_env, "PYTHONPATH": f"{flask_app}"}
    proc = spawn([sys.executable, "-m", "gunicorn", "--preload", "-w", "2", "-b", "127.0.0.1:0",
                  "--chdir", str(tmp_path), "preload_app:app"], env, cwd=tmp_path)
    warnings: list[str] = []

    def two_warnings() -> bool:
        line = proc.stderr.readline()
        if "NOT running here" in line:
            warnings.append(line)
        return len(warnings) == 2

    wait_for(two_warnings, message="a fork warning from each gunicorn worker")
    assert all("post_fork" in w for w in warnings)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


HTTP_STACK = ["requests", "urllib3", "charset_normalizer"]

SUBMITTER = """
import sys
from tests.worker import worker_tasks as wt
print(wt.loaded_modules.delay(sys.argv[1:]).result(timeout=60))
print([name for name in sys.argv[1:] if name in sys.modules])
"""


def test_worker_and_submitter_on_the_sockets_never_load_the_http_stack(api_env, spawn):
    """requests with urllib3 and charset_normalizer is ~9 MB of a process's memory: a worker
    and a submitter that only use the embedded server's sockets never import it."""
    worker = spawn(worker_command("tests.worker.worker_tasks:loaded_modules", limit=2), api_env)
    submitter = spawn([sys.executable, "-c", SUBMITTER, *HTTP_STACK], api_env)
    out, err = submitter.communicate(timeout=60)
    assert submitter.returncode == 0, err
    assert out.splitlines() == ["[]", "[]"]  # neither the worker (the result) nor the submitter
    assert worker.poll() is None
