"""The embedded store: one SQLite file in WAL mode.

All writes go through the batching writer on one connection: its statements run on the event loop
(they take microseconds) and only the COMMIT, the fsync, runs in a worker thread; reads use
a small pool of read-only connections. The schema carries a version so later releases can migrate it.
"""

from __future__ import annotations

import json
import math
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import attrs
import trio

from ..clock import Clock
from ..config import Config
from ..errors import StorageFull, StoreUnavailable
from ..protocol.events import NewEvent
from ..protocol.handshake import dedupe_device_name
from . import (
    Admission,
    Admit,
    AdmitRequest,
    AuditRecord,
    CommitHook,
    DeletedCounts,
    Device,
    EventResult,
    Outcome,
    Page,
    Pairing,
    PairingResult,
    Profile,
    Rename,
    RevokedDevice,
    StoredEvent,
    Unrevoke,
    new_pairing_code,
    paginate,
    take_chunk,
    CHUNK_ROWS,
    Quota,
)
from .writer import BatchedWrites, BatchWriter, Breaker, Op

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

_EVENT_COLUMNS = (
    "user_id, server_seq, event_id, device_id, device_seq, stream_id, stream_seq, type, "
    "encrypted_payload, payload_size, ttl, created_at"
)
_DEVICE_COLUMNS = (
    "device_id, user_id, bound_key, device_name, device_type, registered_at, last_seen, is_online, "
    "last_ack_device_seq, delivery_cursor, revoked_at"
)


def _device(row: Sequence[Any]) -> Device:
    return Device(*row[:7], bool(row[7]), *row[8:])


class SqliteStore(BatchedWrites):
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

    # --- lifecycle -------------------------------------------------------------------------------
    def _connect(self, readonly: bool) -> sqlite3.Connection:
        if readonly:
            conn = sqlite3.connect(f"file:{self._path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
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
        try:
            await trio.to_thread.run_sync(self._open)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open the SQLite database {self._path}: {exc}") from exc
        try:
            task_status.started()
            await self._writer.run(on_commit)
        finally:
            self._close()

    # --- writes ----------------------------------------------------------------------------------
    async def audit_log(self, limit: int, action: str | None) -> list[AuditRecord]:
        def q(c: sqlite3.Connection) -> list[AuditRecord]:
            rows = c.execute(
                "SELECT at, action, actor, target, peer, detail FROM audit_log WHERE (? IS NULL OR action = ?)"
                " ORDER BY id DESC LIMIT ?",
                (action, action, limit),
            )
            return [AuditRecord(*r) for r in rows]

        return await self._read(q)

    def _apply_batch(self, ops: Sequence[Op], now_ms: int) -> list[StoredEvent]:
        c = self._w
        assert c is not None
        stored: list[StoredEvent] = []
        try:
            c.execute("BEGIN IMMEDIATE")
            for op in ops:
                if op.kind == "event":
                    # decides before it writes and cannot fail half-way: no savepoint needed
                    op.result = self._w_event(c, now_ms, op.args[0])
                    if op.result.outcome is Outcome.STORED:
                        stored.append(op.result.event)
                    continue
                c.execute("SAVEPOINT op")
                try:
                    op.result = getattr(self, f"_w_{op.kind}")(c, now_ms, *op.args)
                except sqlite3.Error as exc:
                    c.execute("ROLLBACK TO op")
                    log.error("store operation %s failed: %s", op.kind, type(exc).__name__)
                    op.error = StoreUnavailable(f"store operation {op.kind} failed")
                c.execute("RELEASE op")
            c.executemany(  # one statement per batch instead of one per event
                "UPDATE devices SET last_ack_device_seq = max(last_ack_device_seq, ?) WHERE device_id = ?",
                [(e.device_seq, e.device_id) for e in stored],
            )
        except sqlite3.Error as exc:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise self._write_error("write", exc) from exc
        except BaseException:
            if c.in_transaction:  # never leave the write lock held
                c.execute("ROLLBACK")
            raise
        return stored

    def _commit(self) -> None:
        """COMMIT the batch (with synchronous=full this is the fsync; it runs in a worker thread)."""
        c = self._w
        assert c is not None
        try:
            c.execute("COMMIT")
        except sqlite3.Error as exc:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise self._write_error("commit", exc) from exc

    def _write_error(self, what: str, exc: sqlite3.Error) -> StoreUnavailable:
        """The one mapping of SQLite write errors: a full disk is told apart (for /health and the log)."""
        full = getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
        if not full and getattr(exc, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_IOERR:
            full = self.free_bytes(fresh=True) < FULL_SLACK  # ENOSPC surfaces as an I/O error on some writes
        if full:
            return StorageFull(f"{what} failed: the disk is full")
        return StoreUnavailable(f"{what} failed: {type(exc).__name__}")

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

    def _w_admit(self, c: sqlite3.Connection, now_ms: int, req: AdmitRequest) -> Admission:
        row = c.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = ?", (req.device_id,)).fetchone()
        owner = req.key if row is None else row[1]
        deleting = c.execute("SELECT deleting FROM users WHERE user_id = ?", (owner,)).fetchone()
        if deleting is not None and deleting[0]:
            return Admission(Admit.DELETING)
        if row is not None:
            device = _device(row)
            if device.bound_key != req.key:
                return Admission(Admit.KEY_MISMATCH)
            if device.revoked_at is not None:
                return Admission(Admit.REVOKED)
            name = device.device_name
            if not name and req.device_name:
                name = dedupe_device_name(req.device_name, self._taken_names(c, device.user_id))
            dtype = req.device_type or device.device_type
            c.execute(
                "UPDATE devices SET device_name = ?, device_type = ? WHERE device_id = ?",
                (name, dtype, device.device_id),
            )
            return Admission(Admit.OK, attrs.evolve(device, device_name=name, device_type=dtype))
        if self._device_count(c, req.key) >= req.max_devices:
            return Admission(Admit.LIMIT)
        c.execute("INSERT OR IGNORE INTO users (user_id, created_at) VALUES (?, ?)", (req.key, now_ms))
        name = dedupe_device_name(req.device_name, self._taken_names(c, req.key)) if req.device_name else None
        c.execute(
            "INSERT INTO devices (device_id, user_id, bound_key, device_name, device_type, registered_at, last_seen)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (req.device_id, req.key, req.key, name, req.device_type, now_ms, now_ms),
        )
        return Admission(
            Admit.OK,
            Device(req.device_id, req.key, req.key, name, req.device_type, now_ms, now_ms, False, 0, 0, None), created=True
        )

    @staticmethod
    def _taken_names(c: sqlite3.Connection, user_id: str) -> set[str]:
        rows = c.execute(
            "SELECT device_name FROM devices WHERE user_id = ? AND revoked_at IS NULL AND device_name IS NOT NULL",
            (user_id,),
        )
        return {r[0] for r in rows}

    def _w_event(self, c: sqlite3.Connection, now_ms: int, ev: NewEvent) -> EventResult:
        dev = c.execute(
            "SELECT d.user_id, d.revoked_at, u.deleting, u.stored_bytes, u.quota_tokens, u.quota_at"
            " FROM devices d JOIN users u ON u.user_id = d.user_id WHERE d.device_id = ?",
            (ev.device_id,),
        ).fetchone()
        if dev is None or dev[0] != ev.user_id or dev[1] is not None:
            return EventResult(Outcome.REVOKED)
        if dev[2]:
            return EventResult(Outcome.DELETING)
        # §5.4: the same (user, device, device_seq) decides first; else the same event_id is a duplicate
        known = c.execute(
            "SELECT event_id, device_id = ? AND device_seq = ? FROM events WHERE user_id = ? AND"
            " ((device_id = ? AND device_seq = ?) OR event_id = ?) ORDER BY 2 DESC LIMIT 1",
            (ev.device_id, ev.device_seq, ev.user_id, ev.device_id, ev.device_seq, ev.event_id),
        ).fetchone()
        if known is not None:
            same_seq, conflict = known[1], known[0] != ev.event_id
            return EventResult(Outcome.CONFLICT if same_seq and conflict else Outcome.DUPLICATE)
        bucket = self._quota.charge(dev[3], dev[4], dev[5], ev.payload_size, now_ms)
        if bucket is None:
            return EventResult(Outcome.QUOTA_EXCEEDED)
        (server_seq,) = c.execute(
            "UPDATE users SET server_seq = server_seq + 1, last_activity = ?, stored_bytes = stored_bytes + ?,"
            " quota_tokens = ?, quota_at = ? WHERE user_id = ? RETURNING server_seq",
            (now_ms, ev.payload_size, *bucket, ev.user_id),
        ).fetchone()
        (stream_seq,) = c.execute(
            "INSERT INTO streams (user_id, stream_id, last_seq) VALUES (?, ?, 1)"
            " ON CONFLICT (user_id, stream_id) DO UPDATE SET last_seq = last_seq + 1 RETURNING last_seq",
            (ev.user_id, ev.stream_id),
        ).fetchone()
        stored = StoredEvent(
            ev.user_id, server_seq, ev.event_id, ev.device_id, ev.device_seq, ev.stream_id, stream_seq,
            ev.type, ev.encrypted_payload, ev.payload_size, ev.ttl, now_ms,
        )
        c.execute(f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", stored_row(stored))
        return EventResult(Outcome.STORED, stored)

    def _w_presence(self, c: sqlite3.Connection, now_ms: int, device_id: str, conn_id: str, online: bool) -> int:
        if online:
            c.execute(
                "UPDATE devices SET is_online = 1, connection_id = ?, last_seen = ? WHERE device_id = ?",
                (conn_id, now_ms, device_id),
            )
        else:
            c.execute(
                "UPDATE devices SET is_online = 0, connection_id = NULL, last_seen = ?"
                " WHERE device_id = ? AND connection_id = ?",
                (now_ms, device_id, conn_id),
            )
        row = c.execute(
            "SELECT u.server_seq FROM devices d JOIN users u ON u.user_id = d.user_id WHERE d.device_id = ?",
            (device_id,),
        ).fetchone()
        return int(row[0]) if row else 0

    def _w_coalesced(
        self,
        c: sqlite3.Connection,
        now_ms: int,
        cursors: dict[str, tuple[str, int]],
        seen: dict[str, str],
        audit: list[tuple[Any, ...]],
    ) -> None:
        c.executemany(
            "INSERT INTO audit_log (at, action, actor, target, peer, detail) VALUES (?, ?, ?, ?, ?, ?)", audit
        )
        c.executemany(
            "UPDATE devices SET delivery_cursor = max(delivery_cursor, ?) WHERE device_id = ? AND user_id = ?",
            [(cursor, device_id, user_id) for device_id, (user_id, cursor) in cursors.items()],
        )
        c.executemany("UPDATE devices SET last_seen = ? WHERE device_id = ?", [(now_ms, d) for d in seen])
        c.executemany(
            "UPDATE users SET last_activity = ? WHERE user_id = ?", [(now_ms, u) for u in set(seen.values())]
        )

    def _w_pairing_code(
        self, c: sqlite3.Connection, now_ms: int, user_id: str, device_id: str, ttl_ms: int, max_devices: int
    ) -> tuple[str, int] | None:
        if self._device_count(c, user_id) >= max_devices:
            return None
        c.execute("DELETE FROM pairing_codes WHERE device_id = ? OR expires_at <= ?", (device_id, now_ms))
        expires_at = now_ms + ttl_ms
        while True:
            code = new_pairing_code()
            cur = c.execute(
                "INSERT INTO pairing_codes (code, user_id, device_id, created_at, expires_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (code) DO NOTHING",
                (code, user_id, device_id, now_ms, expires_at),
            )
            if cur.rowcount == 1:
                return code, expires_at

    def _w_complete_pairing(
        self, c: sqlite3.Connection, now_ms: int, code: str, device_id: str, max_devices: int, peer: str,
        failure_limits: tuple[int, int],
    ) -> PairingResult:
        # one writer, one transaction: the check and the charge below cannot interleave with another attempt
        per_peer, per_minute = failure_limits
        if per_peer or per_minute:
            (everyone,) = c.execute("SELECT count(*) FROM pairing_failures WHERE at > ?", (now_ms - 60_000,)).fetchone()
            (mine,) = c.execute(
                "SELECT count(*) FROM pairing_failures WHERE peer = ? AND at > ?", (peer, now_ms - 3_600_000)
            ).fetchone()
            if per_peer and mine >= per_peer:
                return PairingResult(Pairing.LOCKED_PEER)
            if per_minute and everyone >= per_minute:
                return PairingResult(Pairing.LOCKED_DEPLOYMENT)
        result = self._pair(c, now_ms, code, device_id, max_devices)
        if result.outcome is Pairing.NOT_FOUND:
            c.execute("INSERT INTO pairing_failures (at, peer) VALUES (?, ?)", (now_ms, peer))
        return result

    def _pair(self, c: sqlite3.Connection, now_ms: int, code: str, device_id: str, max_devices: int) -> PairingResult:
        row = c.execute(
            "SELECT p.user_id, p.expires_at, p.used FROM pairing_codes p JOIN devices d ON d.device_id = p.device_id"
            " WHERE p.code = ? AND d.revoked_at IS NULL AND d.user_id = p.user_id",
            (code,),
        ).fetchone()
        if row is None or row[1] <= now_ms:
            return PairingResult(Pairing.NOT_FOUND)
        if row[2]:
            return PairingResult(Pairing.USED)
        user_a = row[0]
        joiner = _device(c.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = ?", (device_id,)).fetchone())
        if joiner.user_id == user_a:
            c.execute("UPDATE pairing_codes SET used = 1 WHERE code = ?", (code,))
            return PairingResult(Pairing.SAME_ACCOUNT, user_a, joiner.last_ack_device_seq, joiner)
        if self._device_count(c, user_a) >= max_devices:
            return PairingResult(Pairing.LIMIT, user_a)
        c.execute("UPDATE pairing_codes SET used = 1 WHERE code = ?", (code,))
        name = joiner.device_name and dedupe_device_name(joiner.device_name, self._taken_names(c, user_a))
        (last_ack,) = c.execute(
            "SELECT coalesce(max(device_seq), 0) FROM events WHERE user_id = ? AND device_id = ?", (user_a, device_id)
        ).fetchone()
        c.execute(
            "UPDATE devices SET user_id = ?, device_name = ?, last_ack_device_seq = ?, delivery_cursor = 0"
            " WHERE device_id = ?",
            (user_a, name, last_ack, device_id),
        )
        c.execute("DELETE FROM pairing_codes WHERE device_id = ?", (device_id,))
        moved = attrs.evolve(joiner, user_id=user_a, device_name=name, last_ack_device_seq=last_ack, delivery_cursor=0)
        return PairingResult(Pairing.OK, user_a, last_ack, moved)

    def _w_revoke(
        self, c: sqlite3.Connection, now_ms: int, device_id: str, reason: str, user_id: str | None
    ) -> Device | None:
        row = c.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = ?", (device_id,)).fetchone()
        if row is None or (user_id is not None and row[1] != user_id):
            return None
        c.execute(
            "UPDATE devices SET revoked_at = coalesce(revoked_at, ?), revoke_reason = coalesce(revoke_reason, ?),"
            " is_online = 0, connection_id = NULL WHERE device_id = ?",
            (now_ms, reason, device_id),
        )
        c.execute("DELETE FROM pairing_codes WHERE device_id = ?", (device_id,))
        return _device(row)

    def _w_probe(self, c: sqlite3.Connection, now_ms: int) -> None:
        c.execute("UPDATE meta SET value = value WHERE key = 'schema_version'")

    def _w_mark_deleting(self, c: sqlite3.Connection, now_ms: int, user_id: str) -> bool:
        return c.execute("UPDATE users SET deleting = 1 WHERE user_id = ?", (user_id,)).rowcount == 1

    def _w_delete_user_events(self, c: sqlite3.Connection, now_ms: int, user_id: str) -> int:
        rows = c.execute(
            "SELECT rowid, payload_size FROM events WHERE user_id = ? ORDER BY server_seq LIMIT ?", (user_id, CHUNK_ROWS)
        )
        return self._delete_rowids(c, take_chunk(rows))

    @staticmethod
    def _delete_rowids(c: sqlite3.Connection, rowids: list[int]) -> int:
        if not rowids:
            return 0
        return c.execute(f"DELETE FROM events WHERE rowid IN ({','.join('?' * len(rowids))})", rowids).rowcount

    def _w_delete_user(self, c: sqlite3.Connection, now_ms: int, user_id: str) -> DeletedCounts:
        events = c.execute("DELETE FROM events WHERE user_id = ?", (user_id,)).rowcount
        c.execute(
            "DELETE FROM pairing_codes WHERE user_id = ?"
            " OR device_id IN (SELECT device_id FROM devices WHERE user_id = ?)",
            (user_id, user_id),
        )
        devices = c.execute("DELETE FROM devices WHERE user_id = ?", (user_id,)).rowcount
        c.execute("DELETE FROM streams WHERE user_id = ?", (user_id,))
        c.execute("DELETE FROM profiles WHERE user_id = ?", (user_id,))
        c.execute("DELETE FROM users WHERE user_id = ?", (user_id,))
        return DeletedCounts(devices, events)

    def _w_purge(
        self, c: sqlite3.Connection, now_ms: int, retention_ms: int, ttl_grace_ms: int, limit: int, audit_ms: int
    ) -> int:
        cutoff = now_ms - retention_ms
        c.execute("DELETE FROM seen_signatures WHERE expires_at < ?", (now_ms,))
        c.execute("DELETE FROM audit_log WHERE at < ?", (now_ms - audit_ms,))
        c.execute("DELETE FROM pairing_failures WHERE at < ?", (now_ms - 3_600_000,))
        c.execute("DELETE FROM pairing_codes WHERE expires_at < ?", (now_ms,))
        rows = c.execute(
            "SELECT rowid, payload_size FROM events WHERE ttl IS NOT NULL AND ttl > 0 AND ttl < ?"
            " UNION ALL SELECT rowid, payload_size FROM events WHERE created_at < ? AND (ttl IS NULL OR ttl < ?) LIMIT ?",
            (now_ms - ttl_grace_ms, cutoff, now_ms, limit),
        )
        return self._delete_rowids(c, sorted(set(take_chunk(rows))))

    def _w_rename(self, c: sqlite3.Connection, now_ms: int, user_id: str, device_id: str, name: str) -> Rename:
        row = c.execute(
            "SELECT device_name FROM devices WHERE device_id = ? AND user_id = ? AND revoked_at IS NULL",
            (device_id, user_id),
        ).fetchone()
        if row is None:
            return Rename.NOT_FOUND
        if row[0] != name and name in self._taken_names(c, user_id):
            return Rename.TAKEN
        c.execute("UPDATE devices SET device_name = ? WHERE device_id = ?", (name, device_id))
        return Rename.OK

    def _w_unrevoke(self, c: sqlite3.Connection, now_ms: int, device_id: str, max_devices: int) -> Unrevoke:
        row = c.execute("SELECT user_id, revoked_at, device_name FROM devices WHERE device_id = ?", (device_id,)).fetchone()
        if row is None:
            return Unrevoke.NOT_FOUND
        if row[1] is None:
            return Unrevoke.OK
        if self._device_count(c, row[0]) >= max_devices:
            return Unrevoke.LIMIT
        name = row[2] and dedupe_device_name(row[2], self._taken_names(c, row[0]))
        c.execute(
            "UPDATE devices SET revoked_at = NULL, revoke_reason = NULL, device_name = ? WHERE device_id = ?",
            (name, device_id),
        )
        return Unrevoke.OK

    def _profile(self, c: sqlite3.Connection, now_ms: int, user_id: str) -> Profile:
        c.execute(
            "INSERT INTO profiles (user_id, created_at, updated_at) VALUES (?, ?, ?) ON CONFLICT (user_id) DO NOTHING",
            (user_id, now_ms, now_ms),
        )
        row = c.execute(
            "SELECT p.user_id, p.display_name, p.email, p.avatar_url, p.preferences, p.onboarding_completed,"
            " p.created_at, p.updated_at, coalesce(u.last_activity, p.updated_at), coalesce(u.stored_bytes, 0)"
            " FROM profiles p LEFT JOIN users u ON u.user_id = p.user_id WHERE p.user_id = ?",
            (user_id,),
        ).fetchone()
        return Profile(row[0], row[1], row[2], row[3], json.loads(row[4]), bool(row[5]), row[6], row[7], row[8], row[9])

    def _w_get_profile(self, c: sqlite3.Connection, now_ms: int, user_id: str) -> Profile:
        return self._profile(c, now_ms, user_id)

    def _w_update_profile(self, c: sqlite3.Connection, now_ms: int, user_id: str, changes: dict[str, Any]) -> Profile:
        current = self._profile(c, now_ms, user_id)
        preferences = {**current.preferences, **changes.get("preferences", {})}
        c.execute(
            "UPDATE profiles SET display_name = ?, email = ?, preferences = ?, onboarding_completed = ?, updated_at = ?"
            " WHERE user_id = ?",
            (
                changes.get("display_name", current.display_name),
                changes.get("email", current.email),
                json.dumps(preferences, separators=(",", ":")),
                int(changes.get("onboarding_completed", current.onboarding_completed)),
                now_ms,
                user_id,
            ),
        )
        return self._profile(c, now_ms, user_id)

    def _w_signature(self, c: sqlite3.Connection, now_ms: int, signature: str, expires_ms: int) -> bool:
        cur = c.execute(
            "INSERT INTO seen_signatures (signature, expires_at) VALUES (?, ?) ON CONFLICT (signature) DO NOTHING",
            (signature, expires_ms),
        )
        return cur.rowcount == 1

    @staticmethod
    def _device_count(c: sqlite3.Connection, user_id: str) -> int:
        (count,) = c.execute(
            "SELECT count(*) FROM devices WHERE user_id = ? AND revoked_at IS NULL", (user_id,)
        ).fetchone()
        return int(count)

    # --- reads -----------------------------------------------------------------------------------
    async def _read(self, fn: Callable[[sqlite3.Connection], T], *, probe: bool = False) -> T:
        if not probe:  # a probe (health) looks for itself, whatever the circuit breaker says
            self.breaker.check()
        conn = await self._pool_receive.receive()
        started = trio.current_time()
        done = False
        try:
            with trio.move_on_after(self._op_timeout):
                result = await trio.to_thread.run_sync(fn, conn, abandon_on_cancel=True)
                done = True
                self._writer.observe("read", trio.current_time() - started)
                return result
            raise StoreUnavailable("SQLite read timed out")
        except sqlite3.Error as exc:
            done = True
            self.breaker.failed()
            raise StoreUnavailable(f"read failed: {type(exc).__name__}") from exc
        finally:
            # an abandoned thread may still use ``conn``: put a fresh connection in its place
            self._pool_send.send_nowait(conn if done else self._connect(readonly=True))

    async def inactive_users(self, before_ms: int, limit: int) -> list[str]:
        def q(c: sqlite3.Connection) -> list[str]:
            rows = c.execute(
                "SELECT u.user_id FROM users u WHERE coalesce(u.last_activity, u.created_at) < ? AND NOT EXISTS"
                " (SELECT 1 FROM devices d WHERE d.user_id = u.user_id AND d.revoked_at IS NULL) LIMIT ?",
                (before_ms, limit),
            )
            return [r[0] for r in rows]

        return await self._read(q)

    async def deleting_users(self) -> list[str]:
        return await self._read(lambda c: [r[0] for r in c.execute("SELECT user_id FROM users WHERE deleting = 1")])

    async def head_seq(self, user_id: str) -> int:
        def q(c: sqlite3.Connection) -> int:
            row = c.execute("SELECT server_seq FROM users WHERE user_id = ?", (user_id,)).fetchone()
            return int(row[0]) if row else 0

        return await self._read(q)

    async def heads(self, user_ids: Sequence[str]) -> dict[str, int]:
        def q(c: sqlite3.Connection) -> dict[str, int]:
            marks = ",".join("?" * len(user_ids))
            rows = c.execute(f"SELECT user_id, server_seq FROM users WHERE user_id IN ({marks})", tuple(user_ids))
            return {r[0]: int(r[1]) for r in rows}

        return await self._read(q) if user_ids else {}

    async def beat(self, instance_id: str, stale_after_ms: int) -> int:
        return 0  # one process owns the file; it marks everything offline when it starts

    async def pairing_failures(self, peer: str, minute_ago_ms: int, hour_ago_ms: int) -> tuple[int, int]:
        def q(c: sqlite3.Connection) -> tuple[int, int]:
            (everyone,) = c.execute("SELECT count(*) FROM pairing_failures WHERE at > ?", (minute_ago_ms,)).fetchone()
            (mine,) = c.execute(
                "SELECT count(*) FROM pairing_failures WHERE peer = ? AND at > ?", (peer, hour_ago_ms)
            ).fetchone()
            return int(everyone), int(mine)

        return await self._read(q)

    async def count_pending(self, user_id: str, device_id: str, after: int, upto: int, now_ms: int) -> int:
        def q(c: sqlite3.Connection) -> int:
            (n,) = c.execute(
                "SELECT count(*) FROM events WHERE user_id = ? AND server_seq > ? AND server_seq <= ?"
                " AND device_id <> ? AND (ttl IS NULL OR ttl > ?)",
                (user_id, after, upto, device_id, now_ms),
            ).fetchone()
            return int(n)

        return await self._read(q)

    async def read_events(
        self, user_id: str, after: int, upto: int, *, exclude_device: str, now_ms: int, limit: int, max_bytes: int
    ) -> Page:
        def q(c: sqlite3.Connection) -> Page:
            cur = c.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE user_id = ? AND server_seq > ? AND server_seq <= ?"
                " AND device_id <> ? AND (ttl IS NULL OR ttl > ?) ORDER BY server_seq LIMIT ?",
                (user_id, after, upto, exclude_device, now_ms, limit + 1),
            )
            return paginate(cur, limit, max_bytes)

        return await self._read(q)

    async def get_device(self, device_id: str) -> Device | None:
        def q(c: sqlite3.Connection) -> Device | None:
            row = c.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = ?", (device_id,)).fetchone()
            return _device(row) if row else None

        return await self._read(q)

    async def list_devices(self, user_id: str) -> list[Device]:
        def q(c: sqlite3.Connection) -> list[Device]:
            rows = c.execute(
                f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE user_id = ? AND revoked_at IS NULL", (user_id,)
            )
            return [_device(r) for r in rows]

        return await self._read(q)

    async def revoked_devices(self, user_id: str | None, limit: int) -> list[RevokedDevice]:
        def q(c: sqlite3.Connection) -> list[RevokedDevice]:
            rows = c.execute(
                "SELECT device_id, user_id, revoked_at, revoke_reason FROM devices WHERE revoked_at IS NOT NULL"
                " AND (? IS NULL OR user_id = ?) ORDER BY revoked_at DESC LIMIT ?",
                (user_id, user_id, limit),
            )
            return [RevokedDevice(*r) for r in rows]

        return await self._read(q)

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
            f"the database has schema version {version}, newer than this release ({SCHEMA_VERSION}); upgrade pocketbridge"
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
