"""A lean WebSocket client for the load generator (the relay and replay scenarios).

The benchmark's load generator runs on the same cores as the daemon. With the SDK client (trio-websocket, a
reader task and two memory channels per connection, a nursery per awaited ack), each generator process
spent about as much CPU per event as the daemon itself, so at an open-loop 500/s the generators' share of
the two cores, not the daemon, set much of the latency tail. This client does the same protocol with less:

* one task per connection reads the socket (``wait_readable`` + a non-blocking ``recv``), parses the
  server's frames itself and hands each text message to a plain function; what the function returns (an ack)
  is sent at once, one frame per write, as a browser's ``send`` would;
* writes go straight to the non-blocking socket; only a write the socket cannot take whole waits
  (``wait_writable``), and whatever other tasks write meanwhile goes out behind it, in order;
* the upgrade is written and checked by hand (RFC 6455 §4: status 101 and ``Sec-WebSocket-Accept``), the
  protocol handshake is :class:`~pocketbridge.bench.wire.RawHandshake` (checked against protocol.md §3.4).

Client frames are masked with a fresh random key (RFC 6455 §5.3); server frames must not be masked. Pings
are answered, a close frame is answered and raised as :class:`~pocketbridge.client.Closed`. Every wait of
the upgrade, the handshake and a blocked write is bounded by ``timeout``; reading waits until the caller's
cancel scope ends it (a receiver waits for events as long as the phase lasts).
"""

from __future__ import annotations

import base64
import errno
import json
import os
import socket
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

import trio
from wsproto.utilities import generate_accept_token

from ..client import (
    REPLAY_REPLIES,
    ClientError,
    Closed,
    DeviceKey,
    ReceivedEvent,
    ReplayResult,
    follow_replay,
    replay_request,
)
from ..gateway.frames import payload_length
from ..protocol.envelope import encode
from .wire import CLOSE, CONTINUATION, PING, PONG, TEXT, TIMEOUT, RawHandshake, UpgradeRejected, build_frame

RECEIVE_SIZE = 65536
MAX_MESSAGE = 32 * 1024 * 1024  # like the SDK client: larger is a protocol error here


def parse_frame(buf: bytes | bytearray, pos: int) -> tuple[int, bool, int, int] | None:
    """The server frame at ``buf[pos:]``: ``(opcode, fin, payload start, payload end)``, or None while it is
    incomplete. A masked frame or reserved bits raise :class:`ClientError` (RFC 6455 §5.1, §5.2)."""
    header = payload_length(buf, pos)
    if header is None:
        return None
    b0 = buf[pos]
    if b0 & 0x70 or buf[pos + 1] & 0x80:
        raise ClientError("protocol error: reserved bits or a masked frame from the server")
    length, head, _ = header
    if length > MAX_MESSAGE:
        raise ClientError("protocol error: frame too large")
    start = pos + head
    end = start + length
    if len(buf) < end:
        return None
    return b0 & 0x0F, bool(b0 & 0x80), start, end


class LeanSocket:
    """One client WebSocket connection over a non-blocking socket (see the module's description)."""

    __slots__ = ("_sock", "_buf", "_pos", "_parts", "_backlog", "timeout", "closed")

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self._sock = sock
        self._buf = bytearray()
        self._pos = 0  # what of _buf is parsed already
        self._parts: list[bytes] | None = None  # a fragmented text message so far
        self._backlog: bytearray | None = None  # bytes waiting behind a write the socket could not take whole
        self.timeout = timeout
        self.closed: Closed | None = None

    @classmethod
    @asynccontextmanager
    async def open(
        cls, url: str, *, timeout: float = TIMEOUT  # noqa: ASYNC109 (bounds the connect and the upgrade)
    ) -> AsyncIterator[LeanSocket]:
        parsed = urllib.parse.urlsplit(url)
        host, port, target = parsed.hostname or "127.0.0.1", parsed.port or 80, parsed.path or "/"
        with trio.fail_after(timeout):
            family, kind, proto, _, address = (await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            ws = cls(sock, timeout)
            with trio.fail_after(timeout):
                err = sock.connect_ex(address)
                if err not in (0, errno.EINPROGRESS):
                    raise OSError(err, os.strerror(err))
                await trio.lowlevel.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err))
                await ws._upgrade(f"{host}:{port}", target)
            yield ws
        finally:
            trio.lowlevel.notify_closing(sock)
            sock.close()

    async def _upgrade(self, host: str, target: str) -> None:
        key = base64.b64encode(os.urandom(16))
        await self.send_bytes(
            f"GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        while (end := self._buf.find(b"\r\n\r\n")) < 0:
            if len(self._buf) > 65536:
                raise ClientError("upgrade answer too long")
            await self._fill()
        head = self._buf[:end].decode("latin-1").split("\r\n")
        del self._buf[: end + 4]
        status = head[0].split(" ", 2)
        if len(status) < 2 or status[1] != "101":
            raise UpgradeRejected(int(status[1]) if len(status) > 1 and status[1].isdigit() else 0)
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}
        if headers.get("sec-websocket-accept") != generate_accept_token(key).decode():
            raise ClientError("upgrade answer with a wrong Sec-WebSocket-Accept")

    # --- reading ------------------------------------------------------------------------------------------
    async def _fill(self) -> None:
        """Wait for bytes and append them to the buffer (dropping what is parsed already)."""
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        while True:
            await trio.lowlevel.wait_readable(self._sock)
            try:
                data = self._sock.recv(RECEIVE_SIZE)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                self.closed = self.closed or Closed(1006, None)
                raise self.closed
            self._buf += data
            return

    async def get_message(self) -> str:
        """The next text message. Pings are answered; a close frame is answered and raised as Closed."""
        while True:
            frame = parse_frame(self._buf, self._pos)
            if frame is None:
                await self._fill()
                continue
            opcode, fin, start, end = frame
            payload = bytes(self._buf[start:end])
            self._pos = end
            if opcode == TEXT or (opcode == CONTINUATION and self._parts is not None):
                if opcode == TEXT and self._parts is not None:
                    raise ClientError("protocol error: a new message inside a fragmented one")
                if fin and self._parts is None:
                    return payload.decode("utf-8")
                if self._parts is None:
                    self._parts = []
                self._parts.append(payload)
                if fin:
                    parts, self._parts = self._parts, None
                    return b"".join(parts).decode("utf-8")
            elif opcode == PING:
                if self.closed is None:
                    await self._write(build_frame(PONG, payload))
            elif opcode == PONG:
                continue
            elif opcode == CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                already_closing = self.closed is not None
                self.closed = self.closed or Closed(code, payload[2:].decode("utf-8", "replace") or None)
                if not already_closing:
                    await self._send_close_quietly(code if len(payload) >= 2 else None)
                raise self.closed
            else:
                raise ClientError(f"protocol error: unexpected opcode {opcode}")

    async def send_message(self, message: str | bytes) -> None:
        """A text message (for :class:`RawHandshake`)."""
        await self.send_bytes(build_frame(TEXT, message.encode() if isinstance(message, str) else message))

    async def run(self, handler: Callable[[str], str | None]) -> None:
        """Hand every text message to ``handler`` and send what it returns, until the connection closes
        (raises Closed, or ClientError for a frame the protocol does not allow)."""
        while True:
            reply = handler(await self.get_message())
            if reply is not None:
                await self.send_bytes(build_frame(TEXT, reply.encode()))

    # --- writing ------------------------------------------------------------------------------------------
    async def send_bytes(self, data: bytes) -> None:
        """Write ``data`` after whatever is waiting; returns once the socket took it (or queued it behind a
        write that another task is waiting to finish). Raises Closed once the connection is closed or closing."""
        if self.closed is not None:
            raise self.closed
        await self._write(data)

    async def _write(self, data: bytes) -> None:
        if self._backlog is not None:
            self._backlog += data
            return
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.closed = self.closed or Closed(1006, None)
            raise self.closed from None
        if sent == len(data):
            return
        backlog = self._backlog = bytearray(data[sent:])
        try:
            with trio.fail_after(self.timeout):
                while backlog:
                    await trio.lowlevel.wait_writable(self._sock)
                    with suppress(BlockingIOError):
                        del backlog[: self._sock.send(backlog)]
        except OSError:
            self.closed = self.closed or Closed(1006, None)
            raise self.closed from None
        finally:
            self._backlog = None

    async def _send_close_quietly(self, code: int | None) -> None:
        frame = build_frame(CLOSE, code.to_bytes(2, "big") if code is not None else b"")
        with suppress(Closed, trio.TooSlowError):
            await self._write(frame)

    async def aclose(self, wait: float = 1.0) -> None:
        """Send a close frame (1000) and wait up to ``wait`` s for the server's answer or the end of TCP."""
        if self.closed is not None:
            return
        self.closed = Closed(1000, None)
        await self._send_close_quietly(1000)
        with trio.move_on_after(wait):
            try:
                while True:
                    await self._fill()
                    while (frame := parse_frame(self._buf, self._pos)) is not None:
                        self._pos = frame[3]
                        if frame[0] == CLOSE:
                            return
            except ClientError:  # the end of TCP (Closed) or a frame we do not care about any more
                return


class LeanClient:
    """A handshaken session: the socket, and what the relay and replay generators need of the session."""

    __slots__ = ("ws", "device_id", "user_id", "next_seq")

    def __init__(self, ws: LeanSocket, key: DeviceKey, device_id: str, established: dict[str, Any]) -> None:
        self.ws = ws
        self.device_id = device_id
        self.user_id = str(established.get("user_id") or key.public_hex)
        self.next_seq = int(established["last_ack_device_seq"]) + 1

    def take_seq(self) -> int:
        seq = self.next_seq
        self.next_seq += 1
        return seq

    async def request(self, message: dict[str, Any], replies: frozenset[str]) -> dict[str, Any]:
        """Send ``message`` and return the next message whose type is in ``replies`` (others are skipped:
        notices, live events); bounded by the socket's timeout. An ``error`` message raises ClientError."""
        await self.ws.send_message(encode(message))
        with trio.fail_after(self.ws.timeout):
            while True:
                reply = json.loads(await self.ws.get_message())
                kind = reply.get("type")
                if kind in replies:
                    return reply
                if kind == "error":
                    raise ClientError(f"error reply: {(reply.get('payload') or {}).get('code')}")

    async def ping(self) -> int:
        """A ping; returns once its pong is back (the server has handled everything sent before it)."""
        pong = await self.request({"type": "ping", "payload": {"timestamp": int(time.time() * 1000)}}, PONG_REPLY)
        return int(pong["payload"]["timestamp"])

    async def replay(self, *, limit: int, ack: bool = True) -> ReplayResult:
        """Replay everything missed (protocol.md §6) as the SDK's ``Client.replay`` does; each event is acked on
        its own frame by ``device_seq`` only, as web clients do."""

        async def page(token: str | None) -> dict[str, Any]:
            return await self.request(replay_request(self.next_seq - 1, limit=limit, token=token), REPLAY_REPLIES)

        async def ack_event(event: ReceivedEvent) -> None:
            await self.ws.send_message(ACK % event.device_seq)

        return await follow_replay(page, ack_event if ack else None)


ACK = '{"type":"ack","payload":{"device_seq":%d}}'
PONG_REPLY = frozenset({"pong"})


@asynccontextmanager
async def connect(
    url: str,
    key: DeviceKey,
    device_id: str,
    *,
    device_type: str | None = "web",
    timeout: float = TIMEOUT,  # noqa: ASYNC109 (bounds each step of the upgrade and handshake)
) -> AsyncIterator[LeanClient]:
    """Connect, upgrade and handshake (the server's signature checked); closes with 1000 on the way out."""
    async with LeanSocket.open(url, timeout=timeout) as ws:
        auth: dict[str, Any] = {} if device_type is None else {"device_type": device_type}
        established = await RawHandshake(ws, key, device_id, timeout=timeout).run(**auth)
        try:
            yield LeanClient(ws, key, device_id, established)
        finally:
            with trio.CancelScope(shield=True):
                await ws.aclose()
