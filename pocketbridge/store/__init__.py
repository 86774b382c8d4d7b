"""Storage: the source of truth, behind one small interface.

Backends: ``sqlite`` (embedded default, :mod:`pocketbridge.store.sqlite`), ``postgres``, and the
in-memory store for tests (:mod:`pocketbridge.store.memory`). Every write is a typed operation
(:mod:`pocketbridge.store.ops`) whose decisions are written once (:mod:`pocketbridge.store.rules`)
over small role interfaces each backend implements with its SQL. Writes go through one batching writer
task (:mod:`pocketbridge.store.writer`): events of many connections, device admissions, presence and
cursor moves are committed together per transaction, so the hot path never pays a store round trip per
event. Reads use their own connections.

Errors: a backend raises :class:`~pocketbridge.errors.StoreUnavailable` when it cannot answer in
time; the gateway maps that to close 1013 and the HTTP side to 503.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import attrs

if TYPE_CHECKING:
    from ..protocol.events import NewEvent


@attrs.frozen
class StoredEvent:
    """An event as committed. ``wire()`` gives exactly the fields relayed and replayed (§5.5)."""

    user_id: str
    server_seq: int
    event_id: str
    device_id: str
    device_seq: int
    stream_id: str
    stream_seq: int
    type: str
    encrypted_payload: str
    payload_size: int
    ttl: int | None
    created_at: int
    # the trace context of the span that ingested it, while tracing is on (carried on to the bus message)
    trace: dict[str, str] | None = attrs.field(default=None, eq=False, repr=False)

    def wire(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "event_id": self.event_id,
            "user_id": self.user_id,
            "device_id": self.device_id,
            "device_seq": self.device_seq,
            "stream_id": self.stream_id,
            "stream_seq": self.stream_seq,
            "type": self.type,
            "encrypted_payload": self.encrypted_payload,
        }
        if self.ttl is not None:
            payload["ttl"] = self.ttl
        payload["created_at"] = self.created_at
        return payload


@attrs.frozen
class Device:
    device_id: str
    user_id: str
    bound_key: str
    device_name: str | None
    device_type: str | None
    registered_at: int
    last_seen: int | None
    is_online: bool
    last_ack_device_seq: int
    delivery_cursor: int
    revoked_at: int | None


class Admit(enum.Enum):
    OK = "ok"
    KEY_MISMATCH = "key_mismatch"
    REVOKED = "revoked"
    LIMIT = "limit"
    DELETING = "deleting"


@attrs.frozen
class AdmitRequest:
    """A verified handshake asking to register or resume device ``device_id`` with key ``key``."""

    key: str
    device_id: str
    device_name: str | None
    device_type: str | None
    max_devices: int


@attrs.frozen
class Admission:
    outcome: Admit
    device: Device | None = None
    created: bool = False  # the device was registered by this handshake


class Outcome(enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"  # same (user, device, device_seq), other event_id
    REVOKED = "revoked"  # the device was revoked (or moved away) before the commit
    DELETING = "deleting"  # the user is being deleted
    STORAGE_FULL = "storage_full"  # free disk below [storage] min_free_bytes: refused, nothing written
    QUOTA_EXCEEDED = "quota_exceeded"  # the user's stored bytes or byte rate is over its limit
    ABANDONED = "abandoned"  # not tried: an earlier event of its connection ended the chain (see Chain)


# Outcomes after which the session closes: nothing later from the same connection may commit.
ENDS_CHAIN = frozenset({Outcome.CONFLICT, Outcome.REVOKED, Outcome.DELETING})


@attrs.frozen
class EventResult:
    outcome: Outcome
    event: StoredEvent | None = None


class Chain:
    """One connection's events in the writer, numbered in the order the connection sent them.

    Several of a connection's events may wait in the writer at once (their acks go out in order); once
    one of them ends the chain (:data:`ENDS_CHAIN`) or the connection closes, none after it commits: they
    are not tried and come back :attr:`Outcome.ABANDONED`."""

    __slots__ = ("last", "stop_after")

    def __init__(self) -> None:
        self.last = 0  # the number of the connection's latest event
        self.stop_after: int | None = None  # events numbered above this are not tried

    def next(self) -> int:
        self.last += 1
        return self.last

    def runs(self, index: int) -> bool:
        return self.stop_after is None or index <= self.stop_after

    def stop(self, after: int = 0) -> None:
        """Nothing numbered above ``after`` commits (0: nothing not yet tried)."""
        if self.stop_after is None or after < self.stop_after:
            self.stop_after = after


# What an event's commit tells its connection: the result, or the error that failed its batch.
AppendDone = Callable[[EventResult | None, BaseException | None], None]


class Pairing(enum.Enum):
    OK = "ok"
    SAME_ACCOUNT = "same_account"
    NOT_FOUND = "not_found"  # no such code, expired, or its initiator is gone: a counted failure
    USED = "used"  # consumed by a concurrent attempt: reported as not found, not counted
    LIMIT = "limit"  # the initiator's account is full; the code stays valid
    LOCKED_PEER = "locked_peer"  # the address used up its failures of the last hour: the code is not tried
    LOCKED_DEPLOYMENT = "locked_deployment"  # the deployment-wide failures of the last minute are used up


@attrs.frozen
class PairingResult:
    outcome: Pairing
    user_id: str = ""  # the initiator's user U_A
    last_ack_device_seq: int = 0
    device: Device | None = None  # the joining device after the move


class Rename(enum.Enum):
    OK = "ok"
    NOT_FOUND = "not_found"
    TAKEN = "taken"


class Unrevoke(enum.Enum):
    OK = "ok"
    NOT_FOUND = "not_found"
    LIMIT = "limit"


@attrs.frozen
class Profile:
    user_id: str
    display_name: str | None
    email: str | None
    avatar_url: str | None
    preferences: dict[str, Any]
    onboarding_completed: bool
    created_at: int
    updated_at: int
    last_seen: int
    stored_bytes: int = 0  # payload bytes of the user's stored events (the quota's usage)


@attrs.frozen
class DeviceState:
    """What the store says of a connected device (checked against the bus's messages by the catch-up poll)."""

    device_id: str
    user_id: str
    revoked: bool
    revoke_reason: str | None
    deleting: bool  # its user is being deleted
    connection_id: str | None  # the connection the store last marked online


@attrs.frozen
class UserSummary:
    """One account as the admin API lists it."""

    user_id: str
    created_at: int
    last_activity: int | None
    devices: int  # not revoked
    revoked_devices: int
    stored_bytes: int
    deleting: bool


@attrs.frozen
class RevokedDevice:
    device_id: str
    user_id: str
    revoked_at: int
    reason: str | None


@attrs.frozen
class AuditRecord:
    at: int
    action: str
    actor: str | None
    target: str | None
    peer: str | None
    detail: str | None


@attrs.frozen
class DeletedCounts:
    devices: int
    events: int


@attrs.frozen
class Page:
    events: list[StoredEvent]
    has_more: bool


def new_pairing_code() -> str:
    """Six decimal digits, uniform over 000000–999999 from the CSPRNG (no modulo bias)."""
    return f"{secrets.randbelow(1_000_000):06d}"


# A conservative estimate of an event's encoded size beyond its payload (ids, keys, numbers).
EVENT_OVERHEAD_BYTES = 400


def paginate(rows: Any, limit: int, max_bytes: int) -> Page:
    """Fill a page from ascending event rows (fetched with LIMIT limit + 1), within ``max_bytes``."""
    events: list[StoredEvent] = []
    size = 0
    for row in rows:
        event = StoredEvent(*row)
        cost = len(event.encrypted_payload) + EVENT_OVERHEAD_BYTES
        if len(events) >= limit or (events and size + cost > max_bytes):
            return Page(events, True)
        events.append(event)
        size += cost
    return Page(events, False)


CommitHook = Callable[[Sequence[StoredEvent]], Awaitable[None]]


@attrs.frozen
class Quota:
    """Per-user storage limits (``[limits]``): stored payload bytes, and payload bytes per minute as a
    token bucket holding at most one minute's worth. 0 means unlimited."""

    max_bytes: int = 0
    bytes_per_minute: int = 0

    def charge(
        self, stored: int, tokens: float | None, at_ms: int | None, size: int, now_ms: int
    ) -> tuple[float | None, int] | None:
        """The bucket after storing ``size`` more bytes (tokens, at), or None if the event is over a limit."""
        if self.max_bytes and stored + size > self.max_bytes:
            return None
        if not self.bytes_per_minute:
            return None, now_ms
        rate = self.bytes_per_minute / 60_000  # bytes per millisecond
        available = self.bytes_per_minute if tokens is None or at_ms is None else tokens
        if at_ms is not None:
            available = min(self.bytes_per_minute, available + max(0, now_ms - at_ms) * rate)
        if size > available:
            return None
        return available - size, now_ms


CHUNK_ROWS = 500  # events deleted per transaction when deleting an account or purging
CHUNK_BYTES = 16 * 1024 * 1024  # ... and at most this much payload (at least one event)


def take_chunk(rows: Iterable[Sequence[Any]], max_bytes: int = CHUNK_BYTES) -> list[Any]:
    """The keys of ``(key, payload_size)`` rows up to ``max_bytes`` of payload (at least one)."""
    keys: list[Any] = []
    total = 0
    for key, size in rows:
        if keys and total + size > max_bytes:
            break
        keys.append(key)
        total += size
    return keys


class Store(Protocol):
    """What the rest of the daemon may ask of storage. Keep it narrow."""

    async def run(self, on_commit: CommitHook, *, task_status: Any = ...) -> None:
        """Open connections, start the writer; ``task_status.started()`` once usable; close on cancel."""

    async def admit_device(self, request: AdmitRequest, now_ms: int) -> Admission: ...

    async def append_event(self, event: NewEvent) -> EventResult: ...

    async def start_append(self, event: NewEvent, chain: Chain, done: AppendDone) -> None:
        """Queue ``event`` as the next of ``chain`` without waiting for its commit: ``done(result, error)``
        is called once its batch has committed (or failed), in the order the chain's events were queued.
        Waits only while the writer's queue is full; raises StoreUnavailable while the store is down."""

    async def set_presence(self, device_id: str, connection_id: str, online: bool) -> int:
        """Mark the device on- or offline (offline only if ``connection_id`` is still the one that set
        it online); returns its user's head seq as of this commit (H, when going online)."""

    def note_cursor(self, device_id: str, user_id: str, cursor: int) -> None:
        """Raise a device's delivery cursor lazily (coalesced, flushed at least once a second)."""

    def note_seen(self, device_id: str, user_id: str) -> None:
        """Refresh ``last_seen`` of a device and ``last_activity`` of its user lazily (coalesced)."""

    async def create_pairing_code(
        self, user_id: str, device_id: str, ttl_ms: int, max_devices: int
    ) -> tuple[str, int] | None:
        """A fresh unique code for the initiator (replacing its previous one) and its expiry in ms;
        None when the initiator's account is at the device limit."""

    async def complete_pairing(
        self, code: str, device_id: str, max_devices: int, peer: str, failure_limits: tuple[int, int]
    ) -> PairingResult:
        """§7 steps 3–6 atomically. Check and charge in one step, across instances: with ``failure_limits``
        (per address per hour, deployment-wide per minute; 0 = none) an exhausted limit refuses before the
        code is tried, and a NOT_FOUND outcome is recorded as a failure of ``peer``."""

    async def pairing_failures(self, peer: str, minute_ago_ms: int, hour_ago_ms: int) -> tuple[int, int]:
        """Failed pairing attempts recorded by every instance: (deployment-wide since ``minute_ago_ms``,
        from ``peer`` since ``hour_ago_ms``)."""

    async def revoke_device(self, device_id: str, reason: str, user_id: str | None = None) -> Device | None:
        """Revoke (idempotent); None if unknown or not in ``user_id``. Returns the device as it was."""

    async def inactive_users(self, before_ms: int, limit: int) -> list[str]:
        """Users whose every device is revoked and with no activity since ``before_ms``."""

    async def deleting_users(self) -> list[str]:
        """Users marked deleting (a deletion cut short by a crash is finished by the purge)."""

    async def mark_deleting(self, user_id: str) -> bool:
        """Flag the user so no handshake or event of it is admitted; False if it does not exist."""

    async def delete_user(self, user_id: str) -> DeletedCounts:
        """Remove everything of a user marked deleting: its events in bounded chunks (one transaction
        each, off the event loop), then the rest in one transaction."""

    async def purge(self, retention_ms: int, ttl_grace_ms: int, limit: int, audit_ms: int) -> int:
        """Delete up to ``limit`` events (and at most CHUNK_BYTES of payload) past their ttl (+ grace)
        or retention (and audit records older than ``audit_ms``, expired signatures and pairing codes);
        returns the event count: call again until it is 0."""

    def note_audit(
        self, at_ms: int, action: str, actor: str | None, target: str | None, peer: str | None, detail: str | None
    ) -> None:
        """Record a security-relevant action (coalesced with the next write; never keys or payloads)."""

    async def audit_log(self, limit: int, action: str | None) -> list[AuditRecord]:
        """Newest audit records first."""

    async def head_seq(self, user_id: str) -> int: ...

    async def heads(self, user_ids: Sequence[str]) -> dict[str, int]:
        """Head seqs of several users (the catch-up poll)."""

    async def beat(self, instance_id: str, stale_after_ms: int) -> int:
        """Mark this instance alive; set devices of silent instances offline; returns how many."""

    async def count_pending(self, user_id: str, device_id: str, after: int, upto: int, now_ms: int) -> int:
        """Events of the user in (after, upto] not sent by ``device_id`` and not expired."""

    async def read_events(
        self,
        user_id: str,
        after: int,
        upto: int,
        *,
        exclude_device: str,
        now_ms: int,
        limit: int,
        max_bytes: int,
    ) -> Page:
        """Ascending page of the user's events in (after, upto]; at least one event if any."""

    async def get_device(self, device_id: str) -> Device | None: ...

    async def list_devices(self, user_id: str) -> list[Device]:
        """The user's non-revoked devices."""

    async def device_states(self, device_ids: Sequence[str]) -> dict[str, DeviceState]:
        """The states of these devices (a device missing from the answer no longer exists)."""

    async def list_users(self, limit: int) -> list[UserSummary]:
        """Accounts, most recently active first (admin API)."""

    async def all_devices(self, user_id: str | None, limit: int) -> list[Device]:
        """Devices of ``user_id`` (or of everyone), revoked ones included, newest registration first (admin API)."""

    async def rename_device(self, user_id: str, device_id: str, name: str) -> Rename: ...

    async def unrevoke_device(self, device_id: str, max_devices: int) -> Unrevoke: ...

    async def revoked_devices(self, user_id: str | None, limit: int) -> list[RevokedDevice]: ...

    async def get_profile(self, user_id: str) -> Profile:
        """The user's profile, created with defaults on first use."""

    async def update_profile(self, user_id: str, changes: dict[str, Any]) -> Profile:
        """Apply ``changes`` (display_name, email, preferences merged, onboarding_completed)."""

    async def file_events(self, user_id: str, limit: int, offset: int, now_ms: int) -> tuple[list[StoredEvent], int]:
        """Unexpired ``file:metadata`` events, newest first, and their total."""

    async def remember_signature(self, signature: str, expires_ms: int) -> bool:
        """Record a PB1 signature until ``expires_ms``; False if it was already recorded (a replay)."""

    async def ping(self) -> None:
        """A round trip; raises StoreUnavailable."""

    def observe_with(self, hook: Callable[[str, float], None]) -> None:
        """Report each write batch's and read's latency to ``hook(kind, seconds)``."""

    def stats(self) -> dict[str, float]:
        """Gauges for metrics: pool_size, pool_idle, pool_waiting, writer_queue, breaker_open, audit_dropped."""

    def space_low(self) -> bool:
        """Free disk is below ``[storage] min_free_bytes``: new events are refused (STORAGE_FULL)."""

    @property
    def write_failing(self) -> str | None:
        """None while writes work; "storage_full" or "write_failed" after a failed batch, until one commits."""

    def on_write_failure(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` after a failed write batch (its outcome may be unknown: re-read the store)."""
