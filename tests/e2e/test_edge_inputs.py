"""Edge inputs against a running daemon: small-order Ed25519 keys (protocol.md §2, §3.5, §10.2) and
bidirectional controls in device names (§3.6, §10.3)."""

from __future__ import annotations

import trio

from pocketbridge.client import DeviceKey, connect, new_device_id
from pocketbridge.store import AdmitRequest
from tests.conftest import run_daemon
from tests.e2e.httpclient import assert_error, http_client, now_ms, register, signed
from tests.e2e.rawclient import RawHandshake, assert_close, assert_relay_works, e2e_config, open_ws

T = 5  # seconds: every wait is bounded
IDENTITY_POINT = "01" + "00" * 31  # the neutral element: [k]A is the identity for every k
FORGED_SIGNATURE = bytes.fromhex("01" + "00" * 63)  # R = identity, S = 0: "verifies" for such a key
BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


class ForgedKey:
    """Stands in for a DeviceKey whose public key is of small order: anyone can "sign" for it."""

    public_hex = IDENTITY_POINT

    def sign(self, data: bytes) -> bytes:
        return FORGED_SIGNATURE


# --- small-order keys ---------------------------------------------------------------------------------
async def test_a_small_order_user_id_with_a_forged_signature_is_refused(config_factory):
    async with run_daemon(e2e_config(config_factory)) as (daemon, running):
        with trio.fail_after(T):
            for _ in range(2):  # two unrelated clients would both have become "this user"
                device_id = new_device_id()
                async with open_ws(running.ws_url) as ws:
                    hs = RawHandshake(ws, ForgedKey(), device_id)  # type: ignore[arg-type]
                    await hs.hello()
                    await hs.read_server_hello()
                    await hs.auth()
                    await assert_close(ws, 1008, "Invalid client signature")
                assert await daemon.gateway.store.get_device(device_id) is None
            await assert_relay_works(running.ws_url)


async def test_a_pb1_request_signed_for_a_small_order_key_is_refused(config_factory):
    async with run_daemon(e2e_config(config_factory)) as (daemon, running), http_client(running) as http:
        gw = daemon.gateway
        with trio.fail_after(T):
            # a device bound to such a key (as a database written before the check could hold)
            device_id = new_device_id()
            admission = await gw.store.admit_device(
                AdmitRequest(key=IDENTITY_POINT, device_id=device_id, device_name="Forged", device_type=None,
                             max_devices=5),
                gw.clock.now_ms(),
            )
            assert admission.device is not None
            for method, path in (("GET", "/api/devices"), ("POST", "/api/auth/token")):
                ts = str(now_ms())
                headers = {"X-PB-Device-ID": device_id, "X-PB-Timestamp": ts,
                           "X-PB-Signature": FORGED_SIGNATURE.hex()}
                r = await http.request(method, path, headers=headers)
                assert_error(r, 401, "INVALID_SIGNATURE")
            # an ordinary key still works
            key, laptop = DeviceKey.generate(), new_device_id()
            await register(running, key, laptop)
            assert (await signed(http, key, laptop, "GET", "/api/devices")).status_code == 200


# --- bidirectional controls in device names -----------------------------------------------------------
async def test_bidi_controls_are_removed_from_handshake_names_and_refused_by_rename(config_factory):
    async with run_daemon(e2e_config(config_factory)) as (_, running), http_client(running) as http:
        url = running.ws_url
        alice = DeviceKey.generate()
        watcher_id = new_device_id()
        family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # ZWJ sequence: kept
        with trio.fail_after(T):
            async with connect(url, alice, watcher_id) as watcher:
                laptop = new_device_id()
                async with connect(url, alice, laptop, device_name=f"Lap\u202etop{BIDI} \"A&B\" {family}"):
                    presence = await watcher.next_notice("device_status_changed")
                expected = f"Laptop \"A&B\" {family}"
                assert presence["payload"]["device_name"] == expected
                r = await signed(http, alice, watcher_id, "GET", "/api/devices")
                assert r.status_code == 200, r.text
                names = {d["device_id"]: d.get("device_name") for d in r.json()["devices"]}
                assert names[laptop] == expected

                for ch in BIDI:
                    r = await signed(http, alice, watcher_id, "POST", f"/api/devices/{laptop}/rename",
                                     {"device_name": f"gpj.{ch}exe"})
                    assert_error(r, 400, "INVALID_DEVICE_NAME", "Device name contains invalid characters")
                r = await signed(http, alice, watcher_id, "POST", f"/api/devices/{laptop}/rename",
                                 {"device_name": f"Tom's \"work\" & {family}"})
                assert r.status_code == 200, r.text
                assert r.json()["device_name"] == f"Tom's \"work\" & {family}"
