"""``pocketbridge transfer --from-sqlite PATH``: move an embedded deployment to PostgreSQL.

Copies users, devices (keys, names, revocations, cursors), streams, events with their sequence numbers,
pairing codes, profiles, the audit trail and the replay protection of signed requests from a stopped
SQLite store into a migrated PostgreSQL database, table by table in chunks of one transaction each. Every
row is inserted with ``ON CONFLICT DO NOTHING`` on its key, so an interrupted transfer is simply run again.
A target that already holds data from elsewhere is refused unless ``force``. At the end the row counts of
every table and a checksum of every event and device are compared; the transfer is recorded as finished only
if they match. Clients notice nothing as long as the instances use the same server identity key.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import psycopg

from .errors import PocketBridgeError

CHUNK = 2000  # rows per transaction

# table -> (SQLite columns, PostgreSQL value expressions (one %s each), conflict target)
TABLES: dict[str, tuple[str, str, str]] = {
    "users": (
        "user_id, created_at, server_seq, deleting, last_activity, stored_bytes, quota_tokens, quota_at",
        "%s, pb_ts(%s), %s, %s::int::boolean, pb_ts(%s), %s, %s, %s",
        "(user_id)",
    ),
    "devices": (
        "device_id, user_id, bound_key, device_name, device_type, registered_at, last_seen, last_ack_device_seq,"
        " delivery_cursor, revoked_at, revoke_reason",
        "%s, %s, %s, %s, %s, pb_ts(%s), pb_ts(%s), %s, %s, pb_ts(%s), %s",
        "(device_id)",
    ),
    "streams": ("user_id, stream_id, last_seq", "%s, %s, %s", "(user_id, stream_id)"),
    "events": (
        "user_id, server_seq, event_id, device_id, device_seq, stream_id, stream_seq, type, encrypted_payload,"
        " payload_size, ttl, created_at",
        "%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, pb_ts(%s)",
        "DO NOTHING",
    ),
    "pairing_codes": (
        "code, user_id, device_id, created_at, expires_at, used",
        "%s, %s, %s, pb_ts(%s), pb_ts(%s), %s::int::boolean",
        "(code)",
    ),
    "profiles": (
        "user_id, display_name, email, avatar_url, preferences, onboarding_completed, created_at, updated_at",
        "%s, %s, %s, %s, %s::jsonb, %s::int::boolean, pb_ts(%s), pb_ts(%s)",
        "(user_id)",
    ),
    "seen_signatures": ("signature, expires_at", "%s, pb_ts(%s)", "(signature)"),
    "audit_log": ("id, at, action, actor, target, peer, detail", "%s, pb_ts(%s), %s, %s, %s, %s, %s", "(id)"),
    "pairing_failures": ("at, peer", "pb_ts(%s), %s", ""),
}
ORDER = {
    "users": "user_id", "devices": "device_id", "streams": "user_id, stream_id", "events": "user_id, server_seq",
    "pairing_codes": "code", "profiles": "user_id", "seen_signatures": "signature", "audit_log": "id",
    "pairing_failures": "at, peer",
}

MARKER = (
    "CREATE TABLE IF NOT EXISTS pb_transfer (source text PRIMARY KEY, started_at timestamptz NOT NULL DEFAULT now(),"
    " finished_at timestamptz)"
)


@attrs.frozen
class TransferReport:
    counts: dict[str, int]
    events_checksum: str
    devices_checksum: str
    resumed: bool


def _conflict(table: str) -> str:
    target = TABLES[table][2]
    if not target:
        return ""
    return " ON CONFLICT DO NOTHING" if target == "DO NOTHING" else f" ON CONFLICT {target} DO NOTHING"


def _rows(src: sqlite3.Connection, table: str) -> Iterator[Sequence[Any]]:
    columns = TABLES[table][0]
    order = ORDER[table]
    cursor = src.execute(f"SELECT {columns} FROM {table} ORDER BY {order}")
    while chunk := cursor.fetchmany(CHUNK):
        yield from chunk


def _chunks(rows: Iterator[Sequence[Any]]) -> Iterator[list[Sequence[Any]]]:
    chunk: list[Sequence[Any]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _checksum(rows: Iterator[Sequence[Any]]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(repr(tuple(row)).encode())
    return digest.hexdigest()


EVENTS_SUM_SQLITE = (
    "SELECT user_id, server_seq, event_id, device_id, device_seq, stream_id, stream_seq, type, encrypted_payload,"
    " payload_size, ttl, created_at FROM events ORDER BY user_id, server_seq"
)
EVENTS_SUM_PG = (
    "SELECT user_id, server_seq, event_id, device_id, device_seq, stream_id, stream_seq, type, encrypted_payload,"
    " payload_size, ttl, pb_ms(created_at) FROM events ORDER BY user_id COLLATE \"C\", server_seq"
)
DEVICES_SUM_SQLITE = (
    "SELECT device_id, user_id, bound_key, device_name, device_type, last_ack_device_seq, delivery_cursor,"
    " revoked_at FROM devices ORDER BY device_id"
)
DEVICES_SUM_PG = (
    "SELECT device_id, user_id, bound_key, device_name, device_type, last_ack_device_seq, delivery_cursor,"
    " pb_ms(revoked_at) FROM devices ORDER BY device_id COLLATE \"C\""
)


def _pg_rows(conn: psycopg.Connection[Any], sql: str) -> Iterator[Sequence[Any]]:
    with conn.cursor(name="pb_transfer_sum") as cur:  # server-side: the events are never all in memory
        cur.execute(sql)
        while chunk := cur.fetchmany(CHUNK):
            for row in chunk:
                yield tuple(int(v) if isinstance(v, bool) else v for v in row)


def _sqlite_rows(src: sqlite3.Connection, sql: str) -> Iterator[Sequence[Any]]:
    cursor = src.execute(sql)
    while chunk := cursor.fetchmany(CHUNK):
        yield from chunk


def transfer(
    sqlite_path: Path, dsn: str, *, force: bool = False, progress: Callable[[str], None] = lambda text: None
) -> TransferReport:
    """Copy the SQLite store at ``sqlite_path`` into the (migrated) PostgreSQL database at ``dsn``."""
    if not sqlite_path.exists():
        raise PocketBridgeError(f"no SQLite store at {sqlite_path}")
    source = str(sqlite_path.resolve())
    src = sqlite3.connect(f"file:{sqlite_path}?mode=ro", uri=True, timeout=30)
    try:
        try:
            conn = psycopg.connect(dsn, connect_timeout=10)
        except psycopg.OperationalError as exc:
            raise PocketBridgeError(
                "cannot connect to PostgreSQL at [storage] dsn (PB_STORAGE_DSN): is it running and reachable?"
            ) from exc
        with conn:
            return _transfer(src, conn, source, force, progress)
    except sqlite3.Error as exc:
        raise PocketBridgeError(f"cannot read {sqlite_path}: {exc}") from None
    except psycopg.errors.UndefinedTable:
        raise PocketBridgeError("the PostgreSQL database is not migrated: run `pocketbridge migrate` first") from None
    finally:
        src.close()


def _transfer(
    src: sqlite3.Connection, conn: psycopg.Connection[Any], source: str, force: bool, progress: Callable[[str], None]
) -> TransferReport:
    conn.execute(MARKER)
    conn.commit()
    marker = conn.execute("SELECT finished_at FROM pb_transfer WHERE source = %s", (source,)).fetchone()
    has_data = conn.execute("SELECT EXISTS (SELECT 1 FROM users) OR EXISTS (SELECT 1 FROM events)").fetchone()
    resumed = marker is not None
    if not resumed and has_data is not None and has_data[0] and not force:
        raise PocketBridgeError(
            "the PostgreSQL database already holds data that did not come from this SQLite store; use --force to"
            " merge into it anyway"
        )
    if not resumed:
        conn.execute("INSERT INTO pb_transfer (source) VALUES (%s)", (source,))
        conn.commit()
    for table, (_, values, _) in TABLES.items():
        columns = TABLES[table][0]
        sql = f"INSERT INTO {table} ({columns}) VALUES ({values}){_conflict(table)}"
        if table == "pairing_failures":  # no key of its own: replaced as a whole (it holds the last hour only)
            with conn.transaction():
                conn.execute("DELETE FROM pairing_failures")
                with conn.cursor() as cur:
                    cur.executemany(sql, list(_rows(src, table)))
            continue
        copied = 0
        for chunk in _chunks(_rows(src, table)):
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(sql, chunk)
            copied += len(chunk)
            if table == "events":
                progress(f"events: {copied}")
        progress(f"{table}: {copied} rows")
    conn.execute("SELECT setval(pg_get_serial_sequence('audit_log', 'id'), coalesce(max(id), 1)) FROM audit_log")
    conn.commit()
    counts: dict[str, int] = {}
    for table in TABLES:
        (mine,) = src.execute(f"SELECT count(*) FROM {table}").fetchone()
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        theirs = row[0] if row else -1
        if not force and mine != theirs:
            raise PocketBridgeError(f"{table}: {mine} rows in SQLite, {theirs} in PostgreSQL; run the transfer again")
        counts[table] = mine
    events_sum = _checksum(_sqlite_rows(src, EVENTS_SUM_SQLITE))
    devices_sum = _checksum(_sqlite_rows(src, DEVICES_SUM_SQLITE))
    if not force:
        if _checksum(_pg_rows(conn, EVENTS_SUM_PG)) != events_sum:
            raise PocketBridgeError("the events differ between SQLite and PostgreSQL (checksum); run it again")
        if _checksum(_pg_rows(conn, DEVICES_SUM_PG)) != devices_sum:
            raise PocketBridgeError("the devices differ between SQLite and PostgreSQL (checksum)")
    conn.execute("UPDATE pb_transfer SET finished_at = now() WHERE source = %s", (source,))
    conn.commit()
    return TransferReport(counts, events_sum, devices_sum, resumed)
