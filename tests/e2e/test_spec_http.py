"""HTTP and operations statements without a test elsewhere (protocol.md §2, §9, §10.1–10.3), end to end.

* §2: the server identity key file is created with mode 0600 (whatever the umask) and never regenerated.
* §9: ``X-Forwarded-For`` from a ``[server] trusted_proxies`` peer keys the per-address limits (HTTP and
  WebSocket) and decides who is a loopback peer for ``/metrics``; IPv6 clients share their /64's budget.
* §10.2: a PB1 signature is remembered across a restart and across two instances on PostgreSQL.
* §10.3: ``/health/ready`` (and ``/health``) cache their store and bus round trips.
* §10.1: while PostgreSQL is unreachable, REST answers 503 ``SERVICE_UNAVAILABLE`` with ``Retry-After``; the
  readiness answer stays cached for its window, then turns 503.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from trio_websocket import ConnectionClosed, open_websocket_url

from pocketbridge.bench.launcher import keygen
from pocketbridge.client import DeviceKey, new_device_id
from pocketbridge.config import Config
from pocketbridge.http import app as http_app
from tests.conftest import run_daemon
from tests.e2e.httpclient import assert_error, bearer, http_client, pb1_headers, register, signed
from tests.e2e.rawclient import TIMEOUT, RawHandshake, assert_close, e2e_config, each_case, open_ws
from tests.e2e.tcpproxy import open_tcp_proxy
from tests.e2e.test_spec_transport import local_config

LOOSE_HTTP = {"unauthenticated_per_ip_per_minute": 10_000, "auth_failures_per_ip_per_minute": 10_000,
              "requests_per_device_per_minute": 10_000}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- §2 the identity key file ----------------------------------------------------------------------------
async def test_identity_key_file_is_private_and_never_regenerated(tmp_path: Path) -> None:
    config = local_config(tmp_path / "first-start")
    old_umask = os.umask(0)  # the modes below must not come from a friendly umask
    try:
        made_by_keygen = tmp_path / "keygen" / "identity.key"
        public = await trio.to_thread.run_sync(keygen, made_by_keygen)
        async with run_daemon(config) as (_, running):
            first = running.identity.public_hex
            assert running.identity_created is True
    finally:
        os.umask(old_umask)
    created = config.identity_key_path()
    assert mode(made_by_keygen) == 0o600
    assert mode(created) == 0o600
    content = created.read_bytes()
    async with run_daemon(config) as (_, running):  # a restart loads the same key
        assert running.identity_created is False
        assert running.identity.public_hex == first
    assert created.read_bytes() == content
    shared = local_config(tmp_path / "shared", server={"identity_key_file": str(made_by_keygen)})
    async with run_daemon(shared) as (_, running):
        assert (running.identity.public_hex, running.identity_created) == (public, False)


# the identity point, and a non-canonical encoding of it (y = p + 1); "R = identity, S = 0" verifies for any message
SMALL_ORDER_KEYS = {"identity": "01" + "00" * 31, "identity non-canonical": "ee" + "ff" * 30 + "7f"}
FORGED_SIGNATURE = "01" + "00" * 63


async def test_small_order_keys_are_refused_at_the_handshake(tmp_path: Path) -> None:
    """§2: a key that is not a canonical encoding of a point, or is of small order, is refused wherever a key is
    accepted: anyone can sign for it. Here a signature nobody needed a private key for must not register."""
    async with run_daemon(local_config(tmp_path)) as (_, running):

        async def check(name: str, user_id: str) -> None:
            async with open_ws(running.ws_url) as ws:
                hs = RawHandshake(ws, DeviceKey.generate())
                await hs.hello()
                await hs.read_server_hello()
                await hs.auth(user_id=user_id, client_signature=FORGED_SIGNATURE)
                await assert_close(ws, 1008, "Invalid client signature")

        await each_case(SMALL_ORDER_KEYS, check)


# --- §9 trusted proxies ----------------------------------------------------------------------------------
async def test_forwarded_address_from_a_trusted_proxy_keys_limits_and_metrics(tmp_path: Path) -> None:
    config = local_config(
        tmp_path,
        server={"trusted_proxies": ["127.0.0.1"]},
        http={"unauthenticated_per_ip_per_minute": 2, "auth_failures_per_ip_per_minute": 1000},
    )
    async with run_daemon(config) as (_, running), http_client(running) as http:
        with trio.fail_after(TIMEOUT):
            # /metrics: only loopback peers; behind the proxy, the client is what the proxy says
            assert (await http.get("/metrics")).status_code == 200  # the (loopback) proxy itself
            for forwarded in ("203.0.113.9", "203.0.113.9, 127.0.0.1", "garbage", "127.0.0.1, garbage"):
                r = await http.get("/metrics", headers={"X-Forwarded-For": forwarded})
                assert_error(r, 404, "NOT_FOUND")
            # per-address budgets follow the forwarded address
            for forwarded, expected in [
                ("203.0.113.9", 410), ("203.0.113.9", 410), ("203.0.113.9", 429),
                ("198.51.100.4:5555", 410),  # another client (a port is parsed away) ...
                ("198.51.100.4", 410), ("198.51.100.4", 429),  # ... with its own budget
                ("[2001:db8:1:2::1]:443", 410), ("2001:db8:1:2::99", 410),  # one /64 ...
                ("2001:db8:1:2:ffff::1", 429), ("2001:db8:1:3::1", 410),  # ... shares one budget
            ]:
                r = await http.get("/api/pairing/initiate", headers={"X-Forwarded-For": forwarded})
                assert r.status_code == expected, (forwarded, r.status_code, r.text)


async def test_forwarded_address_from_a_trusted_proxy_keys_websocket_limits(tmp_path: Path) -> None:
    config = local_config(tmp_path, server={"trusted_proxies": ["127.0.0.1"]},
                          limits={"ws_connects_per_ip_per_minute": 2})
    key = DeviceKey.generate()
    async with run_daemon(config) as (_, running):

        async def attempt(forwarded: str) -> tuple[int, str] | None:
            """None if the handshake succeeds, else the close (code, reason)."""
            headers = [(b"X-Forwarded-For", forwarded.encode())]
            async with open_websocket_url(running.ws_url, extra_headers=headers, connect_timeout=TIMEOUT,
                                          disconnect_timeout=TIMEOUT) as ws:
                try:
                    with trio.fail_after(TIMEOUT):
                        await RawHandshake(ws, key).run()
                except (AssertionError, ConnectionClosed):
                    assert ws.closed is not None
                    return ws.closed.code, ws.closed.reason
            return None

        refused = (1008, "Too many connection attempts. Please try again later.")
        assert [await attempt("203.0.113.9") for _ in range(3)] == [None, None, refused]
        assert await attempt("198.51.100.4") is None  # another client behind the same proxy


# --- §10.2 PB1 replay memory -----------------------------------------------------------------------------
async def test_a_replayed_pb1_request_is_refused_after_a_restart(config_factory: Callable[..., Config]) -> None:
    config = e2e_config(config_factory, http=LOOSE_HTTP)
    key, device = DeviceKey.generate(), new_device_id()
    async with run_daemon(config) as (_, running), http_client(running) as http:
        await register(running, key, device)
        headers = pb1_headers(key, device, "GET", "/api/devices")
        assert (await http.get("/api/devices", headers=headers)).status_code == 200
    async with run_daemon(config) as (_, running), http_client(running) as http:
        assert_error(await http.get("/api/devices", headers=headers), 401, "REPLAYED_REQUEST",
                     "Request signature already used")
        assert (await signed(http, key, device, "GET", "/api/devices")).status_code == 200  # a fresh one is fine


@pytest.mark.postgres
@pytest.mark.redis
async def test_a_replayed_pb1_request_is_refused_by_another_instance(
    tmp_path: Path, postgres_dsn: str, redis_url: str
) -> None:
    def config(name: str) -> Config:
        return local_config(tmp_path / name, storage={"backend": "postgres", "dsn": postgres_dsn},
                            bus={"backend": "redis", "url": redis_url}, http=LOOSE_HTTP)

    key, device = DeviceKey.generate(), new_device_id()
    async with run_daemon(config("one")) as (_, one), run_daemon(config("two")) as (_, two), \
            http_client(one) as http1, http_client(two) as http2:
        await register(one, key, device)
        for first, second in ((http1, http2), (http2, http1)):
            body = b'{"display_name":"Alice"}'
            headers = {**pb1_headers(key, device, "POST", "/api/user/profile", body),
                       "Content-Type": "application/json"}
            assert (await first.post("/api/user/profile", content=body, headers=headers)).status_code == 200
            assert_error(await second.post("/api/user/profile", content=body, headers=headers), 401,
                         "REPLAYED_REQUEST")


# --- §10.3 the readiness cache ---------------------------------------------------------------------------
async def test_readiness_round_trips_are_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert 0 < http_app.READY_CACHE_SECONDS <= 5  # §10.3: cached for at most 5 s
    monkeypatch.setattr(http_app, "READY_CACHE_SECONDS", 0.5)
    async with run_daemon(local_config(tmp_path)) as (daemon, running), http_client(running) as http:
        gw = daemon.gateway
        calls = {"database": 0, "bus": 0}

        def counting(name: str, ping: Callable) -> Callable:
            async def counted() -> None:
                calls[name] += 1
                await ping()

            return counted

        monkeypatch.setattr(gw.store, "ping", counting("database", gw.store.ping))
        monkeypatch.setattr(gw.bus, "ping", counting("bus", gw.bus.ping))
        with trio.fail_after(TIMEOUT):
            started = trio.current_time()
            for _ in range(5):
                r = await http.get("/health/ready")
                assert (r.status_code, r.json()) == (200, {"status": "ready"})
            assert (await http.get("/health")).json()["services"] == {"database": "connected", "bus": "connected"}
            assert trio.current_time() - started < 0.5, "too slow to stay within the cache window"
            assert calls == {"database": 1, "bus": 1}
            await trio.sleep(0.6)
            assert (await http.get("/health/ready")).status_code == 200
            assert calls == {"database": 2, "bus": 2}


# --- §10.1 503 while the store is unreachable -----------------------------------------------------------
@pytest.mark.postgres
@pytest.mark.redis
async def test_rest_answers_503_with_retry_after_while_postgres_is_unreachable(
    tmp_path: Path, postgres_dsn: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = 1.0
    monkeypatch.setattr(http_app, "READY_CACHE_SECONDS", cache)
    admin_key = "a" * 40
    key, device = DeviceKey.generate(), new_device_id()
    dbname = conninfo_to_dict(postgres_dsn)["dbname"]
    async with open_tcp_proxy("127.0.0.1", 5432) as proxy:
        dsn = make_conninfo(postgres_dsn, host="127.0.0.1", port=str(proxy.port), dbname=dbname)
        config = local_config(
            tmp_path,
            storage={"backend": "postgres", "dsn": dsn, "op_timeout": 1, "statement_timeout": 1, "pool_size": 2},
            bus={"backend": "redis", "url": redis_url}, http=LOOSE_HTTP, admin={"api_key": admin_key},
        )
        async with run_daemon(config) as (_, running), http_client(running) as http:
            await register(running, key, device)
            r = await signed(http, key, device, "POST", "/api/auth/token")
            assert r.status_code == 200, r.text
            token = r.json()["token"]
            assert (await http.get("/health/ready")).status_code == 200  # fills the readiness cache
            proxy.cut()
            cut_at = trio.current_time()
            r = await http.get("/health/ready")
            if trio.current_time() - cut_at < cache * 0.8:
                assert r.status_code == 200, "within its window the readiness answer is the cached one"

            with trio.fail_after(TIMEOUT * 2):
                answers = [
                    await signed(http, key, device, "GET", "/api/devices"),
                    await bearer(http, token, "GET", "/api/presence"),
                    await signed(http, key, device, "GET", "/api/user/profile"),
                    await http.get("/admin/revoked-devices", headers={"X-Admin-API-Key": admin_key}),
                    await http.get("/api/auth/verify", headers={"Authorization": f"Bearer {token}"}),
                ]
            for r in answers:
                assert_error(r, 503, "SERVICE_UNAVAILABLE", "Service temporarily unavailable")
                assert r.headers.get("Retry-After") == "5", r.headers
                assert r.headers["Cache-Control"] == "no-store"
                assert "psycopg" not in r.text.lower() and "postgres" not in r.text.lower()

            with trio.fail_after(cache + http_app.PROBE_TIMEOUT + 3):
                while (r := await http.get("/health/ready")).status_code == 200:
                    await trio.sleep(0.1)
            assert r.status_code == 503 and r.headers["Retry-After"] == "5"
            assert r.json()["status"] == "not_ready" and r.json()["services"]["database"] != "connected"

            proxy.restore()
            with trio.fail_after(15):  # the breaker lets a probe through after its cool-down
                while (await signed(http, key, device, "GET", "/api/devices")).status_code == 503:
                    await trio.sleep(0.2)
            assert (await signed(http, key, device, "GET", "/api/devices")).status_code == 200

