"""The WebSocket listener: accept loop, upgrade on ``/ws`` only, one nursery per connection."""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import trio
import wsproto
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest
from trio_websocket._impl import CloseReason  # noqa: PLC2701  (pinned trio-websocket 0.12)
from wsproto import ConnectionType, WSConnection
from wsproto.events import BytesMessage, CloseConnection, TextMessage

from ..errors import HANDSHAKE_TIMEOUT, INTERNAL_ERROR, MESSAGE_TOO_BIG, TRY_AGAIN, ProtocolClose, StoreUnavailable
from ..protocol.envelope import parse_frame
from .connection import Connection
from .context import Gateway
from .handshake import perform_handshake
from .session import Session

log = logging.getLogger("pocketbridge.gateway")

RECEIVE_BUFFER = 4096


class _Socket(WebSocketConnection):
    """trio-websocket's connection, with the spec's 1009 reason and the size counted in bytes."""

    async def _handle_message_event(self, event: BytesMessage | TextMessage) -> None:  # type: ignore[override]
        data = event.data
        size = len(data) if isinstance(data, bytes) or data.isascii() else len(data.encode("utf-8", "surrogatepass"))
        if self._message_size + size > self._max_message_size:
            self._message_size = 0
            self._message_parts = []
            self._close_reason = CloseReason(MESSAGE_TOO_BIG.code, MESSAGE_TOO_BIG.reason)
            await self._send(CloseConnection(code=MESSAGE_TOO_BIG.code, reason=MESSAGE_TOO_BIG.reason))
            await self._recv_channel.aclose()
            self._reader_running = False
            return
        # the parent adds len(data) itself; pre-charge the difference between bytes and characters
        self._message_size += size - len(data)
        await super()._handle_message_event(event)


def _peer(stream: trio.SocketStream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except (OSError, IndexError):
        return "unknown"


async def handle_stream(gw: Gateway, stream: trio.SocketStream) -> None:
    """One TCP connection; nothing a client does can make this raise into the accept loop."""
    try:
        await _handle_stream(gw, stream)
    except Exception:
        log.exception("connection handler failed")
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


async def _handle_stream(gw: Gateway, stream: trio.SocketStream) -> None:
    """HTTP upgrade on /ws, then the WebSocket session, all in one nursery."""
    cfg = gw.config.ws
    peer = _peer(stream)
    async with trio.open_nursery() as nursery:
        ws = _Socket(
            stream,
            WSConnection(ConnectionType.SERVER),
            message_queue_size=1,
            max_message_size=cfg.max_message_bytes,
            receive_buffer_size=RECEIVE_BUFFER,
        )
        nursery.start_soon(ws._reader_task)
        request: WebSocketRequest | None = None
        with trio.move_on_after(cfg.handshake_timeout):
            request = await ws._get_request()
        if request is None:
            nursery.cancel_scope.cancel()
            return
        try:
            if request.path.split("?", 1)[0] != "/ws":
                await request.reject(404)
                return
            await request.accept()
            await serve_websocket(gw, ws, peer)
        except ConnectionClosed:
            pass
        finally:
            nursery.cancel_scope.cancel()


async def serve_websocket(gw: Gateway, ws: WebSocketConnection, peer: str) -> None:
    cfg = gw.config.ws
    conn = Connection(
        ws, peer,
        send_queue_messages=cfg.send_queue_messages,
        send_queue_bytes=cfg.send_queue_bytes,
        close_timeout=cfg.close_timeout,
    )
    gw.metrics.connections_open.inc()
    session: Session | None = None
    try:
        async with trio.open_nursery() as nursery:
            conn.bind(nursery.cancel_scope)
            nursery.start_soon(conn.run_writer)
            try:
                with trio.move_on_after(cfg.handshake_timeout) as handshake_scope:
                    device, wire_device_id = await perform_handshake(gw, conn)
                if handshake_scope.cancelled_caught:
                    raise ProtocolClose(HANDSHAKE_TIMEOUT)
                session = Session(gw, conn, device, wire_device_id)
                await session.establish()
                gw.metrics.handshakes.labels("ok").inc()
                log.info("session %s established for device %s", conn.short_id, session.short)
                nursery.start_soon(conn.run_heartbeat, cfg.ping_interval, cfg.pong_timeout)
                nursery.start_soon(session.run_gap_filler)
                nursery.start_soon(session.run_expiry)
                while True:
                    await session.handle(parse_frame(await ws.get_message()))
            except ProtocolClose as exc:
                if session is None:
                    gw.metrics.handshakes.labels("refused").inc()
                conn.close(exc.close)
            except StoreUnavailable:
                conn.close(TRY_AGAIN)
            except ConnectionClosed:
                conn.peer_closed()
            except Exception:
                log.exception("connection %s failed", conn.short_id)
                conn.close(INTERNAL_ERROR)
    finally:
        with trio.CancelScope(shield=True):
            gw.metrics.connections_open.dec()
            if conn.close_reason is not None:
                gw.metrics.closes.labels(str(conn.close_reason.code)).inc()
                if conn.overflowed:
                    gw.metrics.send_overflow.inc()
            if session is not None:
                with trio.move_on_after(gw.config.storage.op_timeout):
                    await session.teardown()
            await conn.finish()


async def serve_gateway(gw: Gateway, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on ``[listen] ws``; ``task_status.started(port)`` once bound."""
    host, port = gw.config.ws_address()
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(trio.serve_listeners, partial(handle_stream, gw), listeners, handler_nursery=nursery))
        task_status.started(bound)
        await trio.sleep_forever()
