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


# -- where it must not start: management commands and test runs -----------------------------
_PROBE_DJANGO_TESTCASE = '''
from django.test import TestCase


class Probe(TestCase):
    def test_a_test_client_request_starts_no_worker(self):
        from sync_worker.contrib.django import inprocess

        self.assertEqual(self.client.get("/").status_code, 200)
        self.assertIsNone(inprocess._worker, "the in-process worker started in a test run")
'''

_PROBE_STANDALONE = '''
import unittest

import django

django.setup()


class Probe(unittest.TestCase):
    def test_a_test_client_request_starts_no_worker(self):
        from django.test import Client

        from sync_worker.contrib.django import inprocess

        self.assertEqual(Client().get("/").status_code, 200)
        self.assertIsNone(inprocess._worker, "the in-process worker started in a test run")


def test_a_test_client_request_starts_no_worker():
    Probe("test_a_test_client_request_starts_no_worker").test_a_test_client_request_starts_no_worker()
'''


_PROBE_LIVE_SERVER = '''
import urllib.request

from django.test import LiveServerTestCase


class Probe(LiveServerTestCase):
    def test_a_live_server_request_starts_no_worker(self):
        from sync_worker.contrib.django import inprocess

        with urllib.request.urlopen(self.live_server_url + "/") as answer:
            self.assertEqual(answer.status, 200)
        self.assertIsNone(inprocess._worker, "the in-process worker started in a test run")
'''

_RUNTESTS = '''
import sys

import django
from django.conf import settings
from django.test.utils import get_runner

django.setup()
sys.exit(bool(get_runner(settings)().run_tests(["probe_live"])))
'''


@pytest.mark.parametrize("runner", ["manage.py test", "python -m django test", "python -m pytest",
                                    "python -m unittest", "runtests.py with a live server"])
def test_no_worker_in_test_runs_and_the_queued_run_is_left_alone(api_env: Any, tmp_path: Any, runner: str) -> None:
    """SYNC_WORKER_IN_PROCESS=1 and a test that makes a test-client request: no worker starts,
    and a real run waiting on the server is not executed against the test database."""
    import os
    import subprocess

    from notes.tasks import create_note
    from tests.django.conftest import EXAMPLE, REPO

    waiting = create_note.enqueue("a real user's note, not for the tests")
    (tmp_path / "probe_dj.py").write_text(_PROBE_DJANGO_TESTCASE)
    (tmp_path / "probe_std.py").write_text(_PROBE_STANDALONE)
    # Django's documented way for a reusable app (a runtests.py calling the test runner): the
    # live server's handler is a WSGIHandler, and its request started the worker, which ran
    # the real queued run against the test database
    (tmp_path / "probe_live.py").write_text(_PROBE_LIVE_SERVER)
    (tmp_path / "runtests.py").write_text(_RUNTESTS)
    env = {**os.environ, "SYNC_WORKER_IN_PROCESS": "1", "DJANGO_SETTINGS_MODULE": "mysite.settings",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(EXAMPLE), str(REPO)])}
    command = {
        "manage.py test": ([sys.executable, "manage.py", "test", "probe_dj"], EXAMPLE),
        "python -m django test": ([sys.executable, "-m", "django", "test", "probe_dj"], EXAMPLE),
        "python -m pytest": ([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "probe_std.py"],
                             tmp_path),
        "python -m unittest": ([sys.executable, "-m", "unittest", "probe_std"], tmp_path),
        "runtests.py with a live server": ([sys.executable, "runtests.py"], tmp_path),
    }[runner]
    done = subprocess.run(command[0], cwd=command[1], env=env, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "In-process task worker started" not in output
    waiting.refresh()
    assert waiting.status == "READY", output  # nobody took it


def test_a_plain_wsgi_server_starts_the_worker_on_its_first_request(start_worker: Any, tmp_path: Any) -> None:
    """Rule 4: any process serving requests through Django's WSGIHandler (here wsgiref's
    server, started as a script) starts the worker on its first request."""
    from notes.tasks import create_note
    from tests.django.conftest import EXAMPLE

    (tmp_path / "serve.py").write_text(
        "import sys\nfrom wsgiref.simple_server import make_server\n"
        "from django.core.wsgi import get_wsgi_application\n"
        "make_server('127.0.0.1', int(sys.argv[1]), get_wsgi_application()).serve_forever()\n")
    port = _free_port()
    web = start_worker(str(tmp_path / "serve.py"), str(port),
                       env={"SYNC_WORKER_IN_PROCESS": "1", "PYTHONUNBUFFERED": "1",
                            "DJANGO_SETTINGS_MODULE": "mysite.settings", "PYTHONPATH": str(EXAMPLE)},
                       command=[sys.executable])
    _wait_http(f"http://127.0.0.1:{port}/", web)
    result = wait_finished(create_note.enqueue("run by the wsgiref server's in-process worker"))
    assert result.status == "SUCCESSFUL", web.output()
    assert _started_pids(web.output()) == [str(web.proc.pid)]


# -- the options are checked when the app is ready -------------------------------------------
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"limt": 4}, r"SYNC_WORKER_IN_PROCESS: unknown key\(s\) 'limt'; accepted keys: backend, queues, limit"),
        ({"queues": ["nope"]}, r"SYNC_WORKER_IN_PROCESS: 'queues' names 'nope', not in TASKS\['default'\]\['QUEUES'\]"),
        ({"queues": "default"}, r"SYNC_WORKER_IN_PROCESS: 'queues' is 'default': it must be a non-empty list"),
        ({"limit": 0}, r"SYNC_WORKER_IN_PROCESS: 'limit' is 0: it must be a whole number >= 1"),
        ({"limit": "4"}, r"SYNC_WORKER_IN_PROCESS: 'limit' is '4'"),
        ({"backend": "nope"}, r"SYNC_WORKER_IN_PROCESS: 'backend' is 'nope'"),
        ("yes", r"SYNC_WORKER_IN_PROCESS: 'yes' is neither True nor a dict"),
    ],
)
def test_options_are_checked_when_the_app_is_ready(api_env: Any, options: Any, message: str) -> None:
    from django.core.exceptions import ImproperlyConfigured

    from sync_worker.contrib.django import inprocess

    with pytest.raises(ImproperlyConfigured, match=message):
        inprocess.validate_options(options)
    assert inprocess.validate_options({"limit": None, "queues": ["emails"]}) == {"limit": None, "queues": ["emails"]}
    assert inprocess.validate_options(True) == {}


def _settings_module(tmp_path: Any, name: str, extra: str) -> dict[str, str]:
    """A settings module ``name`` in tmp_path: the example's, plus ``extra``; the env to use it."""
    import os

    from tests.django.conftest import EXAMPLE, REPO

    (tmp_path / f"{name}.py").write_text(f"from mysite.settings import *  # noqa: F403\n{extra}\n")
    return {"DJANGO_SETTINGS_MODULE": name, "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(tmp_path), str(EXAMPLE), str(REPO)])}


@pytest.mark.parametrize("web_server", ["gunicorn", "runserver --noreload"])
def test_a_misspelt_option_stops_the_web_process_at_start_naming_it(start_worker: Any, tmp_path: Any,
                                                                    web_server: str) -> None:
    """Not a 500 on every request: the process does not start, and says why."""
    env = _settings_module(tmp_path, "bad_inprocess", 'SYNC_WORKER_IN_PROCESS = {"limt": 4}')
    port = _free_port()
    if web_server == "gunicorn":
        web = start_worker("-w", "2", "-b", f"127.0.0.1:{port}", "mysite.wsgi", env=env,
                           command=[sys.executable, "-m", "gunicorn"])
    else:
        web = start_worker("runserver", "--noreload", f"127.0.0.1:{port}", env=env,
                           command=[sys.executable, "manage.py"])

    def exited_or_served() -> bool:
        if web.proc.poll() is not None:
            return True
        try:
            response = requests.get(f"http://127.0.0.1:{port}/", timeout=5)
        except requests.ConnectionError:
            return False
        raise AssertionError(f"the web process serves (status {response.status_code}):\n{web.output()}")

    wait_for(exited_or_served, timeout=60)
    assert web.proc.wait(30) != 0
    assert ("ImproperlyConfigured: SYNC_WORKER_IN_PROCESS: unknown key(s) 'limt'; accepted keys: backend, queues, "
            "limit") in web.output()


# -- stopping under runserver ----------------------------------------------------------------
def _wait_running(started: Any, web: Any, timeout: float = 60.0) -> None:
    """Until the task's body has begun (it created the file ``started``). Not the result's
    RUNNING status: a run is RUNNING once a worker claimed it at delivery, and a stop before
    its body starts hands it back instead of draining it (which failed these tests 1 in ~30)."""
    def running() -> bool:
        if web.proc.poll() is not None:
            raise AssertionError(f"web process exited {web.proc.returncode}:\n{web.output()}")
        return started.exists()

    wait_for(running, timeout=timeout)


def test_runserver_noreload_sigterm_drains_like_ctrl_c(start_worker: Any, tmp_path: Any) -> None:
    import signal

    from notes.tasks import wait_for_file

    port = _free_port()
    web = start_worker("runserver", "--noreload", f"127.0.0.1:{port}",
                       env={"SYNC_WORKER_IN_PROCESS": "1", "PYTHONUNBUFFERED": "1"},
                       command=[sys.executable, "manage.py"])
    _wait_http(f"http://127.0.0.1:{port}/", web)
    release = tmp_path / "release"
    result = wait_for_file.enqueue(str(release), started=str(tmp_path / "started"))
    _wait_running(tmp_path / "started", web)
    web.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: web.proc.poll() is not None or "Stopping task worker" in web.output(), timeout=30)
    release.touch()  # the run in flight finishes now: during the drain, if there is one
    assert web.proc.wait(60) == 0, web.output()
    assert "SIGTERM received: stopping as on Ctrl-C" in web.output()
    result = wait_finished(result, timeout=30)
    assert result.status == "SUCCESSFUL" and result.return_value is True, web.output()


def test_a_second_sigterm_during_the_noreload_drain_is_a_cold_stop_naming_the_run(start_worker: Any,
                                                                                    tmp_path: Any) -> None:
    """It was a traceback from the atexit hook ("Exception ignored in atexit callback") and
    the run left RUNNING unnamed. Started with ``--norel`` (an abbreviation Django takes),
    which did not count as ``--noreload``: no worker started at all."""
    import signal

    from notes.tasks import wait_for_file

    port = _free_port()
    web = start_worker("runserver", "--norel", f"127.0.0.1:{port}",
                       env={"SYNC_WORKER_IN_PROCESS": "1", "PYTHONUNBUFFERED": "1"},
                       command=[sys.executable, "manage.py"])
    _wait_http(f"http://127.0.0.1:{port}/", web)
    result = wait_for_file.enqueue(str(tmp_path / "never"), started=str(tmp_path / "started"))
    _wait_running(tmp_path / "started", web)
    web.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "Stopping task worker" in web.output(), timeout=30, message="the drain under way")
    web.proc.send_signal(signal.SIGTERM)
    web.proc.wait(60)
    output = web.output()
    assert f"Cold stop: abandoning 1 running run(s): {result.id}" in output, output
    assert "Exception ignored in atexit" not in output and "Traceback" not in output, output


def test_runserver_noreload_keeps_a_sigterm_handler_the_project_installed(api_env: Any) -> None:
    import signal

    from sync_worker.contrib.django import inprocess

    before = signal.getsignal(signal.SIGTERM)

    def projects_own(signum: int, frame: Any) -> None:  # pragma: no cover - never called
        pass

    try:
        signal.signal(signal.SIGTERM, projects_own)
        inprocess._sigterm_as_ctrl_c()
        assert signal.getsignal(signal.SIGTERM) is projects_own
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        inprocess._sigterm_as_ctrl_c()
        assert signal.getsignal(signal.SIGTERM) is inprocess._raise_keyboard_interrupt
    finally:
        signal.signal(signal.SIGTERM, before)


def test_runserver_autoreloader_ctrl_c_warns_that_runs_in_flight_will_run_again(start_worker: Any,
                                                                               tmp_path: Any) -> None:
    """Ctrl-C at a terminal (SIGINT to the process group): Django's autoreloader kills the
    serving child 0.25 s later, so no drain; the child says so at once, naming the run."""
    import os
    import signal

    from notes.tasks import wait_for_file

    port = _free_port()
    web = start_worker("runserver", f"127.0.0.1:{port}",
                       env={"SYNC_WORKER_IN_PROCESS": "1", "PYTHONUNBUFFERED": "1"},
                       command=[sys.executable, "manage.py"], session=True)
    _wait_http(f"http://127.0.0.1:{port}/", web)
    wait_for(lambda: "Watching for file changes" in web.output(), timeout=30)  # autoreload_started was sent
    result = wait_for_file.enqueue(str(tmp_path / "never"), 30.0, started=str(tmp_path / "started"))
    _wait_running(tmp_path / "started", web)
    os.killpg(web.proc.pid, signal.SIGINT)
    web.proc.wait(30)
    output = web.output()
    warnings = [line for line in output.splitlines() if "WARNING" in line and "SIGINT received" in line]
    assert len(warnings) == 1, output
    assert result.id in warnings[0] and "autoreloader" in warnings[0] and "lease" in warnings[0], output
    assert "--noreload" in warnings[0] and "manage.py sync_worker" in warnings[0]
