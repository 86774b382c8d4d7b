"""HTTP API endpoints (protocol.md §10.3, §10.4, §8) with real HTTP requests against a running daemon."""

from __future__ import annotations

import base64
import time

import pytest
import trio

from pocketbridge import __version__
from pocketbridge.client import (
    Closed,
    DeviceKey,
    HandshakeRefused,
    connect,
    new_device_id,
)
from tests.conftest import run_daemon
from tests.e2e.httpclient import assert_error, http_client, register, signed, wait_for

T = 5  # seconds: every wait is bounded
DEVICE_INFO_KEYS = {"device_id", "device_name", "device_type", "is_online", "last_seen", "registered_at", "is_current"}
PROFILE_KEYS = {"user_id", "display_name", "email", "avatar_url", "preferences", "onboarding_completed",
                "created_at", "updated_at", "last_seen", "storage"}  # storage: the quota (§10.3)
ADMIN_KEY = "k" * 40
GONE_TEXT = ("Pairing over REST has been removed. Pair devices over the WebSocket with initiate_pairing and "
             "complete_pairing.")


def _is_ms(value: object) -> bool:
    """A plausible ms timestamp of this test run (an int, within a minute of now)."""
    return isinstance(value, int) and not isinstance(value, bool) and abs(value - time.time() * 1000) < 60_000


async def _closed_with(client, code: int, reason: str, timeout: float = 1.0) -> None:
    """The connection is closed by the server with (code, reason) within ``timeout``."""
    with trio.fail_after(timeout):
        with pytest.raises(Closed):
            while True:
                await client.receive_event()
    assert (client.close_code, client.close_reason) == (code, reason)


async def _all_offline(daemon, user_id: str) -> None:
    """Wait (bounded) until the store shows none of the user's devices online (their sockets have closed)."""

    async def offline() -> bool:
        return not any(d.is_online for d in await daemon.gateway.store.list_devices(user_id))

    await wait_for(offline)


# --- health and metrics ------------------------------------------------------------------------
async def test_health_live_and_ready(config_factory):
    async with run_daemon(config_factory()) as (_, running), http_client(running) as http:
        with trio.fail_after(T):
            r = await http.get("/health")
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("application/json")
            body = r.json()
            assert set(body) == {"status", "timestamp", "uptime", "services", "version"}
            assert body["status"] == "ok"
            assert _is_ms(body["timestamp"])
            assert isinstance(body["uptime"], (int, float)) and 0 <= body["uptime"] < 60
            assert body["services"] == {"database": "connected", "bus": "connected"}
            assert body["version"] == __version__
            assert "Retry-After" not in r.headers

            r = await http.get("/health/live")
            assert (r.status_code, r.json()) == (200, {"status": "ok"})
            r = await http.get("/health/ready")
            assert (r.status_code, r.json()) == (200, {"status": "ready"})


async def test_health_degraded_when_the_store_is_down(config_factory, monkeypatch):
    async with run_daemon(config_factory()) as (daemon, running), http_client(running) as http:

        async def down() -> None:
            raise RuntimeError("disk on fire: /var/lib/secret.db")

        monkeypatch.setattr(daemon.gateway.store, "ping", down)
        with trio.fail_after(T):
            r = await http.get("/health")
            assert r.status_code == 503
            assert r.headers["Retry-After"] == "30"
            body = r.json()
            assert body["status"] == "degraded"
            assert body["services"] == {"database": "disconnected", "bus": "connected"}
            assert isinstance(body["hint"], str) and body["hint"]
            assert "secret" not in r.text and "fire" not in r.text
            r = await http.get("/health/ready")
            assert r.status_code == 503
            assert r.headers["Retry-After"] == "5"
            assert r.json() == {"status": "not_ready", "services": {"database": "disconnected", "bus": "connected"}}
            # liveness does not depend on the store
            assert (await http.get("/health/live")).status_code == 200


async def test_metrics_from_loopback(config_factory):
    async with run_daemon(config_factory()) as (_, running), http_client(running) as http:
        key, device = DeviceKey.generate(), new_device_id()
        with trio.fail_after(T):
            await register(running, key, device)
            assert (await signed(http, key, device, "GET", "/api/devices")).status_code == 200
            r = await http.get("/metrics")
            assert r.status_code == 200
            assert r.headers["X-Content-Type-Options"] == "nosniff"
            samples = [line for line in r.text.splitlines() if line and not line.startswith("#")]
            assert samples
            assert all(line.startswith("pocketbridge_") for line in samples), [
                s for s in samples if not s.startswith("pocketbridge_")][:5]
            # bounded labels: no user or device ids
            assert device not in r.text and key.public_hex not in r.text
            # §10.3: Prometheus text format 0.0.4
            assert r.headers["content-type"].startswith("text/plain; version=0.0.4"), r.headers["content-type"]


# --- devices -----------------------------------------------------------------------------------
async def test_device_list_shape_sorting_and_display_name(config_factory):
    async with run_daemon(config_factory()) as (daemon, running), http_client(running) as http:
        url = running.ws_url
        alice, bob = DeviceKey.generate(), DeviceKey.generate()
        laptop, phone, tablet, bobs = new_device_id(), new_device_id(), new_device_id(), new_device_id()
        with trio.fail_after(T):
            await register(running, alice, laptop, device_name="Laptop", device_type="desktop")
            await trio.sleep(0.01)
            await register(running, alice, tablet)  # no name, no type
            await register(running, bob, bobs, device_name="Bob's")
            await _all_offline(daemon, alice.public_hex)
            async with connect(url, alice, phone, device_name="Phone", device_type="mobile"):
                r = await signed(http, alice, laptop, "GET", "/api/devices")
                assert r.status_code == 200
                body = r.json()
                assert set(body) == {"devices", "count", "is_empty", "user_id"}
                assert body["count"] == 3 and body["is_empty"] is False
                assert body["user_id"] == alice.public_hex
                devices = body["devices"]
                assert {d["device_id"] for d in devices} == {laptop, phone, tablet}
                by_id = {d["device_id"]: d for d in devices}
                assert set(by_id[laptop]) == DEVICE_INFO_KEYS
                assert by_id[laptop]["device_name"] == "Laptop" and by_id[laptop]["device_type"] == "desktop"
                # null optional keys are omitted
                assert set(by_id[tablet]) == DEVICE_INFO_KEYS - {"device_name", "device_type"}
                assert [d["device_id"] for d in devices if d["is_current"]] == [laptop]
                for d in devices:
                    assert isinstance(d["is_online"], bool)
                    assert _is_ms(d["last_seen"]) and _is_ms(d["registered_at"])
                # online first, then last_seen descending
                assert devices[0]["device_id"] == phone and devices[0]["is_online"] is True
                assert [d["is_online"] for d in devices] == [True, False, False]
                assert devices[1]["last_seen"] >= devices[2]["last_seen"]
                assert by_id[phone]["is_current"] is False

                # the display name of the profile shows up
                r = await signed(http, alice, phone, "POST", "/api/user/profile", {"display_name": "Alice"})
                assert r.status_code == 200
                r = await signed(http, alice, phone, "GET", "/api/devices")
                body = r.json()
                assert set(body) == {"devices", "count", "is_empty", "user_id", "user_display_name"}
                assert body["user_display_name"] == "Alice"
                assert [d["device_id"] for d in body["devices"] if d["is_current"]] == [phone]
                # bob sees only his own device
                r = await signed(http, bob, bobs, "GET", "/api/devices")
                assert [d["device_id"] for d in r.json()["devices"]] == [bobs]
                assert "user_display_name" not in r.json()


async def test_get_device(config_factory):
    async with run_daemon(config_factory()) as (daemon, running), http_client(running) as http:
        alice, bob = DeviceKey.generate(), DeviceKey.generate()
        laptop, phone, bobs = new_device_id(), new_device_id(), new_device_id()
        with trio.fail_after(T):
            await register(running, alice, laptop, device_name="Laptop", device_type="desktop")
            await register(running, alice, phone, device_name="Phone")
            await register(running, bob, bobs)
            await _all_offline(daemon, alice.public_hex)
            r = await signed(http, alice, laptop, "GET", f"/api/devices/{phone}")
            assert r.status_code == 200
            info = r.json()
            assert set(info) == DEVICE_INFO_KEYS - {"device_type"}
            assert info["device_id"] == phone and info["device_name"] == "Phone"
            assert info["is_current"] is False and info["is_online"] is False
            r = await signed(http, alice, laptop, "GET", f"/api/devices/{laptop}")
            assert r.json()["is_current"] is True and r.json()["device_type"] == "desktop"
            # an upper-case id in the path names the same device
            r = await signed(http, alice, laptop, "GET", f"/api/devices/{phone.upper()}")
            assert r.status_code == 200 and r.json()["device_id"] == phone
            # unknown and another user's device: the same 404
            unknown = assert_error(await signed(http, alice, laptop, "GET", f"/api/devices/{new_device_id()}"),
                                   404, "DEVICE_NOT_FOUND", "Device not found")
            other = assert_error(await signed(http, alice, laptop, "GET", f"/api/devices/{bobs}"),
                                 404, "DEVICE_NOT_FOUND", "Device not found")
            assert unknown["error"] == other["error"]
            assert_error(await signed(http, alice, laptop, "GET", "/api/devices/not-a-uuid"), 400, "INVALID_DEVICE_ID")


async def test_rename_device(config_factory):
    async with run_daemon(config_factory()) as (_, running), http_client(running) as http:
        alice, bob = DeviceKey.generate(), DeviceKey.generate()
        laptop, phone, bobs = new_device_id(), new_device_id(), new_device_id()
        with trio.fail_after(T):
            await register(running, alice, laptop, device_name="Laptop")
            await register(running, alice, phone, device_name="Phone")
            await register(running, bob, bobs, device_name="Bob's")

            async def rename(device_id: str, body: object):
                return await signed(http, alice, laptop, "POST", f"/api/devices/{device_id}/rename", body)

            r = await rename(phone, {"device_name": "  Work phone  "})
            assert r.status_code == 200
            assert r.json() == {"success": True, "device_id": phone, "device_name": "Work phone"}
            r = await signed(http, alice, laptop, "GET", f"/api/devices/{phone}")
            assert r.json()["device_name"] == "Work phone"
            # renaming to the current name succeeds
            r = await rename(phone, {"device_name": "Work phone"})
            assert r.status_code == 200 and r.json()["device_name"] == "Work phone"
            # 50 code points (non-BMP characters count once) are fine; 51 are not
            r = await rename(phone, {"device_name": "\U0001F4F1" * 50})
            assert r.status_code == 200, r.text
            too_long = "Device name must be 1-50 characters"
            assert_error(await rename(phone, {"device_name": "x" * 51}), 400, "INVALID_DEVICE_NAME", too_long)
            assert_error(await rename(phone, {"device_name": ""}), 400, "INVALID_DEVICE_NAME", too_long)
            assert_error(await rename(phone, {"device_name": "   "}), 400, "INVALID_DEVICE_NAME", too_long)
            invalid = "Device name contains invalid characters"
            assert_error(await rename(phone, {"device_name": "bad\x07name"}), 400, "INVALID_DEVICE_NAME", invalid)
            assert_error(await rename(phone, {"device_name": "tab\there"}), 400, "INVALID_DEVICE_NAME", invalid)
            assert_error(await rename(phone, {"device_name": "<b>bold</b>"}), 400, "INVALID_DEVICE_NAME", invalid)
            assert_error(await rename(phone, {"device_name": "a > b"}), 400, "INVALID_DEVICE_NAME", invalid)
            # a name used by another non-revoked device of the user
            assert_error(await rename(phone, {"device_name": "Laptop"}), 409, "DEVICE_NAME_TAKEN",
                         "Another device with this name already exists")
            # another user's name is not taken, and its device cannot be renamed
            r = await rename(phone, {"device_name": "Bob's"})
            assert r.status_code == 200
            assert_error(await rename(bobs, {"device_name": "Mine"}), 404, "DEVICE_NOT_FOUND", "Device not found")
            assert_error(await rename(new_device_id(), {"device_name": "Ghost"}), 404, "DEVICE_NOT_FOUND")
            assert_error(await rename("1234", {"device_name": "Ghost"}), 400, "INVALID_DEVICE_ID")
            # the name of a revoked device is free again
            r = await signed(http, alice, laptop, "DELETE", f"/api/devices/{phone}")
            assert r.status_code == 200
            r = await rename(laptop, {"device_name": "Bob's"})
            assert r.status_code == 200 and r.json() == {"success": True, "device_id": laptop, "device_name": "Bob's"}
            assert_error(await rename(phone, {"device_name": "Revived"}), 404, "DEVICE_NOT_FOUND")
            r = await signed(http, bob, bobs, "GET", f"/api/devices/{bobs}")
            assert r.json()["device_name"] == "Bob's"


async def test_delete_device_revokes_and_closes_its_connection(config_factory):
    async with run_daemon(config_factory()) as (daemon, running), http_client(running) as http:
        url = running.ws_url
        alice = DeviceKey.generate()
        laptop, phone = new_device_id(), new_device_id()
        with trio.fail_after(T):
            await register(running, alice, laptop, device_name="Laptop")
            async with connect(url, alice, phone, device_name="Phone") as p:
                r = await signed(http, alice, laptop, "DELETE", f"/api/devices/{phone}")
                assert r.status_code == 200
                assert r.json() == {"success": True, "message": f"Device {phone} has been removed"}
                with trio.fail_after(1):
                    notice = await p.next_notice("device_revoked")
                assert notice["payload"]["type"] == "device_revoked"
                assert notice["payload"]["reason"] == "Device has been removed by user"
                assert _is_ms(notice["payload"]["timestamp"])
                assert set(notice["payload"]) == {"type", "reason", "timestamp"}
                await _closed_with(p, 1000, "Device revoked")
            # gone from the list and from presence; the row is kept (404 rather than a resurrection)
            r = await signed(http, alice, laptop, "GET", "/api/devices")
            assert [d["device_id"] for d in r.json()["devices"]] == [laptop]
            assert r.json()["count"] == 1
            await _all_offline(daemon, alice.public_hex)
            r = await signed(http, alice, laptop, "GET", "/api/presence")
            assert [d["device_id"] for d in r.json()["devices"]] == [laptop]
            assert r.json()["total_count"] == 1 and r.json()["online_count"] == 0
            assert_error(await signed(http, alice, laptop, "GET", f"/api/devices/{phone}"), 404, "DEVICE_NOT_FOUND")
            assert_error(await signed(http, alice, laptop, "DELETE", f"/api/devices/{phone}"), 404, "DEVICE_NOT_FOUND")
            assert_error(await signed(http, alice, laptop, "DELETE", "/api/devices/xyz"), 400, "INVALID_DEVICE_ID")
            # the revoked device cannot come back over the WebSocket
            with pytest.raises(HandshakeRefused) as refused:
                await register(running, alice, phone)
            assert (refused.value.code, refused.value.reason) == (1008, "Device has been revoked")


async def test_a_device_may_delete_itself(config_factory):
    async with run_daemon(config_factory()) as (_, running), http_client(running) as http:
        alice = DeviceKey.generate()
        laptop, phone = new_device_id(), new_device_id()
        with trio.fail_after(T):
            await register(running, alice, laptop)
            await register(running, alice, phone)
            async with connect(running.ws_url, alice, laptop) as own:
                r = await signed(http, alice, laptop, "DELETE", f"/api/devices/{laptop}")
                assert r.status_code == 200
                assert r.json() == {"success": True, "message": f"Device {laptop} has been removed"}
                notice = await own.next_notice("device_revoked")
                assert notice["payload"]["reason"] == "Device has been removed by user"
                await _closed_with(own, 1000, "Device revoked")
            assert_error(await signed(http, alice, laptop, "GET", "/api/devices"), 401, "DEVICE_REVOKED",
                         "Device has been revoked")
            r = await signed(http, alice, phone, "GET", "/api/devices")
            assert [d["device_id"] for d in r.json()["devices"]] == [phone]


async def test_presence_shape(config_factory):
    async with run_daemon(config_factory()) as (daemon, running), http_client(running) as http:
        alice = DeviceKey.generate()
        laptop, phone, tablet = new_device_id(), new_device_id(), new_device_id()
        with trio.fail_after(T):
            await register(running, alice, laptop, device_name="Laptop")
            await trio.sleep(0.01)
            await register(running, alice, tablet)
            await _all_offline(daemon, alice.public_hex)
            async with connect(running.ws_url, alice, phone, device_name="Phone"):
                r = await signed(http, alice, laptop, "GET", "/api/presence")
                assert r.status_code == 200
                body = r.json()
                assert set(body) == {"user_id", "devices", "online_count", "total_count", "is_empty"}
                assert body["user_id"] == alice.public_hex
                assert body["online_count"] == 1 and body["total_count"] == 3 and body["is_empty"] is False
                for d in body["devices"]:
                    assert set(d) == {"device_id", "device_name", "is_online", "last_seen"}
                    assert _is_ms(d["last_seen"])
                by_id = {d["device_id"]: d for d in body["devices"]}
                assert set(by_id) == {laptop, phone, tablet}
                assert by_id[phone]["is_online"] is True and by_id[phone]["device_name"] == "Phone"
                assert by_id[laptop]["is_online"] is False
                assert by_id[tablet]["device_name"] is None  # null kept in presence
                seen = [d["last_seen"] for d in body["devices"]]
                assert seen == sorted(seen, reverse=True)
            # after the connection ends the device is offline again
            async def offline() -> bool:
                r = await signed(http, alice, laptop, "GET", "/api/presence")
                return r.json()["online_count"] == 0

            await wait_for(offline, interval=0.05)


# --- profile -----------------------------------------------------------------------------------
async def test_profile_defaults_updates_and_validation(config_factory):
    async with run_daemon(config_factory()) as (_, running), http_client(running) as http:
        alice = DeviceKey.generate()
        laptop = new_device_id()
        with trio.fail_after(T):
            await register(running, alice, laptop)

            async def update(body: object):
                return await signed(http, alice, laptop, "POST", "/api/user/profile", body)

            r = await signed(http, alice, laptop, "GET", "/api/user/profile")
            assert r.status_code == 200
            profile = r.json()
            assert set(profile) == PROFILE_KEYS  # null keys are kept
            assert profile["user_id"] == alice.public_hex
            assert profile["display_name"] is None and profile["email"] is None and profile["avatar_url"] is None
            assert profile["preferences"] == {} and profile["onboarding_completed"] is False
            for k in ("created_at", "updated_at", "last_seen"):
                assert _is_ms(profile[k]), (k, profile[k])

            r = await update({"display_name": "  Alice  ", "email": "alice@example.com",
                              "preferences": {"theme": "dark", "fontSize": 14}})
            assert r.status_code == 200, r.text
            body = r.json()
            assert set(body) == {"success", "profile"} and body["success"] is True
            p = body["profile"]
            assert set(p) == PROFILE_KEYS
            assert p["display_name"] == "Alice" and p["email"] == "alice@example.com"
            assert p["preferences"] == {"theme": "dark"}  # unknown keys ignored
            assert p["created_at"] == profile["created_at"] and p["updated_at"] >= profile["updated_at"]
            # preferences are merged
            r = await update({"preferences": {"notifications": False, "autoSync": True}})
            assert r.json()["profile"]["preferences"] == {"theme": "dark", "notifications": False, "autoSync": True}
            r = await update({"preferences": {"theme": "auto"}})
            assert r.json()["profile"]["preferences"] == {"theme": "auto", "notifications": False, "autoSync": True}
            assert r.json()["profile"]["display_name"] == "Alice"
            # validation
            assert_error(await update({"preferences": {"theme": "neon"}}), 400, "VALIDATION_ERROR", "Invalid preferences")
            assert_error(await update({"preferences": {"notifications": "yes"}}), 400, "VALIDATION_ERROR",
                         "Invalid preferences")
            assert_error(await update({"preferences": "dark"}), 400, "VALIDATION_ERROR", "Invalid preferences")
            assert_error(await update({"email": "not-an-email"}), 400, "VALIDATION_ERROR", "Invalid email address")
            assert_error(await update({"email": "a@b"}), 400, "VALIDATION_ERROR", "Invalid email address")
            assert_error(await update({"email": "a" * 250 + "@x.com"}), 400, "VALIDATION_ERROR",
                         "Invalid email address")
            name_text = "Display name must be 1-100 characters"
            assert_error(await update({"display_name": "   "}), 400, "VALIDATION_ERROR", name_text)
            assert_error(await update({"display_name": "x" * 101}), 400, "VALIDATION_ERROR", name_text)
            assert_error(await update({}), 400, "NO_UPDATES", "No valid updates provided")
            # the old in-body signature fields are ignored, not required
            assert_error(await update({"signature": "00" * 64, "timestamp": 1}), 400, "NO_UPDATES",
                         "No valid updates provided")
            r = await update({"display_name": "Bob", "signature": "garbage", "timestamp": "yesterday"})
            assert r.status_code == 200 and r.json()["profile"]["display_name"] == "Bob"
            # nothing of the failed updates was stored
            p = (await signed(http, alice, laptop, "GET", "/api/user/profile")).json()
            assert p["email"] == "alice@example.com"
            assert p["preferences"] == {"theme": "auto", "notifications": False, "autoSync": True}
            # null clears
            r = await update({"display_name": None, "email": None})
            assert r.status_code == 200
            p = r.json()["profile"]
            assert p["display_name"] is None and p["email"] is None and set(p) == PROFILE_KEYS
            r = await signed(http, alice, laptop, "GET", "/api/devices")
            assert "user_display_name" not in r.json()


async def test_onboarding_complete(config_factory):
    async with run_daemon(config_factory()) as (_, running), http_client(running) as http:
        alice = DeviceKey.generate()
        laptop = new_device_id()
        with trio.fail_after(T):
            await register(running, alice, laptop)
            r = await signed(http, alice, laptop, "POST", "/api/user/profile/onboarding-complete")
            assert (r.status_code, r.json()) == (200, {"success": True})
            r = await signed(http, alice, laptop, "GET", "/api/user/profile")
            assert r.json()["onboarding_completed"] is True


# --- file history ------------------------------------------------------------------------------
async def test_file_history(config_factory):
    async with run_daemon(config_factory()) as (_, running), http_client(running) as http:
        alice, bob = DeviceKey.generate(), DeviceKey.generate()
        laptop, phone, bobs = new_device_id(), new_device_id(), new_device_id()
        with trio.fail_after(T):
            payloads = [b"file-one", b"file-two" * 10, b"file-three" * 3]
            async with connect(running.ws_url, alice, laptop) as a, connect(running.ws_url, bob, bobs) as b:
                acks = [await a.send_event("files:main", "file:metadata", payloads[0])]
                assert (await a.send_event("clipboard:main", "clipboard:text", b"not a file")).status == "stored"
                assert (await b.send_event("files:main", "file:metadata", b"bob's file")).status == "stored"
                acks.append(await a.send_event("files:main", "file:metadata", payloads[1]))
                soon = int(time.time() * 1000) + 300
                expiring = await a.send_event("files:main", "file:metadata", b"expires soon", ttl=soon)
                assert expiring.status == "stored"
                acks.append(await a.send_event("files:other", "file:metadata", payloads[2],
                                               ttl=int(time.time() * 1000) + 3_600_000))
                assert all(ack.status == "stored" for ack in acks)
            await register(running, alice, phone)
            await trio.sleep(max(0.0, soon / 1000 - time.time()) + 0.05)

            r = await signed(http, alice, phone, "GET", "/api/events/files")
            assert r.status_code == 200
            body = r.json()
            assert set(body) == {"events", "pagination"}
            assert body["pagination"] == {"limit": 50, "offset": 0, "total": 3, "hasMore": False}
            events = body["events"]
            # newest first; the expired one, other types and other users' events are not there
            assert [e["event_id"] for e in events] == [ack.event_id for ack in reversed(acks)]
            for e, payload in zip(events, reversed(payloads)):
                assert set(e) == {"event_id", "device_id", "stream_id", "stream_seq", "type", "encrypted_payload",
                                  "payload_size", "created_at"}
                assert e["device_id"] == laptop and e["type"] == "file:metadata"
                assert base64.b64decode(e["encrypted_payload"]) == payload
                assert e["payload_size"] == len(payload)
                assert _is_ms(e["created_at"])
                assert isinstance(e["stream_seq"], int) and not isinstance(e["stream_seq"], bool)
            assert [e["stream_id"] for e in events] == ["files:other", "files:main", "files:main"]
            assert [e["stream_seq"] for e in events] == [1, 2, 1]  # per (user, stream_id)
            created = [e["created_at"] for e in events]
            assert created == sorted(created, reverse=True)

            # pagination
            r = await signed(http, alice, phone, "GET", "/api/events/files?limit=1&offset=1")
            assert r.status_code == 200
            assert r.json()["pagination"] == {"limit": 1, "offset": 1, "total": 3, "hasMore": True}
            assert [e["event_id"] for e in r.json()["events"]] == [acks[1].event_id]
            r = await signed(http, alice, phone, "GET", "/api/events/files?limit=2&offset=2")
            assert r.json()["pagination"] == {"limit": 2, "offset": 2, "total": 3, "hasMore": False}
            assert [e["event_id"] for e in r.json()["events"]] == [acks[0].event_id]
            r = await signed(http, alice, phone, "GET", "/api/events/files?offset=10")
            assert r.json() == {"events": [], "pagination": {"limit": 50, "offset": 10, "total": 3, "hasMore": False}}
            # limit is clamped to 1..100
            for raw, clamped in (("0", 1), ("-5", 1), ("1000", 100), ("100", 100)):
                r = await signed(http, alice, phone, "GET", f"/api/events/files?limit={raw}")
                assert r.status_code == 200, (raw, r.text)
                assert r.json()["pagination"]["limit"] == clamped, raw
            # offset must be an integer >= 0
            for raw in ("-1", "abc", "1.5", ""):
                r = await signed(http, alice, phone, "GET", f"/api/events/files?offset={raw}")
                assert_error(r, 400, "VALIDATION_ERROR")

            # bob's history holds only his event
            r = await signed(http, bob, bobs, "GET", "/api/events/files")
            assert [base64.b64decode(e["encrypted_payload"]) for e in r.json()["events"]] == [b"bob's file"]


# --- account deletion --------------------------------------------------------------------------
async def test_delete_user(config_factory):
    async with run_daemon(config_factory()) as (_, running), http_client(running) as http:
        url = running.ws_url
        alice, bob = DeviceKey.generate(), DeviceKey.generate()
        laptop, phone, old, bobs = new_device_id(), new_device_id(), new_device_id(), new_device_id()
        with trio.fail_after(T):
            await register(running, alice, old)
            await register(running, bob, bobs)
            async with connect(url, alice, laptop) as a, connect(url, alice, phone) as p, connect(url, bob, bobs) as b:
                for i in range(3):
                    assert (await a.send_event("clipboard:main", "clipboard:text", b"x%d" % i)).status == "stored"
                    await p.receive_event()
                assert (await p.send_event("files:main", "file:metadata", b"file")).status == "stored"
                await a.receive_event()
                assert (await b.send_event("clipboard:main", "clipboard:text", b"bob")).status == "stored"
                r = await signed(http, alice, laptop, "DELETE", f"/api/devices/{old}")
                assert r.status_code == 200
                r = await signed(http, alice, laptop, "POST", "/api/user/profile", {"display_name": "Alice"})
                assert r.status_code == 200

                r = await signed(http, alice, laptop, "DELETE", "/api/user")
                assert r.status_code == 200
                assert r.json() == {
                    "success": True,
                    "message": "User account and all associated data have been deleted",
                    "deleted": {"devices": 3, "events": 4},  # the revoked device is counted too
                }
                for client in (a, p):
                    notice = await client.next_notice("device_revoked")
                    assert notice["payload"]["type"] == "device_revoked"
                    assert notice["payload"]["reason"] == "Account deleted"
                    await _closed_with(client, 1000, "Account deleted")
                # bob is untouched
                assert (await b.send_event("clipboard:main", "clipboard:text", b"still here")).status == "stored"
            # the account's devices no longer authenticate
            for device in (laptop, phone, old):
                r = await signed(http, alice, device, "GET", "/api/devices")
                assert r.status_code == 401, (device, r.text)
            r = await signed(http, bob, bobs, "GET", "/api/devices")
            assert r.status_code == 200 and r.json()["count"] == 1
            # the same key and device id may register again, as a fresh user
            await register(running, alice, laptop)
            r = await signed(http, alice, laptop, "GET", "/api/devices")
            assert r.status_code == 200 and [d["device_id"] for d in r.json()["devices"]] == [laptop]
            assert "user_display_name" not in r.json()
            r = await signed(http, alice, laptop, "GET", "/api/events/files")
            assert r.json()["pagination"]["total"] == 0


# --- removed endpoints -------------------------------------------------------------------------
async def test_rest_pairing_is_gone_and_connection_status_is_not_found(config_factory):
    async with run_daemon(config_factory()) as (_, running), http_client(running) as http:
        alice = DeviceKey.generate()
        with trio.fail_after(T):
            for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
                for path in ("/api/pairing", "/api/pairing/store", "/api/pairing/lookup/123456",
                             "/api/v1/pairing/store"):
                    r = await http.request(method, path, headers={"X-User-ID": alice.public_hex},
                                           content=b'{"code":"123456"}' if method in ("POST", "PUT") else b"")
                    assert_error(r, 410, "GONE", GONE_TEXT)
            for path in ("/api/connection-status", "/api/v1/connection-status"):
                assert_error(await http.get(path, headers={"X-User-ID": alice.public_hex}), 404, "NOT_FOUND",
                             "Not found")


# --- admin -------------------------------------------------------------------------------------
async def test_admin_disabled_without_a_key(config_factory):
    async with run_daemon(config_factory()) as (_, running), http_client(running) as http:
        with trio.fail_after(T):
            device = new_device_id()
            for headers in ({}, {"X-Admin-API-Key": ADMIN_KEY}, {"Authorization": f"Bearer {ADMIN_KEY}"}):
                r = await http.post("/admin/revoke-device", json={"deviceId": device}, headers=headers)
                assert_error(r, 403, "ADMIN_DISABLED")
                assert r.headers["Cache-Control"] == "no-store"
            assert_error(await http.get("/admin/revoked-devices"), 403, "ADMIN_DISABLED")
            assert_error(await http.post("/admin/unrevoke-device", json={"deviceId": device}), 403, "ADMIN_DISABLED")


async def test_admin_authentication(config_factory):
    async with run_daemon(config_factory(admin={"api_key": ADMIN_KEY})) as (_, running), http_client(running) as http:
        with trio.fail_after(T):
            for headers in ({}, {"X-Admin-API-Key": "wrong"}, {"X-Admin-API-Key": ADMIN_KEY[:-1]},
                            {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN_KEY},
                            {"X-User-ID": "0" * 64}):
                r = await http.get("/admin/revoked-devices", headers=headers)
                assert_error(r, 401, "ADMIN_AUTH_REQUIRED")
            for headers in ({"X-Admin-API-Key": ADMIN_KEY}, {"Authorization": f"Bearer {ADMIN_KEY}"}):
                r = await http.get("/admin/revoked-devices", headers=headers)
                # (the PostgreSQL database is shared by the test session: other tests' devices may be listed)
                assert r.status_code == 200 and set(r.json()) == {"revoked"} and isinstance(r.json()["revoked"], list)
                assert r.headers["Cache-Control"] == "no-store"


async def test_admin_revoke_unrevoke_and_listing(config_factory):
    config = config_factory(admin={"api_key": ADMIN_KEY}, limits={"max_devices_per_user": 2})
    async with run_daemon(config) as (_, running), http_client(running) as http:
        url = running.ws_url
        alice, bob = DeviceKey.generate(), DeviceKey.generate()
        laptop, phone, tablet, bobs = new_device_id(), new_device_id(), new_device_id(), new_device_id()
        auth = {"X-Admin-API-Key": ADMIN_KEY}

        async def admin_post(path: str, body: dict):
            return await http.post(path, json=body, headers=auth)

        with trio.fail_after(T):
            await register(running, alice, laptop)
            await register(running, bob, bobs)
            async with connect(url, alice, phone) as p:
                # validation and unknown devices
                assert_error(await admin_post("/admin/revoke-device", {}), 400, "VALIDATION_ERROR")
                assert_error(await admin_post("/admin/revoke-device", {"deviceId": "nope"}), 400, "VALIDATION_ERROR")
                assert_error(await admin_post("/admin/revoke-device", {"deviceId": phone, "reason": "r" * 201}),
                             400, "VALIDATION_ERROR")
                assert_error(await admin_post("/admin/revoke-device", {"deviceId": new_device_id()}),
                             404, "DEVICE_NOT_FOUND", "Device not found")
                assert_error(await admin_post("/admin/revoke-device", {"deviceId": phone, "userId": bob.public_hex}),
                             404, "DEVICE_NOT_FOUND")
                r = await signed(http, alice, phone, "GET", "/api/devices")
                assert r.status_code == 200  # the mismatched userId revoked nothing

                r = await admin_post("/admin/revoke-device",
                                     {"deviceId": phone.upper(), "reason": "Lost phone", "userId": alice.public_hex})
                assert (r.status_code, r.json()) == (200, {"success": True, "message": "Device revoked"})
                notice = await p.next_notice("device_revoked")
                assert notice["payload"]["reason"] == "Lost phone"
                await _closed_with(p, 1000, "Device revoked")
            # idempotent
            r = await admin_post("/admin/revoke-device", {"deviceId": phone})
            assert (r.status_code, r.json()) == (200, {"success": True, "message": "Device revoked"})
            assert_error(await signed(http, alice, phone, "GET", "/api/devices"), 401, "DEVICE_REVOKED")
            r = await signed(http, alice, laptop, "GET", "/api/devices")
            assert [d["device_id"] for d in r.json()["devices"]] == [laptop]

            # the default reason
            async with connect(url, bob, bobs) as b:
                await trio.sleep(0.01)
                r = await admin_post("/admin/revoke-device", {"deviceId": bobs})
                assert r.status_code == 200
                notice = await b.next_notice("device_revoked")
                assert notice["payload"]["reason"] == "Device revoked by administrator"
                await _closed_with(b, 1000, "Device revoked")

            # listing: newest first, filtered by user
            r = await http.get("/admin/revoked-devices", headers=auth)
            assert r.status_code == 200
            assert set(r.json()) == {"revoked"}
            mine = {phone, bobs, tablet}  # the PostgreSQL database is shared with other tests of the session
            revoked = [x for x in r.json()["revoked"] if x["device_id"] in mine]
            assert [x["device_id"] for x in revoked] == [bobs, phone]
            for x in revoked:
                assert set(x) == {"device_id", "user_id", "revoked_at", "reason"} and _is_ms(x["revoked_at"])
            assert revoked[0]["user_id"] == bob.public_hex and revoked[0]["reason"] == "Device revoked by administrator"
            assert revoked[1]["user_id"] == alice.public_hex and revoked[1]["reason"] == "Lost phone"
            assert revoked[0]["revoked_at"] >= revoked[1]["revoked_at"]
            r = await http.get(f"/admin/revoked-devices?user_id={alice.public_hex}", headers=auth)
            assert [x["device_id"] for x in r.json()["revoked"]] == [phone]
            r = await http.get(f"/admin/revoked-devices?userId={alice.public_hex.upper()}", headers=auth)
            assert [x["device_id"] for x in r.json()["revoked"]] == [phone]
            assert_error(await http.get("/admin/revoked-devices?userId=xyz", headers=auth), 400, "VALIDATION_ERROR")

            # unrevoke: at the limit → 409, otherwise the device can handshake again
            await register(running, alice, tablet)  # alice: laptop + tablet = 2 = the limit
            assert_error(await admin_post("/admin/unrevoke-device", {"deviceId": phone}), 409, "DEVICE_LIMIT",
                         "Device limit reached")
            assert_error(await admin_post("/admin/unrevoke-device", {"deviceId": new_device_id()}),
                         404, "DEVICE_NOT_FOUND")
            assert_error(await admin_post("/admin/unrevoke-device", {"deviceId": "x"}), 400, "VALIDATION_ERROR")
            r = await signed(http, alice, laptop, "DELETE", f"/api/devices/{tablet}")
            assert r.status_code == 200
            r = await admin_post("/admin/unrevoke-device", {"deviceId": phone})
            assert (r.status_code, r.json()) == (200, {"success": True, "message": "Device unrevoked"})
            r = await admin_post("/admin/unrevoke-device", {"deviceId": phone})
            assert (r.status_code, r.json()) == (200, {"success": True, "message": "Device unrevoked"})
            async with connect(url, alice, phone) as p:
                assert p.user_id == alice.public_hex
                r = await signed(http, alice, phone, "GET", "/api/devices")
                assert r.status_code == 200
                assert {d["device_id"] for d in r.json()["devices"]} == {laptop, phone}
            r = await http.get("/admin/revoked-devices", headers=auth)
            assert [x["device_id"] for x in r.json()["revoked"] if x["device_id"] in mine] == [tablet, bobs]
