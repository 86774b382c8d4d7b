"""Spec statements about the connection itself, end to end (protocol.md §1.4, §5.5, §5.6, §5.7).

* §1.4: control frames (ping, close) are answered while a message is still arriving in fragments, and while
  a big event is held up in the store (PostgreSQL: its user row locked by the test).
* §5.5: the ``[ws] send_queue_bytes`` bound closes a receiver that stops reading with 1013; replay recovers.
* §5.6: the web client's ack form (``device_seq`` only, earliest match) moves the delivery cursor.
* §5.7: ``scratchpad_sync`` forwarding (other devices of the user, any JSON, all instances) and its per-second
  limit (dropped messages are counted).

Also home of :func:`metric_value`, used by the other ``test_spec_*`` modules.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionClosed
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from pocketbridge.app import Running
from pocketbridge.client import Client, DeviceKey, connect, new_device_id
from pocketbridge.config import Config, load_config, with_overrides
from pocketbridge.errors import ConfigError
from tests.conftest import make_config, run_daemon
from tests.e2e.rawclient import (
    GENEROUS_LIMITS,
    TIMEOUT,
    RawHandshake,
    WireSocket,
    dumps,
    e2e_config,
    event_body,
    open_ws,
    recv_json,
    send,
)

QUIET = 0.3  # seconds of silence that stand for "nothing else arrives"
TEXT, CONTINUATION, CLOSE, PING = 0x1, 0x0, 0x8, 0x9


async def metric_value(running: Running, name: str, **labels: str) -> float:
    """One sample of the daemon's ``/metrics`` (0.0 when the series does not exist yet)."""
    async with httpx.AsyncClient(base_url=running.http_url, timeout=TIMEOUT) as http:
        r = await http.get("/metrics")
    assert r.status_code == 200, r.text
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def local_config(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    """SQLite config for statements that do not depend on the backend (generous per-address limits)."""
    merged: dict[str, dict[str, Any]] = {"limits": dict(GENEROUS_LIMITS)}
    for name, values in sections.items():
        merged[name] = {**merged.get(name, {}), **values}
    return make_config(tmp_path / "data", **merged)


async def next_control(sock: WireSocket, timeout: float = 2.0) -> Pong | CloseConnection:
    """The next pong or close frame the server sends; any message before it is a failure."""
    with trio.fail_after(timeout):
        while True:
            for event in sock.ws.events():
                if isinstance(event, (Pong, CloseConnection)):
                    return event
                if isinstance(event, Ping):
                    await sock.send_raw(sock.ws.send(event.response()))
                elif isinstance(event, (TextMessage, BytesMessage)):
                    raise AssertionError(f"a message arrived before the control frame: {event.data!r:.200}")
            data = await sock.stream.receive_some(65536)
            if not data:
                raise AssertionError("the connection ended without a control frame")
            sock.ws.receive_data(data)


def big_event(hs: RawHandshake, device_seq: int, size: int) -> tuple[dict[str, Any], bytes]:
    body = event_body(hs.key.public_hex, hs.device_id, device_seq,
                      encrypted_payload=base64.b64encode(bytes(range(256)) * (size // 256)).decode())
    return body, dumps({"type": "event", "payload": body}).encode()


# --- §1.4 control frames during processing ------------------------------------------------------------
async def test_ping_is_answered_while_a_fragmented_message_is_arriving(tmp_path: Path) -> None:
    async with run_daemon(local_config(tmp_path)) as (_, running), WireSocket.open(running.ws_url) as sock:
        hs = RawHandshake(sock, DeviceKey.generate())
        await hs.run()
        body, data = big_event(hs, 1, 4 * 1024 * 1024)
        half = len(data) // 2
        await sock.send_frame(TEXT, data[:half], fin=False)
        await sock.send_frame(PING, b"mid-message")
        pong = await next_control(sock)
        assert isinstance(pong, Pong) and pong.payload == b"mid-message"
        await sock.send_frame(CONTINUATION, data[half:-10], fin=False)
        await sock.send_frame(PING, b"again")
        pong = await next_control(sock)
        assert isinstance(pong, Pong) and pong.payload == b"again"
        await sock.send_frame(CONTINUATION, data[-10:])
        # the message itself, reassembled, is processed as usual
        ack = await recv_json(sock)
        assert ack == {"type": "ack", "payload": {"device_seq": 1, "event_id": body["event_id"], "status": "stored"}}


async def test_close_is_answered_while_a_fragmented_message_is_arriving(tmp_path: Path) -> None:
    async with run_daemon(local_config(tmp_path)) as (_, running), WireSocket.open(running.ws_url) as sock:
        hs = RawHandshake(sock, DeviceKey.generate())
        await hs.run()
        _, data = big_event(hs, 1, 1024 * 1024)
        await sock.send_frame(TEXT, data[: len(data) // 2], fin=False)
        await sock.send_frame(CLOSE, (1000).to_bytes(2, "big") + b"bye")
        close = await next_control(sock)
        assert isinstance(close, CloseConnection)
        assert close.code == 1000


@pytest.mark.postgres
@pytest.mark.redis
async def test_ping_and_close_are_answered_while_an_event_is_being_stored(
    tmp_path: Path, postgres_dsn: str, redis_url: str
) -> None:
    """The test holds the user's row lock, so storing the event (§5.4) waits; control frames do not."""
    config = local_config(tmp_path, storage={"backend": "postgres", "dsn": postgres_dsn},
                          bus={"backend": "redis", "url": redis_url})
    key = DeviceKey.generate()
    async with run_daemon(config) as (_, running):
        lock = await trio.to_thread.run_sync(psycopg.connect, postgres_dsn)
        try:
            async with open_ws(running.ws_url) as ws:
                hs = RawHandshake(ws, key)
                await hs.run()
                await trio.to_thread.run_sync(
                    lock.execute, "SELECT 1 FROM users WHERE user_id = %s FOR UPDATE", (key.public_hex,))
                body, data = big_event(hs, 1, 4 * 1024 * 1024)
                await send(ws, data.decode())
                with trio.fail_after(2):
                    await ws.ping(b"while storing")  # returns when the pong arrives
                    await ws.ping(b"and again")
                with trio.move_on_after(QUIET):
                    early = await ws.get_message()
                    raise AssertionError(f"the event was acked although its store transaction waits: {early!r:.200}")
                await trio.to_thread.run_sync(lock.rollback)
                ack = await recv_json(ws)
                assert ack == {"type": "ack",
                               "payload": {"device_seq": 1, "event_id": body["event_id"], "status": "stored"}}

            async with open_ws(running.ws_url) as ws:
                hs = RawHandshake(ws, key, hs.device_id)
                await hs.run()
                await trio.to_thread.run_sync(
                    lock.execute, "SELECT 1 FROM users WHERE user_id = %s FOR UPDATE", (key.public_hex,))
                await send(ws, big_event(hs, 2, 1024 * 1024)[1].decode())
                await trio.sleep(0.1)  # the server has taken the event and waits for the store
                started = trio.current_time()
                with trio.fail_after(2):
                    await ws.aclose(1000, "bye")  # returns once the server's close frame arrived
                assert trio.current_time() - started < 1.5
                assert ws.closed is not None and ws.closed.code == 1000
                await trio.to_thread.run_sync(lock.rollback)
        finally:
            await trio.to_thread.run_sync(lock.close)


# --- §5.5 the send queue's byte bound -----------------------------------------------------------------
async def test_send_queue_bytes_bound_closes_a_receiver_that_stops_reading(tmp_path: Path) -> None:
    """Far fewer messages than ``send_queue_messages`` are queued when the byte bound is hit: B is closed
    with 1013, the sender is never held up, and B catches up by replay without losing anything."""
    queue_messages, queue_bytes = 1000, 1024 * 1024
    config = local_config(tmp_path, ws={"send_queue_messages": queue_messages, "send_queue_bytes": queue_bytes},
                          replay={"max_page_bytes": queue_bytes // 2},  # a replay page must fit in the queue
                          events={"max_payload_bytes": 512 * 1024})  # and so must one relayed event
    key = DeviceKey.generate()
    dev_a, dev_b = new_device_id(), new_device_id()
    payload = bytes(range(256)) * 1024  # 256 KiB per event (about 350 kB relayed)
    sent: list[str] = []
    async with run_daemon(config) as (_, running), connect(running.ws_url, key, dev_a) as a:
        async with WireSocket.open(running.ws_url) as b:
            await RawHandshake(b, key, dev_b).run()  # then B never reads
            with trio.fail_after(TIMEOUT):
                assert (await a.next_notice("device_status_changed"))["payload"]["is_online"] is True
            offline = None
            while offline is None and len(sent) < 200:
                with trio.fail_after(2):  # the slow reader never holds the sender up
                    ack = await a.send_event("files:main", "file:chunk", payload)
                assert ack.status == "stored"
                sent.append(ack.event_id)  # type: ignore[arg-type]
                try:
                    offline = a.notices.receive_nowait()
                except trio.WouldBlock:
                    pass
            if offline is None:
                with trio.fail_after(TIMEOUT):
                    offline = await a.next_notice("device_status_changed")
            assert offline["payload"] == {**offline["payload"], "device_id": dev_b, "is_online": False}
            assert len(sent) < queue_messages // 4, "closed by the message bound, not the byte bound"
            assert await metric_value(running, "pocketbridge_send_buffer_overflow_closes_total") == 1
            assert await metric_value(running, "pocketbridge_closes_total", code="1013") == 1

            received: list[str] = []
            with trio.fail_after(TIMEOUT * 2):
                while True:
                    try:
                        msg = json.loads(await b.get_message())
                    except ConnectionClosed as exc:
                        closed = exc.reason
                        break
                    assert msg["type"] == "event", msg
                    received.append(msg["payload"]["event_id"])
            assert closed is not None and (closed.code, closed.reason) == (1013, "Try again later"), closed
            print(f"sent {len(sent)}, received {len(received)}")
            assert received == sent[: len(received)] and len(received) < len(sent)

        async with connect(running.ws_url, key, dev_b) as b2:
            with trio.fail_after(TIMEOUT):
                result = await b2.replay(limit=1000)
            assert [e.event_id for e in result.events] == sent


# --- §5.6 the web client's ack form ---------------------------------------------------------------------
async def ack_seq(client: Client, device_seq: int) -> None:
    """An ack as existing web clients send it: ``device_seq`` only."""
    await client.send_raw({"type": "ack", "payload": {"device_seq": device_seq}})


async def test_device_seq_only_acks_match_the_earliest_delivery_and_move_the_cursor(
    config_factory: Callable[..., Config],
) -> None:
    """Laptop and tablet both number their events 1, 2; the phone acks by ``device_seq`` only.

    Live: one ack of 1 matches the laptop's event 1 (delivered first), so after a reconnect only the
    three others are replayed. Replay: acks of 1, 2, 2 match all three (earliest first), so the page is
    confirmed and the next replay is empty."""
    key = DeviceKey.generate()
    phone, laptop, tablet = new_device_id(), new_device_id(), new_device_id()
    async with run_daemon(e2e_config(config_factory)) as (_, running):
        url = running.ws_url
        with trio.fail_after(TIMEOUT * 3):
            async with connect(url, key, phone, ack_event_ids=False) as p:
                order = []
                async with connect(url, key, laptop) as lap, connect(url, key, tablet) as tab:
                    for sender in (lap, tab, lap, tab):
                        ack = await sender.send_event("clipboard:main", "clipboard:text", b"x")
                        assert ack.status == "stored"
                        order.append(ack.event_id)
                got = [await p.receive_event(ack=False) for _ in range(4)]
                assert [e.event_id for e in got] == order
                assert [e.device_seq for e in got] == [1, 1, 2, 2]
                await ack_seq(p, 1)
                await ack_seq(p, 99)  # matches nothing: ignored
                assert await p.ping() > 0  # the acks were processed (in order, before the ping)

            async with connect(url, key, phone, ack_event_ids=False) as p:
                page = (await p.replay_page(limit=100))["payload"]
                assert [e["event_id"] for e in page["events"]] == order[1:]
                assert page["total_events"] == 3 and page["has_more"] is False
                for seq in (1, 2, 2):
                    await ack_seq(p, seq)
                assert await p.ping() > 0

            async with connect(url, key, phone, ack_event_ids=False) as p:
                page = (await p.replay_page(limit=100))["payload"]
                assert page == {"type": "replay_response", "events": [], "has_more": False, "page_size": 0,
                                "total_events": 0}
                # and the same holds live: acked by device_seq, never replayed again
                async with connect(url, key, laptop) as lap:
                    ack = await lap.send_event("clipboard:main", "clipboard:text", b"y")
                event = await p.receive_event(ack=False)
                assert event.event_id == ack.event_id
                await ack_seq(p, ack.device_seq)
                assert await p.ping() > 0

            async with connect(url, key, phone, ack_event_ids=False) as p:
                assert (await p.replay()).events == []


# --- §5.7 scratchpad_sync -------------------------------------------------------------------------------
SCRATCHPADS = [
    {"text": "héllo ✓", "cursor": {"line": 3, "col": 7}, "tags": ["a", None, 1.5, True]},
    "a bare string",
    [1, 2, 3],
    12345,
]


async def next_message(client: Client, kind: str) -> dict[str, Any]:
    with trio.fail_after(TIMEOUT):
        return await client.next_notice(kind)


async def no_message(client: Client, kind: str, seconds: float = QUIET) -> None:
    with trio.move_on_after(seconds):
        msg = await client.next_notice(kind)
        raise AssertionError(f"unexpected {kind}: {msg}")


async def test_scratchpad_sync_is_forwarded_unchanged_to_the_users_other_devices(
    config_factory: Callable[..., Config],
) -> None:
    key, stranger = DeviceKey.generate(), DeviceKey.generate()
    async with run_daemon(e2e_config(config_factory)) as (_, running):
        url = running.ws_url
        async with connect(url, key, new_device_id()) as a, connect(url, key, new_device_id()) as b, \
                connect(url, stranger, new_device_id()) as s:
            for payload in SCRATCHPADS:
                await a.send_raw({"type": "scratchpad_sync", "payload": payload})
                assert await next_message(b, "scratchpad_sync") == {"type": "scratchpad_sync", "payload": payload}
            await no_message(a, "scratchpad_sync")  # not echoed to the sender
            await no_message(s, "scratchpad_sync")  # nor sent to another user
            # not stored, not replayed
            async with connect(url, key, new_device_id()) as c:
                assert (await c.replay()).events == []


async def test_scratchpad_sync_beyond_the_per_second_limit_is_dropped_and_counted(tmp_path: Path) -> None:
    rate = 2
    config = local_config(tmp_path, limits={"scratchpad_per_connection_per_second": rate})
    key = DeviceKey.generate()
    async with run_daemon(config) as (_, running):
        async with connect(running.ws_url, key, new_device_id()) as a, \
                connect(running.ws_url, key, new_device_id()) as b:
            burst = 8
            started = trio.current_time()
            for n in range(burst):
                await a.send_raw({"type": "scratchpad_sync", "payload": {"n": n}})
            assert await a.ping() > 0  # all processed
            elapsed = trio.current_time() - started
            await trio.sleep(1.0)  # a full second's budget again
            await a.send_raw({"type": "scratchpad_sync", "payload": {"n": "marker"}})
            forwarded = []
            while True:
                msg = await next_message(b, "scratchpad_sync")
                if msg["payload"]["n"] == "marker":
                    break
                forwarded.append(msg["payload"]["n"])
            # the first ones pass, the rest of the burst is dropped (the bucket refills at `rate` per second)
            assert len(forwarded) >= rate
            assert len(forwarded) <= rate + int(elapsed * rate), (forwarded, elapsed)
            assert forwarded == list(range(len(forwarded)))
            assert await metric_value(running, "pocketbridge_scratchpad_dropped_total") == burst - len(forwarded)
            # the limit is per connection: the other device still has its budget
            await b.send_raw({"type": "scratchpad_sync", "payload": {"from": "b"}})
            assert (await next_message(a, "scratchpad_sync"))["payload"] == {"from": "b"}


@pytest.mark.postgres
@pytest.mark.redis
async def test_scratchpad_sync_reaches_devices_on_other_instances(
    tmp_path: Path, postgres_dsn: str, redis_url: str
) -> None:
    def config(name: str) -> Config:
        return local_config(tmp_path / name, storage={"backend": "postgres", "dsn": postgres_dsn},
                            bus={"backend": "redis", "url": redis_url})

    key = DeviceKey.generate()
    async with run_daemon(config("one")) as (_, one), run_daemon(config("two")) as (_, two):
        async with connect(one.ws_url, key, new_device_id()) as a, connect(two.ws_url, key, new_device_id()) as b:
            await a.send_raw({"type": "scratchpad_sync", "payload": SCRATCHPADS[0]})
            assert await next_message(b, "scratchpad_sync") == {"type": "scratchpad_sync", "payload": SCRATCHPADS[0]}
            await no_message(a, "scratchpad_sync")


@pytest.mark.parametrize(
    "sections",
    [
        {"ws": {"send_queue_bytes": 1024 * 1024}},  # the default replay page is 8 MiB
        {"ws": {"send_queue_bytes": 4 * 1024 * 1024}, "replay": {"max_page_bytes": 1024 * 1024}},  # 10 MiB events
    ],
    ids=["below-a-replay-page", "below-one-event"],
)
def test_a_send_queue_too_small_for_one_message_is_refused_by_the_config(sections: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="send_queue_bytes"):
        with_overrides(load_config(None, env={}), **sections)
