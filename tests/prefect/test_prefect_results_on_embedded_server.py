"""Issue 12 part 3: a Prefect caller reads what a sync_worker worker computed, on the
embedded server.

Prefect 3.8.8's own ``.delay()`` (unpatched, in a subprocess) creates the run on
``sync-worker server``; a sync_worker worker executes it; Prefect's ``future.result()``
must return the value, and a failing task must raise its exception in the Prefect
caller. The run carries no ``sync-worker.results=inline`` label (Prefect's ``.delay()``
does not set it), so the worker writes records with an absolute ``storage_key`` in the
shared store instead of carrying the result inline (which Prefect would hand back as a
dict).
"""
from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.prefect.test_prefect_on_embedded_server import (
    REPO,
    EmbeddedServer,
    _caller,
    _snapshot,
    start_embedded_server,
)

pytestmark = pytest.mark.prefect


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    server = start_embedded_server(tmp_path_factory.mktemp("embedded-results"))
    yield server
    server.stop()


def add_one(x: int) -> int:
    """sync_worker's side of Prefect's ``add_one``: same signature, executed by our worker."""
    return x + 1


def boom(x: int) -> int:
    raise ValueError(f"boom-{x}")


CALLER = '''
    value = add_one.delay(x=1)
    failing = boom.delay(x=42)
    emit(keys=[add_one.task_key, boom.task_key], runs=[str(value.task_run_id), str(failing.task_run_id)])
    started = time.monotonic()
    emit(value=value.result(timeout=60), seconds=time.monotonic() - started)
    try:
        failing.result(timeout=60)
        emit(raised=None)
    except Exception as exc:
        emit(raised=repr(exc), type=type(exc).__name__)
    '''


def _check(caller, server: EmbeddedServer, *others) -> dict:
    result = caller.wait(timeout=150)
    assert result.returncode == 0, _snapshot(server, caller, *others)
    lines = result.json_lines()
    submitted = lines[0]
    assert lines[1]["value"] == 2, lines
    assert lines[2]["type"] == "ValueError" and lines[2]["raised"] == "ValueError('boom-42')", lines
    value_run, failed_run = (server.read(run_id) for run_id in submitted["runs"])
    assert value_run["state_type"] == "COMPLETED" and failed_run["state_type"] == "FAILED"
    for run in (value_run, failed_run):
        key = run["state"]["data"]["storage_key"]  # a record, named by its absolute path
        assert os.path.isabs(key) and Path(key).is_file() and Path(key).parent == server.storage_path, run["state"]
        assert "result" not in run["state"]["data"]
    return lines[1]


def test_prefect_delay_run_by_a_sync_worker_worker_gives_prefects_result_the_value_and_the_exception(
    embedded, python_script, sync_worker_env, start_worker
):
    from sync_worker import task

    sync_worker_env(embedded, SYNC_WORKER_ALLOW_PICKLE="true")  # Prefect pickles the parameters
    caller = _caller(python_script, embedded, CALLER)
    submitted = caller.expect("keys", timeout=90)
    start_worker(task(add_one, task_key=submitted["keys"][0]), task(boom, task_key=submitted["keys"][1]))
    timed = _check(caller, embedded)
    print("Prefect result() after our worker:", round(timed["seconds"], 3), "s")  # shown with -s


WORKER_TASKS = '''
import os

from sync_worker import task


def add_one(x: int) -> int:
    return x + 1


def boom(x: int) -> int:
    raise ValueError(f"boom-{x}")


add_one_task = task(add_one, task_key=os.environ["ADD_ONE_KEY"])
boom_task = task(boom, task_key=os.environ["BOOM_KEY"])
'''


def test_prefect_delay_run_by_the_sync_worker_worker_command(embedded, python_script, tmp_path):
    """The same through ``sync-worker worker`` (a separate process, the documented way)."""
    import subprocess

    caller = _caller(python_script, embedded, CALLER)
    submitted = caller.expect("keys", timeout=90)
    (tmp_path / "swtasks.py").write_text(textwrap.dedent(WORKER_TASKS))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SYNC_WORKER_"))}
    env.update(SYNC_WORKER_API_URL=embedded.api_url, SYNC_WORKER_STORAGE=str(embedded.storage_path),
               SYNC_WORKER_ALLOW_PICKLE="true", ADD_ONE_KEY=submitted["keys"][0], BOOM_KEY=submitted["keys"][1],
               PYTHONPATH=os.pathsep.join([str(REPO), str(tmp_path)]))
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "sync_worker", "worker", "swtasks:add_one_task", "swtasks:boom_task"],
            cwd=str(REPO), env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _check(caller, embedded)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nworker log:\n{log.read_text(errors='replace')[-4000:]}") from None
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(timeout=10)


def describe(value) -> str:
    """sync_worker's side of Prefect's ``describe``: what the task received."""
    return repr(value)


def test_prefect_json_parameters_reach_a_sync_worker_task_as_the_values_prefect_sent(
    embedded, python_script, sync_worker_env, start_worker
):
    """A Prefect caller whose records are JSON (``PREFECT_RESULTS_DEFAULT_SERIALIZER=json``)
    wraps a datetime as ``{"__class__": "datetime.datetime", "data": ...}``; the task gets the
    datetime, not that envelope (standard library types only: see sync_worker.prefect_json)."""
    from sync_worker import task

    sync_worker_env(embedded)
    source = textwrap.dedent('''
        import json
        from datetime import datetime, timedelta, timezone
        from uuid import UUID
        from ptasks import describe

        def emit(**kw):
            print(json.dumps(kw), flush=True)

        future = describe.delay(value={"when": datetime(2024, 1, 2, tzinfo=timezone.utc),
                                       "wait": timedelta(seconds=90), "id": UUID(int=7)})
        emit(keys=[describe.task_key])
        emit(value=future.result(timeout=60))
        ''')
    env = embedded.client_env(PREFECT_RESULTS_DEFAULT_SERIALIZER="json")
    caller = python_script(source, env, name="json_caller.py").start()
    submitted = caller.expect("keys", timeout=90)
    start_worker(task(describe, task_key=submitted["keys"][0]))
    value = caller.expect("value", timeout=90)["value"]
    assert value == ("{'when': datetime.datetime(2024, 1, 2, 0, 0, tzinfo=datetime.timezone.utc), "
                     "'wait': datetime.timedelta(seconds=90), 'id': UUID('00000000-0000-0000-0000-000000000007')}"), \
        _snapshot(embedded, caller)
