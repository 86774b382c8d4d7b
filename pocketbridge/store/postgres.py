"""The scale-out store: PostgreSQL (source of truth for every instance).

psycopg 3 is synchronous here: each call runs in a worker thread from a pool-sized
``CapacityLimiter``, so at most ``pool_size`` threads ever wait on the pool. A cancelled trio task
abandons its thread and cancels the query on the server (``cancel_safe``); every statement is also
bounded by ``statement_timeout``. Writes share the batching writer of the embedded store; a batch's
events go to the server pipelined, one ``pb_append_event`` call each. The decisions are
:mod:`pocketbridge.store.rules`; this module holds their rows and locks (:class:`PgTx`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from importlib import resources
from typing import Any, TypeVar

import psycopg
import trio
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

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
    Outcome,
    Page,
    Profile,
    RevokedDevice,
    StoredEvent,
    UserSummary,
    paginate,
)
from .ops import ABANDONED, AppendOp, CoalescedOp
from .rules import SizedKey
from .writer import BatchedWrites, BatchWriter, Breaker, Pending

log = logging.getLogger("pocketbridge.store")

SCHEMA_VERSION = 2
POOL_WAIT = 3.0  # seconds to wait for a pooled connection before the call counts as a failure
MIGRATION_LOCK = 0x706F636B  # advisory lock key held while migrating
PAIRING_LOCK = 0x70627061  # advisory transaction lock serializing pairing attempts (failure limits)
T = TypeVar("T")
R = TypeVar("R")

_EVENT_COLUMNS = (
    "user_id, server_seq, event_id, device_id, device_seq, stream_id, stream_seq, type, "
    "encrypted_payload, payload_size, ttl, pb_ms(created_at)"
)
_DEVICE_COLUMNS = (
    "device_id, user_id, bound_key, device_name, device_type, pb_ms(registered_at), pb_ms(last_seen), is_online, "
    "last_ack_device_seq, delivery_cursor, pb_ms(revoked_at)"
)
_OUTCOMES = {o.value: o for o in Outcome}
APPEND_EVENT = (
    "SELECT outcome, server_seq, stream_seq FROM pb_append_event(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
)
UNAVAILABLE = (psycopg.OperationalError, PoolTimeout)  # the server cannot answer (a read's only mapped errors)
OP_ERRORS = (psycopg.errors.IntegrityError, psycopg.errors.DataError)  # fail one operation, not its batch


class ChainEnded(Exception):
    """A batch stored an event after its connection's chain ended: rolled back, to be redone."""


class SchemaError(StoreUnavailable):
    """The database is not at this release's schema version (the message says what to run)."""


@contextmanager
def map_errors(what: str, errors: tuple[type[Exception], ...] = (psycopg.Error, PoolTimeout)) -> Iterator[None]:
    """The one mapping of PostgreSQL's exceptions: StorageFull when the server's disk is full, else
    StoreUnavailable (the message names the SQLSTATE, never a value)."""
    try:
        yield
    except errors as exc:
        state = getattr(exc, "sqlstate", None) or "-"
        kind = StorageFull if isinstance(exc, psycopg.errors.DiskFull) else StoreUnavailable
        raise kind(f"{what}: {type(exc).__name__} (sqlstate {state})") from exc


def _device(row: Sequence[Any] | None) -> Device | None:
    return Device(*row) if row is not None else None


def migrate(dsn: str) -> tuple[int, int]:
    """Apply pending migrations idempotently under an advisory lock; returns (before, after)."""
    script = resources.files(__package__).joinpath("postgres_schema.sql").read_text()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        try:
            before = schema_version(conn)
            if before > SCHEMA_VERSION:
                raise SchemaError(
                    f"the database schema is version {before}, newer than this release ({SCHEMA_VERSION})"
                )
            if before < SCHEMA_VERSION:
                with conn.transaction():
                    conn.execute(script)
            return before, schema_version(conn)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))


def schema_version(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT to_regclass('pb_schema') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return 0
    row = conn.execute("SELECT coalesce(max(version), 0) FROM pb_schema").fetchone()
    return int(row[0]) if row else 0


def count_failures(c: psycopg.Connection[Any], peer: str, minute_ago_ms: int, hour_ago_ms: int) -> tuple[int, int]:
    row = c.execute(
        "SELECT count(*) FILTER (WHERE at > pb_ts(%s)), count(*) FILTER (WHERE peer = %s AND at > pb_ts(%s))"
        " FROM pairing_failures WHERE at > pb_ts(%s)",
        (minute_ago_ms, peer, hour_ago_ms, min(minute_ago_ms, hour_ago_ms)),
    ).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


class PgTx:
    """The rows and locks behind the rules in one batch transaction
    (:class:`~pocketbridge.store.rules.StoreTx`). Several instances write: a device or user the rules
    decide about is locked (``FOR UPDATE``) until the commit; users' rows are the device-limit lock."""

    def __init__(self, c: psycopg.Connection[Any], instance_id: str, quota: tuple[int, int]) -> None:
        self.c = c
        self.instance_id = instance_id
        self.quota = quota

    # --- events: pb_append_event (schema.sql), the same decisions as rules.append_event in one round trip
    def start_append(self, ev: NewEvent, now_ms: int) -> psycopg.Cursor[Any]:
        params = (ev.user_id, ev.event_id, ev.device_id, ev.device_seq, ev.stream_id, ev.type,
                  ev.encrypted_payload, ev.payload_size, ev.ttl, now_ms, *self.quota)
        return self.c.execute(APPEND_EVENT, params, prepare=True)

    @staticmethod
    def append_result(ev: NewEvent, cur: psycopg.Cursor[Any], now_ms: int) -> EventResult:
        row = cur.fetchone()
        assert row is not None
        outcome, server_seq, stream_seq = row
        if outcome != "stored":
            return EventResult(_OUTCOMES[outcome])
        return EventResult(Outcome.STORED, StoredEvent(
            ev.user_id, server_seq, ev.event_id, ev.device_id, ev.device_seq, ev.stream_id, stream_seq,
            ev.type, ev.encrypted_payload, ev.payload_size, ev.ttl, now_ms,
        ))

    def append(self, event: NewEvent, now_ms: int) -> EventResult:
        return self.append_result(event, self.start_append(event, now_ms), now_ms)

    # --- devices
    def device(self, device_id: str) -> Device | None:
        return _device(self.c.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = %s FOR UPDATE",
                                      (device_id,)).fetchone())

    def user_deleting(self, user_id: str) -> bool:
        row = self.c.execute("SELECT deleting FROM users WHERE user_id = %s", (user_id,)).fetchone()
        return row is not None and bool(row[0])

    def ensure_user(self, user_id: str, now_ms: int) -> None:
        self.c.execute("INSERT INTO users (user_id, created_at) VALUES (%s, pb_ts(%s)) ON CONFLICT DO NOTHING",
                       (user_id, now_ms))
        self.lock_user(user_id)

    def lock_user(self, user_id: str) -> None:
        self.c.execute("SELECT 1 FROM users WHERE user_id = %s FOR UPDATE", (user_id,))

    def count_devices(self, user_id: str) -> int:
        row = self.c.execute("SELECT count(*) FROM devices WHERE user_id = %s AND revoked_at IS NULL",
                             (user_id,)).fetchone()
        return int(row[0]) if row else 0

    def taken_names(self, user_id: str) -> set[str]:
        rows = self.c.execute(
            "SELECT device_name FROM devices WHERE user_id = %s AND revoked_at IS NULL AND device_name IS NOT NULL",
            (user_id,),
        ).fetchall()
        return {r[0] for r in rows}

    def insert_device(self, d: Device) -> None:
        self.c.execute(
            "INSERT INTO devices (device_id, user_id, bound_key, device_name, device_type, registered_at, last_seen)"
            " VALUES (%s, %s, %s, %s, %s, pb_ts(%s), pb_ts(%s))",
            (d.device_id, d.user_id, d.bound_key, d.device_name, d.device_type, d.registered_at, d.last_seen),
        )

    def set_name_and_type(self, device_id: str, name: str | None, device_type: str | None) -> None:
        self.c.execute("UPDATE devices SET device_name = %s, device_type = %s WHERE device_id = %s",
                       (name, device_type, device_id))

    def move_device(self, device_id: str, user_id: str, name: str | None, last_ack: int) -> None:
        self.c.execute(
            "UPDATE devices SET user_id = %s, device_name = %s, last_ack_device_seq = %s, delivery_cursor = 0"
            " WHERE device_id = %s",
            (user_id, name, last_ack, device_id),
        )

    def revoke(self, device_id: str, reason: str, now_ms: int) -> None:
        self.c.execute(
            "UPDATE devices SET revoked_at = coalesce(revoked_at, pb_ts(%s)),"
            " revoke_reason = coalesce(revoke_reason, %s), is_online = false, connection_id = NULL"
            " WHERE device_id = %s",
            (now_ms, reason, device_id),
        )

    def unrevoke(self, device_id: str, name: str | None) -> None:
        self.c.execute(
            "UPDATE devices SET revoked_at = NULL, revoke_reason = NULL, device_name = %s WHERE device_id = %s",
            (name, device_id),
        )

    def set_presence(self, device_id: str, connection_id: str, online: bool, now_ms: int) -> None:
        if online:
            self.c.execute(
                "UPDATE devices SET is_online = true, connection_id = %s, instance_id = %s, last_seen = pb_ts(%s)"
                " WHERE device_id = %s",
                (connection_id, self.instance_id, now_ms, device_id),
            )
        else:
            self.c.execute(
                "UPDATE devices SET is_online = false, connection_id = NULL, last_seen = pb_ts(%s)"
                " WHERE device_id = %s AND connection_id = %s",
                (now_ms, device_id, connection_id),
            )

    def device_head(self, device_id: str) -> int:
        row = self.c.execute(
            "SELECT u.server_seq FROM devices d JOIN users u ON u.user_id = d.user_id WHERE d.device_id = %s",
            (device_id,),
        ).fetchone()
        return int(row[0]) if row else 0

    def beat(self, instance_id: str, now_ms: int, stale_after_ms: int) -> int:
        self.c.execute(
            "INSERT INTO instances (instance_id, last_beat) VALUES (%s, pb_ts(%s))"
            " ON CONFLICT (instance_id) DO UPDATE SET last_beat = excluded.last_beat",
            (instance_id, now_ms),
        )
        stale = "SELECT instance_id FROM instances WHERE last_beat < pb_ts(%s)"
        n = self.c.execute(
            f"UPDATE devices SET is_online = false, connection_id = NULL WHERE is_online AND instance_id IN ({stale})",
            (now_ms - stale_after_ms,),
        ).rowcount
        self.c.execute(f"DELETE FROM instances WHERE instance_id IN ({stale})", (now_ms - stale_after_ms,))
        return n

    def raise_cursors(self, cursors: Sequence[tuple[str, str, int]], stamp: Collection[str], now_ms: int) -> list[str]:
        if not cursors:
            return []
        # lock what no other transaction holds, never wait (an append holds its user's row, then its device's)
        held = {row[0] for row in self.c.execute(
            "SELECT device_id FROM devices WHERE device_id = ANY(%s) ORDER BY device_id FOR UPDATE SKIP LOCKED",
            ([device_id for device_id, _, _ in cursors],),
        )}
        with self.c.cursor() as cur:
            cur.executemany(
                "UPDATE devices SET delivery_cursor = greatest(delivery_cursor, %s),"
                " last_seen = CASE WHEN %s THEN pb_ts(%s) ELSE last_seen END WHERE device_id = %s AND user_id = %s",
                [(cursor, device_id in stamp, now_ms, device_id, user_id)
                 for device_id, user_id, cursor in cursors if device_id in held],
            )
        return [device_id for device_id, _, _ in cursors if device_id not in held]

    def touch(self, device_ids: Sequence[str], user_ids: Sequence[str], now_ms: int) -> None:
        # only where no other instance holds the row: activity stamps never make batches wait on each other
        self.c.execute(
            "UPDATE devices SET last_seen = pb_ts(%s) WHERE device_id IN (SELECT device_id FROM devices"
            " WHERE device_id = ANY(%s) ORDER BY device_id FOR UPDATE SKIP LOCKED)",
            (now_ms, list(device_ids)),
        )
        self.c.execute(
            "UPDATE users SET last_activity = pb_ts(%s) WHERE user_id IN (SELECT user_id FROM users"
            " WHERE user_id = ANY(%s) ORDER BY user_id FOR UPDATE SKIP LOCKED)",
            (now_ms, list(user_ids)),
        )

    # --- pairing
    def drop_codes(self, device_id: str, now_ms: int) -> None:
        self.c.execute("DELETE FROM pairing_codes WHERE device_id = %s OR expires_at <= pb_ts(%s)", (device_id, now_ms))

    def insert_code(self, code: str, user_id: str, device_id: str, now_ms: int, expires_ms: int) -> bool:
        cur = self.c.execute(
            "INSERT INTO pairing_codes (code, user_id, device_id, created_at, expires_at)"
            " VALUES (%s, %s, %s, pb_ts(%s), pb_ts(%s)) ON CONFLICT (code) DO NOTHING",
            (code, user_id, device_id, now_ms, expires_ms),
        )
        return cur.rowcount == 1

    def code(self, code: str) -> tuple[str, int, bool] | None:
        row = self.c.execute(
            "SELECT p.user_id, pb_ms(p.expires_at), p.used FROM pairing_codes p"
            " JOIN devices d ON d.device_id = p.device_id"
            " WHERE p.code = %s AND d.revoked_at IS NULL AND d.user_id = p.user_id FOR UPDATE OF p",
            (code,),
        ).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def mark_code_used(self, code: str) -> None:
        self.c.execute("UPDATE pairing_codes SET used = true WHERE code = %s", (code,))

    def drop_device_codes(self, device_id: str) -> None:
        self.c.execute("DELETE FROM pairing_codes WHERE device_id = %s", (device_id,))

    def last_device_seq(self, user_id: str, device_id: str) -> int:
        row = self.c.execute("SELECT coalesce(max(device_seq), 0) FROM events WHERE user_id = %s AND device_id = %s",
                             (user_id, device_id)).fetchone()
        return int(row[0]) if row else 0

    def lock_failures(self) -> None:
        # attempts from every instance take turns here, so the check and the charge are one step
        self.c.execute("SELECT pg_advisory_xact_lock(%s)", (PAIRING_LOCK,))

    def count_failures(self, peer: str, minute_ago_ms: int, hour_ago_ms: int) -> tuple[int, int]:
        return count_failures(self.c, peer, minute_ago_ms, hour_ago_ms)

    def record_failure(self, peer: str, now_ms: int) -> None:
        self.c.execute("INSERT INTO pairing_failures (at, peer) VALUES (pb_ts(%s), %s)", (now_ms, peer))

    # --- profiles
    def ensure_profile(self, user_id: str, now_ms: int) -> None:
        self.c.execute(
            "INSERT INTO profiles (user_id, created_at, updated_at) VALUES (%s, pb_ts(%s), pb_ts(%s))"
            " ON CONFLICT (user_id) DO NOTHING",
            (user_id, now_ms, now_ms),
        )

    def profile(self, user_id: str) -> Profile:
        row = self.c.execute(
            "SELECT p.user_id, p.display_name, p.email, p.avatar_url, p.preferences, p.onboarding_completed,"
            " pb_ms(p.created_at), pb_ms(p.updated_at), pb_ms(coalesce(u.last_activity, p.updated_at)),"
            " coalesce(u.stored_bytes, 0) FROM profiles p LEFT JOIN users u ON u.user_id = p.user_id"
            " WHERE p.user_id = %s FOR UPDATE OF p",
            (user_id,),
        ).fetchone()
        assert row is not None
        return Profile(*row)

    def save_profile(self, p: Profile) -> None:
        self.c.execute(
            "UPDATE profiles SET display_name = %s, email = %s, preferences = %s, onboarding_completed = %s,"
            " updated_at = pb_ts(%s) WHERE user_id = %s",
            (p.display_name, p.email, Jsonb(p.preferences), p.onboarding_completed, p.updated_at, p.user_id),
        )

    # --- audit and signatures
    def add_audit(self, rows: Sequence[AuditRow]) -> None:
        with self.c.cursor() as cur:
            cur.executemany(
                "INSERT INTO audit_log (at, action, actor, target, peer, detail)"
                " VALUES (pb_ts(%s), %s, %s, %s, %s, %s)",
                rows,
            )

    def remember_signature(self, signature: str, expires_ms: int) -> bool:
        cur = self.c.execute(
            "INSERT INTO seen_signatures (signature, expires_at) VALUES (%s, pb_ts(%s)) ON CONFLICT DO NOTHING",
            (signature, expires_ms),
        )
        return cur.rowcount == 1

    # --- maintenance
    def mark_deleting(self, user_id: str) -> bool:
        return self.c.execute("UPDATE users SET deleting = true WHERE user_id = %s", (user_id,)).rowcount == 1

    def user_event_sizes(self, user_id: str, limit: int) -> Iterable[SizedKey]:
        return self.c.execute(
            "SELECT ctid::text, payload_size FROM events WHERE user_id = %s ORDER BY server_seq LIMIT %s",
            (user_id, limit),
        )

    def delete_events(self, keys: Sequence[Any]) -> int:
        if not keys:
            return 0
        return self.c.execute("DELETE FROM events WHERE ctid = ANY(%s::tid[])", (list(keys),)).rowcount

    def delete_user_rows(self, user_id: str) -> DeletedCounts:
        events = self.c.execute("DELETE FROM events WHERE user_id = %s", (user_id,)).rowcount
        self.c.execute(
            "DELETE FROM pairing_codes WHERE user_id = %s"
            " OR device_id IN (SELECT device_id FROM devices WHERE user_id = %s)",
            (user_id, user_id),
        )
        devices = self.c.execute("DELETE FROM devices WHERE user_id = %s", (user_id,)).rowcount
        for table in ("streams", "profiles", "users"):
            self.c.execute(f"DELETE FROM {table} WHERE user_id = %s", (user_id,))
        return DeletedCounts(devices, events)

    def expire(self, now_ms: int, audit_before_ms: int, failures_before_ms: int) -> None:
        self.c.execute("DELETE FROM seen_signatures WHERE expires_at < pb_ts(%s)", (now_ms,))
        self.c.execute("DELETE FROM audit_log WHERE at < pb_ts(%s)", (audit_before_ms,))
        self.c.execute("DELETE FROM pairing_failures WHERE at < pb_ts(%s)", (failures_before_ms,))
        self.c.execute("DELETE FROM pairing_codes WHERE expires_at < pb_ts(%s)", (now_ms,))

    def expired_event_sizes(
        self, ttl_before_ms: int, created_before_ms: int, now_ms: int, limit: int
    ) -> Iterable[SizedKey]:
        return self.c.execute(
            "SELECT ctid::text, payload_size FROM events WHERE ttl IS NOT NULL AND ttl < %s"
            " UNION ALL SELECT ctid::text, payload_size FROM events WHERE created_at < pb_ts(%s)"
            " AND (ttl IS NULL OR ttl < %s) LIMIT %s",
            (ttl_before_ms, created_before_ms, now_ms, limit),
        )

    def probe(self) -> None:
        self.c.execute("UPDATE pb_schema SET version = version WHERE version = (SELECT max(version) FROM pb_schema)")


class PostgresStore(BatchedWrites):
    _writer: BatchWriter

    def __init__(self, config: Config, clock: Clock, instance_id: str) -> None:
        st = config.storage
        self._op_timeout = st.op_timeout
        self._limiter = trio.CapacityLimiter(st.pool_size)
        self._pool = ConnectionPool(
            st.dsn,
            min_size=1,
            max_size=st.pool_size,
            open=False,
            timeout=min(st.op_timeout, POOL_WAIT),
            kwargs={"autocommit": True, "options": f"-c statement_timeout={int(st.statement_timeout * 1000)}"},
            name="pocketbridge",
        )
        self.breaker = Breaker()
        self._writer = BatchWriter(
            self._apply_batch, batch_size=st.batch_size, op_timeout=st.op_timeout, clock=clock, breaker=self.breaker,
            linger=st.batch_linger,
        )
        self.instance_id = instance_id
        self._quota = (config.limits.max_stored_bytes_per_user, config.limits.stored_bytes_per_user_per_minute)

    # --- lifecycle -------------------------------------------------------------------------------
    def _open(self) -> None:
        try:
            self._pool.open(wait=True, timeout=self._op_timeout)
        except PoolTimeout as exc:
            raise StoreUnavailable(
                "cannot connect to PostgreSQL at [storage] dsn (PB_STORAGE_DSN): is it running and reachable from this"
                " host, and are the database name and credentials right?"
            ) from exc
        with self._pool.connection() as conn:
            version = schema_version(conn)
        if version < SCHEMA_VERSION:
            raise SchemaError(
                f"the database schema is at version {version}, this release needs {SCHEMA_VERSION}:"
                " run `pocketbridge migrate` first"
            )
        if version > SCHEMA_VERSION:
            raise SchemaError(
                f"the database schema is version {version}, newer than this release ({SCHEMA_VERSION});"
                " upgrade pocketbridge"
            )
        with self._pool.connection() as conn:  # a restarted instance of the same id has nobody online yet
            conn.execute("UPDATE devices SET is_online = false, connection_id = NULL WHERE instance_id = %s",
                         (self.instance_id,))

    async def run(self, on_commit: CommitHook, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await trio.to_thread.run_sync(self._open)
        except BaseException:
            await trio.to_thread.run_sync(self._pool.close)
            raise
        try:
            task_status.started()
            await self._writer.run(on_commit)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._pool.close)

    # --- plumbing --------------------------------------------------------------------------------
    async def _call(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        """Run ``fn`` on a pooled connection in a worker thread; cancel the query if we are cancelled."""
        holder: list[psycopg.Connection[Any]] = []

        def work() -> T:
            with self._pool.connection() as conn:
                holder.append(conn)
                try:
                    return fn(conn)
                finally:
                    holder.clear()

        try:
            with map_errors("PostgreSQL unavailable", UNAVAILABLE):
                return await trio.to_thread.run_sync(work, limiter=self._limiter, abandon_on_cancel=True)
        except trio.Cancelled:
            if holder:
                conn = holder[0]
                with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                    await trio.to_thread.run_sync(conn.cancel_safe, abandon_on_cancel=True)
            raise

    async def _read(self, fn: Callable[[psycopg.Connection[Any]], T], *, probe: bool = False) -> T:
        if not probe:  # a probe (health) looks for itself, whatever the circuit breaker says
            self.breaker.check()
        try:
            with trio.move_on_after(self._op_timeout):
                started = trio.current_time()
                result = await self._call(fn)
                self._writer.observe("read", trio.current_time() - started)
                self.breaker.succeeded()
                return result
            raise StoreUnavailable("PostgreSQL read timed out")
        except StoreUnavailable:
            self.breaker.failed()
            raise

    def stats(self) -> dict[str, float]:
        pool = self._pool.get_stats()
        return {
            "pool_size": pool.get("pool_size", 0),
            "pool_idle": pool.get("pool_available", 0),
            "pool_waiting": pool.get("requests_waiting", 0),
            "writer_queue": self._writer.queued,
            "breaker_open": float(self.breaker.is_open),
            "audit_dropped": float(self._writer.audit_dropped),
        }

    # --- writes ----------------------------------------------------------------------------------
    def _apply_batch(self, batch: Sequence[Pending[Any]], now_ms: int) -> list[StoredEvent]:
        """The batch as one transaction, tried again once if PostgreSQL picked it as a deadlock
        victim (it was rolled back whole, so repeating it is safe)."""
        deadlocked = False
        # each ChainEnded stops at least one more of the batch's events (never tried again): it ends
        for _ in range(len(batch) + 2):
            try:
                return self._apply_batch_once(batch, now_ms)
            except ChainEnded:
                continue  # an event ended its chain, and a later one of the chain was stored: without it
            except StoreUnavailable as exc:
                if deadlocked or not isinstance(exc.__cause__, psycopg.errors.DeadlockDetected):
                    raise
                deadlocked = True
                log.warning("store batch was a deadlock victim; retrying it once")
        raise StoreUnavailable("store batch redone too often")

    def _apply_batch_once(self, batch: Sequence[Pending[Any]], now_ms: int) -> list[StoredEvent]:
        """One transaction. Events (and the coalesced updates, which read nothing back) are
        pipelined: BEGIN, every event's ``pb_append_event`` call and COMMIT go to the server together,
        one round trip for the usual batch; their outcomes are read once the batch has committed.
        Other operations read results as they go (row counts, lookups), so a batch holding them runs
        unpipelined, each in a savepoint. Events never take a savepoint: one failing fails the batch.

        When several events of one connection (a :class:`~pocketbridge.store.Chain`) are in the batch, their
        outcomes are read before the COMMIT: if one ended the chain (a conflict) and a later one was stored,
        the batch is rolled back (:class:`ChainEnded`) and redone without the later ones."""
        appended: list[tuple[Pending[Any], AppendOp, psycopg.Cursor[Any]]] = []
        stored: list[StoredEvent] = []
        pipelined = all(isinstance(p.op, AppendOp | CoalescedOp) for p in batch)
        if pipelined:  # users' row locks in a fixed order (a stable sort keeps each user's own order)
            batch = sorted(batch, key=lambda p: p.op.event.user_id if isinstance(p.op, AppendOp) else "")
        chains = [p.op.chain for p in batch if isinstance(p.op, AppendOp) and p.op.chain is not None]
        read_first = len(set(map(id, chains))) < len(chains)
        with map_errors("commit failed"):
            with self._pool.connection() as conn, conn.pipeline() if pipelined else nullcontext(), conn.transaction():
                tx = PgTx(conn, self.instance_id, self._quota)
                for pending in batch:
                    op = pending.op
                    if isinstance(op, AppendOp) and not op.runs:
                        pending.result = ABANDONED
                    elif isinstance(op, AppendOp) and pipelined:
                        appended.append((pending, op, tx.start_append(op.event, now_ms)))
                    elif isinstance(op, AppendOp):
                        pending.result = result = op.run(tx, now_ms)
                        if result.event is not None:
                            stored.append(result.event)
                    else:
                        try:
                            with map_errors(f"store operation {op.name} failed", OP_ERRORS), conn.transaction():
                                pending.result = op.run(tx, now_ms)
                        except StoreUnavailable as exc:
                            log.error("%s", exc)
                            pending.error = exc
                if read_first:
                    self._settle(appended, now_ms)
                    if any(not op.runs and p.result.outcome is Outcome.STORED for p, op, _ in appended):
                        raise ChainEnded
            if not read_first:
                self._settle(appended, now_ms)
        stored.extend(p.result.event for p, _, _ in appended if p.result.event is not None)
        return stored

    @staticmethod
    def _settle(appended: Sequence[tuple[Pending[Any], AppendOp, psycopg.Cursor[Any]]], now_ms: int) -> None:
        for pending, op, cur in appended:
            pending.result = op.settle(PgTx.append_result(op.event, cur, now_ms))

    # --- reads -----------------------------------------------------------------------------------
    async def _rows(self, make: Callable[..., R], sql: str, params: Sequence[Any] = ()) -> list[R]:
        return await self._read(lambda c: [make(*row) for row in c.execute(sql, params)])

    async def _count(self, sql: str, params: Sequence[Any]) -> int:
        def q(c: psycopg.Connection[Any]) -> int:
            row = c.execute(sql, params, prepare=True).fetchone()
            return int(row[0]) if row else 0

        return await self._read(q)

    async def audit_log(self, limit: int, action: str | None) -> list[AuditRecord]:
        return await self._rows(
            AuditRecord,
            "SELECT pb_ms(at), action, actor, target, peer, detail FROM audit_log"
            " WHERE (%s::text IS NULL OR action = %s) ORDER BY id DESC LIMIT %s",
            (action, action, limit),
        )

    async def inactive_users(self, before_ms: int, limit: int) -> list[str]:
        return await self._rows(
            str,
            "SELECT u.user_id FROM users u WHERE coalesce(u.last_activity, u.created_at) < pb_ts(%s) AND NOT EXISTS"
            " (SELECT 1 FROM devices d WHERE d.user_id = u.user_id AND d.revoked_at IS NULL) LIMIT %s",
            (before_ms, limit),
        )

    async def deleting_users(self) -> list[str]:
        return await self._rows(str, "SELECT user_id FROM users WHERE deleting")

    async def head_seq(self, user_id: str) -> int:
        return await self._count("SELECT server_seq FROM users WHERE user_id = %s", (user_id,))

    async def heads(self, user_ids: Sequence[str]) -> dict[str, int]:
        sql = "SELECT user_id, server_seq FROM users WHERE user_id = ANY(%s)"
        return dict(await self._rows(lambda u, seq: (u, int(seq)), sql, (list(user_ids),)))

    async def pairing_failures(self, peer: str, minute_ago_ms: int, hour_ago_ms: int) -> tuple[int, int]:
        return await self._read(lambda c: count_failures(c, peer, minute_ago_ms, hour_ago_ms))

    async def count_pending(self, user_id: str, device_id: str, after: int, upto: int, now_ms: int) -> int:
        return await self._count(
            "SELECT count(*) FROM events WHERE user_id = %s AND server_seq > %s AND server_seq <= %s"
            " AND device_id <> %s AND (ttl IS NULL OR ttl > %s)",
            (user_id, after, upto, device_id, now_ms),
        )

    async def read_events(
        self, user_id: str, after: int, upto: int, *, exclude_device: str, now_ms: int, limit: int, max_bytes: int
    ) -> Page:
        sql = (f"SELECT {_EVENT_COLUMNS} FROM events WHERE user_id = %s AND server_seq > %s AND server_seq <= %s"
               " AND device_id <> %s AND (ttl IS NULL OR ttl > %s) ORDER BY server_seq LIMIT %s")
        params = (user_id, after, upto, exclude_device, now_ms, limit + 1)
        return await self._read(lambda c: paginate(c.execute(sql, params, prepare=True), limit, max_bytes))

    async def get_device(self, device_id: str) -> Device | None:
        found = await self._rows(Device, f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = %s", (device_id,))
        return found[0] if found else None

    async def list_devices(self, user_id: str) -> list[Device]:
        sql = f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE user_id = %s AND revoked_at IS NULL"
        return await self._rows(Device, sql, (user_id,))

    async def device_states(self, device_ids: Sequence[str]) -> dict[str, DeviceState]:
        if not device_ids:
            return {}
        sql = ("SELECT d.device_id, d.user_id, d.revoked_at IS NOT NULL, d.revoke_reason, u.deleting, d.connection_id"
               " FROM devices d JOIN users u ON u.user_id = d.user_id WHERE d.device_id = ANY(%s)")
        return {s.device_id: s for s in await self._rows(DeviceState, sql, (list(device_ids),))}

    async def list_users(self, limit: int) -> list[UserSummary]:
        sql = (
            "SELECT u.user_id, pb_ms(u.created_at), pb_ms(u.last_activity),"
            " count(d.device_id) FILTER (WHERE d.revoked_at IS NULL),"
            " count(d.device_id) FILTER (WHERE d.revoked_at IS NOT NULL), u.stored_bytes, u.deleting"
            " FROM users u LEFT JOIN devices d ON d.user_id = u.user_id GROUP BY u.user_id"
            " ORDER BY coalesce(u.last_activity, u.created_at) DESC LIMIT %s"
        )
        return await self._rows(UserSummary, sql, (limit,))

    async def all_devices(self, user_id: str | None, limit: int) -> list[Device]:
        sql = (f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE (%s::text IS NULL OR user_id = %s)"
               " ORDER BY registered_at DESC LIMIT %s")
        return await self._rows(Device, sql, (user_id, user_id, limit))

    async def revoked_devices(self, user_id: str | None, limit: int) -> list[RevokedDevice]:
        return await self._rows(
            RevokedDevice,
            "SELECT device_id, user_id, pb_ms(revoked_at), revoke_reason FROM devices WHERE revoked_at IS NOT NULL"
            " AND (%s::text IS NULL OR user_id = %s) ORDER BY revoked_at DESC LIMIT %s",
            (user_id, user_id, limit),
        )

    async def file_events(self, user_id: str, limit: int, offset: int, now_ms: int) -> tuple[list[StoredEvent], int]:
        where = "WHERE user_id = %s AND type = 'file:metadata' AND (ttl IS NULL OR ttl > %s)"

        def q(c: psycopg.Connection[Any]) -> tuple[list[StoredEvent], int]:
            total = c.execute(f"SELECT count(*) FROM events {where}", (user_id, now_ms)).fetchone()
            rows = c.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events {where} ORDER BY server_seq DESC LIMIT %s OFFSET %s",
                (user_id, now_ms, limit, offset),
            ).fetchall()
            return [StoredEvent(*r) for r in rows], int(total[0]) if total else 0

        return await self._read(q)

    async def ping(self) -> None:
        await self._read(lambda c: c.execute("SELECT 1").fetchone(), probe=True)
