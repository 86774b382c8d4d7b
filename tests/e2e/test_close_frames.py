"""Every close the server starts reaches the client as a close frame, promptly (protocol.md §9).

The daemon runs with a long ``[ws] close_timeout``: a close frame that is not written would only show
up as a TCP close (1006) after that timeout, so each close here must arrive within ``PROMPT`` seconds.
The client is a raw socket (:class:`WireSocket`) that reads the close frame itself.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import attrs
import pytest
import trio
from trio_websocket import ConnectionClosed

from pocketbridge import accounts
from pocketbridge.app import Daemon, Running
from pocketbridge.client import DeviceKey, new_device_id, new_event_id
from pocketbridge.config import Config
from tests.conftest import run_daemon
from tests.e2e.rawclient import (
    RawHandshake,
    WireSocket,
    assert_no_tracebacks,
    build_frame,
    dumps,
    e2e_config,
    event_body,
    established,
    recv_json,
    send,
    send_valid_event,
)

CLOSE_TIMEOUT = 10.0  # [ws] close_timeout of these daemons
PROMPT = 2.0  # seconds within which every close frame must arrive (well below CLOSE_TIMEOUT)
ATTEMPTS = 20
MAX_MESSAGES = 100  # more before a close is a failure
TEXT, CONTINUATION = 0x1, 0x0

INVALID_FORMAT = (1008, "Invalid message format")
EXPECTED_HELLO = (1008, "Invalid handshake step: expected client_hello")
EXPECTED_AUTH = (1008, "Invalid handshake step: expected client_auth")


@pytest.fixture(autouse=True)
def _no_tracebacks(caplog: pytest.LogCaptureFixture) -> Any:
    yield
    assert_no_tracebacks(caplog.get_records("setup") + caplog.get_records("call"))


def close_config(factory: Callable[..., Config], **sections: dict[str, Any]) -> Config:
    ws = {"close_timeout": CLOSE_TIMEOUT, **sections.pop("ws", {})}
    return e2e_config(factory, ws=ws, **sections)


async def read_until_close(ws: WireSocket, timeout: float = PROMPT) -> tuple[list[dict[str, Any]], tuple[Any, Any]]:
    """The messages the server sends, then its close ``(code, reason)``; fails if no close frame comes within
    ``timeout`` (a TCP close without a close frame is 1006)."""
    messages: list[dict[str, Any]] = []
    with trio.move_on_after(timeout):
        while True:
            try:
                data = await ws.get_message()
            except ConnectionClosed as exc:
                reason = exc.reason
                return messages, ((reason.code, reason.reason) if reason else (None, None))
            messages.append(json.loads(data))
            assert len(messages) <= MAX_MESSAGES, f"{len(messages)} messages and no close"
    raise AssertionError(f"no close frame within {timeout} s (after messages {[m.get('type') for m in messages]})")


def frames(*messages: Any) -> bytes:
    """Text frames for ``messages`` (dicts as JSON), to be written in one TCP write."""
    return b"".join(build_frame(TEXT, (m if isinstance(m, str) else dumps(m)).encode()) for m in messages)


# --- the same TCP write carries a message that gets a reply and one that closes -----------------------------
async def _hello_then_hello(ws: WireSocket) -> None:
    hs = RawHandshake(ws, DeviceKey.generate())
    await ws.send_raw(frames(hs.hello_message(), hs.hello_message()))


async def _hello_then_garbage(ws: WireSocket) -> None:
    hs = RawHandshake(ws, DeviceKey.generate())
    await ws.send_raw(frames(hs.hello_message(), "not json"))


async def _ping_then_garbage(ws: WireSocket) -> None:
    await RawHandshake(ws, DeviceKey.generate()).run()
    await ws.send_raw(frames({"type": "ping", "payload": {"timestamp": 1}}, "not json"))


PIPELINED: dict[str, tuple[Callable[[WireSocket], Awaitable[None]], str, tuple[int, str]]] = {
    "hello-hello": (_hello_then_hello, "server_hello", EXPECTED_AUTH),
    "hello-garbage": (_hello_then_garbage, "server_hello", INVALID_FORMAT),
    "ping-garbage": (_ping_then_garbage, "pong", INVALID_FORMAT),
}


@pytest.mark.parametrize("case", PIPELINED)
async def test_pipelined_messages_get_reply_and_close_frame(config_factory: Callable[..., Config], case: str) -> None:
    """The reply to the first message and the close frame both arrive, every time (browsers send several
    frames in one TCP write; the close must not wait on the reply being written)."""
    send_frames, reply, expected = PIPELINED[case]
    failures = []
    async with run_daemon(close_config(config_factory)) as (_, running):
        for attempt in range(ATTEMPTS):
            async with WireSocket.open(running.ws_url) as ws:
                await send_frames(ws)
                try:
                    messages, close = await read_until_close(ws)
                except AssertionError as exc:
                    failures.append(f"attempt {attempt}: {exc}")
                    continue
                if ([m["type"] for m in messages], close) != ([reply], expected):
                    failures.append(f"attempt {attempt}: {[m['type'] for m in messages]} {close}")
    assert not failures, f"{len(failures)} of {ATTEMPTS} attempts failed:\n" + "\n".join(failures)


# --- every close a client can cause ----------------------------------------------------------------------
@attrs.frozen
class Ctx:
    daemon: Daemon
    running: Running
    stack: AsyncExitStack

    @property
    def url(self) -> str:
        return self.running.ws_url

    async def open(self) -> WireSocket:
        """A raw connection that stays open until the case ends."""
        return await self.stack.enter_async_context(WireSocket.open(self.url))

    async def session(
        self, key: DeviceKey | None = None, device_id: str | None = None
    ) -> tuple[WireSocket, RawHandshake]:
        ws = await self.open()
        hs = RawHandshake(ws, key or DeviceKey.generate(), device_id)
        await hs.run()
        return ws, hs


Trigger = Callable[[Ctx], Awaitable[WireSocket]]  # does what causes the close; returns the socket that gets it


@attrs.frozen
class Case:
    trigger: Trigger
    close: tuple[int, str]
    messages: tuple[str, ...] | str = ()  # types of the messages that come before the close ("event*": events)
    config: dict[str, dict[str, Any]] = attrs.Factory(dict)


async def invalid_format(ctx: Ctx) -> WireSocket:
    ws = await ctx.open()
    await send(ws, "not json")
    return ws


async def expected_hello(ctx: Ctx) -> WireSocket:
    ws = await ctx.open()
    await send(ws, {"type": "ping", "payload": {}})
    return ws


async def expected_auth(ctx: Ctx) -> WireSocket:
    ws = await ctx.open()
    hs = RawHandshake(ws, DeviceKey.generate())
    await hs.hello()
    await hs.read_server_hello()
    await send(ws, {"type": "ping", "payload": {}})
    return ws


async def invalid_field(ctx: Ctx) -> WireSocket:
    ws = await ctx.open()
    await RawHandshake(ws, DeviceKey.generate()).hello(nonce_c="zz")
    return ws


async def _auth(ws: WireSocket, key: DeviceKey, device_id: str | None = None, **auth_kw: Any) -> WireSocket:
    hs = RawHandshake(ws, key, device_id)
    await hs.hello()
    await hs.read_server_hello()
    await hs.auth(**auth_kw)
    return ws


async def invalid_signature(ctx: Ctx) -> WireSocket:
    return await _auth(await ctx.open(), DeviceKey.generate(), signer=DeviceKey.generate())


async def key_mismatch(ctx: Ctx) -> WireSocket:
    device_id = new_device_id()
    async with established(ctx.url, DeviceKey.generate(), device_id):
        pass
    return await _auth(await ctx.open(), DeviceKey.generate(), device_id)


async def device_limit(ctx: Ctx) -> WireSocket:  # with max_devices_per_user = 1
    key = DeviceKey.generate()
    async with established(ctx.url, key):
        pass
    return await _auth(await ctx.open(), key)


async def revoked_at_handshake(ctx: Ctx) -> WireSocket:
    key, device_id = DeviceKey.generate(), new_device_id()
    async with established(ctx.url, key, device_id):
        pass
    assert await accounts.revoke_device(ctx.daemon.gateway, device_id, accounts.USER_REVOKED) is not None
    return await _auth(await ctx.open(), key, device_id)


async def too_many_connections(ctx: Ctx) -> WireSocket:  # with ws_connects_per_ip_per_minute = 1
    await ctx.open()
    return await ctx.open()


async def too_many_handshakes(ctx: Ctx) -> WireSocket:  # with handshakes_per_ip_per_minute = 1
    await ctx.session()
    ws = await ctx.open()
    await RawHandshake(ws, DeviceKey.generate()).hello()
    return ws


async def sequence_conflict(ctx: Ctx) -> WireSocket:
    ws, hs = await ctx.session()
    await send_valid_event(ws, hs, 1)
    reused = event_body(hs.key.public_hex, hs.device_id, 1, event_id=new_event_id())  # same device_seq, other id
    await send(ws, {"type": "event", "payload": reused})
    return ws


async def heartbeat_timeout(ctx: Ctx) -> WireSocket:  # with ping_interval 0.2 s, pong_timeout 1 s
    ws, _ = await ctx.session()
    await trio.sleep(1.5)  # not reading: no pong goes out
    return ws


async def message_too_big(ctx: Ctx) -> WireSocket:  # with max_message_bytes = 4096
    ws, _ = await ctx.session()
    await send(ws, {"type": "ping", "payload": {"pad": "x" * 5000}})
    return ws


async def invalid_utf8(ctx: Ctx) -> WireSocket:
    ws, _ = await ctx.session()
    await ws.send_frame(TEXT, b'{"type":"ping","x":"\xff"}')
    return ws


async def protocol_error(ctx: Ctx) -> WireSocket:
    ws, _ = await ctx.session()
    await ws.send_frame(CONTINUATION, b"{}")  # a continuation frame with no message to continue
    return ws


async def reserved_bit(ctx: Ctx) -> WireSocket:
    ws, _ = await ctx.session()
    frame = bytearray(build_frame(TEXT, b'{"type":"ping"}'))
    frame[0] |= 0x40  # RSV1 without a negotiated extension
    await ws.send_raw(bytes(frame))
    return ws


async def handshake_timeout(ctx: Ctx) -> WireSocket:  # with handshake_timeout = 0.5 s
    return await ctx.open()


async def replaced(ctx: Ctx) -> WireSocket:
    ws, hs = await ctx.session()
    await ctx.session(hs.key, hs.device_id)
    return ws


async def device_revoked(ctx: Ctx) -> WireSocket:
    ws, hs = await ctx.session()
    assert await accounts.revoke_device(ctx.daemon.gateway, hs.device_id, accounts.USER_REVOKED) is not None
    return ws


async def account_deleted(ctx: Ctx) -> WireSocket:
    ws, hs = await ctx.session()
    async with trio.open_nursery() as nursery:  # delete_user waits for the sessions to close
        nursery.start_soon(accounts.delete_user, ctx.daemon.gateway, hs.key.public_hex)
        await trio.sleep(0)
    return ws


async def shutting_down(ctx: Ctx) -> WireSocket:
    ws, _ = await ctx.session()
    ctx.daemon.stop()
    return ws


async def too_many_events(ctx: Ctx) -> WireSocket:  # with events_per_user_per_minute = burst = 1
    ws, hs = await ctx.session()
    await send_valid_event(ws, hs, 1)
    await send(ws, {"type": "event", "payload": event_body(hs.key.public_hex, hs.device_id, 2)})
    return ws


async def send_queue_overflow(ctx: Ctx) -> WireSocket:  # with send_queue_bytes = 400 KiB, events <= 200 KiB
    key = DeviceKey.generate()
    ws, _ = await ctx.session(key)
    other, hs = await ctx.session(key)
    assert (await recv_json(ws))["type"] == "device_status_changed"  # read: the close must not depend on it
    for seq in range(1, 41):  # ~10 MB for a receiver that reads nothing: past the socket buffers and the queue
        body = event_body(key.public_hex, hs.device_id, seq, encrypted_payload="QUFB" * 66_000)
        await send(other, {"type": "event", "payload": body})
    return ws


async def pairing_lockout(ctx: Ctx) -> WireSocket:  # after [pairing] max_failures_per_connection (5) failures
    ws, _ = await ctx.session()
    attempt = {"type": "complete_pairing", "payload": {"pairing_code": "000000"}}
    await ws.send_raw(frames(*[attempt] * 6))
    return ws


FAST_HEARTBEAT = {"ws": {"ping_interval": 0.2, "pong_timeout": 1.0}}
CASES: dict[str, Case] = {
    "invalid-format": Case(invalid_format, INVALID_FORMAT),
    "expected-hello": Case(expected_hello, EXPECTED_HELLO),
    "expected-auth": Case(expected_auth, EXPECTED_AUTH),
    "invalid-field": Case(invalid_field, (1008, "Missing or invalid nonce_c")),
    "invalid-signature": Case(invalid_signature, (1008, "Invalid client signature")),
    "key-mismatch": Case(key_mismatch, (1008, "Device key mismatch")),
    "device-limit": Case(device_limit, (1008, "Device limit reached"),
                         config={"limits": {"max_devices_per_user": 1}}),
    "revoked-at-handshake": Case(revoked_at_handshake, (1008, "Device has been revoked")),
    "too-many-connections": Case(too_many_connections,
                                 (1008, "Too many connection attempts. Please try again later."),
                                 config={"limits": {"ws_connects_per_ip_per_minute": 1}}),
    "too-many-handshakes": Case(too_many_handshakes, (1008, "Too many handshake attempts. Please try again later."),
                                config={"limits": {"handshakes_per_ip_per_minute": 1}}),
    "sequence-conflict": Case(sequence_conflict, (1008, "Device sequence conflict")),
    "heartbeat-timeout": Case(heartbeat_timeout, (1008, "Heartbeat timeout"), config=FAST_HEARTBEAT),
    "message-too-big": Case(message_too_big, (1009, "Message too big"),
                            config={"ws": {"max_message_bytes": 4096}, "events": {"max_payload_bytes": 1000}}),
    "invalid-utf8": Case(invalid_utf8, (1007, "Invalid UTF-8 in text frame")),
    "protocol-error": Case(protocol_error, (1002, "Protocol error")),
    "reserved-bit": Case(reserved_bit, (1002, "Protocol error")),
    "handshake-timeout": Case(handshake_timeout, (1008, "Handshake timeout"),
                              config={"ws": {"handshake_timeout": 0.5}}),
    "replaced": Case(replaced, (1000, "New connection established for this device")),
    "device-revoked": Case(device_revoked, (1000, "Device revoked"), ("device_revoked",)),
    "account-deleted": Case(account_deleted, (1000, "Account deleted"), ("device_revoked",)),
    "shutting-down": Case(shutting_down, (1001, "Server shutting down")),
    "too-many-events": Case(too_many_events, (1013, "Too many events. Please slow down."),
                            config={"limits": {"events_per_user_per_minute": 1, "event_burst_per_user": 1}}),
    "send-queue-overflow": Case(send_queue_overflow, (1013, "Try again later"), "event*",
                                config={"ws": {"send_queue_bytes": 400 * 1024},
                                        "replay": {"max_page_bytes": 400 * 1024},
                                        "events": {"max_payload_bytes": 200 * 1024}}),
    "pairing-lockout": Case(pairing_lockout, (1008, "Too many failed pairing attempts"), ("pairing_failed",) * 6),
}


@pytest.mark.parametrize("name", CASES)
async def test_close_frame_arrives(config_factory: Callable[..., Config], name: str) -> None:
    case = CASES[name]
    config = close_config(config_factory, **case.config)
    async with run_daemon(config) as (daemon, running), AsyncExitStack() as stack:
        with trio.fail_after(PROMPT * 4):
            ws = await case.trigger(Ctx(daemon, running, stack))
        messages, close = await read_until_close(ws)
        types = [m["type"] for m in messages]
        if case.messages == "event*":  # whatever the socket buffers held before the overflow
            assert set(types) <= {"event"} and close == case.close, (types, close)
        else:
            assert (types, close) == (list(case.messages), case.close)
