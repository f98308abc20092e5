"""The subscription's reader yields the GIL after handing out a run of a task whose runs
take a while when more runs of the same message follow (so that the run starts before the
reader hands out the rest of its batch), never after the last run of a message (its next
read releases the GIL anyway), and never after a run of a task whose runs are quick (the
drain would pay for it).

Real embedded server, real websocket, an in-process worker; only ``time`` as the socket
module sees it is wrapped, to count the reader's yields (``time.sleep(0)``)."""
from __future__ import annotations

import threading
import time
import types

import pytest

from sync_worker import sockets as sockets_module
from sync_worker.tasks import task
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(120)


@task(task_key="tests.wrk17.quick")
def quick(i):
    return i


SLEEP = [0.005]  # how long a run of ``slow`` takes


@task(task_key="tests.wrk17.slow")
def slow(i):
    if SLEEP[0]:  # (not even time.sleep(0) when quick: on a loaded host, taking the GIL back
        time.sleep(SLEEP[0])  # after it can take the switch interval, 5 ms, and look slow)
    return i


@pytest.fixture
def yields(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the threads that called ``time.sleep(0)`` in sync_worker.sockets."""
    seen: list[str] = []

    def sleep(seconds: float) -> None:
        if seconds == 0:
            seen.append(threading.current_thread().name)
        time.sleep(seconds)

    proxy = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("_")})
    proxy.sleep = sleep
    monkeypatch.setattr(sockets_module, "time", proxy)
    return seen


def _run_all(fn, n: int) -> list[int]:
    futures = [fn.delay(i) for i in range(n)]
    return [f.result(timeout=60) for f in futures]


def test_runs_of_a_quick_task_are_handed_out_without_yielding(api_env, start_worker, yields):
    worker = start_worker(quick, limit=10)
    assert _run_all(quick, 60) == list(range(60))
    wait_for(lambda: worker.finished_task_runs[quick.task_key] == 60, message="60 runs counted finished")
    assert not worker._yields_after(quick)
    assert yields == []


def test_the_reader_yields_between_the_runs_of_one_message_of_a_slow_task(api_env, start_worker, yields):
    worker = start_worker(slow, limit=10)
    assert _run_all(slow, 2) == [0, 1]  # now the worker knows its runs take ~5 ms
    wait_for(lambda: worker._yields_after(slow), message="the slow task known as slow")
    assert yields == []  # not before it knew
    worker.stop()
    assert worker.join(30)
    # ten runs queued while nobody subscribes: the same worker (it still knows the task is
    # slow) subscribes again with ten free slots, and the server claims them all at once and
    # sends them in one message
    futures = [slow.delay(i) for i in range(10)]
    worker.start(block=False)
    assert [f.result(timeout=60) for f in futures] == list(range(10))
    wait_for(lambda: worker.finished_task_runs[slow.task_key] == 12, message="12 runs counted finished")
    # started by the reader, which yielded between the runs of a message, not after its last
    assert yields, "the reader never yielded between the runs of a slow task"
    assert set(yields) == {"sync-worker-subscription-reader"}
    assert len(yields) <= 9, "the reader yielded after the last run of a message"


def test_a_task_whose_runs_turn_quick_is_no_longer_yielded_for(api_env, start_worker, yields):
    """The decision follows the recent runs (a moving average), not the first ones."""
    worker = start_worker(slow, limit=10)
    assert _run_all(slow, 2) == [0, 1]
    wait_for(lambda: worker._yields_after(slow), message="the slow task known as slow")
    SLEEP[0] = 0.0
    try:
        # the moving average falls below the bound within a few runs; more batches if one of
        # them was measured slow all the same (the run thread descheduled by a loaded host)
        deadline, submitted = time.monotonic() + 30, 2
        while worker._yields_after(slow):
            assert time.monotonic() < deadline, "the task never known as quick again"
            assert _run_all(slow, 20) == list(range(20))
            submitted += 20
        before = len(yields)
        assert _run_all(slow, 20) == list(range(20))
        wait_for(lambda: worker.finished_task_runs[slow.task_key] == submitted + 20,
                 message=f"{submitted + 20} runs counted finished")
        assert len(yields) == before
    finally:
        SLEEP[0] = 0.005
