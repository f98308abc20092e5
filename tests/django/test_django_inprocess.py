"""The in-process worker (SYNC_WORKER_IN_PROCESS) starts only where it should: in
runserver's serving child (not in the autoreloader's parent), and in each gunicorn worker
on its first request (never in a --preload master, whose threads a fork would lose)."""
from __future__ import annotations

import re
import socket
import sys
import time
from typing import Any

import pytest
import requests

from tests.django.conftest import wait_finished
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(180)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, worker: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.proc.poll() is not None:
            raise AssertionError(f"web process exited {worker.proc.returncode}:\n{worker.output()}")
        try:
            requests.get(url, timeout=2)
            return
        except requests.ConnectionError:
            time.sleep(0.1)
    raise AssertionError(f"{url} not up within {timeout} s:\n{worker.output()}")


def _started_pids(output: str) -> list[str]:
    return re.findall(r"In-process task worker started in process (\d+)", output)


def test_runserver_with_autoreloader_runs_one_worker_in_the_child(start_worker: Any) -> None:
    from notes.tasks import create_note

    port = _free_port()
    web = start_worker("runserver", f"127.0.0.1:{port}",
                       env={"SYNC_WORKER_IN_PROCESS": "1", "PYTHONUNBUFFERED": "1"},
                       command=[sys.executable, "manage.py"])
    _wait_http(f"http://127.0.0.1:{port}/", web)
    result = wait_finished(create_note.enqueue("run by runserver's in-process worker"))
    assert result.status == "SUCCESSFUL", web.output()
    pids = wait_for(lambda: _started_pids(web.output()), timeout=30)  # logged by the thread that started it
    assert len(pids) == 1, web.output()  # the reloader's parent did not start one
    assert pids[0] != str(web.proc.pid)  # the serving child did


def test_gunicorn_preload_starts_workers_after_the_fork_on_first_request(start_worker: Any) -> None:
    from notes.tasks import create_note

    port = _free_port()
    web = start_worker("-w", "2", "--preload", "-b", f"127.0.0.1:{port}", "mysite.wsgi",
                       env={"SYNC_WORKER_IN_PROCESS": "1", "PYTHONUNBUFFERED": "1"},
                       command=[sys.executable, "-m", "gunicorn"])
    _wait_http(f"http://127.0.0.1:{port}/", web)  # the first request starts that process's worker
    assert str(web.proc.pid) not in _started_pids(web.output())  # never in the master
    session = requests.Session()
    session.get(f"http://127.0.0.1:{port}/", timeout=30)  # the form page sets the CSRF cookie
    response = session.post(f"http://127.0.0.1:{port}/notes/", allow_redirects=False, timeout=30,
                            data={"text": "posted to gunicorn", "csrfmiddlewaretoken": session.cookies["csrftoken"]})
    assert response.status_code == 302, response.text
    result_id = response.headers["Location"].rstrip("/").rsplit("/", 1)[-1]
    result = wait_finished(create_note.get_result(result_id))
    assert result.status == "SUCCESSFUL", web.output()
    assert "before it forked" not in web.output()
    page = requests.get(f"http://127.0.0.1:{port}/results/{result_id}/", timeout=30).text
    assert 'id="status">SUCCESSFUL<' in page
