"""The server side of one WebSocket connection: wsproto driven over a trio stream (RFC 6455, protocol.md §1).

Bytes in, events out. :meth:`WebSocket.receive_request` reads the HTTP upgrade request; the server then
calls :meth:`~WebSocket.accept` or :meth:`~WebSocket.reject`. After the upgrade, :meth:`~WebSocket.run_reader`
(one task) reads the stream, takes whole small text messages out of it itself (:mod:`.frames`), feeds the rest
to wsproto and handles what comes out: it answers pings and the peer's close
frame itself, records pongs for the heartbeat, enforces the message limits, and hands each complete message
over to :meth:`~WebSocket.get_message` through a one-message slot. So control frames are answered while the
application processes a message, and a client that sends faster than it is served is held back by TCP
(the reader stops reading while the slot is full).

Every write takes the socket's write lock and encodes its frames under it, so frames never interleave and
nothing goes out after a close frame; :meth:`WebSocket.write_now` writes only while nobody holds the lock,
in one step without waiting. Only public wsproto API is used (the upgraded connection is
``WSConnection.connection``; the HTTP parser is dropped once the upgrade is done).
"""

from __future__ import annotations

import contextlib
import os

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection as FrameConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError

from ..errors import MESSAGE_TOO_BIG, Close
from .frames import FrameSplitter

PING = ""  # in send_many: a protocol ping (every text message the server sends is non-empty JSON)
PING_PAYLOAD = b"pb"
ABNORMAL = Close(1006, "")  # the connection ended without a close frame (never sent on the wire)
FRAME_ERRORS = {1007: "Invalid UTF-8 in text frame", 1002: "Protocol error", 1009: MESSAGE_TOO_BIG.reason}

_NOT_STARTED, _READING, _DONE = 0, 1, 2  # the reader's states
_OPEN = ConnectionState.OPEN


def text_frame(text: str) -> bytes:
    """One whole text message as a server frame (RFC 6455 §5.2: final, unmasked): the bytes wsproto writes for
    ``TextMessage(data=text)`` on a connection without extensions (the server never agrees to one)."""
    data = text.encode("utf-8")
    n = len(data)
    if n < 126:
        return bytes((0x81, n)) + data
    if n < 65536:
        return b"\x81\x7e" + n.to_bytes(2, "big") + data
    return b"\x81\x7f" + n.to_bytes(8, "big") + data


class ConnectionClosed(Exception):
    """The WebSocket is closed or closing; ``code`` and ``reason`` are those of :attr:`WebSocket.closed`."""

    def __init__(self, close: Close) -> None:
        super().__init__(close.code, close.reason)
        self.close = close

    @property
    def code(self) -> int:
        return self.close.code

    @property
    def reason(self) -> str:
        return self.close.reason


class WebSocket:
    """One server-side WebSocket connection over ``stream``.

    * ``max_message_bytes``: the largest message (UTF-8 bytes of a text message), after :meth:`handshake_done`;
      before it ``handshake_message_bytes`` (if smaller). Larger: closed with 1009 ``Message too big``.
    * ``max_fragments``: frames per message; more is 1009 too. A message that arrives in pieces (fragments,
      or one frame over several reads) is assembled in one growing buffer: it costs about its size.
      After a 1009 the reader drops whatever else arrives and waits for the peer's close frame (the close
      handshake of :meth:`aclose`, which the server's ``finish`` bounds by ``[ws] close_timeout``).
    * A frame wsproto cannot parse is answered with a close frame of its code (1007 for invalid UTF-8,
      otherwise 1002) and the fixed reason of ``FRAME_ERRORS``, then the TCP connection is closed.
    * :attr:`closed` is the first close: the one this side sent, the peer's, or 1006 when the connection
      ended without one. :attr:`last_pong` is when the last pong arrived (``trio.current_time()``).
    """

    __slots__ = (
        "_stream", "_sock", "_unsent", "_handshake", "_proto", "_receive_size", "_writing", "_write_free", "_message",
        "_wakeup", "_accepting", "_reader", "_reader_done", "_assembling", "_assembling_frames",
        "closed", "last_pong", "max_message_bytes", "message_limit", "max_fragments",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        max_message_bytes: int,
        handshake_message_bytes: int,
        max_fragments: int,
        receive_size: int = 4096,
    ) -> None:
        self._stream = stream
        # On a socket the frames are read and written on its file descriptor directly: a read or a write that
        # does not have to wait costs no trip through the scheduler (trio's stream calls yield twice each).
        self._sock = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._unsent: bytes | memoryview | None = None  # the rest of a frame written in part: goes out first
        self._handshake: WSConnection | None = WSConnection(ConnectionType.SERVER)  # until the upgrade is done
        self._proto: FrameConnection | None = None  # after it
        self._receive_size = receive_size
        self._writing = False  # the write lock
        self._write_free: trio.Event | None = None  # set when the lock is released (made only when contended)
        self._message: str | bytes | None = None  # the one complete message waiting for get_message
        self._wakeup: trio.Event | None = None  # the reader (slot full) or the consumer (slot empty) waits on it
        self._accepting = True  # messages are handed over (false once this side closed)
        self._reader = _NOT_STARTED
        self._reader_done: trio.Event | None = None  # made by aclose when it waits for the reader
        self._assembling: bytearray | None = None  # the UTF-8 (text) or bytes of a message so far
        self._assembling_frames = 0
        self.closed: Close | None = None
        self.last_pong = 0.0
        self.max_message_bytes = max_message_bytes
        self.message_limit = min(handshake_message_bytes, max_message_bytes)  # what applies now
        self.max_fragments = max_fragments

    def handshake_done(self) -> None:
        """From now on a message may be up to ``max_message_bytes``."""
        self.message_limit = self.max_message_bytes

    # --- the HTTP upgrade ---------------------------------------------------------------------------------
    async def receive_request(self) -> Request | None:
        """Read the HTTP upgrade request. None when the peer goes away first, or sends something that is not
        a WebSocket upgrade (answered with wsproto's 400 or 426 and closed)."""
        handshake = self._handshake
        assert handshake is not None, "receive_request after the upgrade"
        while True:
            for event in handshake.events():
                if isinstance(event, Request):
                    return event
            try:
                data = await self._stream.receive_some(self._receive_size)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            if not data:
                return None
            try:
                handshake.receive_data(data if isinstance(data, bytes) else bytes(data))
            except RemoteProtocolError as exc:
                if exc.event_hint is not None:
                    try:
                        answer = handshake.send(exc.event_hint)
                    except Exception:  # noqa: BLE001 - the HTTP state does not allow an answer: just close
                        answer = b""
                    await self._write_and_close(answer)
                return None

    async def accept(self) -> None:
        """Answer the upgrade request with 101; the WebSocket is open. Raises ConnectionClosed if the peer
        is gone."""
        handshake = self._handshake
        assert handshake is not None, "accept twice"
        data = handshake.send(AcceptConnection())
        self._proto = handshake.connection
        self._handshake = None  # drop the HTTP parser (a few kB per connection)
        await self._acquire()
        try:
            await self._send_all(data)
        finally:
            self._release()

    async def reject(self, status_code: int) -> None:
        """Answer the upgrade request with ``status_code`` and no body, and close the TCP connection."""
        handshake = self._handshake
        assert handshake is not None, "reject after the upgrade"
        data = handshake.send(RejectConnection(status_code=status_code))
        self._handshake = None
        self._set_closed(ABNORMAL)
        await self._write_and_close(data)

    # --- receiving ----------------------------------------------------------------------------------------
    async def get_message(self) -> str | bytes:
        """The next message. Once the connection is closed: the message already received (if the peer
        closed), then ConnectionClosed; after this side closed, ConnectionClosed at once."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while self._message is None:
            if self.closed is not None or self._reader == _DONE or not self._accepting:
                raise ConnectionClosed(self.closed or ABNORMAL)
            wakeup = self._wakeup = trio.Event()
            await wakeup.wait()
        message, self._message = self._message, None
        self._wake()  # the reader may be waiting for the slot
        return message

    async def run_reader(self) -> None:
        """Read until the connection ends (call once, after :meth:`accept`). Never raises for anything the
        peer does."""
        proto = self._proto
        assert proto is not None and self._reader == _NOT_STARTED, "run_reader before accept, or twice"
        self._reader = _READING
        # On a socket, a drained receive buffer is awaited with wait_readable, then read without waiting: an
        # idle connection waits in one small frame, and a read costs no further trip through the scheduler.
        sock = self._sock
        drained = True  # the last read did not fill the buffer: nothing more is likely waiting
        data: bytes | bytearray | None
        frames = FrameSplitter()  # small whole text messages are read here, the rest by wsproto
        try:
            while True:
                try:
                    if sock is None:
                        data = await self._stream.receive_some(self._receive_size)
                    elif (data := await self._read(sock, drained)) is None:
                        drained = True  # woken with nothing to read
                        continue
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    self._set_closed(ABNORMAL)
                    return
                drained = len(data) < self._receive_size
                for item in frames.feed(data if isinstance(data, bytes) else bytes(data), self.message_limit):
                    if isinstance(item, str):
                        if self._accepting:  # after this side closed, the rest is dropped
                            await self._deliver(item)
                    else:
                        proto.receive_data(item)
                        if not await self._handle_events(proto):
                            return
        except ConnectionClosed:  # a write failed: the connection is gone
            pass
        finally:
            self._reader = _DONE
            self._wake()
            if self._reader_done is not None:
                self._reader_done.set()

    async def _handle_events(self, proto: FrameConnection) -> bool:
        """What wsproto made of the bytes handed to it; False once the close handshake ends the reading."""
        for event in proto.events():
            if isinstance(event, (TextMessage, BytesMessage)):
                if self._accepting:  # after this side closed, the rest is dropped
                    await self._on_data(event)
            elif isinstance(event, Ping):
                await self._pong(event)
            elif isinstance(event, Pong):
                self.last_pong = trio.current_time()
            elif isinstance(event, CloseConnection):
                await self._on_close(proto, event)
                return False
        return True

    async def _read(self, sock: trio.socket.SocketType, drained: bool) -> bytes | None:
        """Up to ``receive_size`` bytes from the socket (``b""`` at its end or once it is closed), None if there
        was nothing to read after all. Waits for data first if the last read ``drained`` the socket, else only
        lets the other tasks run (a peer that keeps the buffer full does not starve them)."""
        if sock.fileno() < 0:  # closed by this side (abort) while the reader was busy elsewhere
            return b""
        if drained:
            await trio.lowlevel.wait_readable(sock)
        else:
            await trio.lowlevel.checkpoint()
        fd = sock.fileno()
        if fd < 0:  # closed by this side meanwhile
            return b""
        try:
            return os.read(fd, self._receive_size)
        except BlockingIOError:
            return None
        except OSError:  # reset by the peer, or the like: the connection is gone
            return b""

    async def _on_data(self, event: TextMessage | BytesMessage) -> None:
        text = isinstance(event, TextMessage)
        if self._assembling is None and event.message_finished:  # a whole message at once (no copy)
            if isinstance(event, TextMessage):
                whole: str | bytes = event.data
                size = len(whole) if event.data.isascii() else len(event.data.encode("utf-8", "surrogatepass"))
            else:
                whole = event.data if isinstance(event.data, bytes) else bytes(event.data)
                size = len(whole)
            if size > self.message_limit:
                await self._too_big()
            else:
                await self._deliver(whole)
            return
        chunk = event.data.encode("utf-8", "surrogatepass") if isinstance(event, TextMessage) else event.data
        if self._assembling is None:
            self._assembling = bytearray()
        if event.frame_finished:
            self._assembling_frames += 1
        if len(self._assembling) + len(chunk) > self.message_limit or self._assembling_frames > self.max_fragments:
            await self._too_big()
            return
        self._assembling += chunk
        if event.message_finished:
            whole = self._assembling.decode("utf-8", "surrogatepass") if text else bytes(self._assembling)
            self._assembling = None
            self._assembling_frames = 0
            await self._deliver(whole)

    async def _deliver(self, message: str | bytes) -> None:
        """Put a message into the slot, waiting while it is full (or until this side closes)."""
        while self._message is not None:
            if not self._accepting:
                return
            wakeup = self._wakeup = trio.Event()
            await wakeup.wait()
        if self._accepting:
            self._message = message
            self._wake()

    async def _too_big(self) -> None:
        """1009: drop what was received and send the close frame; the reader then waits for the peer's close."""
        self._assembling = None
        self._assembling_frames = 0
        self._stop_messages()
        await self._send_close(MESSAGE_TOO_BIG)

    async def _pong(self, ping: Ping) -> None:
        await self._acquire()
        try:
            if self.closed is None and self._proto is not None and self._proto.state is _OPEN:
                await self._send_all(self._proto.send(ping.response()))
        finally:
            self._release()

    async def _on_close(self, proto: FrameConnection, event: CloseConnection) -> None:
        """A close frame from the peer, or one that wsproto made up for a frame it could not parse."""
        state = proto.state
        if state is ConnectionState.REMOTE_CLOSING:  # the peer starts the close handshake: answer, end TCP
            self._set_closed(Close(event.code, event.reason or ""))
            await self._acquire()
            try:
                if proto.state is ConnectionState.REMOTE_CLOSING:
                    await self._send_all(proto.send(event.response()))
            finally:
                self._release()
            await self._close_stream()  # RFC 6455 §7.1.1: the server closes the TCP connection first
        elif state is _OPEN:  # a frame error: close with its code and a fixed reason, then end TCP
            close = Close(event.code, FRAME_ERRORS.get(event.code, FRAME_ERRORS[1002]))
            await self._send_close(close)
            await self._close_stream()
        # CLOSED: the peer answered our close frame; LOCAL_CLOSING: a frame error after it. Either way the
        # reader is done; aclose closes TCP.

    # --- sending ------------------------------------------------------------------------------------------
    async def send_many(self, messages: list[str]) -> None:
        """Several text messages in one write; an empty string is a protocol ping (payload ``b"pb"``).
        Raises ConnectionClosed once a close frame was sent or received, or the connection broke."""
        await self._acquire()
        try:  # checked and encoded under the lock: nothing goes out after a close frame
            proto = self._proto
            if self.closed is not None or proto is None or proto.state is not _OPEN:
                raise ConnectionClosed(self.closed or ABNORMAL)
            await self._send_all(b"".join(self._frame(proto, m) for m in messages))
        finally:
            self._release()

    def write_now(self, message: str) -> bool:
        """Write one message (``PING``: a protocol ping) at once, without waiting or a task switch, if nothing
        else is being written. True if the socket took the frame: all of it, or its first part, the rest kept
        (:attr:`has_unsent`) to go out first with the next write, which the caller must then make (its
        writer's ``send_many``). False if it cannot be written that way now: not on a socket, another write
        in progress or pending, not open, or the socket's buffer full; the caller queues it instead."""
        sock, proto = self._sock, self._proto
        if sock is None or self._writing or self._unsent is not None or self.closed is not None:
            return False
        if proto is None or proto.state is not _OPEN or (fd := sock.fileno()) < 0:
            return False
        data = self._frame(proto, message)
        try:
            sent = os.write(fd, data)
        except OSError:  # full (BlockingIOError), or broken: the writer waits, or finds out and closes
            return False
        if sent < len(data):
            self._unsent = data[sent:]
        return True

    @property
    def has_unsent(self) -> bool:
        """Part of a frame (begun by :meth:`write_now`, or by a write cancelled while it waited for room) still
        has to be written; the next write sends it first."""
        return self._unsent is not None

    @staticmethod
    def _frame(proto: FrameConnection, message: str) -> bytes:
        """A text message's frame, or a protocol ping's for ``PING``."""
        return text_frame(message) if message else proto.send(Ping(payload=PING_PAYLOAD))

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """The close handshake: send a close frame (unless one was sent or received already), wait until
        the reader has seen the peer's close frame or the end of the stream, then close the TCP connection.
        Bound it with a timeout (it waits for the peer); the TCP connection is closed even when cancelled.
        Messages not yet taken are dropped. Never raises ConnectionClosed."""
        self._stop_messages()
        try:
            if self._proto is not None:
                await self._send_close(Close(code, reason or ""))
                if self._reader != _DONE:
                    if self._reader_done is None:
                        self._reader_done = trio.Event()
                    await self._reader_done.wait()
        except ConnectionClosed:
            pass
        finally:
            await self._close_stream()

    async def abort(self) -> None:
        """Close the TCP connection without a close handshake (the peer sees 1006)."""
        self._set_closed(ABNORMAL)
        self._stop_messages()
        await self._close_stream()

    async def _send_close(self, close: Close) -> None:
        """Send a close frame with ``close`` unless the connection is closed or closing already."""
        await self._acquire()
        try:
            proto = self._proto
            if self.closed is None and proto is not None and proto.state is _OPEN:
                self._set_closed(close)
                await self._send_all(proto.send(CloseConnection(code=close.code, reason=close.reason or None)))
        finally:
            self._release()

    # --- the stream ---------------------------------------------------------------------------------------
    async def _acquire(self) -> None:
        """The write lock (two writers at most contend: the reader's answers and the connection's writer)."""
        while self._writing:
            if self._write_free is None:
                self._write_free = trio.Event()
            await self._write_free.wait()
        self._writing = True

    def _release(self) -> None:
        self._writing = False
        if self._write_free is not None:
            self._write_free.set()
            self._write_free = None

    async def _send_all(self, data: bytes | bytearray) -> None:
        """Write under the lock; a broken connection is 1006 and raises ConnectionClosed. Not shielded here
        (the connection's writer shields its writes itself). On a socket, what the socket takes at once is
        written without waiting; while the rest waits for room it is kept as unsent, so a write cancelled
        there (the reader's pong or close frame, when the connection is shed) leaves it to go first with the
        next write: a frame is never cut on the wire, only by the end of the connection."""
        if self._unsent is not None:  # the rest of a frame begun earlier goes first
            data, self._unsent = bytes(self._unsent) + data, None
        sock = self._sock
        try:
            if sock is None:
                await self._stream.send_all(data)
                return
            view, pos = memoryview(data), 0
            while pos < len(view):
                if (fd := sock.fileno()) < 0:
                    raise trio.ClosedResourceError
                try:
                    pos += os.write(fd, view[pos:])
                except BlockingIOError:
                    pass
                except OSError:  # EPIPE, ECONNRESET …: the connection is gone
                    raise trio.BrokenResourceError from None
                if pos < len(view):
                    self._unsent = view[pos:]
                    await trio.lowlevel.wait_writable(sock)
                    self._unsent = None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._unsent = None
            self._set_closed(ABNORMAL)
            self._stop_messages()
            raise ConnectionClosed(self.closed or ABNORMAL) from None

    async def _write_and_close(self, data: bytes) -> None:
        """Best effort: ``data`` (an HTTP answer), then close the stream."""
        try:
            if data:
                await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await self._close_stream()

    async def _close_stream(self) -> None:
        with trio.CancelScope(shield=True), contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._stream.aclose()

    # --- state --------------------------------------------------------------------------------------------
    def _set_closed(self, close: Close) -> None:
        if self.closed is None:
            self.closed = close
        self._wake()

    def _stop_messages(self) -> None:
        """This side is closing: no more messages are handed over, the one waiting is dropped."""
        self._accepting = False
        self._message = None
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None
