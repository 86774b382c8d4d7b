"""Schema upgrades keep the data: a version-1 database (no quota columns) is upgraded in place, and every
user's stored bytes are counted from its events."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import psycopg
import pytest

from pocketbridge.store import postgres, sqlite
from tests.conftest import temporary_database

USER = "a" * 64


def test_sqlite_version_1_is_upgraded(tmp_path: Path) -> None:
    c = sqlite3.connect(tmp_path / "db", isolation_level=None)
    sqlite.migrate(c)
    # make it look like version 1: no quota columns, no trigger
    c.execute("DROP TRIGGER events_release_quota")
    for column in ("stored_bytes", "quota_tokens", "quota_at"):
        c.execute(f"ALTER TABLE users DROP COLUMN {column}")
    c.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    c.execute("INSERT INTO users (user_id, created_at) VALUES (?, 0)", (USER,))
    for seq, size in ((1, 100), (2, 250)):
        c.execute(
            "INSERT INTO events (user_id, server_seq, event_id, device_id, device_seq, stream_id, stream_seq, type,"
            " encrypted_payload, payload_size, created_at) VALUES (?, ?, ?, 'd', ?, 's', ?, 't', 'p', ?, 0)",
            (USER, seq, f"e{seq}", seq, seq, size),
        )
    sqlite.migrate(c)
    assert c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (str(sqlite.SCHEMA_VERSION),)
    assert c.execute("SELECT stored_bytes FROM users").fetchone() == (350,)
    c.execute("DELETE FROM events WHERE server_seq = 1")  # the trigger gives the bytes back
    assert c.execute("SELECT stored_bytes FROM users").fetchone() == (250,)
    sqlite.migrate(c)  # idempotent


@pytest.mark.postgres
def test_postgres_version_1_is_upgraded() -> None:
    with temporary_database("upgrade") as dsn:
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("DROP TRIGGER events_release_quota ON events")
            c.execute("ALTER TABLE users DROP COLUMN stored_bytes, DROP COLUMN quota_tokens, DROP COLUMN quota_at")
            c.execute("DELETE FROM pb_schema WHERE version = 2")
            c.execute("INSERT INTO users (user_id, created_at) VALUES (%s, now())", (USER,))
            for seq, size in ((1, 100), (2, 250)):
                c.execute(
                    "INSERT INTO events (user_id, server_seq, event_id, device_id, device_seq, stream_id,"
                    " stream_seq, type, encrypted_payload, payload_size, created_at)"
                    " VALUES (%s, %s, %s, 'd', %s, 's', %s, 't', 'p', %s, now())",
                    (USER, seq, f"e{seq}", seq, seq, size),
                )
        assert postgres.migrate(dsn) == (1, postgres.SCHEMA_VERSION)
        with psycopg.connect(dsn, autocommit=True) as c:
            assert c.execute("SELECT stored_bytes FROM users").fetchone() == (350,)
            c.execute("DELETE FROM events WHERE server_seq = 1")
            assert c.execute("SELECT stored_bytes FROM users").fetchone() == (250,)
        assert postgres.migrate(dsn) == (2, 2)
