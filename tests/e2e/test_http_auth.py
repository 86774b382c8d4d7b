"""HTTP authentication (protocol.md §10.2): PB1 signed requests and bearer tokens, against a running daemon."""

from __future__ import annotations

import base64
import json
import time

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from pocketbridge.client import DeviceKey, new_device_id
from pocketbridge.protocol.auth import issue_jwt, sign_pb1
from pocketbridge.protocol.handshake import ServerIdentity
from tests.conftest import run_daemon
from tests.e2e.httpclient import (
    assert_error,
    bearer,
    http_client,
    now_ms,
    pb1_headers,
    register,
    signed,
)

T = 5  # seconds: every wait is bounded
SKEW_MS = 300_000
# These tests fail authentication on purpose, many times: keep the per-address limits out of the way
# (they have their own tests in test_http_cross.py).
LOOSE = {"unauthenticated_per_ip_per_minute": 10_000, "auth_failures_per_ip_per_minute": 10_000}


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64u(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


async def _setup(running, *names: str) -> tuple[DeviceKey, list[str]]:
    key = DeviceKey.generate()
    devices = [new_device_id() for _ in names]
    for device, name in zip(devices, names):
        await register(running, key, device, device_name=name)
    return key, devices


# --- missing and malformed credentials ---------------------------------------------------------
async def test_no_credentials_and_x_user_id_alone_are_refused(config_factory):
    async with run_daemon(config_factory(http=LOOSE)) as (_, running), http_client(running) as http:
        with trio.fail_after(T):
            key, (laptop,) = await _setup(running, "Laptop")
            for method, path in (("GET", "/api/devices"), ("GET", "/api/v1/devices"), ("POST", "/api/auth/token"),
                                 ("POST", "/api/auth/refresh"), ("GET", "/api/presence"),
                                 ("GET", "/api/user/profile"), ("DELETE", "/api/user"),
                                 ("GET", "/api/events/files"), ("DELETE", f"/api/devices/{laptop}")):
                for headers in ({}, {"X-User-ID": key.public_hex}, {"X-User-ID": key.public_hex,
                                                                     "X-Device-ID": laptop}):
                    r = await http.request(method, path, headers=headers)
                    assert_error(r, 401, "AUTH_REQUIRED", "Authentication required")
                    assert r.headers["Cache-Control"] == "no-store"
            # a malformed Authorization header is not a bearer token either
            for value in ("Basic dXNlcjpwYXNz", "Bearer", "Bearer a b", key.public_hex):
                r = await http.get("/api/devices", headers={"Authorization": value})
                assert r.status_code == 401, (value, r.text)
            # the account was untouched
            r = await signed(http, key, laptop, "GET", "/api/devices")
            assert r.status_code == 200 and r.json()["count"] == 1


async def test_partial_or_malformed_pb1_headers(config_factory):
    async with run_daemon(config_factory(http=LOOSE)) as (_, running), http_client(running) as http:
        with trio.fail_after(T):
            key, (laptop,) = await _setup(running, "Laptop")
            good = pb1_headers(key, laptop, "GET", "/api/devices")
            names = list(good)
            for missing in names:
                headers = {k: v for k, v in good.items() if k != missing}
                assert_error(await http.get("/api/devices", headers=headers), 401, "INVALID_AUTH_HEADERS")
            for only in names:
                assert_error(await http.get("/api/devices", headers={only: good[only]}), 401, "INVALID_AUTH_HEADERS")
            bad_values = {
                "X-PB-Device-ID": ["not-a-uuid", "550e8400-e29b-11d4-a716-446655440000", laptop + "0", ""],
                "X-PB-Timestamp": ["12a", "-1", "1.7e12", "0x10", "", "1" * 17],
                "X-PB-Signature": [good["X-PB-Signature"][:-1], "z" * 128, good["X-PB-Signature"] + "00", ""],
            }
            for name, values in bad_values.items():
                for value in values:
                    r = await http.get("/api/devices", headers={**good, name: value})
                    assert_error(r, 401, "INVALID_AUTH_HEADERS")
            # any X-PB-* header means PB1 applies, even next to a valid bearer token
            token = (await signed(http, key, laptop, "POST", "/api/auth/token")).json()["token"]
            assert (await bearer(http, token, "GET", "/api/devices")).status_code == 200
            r = await http.get("/api/devices", headers={"Authorization": f"Bearer {token}",
                                                        "X-PB-Device-ID": laptop})
            assert_error(r, 401, "INVALID_AUTH_HEADERS")


async def test_bad_signatures_and_unknown_devices(config_factory):
    async with run_daemon(config_factory(http=LOOSE)) as (_, running), http_client(running) as http:
        with trio.fail_after(T):
            key, (laptop,) = await _setup(running, "Laptop")
            mallory = DeviceKey.generate()
            text = "Invalid request signature"
            # signed by another key
            assert_error(await signed(http, mallory, laptop, "GET", "/api/devices"), 401, "INVALID_SIGNATURE", text)
            # an unknown device gets the same answer
            unknown = new_device_id()
            assert_error(await signed(http, key, unknown, "GET", "/api/devices"), 401, "INVALID_SIGNATURE", text)
            assert_error(await signed(http, mallory, unknown, "GET", "/api/devices"), 401, "INVALID_SIGNATURE", text)
            # signed for another method, path or body
            headers = pb1_headers(key, laptop, "POST", "/api/devices")
            assert_error(await http.get("/api/devices", headers=headers), 401, "INVALID_SIGNATURE", text)
            headers = pb1_headers(key, laptop, "GET", "/api/presence")
            assert_error(await http.get("/api/devices", headers=headers), 401, "INVALID_SIGNATURE", text)
            body = b'{"display_name":"Alice"}'
            headers = pb1_headers(key, laptop, "POST", "/api/user/profile", body)
            r = await http.post("/api/user/profile", content=b'{"display_name":"Eve"}', headers=headers)
            assert_error(r, 401, "INVALID_SIGNATURE", text)
            # a corrupted signature
            headers = pb1_headers(key, laptop, "GET", "/api/devices")
            sig = headers["X-PB-Signature"]
            headers["X-PB-Signature"] = ("0" if sig[0] != "0" else "1") + sig[1:]
            assert_error(await http.get("/api/devices", headers=headers), 401, "INVALID_SIGNATURE", text)
            # the device id is signed verbatim: upper case in the header needs upper case in the signature
            ts = str(now_ms())
            headers = {"X-PB-Device-ID": laptop.upper(), "X-PB-Timestamp": ts,
                       "X-PB-Signature": sign_pb1(key.seed, "GET", "/api/devices", ts, laptop, b"")}
            assert_error(await http.get("/api/devices", headers=headers), 401, "INVALID_SIGNATURE", text)
            r = await signed(http, key, laptop.upper(), "GET", "/api/devices")
            assert r.status_code == 200, r.text
            assert [d["device_id"] for d in r.json()["devices"] if d["is_current"]] == [laptop]
            # the upper-case signature hex is accepted too
            headers = pb1_headers(key, laptop, "GET", "/api/devices")
            headers["X-PB-Signature"] = headers["X-PB-Signature"].upper()
            assert (await http.get("/api/devices", headers=headers)).status_code == 200


async def test_timestamps_out_of_range(config_factory):
    async with run_daemon(config_factory(http=LOOSE)) as (_, running), http_client(running) as http:
        with trio.fail_after(T):
            key, (laptop,) = await _setup(running, "Laptop")
            text = "Request timestamp out of range"
            now = int(time.time() * 1000)
            for ts in (now - SKEW_MS - 5_000, now + SKEW_MS + 5_000, 0, 1760000000000, 9_999_999_999_999_999):
                r = await signed(http, key, laptop, "GET", "/api/devices", timestamp=ts)
                assert_error(r, 401, "TIMESTAMP_OUT_OF_RANGE", text)
            # the timestamp is checked before the signature and the device
            mallory = DeviceKey.generate()
            stale = now - SKEW_MS - 5_000
            assert_error(await signed(http, mallory, laptop, "GET", "/api/devices", timestamp=stale),
                         401, "TIMESTAMP_OUT_OF_RANGE")
            assert_error(await signed(http, key, new_device_id(), "GET", "/api/devices", timestamp=stale),
                         401, "TIMESTAMP_OUT_OF_RANGE")
            # within the skew is fine, both ways
            for ts in (now - SKEW_MS + 20_000, now + SKEW_MS - 20_000):
                r = await signed(http, key, laptop, "GET", "/api/devices", timestamp=ts)
                assert r.status_code == 200, (ts - now, r.text)


async def test_replayed_request(config_factory):
    async with run_daemon(config_factory(http=LOOSE)) as (_, running), http_client(running) as http:
        with trio.fail_after(T):
            key, (laptop, phone) = await _setup(running, "Laptop", "Phone")
            headers = pb1_headers(key, laptop, "GET", "/api/devices")
            assert (await http.get("/api/devices", headers=headers)).status_code == 200
            assert_error(await http.get("/api/devices", headers=headers), 401, "REPLAYED_REQUEST",
                         "Request signature already used")
            # the same signature in upper case is the same signature
            upper = {**headers, "X-PB-Signature": headers["X-PB-Signature"].upper()}
            assert_error(await http.get("/api/devices", headers=upper), 401, "REPLAYED_REQUEST")
            # a replayed mutation does not act twice
            body = b'{"device_name":"Renamed"}'
            target = f"/api/devices/{phone}/rename"
            headers = pb1_headers(key, laptop, "POST", target, body)
            assert (await http.post(target, content=body, headers=headers)).status_code == 200
            assert_error(await http.post(target, content=body, headers=headers), 401, "REPLAYED_REQUEST")
            # an identical request with a new timestamp is fine
            assert (await signed(http, key, laptop, "POST", target, body)).status_code == 200

            # replay is checked before revocation (check 4 before 5)
            headers = pb1_headers(key, phone, "GET", "/api/presence")
            assert (await http.get("/api/presence", headers=headers)).status_code == 200
            assert (await signed(http, key, laptop, "DELETE", f"/api/devices/{phone}")).status_code == 200
            assert_error(await http.get("/api/presence", headers=headers), 401, "REPLAYED_REQUEST")


async def test_revoked_device_and_other_users_devices(config_factory):
    async with run_daemon(config_factory(http=LOOSE)) as (_, running), http_client(running) as http:
        with trio.fail_after(T):
            key, (laptop, phone) = await _setup(running, "Laptop", "Phone")
            bob, (bobs,) = await _setup(running, "Bob's")
            assert (await signed(http, key, phone, "GET", "/api/devices")).status_code == 200
            r = await signed(http, key, laptop, "DELETE", f"/api/devices/{phone}")
            assert r.status_code == 200
            for method, path in (("GET", "/api/devices"), ("GET", "/api/user/profile"), ("POST", "/api/auth/token"),
                                 ("DELETE", "/api/user")):
                assert_error(await signed(http, key, phone, method, path), 401, "DEVICE_REVOKED",
                             "Device has been revoked")
            # the user's other device keeps working and the account still exists
            r = await signed(http, key, laptop, "GET", "/api/devices")
            assert r.status_code == 200 and r.json()["count"] == 1

            # another user's device id is indistinguishable from an unknown one
            ghost = new_device_id()
            for device in (bobs, ghost, phone):
                for method, path, body in (("GET", f"/api/devices/{device}", None),
                                           ("DELETE", f"/api/devices/{device}", None),
                                           ("POST", f"/api/devices/{device}/rename", {"device_name": "Mine"})):
                    r = await signed(http, key, laptop, method, path, body)
                    assert_error(r, 404, "DEVICE_NOT_FOUND", "Device not found")
            r = await signed(http, bob, bobs, "GET", f"/api/devices/{bobs}")
            assert r.status_code == 200 and r.json()["device_name"] == "Bob's"
            # X-User-ID is ignored: it cannot move a signed request into another account
            r = await signed(http, key, laptop, "GET", "/api/devices", headers={"X-User-ID": bob.public_hex})
            assert r.status_code == 200 and r.json()["user_id"] == key.public_hex
            assert [d["device_id"] for d in r.json()["devices"]] == [laptop]
            # a malformed id in the path
            for bad in ("not-a-uuid", "550e8400-e29b-11d4-a716-446655440000", "123", bobs + "x"):
                for method, path, body in (("GET", f"/api/devices/{bad}", None),
                                           ("DELETE", f"/api/devices/{bad}", None),
                                           ("POST", f"/api/devices/{bad}/rename", {"device_name": "Mine"})):
                    assert_error(await signed(http, key, laptop, method, path, body), 400, "INVALID_DEVICE_ID",
                                 "Invalid device ID")


# --- the signed request target -----------------------------------------------------------------
async def test_the_exact_request_target_is_signed(config_factory):
    async with run_daemon(config_factory(http=LOOSE)) as (_, running), http_client(running) as http:
        with trio.fail_after(T):
            key, (laptop,) = await _setup(running, "Laptop")
            r = await signed(http, key, laptop, "GET", "/api/events/files?limit=5&offset=0")
            assert r.status_code == 200 and r.json()["pagination"]["limit"] == 5
            # the query is part of the signed string
            headers = pb1_headers(key, laptop, "GET", "/api/events/files")
            assert_error(await http.get("/api/events/files?limit=5&offset=0", headers=headers),
                         401, "INVALID_SIGNATURE")
            headers = pb1_headers(key, laptop, "GET", "/api/events/files?offset=0&limit=5")
            assert_error(await http.get("/api/events/files?limit=5&offset=0", headers=headers),
                         401, "INVALID_SIGNATURE")
            # neither decoded nor normalised
            r = await signed(http, key, laptop, "GET", "/api/events/files?limit=7&note=a%20b%2Fc")
            assert r.status_code == 200, r.text
            headers = pb1_headers(key, laptop, "GET", "/api/events/files?limit=7&note=a b/c")
            assert_error(await http.get("/api/events/files?limit=7&note=a%20b%2Fc", headers=headers),
                         401, "INVALID_SIGNATURE")
            # a percent-encoded path is signed as sent
            encoded = "/api/devices/%" + format(ord(laptop[0]), "02X") + laptop[1:]
            r = await signed(http, key, laptop, "GET", encoded)
            assert r.status_code == 200 and r.json()["device_id"] == laptop, r.text
            headers = pb1_headers(key, laptop, "GET", f"/api/devices/{laptop}")
            assert_error(await http.get(encoded, headers=headers), 401, "INVALID_SIGNATURE")


async def test_api_v1_alias(config_factory):
    async with run_daemon(config_factory(http=LOOSE)) as (_, running), http_client(running) as http:
        with trio.fail_after(T):
            key, (laptop, phone) = await _setup(running, "Laptop", "Phone")
            plain = await signed(http, key, laptop, "GET", "/api/devices")
            alias = await signed(http, key, laptop, "GET", "/api/v1/devices")
            assert alias.status_code == 200
            assert alias.json() == plain.json()
            r = await signed(http, key, laptop, "POST", f"/api/v1/devices/{phone}/rename", {"device_name": "Tab"})
            assert r.json() == {"success": True, "device_id": phone, "device_name": "Tab"}
            r = await signed(http, key, laptop, "GET", f"/api/v1/devices/{phone}")
            assert r.json()["device_name"] == "Tab"
            assert (await signed(http, key, laptop, "GET", "/api/v1/user/profile")).status_code == 200
            assert (await signed(http, key, laptop, "GET", "/api/v1/presence")).status_code == 200
            assert (await signed(http, key, laptop, "GET", "/api/v1/events/files?limit=2")).status_code == 200
            assert (await signed(http, key, laptop, "POST", "/api/v1/auth/token")).status_code == 200
            # PB1 signs the path requested
            headers = pb1_headers(key, laptop, "GET", "/api/devices")
            assert_error(await http.get("/api/v1/devices", headers=headers), 401, "INVALID_SIGNATURE")
            assert_error(await http.get("/api/v1/nothing-here"), 404, "NOT_FOUND")


# --- bearer tokens -----------------------------------------------------------------------------
async def test_bearer_token_issue_use_refresh_verify(config_factory):
    async with run_daemon(config_factory(http=LOOSE)) as (_, running), http_client(running) as http:
        with trio.fail_after(T):
            key, (laptop, phone) = await _setup(running, "Laptop", "Phone")
            before = int(time.time())
            r = await signed(http, key, laptop, "POST", "/api/auth/token")
            assert r.status_code == 200
            body = r.json()
            assert set(body) == {"token", "expiresAt", "expiresIn"}
            assert body["expiresIn"] == 3_600_000
            token = body["token"]
            header_b64, claims_b64, sig_b64 = token.split(".")
            assert header_b64 == "eyJhbGciOiJFZERTQSIsInR5cCI6IkpXVCJ9"
            assert _unb64u(header_b64) == b'{"alg":"EdDSA","typ":"JWT"}'
            claims = json.loads(_unb64u(claims_b64))
            assert list(claims) == ["iss", "sub", "user_id", "iat", "exp", "jti"]
            assert claims["iss"] == "pocketbridge" and claims["sub"] == laptop
            assert claims["user_id"] == key.public_hex
            assert before - 1 <= claims["iat"] <= int(time.time()) + 1
            assert claims["exp"] - claims["iat"] == 3600
            assert body["expiresAt"] == claims["exp"] * 1000
            assert len(claims["jti"]) == 32 and int(claims["jti"], 16) >= 0
            # signed by the server identity key
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(running.identity.public_hex)).verify(
                _unb64u(sig_b64), f"{header_b64}.{claims_b64}".encode())

            # the token authenticates /api requests as that device (and is not a one-shot like PB1)
            for _ in range(2):
                r = await bearer(http, token, "GET", "/api/devices")
                assert r.status_code == 200
                assert [d["device_id"] for d in r.json()["devices"] if d["is_current"]] == [laptop]
            r = await bearer(http, token, "POST", f"/api/devices/{phone}/rename", {"device_name": "Via bearer"})
            assert r.status_code == 200
            assert (await http.get("/api/devices", headers={"Authorization": f"bearer {token}"})).status_code == 200

            # no token from a token
            r = await bearer(http, token, "POST", "/api/auth/token")
            assert r.status_code == 401 and set(r.json()) == {"error", "code", "request_id"}
            assert r.json()["code"] in ("AUTH_REQUIRED", "INVALID_TOKEN"), r.json()

            # refresh: with a bearer token or PB1
            r = await bearer(http, token, "POST", "/api/auth/refresh")
            assert r.status_code == 200 and set(r.json()) == {"token", "expiresAt", "expiresIn"}
            refreshed = r.json()["token"]
            new_claims = json.loads(_unb64u(refreshed.split(".")[1]))
            assert new_claims["sub"] == laptop and new_claims["jti"] != claims["jti"]
            r = await signed(http, key, phone, "POST", "/api/auth/refresh")
            assert r.status_code == 200
            phone_token = r.json()["token"]
            assert json.loads(_unb64u(phone_token.split(".")[1]))["sub"] == phone

            # verify
            r = await bearer(http, refreshed, "GET", "/api/auth/verify")
            assert r.status_code == 200
            assert r.json() == {"valid": True, "payload": {"user_id": key.public_hex, "device_id": laptop,
                                                           "iat": new_claims["iat"], "exp": new_claims["exp"]}}
            invalid = {"valid": False, "error": "Invalid or expired token"}
            for headers in ({}, {"Authorization": "Bearer not.a.token"}, {"Authorization": "Bearer xyz"}):
                r = await http.get("/api/auth/verify", headers=headers)
                assert (r.status_code, r.json()) == (200, invalid)
            r = await http.get("/api/v1/auth/verify", headers={"Authorization": f"Bearer {phone_token}"})
            assert r.json()["valid"] is True and r.json()["payload"]["device_id"] == phone


async def test_tampered_forged_and_expired_tokens(config_factory):
    async with run_daemon(config_factory(http={**LOOSE, "bearer_token_ttl": 2})) as (_, running), http_client(running) as http:
        with trio.fail_after(T):
            key, (laptop,) = await _setup(running, "Laptop")
            bob, (bobs,) = await _setup(running, "Bob's")
            r = await signed(http, key, laptop, "POST", "/api/auth/token")
            token = r.json()["token"]
            assert r.json()["expiresIn"] == 2000
            h, c, s = token.split(".")
            claims = json.loads(_unb64u(c))
            server = running.identity
            now = int(time.time())

            def mint(identity: ServerIdentity = server, **over: object) -> str:
                fields = {"device_id": laptop, "user_id": key.public_hex, "iat": now, "exp": now + 600,
                          "jti": "ab" * 16, **over}
                return issue_jwt(identity, **fields)  # type: ignore[arg-type]

            sig = _unb64u(s)
            none_header = _b64u(b'{"alg":"none","typ":"JWT"}')
            ed25519_header = _b64u(b'{"alg":"Ed25519","typ":"JWT"}')
            forged_claims = _b64u(json.dumps({**claims, "sub": bobs, "user_id": bob.public_hex},
                                             separators=(",", ":")).encode())
            bad = {
                "flipped signature": f"{h}.{c}.{_b64u(bytes([sig[0] ^ 1]) + sig[1:])}",
                "other claims": f"{h}.{forged_claims}.{s}",
                "alg none": f"{none_header}.{c}.",
                "alg Ed25519": f"{ed25519_header}.{c}.{s}",
                "two parts": f"{h}.{c}",
                "other key": mint(ServerIdentity.generate()),
                "expired": mint(iat=now - 100, exp=now - 10),
                "issued in the future": mint(iat=now + 3600, exp=now + 7200),
                "user mismatch": mint(user_id=bob.public_hex),
                "unknown device": mint(device_id=new_device_id()),
            }
            # sanity: the minting works
            good = mint()
            assert (await bearer(http, good, "GET", "/api/devices")).status_code == 200
            for name, value in bad.items():
                r = await bearer(http, value, "GET", "/api/devices")
                assert r.status_code == 401, name
                assert_error(r, 401, "INVALID_TOKEN", "Invalid or expired token")
                r = await bearer(http, value, "POST", "/api/auth/refresh")
                assert_error(r, 401, "INVALID_TOKEN")
                r = await bearer(http, value, "GET", "/api/auth/verify")
                assert r.json() == {"valid": False, "error": "Invalid or expired token"}, name
            # the issued token expires after bearer_token_ttl
            assert (await bearer(http, token, "GET", "/api/devices")).status_code == 200
            await trio.sleep(max(0.0, claims["exp"] - time.time()) + 0.05)
            assert_error(await bearer(http, token, "GET", "/api/devices"), 401, "INVALID_TOKEN")
            r = await bearer(http, token, "GET", "/api/auth/verify")
            assert r.json() == {"valid": False, "error": "Invalid or expired token"}


async def test_tokens_of_a_revoked_device_die_at_once(config_factory):
    async with run_daemon(config_factory(http=LOOSE)) as (_, running), http_client(running) as http:
        with trio.fail_after(T):
            key, (laptop, phone) = await _setup(running, "Laptop", "Phone")
            token = (await signed(http, key, phone, "POST", "/api/auth/token")).json()["token"]
            assert (await bearer(http, token, "GET", "/api/devices")).status_code == 200
            assert (await bearer(http, token, "GET", "/api/auth/verify")).json()["valid"] is True
            assert (await signed(http, key, laptop, "DELETE", f"/api/devices/{phone}")).status_code == 200
            assert_error(await bearer(http, token, "GET", "/api/devices"), 401, "INVALID_TOKEN",
                         "Invalid or expired token")
            assert_error(await bearer(http, token, "POST", "/api/auth/refresh"), 401, "INVALID_TOKEN")
            r = await bearer(http, token, "GET", "/api/auth/verify")
            assert (r.status_code, r.json()) == (200, {"valid": False, "error": "Invalid or expired token"})
            # and a device deleting itself by bearer loses its token too
            own = (await signed(http, key, laptop, "POST", "/api/auth/token")).json()["token"]
            r = await bearer(http, own, "DELETE", f"/api/devices/{laptop}")
            assert r.status_code == 200
            assert_error(await bearer(http, own, "GET", "/api/devices"), 401, "INVALID_TOKEN")
