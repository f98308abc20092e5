"""Fixtures of the queue-operation tests: the worker tests' fixtures (real embedded server,
environment pointing at it, workers stopped at teardown, subprocesses killed at teardown)."""
from tests.worker.conftest import api_env, spawn, start_worker, state_path  # noqa: F401
