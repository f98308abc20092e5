"""Fixtures of the Django tests: the example project (examples/django_app) on a SQLite
file, a real embedded server per test, and `manage.py sync_worker` subprocesses.

Without Django's Tasks framework installed (the default ``py`` tox env) these tests are
not collected; the Django tox envs set SYNC_WORKER_REQUIRE_DJANGO=1, and there a missing
framework is an error, not a skip.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "django_app"


def _framework_missing() -> str | None:
    try:
        import django
    except ImportError as exc:
        return f"Django is not installed ({exc})"
    if not hasattr(django, "VERSION"):  # this very directory, seen as a namespace package
        return "Django is not installed"
    module = "django.tasks" if django.VERSION >= (6, 0) else "django_tasks"
    try:
        __import__(module)
    except ImportError as exc:
        return f"Django {django.get_version()} without {module} ({exc})"
    return None


_missing = _framework_missing()
if _missing:
    if os.environ.get("SYNC_WORKER_REQUIRE_DJANGO") == "1":
        raise RuntimeError(f"SYNC_WORKER_REQUIRE_DJANGO=1 but {_missing}")
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session")
def django_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Django set up in this process with the example's settings and a migrated database."""
    database = tmp_path_factory.mktemp("django") / "db.sqlite3"
    os.environ["DJANGO_DB_PATH"] = str(database)
    os.environ["DJANGO_SETTINGS_MODULE"] = "mysite.settings"
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))
    import logging

    import django
    from django.core.management import call_command

    # django.setup() applies the example's LOGGING, which gives the "sync_worker" logger its
    # own handler and stops propagation; the rest of the suite reads sync_worker's records
    # through the root logger (caplog), so this process keeps the logger as it was.
    ours = logging.getLogger("sync_worker")
    saved = (list(ours.handlers), ours.level, ours.propagate)
    django.setup()
    ours.handlers[:], ours.level, ours.propagate = saved
    call_command("migrate", verbosity=0)
    return database


@pytest.fixture
def api_env(django_project: Path, server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process and the workers it starts talk to a fresh embedded server and store."""
    env = {
        "SYNC_WORKER_API_URL": server.url,
        "SYNC_WORKER_STORAGE": str(tmp_path / "store"),
        "SYNC_WORKER_DRAIN_TIMEOUT": "20",
        "DJANGO_DB_PATH": str(django_project),
    }
    for name in ("SYNC_WORKER_API_AUTH_STRING", "PREFECT_API_AUTH_STRING", "SYNC_WORKER_API_KEY", "PREFECT_API_KEY",
                 "SYNC_WORKER_FAST_PATH", "SYNC_WORKER_CLIENT_METRICS_ENABLED", "DJANGO_CONN_MAX_AGE",
                 "SYNC_WORKER_IN_PROCESS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


class WorkerProcess:
    def __init__(self, proc: subprocess.Popen, log: Path, session: bool = False) -> None:
        self.proc = proc
        self.log = log
        self.session = session  # its own process group (id = its pid), as a terminal's job

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.session:  # children it left (runserver's autoreloaded child): its own group only
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        return self.proc.returncode


@pytest.fixture
def start_worker(api_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """``start_worker(*args, env={...}, command=[...], session=False)``: ``manage.py
    sync_worker ARGS`` in the example project (or ``command``), stopped with SIGTERM (then
    killed) at teardown. ``session=True``: in a new session (its own process group) with
    SIGINT at its default (not ignored as in a background job), as a command started at a
    terminal, so a test can send the group a terminal's Ctrl-C."""
    workers: list[WorkerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None, command: list[str] | None = None,
              session: bool = False) -> WorkerProcess:
        full_env = {**os.environ, **api_env, **(env or {})}
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
        if "DJANGO_SETTINGS_MODULE" not in (env or {}):
            full_env.pop("DJANGO_SETTINGS_MODULE", None)  # manage.py sets it; --django names it
        log = tmp_path / f"worker-{len(workers)}.log"
        argv = command or [sys.executable, "manage.py", "sync_worker"]
        with open(log, "w") as out:
            proc = subprocess.Popen([*argv, *args], cwd=EXAMPLE, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=session,
                                    preexec_fn=_default_sigint if session else None)
        worker = WorkerProcess(proc, log, session)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_finished(result: Any, timeout: float = 60.0) -> Any:
    """Wait (on the server's push, or polling) until the run is finished; refresh ``result``."""
    from sync_worker.tasks import TaskRunFuture

    backend = result.task.get_backend()
    deadline = time.monotonic() + timeout
    TaskRunFuture(result.id, client=backend.client).wait(timeout)
    result.refresh()
    while not result.is_finished and time.monotonic() < deadline:  # pragma: no cover - a late refresh
        time.sleep(0.05)
        result.refresh()
    assert result.is_finished, f"task result {result.id} still {result.status} after {timeout} s"
    return result


def _postgres_bin(name: str) -> str | None:
    import glob
    import shutil

    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


@pytest.fixture(scope="session")
def postgres() -> Iterator[dict[str, str]]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (initdb + pg_ctl; as root it runs as
    the ``postgres`` user), with the example's tables migrated. Skipped (with the reason)
    where PostgreSQL is not installed, unless SYNC_WORKER_REQUIRE_POSTGRES=1."""
    import shutil
    import socket
    import tempfile

    import importlib.util

    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    missing = None if initdb and pg_ctl else "initdb/pg_ctl were not found"
    if missing is None and not any(importlib.util.find_spec(name) for name in ("psycopg", "psycopg2")):
        missing = "no PostgreSQL driver for Django (pip install psycopg2-binary)"
    if missing:
        if os.environ.get("SYNC_WORKER_REQUIRE_POSTGRES") == "1":
            raise RuntimeError(f"SYNC_WORKER_REQUIRE_POSTGRES=1 but {missing}")
        pytest.skip(f"PostgreSQL cannot be used here: {missing}")
    base = Path(tempfile.mkdtemp(prefix="sync-worker-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:
        import pwd

        user = pwd.getpwnam("postgres")
        os.chown(base, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data = base / "data"
    subprocess.run([*prefix, initdb, "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"],
                   check=True, capture_output=True, timeout=120)
    subprocess.run([*prefix, pg_ctl, "-D", str(data), "-l", str(base / "log"), "-w", "-t", "60", "-o",
                    f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                   check=True, capture_output=True, timeout=120)
    env = {"DJANGO_DB_ENGINE": "postgresql", "DJANGO_DB_HOST": "127.0.0.1", "DJANGO_DB_PORT": str(port),
           "DJANGO_DB_USER": "postgres", "DJANGO_DB_NAME": "postgres"}
    try:
        full_env = {**os.environ, **env, "DJANGO_SETTINGS_MODULE": "mysite.settings"}
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=EXAMPLE, env=full_env, check=True,
                       timeout=120)
        yield env
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True,
                       timeout=60)
        shutil.rmtree(base, ignore_errors=True)
