"""Cross-cutting HTTP rules (protocol.md §10.1): request ids, bodies, errors, rate limits, CORS, headers."""

from __future__ import annotations

import gzip
import json
import re

import trio

from pocketbridge.client import DeviceKey, new_device_id
from tests.conftest import run_daemon
from tests.e2e.httpclient import (
    ERROR_KEYS,
    assert_error,
    bearer,
    http_client,
    pb1_headers,
    register,
    signed,
)

T = 5  # seconds: every wait is bounded
UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
ADMIN_KEY = "a" * 40
ORIGIN = "https://app.example"
CORS_HEADERS = {"content-type", "authorization", "x-pb-device-id", "x-pb-timestamp", "x-pb-signature",
                "x-request-id", "x-user-id"}


def _csv(value: str | None) -> set[str]:
    return {part.strip().lower() for part in (value or "").split(",") if part.strip()}


def _assert_rate_limited(r) -> None:
    assert_error(r, 429, "RATE_LIMITED", "Too many requests")
    assert re.fullmatch(r"[0-9]+", r.headers["Retry-After"]), r.headers["Retry-After"]
    assert int(r.headers["Retry-After"]) >= 1


async def _device(running, name: str = "Laptop") -> tuple[DeviceKey, str]:
    key, device = DeviceKey.generate(), new_device_id()
    await register(running, key, device, device_name=name)
    return key, device


# --- X-Request-ID --------------------------------------------------------------------------------
async def test_request_id_echoed_when_sane_and_regenerated_otherwise(config_factory):
    async with run_daemon(config_factory()) as (_, running), http_client(running) as http:
        with trio.fail_after(T):
            key, laptop = await _device(running)
            sane = ["abc-123._:XYZ", "x", "A" * 128, "0b7655be-5e18-454d-abb6-1d4804ecc72e"]
            for rid in sane:
                r = await http.get("/health", headers={"X-Request-ID": rid})
                assert r.headers["X-Request-ID"] == rid
                r = await http.get("/api/devices", headers={"X-Request-ID": rid})
                assert assert_error(r, 401, "AUTH_REQUIRED")["request_id"] == rid
                r = await signed(http, key, laptop, "GET", "/api/devices", headers={"X-Request-ID": rid})
                assert r.status_code == 200 and r.headers["X-Request-ID"] == rid
            insane = ["A" * 129, "b" * 200, "has space", "slash/y", "semi;colon", "ümlaut", "quote\"d", "",
                      "tab\tinside"]
            seen = set()
            for rid in insane:
                r = await http.get("/api/nope", headers={"X-Request-ID": rid.encode("utf-8")})
                body = assert_error(r, 404, "NOT_FOUND", "Not found")
                generated = r.headers["X-Request-ID"]
                assert UUID4.fullmatch(generated), (rid, generated)
                assert body["request_id"] == generated
                seen.add(generated)
            assert len(seen) == len(insane)  # a fresh id each time
            # without a header, one is made for every response
            for method, path in (("GET", "/health"), ("GET", "/health/live"), ("GET", "/metrics"),
                                 ("GET", "/nope"), ("POST", "/health"), ("GET", "/api/pairing/x"),
                                 ("OPTIONS", "/api/devices")):
                r = await http.request(method, path)
                assert UUID4.fullmatch(r.headers["X-Request-ID"]), (method, path, r.status_code)


# --- bodies and errors -------------------------------------------------------------------------
async def test_invalid_json_bodies(config_factory):
    async with run_daemon(config_factory(admin={"api_key": ADMIN_KEY})) as (_, running), http_client(running) as http:
        with trio.fail_after(T):
            key, laptop = await _device(running)
            for raw in (b"{not json", b'{"display_name": "x"', b"\xff\xfe{}", b"'single'", b"NaN"):
                r = await signed(http, key, laptop, "POST", "/api/user/profile", raw)
                assert_error(r, 400, "INVALID_JSON")
                r = await signed(http, key, laptop, "POST", f"/api/devices/{laptop}/rename", raw)
                assert_error(r, 400, "INVALID_JSON")
                r = await http.post("/admin/revoke-device", content=raw, headers={"X-Admin-API-Key": ADMIN_KEY})
                assert_error(r, 400, "INVALID_JSON")
            # JSON that is not an object is refused too
            for raw in (b"[1, 2]", b'"text"', b"42"):
                r = await signed(http, key, laptop, "POST", "/api/user/profile", raw)
                assert r.status_code == 400 and set(r.json()) == ERROR_KEYS
                assert r.json()["code"] in ("INVALID_JSON", "VALIDATION_ERROR")
            # nothing was changed
            r = await signed(http, key, laptop, "GET", "/api/user/profile")
            assert r.json()["display_name"] is None


async def test_body_size_limit_and_content_encoding(config_factory):
    async with run_daemon(config_factory(http={"max_body_bytes": 1024}, admin={"api_key": ADMIN_KEY})) as (
        _, running), http_client(running) as http:
        with trio.fail_after(T):
            key, laptop = await _device(running)

            def profile_body(size: int) -> bytes:
                head = b'{"display_name":"Padded","pad":"'
                return head + b"x" * (size - len(head) - 2) + b'"}'

            exact = profile_body(1024)
            assert len(exact) == 1024 and json.loads(exact)
            r = await signed(http, key, laptop, "POST", "/api/user/profile", exact)
            assert r.status_code == 200, r.text
            # (the server may close a connection whose body it did not read: don't reuse those connections)
            close = {"Connection": "close"}
            for size in (1025, 4096, 200_000):
                r = await signed(http, key, laptop, "POST", "/api/user/profile", profile_body(size), headers=close)
                assert_error(r, 413, "PAYLOAD_TOO_LARGE")
                assert r.headers["Cache-Control"] == "no-store"
            # also without a Content-Length (chunked)
            big = profile_body(5000)
            headers = {**pb1_headers(key, laptop, "POST", "/api/user/profile", big), **close}

            async def chunks():
                for i in range(0, len(big), 512):
                    yield big[i:i + 512]

            r = await http.post("/api/user/profile", content=chunks(), headers=headers)
            assert_error(r, 413, "PAYLOAD_TOO_LARGE")
            r = await http.post("/admin/revoke-device", content=b'{"deviceId":"' + b"x" * 2000 + b'"}',
                                headers={"X-Admin-API-Key": ADMIN_KEY, **close})
            assert_error(r, 413, "PAYLOAD_TOO_LARGE")

            # any request Content-Encoding → 415
            plain = b'{"display_name":"Zipped"}'
            for encoding, raw in (("gzip", gzip.compress(plain)), ("br", plain), ("identity", plain)):
                r = await signed(http, key, laptop, "POST", "/api/user/profile", raw,
                                 headers={"Content-Encoding": encoding, **close})
                assert_error(r, 415, "UNSUPPORTED_MEDIA_TYPE")
            r = await signed(http, key, laptop, "GET", "/api/user/profile")
            assert r.json()["display_name"] == "Padded"


async def test_unknown_routes_and_wrong_methods(config_factory):
    async with run_daemon(config_factory(admin={"api_key": ADMIN_KEY})) as (_, running), http_client(running) as http:
        with trio.fail_after(T):
            key, laptop = await _device(running)
            for path in ("/nope", "/api", "/api/nope", "/api/v2/devices", "/api/v1", "/ws", "/admin/nope",
                         "/api/devices/" + laptop + "/nope", "/health/nope"):
                r = await http.get(path)
                assert_error(r, 404, "NOT_FOUND", "Not found")
                assert r.headers["X-Content-Type-Options"] == "nosniff"
            assert_error(await http.get("/admin/nope", headers={"X-Admin-API-Key": ADMIN_KEY}), 404, "NOT_FOUND")
            for method, path in (("PUT", "/api/devices"), ("POST", "/api/devices"), ("POST", "/health"),
                                 ("DELETE", "/health/live"), ("GET", "/api/user"), ("DELETE", "/api/user/profile"),
                                 ("GET", "/api/auth/token"), ("POST", "/api/auth/verify"),
                                 ("PATCH", f"/api/v1/devices/{laptop}"), ("GET", "/admin/revoke-device"),
                                 ("POST", "/admin/revoked-devices")):
                r = await http.request(method, path)
                assert_error(r, 405, "METHOD_NOT_ALLOWED", "Method not allowed")
            # a signed request to a wrong method gets the 405 as well (not an auth error)
            r = await signed(http, key, laptop, "PUT", "/api/devices")
            assert_error(r, 405, "METHOD_NOT_ALLOWED")


async def test_internal_errors_do_not_leak(config_factory, monkeypatch):
    async with run_daemon(config_factory(admin={"api_key": ADMIN_KEY})) as (daemon, running), \
            http_client(running) as http:
        with trio.fail_after(T):
            key, laptop = await _device(running)
            secret = "SELECT password FROM users -- /srv/pocketbridge/secret_module.py"

            async def boom(*args, **kwargs):
                raise RuntimeError(secret)

            store = daemon.gateway.store
            monkeypatch.setattr(store, "get_profile", boom)
            monkeypatch.setattr(store, "revoked_devices", boom)
            for r in (await signed(http, key, laptop, "GET", "/api/user/profile", headers={"X-Request-ID": "rid-500"}),
                      await http.get("/admin/revoked-devices", headers={"X-Admin-API-Key": ADMIN_KEY})):
                assert r.status_code == 500
                body = r.json()
                assert set(body) == ERROR_KEYS
                assert body["error"] == "Internal server error" and body["code"] == "INTERNAL_ERROR"
                assert body["request_id"] == r.headers["X-Request-ID"]
                everything = r.text + "".join(f"{k}: {v}\n" for k, v in r.headers.items())
                for leak in ("SELECT", "secret", "RuntimeError", "Traceback", "password", ".py"):
                    assert leak not in everything, leak
                assert r.headers["X-Content-Type-Options"] == "nosniff"
                assert r.headers["Cache-Control"] == "no-store"
            assert body["request_id"] != "rid-500"
            # the daemon keeps serving
            monkeypatch.undo()
            assert (await signed(http, key, laptop, "GET", "/api/user/profile")).status_code == 200


# --- rate limits -------------------------------------------------------------------------------
async def test_unauthenticated_requests_per_address(config_factory):
    config = config_factory(http={"unauthenticated_per_ip_per_minute": 3, "auth_failures_per_ip_per_minute": 1000})
    async with run_daemon(config) as (_, running), http_client(running) as http:
        with trio.fail_after(T):
            key, laptop = await _device(running)
            assert (await http.get("/api/pairing/store")).status_code == 410
            assert (await http.get("/api/auth/verify")).status_code == 200
            assert (await http.get("/api/devices", headers={"X-User-ID": key.public_hex})).status_code == 401
            # spent: everything unauthenticated under /api is now 429, whatever X-Forwarded-For claims
            for method, path, headers in (("GET", "/api/devices", {}),
                                          ("GET", "/api/devices", {"X-Forwarded-For": "203.0.113.7"}),
                                          ("POST", "/api/pairing/store", {"X-Request-ID": "rl-1"}),
                                          ("GET", "/api/auth/verify", {})):
                r = await http.request(method, path, headers=headers)
                _assert_rate_limited(r)
            r = await http.post("/api/pairing/store", headers={"X-Request-ID": "rl-1"})
            assert r.headers["X-Request-ID"] == "rl-1" and r.json()["request_id"] == "rl-1"
            # authenticated requests and the health endpoints are not affected
            assert (await signed(http, key, laptop, "GET", "/api/devices")).status_code == 200
            assert (await http.get("/health")).status_code == 200


async def test_failed_authentications_per_address(config_factory):
    config = config_factory(http={"auth_failures_per_ip_per_minute": 3, "unauthenticated_per_ip_per_minute": 1000})
    async with run_daemon(config) as (_, running), http_client(running) as http:
        with trio.fail_after(T):
            key, laptop = await _device(running)
            mallory = DeviceKey.generate()
            token = (await signed(http, key, laptop, "POST", "/api/auth/token")).json()["token"]
            assert (await signed(http, key, laptop, "GET", "/api/devices")).status_code == 200  # not a failure
            for _ in range(3):
                assert_error(await signed(http, mallory, laptop, "GET", "/api/devices"), 401, "INVALID_SIGNATURE")
            # afterwards 429 on all of /api, even with valid credentials
            _assert_rate_limited(await signed(http, key, laptop, "GET", "/api/devices"))
            _assert_rate_limited(await bearer(http, token, "GET", "/api/presence"))
            _assert_rate_limited(await signed(http, mallory, laptop, "GET", "/api/devices"))
            _assert_rate_limited(await http.get("/api/devices"))
            _assert_rate_limited(await http.get("/api/v1/user/profile"))
            _assert_rate_limited(await bearer(http, token, "GET", "/api/auth/verify"))
            # other listeners' paths are not /api
            assert (await http.get("/health")).status_code == 200
            # "all of /api" includes the removed pairing paths
            _assert_rate_limited(await http.get("/api/pairing/store"))


async def test_requests_per_device(config_factory):
    async with run_daemon(config_factory(http={"requests_per_device_per_minute": 3})) as (_, running), \
            http_client(running) as http:
        with trio.fail_after(T):
            key, laptop = await _device(running)
            phone = new_device_id()
            await register(running, key, phone, device_name="Phone")
            token = (await signed(http, key, laptop, "POST", "/api/auth/token")).json()["token"]
            for _ in range(2):
                assert (await signed(http, key, laptop, "GET", "/api/devices")).status_code == 200
            r = await signed(http, key, laptop, "GET", "/api/devices", headers={"X-Request-ID": "per-device"})
            _assert_rate_limited(r)
            assert r.headers["X-Request-ID"] == "per-device"
            assert r.headers["Cache-Control"] == "no-store"
            _assert_rate_limited(await bearer(http, token, "GET", "/api/presence"))
            _assert_rate_limited(await signed(http, key, laptop, "GET", "/api/v1/user/profile"))
            # keyed by device: the user's other device still has its budget
            for _ in range(3):
                assert (await signed(http, key, phone, "GET", "/api/devices")).status_code == 200
            _assert_rate_limited(await signed(http, key, phone, "GET", "/api/devices"))


async def test_token_requests_per_device(config_factory):
    async with run_daemon(config_factory(http={"token_requests_per_device_per_minute": 2})) as (_, running), \
            http_client(running) as http:
        with trio.fail_after(T):
            key, laptop = await _device(running)
            phone = new_device_id()
            await register(running, key, phone, device_name="Phone")
            r = await signed(http, key, laptop, "POST", "/api/auth/token")
            assert r.status_code == 200
            token = r.json()["token"]
            assert (await bearer(http, token, "POST", "/api/auth/refresh")).status_code == 200
            _assert_rate_limited(await signed(http, key, laptop, "POST", "/api/auth/token"))
            _assert_rate_limited(await signed(http, key, laptop, "POST", "/api/auth/refresh"))
            _assert_rate_limited(await bearer(http, token, "POST", "/api/auth/refresh"))
            # other requests of the device are not token requests
            assert (await bearer(http, token, "GET", "/api/devices")).status_code == 200
            assert (await signed(http, key, phone, "POST", "/api/auth/token")).status_code == 200


async def test_device_mutations_per_user(config_factory):
    async with run_daemon(config_factory(http={"device_mutations_per_user_per_minute": 2})) as (_, running), \
            http_client(running) as http:
        with trio.fail_after(T):
            key, laptop = await _device(running)
            phone = new_device_id()
            await register(running, key, phone, device_name="Phone")
            bob, bobs = await _device(running, "Bob's")
            for name in ("One", "Two"):
                r = await signed(http, key, laptop, "POST", f"/api/devices/{phone}/rename", {"device_name": name})
                assert r.status_code == 200
            _assert_rate_limited(await signed(http, key, laptop, "POST", f"/api/devices/{phone}/rename",
                                              {"device_name": "Three"}))
            # per user: the other device and deletion share the budget
            _assert_rate_limited(await signed(http, key, phone, "POST", f"/api/devices/{laptop}/rename",
                                              {"device_name": "Four"}))
            _assert_rate_limited(await signed(http, key, phone, "DELETE", f"/api/devices/{laptop}"))
            r = await signed(http, key, phone, "GET", "/api/devices")
            assert r.json()["count"] == 2
            assert {d["device_name"] for d in r.json()["devices"]} == {"Laptop", "Two"}
            # another user is not affected
            r = await signed(http, bob, bobs, "POST", f"/api/devices/{bobs}/rename", {"device_name": "B"})
            assert r.status_code == 200


async def test_account_deletions_per_user(config_factory):
    async with run_daemon(config_factory(http={"account_deletions_per_user_per_hour": 1})) as (_, running), \
            http_client(running) as http:
        with trio.fail_after(T):
            key, laptop = await _device(running)
            bob, bobs = await _device(running, "Bob's")
            r = await signed(http, key, laptop, "DELETE", "/api/user")
            assert r.status_code == 200 and r.json()["deleted"] == {"devices": 1, "events": 0}
            await register(running, key, laptop)
            r = await signed(http, key, laptop, "DELETE", "/api/user")
            _assert_rate_limited(r)
            assert int(r.headers["Retry-After"]) > 60  # an hourly budget
            r = await signed(http, key, laptop, "GET", "/api/devices")
            assert r.status_code == 200 and r.json()["count"] == 1  # not deleted
            assert (await signed(http, bob, bobs, "DELETE", "/api/user")).status_code == 200


async def test_admin_rate_limits(config_factory, tmp_path):
    config = config_factory(admin={"api_key": ADMIN_KEY, "requests_per_ip_per_minute": 3})
    async with run_daemon(config) as (_, running), http_client(running) as http:
        with trio.fail_after(T):
            auth = {"X-Admin-API-Key": ADMIN_KEY}
            for _ in range(3):
                assert (await http.get("/admin/revoked-devices", headers=auth)).status_code == 200
            r = await http.get("/admin/revoked-devices", headers=auth)
            _assert_rate_limited(r)
            assert r.headers["Cache-Control"] == "no-store"

    # Another deployment (another identity key): with the Redis bus, budgets are shared by every instance of a
    # deployment, and the first daemon's spent admin budget would still be refilling.
    config = config_factory(
        server={"data_dir": str(tmp_path / "other")}, admin={"api_key": ADMIN_KEY, "auth_failures_per_ip_per_minute": 2}
    )
    async with run_daemon(config) as (_, running), http_client(running) as http:
        with trio.fail_after(T):
            for _ in range(2):
                assert_error(await http.get("/admin/revoked-devices", headers={"X-Admin-API-Key": "wrong"}),
                             401, "ADMIN_AUTH_REQUIRED")
            _assert_rate_limited(await http.get("/admin/revoked-devices", headers={"X-Admin-API-Key": ADMIN_KEY}))
            _assert_rate_limited(await http.get("/admin/revoked-devices",
                                                headers={"Authorization": f"Bearer {ADMIN_KEY}"}))


# --- CORS and security headers -----------------------------------------------------------------
async def test_cors(config_factory):
    async with run_daemon(config_factory(http={"cors_origins": [ORIGIN]})) as (_, running), \
            http_client(running) as http:
        with trio.fail_after(T):
            key, laptop = await _device(running)
            allowed = {"Origin": ORIGIN}
            responses = [
                await http.get("/health", headers=allowed),
                await signed(http, key, laptop, "GET", "/api/devices", headers=allowed),
                await http.get("/api/devices", headers={**allowed, "X-User-ID": key.public_hex}),  # the 401
                await http.post("/api/pairing/store", headers=allowed),  # the 410
                await http.get("/api/nope", headers=allowed),
            ]
            assert [r.status_code for r in responses] == [200, 200, 401, 410, 404]
            for r in responses:
                assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
                assert _csv(r.headers.get("Access-Control-Expose-Headers")) == {"x-request-id", "retry-after"}
                assert "Access-Control-Allow-Credentials" not in r.headers
                assert "origin" in _csv(r.headers.get("Vary"))
            # a disallowed origin, or none, gets no CORS headers
            for headers in ({"Origin": "https://evil.example"}, {"Origin": ORIGIN + ".evil"}, {"Origin": "null"}, {}):
                for r in (await http.get("/health", headers=headers),
                          await signed(http, key, laptop, "GET", "/api/devices", headers=headers)):
                    assert r.status_code == 200
                    assert not any(k.lower().startswith("access-control-") for k in r.headers), dict(r.headers)

            # preflights: unauthenticated, 204
            for path in ("/api/devices", f"/api/devices/{laptop}", "/api/user", "/api/pairing/store",
                         "/api/v1/user/profile", "/admin/revoke-device"):
                r = await http.options(path, headers={
                    **allowed, "Access-Control-Request-Method": "DELETE",
                    "Access-Control-Request-Headers": "x-pb-device-id, x-pb-timestamp, x-pb-signature, content-type",
                })
                assert r.status_code == 204, (path, r.status_code, r.text)
                assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
                assert _csv(r.headers["Access-Control-Allow-Methods"]) == {"get", "post", "delete", "options"}
                assert CORS_HEADERS <= _csv(r.headers["Access-Control-Allow-Headers"])
                assert _csv(r.headers.get("Access-Control-Expose-Headers")) == {"x-request-id", "retry-after"}
                assert "Access-Control-Allow-Credentials" not in r.headers
                assert r.headers["X-Content-Type-Options"] == "nosniff"
                assert UUID4.fullmatch(r.headers["X-Request-ID"])
            r = await http.options("/api/devices", headers={"Origin": "https://evil.example",
                                                            "Access-Control-Request-Method": "GET"})
            assert r.status_code == 204
            assert not any(k.lower().startswith("access-control-") for k in r.headers)


async def test_cors_wildcard_and_default(config_factory):
    async with run_daemon(config_factory(http={"cors_origins": ["*"]})) as (_, running), \
            http_client(running) as http:
        with trio.fail_after(T):
            for origin in (ORIGIN, "https://anything.example", "http://localhost:5173"):
                r = await http.get("/api/devices", headers={"Origin": origin})
                assert r.status_code == 401
                assert r.headers["Access-Control-Allow-Origin"] == "*"
                assert "Access-Control-Allow-Credentials" not in r.headers
            r = await http.options("/api/devices", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
            assert r.status_code == 204 and r.headers["Access-Control-Allow-Origin"] == "*"
    async with run_daemon(config_factory()) as (_, running), http_client(running) as http:
        with trio.fail_after(T):
            r = await http.get("/health", headers={"Origin": ORIGIN})
            assert r.status_code == 200
            assert not any(k.lower().startswith("access-control-") for k in r.headers)
            r = await http.options("/api/devices", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"})
            assert r.status_code == 204
            assert not any(k.lower().startswith("access-control-") for k in r.headers)


async def test_security_headers(config_factory):
    async with run_daemon(config_factory(admin={"api_key": ADMIN_KEY})) as (_, running), \
            http_client(running) as http:
        with trio.fail_after(T):
            key, laptop = await _device(running)
            token = (await signed(http, key, laptop, "POST", "/api/auth/token")).json()["token"]
            api_and_admin = [
                await signed(http, key, laptop, "GET", "/api/devices"),
                await signed(http, key, laptop, "GET", "/api/v1/user/profile"),
                await bearer(http, token, "GET", "/api/presence"),
                await bearer(http, token, "GET", "/api/auth/verify"),
                await http.get("/api/devices"),
                await http.get("/api/pairing/x"),
                await http.get("/api/nope"),
                await http.get("/admin/revoked-devices"),
                await http.get("/admin/revoked-devices", headers={"X-Admin-API-Key": ADMIN_KEY}),
            ]
            assert [r.status_code for r in api_and_admin] == [200, 200, 200, 200, 401, 410, 404, 401, 200]
            for r in api_and_admin:
                assert r.headers["X-Content-Type-Options"] == "nosniff", r.url
                assert r.headers["Cache-Control"] == "no-store", r.url
            for r in (await http.get("/health"), await http.get("/health/live"), await http.get("/health/ready"),
                      await http.get("/metrics"), await http.get("/nope"), await http.post("/health")):
                assert r.headers["X-Content-Type-Options"] == "nosniff", r.url
