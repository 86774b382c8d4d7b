"""Protocol by hand, for the benchmark and the tests: raw WebSocket frames and a hand-made handshake.

* :func:`build_frame` writes one masked client frame byte by byte (any opcode, FIN or not, any payload).
* :class:`WireSocket` is a minimal WebSocket client on wsproto that can also write such frames (e.g. a message in
  thousands of fragments, or a text frame carrying invalid UTF-8) and reports the HTTP status of a refused upgrade.
* :class:`RawHandshake` does ``client_hello``/``client_auth`` by hand over any socket with
  ``send_message``/``get_message`` (trio-websocket's connection, or :class:`WireSocket`); every field of every step
  can be replaced or dropped, and the server's answers are checked against the protocol (§3.4).
* :func:`send`, :func:`recv_json` and :func:`expect_close` send and read with a timeout and turn a server close
  into ``(code, reason)``. A check that fails raises AssertionError (these helpers serve the tests first).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any, Protocol

import trio
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from trio_websocket import CloseReason, ConnectionClosed
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

from ..client import DeviceKey, new_device_id
from ..gateway.frames import unmask
from ..protocol.handshake import digest_c, digest_s

TIMEOUT = 5.0  # the default bound on every single wait
DROP = object()  # field override meaning "leave the field out"
_UNSET = object()
TEXT, BINARY, CONTINUATION, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


class Socket(Protocol):
    async def send_message(self, message: str | bytes) -> None: ...

    async def get_message(self) -> str | bytes: ...


# --- JSON messages -------------------------------------------------------------------------------------------
def dumps(obj: Any) -> str:
    """Compact JSON; ASCII-escaped, so lone surrogates can be sent as ``\\udxxx`` escapes."""
    return json.dumps(obj, separators=(",", ":"))


async def send(
    ws: Socket, message: Any, *, binary: bool = False, timeout: float = TIMEOUT  # noqa: ASYNC109 (bounded by default)
) -> None:
    """Send a dict (as JSON) or a str/bytes frame as is; ``binary`` sends the JSON text as a binary frame."""
    data = message if isinstance(message, (str, bytes)) else dumps(message)
    if binary and isinstance(data, str):
        data = data.encode("utf-8")
    with trio.fail_after(timeout):
        await ws.send_message(data)


async def recv_json(ws: Socket, timeout: float = TIMEOUT) -> dict[str, Any]:  # noqa: ASYNC109 (bounded by default)
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


async def expect_close(
    ws: Socket, timeout: float = TIMEOUT  # noqa: ASYNC109 (bounded by default)
) -> tuple[int | None, str | None]:
    """Wait for the server's close and return ``(code, reason)``; any message first is a failure."""
    with trio.fail_after(timeout):
        try:
            data = await ws.get_message()
        except ConnectionClosed as exc:
            reason = exc.reason
            return (reason.code, reason.reason) if reason else (None, None)
    raise AssertionError(f"expected the connection to close, got a message: {data!r:.300}")


# --- hand-made handshake -----------------------------------------------------------------------------------------
def new_ephemeral_pub() -> str:
    """A fresh P-256 public key as uncompressed SEC1 hex (130 lowercase hex digits)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint).hex()


def apply_overrides(fields: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``fields`` with some replaced (any value) or left out (``DROP``)."""
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
        timeout: float = TIMEOUT,
    ) -> None:
        self.ws = ws
        self.key = key
        self.device_id = device_id or new_device_id()
        self.nonce_c = nonce_c if nonce_c is not None else secrets.token_hex(32)
        self.client_ephemeral_pub = client_ephemeral_pub or new_ephemeral_pub()
        self.timeout = timeout
        self.server: dict[str, Any] = {}  # the server_hello payload, once read
        self.established: dict[str, Any] = {}  # the whole session_established message, once read

    def hello_message(self, *, flat: bool = False, **overrides: Any) -> dict[str, Any]:
        body = {"client_ephemeral_pub": self.client_ephemeral_pub, "nonce_c": self.nonce_c}
        return handshake_message("client_hello", apply_overrides(body, overrides), flat=flat)

    async def hello(self, *, flat: bool = False, binary: bool = False, **overrides: Any) -> None:
        await send(self.ws, self.hello_message(flat=flat, **overrides), binary=binary, timeout=self.timeout)

    async def read_server_hello(self) -> dict[str, Any]:
        """Read ``server_hello`` and check it against §3.4 (signature over the nonce_c as sent)."""
        msg = await recv_json(self.ws, self.timeout)
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
        body = apply_overrides(
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
        return handshake_message("client_auth", apply_overrides(fields, overrides), flat=flat)

    async def auth(self, *, binary: bool = False, **kw: Any) -> None:
        await send(self.ws, self.auth_message(**kw), binary=binary, timeout=self.timeout)

    async def read_established_message(self) -> dict[str, Any]:
        """The whole ``session_established`` message (checked: its payload repeats the type)."""
        msg = await recv_json(self.ws, self.timeout)
        assert msg["type"] == "session_established", msg
        assert msg["payload"]["type"] == "session_established"
        self.established = msg
        return msg

    async def read_established(self) -> dict[str, Any]:
        """The ``session_established`` payload."""
        return (await self.read_established_message())["payload"]

    async def run(self, *, flat: bool = False, binary: bool = False, **auth_kw: Any) -> dict[str, Any]:
        """The whole handshake; returns the ``session_established`` payload."""
        await self.hello(flat=flat, binary=binary)
        await self.read_server_hello()
        await self.auth(flat=flat, binary=binary, **auth_kw)
        return await self.read_established()


# --- raw frames and a minimal wsproto client ---------------------------------------------------------------------
class UpgradeRejected(Exception):
    def __init__(self, status_code: int) -> None:
        super().__init__(status_code)
        self.status_code = status_code


masked = unmask  # RFC 6455 §5.3: masking and unmasking are the same XOR


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
    return head + mask + masked(payload, mask)


class WireSocket:
    """A WebSocket client that can write arbitrary frames; ``get_message`` raises trio-websocket's
    ``ConnectionClosed`` (1006 when the TCP connection ends without a close frame). Each write and the upgrade are
    bounded by ``timeout``."""

    def __init__(self, stream: trio.SocketStream, ws: WSConnection, timeout: float = TIMEOUT) -> None:
        self.stream = stream
        self.ws = ws
        self.timeout = timeout
        self._parts: list[Any] = []

    @classmethod
    @asynccontextmanager
    async def open(
        cls, url: str, *, path: str | None = None, timeout: float = TIMEOUT  # noqa: ASYNC109 (each write's bound)
    ) -> AsyncIterator[WireSocket]:
        parsed = urllib.parse.urlsplit(url)
        host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
        target = path if path is not None else (parsed.path or "/")
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(host, port)
        try:
            ws = WSConnection(ConnectionType.CLIENT)
            sock = cls(stream, ws, timeout)
            with trio.fail_after(timeout):
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
        with trio.fail_after(self.timeout):
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
                        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                            await self.send_raw(self.ws.send(event.response()))
                    raise ConnectionClosed(CloseReason(event.code, event.reason or None))
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                raise ConnectionClosed(CloseReason(1006, None))
            self.ws.receive_data(data)
