"""Device statements without a test elsewhere (protocol.md §4, §7, §8), end to end.

* §7: ``[pairing] initiations_per_device_per_hour``; a new code replaces the device's previous one; codes
  expire after ``[pairing] code_ttl``; of two concurrent uses of a code exactly one wins (the loser is not
  counted as a failure), on one instance and across two; revoking a device invalidates its codes.
* §8: while an account is being deleted, its handshakes get 1013 and its events are refused with 1013.
* §4: the devices of a dead (SIGKILLed) instance are shown offline once its heartbeat is stale.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from pocketbridge import accounts, maintenance
from pocketbridge.bench import launcher
from pocketbridge.client import Client, Closed, DeviceKey, HandshakeRefused, connect, new_device_id
from pocketbridge.config import Config
from pocketbridge.identity import write_new_identity
from tests.conftest import run_daemon
from tests.e2e.httpclient import signed
from tests.e2e.rawclient import TIMEOUT, e2e_config
from tests.e2e.test_spec_transport import local_config

NOT_FOUND = "Pairing code not found or expired"
TOO_MANY_REQUESTS = "Too many pairing requests. Please try again later."


def pg_config(path: Path, dsn: str, redis_url: str, **sections: dict[str, Any]) -> Config:
    return local_config(path, storage={"backend": "postgres", "dsn": dsn}, bus={"backend": "redis", "url": redis_url},
                        **sections)


async def initiate(client: Client) -> dict[str, Any]:
    with trio.fail_after(TIMEOUT):
        return await client.initiate_pairing()


async def complete(client: Client, code: str) -> dict[str, Any]:
    with trio.fail_after(TIMEOUT):
        return await client.complete_pairing(code)


def code_of(initiated: dict[str, Any]) -> str:
    assert initiated["type"] == "pairing_initiated", initiated
    return initiated["payload"]["code"]


# --- §7 pairing ----------------------------------------------------------------------------------------
async def test_initiations_are_limited_per_device_and_a_new_code_replaces_the_old(
    config_factory: Callable[..., Config],
) -> None:
    config = e2e_config(config_factory, pairing={"initiations_per_device_per_hour": 2})
    alice = DeviceKey.generate()
    async with run_daemon(config) as (_, running):
        url = running.ws_url
        async with connect(url, alice, new_device_id()) as a, connect(url, alice, new_device_id()) as b:
            first = code_of(await initiate(a))
            second = code_of(await initiate(a))
            refused = await initiate(a)
            assert refused == {"type": "pairing_failed", "payload": {"error": TOO_MANY_REQUESTS}}
            other = code_of(await initiate(b))  # the limit is per device
            async with connect(url, DeviceKey.generate(), new_device_id()) as j:
                if first != second:  # (1 in 10^6 the same code comes again)
                    assert (await complete(j, first))["payload"]["error"] == NOT_FOUND  # replaced by the second
                completed = await complete(j, second)
                assert completed["type"] == "pairing_completed", completed
                assert completed["payload"]["linkedUserId"] == alice.public_hex
            async with connect(url, DeviceKey.generate(), new_device_id()) as k:
                assert (await complete(k, other))["type"] == "pairing_completed"  # b's code was not replaced
            # a refusal does not give the budget back
            assert (await initiate(a))["payload"]["error"] == TOO_MANY_REQUESTS


async def test_pairing_codes_expire_after_code_ttl(config_factory: Callable[..., Config]) -> None:
    ttl = 1.0
    config = e2e_config(config_factory, pairing={"code_ttl": ttl})
    alice = DeviceKey.generate()
    async with run_daemon(config) as (_, running):
        url = running.ws_url
        async with connect(url, alice, new_device_id()) as a, connect(url, DeviceKey.generate(), new_device_id()) as j:
            before = int(time.time() * 1000)
            initiated = await initiate(a)
            code = code_of(initiated)
            p = initiated["payload"]
            assert 0 < p["expiresIn"] <= ttl * 1000
            assert before + ttl * 1000 - 2_000 <= p["expires_at"] <= int(time.time() * 1000) + ttl * 1000 + 2_000
            await trio.sleep(max(0.0, p["expires_at"] / 1000 - time.time()) + 0.2)
            assert (await complete(j, code)) == {"type": "pairing_failed", "payload": {"error": NOT_FOUND}}
            # a code used within its lifetime works (the same joiner, the same initiator)
            fresh = code_of(await initiate(a))
            assert (await complete(j, fresh))["type"] == "pairing_completed"


async def race(code: str, one: Client, two: Client) -> list[dict[str, Any]]:
    """Both joiners send ``complete_pairing`` before either reply is read; returns both replies."""
    message = {"type": "complete_pairing", "payload": {"pairing_code": code}}
    await one.send_raw(message)
    await two.send_raw(message)
    with trio.fail_after(TIMEOUT):
        return [await c.next_notice(("pairing_completed", "pairing_failed")) for c in (one, two)]


async def check_one_wins(initiator: Client, alice: DeviceKey, one: Client, two: Client) -> None:
    code = code_of(await initiate(initiator))
    replies = await race(code, one, two)
    kinds = sorted(r["type"] for r in replies)
    assert kinds == ["pairing_completed", "pairing_failed"], replies
    loser = two if replies[0]["type"] == "pairing_completed" else one
    assert [r for r in replies if r["type"] == "pairing_completed"][0]["payload"]["linkedUserId"] == alice.public_hex
    assert [r for r in replies if r["type"] == "pairing_failed"][0]["payload"] == {"error": NOT_FOUND}
    # the loser was not counted as a failure: with max_failures_per_connection = 1 it would be locked out
    with trio.fail_after(TIMEOUT):
        assert await loser.ping() > 0
    completed = await complete(loser, code_of(await initiate(initiator)))
    assert completed["type"] == "pairing_completed", completed


async def test_of_two_concurrent_uses_of_a_code_exactly_one_wins(config_factory: Callable[..., Config]) -> None:
    config = e2e_config(config_factory, pairing={"max_failures_per_connection": 1},
                        limits={"max_devices_per_user": 20})
    alice = DeviceKey.generate()
    async with run_daemon(config) as (_, running):
        url = running.ws_url
        async with connect(url, alice, new_device_id()) as a:
            for _ in range(3):
                async with connect(url, DeviceKey.generate(), new_device_id()) as j1, \
                        connect(url, DeviceKey.generate(), new_device_id()) as j2:
                    await check_one_wins(a, alice, j1, j2)


@pytest.mark.postgres
@pytest.mark.redis
async def test_of_two_concurrent_uses_of_a_code_on_two_instances_exactly_one_wins(
    tmp_path: Path, postgres_dsn: str, redis_url: str
) -> None:
    identity = tmp_path / "identity.key"
    write_new_identity(identity)
    sections = {"pairing": {"max_failures_per_connection": 1}, "limits": {"max_devices_per_user": 20},
                "server": {"identity_key_file": str(identity)}}
    alice = DeviceKey.generate()
    async with run_daemon(pg_config(tmp_path / "one", postgres_dsn, redis_url, **sections)) as (_, one), \
            run_daemon(pg_config(tmp_path / "two", postgres_dsn, redis_url, **sections)) as (_, two):
        async with connect(one.ws_url, alice, new_device_id()) as a:
            for _ in range(3):
                async with connect(one.ws_url, DeviceKey.generate(), new_device_id()) as j1, \
                        connect(two.ws_url, DeviceKey.generate(), new_device_id()) as j2:
                    await check_one_wins(a, alice, j1, j2)


async def test_revoking_a_device_invalidates_its_pairing_codes(config_factory: Callable[..., Config]) -> None:
    alice = DeviceKey.generate()
    laptop, phone = new_device_id(), new_device_id()
    async with run_daemon(e2e_config(config_factory)) as (_, running):
        url = running.ws_url
        async with connect(url, alice, laptop) as a, connect(url, alice, phone) as p:
            laptop_code = code_of(await initiate(a))
            phone_code = code_of(await initiate(p))
            async with httpx.AsyncClient(base_url=running.http_url, timeout=TIMEOUT) as http:
                r = await signed(http, alice, phone, "DELETE", f"/api/devices/{laptop}")
            assert r.status_code == 200, r.text
            with trio.fail_after(TIMEOUT):
                assert (await a.next_notice("device_revoked"))["payload"]["reason"] == "Device has been removed by user"
            async with connect(url, DeviceKey.generate(), new_device_id()) as j:
                assert (await complete(j, laptop_code)) == {"type": "pairing_failed", "payload": {"error": NOT_FOUND}}
                # the other device's code is untouched
                completed = await complete(j, phone_code)
                assert completed["type"] == "pairing_completed"
                assert completed["payload"]["linkedUserId"] == alice.public_hex


# --- §8 the deleting state -----------------------------------------------------------------------------
async def test_while_an_account_is_being_deleted_handshakes_and_events_get_1013(
    config_factory: Callable[..., Config],
) -> None:
    """Step (1) of account deletion marks the user as deleting; (2) then closes its connections. Between the
    two (up to a second), handshakes for the user get 1013 and none of its events is committed."""
    alice, bob = DeviceKey.generate(), DeviceKey.generate()
    laptop, phone = new_device_id(), new_device_id()
    async with run_daemon(e2e_config(config_factory)) as (daemon, running):
        url = running.ws_url
        store = daemon.gateway.store
        async with connect(url, alice, phone):
            pass
        with trio.fail_after(TIMEOUT):
            async with connect(url, alice, laptop) as a, connect(url, bob, new_device_id()) as b:
                assert (await a.send_event("clipboard:main", "clipboard:text", b"before")).status == "stored"
                head = await store.head_seq(alice.public_hex)
                assert await store.mark_deleting(alice.public_hex)  # what DELETE /api/user does first

                for device in (phone, new_device_id()):  # a known device, and a new one of the same key
                    with pytest.raises(HandshakeRefused) as refused:
                        async with connect(url, alice, device):
                            pass
                    assert (refused.value.code, refused.value.reason) == (1013, "Try again later")

                seq, _, pending = await a.post_event("clipboard:main", "clipboard:text", b"during")
                with pytest.raises(Closed):  # no ack
                    await a.wait_ack(seq, pending)
                assert (a.close_code, a.close_reason) == (1013, "Try again later")
                assert await store.head_seq(alice.public_hex) == head  # nothing committed
                # other users are not affected
                assert (await b.send_event("clipboard:main", "clipboard:text", b"bob")).status == "stored"

        counts = await accounts.delete_user(daemon.gateway, alice.public_hex)
        assert counts is not None and (counts.devices, counts.events) == (2, 1)
        async with connect(url, alice, laptop) as again:  # a new user afterwards
            assert again.last_ack_device_seq == 0


# --- §4 devices of a dead instance ----------------------------------------------------------------------
BEAT = 0.2  # seconds between instance heartbeats in this test
STALE_MS = 1_500  # an instance silent this long is dead


@pytest.mark.postgres
@pytest.mark.redis
async def test_devices_of_a_killed_instance_are_shown_offline(
    tmp_path: Path, postgres_dsn: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Instance X (a process) is SIGKILLed with device D connected: it never marks D offline itself. The
    surviving instance Y sees X's heartbeat go stale and shows D offline; while X lived, D stayed online.

    There is no config key for the heartbeat interval and the stale threshold (``maintenance.HEARTBEAT_SECONDS``
    = 30 s, ``STALE_AFTER_MS`` = 90 s): both instances get short ones here, Y in-process, X through a
    ``sitecustomize`` module on its PYTHONPATH."""
    monkeypatch.setattr(maintenance, "HEARTBEAT_SECONDS", BEAT)
    monkeypatch.setattr(maintenance, "STALE_AFTER_MS", STALE_MS)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import pocketbridge.maintenance as m\n"
        f"m.HEARTBEAT_SECONDS = {BEAT}\n"
        f"m.STALE_AFTER_MS = {STALE_MS}\n"
    )
    identity = tmp_path / "identity.key"
    write_new_identity(identity)
    key = DeviceKey.generate()
    dev_d, dev_e = new_device_id(), new_device_id()
    env = {
        "PB_STORAGE_BACKEND": "postgres", "PB_STORAGE_DSN": postgres_dsn,
        "PB_BUS_BACKEND": "redis", "PB_BUS_URL": redis_url,
        "PB_SERVER_DATA_DIR": str(tmp_path / "x"), "PB_SERVER_IDENTITY_KEY_FILE": str(identity),
        "PYTHONPATH": str(site),
    }
    y_config = pg_config(tmp_path / "y", postgres_dsn, redis_url, server={"identity_key_file": str(identity)})

    async def online(http: httpx.AsyncClient) -> dict[str, bool]:
        r = await signed(http, key, dev_e, "GET", "/api/presence")
        assert r.status_code == 200, r.text
        return {d["device_id"]: d["is_online"] for d in r.json()["devices"]}

    with trio.fail_after(40):
        async with run_daemon(y_config) as (_, y), httpx.AsyncClient(base_url=y.http_url, timeout=TIMEOUT) as http:
            async with connect(y.ws_url, key, dev_e) as e, launcher.running("x", tmp_path / "xwork", env) as x:
                async with connect(x.ws_url, key, dev_d):
                    await e.next_notice("device_status_changed")
                    await trio.sleep(STALE_MS / 1000 * 2)  # longer than the stale threshold: X keeps beating
                    assert await online(http) == {dev_d: True, dev_e: True}
                    x.kill()  # SIGKILL: no offline update, no goodbye
                    killed = trio.current_time()
                    while (await online(http))[dev_d]:
                        await trio.sleep(0.05)
                    took = trio.current_time() - killed
            print(f"device of the killed instance shown offline {took:.2f} s after the kill")
            assert took <= STALE_MS / 1000 + 4 * BEAT + 1.0
            async with connect(y.ws_url, key, dev_e):
                assert (await online(http)) == {dev_d: False, dev_e: True}
