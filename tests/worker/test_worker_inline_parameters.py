"""``SYNC_WORKER_STORAGE=server`` end to end: a run's parameters record travels in its create and
comes to the worker with the run (no storage request of its own), and every other path (a large
record, a server without the extensions, REST only) still gives the right results."""
from __future__ import annotations

from typing import Any

import pytest

from sync_worker.client import Client
from tests.helpers import wait_for
from tests.worker import worker_tasks as wt


class RecordRequests:
    """Counts the parameters record requests of every client (``/api/storage/parameters.*``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        for name in ("write_record", "read_record", "delete_record"):
            original = getattr(Client, name)

            def counting(client: Client, key: str, *args: Any, _name: str = name, _original: Any = original,
                         **kwargs: Any) -> Any:
                if key.startswith("parameters."):
                    self.calls.append(f"{_name} {key}")
                return _original(client, key, *args, **kwargs)

            monkeypatch.setattr(Client, name, counting)


@pytest.fixture
def server_storage(api_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> RecordRequests:
    monkeypatch.setenv("SYNC_WORKER_STORAGE", "server")
    api_env["SYNC_WORKER_STORAGE"] = "server"
    return RecordRequests(monkeypatch)


def _left_on_server(server: Any, futures: list[Any]) -> list[str]:
    client = Client(server.url)
    try:
        keys = [f"parameters.{client.read_task_run(f.task_run_id).state.state_details.task_parameters_id}"
                for f in futures]
        return [key for key in keys if server.core.db.read_record(key) is not None]
    finally:
        client.close()


def test_parameters_come_with_the_run_and_no_record_request_is_made(server, server_storage, start_worker):
    worker = start_worker(wt.add, limit=4)
    futures = [wt.add.delay(i, 1000) for i in range(40)]
    assert [f.result(timeout=60) for f in futures] == [i + 1000 for i in range(40)]
    assert server_storage.calls == []
    assert _left_on_server(server, futures) == []  # deleted by the server with the COMPLETED state
    wait_for(lambda: worker.finished_task_runs.get("tests.add") == 40, timeout=30, message="40 runs counted")


def test_a_record_over_the_inline_limit_is_written_and_read_with_requests(server, server_storage, start_worker):
    start_worker(wt.add, limit=2)
    large = "x" * (70 * 1024)
    future = wt.add.delay(large, "!")
    assert future.result(timeout=60) == large + "!"
    assert [call.split()[0] for call in server_storage.calls] == ["write_record", "read_record"]
    assert _left_on_server(server, [future]) == []


def test_a_server_without_the_extensions_gets_the_record_by_requests(server_factory, server_storage, monkeypatch,
                                                                     start_worker, tmp_path):
    from sync_worker.server import rpc, subscriptions

    monkeypatch.setattr(rpc, "EXTENSIONS", tuple(e for e in rpc.EXTENSIONS if e != "create_parameters"))
    monkeypatch.setattr(subscriptions, "EXTENSIONS",
                        [e for e in subscriptions.EXTENSIONS if e != "inline_parameters"])
    server = server_factory(database=str(tmp_path / "older.db"))
    monkeypatch.setenv("SYNC_WORKER_API_URL", server.url)
    start_worker(wt.add, limit=2)
    futures = [wt.add.delay(i, 1) for i in range(3)]
    assert [f.result(timeout=60) for f in futures] == [1, 2, 3]
    kinds = sorted(call.split()[0] for call in server_storage.calls)
    assert kinds == ["read_record"] * 3 + ["write_record"] * 3
    assert _left_on_server(server, futures) == []


def test_rest_only_clients_write_and_read_the_record(server, server_storage, monkeypatch, start_worker):
    monkeypatch.setenv("SYNC_WORKER_FAST_PATH", "false")
    start_worker(wt.add, limit=2)
    futures = [wt.add.delay(i, 2) for i in range(3)]
    assert [f.result(timeout=60) for f in futures] == [2, 3, 4]
    kinds = sorted(call.split()[0] for call in server_storage.calls)
    assert kinds == ["read_record"] * 3 + ["write_record"] * 3


def test_a_worker_with_a_local_store_runs_what_a_server_storage_submitter_sent(server, server_storage, tmp_path,
                                                                               monkeypatch, start_worker):
    """The record comes with the run, so the worker's own store is not asked (before, this
    mismatch failed the run: 'parameters ... not found')."""
    futures = [wt.add.delay(i, 5) for i in range(3)]  # submitted with SYNC_WORKER_STORAGE=server
    monkeypatch.setenv("SYNC_WORKER_STORAGE", str(tmp_path / "local"))
    start_worker(wt.add, limit=2)
    assert [f.result(timeout=60) for f in futures] == [5, 6, 7]
    assert server_storage.calls == []
