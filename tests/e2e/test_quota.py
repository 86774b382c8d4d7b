"""Storage quotas per account, enforced in the store (protocol.md §5.3, §10.3 profile): stored payload bytes
and payload bytes per minute are refused with the rejection ack QUOTA_EXCEEDED, counted in a metric, shown in
GET /api/user/profile, and hold across instances; inactive accounts whose devices are all revoked are purged."""

from __future__ import annotations

import sqlite3
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import psycopg
import trio

from pocketbridge.client import DeviceKey, connect, new_device_id
from pocketbridge.config import Config, with_overrides
from pocketbridge.maintenance import purge_once
from tests.conftest import make_config, run_daemon
from tests.e2e.httpclient import http_client, signed

HIGH = {"ws_connects_per_ip_per_minute": 10_000, "handshakes_per_ip_per_minute": 10_000}


def quota_config(tmp_path: Path, backend: dict[str, dict[str, Any]], name: str = "data", **limits: Any) -> Config:
    sections = {k: dict(v) for k, v in backend.items()}
    sections["limits"] = {**HIGH, **limits}
    return make_config(tmp_path / name, **sections)


async def test_stored_bytes_quota(tmp_path: Path, backend: dict[str, dict[str, Any]]) -> None:
    config = quota_config(tmp_path, backend, max_stored_bytes_per_user=100_000, stored_bytes_per_user_per_minute=0)
    key, other = DeviceKey.generate(), DeviceKey.generate()
    device = new_device_id()
    with trio.fail_after(60):
        async with run_daemon(config) as (_, running):
            async with connect(running.ws_url, key, device) as a:
                statuses = [(await a.send_event("files:x", "file:chunk", b"q" * 30_000)) for _ in range(4)]
            assert [s.status for s in statuses] == ["stored", "stored", "stored", "rejected"]
            assert statuses[3].code == "QUOTA_EXCEEDED" and statuses[3].error
            async with connect(running.ws_url, other, new_device_id()) as b:  # another account is not affected
                assert (await b.send_event("files:x", "file:chunk", b"q" * 30_000)).status == "stored"
            async with http_client(running) as http:
                profile = (await signed(http, key, device, "GET", "/api/user/profile")).json()
                assert profile["storage"] == {"used_bytes": 90_000, "max_bytes": 100_000}
                metrics = (await http.get("/metrics")).text
                assert 'pocketbridge_events_total{outcome="quota_exceeded"} 1.0' in metrics


async def test_bytes_per_minute_quota_across_instances(tmp_path: Path, backend: dict[str, dict[str, Any]]) -> None:
    """Two instances on PostgreSQL share the account's budget (the embedded default runs one instance)."""
    limits = {"max_stored_bytes_per_user": 0, "stored_bytes_per_user_per_minute": 50_000}
    configs = [quota_config(tmp_path, backend, "a", **limits)]
    if configs[0].storage.backend == "postgres":
        configs.append(quota_config(tmp_path, backend, "b", **limits))
    key = DeviceKey.generate()
    with trio.fail_after(60):
        async with AsyncExitStack() as stack:
            urls = []
            for config in configs:
                urls.append((await stack.enter_async_context(run_daemon(config)))[1].ws_url)
            results = []
            for i in range(3):  # 20 kB each, alternating between the instances: the third is over 50 kB/min
                async with connect(urls[i % len(urls)], key, new_device_id()) as a:
                    results.append(await a.send_event("files:x", "file:chunk", b"r" * 20_000))
    assert [r.status for r in results] == ["stored", "stored", "rejected"], results
    assert results[2].code == "QUOTA_EXCEEDED"


def _run_sql(config: Config, sql: str, args: tuple[Any, ...]) -> list[Any]:
    if config.storage.backend == "postgres":
        with psycopg.connect(config.storage.dsn, autocommit=True, connect_timeout=5) as conn:
            cur = conn.execute(sql.replace("?", "%s"), args)
            return cur.fetchall() if cur.description else []
    conn = sqlite3.connect(config.sqlite_path(), isolation_level=None, timeout=10)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


async def test_inactive_accounts_with_every_device_revoked_are_purged(
    tmp_path: Path, backend: dict[str, dict[str, Any]]
) -> None:
    config = with_overrides(quota_config(tmp_path, backend), retention={"inactive_user_days": 30})
    gone, kept = DeviceKey.generate(), DeviceKey.generate()
    gone_dev, kept_dev = new_device_id(), new_device_id()
    with trio.fail_after(60):
        async with run_daemon(config) as (daemon, running):
            for key, dev in ((gone, gone_dev), (kept, kept_dev)):
                async with connect(running.ws_url, key, dev) as a:
                    assert (await a.send_event("notes:x", "note:text", b"hello")).status == "stored"
            async with http_client(running) as http:
                r = await signed(http, gone, gone_dev, "DELETE", f"/api/devices/{gone_dev}")
                assert r.status_code == 200, r.text
            await trio.sleep(1.2)  # activity stamps are written with the next flush
            old = int(time.time() * 1000) - 31 * 86_400_000
            for user in (gone.public_hex, kept.public_hex):  # both idle for 31 days; only one has a live device
                await trio.to_thread.run_sync(
                    _run_sql, config,
                    "UPDATE users SET last_activity = " + ("pb_ts(?)" if config.storage.backend == "postgres" else "?")
                    + " WHERE user_id = ?", (old, user),
                )
            await purge_once(daemon.gateway.store, config)
            users = {row[0] for row in await trio.to_thread.run_sync(_run_sql, config, "SELECT user_id FROM users", ())}
    assert gone.public_hex not in users and kept.public_hex in users
