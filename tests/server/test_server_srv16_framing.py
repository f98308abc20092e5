"""``framing.mask`` (both sides' masking, the server's unmasking): the payload XOR the
repeated key, for every length around the switch from the integer XOR to the slices."""
from __future__ import annotations

import os

import pytest

from sync_worker.framing import _SHORT, mask


def _reference(payload: bytes, key: bytes) -> bytes:
    return bytes(b ^ key[i % 4] for i, b in enumerate(payload))


@pytest.mark.parametrize("lengths", [range(0, 64), range(64, _SHORT + 70), [1000, 4096, 65535, 70001]])
def test_mask_is_the_payload_xor_the_repeated_key(lengths):
    for n in lengths:
        for key in (os.urandom(4), b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x01\x80\x7f\xfe"):
            payload = os.urandom(n)
            expected = _reference(payload, key)
            for given, given_key in ((payload, key), (bytearray(payload), bytearray(key))):
                masked = mask(given, given_key)
                assert type(masked) is bytes
                assert masked == expected, n
            assert mask(expected, key) == payload  # unmasking is masking again


def test_mask_of_zeros_and_ones_keeps_every_byte():
    for n in (_SHORT - 1, _SHORT, _SHORT + 1):
        assert mask(b"\x00" * n, b"\x12\x34\x56\x78") == (b"\x12\x34\x56\x78" * n)[:n]
        assert mask(b"\xff" * n, b"\x00\x00\x00\x00") == b"\xff" * n
