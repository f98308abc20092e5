"""The submitting side's transport (``client.transport``): creates and waits over the rpc
socket when the server serves one, else REST; the brief create answer only when announced.

The brief answer's server half lives in the embedded server (announced as ``brief_create``
in the rpc socket's ``auth_success``). The client half is tested here against a tiny fake
rpc server that announces it or not, so that it holds whether or not the embedded server of
this tree announces it; the tests against the real server hold either way."""
from __future__ import annotations

import dataclasses
import json
import re
import threading
import uuid
from datetime import datetime, timezone
from typing import Any

import pytest
import simple_websocket
from simple_websocket.errors import ConnectionClosed
from werkzeug.serving import make_server

from sync_worker.client import Client
from sync_worker.schemas import Completed, Pending, Running, Scheduled, StateType, TaskRun, task_run_create
from sync_worker.storage import LocalDirectoryStore, write_result
from sync_worker.tasks import TaskRunFuture, task
from sync_worker.transport import BRIEF_CREATE


@task(task_key="tests.transport.double")
def double(x: int) -> int:
    return 2 * x


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class FakeRpcServer:
    """An rpc socket (``create`` and ``wait``) and ``GET /api/task_runs/<id>``, with runs
    kept in a dict: what a client's transport talks to, and nothing else."""

    def __init__(self, extensions: list[str]) -> None:
        self.extensions = extensions
        self.runs: dict[str, dict[str, Any]] = {}
        self.messages: list[dict[str, Any]] = []
        self.replies: list[dict[str, Any]] = []
        #: rpc message types answered by closing the socket instead (a socket that breaks)
        self.drop: set[str] = set()
        self.rest_creates = 0
        self._server = make_server("127.0.0.1", 0, self._app, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}/api"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._thread.join(timeout=10)

    def _app(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        path = environ["PATH_INFO"]
        if path == "/api/sync_worker/rpc":
            self._serve_rpc(simple_websocket.Server(environ, subprotocols=["prefect"]))
            raise ConnectionError("websocket done")  # how werkzeug is told the connection is taken
        if environ["REQUEST_METHOD"] == "POST" and path == "/api/task_runs/":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            self.rest_creates += 1
            run = self._create(json.loads(environ["wsgi.input"].read(length)))
            start_response("201 Created", [("Content-Type", "application/json")])
            return [json.dumps(run).encode()]
        found = re.fullmatch(r"/api/task_runs/([^/]+)", path)
        if environ["REQUEST_METHOD"] == "GET" and found and found.group(1) in self.runs:
            start_response("200 OK", [("Content-Type", "application/json")])
            return [json.dumps(self.runs[found.group(1)]).encode()]
        start_response("404 Not Found", [("Content-Type", "application/json")])
        return [b'{"detail": "Not found"}']

    def _serve_rpc(self, ws: simple_websocket.Server) -> None:
        try:
            assert json.loads(ws.receive(timeout=10))["type"] == "auth"
            ws.send(json.dumps({"type": "auth_success", "extensions": self.extensions}))
            while True:
                text = ws.receive()
                if text is None:
                    return
                message = json.loads(text)
                self.messages.append(message)
                if message["type"] in self.drop:
                    ws.close()
                    return
                reply = self._answer(message)
                self.replies.append(reply)
                ws.send(json.dumps(reply))
        except ConnectionClosed:
            return

    def _answer(self, message: dict[str, Any]) -> dict[str, Any]:
        request_id = message["request_id"]
        if message["type"] == "wait":
            return {"type": "wait_result", "request_id": request_id, "status_code": 200,
                    "result": self.runs[message["task_run_id"]]}
        run = result = self._create(message["body"])
        if message.get("brief"):
            state = run["state"]
            result = {"id": run["id"], "state": {key: state[key] for key in ("type", "name", "timestamp")}}
        return {"type": "create_result", "request_id": request_id, "status_code": 201, "result": result}

    def _create(self, body: dict[str, Any]) -> dict[str, Any]:
        now = _now()
        return self.runs.setdefault(body["id"], {
            **body, "created": now, "expected_start_time": now, "run_count": 0,
            "state": {**body["state"], "timestamp": now, "id": str(uuid.uuid4())},
        })


@pytest.fixture
def fake_rpc(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.delenv("SYNC_WORKER_FAST_PATH", raising=False)
    servers: list[FakeRpcServer] = []

    def make(extensions: list[str]) -> FakeRpcServer:
        servers.append(FakeRpcServer(extensions))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def _body() -> dict[str, Any]:
    return task_run_create(name="double", task_key="tests.transport.double", state=Scheduled(task_parameters_id="p-1"))


def test_a_brief_create_answer_is_asked_for_only_when_announced(fake_rpc):
    for extensions in ([BRIEF_CREATE], []):
        server = fake_rpc(extensions)
        with Client(server.url) as client:
            body = _body()
            run = client.create_task_run(body, brief=True)
        announced = bool(extensions)
        assert server.messages[0].get("brief", False) is announced
        assert set(server.replies[0]["result"]) == ({"id", "state"} if announced else set(server.runs[body["id"]]))
        # the same run either way: the id the body chose, the server's state, the body's fields
        assert (run.id, run.task_key, run.state.type, run.state.name) == (
            body["id"], "tests.transport.double", StateType.SCHEDULED, "Scheduled")
        assert run.labels == body["labels"] and run.state.timestamp is not None
        assert run.state.state_details.task_parameters_id == "p-1" and run.state.state_details.deferred
        # fields only the server makes are absent from a brief answer, present in the whole one
        assert (run.created is None) is announced


def test_a_create_asks_for_the_whole_run_unless_told_otherwise(fake_rpc):
    # the Django backend reads `created` (enqueued_at): only `.delay()` asks for less
    server = fake_rpc([BRIEF_CREATE])
    with Client(server.url) as client:
        run = client.create_task_run(_body())
    assert "brief" not in server.messages[0] and run.created is not None


def test_a_future_from_a_brief_answer_has_the_runs_id_and_state(fake_rpc, tmp_path):
    server = fake_rpc([BRIEF_CREATE])
    with Client(server.url) as client:
        future = double.apply_async((21,), client=client, store=LocalDirectoryStore(tmp_path))
        assert server.messages[0]["brief"] is True and set(server.replies[0]["result"]) == {"id", "state"}
        assert future.task_run_id == server.messages[0]["body"]["id"]
        assert future.state.type is StateType.SCHEDULED  # read over REST: the whole run
        assert future.task_run.created is not None
        run = server.runs[future.task_run_id]
        run["state"] = {"type": "COMPLETED", "name": "Completed", "timestamp": _now(), "data": None}
        assert future.wait(timeout=10).type is StateType.COMPLETED  # pushed over the socket
        assert server.messages[-1]["type"] == "wait"


def test_a_brief_answer_naming_a_finished_run_is_followed_by_a_read_of_the_whole_run(fake_rpc):
    # a create repeated after its answer was lost, the run having finished meanwhile: the
    # future must not take the brief state (no result in it) for the final one
    server = fake_rpc([BRIEF_CREATE])
    body = _body()
    data = {"type": "json", "value": 42}
    server.runs[body["id"]] = {**body, "created": _now(),
                               "state": {"type": "COMPLETED", "name": "Completed", "timestamp": _now(), "data": data}}
    with Client(server.url) as client:
        run = client.create_task_run(body, brief=True)
    assert server.messages[0]["brief"] is True and "data" not in server.replies[0]["result"]["state"]
    assert run.state.type is StateType.COMPLETED and run.state.data == data and run.created is not None


def test_delay_and_result_on_the_embedded_server_with_whatever_it_announces(server, tmp_path):
    # the real rpc socket: brief answers if this server announces them, whole runs if not;
    # the future works the same
    store = LocalDirectoryStore(tmp_path)
    with Client(server.url) as client:
        future = double.apply_async((21,), client=client, store=store)
        announced = BRIEF_CREATE in client.transport.channel.connection().extensions
        assert (future._last.created is None) is announced
        assert future.state.type is StateType.SCHEDULED
        for state in (Pending(), Running(), Completed(data=write_result(store, 42))):
            client.set_task_run_state(future.task_run_id, state)
        assert future.result(timeout=10) == 42


def test_without_the_rpc_socket_creates_and_waits_use_rest(server, tmp_path, monkeypatch):
    monkeypatch.setenv("SYNC_WORKER_FAST_PATH", "false")
    store = LocalDirectoryStore(tmp_path)
    requests_made: list[str] = []
    with Client(server.url) as client:
        original = client.request

        def counting(method: str, path: str, **kwargs: Any) -> Any:
            requests_made.append(f"{method} {path}")
            return original(method, path, **kwargs)

        client.request = counting  # type: ignore[method-assign]
        future = double.apply_async((21,), client=client, store=store)
        assert client.transport.channel is None and requests_made == ["POST /task_runs/"]
        assert future._last.created is not None  # REST answers the whole run
        assert not future.wait(timeout=0.2).is_terminal()  # polled
        for state in (Pending(), Running(), Completed(data=write_result(store, 42))):
            client.set_task_run_state(future.task_run_id, state)
        assert future.result(timeout=10) == 42
    assert requests_made.count(f"GET /task_runs/{future.task_run_id}") >= 2


def test_a_create_whose_socket_breaks_goes_over_rest_at_once(fake_rpc, caplog):
    # one attempt = the socket, then REST at once: no backoff, no "trying again"; the run
    # is created once (the fake keys runs by the body's id, as both real servers do)
    server = fake_rpc([BRIEF_CREATE])
    server.drop.add("create")
    body = _body()
    with Client(server.url) as client:
        run = client.create_task_run(body, brief=True)
    assert [m["type"] for m in server.messages] == ["create"] and server.rest_creates == 1
    assert run.id == body["id"] and run.created is not None  # REST answers the whole run
    assert list(server.runs) == [body["id"]]
    assert "trying again" not in caplog.text


def test_a_wait_whose_socket_breaks_reads_the_run_over_rest(fake_rpc):
    server = fake_rpc([])
    body = _body()
    server.runs[body["id"]] = {**body, "state": {"type": "COMPLETED", "name": "Completed", "timestamp": _now()}}
    server.drop.add("wait")
    with Client(server.url) as client:
        run = client.transport.wait(body["id"], timeout=10)
    assert [m["type"] for m in server.messages] == ["wait"]
    assert run.state.type is StateType.COMPLETED


def test_a_brief_run_reads_its_json_only_when_asked_and_then_is_the_whole_run():
    from sync_worker.transport import BriefRun

    body = task_run_create(name="noop", task_key="t.noop", state=Scheduled())
    result = {"id": body["id"], "state": {"type": "SCHEDULED", "name": "Scheduled",
                                          "timestamp": "2026-11-30T10:10:34.141569Z"}}
    source = {**body, **result, "state": {**body["state"], **result["state"]}}
    run = BriefRun(body["id"], source)
    assert isinstance(run, TaskRun) and run.unfinished
    assert set(vars(run)) == {"id", "unfinished", "_source"}  # nothing read yet
    assert run.state.type is StateType.SCHEDULED and run.state.timestamp is not None
    assert "_source" not in vars(run)
    whole = TaskRun.from_json(source)
    assert {k: v for k, v in vars(run).items() if k != "unfinished"} == vars(whole)
    # a copy with another state is a run like any other (dataclasses.replace, as dialects do)
    finished = dataclasses.replace(run, state=Completed())
    assert finished.state.type is StateType.COMPLETED and TaskRunFuture._finished(finished)
    assert finished.id == run.id and finished.created == whole.created
    assert run.unfinished and not TaskRunFuture._finished(run)
