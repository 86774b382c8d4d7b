"""End-to-end: replay, the delivery cursor and durability (protocol.md §6, §5.4, §8 TTL), against the real daemon.

Every test starts an in-process daemon on ephemeral ports (``tests/conftest.py``). Device B is usually
offline while device A (same user) sends, then reconnects and replays.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from pocketbridge.client import (
    Ack,
    Client,
    DeviceKey,
    ReceivedEvent,
    connect,
    new_device_id,
)
from pocketbridge.config import Config
from tests.conftest import run_daemon
from tests.e2e.rawclient import RawHandshake

WAIT = 5  # seconds: the bound on every single wait in these tests
QUIET = 0.3  # seconds of silence that stand for "nothing else arrives"

EVENT_FIELDS = {
    "event_id", "user_id", "device_id", "device_seq", "stream_id", "stream_seq", "type", "encrypted_payload",
    "created_at",
}
EMPTY_REPLAY = {"type": "replay_response", "events": [], "has_more": False, "page_size": 0, "total_events": 0}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def now_ms() -> int:
    return int(time.time() * 1000)


async def send_all(client: Client, payloads: list[bytes], stream: str = "clipboard:main", **kw: Any) -> list[Ack]:
    """Send one event per payload, each acked before the next; all must be stored."""
    acks = []
    with trio.fail_after(WAIT * 2):
        for payload in payloads:
            acks.append(await client.send_event(stream, "clipboard:text", payload, **kw))
    assert [a.status for a in acks] == ["stored"] * len(payloads)
    return acks


def payloads_for(tag: str, n: int) -> list[bytes]:
    return [f"{tag}-{i:03d}".encode() for i in range(n)]


async def register(url: str, key: DeviceKey, device_id: str) -> None:
    """Connect once so the device exists (its delivery cursor starts at 0), then go offline."""
    async with connect(url, key, device_id):
        pass


async def page(client: Client, **kw: Any) -> dict[str, Any]:
    with trio.fail_after(WAIT):
        msg = await client.replay_page(**kw)
    assert msg["type"] == "replay_response", msg
    assert set(msg) == {"type", "payload"}
    return msg["payload"]  # type: ignore[no-any-return]


async def replay_all(client: Client, **kw: Any) -> Any:
    with trio.fail_after(WAIT):
        return await client.replay(**kw)


async def assert_no_event(client: Client, seconds: float = QUIET) -> None:
    with trio.move_on_after(seconds):
        event = await client.receive_event(ack=False)
        raise AssertionError(f"unexpected event relayed: {event.raw}")


def ids(events: list[Any]) -> list[str]:
    return [e["event_id"] if isinstance(e, dict) else e.event_id for e in events]


# --- a raw WebSocket session, for exact frames and hand-made requests --------------------------------


@asynccontextmanager
async def raw_session(url: str, key: DeviceKey, device_id: str) -> AsyncIterator[WebSocketConnection]:
    async with open_websocket_url(url) as ws:
        with trio.fail_after(WAIT):
            await RawHandshake(ws, key, device_id).run()
        yield ws


async def raw_request(ws: WebSocketConnection, message: dict[str, Any]) -> dict[str, Any]:
    """Send ``message``; return the next replay reply (other frames, e.g. presence, are skipped)."""
    await ws.send_message(json.dumps(message))
    with trio.fail_after(WAIT):
        while True:
            reply = json.loads(await ws.get_message())
            if reply["type"] in ("replay_response", "full_resync_required", "replay_failed"):
                return reply  # type: ignore[no-any-return]


# --- paging and the cursor ---------------------------------------------------------------------------


async def test_backlog_is_replayed_in_pages_with_continuation_tokens(daemon: Any) -> None:
    key = DeviceKey.generate()
    dev_a, dev_b = new_device_id(), new_device_id()
    await register(daemon.ws_url, key, dev_b)
    payloads = payloads_for("backlog", 25)
    async with connect(daemon.ws_url, key, dev_a) as a:
        acks = await send_all(a, payloads)

    async with connect(daemon.ws_url, key, dev_b) as b:
        p1 = await page(b, limit=10)
        assert p1["type"] == "replay_response"
        assert (p1["page_size"], p1["has_more"], p1["total_events"]) == (10, True, 25)
        assert len(p1["events"]) == 10
        assert isinstance(p1["continuation_token"], str) and p1["continuation_token"]

        p2 = await page(b, limit=10, token=p1["continuation_token"])
        assert (p2["page_size"], p2["has_more"]) == (10, True)
        assert "total_events" not in p2  # only on fresh requests
        assert isinstance(p2["continuation_token"], str) and p2["continuation_token"] != p1["continuation_token"]

        p3 = await page(b, limit=10, token=p2["continuation_token"])
        assert (p3["page_size"], p3["has_more"]) == (5, False)
        assert "continuation_token" not in p3 and "total_events" not in p3

        events = p1["events"] + p2["events"] + p3["events"]
        assert ids(events) == [x.event_id for x in acks]
        for n, (raw, payload) in enumerate(zip(events, payloads, strict=True), start=1):
            assert set(raw) == EVENT_FIELDS
            assert raw["encrypted_payload"] == b64(payload)
            assert (raw["device_seq"], raw["stream_seq"]) == (n, n)
            assert (raw["user_id"], raw["device_id"], raw["stream_id"], raw["type"]) == (
                key.public_hex, dev_a, "clipboard:main", "clipboard:text")

        for raw in events:  # a client acks what it received
            await b.ack(ReceivedEvent.from_wire(raw))
        again = await page(b, limit=10)
        assert again == EMPTY_REPLAY
        await assert_no_event(b)


async def test_sdk_replay_follows_tokens_and_second_replay_is_empty(daemon: Any) -> None:
    key = DeviceKey.generate()
    dev_a, dev_b = new_device_id(), new_device_id()
    await register(daemon.ws_url, key, dev_b)
    payloads = payloads_for("sdk", 25)
    async with connect(daemon.ws_url, key, dev_a) as a:
        acks = await send_all(a, payloads)
    async with connect(daemon.ws_url, key, dev_b) as b:
        result = await replay_all(b, limit=10)
        assert result.full_resync is None
        assert (result.pages, result.total_events) == (3, 25)
        assert [e.event_id for e in result.events] == [x.event_id for x in acks]
        assert [e.payload for e in result.events] == payloads
        assert [e.stream_seq for e in result.events] == list(range(1, 26))

        second = await replay_all(b, limit=10)  # everything was acked: the cursor moved past it
        assert (second.events, second.pages, second.total_events) == ([], 1, 0)


async def test_replay_excludes_own_events_and_new_device_replays_everything(daemon: Any) -> None:
    """Replay excludes the requesting device's own events (§6.3); C starts at 0 for a new device."""
    key = DeviceKey.generate()
    dev_a, dev_b, dev_c = new_device_id(), new_device_id(), new_device_id()
    await register(daemon.ws_url, key, dev_b)
    async with connect(daemon.ws_url, key, dev_a) as a:
        first = await send_all(a, [b"a-1", b"a-2"])
    async with connect(daemon.ws_url, key, dev_b) as b:
        # B has not replayed its backlog, so its cursor cannot move past its own events
        own = await send_all(b, [b"b-own-1", b"b-own-2"])
    async with connect(daemon.ws_url, key, dev_a) as a:
        last = await send_all(a, [b"a-3"])
    from_a = first + last
    async with connect(daemon.ws_url, key, dev_b) as b:
        result = await replay_all(b)
        assert result.total_events == 3
        assert [e.event_id for e in result.events] == [x.event_id for x in from_a]
        assert all(e.device_id == dev_a for e in result.events)
    async with connect(daemon.ws_url, key, dev_c) as c:  # brand-new device: everyone else's, in commit order
        result = await replay_all(c)
        assert result.total_events == 5
        assert [e.event_id for e in result.events] == [x.event_id for x in first + own + last]
        assert [e.payload for e in result.events] == [b"a-1", b"a-2", b"b-own-1", b"b-own-2", b"a-3"]


async def test_replay_parameters_at_top_level_and_in_payload(daemon: Any) -> None:
    key = DeviceKey.generate()
    dev_a, dev_b = new_device_id(), new_device_id()
    async with connect(daemon.ws_url, key, dev_a) as a:
        acks = await send_all(a, payloads_for("flat", 8))
    all_ids = [x.event_id for x in acks]

    async with connect(daemon.ws_url, key, dev_b) as b:
        flat1 = await page(b, limit=2, flat=True)
        assert (flat1["page_size"], flat1["has_more"], flat1["total_events"]) == (2, True, 8)
        assert ids(flat1["events"]) == all_ids[:2]
        flat2 = await page(b, limit=3, token=flat1["continuation_token"], flat=True)  # top-level token honoured
        assert ids(flat2["events"]) == all_ids[2:5]
        assert "total_events" not in flat2

    async with raw_session(daemon.ws_url, key, new_device_id()) as ws:  # a new device: its cursor is surely 0
        # payload wins over the top level when present and not null
        both = await raw_request(ws, {"type": "replay_request", "limit": 1,
                                      "payload": {"type": "replay_request", "limit": 4}})
        assert both["payload"]["page_size"] == 4
        assert ids(both["payload"]["events"]) == all_ids[:4]
        # a null payload value falls back to the top level
        null = await raw_request(ws, {"type": "replay_request", "limit": 3,
                                      "payload": {"type": "replay_request", "limit": None}})
        assert null["payload"]["page_size"] == 3
        assert ids(null["payload"]["events"]) == all_ids[:3]
        # token at the top level, limit in the payload
        mixed = await raw_request(ws, {"type": "replay_request", "continuation_token": both["payload"]["continuation_token"],
                                       "payload": {"type": "replay_request", "limit": 2}})
        assert "total_events" not in mixed["payload"]
        assert ids(mixed["payload"]["events"]) == all_ids[4:6]


async def test_limit_is_clamped_and_defaults(config_factory: Callable[..., Config]) -> None:
    config = config_factory(replay={"default_page_size": 3, "max_page_size": 5})
    key = DeviceKey.generate()
    dev_a, dev_b = new_device_id(), new_device_id()
    async with run_daemon(config) as (_, running):
        async with connect(running.ws_url, key, dev_a) as a:
            acks = await send_all(a, payloads_for("clamp", 8))
        all_ids = [x.event_id for x in acks]
        async with raw_session(running.ws_url, key, dev_b) as ws:
            cases: list[tuple[Any, int]] = [
                ("absent", 3), (100, 5), (5, 5), (4, 4), (0, 1), (-7, 1), (2.0, 2), (2.5, 3), ("4", 3), (True, 3),
            ]
            for limit, expected in cases:
                body: dict[str, Any] = {"type": "replay_request"}
                if limit != "absent":
                    body["limit"] = limit
                reply = await raw_request(ws, {"type": "replay_request", "payload": body})
                p = reply["payload"]
                assert p["page_size"] == expected, (limit, p["page_size"])
                assert ids(p["events"]) == all_ids[:expected], limit  # fresh, unconfirmed: always from the start
                assert p["total_events"] == 8
                assert p["has_more"] is True


async def test_invalid_continuation_token_is_served_as_fresh(daemon: Any) -> None:
    key, other_key = DeviceKey.generate(), DeviceKey.generate()
    dev_a, dev_b, dev_c = new_device_id(), new_device_id(), new_device_id()
    async with connect(daemon.ws_url, key, dev_a) as a:
        acks = await send_all(a, payloads_for("tok", 6))
    async with connect(daemon.ws_url, other_key, new_device_id()) as o:
        await send_all(o, payloads_for("other", 3))
    all_ids = [x.event_id for x in acks]

    async with connect(daemon.ws_url, key, dev_c) as c:  # a valid token, but for another device
        foreign = (await page(c, limit=2))["continuation_token"]
    async with connect(daemon.ws_url, other_key, new_device_id()) as o2:  # and one of another user
        other_user_token = (await page(o2, limit=1))["continuation_token"]

    async with connect(daemon.ws_url, key, dev_b) as b:
        first = await page(b, limit=2)
        valid = first["continuation_token"]
        _, mac = valid.split(".")
        forged_claims = base64.urlsafe_b64encode(
            json.dumps({"v": 1, "u": key.public_hex, "d": dev_b, "s": 4, "t": now_ms()}, separators=(",", ":")).encode()
        ).rstrip(b"=").decode()
        bad_tokens = [
            "garbage",
            "not.a.token",
            valid[:-2] + ("AA" if not valid.endswith("AA") else "BB"),  # signature tampered
            forged_claims + "." + mac,  # claims changed under the old signature
            valid + "x" * 1100,  # over 1024 characters
            foreign,
            other_user_token,
        ]
        for token in bad_tokens:
            p = await page(b, limit=2, token=token)
            assert p["total_events"] == 6, token  # a fresh request
            assert ids(p["events"]) == all_ids[:2], token
            assert p["has_more"] is True
        p = await page(b, limit=2, token=valid)  # the genuine token still continues after the first page
        assert "total_events" not in p
        assert ids(p["events"]) == all_ids[2:4]


async def test_unacknowledged_events_are_replayed_again(daemon: Any) -> None:
    """C only moves on confirmation (acks / next-page tokens): a client that did not ack gets them again."""
    key = DeviceKey.generate()
    dev_a, dev_b = new_device_id(), new_device_id()
    await register(daemon.ws_url, key, dev_b)
    async with connect(daemon.ws_url, key, dev_a) as a:
        backlog = await send_all(a, payloads_for("unacked", 5))
    async with connect(daemon.ws_url, key, dev_b) as b:
        result = await replay_all(b, ack=False)
        assert [e.event_id for e in result.events] == [x.event_id for x in backlog]
    async with connect(daemon.ws_url, key, dev_b) as b:
        result = await replay_all(b, ack=False)
        assert [e.event_id for e in result.events] == [x.event_id for x in backlog]
        assert result.total_events == 5

        # live deliveries that are not acked do not move the cursor either
        async with connect(daemon.ws_url, key, dev_a) as a:
            live = await send_all(a, payloads_for("live", 3))
        with trio.fail_after(WAIT):
            got = [await b.receive_event(ack=False) for _ in range(3)]
        assert [e.event_id for e in got] == [x.event_id for x in live]

    async with connect(daemon.ws_url, key, dev_b) as b:
        result = await replay_all(b)
        assert [e.event_id for e in result.events] == [x.event_id for x in backlog + live]
        assert result.total_events == 8


async def test_events_committed_during_replay_arrive_exactly_once(daemon: Any) -> None:
    """Replay covers (C, H], live covers > H: with A sending throughout B's connect and paging, B gets
    every event exactly once, replayed ones first in commit order, then the live ones in commit order."""
    key = DeviceKey.generate()
    dev_a, dev_b = new_device_id(), new_device_id()
    await register(daemon.ws_url, key, dev_b)
    sent: list[str] = []
    async with connect(daemon.ws_url, key, dev_a) as a:
        sent += [x.event_id for x in await send_all(a, payloads_for("backlog", 30))]

        replay_done = trio.Event()
        sender_done = trio.Event()

        async def sender() -> None:
            n = after_replay = 0
            while after_replay < 10:
                ack = await a.send_event("clipboard:main", "clipboard:text", f"during-{n}".encode())
                assert ack.status == "stored"
                sent.append(ack.event_id)  # type: ignore[arg-type]
                n += 1
                if replay_done.is_set():
                    after_replay += 1
                await trio.sleep(0.001)
            sender_done.set()

        with trio.fail_after(WAIT * 2):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                await trio.sleep(0.02)  # the sender is running while B connects
                async with connect(daemon.ws_url, key, dev_b) as b:
                    result = await b.replay(limit=4)
                    replay_done.set()
                    assert result.full_resync is None and result.pages >= 8
                    await sender_done.wait()
                    live: list[ReceivedEvent] = []
                    while len(result.events) + len(live) < len(sent):
                        live.append(await b.receive_event())
                    await assert_no_event(b)
        received = [e.event_id for e in result.events] + [e.event_id for e in live]
        assert len(received) == len(set(received)), "an event was delivered twice"
        assert received == sent  # none lost, none repeated, each path in commit order
        assert result.total_events == len(result.events)
        assert len(result.events) >= 30 and len(live) >= 10


# --- full resync ------------------------------------------------------------------------------------


async def test_full_resync_required_then_only_newer_events(config_factory: Callable[..., Config]) -> None:
    config = config_factory(replay={"full_resync_threshold": 5})
    key = DeviceKey.generate()
    dev_a, dev_b = new_device_id(), new_device_id()
    async with run_daemon(config) as (_, running):
        await register(running.ws_url, key, dev_b)
        async with connect(running.ws_url, key, dev_a) as a:
            await send_all(a, payloads_for("old", 8))
        async with connect(running.ws_url, key, dev_b) as b:
            with trio.fail_after(WAIT):
                msg = await b.replay_page(limit=3)
            assert msg == {"type": "full_resync_required", "payload": {
                "type": "full_resync_required", "reason": "too_many_events", "event_count": 8,
                "last_ack_device_seq": 0, "recommendation": "Clear local state and re-sync from scratch"}}
            assert await page(b, limit=3) == EMPTY_REPLAY  # C := H

        async with connect(running.ws_url, key, dev_a) as a:
            newer = await send_all(a, payloads_for("new", 2))
        async with connect(running.ws_url, key, dev_b) as b:  # the client cleared its state and reconnected
            result = await replay_all(b)
            assert result.full_resync is None
            assert [e.event_id for e in result.events] == [x.event_id for x in newer]
            assert result.total_events == 2


async def test_full_resync_threshold_is_exclusive_and_echo_is_optional(config_factory: Callable[..., Config]) -> None:
    config = config_factory(replay={"full_resync_threshold": 5})
    key = DeviceKey.generate()
    dev_a, dev_b = new_device_id(), new_device_id()
    async with run_daemon(config) as (_, running):
        async with connect(running.ws_url, key, dev_a) as a:
            acks = await send_all(a, payloads_for("five", 5))
        async with raw_session(running.ws_url, key, dev_b) as ws:
            reply = await raw_request(ws, {"type": "replay_request", "payload": {"type": "replay_request"}})
            assert reply["type"] == "replay_response"  # 5 is not more than 5
            assert reply["payload"]["total_events"] == 5
            assert ids(reply["payload"]["events"]) == [x.event_id for x in acks]
        async with connect(running.ws_url, key, dev_a) as a:
            await send_all(a, payloads_for("sixth", 1))
        async with raw_session(running.ws_url, key, new_device_id()) as ws:
            reply = await raw_request(ws, {"type": "replay_request", "payload": {"type": "replay_request"}})
            assert reply == {"type": "full_resync_required", "payload": {
                "type": "full_resync_required", "reason": "too_many_events", "event_count": 6,
                "recommendation": "Clear local state and re-sync from scratch"}}  # no number sent, none echoed


# --- TTL -----------------------------------------------------------------------------------------------


async def test_expired_events_are_neither_relayed_nor_replayed(daemon: Any) -> None:
    key = DeviceKey.generate()
    dev_a, dev_b = new_device_id(), new_device_id()
    async with connect(daemon.ws_url, key, dev_a) as a, connect(daemon.ws_url, key, dev_b) as b:
        future = now_ms() + 3_600_000
        with trio.fail_after(WAIT):
            plain = await a.send_event("s:1", "t:x", b"plain")
            # already past, but within the 5 min clock skew: accepted and stored, yet never delivered
            expired = await a.send_event("s:1", "t:x", b"expired", ttl=now_ms() - 60_000)
            later = await a.send_event("s:1", "t:x", b"later", ttl=future)
            zero = await a.send_event("s:1", "t:x", b"zero", ttl=0)
            too_old = await a.send_event("s:1", "t:x", b"too old", ttl=now_ms() - 3_600_000)
        assert [x.status for x in (plain, expired, later, zero)] == ["stored"] * 4
        assert (too_old.status, too_old.code, too_old.error) == (
            "rejected", "EVENT_EXPIRED", "Event TTL has expired (considering clock skew tolerance)")
        with trio.fail_after(WAIT):
            got = [await b.receive_event() for _ in range(3)]
        assert [e.event_id for e in got] == [plain.event_id, later.event_id, zero.event_id]
        assert got[1].raw["ttl"] == future
        assert "ttl" not in got[0].raw and "ttl" not in got[2].raw
        await assert_no_event(b)

        with trio.fail_after(WAIT):
            short = await a.send_event("s:1", "t:x", b"short-lived", ttl=now_ms() + 300)
        assert short.status == "stored"

    await trio.sleep(0.6)  # the short-lived event expires while nobody is connected
    async with connect(daemon.ws_url, key, new_device_id()) as c:
        result = await replay_all(c)
        assert [e.event_id for e in result.events] == [plain.event_id, later.event_id, zero.event_id]
        assert result.total_events == 3


# --- durability across restart ------------------------------------------------------------------------


async def test_backlog_cursor_and_dedup_survive_restart(config_factory: Callable[..., Config]) -> None:
    config = config_factory()
    key = DeviceKey.generate()
    dev_a, dev_b = new_device_id(), new_device_id()
    payloads = payloads_for("durable", 5)

    async with run_daemon(config) as (_, running):
        server_key = running.identity.public_hex
        await register(running.ws_url, key, dev_b)
        async with connect(running.ws_url, key, dev_a, pin=server_key) as a:
            acks = await send_all(a, payloads)

    async with run_daemon(config) as (_, running):
        assert running.identity.public_hex == server_key
        assert not running.identity_created
        async with connect(running.ws_url, key, dev_b, pin=server_key) as b:
            assert b.server_key == server_key
            result = await replay_all(b)
            assert [e.event_id for e in result.events] == [x.event_id for x in acks]
            assert [e.payload for e in result.events] == payloads
            assert [e.stream_seq for e in result.events] == [1, 2, 3, 4, 5]
            assert result.total_events == 5

            async with connect(running.ws_url, key, dev_a, pin=server_key) as a:
                assert a.last_ack_device_seq == 5
                with trio.fail_after(WAIT):
                    dup = await a.send_event("clipboard:main", "clipboard:text", payloads[2],
                                             event_id=acks[2].event_id, device_seq=3)
                    new = await a.send_event("clipboard:main", "clipboard:text", b"after restart")
                assert (dup.status, dup.event_id) == ("duplicate", acks[2].event_id)
                assert (new.status, new.device_seq) == ("stored", 6)
            with trio.fail_after(WAIT):
                live = await b.receive_event()
            assert (live.event_id, live.stream_seq, live.payload) == (new.event_id, 6, b"after restart")
            await assert_no_event(b)

    async with run_daemon(config) as (_, running):  # B acked all of it: nothing left to replay
        assert running.identity.public_hex == server_key
        async with connect(running.ws_url, key, dev_b, pin=server_key) as b:
            result = await replay_all(b)
            assert (result.events, result.total_events) == ([], 0)
