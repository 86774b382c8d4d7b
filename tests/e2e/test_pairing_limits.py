"""Pairing-failure limits hold under concurrency, on one instance and across two (protocol.md §7):
the attempt is charged before anything is awaited (check and charge in one step, in the store for every
instance), so concurrent wrong guesses can never be counted past a limit."""

from __future__ import annotations

import sqlite3
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import psycopg
import trio

from pocketbridge.client import ClientError, DeviceKey, connect, new_device_id
from pocketbridge.config import Config
from tests.conftest import make_config, run_daemon

HIGH = {"ws_connects_per_ip_per_minute": 10_000, "handshakes_per_ip_per_minute": 10_000}


def recorded_failures(config: Config) -> int:
    if config.storage.backend == "postgres":
        with psycopg.connect(config.storage.dsn, connect_timeout=5) as conn:
            return int(conn.execute("SELECT count(*) FROM pairing_failures").fetchone()[0])
    conn = sqlite3.connect(f"file:{config.sqlite_path()}?mode=ro", uri=True, timeout=10)
    try:
        return int(conn.execute("SELECT count(*) FROM pairing_failures").fetchone()[0])
    finally:
        conn.close()


async def guess_concurrently(urls: list[str], n: int) -> list[str]:
    """``n`` devices (alternating over ``urls``), connected first, then each sends one wrong code at once."""
    outcomes: list[str] = []
    go = trio.Event()
    async with trio.open_nursery() as nursery:
        ready = 0

        async def guess(i: int) -> None:
            nonlocal ready
            try:
                async with connect(urls[i % len(urls)], DeviceKey.generate(), new_device_id(), reply_timeout=20) as c:
                    ready += 1
                    await go.wait()
                    reply = await c.complete_pairing("%06d" % (100_000 + i))
                    outcomes.append(reply["payload"].get("error", "?"))
            except ClientError as exc:
                outcomes.append(f"closed {exc}")

        for i in range(n):
            nursery.start_soon(guess, i)
        with trio.fail_after(30):
            while ready < n:
                await trio.sleep(0.01)
        go.set()
    return outcomes


def backend_config(tmp_path: Path, backend: dict[str, dict[str, Any]], name: str, **pairing: Any) -> Config:
    sections = {k: dict(v) for k, v in backend.items()}
    sections["limits"] = HIGH
    sections["pairing"] = {"max_failures_per_connection": 5, **pairing}
    return make_config(tmp_path / name, **sections)


async def run_instances(stack: AsyncExitStack, configs: list[Config]) -> list[str]:
    urls = []
    for config in configs:
        _, running = await stack.enter_async_context(run_daemon(config))
        urls.append(running.ws_url)
    return urls


async def test_concurrent_wrong_guesses_never_pass_the_per_address_limit(
    tmp_path: Path, backend: dict[str, dict[str, Any]]
) -> None:
    pairing = {"max_failures_per_ip_per_hour": 20, "max_failures_per_minute": 10_000}
    configs = [backend_config(tmp_path, backend, "a", **pairing)]
    if configs[0].storage.backend == "postgres":  # two instances share the database's count
        configs.append(backend_config(tmp_path, backend, "b", **pairing))
    with trio.fail_after(60):
        async with AsyncExitStack() as stack:
            urls = await run_instances(stack, configs)
            outcomes = await guess_concurrently(urls, 30)
    assert recorded_failures(configs[0]) <= 20, outcomes
    assert sum("not found" in o for o in outcomes) <= 20, outcomes


async def test_concurrent_wrong_guesses_never_pass_the_deployment_limit(
    tmp_path: Path, backend: dict[str, dict[str, Any]]
) -> None:
    pairing = {"max_failures_per_ip_per_hour": 10_000, "max_failures_per_minute": 12}
    configs = [backend_config(tmp_path, backend, "a", **pairing)]
    if configs[0].storage.backend == "postgres":
        configs.append(backend_config(tmp_path, backend, "b", **pairing))
    with trio.fail_after(60):
        async with AsyncExitStack() as stack:
            urls = await run_instances(stack, configs)
            outcomes = await guess_concurrently(urls, 40)
    assert recorded_failures(configs[0]) <= 12, outcomes
    assert sum("not found" in o for o in outcomes) <= 12, outcomes


async def test_successful_pairings_are_not_counted_as_failures(tmp_path: Path) -> None:
    """Only wrong codes count: more successful pairings from one address than its failure budget all work."""
    config = make_config(tmp_path / "a", limits={**HIGH, "max_devices_per_user": 100},
                         pairing={"max_failures_per_ip_per_hour": 3, "max_failures_per_minute": 3,
                                  "initiations_per_device_per_hour": 100})
    owner = DeviceKey.generate()
    owner_device = new_device_id()
    with trio.fail_after(60):
        async with run_daemon(config) as (_, running), connect(running.ws_url, owner, owner_device) as a:
            for _ in range(8):
                code = (await a.initiate_pairing())["payload"]["code"]
                async with connect(running.ws_url, DeviceKey.generate(), new_device_id()) as joiner:
                    reply = await joiner.complete_pairing(code)
                    assert reply["type"] == "pairing_completed", reply
    assert recorded_failures(config) == 0
