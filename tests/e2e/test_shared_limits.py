"""Rate limits across instances (docs/operations.md "Rate limits"; protocol.md §9 for the refusal).

Two instances on one PostgreSQL and a private Redis share one address's connection budget: what one admitted
the other counts. With that Redis killed, each instance falls back to its own bucket and its
``pocketbridge_rate_limits_shared`` gauge says 0; when Redis is back, the budget is shared again.
The clients come through a trusted proxy (127.0.0.1) with ``X-Forwarded-For``, so each phase has a fresh address.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from pocketbridge.app import Running
from pocketbridge.client import DeviceKey, new_device_id
from tests.conftest import run_daemon
from tests.e2e.rawclient import TIMEOUT, RawHandshake
from tests.e2e.test_faults import instances_on_private_redis

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

LIMIT = 6  # [limits] ws_connects_per_ip_per_minute
SETTLE = 0.6  # seconds: several reconciliation rounds (every 0.1 s) between the instances
REFUSED = (1008, "Too many connection attempts. Please try again later.")


DEVICE = new_device_id()  # one device, again and again: the device limit stays out of the way


async def attempt(running: Running, key: DeviceKey, forwarded: str) -> tuple[int, str] | None:
    """None if the handshake succeeds, else the close (code, reason)."""
    headers = [(b"X-Forwarded-For", forwarded.encode())]
    async with open_websocket_url(running.ws_url, extra_headers=headers, connect_timeout=TIMEOUT,
                                  disconnect_timeout=TIMEOUT) as ws:
        try:
            with trio.fail_after(TIMEOUT):
                await RawHandshake(ws, key, DEVICE).run()
        except (AssertionError, ConnectionClosed):
            assert ws.closed is not None
            return ws.closed.code, ws.closed.reason
    return None


async def shared_gauge(running: Running) -> float:
    async with httpx.AsyncClient(base_url=running.http_url, timeout=5.0) as http:
        r = await http.get("/metrics")
    assert r.status_code == 200, r.text
    lines = [line for line in r.text.splitlines() if line.startswith("pocketbridge_rate_limits_shared ")]
    assert len(lines) == 1, r.text
    return float(lines[0].split()[1])


async def wait_gauge(running: Running, value: float) -> None:
    """Poll /metrics until the gauge says ``value`` (a mode changes within a round or a retry, ~1 s)."""
    with trio.fail_after(10):
        for _ in range(100):
            if await shared_gauge(running) == value:
                return
            await trio.sleep(0.1)
    raise AssertionError(f"pocketbridge_rate_limits_shared never said {value}")


async def test_two_instances_share_one_address_budget_and_fall_back_while_redis_is_down(
    tmp_path: Path, postgres_dsn: str
) -> None:
    limits = {"ws_connects_per_ip_per_minute": LIMIT}
    async with instances_on_private_redis(
        tmp_path, postgres_dsn, server={"trusted_proxies": ["127.0.0.1"]}, limits=limits
    ) as (redis, config):
        key = DeviceKey.generate()
        with trio.fail_after(120):
            async with (
                run_daemon(config("one")) as (_, one),
                run_daemon(config("two")) as (_, two),
            ):
                await wait_gauge(one, 1)
                await wait_gauge(two, 1)

                # shared: 3 + 3 across both instances use up the one budget of 6
                address = "203.0.113.9"
                assert [await attempt(one, key, address) for _ in range(3)] == [None] * 3
                await trio.sleep(SETTLE)
                assert [await attempt(two, key, address) for _ in range(3)] == [None] * 3
                await trio.sleep(SETTLE)
                assert await attempt(one, key, address) == REFUSED
                assert await attempt(two, key, address) == REFUSED
                assert await attempt(one, key, "198.51.100.4") is None  # another address, its own budget

                # Redis down: each instance keeps its own bucket, and says so
                await redis.kill()
                await wait_gauge(one, 0)
                await wait_gauge(two, 0)
                address = "203.0.113.50"
                assert [await attempt(one, key, address) for _ in range(LIMIT + 1)] == [None] * LIMIT + [REFUSED]
                assert [await attempt(two, key, address) for _ in range(LIMIT + 1)] == [None] * LIMIT + [REFUSED]

                # Redis back: shared again
                await redis.start()
                await wait_gauge(one, 1)
                await wait_gauge(two, 1)
                address = "203.0.113.77"
                assert [await attempt(two, key, address) for _ in range(LIMIT)] == [None] * LIMIT
                await trio.sleep(SETTLE)
                assert await attempt(one, key, address) == REFUSED
