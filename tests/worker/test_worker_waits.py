"""Waiting is cheap and bounded: a future's wait leaves nothing registered on the server."""
from __future__ import annotations

from sync_worker.tasks import task
from tests.helpers import wait_for


@task(task_key="tests.nobody_serves")
def nobody(x):
    return x


def test_future_wait_leaves_no_registration_behind(server, api_env):
    future = nobody.delay(1)
    for _ in range(5):
        assert not future.wait(timeout=0.3).is_terminal()
    wait_for(lambda: future.task_run_id not in server.core._finish_waiters, message="the waits forgotten")


def test_rpc_socket_follows_the_clients_settings_not_the_environment(api_env, monkeypatch):
    from sync_worker.client import Client
    from sync_worker.settings import get_settings

    client = Client(settings=get_settings({**api_env, "SYNC_WORKER_FAST_PATH": "false"}))
    assert client.rpc is None  # the environment says on; this client's settings say off
