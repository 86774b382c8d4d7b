"""Devices (issue: pairing, presence, revocation, names, abuse limits, retention) against a real daemon."""

from __future__ import annotations

import sqlite3

import psycopg
import pytest
import trio

from pocketbridge import accounts
from pocketbridge.client import Closed, DeviceKey, HandshakeRefused, connect, new_device_id
from pocketbridge.maintenance import purge_once
from tests.conftest import run_daemon

T = 5  # seconds: every wait in these tests is bounded


async def _no_event(client, seconds: float = 0.3) -> None:
    with trio.move_on_after(seconds):
        event = await client.receive_event()
        raise AssertionError(f"unexpected event {event.event_id}")


# --- pairing ---------------------------------------------------------------------------------------
async def test_pairing_moves_the_joiner_into_the_initiators_account(config_factory):
    async with run_daemon(config_factory()) as (_, running):
        url = running.ws_url
        alice, phone_key = DeviceKey.generate(), DeviceKey.generate()
        laptop, desktop, phone = new_device_id(), new_device_id(), new_device_id()
        with trio.fail_after(T):
            async with connect(url, alice, laptop, device_name="Laptop") as a, connect(url, alice, desktop) as d:
                async with connect(url, phone_key, phone, device_name="Laptop") as p:
                    initiated = await a.initiate_pairing()
                    assert initiated["type"] == "pairing_initiated"
                    code = initiated["payload"]["code"]
                    assert len(code) == 6 and code.isdigit()
                    assert 299_000 <= initiated["payload"]["expiresIn"] <= 300_000
                    completed = await p.complete_pairing(code)
                    assert completed["payload"] == {
                        "success": True, "linkedUserId": alice.public_hex, "last_ack_device_seq": 0,
                    }
                    # the initiator and the other device both hear of it, with the de-duplicated name
                    for other in (a, d):
                        paired = await other.next_notice("device_paired")
                        assert paired["payload"]["device_id"] == phone
                        assert paired["payload"]["device_name"] == "Laptop (2)"
                    # the joiner now relays within alice's account, with its own key in user_id too
                    ack = await p.send_event("clipboard:main", "clipboard:text", b"from the phone")
                    assert ack.status == "stored"
                    got = await a.receive_event()
                    assert got.payload == b"from the phone" and got.user_id == alice.public_hex
                    await d.receive_event()
                    ack = await a.send_event("clipboard:main", "clipboard:text", b"to the phone")
                    assert (await p.receive_event()).payload == b"to the phone"
                    # a code is single use
                    assert (await p.complete_pairing(code))["payload"]["error"] == "Pairing code not found or expired"
            # the joiner reconnects into alice's account
            async with connect(url, phone_key, phone) as p:
                assert p.user_id == alice.public_hex


async def test_wrong_codes_lock_the_connection_out_and_a_burst_cannot_pair(config_factory):
    async with run_daemon(config_factory()) as (_, running):
        url = running.ws_url
        alice, mallory = DeviceKey.generate(), DeviceKey.generate()
        with trio.fail_after(T):
            async with connect(url, alice, new_device_id()) as a:
                code = (await a.initiate_pairing())["payload"]["code"]
                wrong = [f"{(int(code) + i) % 1_000_000:06d}" for i in range(1, 51)]
                async with connect(url, mallory, new_device_id()) as m:
                    assert (await m.complete_pairing("12345"))["payload"]["error"] == "Invalid pairing code format"
                    errors = []
                    with pytest.raises(Closed):
                        for guess in wrong:
                            errors.append((await m.complete_pairing(guess))["payload"]["error"])
                    assert errors[:5] == ["Pairing code not found or expired"] * 5, errors
                    await trio.sleep(0.1)
                    assert (m.close_code, m.close_reason) == (1008, "Too many failed pairing attempts")
                # new connections from the same address share its hour budget (20 failures) …
                failures = 5
                while failures < 20:
                    async with connect(url, mallory, new_device_id()) as m2:
                        for _ in range(5):
                            reply = await m2.complete_pairing(wrong[failures])
                            assert reply["payload"]["error"] == "Pairing code not found or expired"
                            failures += 1
                        lockout = await m2.next_notice("pairing_failed")
                        assert lockout["payload"]["error"] == "Too many failed pairing attempts"
                        with pytest.raises(Closed):
                            await m2.receive_event()
                # … and once it is spent, even the right code is refused and the connection closed
                async with connect(url, mallory, new_device_id()) as m3:
                    reply = await m3.complete_pairing(code)
                    assert reply["payload"]["error"] == "Too many failed pairing attempts"
                    with pytest.raises(Closed):
                        await m3.receive_event()
                    assert (m3.close_code, m3.close_reason) == (1008, "Too many failed pairing attempts")
                # nobody was paired into alice's account
                assert (await a.initiate_pairing())["type"] == "pairing_initiated"


async def test_deployment_wide_failure_rate_stops_lookups_but_keeps_connections(config_factory):
    cfg = config_factory(pairing={"max_failures_per_minute": 3, "max_failures_per_connection": 100})
    async with run_daemon(cfg) as (_, running):
        with trio.fail_after(T):
            async with connect(running.ws_url, DeviceKey.generate(), new_device_id()) as m:
                for _ in range(3):
                    assert (await m.complete_pairing("000000"))["payload"]["error"] == "Pairing code not found or expired"
                reply = await m.complete_pairing("000000")
                assert reply["payload"]["error"] == "Too many failed pairing attempts. Please try again later."
                assert await m.ping() > 0  # still open


async def test_pairing_into_a_full_account_keeps_the_code(config_factory):
    async with run_daemon(config_factory(limits={"max_devices_per_user": 2})) as (_, running):
        url = running.ws_url
        alice = DeviceKey.generate()
        with trio.fail_after(T):
            async with connect(url, alice, new_device_id()) as a:
                code = (await a.initiate_pairing())["payload"]["code"]
                async with connect(url, alice, new_device_id()):
                    pass  # alice now has 2 of 2 devices
                async with connect(url, DeviceKey.generate(), new_device_id()) as j:
                    assert (await j.complete_pairing(code))["payload"]["error"] == "Device limit reached for this account"
                assert (await a.initiate_pairing())["payload"]["error"] == "Device limit reached for this account"


async def test_pairing_within_the_same_account_changes_nothing(config_factory):
    async with run_daemon(config_factory()) as (_, running):
        alice = DeviceKey.generate()
        with trio.fail_after(T):
            async with connect(running.ws_url, alice, new_device_id()) as a, connect(
                running.ws_url, alice, new_device_id()
            ) as b:
                await b.send_event("s", "t", b"x")
                code = (await a.initiate_pairing())["payload"]["code"]
                completed = await b.complete_pairing(code)
                assert completed["payload"]["linkedUserId"] == alice.public_hex
                assert completed["payload"]["last_ack_device_seq"] == 1


# --- revocation and account deletion -----------------------------------------------------------------
async def test_revocation_closes_the_device_and_refuses_it_afterwards(config_factory):
    async with run_daemon(config_factory()) as (daemon, running):
        url = running.ws_url
        alice = DeviceKey.generate()
        laptop, phone = new_device_id(), new_device_id()
        with trio.fail_after(T):
            async with connect(url, alice, laptop) as a:
                async with connect(url, alice, phone) as p:
                    await p.send_event("s", "t", b"kept in history")
                    await a.receive_event()
                    start = trio.current_time()
                    assert await accounts.revoke_device(daemon.gateway, phone.upper(), accounts.USER_REVOKED) is None
                    assert await accounts.revoke_device(daemon.gateway, phone, accounts.USER_REVOKED) is not None
                    notice = await p.next_notice("device_revoked")
                    assert notice["payload"]["reason"] == "Device has been removed by user"
                    with pytest.raises(Closed):
                        await p.receive_event()
                    assert (p.close_code, p.close_reason) == (1000, "Device revoked")
                    assert trio.current_time() - start < 1.0
                    online = await a.next_notice("device_status_changed")
                    offline = await a.next_notice("device_status_changed")
                    assert (online["payload"]["is_online"], offline["payload"]["is_online"]) == (True, False)
                    assert offline["payload"]["device_id"] == phone
                with pytest.raises(HandshakeRefused) as refused:
                    async with connect(url, alice, phone):
                        pass
                assert (refused.value.code, refused.value.reason) == (1008, "Device has been revoked")
            # the revoked device's events stay in the other devices' history
            async with connect(url, alice, new_device_id()) as c:
                assert [e.payload for e in (await c.replay()).events] == [b"kept in history"]


async def test_account_deletion_closes_sessions_then_deletes_everything(config_factory):
    async with run_daemon(config_factory()) as (daemon, running):
        url = running.ws_url
        alice = DeviceKey.generate()
        laptop, phone = new_device_id(), new_device_id()
        with trio.fail_after(T):
            async with connect(url, alice, laptop) as a, connect(url, alice, phone) as p:
                for i in range(3):
                    await a.send_event("s", "t", b"%d" % i)
                counts = await accounts.delete_user(daemon.gateway, alice.public_hex)
                assert (counts.devices, counts.events) == (2, 3)
                for c in (a, p):
                    notice = await c.next_notice("device_revoked")
                    assert notice["payload"]["reason"] == "Account deleted"
                    with pytest.raises(Closed):
                        await c.receive_event()
                    assert (c.close_code, c.close_reason) == (1000, "Account deleted")
            assert await accounts.delete_user(daemon.gateway, alice.public_hex) is None
            # the same key and device may register again, as a new user with nothing in it
            async with connect(url, alice, laptop) as a:
                assert a.last_ack_device_seq == 0
                assert (await a.replay()).events == []


async def test_event_racing_a_revocation_is_refused_cleanly(config_factory):
    async with run_daemon(config_factory()) as (daemon, running):
        alice = DeviceKey.generate()
        phone = new_device_id()
        with trio.fail_after(T):
            async with connect(running.ws_url, alice, phone) as p:
                await accounts.revoke_device(daemon.gateway, phone, accounts.ADMIN_REVOKED)
                with pytest.raises(Closed):
                    for i in range(100):
                        await p.send_event("s", "t", b"%d" % i)
                assert p.close_code in (1000, 1008)
                assert p.close_reason in ("Device revoked", "Device has been revoked")


# --- names, limits ----------------------------------------------------------------------------------
async def test_device_names_are_sanitised_and_unique_per_user(config_factory):
    async with run_daemon(config_factory()) as (_, running):
        url = running.ws_url
        alice = DeviceKey.generate()
        with trio.fail_after(T):
            async with connect(url, alice, new_device_id()) as watcher:
                names = []
                for sent in ("Phone", "Phone", " <b>Phone</b>\x07 ", "x" * 60):
                    async with connect(url, alice, new_device_id(), device_name=sent, device_type="toaster"):
                        msg = await watcher.next_notice("device_status_changed")
                        assert msg["payload"]["device_type"] == "web"
                        names.append(msg["payload"]["device_name"])
                    assert (await watcher.next_notice("device_status_changed"))["payload"]["is_online"] is False
        assert names == ["Phone", "Phone (2)", "bPhone/b", "x" * 50]


async def test_device_limit(config_factory):
    async with run_daemon(config_factory(limits={"max_devices_per_user": 2})) as (_, running):
        alice = DeviceKey.generate()
        with trio.fail_after(T):
            for _ in range(2):
                async with connect(running.ws_url, alice, new_device_id()):
                    pass
            with pytest.raises(HandshakeRefused) as refused:
                async with connect(running.ws_url, alice, new_device_id()):
                    pass
        assert (refused.value.code, refused.value.reason) == (1008, "Device limit reached")


async def test_connection_and_handshake_limits_per_address(config_factory):
    cfg = config_factory(limits={"ws_connects_per_ip_per_minute": 3, "handshakes_per_ip_per_minute": 2})
    async with run_daemon(cfg) as (_, running):
        key = DeviceKey.generate()
        with trio.fail_after(T):
            for _ in range(2):
                async with connect(running.ws_url, key, new_device_id()):
                    pass
            with pytest.raises(HandshakeRefused) as third:
                async with connect(running.ws_url, key, new_device_id()):
                    pass
            assert (third.value.code, third.value.reason) == (1008, "Too many handshake attempts. Please try again later.")
            with pytest.raises(HandshakeRefused) as fourth:
                async with connect(running.ws_url, key, new_device_id()):
                    pass
            assert (fourth.value.code, fourth.value.reason) == (1008, "Too many connection attempts. Please try again later.")


# --- ttl and retention ------------------------------------------------------------------------------
async def test_purge_removes_expired_and_old_events(config_factory):
    cfg = config_factory(retention={"event_days": 1})
    async with run_daemon(cfg) as (daemon, running):
        alice = DeviceKey.generate()
        with trio.fail_after(T):
            async with connect(running.ws_url, alice, new_device_id()) as a:
                now = daemon.clock.now_ms()
                await a.send_event("s", "t", b"short-lived", ttl=now + 1000)
                await a.send_event("s", "t", b"keeps")
                await a.send_event("s", "t", b"old")
        # age one event beyond retention and let the other's ttl pass beyond the skew
        age = "UPDATE events SET created_at = created_at - {two_days} WHERE user_id = '{u}' AND device_seq = 3"
        expire = f"UPDATE events SET ttl = ttl - 3600000 WHERE user_id = '{alice.public_hex}' AND device_seq = 1"
        def tamper() -> None:  # in a thread: the daemon shares this event loop and must keep running
            if cfg.storage.backend == "sqlite":
                # BEGIN IMMEDIATE: wait for the daemon's writer instead of failing on a stale snapshot
                db = sqlite3.connect(cfg.sqlite_path(), isolation_level=None, timeout=10)
                try:
                    db.execute("BEGIN IMMEDIATE")
                    db.execute(age.format(two_days=2 * 86_400_000, u=alice.public_hex))
                    db.execute(expire)
                    db.execute("COMMIT")
                finally:
                    db.close()
            else:
                with psycopg.connect(cfg.storage.dsn, autocommit=True) as pg:
                    pg.execute(age.format(two_days="interval '2 days'", u=alice.public_hex))
                    pg.execute(expire)

        await trio.to_thread.run_sync(tamper)
        assert await purge_once(daemon.gateway.store, cfg) >= 2  # the PostgreSQL database is shared by the session
        with trio.fail_after(T):
            async with connect(running.ws_url, alice, new_device_id()) as b:
                assert [e.payload for e in (await b.replay()).events] == [b"keeps"]


@pytest.mark.postgres
@pytest.mark.redis
async def test_pairing_failure_limits_hold_across_instances(tmp_path, postgres_dsn, redis_url):
    from tests.conftest import make_config

    def config(name: str):
        return make_config(
            tmp_path / name,
            storage={"backend": "postgres", "dsn": postgres_dsn},
            bus={"backend": "redis", "url": redis_url},
            pairing={"max_failures_per_minute": 3, "max_failures_per_connection": 100},
        )

    import psycopg

    with psycopg.connect(postgres_dsn, autocommit=True) as db:
        db.execute("TRUNCATE pairing_failures")
    async with run_daemon(config("one")) as (_, one), run_daemon(config("two")) as (_, two):
        with trio.fail_after(T):
            async with connect(one.ws_url, DeviceKey.generate(), new_device_id()) as m1, connect(
                two.ws_url, DeviceKey.generate(), new_device_id()
            ) as m2:
                for client in (m1, m1, m2):
                    assert (await client.complete_pairing("000000"))["payload"]["error"] == (
                        "Pairing code not found or expired"
                    )
                # three failures in the deployment (two on instance one): instance two stops looking up
                reply = await m2.complete_pairing("000000")
                assert reply["payload"]["error"] == "Too many failed pairing attempts. Please try again later."
                reply = await m1.complete_pairing("000000")
                assert reply["payload"]["error"] == "Too many failed pairing attempts. Please try again later."
