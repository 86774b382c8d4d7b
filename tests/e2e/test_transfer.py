"""Growing out of SQLite (docs/operations.md, "Scaling out"): a deployment populated through a real daemon on
the embedded store is transferred to PostgreSQL, two instances start on PostgreSQL + Redis with the same server
key, and every device gets exactly what it had not received yet; a re-run is harmless, and a target holding
other data is refused."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import trio

from pocketbridge.client import DeviceKey, connect, new_device_id
from pocketbridge.identity import write_new_identity
from pocketbridge.store.postgres import migrate
from tests.conftest import make_config, run_daemon, temporary_database

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]


def cli(*args: str, dsn: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PB_")}
    env.update(PB_STORAGE_BACKEND="postgres", PB_STORAGE_DSN=dsn)
    return subprocess.run([sys.executable, "-m", "pocketbridge", *args], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def empty_database() -> Iterator[str]:
    with temporary_database("transfer", migrated=False) as dsn:
        yield dsn


async def test_transfer_then_two_instances_serve_exactly_the_rest(
    tmp_path: Path, empty_database: str, redis_url: str
) -> None:
    dsn = empty_database
    key_file = tmp_path / "identity.key"
    identity = write_new_identity(key_file)
    limits = {"ws_connects_per_ip_per_minute": 10_000, "handshakes_per_ip_per_minute": 10_000}
    embedded = make_config(tmp_path / "embedded", server={"identity_key_file": str(key_file)}, limits=limits)
    user = DeviceKey.generate()
    sender, reader, late = new_device_id(), new_device_id(), new_device_id()
    with trio.fail_after(120):
        async with run_daemon(embedded) as (_, running):
            async with connect(running.ws_url, user, late, pin=identity.public_hex):
                pass  # registered, then away for the whole test
            async with connect(running.ws_url, user, reader, ack_event_ids=False) as b:
                async with connect(running.ws_url, user, sender) as a:
                    first = [(await a.send_event("notes:main", "note:text", b"one %d" % i)).event_id for i in range(30)]
                    seen = [(await b.receive_event()).event_id for _ in first]  # B acks these
                    assert seen == first
                    second = [(await a.send_event("notes:main", "note:text", b"two %d" % i)).event_id for i in range(20)]
            await trio.sleep(1.2)  # B's acks are persisted with the next flush (and at the stop)
        source = embedded.sqlite_path()

        assert cli("migrate", dsn=dsn).returncode == 0
        done = await trio.to_thread.run_sync(lambda: cli("transfer", "--from-sqlite", str(source), dsn=dsn))
        assert done.returncode == 0, done.stderr
        assert "finished and verified" in done.stdout
        again = await trio.to_thread.run_sync(lambda: cli("transfer", "--from-sqlite", str(source), dsn=dsn))
        assert again.returncode == 0 and "resumed" in again.stdout, again.stderr

        scaled = {"storage": {"backend": "postgres", "dsn": dsn}, "bus": {"backend": "redis", "url": redis_url},
                  "server": {"identity_key_file": str(key_file)}, "limits": limits}
        one, two = make_config(tmp_path / "one", **scaled), make_config(tmp_path / "two", **scaled)
        async with run_daemon(one) as (_, r1), run_daemon(two) as (_, r2):
            async with connect(r1.ws_url, user, reader, pin=identity.public_hex, ack_event_ids=False) as b:
                rest = [e.event_id for e in (await b.replay()).events]
            assert rest == second, "the reader must get exactly what it had not received"
            async with connect(r2.ws_url, user, late, pin=identity.public_hex) as c:
                everything = [e.event_id for e in (await c.replay()).events]
            assert everything == first + second
            async with connect(r2.ws_url, user, sender, pin=identity.public_hex) as a:
                assert a.last_ack_device_seq == 50  # it carries on after its last event
                assert (await a.send_event("notes:main", "note:text", b"three")).status == "stored"


def test_a_target_with_other_data_is_refused(tmp_path: Path, empty_database: str) -> None:
    migrate(empty_database)
    with psycopg.connect(empty_database, autocommit=True) as conn:
        conn.execute("INSERT INTO users (user_id, created_at) VALUES (%s, now())", ("b" * 64,))
    import sqlite3

    from pocketbridge.store.sqlite import migrate as sqlite_migrate

    db = tmp_path / "pocketbridge.db"
    sqlite_migrate(sqlite3.connect(db, isolation_level=None))
    refused = cli("transfer", "--from-sqlite", str(db), dsn=empty_database)
    assert refused.returncode == 1 and "already holds data" in refused.stderr, refused.stderr
