"""The write operations of the batching writer: one small class each, knowing its rule.

``BatchWriter.submit(op)`` returns what ``op.run`` returns (``WriteOp[R]`` → ``R``). A backend runs
``op.run(tx, now_ms)`` inside the batch transaction, ``tx`` being its implementation of
:class:`~pocketbridge.store.rules.StoreTx`; appends are special to each backend's batch (no savepoint,
pipelined on PostgreSQL), but still run through ``tx.append``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Generic, TypeVar

import attrs

from ..audit import AuditRow
from ..protocol.events import NewEvent
from . import (
    ENDS_CHAIN,
    Admission,
    AdmitRequest,
    Chain,
    DeletedCounts,
    Device,
    EventResult,
    Outcome,
    PairingResult,
    Profile,
    Rename,
    Unrevoke,
    rules,
)
from .rules import StoreTx

R = TypeVar("R", covariant=True)


class WriteOp(Generic[R]):
    """One write: ``run`` applies its rule inside the batch transaction."""

    reads_cursors: ClassVar[bool] = False  # the writer flushes noted cursors first, so the op sees them
    off_loop: ClassVar[bool] = False  # long work (chunks of deletion): statements and commit off the event loop

    def run(self, tx: StoreTx, now_ms: int) -> R:
        raise NotImplementedError

    @property
    def name(self) -> str:
        return type(self).__name__


@attrs.frozen
class AdmitOp(WriteOp[Admission]):
    request: AdmitRequest
    reads_cursors = True

    def run(self, tx: StoreTx, now_ms: int) -> Admission:
        return rules.admit(tx, self.request, now_ms)


@attrs.frozen
class AppendOp(WriteOp[EventResult]):
    event: NewEvent
    chain: Chain | None = attrs.field(default=None, eq=False, repr=False)  # its connection's events in flight
    index: int = 0  # its number in the chain

    @property
    def runs(self) -> bool:
        """False once an earlier event of its chain ended it, or its connection closed."""
        return self.chain is None or self.chain.runs(self.index)

    def settle(self, result: EventResult) -> EventResult:
        """Record an outcome that ends the chain: nothing later from the connection commits."""
        if self.chain is not None and result.outcome in ENDS_CHAIN:
            self.chain.stop(self.index)
        return result

    def run(self, tx: StoreTx, now_ms: int) -> EventResult:
        if not self.runs:
            return ABANDONED
        return self.settle(tx.append(self.event, now_ms))


ABANDONED = EventResult(Outcome.ABANDONED)


@attrs.frozen
class PresenceOp(WriteOp[int]):
    device_id: str
    connection_id: str
    online: bool

    def run(self, tx: StoreTx, now_ms: int) -> int:
        return rules.set_presence(tx, self.device_id, self.connection_id, self.online, now_ms)


@attrs.frozen
class BeatOp(WriteOp[int]):
    instance_id: str
    stale_after_ms: int

    def run(self, tx: StoreTx, now_ms: int) -> int:
        return tx.beat(self.instance_id, now_ms, self.stale_after_ms)


@attrs.frozen
class CoalescedOp(WriteOp[dict[str, tuple[str, int]]]):
    """Delivery cursors, activity stamps and audit records, noted by many and written together; the
    result is the cursors skipped because another instance held their rows (noted again by the writer)."""

    cursors: dict[str, tuple[str, int]]
    seen: dict[str, str]
    audit: list[AuditRow]

    def run(self, tx: StoreTx, now_ms: int) -> dict[str, tuple[str, int]]:
        return rules.flush(tx, self.cursors, self.seen, self.audit, now_ms)


@attrs.frozen
class PairingCodeOp(WriteOp[tuple[str, int] | None]):
    user_id: str
    device_id: str
    ttl_ms: int
    max_devices: int

    def run(self, tx: StoreTx, now_ms: int) -> tuple[str, int] | None:
        return rules.create_pairing_code(tx, self.user_id, self.device_id, self.ttl_ms, self.max_devices, now_ms)


@attrs.frozen
class CompletePairingOp(WriteOp[PairingResult]):
    code: str
    device_id: str
    max_devices: int
    peer: str
    failure_limits: tuple[int, int]
    reads_cursors = True

    def run(self, tx: StoreTx, now_ms: int) -> PairingResult:
        return rules.complete_pairing(
            tx, self.code, self.device_id, self.max_devices, self.peer, self.failure_limits, now_ms
        )


@attrs.frozen
class RevokeOp(WriteOp[Device | None]):
    device_id: str
    reason: str
    user_id: str | None

    def run(self, tx: StoreTx, now_ms: int) -> Device | None:
        return rules.revoke(tx, self.device_id, self.reason, self.user_id, now_ms)


@attrs.frozen
class RenameOp(WriteOp[Rename]):
    user_id: str
    device_id: str
    device_name: str

    def run(self, tx: StoreTx, now_ms: int) -> Rename:
        return rules.rename(tx, self.user_id, self.device_id, self.device_name)


@attrs.frozen
class UnrevokeOp(WriteOp[Unrevoke]):
    device_id: str
    max_devices: int

    def run(self, tx: StoreTx, now_ms: int) -> Unrevoke:
        return rules.unrevoke(tx, self.device_id, self.max_devices)


@attrs.frozen
class GetProfileOp(WriteOp[Profile]):
    user_id: str

    def run(self, tx: StoreTx, now_ms: int) -> Profile:
        return rules.get_profile(tx, self.user_id, now_ms)


@attrs.frozen
class UpdateProfileOp(WriteOp[Profile]):
    user_id: str
    changes: dict[str, Any]

    def run(self, tx: StoreTx, now_ms: int) -> Profile:
        return rules.update_profile(tx, self.user_id, self.changes, now_ms)


@attrs.frozen
class SignatureOp(WriteOp[bool]):
    signature: str
    expires_ms: int

    def run(self, tx: StoreTx, now_ms: int) -> bool:
        return tx.remember_signature(self.signature, self.expires_ms)


@attrs.frozen
class MarkDeletingOp(WriteOp[bool]):
    user_id: str

    def run(self, tx: StoreTx, now_ms: int) -> bool:
        return tx.mark_deleting(self.user_id)


@attrs.frozen
class DeleteUserEventsOp(WriteOp[int]):
    user_id: str
    off_loop = True

    def run(self, tx: StoreTx, now_ms: int) -> int:
        return rules.delete_user_events(tx, self.user_id)


@attrs.frozen
class DeleteUserOp(WriteOp[DeletedCounts]):
    user_id: str
    off_loop = True

    def run(self, tx: StoreTx, now_ms: int) -> DeletedCounts:
        return tx.delete_user_rows(self.user_id)


@attrs.frozen
class PurgeOp(WriteOp[int]):
    retention_ms: int
    ttl_grace_ms: int
    limit: int
    audit_ms: int
    off_loop = True

    def run(self, tx: StoreTx, now_ms: int) -> int:
        return rules.purge(tx, self.retention_ms, self.ttl_grace_ms, self.limit, self.audit_ms, now_ms)


@attrs.frozen
class ProbeOp(WriteOp[None]):
    """The smallest real write: finds out whether writes work again while nobody else writes."""

    def run(self, tx: StoreTx, now_ms: int) -> None:
        tx.probe()
