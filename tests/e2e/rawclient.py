"""Raw-socket helpers for the end-to-end tests (not a test module).

* :class:`RawHandshake` does ``client_hello``/``client_auth`` by hand over any socket that has
  ``send_message``/``get_message`` (trio-websocket's connection, or :class:`WireSocket`), so a test can
  corrupt any field of any step.
* :func:`recv_json`, :func:`expect_close` and :func:`assert_close` read with a timeout and turn a
  server close into ``(code, reason)``.
* :class:`WireSocket` is a minimal WebSocket client on wsproto that can also write hand-made frame bytes
  (e.g. a text frame carrying invalid UTF-8, which trio-websocket cannot send) and that reports the HTTP
  status of a refused upgrade.
* :func:`assert_relay_works` checks that the daemon still handshakes and relays for a fresh user.
* :func:`assert_no_tracebacks` checks captured log records: client mistakes never log a traceback.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import secrets
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Protocol

import trio
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    WebSocketConnection,
    open_websocket_url,
)
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from pocketbridge.client import DeviceKey, connect, new_device_id, new_event_id
from pocketbridge.config import Config
from pocketbridge.protocol.handshake import digest_c, digest_s

TIMEOUT = 5.0  # every single wait in these tests is bounded by this (or less)
DROP = object()  # field override meaning "leave the field out"
_UNSET = object()

# Limits that the per-address rate limits (§9) would otherwise hit: many tests open many connections
# from 127.0.0.1 within a minute.
GENEROUS_LIMITS = {
    "ws_connections_per_ip": 10_000,
    "ws_connects_per_ip_per_minute": 100_000,
    "handshakes_per_ip_per_minute": 100_000,
}


def e2e_config(factory: Callable[..., Config], **sections: dict[str, Any]) -> Config:
    """``config_factory`` with generous per-address limits and a faster (still durable) SQLite mode."""
    merged: dict[str, dict[str, Any]] = {"limits": dict(GENEROUS_LIMITS), "storage": {"sqlite_synchronous": "normal"}}
    for section, values in sections.items():
        merged[section] = {**merged.get(section, {}), **values}
    return factory(**merged)


async def each_case(cases: Mapping[str, Any], check: Callable[[str, Any], Awaitable[None]]) -> None:
    """Run ``check(name, value)`` for every case, one after the other; fail listing every failed case."""
    failures = []
    for name, value in cases.items():
        try:
            await check(name, value)
        except Exception as exc:  # noqa: BLE001 - reported below, with the case name
            failures.append(f"{name}: {_describe(exc)}")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return _describe(exc.exceptions[0])
    return f"{type(exc).__name__}: {exc}"


class Socket(Protocol):
    async def send_message(self, message: str | bytes) -> None: ...

    async def get_message(self) -> str | bytes: ...


# --- JSON and sockets ----------------------------------------------------------------------------------
def dumps(obj: Any) -> str:
    """Compact JSON; ASCII-escaped, so lone surrogates can be sent as ``\\udxxx`` escapes."""
    return json.dumps(obj, separators=(",", ":"))


@asynccontextmanager
async def open_ws(url: str, *, max_message_size: int = 64 * 1024 * 1024) -> AsyncIterator[WebSocketConnection]:
    """A trio-websocket client connection with bounded connect/disconnect waits."""
    async with open_websocket_url(
        url, max_message_size=max_message_size, connect_timeout=TIMEOUT, disconnect_timeout=TIMEOUT
    ) as ws:
        yield ws


async def send(ws: Socket, message: Any, *, binary: bool = False) -> None:
    """Send a dict (as JSON) or a str/bytes frame as is; ``binary`` sends the JSON text as a binary frame."""
    data = message if isinstance(message, (str, bytes)) else dumps(message)
    if binary and isinstance(data, str):
        data = data.encode("utf-8")
    with trio.fail_after(TIMEOUT):
        await ws.send_message(data)


async def recv_json(ws: Socket, timeout: float = TIMEOUT) -> dict[str, Any]:
    """The next message, decoded; a close instead is an assertion failure naming the close."""
    with trio.fail_after(timeout):
        try:
            data = await ws.get_message()
        except ConnectionClosed as exc:
            reason = exc.reason
            raise AssertionError(
                f"expected a message, connection closed: {reason.code if reason else None} "
                f"{reason.reason if reason else None!r}"
            ) from None
    msg = json.loads(data)
    assert isinstance(msg, dict), msg
    return msg


async def expect_close(ws: Socket, timeout: float = TIMEOUT) -> tuple[int | None, str | None]:
    """Wait for the server's close and return ``(code, reason)``; any message first is a failure."""
    with trio.fail_after(timeout):
        try:
            data = await ws.get_message()
        except ConnectionClosed as exc:
            reason = exc.reason
            return (reason.code, reason.reason) if reason else (None, None)
    raise AssertionError(f"expected the connection to close, got a message: {data!r:.300}")


async def assert_close(ws: Socket, code: int, reason: str | None, timeout: float = TIMEOUT) -> None:
    assert await expect_close(ws, timeout) == (code, reason)


async def assert_pong(ws: Socket, *, binary: bool = False) -> None:
    """An app ping gets a pong as the very next message (nothing else in between)."""
    await send(ws, {"type": "ping", "payload": {"timestamp": 1}}, binary=binary)
    msg = await recv_json(ws)
    assert msg["type"] == "pong", msg
    assert isinstance(msg["payload"]["timestamp"], int)


# --- hand-made handshake -------------------------------------------------------------------------------
def new_ephemeral_pub() -> str:
    """A fresh P-256 public key as uncompressed SEC1 hex (130 lowercase hex digits)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint).hex()


def _apply(fields: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(fields)
    for name, value in overrides.items():
        if value is DROP:
            out.pop(name, None)
        else:
            out[name] = value
    return out


def handshake_message(kind: str, body: dict[str, Any], *, flat: bool) -> dict[str, Any]:
    """The wrapped (``payload.type`` repeats ``type``) or flat form of §3.2."""
    if flat:
        return {"type": kind, **body}
    return {"type": kind, "payload": {"type": kind, **body}}


class RawHandshake:
    """One handshake done by hand; every field of every step can be replaced or dropped.

    ``hs = RawHandshake(ws, key, device_id)``; ``await hs.hello()``; ``await hs.read_server_hello()``;
    ``await hs.auth()``; ``await hs.read_established()`` — or ``await hs.run()`` for all four.
    """

    def __init__(
        self,
        ws: Socket,
        key: DeviceKey,
        device_id: str | None = None,
        *,
        nonce_c: str | None = None,
        client_ephemeral_pub: str | None = None,
    ) -> None:
        self.ws = ws
        self.key = key
        self.device_id = device_id or new_device_id()
        self.nonce_c = nonce_c if nonce_c is not None else secrets.token_hex(32)
        self.client_ephemeral_pub = client_ephemeral_pub or new_ephemeral_pub()
        self.server: dict[str, Any] = {}

    def hello_message(self, *, flat: bool = False, **overrides: Any) -> dict[str, Any]:
        body = {"client_ephemeral_pub": self.client_ephemeral_pub, "nonce_c": self.nonce_c}
        return handshake_message("client_hello", _apply(body, overrides), flat=flat)

    async def hello(self, *, flat: bool = False, binary: bool = False, **overrides: Any) -> None:
        await send(self.ws, self.hello_message(flat=flat, **overrides), binary=binary)

    async def read_server_hello(self) -> dict[str, Any]:
        """Read ``server_hello`` and check it against §3.4 (signature over the nonce_c as sent)."""
        msg = await recv_json(self.ws)
        assert msg["type"] == "server_hello", msg
        p = msg["payload"]
        assert p["type"] == "server_hello"
        for name, length in (("server_ephemeral_pub", 130), ("server_identity_pub", 64), ("server_signature", 128),
                             ("nonce_s", 64)):
            assert len(p[name]) == length and p[name] == p[name].lower(), (name, p[name])
        digest = digest_s(p["server_identity_pub"], p["server_ephemeral_pub"], self.nonce_c, p["nonce_s"])
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(p["server_identity_pub"])).verify(
            bytes.fromhex(p["server_signature"]), digest
        )
        self.server = p
        return p

    def auth_message(
        self,
        *,
        flat: bool = False,
        user_id: Any = _UNSET,
        device_id: Any = _UNSET,
        sign_user_id: str | None = None,
        sign_device_id: str | None = None,
        sign_nonce_c: str | None = None,
        signer: DeviceKey | None = None,
        **overrides: Any,
    ) -> dict[str, Any]:
        """``client_auth``, signed over the values sent unless a ``sign_*`` value says otherwise.

        ``user_id``/``device_id`` default to the key and the handshake's device; any value (``None``,
        a number, ``DROP`` …) replaces them.
        """
        body = _apply(
            {"user_id": self.key.public_hex, "device_id": self.device_id},
            {k: v for k, v in (("user_id", user_id), ("device_id", device_id)) if v is not _UNSET},
        )
        parts = [
            sign_user_id if sign_user_id is not None else body.get("user_id"),
            sign_device_id if sign_device_id is not None else body.get("device_id"),
            sign_nonce_c if sign_nonce_c is not None else self.nonce_c,
            self.server["nonce_s"],
            self.server["server_ephemeral_pub"],
        ]
        texts = [p if isinstance(p, str) else "" for p in parts]
        if all(t.isascii() for t in texts):
            digest = digest_c(*texts)
        else:  # digest_c takes ASCII only; the server refuses such values before it hashes them anyway
            digest = hashlib.sha256("".join(texts).encode("utf-8", "surrogatepass")).digest()
        fields = {
            **body,
            "client_signature": (signer or self.key).sign(digest).hex(),
            "nonce_c2": secrets.token_hex(32),
        }
        return handshake_message("client_auth", _apply(fields, overrides), flat=flat)

    async def auth(self, *, binary: bool = False, **kw: Any) -> None:
        await send(self.ws, self.auth_message(**kw), binary=binary)

    async def read_established(self) -> dict[str, Any]:
        msg = await recv_json(self.ws)
        assert msg["type"] == "session_established", msg
        p = msg["payload"]
        assert p["type"] == "session_established"
        return p

    async def run(self, *, flat: bool = False, binary: bool = False, **auth_kw: Any) -> dict[str, Any]:
        """The whole handshake; returns the ``session_established`` payload."""
        await self.hello(flat=flat, binary=binary)
        await self.read_server_hello()
        await self.auth(flat=flat, binary=binary, **auth_kw)
        return await self.read_established()


@asynccontextmanager
async def established(url: str, key: DeviceKey | None = None, device_id: str | None = None,
                      **auth_kw: Any) -> AsyncIterator[tuple[WebSocketConnection, RawHandshake]]:
    """A raw trio-websocket connection after a successful hand-made handshake."""
    async with open_ws(url) as ws:
        hs = RawHandshake(ws, key or DeviceKey.generate(), device_id)
        await hs.run(**auth_kw)
        yield ws, hs


# --- events ----------------------------------------------------------------------------------------------
def event_body(user_id: str | None, device_id: str, device_seq: Any, /, **overrides: Any) -> dict[str, Any]:
    """A valid ``event`` payload (§5.1), with fields replaced or dropped (``DROP``)."""
    body: dict[str, Any] = {
        "event_id": new_event_id(),
        "user_id": user_id,
        "device_id": device_id,
        "device_seq": device_seq,
        "stream_id": "clipboard:main",
        "type": "clipboard:text",
        "encrypted_payload": base64.b64encode(b"ciphertext").decode(),
    }
    if user_id is None:
        del body["user_id"]
    return _apply(body, overrides)


async def send_valid_event(ws: Socket, hs: RawHandshake, device_seq: int) -> None:
    """Send a valid event and check that the very next message is its ``stored`` ack."""
    body = event_body(hs.key.public_hex, hs.device_id, device_seq)
    await send(ws, {"type": "event", "payload": body})
    msg = await recv_json(ws)
    assert msg == {
        "type": "ack",
        "payload": {"device_seq": device_seq, "event_id": body["event_id"], "status": "stored"},
    }, msg


# --- a minimal wsproto client ------------------------------------------------------------------------------
class UpgradeRejected(Exception):
    def __init__(self, status_code: int) -> None:
        super().__init__(status_code)
        self.status_code = status_code


def build_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """One masked client frame (RFC 6455 §5.2), byte by byte."""
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class WireSocket:
    """A WebSocket client that can write arbitrary frames; ``get_message`` raises trio-websocket's
    ``ConnectionClosed`` (1006 when the TCP connection ends without a close frame)."""

    def __init__(self, stream: trio.SocketStream, ws: WSConnection) -> None:
        self.stream = stream
        self.ws = ws
        self._parts: list[Any] = []

    @classmethod
    @asynccontextmanager
    async def open(cls, url: str, *, path: str | None = None) -> AsyncIterator[WireSocket]:
        parsed = urllib.parse.urlsplit(url)
        host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
        target = path if path is not None else (parsed.path or "/")
        with trio.fail_after(TIMEOUT):
            stream = await trio.open_tcp_stream(host, port)
        try:
            ws = WSConnection(ConnectionType.CLIENT)
            sock = cls(stream, ws)
            with trio.fail_after(TIMEOUT):
                await stream.send_all(ws.send(Request(host=f"{host}:{port}", target=target)))
                await sock._await_upgrade()
            yield sock
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _await_upgrade(self) -> None:
        status: int | None = None
        while True:
            data = await self.stream.receive_some(65536)
            if not data:
                raise UpgradeRejected(status or 0)
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, AcceptConnection):
                    return
                if isinstance(event, RejectConnection):
                    status = event.status_code
                    if not event.has_body:
                        raise UpgradeRejected(status)
                elif isinstance(event, RejectData) and event.body_finished:
                    raise UpgradeRejected(status or 0)

    async def send_raw(self, data: bytes) -> None:
        with trio.fail_after(TIMEOUT):
            await self.stream.send_all(data)

    async def send_frame(self, opcode: int, payload: bytes, *, fin: bool = True) -> None:
        await self.send_raw(build_frame(opcode, payload, fin=fin))

    async def send_message(self, message: str | bytes) -> None:
        event = TextMessage(data=message) if isinstance(message, str) else BytesMessage(data=message)
        await self.send_raw(self.ws.send(event))

    async def get_message(self) -> str | bytes:
        while True:
            for event in self.ws.events():
                if isinstance(event, (TextMessage, BytesMessage)):
                    self._parts.append(event.data)
                    if event.message_finished:
                        parts, self._parts = self._parts, []
                        return "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)
                elif isinstance(event, Ping):
                    await self.send_raw(self.ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    if self.ws.state is ConnectionState.REMOTE_CLOSING:
                        try:
                            await self.send_raw(self.ws.send(event.response()))
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            pass
                    raise ConnectionClosed(CloseReason(event.code, event.reason or None))
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                raise ConnectionClosed(CloseReason(1006, None))
            self.ws.receive_data(data)


# --- daemon health and logs --------------------------------------------------------------------------------
async def assert_relay_works(url: str) -> None:
    """A fresh user's two devices still handshake, and an event from one reaches the other."""
    key = DeviceKey.generate()
    with trio.fail_after(TIMEOUT):
        async with (
            connect(url, key, new_device_id(), handshake_timeout=TIMEOUT) as receiver,
            connect(url, key, new_device_id(), handshake_timeout=TIMEOUT) as sender,
        ):
            ack = await sender.send_event("health:check", "health:ping", b"still alive")
            assert ack.status == "stored", ack
            event = await receiver.receive_event()
            assert event.payload == b"still alive"
            assert event.device_id == sender.device_id


def assert_no_tracebacks(records: Iterable[logging.LogRecord]) -> None:
    """Client mistakes never log at ERROR or with a traceback."""
    bad = [r for r in records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, "\n".join(f"{r.levelname} {r.name}: {r.getMessage()} exc_info={bool(r.exc_info)}" for r in bad)
