"""The in-memory store: the whole :class:`~pocketbridge.store.Store` with the same rules, for unit tests.

Its tables are plain dicts (:class:`MemoryTables`, which implements the rules' role interfaces), and its
writer applies each operation at once on the event loop: no batching, threads or timers, so it is
deterministic under ``trio.testing.MockClock``. Cursor moves, activity stamps and audit records are
written when noted (the real stores coalesce them for up to a second). Set ``unavailable`` to make
every call raise StoreUnavailable. Nothing is isolated: an operation that raised half-way stays half
applied (the rules decide before they write, so none does).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, TypeVar

import attrs
import trio

from ..audit import AuditRow
from ..clock import Clock
from ..errors import StoreUnavailable
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
from .ops import WriteOp
from .rules import Sender, SizedKey
from .writer import BatchedWrites, Pending

R = TypeVar("R")


@attrs.define
class _User:
    created_at: int
    server_seq: int = 0
    deleting: bool = False
    last_activity: int | None = None
    stored_bytes: int = 0
    quota_tokens: float | None = None
    quota_at: int | None = None


@attrs.define
class _DeviceRow:
    device: Device
    connection_id: str | None = None
    revoke_reason: str | None = None


@attrs.define
class _Code:
    user_id: str
    device_id: str
    expires_at: int
    used: bool = False


@attrs.define
class _Profile:
    created_at: int
    updated_at: int
    display_name: str | None = None
    email: str | None = None
    avatar_url: str | None = None
    preferences: dict[str, Any] = attrs.Factory(dict)
    onboarding_completed: bool = False


class MemoryTables:
    """The rows, and the rules' roles over them (``StoreTx`` and ``EventsTx``)."""

    def __init__(self, quota: Quota) -> None:
        self.quota = quota
        self.users: dict[str, _User] = {}
        self.devices: dict[str, _DeviceRow] = {}
        self.streams: dict[tuple[str, str], int] = {}
        self.events: dict[int, StoredEvent] = {}  # by row id, in commit order
        self._by_seq: dict[tuple[str, str, int], int] = {}
        self._by_id: dict[tuple[str, str], int] = {}
        self._next_row = 1
        self.codes: dict[str, _Code] = {}
        self.profiles: dict[str, _Profile] = {}
        self.signatures: dict[str, int] = {}
        self.audit: list[AuditRecord] = []
        self.failures: list[tuple[int, str]] = []  # (at, peer)

    def _set(self, device_id: str, **changes: Any) -> None:
        row = self.devices[device_id]
        row.device = attrs.evolve(row.device, **changes)

    # --- events
    def append(self, event: NewEvent, now_ms: int) -> EventResult:
        return rules.append_event(self, event, self.quota, now_ms)

    def sender(self, device_id: str) -> Sender | None:
        row = self.devices.get(device_id)
        if row is None:
            return None
        user = self.users[row.device.user_id]
        revoked = row.device.revoked_at is not None
        return Sender(row.device.user_id, revoked, user.deleting, user.stored_bytes, user.quota_tokens, user.quota_at)

    def known_event(self, user_id: str, device_id: str, device_seq: int, event_id: str) -> tuple[str, bool] | None:
        row = self._by_seq.get((user_id, device_id, device_seq))
        if row is not None:
            return self.events[row].event_id, True
        return (event_id, False) if (user_id, event_id) in self._by_id else None

    def next_server_seq(self, user_id: str, size: int, bucket: tuple[float | None, int], now_ms: int) -> int:
        user = self.users[user_id]
        user.server_seq += 1
        user.last_activity = now_ms
        user.stored_bytes += size
        user.quota_tokens, user.quota_at = bucket
        return user.server_seq

    def next_stream_seq(self, user_id: str, stream_id: str) -> int:
        seq = self.streams[user_id, stream_id] = self.streams.get((user_id, stream_id), 0) + 1
        return seq

    def insert_event(self, event: StoredEvent) -> None:
        row, self._next_row = self._next_row, self._next_row + 1
        self.events[row] = event
        self._by_seq[event.user_id, event.device_id, event.device_seq] = row
        self._by_id[event.user_id, event.event_id] = row
        device = self.devices[event.device_id].device
        self._set(event.device_id, last_ack_device_seq=max(device.last_ack_device_seq, event.device_seq))

    # --- devices
    def device(self, device_id: str) -> Device | None:
        row = self.devices.get(device_id)
        return None if row is None else row.device

    def user_deleting(self, user_id: str) -> bool:
        user = self.users.get(user_id)
        return user is not None and user.deleting

    def ensure_user(self, user_id: str, now_ms: int) -> None:
        self.users.setdefault(user_id, _User(now_ms))

    def lock_user(self, user_id: str) -> None:
        pass

    def live_devices(self, user_id: str) -> list[Device]:
        return [r.device for r in self.devices.values() if r.device.user_id == user_id and r.device.revoked_at is None]

    def count_devices(self, user_id: str) -> int:
        return len(self.live_devices(user_id))

    def taken_names(self, user_id: str) -> set[str]:
        return {d.device_name for d in self.live_devices(user_id) if d.device_name is not None}

    def insert_device(self, device: Device) -> None:
        self.devices[device.device_id] = _DeviceRow(device)

    def set_name_and_type(self, device_id: str, name: str | None, device_type: str | None) -> None:
        self._set(device_id, device_name=name, device_type=device_type)

    def move_device(self, device_id: str, user_id: str, name: str | None, last_ack: int) -> None:
        self._set(device_id, user_id=user_id, device_name=name, last_ack_device_seq=last_ack, delivery_cursor=0)

    def revoke(self, device_id: str, reason: str, now_ms: int) -> None:
        row = self.devices[device_id]
        if row.device.revoked_at is None:
            self._set(device_id, revoked_at=now_ms)
        if row.revoke_reason is None:
            row.revoke_reason = reason
        row.connection_id = None
        self._set(device_id, is_online=False)

    def unrevoke(self, device_id: str, name: str | None) -> None:
        self.devices[device_id].revoke_reason = None
        self._set(device_id, revoked_at=None, device_name=name)

    def set_presence(self, device_id: str, connection_id: str, online: bool, now_ms: int) -> None:
        row = self.devices.get(device_id)
        if row is None or not (online or row.connection_id == connection_id):
            return
        row.connection_id = connection_id if online else None
        self._set(device_id, is_online=online, last_seen=now_ms)

    def device_head(self, device_id: str) -> int:
        row = self.devices.get(device_id)
        user = None if row is None else self.users.get(row.device.user_id)
        return 0 if user is None else user.server_seq

    def beat(self, instance_id: str, now_ms: int, stale_after_ms: int) -> int:
        return 0  # one process: no other instance to time out

    def raise_cursors(self, cursors: Sequence[tuple[str, str, int]], stamp: Collection[str], now_ms: int) -> list[str]:
        for device_id, user_id, cursor in cursors:
            row = self.devices.get(device_id)
            if row is not None and row.device.user_id == user_id and row.device.delivery_cursor < cursor:
                self._set(device_id, delivery_cursor=cursor)
            if row is not None and device_id in stamp:
                self._set(device_id, last_seen=now_ms)
        return []  # one writer: nothing is ever held by another

    def touch(self, device_ids: Sequence[str], user_ids: Sequence[str], now_ms: int) -> None:
        for device_id in device_ids:
            if device_id in self.devices:
                self._set(device_id, last_seen=now_ms)
        for user_id in user_ids:
            if user_id in self.users:
                self.users[user_id].last_activity = now_ms

    # --- pairing
    def drop_codes(self, device_id: str, now_ms: int) -> None:
        self.codes = {k: c for k, c in self.codes.items() if c.device_id != device_id and c.expires_at > now_ms}

    def insert_code(self, code: str, user_id: str, device_id: str, now_ms: int, expires_ms: int) -> bool:
        if code in self.codes:
            return False
        self.codes[code] = _Code(user_id, device_id, expires_ms)
        return True

    def code(self, code: str) -> tuple[str, int, bool] | None:
        found = self.codes.get(code)
        initiator = None if found is None else self.device(found.device_id)
        if found is None or initiator is None or initiator.revoked_at is not None or initiator.user_id != found.user_id:
            return None
        return found.user_id, found.expires_at, found.used

    def mark_code_used(self, code: str) -> None:
        self.codes[code].used = True

    def drop_device_codes(self, device_id: str) -> None:
        self.codes = {k: c for k, c in self.codes.items() if c.device_id != device_id}

    def last_device_seq(self, user_id: str, device_id: str) -> int:
        seqs = [e.device_seq for e in self.events.values() if e.user_id == user_id and e.device_id == device_id]
        return max(seqs, default=0)

    def lock_failures(self) -> None:
        pass

    def count_failures(self, peer: str, minute_ago_ms: int, hour_ago_ms: int) -> tuple[int, int]:
        everyone = sum(1 for at, _ in self.failures if at > minute_ago_ms)
        return everyone, sum(1 for at, p in self.failures if p == peer and at > hour_ago_ms)

    def record_failure(self, peer: str, now_ms: int) -> None:
        self.failures.append((now_ms, peer))

    # --- profiles
    def ensure_profile(self, user_id: str, now_ms: int) -> None:
        self.profiles.setdefault(user_id, _Profile(now_ms, now_ms))

    def profile(self, user_id: str) -> Profile:
        p, user = self.profiles[user_id], self.users.get(user_id)
        last_seen = p.updated_at if user is None or user.last_activity is None else user.last_activity
        return Profile(user_id, p.display_name, p.email, p.avatar_url, dict(p.preferences), p.onboarding_completed,
                       p.created_at, p.updated_at, last_seen, 0 if user is None else user.stored_bytes)

    def save_profile(self, profile: Profile) -> None:
        p = self.profiles[profile.user_id]
        p.display_name, p.email, p.preferences = profile.display_name, profile.email, dict(profile.preferences)
        p.onboarding_completed, p.updated_at = profile.onboarding_completed, profile.updated_at

    # --- audit and signatures
    def add_audit(self, rows: Sequence[AuditRow]) -> None:
        self.audit.extend(AuditRecord(*row) for row in rows)

    def remember_signature(self, signature: str, expires_ms: int) -> bool:
        if signature in self.signatures:
            return False
        self.signatures[signature] = expires_ms
        return True

    # --- maintenance
    def mark_deleting(self, user_id: str) -> bool:
        if user_id not in self.users:
            return False
        self.users[user_id].deleting = True
        return True

    def user_event_sizes(self, user_id: str, limit: int) -> Iterable[SizedKey]:
        rows = sorted((e.server_seq, row) for row, e in self.events.items() if e.user_id == user_id)
        return [(row, self.events[row].payload_size) for _, row in rows[:limit]]

    def delete_events(self, keys: Sequence[Any]) -> int:
        deleted = 0
        for row in keys:
            event = self.events.pop(row, None)
            if event is None:
                continue
            deleted += 1
            del self._by_seq[event.user_id, event.device_id, event.device_seq]
            del self._by_id[event.user_id, event.event_id]
            user = self.users.get(event.user_id)
            if user is not None:  # the bytes go back to the quota
                user.stored_bytes = max(0, user.stored_bytes - event.payload_size)
        return deleted

    def delete_user_rows(self, user_id: str) -> DeletedCounts:
        events = self.delete_events([row for row, e in self.events.items() if e.user_id == user_id])
        gone = {d for d, r in self.devices.items() if r.device.user_id == user_id}
        self.codes = {k: c for k, c in self.codes.items() if c.user_id != user_id and c.device_id not in gone}
        for device_id in gone:
            del self.devices[device_id]
        self.streams = {k: v for k, v in self.streams.items() if k[0] != user_id}
        self.profiles.pop(user_id, None)
        self.users.pop(user_id, None)
        return DeletedCounts(len(gone), events)

    def expire(self, now_ms: int, audit_before_ms: int, failures_before_ms: int) -> None:
        self.signatures = {s: at for s, at in self.signatures.items() if at >= now_ms}
        self.audit = [r for r in self.audit if r.at >= audit_before_ms]
        self.failures = [f for f in self.failures if f[0] >= failures_before_ms]
        self.codes = {k: c for k, c in self.codes.items() if c.expires_at >= now_ms}

    def expired_event_sizes(
        self, ttl_before_ms: int, created_before_ms: int, now_ms: int, limit: int
    ) -> Iterable[SizedKey]:
        events = self.events.items()
        past_ttl = [(r, e.payload_size) for r, e in events if e.ttl is not None and 0 < e.ttl < ttl_before_ms]
        old = [(r, e.payload_size) for r, e in events if e.created_at < created_before_ms and (e.ttl or 0) < now_ms]
        return (past_ttl + old)[:limit]

    def probe(self) -> None:
        pass


class InlineWriter:
    """Applies each operation at once (the writer of :class:`MemoryStore`); events it stores go to the
    commit hook before the caller gets its result, as with the batching writer."""

    def __init__(self, store: MemoryStore) -> None:
        self._store = store
        self.on_commit: CommitHook = _no_hook
        self.failing: str | None = None
        self.on_failure: Callable[[], None] = lambda: None
        self.observe: Callable[[str, float], None] = lambda kind, seconds: None

    async def submit(self, op: WriteOp[R]) -> R:
        await trio.lowlevel.checkpoint()
        self._store.check()
        result = op.run(self._store.tables, self._store.clock.now_ms())
        if isinstance(result, EventResult) and result.event is not None:
            await self.on_commit([result.event])
        return result

    async def enqueue(self, op: WriteOp[R], then: Callable[[Pending[R]], None]) -> None:
        self._store.check()  # like the breaker: refused at once while unavailable
        pending = Pending(op, then)
        try:
            pending.result = await self.submit(op)
        except StoreUnavailable as exc:
            pending.error = exc
        then(pending)

    def note_cursor(self, device_id: str, user_id: str, cursor: int) -> None:
        rules.flush(self._store.tables, {device_id: (user_id, cursor)}, {}, [], self._store.clock.now_ms())

    def note_seen(self, device_id: str, user_id: str) -> None:
        rules.flush(self._store.tables, {}, {device_id: user_id}, [], self._store.clock.now_ms())

    def note_audit(self, record: AuditRow) -> None:
        self._store.tables.add_audit([record])


async def _no_hook(events: Sequence[StoredEvent]) -> None:
    pass


class MemoryStore(BatchedWrites):
    """Usable without ``run`` (events then go to no commit hook); ``run`` sets the hook."""

    def __init__(self, clock: Clock | None = None, quota: Quota | None = None) -> None:
        self.clock = clock or Clock()
        self.tables = MemoryTables(quota or Quota())
        self.unavailable = False
        self._writer = self._inline = InlineWriter(self)

    def check(self) -> None:
        if self.unavailable:
            raise StoreUnavailable("the memory store is set unavailable")

    async def run(self, on_commit: CommitHook, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self._inline.on_commit = on_commit
        task_status.started()
        await trio.sleep_forever()

    async def _read(self) -> MemoryTables:
        await trio.lowlevel.checkpoint()
        self.check()
        return self.tables

    async def inactive_users(self, before_ms: int, limit: int) -> list[str]:
        t = await self._read()
        found = [u for u, user in t.users.items() if not t.live_devices(u)
                 and (user.created_at if user.last_activity is None else user.last_activity) < before_ms]
        return found[:limit]

    async def deleting_users(self) -> list[str]:
        return [u for u, user in (await self._read()).users.items() if user.deleting]

    async def head_seq(self, user_id: str) -> int:
        user = (await self._read()).users.get(user_id)
        return 0 if user is None else user.server_seq

    async def heads(self, user_ids: Sequence[str]) -> dict[str, int]:
        users = (await self._read()).users
        return {u: users[u].server_seq for u in user_ids if u in users}

    async def pairing_failures(self, peer: str, minute_ago_ms: int, hour_ago_ms: int) -> tuple[int, int]:
        return (await self._read()).count_failures(peer, minute_ago_ms, hour_ago_ms)

    def _pending(self, user_id: str, device_id: str, after: int, upto: int, now_ms: int) -> list[StoredEvent]:
        return sorted(
            (e for e in self.tables.events.values() if e.user_id == user_id and after < e.server_seq <= upto
             and e.device_id != device_id and (e.ttl is None or e.ttl > now_ms)),
            key=lambda e: e.server_seq,
        )

    async def count_pending(self, user_id: str, device_id: str, after: int, upto: int, now_ms: int) -> int:
        await self._read()
        return len(self._pending(user_id, device_id, after, upto, now_ms))

    async def read_events(
        self, user_id: str, after: int, upto: int, *, exclude_device: str, now_ms: int, limit: int, max_bytes: int
    ) -> Page:
        await self._read()
        events = self._pending(user_id, exclude_device, after, upto, now_ms)[: limit + 1]
        return paginate((attrs.astuple(e) for e in events), limit, max_bytes)

    async def get_device(self, device_id: str) -> Device | None:
        return (await self._read()).device(device_id)

    async def list_devices(self, user_id: str) -> list[Device]:
        return (await self._read()).live_devices(user_id)

    async def device_states(self, device_ids: Sequence[str]) -> dict[str, DeviceState]:
        tables = await self._read()
        states = {}
        for device_id in device_ids:
            row = tables.devices.get(device_id)
            if row is not None:
                user = tables.users.get(row.device.user_id)
                states[device_id] = DeviceState(
                    device_id, row.device.user_id, row.device.revoked_at is not None, row.revoke_reason,
                    bool(user and user.deleting), row.connection_id,
                )
        return states

    async def list_users(self, limit: int) -> list[UserSummary]:
        tables = await self._read()
        summaries = []
        for user_id, user in tables.users.items():
            devices = [r.device for r in tables.devices.values() if r.device.user_id == user_id]
            live = sum(d.revoked_at is None for d in devices)
            summaries.append(UserSummary(user_id, user.created_at, user.last_activity, live, len(devices) - live,
                                         user.stored_bytes, user.deleting))
        summaries.sort(key=lambda u: u.last_activity or u.created_at, reverse=True)
        return summaries[:limit]

    async def all_devices(self, user_id: str | None, limit: int) -> list[Device]:
        rows = [r.device for r in (await self._read()).devices.values() if user_id in (None, r.device.user_id)]
        rows.sort(key=lambda d: d.registered_at, reverse=True)
        return rows[:limit]

    async def revoked_devices(self, user_id: str | None, limit: int) -> list[RevokedDevice]:
        rows = [r for r in (await self._read()).devices.values()
                if r.device.revoked_at is not None and user_id in (None, r.device.user_id)]
        rows.sort(key=lambda r: r.device.revoked_at or 0, reverse=True)
        return [RevokedDevice(r.device.device_id, r.device.user_id, r.device.revoked_at or 0, r.revoke_reason)
                for r in rows[:limit]]

    async def file_events(self, user_id: str, limit: int, offset: int, now_ms: int) -> tuple[list[StoredEvent], int]:
        files = [e for e in (await self._read()).events.values()
                 if e.user_id == user_id and e.type == "file:metadata" and (e.ttl is None or e.ttl > now_ms)]
        files.sort(key=lambda e: e.server_seq, reverse=True)
        return files[offset : offset + limit], len(files)

    async def audit_log(self, limit: int, action: str | None) -> list[AuditRecord]:
        records = (await self._read()).audit
        return [r for r in reversed(records) if action in (None, r.action)][:limit]

    async def ping(self) -> None:
        await self._read()

    def stats(self) -> dict[str, float]:
        return {"pool_size": 0, "pool_idle": 0, "pool_waiting": 0, "writer_queue": 0, "breaker_open": 0,
                "audit_dropped": 0}
