"""Server object: start/stop/context manager, options, and import cost."""
from __future__ import annotations

import subprocess
import sys

import pytest
import requests

from sync_worker.server import Server


def test_context_manager_and_url(tmp_path):
    with Server(port=0, database=str(tmp_path / "s.db")) as server:
        assert server.url == f"http://127.0.0.1:{server.port}/api"
        assert server.port != 0
        assert requests.get(server.url + "/health").json() is True
    with pytest.raises(requests.ConnectionError):
        requests.get(server.url + "/health", timeout=2)


def test_stop_is_idempotent_and_start_once(tmp_path):
    server = Server(port=0, database=str(tmp_path / "s.db")).start()
    with pytest.raises(RuntimeError):
        server.start()
    server.stop()
    server.stop()


def test_explicit_database_directory_must_exist(tmp_path):
    """(issue 9) An explicit path in a missing directory is a typo more often than a wish:
    refused, naming the directory; the default location is created (test_server_dbfile)."""
    from sync_worker.server.database import DatabaseFileError

    path = tmp_path / "deep" / "er" / "server.db"
    with pytest.raises(DatabaseFileError, match="does not exist"):
        Server(port=0, database=str(path)).start()
    assert not path.parent.exists()


@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
def test_synchronous_option(tmp_path, synchronous):
    with Server(port=0, database=str(tmp_path / "s.db"), synchronous=synchronous) as server:
        created = requests.post(server.url + "/task_runs/", json={"task_key": "k", "dynamic_key": "d"})
        assert created.status_code == 201
        mode = server.db._writer_conn.execute("PRAGMA synchronous").fetchone()[0]
        assert mode == {"NORMAL": 1, "FULL": 2}[synchronous]


@pytest.mark.parametrize("kwargs", [{"lease_timeout": 0}, {"max_deliveries": 0}, {"max_body_size": 0},
                                    {"synchronous": "SOMETIMES"}, {"database": ":memory:"}])
def test_bad_options_are_refused(tmp_path, kwargs):
    kwargs.setdefault("database", str(tmp_path / "s.db"))
    with pytest.raises(ValueError):
        Server(port=0, **kwargs).start()


def test_port_in_use_raises_oserror(server, tmp_path):
    with pytest.raises(OSError):
        Server(port=server.port, database=str(tmp_path / "other.db")).start()
    assert requests.get(server.url + "/health").json() is True


def test_importing_the_package_does_not_import_werkzeug():
    code = "import sys, sync_worker.server; print('werkzeug' in sys.modules, 'simple_websocket' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_fixture_factory_restarts_on_the_same_file(server_factory):
    first = server_factory()
    created = requests.post(first.url + "/task_runs/", json={"task_key": "k", "dynamic_key": "d"}).json()
    first.stop()
    second = server_factory(database=first.database)
    assert requests.get(f"{second.url}/task_runs/{created['id']}").json()["id"] == created["id"]


def test_two_servers_cannot_share_a_database(server, tmp_path):
    from sync_worker.server.database import DatabaseInUse

    with pytest.raises(DatabaseInUse):
        Server(port=0, database=server.database).start()
    assert requests.get(server.url + "/health").json() is True
