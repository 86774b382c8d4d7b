"""The store's decisions, written once: device admission, the append rule, pairing, revocation, renames,
profiles, deletion and purging.

A rule is plain Python over small role interfaces (the ``*Tx`` protocols below). Each backend implements
them inside its write transaction with only its SQL, placeholders and locking: ``lock_user`` and the
lookups are ``FOR UPDATE`` on PostgreSQL (several instances write), and do nothing more on SQLite or in
memory (one writer per store). Rules run in the batching writer, one transaction per batch, each
operation in its own savepoint.

The append rule (:func:`append_event`) is the one the embedded and in-memory stores run; PostgreSQL runs
the same decisions in PL/pgSQL (``pb_append_event`` in schema.sql, one round trip per event): change both
together. The contract tests (tests/unit/test_store_contract.py) run the same cases on every backend.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Iterable, Sequence
from typing import Any, Protocol

import attrs

from ..audit import AuditRow
from ..protocol.events import NewEvent
from ..protocol.names import dedupe_device_name
from . import (
    CHUNK_ROWS,
    Admission,
    Admit,
    AdmitRequest,
    DeletedCounts,
    Device,
    EventResult,
    Outcome,
    Pairing,
    PairingResult,
    Profile,
    Quota,
    Rename,
    StoredEvent,
    Unrevoke,
    new_pairing_code,
    take_chunk,
)

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
SizedKey = tuple[Hashable, int]  # (the backend's key of an event row, its payload size)


# --- roles ------------------------------------------------------------------------------------------------
@attrs.frozen
class Sender:
    """What the append rule needs to know about an event's device and its user."""

    user_id: str  # the device's current owner
    revoked: bool
    deleting: bool  # the owner is being deleted
    stored_bytes: int
    quota_tokens: float | None
    quota_at: int | None


class EventsTx(Protocol):
    """The rows behind the append rule (SQLite and memory; PostgreSQL has ``pb_append_event``)."""

    def sender(self, device_id: str) -> Sender | None: ...

    def known_event(self, user_id: str, device_id: str, device_seq: int, event_id: str) -> tuple[str, bool] | None:
        """The user's event at (device_id, device_seq) as (its event_id, True), else the one with
        ``event_id`` as (event_id, False), else None."""

    def next_server_seq(self, user_id: str, size: int, bucket: tuple[float | None, int], now_ms: int) -> int:
        """Count ``size`` more stored bytes and the new quota bucket, stamp activity; the new head seq."""

    def next_stream_seq(self, user_id: str, stream_id: str) -> int: ...

    def insert_event(self, event: StoredEvent) -> None:
        """Store it and raise its device's ``last_ack_device_seq`` (the backend may do that per batch)."""


class DevicesTx(Protocol):
    def device(self, device_id: str) -> Device | None:
        """The device (locked against other writers until the commit)."""

    def user_deleting(self, user_id: str) -> bool: ...

    def ensure_user(self, user_id: str, now_ms: int) -> None:
        """Create the user if it is new, and lock it (the lock that makes the device limit hold)."""

    def lock_user(self, user_id: str) -> None: ...

    def count_devices(self, user_id: str) -> int:
        """The user's devices that are not revoked."""

    def taken_names(self, user_id: str) -> set[str]:
        """Names of the user's devices that are not revoked."""

    def insert_device(self, device: Device) -> None: ...

    def set_name_and_type(self, device_id: str, name: str | None, device_type: str | None) -> None: ...

    def move_device(self, device_id: str, user_id: str, name: str | None, last_ack: int) -> None:
        """Into ``user_id``, with its delivery cursor back at 0."""

    def revoke(self, device_id: str, reason: str, now_ms: int) -> None:
        """Revoked (the first revocation's time and reason stay) and offline."""

    def unrevoke(self, device_id: str, name: str | None) -> None: ...

    def set_presence(self, device_id: str, connection_id: str, online: bool, now_ms: int) -> None:
        """Online with ``connection_id``; offline only while ``connection_id`` is still the one online."""

    def device_head(self, device_id: str) -> int:
        """The server_seq of the device's user (0 if unknown)."""

    def beat(self, instance_id: str, now_ms: int, stale_after_ms: int) -> int:
        """This instance is alive; devices of instances silent for ``stale_after_ms`` go offline: how many."""

    def raise_cursors(self, cursors: Sequence[tuple[str, str, int]], stamp: Collection[str], now_ms: int) -> list[str]:
        """(device_id, user_id, cursor): each device's delivery cursor raised, if it is still in that user, and
        ``last_seen`` set for those in ``stamp``, in one write per device. Returns the devices skipped because
        another transaction holds them (they never wait: see :func:`flush`)."""

    def touch(self, device_ids: Sequence[str], user_ids: Sequence[str], now_ms: int) -> None:
        """``last_seen`` of the devices and ``last_activity`` of the users (skipped where contended)."""


class PairingTx(Protocol):
    def drop_codes(self, device_id: str, now_ms: int) -> None:
        """The device's code and every expired one."""

    def insert_code(self, code: str, user_id: str, device_id: str, now_ms: int, expires_ms: int) -> bool:
        """False if ``code`` is taken."""

    def code(self, code: str) -> tuple[str, int, bool] | None:
        """(initiator user, expires_ms, used) of a code whose initiator is a live device of that user (locked)."""

    def mark_code_used(self, code: str) -> None: ...

    def drop_device_codes(self, device_id: str) -> None: ...

    def last_device_seq(self, user_id: str, device_id: str) -> int:
        """The highest device_seq of ``device_id`` among the user's events (0 if none)."""

    def lock_failures(self) -> None:
        """Make attempts of every instance take turns between counting failures and recording one."""

    def count_failures(self, peer: str, minute_ago_ms: int, hour_ago_ms: int) -> tuple[int, int]:
        """(deployment-wide since ``minute_ago_ms``, from ``peer`` since ``hour_ago_ms``)."""

    def record_failure(self, peer: str, now_ms: int) -> None: ...


class ProfilesTx(Protocol):
    def ensure_profile(self, user_id: str, now_ms: int) -> None: ...

    def profile(self, user_id: str) -> Profile:
        """The profile (which exists; locked), with its user's activity and stored bytes."""

    def save_profile(self, profile: Profile) -> None:
        """display_name, email, preferences, onboarding_completed, updated_at."""


class AuditTx(Protocol):
    def add_audit(self, rows: Sequence[AuditRow]) -> None: ...

    def remember_signature(self, signature: str, expires_ms: int) -> bool:
        """False if it was already remembered."""


class MaintenanceTx(Protocol):
    def mark_deleting(self, user_id: str) -> bool: ...

    def user_event_sizes(self, user_id: str, limit: int) -> Iterable[SizedKey]:
        """The user's first ``limit`` events (by server_seq) as (key, payload_size)."""

    def delete_events(self, keys: Sequence[Any]) -> int:
        """Delete by key, giving their bytes back to their users' quotas; how many."""

    def delete_user_rows(self, user_id: str) -> DeletedCounts:
        """Everything of the user: events, codes, devices, streams, profile, the user."""

    def expire(self, now_ms: int, audit_before_ms: int, failures_before_ms: int) -> None:
        """Drop expired signatures and pairing codes, old audit records and pairing failures."""

    def expired_event_sizes(
        self, ttl_before_ms: int, created_before_ms: int, now_ms: int, limit: int
    ) -> Iterable[SizedKey]:
        """Up to ``limit`` events past their ttl before ``ttl_before_ms``, or created before
        ``created_before_ms`` and not kept by a ttl still in the future, as (key, payload_size)."""

    def probe(self) -> None:
        """The smallest real write."""


class DeviceCodesTx(DevicesTx, PairingTx, Protocol):
    """Pairing and revocation move devices and drop their codes."""


class FlushTx(DevicesTx, AuditTx, Protocol):
    """The coalesced cursor, activity and audit writes."""


class StoreTx(DevicesTx, PairingTx, ProfilesTx, AuditTx, MaintenanceTx, Protocol):
    """One write transaction of a backend: every role, and the backend's append (see :func:`append_event`)."""

    def append(self, event: NewEvent, now_ms: int) -> EventResult: ...


# --- events ---------------------------------------------------------------------------------------------
def append_event(tx: EventsTx, ev: NewEvent, quota: Quota, now_ms: int) -> EventResult:
    """Exactly-once append (§5.4). Decides before it writes and cannot fail half-way.

    Keep in step with ``pb_append_event`` in schema.sql (the PostgreSQL fast path): the same checks in the
    same order — device gone/moved/revoked, user deleting, same (device, device_seq) (duplicate or
    conflict), same event_id (duplicate), quota — then server_seq, stream_seq and the row."""
    sender = tx.sender(ev.device_id)
    if sender is None or sender.user_id != ev.user_id or sender.revoked:
        return EventResult(Outcome.REVOKED)
    if sender.deleting:
        return EventResult(Outcome.DELETING)
    known = tx.known_event(ev.user_id, ev.device_id, ev.device_seq, ev.event_id)
    if known is not None:
        event_id, same_seq = known
        return EventResult(Outcome.CONFLICT if same_seq and event_id != ev.event_id else Outcome.DUPLICATE)
    bucket = quota.charge(sender.stored_bytes, sender.quota_tokens, sender.quota_at, ev.payload_size, now_ms)
    if bucket is None:
        return EventResult(Outcome.QUOTA_EXCEEDED)
    server_seq = tx.next_server_seq(ev.user_id, ev.payload_size, bucket, now_ms)
    stream_seq = tx.next_stream_seq(ev.user_id, ev.stream_id)
    stored = StoredEvent(
        ev.user_id, server_seq, ev.event_id, ev.device_id, ev.device_seq, ev.stream_id, stream_seq,
        ev.type, ev.encrypted_payload, ev.payload_size, ev.ttl, now_ms,
    )
    tx.insert_event(stored)
    return EventResult(Outcome.STORED, stored)


# --- devices --------------------------------------------------------------------------------------------
def admit(tx: DevicesTx, req: AdmitRequest, now_ms: int) -> Admission:
    """Register or resume a device. Refusals in this order: deleting, key mismatch, revoked, limit."""
    device = tx.device(req.device_id)
    if tx.user_deleting(req.key if device is None else device.user_id):
        return Admission(Admit.DELETING)
    if device is not None:
        if device.bound_key != req.key:
            return Admission(Admit.KEY_MISMATCH)
        if device.revoked_at is not None:
            return Admission(Admit.REVOKED)
        name = device.device_name
        if not name and req.device_name:
            name = dedupe_device_name(req.device_name, tx.taken_names(device.user_id))
        device_type = req.device_type or device.device_type
        tx.set_name_and_type(device.device_id, name, device_type)
        return Admission(Admit.OK, attrs.evolve(device, device_name=name, device_type=device_type))
    tx.ensure_user(req.key, now_ms)
    if tx.count_devices(req.key) >= req.max_devices:
        return Admission(Admit.LIMIT)
    name = dedupe_device_name(req.device_name, tx.taken_names(req.key)) if req.device_name else None
    device = Device(req.device_id, req.key, req.key, name, req.device_type, now_ms, now_ms, False, 0, 0, None)
    tx.insert_device(device)
    return Admission(Admit.OK, device, created=True)


def set_presence(tx: DevicesTx, device_id: str, connection_id: str, online: bool, now_ms: int) -> int:
    """The user's head as of this commit (the session subscribed before: anything later reaches it live)."""
    tx.set_presence(device_id, connection_id, online, now_ms)
    return tx.device_head(device_id)


def flush(
    tx: FlushTx, cursors: dict[str, tuple[str, int]], seen: dict[str, str], audit: Sequence[AuditRow], now_ms: int
) -> dict[str, tuple[str, int]]:
    """The writer's coalesced updates; returns the cursors it skipped, for the next flush.

    They never wait for a row another instance's batch holds (an event append holds its user's row, then
    its device's): devices and users another transaction holds are skipped, and each device row is written
    once (a second write of a row in one transaction makes PostgreSQL lock its user's row, FOR KEY SHARE,
    for the foreign key check: the wait that closed the cycle)."""
    tx.add_audit(audit)
    skipped = tx.raise_cursors(
        sorted((device_id, user_id, cursor) for device_id, (user_id, cursor) in cursors.items()), seen.keys(), now_ms
    )
    if seen:
        tx.touch(sorted(d for d in seen if d not in cursors), sorted(set(seen.values())), now_ms)
    return {device_id: cursors[device_id] for device_id in skipped}


def revoke(tx: DeviceCodesTx, device_id: str, reason: str, user_id: str | None, now_ms: int) -> Device | None:
    """Revoke (idempotent); None if unknown or not in ``user_id``. Returns the device as it was."""
    device = tx.device(device_id)
    if device is None or (user_id is not None and device.user_id != user_id):
        return None
    tx.revoke(device_id, reason, now_ms)
    tx.drop_device_codes(device_id)
    return device


def rename(tx: DevicesTx, user_id: str, device_id: str, name: str) -> Rename:
    device = tx.device(device_id)
    if device is None or device.user_id != user_id or device.revoked_at is not None:
        return Rename.NOT_FOUND
    if device.device_name != name and name in tx.taken_names(user_id):
        return Rename.TAKEN
    tx.set_name_and_type(device_id, name, device.device_type)
    return Rename.OK


def unrevoke(tx: DevicesTx, device_id: str, max_devices: int) -> Unrevoke:
    """Back into its account, if the account has room; its name is deduplicated again."""
    device = tx.device(device_id)
    if device is None:
        return Unrevoke.NOT_FOUND
    if device.revoked_at is None:
        return Unrevoke.OK
    tx.lock_user(device.user_id)
    if tx.count_devices(device.user_id) >= max_devices:
        return Unrevoke.LIMIT
    name = device.device_name and dedupe_device_name(device.device_name, tx.taken_names(device.user_id))
    tx.unrevoke(device_id, name)
    return Unrevoke.OK


# --- pairing (§7) ---------------------------------------------------------------------------------------
def create_pairing_code(
    tx: DeviceCodesTx, user_id: str, device_id: str, ttl_ms: int, max_devices: int, now_ms: int
) -> tuple[str, int] | None:
    """A fresh unique code replacing the initiator's previous one, and its expiry; None at the device limit."""
    if tx.count_devices(user_id) >= max_devices:
        return None
    tx.drop_codes(device_id, now_ms)
    expires_ms = now_ms + ttl_ms
    while True:
        code = new_pairing_code()
        if tx.insert_code(code, user_id, device_id, now_ms, expires_ms):
            return code, expires_ms


def complete_pairing(
    tx: DeviceCodesTx, code: str, device_id: str, max_devices: int, peer: str, failure_limits: tuple[int, int],
    now_ms: int,
) -> PairingResult:
    """§7 steps 3–6. With ``failure_limits`` (per address per hour, deployment-wide per minute; 0 = none)
    the check and the charge are one step: an exhausted limit refuses before the code is tried, and a
    NOT_FOUND outcome is recorded as a failure of ``peer``."""
    per_peer, per_minute = failure_limits
    if per_peer or per_minute:
        tx.lock_failures()
        everyone, mine = tx.count_failures(peer, now_ms - MINUTE_MS, now_ms - HOUR_MS)
        if per_peer and mine >= per_peer:
            return PairingResult(Pairing.LOCKED_PEER)
        if per_minute and everyone >= per_minute:
            return PairingResult(Pairing.LOCKED_DEPLOYMENT)
    result = _pair(tx, code, device_id, max_devices, now_ms)
    if result.outcome is Pairing.NOT_FOUND:
        tx.record_failure(peer, now_ms)
    return result


def _pair(tx: DeviceCodesTx, code: str, device_id: str, max_devices: int, now_ms: int) -> PairingResult:
    found = tx.code(code)
    if found is None or found[1] <= now_ms:
        return PairingResult(Pairing.NOT_FOUND)
    user_a, _, used = found
    if used:
        return PairingResult(Pairing.USED)
    joiner = tx.device(device_id)
    if joiner is None:  # the joining device was deleted meanwhile: not the code's fault, not counted
        return PairingResult(Pairing.USED)
    if joiner.user_id == user_a:
        tx.mark_code_used(code)
        return PairingResult(Pairing.SAME_ACCOUNT, user_a, joiner.last_ack_device_seq, joiner)
    tx.lock_user(user_a)
    if tx.count_devices(user_a) >= max_devices:
        return PairingResult(Pairing.LIMIT, user_a)
    tx.mark_code_used(code)
    name = joiner.device_name and dedupe_device_name(joiner.device_name, tx.taken_names(user_a))
    last_ack = tx.last_device_seq(user_a, device_id)
    tx.move_device(device_id, user_a, name, last_ack)
    tx.drop_device_codes(device_id)
    moved = attrs.evolve(joiner, user_id=user_a, device_name=name, last_ack_device_seq=last_ack, delivery_cursor=0)
    return PairingResult(Pairing.OK, user_a, last_ack, moved)


# --- profiles -------------------------------------------------------------------------------------------
def get_profile(tx: ProfilesTx, user_id: str, now_ms: int) -> Profile:
    """The user's profile, created with defaults on first use."""
    tx.ensure_profile(user_id, now_ms)
    return tx.profile(user_id)


PROFILE_FIELDS = ("display_name", "email")  # replaced as given


def update_profile(tx: ProfilesTx, user_id: str, changes: dict[str, Any], now_ms: int) -> Profile:
    """Apply ``changes``: display_name, email and onboarding_completed replaced, preferences merged."""
    current = get_profile(tx, user_id, now_ms)
    tx.save_profile(
        attrs.evolve(
            current,
            **{field: changes[field] for field in PROFILE_FIELDS if field in changes},
            onboarding_completed=bool(changes.get("onboarding_completed", current.onboarding_completed)),
            preferences={**current.preferences, **changes.get("preferences", {})},
            updated_at=now_ms,
        )
    )
    return tx.profile(user_id)


# --- deletion and purging -------------------------------------------------------------------------------
def delete_user_events(tx: MaintenanceTx, user_id: str) -> int:
    """One chunk of a deleting user's events (CHUNK_ROWS, CHUNK_BYTES): how many; 0 when none are left."""
    return tx.delete_events(take_chunk(tx.user_event_sizes(user_id, CHUNK_ROWS)))


def purge(tx: MaintenanceTx, retention_ms: int, ttl_grace_ms: int, limit: int, audit_ms: int, now_ms: int) -> int:
    """Expired signatures, codes, audit records and failures; then one chunk of events past their ttl
    (+ grace) or retention: how many events."""
    tx.expire(now_ms, now_ms - audit_ms, now_ms - HOUR_MS)
    rows = tx.expired_event_sizes(now_ms - ttl_grace_ms, now_ms - retention_ms, now_ms, limit)
    return tx.delete_events(sorted(set(take_chunk(rows))))
