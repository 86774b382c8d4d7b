"""The WebSocket listener: accept loop, upgrade on ``/ws`` only, one nursery per connection."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import trio

from ..audit import audit
from ..errors import (
    DEVICE_KEY_MISMATCH,
    DEVICE_LIMIT,
    DEVICE_REVOKED,
    HANDSHAKE_TIMEOUT,
    INTERNAL_ERROR,
    INVALID_SIGNATURE,
    TOO_MANY_CONNECTIONS,
    TOO_MANY_HANDSHAKES,
    TRY_AGAIN,
    ProtocolClose,
    StoreUnavailable,
)
from ..limits import is_trusted_proxy, peer_address
from ..logs import request_id_var
from ..protocol.envelope import parse_frame
from ..tracing import span
from .admission import AcceptGate, raise_fd_limit, ws_fd_budget
from .connection import Connection
from .context import Gateway
from .handshake import perform_handshake
from .session import Session
from .wsconn import FRAME_ERRORS, ConnectionClosed, WebSocket

log = logging.getLogger("pocketbridge.gateway")

RECEIVE_BUFFER = 4096
REFUSED_AT_ACCEPT = (
    b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 60\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
)
TICK = 1.0  # seconds between session timer checks
# The bounded label set of pocketbridge_handshakes_total (besides "ok" and "invalid").
HANDSHAKE_OUTCOMES = {
    DEVICE_KEY_MISMATCH: "key_mismatch",
    DEVICE_REVOKED: "revoked",
    DEVICE_LIMIT: "limit",
    TRY_AGAIN: "unavailable",
    INVALID_SIGNATURE: "bad_signature",
    HANDSHAKE_TIMEOUT: "timeout",
    TOO_MANY_HANDSHAKES: "rate_limited",
}


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
    """Admission from ``accept`` (per address, pending cap, descriptors), the HTTP upgrade on /ws with
    its own short timeout, then the WebSocket session, in one nursery. From accept to the end of the
    handshake a connection has ``[ws] handshake_timeout`` in all."""
    cfg = gw.config.ws
    deadline = trio.current_time() + cfg.handshake_timeout
    limits = gw.limits
    socket_peer = _peer(stream)
    gate = gw.gate
    gate.max_pending = cfg.max_pending_connections
    with trio.CancelScope() as whole:
        token = object()
        refused = gate.admit(token, whole.cancel)
        if refused is not None:
            gw.metrics.rate_limited.labels(refused).inc()
            await _refuse_at_accept(stream)
            return
        counted: str | None = None
        try:
            if not is_trusted_proxy(socket_peer, limits.trusted_proxies):
                # counted from accept: silent sockets count too (behind a trusted proxy, by the forwarded address)
                key = peer_address(socket_peer, (), (), gw.config.limits.ipv6_prefix)
                if limits.connections_per_ip.get(key) >= gw.config.limits.ws_connections_per_ip:
                    gw.metrics.rate_limited.labels("ws_connections_per_ip").inc()
                    audit(gw, "rate_limited", peer=key, detail="ws_connections_per_ip")
                    await _refuse_at_accept(stream)
                    return
                limits.connections_per_ip.add(key)
                counted = key
            await _upgrade_and_serve(gw, stream, token, deadline, counted is None)
        finally:
            if counted is not None:
                limits.connections_per_ip.remove(counted)
            gate.release(token)
    if whole.cancelled_caught:
        gw.metrics.rate_limited.labels("max_pending_connections").inc()


async def _refuse_at_accept(stream: trio.SocketStream) -> None:
    """Answer 429 without reading anything and close: the connection costs nothing more."""
    with trio.move_on_after(1):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(REFUSED_AT_ACCEPT)


async def _upgrade_and_serve(
    gw: Gateway, stream: trio.SocketStream, token: object, deadline: float, count_forwarded: bool
) -> None:
    cfg = gw.config.ws
    limits = gw.limits
    ws = WebSocket(
        stream,
        max_message_bytes=cfg.max_message_bytes,
        handshake_message_bytes=cfg.max_handshake_message_bytes,
        max_fragments=cfg.max_fragments_per_message,
        receive_size=RECEIVE_BUFFER,
    )
    request = None
    with trio.move_on_at(min(deadline, trio.current_time() + cfg.upgrade_timeout)):
        request = await ws.receive_request()
    if request is None:
        return
    if request.target.split("?", 1)[0] != "/ws":
        with trio.move_on_after(cfg.close_timeout):
            await ws.reject(404)
        return
    forwarded = [v.decode("latin-1") for k, v in request.extra_headers if k.lower() == b"x-forwarded-for"]
    del request  # the headers are not kept for the life of the connection
    peer = peer_address(_peer(stream), forwarded, limits.trusted_proxies, gw.config.limits.ipv6_prefix)
    del forwarded
    async with trio.open_nursery() as nursery:
        try:
            await ws.accept()
            nursery.start_soon(ws.run_reader)
            over = count_forwarded and limits.connections_per_ip.get(peer) >= gw.config.limits.ws_connections_per_ip
            if over or not limits.connects_per_ip.take(peer):
                limit = "ws_connections_per_ip" if over else "ws_connects_per_ip"
                gw.metrics.rate_limited.labels(limit).inc()
                audit(gw, "rate_limited", peer=peer, detail=limit)
                with trio.move_on_after(cfg.close_timeout):
                    await ws.aclose(TOO_MANY_CONNECTIONS.code, TOO_MANY_CONNECTIONS.reason)
                return
            if count_forwarded:
                limits.connections_per_ip.add(peer)
            try:
                await serve_websocket(gw, ws, peer, nursery, deadline=deadline,
                                      on_established=lambda: gw.gate.established(token))
            finally:
                if count_forwarded:
                    limits.connections_per_ip.remove(peer)
        except ConnectionClosed:
            pass
        finally:
            nursery.cancel_scope.cancel()


async def serve_websocket(
    gw: Gateway, ws: WebSocket, peer: str, outer: trio.Nursery, *, deadline: float | None = None,
    on_established: Callable[[], None] = lambda: None,
) -> None:
    """The WebSocket session of one connection: the message loop runs here, inside the connection's
    cancel scope; its writer (started whenever there is something to send) and any gap filler run in
    ``outer``, the connection's nursery."""
    cfg = gw.config.ws
    conn = Connection(
        ws, peer,
        send_queue_messages=cfg.send_queue_messages,
        send_queue_bytes=cfg.send_queue_bytes,
        close_timeout=cfg.close_timeout,
        nursery=outer,
    )
    request_id_var.set(f"ws:{conn.short_id}")
    gw.metrics.connections_open.inc()
    gw.connections.add(conn)
    session: Session | None = None
    try:
        with trio.CancelScope() as scope:
            conn.bind(scope)
            try:
                if deadline is None:
                    deadline = trio.current_time() + cfg.handshake_timeout
                with span("ws.handshake"), trio.move_on_at(deadline) as handshake_scope:
                    device, wire_device_id = await perform_handshake(gw, conn)
                    ws.handshake_done()  # the device proved its key: [ws] max_message_bytes from now on
                    on_established()  # no longer pending: never shed
                    session = Session(gw, conn, device, wire_device_id, outer)
                    await session.establish()
                if handshake_scope.cancelled_caught or session is None:
                    raise ProtocolClose(HANDSHAKE_TIMEOUT)
                gw.metrics.handshakes.labels("ok").inc()
                log.info("connection %s: session established for device %s", conn.short_id, session.short)
                while True:
                    message = parse_frame(await ws.get_message())
                    if conn.close_deferred:
                        # a drain asked to close while earlier events await their commit: what the client
                        # sent since is not taken; their acks go out, then the connection closes
                        await session.settled()
                        conn.busy = False
                        conn.close_if_deferred()
                        continue
                    conn.busy = True
                    await session.handle(message)
                    if not session.awaiting_commits:  # else the last ack's commit ends the drain (Session)
                        conn.busy = False
                        conn.close_if_deferred()
            except ProtocolClose as exc:
                if session is None:
                    gw.metrics.handshakes.labels(HANDSHAKE_OUTCOMES.get(exc.close, "invalid")).inc()
                    audit(gw, "handshake_refused", actor=exc.subject, peer=peer, detail=exc.close.reason)
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
            gw.connections.discard(conn)
            gw.metrics.connections_open.dec()
            frame_close = ws.closed.code if ws.closed is not None and ws.closed.code in FRAME_ERRORS else None
            if conn.close_reason is not None or frame_close is not None:
                gw.metrics.closes.labels(str(conn.close_reason.code if conn.close_reason else frame_close)).inc()
                if conn.overflowed:
                    gw.metrics.send_overflow.inc()
            if session is not None:
                with trio.move_on_after(gw.config.storage.op_timeout):
                    await session.teardown()
            await conn.finish()


async def run_session_clock(gw: Gateway) -> None:
    """One task ticks every session's timers (instead of a timer task per connection)."""
    while True:
        ws = gw.config.ws  # fine enough for sub-second intervals (tests), at most once a second
        await trio.sleep(min(TICK, ws.ping_interval / 2, ws.pong_timeout / 4))
        now = trio.current_time()
        for member in gw.hub.members():
            member.tick(now)


async def serve_gateway(gw: Gateway, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on ``[listen] ws``; ``task_status.started(port)`` once bound. ``gw.stop_accepting()``
    closes the listener (trio's accept loop backs off on EMFILE rather than dying); this returns
    once every connection has finished."""
    host, port = gw.config.ws_address()
    soft, hard = raise_fd_limit()
    gw.gate = AcceptGate(gw.config.ws.max_pending_connections, ws_fd_budget(soft))
    log.info("open-file limit %d (hard %d): at most %d WebSocket connections, %d before their handshake",
             soft, hard, gw.gate.max_open, gw.gate.max_pending)
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as connections, trio.open_nursery() as acceptor:
        gw.stop_accepting = acceptor.cancel_scope.cancel
        await acceptor.start(
            partial(trio.serve_listeners, partial(handle_stream, gw), listeners, handler_nursery=connections)
        )
        task_status.started(bound)
