"""The scale-out store: PostgreSQL (source of truth for every instance).

psycopg 3 is synchronous here: each call runs in a worker thread from a pool-sized
``CapacityLimiter``, so at most ``pool_size`` threads ever wait on the pool. A cancelled trio task
abandons its thread and cancels the query on the server (``cancel_safe``); every statement is also
bounded by ``statement_timeout``. Writes share the batching writer of the embedded store; a batch's
events go to the server pipelined, one ``pb_append_event`` call each.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from importlib import resources
from typing import Any, TypeVar

import attrs
import psycopg
import trio
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from ..clock import Clock
from ..config import Config
from ..errors import StoreUnavailable
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
)
from .writer import BatchedWrites, BatchWriter, Breaker, Op

log = logging.getLogger("pocketbridge.store")

SCHEMA_VERSION = 2
POOL_WAIT = 3.0  # seconds to wait for a pooled connection before the call counts as a failure
MIGRATION_LOCK = 0x706F636B  # advisory lock key held while migrating
PAIRING_LOCK = 0x70627061  # advisory transaction lock serializing pairing attempts (failure limits)
T = TypeVar("T")

_EVENT_COLUMNS = (
    "user_id, server_seq, event_id, device_id, device_seq, stream_id, stream_seq, type, "
    "encrypted_payload, payload_size, ttl, pb_ms(created_at)"
)
_DEVICE_COLUMNS = (
    "device_id, user_id, bound_key, device_name, device_type, pb_ms(registered_at), pb_ms(last_seen), is_online, "
    "last_ack_device_seq, delivery_cursor, pb_ms(revoked_at)"
)
_OUTCOMES = {o.value: o for o in Outcome}
PIPELINED = frozenset({"event", "coalesced"})
APPEND_EVENT = (
    "SELECT outcome, server_seq, stream_seq FROM pb_append_event(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
)


class SchemaError(StoreUnavailable):
    """The database is not at this release's schema version (the message says what to run)."""


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


class PostgresStore(BatchedWrites):
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
            raise StoreUnavailable("cannot connect to PostgreSQL (check [storage] dsn)") from exc
        with self._pool.connection() as conn:
            version = schema_version(conn)
        if version < SCHEMA_VERSION:
            raise SchemaError(
                f"the database schema is at version {version}, this release needs {SCHEMA_VERSION}:"
                " run `pocketbridge migrate` first"
            )
        if version > SCHEMA_VERSION:
            raise SchemaError(
                f"the database schema is version {version}, newer than this release ({SCHEMA_VERSION}); upgrade pocketbridge"
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
            return await trio.to_thread.run_sync(work, limiter=self._limiter, abandon_on_cancel=True)
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise StoreUnavailable(f"PostgreSQL unavailable: {type(exc).__name__}") from exc
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
    def _apply_batch(self, ops: Sequence[Op], now_ms: int) -> list[StoredEvent]:
        """The batch as one transaction, tried again once if PostgreSQL picked it as a deadlock
        victim (it was rolled back whole, so repeating it is safe)."""
        try:
            return self._apply_batch_once(ops, now_ms)
        except StoreUnavailable as exc:
            if not isinstance(exc.__cause__, psycopg.errors.DeadlockDetected):
                raise
            log.warning("store batch was a deadlock victim; retrying it once")
            return self._apply_batch_once(ops, now_ms)

    def _apply_batch_once(self, ops: Sequence[Op], now_ms: int) -> list[StoredEvent]:
        """One transaction. Events (and the coalesced updates, which read nothing back) are
        pipelined: BEGIN, every event's ``pb_append_event`` call and COMMIT go to the server together,
        one round trip for the usual batch. Other operations read results as they go (row counts,
        lookups), so a batch holding them runs unpipelined, each in a savepoint. Event outcomes are
        read once the batch has committed."""
        appended: list[tuple[Op, Any]] = []
        pipelined = all(op.kind in PIPELINED for op in ops)
        if pipelined:  # users' row locks in a fixed order (a stable sort keeps each user's own order)
            ops = sorted(ops, key=lambda op: "" if op.kind != "event" else op.args[0].user_id)
        try:
            with self._pool.connection() as conn, conn.pipeline() if pipelined else nullcontext(), conn.transaction():
                for op in ops:
                    if op.kind == "event":
                        ev: NewEvent = op.args[0]
                        params = (ev.user_id, ev.event_id, ev.device_id, ev.device_seq, ev.stream_id, ev.type,
                                  ev.encrypted_payload, ev.payload_size, ev.ttl, now_ms, *self._quota)
                        appended.append((op, conn.execute(APPEND_EVENT, params, prepare=True)))
                        continue
                    try:
                        with conn.transaction():
                            op.result = getattr(self, f"_w_{op.kind}")(conn, now_ms, *op.args)
                    except (psycopg.errors.IntegrityError, psycopg.errors.DataError) as exc:
                        log.error("store operation %s failed: %s", op.kind, type(exc).__name__)
                        op.error = StoreUnavailable(f"store operation {op.kind} failed")
            return [event for op, cur in appended if (event := self._event_result(op, cur, now_ms)) is not None]
        except (psycopg.Error, PoolTimeout) as exc:
            state = getattr(exc, "sqlstate", None) or "-"
            raise StoreUnavailable(f"commit failed: {type(exc).__name__} (sqlstate {state})") from exc

    @staticmethod
    def _event_result(op: Op, cur: Any, now_ms: int) -> StoredEvent | None:
        outcome, server_seq, stream_seq = cur.fetchone()
        ev: NewEvent = op.args[0]
        event = None
        if outcome == "stored":
            event = StoredEvent(
                ev.user_id, server_seq, ev.event_id, ev.device_id, ev.device_seq, ev.stream_id, stream_seq,
                ev.type, ev.encrypted_payload, ev.payload_size, ev.ttl, now_ms,
            )
        op.result = EventResult(_OUTCOMES[outcome], event)
        return event

    async def audit_log(self, limit: int, action: str | None) -> list[AuditRecord]:
        def q(c: psycopg.Connection[Any]) -> list[AuditRecord]:
            rows = c.execute(
                "SELECT pb_ms(at), action, actor, target, peer, detail FROM audit_log"
                " WHERE (%s::text IS NULL OR action = %s) ORDER BY id DESC LIMIT %s",
                (action, action, limit),
            ).fetchall()
            return [AuditRecord(*r) for r in rows]

        return await self._read(q)

    async def beat(self, instance_id: str, stale_after_ms: int) -> int:
        """Record this instance as alive; set devices of instances silent for ``stale_after_ms`` offline."""
        return await self._writer.submit("beat", instance_id, stale_after_ms)  # type: ignore[no-any-return]

    # --- write operations (run inside the batch transaction, each in a savepoint) ----------------
    def _w_admit(self, c: psycopg.Connection[Any], now_ms: int, req: AdmitRequest) -> Admission:
        device = _device(c.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = %s FOR UPDATE",
                                   (req.device_id,)).fetchone())
        owner = req.key if device is None else device.user_id
        row = c.execute("SELECT deleting FROM users WHERE user_id = %s", (owner,)).fetchone()
        if row is not None and row[0]:
            return Admission(Admit.DELETING)
        if device is not None:
            if device.bound_key != req.key:
                return Admission(Admit.KEY_MISMATCH)
            if device.revoked_at is not None:
                return Admission(Admit.REVOKED)
            name = device.device_name
            if not name and req.device_name:
                name = dedupe_device_name(req.device_name, self._taken_names(c, device.user_id))
            dtype = req.device_type or device.device_type
            c.execute("UPDATE devices SET device_name = %s, device_type = %s WHERE device_id = %s",
                      (name, dtype, device.device_id))
            return Admission(Admit.OK, attrs.evolve(device, device_name=name, device_type=dtype))
        # the user row is the lock that makes the device limit hold across instances
        c.execute("INSERT INTO users (user_id, created_at) VALUES (%s, pb_ts(%s)) ON CONFLICT DO NOTHING",
                  (req.key, now_ms))
        c.execute("SELECT 1 FROM users WHERE user_id = %s FOR UPDATE", (req.key,))
        if self._device_count(c, req.key) >= req.max_devices:
            return Admission(Admit.LIMIT)
        name = dedupe_device_name(req.device_name, self._taken_names(c, req.key)) if req.device_name else None
        c.execute(
            "INSERT INTO devices (device_id, user_id, bound_key, device_name, device_type, registered_at, last_seen)"
            " VALUES (%s, %s, %s, %s, %s, pb_ts(%s), pb_ts(%s))",
            (req.device_id, req.key, req.key, name, req.device_type, now_ms, now_ms),
        )
        return Admission(
            Admit.OK, Device(req.device_id, req.key, req.key, name, req.device_type, now_ms, now_ms, False, 0, 0, None), created=True
        )

    @staticmethod
    def _taken_names(c: psycopg.Connection[Any], user_id: str) -> set[str]:
        rows = c.execute(
            "SELECT device_name FROM devices WHERE user_id = %s AND revoked_at IS NULL AND device_name IS NOT NULL",
            (user_id,),
        ).fetchall()
        return {r[0] for r in rows}

    @staticmethod
    def _device_count(c: psycopg.Connection[Any], user_id: str) -> int:
        row = c.execute("SELECT count(*) FROM devices WHERE user_id = %s AND revoked_at IS NULL", (user_id,)).fetchone()
        return int(row[0]) if row else 0

    def _w_presence(self, c: psycopg.Connection[Any], now_ms: int, device_id: str, conn_id: str, online: bool) -> int:
        if online:
            c.execute(
                "UPDATE devices SET is_online = true, connection_id = %s, instance_id = %s, last_seen = pb_ts(%s)"
                " WHERE device_id = %s",
                (conn_id, self.instance_id, now_ms, device_id),
            )
        else:
            c.execute(
                "UPDATE devices SET is_online = false, connection_id = NULL, last_seen = pb_ts(%s)"
                " WHERE device_id = %s AND connection_id = %s",
                (now_ms, device_id, conn_id),
            )
        # the committed head (the session subscribed before this, so anything later reaches it live)
        row = c.execute(
            "SELECT u.server_seq FROM devices d JOIN users u ON u.user_id = d.user_id WHERE d.device_id = %s",
            (device_id,),
        ).fetchone()
        return int(row[0]) if row else 0

    def _w_coalesced(
        self,
        c: psycopg.Connection[Any],
        now_ms: int,
        cursors: dict[str, tuple[str, int]],
        seen: dict[str, str],
        audit: list[tuple[Any, ...]],
    ) -> None:
        with c.cursor() as cur:
            cur.executemany(
                "INSERT INTO audit_log (at, action, actor, target, peer, detail) VALUES (pb_ts(%s), %s, %s, %s, %s, %s)",
                audit,
            )
            # rows in a fixed order, and activity stamps only where no other instance holds the row:
            # two instances' batches never wait on each other in a cycle
            cur.executemany(
                "UPDATE devices SET delivery_cursor = greatest(delivery_cursor, %s) WHERE device_id = %s AND user_id = %s",
                [(cursor, device_id, user_id) for device_id, (user_id, cursor) in sorted(cursors.items())],
            )
            if seen:
                cur.execute(
                    "UPDATE devices SET last_seen = pb_ts(%s) WHERE device_id IN (SELECT device_id FROM devices"
                    " WHERE device_id = ANY(%s) ORDER BY device_id FOR UPDATE SKIP LOCKED)",
                    (now_ms, sorted(seen)),
                )
                cur.execute(
                    "UPDATE users SET last_activity = pb_ts(%s) WHERE user_id IN (SELECT user_id FROM users"
                    " WHERE user_id = ANY(%s) ORDER BY user_id FOR UPDATE SKIP LOCKED)",
                    (now_ms, sorted(set(seen.values()))),
                )

    def _w_pairing_code(
        self, c: psycopg.Connection[Any], now_ms: int, user_id: str, device_id: str, ttl_ms: int, max_devices: int
    ) -> tuple[str, int] | None:
        if self._device_count(c, user_id) >= max_devices:
            return None
        c.execute("DELETE FROM pairing_codes WHERE device_id = %s OR expires_at <= pb_ts(%s)", (device_id, now_ms))
        expires_at = now_ms + ttl_ms
        while True:
            code = new_pairing_code()
            cur = c.execute(
                "INSERT INTO pairing_codes (code, user_id, device_id, created_at, expires_at)"
                " VALUES (%s, %s, %s, pb_ts(%s), pb_ts(%s)) ON CONFLICT (code) DO NOTHING",
                (code, user_id, device_id, now_ms, expires_at),
            )
            if cur.rowcount == 1:
                return code, expires_at

    def _w_complete_pairing(
        self, c: psycopg.Connection[Any], now_ms: int, code: str, device_id: str, max_devices: int, peer: str,
        failure_limits: tuple[int, int],
    ) -> PairingResult:
        per_peer, per_minute = failure_limits
        if per_peer or per_minute:
            # attempts from every instance take turns here, so the check and the charge are one step
            c.execute("SELECT pg_advisory_xact_lock(%s)", (PAIRING_LOCK,))
            everyone, mine = c.execute(
                "SELECT count(*) FILTER (WHERE at > pb_ts(%s)), count(*) FILTER (WHERE peer = %s)"
                " FROM pairing_failures WHERE at > pb_ts(%s)",
                (now_ms - 60_000, peer, now_ms - 3_600_000),
            ).fetchone()
            if per_peer and mine >= per_peer:
                return PairingResult(Pairing.LOCKED_PEER)
            if per_minute and everyone >= per_minute:
                return PairingResult(Pairing.LOCKED_DEPLOYMENT)
        result = self._pair(c, now_ms, code, device_id, max_devices)
        if result.outcome is Pairing.NOT_FOUND:
            c.execute("INSERT INTO pairing_failures (at, peer) VALUES (pb_ts(%s), %s)", (now_ms, peer))
        return result

    def _pair(
        self, c: psycopg.Connection[Any], now_ms: int, code: str, device_id: str, max_devices: int
    ) -> PairingResult:
        row = c.execute(
            "SELECT p.user_id, pb_ms(p.expires_at), p.used FROM pairing_codes p"
            " JOIN devices d ON d.device_id = p.device_id"
            " WHERE p.code = %s AND d.revoked_at IS NULL AND d.user_id = p.user_id FOR UPDATE OF p",
            (code,),
        ).fetchone()
        if row is None or row[1] <= now_ms:
            return PairingResult(Pairing.NOT_FOUND)
        if row[2]:
            return PairingResult(Pairing.USED)
        user_a = row[0]
        joiner = _device(c.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = %s FOR UPDATE",
                                   (device_id,)).fetchone())
        assert joiner is not None
        if joiner.user_id == user_a:
            c.execute("UPDATE pairing_codes SET used = true WHERE code = %s", (code,))
            return PairingResult(Pairing.SAME_ACCOUNT, user_a, joiner.last_ack_device_seq, joiner)
        c.execute("SELECT 1 FROM users WHERE user_id = %s FOR UPDATE", (user_a,))
        if self._device_count(c, user_a) >= max_devices:
            return PairingResult(Pairing.LIMIT, user_a)
        c.execute("UPDATE pairing_codes SET used = true WHERE code = %s", (code,))
        name = joiner.device_name and dedupe_device_name(joiner.device_name, self._taken_names(c, user_a))
        last = c.execute("SELECT coalesce(max(device_seq), 0) FROM events WHERE user_id = %s AND device_id = %s",
                         (user_a, device_id)).fetchone()
        last_ack = int(last[0]) if last else 0
        c.execute(
            "UPDATE devices SET user_id = %s, device_name = %s, last_ack_device_seq = %s, delivery_cursor = 0"
            " WHERE device_id = %s",
            (user_a, name, last_ack, device_id),
        )
        c.execute("DELETE FROM pairing_codes WHERE device_id = %s", (device_id,))
        moved = attrs.evolve(joiner, user_id=user_a, device_name=name, last_ack_device_seq=last_ack, delivery_cursor=0)
        return PairingResult(Pairing.OK, user_a, last_ack, moved)

    def _w_revoke(
        self, c: psycopg.Connection[Any], now_ms: int, device_id: str, reason: str, user_id: str | None
    ) -> Device | None:
        device = _device(c.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = %s FOR UPDATE",
                                   (device_id,)).fetchone())
        if device is None or (user_id is not None and device.user_id != user_id):
            return None
        c.execute(
            "UPDATE devices SET revoked_at = coalesce(revoked_at, pb_ts(%s)), revoke_reason = coalesce(revoke_reason, %s),"
            " is_online = false, connection_id = NULL WHERE device_id = %s",
            (now_ms, reason, device_id),
        )
        c.execute("DELETE FROM pairing_codes WHERE device_id = %s", (device_id,))
        return device

    def _w_probe(self, c: psycopg.Connection[Any], now_ms: int) -> None:
        c.execute("UPDATE pb_schema SET version = version WHERE version = (SELECT max(version) FROM pb_schema)")

    def _w_mark_deleting(self, c: psycopg.Connection[Any], now_ms: int, user_id: str) -> bool:
        return c.execute("UPDATE users SET deleting = true WHERE user_id = %s", (user_id,)).rowcount == 1

    def _w_delete_user_events(self, c: psycopg.Connection[Any], now_ms: int, user_id: str) -> int:
        rows = c.execute(
            "SELECT ctid::text, payload_size FROM events WHERE user_id = %s ORDER BY server_seq LIMIT %s",
            (user_id, CHUNK_ROWS),
        )
        return self._delete_ctids(c, take_chunk(rows))

    @staticmethod
    def _delete_ctids(c: psycopg.Connection[Any], ctids: list[str]) -> int:
        if not ctids:
            return 0
        return c.execute("DELETE FROM events WHERE ctid = ANY(%s::tid[])", (ctids,)).rowcount

    def _w_delete_user(self, c: psycopg.Connection[Any], now_ms: int, user_id: str) -> DeletedCounts:
        events = c.execute("DELETE FROM events WHERE user_id = %s", (user_id,)).rowcount
        c.execute(
            "DELETE FROM pairing_codes WHERE user_id = %s"
            " OR device_id IN (SELECT device_id FROM devices WHERE user_id = %s)",
            (user_id, user_id),
        )
        devices = c.execute("DELETE FROM devices WHERE user_id = %s", (user_id,)).rowcount
        for table in ("streams", "profiles", "users"):
            c.execute(f"DELETE FROM {table} WHERE user_id = %s", (user_id,))
        return DeletedCounts(devices, events)

    def _w_purge(
        self, c: psycopg.Connection[Any], now_ms: int, retention_ms: int, ttl_grace_ms: int, limit: int, audit_ms: int
    ) -> int:
        c.execute("DELETE FROM seen_signatures WHERE expires_at < pb_ts(%s)", (now_ms,))
        c.execute("DELETE FROM audit_log WHERE at < pb_ts(%s)", (now_ms - audit_ms,))
        c.execute("DELETE FROM pairing_failures WHERE at < pb_ts(%s)", (now_ms - 3_600_000,))
        c.execute("DELETE FROM pairing_codes WHERE expires_at < pb_ts(%s)", (now_ms,))
        rows = c.execute(
            "SELECT ctid::text, payload_size FROM events WHERE ttl IS NOT NULL AND ttl < %s"
            " UNION ALL SELECT ctid::text, payload_size FROM events WHERE created_at < pb_ts(%s)"
            " AND (ttl IS NULL OR ttl < %s) LIMIT %s",
            (now_ms - ttl_grace_ms, now_ms - retention_ms, now_ms, limit),
        )
        return self._delete_ctids(c, sorted(set(take_chunk(rows))))

    def _w_rename(self, c: psycopg.Connection[Any], now_ms: int, user_id: str, device_id: str, name: str) -> Rename:
        row = c.execute(
            "SELECT device_name FROM devices WHERE device_id = %s AND user_id = %s AND revoked_at IS NULL FOR UPDATE",
            (device_id, user_id),
        ).fetchone()
        if row is None:
            return Rename.NOT_FOUND
        if row[0] != name and name in self._taken_names(c, user_id):
            return Rename.TAKEN
        c.execute("UPDATE devices SET device_name = %s WHERE device_id = %s", (name, device_id))
        return Rename.OK

    def _w_unrevoke(self, c: psycopg.Connection[Any], now_ms: int, device_id: str, max_devices: int) -> Unrevoke:
        row = c.execute("SELECT user_id, revoked_at, device_name FROM devices WHERE device_id = %s FOR UPDATE",
                        (device_id,)).fetchone()
        if row is None:
            return Unrevoke.NOT_FOUND
        if row[1] is None:
            return Unrevoke.OK
        c.execute("SELECT 1 FROM users WHERE user_id = %s FOR UPDATE", (row[0],))
        if self._device_count(c, row[0]) >= max_devices:
            return Unrevoke.LIMIT
        name = row[2] and dedupe_device_name(row[2], self._taken_names(c, row[0]))
        c.execute("UPDATE devices SET revoked_at = NULL, revoke_reason = NULL, device_name = %s WHERE device_id = %s",
                  (name, device_id))
        return Unrevoke.OK

    def _profile(self, c: psycopg.Connection[Any], now_ms: int, user_id: str) -> Profile:
        c.execute(
            "INSERT INTO profiles (user_id, created_at, updated_at) VALUES (%s, pb_ts(%s), pb_ts(%s))"
            " ON CONFLICT (user_id) DO NOTHING",
            (user_id, now_ms, now_ms),
        )
        row = c.execute(
            "SELECT p.user_id, p.display_name, p.email, p.avatar_url, p.preferences, p.onboarding_completed,"
            " pb_ms(p.created_at), pb_ms(p.updated_at), pb_ms(coalesce(u.last_activity, p.updated_at)),"
            " coalesce(u.stored_bytes, 0) FROM profiles p LEFT JOIN users u ON u.user_id = p.user_id WHERE p.user_id = %s",
            (user_id,),
        ).fetchone()
        assert row is not None
        return Profile(*row)

    def _w_get_profile(self, c: psycopg.Connection[Any], now_ms: int, user_id: str) -> Profile:
        return self._profile(c, now_ms, user_id)

    def _w_update_profile(self, c: psycopg.Connection[Any], now_ms: int, user_id: str, changes: dict[str, Any]) -> Profile:
        current = self._profile(c, now_ms, user_id)
        c.execute(
            "UPDATE profiles SET display_name = %s, email = %s, preferences = preferences || %s,"
            " onboarding_completed = %s, updated_at = pb_ts(%s) WHERE user_id = %s",
            (
                changes.get("display_name", current.display_name),
                changes.get("email", current.email),
                Jsonb(changes.get("preferences", {})),
                changes.get("onboarding_completed", current.onboarding_completed),
                now_ms,
                user_id,
            ),
        )
        return self._profile(c, now_ms, user_id)

    def _w_signature(self, c: psycopg.Connection[Any], now_ms: int, signature: str, expires_ms: int) -> bool:
        cur = c.execute(
            "INSERT INTO seen_signatures (signature, expires_at) VALUES (%s, pb_ts(%s)) ON CONFLICT DO NOTHING",
            (signature, expires_ms),
        )
        return cur.rowcount == 1

    def _w_beat(self, c: psycopg.Connection[Any], now_ms: int, instance_id: str, stale_after_ms: int) -> int:
        c.execute(
            "INSERT INTO instances (instance_id, last_beat) VALUES (%s, pb_ts(%s))"
            " ON CONFLICT (instance_id) DO UPDATE SET last_beat = excluded.last_beat",
            (instance_id, now_ms),
        )
        stale = "SELECT instance_id FROM instances WHERE last_beat < pb_ts(%s)"
        n = c.execute(
            f"UPDATE devices SET is_online = false, connection_id = NULL WHERE is_online AND instance_id IN ({stale})",
            (now_ms - stale_after_ms,),
        ).rowcount
        c.execute(f"DELETE FROM instances WHERE instance_id IN ({stale})", (now_ms - stale_after_ms,))
        return n

    # --- reads -----------------------------------------------------------------------------------
    async def inactive_users(self, before_ms: int, limit: int) -> list[str]:
        def q(c: psycopg.Connection[Any]) -> list[str]:
            rows = c.execute(
                "SELECT u.user_id FROM users u WHERE coalesce(u.last_activity, u.created_at) < pb_ts(%s) AND NOT EXISTS"
                " (SELECT 1 FROM devices d WHERE d.user_id = u.user_id AND d.revoked_at IS NULL) LIMIT %s",
                (before_ms, limit),
            )
            return [r[0] for r in rows]

        return await self._read(q)

    async def deleting_users(self) -> list[str]:
        return await self._read(lambda c: [r[0] for r in c.execute("SELECT user_id FROM users WHERE deleting")])

    async def head_seq(self, user_id: str) -> int:
        def q(c: psycopg.Connection[Any]) -> int:
            row = c.execute("SELECT server_seq FROM users WHERE user_id = %s", (user_id,), prepare=True).fetchone()
            return int(row[0]) if row else 0

        return await self._read(q)

    async def heads(self, user_ids: Sequence[str]) -> dict[str, int]:
        def q(c: psycopg.Connection[Any]) -> dict[str, int]:
            rows = c.execute("SELECT user_id, server_seq FROM users WHERE user_id = ANY(%s)", (list(user_ids),))
            return {r[0]: int(r[1]) for r in rows}

        return await self._read(q)

    async def pairing_failures(self, peer: str, minute_ago_ms: int, hour_ago_ms: int) -> tuple[int, int]:
        def q(c: psycopg.Connection[Any]) -> tuple[int, int]:
            row = c.execute(
                "SELECT count(*) FILTER (WHERE at > pb_ts(%s)), count(*) FILTER (WHERE peer = %s AND at > pb_ts(%s))"
                " FROM pairing_failures WHERE at > pb_ts(%s)",
                (minute_ago_ms, peer, hour_ago_ms, min(minute_ago_ms, hour_ago_ms)),
            ).fetchone()
            return (int(row[0]), int(row[1])) if row else (0, 0)

        return await self._read(q)

    async def count_pending(self, user_id: str, device_id: str, after: int, upto: int, now_ms: int) -> int:
        def q(c: psycopg.Connection[Any]) -> int:
            row = c.execute(
                "SELECT count(*) FROM events WHERE user_id = %s AND server_seq > %s AND server_seq <= %s"
                " AND device_id <> %s AND (ttl IS NULL OR ttl > %s)",
                (user_id, after, upto, device_id, now_ms),
            ).fetchone()
            return int(row[0]) if row else 0

        return await self._read(q)

    async def read_events(
        self, user_id: str, after: int, upto: int, *, exclude_device: str, now_ms: int, limit: int, max_bytes: int
    ) -> Page:
        def q(c: psycopg.Connection[Any]) -> Page:
            cur = c.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE user_id = %s AND server_seq > %s AND server_seq <= %s"
                " AND device_id <> %s AND (ttl IS NULL OR ttl > %s) ORDER BY server_seq LIMIT %s",
                (user_id, after, upto, exclude_device, now_ms, limit + 1),
                prepare=True,
            )
            return paginate(cur, limit, max_bytes)

        return await self._read(q)

    async def get_device(self, device_id: str) -> Device | None:
        return await self._read(
            lambda c: _device(c.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = %s",
                                        (device_id,)).fetchone())
        )

    async def list_devices(self, user_id: str) -> list[Device]:
        def q(c: psycopg.Connection[Any]) -> list[Device]:
            rows = c.execute(
                f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE user_id = %s AND revoked_at IS NULL", (user_id,)
            ).fetchall()
            return [Device(*r) for r in rows]

        return await self._read(q)

    async def revoked_devices(self, user_id: str | None, limit: int) -> list[RevokedDevice]:
        def q(c: psycopg.Connection[Any]) -> list[RevokedDevice]:
            rows = c.execute(
                "SELECT device_id, user_id, pb_ms(revoked_at), revoke_reason FROM devices WHERE revoked_at IS NOT NULL"
                " AND (%s::text IS NULL OR user_id = %s) ORDER BY revoked_at DESC LIMIT %s",
                (user_id, user_id, limit),
            ).fetchall()
            return [RevokedDevice(*r) for r in rows]

        return await self._read(q)

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
