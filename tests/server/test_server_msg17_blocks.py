"""The three blocks the shared reader enters on every pass and commit, now plain context
manager objects instead of contextlib generators (cheaper per entry), keep what the generators
did: ``SQLiteDatabase.gathering`` (operations submitted inside are committed together at the
end of the outermost block, even when the block raised; a closed database answers each
gathered callback with DatabaseClosed), ``sockets.coalescing`` (held messages go out at the end
of the outermost block, one write per socket; a socket that refuses gets its fallback) and
``Outbox.direct`` (what the thread posts inside is sent by it at the end, also after an
error). Real SQLite database and real sockets (a socket pair)."""
from __future__ import annotations

import socket
import threading
from typing import Any

import pytest

from sync_worker.server import sockets
from sync_worker.server.database import DatabaseClosed, SQLiteDatabase

pytestmark = pytest.mark.timeout(60)


def _write_op(tx: Any) -> int:
    return threading.get_ident()


def test_gathering_commits_at_the_end_of_the_outermost_block(tmp_path) -> None:
    db = SQLiteDatabase(str(tmp_path / "g.db"))
    try:
        results: list[Any] = []

        def callback(result: Any, error: BaseException | None) -> None:
            results.append((result, error))

        with db.gathering():
            db.submit(_write_op, callback)
            with db.gathering():  # nested: the outer block commits
                db.submit(_write_op, callback)
            assert results == []  # nothing committed before the outer block ends
            db.submit(_write_op, callback)
            assert results == []
        # inline, in this thread, all three
        assert results == [(threading.get_ident(), None)] * 3

        results.clear()
        with pytest.raises(RuntimeError, match="boom"), db.gathering():
            db.submit(_write_op, callback)
            raise RuntimeError("boom")
        assert results == [(threading.get_ident(), None)]  # submitted all the same

        # the block is reusable and per thread: another thread's block is its own
        seen: list[Any] = []

        def other() -> None:
            with db.gathering():
                db.submit(_write_op, lambda r, e: seen.append((r, e)))
                assert seen == []
        with db.gathering():
            db.submit(_write_op, callback)
            thread = threading.Thread(target=other)
            thread.start()
            thread.join(10)
            assert len(seen) == 1 and seen[0][1] is None  # committed at the end of ITS block
        assert len(results) == 2
    finally:
        db.close()


def test_gathering_on_a_closed_database_answers_each_callback(tmp_path) -> None:
    db = SQLiteDatabase(str(tmp_path / "c.db"))
    errors: list[Any] = []
    with db.gathering():
        db.submit(_write_op, lambda r, e: errors.append(e))
        db.submit(_write_op, lambda r, e: errors.append(e))
        db.close()
    assert len(errors) == 2 and all(isinstance(e, DatabaseClosed) for e in errors)
    with db.gathering():  # and the next block starts clean
        pass


class _Sock:
    """The part of a WebSocket that coalescing uses, over a real socket pair."""

    def __init__(self, refuse: bool = False) -> None:
        self.a, self.b = socket.socketpair()
        self.refuse = refuse
        self.writes: list[list[str]] = []

    def try_send_many(self, messages: list[str]) -> bool:
        if self.refuse:
            return False
        self.writes.append(list(messages))
        self.a.sendall("".join(messages).encode())
        return True

    def try_send(self, message: str) -> bool:
        return self.try_send_many([message])

    def close(self) -> None:
        self.a.close()
        self.b.close()


def test_coalescing_sends_once_per_socket_at_the_end_of_the_outermost_block() -> None:
    one, two, refusing = _Sock(), _Sock(), _Sock(refuse=True)
    try:
        sent: list[int] = []
        fallen: list[str] = []
        with sockets.coalescing():
            sockets.send_soon(one, "a", fallen.append, sent.append)  # type: ignore[arg-type]
            with sockets.coalescing():
                sockets.send_soon(two, "x", fallen.append)  # type: ignore[arg-type]
                sockets.send_soon(one, "b", fallen.append, sent.append)  # type: ignore[arg-type]
            assert one.writes == [] and two.writes == []  # held until the outer block ends
            sockets.send_soon(refusing, "r", fallen.append)  # type: ignore[arg-type]
        assert one.writes == [["a", "b"]] and two.writes == [["x"]]
        assert one.b.recv(10) == b"ab"
        assert sent == [1, 1] and fallen == ["r"]

        with pytest.raises(ValueError), sockets.coalescing():
            sockets.send_soon(one, "c", fallen.append)  # type: ignore[arg-type]
            raise ValueError
        assert one.writes[-1] == ["c"]  # sent all the same
        sockets.send_soon(one, "d", fallen.append)  # outside a block: at once
        assert one.writes[-1] == ["d"]
    finally:
        for s in (one, two, refusing):
            s.close()


class _SendingWs:
    def __init__(self) -> None:
        self.sent: list[list[str]] = []
        self.on_tail = None

    def send_many(self, messages: list[str]) -> None:
        self.sent.append(list(messages))

    def flush_tail(self) -> None:
        pass


def test_outbox_direct_sends_what_the_thread_posted_at_the_end() -> None:
    ws = _SendingWs()
    outbox = sockets.Outbox(ws, "test-outbox")  # type: ignore[arg-type]  # (its thread not started)
    with outbox.direct():
        assert outbox.direct_here()
        outbox.post("one")
        outbox.post("two")
        assert ws.sent == []
    assert not outbox.direct_here()
    assert ws.sent == [["one", "two"]]
    with pytest.raises(KeyError), outbox.direct():
        outbox.post("three")
        raise KeyError
    assert ws.sent[-1] == ["three"] and not outbox.direct_here()
    outbox.post("queued")  # outside: for the sender thread
    assert ws.sent[-1] == ["three"]


def test_an_outbox_woken_with_nothing_to_send_makes_no_send() -> None:
    ws = _SendingWs()
    ticks: list[bool] = []
    ticked = threading.Event()

    def tick(poked: bool) -> None:
        ticks.append(poked)
        ticked.set()

    outbox = sockets.Outbox(ws, "test-outbox", tick=tick)  # type: ignore[arg-type]
    outbox.start(poked=True)  # woken by a poke, nothing queued
    try:
        assert ticked.wait(10)
        assert ticks == [True] and ws.sent == []  # no empty write (a call the tests count)
        ticked.clear()
        outbox.post("one")
        assert ticked.wait(10)
        assert ws.sent == [["one"]]
    finally:
        outbox.close()
