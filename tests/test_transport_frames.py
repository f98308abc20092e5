"""The client's lean frame reader (``sockets.FrameReader``) against websocket-client's own
``recv_data(control_frame=True)``: on the same byte streams, split anywhere, both return
the same ``(opcode, payload)`` sequence, answer pings alike and refuse the same bad frames."""
from __future__ import annotations

import random
import socket
import struct
import threading

import pytest
import websocket
from websocket import ABNF

from sync_worker.sockets import FrameReader, MaskKeys


def _ws(sock: socket.socket) -> websocket.WebSocket:
    """websocket-client's socket object on one end of a socketpair (no handshake), as
    ``open_socket`` leaves it."""
    ws = websocket.WebSocket(enable_multithread=True, skip_utf8_validation=True)
    ws.sock = sock
    ws.connected = True
    ws.set_mask_key(MaskKeys())
    sock.settimeout(10)
    return ws


def _frame(opcode: int, payload: bytes, fin: int = 1, masked: bool = False, rsv1: int = 0) -> bytes:
    frame = ABNF(fin, rsv1, 0, 0, opcode, 1 if masked else 0, payload)
    if masked:
        frame.get_mask_key = lambda n: b"\x01\x02\x03\x04"
    return frame.format()


def _stream(rng: random.Random) -> tuple[bytes, int]:
    """Frames a server may send, and how many messages they make."""
    parts = [
        _frame(ABNF.OPCODE_TEXT, b'{"type": "auth_success"}'),
        _frame(ABNF.OPCODE_TEXT, b""),
        _frame(ABNF.OPCODE_TEXT, b"x" * 125),
        _frame(ABNF.OPCODE_TEXT, b"y" * 126),
        _frame(ABNF.OPCODE_BINARY, bytes(range(256)) * 256),  # 65536: the 8-byte length
        _frame(ABNF.OPCODE_TEXT, b"z" * 65535),
        _frame(ABNF.OPCODE_PING, b"are you there"),
        _frame(ABNF.OPCODE_TEXT, b"first ", fin=0),
        _frame(ABNF.OPCODE_PONG, b"between fragments"),
        _frame(ABNF.OPCODE_CONT, b"second ", fin=0),
        _frame(ABNF.OPCODE_CONT, b"third", fin=1),
        _frame(ABNF.OPCODE_TEXT, b'{"masked": true}', masked=True),
        _frame(ABNF.OPCODE_TEXT, bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3000)))),
        _frame(ABNF.OPCODE_CLOSE, struct.pack("!H", 1000) + b"bye"),
    ]
    return b"".join(parts), 12


def _read_all(stream: bytes, seed: int, lean: bool) -> tuple[list[tuple[int, bytes]], bytes]:
    """What one reader returns for ``stream`` sent in random pieces; and what it sent back."""
    ours, theirs = socket.socketpair()
    ws = _ws(ours)
    rng = random.Random(seed)

    def send() -> None:
        at = 0
        while at < len(stream):
            step = rng.choice([1, 2, 3, 7, 100, 1500, 70000])
            theirs.sendall(stream[at:at + step])
            at += step

    sender = threading.Thread(target=send)
    sender.start()
    read = FrameReader(ws).recv_data if lean else (lambda: ws.recv_data(control_frame=True))
    got: list[tuple[int, bytes]] = []
    try:
        while True:
            opcode, data = read()
            got.append((opcode, bytes(data)))
            if opcode == ABNF.OPCODE_CLOSE:
                break
        sender.join(10)
        theirs.settimeout(0.5)
        answered = b""
        try:
            while True:
                chunk = theirs.recv(65536)
                if not chunk:
                    break
                answered += chunk
        except OSError:
            pass
        return got, answered
    finally:
        ours.close()
        theirs.close()


@pytest.mark.parametrize("seed", range(8))
def test_the_lean_reader_returns_what_websocket_client_returns(seed):
    stream, _ = _stream(random.Random(seed))
    lean, lean_answers = _read_all(stream, seed, lean=True)
    reference, reference_answers = _read_all(stream, seed, lean=False)
    assert lean == reference
    assert [op for op, _ in lean].count(ABNF.OPCODE_PING) == 1
    assert (ABNF.OPCODE_TEXT, b"first second third") in lean
    # the ping was answered by a pong with its payload, masked as a client's frame must be
    # (websocket-client also answers the close frame itself; the Connection does that, on
    # close_error, for the lean reader)
    pong = 2 + 4 + len(b"are you there")
    assert len(lean_answers) == pong and reference_answers[:2] == lean_answers[:2]
    assert lean_answers[0] == 0x80 | ABNF.OPCODE_PONG and lean_answers[1] == 0x80 | len(b"are you there")


@pytest.mark.parametrize("bad", [
    _frame(ABNF.OPCODE_TEXT, b"compressed?", rsv1=1),
    bytes([0x80 | 0x3, 15]) + b"reserved opcode",
    _frame(ABNF.OPCODE_PING, b"p" * 126),
    _frame(ABNF.OPCODE_PING, b"fragmented ping", fin=0),
    _frame(ABNF.OPCODE_CONT, b"nothing to continue"),
])
def test_bad_frames_are_refused_as_websocket_client_refuses_them(bad):
    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(bad)
        with pytest.raises(websocket.WebSocketProtocolException):
            FrameReader(_ws(ours)).recv_data()
    finally:
        ours.close()
        theirs.close()


def test_a_timeout_and_a_closed_socket_raise_as_before():
    ours, theirs = socket.socketpair()
    ws = _ws(ours)
    ours.settimeout(0.05)
    reader = FrameReader(ws)
    theirs.sendall(_frame(ABNF.OPCODE_TEXT, b"half")[:3])
    with pytest.raises(websocket.WebSocketTimeoutException):
        reader.recv_data()
    theirs.sendall(_frame(ABNF.OPCODE_TEXT, b"half")[3:])  # the half read before is kept
    assert reader.recv_data() == (ABNF.OPCODE_TEXT, b"half")
    theirs.close()
    with pytest.raises(websocket.WebSocketConnectionClosedException):
        reader.recv_data()
    ours.close()


def test_bytes_websocket_client_read_ahead_are_taken_over():
    ours, theirs = socket.socketpair()
    try:
        ws = _ws(ours)
        ws.frame_buffer.recv = lambda _size: ws._recv(65536)  # as open_socket sets it up
        theirs.sendall(_frame(ABNF.OPCODE_TEXT, b"auth_success") + _frame(ABNF.OPCODE_TEXT, b"next"))
        assert ws.recv_data(control_frame=True) == (ABNF.OPCODE_TEXT, b"auth_success")
        assert FrameReader.usable(ws)
        assert FrameReader(ws).recv_data() == (ABNF.OPCODE_TEXT, b"next")
    finally:
        ours.close()
        theirs.close()


def test_frames_sent_by_many_threads_arrive_whole_and_in_each_threads_order():
    """Connection.send_json: a thread that finds another writing queues its frame and the
    writer sends the queue in one write; every frame arrives whole, masked, in each sender's
    order, whatever the interleaving."""
    import json

    from sync_worker.sockets import Connection

    ours, theirs = socket.socketpair()
    conn = Connection(_ws(ours), [], 15.0)
    senders, per_sender = 8, 300

    def send(t: int) -> None:
        for n in range(per_sender):
            conn.send_json({"t": t, "n": n, "pad": "x" * (n % 200)})

    threads = [threading.Thread(target=send, args=(t,)) for t in range(senders)]
    reader = websocket.WebSocket(enable_multithread=True, skip_utf8_validation=True)
    reader.sock = theirs
    reader.connected = True
    theirs.settimeout(10)
    for thread in threads:
        thread.start()
    received: dict[int, list[int]] = {t: [] for t in range(senders)}
    try:
        for _ in range(senders * per_sender):
            frame = reader.recv_frame()  # websocket-client unmasks a client's frames
            assert frame.opcode == ABNF.OPCODE_TEXT and frame.fin
            message = json.loads(frame.data)
            received[message["t"]].append(message["n"])
    finally:
        for thread in threads:
            thread.join(10)
        ours.close()
        theirs.close()
    assert all(numbers == list(range(per_sender)) for numbers in received.values())
