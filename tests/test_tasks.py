"""Submitting: @task, .delay/.apply_async and TaskRunFuture against the embedded server."""
from __future__ import annotations

import datetime
import socket

import pytest

from sync_worker.client import Client
from sync_worker.exceptions import SerializationError, TaskRunFailed
from sync_worker.schemas import Completed, Failed, Pending, Running, StateType
from sync_worker.storage import LocalDirectoryStore, read_parameters, write_exception, write_result
from sync_worker.tasks import Task, task
from sync_worker.transport import SubmitTransport


@task(retries=2, retry_delay_seconds=[1, 5], tags=["b", "a"])
def add(x: int, y: int = 10) -> int:
    return x + y


@task
def no_args() -> str:
    return "hi"


@pytest.fixture
def store(tmp_path):
    return LocalDirectoryStore(tmp_path / "records")


@pytest.fixture
def unreachable_client():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return Client(f"http://127.0.0.1:{port}/api", retry_attempts=1)


def test_decorator_forms_and_inline_call():
    assert add(1, 2) == 3
    assert isinstance(add, Task) and add.name == "add"
    assert add.task_key == "test_tasks.add"
    assert add.tags == ["a", "b"]
    custom = task(name="n", task_key="my.key")(lambda: 1)
    assert custom.task_key == "my.key" and custom.name == "n"
    with pytest.raises(TypeError, match="coroutine"):
        task(_async_fn)


async def _async_fn():
    return 1


def test_delay_creates_a_scheduled_deferred_run_with_stored_parameters(server, store):
    client = Client(server.url)
    future = add.apply_async((1,), client=client, store=store)
    run = client.read_task_run(future.task_run_id)
    assert run.task_key == add.task_key and run.name == "add"
    assert run.state.type is StateType.SCHEDULED and run.state.state_details.deferred is True
    assert run.empirical_policy.retries == 2 and run.empirical_policy.retry_delay == [1.0, 5.0]
    assert sorted(run.tags) == ["a", "b"]
    assert set(run.task_inputs) == {"x", "y"}
    stored = read_parameters(store, run.state.state_details.task_parameters_id)
    assert stored["parameters"] == {"x": 1, "y": 10}


def test_no_parameters_no_record(server, store):
    future = no_args.apply_async(client=Client(server.url), store=store)
    assert future.task_run.state.state_details.task_parameters_id is None
    assert not store.path.exists() or not [p for p in store.path.rglob("*") if p.is_file()]


def test_wrong_call_fails_in_the_caller_before_any_request(unreachable_client, store):
    with pytest.raises(TypeError, match=r"add\(\): missing a required argument: 'x'"):
        add.apply_async((), {}, client=unreachable_client, store=store)
    with pytest.raises(TypeError, match="unexpected keyword argument 'z'"):
        add.apply_async((1,), {"z": 2}, client=unreachable_client, store=store)


def test_unserializable_parameters_create_nothing(unreachable_client, store):
    with pytest.raises(SerializationError, match="'x' \\(datetime\\)"):
        add.apply_async((datetime.datetime.now(),), client=unreachable_client, store=store)
    nested: list = []
    for _ in range(5000):  # deeper than the JSON encoder's recursion allows
        nested = [nested]
    with pytest.raises(SerializationError, match="'y' \\(list\\).*maximum recursion depth"):
        add.apply_async((1, nested), client=unreachable_client, store=store)
    assert not store.path.exists() or not [p for p in store.path.rglob("*") if p.is_file()]


def test_an_unreachable_server_raises_server_unavailable_and_keeps_the_parameters(store, monkeypatch):
    # the run may exist (the answer may be what was lost): it must not lose its parameters
    from sync_worker.exceptions import ServerUnavailable

    monkeypatch.setenv("SYNC_WORKER_SUBMIT_TIMEOUT", "0.5")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ServerUnavailable, match="SYNC_WORKER_SUBMIT_TIMEOUT"):
        add.apply_async((1,), client=Client(f"http://127.0.0.1:{port}/api"), store=store)
    assert [p for p in store.path.rglob("*") if p.is_file()]


@pytest.mark.parametrize("size", [10, 100_000], ids=["carried-in-the-create", "too-large-to-carry"])
def test_an_unreachable_server_with_server_storage_raises_server_unavailable_at_the_submit_timeout(
        monkeypatch, size):
    """``SYNC_WORKER_STORAGE=server``: a record too large for the create's message is written
    by the create's own attempts, so the submit's one rule holds whatever the argument's size:
    retried until ``SYNC_WORKER_SUBMIT_TIMEOUT`` (its last attempt at the deadline, not a
    backoff past it), then ``ServerUnavailable``, not a raw ``requests`` error."""
    import time

    from sync_worker.exceptions import ServerUnavailable
    from sync_worker.storage import ServerStore

    monkeypatch.setenv("SYNC_WORKER_SUBMIT_TIMEOUT", "1.5")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = Client(f"http://127.0.0.1:{port}/api")
    started = time.monotonic()
    with pytest.raises(ServerUnavailable, match="within 1.5 s"):
        add.apply_async(("x" * size,), client=client, store=ServerStore(client))
    assert 1.5 <= time.monotonic() - started < 2.5


@pytest.mark.parametrize("fast_path", ["true", "false"], ids=["rpc-first", "rest"])
def test_a_server_that_never_answers_raises_server_unavailable_at_the_submit_timeout(store, monkeypatch, fast_path):
    """A server that accepts connections and never answers (stopped with SIGSTOP, swapping):
    each request of a create waits at most until the submit deadline, not a request timeout
    (30 s) per attempt; ``.delay()`` took 213 s with SYNC_WORKER_SUBMIT_TIMEOUT=3."""
    import time

    from sync_worker.exceptions import ServerUnavailable

    monkeypatch.setenv("SYNC_WORKER_SUBMIT_TIMEOUT", "1.5")
    monkeypatch.setenv("SYNC_WORKER_FAST_PATH", fast_path)
    with socket.socket() as listener:  # the kernel completes connections; nobody reads them
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        client = Client(f"http://127.0.0.1:{listener.getsockname()[1]}/api")
        started = time.monotonic()
        with pytest.raises(ServerUnavailable, match="within 1.5 s") as info:
            add.apply_async((1,), client=client, store=store)
        assert time.monotonic() - started < 3.0
        client.close()
    # the run may exist (a server that took a request and stopped answering): its id says which to look up
    assert info.value.task_run_id and f"look up {info.value.task_run_id} before submitting again" in str(info.value)


def test_a_refused_create_removes_the_parameters(server, store, monkeypatch):
    from sync_worker.exceptions import APIError

    def refused(self, body, brief=False, parameters_record=None, deadline=None):  # the server answers 422: certainly not created
        raise APIError("POST /task_runs/ failed with 422", status_code=422)

    monkeypatch.setattr(SubmitTransport, "create", refused)
    with pytest.raises(APIError):
        add.apply_async((1,), client=Client(server.url), store=store)
    assert store.path.exists() and not [p for p in store.path.rglob("*") if p.is_file()]


def test_future_result_of_a_completed_run(server, store):
    client = Client(server.url)
    future = add.apply_async((1, 2), client=client, store=store)
    client.set_task_run_state(future.task_run_id, Pending())
    client.set_task_run_state(future.task_run_id, Running())
    client.set_task_run_state(future.task_run_id, Completed(data=write_result(store, {"sum": 3})))
    assert future.result(timeout=5) == {"sum": 3}
    assert future.state.is_completed()


def test_future_of_a_failed_run_raises_with_the_remote_traceback(server, store):
    client = Client(server.url)
    future = no_args.apply_async(client=client, store=store)
    try:
        raise KeyError("missing")
    except KeyError as exc:
        data = write_exception(store, exc)
    client.set_task_run_state(future.task_run_id, Pending())
    client.set_task_run_state(future.task_run_id, Running())
    client.set_task_run_state(future.task_run_id, Failed("Task run encountered an exception KeyError: 'missing'", data=data))
    with pytest.raises(TaskRunFailed, match="KeyError") as info:
        future.result(timeout=5)
    assert info.value.exception_type == "KeyError"
    assert "Remote traceback" in str(info.value) and 'raise KeyError("missing")' in str(info.value)
    returned = future.result(timeout=5, raise_on_failure=False)
    assert isinstance(returned, TaskRunFailed)


def test_result_times_out_while_the_run_waits(server, store):
    future = no_args.apply_async(client=Client(server.url), store=store)
    with pytest.raises(TimeoutError, match="still Scheduled"):
        future.result(timeout=0.2)
    assert future.wait(timeout=0.05).type is StateType.SCHEDULED


# -- settings and store are resolved cheaply per .delay(), and runtime changes still count --
def test_delay_follows_environment_changes_between_calls(server, tmp_path, monkeypatch, unreachable_client):
    """The settings cache is keyed on the variables' values: a changed SYNC_WORKER_STORAGE or
    SYNC_WORKER_API_URL is used by the very next .delay()."""
    monkeypatch.setenv("SYNC_WORKER_API_URL", server.url)
    monkeypatch.setenv("SYNC_WORKER_STORAGE", str(tmp_path / "first"))
    first = add.delay(1)
    monkeypatch.setenv("SYNC_WORKER_STORAGE", str(tmp_path / "second"))
    second = add.delay(2)
    client = Client(server.url)
    keys = [client.read_task_run(f.task_run_id).state.state_details.task_parameters_id for f in (first, second)]
    assert read_parameters(LocalDirectoryStore(tmp_path / "first"), keys[0])["parameters"] == {"x": 1, "y": 10}
    assert read_parameters(LocalDirectoryStore(tmp_path / "second"), keys[1])["parameters"] == {"x": 2, "y": 10}
    assert not (tmp_path / "first" / "parameters" / keys[1]).exists()

    monkeypatch.setenv("SYNC_WORKER_API_URL", unreachable_client.api_url)
    monkeypatch.setenv("SYNC_WORKER_SUBMIT_TIMEOUT", "0.2")
    from sync_worker.exceptions import ServerUnavailable

    with pytest.raises(ServerUnavailable, match=unreachable_client.api_url):
        no_args.delay()


def test_a_task_without_parameters_still_refuses_arguments(unreachable_client, store):
    with pytest.raises(TypeError, match=r"no_args\(\): too many positional arguments"):
        no_args.apply_async((1,), client=unreachable_client, store=store)
    with pytest.raises(TypeError, match="unexpected keyword argument 'x'"):
        no_args.apply_async((), {"x": 1}, client=unreachable_client, store=store)
    assert no_args.bind() == {}


def test_each_create_body_has_its_own_id_and_dynamic_key():
    from sync_worker.schemas import Scheduled, task_run_create

    bodies = [task_run_create(name="n", task_key="k", state=Scheduled()) for _ in range(3)]
    assert len({b["id"] for b in bodies}) == 3
    assert len({b["dynamic_key"] for b in bodies}) == 3
    assert all(b["dynamic_key"] == "k-" + b["id"].replace("-", "") for b in bodies)
    given = task_run_create(name="n", task_key="k", state=Scheduled(), id="my-id")
    assert given["id"] == "my-id" and given["dynamic_key"].startswith("k-")


@pytest.mark.parametrize("fast_path", ["true", "false"], ids=["rpc-first", "rest"])
def test_result_from_a_server_that_never_answers_ends_near_its_timeout(monkeypatch, fast_path):
    """A server that accepts connections and never answers (SIGSTOP): ``result(timeout=3)``
    took 38 s (a 5 s grace for the rpc answer, then a REST read with the 30 s request
    timeout); now at most LAST_READ_SECONDS past the timeout."""
    import time
    import uuid

    from sync_worker.exceptions import ServerUnavailable
    from sync_worker.tasks import TaskRunFuture

    monkeypatch.setenv("SYNC_WORKER_FAST_PATH", fast_path)
    with socket.socket() as listener:  # the kernel completes connections; nobody reads them
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        client = Client(f"http://127.0.0.1:{listener.getsockname()[1]}/api")
        future = TaskRunFuture(str(uuid.uuid4()), client=client)
        started = time.monotonic()
        with pytest.raises(ServerUnavailable, match="within 1.5 s"):
            future.result(timeout=1.5)
        elapsed = time.monotonic() - started
        client.close()
    assert 1.4 <= elapsed < 4.0, elapsed


def test_result_over_a_link_gone_silent_ends_within_a_second_of_its_timeout(server):
    """The rpc socket was open when the link went silent (a partition): the last chunk's
    answer waited its second past the timeout, then a REST read waited another:
    ``result(timeout=1)`` took 3 s, ``timeout=5`` 7 s."""
    import time
    import uuid

    from sync_worker.exceptions import ObjectNotFound, ServerUnavailable
    from sync_worker.tasks import TaskRunFuture
    from tests.helpers import Relay

    relay = Relay(int(server.url.rsplit(":", 1)[1].split("/", 1)[0]))
    client = Client(relay.url)
    try:
        future = TaskRunFuture(str(uuid.uuid4()), client=client)
        with pytest.raises(ObjectNotFound):
            future.result(timeout=0.3)  # (no such run: the rpc socket is open now)
        assert client.transport.channel is not None
        relay.hold()
        started = time.monotonic()
        with pytest.raises(ServerUnavailable, match="within 2 s"):
            future.result(timeout=2)
        elapsed = time.monotonic() - started
    finally:
        client.close()
        relay.close()
    assert 1.9 <= elapsed < 2 + 1.5, elapsed


@pytest.mark.parametrize("options,message", [
    ({"countdown": float("inf")}, "countdown must be at most 36500 days"),
    ({"countdown": 1e12}, "countdown must be at most 36500 days"),
    ({"eta": __import__("datetime").datetime.max.replace(
        tzinfo=__import__("datetime").timezone(__import__("datetime").timedelta(hours=-5)))},
     "is past what a datetime can hold in UTC"),
])
def test_a_delay_past_what_a_datetime_holds_is_a_value_error(options, message):
    """A bare OverflowError before; nothing is created."""
    with pytest.raises(ValueError, match=message):
        add.apply_async((1,), **options)
