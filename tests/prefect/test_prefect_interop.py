"""Prefect's own code and sync_worker on one Prefect 3.8.8 server (issue 5, parts 2 and 3).

- A Prefect ``@task`` submitted with ``.delay()`` by Prefect's client is executed by a
  sync_worker worker; Prefect's ``future.result()`` gets the value. Prefect writes the
  parameters pickled, so the worker needs the explicit pickle opt-in.
- A sync_worker ``.delay()`` is executed by Prefect's own ``prefect.task_worker.serve``.

Prefect's caller and worker run in subprocesses (their own event loop and settings) with
the server's PREFECT_HOME, so every side shares Prefect's default storage directory, which
sync_worker uses through SYNC_WORKER_STORAGE. The two sides agree on the task key the way
the README describes: sync_worker takes Prefect's key (``task_key=prefect_task.task_key``).
"""
from __future__ import annotations

import textwrap
import time

from prefect_support import (
    TRACE_EVENT_SUBSCRIPTION,
    TRACE_TASK_RUN_READS,
    read_run,
    wait_for_run,
)

PREFECT_TASKS = '''
from prefect import task

@task
def add_one(x: int) -> int:
    return x + 1
'''





def add_one(x: int) -> int:
    """sync_worker's side of Prefect's ``add_one``: same signature, executed by our worker."""
    return x + 1


def _prefect_caller(python_script, tmp_path, server, *, wait: bool, result_timeout: float = 60, **env: str):
    (tmp_path / "ptasks.py").write_text(PREFECT_TASKS)
    return python_script(
        TRACE_TASK_RUN_READS + TRACE_EVENT_SUBSCRIPTION + textwrap.dedent(f"""
        import json, time
        from ptasks import add_one
        future = add_one.delay(x=1)
        print(json.dumps({{"task_key": add_one.task_key, "run": str(future.task_run_id)}}), flush=True)
        if {wait!r}:
            started = time.monotonic()
            try:
                value = future.result(timeout={result_timeout})
                print(json.dumps({{"value": value, "waited": time.monotonic() - started}}), flush=True)
            except Exception as exc:
                print(json.dumps({{"error": repr(exc), "waited": time.monotonic() - started}}), flush=True)
        """),
        server.client_env(**env),
        name="caller.py",
    ).start()


def _prefect_worker(python_script, tmp_path, server):
    (tmp_path / "ptasks.py").write_text(PREFECT_TASKS)
    return python_script(
        """
        import json
        from prefect.task_worker import serve
        from ptasks import add_one
        print(json.dumps({"task_key": add_one.task_key}), flush=True)
        serve(add_one)
        """,
        server.client_env(),
        name="pworker.py",
    ).start()


# ----------------------------------------------------------------------------- Prefect caller -> sync_worker


def test_prefect_delay_is_executed_by_a_sync_worker_with_the_pickle_opt_in(
    prefect_server, tmp_path, python_script, sync_worker_env, start_worker
):
    from sync_worker import TaskRunFuture, task

    sync_worker_env(prefect_server, SYNC_WORKER_ALLOW_PICKLE="true")
    caller = _prefect_caller(python_script, tmp_path, prefect_server, wait=False)
    submitted = caller.expect("run", timeout=60)
    assert caller.wait(timeout=60).returncode == 0

    start_worker(task(add_one, task_key=submitted["task_key"]))
    run = wait_for_run(prefect_server, submitted["run"], {"COMPLETED", "FAILED"}, timeout=60)
    assert run is not None and run["state_type"] == "COMPLETED", run and run["state"]
    assert TaskRunFuture(submitted["run"]).result(timeout=10) == 2


def test_prefect_future_result_wakes_up_with_the_value_computed_by_sync_worker(
    prefect_server, tmp_path, python_script, sync_worker_env, start_worker
):
    from sync_worker import task

    sync_worker_env(prefect_server, SYNC_WORKER_ALLOW_PICKLE="true")
    caller = _prefect_caller(python_script, tmp_path, prefect_server, wait=True)
    submitted = caller.expect("run", timeout=60)
    # result() has read the run once (still SCHEDULED): from now on only an event wakes it.
    # Its event subscription comes up in the background (see the next test for that race).
    read = caller.expect("read", timeout=60, read=submitted["run"])
    assert read["state"] == "SCHEDULED"
    caller.expect("subscribed", timeout=60)
    start_worker(task(add_one, task_key=submitted["task_key"]))

    outcome = caller.expect("waited", timeout=90)
    assert outcome.get("value") == 2, outcome
    # Prefect's result(timeout=60) also reads the API once when its timeout expires: a
    # caller that was never woken would still get the value, but only after 60 s. Woken, it
    # waits for a pickup and three REST calls (~1 s; far more on a loaded 2-core CI box).
    assert outcome["waited"] < 40, f"Prefect's caller was not woken up: it waited {outcome['waited']:.1f}s"
    assert caller.wait(timeout=30).returncode == 0


def test_prefect_caller_wakes_even_if_its_event_subscription_comes_up_late(
    prefect_lazy_events_server, tmp_path, python_script, sync_worker_env, start_worker
):
    """The run completes after the caller's REST read but before its event subscription is up
    (delayed 5 s on purpose); the server's event persister flushes only every 120 s here."""
    import threading

    from sync_worker import task

    server = prefect_lazy_events_server
    sync_worker_env(server, SYNC_WORKER_ALLOW_PICKLE="true")
    caller = _prefect_caller(
        python_script, tmp_path, server, wait=True, result_timeout=30, SLOW_EVENT_SUBSCRIPTION_SECONDS="5"
    )
    submitted = caller.expect("run", timeout=60)
    release = threading.Event()

    def gated_add_one(x: int) -> int:
        assert release.wait(60)
        return x + 1

    start_worker(task(gated_add_one, task_key=submitted["task_key"]))
    read = caller.expect("read", timeout=60, read=submitted["run"])
    assert read["state"] in ("SCHEDULED", "PENDING", "RUNNING")
    release.set()
    assert wait_for_run(server, submitted["run"], {"COMPLETED", "FAILED"}, timeout=60)["state_type"] == "COMPLETED"
    caller.expect("subscribed", timeout=60)
    outcome = caller.expect("waited", timeout=90)
    assert outcome.get("value") == 2, outcome
    assert outcome["waited"] < 20, f"Prefect's caller missed the event: it waited {outcome['waited']:.1f}s (timeout 30)"


def test_prefect_pickled_parameters_without_the_opt_in_fail_the_run_saying_how_to_opt_in(
    prefect_server, tmp_path, python_script, sync_worker_env, start_worker
):
    from sync_worker import task

    sync_worker_env(prefect_server)  # no SYNC_WORKER_ALLOW_PICKLE
    caller = _prefect_caller(python_script, tmp_path, prefect_server, wait=False)
    submitted = caller.expect("run", timeout=60)
    assert caller.wait(timeout=60).returncode == 0

    calls: list[int] = []

    def add_one_tracked(x: int) -> int:
        calls.append(x)
        return x + 1

    start_worker(task(add_one_tracked, task_key=submitted["task_key"]))
    run = wait_for_run(prefect_server, submitted["run"], {"COMPLETED", "FAILED"}, timeout=60)
    assert run is not None and run["state_type"] == "FAILED"
    assert "SYNC_WORKER_ALLOW_PICKLE=true" in run["state"]["message"]
    assert "pickle" in run["state"]["message"]
    assert calls == []


# ----------------------------------------------------------------------------- sync_worker -> Prefect's worker


def test_sync_worker_delay_is_executed_by_prefect_serve(prefect_server, tmp_path, python_script, sync_worker_env):
    from sync_worker import task

    sync_worker_env(prefect_server)
    worker = _prefect_worker(python_script, tmp_path, prefect_server)
    key = worker.expect("task_key", timeout=60)["task_key"]

    future = task(add_one, task_key=key).delay(41)
    run = wait_for_run(prefect_server, future.task_run_id, {"COMPLETED", "FAILED"}, timeout=60)
    worker.stop()
    assert run is not None, f"Prefect's worker deleted the run: it could not read its parameters\n{worker.snapshot()}"
    assert run["state_type"] == "COMPLETED", worker.snapshot()
    assert read_run(prefect_server, future.task_run_id)["state"]["data"]["storage_key"]


def test_sync_worker_future_reads_the_result_of_prefects_worker(
    prefect_server, tmp_path, python_script, sync_worker_env
):
    from sync_worker import task

    sync_worker_env(prefect_server, SYNC_WORKER_ALLOW_PICKLE="true")  # Prefect's worker pickles results
    worker = _prefect_worker(python_script, tmp_path, prefect_server)
    key = worker.expect("task_key", timeout=60)["task_key"]
    try:
        assert task(add_one, task_key=key).delay(41).result(timeout=60) == 42
    finally:
        worker.stop()


def test_prefect_client_reads_values_none_and_exceptions_of_runs_sync_worker_executed(
    prefect_server, tmp_path, python_script, sync_worker_env, start_worker
):
    """Once the runs are final, Prefect's future.result() reads our JSON result records: the
    value, None, and for a failure the task's own exception type and message."""
    from sync_worker import task

    (tmp_path / "ptasks.py").write_text(
        "from prefect import task\n\n@task\ndef op(kind: str):\n    raise NotImplementedError('executed by sync_worker')\n"
    )
    submitter = python_script(
        """
        import json
        from ptasks import op
        runs = {kind: str(op.delay(kind).task_run_id) for kind in ("value", "none", "error")}
        print(json.dumps({"task_key": op.task_key, "runs": runs}), flush=True)
        """,
        prefect_server.client_env(),
        name="submit.py",
    ).start()
    submitted = submitter.expect("runs", timeout=60)
    assert submitter.wait(timeout=60).returncode == 0

    def op(kind: str):
        if kind == "error":
            raise ValueError("bad kind")
        return {"a": [1, 2]} if kind == "value" else None

    sync_worker_env(prefect_server, SYNC_WORKER_ALLOW_PICKLE="true")
    start_worker(task(op, task_key=submitted["task_key"]))
    for run_id in submitted["runs"].values():
        wait_for_run(prefect_server, run_id, {"COMPLETED", "FAILED"}, timeout=60)

    reader = python_script(
        f"""
        import json, uuid
        from prefect.futures import PrefectDistributedFuture
        for kind, run_id in {submitted['runs']!r}.items():
            future = PrefectDistributedFuture(task_run_id=uuid.UUID(run_id))
            try:
                print(json.dumps({{"kind": kind, "value": future.result(timeout=30)}}), flush=True)
            except Exception as exc:
                print(json.dumps({{"kind": kind, "error": type(exc).__name__, "message": str(exc)}}), flush=True)
        """,
        prefect_server.client_env(),
        name="reader.py",
    ).start()
    result = reader.wait(timeout=120)
    assert result.returncode == 0, result.describe()
    seen = {line["kind"]: line for line in result.json_lines()}
    assert seen["value"] == {"kind": "value", "value": {"a": [1, 2]}}
    assert seen["none"] == {"kind": "none", "value": None}
    assert (seen["error"].get("error"), seen["error"].get("message")) == ("ValueError", "bad kind"), seen["error"]


def test_prefect_caller_wakes_with_an_error_when_sync_worker_times_the_run_out(
    prefect_server, tmp_path, python_script, sync_worker_env, start_worker
):
    """A FAILED state named "TimedOut" still wakes Prefect's waiter (it listens for the state TYPE's event)."""
    from sync_worker import task

    sync_worker_env(prefect_server, SYNC_WORKER_ALLOW_PICKLE="true")
    caller = _prefect_caller(python_script, tmp_path, prefect_server, wait=True)
    submitted = caller.expect("run", timeout=60)
    caller.expect("read", timeout=60, read=submitted["run"])
    caller.expect("subscribed", timeout=60)

    def hangs(x: int) -> int:
        for _ in range(100):  # interruptible between bytecodes; gives up after 10 s anyway
            time.sleep(0.1)
        return x

    start_worker(task(hangs, task_key=submitted["task_key"], timeout_seconds=1))
    outcome = caller.expect("waited", timeout=90)
    assert "error" in outcome, outcome
    assert "timeout" in outcome["error"].lower(), outcome
    assert outcome["waited"] < 40, f"Prefect's caller was not woken up: it waited {outcome['waited']:.1f}s"
    run = read_run(prefect_server, submitted["run"])
    assert (run["state_type"], run["state_name"]) == ("FAILED", "TimedOut")
