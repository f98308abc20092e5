"""Several workers that ack, fail, retry and drop their connections at random: every run
still ends COMPLETED, and no run is completed twice."""
from __future__ import annotations

import random
import threading
import time
from collections import Counter

import websocket
from tests.helpers import wait_for


def test_random_drops_and_failures_lose_nothing(server_factory, make_wire):
    server = server_factory(lease_timeout=0.3, max_deliveries=20)
    w = make_wire(server)
    total = 200
    fail_first = set()
    run_ids = []
    for i in range(total):
        run = w.create(empirical_policy={"retries": 1, "retry_delay": 0})
        run_ids.append(run["id"])
        if i % 4 == 0:
            fail_first.add(run["id"])
    completed: Counter[str] = Counter()
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []

    def work(index: int) -> None:
        rng = random.Random(index)
        subscriber = None
        lives = 0
        try:
            while not stop.is_set():
                if subscriber is None:
                    # a worker that died comes back as a new process: a new client_id (the same
                    # one would take over the leases of its previous connection)
                    lives += 1
                    subscriber = w.subscribe(client_id=f"chaos-{index}-{lives}")
                try:
                    run = subscriber.next_run(timeout=0.5)
                except websocket.WebSocketTimeoutException:
                    continue
                roll = rng.random()
                if roll < 0.05:  # dies before acking
                    subscriber.ws.close()
                    subscriber = None
                    continue
                subscriber.ack()
                claim = subscriber.set_state(run["id"], "PENDING")["result"]
                if claim["status"] != "ACCEPT":
                    continue
                if roll < 0.10:  # dies while holding the run
                    subscriber.ws.close()
                    subscriber = None
                    continue
                running = subscriber.set_state(run["id"], "RUNNING")["result"]
                assert running["status"] == "ACCEPT", running
                if run["id"] in fail_first and running["state"]["name"] == "Running":
                    result = subscriber.set_state(run["id"], "FAILED", message="first attempt fails")["result"]
                    assert result["status"] == "REJECT" and result["state"]["name"] == "AwaitingRetry", result
                    continue
                result = subscriber.set_state(run["id"], "COMPLETED")["result"]
                if result["status"] == "ACCEPT":
                    with lock:
                        completed[run["id"]] += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: errors or len(completed) == total, timeout=90, interval=0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
    assert not errors, errors[0]
    assert set(completed) == set(run_ids)
    assert max(completed.values()) == 1  # never completed twice
    time.sleep(0.5)  # leases of dropped connections run out: nothing may be re-run
    for run_id in run_ids:
        final = w.read(run_id)
        assert final["state_type"] == "COMPLETED", final["state"]
        expected_attempts = 2 if run_id in fail_first else 1
        assert final["run_count"] >= expected_attempts


def test_server_restart_under_load_loses_nothing(server_factory, make_wire, tmp_path):
    db = str(tmp_path / "chaos.db")
    first = server_factory(database=db, lease_timeout=0.5)
    port = first.port
    w = make_wire(first)
    run_ids = [w.create()["id"] for _ in range(150)]
    completed: Counter[str] = Counter()
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []

    def work(index: int) -> None:
        subscriber = None
        lives = 0
        try:
            while not stop.is_set():
                try:
                    if subscriber is None:
                        # this test worker forgets its runs when its connection breaks, so it
                        # must not come back under the same client_id (that one keeps leases)
                        lives += 1
                        subscriber = w.subscribe(client_id=f"restart-{index}-{lives}")
                    run = subscriber.next_run(timeout=0.5)
                    subscriber.ack()
                    if subscriber.set_state(run["id"], "PENDING")["result"]["status"] != "ACCEPT":
                        continue
                    subscriber.set_state(run["id"], "RUNNING")
                    if subscriber.set_state(run["id"], "COMPLETED")["result"]["status"] == "ACCEPT":
                        with lock:
                            completed[run["id"]] += 1
                except websocket.WebSocketTimeoutException:
                    continue
                except (OSError, websocket.WebSocketException, AssertionError, KeyError, ValueError):
                    # the server went away mid-conversation: reconnect (it comes back)
                    subscriber = None
                    time.sleep(0.05)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(completed) >= 40, timeout=30)
        first.stop()
        second = server_factory(database=db, port=port, lease_timeout=0.5)
        assert second.port == port
        w2 = make_wire(second)

        def all_completed() -> bool:
            # (a COMPLETED committed just before the stop may never have been answered, so
            # the database, not the workers' tally, says when everything is done)
            return all(w2.read(run_id)["state_type"] == "COMPLETED" for run_id in run_ids)

        try:
            wait_for(lambda: errors or (len(completed) >= len(run_ids) - 5 and all_completed()), timeout=60,
                     interval=0.2)
        except AssertionError:
            stuck = [(r["id"], r["state"]["type"], r["state"]["message"])
                     for r in (w2.read(run_id) for run_id in run_ids) if r["state_type"] != "COMPLETED"]
            raise AssertionError(f"not completed: {stuck[:5]} ({len(stuck)}), queue {second.stats()}") from None
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
    assert not errors, errors[0]
    assert max(completed.values()) == 1  # never completed twice
