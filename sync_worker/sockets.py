"""Websocket plumbing shared by the client's two sockets (subscription and rpc).

One place for what both need: opening a socket with the same options, Prefect's auth
handshake, the reader thread that demultiplexes answers (matched by ``request_id``) from
task runs, keep-alive pings, and the mapping of close frames to errors. What each socket
means (subscribe and ack; create and wait) lives in :mod:`sync_worker.subscription` and
:mod:`sync_worker.rpc`.
"""
from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import queue
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import websocket

from sync_worker.exceptions import CredentialsError, SyncWorkerError
from sync_worker import jsoncodec
from sync_worker.framing import mask, text_frame
from sync_worker.schemas import TaskRun
from sync_worker.transport import LazyTaskRun

logger = logging.getLogger("sync_worker.sockets")

CLOSE_POLICY_VIOLATION = 1008
CLOSE_PROTOCOL_VIOLATION = 4001

AUTH_HINT = (
    "check SYNC_WORKER_API_AUTH_STRING / PREFECT_API_AUTH_STRING (or SYNC_WORKER_API_KEY / "
    "PREFECT_API_KEY) against the server's auth string, and SYNC_WORKER_API_URL / PREFECT_API_URL"
)

class SubscriptionError(SyncWorkerError):
    """The subscription cannot continue and retrying will not help."""


class SubscriptionAuthError(SubscriptionError, CredentialsError):
    """The server refused our credentials (handshake 401/403 or close 1008)."""


class ConnectionLost(ConnectionError):
    """The socket went away (or never came up). Intermittent: the subscription reconnects.

    A ``ConnectionError`` so that ``services.is_intermittent`` and callers that already
    forgive network errors treat it as such.
    """


class Pending:
    """One ``set_state`` request awaiting its answer from the reader thread.

    A bare lock, taken at creation and released by the reader with the answer: the cheapest
    one-shot hand-off between two threads (an ``Event`` builds a ``Condition`` and a second
    lock per request, which showed in the worker's profile)."""

    __slots__ = ("_lock", "error", "reply")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self.reply: dict[str, Any] | None = None
        self.error: BaseException | None = None

    def set(self) -> None:
        try:
            self._lock.release()
        except RuntimeError:  # answered and aborted at once: the first one counts
            pass

    def wait(self, timeout: float) -> bool:
        return self._lock.acquire(timeout=timeout)


class Answered:
    """One request answered by a call instead of a wake-up (:meth:`Connection.request_async`).

    ``fn(reply, error)`` is called once, in the thread that ends the request: the reader
    thread with the answer, or whichever thread ends the connection with the error (whoever
    takes the request out of the connection's table calls it, so only one does)."""

    __slots__ = ("error", "fn", "reply")

    def __init__(self, fn: Callable[[dict[str, Any] | None, BaseException | None], None]) -> None:
        self.fn = fn
        self.reply: dict[str, Any] | None = None
        self.error: BaseException | None = None

    def set(self) -> None:
        self.fn(self.reply, self.error)


class MaskKeys:
    """RFC 6455 mask keys for a client's frames without an ``os.urandom`` call per frame:
    4 bytes at a time from a block of 4 KiB read from ``os.urandom`` (the same strong
    source of entropy, one system call per 1,024 frames). Shared by one connection's
    sending threads (websocket-client sends under its lock)."""

    BLOCK = 4096

    def __init__(self) -> None:
        self._block = b""
        self._offset = 0
        self._lock = threading.Lock()

    def __call__(self, length: int) -> bytes:
        with self._lock:
            if self._offset + length > len(self._block):
                self._block = os.urandom(max(self.BLOCK, length))
                self._offset = 0
            key = self._block[self._offset:self._offset + length]
            self._offset += length
        return key


_OP_CONT, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class FrameReader:
    """Reads a server's frames off a socket made by :func:`open_socket`: what
    ``WebSocket.recv_data(control_frame=True)`` returns, ``(opcode, payload bytes)``, at a
    fraction of its cost (websocket-client builds and validates an ``ABNF`` object and
    joins buffers in several calls per frame; its frame reading was about a sixth of the
    worker's Python time, py-spy). The same rules: a ping is answered with a pong and
    returned, a close frame returned (the caller says what it means and answers it: the
    connection's ``abort`` sends the close), fragments joined,
    reserved bits, unknown opcodes and oversized or fragmented control frames refused
    (``WebSocketProtocolException``); a masked frame is unmasked. Reads go through
    websocket-client's ``_recv`` (:data:`READ_SIZE` bytes at a time), so a timeout raises
    ``WebSocketTimeoutException`` and a closed socket ``WebSocketConnectionClosedException``
    as before; the bytes websocket-client had read beyond the handshake are taken over.
    One reader thread per socket."""

    def __init__(self, ws: websocket.WebSocket) -> None:
        self.ws = ws
        frames = ws.frame_buffer
        self._buf = bytearray(b"".join(frames.recv_buffer))
        frames.recv_buffer = []
        self._recv = ws._recv
        self._fragments: list[bytes] | None = None
        self._fragments_opcode = _OP_TEXT
        #: bytes at the start of the buffer that :meth:`dropped_next` scanned (whole frames,
        #: none a close), so that each frame is looked at once however often it is called
        self._scanned = 0
        #: whether bytes (or the stream's end) wait on the socket, without reading: for dropped_next
        self._poll: Any = None
        if ws.sock is not None:
            self._poll = select.poll()
            self._poll.register(ws.sock, select.POLLIN)

    @staticmethod
    def usable(ws: Any) -> bool:
        """Whether ``ws`` is websocket-client's socket from :func:`open_socket`, with no frame
        half-read by websocket-client (only then can reading be taken over)."""
        frames = getattr(ws, "frame_buffer", None)
        return (isinstance(getattr(ws, "get_mask_key", None), MaskKeys) and callable(getattr(ws, "_recv", None))
                and isinstance(getattr(frames, "recv_buffer", None), list) and getattr(frames, "header", 0) is None)

    def recv_data(self) -> tuple[int, bytes]:
        while True:
            first, payload = self._frame()
            opcode = first & 0x0F
            final = first & 0x80
            if first & 0x70:
                raise websocket.WebSocketProtocolException("rsv is not implemented, yet")
            if opcode >= _OP_CLOSE:
                if opcode not in (_OP_CLOSE, _OP_PING, _OP_PONG):
                    raise websocket.WebSocketProtocolException(f"Invalid opcode {opcode!r}")
                if not final or len(payload) > 125:
                    raise websocket.WebSocketProtocolException("Invalid control frame")
                if opcode == _OP_PING:
                    self.ws.pong(payload)
                return opcode, payload
            if opcode == _OP_CONT:
                if self._fragments is None:
                    raise websocket.WebSocketProtocolException("Illegal frame: a continuation with nothing to continue")
                self._fragments.append(payload)
                if final:
                    data, self._fragments = b"".join(self._fragments), None
                    return self._fragments_opcode, data
                continue
            if opcode not in (_OP_TEXT, _OP_BINARY):
                raise websocket.WebSocketProtocolException(f"Invalid opcode {opcode!r}")
            if self._fragments is not None:
                raise websocket.WebSocketProtocolException("Illegal frame: a new message inside a fragmented one")
            if final:
                return opcode, payload
            self._fragments, self._fragments_opcode = [payload], opcode

    def _frame(self) -> tuple[int, bytes]:
        """The next frame's first byte and its (unmasked) payload."""
        buf = self._buf
        while True:
            have = len(buf)
            if have >= 2:
                second = buf[1]
                length = second & 0x7F
                start = 2
                if length == 126:
                    start = 4 if have >= 4 else 0
                    length = int.from_bytes(buf[2:4], "big")
                elif length == 127:
                    start = 10 if have >= 10 else 0
                    length = int.from_bytes(buf[2:10], "big")
                if start:
                    masked = second & 0x80
                    end = start + (4 if masked else 0) + length
                    if have >= end:
                        first = buf[0]
                        if masked:
                            payload = mask(bytes(buf[start + 4:end]), bytes(buf[start:start + 4]))
                        else:
                            payload = bytes(buf[start:end])
                        del buf[:end]
                        self._scanned = self._scanned - end if self._scanned > end else 0
                        return first, payload
            buf += self._read()

    def dropped_next(self) -> bool:
        """Whether the server dropped this connection as dead right after the frame just
        read: a close frame with code 1008 (the embedded server's "Ping/Pong timeout")
        among the bytes that arrived behind it. Never blocks.

        Why: a run delivered (claimed) on a connection the server gave up on is no longer
        this worker's: the server re-queues it when its lease runs out, and may have
        finished it elsewhere. A worker paused past its lease (SIGSTOP, a debugger, a
        swapped-out machine) finds the delivery and that close together in its socket when
        it resumes; started, the run would execute a second time. Any other end (a server
        stopping or killed, 1012 or a bare end of stream) keeps the run: started, it is
        named when the worker subscribes again and the server (restarted) leaves it the
        lease; refused, it would wait for its lease to run out and lose an attempt."""
        sock = self.ws.sock
        if sock is not None and self._poll is not None:
            # poll, not MSG_DONTWAIT: Python waits for a socket with a timeout to be readable
            # before its recv, whatever the flags
            try:
                if self._poll.poll(0):  # bytes, the end of the stream or an error wait
                    data = sock.recv(READ_SIZE) if sock.__class__ is socket.socket else self._recv(READ_SIZE)
                    if data:
                        self._buf += data
            except (OSError, websocket.WebSocketException):
                pass  # reset or ended: the next read says so
        return self._close_buffered() == CLOSE_POLICY_VIOLATION

    def _close_buffered(self) -> int | None:
        """The code of a (whole) close frame among the frames in the buffer, if any."""
        buf = self._buf
        have = len(buf)
        pos = self._scanned
        while pos + 2 <= have:
            length = buf[pos + 1] & 0x7F
            start = pos + 2
            if length == 126:
                if have < pos + 4:
                    break
                length, start = int.from_bytes(buf[pos + 2:pos + 4], "big"), pos + 4
            elif length == 127:
                if have < pos + 10:
                    break
                length, start = int.from_bytes(buf[pos + 2:pos + 10], "big"), pos + 10
            masked = buf[pos + 1] & 0x80
            end = start + (4 if masked else 0) + length
            if end > have:
                break
            if buf[pos] & 0x0F == _OP_CLOSE:
                if length < 2:
                    return 1005  # no status code
                body = bytes(buf[start + 4:end]) if masked else bytes(buf[start:end])
                if masked:
                    body = mask(body, bytes(buf[start:start + 4]))
                return int.from_bytes(body[:2], "big")
            pos = end
        self._scanned = pos
        return None

    def _read(self) -> bytes:
        """The socket's next bytes (at most :data:`READ_SIZE`): ``recv`` on a plain TCP socket
        directly, waiting as long as its timeout; websocket-client's reader otherwise (TLS)
        and for what only it should say: a timeout is its ``WebSocketTimeoutException``, the
        end of the stream is read again by it (it marks the socket closed and raises
        ``WebSocketConnectionClosedException``). Saves its four Python calls per read."""
        sock = self.ws.sock
        if sock is None or sock.__class__ is not socket.socket:
            return self._recv(READ_SIZE)
        try:
            data = sock.recv(READ_SIZE)
        except TimeoutError as exc:  # socket.timeout
            raise websocket.WebSocketTimeoutException(str(exc) or "timed out") from exc
        return data if data else self._recv(READ_SIZE)


class Connection:
    """One authenticated, subscribed socket and the thread that reads it."""

    def __init__(self, ws: websocket.WebSocket, extensions: list[str], ping_interval: float):
        self.ws = ws
        self.extensions = extensions
        self.ping_interval = ping_interval
        self.runs: queue.Queue[Any] = queue.Queue()
        self.closed = threading.Event()
        self.error: BaseException | None = None
        self.uses_credit = False  # subscribed with the credit extension (see Subscription.grant)
        #: Subscribed with ``claim_at_delivery``: runs arrive RUNNING, leased, never acked.
        self.claims = False
        #: claim_at_delivery: called by the reader thread with each run (True: started here,
        #: straight to the executor; False: queued for the consumer, who waits for a slot).
        self.on_run: Callable[[TaskRun], bool] | None = None
        #: Whether the reader yields the GIL after starting ``run`` when more runs of the same
        #: message follow (see :meth:`_started`); None: never.
        self.yields_after: Callable[[TaskRun], bool] | None = None
        #: The dialect chosen for this connection (set by the subscription).
        self.dialect: Any = None
        #: claim_at_delivery: credit for freed slots not yet sent; the next ``set_state``
        #: frame carries it (``take_owed``), else a ``credit`` frame.
        self.owed = 0
        self._owed_lock = threading.Lock()
        #: claim_at_delivery: the worker stopped receiving; runs that still arrive are handed back.
        self.releasing = False
        self._runs_lock = threading.Lock()
        self._request_ids = itertools.count(1)
        self._pending: dict[str, Pending | Answered] = {}
        self._pending_lock = threading.Lock()
        self._pong_due: float | None = None
        #: the reader's look-ahead (FrameReader.dropped_next); None for a socket it cannot read
        self._dropped_next: Callable[[], bool] | None = None
        #: frames queued by senders while another thread writes (see _send_frame)
        self._out: list[bytes] = []
        self._out_lock = threading.Lock()
        self._writing = False
        self._thread = threading.Thread(target=self._read_loop, name="sync-worker-subscription-reader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def supports_set_state(self) -> bool:
        return "set_state" in self.extensions and not self.closed.is_set()

    def send_json(self, message: dict[str, Any]) -> None:
        """Send one message as one text frame: built by :func:`text_frame` (the bytes
        websocket-client would send, at less than half its cost) and sent by
        :meth:`_send_frame` when the socket came from :func:`open_socket`, else by
        websocket-client under its send lock."""
        if self.closed.is_set():
            raise ConnectionLost("subscription socket is closed")
        try:
            ws = self.ws
            keys = getattr(ws, "get_mask_key", None)
            if isinstance(keys, MaskKeys):
                frame = text_frame(jsoncodec.dumps(message).encode("utf-8"), keys(4))
                self._send_frame(frame)
            else:
                ws.send(jsoncodec.dumps(message))
        except (websocket.WebSocketException, OSError) as exc:
            self.abort(ConnectionLost(f"sending on the subscription socket failed: {exc}"))
            raise ConnectionLost(str(exc)) from exc

    def _send_frame(self, frame: bytes) -> None:
        """Send ``frame``, together with the frames other threads send meanwhile.

        One thread at a time writes to the socket; a thread that has a frame to send while
        another is writing queues it and returns, and the writing thread sends everything
        queued, in order, in one ``sendall`` (under websocket-client's send lock, as pings
        and close frames are). Several final states ready together thus share one system
        call and reach the server in one read, which commits them together; and no sender
        waits for the socket lock behind another (a thread hand-off each). A frame queued
        behind a write that fails is not sent: the failure ends the connection (the writer's
        ``send_json`` aborts it), which fails every request still waiting for an answer, as
        a connection lost just after sending would."""
        out = self._out
        out_lock = self._out_lock
        with out_lock:
            if self._writing:
                out.append(frame)
                return  # the writing thread sends it next
            self._writing = True  # nothing is queued when nobody writes: this frame goes first
        ws = self.ws
        data = frame
        try:
            while True:
                with ws.lock:
                    sock = ws.sock
                    if sock is None:
                        raise websocket.WebSocketConnectionClosedException("socket is already closed.")
                    send_all(sock, data)
                with out_lock:
                    if not out:
                        self._writing = False
                        return
                    data = out[0] if len(out) == 1 else b"".join(out)
                    out.clear()
        except BaseException:
            with self._out_lock:
                self._writing = False
                out.clear()
            raise

    def owe(self, n: int = 1) -> None:
        """claim_at_delivery: ``n`` slots freed; their credit goes with the next frame."""
        with self._owed_lock:
            self.owed += n

    def take_owed(self) -> int:
        with self._owed_lock:
            owed, self.owed = self.owed, 0
        return owed

    def request(self, message: dict[str, Any], timeout: float, with_owed_credit: bool = False) -> dict[str, Any]:
        """Send ``message`` with a fresh ``request_id`` (a per-connection counter: answers are
        matched per connection) and wait for its answer. ``with_owed_credit``: the credit
        owed (claim_at_delivery) rides along in the same frame."""
        request_id = str(next(self._request_ids))
        pending = Pending()
        with self._pending_lock:
            if self.closed.is_set():
                raise ConnectionLost("subscription socket is closed")
            self._pending[request_id] = pending
        try:
            message = {**message, "request_id": request_id}
            if with_owed_credit:
                owed = self.take_owed()
                if owed:
                    message["credit"] = owed
            self.send_json(message)
            if not pending.wait(timeout):
                raise ConnectionLost(f"no answer to {message.get('type')} within {timeout}s")
        finally:
            with self._pending_lock:
                self._pending.pop(request_id, None)
        if pending.error is not None:
            raise pending.error
        assert pending.reply is not None
        return pending.reply

    def request_async(self, message: dict[str, Any], on_answer: Callable[[dict[str, Any] | None, BaseException | None], None],
                      with_owed_credit: bool = False) -> None:
        """Send ``message`` as :meth:`request` does, without waiting: ``on_answer(reply,
        None)`` is called by the reader thread with the answer, or ``on_answer(None, error)``
        (a :class:`ConnectionLost`) by the thread that ends the connection first, once either
        way. It must be quick and never block: it runs in the thread that reads the socket.
        No time limit of its own: the answer comes, or the connection ends (pings find a
        dead link). Raises :class:`ConnectionLost` (``on_answer`` not called) when the
        connection is closed already, and what building the frame raises."""
        request_id = str(next(self._request_ids))
        answered = Answered(on_answer)
        with self._pending_lock:
            if self.closed.is_set():
                raise ConnectionLost("subscription socket is closed")
            self._pending[request_id] = answered
        message = {**message, "request_id": request_id}
        if with_owed_credit:
            owed = self.take_owed()
            if owed:
                message["credit"] = owed
        try:
            self.send_json(message)
        except BaseException:
            with self._pending_lock:
                mine = self._pending.pop(request_id, None) is answered
            if mine:  # not ended by abort(): the caller hears it from this raise
                raise
            # the connection ended while sending: abort() has called on_answer already

    def _read_loop(self) -> None:
        try:
            if FrameReader.usable(self.ws):
                frames = FrameReader(self.ws)
                recv_data, self._dropped_next = frames.recv_data, frames.dropped_next
            else:  # another kind of socket (a test's): websocket-client reads it
                recv_data = functools.partial(self.ws.recv_data, control_frame=True)
            timeout, loads, dispatch = websocket.WebSocketTimeoutException, jsoncodec.loads, self._dispatch
            while True:
                try:
                    opcode, data = recv_data()
                except timeout:
                    self._keepalive()
                    continue
                self._pong_due = None  # any traffic proves the link is alive
                if opcode >= _OP_CLOSE:  # close, ping (answered by the reader) or pong
                    if opcode == _OP_CLOSE:
                        raise close_error(data, authenticated=True)
                    continue
                dispatch(loads(data))
        except BaseException as exc:  # noqa: BLE001 - every way out ends this connection
            if not isinstance(exc, (SubscriptionError, ConnectionLost)):
                exc = ConnectionLost(f"subscription connection lost: {exc!r}")
            self.abort(exc)
        finally:
            self.ws.shutdown()  # close the descriptor (abort() only shuts the socket down)

    def _keepalive(self) -> None:
        now = time.monotonic()
        if self._pong_due is None:
            self._pong_due = now + self.ping_interval
            self.ws.ping()
        elif now >= self._pong_due:
            raise ConnectionLost(f"no traffic from the server for {2 * self.ping_interval:.0f}s (dead link)")

    def _dispatch(self, message: Any) -> None:
        if not isinstance(message, dict):
            logger.warning("Ignoring malformed subscription message: %r", message)
            return
        kind = message.get("type")
        if kind is None:
            if not self._closing_behind(1):
                self._run_arrived(message)  # alone in its message: no yield (see _started)
        elif kind == "task_runs" and self.claims:  # batch_delivery: runs claimed together
            runs = message.get("task_runs")
            if not isinstance(runs, list):
                logger.warning("Ignoring malformed task_runs message: %.500r", message)
                return
            if self._closing_behind(len(runs)):
                return
            last = len(runs) - 1
            for i, item in enumerate(runs):
                started = self._run_arrived(item)
                if started is not None:
                    self._started(started, i < last)
        elif "request_id" in message:  # the answer to a request (set_state_result, rpc answers)
            with self._pending_lock:  # taken out: answered once (abort() takes what is left)
                pending = self._pending.pop(str(message.get("request_id")), None)
            if pending is None:
                logger.debug("Late %s for request %s ignored", kind, message.get("request_id"))
                return
            pending.reply = message
            try:
                pending.set()
            except Exception:  # noqa: BLE001 - a callback's bug must not end the connection
                logger.exception("Error in the answer callback of request %s", message.get("request_id"))
        elif kind == "cancel":  # the embedded server cancels a run this worker holds
            from sync_worker.cancellation import request

            request(message.get("task_run_id"))
        else:
            logger.debug("Ignoring control message of type %r", kind)

    def _closing_behind(self, runs: int) -> bool:
        """Whether the server dropped this connection as dead right after delivering
        ``runs`` run(s): then they are not started (see :meth:`FrameReader.dropped_next`).
        The server gives them to a worker again: unacknowledged ones at once, claimed ones
        when their lease runs out (unless they finished meanwhile)."""
        if self._dropped_next is None or not self._dropped_next():
            return False
        logger.info("Not starting %d run(s) delivered just before the server dropped the connection (no answer "
                    "to its pings: this process was paused?): they are no longer this worker's; the server "
                    "delivers them again", runs)
        return True

    def _started(self, run: TaskRun, more_runs: bool) -> None:
        """``run`` was handed to a run thread: yield the GIL to it now if ``more_runs`` of
        the same message are to be handed out (batch delivery) and :attr:`yields_after`
        says ``run`` is worth it. Without the yield, the run thread just woken waits for
        the GIL until the reader has handed out the rest of them, and its function starts
        that much later. Not after the last run of a message: the reader releases the GIL
        in its next read anyway, and a yield is one more thread switch (per run, in the
        10 ms case: 6.4 -> 5.75 voluntary switches per run in the worker, 5 rounds each,
        ``benchmarks/worker_short_cpu.py``)."""
        if more_runs and self.yields_after is not None and self.yields_after(run):
            time.sleep(0)

    def _run_arrived(self, message: Any) -> TaskRun | None:
        """A delivered run: started (returned), queued for the consumer, or handed back."""
        try:
            if not isinstance(message, dict):
                raise TypeError(f"a task run must be an object, not {type(message).__name__}")
            run = LazyTaskRun.delivered(message)  # what the worker needs now, the rest when asked for
        except (KeyError, TypeError, ValueError) as exc:
            logger.error("Discarding a malformed task run from the server (%r): %.500r", exc, message)
            if not self.claims:
                # Nobody can execute it; acknowledging lets the queue move on instead of
                # stalling this subscription behind it forever.
                self.send_json({"type": "ack"})
            elif isinstance(message, dict) and isinstance(message.get("id"), str) and "release_run" in self.extensions:
                self.send_json({"type": "release", "task_run_id": message["id"]})  # claimed: its lease ends now
            return None
        with self._runs_lock:
            if self.releasing:  # the worker stopped receiving: not started, handed back now
                self.send_json({"type": "release", "task_run_ids": [run.id]})
                return None
            if self.on_run is not None and self.on_run(run):
                return run  # started: the reader handed it straight to the executor
            self.runs.put(run)
        return None

    def stop_taking(self) -> list[str]:
        """claim_at_delivery: no run is started from now on; the ids of the runs queued
        here (delivered, claimed, not started), taken off the queue."""
        with self._runs_lock:
            self.releasing = True
            return [run.id for run in self.take_queued()]

    def take_queued(self) -> list[Any]:
        """The runs queued here and not taken yet, off the queue (an END stays at its end)."""
        runs: list[Any] = []
        while True:
            try:
                item = self.runs.get_nowait()
            except queue.Empty:
                return runs
            if item is END:
                self.runs.put(END)
                return runs
            runs.append(item)

    def abort(self, exc: BaseException) -> None:
        """End the connection: wake the consumer and every waiting ``set_state`` caller."""
        with self._pending_lock:
            if self.closed.is_set():
                return
            self.error = exc
            self.closed.set()
            pending = list(self._pending.values())
            self._pending.clear()
        for item in pending:
            item.error = ConnectionLost(f"subscription connection lost before the answer: {exc}")
            try:
                item.set()
            except Exception:  # noqa: BLE001 - one caller's callback must not keep the others waiting
                logger.exception("Error in the answer callback of a request")
        try:
            self.ws.send_close()
        except Exception as err:  # noqa: BLE001 - best effort: the peer may be gone
            logger.debug("Sending close on the subscription socket: %r", err)
        sock = self.ws.sock
        if sock is not None:
            # Wakes the reader thread if it is blocked in recv (ws.abort() would not:
            # send_close already marked the socket disconnected).
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError as err:
                logger.debug("Shutting down the subscription socket: %r", err)
        self.runs.put(END)


END = object()


#: Bytes asked of the socket per read: a frame's header and body, and often the next
#: frames, in one system call instead of websocket-client's two or three per frame.
READ_SIZE = 65536


def send_all(sock: socket.socket, data: bytes) -> None:
    """``sock.sendall(data)`` in one system call when the socket takes every byte at once
    (nearly always: a frame is far smaller than the socket's buffer).

    A socket with a timeout (ours: the keep-alive) makes ``sendall`` wait in ``poll`` for
    room before every ``send``, a second system call per frame, and one more release of
    the GIL. ``os.write`` on the descriptor (non-blocking, as the timeout made it) writes
    what fits now; ``sendall`` sends the rest, waiting as before. Plain TCP sockets only:
    the bytes of a TLS socket must go through ``ssl``. Errors are the same ``OSError``s."""
    if sock.__class__ is not socket.socket:  # an SSLSocket (wss://) or another kind
        sock.sendall(data)
        return
    try:
        sent = os.write(sock.fileno(), data)
    except BlockingIOError:  # no room now: sendall waits for it
        sent = 0
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])


class _OpeningWebSocket(websocket.WebSocket):
    """websocket-client's WebSocket while it connects, telling ``cut_short`` the moment its
    TCP socket exists. Another thread cuts a handshake short by shutting down ``ws.sock``
    (:meth:`sync_worker.subscription.Subscription.abort_opening`), but ``connect()``
    assigns that socket and then waits for the server's answer with no way in between: an
    abort that looked just before the assignment found no socket, and the stop waited out
    the open timeout (a flaky test, 1 in ~10 under load). Checked at the assignment, an
    abort either finds the socket or is found by it. Once connected the object becomes a
    plain WebSocket again (no property on the hot path)."""

    cut_short: Callable[[], bool] | None = None

    @property  # type: ignore[override]
    def sock(self) -> socket.socket | None:
        return self.__dict__.get("sock")

    @sock.setter
    def sock(self, value: socket.socket | None) -> None:
        self.__dict__["sock"] = value
        if value is not None and self.cut_short is not None and self.cut_short():
            try:
                value.shutdown(socket.SHUT_RDWR)  # the handshake's read returns at once
            except OSError:
                pass


def open_socket(client: Any, url: str, timeout: float,
                created: Callable[[websocket.WebSocket], None] | None = None,
                cut_short: Callable[[], bool] | None = None) -> websocket.WebSocket:
    """A websocket to the API with the options every sync_worker socket uses (subscription,
    rpc). Raises websocket-client's errors; callers say what they mean. ``created`` is
    given the socket object before it connects, so that another thread can cut a handshake
    short (see :meth:`sync_worker.subscription.Subscription.abort_opening`); ``cut_short``
    says whether it has, when the TCP socket is made (see :class:`_OpeningWebSocket`).

    Cheaper framing than websocket-client's defaults, same bytes on the wire: mask keys
    from :class:`MaskKeys` (no ``os.urandom`` per frame; still masked, as RFC 6455 requires
    of a client) and buffered reads (:data:`READ_SIZE`; websocket-client's frame buffer
    keeps what a read returns beyond the bytes it asked for)."""
    headers = [f"{name}: {value}" for name, value in client.headers.items()]
    # (websocket.create_connection, unrolled to hand the object out before it connects.)
    # websocket-client's UTF-8 check of incoming frames is pure Python and cost a third of
    # the worker's CPU; json.loads rejects invalid text anyway.
    if cut_short is None:
        ws = websocket.WebSocket(enable_multithread=True, skip_utf8_validation=True)
    else:
        ws = _OpeningWebSocket(enable_multithread=True, skip_utf8_validation=True)
        ws.cut_short = cut_short
    ws.settimeout(timeout)
    if created is not None:
        created(ws)
    ws.connect(url, timeout=timeout, subprotocols=["prefect"], header=headers)
    ws.__class__ = websocket.WebSocket  # (an _OpeningWebSocket's socket stays in its __dict__)
    ws.set_mask_key(MaskKeys())
    frames = getattr(ws, "frame_buffer", None)
    recv = getattr(ws, "_recv", None)
    if frames is not None and recv is not None and hasattr(frames, "recv"):
        frames.recv = lambda _size: recv(READ_SIZE)
    return ws


def authenticate(ws: websocket.WebSocket, client: Any) -> dict[str, Any]:
    """Send Prefect's auth message; the server's answer (a close frame raises)."""
    ws.send(json.dumps({"type": "auth", "token": client.auth_token}))
    while True:
        opcode, data = ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            raise close_error(data)
        if opcode in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY):
            return json.loads(data)


def close_error(data: bytes, authenticated: bool = False) -> BaseException:
    """The exception a close frame means. 1008 refuses our credentials only while they are
    being checked: once the server answered ``auth_success`` a 1008 (our server's "Ping/Pong
    timeout" when the link or this process stalled, an input rule) ends this connection and
    the subscription connects again, as Prefect's own client does, instead of stopping the
    worker for good with a misleading "credentials refused".

    Nor does "Expected 'auth' message" (our server: "... within 5 s") refuse credentials:
    this client sends ``auth`` first thing, so the server did not get it in time (a stalled
    link, a reconnect under load) and connecting again is the cure."""
    code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else None
    reason = data[2:].decode("utf-8", "replace") if len(data) > 2 else ""
    if code == CLOSE_POLICY_VIOLATION and not authenticated and not reason.startswith("Expected 'auth' message"):
        return SubscriptionAuthError(f"The server refused the subscription (close 1008: {reason or 'policy violation'}); {AUTH_HINT}")
    if code == CLOSE_PROTOCOL_VIOLATION:
        return SubscriptionError(f"The server rejected the subscription (close 4001: {reason})")
    return ConnectionLost(f"the server closed the subscription (code {code}, reason {reason!r})")


__all__ = [
    "AUTH_HINT", "CLOSE_POLICY_VIOLATION", "CLOSE_PROTOCOL_VIOLATION", "END", "Connection", "ConnectionLost",
    "FrameReader", "MaskKeys", "SubscriptionAuthError", "SubscriptionError", "authenticate", "close_error", "open_socket",
    "send_all", "text_frame",
]
