"""Guarantees across instances that do not depend on Redis (protocol.md §8): with the bus down, a revocation,
an account deletion and a takeover made on one instance still close the session on the other instance within
seconds, because every instance checks its sessions against the store on its catch-up poll (twice a second
while the bus is down, and at once when it comes back)."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
import trio

from pocketbridge.client import Closed, DeviceKey, connect, new_device_id
from tests.conftest import run_daemon
from tests.e2e.httpclient import http_client, signed
from tests.e2e.test_faults import instances_on_private_redis

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]
BOUND = 5.0  # seconds: a session the store says is over is closed on every instance within this


async def closed_within(client: object, seconds: float) -> tuple[int | None, str | None]:
    with trio.fail_after(seconds):
        try:
            event = await client.receive_event()  # type: ignore[attr-defined]
            raise AssertionError(f"an event reached a session the store says is over: {event.raw}")
        except Closed as exc:
            return exc.code, exc.reason


async def test_revocation_deletion_and_takeover_hold_with_the_bus_down(tmp_path: Path, postgres_dsn: str) -> None:
    async with instances_on_private_redis(tmp_path, postgres_dsn) as (redis, config):
        one_cfg, two_cfg = config("one"), config("two")
        alice, bob, carol = DeviceKey.generate(), DeviceKey.generate(), DeviceKey.generate()
        laptop, phone, bobs, carols = new_device_id(), new_device_id(), new_device_id(), new_device_id()
        with trio.fail_after(90):
            async with run_daemon(one_cfg) as (_, one), run_daemon(two_cfg) as (_, two):
                async with (
                    connect(one.ws_url, alice, laptop) as a,
                    connect(two.ws_url, alice, phone) as p,
                    connect(two.ws_url, bob, bobs) as b,
                    connect(two.ws_url, carol, carols) as c,
                ):
                    await redis.kill()  # from here on, no control message reaches the other instance
                    await trio.sleep(0.2)
                    async with http_client(one) as http:
                        r = await signed(http, alice, laptop, "DELETE", f"/api/devices/{phone}")
                        assert r.status_code == 200, r.text
                        revoked_at = trio.current_time()
                        # an event committed after the revocation must not reach the revoked phone
                        assert (await a.send_event("notes:main", "note:text", b"after")).status == "stored"
                        assert await closed_within(p, BOUND) == (1000, "Device revoked")
                        assert trio.current_time() - revoked_at < BOUND

                        r = await signed(http, bob, bobs, "DELETE", "/api/user")
                        assert r.status_code == 200, r.text
                    assert await closed_within(b, BOUND) == (1000, "Account deleted")

                    async with connect(one.ws_url, carol, carols):  # the same device again, elsewhere
                        assert await closed_within(c, BOUND) == (1000, "New connection established for this device")


async def test_account_deletion_fences_sessions_on_other_instances(tmp_path: Path, postgres_dsn: str) -> None:
    """§8 account deletion with the bus down: the deleting instance cannot wait for sessions elsewhere, so
    the store fences them. A session on the other instance sending events all along gets none committed
    after the deletion began (refused: its user is deleting), is closed within the bound, and once the
    DELETE returns nothing of the account is left, whatever that session still sent."""

    async with instances_on_private_redis(tmp_path, postgres_dsn) as (redis, config):
        one_cfg, two_cfg = config("one"), config("two")
        bob = DeviceKey.generate()
        laptop, phone = new_device_id(), new_device_id()
        acked: list[int] = []
        with trio.fail_after(90):
            async with run_daemon(one_cfg) as (_, one), run_daemon(two_cfg) as (_, two):
                async with connect(one.ws_url, bob, laptop), connect(two.ws_url, bob, phone) as p:
                    await redis.kill()
                    await trio.sleep(0.2)

                    async def keep_sending() -> None:
                        try:
                            for i in range(100_000):
                                ack = await p.send_event("notes:main", "note:text", b"x%d" % i)
                                if ack.status == "stored":
                                    acked.append(i)
                        except Closed:
                            return

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(keep_sending)
                        await trio.sleep(0.5)  # events are flowing from the other instance
                        assert acked
                        async with http_client(one) as http:
                            r = await signed(http, bob, laptop, "DELETE", "/api/user")
                            assert r.status_code == 200, r.text
                        with trio.fail_after(BOUND):  # the sender's session is closed: its loop ends
                            while nursery.child_tasks:  # noqa: ASYNC110
                                await trio.sleep(0.05)
        with psycopg.connect(postgres_dsn) as db:
            left = db.execute(
                "SELECT (SELECT count(*) FROM events WHERE user_id = %s), (SELECT count(*) FROM devices"
                " WHERE user_id = %s), (SELECT count(*) FROM users WHERE user_id = %s)",
                (bob.public_hex, bob.public_hex, bob.public_hex),
            ).fetchone()
        assert left == (0, 0, 0), left
