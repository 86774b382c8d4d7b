"""The embedded store: one SQLite file in WAL mode.

All writes go through the batching writer on one connection: its statements run on the event loop
(they take microseconds) and only the COMMIT, the fsync, runs in a worker thread; reads use
a small pool of read-only connections. The schema carries a version so later releases can migrate it.
The decisions are :mod:`pocketbridge.store.rules`; this module holds only their rows (:class:`SqliteTx`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import trio

from ..audit import AuditRow
from ..clock import Clock
from ..config import Config
from ..errors import StorageFull, StoreUnavailable
from ..protocol.events import NewEvent
from . import (
    AuditRecord,
    CommitHook,
    DeletedCounts,
    Device,
    DeviceState,
    EventResult,
    Page,
    Profile,
    Quota,
    RevokedDevice,
    StoredEvent,
    UserSummary,
    paginate,
    rules,
)
from .ops import AppendOp
from .rules import Sender, SizedKey
from .writer import BatchedWrites, BatchWriter, Breaker, Pending

log = logging.getLogger("pocketbridge.store")

SCHEMA_VERSION = 2
# Steps from the version before each key (a new database gets the whole schema file at once).
UPGRADES = {
    2: [
        "ALTER TABLE users ADD COLUMN stored_bytes INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE users ADD COLUMN quota_tokens REAL",
        "ALTER TABLE users ADD COLUMN quota_at INTEGER",
        "UPDATE users SET stored_bytes = (SELECT coalesce(sum(payload_size), 0) FROM events e"
        " WHERE e.user_id = users.user_id)",
    ],
}
READ_CONNECTIONS = 3
FREE_CHECK_SECONDS = 0.5
FULL_SLACK = 1024 * 1024  # an I/O error with less free space than this counts as a full disk
T = TypeVar("T")
R = TypeVar("R")

_EVENT_COLUMNS = (
    "user_id, server_seq, event_id, device_id, device_seq, stream_id, stream_seq, type, "
    "encrypted_payload, payload_size, ttl, created_at"
)
_DEVICE_COLUMNS = (
    "device_id, user_id, bound_key, device_name, device_type, registered_at, last_seen, is_online, "
    "last_ack_device_seq, delivery_cursor, revoked_at"
)


def _device(*row: Any) -> Device:
    return Device(row[0], row[1], row[2], row[3], row[4], row[5], row[6], bool(row[7]), row[8], row[9], row[10])


class SqliteTx:
    """The rows behind the rules in the write transaction (:class:`~pocketbridge.store.rules.StoreTx` and
    ``EventsTx``). One writer holds the database: the rules' locks are no-ops here."""

    def __init__(self, c: sqlite3.Connection, quota: Quota) -> None:
        self.c = c
        self.quota = quota
        self._acks: list[tuple[int, str]] = []

    # --- events (the fast path: the Python append rule, a few statements per event)
    def append(self, event: NewEvent, now_ms: int) -> EventResult:
        return rules.append_event(self, event, self.quota, now_ms)

    def sender(self, device_id: str) -> Sender | None:
        row = self.c.execute(
            "SELECT d.user_id, d.revoked_at IS NOT NULL, u.deleting, u.stored_bytes, u.quota_tokens, u.quota_at"
            " FROM devices d JOIN users u ON u.user_id = d.user_id WHERE d.device_id = ?",
            (device_id,),
        ).fetchone()
        return None if row is None else Sender(row[0], bool(row[1]), bool(row[2]), row[3], row[4], row[5])

    def known_event(self, user_id: str, device_id: str, device_seq: int, event_id: str) -> tuple[str, bool] | None:
        row = self.c.execute(
            "SELECT event_id, device_id = ? AND device_seq = ? FROM events WHERE user_id = ? AND"
            " ((device_id = ? AND device_seq = ?) OR event_id = ?) ORDER BY 2 DESC LIMIT 1",
            (device_id, device_seq, user_id, device_id, device_seq, event_id),
        ).fetchone()
        return None if row is None else (row[0], bool(row[1]))

    def next_server_seq(self, user_id: str, size: int, bucket: tuple[float | None, int], now_ms: int) -> int:
        (server_seq,) = self.c.execute(
            "UPDATE users SET server_seq = server_seq + 1, last_activity = ?, stored_bytes = stored_bytes + ?,"
            " quota_tokens = ?, quota_at = ? WHERE user_id = ? RETURNING server_seq",
            (now_ms, size, *bucket, user_id),
        ).fetchone()
        return int(server_seq)

    def next_stream_seq(self, user_id: str, stream_id: str) -> int:
        (stream_seq,) = self.c.execute(
            "INSERT INTO streams (user_id, stream_id, last_seq) VALUES (?, ?, 1)"
            " ON CONFLICT (user_id, stream_id) DO UPDATE SET last_seq = last_seq + 1 RETURNING last_seq",
            (user_id, stream_id),
        ).fetchone()
        return int(stream_seq)

    def insert_event(self, event: StoredEvent) -> None:
        self.c.execute(f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       stored_row(event))
        self._acks.append((event.device_seq, event.device_id))

    def flush_acks(self) -> None:
        """The devices' last_ack_device_seq: one statement per batch instead of one per event."""
        self.c.executemany(
            "UPDATE devices SET last_ack_device_seq = max(last_ack_device_seq, ?) WHERE device_id = ?", self._acks
        )
        self._acks.clear()

    # --- devices
    def device(self, device_id: str) -> Device | None:
        row = self.c.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = ?", (device_id,)).fetchone()
        return None if row is None else _device(*row)

    def user_deleting(self, user_id: str) -> bool:
        row = self.c.execute("SELECT deleting FROM users WHERE user_id = ?", (user_id,)).fetchone()
        return row is not None and bool(row[0])

    def ensure_user(self, user_id: str, now_ms: int) -> None:
        self.c.execute("INSERT OR IGNORE INTO users (user_id, created_at) VALUES (?, ?)", (user_id, now_ms))

    def lock_user(self, user_id: str) -> None:
        pass

    def count_devices(self, user_id: str) -> int:
        (count,) = self.c.execute(
            "SELECT count(*) FROM devices WHERE user_id = ? AND revoked_at IS NULL", (user_id,)
        ).fetchone()
        return int(count)

    def taken_names(self, user_id: str) -> set[str]:
        rows = self.c.execute(
            "SELECT device_name FROM devices WHERE user_id = ? AND revoked_at IS NULL AND device_name IS NOT NULL",
            (user_id,),
        )
        return {r[0] for r in rows}

    def insert_device(self, d: Device) -> None:
        self.c.execute(
            "INSERT INTO devices (device_id, user_id, bound_key, device_name, device_type, registered_at, last_seen)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (d.device_id, d.user_id, d.bound_key, d.device_name, d.device_type, d.registered_at, d.last_seen),
        )

    def set_name_and_type(self, device_id: str, name: str | None, device_type: str | None) -> None:
        self.c.execute(
            "UPDATE devices SET device_name = ?, device_type = ? WHERE device_id = ?", (name, device_type, device_id)
        )

    def move_device(self, device_id: str, user_id: str, name: str | None, last_ack: int) -> None:
        self.c.execute(
            "UPDATE devices SET user_id = ?, device_name = ?, last_ack_device_seq = ?, delivery_cursor = 0"
            " WHERE device_id = ?",
            (user_id, name, last_ack, device_id),
        )

    def revoke(self, device_id: str, reason: str, now_ms: int) -> None:
        self.c.execute(
            "UPDATE devices SET revoked_at = coalesce(revoked_at, ?), revoke_reason = coalesce(revoke_reason, ?),"
            " is_online = 0, connection_id = NULL WHERE device_id = ?",
            (now_ms, reason, device_id),
        )

    def unrevoke(self, device_id: str, name: str | None) -> None:
        self.c.execute(
            "UPDATE devices SET revoked_at = NULL, revoke_reason = NULL, device_name = ? WHERE device_id = ?",
            (name, device_id),
        )

    def set_presence(self, device_id: str, connection_id: str, online: bool, now_ms: int) -> None:
        if online:
            self.c.execute(
                "UPDATE devices SET is_online = 1, connection_id = ?, last_seen = ? WHERE device_id = ?",
                (connection_id, now_ms, device_id),
            )
        else:
            self.c.execute(
                "UPDATE devices SET is_online = 0, connection_id = NULL, last_seen = ?"
                " WHERE device_id = ? AND connection_id = ?",
                (now_ms, device_id, connection_id),
            )

    def device_head(self, device_id: str) -> int:
        row = self.c.execute(
            "SELECT u.server_seq FROM devices d JOIN users u ON u.user_id = d.user_id WHERE d.device_id = ?",
            (device_id,),
        ).fetchone()
        return int(row[0]) if row else 0

    def beat(self, instance_id: str, now_ms: int, stale_after_ms: int) -> int:
        return 0  # one process owns the file; it marks everything offline when it starts

    def raise_cursors(self, cursors: Sequence[tuple[str, str, int]], stamp: Collection[str], now_ms: int) -> list[str]:
        self.c.executemany(
            "UPDATE devices SET delivery_cursor = max(delivery_cursor, ?) WHERE device_id = ? AND user_id = ?",
            [(cursor, device_id, user_id) for device_id, user_id, cursor in cursors],
        )
        self.c.executemany(
            "UPDATE devices SET last_seen = ? WHERE device_id = ?", [(now_ms, d) for d, _, _ in cursors if d in stamp]
        )
        return []  # one writer per file: nothing is ever held by another

    def touch(self, device_ids: Sequence[str], user_ids: Sequence[str], now_ms: int) -> None:
        self.c.executemany("UPDATE devices SET last_seen = ? WHERE device_id = ?", [(now_ms, d) for d in device_ids])
        self.c.executemany("UPDATE users SET last_activity = ? WHERE user_id = ?", [(now_ms, u) for u in user_ids])

    # --- pairing
    def drop_codes(self, device_id: str, now_ms: int) -> None:
        self.c.execute("DELETE FROM pairing_codes WHERE device_id = ? OR expires_at <= ?", (device_id, now_ms))

    def insert_code(self, code: str, user_id: str, device_id: str, now_ms: int, expires_ms: int) -> bool:
        cur = self.c.execute(
            "INSERT INTO pairing_codes (code, user_id, device_id, created_at, expires_at) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (code) DO NOTHING",
            (code, user_id, device_id, now_ms, expires_ms),
        )
        return cur.rowcount == 1

    def code(self, code: str) -> tuple[str, int, bool] | None:
        row = self.c.execute(
            "SELECT p.user_id, p.expires_at, p.used FROM pairing_codes p JOIN devices d ON d.device_id = p.device_id"
            " WHERE p.code = ? AND d.revoked_at IS NULL AND d.user_id = p.user_id",
            (code,),
        ).fetchone()
        return None if row is None else (row[0], row[1], bool(row[2]))

    def mark_code_used(self, code: str) -> None:
        self.c.execute("UPDATE pairing_codes SET used = 1 WHERE code = ?", (code,))

    def drop_device_codes(self, device_id: str) -> None:
        self.c.execute("DELETE FROM pairing_codes WHERE device_id = ?", (device_id,))

    def last_device_seq(self, user_id: str, device_id: str) -> int:
        (last,) = self.c.execute(
            "SELECT coalesce(max(device_seq), 0) FROM events WHERE user_id = ? AND device_id = ?", (user_id, device_id)
        ).fetchone()
        return int(last)

    def lock_failures(self) -> None:
        pass  # one writer, one transaction: the check and the charge cannot interleave with another attempt

    def count_failures(self, peer: str, minute_ago_ms: int, hour_ago_ms: int) -> tuple[int, int]:
        return count_failures(self.c, peer, minute_ago_ms, hour_ago_ms)

    def record_failure(self, peer: str, now_ms: int) -> None:
        self.c.execute("INSERT INTO pairing_failures (at, peer) VALUES (?, ?)", (now_ms, peer))

    # --- profiles
    def ensure_profile(self, user_id: str, now_ms: int) -> None:
        self.c.execute(
            "INSERT INTO profiles (user_id, created_at, updated_at) VALUES (?, ?, ?) ON CONFLICT (user_id) DO NOTHING",
            (user_id, now_ms, now_ms),
        )

    def profile(self, user_id: str) -> Profile:
        row = self.c.execute(
            "SELECT p.user_id, p.display_name, p.email, p.avatar_url, p.preferences, p.onboarding_completed,"
            " p.created_at, p.updated_at, coalesce(u.last_activity, p.updated_at), coalesce(u.stored_bytes, 0)"
            " FROM profiles p LEFT JOIN users u ON u.user_id = p.user_id WHERE p.user_id = ?",
            (user_id,),
        ).fetchone()
        return Profile(row[0], row[1], row[2], row[3], json.loads(row[4]), bool(row[5]), row[6], row[7], row[8], row[9])

    def save_profile(self, p: Profile) -> None:
        self.c.execute(
            "UPDATE profiles SET display_name = ?, email = ?, preferences = ?, onboarding_completed = ?, updated_at = ?"
            " WHERE user_id = ?",
            (p.display_name, p.email, json.dumps(p.preferences, separators=(",", ":")), int(p.onboarding_completed),
             p.updated_at, p.user_id),
        )

    # --- audit and signatures
    def add_audit(self, rows: Sequence[AuditRow]) -> None:
        self.c.executemany("INSERT INTO audit_log (at, action, actor, target, peer, detail) VALUES (?, ?, ?, ?, ?, ?)",
                           rows)

    def remember_signature(self, signature: str, expires_ms: int) -> bool:
        cur = self.c.execute(
            "INSERT INTO seen_signatures (signature, expires_at) VALUES (?, ?) ON CONFLICT (signature) DO NOTHING",
            (signature, expires_ms),
        )
        return cur.rowcount == 1

    # --- maintenance
    def mark_deleting(self, user_id: str) -> bool:
        return self.c.execute("UPDATE users SET deleting = 1 WHERE user_id = ?", (user_id,)).rowcount == 1

    def user_event_sizes(self, user_id: str, limit: int) -> Iterable[SizedKey]:
        return self.c.execute(
            "SELECT rowid, payload_size FROM events WHERE user_id = ? ORDER BY server_seq LIMIT ?", (user_id, limit)
        )

    def delete_events(self, keys: Sequence[Any]) -> int:
        if not keys:
            return 0
        return self.c.execute(f"DELETE FROM events WHERE rowid IN ({','.join('?' * len(keys))})", keys).rowcount

    def delete_user_rows(self, user_id: str) -> DeletedCounts:
        events = self.c.execute("DELETE FROM events WHERE user_id = ?", (user_id,)).rowcount
        self.c.execute(
            "DELETE FROM pairing_codes WHERE user_id = ?"
            " OR device_id IN (SELECT device_id FROM devices WHERE user_id = ?)",
            (user_id, user_id),
        )
        devices = self.c.execute("DELETE FROM devices WHERE user_id = ?", (user_id,)).rowcount
        for table in ("streams", "profiles", "users"):
            self.c.execute(f"DELETE FROM {table} WHERE user_id = ?", (user_id,))
        return DeletedCounts(devices, events)

    def expire(self, now_ms: int, audit_before_ms: int, failures_before_ms: int) -> None:
        self.c.execute("DELETE FROM seen_signatures WHERE expires_at < ?", (now_ms,))
        self.c.execute("DELETE FROM audit_log WHERE at < ?", (audit_before_ms,))
        self.c.execute("DELETE FROM pairing_failures WHERE at < ?", (failures_before_ms,))
        self.c.execute("DELETE FROM pairing_codes WHERE expires_at < ?", (now_ms,))

    def expired_event_sizes(
        self, ttl_before_ms: int, created_before_ms: int, now_ms: int, limit: int
    ) -> Iterable[SizedKey]:
        return self.c.execute(
            "SELECT rowid, payload_size FROM events WHERE ttl IS NOT NULL AND ttl > 0 AND ttl < ? UNION ALL"
            " SELECT rowid, payload_size FROM events WHERE created_at < ? AND (ttl IS NULL OR ttl < ?) LIMIT ?",
            (ttl_before_ms, created_before_ms, now_ms, limit),
        )

    def probe(self) -> None:
        self.c.execute("UPDATE meta SET value = value WHERE key = 'schema_version'")


def count_failures(c: sqlite3.Connection, peer: str, minute_ago_ms: int, hour_ago_ms: int) -> tuple[int, int]:
    (everyone,) = c.execute("SELECT count(*) FROM pairing_failures WHERE at > ?", (minute_ago_ms,)).fetchone()
    (mine,) = c.execute(
        "SELECT count(*) FROM pairing_failures WHERE peer = ? AND at > ?", (peer, hour_ago_ms)
    ).fetchone()
    return int(everyone), int(mine)


class SqliteStore(BatchedWrites):
    _writer: BatchWriter

    def __init__(self, config: Config, clock: Clock) -> None:
        self._path = config.sqlite_path()
        self._synchronous = config.storage.sqlite_synchronous.upper()
        self._op_timeout = config.storage.op_timeout
        self._clock = clock
        self.breaker = Breaker()
        self._writer = BatchWriter(
            self._apply_batch,
            batch_size=config.storage.batch_size,
            op_timeout=config.storage.op_timeout,
            clock=clock,
            breaker=self.breaker,
            commit=self._commit,
        )
        self._w: sqlite3.Connection | None = None
        self._min_free = config.storage.min_free_bytes
        self._quota = Quota(config.limits.max_stored_bytes_per_user, config.limits.stored_bytes_per_user_per_minute)
        self._free = 1 << 62
        self._free_checked = -math.inf
        self._pool_send, self._pool_receive = trio.open_memory_channel[sqlite3.Connection](READ_CONNECTIONS)

    # --- errors: the one mapping of SQLite's exceptions ------------------------------------------
    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """SQLite errors become StoreUnavailable, or StorageFull when the disk is full (for /health and the log)."""
        try:
            yield
        except sqlite3.Error as exc:
            code = getattr(exc, "sqlite_errorcode", 0)
            full = code == sqlite3.SQLITE_FULL
            if not full and code & 0xFF == sqlite3.SQLITE_IOERR:
                full = self.free_bytes(fresh=True) < FULL_SLACK  # ENOSPC surfaces as an I/O error on some writes
            if full:
                raise StorageFull(f"{what}: the disk is full") from exc
            raise StoreUnavailable(f"{what}: {exc}") from exc

    # --- lifecycle -------------------------------------------------------------------------------
    def _connect(self, readonly: bool) -> sqlite3.Connection:
        if readonly:
            uri = f"file:{self._path}?mode=ro"
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA query_only = ON")
        else:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA busy_timeout = 5000")
        return conn

    def _open(self) -> None:
        Path(self._path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        new = not Path(self._path).exists()
        self._w = self._connect(readonly=False)
        if new:
            os.chmod(self._path, 0o600)
        migrate(self._w)
        # One process owns the file: nobody is online before we accept connections.
        self._w.execute("UPDATE devices SET is_online = 0, connection_id = NULL WHERE is_online = 1")
        for _ in range(READ_CONNECTIONS):
            self._pool_send.send_nowait(self._connect(readonly=True))

    def _close(self) -> None:
        while True:
            try:
                self._pool_receive.receive_nowait().close()
            except trio.WouldBlock:
                break
        if self._w is not None:
            self._w.close()

    async def run(self, on_commit: CommitHook, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with self._errors(f"cannot open the SQLite database {self._path}"):
            await trio.to_thread.run_sync(self._open)
        try:
            task_status.started()
            await self._writer.run(on_commit)
        finally:
            self._close()

    # --- writes ----------------------------------------------------------------------------------
    def _apply_batch(self, batch: Sequence[Pending[Any]], now_ms: int) -> list[StoredEvent]:
        c = self._w
        assert c is not None
        tx = SqliteTx(c, self._quota)
        stored: list[StoredEvent] = []
        with self._errors("write failed"):
            try:
                c.execute("BEGIN IMMEDIATE")
                for pending in batch:
                    op = pending.op
                    if isinstance(op, AppendOp):
                        # decides before it writes and cannot fail half-way: no savepoint needed
                        pending.result = result = op.run(tx, now_ms)
                        if result.event is not None:
                            stored.append(result.event)
                        continue
                    c.execute("SAVEPOINT op")
                    try:
                        with self._errors(f"store operation {op.name} failed"):
                            pending.result = op.run(tx, now_ms)
                    except StoreUnavailable as exc:
                        c.execute("ROLLBACK TO op")
                        log.error("%s", exc)
                        pending.error = exc
                    c.execute("RELEASE op")
                tx.flush_acks()
            except BaseException:
                if c.in_transaction:  # never leave the write lock held
                    c.execute("ROLLBACK")
                raise
        return stored

    def _commit(self) -> None:
        """COMMIT the batch (with synchronous=full this is the fsync; it runs in a worker thread)."""
        c = self._w
        assert c is not None
        with self._errors("commit failed"):
            try:
                c.execute("COMMIT")
            except sqlite3.Error:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise

    def free_bytes(self, *, fresh: bool = False) -> int:
        """Free space on the database's filesystem (checked at most every FREE_CHECK_SECONDS)."""
        now = time.monotonic()
        if fresh or now - self._free_checked > FREE_CHECK_SECONDS:
            try:
                st = os.statvfs(Path(self._path).parent)
                self._free = st.f_bavail * st.f_frsize
            except OSError:
                self._free = 1 << 62  # unknown: do not refuse on a guess
            self._free_checked = now
        return self._free

    def space_low(self) -> bool:
        """Free disk below ``[storage] min_free_bytes``: new events are refused (STORAGE_FULL)."""
        return self._min_free > 0 and self.free_bytes() < self._min_free

    # --- reads -----------------------------------------------------------------------------------
    async def _read(self, fn: Callable[[sqlite3.Connection], T], *, probe: bool = False) -> T:
        if not probe:  # a probe (health) looks for itself, whatever the circuit breaker says
            self.breaker.check()
        conn = await self._pool_receive.receive()
        started = trio.current_time()
        done = False
        try:
            with trio.move_on_after(self._op_timeout), self._errors("read failed"):
                try:
                    result = await trio.to_thread.run_sync(fn, conn, abandon_on_cancel=True)
                except sqlite3.Error:
                    done = True
                    self.breaker.failed()
                    raise
                done = True
                self._writer.observe("read", trio.current_time() - started)
                return result
            raise StoreUnavailable("SQLite read timed out")
        finally:
            # an abandoned thread may still use ``conn``: put a fresh connection in its place
            self._pool_send.send_nowait(conn if done else self._connect(readonly=True))

    async def _rows(self, make: Callable[..., R], sql: str, params: Sequence[Any] = ()) -> list[R]:
        return await self._read(lambda c: [make(*row) for row in c.execute(sql, params)])

    async def _count(self, sql: str, params: Sequence[Any]) -> int:
        return await self._read(lambda c: int(row[0]) if (row := c.execute(sql, params).fetchone()) else 0)

    async def audit_log(self, limit: int, action: str | None) -> list[AuditRecord]:
        return await self._rows(
            AuditRecord,
            "SELECT at, action, actor, target, peer, detail FROM audit_log WHERE (? IS NULL OR action = ?)"
            " ORDER BY id DESC LIMIT ?",
            (action, action, limit),
        )

    async def inactive_users(self, before_ms: int, limit: int) -> list[str]:
        return await self._rows(
            str,
            "SELECT u.user_id FROM users u WHERE coalesce(u.last_activity, u.created_at) < ? AND NOT EXISTS"
            " (SELECT 1 FROM devices d WHERE d.user_id = u.user_id AND d.revoked_at IS NULL) LIMIT ?",
            (before_ms, limit),
        )

    async def deleting_users(self) -> list[str]:
        return await self._rows(str, "SELECT user_id FROM users WHERE deleting = 1")

    async def head_seq(self, user_id: str) -> int:
        return await self._count("SELECT server_seq FROM users WHERE user_id = ?", (user_id,))

    async def heads(self, user_ids: Sequence[str]) -> dict[str, int]:
        marks = ",".join("?" * len(user_ids))
        sql = f"SELECT user_id, server_seq FROM users WHERE user_id IN ({marks})"
        return dict(await self._rows(lambda u, seq: (u, int(seq)), sql, tuple(user_ids))) if user_ids else {}

    async def pairing_failures(self, peer: str, minute_ago_ms: int, hour_ago_ms: int) -> tuple[int, int]:
        return await self._read(lambda c: count_failures(c, peer, minute_ago_ms, hour_ago_ms))

    async def count_pending(self, user_id: str, device_id: str, after: int, upto: int, now_ms: int) -> int:
        return await self._count(
            "SELECT count(*) FROM events WHERE user_id = ? AND server_seq > ? AND server_seq <= ?"
            " AND device_id <> ? AND (ttl IS NULL OR ttl > ?)",
            (user_id, after, upto, device_id, now_ms),
        )

    async def read_events(
        self, user_id: str, after: int, upto: int, *, exclude_device: str, now_ms: int, limit: int, max_bytes: int
    ) -> Page:
        sql = (f"SELECT {_EVENT_COLUMNS} FROM events WHERE user_id = ? AND server_seq > ? AND server_seq <= ?"
               " AND device_id <> ? AND (ttl IS NULL OR ttl > ?) ORDER BY server_seq LIMIT ?")
        params = (user_id, after, upto, exclude_device, now_ms, limit + 1)
        return await self._read(lambda c: paginate(c.execute(sql, params), limit, max_bytes))

    async def get_device(self, device_id: str) -> Device | None:
        found = await self._rows(_device, f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = ?", (device_id,))
        return found[0] if found else None

    async def list_devices(self, user_id: str) -> list[Device]:
        sql = f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE user_id = ? AND revoked_at IS NULL"
        return await self._rows(_device, sql, (user_id,))

    async def device_states(self, device_ids: Sequence[str]) -> dict[str, DeviceState]:
        if not device_ids:
            return {}
        marks = ",".join("?" * len(device_ids))
        sql = ("SELECT d.device_id, d.user_id, d.revoked_at IS NOT NULL, d.revoke_reason, u.deleting, d.connection_id"
               f" FROM devices d JOIN users u ON u.user_id = d.user_id WHERE d.device_id IN ({marks})")

        def state(device_id: str, user_id: str, revoked: int, reason: str | None, deleting: int,
                  connection_id: str | None) -> DeviceState:
            return DeviceState(device_id, user_id, bool(revoked), reason, bool(deleting), connection_id)

        return {s.device_id: s for s in await self._rows(state, sql, tuple(device_ids))}

    async def list_users(self, limit: int) -> list[UserSummary]:
        sql = (
            "SELECT u.user_id, u.created_at, u.last_activity,"
            " (SELECT count(*) FROM devices d WHERE d.user_id = u.user_id AND d.revoked_at IS NULL),"
            " (SELECT count(*) FROM devices d WHERE d.user_id = u.user_id AND d.revoked_at IS NOT NULL),"
            " u.stored_bytes, u.deleting FROM users u ORDER BY coalesce(u.last_activity, u.created_at) DESC LIMIT ?"
        )
        def summary(user_id: str, created: int, active: int | None, live: int, revoked: int, stored: int,
                    deleting: int) -> UserSummary:
            return UserSummary(user_id, created, active, live, revoked, stored, bool(deleting))

        return await self._rows(summary, sql, (limit,))

    async def all_devices(self, user_id: str | None, limit: int) -> list[Device]:
        sql = (f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE (? IS NULL OR user_id = ?)"
               " ORDER BY registered_at DESC LIMIT ?")
        return await self._rows(_device, sql, (user_id, user_id, limit))

    async def revoked_devices(self, user_id: str | None, limit: int) -> list[RevokedDevice]:
        return await self._rows(
            RevokedDevice,
            "SELECT device_id, user_id, revoked_at, revoke_reason FROM devices WHERE revoked_at IS NOT NULL"
            " AND (? IS NULL OR user_id = ?) ORDER BY revoked_at DESC LIMIT ?",
            (user_id, user_id, limit),
        )

    async def file_events(self, user_id: str, limit: int, offset: int, now_ms: int) -> tuple[list[StoredEvent], int]:
        where = "WHERE user_id = ? AND type = 'file:metadata' AND (ttl IS NULL OR ttl > ?)"

        def q(c: sqlite3.Connection) -> tuple[list[StoredEvent], int]:
            (total,) = c.execute(f"SELECT count(*) FROM events {where}", (user_id, now_ms)).fetchone()
            rows = c.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events {where} ORDER BY server_seq DESC LIMIT ? OFFSET ?",
                (user_id, now_ms, limit, offset),
            )
            return [StoredEvent(*r) for r in rows], int(total)

        return await self._read(q)

    def stats(self) -> dict[str, float]:
        return {
            "pool_size": READ_CONNECTIONS + 1,
            "pool_idle": self._pool_receive.statistics().current_buffer_used,  # read connections not in use
            "pool_waiting": self._pool_receive.statistics().tasks_waiting_receive,
            "writer_queue": self._writer.queued,
            "breaker_open": float(self.breaker.is_open),
            "audit_dropped": float(self._writer.audit_dropped),
        }

    async def ping(self) -> None:
        await self._read(lambda c: c.execute("SELECT 1").fetchone(), probe=True)


def stored_row(e: StoredEvent) -> tuple[Any, ...]:
    return (
        e.user_id, e.server_seq, e.event_id, e.device_id, e.device_seq, e.stream_id, e.stream_seq,
        e.type, e.encrypted_payload, e.payload_size, e.ttl, e.created_at,
    )


def split_script(script: str) -> list[str]:
    """The statements of a schema script (complete per sqlite3.complete_statement, triggers included)."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        if not current and (not line.strip() or line.lstrip().startswith("--")):
            continue
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    return statements


def migrate(c: sqlite3.Connection) -> None:
    """Create or upgrade the schema; refuse a database written by a newer release."""
    has_meta = c.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
    version = 0
    if has_meta:
        row = c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        version = int(row[0]) if row else 0
    if version > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(
            f"the database has schema version {version}, newer than this release ({SCHEMA_VERSION});"
            " upgrade pocketbridge"
        )
    if version < SCHEMA_VERSION:
        script = resources.files(__package__).joinpath("sqlite_schema.sql").read_text()
        c.execute("BEGIN IMMEDIATE")
        try:
            if has_meta:  # an existing database: its upgrade steps, then whatever the script adds
                for step in range(max(version, 1) + 1, SCHEMA_VERSION + 1):
                    for sql in UPGRADES[step]:
                        c.execute(sql)
            for statement in split_script(script):
                c.execute(statement)
            c.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(SCHEMA_VERSION),),
            )
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
