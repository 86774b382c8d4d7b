"""Pipelined ingest (§5.4) at its edges: a full ack queue, the store refusing an event while earlier ones
still wait, and a drain asked for while events wait for their commit. The daemon runs in this process so
the test can hold its writer while events wait in the writer's queue. Runs on the embedded default and
on PostgreSQL + Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from pocketbridge.client import DeviceKey
from pocketbridge.config import Config
from pocketbridge.errors import REPLACED, SHUTTING_DOWN, TRY_AGAIN
from pocketbridge.gateway.session import EVENTS_IN_FLIGHT
from pocketbridge.store.ops import ProbeOp
from tests.conftest import run_daemon
from tests.e2e.rawclient import established, expect_close, recv_json, send, send_event

SETTLE = 0.3  # long enough for the daemon to read what was sent


class Hold:
    """Stops the writer of a daemon running in this process: :meth:`engage` makes it wait at its next
    batch (a probe write), so the events sent meanwhile wait in its queue until :meth:`release` (and then
    share a batch)."""

    def __init__(self, daemon: Any) -> None:
        self._writer = writer = daemon.gateway.store._writer
        self._released = trio.Event()
        self._engaged = False
        commit = writer._commit

        async def held(batch: list[Any], on_commit: Any) -> None:
            if self._engaged:
                await self._released.wait()
            await commit(batch, on_commit)

        writer._commit = held

    async def engage(self) -> None:
        self._engaged = True
        await self._writer.enqueue(ProbeOp(), lambda pending: None)
        await trio.sleep(SETTLE)  # the writer took the probe and waits

    def release(self) -> None:
        self._engaged = False
        self._released.set()


@asynccontextmanager
async def held_writer(config: Config) -> AsyncIterator[tuple[Any, Any, Hold]]:
    """A daemon in this process, and the :class:`Hold` of its writer (released at the end)."""
    async with run_daemon(config) as (daemon, running):
        hold = Hold(daemon)
        try:
            yield daemon, running, hold
        finally:
            hold.release()


async def last_stored_seq(url: str, key: DeviceKey, device_id: str) -> int:
    async with established(url, key, device_id) as (_, hs):
        return int(hs.established["payload"]["last_ack_device_seq"])


async def test_a_rejection_behind_a_full_queue_waits_for_room(config_factory: Callable[..., Config]) -> None:
    """An event refused at once while EVENTS_IN_FLIGHT events wait: its error frame waits for room and goes
    out after their acks (it does not fail the connection)."""
    async with held_writer(config_factory()) as (_, running, hold), established(running.ws_url) as (ws, hs):
        await hold.engage()
        for seq in range(1, EVENTS_IN_FLIGHT + 1):
            await send_event(ws, hs, seq)
        await send_event(ws, hs, 0)  # invalid: an error frame
        await send(ws, {"type": "ping", "payload": {"timestamp": 1}})
        await trio.sleep(SETTLE)
        hold.release()
        replies = [await recv_json(ws) for _ in range(EVENTS_IN_FLIGHT + 2)]
    assert [r["payload"]["device_seq"] for r in replies[:EVENTS_IN_FLIGHT]] == list(range(1, EVENTS_IN_FLIGHT + 1))
    assert [r["type"] for r in replies[EVENTS_IN_FLIGHT:]] == ["error", "pong"]


async def test_an_event_refused_by_an_open_breaker_ends_the_chain(config_factory: Callable[..., Config]) -> None:
    """The store refuses an event at once (its breaker is open) while an earlier one waits for its commit:
    the earlier one is acked, the connection closes with 1013, and nothing sent after the refused event
    commits, even once the store takes writes again."""
    key = DeviceKey.generate()
    async with held_writer(config_factory()) as (daemon, running, hold):
        breaker = daemon.gateway.store._writer._breaker
        async with established(running.ws_url, key) as (ws, hs):
            device = hs.device_id
            await hold.engage()
            await send_event(ws, hs, 1)
            await trio.sleep(SETTLE)
            breaker.failed()  # another connection's batch failed
            await send_event(ws, hs, 2)  # refused at once
            await trio.sleep(SETTLE)
            breaker.succeeded()  # the store takes writes again
            await send_event(ws, hs, 3)
            await trio.sleep(SETTLE)
            hold.release()
            assert (await recv_json(ws))["payload"]["device_seq"] == 1
            assert await expect_close(ws) == (TRY_AGAIN.code, TRY_AGAIN.reason)
        await trio.sleep(SETTLE)
        assert await last_stored_seq(running.ws_url, key, device) == 1


async def test_a_drain_takes_nothing_read_after_it(config_factory: Callable[..., Config]) -> None:
    """A drain asks a connection to close while its event waits for the commit: that event is still acked,
    then the connection closes; an event the client sends meanwhile is not taken (it does not commit)."""
    key = DeviceKey.generate()
    async with held_writer(config_factory()) as (daemon, running, hold):
        async with established(running.ws_url, key) as (ws, hs):
            device = hs.device_id
            await hold.engage()
            await send_event(ws, hs, 1)
            await trio.sleep(SETTLE)
            (conn,) = daemon.gateway.connections
            conn.close(SHUTTING_DOWN, after_current=True)
            await send_event(ws, hs, 2)
            await trio.sleep(SETTLE)
            hold.release()
            assert (await recv_json(ws))["payload"]["device_seq"] == 1
            assert await expect_close(ws) == (SHUTTING_DOWN.code, SHUTTING_DOWN.reason)
        await trio.sleep(SETTLE)
        assert await last_stored_seq(running.ws_url, key, device) == 1


async def test_a_close_from_another_task_stops_the_chain_at_once(config_factory: Callable[..., Config]) -> None:
    """A connection closed by another task (a newer connection of its device took over, a revocation, its
    outbox overflowing while the writer hands out acks): from that moment none of its events still queued
    is tried, not only once the connection's own task has run its teardown (the writer may take its next
    batch first)."""
    async with held_writer(config_factory()) as (daemon, running, hold), established(running.ws_url) as (ws, hs):
        await hold.engage()
        await send_event(ws, hs, 1)
        await trio.sleep(SETTLE)
        (conn,) = daemon.gateway.connections
        (session,) = [s for s in daemon.gateway.hub.members() if s.conn is conn]
        assert session.awaiting_commits
        conn.close(REPLACED)
        assert not session._chain.runs(1)  # at once: no checkpoint has passed
        conn.close(SHUTTING_DOWN, after_current=True)  # a drain of a closed connection changes nothing


async def test_an_event_given_up_while_the_writer_queue_is_full_ends_its_span(
    config_factory: Callable[..., Config],
) -> None:
    """With tracing on, every event taken ends its ``event.ingest`` span, also one whose connection closed while
    it waited for room in the writer's queue (it never reached the writer, so no commit would end it)."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from pocketbridge.tracing import setup_tracing, stop_tracing

    config = config_factory(storage={"batch_size": 1})  # the writer's queue holds 4
    exporter = InMemorySpanExporter()
    provider = setup_tracing(config, exporter=exporter)
    try:
        async with held_writer(config) as (daemon, running, hold):
            async with established(running.ws_url) as (ws, hs):
                await hold.engage()
                for seq in range(1, 7):  # 4 fill the queue, the 5th waits for room, the 6th is not read yet
                    await send_event(ws, hs, seq)
                writer = daemon.gateway.store._writer
                with trio.fail_after(5):  # the held probe, 4 events in the queue and the 5th waiting for room
                    while writer.queued < 6:  # noqa: ASYNC110 (a gauge: nothing to wait on)
                        await trio.sleep(0.01)
                await trio.sleep(SETTLE)  # (nothing more is taken meanwhile)
                assert writer.queued == 6
                (conn,) = daemon.gateway.connections
                conn.close(REPLACED)  # e.g. a newer connection of the device: cancelled while the 5th waits
                await trio.sleep(SETTLE)
            hold.release()
            with trio.fail_after(5):
                while daemon.gateway.connections:  # noqa: ASYNC110 (nothing to wait on)
                    await trio.sleep(0.05)
                while len([s for s in exporter.get_finished_spans() if s.name == "event.ingest"]) < 5:  # noqa: ASYNC110
                    await trio.sleep(0.05)
    finally:
        stop_tracing(provider)
    ingests = [s for s in exporter.get_finished_spans() if s.name == "event.ingest"]
    # the 6th was never read; nothing after the close commits
    assert [s.attributes.get("outcome") for s in ingests] == ["abandoned"] * 5
