"""What the README says about behaviour a new user meets, checked against the code: runs of
a task key no worker serves wait; the JSON serializer's tuples and int keys; the metrics
port; ``limit``; the JSON log formatter."""
from __future__ import annotations

import json
import logging
import re
import socket
import time

import pytest

from sync_worker import SerializationError, TaskWorker, task
from sync_worker.cli_support import JsonFormatter
from sync_worker.client import Client
from sync_worker.schemas import StateType


@task(task_key="docs.served")
def served(x: int) -> int:
    return x


@task(task_key="docs.unserved")
def unserved(x: int) -> int:
    return x + 1


@task(task_key="docs.echo")
def echo(pair, mapping) -> dict:
    return {"pair_type": type(pair).__name__, "pair": pair, "mapping": mapping}


@pytest.fixture
def env(server, tmp_path, monkeypatch):
    for name in ("SYNC_WORKER_API_AUTH_STRING", "PREFECT_API_AUTH_STRING", "SYNC_WORKER_API_KEY", "PREFECT_API_KEY",
                 "SYNC_WORKER_CLIENT_METRICS_ENABLED", "PREFECT_CLIENT_METRICS_ENABLED", "SYNC_WORKER_FAST_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SYNC_WORKER_API_URL", server.url)
    monkeypatch.setenv("SYNC_WORKER_STORAGE", str(tmp_path / "store"))
    return server


def test_runs_of_a_key_no_worker_serves_wait_until_one_does(env):
    waiting = unserved.delay(1)
    with TaskWorker(served, echo, limit=2):
        assert served.delay(5).result(timeout=60) == 5  # the worker is up and taking its own runs
        with Client(api_url=env.url) as client:
            run = client.read_task_run(waiting.task_run_id)  # not deleted, not failed: still queued
        assert run.state.type == StateType.SCHEDULED
    with TaskWorker(unserved, limit=1):
        assert waiting.result(timeout=60) == 2


def test_json_serializer_turns_tuples_into_lists_and_int_keys_into_strings(env):
    with TaskWorker(echo, limit=1):
        result = echo.delay((1, 2), {1: "a", "b": (3,)}).result(timeout=60)
    assert result == {"pair_type": "list", "pair": [1, 2], "mapping": {"1": "a", "b": [3]}}


@pytest.mark.parametrize("value,what", [({1, 2}, "(set)"), (float("nan"), "(float)"), ({(1, 2): 3}, "(dict)")])
def test_json_serializer_refuses_what_it_cannot_represent(env, value, what):
    with pytest.raises(SerializationError, match=rf"cannot serialize parameter\(s\) 'pair' {re.escape(what)}"):
        echo.delay(value, {})


def test_a_taken_metrics_port_warns_and_the_worker_keeps_working(env, monkeypatch, caplog):
    from sync_worker.services import stop_client_metrics_server

    sock = socket.socket()
    sock.bind(("0.0.0.0", 0))
    sock.listen(1)
    port = sock.getsockname()[1]
    monkeypatch.setenv("SYNC_WORKER_CLIENT_METRICS_ENABLED", "true")
    monkeypatch.setenv("SYNC_WORKER_CLIENT_METRICS_PORT", str(port))
    stop_client_metrics_server()
    try:
        with caplog.at_level(logging.WARNING, logger="sync_worker"), TaskWorker(served, limit=1):
            assert served.delay(7).result(timeout=60) == 7
    finally:
        sock.close()
        stop_client_metrics_server()
    assert any(f"client metrics port {port} is in use; set SYNC_WORKER_CLIENT_METRICS_PORT" in r.getMessage()
               and r.levelno == logging.WARNING for r in caplog.records)


def test_limit_zero_is_refused_and_none_is_unlimited():
    with pytest.raises(ValueError, match="limit must be >= 1, or None for no limit"):
        TaskWorker(served, limit=0)
    assert TaskWorker(served, limit=None).limit is None


def test_json_log_formatter():
    record = logging.LogRecord("sync_worker.worker", logging.INFO, __file__, 1, "Starting %s", ("w",), None)
    record.created = time.time()
    document = json.loads(JsonFormatter().format(record))
    assert document["message"] == "Starting w" and document["level"] == "INFO"
    assert document["logger"] == "sync_worker.worker" and document["time"].endswith("+00:00")


def test_the_readme_logging_configuration_gives_json_lines(capsys):
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    logs = readme[readme.index("## Logs"):readme.index("## Troubleshooting")]
    snippet = re.search(r"```python\n(.*?)```", logs, re.S).group(1)
    logger = logging.getLogger("sync_worker")
    saved = (logger.level, logger.propagate, list(logger.handlers))
    try:
        exec(compile(snippet, "README.md", "exec"), {})
        logging.getLogger("sync_worker.worker").info("Starting task worker %s", "w-1")
    finally:
        for handler in logger.handlers:
            if handler not in saved[2]:
                logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["message"] == "Starting task worker w-1" and line["logger"] == "sync_worker.worker"
