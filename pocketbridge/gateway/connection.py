"""One WebSocket connection: its bounded outbox, the single writer task, heartbeat and closing.

Everything the server sends goes through :meth:`Connection.send`, which never blocks: when the
outbox (bounded by messages and bytes) is full, the connection is closed with 1013 and the client
catches up by replay. :meth:`Connection.close` records the first close reason and cancels the
connection's scope; :meth:`Connection.finish` then sends the close frame (shielded, with a timeout).
"""

from __future__ import annotations

import logging
import secrets
from collections import deque
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection
from trio_websocket._impl import CloseReason  # pinned trio-websocket 0.12
from wsproto import ConnectionState, WSConnection
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from ..errors import MESSAGE_TOO_BIG, TRY_AGAIN, Close

log = logging.getLogger("pocketbridge.gateway")


PING = ""  # in an outbox: a protocol ping (every text message the server sends is non-empty JSON)
PING_PAYLOAD = b"pb"
WRITE_BATCH_BYTES = 256 * 1024  # queued messages the writer puts into one socket write

FRAME_ERRORS = {1007: "Invalid UTF-8 in text frame", 1002: "Protocol error", 1009: MESSAGE_TOO_BIG.reason}


class _Upgraded:
    """Stands in for wsproto's finished HTTP handshake: it has no more events."""

    @staticmethod
    def events() -> tuple[()]:
        return ()


_UPGRADED = _Upgraded()


class Socket(WebSocketConnection):
    """trio-websocket's connection with what the spec needs on top: the 1009 reason of §1 with the
    size counted in bytes, a smaller size limit until the handshake is done, a bound on fragments
    per message, and any pong counting for the heartbeat (§4).

    A message that arrives in several pieces (fragments, or one frame over several reads) is
    assembled in one growing buffer, so it costs about its size in memory however it is cut up."""

    last_pong: float = 0.0

    def __init__(
        self,
        stream: trio.abc.Stream,
        ws_connection: WSConnection,
        *,
        max_message_size: int,
        handshake_message_size: int,
        max_fragments: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(stream, ws_connection, max_message_size=max_message_size, **kwargs)
        self.max_message_bytes = max_message_size  # after the handshake: [ws] max_message_bytes
        self.message_limit = min(handshake_message_size, max_message_size)  # what applies now
        self.max_fragments = max_fragments
        self.assembling: bytearray | None = None  # the UTF-8 (text) or bytes of a message so far
        self.assembling_frames = 0

    def handshake_done(self) -> None:
        """From now on a message may be up to ``[ws] max_message_bytes``."""
        self.message_limit = self.max_message_bytes

    async def _handle_message_event(self, event: BytesMessage | TextMessage) -> None:  # type: ignore[override]
        if self.closed is not None:  # the rest of a read after this side closed: dropped
            return
        data = event.data
        text = isinstance(event, TextMessage)
        if self.assembling is None and event.message_finished:  # a whole message at once (no copy)
            size = len(data) if not text or data.isascii() else len(data.encode("utf-8", "surrogatepass"))
            if size > self.message_limit:
                await self._message_too_big()
            else:
                await super()._handle_message_event(event)
            return
        chunk = data.encode("utf-8", "surrogatepass") if text else data
        if self.assembling is None:
            self.assembling = bytearray()
        if event.frame_finished:
            self.assembling_frames += 1
        if len(self.assembling) + len(chunk) > self.message_limit or self.assembling_frames > self.max_fragments:
            await self._message_too_big()
            return
        self.assembling += chunk
        if event.message_finished:
            whole = self.assembling.decode("utf-8", "surrogatepass") if text else bytes(self.assembling)
            self.assembling = None
            self.assembling_frames = 0
            # the parent delivers a message of one part as it is (its own size check is never lower)
            await super()._handle_message_event(type(event)(data=whole))

    async def _message_too_big(self) -> None:
        self.assembling = None
        self.assembling_frames = 0
        self._close_reason = CloseReason(MESSAGE_TOO_BIG.code, MESSAGE_TOO_BIG.reason)
        await self._send(CloseConnection(code=MESSAGE_TOO_BIG.code, reason=MESSAGE_TOO_BIG.reason))
        await self._recv_channel.aclose()
        self._reader_running = False

    async def _handle_close_connection_event(self, event: CloseConnection) -> None:
        # wsproto reports a frame it cannot parse (e.g. invalid UTF-8 in a text frame: 1007) as a
        # close event while the connection is still open; answer it with a close frame of that code
        # (and a fixed reason) instead of just dropping the TCP connection.
        if self._wsproto.state == ConnectionState.OPEN:
            reason = FRAME_ERRORS.get(event.code, "Protocol error")
            self._close_reason = CloseReason(event.code, reason)
            try:
                await self._send(CloseConnection(code=event.code, reason=reason))
            except ConnectionClosed:
                pass
            event = CloseConnection(code=event.code, reason=reason)
        await super()._handle_close_connection_event(event)

    async def _handle_pong_event(self, event: Pong) -> None:
        self.last_pong = trio.current_time()
        await super()._handle_pong_event(event)

    def forget_handshake(self) -> None:
        """Drop the HTTP upgrade's parser state once the WebSocket is open (a few kB per connection)."""
        if self._wsproto.connection is not None:
            self._wsproto.handshake = _UPGRADED  # type: ignore[assignment]

    async def send_many(self, messages: list[str]) -> None:
        """Several text messages in one write (the writer drains its queue into one syscall)."""
        async with self._stream_lock:  # checked and encoded under the lock: nothing goes out after a close frame
            if self._close_reason:
                raise ConnectionClosed(self._close_reason)
            data = b"".join(
                self._wsproto.send(TextMessage(data=m) if m else Ping(payload=PING_PAYLOAD)) for m in messages
            )
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self._abort_web_socket()
                raise ConnectionClosed(self._close_reason) from None

    async def abort(self) -> None:
        """Close the TCP connection without a close handshake (the peer sees 1006)."""
        await self._close_stream()


class Outbox:
    """A send queue bounded by message count and by size (characters of the encoded JSON).

    A message stays in the queue until the task that sends it takes it out, so ``size`` and ``len``
    are exact at any moment: nothing is ever half-way between the queue and the writer."""

    __slots__ = ("_queue", "_max_messages", "_max_bytes", "_ready", "size")

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self._queue: deque[str] = deque()
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._ready = trio.Event()  # set when a message is put (renewed by get_many before waiting)
        self.size = 0

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, message: str) -> bool:
        if len(self._queue) >= self._max_messages or self.size + len(message) > self._max_bytes:
            return False
        self._queue.append(message)
        self.size += len(message)
        self._ready.set()
        return True

    def take(self, max_bytes: int) -> list[str]:
        """What is queued now, oldest first, up to about ``max_bytes`` (at least one message unless
        the queue is empty). Never waits."""
        messages: list[str] = []
        size = 0
        while self._queue and (not messages or size < max_bytes):
            message = self._queue.popleft()
            size += len(message)
            messages.append(message)
        self.size -= size
        return messages

    async def get_many(self, max_bytes: int) -> list[str]:
        """At least one message, plus whatever else is queued, up to about ``max_bytes``. A
        checkpoint even when messages are queued, so a cancelled caller stops here."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._queue:
            self._ready = trio.Event()
            await self._ready.wait()
        return self.take(max_bytes)


class Connection:
    __slots__ = (
        "ws", "peer", "id", "outbox", "close_reason", "closed_by_peer", "overflowed", "_final", "_deferred", "busy",
        "_scope", "_close_timeout", "_writer_scope", "_writer_stopped", "_writer_done",
    )
    def __init__(
        self,
        ws: Socket,
        peer: str,
        *,
        send_queue_messages: int,
        send_queue_bytes: int,
        close_timeout: float,
    ) -> None:
        self.ws = ws
        self.peer = peer
        self.id = secrets.token_hex(8)
        self.outbox = Outbox(send_queue_messages, send_queue_bytes)
        self.close_reason: Close | None = None
        self.closed_by_peer = False
        self.overflowed = False
        self._final: str | None = None
        self._deferred = False
        self.busy = False  # a client message is being processed
        self._writer_scope: trio.CancelScope | None = None
        self._writer_stopped = False
        self._writer_done = trio.Event()  # set when run_writer has returned (or will return at once)
        self._scope: trio.CancelScope | None = None
        self._close_timeout = close_timeout

    @property
    def short_id(self) -> str:
        return self.id[:8]

    def bind(self, scope: trio.CancelScope) -> None:
        """The scope that :meth:`close` cancels (the connection's nursery)."""
        self._scope = scope
        if self.close_reason is not None or self.closed_by_peer:
            scope.cancel()

    def send(self, message: str) -> None:
        if self.closed_by_peer or (self.close_reason is not None and not self._deferred):
            return
        if not self.outbox.put(message):
            self.overflowed = True
            self.close(TRY_AGAIN)

    def send_ping(self) -> None:
        """Queue a protocol ping (the writer turns the empty marker into a ping frame)."""
        self.send(PING)

    def close(self, reason: Close, final_message: str | None = None, *, after_current: bool = False) -> None:
        """Close with ``reason`` (first call wins), optionally sending ``final_message`` just before.

        With ``after_current``, a message being processed is finished first (its ack still goes
        out), so a drain never leaves an event half done."""
        if self.close_reason is None and not self.closed_by_peer:
            self.close_reason = reason
            self._final = final_message
            if after_current and self.busy:
                self._deferred = True
                return
        self._deferred = False
        if self._scope is not None:
            self._scope.cancel()

    def close_if_deferred(self) -> None:
        if self._deferred:
            self._deferred = False
            if self._scope is not None:
                self._scope.cancel()

    def peer_closed(self) -> None:
        self.closed_by_peer = True
        if self._scope is not None:
            self._scope.cancel()

    async def run_writer(self) -> None:
        """The one task that writes to the socket. It runs outside the connection's nursery and is
        never cancelled mid-frame (a frame cut in half would corrupt the stream): :meth:`finish`
        stops it between frames and waits until it has returned, or aborts the TCP connection if a
        frame cannot get out in time."""
        try:
            with trio.CancelScope() as scope:
                self._writer_scope = scope
                if self._writer_stopped:
                    return
                try:
                    while not self._writer_stopped:
                        messages = await self.outbox.get_many(WRITE_BATCH_BYTES)
                        with trio.CancelScope(shield=True):
                            await self.ws.send_many(messages)
                except ConnectionClosed:
                    self.peer_closed()
        finally:
            self._writer_done.set()

    async def finish(self) -> None:
        """Let the frame being written finish, flush what is queued (unless the peer is too slow
        for it), send the final message and the close frame. Never raises; after close_timeout the
        TCP connection is aborted instead."""
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self._close_timeout) as deadline:
                try:
                    await self._stop_writer()
                    if self.close_reason is not None and not self.closed_by_peer:
                        while not self.overflowed and self.outbox:
                            await self.ws.send_many(self.outbox.take(WRITE_BATCH_BYTES))
                        if self._final is not None:
                            await self.ws.send_many([self._final])
                        await self.ws.aclose(self.close_reason.code, self.close_reason.reason)
                    else:
                        await self.ws.aclose()
                except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            if deadline.cancelled_caught:
                await self.ws.abort()

    async def _stop_writer(self) -> None:
        """Stop the writer between two writes and wait until it has returned: from then on nothing
        but the caller takes messages from the outbox or writes to the socket."""
        self._writer_stopped = True
        if self._writer_scope is None:  # not started yet: it returns as soon as it starts
            return
        self._writer_scope.cancel()
        await self._writer_done.wait()
