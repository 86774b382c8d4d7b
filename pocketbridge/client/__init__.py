"""The PocketBridge Python client SDK (trio): the reference client of protocol.md.

    key = DeviceKey.generate()
    async with connect("ws://127.0.0.1:3001/ws", key, device_id, pin=server_pub) as client:
        ack = await client.send_event("clipboard:main", "clipboard:text", b"ciphertext")
        async for event in client.events():      # acked as they are taken
            ...
        missed = await client.replay()           # follows continuation tokens across pages

The server never sees plaintext: ``payload`` bytes are sent base64-encoded as ``encrypted_payload``
and are expected to be ciphertext already (encryption is the application's business).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from ..protocol.envelope import encode
from ..protocol.handshake import digest_c, digest_s
from ..protocol.keys import load_public_key

__all__ = [
    "Ack",
    "Client",
    "ClientError",
    "Closed",
    "DeviceKey",
    "HandshakeRefused",
    "ReceivedEvent",
    "ReplayResult",
    "ServerKeyMismatch",
    "connect",
    "event_message",
    "follow_replay",
    "new_device_id",
    "new_event_id",
    "replay_request",
]

MAX_MESSAGE_BYTES = 32 * 1024 * 1024


class ClientError(Exception):
    """Base of the SDK's errors."""


class Closed(ClientError):
    """The server closed the connection (``code``/``reason`` as sent) or the socket broke (1006)."""

    def __init__(self, code: int | None, reason: str | None) -> None:
        super().__init__(f"connection closed: {code} {reason or ''}".strip())
        self.code = code
        self.reason = reason


class HandshakeRefused(Closed):
    """The server closed the connection during the handshake."""


class ServerKeyMismatch(ClientError):
    """The server's identity key is not the pinned one, or its handshake signature is invalid."""


def new_device_id() -> str:
    return str(uuid.uuid4())


def new_event_id() -> str:
    """A UUID v7 (time-ordered)."""
    ms = int(time.time() * 1000)
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms << 80) | (0x7 << 76) | ((rand >> 62) & 0xFFF) << 64 | (0b10 << 62) | (rand & ((1 << 62) - 1))
    return str(uuid.UUID(int=value))


def event_message(
    user_id: str,
    device_id: str,
    device_seq: int,
    stream_id: str,
    event_type: str,
    payload: bytes,
    *,
    ttl: int | None = None,
    event_id: str | None = None,
) -> dict[str, Any]:
    """The ``event`` message of a device (protocol.md §5.1); ``payload`` goes base64-encoded, ``event_id`` is a
    new UUIDv7 unless given."""
    body: dict[str, Any] = {
        "event_id": event_id or new_event_id(),
        "user_id": user_id,
        "device_id": device_id,
        "device_seq": device_seq,
        "stream_id": stream_id,
        "type": event_type,
        "encrypted_payload": base64.b64encode(payload).decode(),
    }
    if ttl is not None:
        body["ttl"] = ttl
    return {"type": "event", "payload": body}


class DeviceKey:
    """A device's Ed25519 identity; its public key in hex is the device's ``user_id`` until paired."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public_hex = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()

    @classmethod
    def generate(cls) -> DeviceKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> DeviceKey:
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @property
    def seed(self) -> bytes:
        return self._private.private_bytes_raw()

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)

    def __repr__(self) -> str:
        return f"DeviceKey(public={self.public_hex[:8]}…)"


@attrs.frozen
class Ack:
    device_seq: int
    status: str  # stored | duplicate | rejected
    event_id: str | None = None
    code: str | None = None
    error: str | None = None


@attrs.frozen
class ReceivedEvent:
    event_id: str
    user_id: str
    device_id: str
    device_seq: int
    stream_id: str
    stream_seq: int
    type: str
    encrypted_payload: str
    created_at: int
    ttl: int | None
    raw: dict[str, Any]

    @property
    def payload(self) -> bytes:
        return base64.b64decode(self.encrypted_payload + "=" * (-len(self.encrypted_payload) % 4))

    @classmethod
    def from_wire(cls, p: dict[str, Any]) -> ReceivedEvent:
        return cls(
            p["event_id"], p["user_id"], p["device_id"], p["device_seq"], p["stream_id"], p["stream_seq"],
            p["type"], p["encrypted_payload"], p["created_at"], p.get("ttl"), p,
        )


@attrs.frozen
class ReplayResult:
    events: list[ReceivedEvent]
    pages: int
    total_events: int | None
    full_resync: dict[str, Any] | None = None  # the full_resync_required payload, if sent


REPLAY_REPLIES = frozenset({"replay_response", "full_resync_required", "replay_failed"})


def replay_request(
    last_ack_device_seq: int, *, limit: int | None = None, token: str | None = None, flat: bool = False
) -> dict[str, Any]:
    """A ``replay_request`` message (protocol.md §6.1): wrapped in ``payload`` as web clients send it, or flat."""
    params: dict[str, Any] = {"last_ack_device_seq": last_ack_device_seq}
    if limit is not None:
        params["limit"] = limit
    if token is not None:
        params["continuation_token"] = token
    if flat:
        return {"type": "replay_request", **params}
    return {"type": "replay_request", "payload": {"type": "replay_request", **params}}


async def follow_replay(
    page: Callable[[str | None], Awaitable[dict[str, Any]]],
    on_event: Callable[[ReceivedEvent], Awaitable[None]] | None = None,
) -> ReplayResult:
    """Follow a replay page by page: ``page(token)`` sends one ``replay_request`` (the continuation token of the
    page before, or None) and returns its reply; ``on_event`` (an ack) is awaited for each event, in order."""
    events: list[ReceivedEvent] = []
    token: str | None = None
    pages = 0
    total: int | None = None
    while True:
        msg = await page(token)
        if msg["type"] == "full_resync_required":
            return ReplayResult(events, pages, total, msg["payload"])
        if msg["type"] != "replay_response":
            raise ClientError("replay failed")
        payload = msg["payload"]
        pages += 1
        if total is None:
            total = payload.get("total_events")
        for raw in payload["events"]:
            event = ReceivedEvent.from_wire(raw)
            events.append(event)
            if on_event is not None:
                await on_event(event)
        if not payload["has_more"]:
            return ReplayResult(events, pages, total)
        token = payload["continuation_token"]


class _Pending:
    __slots__ = ("done", "ack")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.ack: Ack | None = None


class Client:
    """An established session. Create with :func:`connect`."""

    def __init__(
        self, ws: WebSocketConnection, key: DeviceKey, device_id: str, *, ack_event_ids: bool, reply_timeout: float
    ) -> None:
        self.ws = ws
        self.reply_timeout = reply_timeout  # bound on waiting for an ack or a reply (trio.TooSlowError)
        self.key = key
        self.device_id = device_id
        self.user_id = key.public_hex
        self.server_key = ""
        self.last_ack_device_seq = 0
        self.expires_at = 0
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self._ack_event_ids = ack_event_ids
        self._next_seq = 1
        self._pending: dict[int, _Pending] = {}
        self._events_send, self._events = trio.open_memory_channel[ReceivedEvent](10_000)
        self._replies_send, self._replies = trio.open_memory_channel[dict[str, Any]](16)
        self._notices_send, self.notices = trio.open_memory_channel[dict[str, Any]](1_000)
        self._closed = trio.Event()

    # --- handshake -----------------------------------------------------------------------------
    async def _handshake(self, *, pin: str | None, device_name: str | None, device_type: str | None) -> None:
        eph = ec.generate_private_key(ec.SECP256R1())
        eph_pub = eph.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint).hex()
        nonce_c = secrets.token_hex(32)
        first = {"type": "client_hello", "client_ephemeral_pub": eph_pub, "nonce_c": nonce_c}
        await self._send({"type": "client_hello", "payload": first})
        hello = await self._expect("server_hello")
        server_pub, server_eph, nonce_s = hello["server_identity_pub"], hello["server_ephemeral_pub"], hello["nonce_s"]
        if pin is not None and server_pub.lower() != pin.lower():
            raise ServerKeyMismatch("the server identity key is not the pinned one")
        try:
            load_public_key(server_pub).verify(
                bytes.fromhex(hello["server_signature"]), digest_s(server_pub, server_eph, nonce_c, nonce_s)
            )
        except (InvalidSignature, ValueError):
            raise ServerKeyMismatch("the server's handshake signature does not verify") from None
        self.server_key = server_pub
        auth: dict[str, Any] = {
            "type": "client_auth",
            "user_id": self.key.public_hex,
            "device_id": self.device_id,
            "client_signature": self.key.sign(
                digest_c(self.key.public_hex, self.device_id, nonce_c, nonce_s, server_eph)
            ).hex(),
            "nonce_c2": secrets.token_hex(32),
        }
        if device_name is not None:
            auth["device_name"] = device_name
        if device_type is not None:
            auth["device_type"] = device_type
        await self._send({"type": "client_auth", "payload": auth})
        established = await self._expect("session_established")
        self.user_id = established["user_id"]
        self.last_ack_device_seq = int(established["last_ack_device_seq"])
        self.expires_at = int(established["expires_at"])
        self._next_seq = self.last_ack_device_seq + 1

    async def _expect(self, kind: str) -> dict[str, Any]:

        try:
            raw = await self.ws.get_message()
        except ConnectionClosed as exc:
            reason = exc.reason
            raise HandshakeRefused(reason.code if reason else None, reason.reason if reason else None) from None
        msg = json.loads(raw)
        if msg.get("type") != kind:
            raise ClientError(f"expected {kind}, got {msg.get('type')!r}")
        return msg["payload"]  # type: ignore[no-any-return]

    # --- sending -------------------------------------------------------------------------------
    async def _send(self, message: dict[str, Any] | str) -> None:
        try:
            await self.ws.send_message(message if isinstance(message, str) else encode(message))
        except ConnectionClosed as exc:
            raise self._closed_error(exc) from None

    async def send_raw(self, message: dict[str, Any] | str | bytes) -> None:
        """Send any frame as is (for tests and tools)."""
        try:
            await self.ws.send_message(message if isinstance(message, (str, bytes)) else encode(message))
        except ConnectionClosed as exc:
            raise self._closed_error(exc) from None

    def next_device_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    async def post_event(
        self,
        stream_id: str,
        event_type: str,
        payload: bytes,
        *,
        ttl: int | None = None,
        event_id: str | None = None,
        device_seq: int | None = None,
    ) -> tuple[int, str, _Pending]:
        """Send an event without waiting; returns (device_seq, event_id, pending) — see :meth:`wait_ack`."""
        seq = self.next_device_seq() if device_seq is None else device_seq
        message = event_message(
            self.user_id, self.device_id, seq, stream_id, event_type, payload, ttl=ttl, event_id=event_id
        )
        pending = self._pending.setdefault(seq, _Pending())
        await self._send(message)
        return seq, message["payload"]["event_id"], pending

    async def wait_ack(self, seq: int, pending: _Pending) -> Ack:
        with trio.fail_after(self.reply_timeout):
            await self._wait_or_closed(pending.done)
        self._pending.pop(seq, None)
        assert pending.ack is not None
        return pending.ack

    async def send_event(self, stream_id: str, event_type: str, payload: bytes, **kw: Any) -> Ack:
        """Send an event and return the server's ack (stored, duplicate or rejected)."""
        seq, _, pending = await self.post_event(stream_id, event_type, payload, **kw)
        return await self.wait_ack(seq, pending)

    # --- receiving -----------------------------------------------------------------------------
    async def _read_loop(self) -> None:

        try:
            while True:
                msg = json.loads(await self.ws.get_message())
                kind = msg.get("type")
                payload = msg.get("payload") or {}
                if kind == "ack":
                    pending = self._pending.get(payload.get("device_seq", -1))
                    if pending is not None and not pending.done.is_set():
                        pending.ack = Ack(
                            payload["device_seq"], payload.get("status", "stored"), payload.get("event_id"),
                            payload.get("code"), payload.get("error"),
                        )
                        pending.done.set()
                elif kind == "event":
                    await self._events_send.send(ReceivedEvent.from_wire(payload))
                elif kind in REPLAY_REPLIES or kind == "pong":
                    await self._replies_send.send(msg)
                else:
                    # notices are informational; a slow reader loses the newest ones
                    with contextlib.suppress(trio.WouldBlock):
                        self._notices_send.send_nowait(msg)
        except ConnectionClosed as exc:
            reason = exc.reason
            self.close_code = reason.code if reason else 1006
            self.close_reason = reason.reason if reason else None
        finally:
            self._closed.set()
            self._events_send.close()
            self._replies_send.close()
            self._notices_send.close()

    def _closed_error(self, exc: ConnectionClosed | None = None) -> Closed:
        """The close as the server sent it (the socket's record of it, if the reader has not seen it yet)."""
        if self.close_code is None and exc is not None and exc.reason is not None:
            self.close_code, self.close_reason = exc.reason.code, exc.reason.reason
        return Closed(self.close_code, self.close_reason)

    async def _wait_or_closed(self, event: trio.Event) -> None:
        if event.is_set():
            return
        async with trio.open_nursery() as nursery:
            async def watch() -> None:
                await self._closed.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            await event.wait()
            nursery.cancel_scope.cancel()
        if not event.is_set():
            raise self._closed_error()

    async def ack(self, event: ReceivedEvent) -> None:
        body: dict[str, Any] = {"device_seq": event.device_seq}
        if self._ack_event_ids:
            body["event_id"] = event.event_id
        await self._send({"type": "ack", "payload": body})

    async def receive_event(self, *, ack: bool = True) -> ReceivedEvent:
        """The next live event (acked unless ``ack=False``); raises Closed when the connection ends."""
        try:
            event = await self._events.receive()
        except trio.EndOfChannel:
            raise self._closed_error() from None
        if ack:
            await self.ack(event)
        return event

    async def events(self, *, ack: bool = True) -> AsyncIterator[ReceivedEvent]:
        """Live events until the connection closes."""
        while True:
            try:
                yield await self.receive_event(ack=ack)
            except Closed:
                return

    async def next_notice(self, kind: str | tuple[str, ...] | None = None) -> dict[str, Any]:
        """The next server message that is not an ack, event or reply (presence, warnings, errors…),
        skipping those of other kinds than ``kind``."""
        kinds = (kind,) if isinstance(kind, str) else kind
        async for msg in self.notices:
            if kinds is None or msg.get("type") in kinds:
                return msg
        raise self._closed_error()

    async def initiate_pairing(self) -> dict[str, Any]:
        """Ask for a pairing code; returns the ``pairing_initiated`` or ``pairing_failed`` message."""
        await self._send({"type": "initiate_pairing"})
        return await self.next_notice(("pairing_initiated", "pairing_failed"))

    async def complete_pairing(self, code: str) -> dict[str, Any]:
        """Join the account that issued ``code``; on success the client's ``user_id`` becomes it."""
        await self._send({"type": "complete_pairing", "payload": {"pairing_code": code}})
        msg = await self.next_notice(("pairing_completed", "pairing_failed"))
        if msg["type"] == "pairing_completed":
            self.user_id = msg["payload"]["linkedUserId"]
            self.last_ack_device_seq = int(msg["payload"].get("last_ack_device_seq", 0))
            self._next_seq = self.last_ack_device_seq + 1
        return msg

    async def _reply(self) -> dict[str, Any]:
        try:
            with trio.fail_after(self.reply_timeout):
                return await self._replies.receive()
        except trio.EndOfChannel:
            raise self._closed_error() from None

    async def ping(self) -> int:
        await self._send({"type": "ping", "payload": {"timestamp": int(time.time() * 1000)}})
        msg = await self._reply()
        return int(msg["payload"]["timestamp"])

    async def replay_page(
        self, *, limit: int | None = None, token: str | None = None, flat: bool = False
    ) -> dict[str, Any]:
        """One ``replay_request``; returns the reply message (replay_response, full_resync_required, replay_failed)."""
        await self._send(replay_request(self.last_ack_device_seq, limit=limit, token=token, flat=flat))
        return await self._reply()

    async def replay(self, *, limit: int | None = None, ack: bool = True) -> ReplayResult:
        """Replay everything missed, following continuation tokens; acks each event (as web clients do)."""

        async def page(token: str | None) -> dict[str, Any]:
            return await self.replay_page(limit=limit, token=token)

        return await follow_replay(page, self.ack if ack else None)

    async def close(self) -> None:
        await self.ws.aclose()


@asynccontextmanager
async def connect(
    url: str,
    key: DeviceKey,
    device_id: str,
    *,
    pin: str | None = None,
    device_name: str | None = None,
    device_type: str | None = None,
    ack_event_ids: bool = True,
    handshake_timeout: float = 15.0,
    reply_timeout: float = 30.0,
) -> AsyncIterator[Client]:
    """Connect, handshake (verifying the server's signature, and its key against ``pin`` if given).

    Waiting for an ack or a replay/ping reply is bounded by ``reply_timeout`` (trio.TooSlowError).

    An error inside the block, or of the connection, reaches the caller as itself (``Closed``,
    ``HandshakeRefused``, ``trio.TooSlowError``, ...), never wrapped in an exception group."""
    try:
        async with open_websocket_url(url, max_message_size=MAX_MESSAGE_BYTES) as ws:
            client = Client(ws, key, device_id, ack_event_ids=ack_event_ids, reply_timeout=reply_timeout)
            with trio.fail_after(handshake_timeout):
                try:
                    await client._handshake(pin=pin, device_name=device_name, device_type=device_type)
                except Closed as exc:  # however the close showed up (reading or sending), it refused the handshake
                    if isinstance(exc, HandshakeRefused):
                        raise
                    raise HandshakeRefused(exc.code, exc.reason) from None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client._read_loop)
                try:
                    yield client
                finally:
                    nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        single = _single_error(group)
        if single is None:
            raise
        raise single from None


def _single_error(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one error a group holds (trio's nurseries wrap even a lone error), or None if it holds several."""
    leaves: list[BaseException] = []

    def collect(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                collect(inner)
        elif not isinstance(exc, trio.Cancelled):
            leaves.append(exc)

    collect(group)
    return leaves[0] if len(leaves) == 1 else None
