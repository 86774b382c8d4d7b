"""Long store work never freezes the event loop (protocol.md §8): deleting an account holding large events
and purging large expired events run in bounded chunks off the event loop, so another user's connection is
served meanwhile.

Interleaving, not a timing threshold: while the work runs, another connection pings in a loop; the longest
pause between two of its pongs must be a small part of the whole work (on a frozen loop, one pause would
span nearly all of it).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from pocketbridge.client import Client, DeviceKey, connect, new_device_id
from pocketbridge.maintenance import purge_once
from tests.conftest import make_config, run_daemon
from tests.e2e.httpclient import http_client, signed

MiB = 1024 * 1024
EVENTS = 40
HIGH = {"ws_connects_per_ip_per_minute": 10_000, "handshakes_per_ip_per_minute": 10_000}


async def fill_account(url: str, key: DeviceKey, device_id: str, *, ttl: int | None = None) -> None:
    async with connect(url, key, device_id, reply_timeout=30) as a:
        window = []
        for i in range(EVENTS):
            window.append(await a.post_event("files:big", "file:chunk", bytes([i % 251]) * MiB, ttl=ttl))
            if len(window) >= 4:
                seq, _, pending = window.pop(0)
                assert (await a.wait_ack(seq, pending)).status == "stored"
        for seq, _, pending in window:
            assert (await a.wait_ack(seq, pending)).status == "stored"


async def pauses_while(other: Client, work: Callable[[], Awaitable[Any]]) -> tuple[float, float, int]:
    """Run ``work`` while ``other`` pings in a loop: (work duration, longest pause between pongs, pongs)."""
    pongs: list[float] = []

    async def ping_loop() -> None:
        while True:
            await other.ping()
            pongs.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ping_loop)
        await trio.sleep(0.05)
        started = trio.current_time()
        await work()
        ended = trio.current_time()
        nursery.cancel_scope.cancel()
    marks = [started] + [t for t in pongs if started < t < ended] + [ended]
    return ended - started, max(b - a for a, b in zip(marks, marks[1:])), len(marks) - 2


@pytest.fixture
def config(tmp_path: Path, backend: dict[str, dict[str, Any]]) -> Any:
    sections = {name: dict(v) for name, v in backend.items()}
    sections["limits"] = {**HIGH, "clock_skew": 1}
    sections["events"] = {"max_payload_bytes": 2 * MiB}
    sections["retention"] = {"purge_interval": 86_400}  # the test runs the purge itself
    return make_config(tmp_path / "data", **sections)


async def test_account_deletion_does_not_freeze_other_connections(config: Any) -> None:
    key, other_key = DeviceKey.generate(), DeviceKey.generate()
    device = new_device_id()
    with trio.fail_after(120):
        async with run_daemon(config) as (_, running):
            await fill_account(running.ws_url, key, device)
            async with connect(running.ws_url, other_key, new_device_id()) as other, http_client(running) as http:

                async def delete() -> None:
                    r = await signed(http, key, device, "DELETE", "/api/user")
                    assert r.status_code == 200, r.text
                    assert r.json()["deleted"]["events"] == EVENTS, r.text

                took, pause, pongs = await pauses_while(other, delete)
    print(f"deletion of {EVENTS} MiB took {took:.3f} s; longest pause of the other connection {pause:.3f} s, "
          f"{pongs} pongs meanwhile")
    assert pongs >= 2 and pause < max(0.12 * took, 0.05), (took, pause, pongs)


async def test_large_purge_does_not_freeze_other_connections(config: Any) -> None:
    key, other_key = DeviceKey.generate(), DeviceKey.generate()
    with trio.fail_after(120):
        async with run_daemon(config) as (daemon, running):
            ttl = int(time.time() * 1000) + 8000  # the fill must finish before the events expire, even on a busy box
            await fill_account(running.ws_url, key, new_device_id(), ttl=ttl)
            await trio.sleep(max(0.0, (ttl - time.time() * 1000) / 1000) + 1.2)  # past ttl + clock_skew grace (1 s)
            store = daemon.gateway.store
            async with connect(running.ws_url, other_key, new_device_id()) as other:
                purged: list[int] = []

                async def purge() -> None:
                    purged.append(await purge_once(store, config))

                took, pause, pongs = await pauses_while(other, purge)
    print(f"purge of {purged} events took {took:.3f} s; longest pause {pause:.3f} s, {pongs} pongs meanwhile")
    assert purged == [EVENTS]
    assert pongs >= 2 and pause < max(0.12 * took, 0.05), (took, pause, pongs)
