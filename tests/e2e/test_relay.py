"""End-to-end: live relay and deduplication (protocol.md §5), against the real daemon over loopback.

Every test starts an in-process daemon on ephemeral ports (``tests/conftest.py``) and drives it with
the Python SDK. Two devices of one user share a :class:`DeviceKey` and have distinct device ids.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Any

import pytest
import trio

from pocketbridge.client import (
    Client,
    Closed,
    DeviceKey,
    ReceivedEvent,
    connect,
    new_device_id,
    new_event_id,
)
from pocketbridge.config import Config
from tests.conftest import run_daemon

WAIT = 5  # seconds: the bound on every single wait in these tests
QUIET = 0.3  # seconds of silence that stand for "nothing else arrives"
CLOCK_SLACK_MS = 2_000

# §5.5: relayed events carry exactly these fields (plus "ttl" when the event has one).
EVENT_FIELDS = {
    "event_id", "user_id", "device_id", "device_seq", "stream_id", "stream_seq", "type", "encrypted_payload",
    "created_at",
}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def now_ms() -> int:
    return int(time.time() * 1000)


async def assert_no_event(client: Client, seconds: float = QUIET) -> None:
    """Nothing more is relayed to ``client`` (and its connection stays open)."""
    with trio.move_on_after(seconds):
        event = await client.receive_event(ack=False)
        raise AssertionError(f"unexpected event relayed: {event.raw}")


async def receive_n(client: Client, n: int, *, ack: bool = True) -> list[ReceivedEvent]:
    events = []
    with trio.fail_after(WAIT):
        for _ in range(n):
            events.append(await client.receive_event(ack=ack))
    return events


def assert_wire_event(
    event: ReceivedEvent,
    *,
    event_id: str,
    user_id: str,
    device_id: str,
    device_seq: int,
    stream_id: str,
    stream_seq: int,
    type_: str,
    payload: bytes,
    ttl: int | None = None,
    sent_between: tuple[int, int] | None = None,
) -> None:
    """The exact §5.5 shape: the stored fields and nothing else, ids lowercase, ttl only when set."""
    expected_keys = EVENT_FIELDS | ({"ttl"} if ttl is not None else set())
    assert set(event.raw) == expected_keys, f"relayed fields {sorted(event.raw)}"
    assert "server_seq" not in event.raw and "payload_size" not in event.raw
    assert event.raw["event_id"] == event_id.lower()
    assert event.raw["user_id"] == user_id.lower()
    assert event.raw["device_id"] == device_id.lower()
    assert event.raw["device_seq"] == device_seq
    assert event.raw["stream_id"] == stream_id
    assert event.raw["stream_seq"] == stream_seq
    assert event.raw["type"] == type_
    assert event.raw["encrypted_payload"] == b64(payload)
    assert event.payload == payload
    if ttl is not None:
        assert event.raw["ttl"] == ttl
    created = event.raw["created_at"]
    assert isinstance(created, int) and not isinstance(created, bool)
    if sent_between is not None:
        assert sent_between[0] - CLOCK_SLACK_MS <= created <= sent_between[1] + CLOCK_SLACK_MS


# --- relay -----------------------------------------------------------------------------------------


async def test_event_relayed_once_to_other_device_with_exact_fields(daemon: Any) -> None:
    key = DeviceKey.generate()
    dev_a, dev_b = new_device_id(), new_device_id()
    async with connect(daemon.ws_url, key, dev_a) as a, connect(daemon.ws_url, key, dev_b) as b:
        assert a.user_id == key.public_hex
        event_id = new_event_id()
        t0 = now_ms()
        with trio.fail_after(WAIT):
            ack = await a.send_event("clipboard:main", "clipboard:text", b"\x00ciphertext\xff", event_id=event_id)
        t1 = now_ms()
        assert ack.status == "stored"
        assert ack.device_seq == 1
        assert ack.event_id == event_id
        assert ack.code is None and ack.error is None

        [event] = await receive_n(b, 1)
        assert_wire_event(
            event, event_id=event_id, user_id=key.public_hex, device_id=dev_a, device_seq=1,
            stream_id="clipboard:main", stream_seq=1, type_="clipboard:text", payload=b"\x00ciphertext\xff",
            sent_between=(t0, t1),
        )
        # exactly once to B; never echoed to the sender, which only got its ack
        await assert_no_event(b)
        await assert_no_event(a, 0.05)


async def test_relay_normalises_ids_and_drops_client_only_keys(daemon: Any) -> None:
    """§5.1: ids stored lowercase, user_id filled/lowercased to U, server-assigned fields and unknown keys
    ignored, ttl 0 means none; the relayed event has exactly the stored fields."""
    key = DeviceKey.generate()
    dev_a, dev_b = new_device_id(), new_device_id()
    async with connect(daemon.ws_url, key, dev_a) as a, connect(daemon.ws_url, key, dev_b) as b:
        first, second = new_event_id(), new_event_id()
        base = {
            "device_id": dev_a.upper(),
            "stream_id": "notes:Main_1",
            "type": "note:update",
            "encrypted_payload": b64(b"abc"),
            "stream_seq": 999,
            "created_at": 5,
            "server_seq": 77,
            "payload_size": 1234,
            "extra": {"nested": True},
        }
        await a.send_raw({"type": "event", "payload": {**base, "event_id": first.upper(), "user_id": key.public_hex.upper(),
                                                        "device_seq": 1, "ttl": 0}})
        await a.send_raw({"type": "event", "payload": {**base, "event_id": second, "device_seq": 2.0, "ttl": None}})
        with trio.fail_after(WAIT):  # processed in order, so this ack comes after the two raw events'
            ack = await a.send_event("notes:Main_1", "note:update", b"third", device_seq=3)
        assert ack.status == "stored"

        events = await receive_n(b, 3)
        assert [e.event_id for e in events] == [first, second, ack.event_id]
        for n, event in enumerate(events[:2], start=1):
            assert_wire_event(
                event, event_id=(first, second)[n - 1], user_id=key.public_hex, device_id=dev_a, device_seq=n,
                stream_id="notes:Main_1", stream_seq=n, type_="note:update", payload=b"abc",
            )
            assert isinstance(event.raw["device_seq"], int)
        assert events[2].stream_seq == 3
        await assert_no_event(b)


async def test_ttl_relayed_only_when_set(daemon: Any) -> None:
    key = DeviceKey.generate()
    async with connect(daemon.ws_url, key, new_device_id()) as a, connect(daemon.ws_url, key, new_device_id()) as b:
        ttl = now_ms() + 3_600_000
        with trio.fail_after(WAIT):
            acks = [
                await a.send_event("s:1", "t:x", b"with ttl", ttl=ttl),
                await a.send_event("s:1", "t:x", b"without ttl"),
            ]
        assert [x.status for x in acks] == ["stored", "stored"]
        with_ttl, without = await receive_n(b, 2)
        assert with_ttl.raw["ttl"] == ttl and with_ttl.ttl == ttl
        assert set(with_ttl.raw) == EVENT_FIELDS | {"ttl"}
        assert "ttl" not in without.raw and set(without.raw) == EVENT_FIELDS


async def test_stream_seq_is_per_user_and_stream(daemon: Any) -> None:
    alice, bob = DeviceKey.generate(), DeviceKey.generate()
    async with (
        connect(daemon.ws_url, alice, new_device_id()) as a1,
        connect(daemon.ws_url, alice, new_device_id()) as a2,
        connect(daemon.ws_url, bob, new_device_id()) as b1,
        connect(daemon.ws_url, bob, new_device_id()) as b2,
    ):
        with trio.fail_after(WAIT):
            for stream in ("clipboard:main", "clipboard:main", "files:main", "clipboard:main"):
                assert (await a1.send_event(stream, "t:x", b"x")).status == "stored"
            # a2 writes to the same stream: the counter is the user's, not the device's
            assert (await a2.send_event("clipboard:main", "t:x", b"y")).status == "stored"
            # another user's counter on the same stream id starts at 1
            assert (await b1.send_event("clipboard:main", "t:x", b"z")).status == "stored"
        got = await receive_n(a2, 4)
        assert [(e.stream_id, e.stream_seq) for e in got] == [
            ("clipboard:main", 1), ("clipboard:main", 2), ("files:main", 1), ("clipboard:main", 3),
        ]
        [from_a2] = await receive_n(a1, 1)
        assert (from_a2.stream_id, from_a2.stream_seq, from_a2.payload) == ("clipboard:main", 4, b"y")
        [bobs] = await receive_n(b2, 1)
        assert (bobs.user_id, bobs.stream_id, bobs.stream_seq, bobs.payload) == (bob.public_hex, "clipboard:main", 1, b"z")
        for client in (a1, a2, b1, b2):
            await assert_no_event(client, 0.1)


async def test_three_devices_each_other_gets_it_once_and_other_users_nothing(daemon: Any) -> None:
    alice, mallory = DeviceKey.generate(), DeviceKey.generate()
    dev_a = new_device_id()
    async with (
        connect(daemon.ws_url, alice, dev_a) as a,
        connect(daemon.ws_url, alice, new_device_id()) as b,
        connect(daemon.ws_url, alice, new_device_id()) as c,
        connect(daemon.ws_url, mallory, new_device_id()) as m,
    ):
        payloads = [b"one", b"two", b"three"]
        with trio.fail_after(WAIT):
            acks = [await a.send_event("clipboard:main", "clipboard:text", p) for p in payloads]
        assert [x.status for x in acks] == ["stored"] * 3
        for receiver in (b, c):
            got = await receive_n(receiver, 3)
            assert [e.payload for e in got] == payloads
            assert [e.event_id for e in got] == [x.event_id for x in acks]
            assert [e.device_seq for e in got] == [1, 2, 3]
            assert all(e.device_id == dev_a and e.user_id == alice.public_hex for e in got)
        for client in (b, c, m, a):
            await assert_no_event(client, 0.15)


async def test_200_windowed_events_arrive_in_order_exactly_once(daemon: Any) -> None:
    key = DeviceKey.generate()
    dev_a = new_device_id()
    total, window = 200, 50
    payloads = [f"event {i:03d}".encode() for i in range(total)]
    async with connect(daemon.ws_url, key, dev_a) as a, connect(daemon.ws_url, key, new_device_id()) as b:
        received: list[ReceivedEvent] = []

        async def collect() -> None:
            while len(received) < total:
                received.append(await b.receive_event())

        acks = []
        with trio.fail_after(WAIT * 2):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(collect)
                in_flight: list[tuple[int, str, Any]] = []
                for payload in payloads:
                    in_flight.append(await a.post_event("bulk:main", "bulk:item", payload))
                    if len(in_flight) >= window:
                        seq, eid, pending = in_flight.pop(0)
                        acks.append((eid, await a.wait_ack(seq, pending)))
                for seq, eid, pending in in_flight:
                    acks.append((eid, await a.wait_ack(seq, pending)))
        assert [ack.status for _, ack in acks] == ["stored"] * total
        assert [ack.device_seq for _, ack in acks] == list(range(1, total + 1))
        assert all(ack.event_id == eid for eid, ack in acks)

        assert len(received) == total
        assert [e.payload for e in received] == payloads
        assert [e.event_id for e in received] == [eid for eid, _ in acks]
        assert [e.device_seq for e in received] == list(range(1, total + 1))
        assert [e.stream_seq for e in received] == list(range(1, total + 1))
        assert len({e.event_id for e in received}) == total
        created = [e.created_at for e in received]
        assert created == sorted(created)
        await assert_no_event(b)
        await assert_no_event(a, 0.05)


# --- deduplication (§5.4) ------------------------------------------------------------------------


async def test_resending_identical_event_is_duplicate_and_not_relayed(daemon: Any) -> None:
    key = DeviceKey.generate()
    async with connect(daemon.ws_url, key, new_device_id()) as a, connect(daemon.ws_url, key, new_device_id()) as b:
        event_id = new_event_id()
        with trio.fail_after(WAIT):
            first = await a.send_event("clipboard:main", "clipboard:text", b"same", event_id=event_id, device_seq=1)
        assert (first.status, first.device_seq, first.event_id) == ("stored", 1, event_id)
        [event] = await receive_n(b, 1)
        assert event.event_id == event_id

        for _ in range(2):  # e.g. an outbox resent after a lost ack
            with trio.fail_after(WAIT):
                again = await a.send_event("clipboard:main", "clipboard:text", b"same", event_id=event_id, device_seq=1)
            assert (again.status, again.device_seq, again.event_id) == ("duplicate", 1, event_id)
            assert again.code is None and again.error is None
        await assert_no_event(b)

        with trio.fail_after(WAIT):  # the stream counter was not consumed by the duplicates
            nxt = await a.send_event("clipboard:main", "clipboard:text", b"next", device_seq=2)
        assert nxt.status == "stored"
        [after] = await receive_n(b, 1)
        assert (after.event_id, after.stream_seq) == (nxt.event_id, 2)
        await assert_no_event(b)


async def test_same_event_id_with_new_device_seq_is_duplicate(daemon: Any) -> None:
    key = DeviceKey.generate()
    dev_a = new_device_id()
    event_id = new_event_id()
    async with connect(daemon.ws_url, key, dev_a) as a, connect(daemon.ws_url, key, new_device_id()) as b:
        with trio.fail_after(WAIT):
            first = await a.send_event("s:1", "t:x", b"payload", event_id=event_id, device_seq=1)
            second = await a.send_event("s:1", "t:x", b"payload", event_id=event_id, device_seq=2)
        assert first.status == "stored"
        assert (second.status, second.device_seq, second.event_id) == ("duplicate", 2, event_id)
        [event] = await receive_n(b, 1)
        assert (event.event_id, event.device_seq) == (event_id, 1)
        await assert_no_event(b)
    # the duplicate stored nothing: the highest stored device_seq is still 1
    async with connect(daemon.ws_url, key, dev_a) as again:
        assert again.last_ack_device_seq == 1


async def test_reused_device_seq_with_other_event_id_closes_with_conflict(daemon: Any) -> None:
    key = DeviceKey.generate()
    dev_a = new_device_id()
    async with connect(daemon.ws_url, key, dev_a) as a, connect(daemon.ws_url, key, new_device_id()) as b:
        with trio.fail_after(WAIT):
            stored = await a.send_event("s:1", "t:x", b"original", device_seq=5)
        assert stored.status == "stored"
        [event] = await receive_n(b, 1)
        assert event.event_id == stored.event_id

        with trio.fail_after(WAIT), pytest.raises(Closed) as closed:
            await a.send_event("s:1", "t:x", b"impostor", device_seq=5)  # no ack: the connection is closed
        assert (closed.value.code, closed.value.reason) == (1008, "Device sequence conflict")
        assert (a.close_code, a.close_reason) == (1008, "Device sequence conflict")
        await assert_no_event(b)

    async with connect(daemon.ws_url, key, dev_a) as a2:
        assert a2.last_ack_device_seq >= 5
        with trio.fail_after(WAIT):
            fresh = await a2.send_event("s:1", "t:x", b"after reconnect")  # numbered above last_ack_device_seq
        assert fresh.status == "stored" and fresh.device_seq > 5


async def test_device_seq_need_not_be_contiguous(daemon: Any) -> None:
    key = DeviceKey.generate()
    dev_a = new_device_id()
    async with connect(daemon.ws_url, key, dev_a) as a, connect(daemon.ws_url, key, new_device_id()) as b:
        with trio.fail_after(WAIT):
            high = await a.send_event("s:1", "t:x", b"ten", device_seq=10)
            low = await a.send_event("s:1", "t:x", b"three", device_seq=3)
        assert (high.status, low.status) == ("stored", "stored")
        got = await receive_n(b, 2)
        assert [(e.device_seq, e.payload) for e in got] == [(10, b"ten"), (3, b"three")]
    async with connect(daemon.ws_url, key, dev_a) as a2:
        assert a2.last_ack_device_seq == 10


async def test_dedup_is_durable_across_reconnect_and_restart(config_factory: Callable[..., Config]) -> None:
    config = config_factory()
    key = DeviceKey.generate()
    dev_a, dev_b = new_device_id(), new_device_id()
    first, second = new_event_id(), new_event_id()

    async with run_daemon(config) as (_, running):
        async with connect(running.ws_url, key, dev_a) as a:
            with trio.fail_after(WAIT):
                assert (await a.send_event("s:1", "t:x", b"one", event_id=first, device_seq=1)).status == "stored"
                assert (await a.send_event("s:1", "t:x", b"two", event_id=second, device_seq=2)).status == "stored"
        async with connect(running.ws_url, key, dev_a) as a:  # another connection: dedup is not per connection
            with trio.fail_after(WAIT):
                ack = await a.send_event("s:1", "t:x", b"one", event_id=first, device_seq=1)
            assert (ack.status, ack.event_id) == ("duplicate", first)

    async with (
        run_daemon(config) as (_, running),
        connect(running.ws_url, key, dev_a) as a,
        connect(running.ws_url, key, dev_b) as b,
    ):
        assert a.last_ack_device_seq == 2
        with trio.fail_after(WAIT):
            same = await a.send_event("s:1", "t:x", b"one", event_id=first, device_seq=1)
            moved = await a.send_event("s:1", "t:x", b"two", event_id=second, device_seq=7)
        assert (same.status, same.device_seq, same.event_id) == ("duplicate", 1, first)
        assert (moved.status, moved.device_seq, moved.event_id) == ("duplicate", 7, second)
        await assert_no_event(b)

        with trio.fail_after(WAIT), pytest.raises(Closed) as closed:
            await a.send_event("s:1", "t:x", b"conflict", device_seq=2)
        assert (closed.value.code, closed.value.reason) == (1008, "Device sequence conflict")
        await assert_no_event(b)
