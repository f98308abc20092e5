"""Stop means stop: a stopping worker starts nothing new, hands back what it was given
but has not started, and every stop path honours the drain timeout."""
from __future__ import annotations

import logging
import signal
import threading
import time

import pytest

from sync_worker.worker import _ABANDON_GRACE_SECONDS, Slots
from tests.helpers import wait_for
from tests.worker import worker_tasks as wt
from tests.worker.test_worker_processes import lines, worker_command


def test_stopping_worker_takes_no_run_submitted_during_its_drain(api_env, start_worker):
    wt.GATE.reset()
    stopping = start_worker(wt.gated, limit=2)
    first = wt.gated.delay("first")
    wait_for(lambda: wt.GATE.current == 1, message="the first run executing")
    stopping.stop()
    assert stopping.stopping and not stopping.join(0.2)  # draining: the first run holds it
    # submitted while it drains, with a free slot there: it must not go to the stopping worker
    second = wt.gated.delay("second")
    idle = start_worker(wt.gated, limit=2)
    wait_for(lambda: wt.GATE.current == 2, message="the second run started by the idle worker")
    assert idle.current_tasks == 1
    assert stopping.current_tasks == 1  # still only the first run
    wt.GATE.opened.set()
    assert first.result(timeout=30) == "first" and second.result(timeout=30) == "second"
    assert stopping.join(30)
    assert stopping.finished_task_runs == {"tests.gated": 1}


def test_stopping_worker_hands_back_runs_delivered_but_not_started(api_env, start_worker, monkeypatch):
    # Prefect's flow control (one run per ack, no credit): a full worker holds the next run
    # unacknowledged while it waits for a slot
    monkeypatch.setenv("SYNC_WORKER_FAST_PATH", "false")
    wt.GATE.reset()
    stopping = start_worker(wt.gated, limit=1)
    futures = [wt.gated.delay(i) for i in range(3)]
    wait_for(lambda: wt.GATE.current == 1, message="one run executing")
    stopping.stop()
    idle = start_worker(wt.gated, limit=5)
    # the two runs the stopping worker did not start are started by the other one at once
    wait_for(lambda: idle.current_tasks == 2, message="the other worker running the two others")
    wt.GATE.opened.set()
    assert sorted(f.result(timeout=30) for f in futures) == [0, 1, 2]
    assert stopping.join(30) and stopping.finished_task_runs == {"tests.gated": 1}


def test_stopped_is_logged_only_after_the_drain(api_env, start_worker, caplog):
    wt.GATE.reset()
    worker = start_worker(wt.gated, limit=1)
    future = wt.gated.delay("x")
    wait_for(lambda: wt.GATE.current == 1, message="the run executing")
    with caplog.at_level("INFO", logger="sync_worker.worker"):
        worker.stop()
        time.sleep(0.3)  # a negative check: nothing may claim "stopped" while the run goes on
        assert not any("stopped." in r.getMessage() for r in caplog.records)
        wt.GATE.opened.set()
        assert worker.join(30)
    assert future.result(timeout=10) == "x"
    assert any(r.getMessage().endswith("stopped.") for r in caplog.records)


def test_no_slot_over_release():
    slots = Slots(2)
    assert slots.acquire("a") and slots.acquire("b")
    assert slots.free == 0
    assert slots.release("a") is True
    assert slots.release("a") is False  # twice: refused, the limit stays 2
    assert slots.release("never-held") is False
    assert slots.free == 1 and slots.held == 1
    assert slots.acquire("c")
    assert not slots.acquire("d", timeout=0.2)  # full: nobody over-released


def test_no_slot_for_a_run_already_executing():
    from sync_worker.worker import SlotError

    slots = Slots(3)
    assert slots.acquire("a")
    with pytest.raises(SlotError):
        slots.acquire("a")
    assert slots.held == 1 and slots.free == 2


def _read_until(proc, text: str) -> str:
    """stderr up to the line containing ``text`` (read with readline: what communicate()
    reads later bypasses this file object's buffer, so keep using the file object)."""
    seen = []
    while True:
        line = proc.stderr.readline()
        if not line:
            raise AssertionError(f"the worker exited without logging {text!r}: {''.join(seen)}")
        seen.append(line)
        if text in line:
            return "".join(seen)


def test_ctrl_c_honours_the_drain_timeout(api_env, spawn, tmp_path):
    marks = tmp_path / "marks"
    env = {**api_env, "SYNC_WORKER_DRAIN_TIMEOUT": "1"}
    proc = spawn(worker_command("tests.worker.worker_tasks:sleep_marked", limit=1), env)
    future = wt.sleep_marked.delay(0, str(marks), 60.0)
    wait_for(lambda: len(lines(marks, "start")) == 1, message="the run in flight")
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 15  # bounded by the drain timeout, not the 60 s run
    assert proc.returncode == 1, err  # a run abandoned: not a clean exit (as with SIGTERM)
    assert ("Drain timeout (1s, SYNC_WORKER_DRAIN_TIMEOUT) passed with 1 run(s) still running, abandoned: "
            + future.task_run_id + "; the server gives them to a worker again once their lease expires") in err


def test_timeout_with_a_run_past_the_drain_timeout_exits_1(api_env, spawn, tmp_path):
    marks = tmp_path / "marks"
    env = {**api_env, "SYNC_WORKER_DRAIN_TIMEOUT": "1"}
    proc = spawn(worker_command("tests.worker.worker_tasks:sleep_marked", limit=1) + ["--timeout", "2"], env)
    future = wt.sleep_marked.delay(0, str(marks), 60.0)
    wait_for(lambda: len(lines(marks, "start")) == 1, message="the run in flight")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, err
    assert "Task worker timed out after 2.0 seconds" in err
    assert "1 run(s) still running, abandoned: " + future.task_run_id in err


def test_a_zero_drain_timeout_with_nothing_running_stops_cleanly(api_env, spawn):
    """SYNC_WORKER_DRAIN_TIMEOUT=0 gives runs no time; a worker with none still closes its
    connection and exits 0, without a warning about runs it does not have."""
    env = {**api_env, "SYNC_WORKER_DRAIN_TIMEOUT": "0"}
    proc = spawn(worker_command("tests.worker.worker_tasks:add"), env)
    _read_until(proc, "Subscribed")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    err = proc.stderr.read()
    assert proc.returncode == 0, err
    assert "Drain timeout" not in err and "stopped." in err


@pytest.mark.parametrize("first,logged", [(signal.SIGINT, "Task worker interrupted"),
                                          (signal.SIGTERM, "SIGTERM received")], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_during_a_drain_is_a_cold_stop_exiting_130(api_env, spawn, tmp_path, first, logged):
    """A second Ctrl-C, or a Ctrl-C during a SIGTERM's drain (which started the drain again:
    6 s for a 4 s drain timeout): the second stop request, a cold stop at once."""
    marks = tmp_path / "marks"
    env = {**api_env, "SYNC_WORKER_DRAIN_TIMEOUT": "60"}
    proc = spawn(worker_command("tests.worker.worker_tasks:sleep_marked", limit=1), env)
    wt.sleep_marked.delay(0, str(marks), 60.0)
    wait_for(lambda: len(lines(marks, "start")) == 1, message="the run in flight")
    proc.send_signal(first)
    _read_until(proc, logged)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    err = proc.stderr.read()
    assert time.monotonic() - sent < 15
    assert proc.returncode == 130, err
    assert "Cold stop: abandoning 1 running run(s)" in err


def test_a_run_delivered_again_while_it_executes_here_is_not_started_twice(api_env, start_worker):
    from sync_worker.client import Client

    wt.GATE.reset()
    worker = start_worker(wt.gated, limit=2)
    future = wt.gated.delay("once")
    wait_for(lambda: wt.GATE.current == 1, message="the run executing")
    # what a re-delivery looks like to the worker (e.g. its lease ran out meanwhile)
    worker._receive(Client().read_task_run(future.task_run_id))
    assert worker.current_tasks == 1  # no second slot, no second execution
    assert worker.error is None
    wt.GATE.opened.set()
    assert future.result(timeout=30) == "once"
    assert wt.GATE.calls == 1


def test_stop_from_another_thread_ends_a_blocking_start_at_the_drain_timeout(api_env, monkeypatch, tmp_path, caplog):
    """stop() from another thread (or from a task) applied no drain timeout to a blocking
    start(): it returned when the 25 s run ended, and never for a run that never returns."""
    import threading

    from sync_worker.worker import TaskWorker

    monkeypatch.setenv("SYNC_WORKER_DRAIN_TIMEOUT", "1")
    marks = tmp_path / "marks"
    worker = TaskWorker(wt.sleep_marked, limit=1)
    returned = threading.Event()
    thread = threading.Thread(target=lambda: (worker.start(), returned.set()), daemon=True)
    thread.start()
    future = wt.sleep_marked.delay(0, str(marks), 60.0)
    wait_for(lambda: len(lines(marks, "start")) == 1, message="the run in flight")
    stopped = time.monotonic()
    worker.stop()
    assert returned.wait(20), "start() still blocked 20 s after stop() with a 1 s drain timeout"
    assert time.monotonic() - stopped < 1 + _ABANDON_GRACE_SECONDS + 2
    assert worker._abandoned_at_drain == [future.task_run_id]
    assert caplog.text.count("1 run(s) still running, abandoned: " + future.task_run_id) == 1


def test_a_stop_while_the_server_does_not_answer_the_handshake_is_prompt_and_clean(api_env, spawn):
    """A server that accepts connections and never answers (SIGSTOP, a blackholed host):
    SIGTERM waited out the whole drain timeout for the connection being opened, then
    exited 1 ("drain timeout"), and a single Ctrl-C exited 130. Nothing runs: exit 0 soon."""
    import socket

    with socket.socket() as listener:  # the kernel completes connections; nobody reads them
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/api"
        for sig in (signal.SIGTERM, signal.SIGINT):
            env = {**api_env, "SYNC_WORKER_API_URL": url, "SYNC_WORKER_DRAIN_TIMEOUT": "30"}
            proc = spawn(worker_command("tests.worker.worker_tasks:add"), env)
            _read_until(proc, "Starting task worker")
            listener.settimeout(30)
            held, _ = listener.accept()  # the worker's connection: its handshake waits for an answer
            sent = time.monotonic()
            proc.send_signal(sig)
            proc.wait(timeout=40)
            held.close()
            err = proc.stderr.read()
            assert proc.returncode == 0, (sig, err)
            assert time.monotonic() - sent < 12, err
            assert "Drain timeout" not in err


def test_stop_and_join_end_at_once_while_the_handshake_gets_no_answer(api_env, monkeypatch):
    """The WSGI pattern (``worker.stop(); worker.join(30)``) with nothing in flight: join()
    waited for the connection being opened to time out (the request timeout, up to 30 s),
    though the stop itself returned; a gunicorn worker's exit or reload hung that long."""
    import socket

    from sync_worker.worker import TaskWorker

    with socket.socket() as listener:  # the kernel completes connections; nobody reads them
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        monkeypatch.setenv("SYNC_WORKER_API_URL", f"http://127.0.0.1:{listener.getsockname()[1]}/api")
        monkeypatch.setenv("SYNC_WORKER_REQUEST_TIMEOUT", "25")
        worker = TaskWorker(wt.add).start(block=False)
        listener.settimeout(20)
        held, _ = listener.accept()
        try:
            wait_for(lambda: getattr(worker._subscription, "_opening", held) is not None, message="the handshake under way")
            stopped = time.monotonic()
            worker.stop()
            assert worker.join(10), "join() still waiting for the handshake 10 s after stop()"
            assert time.monotonic() - stopped < 5
        finally:
            held.close()


def test_a_stop_just_before_the_handshake_socket_exists_still_ends_at_once(api_env, monkeypatch):
    """The same stop, timed into the window where the connection object exists but its TCP
    socket does not yet (websocket-client assigns it inside ``connect()``, then waits for the
    answer): the stop found no socket to cut, and join() waited out the open timeout. The
    window is forced here: the stop runs in the opening thread just before the TCP connect."""
    import socket

    import websocket._core

    from sync_worker.worker import TaskWorker

    real_connect = websocket._core.connect
    workers: list[TaskWorker] = []

    def stop_then_connect(*args, **kwargs):
        if workers:
            workers.pop().stop()  # from the opening thread: ws.sock is still None here
        return real_connect(*args, **kwargs)

    monkeypatch.setattr(websocket._core, "connect", stop_then_connect)
    with socket.socket() as listener:  # the kernel completes connections; nobody reads them
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        monkeypatch.setenv("SYNC_WORKER_API_URL", f"http://127.0.0.1:{listener.getsockname()[1]}/api")
        monkeypatch.setenv("SYNC_WORKER_REQUEST_TIMEOUT", "25")
        worker = TaskWorker(wt.add)
        workers.append(worker)
        started = time.monotonic()
        worker.start(block=False)
        assert worker.join(10), "join() still waiting for the handshake 10 s after stop()"
        assert not workers  # the stop did come from inside the connect
        assert time.monotonic() - started < 5
        assert worker.error is None


@pytest.mark.parametrize("presses", [1, 2])
def test_a_ctrl_c_while_start_begins_is_a_clean_stop(api_env, monkeypatch, caplog, presses):
    """A Ctrl-C that lands while ``start()`` is still starting the worker (its service thread
    may connect before ``Thread.start()`` returns) escaped start()'s handling: the command
    exited 130 with no word (seen 2 times in 10 loops of the handshake stop test under load).
    Forced here: SIGINT to this (the main) thread from inside start()'s last steps. Two
    presses there are a Ctrl-C twice: a cold stop, KeyboardInterrupt raised (exit 130)."""
    import sync_worker.worker as worker_module
    from sync_worker.worker import TaskWorker

    real = worker_module.start_client_metrics_server

    def ctrl_c_then_start() -> None:
        for _ in range(presses):
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            for _ in range(1000):  # bytecodes for the interpreter to run the SIGINT handler on
                pass
        real()

    monkeypatch.setattr(worker_module, "start_client_metrics_server", ctrl_c_then_start)
    assert threading.current_thread() is threading.main_thread()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    worker = TaskWorker(wt.add)
    started = time.monotonic()
    if presses == 2:
        with pytest.raises(KeyboardInterrupt):
            worker.start(timeout=20)
    else:
        try:
            with caplog.at_level(logging.INFO, logger="sync_worker.worker"):
                worker.start(timeout=20)
        except KeyboardInterrupt:
            pytest.fail("the Ctrl-C escaped start()")
        assert "Task worker interrupted, stopping" in caplog.text
    assert time.monotonic() - started < 10
    assert not worker.started and worker.join(10)  # (a cold stop returns before the service ends)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_join_past_the_drain_timeout_names_the_runs_it_leaves(api_env, monkeypatch, tmp_path, caplog):
    """``stop(); join(DRAIN_TIMEOUT)`` in a WSGI server's exit hook: join() returned False at
    the deadline and the process ended, before the service thread's "abandoned" line (a
    report backoff later): runs were abandoned with nothing in the log."""
    from sync_worker.worker import TaskWorker

    monkeypatch.setenv("SYNC_WORKER_DRAIN_TIMEOUT", "1")
    marks = tmp_path / "marks"
    worker = TaskWorker(wt.sleep_marked, limit=1).start(block=False)
    future = wt.sleep_marked.delay(0, str(marks), 30.0)
    wait_for(lambda: len(lines(marks, "start")) == 1, message="the run in flight")
    worker.stop()
    assert worker.join(0.2) is False  # before the deadline: nothing said yet
    assert "Drain timeout" not in caplog.text
    assert worker.join(1.5) is False and worker.join(0.1) is False
    assert caplog.text.count("if this process ends now") == 1, caplog.text
    assert f"1 run(s) still running ({future.task_run_id})" in caplog.text
    assert worker.join(30)  # the service thread gives up too (its daemon run thread is abandoned)


def test_a_with_block_exit_names_the_runs_it_leaves_at_the_drain_timeout(api_env, monkeypatch, tmp_path, caplog):
    """``with TaskWorker(...)`` in a gunicorn worker: the exit drained until the drain
    timeout plus 11 s and the "abandoned" line came 6 s past it, after gunicorn's kill. The
    runs still going are named at the deadline itself, while the exit still waits."""
    import threading

    from sync_worker.worker import TaskWorker

    monkeypatch.setenv("SYNC_WORKER_DRAIN_TIMEOUT", "1")
    marks = tmp_path / "marks"
    worker = TaskWorker(wt.sleep_marked, limit=1)
    worker.__enter__()
    future = wt.sleep_marked.delay(0, str(marks), 30.0)
    wait_for(lambda: len(lines(marks, "start")) == 1, message="the run in flight")
    leaving = threading.Thread(target=worker.__exit__, args=(None, None, None), daemon=True)
    leaving.start()
    wait_for(lambda: f"still running ({future.task_run_id})" in caplog.text, timeout=4,
             message="the run named at the drain timeout")
    assert leaving.is_alive()  # (the exit waits a report backoff longer)
    leaving.join(30)
    assert not leaving.is_alive()


def test_a_final_state_lost_in_a_partition_at_the_stop_is_reported_as_abandoned(
        api_env, monkeypatch, tmp_path, caplog):
    """The link to the server went silent (a partition: nothing refused, nothing arriving)
    after a run's final state was sent, then the worker was stopped: it waited for the
    answer until the drain timeout and then ended as if all was well (exit 0, no line),
    though the server gives the run to another worker once its lease expires."""
    from tests.helpers import Relay
    from sync_worker.worker import TaskWorker

    from urllib.parse import urlsplit

    relay = Relay(urlsplit(api_env["SYNC_WORKER_API_URL"]).port)
    marks = tmp_path / "marks"
    future = wt.sleep_marked.delay(0, str(marks), 0.5)
    monkeypatch.setenv("SYNC_WORKER_API_URL", relay.url)
    monkeypatch.setenv("SYNC_WORKER_DRAIN_TIMEOUT", "1")
    worker = TaskWorker(wt.sleep_marked, limit=1).start(block=False)
    try:
        wait_for(lambda: len(lines(marks, "start")) == 1, message="the run in flight")
        relay.hold()
        wait_for(lambda: len(lines(marks, "end")) == 1, message="the function returned")
        worker.stop()
        assert worker.join(30)
    finally:
        relay.close()
    assert worker._abandoned_at_drain == [future.task_run_id]
    assert ("1 run(s) executed here whose final state the server has not confirmed (unreachable?): "
            + future.task_run_id) in caplog.text


def test_a_run_executed_but_unreported_at_the_drain_timeout_is_not_called_still_running(
        server_factory, api_env, monkeypatch, tmp_path, caplog):
    """The server went away: a run whose function returned but whose final state got no
    answer was logged "still running, abandoned", which it was not. Its thread gives up at
    the drain deadline and says so: the server has the state or re-delivers the run."""
    from pathlib import Path

    from sync_worker.worker import TaskWorker

    server = server_factory(database=str(Path(api_env["SYNC_WORKER_STORAGE"]).parent / "gone.db"))
    monkeypatch.setenv("SYNC_WORKER_API_URL", server.url)
    monkeypatch.setenv("SYNC_WORKER_DRAIN_TIMEOUT", "1")
    marks = tmp_path / "marks"
    worker = TaskWorker(wt.sleep_marked, limit=1).start(block=False)
    try:
        future = wt.sleep_marked.delay(0, str(marks), 1.0)
        wait_for(lambda: len(lines(marks, "start")) == 1, message="the run in flight")
        server.stop()
        wait_for(lambda: len(lines(marks, "end")) == 1, message="the function returned")
    finally:
        worker.stop()
        assert worker.join(30)
    # nothing left running (the function returned), but its final state is not on the server: abandoned
    assert worker._abandoned_at_drain == [future.task_run_id]  # (the command exits 1; it exited 0)
    assert f"executed here whose final state the server has not confirmed (unreachable?): {future.task_run_id}" \
        in caplog.text
    assert (f"Stopped before the server answered about task run 'sleep_marked' ({future.task_run_id})"
            in caplog.text)
    assert "the server has its state, or gives the run to a worker again when its lease expires" in caplog.text
    assert "still running" not in caplog.text and "Traceback" not in caplog.text
