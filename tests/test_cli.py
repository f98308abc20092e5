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


def test_worker_rejects_a_bad_limit():
    result = run("worker", "sync_worker.demo:add", "--limit", "-3", timeout=30)
    assert result.returncode == 2
    assert "--limit" in result.stderr
