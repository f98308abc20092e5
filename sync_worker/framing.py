"""The bytes of RFC 6455 frames that both sides build or read by hand on their hot paths.

Why by hand: the websocket libraries (websocket-client on the client, wsproto on the
server) build an object, run checks and copy arrays for every frame, and every run costs
several frames on each side. What both sides share is here once: the frame header of an
unfragmented text frame, and the masking of a payload (XOR with a repeated 4-byte key,
which is also its unmasking). No dependency beyond the standard library: the client and
the server both import it.
"""
from __future__ import annotations

import struct

__all__ = ["mask", "text_frame"]

_XOR_TABLES = [bytes(b ^ k for b in range(256)) for k in range(256)]


def mask(payload: bytes | bytearray, key: bytes | bytearray) -> bytes:
    """``payload`` XOR the repeated 4-byte ``key`` (RFC 6455 5.3; masking and unmasking are
    the same) at C speed: one big-integer XOR for short payloads, four ``translate`` calls
    over strided slices for long ones (faster past a few hundred bytes)."""
    n = len(payload)
    if not n:
        return b""
    if n <= 256:
        repeated = (bytes(key) * ((n + 3) >> 2))[:n]
        return (int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")).to_bytes(n, "little")
    data = bytearray(payload)
    for i in range(4):
        data[i::4] = data[i::4].translate(_XOR_TABLES[key[i]])
    return bytes(data)


def text_frame(payload: bytes, mask_key: bytes | None = None) -> bytes:
    """One final, unfragmented text frame (RFC 6455 5.2) carrying ``payload`` (UTF-8).

    ``mask_key`` (4 bytes): a client's frame, masked with it, the bytes websocket-client's
    ``ABNF.create_frame(...).format()`` gives; None: a server's unmasked frame, the bytes
    wsproto sends without extensions (both tested)."""
    n = len(payload)
    bit = 0x80 if mask_key is not None else 0
    if n < 126:
        header = bytes((0x81, bit | n))
    elif n < 65536:
        header = struct.pack("!BBH", 0x81, bit | 126, n)
    else:
        header = struct.pack("!BBQ", 0x81, bit | 127, n)
    if mask_key is None:
        return header + payload
    return header + mask_key + mask(payload, mask_key)
