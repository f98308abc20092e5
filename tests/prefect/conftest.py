"""Fixtures for the compatibility suite against a REAL Prefect 3 server.

Every test in this directory needs ``prefect`` installed (``tox -e prefect`` installs
prefect==3.8.8 with fastapi==0.140.0 pinned).  Without it the tests are reported as
skipped with the reason below, never silently dropped; with ``SYNC_WORKER_REQUIRE_PREFECT=1``
(set by the tox env) a missing Prefect is an error instead, so a broken CI install cannot
turn the suite green.

The server runs as a subprocess (``python -m prefect server start``) with a temporary
PREFECT_HOME (its own sqlite database and local result storage), UI, analytics and
telemetry off, on a free port of 127.0.0.1.  Prefect's own callers and workers are run
by the tests in subprocesses (they need their own event loop and settings); helpers for
that are here too.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SKIP_REASON = "prefect is not installed: run `tox -e prefect`"


def _prefect_installed() -> bool:
    """Whether the real ``prefect`` distribution is installed (without importing it: slow).

    ``find_spec`` alone is not enough: this very directory, ``tests/prefect``, is found as
    a namespace package named ``prefect`` when ``tests`` is on sys.path.
    """
    try:
        importlib.metadata.version("prefect")
    except importlib.metadata.PackageNotFoundError:
        return False
    spec = importlib.util.find_spec("prefect")
    return spec is not None and spec.origin not in (None, "namespace")


PREFECT_AVAILABLE = _prefect_installed()
REQUIRE_PREFECT = os.environ.get("SYNC_WORKER_REQUIRE_PREFECT", "").strip().lower() in {"1", "true", "yes", "on"}

HERE = Path(__file__).resolve().parent

# Seconds allowed for `prefect server start` to answer /api/health (9.6 s measured on a
# 2-core machine for a first start with migrations; CI machines can be slower).
SERVER_START_TIMEOUT = float(os.environ.get("SYNC_WORKER_PREFECT_START_TIMEOUT", "90"))
SERVER_STOP_TIMEOUT = 15.0

# Prefect services that the task-run protocol does not need; turning them off saves CPU on
# the 2-core CI machine.  The task_run_recorder and the event services stay on: they turn
# Prefect's own worker's events into task-run states.
_UNNEEDED_SERVICES = (
    "SCHEDULER",
    "LATE_RUNS",
    "FOREMAN",
    "CANCELLATION_CLEANUP",
    "PAUSE_EXPIRATIONS",
    "REPOSSESSOR",
    "TRIGGERS",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test of this directory `prefect`; skip them (with a reason) without Prefect."""
    for item in items:
        if HERE not in Path(str(item.fspath)).resolve().parents:
            continue
        item.add_marker(pytest.mark.prefect)
        if not PREFECT_AVAILABLE:
            if REQUIRE_PREFECT:
                raise pytest.UsageError(f"SYNC_WORKER_REQUIRE_PREFECT is set but {SKIP_REASON}")
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


# --------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _clean_prefect_env() -> dict[str, str]:
    """The caller's environment without any PREFECT_*/SYNC_WORKER_* variable (isolation)."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PREFECT_", "SYNC_WORKER_"))
    }


@dataclass
class PrefectServer:
    """A running `prefect server start` subprocess."""

    api_url: str
    port: int
    home: Path
    log_path: Path
    process: subprocess.Popen
    auth_string: str | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def storage_path(self) -> Path:
        """Prefect's default local storage of this server's home (PREFECT_RESULTS_LOCAL_STORAGE_PATH)."""
        return self.home / "storage"

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError as exc:  # pragma: no cover - diagnostics only
            return f"<cannot read {self.log_path}: {exc}>"

    def client_env(self, **extra: str) -> dict[str, str]:
        """Environment for a Prefect client/worker subprocess talking to this server.

        Client and worker share the server's PREFECT_HOME so that parameter and result
        records land in one storage directory (Prefect's default local storage).
        """
        env = _clean_prefect_env()
        env.update(
            PREFECT_API_URL=self.api_url,
            PREFECT_HOME=str(self.home),
            PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(self.storage_path),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            DO_NOT_TRACK="1",
            PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW="ignore",
            PREFECT_LOGGING_LEVEL="WARNING",
        )
        if self.auth_string is not None:
            env["PREFECT_API_AUTH_STRING"] = self.auth_string
        env.update(extra)
        return env

    def auth_header(self, auth_string: str | None = None) -> dict[str, str]:
        import base64

        value = self.auth_string if auth_string is None else auth_string
        if value is None:
            return {}
        return {"Authorization": "Basic " + base64.b64encode(value.encode()).decode()}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=SERVER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=SERVER_STOP_TIMEOUT)


def _healthy(api_url: str) -> bool:
    import requests

    try:
        response = requests.get(f"{api_url}/health", timeout=2)
    except requests.RequestException:
        return False
    return response.status_code == 200


def start_prefect_server(
    home: Path, auth_string: str | None = None, attempts: int = 3, extra_env: dict[str, str] | None = None
) -> PrefectServer:
    """Start `prefect server start` on a free port and wait (bounded) until healthy."""
    home.mkdir(parents=True, exist_ok=True)
    last_error = ""
    for attempt in range(1, attempts + 1):
        port = free_port()
        api_url = f"http://127.0.0.1:{port}/api"
        log_path = home / f"server-{attempt}.log"
        env = _clean_prefect_env()
        env.update(
            PREFECT_HOME=str(home),
            PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_SERVER_UI_ENABLED="false",
            PREFECT_UI_ENABLED="false",
            DO_NOT_TRACK="1",
            PREFECT_SERVER_LOGGING_LEVEL="WARNING",
        )
        for name in _UNNEEDED_SERVICES:
            env[f"PREFECT_SERVER_SERVICES_{name}_ENABLED"] = "false"
        if auth_string is not None:
            env["PREFECT_SERVER_API_AUTH_STRING"] = auth_string
        env.update(extra_env or {})
        cmd = [
            sys.executable, "-m", "prefect", "server", "start",
            "--host", "127.0.0.1", "--port", str(port), "--no-ui", "--analytics-off",
        ]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                cmd, env=env, cwd=str(home), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        server = PrefectServer(api_url, port, home, log_path, process, auth_string, env)
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            if _healthy(api_url):
                return server
            time.sleep(0.2)
        server.stop()
        last_error = (
            f"attempt {attempt}: `{' '.join(cmd)}` "
            + (f"exited with {process.returncode}" if process.returncode is not None else "was not healthy")
            + f" within {SERVER_START_TIMEOUT:.0f}s; log:\n{server.log_tail()}"
        )
        # a port taken between free_port() and bind is worth another try; anything else is not
        if "address already in use" not in server.log_tail().lower():
            break
    raise RuntimeError(f"Prefect server did not start: {last_error}")


_SERVERS: dict[str, PrefectServer] = {}


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """One Prefect server (no auth) for the whole session."""
    server = start_prefect_server(tmp_path_factory.mktemp("prefect-home"))
    _SERVERS["prefect_server"] = server
    try:
        yield server
    finally:
        server.stop()
        _SERVERS.pop("prefect_server", None)


AUTH_STRING = "sync-worker:s3cret-auth"


@pytest.fixture(scope="session")
def prefect_auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A second Prefect server started with PREFECT_SERVER_API_AUTH_STRING (see AUTH_STRING)."""
    server = start_prefect_server(tmp_path_factory.mktemp("prefect-auth-home"), auth_string=AUTH_STRING)
    _SERVERS["prefect_auth_server"] = server
    try:
        yield server
    finally:
        server.stop()
        _SERVERS.pop("prefect_auth_server", None)


@pytest.fixture(scope="session")
def prefect_lazy_events_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A Prefect server whose event persister flushes only every 120 s (default 5 s): an event
    missed by a live /api/events/out subscription cannot be recovered by its backfill."""
    server = start_prefect_server(
        tmp_path_factory.mktemp("prefect-lazy-events-home"),
        extra_env={
            "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "120",
            "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE": "10000",
        },
    )
    _SERVERS["prefect_lazy_events_server"] = server
    try:
        yield server
    finally:
        server.stop()
        _SERVERS.pop("prefect_lazy_events_server", None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # type: ignore[no-untyped-def]
    """Attach the Prefect server's log to the report of a failed test that used it."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for name in ("prefect_server", "prefect_auth_server", "prefect_lazy_events_server"):
            server = _SERVERS.get(name)
            if server is not None and name in getattr(item, "fixturenames", ()):
                report.sections.append((f"{name} log ({server.log_path})", server.log_tail()))


# --------------------------------------------------------------------------- subprocess helpers


@dataclass
class ScriptResult:
    returncode: int
    stdout: str
    stderr: str

    def json_lines(self) -> list[dict]:
        """The stdout lines that are JSON objects (our scripts report that way)."""
        return [obj for obj in (_json_or_none(line) for line in self.stdout.splitlines()) if obj is not None]

    def describe(self) -> str:
        return f"exit {self.returncode}\nstdout:\n{self.stdout[-4000:]}\nstderr:\n{self.stderr[-6000:]}"


def _json_or_none(line: str) -> dict | None:
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class Script:
    """A Python script run as a subprocess (Prefect code wants its own loop and settings).

    Its stdout is read by a thread so the test can wait for a given JSON line while the
    script keeps running (``expect``), and stderr is kept for the failure message.
    """

    def __init__(self, path: Path, env: dict[str, str]):
        self.path = path
        self.env = env
        self.process: subprocess.Popen | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stdout: list[str] = []
        self._stderr: list[str] = []
        self._readers: list[threading.Thread] = []
        self._json: list[dict] = []
        self._claimed: set[int] = set()
        self._ended = False

    def start(self, *args: str) -> Script:
        self.process = subprocess.Popen(
            [sys.executable, str(self.path), *args], env=self.env, cwd=str(self.path.parent),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
            start_new_session=True,
        )
        for stream, sink, feed in ((self.process.stdout, self._stdout, True), (self.process.stderr, self._stderr, False)):
            reader = threading.Thread(target=self._pump, args=(stream, sink, feed), daemon=True)
            reader.start()
            self._readers.append(reader)
        return self

    def _pump(self, stream, sink: list[str], feed: bool) -> None:  # type: ignore[no-untyped-def]
        for line in stream:
            sink.append(line)
            if feed:
                self._lines.put(line)
        if feed:
            self._lines.put(None)

    def expect(self, key: str, timeout: float, **match: object) -> dict:
        """The first JSON line of stdout that has ``key`` (and the ``match`` values) and was
        not returned before (lines may arrive in any order); AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            for index, obj in enumerate(self._json):
                if key in obj and index not in self._claimed and all(obj.get(k) == v for k, v in match.items()):
                    self._claimed.add(index)
                    return obj
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._ended:
                break
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                self._ended = True
                continue
            obj = _json_or_none(line)
            if obj is not None:
                self._json.append(obj)
        raise AssertionError(
            f"{self.path.name} printed no {key!r} line {match or ''} within {timeout}s; {self.snapshot()}"
        )

    def snapshot(self) -> str:
        code = self.process.poll() if self.process else None
        return (f"exit {code}\nstdout:\n{''.join(self._stdout)[-4000:]}\n"
                f"stderr:\n{''.join(self._stderr)[-6000:]}")

    def wait(self, timeout: float) -> ScriptResult:
        assert self.process is not None
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.path.name} did not finish within {timeout}s; {self.snapshot()}") from None
        for reader in self._readers:
            reader.join(timeout=10)
        return ScriptResult(self.process.returncode, "".join(self._stdout), "".join(self._stderr))

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM, bounded wait, then SIGKILL."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def python_script(tmp_path: Path) -> Iterator[Callable[..., Script]]:
    """Factory: python_script(source, env, name=...) -> Script written to tmp_path; killed at teardown."""
    scripts: list[Script] = []

    def make(source: str, env: dict[str, str], name: str = "script.py") -> Script:
        path = tmp_path / name
        path.write_text(textwrap.dedent(source))
        script = Script(path, env)
        scripts.append(script)
        return script

    yield make
    for script in scripts:
        script.stop()


# --------------------------------------------------------------------------- sync_worker side


_SERVER_AUTH = object()


@pytest.fixture
def sync_worker_env(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Factory: point sync_worker (in this process) at a Prefect server.

    Clears every SYNC_WORKER_*/PREFECT_* variable, then sets the API URL, the auth string
    of an auth server, and SYNC_WORKER_STORAGE = the server's Prefect storage directory
    (so parameter/result records are shared with Prefect's callers and workers).
    """

    def configure(
        server: PrefectServer,
        *,
        auth_string: str | None | object = _SERVER_AUTH,
        auth_variable: str = "SYNC_WORKER_API_AUTH_STRING",
        **extra: str,
    ) -> None:
        """``auth_string``: default the server's own; None for none; or a (wrong) string,
        put in ``auth_variable`` (e.g. Prefect's PREFECT_API_AUTH_STRING)."""
        for name in list(os.environ):
            if name.startswith(("SYNC_WORKER_", "PREFECT_")) and name != "SYNC_WORKER_REQUIRE_PREFECT":
                monkeypatch.delenv(name)
        monkeypatch.setenv("SYNC_WORKER_API_URL", server.api_url)
        monkeypatch.setenv("SYNC_WORKER_STORAGE", str(server.storage_path))
        value = server.auth_string if auth_string is _SERVER_AUTH else auth_string
        if value is not None:
            monkeypatch.setenv(auth_variable, str(value))
        for name, value in extra.items():
            monkeypatch.setenv(name, value)

    return configure


@pytest.fixture
def start_worker() -> Iterator[Callable[..., object]]:
    """Factory: start a sync_worker TaskWorker in this process (non-blocking); stopped and
    drained (bounded) at teardown."""
    workers: list = []

    def start(*tasks: object, limit: int | None = 4) -> object:
        from sync_worker import TaskWorker

        worker = TaskWorker(*tasks, limit=limit)
        workers.append(worker)
        return worker.start(block=False)

    yield start
    for worker in workers:
        worker.stop()
    for worker in workers:
        assert worker.join(30), f"{worker!r} did not drain within 30s"
