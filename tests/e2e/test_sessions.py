"""End-to-end: sessions (protocol.md §3.6-3.7, §4, §5.5 slow consumer), against the real daemon over loopback.

Covers ``session_established``, one connection per device, presence, the app ping, session expiry
(driven by ``trio.testing.MockClock``) and the bounded send queue of a client that stops reading.
"""

from __future__ import annotations

import base64
import json
import math
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
import trio_websocket
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from pocketbridge.client import Client, Closed, DeviceKey, connect, new_device_id
from pocketbridge.config import Config
from tests.conftest import run_daemon
from tests.e2e.rawclient import RawHandshake

WAIT = 5  # seconds: the bound on every single wait in these tests
QUIET = 0.3  # seconds of silence that stand for "nothing else arrives"
CLOCK_SLACK_MS = 2_000
DAY_MS = 86_400_000


def now_ms() -> int:
    return int(time.time() * 1000)


async def next_frame(ws: WebSocketConnection, kind: str) -> dict[str, Any]:
    with trio.fail_after(WAIT):
        while True:
            msg = json.loads(await ws.get_message())
            if msg["type"] == kind:
                return msg  # type: ignore[no-any-return]


async def next_notice(client: Client, kind: str | None = None) -> dict[str, Any]:
    """The next notice (fails if another kind comes first: nothing is skipped silently)."""
    with trio.fail_after(WAIT):
        msg = await client.next_notice()
    if kind is not None:
        assert msg["type"] == kind, msg
    return msg


async def assert_no_notice(client: Client, seconds: float = QUIET) -> None:
    with trio.move_on_after(seconds):
        msg = await client.next_notice()
        raise AssertionError(f"unexpected notice: {msg}")


async def assert_no_event(client: Client, seconds: float = QUIET) -> None:
    with trio.move_on_after(seconds):
        event = await client.receive_event(ack=False)
        raise AssertionError(f"unexpected event relayed: {event.raw}")


def assert_presence(
    msg: dict[str, Any], *, user_id: str, device_id: str, online: bool, name: str | None = None,
    type_: str | None = None, between: tuple[int, int] | None = None,
) -> None:
    """The §4 shape exactly: name and type only when online."""
    assert set(msg) == {"type", "payload"}
    assert msg["type"] == "device_status_changed"
    p = msg["payload"]
    expected = {"type": "device_status_changed", "user_id": user_id, "device_id": device_id, "is_online": online}
    if online:
        expected |= {"device_name": name, "device_type": type_}
    assert {k: v for k, v in p.items() if k != "timestamp"} == expected
    assert isinstance(p["timestamp"], int) and not isinstance(p["timestamp"], bool)
    if between is not None:
        assert between[0] - CLOCK_SLACK_MS <= p["timestamp"] <= between[1] + CLOCK_SLACK_MS


# --- session_established (§3.7) -------------------------------------------------------------------


async def test_session_established_shape_with_upper_case_ids(daemon: Any) -> None:
    key = DeviceKey.generate()
    device_id = new_device_id().upper()
    async with open_websocket_url(daemon.ws_url) as ws:
        t0 = now_ms()
        with trio.fail_after(WAIT):
            hs = RawHandshake(ws, key, device_id)
            await hs.run(user_id=key.public_hex.upper())
            msg = hs.established
        t1 = now_ms()
    assert set(msg) == {"type", "payload"}
    p = msg["payload"]
    assert set(p) == {"type", "device_id", "user_id", "last_ack_device_seq", "expires_at"}
    assert p["type"] == "session_established"
    assert p["device_id"] == device_id  # exactly as sent, upper case kept
    assert p["user_id"] == key.public_hex  # U, lowercase
    assert p["last_ack_device_seq"] == 0
    assert t0 + DAY_MS - CLOCK_SLACK_MS <= p["expires_at"] <= t1 + DAY_MS + CLOCK_SLACK_MS

    # the upper-case spelling names the same device: it is resumed, not registered again
    async with connect(daemon.ws_url, key, device_id.lower()) as c:
        assert c.last_ack_device_seq == 0


async def test_session_established_reports_highest_stored_device_seq(daemon: Any) -> None:
    key = DeviceKey.generate()
    device_id = new_device_id().upper()
    async with connect(daemon.ws_url, key, device_id) as a, connect(daemon.ws_url, key, new_device_id()) as b:
        assert a.user_id == key.public_hex
        assert a.last_ack_device_seq == 0
        t0 = now_ms()
        with trio.fail_after(WAIT):
            for seq in (1, 2, 7, 4):
                ack = await a.send_event("s:1", "t:x", b"x", device_seq=seq)
                assert ack.status == "stored"
            rejected = await a.send_event("s:1", "t:x", b"x", device_seq=9, ttl=1)  # rejected: stores nothing
            assert rejected.status == "rejected"
        with trio.fail_after(WAIT):
            got = [await b.receive_event() for _ in range(4)]
        assert [e.device_id for e in got] == [device_id.lower()] * 4  # relayed in canonical form
    async with connect(daemon.ws_url, key, device_id) as again:
        t1 = now_ms()
        assert again.last_ack_device_seq == 7
        assert again.user_id == key.public_hex
        assert t0 + DAY_MS - CLOCK_SLACK_MS <= again.expires_at <= t1 + DAY_MS + CLOCK_SLACK_MS


# --- one connection per device (§4) ----------------------------------------------------------------


async def test_new_connection_replaces_old_one_without_offline_presence(daemon: Any) -> None:
    key = DeviceKey.generate()
    dev_a, dev_b = new_device_id(), new_device_id()
    async with (
        connect(daemon.ws_url, key, dev_a) as a,
        connect(daemon.ws_url, key, dev_b, device_name="Tablet", device_type="mobile") as b1,
    ):
        assert_presence(await next_notice(a), user_id=key.public_hex, device_id=dev_b, online=True,
                        name="Tablet", type_="mobile")
        async with connect(daemon.ws_url, key, dev_b) as b2:
            with trio.fail_after(WAIT), pytest.raises(Closed) as closed:
                await b1.receive_event()
            assert (closed.value.code, closed.value.reason) == (1000, "New connection established for this device")
            assert (b1.close_code, b1.close_reason) == (1000, "New connection established for this device")

            # the other device sees the new connection come online, and never the old one go offline
            assert_presence(await next_notice(a), user_id=key.public_hex, device_id=dev_b, online=True,
                            name="Tablet", type_="mobile")
            await assert_no_notice(a)

            # the replacement keeps working after the old connection's teardown
            with trio.fail_after(WAIT):
                ack = await a.send_event("s:1", "t:x", b"to the new connection")
                event = await b2.receive_event()
            assert (event.event_id, event.payload) == (ack.event_id, b"to the new connection")
            await assert_no_event(b2)
            with trio.fail_after(WAIT):
                back = await b2.send_event("s:1", "t:x", b"from the new connection")
                event = await a.receive_event()
            assert back.status == "stored" and event.event_id == back.event_id
            with trio.fail_after(WAIT):
                await b2.ping()

        # only when the live connection ends does the device go offline
        assert_presence(await next_notice(a), user_id=key.public_hex, device_id=dev_b, online=False)
        await assert_no_notice(a)


# --- presence (§4) -----------------------------------------------------------------------------------


async def test_presence_online_and_offline_reach_only_other_devices_of_the_user(daemon: Any) -> None:
    key, stranger = DeviceKey.generate(), DeviceKey.generate()
    dev_a, dev_b = new_device_id(), new_device_id()
    async with (
        connect(daemon.ws_url, key, dev_a, device_name="Phone", device_type="mobile") as a,
        connect(daemon.ws_url, stranger, new_device_id()) as s,
    ):
        t0 = now_ms()
        async with connect(daemon.ws_url, key, dev_b.upper(), device_name="Laptop", device_type="desktop") as b:
            t1 = now_ms()
            assert_presence(await next_notice(a), user_id=key.public_hex, device_id=dev_b, online=True,
                            name="Laptop", type_="desktop", between=(t0, t1))
            await assert_no_notice(b)  # no presence about itself, nor about devices that were already online
        t2 = now_ms()
        assert_presence(await next_notice(a), user_id=key.public_hex, device_id=dev_b, online=False, between=(t1, t2))
        await assert_no_notice(a)
        await assert_no_notice(s, 0.05)


async def test_presence_defaults_and_device_name_rules(daemon: Any) -> None:
    key = DeviceKey.generate()
    async with connect(daemon.ws_url, key, new_device_id(), device_name="Desk") as a:
        dev_b, dev_c, dev_d = new_device_id(), new_device_id(), new_device_id()
        async with connect(daemon.ws_url, key, dev_b):
            pass
        assert_presence(await next_notice(a), user_id=key.public_hex, device_id=dev_b, online=True,
                        name="Unknown Device", type_="web")
        assert_presence(await next_notice(a), user_id=key.public_hex, device_id=dev_b, online=False)

        async with connect(daemon.ws_url, key, dev_c, device_name="  <Desk>\x07 ", device_type="toaster"):
            pass  # sanitised to "Desk", which is taken: "Desk (2)"; an unknown type is ignored
        assert_presence(await next_notice(a), user_id=key.public_hex, device_id=dev_c, online=True,
                        name="Desk (2)", type_="web")
        assert_presence(await next_notice(a), user_id=key.public_hex, device_id=dev_c, online=False)

        async with connect(daemon.ws_url, key, dev_d, device_name="Desk (2)", device_type="desktop"):
            pass
        assert_presence(await next_notice(a), user_id=key.public_hex, device_id=dev_d, online=True,
                        name="Desk (3)", type_="desktop")
        assert_presence(await next_notice(a), user_id=key.public_hex, device_id=dev_d, online=False)

        # a stored name is kept at later handshakes; a valid type updates the row
        async with connect(daemon.ws_url, key, dev_c, device_name="Renamed", device_type="mobile"):
            pass
        assert_presence(await next_notice(a), user_id=key.public_hex, device_id=dev_c, online=True,
                        name="Desk (2)", type_="mobile")


# --- app ping (§4) -------------------------------------------------------------------------------------


async def test_app_ping_gets_pong_with_server_time(daemon: Any) -> None:
    key = DeviceKey.generate()
    async with connect(daemon.ws_url, key, new_device_id()) as c:
        t0 = now_ms()
        with trio.fail_after(WAIT):
            ts = await c.ping()
        t1 = now_ms()
        assert t0 - CLOCK_SLACK_MS <= ts <= t1 + CLOCK_SLACK_MS

    async with open_websocket_url(daemon.ws_url) as ws:
        with trio.fail_after(WAIT):
            await RawHandshake(ws, key, new_device_id()).run()
        for ping in ({"type": "ping"}, {"type": "ping", "payload": {"timestamp": 5}}):
            t0 = now_ms()
            await ws.send_message(json.dumps(ping))
            pong = await next_frame(ws, "pong")
            t1 = now_ms()
            assert set(pong) == {"type", "payload"} and set(pong["payload"]) == {"timestamp"}
            assert t0 - CLOCK_SLACK_MS <= pong["payload"]["timestamp"] <= t1 + CLOCK_SLACK_MS  # the client's is ignored


async def test_ping_before_handshake_is_refused(daemon: Any) -> None:
    async with open_websocket_url(daemon.ws_url) as ws:
        await ws.send_message(json.dumps({"type": "ping"}))
        with trio.fail_after(WAIT), pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()
    assert closed.value.reason is not None
    assert (closed.value.reason.code, closed.value.reason.reason) == (1008, "Invalid handshake step: expected client_hello")


# --- session expiry (§4), on a mock clock ------------------------------------------------------------


@asynccontextmanager
async def real_time_limit(seconds: float) -> AsyncIterator[None]:
    """Like ``trio.fail_after``, but in real time: under a MockClock trio deadlines only move on jumps."""
    finished = threading.Event()
    timed_out = False
    async with trio.open_nursery() as nursery:

        async def watchdog() -> None:
            nonlocal timed_out
            if not await trio.to_thread.run_sync(finished.wait, seconds):
                timed_out = True
                nursery.cancel_scope.cancel()

        nursery.start_soon(watchdog)
        try:
            yield
        finally:
            finished.set()
    if timed_out:
        raise trio.TooSlowError(f"took more than {seconds} s of real time")


async def settle(client: Client) -> None:
    """Let the daemon's woken tasks run: all tasks idle, then an app-ping round trip on ``client``."""
    await trio.testing.wait_all_tasks_blocked()
    await client.ping()
    await trio.testing.wait_all_tasks_blocked()


async def test_session_expires_with_warning_on_mock_clock(
    mock_clock: trio.testing.MockClock, config_factory: Callable[..., Config]
) -> None:
    config = config_factory(
        session={"ttl": 600, "warning_before": 300},
        ws={"ping_interval": 10_000, "pong_timeout": 10_000},
        storage={"op_timeout": 10_000},  # no store call in flight may be timed out by a jump
    )
    key = DeviceKey.generate()
    async with (
        real_time_limit(20),
        run_daemon(config) as (daemon, running),
        connect(running.ws_url, key, new_device_id()) as a,
        connect(running.ws_url, key, new_device_id()) as b,
    ):
        assert_presence(await next_notice(a), user_id=key.public_hex, device_id=b.device_id, online=True,
                        name="Unknown Device", type_="web")
        start = daemon.clock.now_ms()  # wall ms on the mock clock: constant until a jump
        assert b.expires_at == start + 600_000
        await settle(b)

        mock_clock.jump(200)
        await settle(b)  # activity does not extend the session
        assert (await b.send_event("s:1", "t:x", b"activity")).status == "stored"
        mock_clock.jump(99)  # 299 s: no warning yet
        await settle(b)
        with pytest.raises(trio.WouldBlock):
            b.notices.receive_nowait()

        mock_clock.jump(2)  # 301 s: less than warning_before left
        warning = await b.next_notice("session_expiring_soon")
        left_ms = b.expires_at - daemon.clock.now_ms()
        assert abs(left_ms - 299_000) <= 1  # (ms rounding of the wall-clock offset)
        assert warning == {"type": "session_expiring_soon", "payload": {
            "type": "session_expiring_soon", "expires_in_seconds": math.ceil(left_ms / 1000),
            "expires_at": b.expires_at}}
        assert warning["payload"]["expires_in_seconds"] <= 300

        mock_clock.jump(298)  # 599 s: still open, warned only once
        await settle(b)
        with pytest.raises(trio.WouldBlock):
            b.notices.receive_nowait()
        assert b.close_code is None

        mock_clock.jump(2)  # 601 s: past expires_at
        with pytest.raises(Closed) as closed:
            await b.receive_event()
        assert (closed.value.code, closed.value.reason) == (1001, "Session expired")
        assert (b.close_code, b.close_reason) == (1001, "Session expired")


# --- slow consumer (§5.5) ------------------------------------------------------------------------------


@asynccontextmanager
async def stalled_session(port: int, key: DeviceKey, device_id: str) -> AsyncIterator[WebSocketConnection]:
    """A WebSocket session whose socket stops reading as soon as the handshake is done.

    The receive buffer is tiny and trio-websocket's reader blocks once its one-message queue is full,
    so the server meets TCP backpressure after a few messages until ``get_message`` is called.
    """
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    async with trio.open_nursery() as nursery:
        ws = await trio_websocket.wrap_client_stream(nursery, trio.SocketStream(sock), "127.0.0.1", "/ws",
                                                     message_queue_size=1)
        with trio.fail_after(WAIT):
            await RawHandshake(ws, key, device_id).run()
        try:
            yield ws
        finally:
            nursery.cancel_scope.cancel()


async def test_slow_consumer_is_closed_1013_and_recovers_by_replay(config_factory: Callable[..., Config]) -> None:
    config = config_factory(ws={"send_queue_messages": 5})
    key = DeviceKey.generate()
    dev_a, dev_b = new_device_id(), new_device_id()
    payload = bytes(range(256)) * 64  # 16 KiB per event
    encoded = base64.b64encode(payload).decode("ascii")
    sent: list[str] = []
    async with run_daemon(config) as (_, running), connect(running.ws_url, key, dev_a) as a:
        async with stalled_session(running.ws_port, key, dev_b) as b:
            assert_presence(await next_notice(a), user_id=key.public_hex, device_id=dev_b, online=True,
                            name="Unknown Device", type_="web")
            # A sends until the server gives up on B (announced to A as B going offline)
            offline = None
            slowest = 0.0
            while offline is None and len(sent) < 300:
                started = time.monotonic()
                with trio.fail_after(WAIT):
                    ack = await a.send_event("files:main", "file:chunk", payload)
                slowest = max(slowest, time.monotonic() - started)
                assert ack.status == "stored"
                sent.append(ack.event_id)  # type: ignore[arg-type]
                try:
                    offline = a.notices.receive_nowait()
                except trio.WouldBlock:
                    pass
            assert slowest < 2.0, f"an ack took {slowest:.2f} s: the sender was held up by the slow reader"
            assert len(sent) > 5

            # B reads again: what was already queued for it, then the close
            received: list[dict[str, Any]] = []
            with trio.fail_after(WAIT * 2), pytest.raises(ConnectionClosed) as closed:
                while True:
                    received.append(json.loads(await b.get_message()))
            assert closed.value.reason is not None
            assert (closed.value.reason.code, closed.value.reason.reason) == (1013, "Try again later")
            assert [m["type"] for m in received] == ["event"] * len(received)
            assert [m["payload"]["event_id"] for m in received] == sent[: len(received)]
            assert all(m["payload"]["encrypted_payload"] == encoded for m in received)
            assert len(received) < len(sent)

        if offline is None:
            offline = await next_notice(a)
        assert_presence(offline, user_id=key.public_hex, device_id=dev_b, online=False)

        # nothing was lost: B catches up by replay
        async with connect(running.ws_url, key, dev_b) as b2:
            with trio.fail_after(WAIT):
                result = await b2.replay()
            assert result.full_resync is None
            assert [e.event_id for e in result.events] == sent
            assert all(e.payload == payload for e in result.events)
            assert result.total_events == len(sent)
