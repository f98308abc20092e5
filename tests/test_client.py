"""The REST client against the real embedded server, and against a stub that fails on purpose."""
from __future__ import annotations

import http.server
import json
import threading
import time

import pytest
import requests

from sync_worker.client import Client
from sync_worker.exceptions import APIError, ObjectNotFound, ServerUnavailable, SyncWorkerError, Unauthorized
from sync_worker.schemas import Pending, Running, Scheduled, SetStateStatus, StateType, task_run_create
from tests.helpers import free_port


def create(client: Client, key: str = "tests.key"):
    return client.create_task_run(task_run_create(name="t", task_key=key, state=Scheduled()))


def test_health_and_round_trip(server):
    client = Client(server.url)
    assert client.health() is True
    run = create(client)
    assert run.state.type is StateType.SCHEDULED and run.state.state_details.deferred is True
    assert client.read_task_run(run.id) == run
    assert client.set_task_run_state(run.id, Pending()).status is SetStateStatus.ACCEPT
    assert client.set_task_run_state(run.id, Running()).state.type is StateType.RUNNING
    client.delete_task_run(run.id)
    with pytest.raises(ObjectNotFound, match="404"):
        client.read_task_run(run.id)


def test_errors_carry_the_servers_detail(server):
    client = Client(server.url)
    with pytest.raises(ObjectNotFound) as info:
        client.read_task_run("00000000-0000-0000-0000-000000000000")
    assert info.value.status_code == 404 and info.value.detail
    with pytest.raises(APIError) as info:
        client.create_task_run({"name": 5})
    assert info.value.status_code == 422
    assert "task_key" in str(info.value.detail) or "name" in str(info.value.detail)


def test_records(server):
    client = Client(server.url)
    client.write_record("abc-1", b'{"x": 1}')
    assert client.read_record("abc-1") == b'{"x": 1}'
    with pytest.raises(ObjectNotFound):
        client.read_record("missing")


def test_wrong_credentials_are_unauthorized_with_a_hint(server_factory):
    server = server_factory(auth_string="admin:secret")
    assert Client(server.url, auth_string="admin:secret").health() is True
    with pytest.raises(Unauthorized, match="SYNC_WORKER_API_AUTH_STRING") as info:
        Client(server.url, auth_string="admin:wrong").read_task_run("x")
    assert info.value.status_code == 401
    with pytest.raises(Unauthorized):
        Client(server.url).health()


def test_websocket_url():
    assert Client("http://h:1/api").websocket_url("task_runs/subscriptions/scheduled") == \
        "ws://h:1/api/task_runs/subscriptions/scheduled"
    assert Client("https://h/api/").websocket_url("/x") == "wss://h/api/x"


def test_server_down_submit_raises_server_unavailable_naming_the_url_and_the_setting(monkeypatch):
    monkeypatch.setenv("SYNC_WORKER_SUBMIT_TIMEOUT", "1")
    url = f"http://127.0.0.1:{free_port()}/api"
    client = Client(url, retry_attempts=2)
    assert client.health() is False
    started = time.monotonic()
    with pytest.raises(ServerUnavailable) as info:
        create(client)
    assert 1 <= time.monotonic() - started < 10  # retried for the submit timeout, then given up
    assert isinstance(info.value, SyncWorkerError) and not isinstance(info.value, requests.RequestException)
    assert url in str(info.value) and "SYNC_WORKER_SUBMIT_TIMEOUT" in str(info.value)


def test_a_future_read_or_cancelled_with_the_server_down_raises_server_unavailable():
    """After a ``ServerUnavailable`` at submit, the README says to look the run up with
    ``TaskRunFuture(exc.task_run_id).state``: with the server still down that raised a raw
    ``requests.ConnectionError``, which an ``except ServerUnavailable`` in a view missed."""
    from sync_worker import TaskRunFuture

    url = f"http://127.0.0.1:{free_port()}/api"
    future = TaskRunFuture("6ba2cc65-0000-4000-8000-000000000000", client=Client(url, retry_attempts=2))
    for action, doing in ((lambda: future.state, "read task run"), (future.cancel, "cancel task run")):
        with pytest.raises(ServerUnavailable) as info:
            action()
        assert isinstance(info.value.__cause__, requests.ConnectionError)
        assert info.value.task_run_id == future.task_run_id
        assert doing in str(info.value) and url in str(info.value)


def test_a_future_of_a_run_the_server_does_not_know_raises_object_not_found(server):
    from sync_worker import TaskRunFuture

    with pytest.raises(ObjectNotFound):
        _ = TaskRunFuture("6ba2cc65-0000-4000-8000-000000000000", client=Client(server.url)).state


@pytest.fixture
def rest_only(monkeypatch):
    """These tests are about the REST policy: no rpc socket (which a stub would count)."""
    monkeypatch.setenv("SYNC_WORKER_FAST_PATH", "false")


class FlakyServer:
    """Answers 503 to the first ``failures`` requests, then ``body``; counts requests.
    ``broken=True``: the failures are answers broken off mid-body instead (200, half the
    bytes its Content-Length announces, then the connection closes)."""

    def __init__(self, failures: int, body: dict, broken: bool = False):
        self.requests = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                outer.requests += 1
                failing = outer.requests <= failures
                status, payload = (503, {"detail": "try later"}) if failing and not broken else (200, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if failing and broken:
                    self.wfile.write(data[: len(data) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/api"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


RUN = {"id": "r1", "name": "t", "task_key": "k", "dynamic_key": "d",
       "state": {"type": "SCHEDULED", "name": "Scheduled"}}


def test_answers_broken_off_mid_body_are_retried_and_end_in_server_unavailable(rest_only, monkeypatch):
    """An answer cut in transit raised requests' raw ChunkedEncodingError from ``.state``,
    ``.result()`` and ``.delay()`` at the first try (a create that may have landed, with no
    run id to look up). Now retried like any connection error; a create that never gets a
    whole answer ends in ServerUnavailable naming the id it was sent under."""
    flaky = FlakyServer(failures=2, body=RUN, broken=True)
    try:
        assert Client(flaky.url, retry_attempts=5).read_task_run("r1").id == "r1"
        assert flaky.requests == 3
    finally:
        flaky.close()
    monkeypatch.setenv("SYNC_WORKER_SUBMIT_TIMEOUT", "0.5")
    flaky = FlakyServer(failures=1000, body=RUN, broken=True)
    try:
        with pytest.raises(ServerUnavailable) as info:
            create(Client(flaky.url, retry_attempts=2))
        assert isinstance(info.value.__cause__, requests.exceptions.ChunkedEncodingError)
        assert info.value.task_run_id and info.value.task_run_id in str(info.value)
        assert flaky.requests >= 2
    finally:
        flaky.close()


def test_reads_are_retried_through_5xx(rest_only):
    flaky = FlakyServer(failures=2, body=RUN)
    try:
        run = Client(flaky.url, retry_attempts=5).read_task_run("r1")
        assert run.id == "r1" and flaky.requests == 3
    finally:
        flaky.close()


def test_creates_are_retried_through_5xx(rest_only):
    # creates carry their run id: a repeat of one that landed answers the same run
    flaky = FlakyServer(failures=2, body=RUN)
    try:
        assert create(Client(flaky.url, retry_attempts=5)).id == "r1"
        assert flaky.requests == 3
    finally:
        flaky.close()


def test_creates_stop_after_the_submit_timeout(rest_only, monkeypatch):
    monkeypatch.setenv("SYNC_WORKER_SUBMIT_TIMEOUT", "0.5")
    flaky = FlakyServer(failures=1000, body=RUN)
    try:
        with pytest.raises(ServerUnavailable) as info:
            create(Client(flaky.url, retry_attempts=2))
        assert isinstance(info.value.__cause__, APIError) and info.value.__cause__.status_code == 503
        assert "the server is running but could not take it" in str(info.value)  # not "is it running?"
        assert flaky.requests >= 2
    finally:
        flaky.close()


def test_another_web_server_at_the_url_is_one_short_error_and_not_retried(rest_only, tmp_path):
    """Python's own file server answers a POST with 501 and an HTML page: no API is there, so
    asking again is pointless, and the error says so in one line instead of quoting the page."""
    requests_seen = []

    class FileServer(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def send_response(self, code, message=None):
            requests_seen.append(code)
            super().send_response(code, message)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FileServer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/api"
    try:
        with pytest.raises(APIError) as info:
            create(Client(url))
        assert info.value.status_code == 501 and requests_seen == [501]
        message = str(info.value)
        assert "\n" not in message and "<" not in message, message
        assert f"an HTML page (Error response), not an API answer: is {url}/task_runs/ on a sync_worker" in message
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_retries_are_bounded(rest_only):
    flaky = FlakyServer(failures=100, body=RUN)
    try:
        with pytest.raises(APIError):
            Client(flaky.url, retry_attempts=3).read_task_run("r1")
        assert flaky.requests == 3
    finally:
        flaky.close()


def test_proxy_settings_from_the_environment_are_still_honoured(server, monkeypatch):
    # proxies are resolved once per client (not per request): a dead proxy breaks this
    # client, and NO_PROXY for the API host exempts it
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("NO_PROXY", "")
    assert Client(server.url, retry_attempts=1).health() is False
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert Client(server.url, retry_attempts=1).health() is True


def test_creates_go_over_the_rpc_socket_of_the_embedded_server(server):
    client = Client(server.url)
    run = create(client)
    assert client.rpc is not None and client.rpc._conn is not None  # the socket carried it
    assert client.read_task_run(run.id).state.type is StateType.SCHEDULED
    with pytest.raises(APIError) as info:  # errors keep their REST shape
        client.create_task_run({"name": 5})
    assert info.value.status_code == 422 and "task_key" in str(info.value.detail)


def test_without_the_rpc_endpoint_creates_use_rest(rest_only, server):
    client = Client(server.url)
    assert client.rpc is None
    assert create(client).state.type is StateType.SCHEDULED


def test_a_failed_rpc_handshake_is_not_retried_right_away(monkeypatch):
    monkeypatch.delenv("SYNC_WORKER_FAST_PATH", raising=False)
    stub = FlakyServer(failures=0, body=RUN)  # any GET (the handshake too) gets a plain 200
    try:
        client = Client(stub.url, retry_attempts=1)
        from sync_worker.rpc import RpcUnavailable

        with pytest.raises(RpcUnavailable):
            client.rpc.connection()
        with pytest.raises(RpcUnavailable, match="failed recently"):
            client.rpc.connection()
        assert stub.requests == 1
    finally:
        stub.close()


def test_a_repeated_create_answers_the_run_it_created(server):
    client = Client(server.url)
    body = task_run_create(name="t", task_key="tests.key", state=Scheduled())
    first = client.create_task_run(body)
    again = client.create_task_run(body)  # e.g. the first answer was lost
    assert again.id == first.id == body["id"]
    other = {**task_run_create(name="t", task_key="tests.key", state=Scheduled()), "id": body["id"]}
    with pytest.raises(APIError) as info:  # a different run with a taken id
        client.create_task_run(other)
    assert info.value.status_code == 409


def test_the_process_client_follows_every_setting_not_only_the_address(monkeypatch):
    """get_client() kept one client per API address: a setting changed since (here
    SYNC_WORKER_FAST_PATH) was ignored for the same address, and .delay() went on using the
    rpc socket it had been told not to (a flaky test in CI, when a port was used again)."""
    from sync_worker.client import get_client

    monkeypatch.setenv("SYNC_WORKER_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.setenv("SYNC_WORKER_FAST_PATH", "true")
    fast = get_client()
    assert fast.settings.fast_path is True and get_client() is fast
    monkeypatch.setenv("SYNC_WORKER_FAST_PATH", "false")
    rest = get_client()
    assert rest is not fast and rest.settings.fast_path is False
    assert rest.transport.channel is None  # no rpc socket asked for
    monkeypatch.setenv("SYNC_WORKER_FAST_PATH", "true")
    assert get_client() is fast  # the same configuration again: the same client
