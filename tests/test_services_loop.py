"""critical_service_loop: Prefect's semantics, run synchronously.

Errors are real: a requests.get to a closed port on 127.0.0.1 (ConnectionError), and a
small HTTP server on 127.0.0.1:0 answering the status code named in the path (5xx, 4xx,
and a refused websocket handshake). Sleeps are injected (recorded) so the tests are fast
and can assert the exact intervals requested; the stop tests use real waits.
"""
from __future__ import annotations

import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
import websocket
from prometheus_client import REGISTRY

from sync_worker.exceptions import APIError
from sync_worker.services import critical_service_loop, is_intermittent

THRESHOLD_MESSAGE = "\nFailed the last 3 attempts. Please check your environment and configuration."
EXAMPLES_MESSAGE = "Examples of recent errors:\n"
RESET_MESSAGE = "Resetting backoff due to successful run."


def backing_off(seconds: object) -> str:
    return f"Backing off due to consecutive errors, using increased interval of  {seconds}s."


class _StatusHandler(BaseHTTPRequestHandler):
    """GET /<code> answers with that status code (a websocket upgrade included)."""

    def do_GET(self) -> None:
        code = int(self.path.strip("/").split("/")[0])
        body = b'{"detail": "scripted"}'
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def http_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StatusHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()


@pytest.fixture(scope="module")
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Recorder:
    """The printer: records each call's arguments."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    def __call__(self, *args: object) -> None:
        self.calls.append(args)

    @property
    def texts(self) -> list[str]:
        return [" ".join(str(a) for a in args) for args in self.calls]


class Script:
    """A workload that plays a list of actions: "ok", "refused", a status code, or an
    exception to raise. Every failure is produced by a real request."""

    def __init__(self, actions: list[object], http: str, closed_port: int) -> None:
        self.actions = list(actions)
        self.http = http
        self.closed_port = closed_port
        self.calls = 0
        self.__name__ = "scripted_workload"

    def __call__(self) -> None:
        action = self.actions[min(self.calls, len(self.actions) - 1)]
        self.calls += 1
        if action == "ok":
            return
        if action == "refused":
            requests.get(f"http://127.0.0.1:{self.closed_port}/", timeout=5)
            raise AssertionError("the closed port answered")
        if action == "ws401":
            websocket.create_connection(f"ws://{self.http}/401", timeout=5)
            raise AssertionError("the handshake succeeded")
        if isinstance(action, int):
            requests.get(f"http://{self.http}/{action}", timeout=5).raise_for_status()
            return
        assert isinstance(action, BaseException)
        raise action


class SleepRecorder:
    """Injected sleep: records the seconds requested and stops the loop after ``limit``."""

    def __init__(self, stop: threading.Event, limit: int) -> None:
        self.seconds: list[float] = []
        self.stop = stop
        self.limit = limit

    def __call__(self, seconds: float) -> None:
        self.seconds.append(seconds)
        if len(self.seconds) >= self.limit:
            self.stop.set()


@pytest.fixture
def make(http_server: str, closed_port: int):
    def _make(actions: list[object], sleeps: int = 100) -> tuple[Script, Recorder, SleepRecorder, threading.Event]:
        stop = threading.Event()
        return Script(actions, http_server, closed_port), Recorder(), SleepRecorder(stop, sleeps), stop

    return _make


def errors_counted(exception: str) -> float:
    value = REGISTRY.get_sample_value("sync_worker_service_loop_errors_total", {"exception": exception})
    return value or 0.0


def test_success_path_calls_every_interval_and_prints_nothing(make) -> None:
    workload, printer, sleep, stop = make(["ok"], sleeps=4)
    critical_service_loop(workload, 0.5, printer=printer, stop_event=stop, sleep=sleep)
    assert workload.calls == 4
    assert sleep.seconds == [0.5, 0.5, 0.5, 0.5]
    assert printer.calls == []


def test_errors_below_threshold_are_forgiven_and_counted(make) -> None:
    before_conn, before_http = errors_counted("ConnectionError"), errors_counted("HTTPError")
    workload, printer, sleep, stop = make(["refused", 503, "ok", "refused", "refused", "ok", "ok"], sleeps=7)
    critical_service_loop(workload, 1, printer=printer, stop_event=stop, sleep=sleep)
    assert workload.calls == 7
    assert sleep.seconds == [1] * 7  # never backed off
    assert printer.calls == []
    assert errors_counted("ConnectionError") - before_conn == 3
    assert errors_counted("HTTPError") - before_http == 1


def test_threshold_prints_one_example_per_type_then_backs_off_doubling(make) -> None:
    actions = ["refused", 503, "refused", "refused", "refused", "refused", "ok", "ok"]
    workload, printer, sleep, stop = make(actions, sleeps=8)
    critical_service_loop(workload, 1, backoff=3, printer=printer, stop_event=stop, sleep=sleep)

    assert workload.calls == 8
    # 1st threshold after call 3 -> interval 2; 2nd after call 6 -> 4; success resets to 1.
    assert sleep.seconds == [1, 1, 2, 2, 2, 4, 1, 1]
    texts = printer.texts
    # First summary: two exception types, the most recent example first.
    assert texts[0] == THRESHOLD_MESSAGE
    assert texts[1] == EXAMPLES_MESSAGE
    assert texts[2].startswith("Traceback (most recent call last):")
    assert "requests.exceptions.ConnectionError" in texts[2]
    assert texts[3] == ""  # a blank line after each example
    assert "requests.exceptions.HTTPError: 503 Server Error" in texts[4]
    assert texts[5] == ""
    assert texts[6] == backing_off(2)
    # Second summary: the failures were cleared, only ConnectionErrors since.
    assert texts[7:9] == [THRESHOLD_MESSAGE, EXAMPLES_MESSAGE]
    assert "requests.exceptions.ConnectionError" in texts[9] and texts[10] == ""
    assert texts[11] == backing_off(4)
    assert texts[12:] == [RESET_MESSAGE]  # said once, on the first success only
    assert len(printer.calls) == 13


def test_success_after_backoff_resets_interval_with_message(make) -> None:
    workload, printer, sleep, stop = make(["refused"] * 3 + ["ok"], sleeps=5)
    critical_service_loop(workload, 0.25, backoff=2, printer=printer, stop_event=stop, sleep=sleep)
    assert workload.calls == 5
    assert sleep.seconds == [0.25, 0.25, 0.5, 0.25, 0.25]
    assert printer.texts[-2:] == [backing_off(0.5), RESET_MESSAGE]
    assert printer.texts.count(RESET_MESSAGE) == 1


def test_a_logger_method_works_as_printer(make, caplog: pytest.LogCaptureFixture) -> None:
    # The worker passes logger.warning; every printer call must be a valid log call.
    workload, _, sleep, stop = make(["refused"])
    with caplog.at_level(logging.WARNING, logger="tests.printer"), pytest.raises(RuntimeError):
        critical_service_loop(
            workload, 1, printer=logging.getLogger("tests.printer").warning, stop_event=stop, sleep=sleep
        )
    logged = [r.getMessage() for r in caplog.records if r.name == "tests.printer"]
    assert logged[:2] == [THRESHOLD_MESSAGE, EXAMPLES_MESSAGE]
    assert "requests.exceptions.ConnectionError" in logged[2]
    assert logged[3:] == [""]


def test_default_backoff_raises_at_first_threshold(make) -> None:
    workload, printer, sleep, stop = make(["refused"])
    with pytest.raises(RuntimeError, match=r"^Service exceeded error threshold\.$"):
        critical_service_loop(workload, 1, printer=printer, stop_event=stop, sleep=sleep)
    assert workload.calls == 3
    assert sleep.seconds == [1, 1]
    assert printer.texts[:2] == [THRESHOLD_MESSAGE, EXAMPLES_MESSAGE]
    assert not any("Backing off" in t for t in printer.texts)


def test_backoff_exhausted_raises_runtime_error(make) -> None:
    workload, printer, sleep, stop = make([503])
    with pytest.raises(RuntimeError, match=r"^Service exceeded error threshold\.$"):
        critical_service_loop(workload, 1, consecutive=2, backoff=3, printer=printer, stop_event=stop, sleep=sleep)
    # consecutive=2: thresholds after calls 2, 4, 6; the third one (= backoff) raises.
    assert workload.calls == 6
    assert sleep.seconds == [1, 2, 2, 4, 4]
    assert printer.texts.count("\nFailed the last 2 attempts. Please check your environment and configuration.") == 3
    assert [t for t in printer.texts if "Backing off" in t] == [backing_off(2), backing_off(4)]


def test_memory_limits_the_remembered_failures(make) -> None:
    # memory=1: only the latest failure is remembered, so one example though two types.
    workload, printer, sleep, stop = make([503, 503, "refused"])
    with pytest.raises(RuntimeError):
        critical_service_loop(workload, 1, memory=1, printer=printer, stop_event=stop, sleep=sleep)
    tracebacks = [t for t in printer.texts if t.startswith("Traceback")]
    assert len(tracebacks) == 1 and "ConnectionError" in tracebacks[0]


@pytest.mark.parametrize(
    ("action", "error"),
    [
        (404, requests.HTTPError),
        (401, requests.HTTPError),
        ("ws401", websocket.WebSocketBadStatusException),
        (ValueError("a bug"), ValueError),
        (APIError("conflict", status_code=409), APIError),
    ],
    ids=["http-404", "http-401", "websocket-401", "bug", "api-error-409"],
)
def test_non_intermittent_errors_propagate_at_once(make, action: object, error: type) -> None:
    workload, printer, sleep, stop = make(["ok", action])
    with pytest.raises(error) as info:
        critical_service_loop(workload, 1, backoff=5, printer=printer, stop_event=stop, sleep=sleep)
    assert workload.calls == 2
    assert sleep.seconds == [1]
    assert printer.calls == []
    if action == "ws401":
        assert info.value.status_code == 401


def test_control_flow_exception_ends_the_loop() -> None:
    class StopTaskWorker(Exception):
        pass

    calls = []

    def workload() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise StopTaskWorker

    with pytest.raises(StopTaskWorker):
        critical_service_loop(workload, 1, sleep=lambda s: None, printer=pytest.fail)
    assert len(calls) == 3


def test_run_once_returns_after_one_call(make) -> None:
    workload, printer, sleep, stop = make(["ok"])
    critical_service_loop(workload, 1, printer=printer, run_once=True, stop_event=stop, sleep=sleep)
    assert (workload.calls, sleep.seconds, printer.calls) == (1, [], [])


def test_run_once_swallows_an_intermittent_error(make) -> None:
    workload, printer, sleep, stop = make(["refused"])
    critical_service_loop(workload, 1, printer=printer, run_once=True, stop_event=stop, sleep=sleep)
    assert (workload.calls, sleep.seconds, printer.calls) == (1, [], [])


def test_run_once_still_raises_when_a_single_failure_reaches_the_threshold(make) -> None:
    workload, printer, sleep, _stop = make(["refused"])
    with pytest.raises(RuntimeError, match="Service exceeded error threshold"):
        critical_service_loop(workload, 1, consecutive=1, printer=printer, run_once=True, sleep=sleep)
    assert workload.calls == 1
    assert printer.texts[0] == "\nFailed the last 1 attempts. Please check your environment and configuration."


def test_jitter_applies_to_the_backed_off_interval(make) -> None:
    workload, printer, sleep, stop = make(["refused"] * 3 + ["ok"], sleeps=400)
    critical_service_loop(workload, 10, backoff=2, jitter_range=0.3, printer=printer, stop_event=stop, sleep=sleep)
    assert workload.calls == 400
    assert printer.texts[-2:] == [backing_off(20), RESET_MESSAGE]
    before, backed_off, after = sleep.seconds[:2], sleep.seconds[2], sleep.seconds[3:]
    assert all(7 < s < 13 for s in before + after)
    assert 14 < backed_off < 26
    assert len(set(after)) == len(after)  # random draws, not a constant
    assert abs(sum(after) / len(after) - 10) < 0.3  # SE ~0.09 for 397 draws with sd ~1.6


@pytest.mark.parametrize("jitter_range", [0, -0.5])
def test_invalid_jitter_range_is_rejected_before_any_call(make, jitter_range: float) -> None:
    workload, _printer, sleep, _stop = make(["ok"])
    with pytest.raises(ValueError, match="must be > 0"):
        critical_service_loop(workload, 1, jitter_range=jitter_range, sleep=sleep)
    assert workload.calls == 0


def test_stop_event_set_before_start_means_no_call(make) -> None:
    workload, _printer, _sleep, stop = make(["ok"])
    stop.set()
    critical_service_loop(workload, 1, stop_event=stop)
    assert workload.calls == 0


def _run_in_thread(target, **kwargs) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            critical_service_loop(target, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def _stop_and_time(stop: threading.Event, thread: threading.Thread) -> float:
    time.sleep(0.05)  # let the loop get into its wait
    started = time.monotonic()
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive(), "the loop did not return after stop"
    return time.monotonic() - started


def test_stop_from_another_thread_interrupts_the_interval_sleep(make) -> None:
    workload, printer, _, stop = make(["ok"])
    ran = threading.Event()

    def tracked() -> None:
        workload()
        ran.set()

    thread, errors = _run_in_thread(tracked, interval=60, printer=printer, stop_event=stop)
    assert ran.wait(timeout=10), "the workload never ran"
    assert _stop_and_time(stop, thread) < 1.0  # not 60 s
    assert (errors, workload.calls, printer.calls) == ([], 1, [])


def test_stop_from_another_thread_interrupts_the_backoff_sleep(make) -> None:
    workload, recorder, _, stop = make(["refused"])
    backing_off_now = threading.Event()

    def printer(*args: object) -> None:
        recorder(*args)
        if args and str(args[0]).startswith("Backing off"):
            backing_off_now.set()

    # consecutive=1: the first failure starts a backoff of 60 * 2 = 120 s.
    thread, errors = _run_in_thread(
        workload, interval=60, consecutive=1, backoff=2, printer=printer, stop_event=stop
    )
    assert backing_off_now.wait(timeout=10), recorder.texts
    assert _stop_and_time(stop, thread) < 1.0  # not 120 s
    assert errors == [] and workload.calls == 1
    assert recorder.texts[-1] == backing_off(120)


def test_each_run_is_logged_at_debug(make, caplog: pytest.LogCaptureFixture) -> None:
    workload, printer, sleep, stop = make(["ok", "refused", "ok"], sleeps=3)
    with caplog.at_level(logging.DEBUG, logger="sync_worker.services"):
        critical_service_loop(workload, 1, printer=printer, stop_event=stop, sleep=sleep)
    records = [r for r in caplog.records if r.name == "sync_worker.services"]
    assert [r.getMessage() for r in records if r.getMessage().startswith("Starting run")] == [
        "Starting run of 'scripted_workload'"
    ] * 3
    failed = [r for r in records if "failed with ConnectionError" in r.getMessage()]
    assert len(failed) == 1 and failed[0].levelno == logging.DEBUG and failed[0].exc_info


# ---------------------------------------------------------------------------------------
# is_intermittent
# ---------------------------------------------------------------------------------------


def _capture(fn) -> BaseException:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - the error is the result
        return exc
    raise AssertionError("no exception")


def test_is_intermittent_on_real_errors(http_server: str, closed_port: int) -> None:
    def http(code: int) -> BaseException:
        return _capture(lambda: requests.get(f"http://{http_server}/{code}", timeout=5).raise_for_status())

    def ws(code: int) -> BaseException:
        return _capture(lambda: websocket.create_connection(f"ws://{http_server}/{code}", timeout=5))

    refused = _capture(lambda: requests.get(f"http://127.0.0.1:{closed_port}/", timeout=5))
    raw_refused = _capture(lambda: socket.create_connection(("127.0.0.1", closed_port), timeout=5))
    ws_refused = _capture(lambda: websocket.create_connection(f"ws://127.0.0.1:{closed_port}/", timeout=5))

    assert isinstance(refused, requests.ConnectionError) and is_intermittent(refused)
    assert isinstance(raw_refused, ConnectionRefusedError) and is_intermittent(raw_refused)
    assert is_intermittent(ws_refused)
    for code in (500, 502, 503):
        assert is_intermittent(http(code)), code
        assert is_intermittent(ws(code)), code
    # 501 / 505: another kind of web server is at this URL; it answers the same every time
    for code in (400, 401, 403, 404, 422, 501, 505):
        assert not is_intermittent(http(code)), code
        assert not is_intermittent(ws(code)), code


def test_is_intermittent_on_a_real_timeout() -> None:
    with socket.socket() as listener:  # accepts (backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        timeout = _capture(lambda: requests.get(f"http://127.0.0.1:{port}/", timeout=0.2))
        ws_timeout = _capture(lambda: websocket.create_connection(f"ws://127.0.0.1:{port}/", timeout=0.2))
    assert isinstance(timeout, requests.Timeout) and is_intermittent(timeout)
    assert isinstance(ws_timeout, (websocket.WebSocketTimeoutException, TimeoutError)) and is_intermittent(ws_timeout)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (APIError("down", status_code=503), True),
        (APIError("gone", status_code=404), False),
        (websocket.WebSocketConnectionClosedException("closed"), True),
        (websocket.WebSocketTimeoutException("timed out"), True),
        (websocket.WebSocketAddressException("no such host"), True),
        (websocket.WebSocketBadStatusException("Handshake status %d", 503), True),
        (websocket.WebSocketBadStatusException("Handshake status %d", 403), False),
        (websocket.WebSocketProtocolException("bad frame"), False),
        (ConnectionResetError(), True),
        (BrokenPipeError(), True),
        (TimeoutError(), True),
        (requests.Timeout(), True),
        (requests.HTTPError("no response attached"), False),
        (FileNotFoundError(), False),
        (KeyError("x"), False),
    ],
)
def test_is_intermittent_classification(exc: BaseException, expected: bool) -> None:
    assert is_intermittent(exc) is expected


def test_importing_services_stays_light() -> None:
    code = (
        "import sys, sync_worker.services; "
        "heavy = [m for m in ('requests', 'websocket', 'prometheus_client', 'asyncio') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_an_error_is_classified_while_another_thread_still_imports_requests(tmp_path, monkeypatch) -> None:
    """A module half imported by another thread is in sys.modules without its names yet:
    classifying an error then waits for that import instead of failing on the half-made
    module (a worker died of "partially initialized module 'requests' has no attribute
    'HTTPError'" when its first REST fallback imported requests during a server restart)."""
    from sync_worker.services import loaded_module

    (tmp_path / "slow_http_lib.py").write_text(
        "import time\nSTARTED = True\ntime.sleep(0.5)\nclass HTTPError(Exception):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "slow_http_lib", raising=False)
    importer = threading.Thread(target=__import__, args=("slow_http_lib",))
    importer.start()
    deadline = time.monotonic() + 10
    while "slow_http_lib" not in sys.modules:  # the import under way, its module half made
        assert time.monotonic() < deadline, "the import did not start"
        time.sleep(0.001)
    module = loaded_module("slow_http_lib")
    assert module is not None and issubclass(module.HTTPError, Exception)
    importer.join(10)
    assert loaded_module("not_imported_anywhere_xyz") is None
