"""The subscription websocket: handshake, violations, delivery, ack, quit, set_state extension."""
from __future__ import annotations

import json
import threading
import time

import pytest
import websocket
from tests.server.conftest import read_close

from tests.helpers import wait_for


def _handshake_close(wire, *messages, subprotocol=True):
    ws = wire.connect(subprotocol=subprotocol)
    try:
        for message in messages:
            ws.send(message if isinstance(message, str) else json.dumps(message))
            if isinstance(message, dict) and message.get("type") == "auth":
                assert json.loads(ws.recv())["type"] == "auth_success"
        ws.settimeout(5)
        return read_close(ws)
    finally:
        ws.close()


def test_auth_success_advertises_extensions(wire, protocol):
    ws = wire.connect()
    assert ws.subprotocol == "prefect"
    ws.send(json.dumps(protocol("ws_01_client_auth.json")))
    reply = json.loads(ws.recv())
    assert reply == {"type": "auth_success", "extensions": ["set_state", "credit", "direct_running", "release",
                                                        "release_run", "claim_at_delivery", "batch_delivery",
                                                        "brief_set_state", "inline_parameters"],
                     "lease_timeout": 30.0}
    ws.close()


@pytest.mark.parametrize("capture", ["ws_violation_no_client_id.json", "ws_violation_no_keys.json",
                                     "ws_violation_wrong_type.json"])
def test_subscribe_violations_match_prefect(wire, protocol, capture):
    violation = protocol(capture)
    code, reason = _handshake_close(wire, {"type": "auth", "token": None}, violation["sent"])
    assert (code, reason) == (violation["result"]["code"], violation["result"]["reason"])


def test_missing_auth_message_matches_prefect(wire, protocol):
    violation = protocol("ws_violation_missing_auth_message.json")
    code, reason = _handshake_close(wire, violation["sent"])
    assert (code, reason) == (violation["result"]["code"], violation["result"]["reason"])


def test_garbage_before_auth_is_policy_violation(wire):
    assert _handshake_close(wire, "garbage{") == (1008, "Expected 'auth' message")


def test_garbage_after_auth_closes_with_reason(wire):
    code, reason = _handshake_close(wire, {"type": "auth", "token": None}, "not json at all")
    assert code == 1003
    assert "JSON" in reason
    code, reason = _handshake_close(wire, {"type": "auth", "token": None}, {"type": "subscribe", "keys": "k",
                                                                            "client_id": "c"})
    assert code == 4001
    assert "keys" in reason


def test_unexpected_message_after_subscribe_is_4001_and_others_unaffected(wire):
    good = wire.subscribe(client_id="good")
    bad = wire.subscribe(client_id="bad")
    time.sleep(0.1)
    bad.send({"type": "hello"})
    assert bad.close_code() == (4001, "Protocol violation: expected 'ack' message")
    run = wire.create()
    assert good.next_run()["id"] == run["id"]


def test_binary_garbage_after_subscribe(wire):
    good = wire.subscribe(client_id="good")
    bad = wire.subscribe(client_id="bad")
    bad.ws.send_binary(b"\xff\xfe\x00")
    code, reason = bad.close_code()
    assert code == 1003 and reason
    run = wire.create()
    assert good.next_run()["id"] == run["id"]


def test_delivery_ack_and_full_task_run(wire, protocol):
    subscriber = wire.subscribe()
    created = wire.create()
    delivered = subscriber.next_run()
    assert delivered == created
    expected_keys = set(protocol("ws_04_server_task_run.json"))
    assert set(delivered) == expected_keys


def test_run_created_before_subscription_is_delivered(wire):
    created = wire.create()
    subscriber = wire.subscribe()
    assert subscriber.next_run()["id"] == created["id"]


def test_one_run_in_flight_until_ack(wire):
    subscriber = wire.subscribe()
    first, second = wire.create(), wire.create()
    assert subscriber.next_run()["id"] == first["id"]
    subscriber.expect_no_run(0.3)
    subscriber.ack()
    assert subscriber.next_run()["id"] == second["id"]


def test_only_subscribed_keys_are_delivered(wire):
    subscriber = wire.subscribe(keys=["tests.a"])
    wire.create("tests.b")
    subscriber.expect_no_run(0.3)
    run_a = wire.create("tests.a")
    assert subscriber.next_run()["id"] == run_a["id"]


def test_non_deferred_scheduled_run_is_not_queued(wire):
    subscriber = wire.subscribe()
    wire.create(deferred=False)
    subscriber.expect_no_run(0.3)


def test_delivery_order_is_creation_order(wire):
    created = [wire.create()["id"] for _ in range(30)]
    subscriber = wire.subscribe()
    delivered = []
    for _ in created:
        delivered.append(subscriber.next_run()["id"])
        subscriber.ack()
    assert delivered == created


def test_multiple_keys_delivered_in_creation_order(wire):
    created = [wire.create(key)["id"] for key in ["k.a", "k.b", "k.a", "k.c", "k.b"]]
    subscriber = wire.subscribe(keys=["k.a", "k.b", "k.c"])
    delivered = []
    for _ in created:
        delivered.append(subscriber.next_run()["id"])
        subscriber.ack()
    assert delivered == created


def test_two_subscribers_share_a_key_without_duplicates(wire):
    subscribers = [wire.subscribe(client_id=f"worker-{i}") for i in range(2)]
    created = {wire.create()["id"] for _ in range(60)}
    received: dict[int, list[str]] = {0: [], 1: []}
    errors = []

    def consume(i):
        try:
            while True:
                try:
                    run = subscribers[i].next_run(timeout=1.0)
                except websocket.WebSocketTimeoutException:
                    return
                received[i].append(run["id"])
                time.sleep(0.005)
                subscribers[i].ack()
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    everything = received[0] + received[1]
    assert len(everything) == len(set(everything)) == 60
    assert set(everything) == created
    assert received[0] and received[1]


def test_quit_ends_subscription_cleanly_and_returns_unacked_run(wire):
    first = wire.subscribe(client_id="quitter")
    run = wire.create()
    assert first.next_run()["id"] == run["id"]
    first.send({"type": "quit"})
    assert first.close_code()[0] == 1000
    second = wire.subscribe(client_id="next")
    assert second.next_run()["id"] == run["id"]


def test_set_state_extension(wire):
    subscriber = wire.subscribe()
    run = wire.create()
    assert subscriber.next_run()["id"] == run["id"]
    subscriber.ack()
    reply = subscriber.set_state(run["id"], "PENDING", state_details={"deferred": True})
    assert reply["status_code"] == 201
    assert reply["result"]["status"] == "ACCEPT"
    assert reply["result"]["state"]["type"] == "PENDING"
    assert subscriber.set_state(run["id"], "RUNNING")["result"]["status"] == "ACCEPT"
    done = subscriber.set_state(run["id"], "COMPLETED")
    assert done["result"]["status"] == "ACCEPT"
    assert done["result"]["details"] == {"type": "accept_details"}
    assert wire.read(run["id"])["state_type"] == "COMPLETED"


def test_set_state_extension_errors(wire):
    subscriber = wire.subscribe()
    missing = subscriber.set_state("00000000-0000-0000-0000-000000000000", "PENDING")
    assert missing["status_code"] == 404
    assert missing["detail"] == "Task not found"
    not_an_id = subscriber.set_state("no-such-run", "PENDING")  # as REST answers it
    assert not_an_id["status_code"] == 422 and "Input should be a valid UUID, not 'no-such-run'" in not_an_id["detail"]
    run = wire.create()
    invalid = subscriber.set_state(run["id"], "EXPLODED")
    assert invalid["status_code"] == 422
    assert "state.type" in invalid["detail"]
    subscriber.send({"type": "set_state", "request_id": "r1", "task_run_id": run["id"]})
    message = subscriber.recv()
    while message.get("request_id") != "r1":  # the run itself may come first
        message = subscriber.recv()
    assert message["status_code"] == 422 and "state" in message["detail"]
    # the socket still works
    assert subscriber.set_state(run["id"], "PENDING")["status_code"] == 201


def test_set_state_does_not_count_as_ack(wire):
    subscriber = wire.subscribe()
    first, second = wire.create(), wire.create()
    assert subscriber.next_run()["id"] == first["id"]
    subscriber.set_state(first["id"], "PENDING")
    subscriber.expect_no_run(0.3)
    subscriber.ack()
    assert subscriber.next_run()["id"] == second["id"]


def test_websocket_auth(server_factory, make_wire):
    server = server_factory(auth_string="admin:s3cret")
    w = make_wire(server)
    for token, reason in [(None, "Auth required but no token provided"), ("wrong", "Invalid token")]:
        ws = w.connect()
        ws.send(json.dumps({"type": "auth", "token": token}))
        assert read_close(ws) == (1008, reason)
        ws.close()
    subscriber = w.subscribe(token="admin:s3cret")
    run = w.create()
    assert subscriber.next_run()["id"] == run["id"]


def test_legacy_client_without_subprotocol(server_factory, make_wire):
    open_server = server_factory()
    w = make_wire(open_server)
    ws = w.connect(subprotocol=False)
    ws.send(json.dumps({"type": "subscribe", "keys": ["tests.add"], "client_id": "legacy"}))
    run = w.create()
    assert json.loads(ws.recv())["id"] == run["id"]
    ws.close()


def test_legacy_client_refused_when_auth_configured(server_factory, make_wire):
    server = server_factory(auth_string="a:b")
    w = make_wire(server)
    ws = w.connect(subprotocol=False)
    assert read_close(ws)[0] == 1002
    ws.close()


def test_stop_closes_websockets_fast(server_factory, make_wire):
    server = server_factory()
    w = make_wire(server)
    subscriber = w.subscribe()
    wait_for(lambda: server.stats()["subscriptions"] == 1)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 1.0
    code, reason = subscriber.close_code()
    assert code == 1012  # service restart, as a Prefect server (uvicorn) closes: Prefect's worker reconnects
    assert "shutting down" in reason


def test_oversized_message_closes_only_that_connection(server_factory, make_wire):
    server = server_factory(max_body_size=2000)
    w = make_wire(server)
    good = w.subscribe(client_id="good")
    bad = w.subscribe(client_id="bad")
    bad.send({"type": "set_state", "request_id": "x" * 5000})
    code, reason = bad.close_code()
    assert code == 1009 and reason
    run = w.create()
    assert good.next_run()["id"] == run["id"]
    wait_for(lambda: server.stats()["subscriptions"] == 1, timeout=5)  # the bad one is gone


def test_client_that_never_reads_does_not_stall_the_server(server_factory, make_wire):
    """A subscriber floods set_state requests and never reads the answers: its connection
    clogs, everyone else's requests keep being served."""
    import socket as socket_module

    server = server_factory()
    w = make_wire(server)
    run = w.create("tests.flood")
    flooder = w.subscribe(keys=["tests.flood"], client_id="flooder")
    request = json.dumps({"type": "set_state", "request_id": "r", "task_run_id": run["id"],
                          "state": {"type": "PENDING"}, "force": True})
    stop = threading.Event()

    def flood() -> None:
        try:
            while not stop.is_set():
                flooder.ws.send(request)
        except (OSError, websocket.WebSocketException):
            pass

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    try:
        time.sleep(1.0)  # by now the server's answers to the flooder fill the socket buffers
        good = w.subscribe(client_id="good")
        started = time.monotonic()
        for _ in range(5):
            created = w.create()
            assert good.next_run(timeout=5)["id"] == created["id"]
            good.ack()
            assert good.set_state(created["id"], "PENDING", timeout=5)["status_code"] == 201
        assert time.monotonic() - started < 5
    finally:
        stop.set()
        try:
            flooder.ws.sock.shutdown(socket_module.SHUT_RDWR)
        except OSError:
            pass
        thread.join(timeout=5)


# -- no prefetch: an unknown subscribe field is ignored, one run awaits its ack ---------------------
def test_a_prefetch_field_is_ignored_one_run_at_a_time(wire):
    created = [wire.create()["id"] for _ in range(2)]
    ws = wire.connect()
    ws.send(json.dumps({"type": "auth", "token": None}))
    assert json.loads(ws.recv())["type"] == "auth_success"
    ws.send(json.dumps({"type": "subscribe", "keys": ["tests.add"], "client_id": "old", "prefetch": 3}))
    try:
        ws.settimeout(5)
        assert json.loads(ws.recv())["id"] == created[0]
        ws.settimeout(0.3)
        with pytest.raises(websocket.WebSocketTimeoutException):
            ws.recv()  # the second run waits for the ack
        ws.send(json.dumps({"type": "ack"}))
        ws.settimeout(5)
        assert json.loads(ws.recv())["id"] == created[1]
    finally:
        ws.close()




@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_lean_text_frames_are_the_bytes_wsproto_sends(size):
    """The server builds its text frames itself (sockets.text_frame); they must be exactly
    what wsproto builds for a server connection without extensions."""
    from wsproto.frame_protocol import FrameProtocol

    from sync_worker.server.sockets import text_frame

    text = ("é" * size)[: size // 2] + "x" * (size - size // 2)  # multi-byte characters too
    assert text_frame(text) == bytes(FrameProtocol(client=False, extensions=[]).send_data(text))


def test_a_client_asking_for_compression_still_gets_valid_frames(wire):
    """permessage-deflate negotiated: frames go through wsproto (compressed), not the lean path."""
    import socket as socket_module

    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, Request, TextMessage
    from wsproto.extensions import PerMessageDeflate

    host, port = wire.url.split("//", 1)[1].split("/", 1)[0].split(":")
    sock = socket_module.create_connection((host, int(port)), timeout=10)
    client = WSConnection(ConnectionType.CLIENT)
    sock.sendall(client.send(Request(host=f"{host}:{port}", target="/api/task_runs/subscriptions/scheduled",
                                     subprotocols=["prefect"], extensions=[PerMessageDeflate()])))
    events: list = []
    raw = b""
    while not any(isinstance(e, TextMessage) for e in events):
        chunk = sock.recv(65536)
        raw += chunk
        client.receive_data(chunk)
        for event in client.events():
            events.append(event)
            if isinstance(event, AcceptConnection):
                assert [e.name for e in event.extensions] == ["permessage-deflate"]
                sock.sendall(client.send(TextMessage(data=json.dumps({"type": "auth", "token": None}))))
    reply = next(e for e in events if isinstance(e, TextMessage))
    assert json.loads(reply.data)["type"] == "auth_success"
    first_frame = raw.split(b"\r\n\r\n", 1)[1]
    assert first_frame[0] == 0xC1  # FIN + RSV1 (compressed) + text: wsproto's frame, not the lean one
    sock.close()
