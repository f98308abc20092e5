"""The lean receive parser (sync_worker.server.frames) and the server's reader loop around it.

Two levels:
- unit: whatever bytes a client sends, split anywhere, the lean parser followed by wsproto
  (from where the parser hands over) yields exactly the messages, pings, pongs and close
  codes that wsproto alone yields with simple-websocket's assembly and size limit; and each
  branch that hands over does so at the first byte of the frame it cannot take;
- wire: a real server on a real socket, raw frames: bursts split at every byte, a ping's pong
  byte for byte, a fragmented message after lean ones, and every close code after lean
  messages (1002, 1007, 1009, the close handshake).
"""
from __future__ import annotations

import json
import os
import random
import socket
import struct
import time
import uuid
from typing import Any

import pytest
import websocket
from tests.server.conftest import read_close, wait_for
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from sync_worker.server.frames import FrameReader, unmask


# -- building client frames byte by byte (so that malformed ones can be built too) ---------------
def frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, masked: bool = True,
          length_bytes: int | None = None, key: bytes | None = None) -> bytes:
    """A client frame; ``length_bytes`` forces the length encoding (0, 2 or 8 extra bytes)."""
    n = len(payload)
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    if length_bytes is None:
        length_bytes = 0 if n < 126 else 2 if n < 65536 else 8
    mask_bit = 0x80 if masked else 0
    if length_bytes == 0:
        head = bytes((first, mask_bit | n))
    elif length_bytes == 2:
        head = bytes((first, mask_bit | 126)) + struct.pack("!H", n)
    else:
        head = bytes((first, mask_bit | 127)) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    key = key if key is not None else os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def text(s: str, **kw: Any) -> bytes:
    return frame(0x1, s.encode(), **kw)


# -- the reference: wsproto alone, assembled as simple-websocket assembles (sockets.WebSocket) ----
class Reference:
    """wsproto's server connection plus simple-websocket's message assembly and size check."""

    def __init__(self, max_size: int | None) -> None:
        self.conn = Connection(ConnectionType.SERVER)
        self.max_size = max_size
        self.partial: Any = None
        self.length = 0
        self.out: list[Any] = []
        self.ended = False

    def feed(self, data: bytes) -> None:
        if self.ended:
            return
        self.conn.receive_data(data)
        for event in self.conn.events():
            if isinstance(event, CloseConnection):
                self.out.append(("close", int(event.code)))
                self.ended = True
                return
            if isinstance(event, Ping):
                self.out.append(("ping", bytes(event.payload)))
            elif isinstance(event, Pong):
                self.out.append(("pong", bytes(event.payload)))
            elif isinstance(event, (TextMessage, BytesMessage)):
                self.length += len(event.data)
                if self.max_size and self.length > self.max_size:
                    self.out.append(("close", 1009))
                    self.ended = True
                    return
                self.partial = event.data if self.partial is None else self.partial + event.data
                if event.message_finished:
                    self.out.append(self.partial)
                    self.partial = None
                    self.length = 0


def via_wsproto(chunks: list[bytes], max_size: int | None) -> list[Any]:
    ref = Reference(max_size)
    for chunk in chunks:
        ref.feed(chunk)
    return ref.out


def via_lean(chunks: list[bytes], max_size: int | None) -> tuple[list[Any], bool]:
    """The lean parser, handing over to the reference from where it stops (as the socket does).
    Returns the outputs and whether it handed over."""
    reader = FrameReader(max_size)
    ref = Reference(max_size)
    out: list[Any] = []
    for chunk in chunks:
        if reader.rest is None:
            for item in reader.feed(chunk):
                if isinstance(item, Ping):
                    out.append(("ping", bytes(item.payload)))
                elif isinstance(item, Pong):
                    out.append(("pong", bytes(item.payload)))
                else:
                    out.append(item)
            if reader.rest is not None:
                ref.feed(reader.rest)
        else:
            ref.feed(chunk)
    return out + ref.out, reader.rest is not None


def split(data: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 6)))) if len(data) > 1 else []
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


GOOD = [
    lambda rng: text(""),
    lambda rng: text("x" * rng.choice([1, 125, 126, 127, 300, 65535, 65536, 70000])),
    lambda rng: text("é€𝄞" * rng.randint(1, 200)),  # 2-, 3- and 4-byte characters
    lambda rng: text(json.dumps({"type": "set_state", "request_id": uuid.uuid4().hex})),
    lambda rng: frame(0x2, os.urandom(rng.choice([0, 5, 126, 1000]))),
    lambda rng: frame(0x9, os.urandom(rng.randint(0, 125))),
    lambda rng: frame(0xA, os.urandom(rng.randint(0, 125))),
]

BAD = {  # frames the lean path hands to wsproto (name: builder)
    "close 1000": lambda: frame(0x8, struct.pack("!H", 1000) + b"bye"),
    "close empty": lambda: frame(0x8, b""),
    "close bad code": lambda: frame(0x8, struct.pack("!H", 999)),
    "fragmented text": lambda: text("hel", fin=False) + frame(0x0, b"lo"),
    "fragmented with a ping inside": lambda: text("a", fin=False) + frame(0x9, b"p") + frame(0x0, b"b"),
    "fragmented binary": lambda: frame(0x2, b"\x00\x01", fin=False) + frame(0x0, b"\x02"),
    "lone continuation": lambda: frame(0x0, b"x"),
    "rsv1": lambda: text("x", rsv=4),
    "rsv3": lambda: text("x", rsv=1),
    "reserved opcode": lambda: frame(0x3, b"x"),
    "reserved control opcode": lambda: frame(0xB, b"x"),
    "unmasked": lambda: text("hello", masked=False),
    "non-minimal 2-byte length": lambda: text("short", length_bytes=2),
    "non-minimal 8-byte length": lambda: text("x" * 200, length_bytes=8),
    "8-byte length with the MSB set": lambda: bytes((0x81, 0xFF)) + b"\x80" + b"\x00" * 7 + b"abcd",
    "fragmented ping": lambda: frame(0x9, b"p", fin=False),
    "ping over 125 bytes": lambda: frame(0x9, b"p" * 126),
    "invalid UTF-8": lambda: frame(0x1, b"ok \xff\xfe"),
    "truncated UTF-8": lambda: frame(0x1, "é".encode()[:1]),
    "too big": lambda: text("y" * 3000),
}

MAX = 2000  # the size limit of the unit comparisons (the "too big" frame exceeds it)


@pytest.mark.parametrize("seed", range(40))
def test_lean_then_wsproto_equals_wsproto_alone(seed):
    rng = random.Random(seed)
    good = [rng.choice(GOOD)(rng) for _ in range(rng.randint(1, 8))]
    good = [f for f in good if len(f) < MAX or f[0] in (0x89, 0x8A)]  # the data frames within the limit
    bad = list(BAD.values())[seed % len(BAD)]() if seed % 4 else b""
    tail = [text("after")] if seed % 3 == 0 else []
    stream = b"".join([*good, bad, *tail])
    chunks = split(stream, rng)
    expected = via_wsproto(chunks, MAX)
    got, handed_over = via_lean(chunks, MAX)
    assert got == expected
    assert handed_over == bool(bad)


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_branch_hands_over_at_the_frame_it_cannot_take(name):
    before = text('{"a": 1}') + frame(0x2, b"\x00bin") + frame(0xA, b"pong")
    bad = BAD[name]()
    later = text("later")
    reader = FrameReader(MAX)
    out = reader.feed(before + bad + later)
    assert out[:2] == ['{"a": 1}', b"\x00bin"]
    assert isinstance(out[2], Pong) and out[2].payload == b"pong"
    assert len(out) == 3
    assert reader.rest == bad + later  # from the first byte of the bad frame
    with pytest.raises(RuntimeError):
        reader.feed(b"more")
    # and what wsproto answers from there is what it answers alone
    assert via_lean([before + bad], MAX)[0] == via_wsproto([before + bad], MAX)


def test_incomplete_frames_wait_for_their_rest_byte_by_byte():
    messages = ["", "x" * 125, "y" * 126, "z" * 65536, "é" * 40000]
    stream = b"".join(text(m) for m in messages)
    reader = FrameReader(None)
    got: list[Any] = []
    for i in range(0, len(stream), 7):
        got += reader.feed(stream[i:i + 7])
    assert got == messages and reader.rest is None


def test_no_size_limit_takes_big_messages_and_a_limit_is_in_bytes():
    big = "b" * 200_000
    assert FrameReader(None).feed(text(big)) == [big]
    reader = FrameReader(10)
    assert reader.feed(text("é" * 5)) == ["é" * 5]  # 10 bytes: within
    over = text("é" * 6)  # 12 bytes (6 characters): handed over, unchanged
    assert reader.feed(over) == [] and reader.rest == over


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 255, 256, 257, 1024, 1025, 70000])
def test_unmask_matches_wsproto(n):
    from wsproto.frame_protocol import XorMaskerSimple

    key = os.urandom(4)
    payload = os.urandom(n)
    assert unmask(payload, key) == bytes(XorMaskerSimple(bytearray(key)).process(bytearray(payload)))


# -- over the wire ---------------------------------------------------------------------------------
def _rpc(wire) -> websocket.WebSocket:
    ws = websocket.create_connection(wire.url.replace("http", "ws") + "/sync_worker/rpc",
                                     subprotocols=["prefect"], timeout=10)
    ws.send(json.dumps({"type": "auth", "token": wire.auth_string}))
    assert json.loads(ws.recv())["type"] == "auth_success"
    return ws


def _subscribed(wire, client_id: str = "frames") -> websocket.WebSocket:
    """A subscription whose handling has begun (one set_state answered): what a test sends
    next is read by the subscription's own callback, not the handshake."""
    ws = wire.subscribe(keys=["tests.frames-nothing"], client_id=client_id).ws
    ws.sock.sendall(_set_state_404("ready"))
    assert _answers(ws, 1)[0]["request_id"] == "ready"
    return ws


def _set_state_404(request_id: str) -> bytes:
    return text(json.dumps({"type": "set_state", "request_id": request_id, "task_run_id": str(uuid.uuid4()),
                            "state": {"type": "RUNNING"}, "force": False}))


def _answers(ws: websocket.WebSocket, count: int) -> list[dict[str, Any]]:
    ws.settimeout(10)
    return [json.loads(ws.recv()) for _ in range(count)]


def test_a_burst_of_creates_split_at_every_byte_is_answered_in_full(wire):
    ws = _rpc(wire)
    try:
        bodies = [wire.create_body("tests.frames") for _ in range(20)]
        stream = b"".join(text(json.dumps({"type": "create", "request_id": f"r{i}", "body": body}))
                          for i, body in enumerate(bodies))
        # first in one write, then trickled a few bytes at a time
        half = len(bodies) // 2
        cut = sum(len(text(json.dumps({"type": "create", "request_id": f"r{i}", "body": bodies[i]})))
                  for i in range(half))
        ws.sock.sendall(stream[:cut])
        for i in range(cut, len(stream), 13):
            ws.sock.sendall(stream[i:i + 13])
            time.sleep(0.001)
        replies = {r["request_id"]: r for r in _answers(ws, len(bodies))}
        assert set(replies) == {f"r{i}" for i in range(len(bodies))}
        for i, body in enumerate(bodies):
            assert replies[f"r{i}"]["status_code"] == 201
            assert replies[f"r{i}"]["result"]["dynamic_key"] == body["dynamic_key"]
    finally:
        ws.close()


def test_a_ping_gets_the_pong_wsproto_would_send_byte_for_byte(wire):
    from wsproto.frame_protocol import FrameProtocol

    ws = _subscribed(wire)
    try:
        payload = b"are you there?"
        # a ping between two messages, all in one write: both answered (in order), and the
        # ping (its pong may overtake an answer still being committed)
        ws.sock.sendall(_set_state_404("a") + frame(0x9, payload) + _set_state_404("b"))
        ws.settimeout(10)
        frames = [ws.recv_frame() for _ in range(3)]
        assert [f.data for f in frames if f.opcode == websocket.ABNF.OPCODE_PONG] == [payload]
        assert [json.loads(f.data)["request_id"] for f in frames if f.opcode == websocket.ABNF.OPCODE_TEXT] == ["a", "b"]
        # the exact bytes: read a lone pong off the raw socket
        ws.sock.sendall(frame(0x9, b"raw"))
        expected = bytes(FrameProtocol(client=False, extensions=[]).pong(b"raw"))
        got = b""
        deadline = time.monotonic() + 10
        while len(got) < len(expected) and time.monotonic() < deadline:
            got += ws.sock.recv(len(expected) - len(got))
        assert got == expected == b"\x8a\x03raw"
    finally:
        ws.close()


def test_a_fragmented_message_after_lean_ones_is_still_understood(wire):
    ws = _subscribed(wire)
    try:
        message = json.dumps({"type": "set_state", "request_id": "frag", "task_run_id": str(uuid.uuid4()),
                              "state": {"type": "RUNNING"}, "force": False}).encode()
        fragmented = frame(0x1, message[:10], fin=False) + frame(0x9, b"mid") + frame(0x0, message[10:])
        ws.sock.sendall(_set_state_404("first") + fragmented + _set_state_404("after"))
        ws.settimeout(10)
        answers, pongs = [], []
        while len(answers) + len(pongs) < 4:
            f = ws.recv_frame()
            if f.opcode == websocket.ABNF.OPCODE_PONG:
                pongs.append(f.data)
            else:
                answers.append(json.loads(f.data)["request_id"])
        assert answers == ["first", "frag", "after"] and pongs == [b"mid"]
        # still served after the hand-over to wsproto
        ws.sock.sendall(_set_state_404("later"))
        assert _answers(ws, 1)[0]["request_id"] == "later"
    finally:
        ws.close()


def _create_frame(wire, run_id: str) -> bytes:
    body = wire.create_body("tests.frames", id=run_id)
    return text(json.dumps({"type": "create", "request_id": run_id, "body": body}))


def _read_close_code(ws: websocket.WebSocket) -> int:
    """The close code (an answer sent before the close may come first, or be lost with the
    connection: the close does not wait for answers still being committed)."""
    ws.settimeout(10)
    return read_close(ws)[0]


def _exists(wire, run_id: str) -> bool:
    return wire.http.get(f"{wire.url}/task_runs/{run_id}", timeout=10).status_code == 200


@pytest.mark.parametrize(("name", "code"), [
    ("invalid UTF-8", 1007), ("truncated UTF-8", 1007), ("unmasked", 1002), ("rsv1", 1002),
    ("reserved opcode", 1002), ("non-minimal 2-byte length", 1002), ("non-minimal 8-byte length", 1002),
    ("8-byte length with the MSB set", 1002), ("ping over 125 bytes", 1002), ("fragmented ping", 1002),
    ("lone continuation", 1002), ("close bad code", 1002),
])
def test_close_codes_after_lean_messages(wire, name, code, caplog):
    """A create and a bad frame in one write: the create is read (the run exists) and the
    bad frame closes the connection with wsproto's code, which the server's log names."""
    caplog.set_level("INFO", logger="sync_worker.server.sockets")
    ws = _rpc(wire)
    run_id = str(uuid.uuid4())
    try:
        ws.sock.sendall(_create_frame(wire, run_id) + BAD[name]())
        assert _read_close_code(ws) == code
        wait_for(lambda: _exists(wire, run_id), timeout=10)
        wait_for(lambda: _close_logged(caplog, code), timeout=10)
    finally:
        ws.close()


def _close_logged(caplog, code: int) -> bool:
    return any(r.name == "sync_worker.server.sockets" and "closed: " in r.getMessage()
               and r.getMessage().endswith(f"({code})") and "127.0.0.1" in r.getMessage() for r in caplog.records)


def test_too_big_after_lean_messages_closes_1009(server_factory, make_wire, caplog):
    caplog.set_level("INFO", logger="sync_worker.server.sockets")
    wire = make_wire(server_factory(max_body_size=2000))
    ws = _rpc(wire)
    run_id = str(uuid.uuid4())
    try:
        ws.sock.sendall(_create_frame(wire, run_id) + BAD["too big"]())
        assert _read_close_code(ws) == 1009
        wait_for(lambda: _exists(wire, run_id), timeout=10)
        wait_for(lambda: _close_logged(caplog, 1009), timeout=10)
        assert any("too big" in r.getMessage() for r in caplog.records)
    finally:
        ws.close()


def test_the_close_handshake_after_lean_messages(wire):
    ws = _rpc(wire)
    run_id = str(uuid.uuid4())
    try:
        ws.sock.sendall(_create_frame(wire, run_id) + frame(0x8, struct.pack("!H", 1000) + b"bye"))
        ws.settimeout(10)
        assert read_close(ws) == (1000, "bye")  # the server answers the close with the client's code
        ws.sock.settimeout(5)
        try:
            rest = ws.sock.recv(100)
        except (ConnectionResetError, socket.timeout):
            rest = b""
        assert rest == b""  # then the connection ends
        wait_for(lambda: _exists(wire, run_id), timeout=10)
    finally:
        ws.close()
