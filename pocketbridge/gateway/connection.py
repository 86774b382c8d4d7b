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
from collections.abc import Callable

import trio

from ..errors import TRY_AGAIN, Close
from .wsconn import FRAME_ERRORS, PING, PING_PAYLOAD, ConnectionClosed, WebSocket

__all__ = ["FRAME_ERRORS", "PING", "PING_PAYLOAD", "Connection", "ConnectionClosed", "Outbox", "WebSocket"]

log = logging.getLogger("pocketbridge.gateway")


WRITE_BATCH_BYTES = 256 * 1024  # queued messages the writer puts into one socket write


class Outbox:
    """A send queue bounded by message count and by size (characters of the encoded JSON).

    A message stays in the queue until the task that sends it takes it out, so ``size`` and ``len``
    are exact at any moment: nothing is ever half-way between the queue and the writer. An empty
    outbox holds no buffer and no event (an idle connection keeps thousands of them)."""

    __slots__ = ("_queue", "_max_messages", "_max_bytes", "_ready", "size")

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self._queue: deque[str] | None = None  # made by put, dropped by take once empty
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._ready: trio.Event | None = None  # made by get_many before waiting, set (and dropped) by put
        self.size = 0

    def __len__(self) -> int:
        return len(self._queue) if self._queue is not None else 0

    def put(self, message: str) -> bool:
        if len(self) >= self._max_messages or self.size + len(message) > self._max_bytes:
            return False
        if self._queue is None:
            self._queue = deque()
        self._queue.append(message)
        self.size += len(message)
        if self._ready is not None:
            self._ready.set()
            self._ready = None
        return True

    def take(self, max_bytes: int) -> list[str]:
        """What is queued now, oldest first, up to about ``max_bytes`` (at least one message unless
        the queue is empty). Never waits."""
        messages: list[str] = []
        queue = self._queue
        if queue is None:
            return messages
        size = 0
        while queue and (not messages or size < max_bytes):
            message = queue.popleft()
            size += len(message)
            messages.append(message)
        self.size -= size
        if not queue:
            self._queue = None
        return messages

    async def get_many(self, max_bytes: int) -> list[str]:
        """At least one message, plus whatever else is queued, up to about ``max_bytes``. A
        checkpoint even when messages are queued, so a cancelled caller stops here."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._queue:
            ready = self._ready = trio.Event()
            await ready.wait()
        return self.take(max_bytes)


class Connection:
    __slots__ = (
        "ws", "peer", "id", "outbox", "close_reason", "closed_by_peer", "overflowed", "_final", "_deferred", "busy",
        "_scope", "_close_timeout", "_nursery", "_writer_active", "_writer_scope", "_writer_stopped", "_writer_done",
        "on_close",
    )

    def __init__(
        self,
        ws: WebSocket,
        peer: str,
        *,
        send_queue_messages: int,
        send_queue_bytes: int,
        close_timeout: float,
        nursery: trio.Nursery | None = None,
    ) -> None:
        """With ``nursery`` (the connection's), the writer is started there on demand: a writer task runs
        only while the outbox has messages, so an idle connection runs none. Without it, the caller runs
        :meth:`run_writer` for the whole connection."""
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
        self._nursery = nursery
        self._writer_active = False  # a writer task is started (or scheduled to start)
        self._writer_scope: trio.CancelScope | None = None  # the running writer's
        self._writer_stopped = False
        self._writer_done: trio.Event | None = None  # made by _stop_writer, set when the writer has returned
        self._scope: trio.CancelScope | None = None
        self._close_timeout = close_timeout
        self.on_close: Callable[[], None] | None = None  # called as the connection starts closing (any task)

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
        on_demand = self._nursery is not None and not self._writer_stopped
        if on_demand and not self._writer_active and not self.outbox and self.ws.write_now(message):
            # nothing queued or being written: the socket took it at once, no writer task needed (unless the
            # socket took only part of the frame: the writer sends the rest)
            if self.ws.has_unsent:
                self._start_writer()
            return
        if not self.outbox.put(message):
            self.overflowed = True
            self.close(TRY_AGAIN)
        elif on_demand and not self._writer_active:
            self._start_writer()

    def _start_writer(self) -> None:
        assert self._nursery is not None
        self._writer_active = True
        self._nursery.start_soon(self.run_writer)

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
        self._cancel()

    @property
    def close_deferred(self) -> bool:
        """A close waits for the message being processed (``after_current``): nothing read now is taken."""
        return self._deferred

    def close_if_deferred(self) -> None:
        if self._deferred:
            self._deferred = False
            self._cancel()

    def peer_closed(self) -> None:
        self.closed_by_peer = True
        self._cancel()

    def _cancel(self) -> None:
        if self.on_close is not None:
            self.on_close()
        if self._scope is not None:
            self._scope.cancel()

    async def run_writer(self) -> None:
        """The one task that writes to the socket. It runs outside the connection's message loop and
        is never cancelled mid-frame (a frame cut in half would corrupt the stream): :meth:`finish`
        stops it between frames and waits until it has returned, or aborts the TCP connection if a
        frame cannot get out in time. Started on demand (with a nursery), it returns once the outbox
        is empty; the next message starts it again."""
        self._writer_active = True
        try:
            with trio.CancelScope() as scope:
                self._writer_scope = scope
                on_demand = self._nursery is not None
                try:
                    while not self._writer_stopped and (self.outbox or not on_demand or self.ws.has_unsent):
                        if self.outbox or not on_demand:
                            messages = await self.outbox.get_many(WRITE_BATCH_BYTES)
                        else:  # started for the rest of a frame that write_now began: it goes out alone
                            messages = []
                        with trio.CancelScope(shield=True):
                            await self.ws.send_many(messages)
                except ConnectionClosed:
                    self.peer_closed()
        finally:
            self._writer_active = False
            self._writer_scope = None
            if self._writer_done is not None:
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
        if not self._writer_active:  # none, or not started yet: it returns as soon as it starts
            return
        if self._writer_scope is not None:  # else scheduled on demand: it returns as soon as it starts
            self._writer_scope.cancel()
        done = self._writer_done = trio.Event()
        await done.wait()
