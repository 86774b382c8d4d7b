"""Pipelined ingest (§5.4): a connection's next events enter the writer before the previous ack is back,
yet acks keep the order of the events, other replies wait their turn, and after a conflict nothing later
from that connection commits. Runs on the embedded default and on PostgreSQL + Redis."""

from __future__ import annotations

import httpx
import pytest
import trio

from pocketbridge.client import DeviceKey, new_event_id
from pocketbridge.errors import SEQUENCE_CONFLICT
from pocketbridge.gateway.session import EVENTS_IN_FLIGHT
from tests.e2e.rawclient import established, event_body, expect_close, recv_json, send

pytestmark = pytest.mark.usefixtures("daemon")

BURST = EVENTS_IN_FLIGHT * 2 + 5  # more than may wait at once: the reader waits for room too


async def test_a_burst_is_acked_in_order_with_other_replies_in_turn(daemon) -> None:  # type: ignore[no-untyped-def]
    async with established(daemon.ws_url) as (ws, hs):
        user, device = hs.key.public_hex, hs.device_id
        sent: list[tuple[int, str]] = []
        for seq in range(1, BURST + 1):
            body = event_body(user, device, seq)
            sent.append((seq, body["event_id"]))
            await send(ws, {"type": "event", "payload": body})
            if seq == 10:  # the same event again while earlier ones may still wait: a duplicate, in turn
                await send(ws, {"type": "event", "payload": body})
                sent.append((seq, body["event_id"]))
            if seq == 20:  # refused by validation at once: its rejection still waits its turn
                await send(ws, {"type": "event", "payload": event_body(user, device, 0)})
                sent.append((0, ""))
        await send(ws, {"type": "ping", "payload": {"timestamp": 1}})
        replies = [await recv_json(ws) for _ in range(len(sent) + 1)]
    assert replies[-1]["type"] == "pong"
    kinds = [r["type"] for r in replies[:-1]]
    assert kinds == ["error" if seq == 0 else "ack" for seq, _ in sent]  # the invalid event's error in its turn
    acks = [r["payload"] for r in replies[:-1] if r["type"] == "ack"]
    assert [(a["device_seq"], a["event_id"]) for a in acks] == [(seq, eid) for seq, eid in sent if seq]
    statuses = [a["status"] for a in acks]
    assert statuses.count("stored") == BURST and statuses[10] == "duplicate"  # right after seq 10's ack


async def test_after_a_conflict_nothing_later_from_the_connection_commits(daemon) -> None:  # type: ignore[no-untyped-def]
    key = DeviceKey.generate()
    for attempt in range(4):  # the conflict lands in the batch of the events around it, or in its own
        async with established(daemon.ws_url, key) as (ws, hs):
            user, device = hs.key.public_hex, hs.device_id
            first = event_body(user, device, 1)
            await send(ws, {"type": "event", "payload": first})
            assert (await recv_json(ws))["payload"]["status"] == "stored"
            for seq in (2, 3):
                await send(ws, {"type": "event", "payload": event_body(user, device, seq)})
            await send(ws, {"type": "event", "payload": event_body(user, device, 1, event_id=new_event_id())})
            for seq in (4, 5, 6):
                await send(ws, {"type": "event", "payload": event_body(user, device, seq)})
            assert [(await recv_json(ws))["payload"]["device_seq"] for _ in range(2)] == [2, 3]
            assert await expect_close(ws) == (SEQUENCE_CONFLICT.code, SEQUENCE_CONFLICT.reason)
        await trio.sleep(0.2)
        async with established(daemon.ws_url, key, device) as (ws, hs):
            # nothing after the conflict was stored: the device's last stored seq is still 3
            assert hs.established["payload"]["last_ack_device_seq"] == 3, attempt


def write_batches(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith('pocketbridge_store_query_seconds_count{kind="write_batch"}'):
            return float(line.split()[-1])
    raise AssertionError("no write_batch count in /metrics")


async def test_one_connection_s_burst_shares_write_batches(daemon) -> None:  # type: ignore[no-untyped-def]
    """The point of it: one connection's events share batches (one commit for many), where waiting for
    each ack would cost a batch per event."""
    async with httpx.AsyncClient(timeout=10) as http, established(daemon.ws_url) as (ws, hs):
        before = write_batches((await http.get(f"{daemon.http_url}/metrics")).text)
        for seq in range(1, BURST + 1):
            await send(ws, {"type": "event", "payload": event_body(hs.key.public_hex, hs.device_id, seq)})
        assert [(await recv_json(ws))["payload"]["status"] for _ in range(BURST)] == ["stored"] * BURST
        after = write_batches((await http.get(f"{daemon.http_url}/metrics")).text)
    assert after - before <= BURST / 4, (before, after)
