"""``sockets.send_all``: the client's frames written in one system call when they fit, the
rest sent as ``sendall`` would, bytes in order; TLS sockets untouched."""
from __future__ import annotations

import os
import socket
import threading

import pytest

from sync_worker.sockets import send_all


def _pair(timeout: float | None = 5.0) -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ours.settimeout(timeout)  # as the client's sockets are: non-blocking descriptor
    theirs.settimeout(30)
    return ours, theirs


def _read(sock: socket.socket, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return bytes(got)


def test_a_small_frame_arrives_whole():
    ours, theirs = _pair()
    with ours, theirs:
        send_all(ours, b"hello")
        assert _read(theirs, 5) == b"hello"


@pytest.mark.parametrize("timeout", [5.0, None])
def test_more_than_the_socket_takes_at_once_is_sent_in_order(timeout):
    ours, theirs = _pair(timeout)
    payload = os.urandom(3 * 1024 * 1024)  # far beyond the buffers: os.write is partial
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(_read(theirs, len(payload))))
    with ours, theirs:
        reader.start()
        send_all(ours, payload)
        reader.join(30)
        assert not reader.is_alive()
    assert received[0] == payload


def test_a_closed_peer_raises_an_oserror():
    ours, theirs = _pair()
    theirs.close()
    with ours, pytest.raises(OSError):
        for _ in range(100):  # the first write may land in the buffer before the reset is known
            send_all(ours, b"x" * 65536)


def test_other_kinds_of_socket_use_their_own_sendall():
    class Wrapped(socket.socket):  # e.g. ssl.SSLSocket: its bytes must go through it
        sent: list[bytes] = []

        def sendall(self, data, flags=0):
            self.sent.append(bytes(data))

    sock = Wrapped(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        send_all(sock, b"frame")
    assert Wrapped.sent == [b"frame"]
