"""Ids made in batches (``ids.uuid4_texts``, ``models.new_id``): the same text as
``uuid.UUID(int=bits, version=4)``, never repeated across threads or a fork."""
from __future__ import annotations

import os
import random
import sys
import threading
import uuid

import pytest

from sync_worker.ids import uuid4_text, uuid4_texts
from sync_worker.server import models


@pytest.mark.parametrize("count", [1, 2, 3, 64, 200])
def test_uuid4_texts_is_uuid4_text_of_each_128_bit_word(count):
    rng = random.Random(count)
    for bits in [0, (1 << (128 * count)) - 1] + [rng.getrandbits(128 * count) for _ in range(200)]:
        words = [(bits >> 128 * (count - 1 - i)) & ((1 << 128) - 1) for i in range(count)]
        made = uuid4_texts(bits, count)
        assert made == [uuid4_text(word) for word in words]
        assert made == [str(uuid.UUID(int=word, version=4)) for word in words]


def test_new_id_from_many_threads_never_repeats():
    models._ids.clear()
    made: list[list[str]] = [[] for _ in range(8)]
    start = threading.Barrier(8)

    def draw(out: list[str]) -> None:
        start.wait(timeout=30)
        for _ in range(5000):
            out.append(models.new_id())

    threads = [threading.Thread(target=draw, args=(out,)) for out in made]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive()
    every = [text for out in made for text in out]
    assert len(every) == 40000
    assert len(set(every)) == 40000
    assert all(uuid.UUID(text).version == 4 and str(uuid.UUID(text)) == text for text in every[::97])


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="needs os.fork")
def test_a_forked_child_does_not_hand_out_the_parents_ids_made_ahead():
    models._ids.clear()
    models.new_id()  # the batch is made: the rest of it waits in the parent
    ahead = list(models._ids)
    assert len(ahead) == models._ID_BATCH - 1
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(write, ",".join(models.new_id() for _ in range(3 * models._ID_BATCH)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        child = pipe.read().decode().split(",")
    os.waitpid(pid, 0)
    assert len(child) == 3 * models._ID_BATCH
    parent = [models.new_id() for _ in range(3 * models._ID_BATCH)]
    assert parent[:len(ahead)] == ahead[::-1]
    assert not set(child) & set(parent)
