"""A lean parser for the websocket frames clients send to the server (the hot receive path).

Why: wsproto parses every frame through a generator, a buffer with commit/rollback, an
extension loop, a masker object, an incremental UTF-8 decoder and an event object, and
simple-websocket then concatenates the message: about a tenth of the server's Python time
per run went there. Almost every frame a client sends is one complete, masked, unfragmented
text frame, and that case is simple.

What :class:`FrameReader` handles itself, and only on a connection that is OPEN with no
extension negotiated (the caller checks): complete, final, masked text or binary frames with
no reserved bit, a minimally encoded length within ``max_message_size``, and (text) valid
UTF-8, and complete ping and pong frames (returned as wsproto's ``Ping``/``Pong`` events: the
socket answers a ping itself, under its send lock). Anything else — a close frame, a
fragment or continuation, a reserved bit or opcode, an unmasked frame, a non-minimal length,
a message over the size limit, invalid UTF-8 — ends the lean path for the connection: the
bytes from that frame on are handed to wsproto, which then parses everything that follows.
wsproto has seen no frame before (or only whole control frames), so it starts at a frame
boundary with no message in progress and answers exactly as it always did (close codes 1002,
1007, 1009, the close handshake). The lean path never closes a connection itself.
"""
from __future__ import annotations

from wsproto.events import Ping, Pong

from sync_worker.framing import mask as unmask

__all__ = ["FrameReader", "unmask"]

_TEXT = 0x81  # FIN + text, no reserved bit
_BINARY = 0x82
_PING = 0x89
_PONG = 0x8A


class FrameReader:
    """Splits received bytes into messages (``str`` for text, ``bytes`` for binary) and
    ``Ping``/``Pong`` events. After :meth:`feed` returned, :attr:`rest` is not None once the
    lean path ended: those bytes (possibly empty) go to wsproto, and so does everything
    received afterwards."""

    __slots__ = ("_buffer", "max_size", "rest")

    def __init__(self, max_size: int | None = None) -> None:
        self.max_size = max_size
        self._buffer = bytearray()
        self.rest: bytes | None = None

    def feed(self, data: bytes) -> list[str | bytes | Ping | Pong]:
        """The complete frames in what was buffered plus ``data``, in order (an incomplete
        frame waits for the rest)."""
        if self.rest is not None:
            raise RuntimeError("the lean path ended: feed wsproto instead")
        if self._buffer:
            self._buffer += data
            view: bytes | bytearray = self._buffer
        else:
            view = data
        out: list[str | bytes | Ping | Pong] = []
        size = len(view)
        pos = 0
        max_size = self.max_size
        while size - pos >= 2:
            first = view[pos]
            second = view[pos + 1]
            if first != _TEXT and first != _BINARY and first != _PING and first != _PONG:
                break  # close, fragment, continuation, reserved bit or opcode: wsproto's
            if not second & 0x80:
                break  # unmasked: wsproto closes 1002
            length = second & 0x7F
            head = pos + 2
            if length >= 126:
                if first == _PING or first == _PONG:
                    break  # control frame over 125 bytes: 1002 from wsproto
                if length == 126:
                    if size - pos < 4:
                        return self._keep(view, pos, out)
                    length = (view[pos + 2] << 8) | view[pos + 3]
                    head = pos + 4
                    if length < 126:
                        break  # not minimal: 1002
                else:
                    if size - pos < 10:
                        return self._keep(view, pos, out)
                    length = int.from_bytes(view[pos + 2:pos + 10], "big")
                    head = pos + 10
                    if length < 65536 or length >> 63:
                        break  # not minimal, or the MSB set: 1002
            if max_size is not None and length > max_size and (first == _TEXT or first == _BINARY):
                break  # too big: wsproto streams it and simple-websocket closes 1009
            end = head + 4 + length
            if end > size:
                return self._keep(view, pos, out)
            payload = unmask(view[head + 4:end], view[head:head + 4])
            if first == _TEXT:
                try:
                    out.append(payload.decode("utf-8"))
                except UnicodeDecodeError:
                    break  # wsproto closes 1007
            elif first == _BINARY:
                out.append(payload)
            elif first == _PING:
                out.append(Ping(payload))
            else:
                out.append(Pong(payload))
            pos = end
        else:
            return self._keep(view, pos, out)
        # the lean path ends at ``pos``
        self.rest = bytes(view[pos:])
        self._buffer = bytearray()
        return out

    def _keep(self, view: bytes | bytearray, pos: int, out: list[str | bytes | Ping | Pong]) -> list[str | bytes | Ping | Pong]:
        if pos >= len(view):
            self._buffer = bytearray()
        elif view is self._buffer:
            del self._buffer[:pos]
        else:
            self._buffer = bytearray(view[pos:])
        return out
