"""Websocket plumbing shared by the server's two sockets (subscription and rpc).

The socket class (thread-safe, complete sends; non-blocking pings), the registry of live
connections and its keep-alive pinger, the accept/serve/close frame of a connection, the
auth handshake, the decoding of messages with Prefect's close codes, and the :class:`Outbox`
(one sender thread per connection, for messages produced by other threads). What each socket
means lives in :mod:`.subscriptions` and :mod:`.rpc`.

Reading: one :class:`SharedReader` thread per server reads every lean connection and runs its
handler (``SYNC_WORKER_SHARED_READER=0``: one reader thread per connection, as before); so no
handler may wait on a client: sends on those connections never block (:meth:`WebSocket._send_nowait`).
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import simple_websocket
from simple_websocket.errors import ConnectionClosed
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import AcceptConnection, Ping, Pong, Request, TextMessage
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError

from sync_worker import framing

from . import validation
from .core import Core
from .database import DatabaseClosed
from .frames import FrameReader

logger = logging.getLogger("sync_worker.server.sockets")

#: the socket flags as plain ints: ``socket.MSG_PEEK | socket.MSG_DONTWAIT`` builds an IntFlag
#: through enum's Python code on every call (2 % of the server's time in a drain)
_NOWAIT = int(socket.MSG_DONTWAIT)
_PEEK_NOWAIT = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)

POLICY_VIOLATION = 1008
UNSUPPORTED_DATA = 1003
PROTOCOL_ERROR = 1002
#: Close codes of a connection that simply ended (normal, going away, none given, dropped).
_ENDED = {1000, 1001, 1005, 1006}
GOING_AWAY = 1001
#: The close code of a server that stops: what uvicorn, hence a Prefect server, sends. Prefect's
#: clients (its task worker's subscription, its callers' event waits) reconnect after it, and
#: stop for good after 1001 (websockets calls that a clean close, ``ConnectionClosedOK``).
SERVICE_RESTART = 1012
NORMAL = 1000
PREFECT_VIOLATION = 4001
#: seconds a new connection has for each handshake message (auth, subscribe) before it is
#: closed 1008: a connection that never authenticates must not hold a thread forever
HANDSHAKE_TIMEOUT = 5.0

class Signal:
    """The ``event_class`` given to simple-websocket, whose reader thread calls ``set()`` each
    time a message arrived (or the connection closed).

    Until :meth:`attach` it is a plain Event: the handler thread reads the auth and subscribe
    messages with ``ws.receive()``. After it, ``set()`` runs the attached callback right in the
    reader thread, so an ack or a set_state is handled without waking another thread first
    (each thread hop costs latency under the GIL, and one run is in flight per connection).
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._callback: Callable[[], None] | None = None

    def set(self) -> None:
        callback = self._callback
        if callback is None:
            self._event.set()
        else:
            callback()

    def clear(self) -> None:
        self._event.clear()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)

    def attach(self, callback: Callable[[], None]) -> None:
        self._callback = callback
        callback()  # what arrived before


class OneAtATime:
    """Calls ``work`` in whichever thread calls this, one thread at a time, never blocking: a
    thread that finds another at work leaves it a note (``_again``) that the other reads
    before it stops, so nothing that arrived is left unhandled. The message handler both
    sockets attach to :class:`Signal` (the reader thread calls it; so does the stopping
    server, to wake a connection)."""

    def __init__(self, work: Callable[[], None]) -> None:
        self._work = work
        self._lock = threading.Lock()
        self._again = False

    def __call__(self) -> None:
        self._again = True
        while self._again:
            if not self._lock.acquire(blocking=False):
                return
            try:
                while self._again:
                    self._again = False
                    self._work()
            finally:
                self._lock.release()


#: bytes read per ``recv`` by a connection's reader thread (simple-websocket reads 4 KiB): a
#: burst of messages, or one run of a few KiB, is read in one system call
RECEIVE_BYTES = 65536


def text_frame(data: str) -> bytes:
    """One unfragmented, unmasked text frame, as wsproto builds it for a server without
    extensions (the same bytes; tested), built directly (:func:`sync_worker.framing.text_frame`):
    wsproto goes through an event object, a state check, bytearray copies and an extension
    loop for every frame, and the server sends one or more frames for every run."""
    return framing.text_frame(data.encode("utf-8"))


def _text_frames(messages: list[str] | tuple[str, ...]) -> bytes:
    """The frames of several text messages, in order, as one write."""
    if len(messages) == 1:
        return text_frame(messages[0])
    return b"".join([text_frame(message) for message in messages])


#: the websocket protocol version this server speaks (RFC 6455)
WEBSOCKET_VERSION = "13"


def handshake_request(environ: dict[str, Any]) -> bytes:
    """The opening handshake as wsproto is given it: rebuilt from the environ's ``HTTP_``
    headers, as simple-websocket's ``Server.handshake`` does (:meth:`WebSocket.handshake` uses
    this, so :func:`handshake_problem`'s trial parses exactly what the socket will parse)."""
    data = b"GET / HTTP/1.1\r\n"
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            header = "-".join([p.capitalize() for p in key[5:].split("_")])
            data += f"{header}: {value}\r\n".encode()
    return data + b"\r\n"


def handshake_problem(environ: dict[str, Any]) -> tuple[int, str, list[tuple[str, str]]] | None:
    """What is wrong with a websocket upgrade request, as ``(status, detail, headers)`` of the
    HTTP answer it gets instead of the upgrade (RFC 6455 4.2.1-4.2.2), or None if the socket
    can accept it. wsproto raises on such a request (in the handler's thread, after the
    handler took the connection: nothing was answered and a traceback was logged); so the
    HTTP layer asks this first. An unsupported ``Sec-WebSocket-Version`` is 426 Upgrade
    Required; a missing one, or anything else, 400; both name ``Sec-WebSocket-Version: 13``."""
    problems: list[str] = []
    headers: list[tuple[str, str]] = []
    connection = [token.strip().lower() for token in environ.get("HTTP_CONNECTION", "").split(",")]
    if "upgrade" not in connection:
        problems.append("missing header 'Connection: Upgrade'")
    upgrade = environ.get("HTTP_UPGRADE", "")
    if upgrade.strip().lower() != "websocket":
        problems.append(f"header 'Upgrade' must be 'websocket', not {upgrade[:100]!r}")
    version = environ.get("HTTP_SEC_WEBSOCKET_VERSION", "").strip()
    unsupported = bool(version) and version != WEBSOCKET_VERSION
    if not version:
        problems.append(f"missing header 'Sec-WebSocket-Version' (this server speaks version {WEBSOCKET_VERSION})")
    elif unsupported:
        problems.append(f"unsupported websocket version {version[:100]!r} (this server speaks version "
                        f"{WEBSOCKET_VERSION})")
    if version != WEBSOCKET_VERSION:
        headers.append(("Sec-WebSocket-Version", WEBSOCKET_VERSION))
    key = environ.get("HTTP_SEC_WEBSOCKET_KEY")
    if key is None or not key.strip():
        problems.append("missing header 'Sec-WebSocket-Key'")
    else:
        try:
            nonce = base64.b64decode(key.strip(), validate=True)
        except (binascii.Error, ValueError):
            nonce = b""
        if len(nonce) != 16:
            problems.append(f"header 'Sec-WebSocket-Key' must be 16 bytes in base64 (24 characters), not "
                            f"{key[:100]!r}")
    if not environ.get("HTTP_HOST"):
        problems.append("missing header 'Host'")
    if problems:
        status = 426 if unsupported and len(problems) == 1 else 400
        return status, "Bad websocket handshake: " + "; ".join(problems), headers
    # A trial of what the socket will do with it (header syntax, extension offers).
    try:
        trial = WSConnection(ConnectionType.SERVER)
        trial.receive_data(handshake_request(environ))
        for event in trial.events():
            if isinstance(event, Request):
                subprotocol = "prefect" if "prefect" in event.subprotocols else None
                trial.send(AcceptConnection(subprotocol=subprotocol, extensions=[PerMessageDeflate()]))
    except Exception as exc:  # wsproto's RemoteProtocolError, a ValueError from an extension offer
        return 400, f"Bad websocket handshake: {str(exc)[:200] or type(exc).__name__}", headers
    return None


class WebSocket(simple_websocket.Server):
    """simple-websocket server socket whose sends are thread-safe and complete (sendall)."""

    event: Signal

    def __init__(self, environ: dict[str, Any], reader: SharedReader | None = None, **kwargs: Any) -> None:
        self.send_lock = threading.Lock()
        #: the thread reading every lean connection of the server (None: a thread of its own)
        self._shared = reader
        self.ping_failures = 0
        #: the end of a frame :meth:`try_send` could only start (the socket's buffer was full):
        #: sent, under ``send_lock``, before anything else goes out
        self._tail: bytes | None = None
        #: shared reader: frames queued while another thread held ``send_lock`` (they go out
        #: after ``_tail``, before anything else; see :meth:`_send_nowait`)
        self._late: list[bytes] = []
        self._late_lock = threading.Lock()
        #: shared reader: why its reading of this connection is held (see SharedReader.hold)
        self.held: set[str] = set()
        #: called when :meth:`try_send` left a tail (the owner makes a thread that may block
        #: send it: :meth:`Outbox.poke`)
        self.on_tail: Callable[[], None] | None = None
        #: the lean reader loop runs (see :meth:`input_pending`)
        self._lean = False
        #: set by :meth:`input_pending`: the reader calls :attr:`on_read` after its next read
        self._wake_after_read = False
        #: held by the shared reader while it reads, and by :meth:`input_pending` while it
        #: looks at the socket and sets the flag (never while waiting for a client)
        self._input_lock = threading.Lock()
        self.on_read: Callable[[], None] | None = None
        self._no_extensions: bool | None = None  # see _plain
        kwargs.setdefault("receive_bytes", RECEIVE_BYTES)
        super().__init__(environ, event_class=Signal, thread_class=self._make_reader, **kwargs)

    def handshake(self) -> None:
        # simple-websocket's, with the request built by the function handshake_problem tries
        self.ws.receive_data(handshake_request(self.environ))
        self.connected = self._handle_events()

    def _make_reader(self, target: Callable[[], None]) -> Any:
        """simple-websocket's ``thread_class``: this connection's reader, a thread of its own,
        or (lean path, a :class:`SharedReader` given) a place in the shared reader's loop."""
        if self._shared is not None and not self.ping_interval:
            return _SharedHandle(self, target)
        return threading.Thread(target=target)

    def send(self, data: Any) -> None:
        self.send_many((data,))

    def send_many(self, messages: list[str] | tuple[Any, ...]) -> None:
        """:meth:`send` for several messages, in order, in one write when the frames can be
        built here (the answers to the state changes one commit carried, and the runs it
        claimed): one system call, and one wake-up of the client's reader, instead of one
        each."""
        if not messages:
            return
        if self._shared is not None and self._plain() and all(isinstance(message, str) for message in messages):
            self._send_nowait(_text_frames(messages))
            return
        with self.send_lock:
            if not self.connected:
                raise ConnectionClosed(self.close_reason, self.close_message)
            if self._tail is not None or self._late:
                self._send_tail()
            if self._plain() and all(isinstance(message, str) for message in messages):
                self.sock.sendall(_text_frames(messages))
            else:
                for message in messages:
                    self.sock.sendall(self.ws.send(TextMessage(data=message)))

    def try_send(self, data: str) -> bool:
        """Send a text frame without ever blocking, from a thread that must not wait for this
        client (one that committed for another connection: a run claimed at its create, the
        answer to an rpc wait). False, nothing sent, when another thread is sending, the
        connection is not open and plain, or the socket takes nothing now: the caller hands
        the message to the connection's outbox then. True when the frame went out, or its
        start did: the rest is then sent before any other frame, by the next send or by the
        owner's thread that :attr:`on_tail` wakes (:meth:`flush_tail`)."""
        return self.try_send_many((data,))

    def try_send_many(self, messages: list[str] | tuple[str, ...]) -> bool:
        """:meth:`try_send` for several messages, in one write: all of them went out (or their
        start did), or none."""
        if not self.send_lock.acquire(blocking=False):
            return False
        started = False
        try:
            if not self.connected or self._tail is not None or self._late or not self._plain():
                return False
            frame = _text_frames(messages)
            try:
                sent = self.sock.send(frame, _NOWAIT)
            except OSError:  # would block (BlockingIOError), or the connection failed
                return False
            if sent < len(frame):
                self._tail = frame[sent:]
                started = True
        finally:
            self.send_lock.release()
        if started and self.on_tail is not None:
            self.on_tail()
        return True

    @property
    def shared(self) -> bool:
        """Whether a :class:`SharedReader` reads this connection (its handlers must never wait)."""
        return self._shared is not None

    @property
    def lean(self) -> bool:
        """Whether the lean reader loop reads this connection (False once it handed the
        stream to wsproto: a close, a fragment, bad input)."""
        return self._lean

    def hold(self, reason: str, on: bool) -> None:
        """Stop (``on``) or resume reading this connection for ``reason`` (shared reader only)."""
        if self._shared is not None:
            self._shared.hold(self, reason, on)

    def input_pending(self) -> bool:
        """Whether the client sent something the reader thread has not read yet (bytes, or
        the end of the stream, waiting in the socket): e.g. a ``release`` or its close, which
        a busy server's reader may not have got to. True makes the reader call
        :attr:`on_read` after it read and handled them, so that a delivery deferred until
        then happens (from then on, it knows what the client said). Only on the lean
        reader's path (False elsewhere: nothing is deferred).

        With the shared reader, once it found input it answers True without a look at the
        socket (a system call that also lets go of the GIL) until the reader has read it: the
        queue asks a worker's connection for each run it queues for it (counted with strace
        on the server, 3,000-run drains: 2.8 looks per run without this, 0.93-0.96 with it;
        waited runs 2.7 and 1.5). That answer holds because the flag is only set while the
        input is unread, under the lock the shared reader reads under (:meth:`_readable`):
        the read that takes the input comes later, and the reader looks at the flag after
        it. (Until stop 28 the flag was set between two looks without that lock; when the
        reader read the input in between, the flag stayed set with nothing left to read,
        and a run deferred on it waited for the worker's next frame: its keep-alive ping,
        15 s later. Seen as one waited trial in about 150 taking 16 s instead of 1.3.)
        A reader thread of its own reads without the lock (its ``recv`` blocks): there the
        socket is looked at every time, and True only when the input is still there after
        the flag was set."""
        if not self._lean:
            return False
        if self._shared is None:
            if not self.connected or not self._peek():
                return False
            self._wake_after_read = True
            # still there after the flag was set: the reader reads them later and sees the flag
            # (gone meanwhile: it has just read them, and may have looked at the flag before)
            return self._peek()
        with self._input_lock:
            if self._wake_after_read:
                return True
            if not self.connected or not self._peek():
                return False
            self._wake_after_read = True
            return True

    def unread_input(self) -> bool:
        """Whether bytes (or the end of the stream) wait in the socket unread, on any reader's
        path: the pinger's test for a busy reader, not a silent client."""
        return self.connected and self._peek()

    def _peek(self) -> bool:
        try:
            self.sock.recv(1, _PEEK_NOWAIT)  # b"": the end, unread
        except BlockingIOError:
            return False
        except OSError:  # failed: the reader finds out
            return True
        return True

    def flush_tail(self) -> None:
        """Send the rest of a frame :meth:`try_send` started, and the frames queued behind it
        (blocking; the owner's thread: the only one that waits for a slow client)."""
        if self._tail is not None or self._late:
            with self.send_lock:
                if self._tail is not None or self._late:
                    self._send_tail()
        if "backlog" in self.held and self._shared is not None:
            self._shared.hold(self, "backlog", False)

    def _send_tail(self) -> None:
        """Under ``send_lock``: the rest of the frame :meth:`try_send` started, then the
        frames queued behind it."""
        tail = self._take_backlog()
        if tail:
            self.sock.sendall(tail)

    def _take_backlog(self) -> bytes | None:
        """Under ``send_lock``: what must go out before anything else (and forget it)."""
        tail, self._tail = self._tail, None
        if self._late:
            with self._late_lock:
                late, self._late = self._late, []
            tail = b"".join([tail, *late]) if tail else b"".join(late)
        return tail

    def _send_nowait(self, frame: bytes) -> None:
        """Shared reader: every send on the connection, never blocking (a thread that waits
        for one client would stall the others: the reader, or one holding a lock the reader
        takes). What the socket does not take now is queued, in order, and sent by the
        owner's thread (:attr:`on_tail`, :meth:`flush_tail`); past :data:`MAX_BACKLOG`
        bytes queued, the reader stops reading this client until they went out (TCP pushes
        back on it, as a blocked reader thread did)."""
        if not self.send_lock.acquire(blocking=False):
            # another thread is sending (maybe blocked on this client): after it, in order
            if not self.connected:
                raise ConnectionClosed(self.close_reason, self.close_message)
            with self._late_lock:
                self._late.append(frame)
            self._backlogged()
            return
        try:
            if not self.connected:
                raise ConnectionClosed(self.close_reason, self.close_message)
            tail = self._take_backlog() if self._tail is not None or self._late else None
            out = tail + frame if tail else frame
            try:
                sent = self.sock.send(out, _NOWAIT)
            except BlockingIOError:
                sent = 0
            if sent == len(out):
                return
            self._tail = out[sent:]
        finally:
            self.send_lock.release()
        self._backlogged()

    def _backlogged(self) -> None:
        """Frames wait to go out: wake the owner's thread to send them; hold the reading of
        a client that has too many waiting."""
        tail = self._tail
        waiting = (len(tail) if tail else 0) + sum(len(frame) for frame in self._late)
        if waiting > MAX_BACKLOG and self._shared is not None:
            self._shared.hold(self, "backlog", True)
        if self.on_tail is not None:
            self.on_tail()
        else:  # before the owner has a sender thread (the handshake): one for this
            threading.Thread(target=self._flush_quietly, name="sync-worker-ws-flush", daemon=True).start()

    def _flush_quietly(self) -> None:
        try:
            self.flush_tail()
        except (ConnectionClosed, OSError):
            self.shutdown()

    def _plain(self) -> bool:
        """Whether a frame built by :func:`text_frame` is what wsproto would send now: the
        connection is open and no extension (permessage-deflate) was negotiated. Anything
        else, or a wsproto whose internals look different, goes through wsproto."""
        connection = self.ws.connection
        if connection is None or connection.state is not ConnectionState.OPEN:
            return False
        plain = self._no_extensions
        if plain is None:  # negotiated in the handshake, fixed from then on: looked up once
            extensions = getattr(getattr(connection, "_proto", None), "extensions", None)
            plain = self._no_extensions = extensions is not None and not extensions
        return plain

    def _thread(self) -> None:
        """simple-websocket's reader loop, with the lean parser of :mod:`.frames` in front of
        wsproto while the connection is OPEN and plain (see :meth:`_plain`): the frames it
        parses become messages here, and when it meets anything else the rest of the stream
        goes to wsproto as before (close codes, close handshake, linger)."""
        if self.ping_interval or not self._plain():
            super()._thread()
            return
        reader = FrameReader(self.max_message_size)
        self._lean = True
        rest = b""
        try:
            while self.connected:
                data = self.sock.recv(self.receive_bytes)
                if not data:
                    raise OSError()
                lean_end = self._lean_read(reader, data)
                if lean_end is not None:  # wsproto parses from here on
                    rest = lean_end
                    break
        except (OSError, LocalProtocolError):
            self.connected = False
            self._lean = False
            self.event.set()
            self.sock.close()
            return
        self._finish(rest)

    # -- the shared reader's side (see SharedReader) -----------------------------------------
    def _lean_read(self, reader: FrameReader, data: bytes) -> bytes | None:
        """What one read brought, through the lean parser: messages handed over; the bytes
        for wsproto (the lean path ended) or None."""
        messages = reader.feed(data)
        if messages:
            self._deliver(messages)
        if self._wake_after_read:  # see input_pending
            self._wake_after_read = False
            if self.on_read is not None:
                self.on_read()
        rest = reader.rest
        if rest is None:
            return None
        self._lean = False
        if self.on_read is not None:
            self.on_read()  # nothing is deferred from now on: a deferred delivery goes now
        return rest

    def _readable(self, reader: FrameReader) -> bytes | None:
        """Shared reader thread: the socket is readable. None: keep it in the loop; bytes: the
        lean path ended (a close, a fragment, bad input, the connection gone): a thread of its
        own continues with wsproto from these bytes (possibly empty)."""
        if not self.connected:
            return b""
        try:
            with self._input_lock:  # see input_pending
                data = self.sock.recv(self.receive_bytes, _NOWAIT)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            self.connected = False
            self._lean = False
            self.event.set()
            return b""
        return self._lean_read(reader, data)

    def _finish(self, data: bytes) -> None:
        """A thread of its own, once the lean path ended: wsproto parses ``data`` and what
        follows (close codes, the close handshake, linger); the per-connection reader ends
        the same way (:meth:`_thread`)."""
        try:
            while self.connected:
                if data:
                    self.ws.receive_data(data)
                    self.connected = self._handle_events()
                    if not self.connected:
                        break
                data = self.sock.recv(self.receive_bytes)
                if not data:
                    raise OSError()
        except (OSError, LocalProtocolError):
            self.connected = False
            self._lean = False
            self.event.set()
        else:
            connection = self.ws.connection
            if connection is not None and connection.state is ConnectionState.LOCAL_CLOSING:
                self._linger()
        self.sock.close()

    def _deliver(self, messages: list[Any]) -> None:
        """Hand the messages of one read over (one wake-up for all of them: those handled
        together are committed together); answer a ping, note a pong."""
        buffer = self.input_buffer
        queued = False
        for message in messages:
            kind = type(message)
            if kind is str or kind is bytes:
                buffer.append(message)
                queued = True
            elif kind is Pong:
                self.pong_received = True
            else:
                if queued:
                    self.event.set()
                    queued = False
                self._answer_ping(message)
        if queued:
            self.event.set()

    def _answer_ping(self, ping: Ping) -> None:
        """The pong, under the send lock (simple-websocket sends it from the reader thread
        without one, which could split another thread's frame); none once our close frame
        went out (wsproto refuses to send then)."""
        if self._shared is not None:  # the shared reader never blocks: queued behind other frames
            connection = self.ws.connection
            if not self.connected or connection is None or connection.state is not ConnectionState.OPEN:
                return
            try:
                frame = self.ws.send(ping.response())
            except LocalProtocolError:
                return
            try:
                self._send_nowait(frame)
            except (ConnectionClosed, OSError):  # the peer went away (a broken pipe): the next read
                pass  # finds the connection ended and closes it, quietly (it is no server bug)
            return
        with self.send_lock:
            connection = self.ws.connection
            if not self.connected or connection is None or connection.state is not ConnectionState.OPEN:
                return
            if self._tail is not None or self._late:
                self._send_tail()
            self.sock.sendall(self.ws.send(ping.response()))

    def close(self, reason: int | None = None, message: str | None = None) -> None:
        # A send blocked on a client that does not read holds the lock: give up on the close
        # frame then (the caller drops the connection anyway).
        if not self.send_lock.acquire(timeout=0.5):
            raise ConnectionClosed(reason, message)
        try:
            if self._tail is not None or self._late:  # never a close frame inside another frame
                tail = self._take_backlog() or b""
                try:
                    sent = self.sock.send(tail, _NOWAIT)
                except OSError:
                    sent = 0
                if sent < len(tail):  # the client does not read: no close frame
                    raise ConnectionClosed(reason, message)
            super().close(reason, message)
        except LocalProtocolError:  # the close handshake already happened (e.g. after a protocol error)
            self.connected = False
            raise ConnectionClosed(reason, message) from None
        finally:
            self.send_lock.release()

    def _handle_events(self) -> bool:
        if self._tail is not None or self._late:  # wsproto's answers (pong, close) go out without the lock
            self.flush_tail()
        connection = self.ws.connection
        answering = connection is not None and connection.state is ConnectionState.LOCAL_CLOSING
        keep_going = super()._handle_events()
        if not keep_going:
            if self.close_reason == CloseReason.NO_STATUS_RCVD and self.max_message_size \
                    and self.incoming_message_len > self.max_message_size:
                # simple-websocket sends 1009 for a message over the limit without noting it
                self.close_reason, self.close_message = CloseReason.MESSAGE_TOO_BIG, "Message is too big"
            if self.close_reason not in _ENDED and not answering:  # (a close we sent is logged where sent)
                # a frame error (1002 malformed, 1007 bad UTF-8, 1009 too big): said by wsproto's
                # close frame only, so a client sending one just vanished from the log
                logger.info("websocket %s from %s closed: %s (%s)", self.environ.get("PATH_INFO", "?"),
                            self.environ.get("REMOTE_ADDR", "?"), self.close_message or "no reason given",
                            int(self.close_reason))
            self._linger()
        return keep_going

    def _linger(self, seconds: float = 1.0) -> None:
        """After the close frame went out (a protocol error such as bad UTF-8 included), read and
        drop what the client still sends until it closes, for up to ``seconds``: a socket closed
        with unread data is reset, and the client would never see the close code."""
        deadline = time.monotonic() + seconds
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.sock.settimeout(left)
                if not self.sock.recv(65536):
                    return
        except OSError:
            return

    def ping(self) -> bool:
        """Send a ping without ever blocking (the pinger serves every connection); False if
        it could not be sent now."""
        if not self.send_lock.acquire(blocking=False):
            return False  # a send is in progress: the connection is busy, not dead
        try:
            if not self.connected or self._tail is not None or self._late:  # a frame half out: busy too
                return False
            try:
                frame = self.ws.send(Ping())
            except LocalProtocolError:  # our close frame is out (e.g. message too big): no ping
                return False
            try:
                sent = self.sock.send(frame, _NOWAIT)
            except BlockingIOError:
                return False  # the client does not read: its pong will be missing
            if sent < len(frame):  # half a frame on the wire: this stream is unusable
                self.shutdown()
                return False
            return True
        finally:
            self.send_lock.release()

    def shutdown(self) -> None:
        """Unblock the reader thread and drop the TCP connection."""
        self.connected = False
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self.held and self._shared is not None:  # the shared reader must see the end
            self._shared.hold(self, None, False)


class _Pending(threading.local):
    #: inside :func:`coalescing`: per socket, the messages :func:`send_soon` holds back
    sockets: dict[WebSocket, list[tuple[str, Callable[[str], Any], Callable[[int], None] | None]]] | None = None
    #: the :func:`coalescing` blocks nested in the outer one
    depth = 0


_pending = _Pending()


def send_soon(ws: WebSocket, message: str, fallback: Callable[[str], Any],
              sent: Callable[[int], None] | None = None) -> None:
    """Send ``message`` from a thread that must never block on this client (one that committed
    for another connection: an answer, a run claimed at its create, an rpc wait's reply):
    :meth:`WebSocket.try_send`, or ``fallback(message)`` (the connection's outbox) when the
    socket does not take it at once; ``sent(1)`` once it went. Inside :func:`coalescing` (the
    after-commit work of one group commit) it is held back until the block ends, and what the
    block sent to one socket goes out in one write: the final states of several runs committed
    together answer several waits of one rpc connection with one system call and one wake-up
    of its reader, instead of one each."""
    held = _pending.sockets
    if held is not None:
        held.setdefault(ws, []).append((message, fallback, sent))
        return
    if ws.try_send(message):
        if sent is not None:
            sent(1)
    else:
        fallback(message)


class _Coalescing:
    """:func:`coalescing`'s block: one object, the state is the thread's (:class:`_Pending`).
    A plain context manager, not a generator's: every group commit enters one, and
    contextlib's machinery cost more than the block's own work."""

    __slots__ = ()

    def __enter__(self) -> None:
        if _pending.sockets is not None:  # nested: the outer block sends
            _pending.depth += 1
            return
        _pending.sockets = {}
        _pending.depth = 0

    def __exit__(self, *exc_info: Any) -> None:
        if _pending.depth:
            _pending.depth -= 1
            return
        held, _pending.sockets = _pending.sockets, None
        if not held:
            return
        for ws, items in held.items():
            if ws.try_send_many([message for message, _fallback, _sent in items]):
                for _message, _fallback, sent in items:
                    if sent is not None:
                        sent(1)
            else:
                for message, fallback, _sent in items:
                    fallback(message)


_COALESCING = _Coalescing()


def coalescing() -> _Coalescing:
    """What this thread passes to :func:`send_soon` inside the block is sent when it ends, one
    write per socket (never blocking: what a socket does not take goes to its fallback)."""
    return _COALESCING


class Close(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def decode(message: Any) -> dict[str, Any]:
    """One message as a JSON object; a :class:`Close` with the documented code otherwise."""
    value = parse(message)
    if not isinstance(value, dict):
        raise Close(PREFECT_VIOLATION, "Protocol violation: expected a JSON object") from None
    return value


def parse(message: Any) -> Any:
    """One message as JSON (any value), with the server's input limits (:mod:`.validation`)."""
    if message is None:  # receive() timed out just as the connection ended
        raise ConnectionClosed()
    if isinstance(message, bytes):
        try:
            message = message.decode("utf-8")
        except UnicodeDecodeError:
            raise Close(UNSUPPORTED_DATA, "Protocol violation: messages must be UTF-8 JSON text") from None
    try:
        value = validation.loads(message, "message")
    except validation.JSONRejected as exc:  # README "Websocket close codes"
        code = UNSUPPORTED_DATA if exc.kind in ("json", "utf8") else POLICY_VIOLATION
        raise Close(code, validation.close_reason(f"Protocol violation: {exc.detail}")) from None
    return value


#: bytes queued for one client (it reads slower than the server sends) past which the shared
#: reader stops reading that client until they went out
MAX_BACKLOG = 1 << 20

#: read the lean connections of a server in one thread (``SYNC_WORKER_SHARED_READER=0``: one
#: reader thread per connection, as before)
SHARED_READER = os.environ.get("SYNC_WORKER_SHARED_READER", "1") != "0"


class _SharedHandle:
    """What simple-websocket keeps as ``ws.thread`` for a connection read by a
    :class:`SharedReader`: alive until its reading ended, including the thread of its own that
    finishes it with wsproto once the lean path ended."""

    def __init__(self, ws: WebSocket, target: Callable[[], None]) -> None:
        self.ws = ws
        self._target = target
        self.name = "sync-worker-ws-reader"
        self._done = threading.Event()

    def start(self) -> None:
        ws = self.ws
        reader = ws._shared
        if reader is None or not ws._plain():  # not lean from the start: a thread of its own
            ws._shared = None  # (and its sends may block, as before)
            self._spawn(self._target)
            return
        reader.add(ws, self)

    def hand_over(self, data: bytes) -> None:
        self._spawn(self.ws._finish, data)

    def _spawn(self, fn: Callable[..., None], *args: Any) -> None:
        def run() -> None:
            try:
                fn(*args)
            finally:
                self._done.set()

        threading.Thread(target=run, name="sync-worker-ws-finish", daemon=True).start()

    def is_alive(self) -> bool:
        return not self._done.is_set()

    def join(self, timeout: float | None = None) -> None:
        if threading.current_thread().name != SharedReader.NAME:
            self._done.wait(timeout)


def _subscriptions_first(item: Any) -> int:
    """Sort key of a ready (key, events) pair: claim-at-delivery subscriptions (they set
    ``on_read``) before the other connections."""
    return 0 if item[0].data[0].on_read is not None else 1


class SharedReader:
    """One thread that reads every lean connection of a server (a selector over their sockets)
    and runs their message handlers (:class:`Signal`), instead of one reader thread per
    connection: the rpc socket's creates and the subscription's final states are read and
    committed by the same thread, one after the other, instead of two threads taking turns
    at the GIL and waiting for each other's commits."""

    NAME = "sync-worker-ws-reader"

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._data: dict[WebSocket, tuple[WebSocket, _SharedHandle, FrameReader]] = {}  # read, held or not

    def add(self, ws: WebSocket, handle: _SharedHandle) -> None:
        ws._lean = True
        data = (ws, handle, FrameReader(ws.max_message_size))
        with self._lock:
            self._data[ws] = data
            self._selector.register(ws.sock, selectors.EVENT_READ, data)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self.NAME, daemon=True)
                self._thread.start()

    def hold(self, ws: WebSocket, reason: str | None, on: bool) -> None:
        """Stop (``on``) or resume reading ``ws`` for ``reason`` (None, off: every reason);
        it is read while no reason holds it. Any thread; never blocks on I/O."""
        with self._lock:
            held = ws.held
            before = bool(held)
            if reason is None:
                held.clear()
            elif on:
                held.add(reason)
            else:
                held.discard(reason)
            data = self._data.get(ws)
            if data is None or before == bool(held):
                return
            if held:
                self._selector.unregister(ws.sock)
            else:
                self._selector.register(ws.sock, selectors.EVENT_READ, data)

    def _loop(self) -> None:
        selector = self._selector
        while True:
            ready = selector.select(1.0)
            if len(ready) > 1:
                # the claim-at-delivery subscriptions first: their final states free credit and
                # take the worker's input off its socket, so that the creates read next can claim
                # their runs at create (Subscription.reserve refuses while a worker's input is
                # unread) instead of waking the subscription's sender thread for a claim of its
                # own: measured, a 5,000-run drain went from 0.85x to 1.12x of the base tree
                ready.sort(key=_subscriptions_first)
            for key, _events in ready:
                ws, handle, reader = key.data
                try:
                    rest = ws._readable(reader)
                except Exception:  # pragma: no cover - a bug: drop this connection, keep the others
                    logger.exception("error reading a websocket connection")
                    ws.shutdown()
                    ws.event.set()
                    rest = b""
                if rest is not None:
                    with self._lock:
                        self._data.pop(ws, None)
                        if not ws.held:
                            try:
                                selector.unregister(key.fileobj)
                            except (KeyError, ValueError):  # pragma: no cover - not registered
                                pass
                    handle.hand_over(rest)
            with self._lock:
                if not self._data:
                    self._thread = None
                    return


class SubscriptionRegistry:
    """Live connections, so that stopping the server can close them, and their keep-alive.

    One thread pings every connection each ``ping_interval`` seconds and drops the ones that
    did not answer the previous ping (a worker that vanished without closing its TCP
    connection must not keep its leases forever). simple-websocket can ping by itself, but
    then each of its reader threads polls the socket before every read: one more system
    call per message.
    """

    def __init__(self, ping_interval: float | None = None) -> None:
        self._lock = threading.Lock()
        self._sockets: set[WebSocket] = set()
        self.closing = False
        self.ping_interval = ping_interval
        self._stop = threading.Event()
        self._pinger: threading.Thread | None = None
        #: reads every lean connection of this server in one thread (None: one thread each)
        self.reader: SharedReader | None = SharedReader() if SHARED_READER else None

    def add(self, ws: WebSocket) -> bool:
        with self._lock:
            if self.closing:
                return False
            self._sockets.add(ws)
            if self.ping_interval and self._pinger is None:
                self._pinger = threading.Thread(target=self._ping_loop, name="sync-worker-ws-pinger", daemon=True)
                self._pinger.start()
            return True

    def _ping_loop(self) -> None:
        assert self.ping_interval
        while not self._stop.wait(self.ping_interval):
            with self._lock:
                sockets = list(self._sockets)
            for ws in sockets:
                if not ws.connected:
                    continue
                if not ws.pong_received and ws.unread_input():
                    # the client sent something our reader has not got to yet (its pong may
                    # be in it): the server is behind (its reader busy with a long commit on a
                    # loaded machine), the client is not dead. Judged again next round.
                    ws.pong_received = True
                    continue
                if not ws.pong_received or ws.ping_failures >= 3:
                    logger.info("closing a subscription connection that did not answer a ping within %g s",
                                self.ping_interval)
                    try:
                        ws.close(POLICY_VIOLATION, "Ping/Pong timeout")
                    except (ConnectionClosed, OSError):
                        pass
                    ws.shutdown()
                    ws.event.set()
                    continue
                ws.pong_received = False  # before sending: the pong may beat us back
                try:
                    sent = ws.ping()
                except OSError:
                    sent = False
                if sent:
                    ws.ping_failures = 0
                else:  # busy sending, or the client reads nothing: tolerated 3 times
                    ws.pong_received = True
                    ws.ping_failures += 1

    def remove(self, ws: WebSocket) -> None:
        with self._lock:
            self._sockets.discard(ws)

    def close_all(self) -> None:
        with self._lock:
            self.closing = True
            sockets = list(self._sockets)
        self._stop.set()
        for ws in sockets:
            try:
                ws.close(SERVICE_RESTART, "Server is shutting down")
            except (ConnectionClosed, OSError):
                pass
            ws.shutdown()
            ws.event.set()  # wake whoever waits on this connection

    def __len__(self) -> int:
        with self._lock:
            return len(self._sockets)


def serve_socket(environ: dict[str, Any], registry: SubscriptionRegistry, max_message_size: int | None,
                 what: str, serve: Callable[[WebSocket, str], None]) -> None:
    """Accept a websocket (subprotocol ``prefect``), run ``serve(ws, peer)`` in this HTTP
    handler thread until the connection ends, and close it with the code and reason of a
    protocol violation (:class:`Close`) raised by ``serve``."""
    ws = WebSocket(environ, reader=registry.reader, subprotocols=["prefect"], max_message_size=max_message_size)
    peer = environ.get("REMOTE_ADDR", "?")
    if not registry.add(ws):
        close_socket(ws, SERVICE_RESTART, "Server is shutting down")
        return
    try:
        try:
            serve(ws, peer)
        except Close as close:
            logger.info("closing %s connection from %s: %s (%d)", what, peer, close.reason, close.code)
            close_socket(ws, close.code, close.reason)
        except ConnectionClosed:
            pass
    finally:
        registry.remove(ws)
        if not ws.connected:  # the reader is ending: let it send its close frame (e.g. 1007) first
            ws.thread.join(timeout=1.0)
        ws.shutdown()
        ws.thread.join(timeout=1.0)


def close_socket(ws: WebSocket, code: int, reason: str) -> None:
    try:
        ws.close(code, reason)
    except (ConnectionClosed, OSError):
        return
    # Give the client a moment to answer the close frame before dropping the connection.
    ws.thread.join(timeout=1.0)


def authenticate(ws: WebSocket, core: Core, announce: dict[str, Any] | None = None) -> None:
    """Prefect's auth handshake: read ``{"type": "auth", "token": T}``, check the token, answer
    ``auth_success`` (plus what ``announce`` adds, e.g. extensions) or close 1008. Without the
    ``prefect`` subprotocol while the server has an auth string: close 1002 (README, "Websocket
    close codes", both sockets), before reading anything."""
    if ws.subprotocol != "prefect" and core.auth_string is not None:
        raise Close(PROTOCOL_ERROR, "'prefect' subprotocol required when auth is configured")
    message = ws.receive(timeout=HANDSHAKE_TIMEOUT)
    if message is None and ws.connected:
        raise Close(POLICY_VIOLATION, f"Expected 'auth' message within {HANDSHAKE_TIMEOUT:g} s")
    try:
        value = decode(message)
    except Close:
        value = {}
    if value.get("type") != "auth":
        raise Close(POLICY_VIOLATION, "Expected 'auth' message")
    if core.auth_string is not None:
        token = value.get("token")
        if not token:
            raise Close(POLICY_VIOLATION, "Auth required but no token provided")
        if not core.check_token(token):
            raise Close(POLICY_VIOLATION, "Invalid token")
    ws.send(json.dumps({"type": "auth_success", **(announce or {})}))




class _Direct:
    """:meth:`Outbox.direct`'s block."""

    __slots__ = ("_outbox",)

    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox

    def __enter__(self) -> None:
        self._outbox._direct_thread = threading.get_ident()

    def __exit__(self, *exc_info: Any) -> None:
        outbox = self._outbox
        outbox._direct_thread = None
        outbox.flush_direct()


class Outbox:
    """The messages of one connection that other threads produce (answers committed by the
    database writer, runs that arrived for an idle subscriber, replies to waits), sent in
    order by one sender thread, so that no committing thread ever blocks on a slow client.

    Both sockets use it: the subscription (``set_state`` answers; ``tick`` delivers runs when
    the queue woke the connection) and the rpc socket (create/wait replies; ``tick`` expires
    waits, ``due`` says when the next one is due).

    Fewer hand-offs: inside :meth:`direct`, what the calling thread posts (an answer to the
    request it just committed itself) is sent by that thread when the block ends, instead of
    waking the sender thread (a thread switch costs latency under the GIL). It is sent after
    the block, never inside the commit: a send that blocks on a client that does not read
    must not hold up the other writers.
    """

    def __init__(self, ws: WebSocket, name: str, *,
                 tick: Callable[[bool], None] | None = None,
                 due: Callable[[], float | None] | None = None,
                 sent: Callable[[int], None] | None = None,
                 lost: Callable[[], None] | None = None,
                 flush_on_close: bool = False) -> None:
        self.ws = ws
        self.name = name
        self._tick = tick  # tick(poked): after each round of sends, in the sender thread
        self._due = due  # seconds until tick must run again (None: when poked)
        self._sent = sent  # sent(count): after messages were sent (any thread)
        self._lost = lost  # the connection failed while sending
        self._flush_on_close = flush_on_close  # send what is queued before the sender ends
        self._cond = threading.Condition()
        self._queue: deque[str] = deque()
        self._poked = False
        self._closed = False
        self._direct_thread: int | None = None
        self._direct: list[str] = []
        self._direct_block = _Direct(self)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        ws.on_tail = self.poke  # the rest of a frame another thread started goes out from here

    def start(self, poked: bool = False) -> None:
        self._poked = poked
        self._thread.start()

    def post(self, message: str) -> bool:
        """Queue ``message`` (False, dropped, once closed)."""
        if self._direct_thread == threading.get_ident():
            self._direct.append(message)
            return True
        with self._cond:
            if self._closed:
                return False
            self._queue.append(message)
            self._cond.notify()
        return True

    def poke(self) -> None:
        """Make the sender thread run ``tick(True)`` (e.g. a run is due for this connection)."""
        if self._poked:
            # not run yet: it clears the flag under the lock and only then ticks, so that tick
            # comes after what the caller did before poking (no lock or wake-up needed)
            return
        with self._cond:
            self._poked = True
            self._cond.notify()

    def direct(self) -> _Direct:
        """Messages this thread posts inside the block are sent by it right after. (A plain
        context manager object, not a generator's: entered for every read and commit.)"""
        return self._direct_block

    def direct_here(self) -> bool:
        """Whether the calling thread is inside :meth:`direct` (its posts are sent by it)."""
        return self._direct_thread == threading.get_ident()

    def flush_mine(self, then: list[str] | None = None) -> None:
        """Inside :meth:`direct`, in its thread: send what this thread posted so far, now, and
        ``then`` after it in the same write (runs sent right after the answers of the commit
        that claimed them). Elsewhere: just ``then``."""
        if self._direct_thread == threading.get_ident():
            self.flush_direct(then)
        elif then:
            self.ws.send_many(then)

    def flush_direct(self, then: list[str] | None = None) -> None:
        messages, self._direct = self._direct, []
        if messages:
            with self._cond:
                if self._closed:
                    messages = []  # the connection is ending: answers are not sent any more
        out = messages + then if then else messages
        if not out:
            return
        self.ws.send_many(out)  # one write for all of them
        if messages and self._sent is not None:
            self._sent(len(messages))

    def close(self, join: float | None = 2.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if join is not None and self._thread.ident is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=join)

    @property
    def closed(self) -> bool:
        return self._closed

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._closed and not self._queue and not self._poked:
                        wait = self._due() if self._due is not None else None
                        if wait is not None and wait <= 0:
                            break
                        self._cond.wait(wait)
                    if self._closed and (not self._flush_on_close or not self._queue):
                        return
                    messages = list(self._queue)
                    self._queue.clear()
                    poked, self._poked = self._poked, False
                self.ws.flush_tail()
                if messages:  # (a poke or a due timer may wake it with nothing to send)
                    self.ws.send_many(messages)  # one write
                    if self._sent is not None:
                        self._sent(len(messages))
                if self._tick is not None:
                    self._tick(poked)
        except (ConnectionClosed, OSError):
            if self._lost is not None:
                self._lost()
        except DatabaseClosed:
            return
        except Exception:  # pragma: no cover - a bug: drop the connection, the client reconnects
            logger.exception("%s failed", self.name)
            if self._lost is not None:
                self._lost()
