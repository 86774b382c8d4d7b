"""The batching writer shared by the store backends.

Callers submit small write operations and await their result; one task drains the queue into
batches and hands each batch to the backend's ``apply_batch`` in a worker thread, where the whole
batch is one transaction (each operation in its own savepoint). After the commit, the stored events
go to the commit hook (fan-out) in commit order, then every caller is woken. Delivery-cursor moves
and activity stamps (``last_seen``) are coalesced here and written at most once a second, plus
once at shutdown.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

import attrs
import trio

from ..audit import AuditRow, AuditThrottle
from ..clock import Clock
from ..errors import StorageFull, StoreUnavailable
from ..protocol.events import NewEvent
from ..tracing import span, trace_context
from . import (
    Admission,
    AdmitRequest,
    AppendDone,
    Chain,
    CommitHook,
    DeletedCounts,
    Device,
    EventResult,
    Outcome,
    PairingResult,
    Profile,
    Rename,
    StoredEvent,
    Unrevoke,
)
from .ops import (
    AdmitOp,
    AppendOp,
    BeatOp,
    CoalescedOp,
    CompletePairingOp,
    DeleteUserEventsOp,
    DeleteUserOp,
    GetProfileOp,
    MarkDeletingOp,
    PairingCodeOp,
    PresenceOp,
    ProbeOp,
    PurgeOp,
    RenameOp,
    RevokeOp,
    SignatureOp,
    UnrevokeOp,
    UpdateProfileOp,
    WriteOp,
)

log = logging.getLogger("pocketbridge.store")

FLUSH_INTERVAL = 1.0
MAX_PENDING_AUDIT = 10_000
R = TypeVar("R")


class Breaker:
    """Fail fast while the store is down: after a failure, calls are refused (StoreUnavailable) for
    a cool-down that doubles up to ``max_cooldown``; the first call after it is the probe."""

    def __init__(self, cooldown: float = 0.5, max_cooldown: float = 5.0) -> None:
        self._base = self._cooldown = cooldown
        self._max = max_cooldown
        self._open_until = 0.0

    @property
    def is_open(self) -> bool:
        return trio.current_time() < self._open_until

    def check(self) -> None:
        if self.is_open:
            raise StoreUnavailable("store unavailable (circuit open)")

    def failed(self) -> None:
        self._open_until = trio.current_time() + self._cooldown
        self._cooldown = min(self._max, self._cooldown * 2)

    def succeeded(self) -> None:
        self._open_until = 0.0
        self._cooldown = self._base


class Pending(Generic[R]):
    """A submitted operation: its ``result`` (or ``error``) is set by the backend's apply_batch."""

    __slots__ = ("op", "result", "error", "done", "then", "trace")
    result: R

    def __init__(self, op: WriteOp[R], then: Callable[[Pending[R]], None] | None = None) -> None:
        self.op = op
        self.error: BaseException | None = None
        # a waiting caller's event, or ``then``: called after the batch instead (see BatchWriter.enqueue)
        self.done = trio.Event() if then is None else None
        self.then = then
        self.trace = trace_context()  # the submitter's span (None while tracing is off)


# apply_batch(batch, now_ms) sets result / error on each pending operation and returns the events it
# stored, in commit order; it raises only when the whole batch failed. It runs in a worker thread,
# unless the backend gives a separate ``commit`` callable: then apply_batch runs on the event loop
# (leaving the transaction open) and only ``commit`` runs in a thread.
ApplyBatch = Callable[[Sequence[Pending[Any]], int], list[StoredEvent]]


class BatchWriter:
    def __init__(
        self,
        apply_batch: ApplyBatch,
        *,
        batch_size: int,
        op_timeout: float,
        clock: Clock,
        breaker: Breaker,
        commit: Callable[[], None] | None = None,
        linger: float = 0.0,
    ) -> None:
        self._apply_batch = apply_batch
        self._linger = linger
        self._commit_fn = commit
        self._breaker = breaker
        self._batch_size = batch_size
        self._op_timeout = op_timeout
        self._clock = clock
        self._send, self._receive = trio.open_memory_channel[Pending[Any]](batch_size * 4)
        self._cursors: dict[str, tuple[str, int]] = {}
        self._seen: dict[str, str] = {}  # device_id -> user_id
        self._audit: list[AuditRow] = []
        self.audit_dropped = 0
        self.audit_throttle = AuditThrottle()
        self._last_flush = 0.0
        self.queued = 0  # operations waiting or in flight (a gauge for metrics)
        self.observe: Callable[[str, float], None] = lambda kind, seconds: None  # latency hook (metrics)
        self.on_failure: Callable[[], None] = lambda: None  # a batch failed (its outcome may be unknown)
        self.failing: str | None = None  # None, "storage_full" or "write_failed" until a batch commits again

    async def submit(self, op: WriteOp[R]) -> R:
        """Queue one operation and wait for its commit; StoreUnavailable after ``op_timeout``."""
        self._breaker.check()
        pending = Pending(op)
        done = pending.done
        assert done is not None
        self.queued += 1
        try:
            with trio.move_on_after(self._op_timeout):
                await self._send.send(pending)
                await done.wait()
        finally:
            self.queued -= 1
        if not done.is_set():
            raise StoreUnavailable("store write timed out")
        if pending.error is not None:
            raise pending.error
        return pending.result

    async def enqueue(self, op: WriteOp[R], then: Callable[[Pending[R]], None]) -> None:
        """Queue one operation without waiting for its commit: ``then(pending)`` is called once its batch
        committed or failed, in queue order. Waits only while the queue is full (the caller bounds that
        wait); StoreUnavailable at once while the breaker is open."""
        self._breaker.check()
        self.queued += 1
        try:
            await self._send.send(Pending(op, then))
        except BaseException:  # given up while waiting for room (its connection closed): never queued
            self.queued -= 1
            raise

    def note_cursor(self, device_id: str, user_id: str, cursor: int) -> None:
        known = self._cursors.get(device_id)
        if known is None or known[0] != user_id or known[1] < cursor:
            self._cursors[device_id] = (user_id, cursor)

    def note_seen(self, device_id: str, user_id: str) -> None:
        self._seen[device_id] = user_id

    def note_audit(self, record: AuditRow) -> None:
        if not self.audit_throttle.admit(record, trio.current_time()):
            return
        self._append_audit(record)

    def _append_audit(self, record: AuditRow) -> None:
        if len(self._audit) >= MAX_PENDING_AUDIT:
            self.audit_dropped += 1
            return
        self._audit.append(record)

    def _take_coalesced(self, force: bool) -> Pending[dict[str, tuple[str, int]]] | None:
        """The pending cursor and activity updates as one operation, at most once a second."""
        now = trio.current_time()
        if not force and now - self._last_flush < FLUSH_INTERVAL:
            return None
        self._last_flush = now
        for row in self.audit_throttle.sweep(now):
            self._append_audit(row)
        if not (self._cursors or self._seen or self._audit):
            return None
        cursors, self._cursors = self._cursors, {}
        seen, self._seen = self._seen, {}
        audit, self._audit = self._audit, []
        return Pending(CoalescedOp(cursors, seen, audit))

    async def run(self, on_commit: CommitHook) -> None:
        try:
            previous = 0
            while True:
                batch: list[Pending[Any]] = []
                with trio.move_on_after(FLUSH_INTERVAL):
                    batch.append(await self._receive.receive())
                if previous > 1 and self._linger:
                    # Under concurrent load the writers of the last batch are about to submit again
                    # (their acks just went out): a moment's wait makes the next batch big, not tiny.
                    await trio.sleep(self._linger)
                while len(batch) < self._batch_size:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                # Operations that read cursors see every cursor noted before them.
                coalesced = self._take_coalesced(force=any(p.op.reads_cursors for p in batch))
                if coalesced is not None:
                    batch.insert(0, coalesced)
                if not batch and self.failing is not None:
                    # writes failed and nobody is writing: a tiny real write finds out when they work
                    # again (space freed, database back), so /health recovers by itself
                    batch.append(Pending(ProbeOp()))
                if batch:
                    await self._commit(batch, on_commit)
                previous = len(batch)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(self._op_timeout):
                coalesced = self._take_coalesced(force=True)
                if coalesced is not None:
                    await self._commit([coalesced], on_commit)

    async def _commit(self, batch: list[Pending[Any]], on_commit: CommitHook) -> None:
        now_ms = self._clock.now_ms()
        stored: list[StoredEvent] = []  # only a committed batch is published
        started = trio.current_time()
        try:
            with span("store.batch", operations=len(batch)):
                if self._commit_fn is not None and not any(p.op.off_loop for p in batch):
                    # the statements are quick: run them here; only the commit (fsync) goes to a thread
                    applied = self._apply_batch(batch, now_ms)
                    with trio.CancelScope(shield=True):  # an applied batch is always committed or rolled back
                        await trio.to_thread.run_sync(self._commit_fn)
                elif self._commit_fn is not None:
                    # long work (deleting an account, purging): statements and commit in a worker thread,
                    # shielded like the commit above, so the event loop keeps serving everyone else
                    with trio.CancelScope(shield=True):
                        applied = await trio.to_thread.run_sync(self._apply_and_commit, batch, now_ms)
                else:
                    applied = await trio.to_thread.run_sync(self._apply_batch, batch, now_ms)
            stored = _traced(applied, batch) if any(p.trace for p in batch) else applied
            self._note_skipped(batch)
            self.observe("write_batch", trio.current_time() - started)
            self._breaker.succeeded()
            self._set_failing(None)
        except StoreUnavailable as exc:
            self._failed(batch, exc, exc)
        except Exception as exc:
            log.error("store batch failed: %s", type(exc).__name__, exc_info=exc)
            self._failed(batch, StoreUnavailable("store batch failed"), exc)
        if stored:
            try:
                await on_commit(stored)
            except Exception:
                # Fan-out is the fast path only: receivers find the events by replay or gap fill.
                log.exception("commit hook failed for %d events", len(stored))
        for pending in batch:
            if pending.done is not None:
                pending.done.set()
            else:
                assert pending.then is not None
                self.queued -= 1
                try:
                    pending.then(pending)
                except Exception:
                    log.exception("completion of a %s failed", pending.op.name)

    def _note_skipped(self, batch: Sequence[Pending[Any]]) -> None:
        """Cursors a committed flush skipped (another instance held the rows) go into the next flush."""
        for pending in batch:
            if isinstance(pending.op, CoalescedOp) and pending.error is None and pending.result:
                for device_id, (user_id, cursor) in pending.result.items():
                    self.note_cursor(device_id, user_id, cursor)

    def _apply_and_commit(self, batch: Sequence[Pending[Any]], now_ms: int) -> list[StoredEvent]:
        assert self._commit_fn is not None
        applied = self._apply_batch(batch, now_ms)
        self._commit_fn()
        return applied

    def _failed(self, batch: Sequence[Pending[Any]], error: StoreUnavailable, cause: BaseException) -> None:
        """A batch failed as a whole: nothing of it is acked or published. Its outcome may still be
        unknown (a connection lost after COMMIT was sent): ``on_failure`` makes the instance re-read
        the committed heads from the store, so whatever did commit is delivered from the store."""
        self._breaker.failed()
        self._fail(batch, error)
        self._set_failing("storage_full" if isinstance(error, StorageFull) else "write_failed", cause)
        self.on_failure()

    def _set_failing(self, state: str | None, cause: BaseException | None = None) -> None:
        """Track whether writes work (for /health); log only when the state changes."""
        if state == self.failing:
            return
        if state is None:
            log.warning("store writes work again")
        elif state == "storage_full":
            log.error("store writes fail: the disk is full; events are refused with 1013 until space is freed")
        else:
            log.error("store writes fail: %s", cause)
        self.failing = state

    @staticmethod
    def _fail(batch: Sequence[Pending[Any]], exc: BaseException) -> None:
        for pending in batch:
            pending.error = exc


def _traced(stored: list[StoredEvent], batch: Sequence[Pending[Any]]) -> list[StoredEvent]:
    """The stored events with the trace context of the span that submitted each (tracing on)."""
    traces = {
        id(p.result.event): p.trace for p in batch
        if p.trace and isinstance(p.op, AppendOp) and p.error is None and p.result.event is not None
    }
    return [attrs.evolve(e, trace=traces[id(e)]) if id(e) in traces else e for e in stored]


class Writer(Protocol):
    """What the write half of the Store needs of its writer: :class:`BatchWriter`, or the in-memory
    store's ``InlineWriter``."""

    failing: str | None
    on_failure: Callable[[], None]
    observe: Callable[[str, float], None]

    async def submit(self, op: WriteOp[R]) -> R: ...

    async def enqueue(self, op: WriteOp[R], then: Callable[[Pending[R]], None]) -> None: ...

    def note_cursor(self, device_id: str, user_id: str, cursor: int) -> None: ...

    def note_seen(self, device_id: str, user_id: str) -> None: ...

    def note_audit(self, record: AuditRow) -> None: ...


class BatchedWrites:
    """The write half of the Store interface, shared by the backends: every write is an operation
    (:mod:`pocketbridge.store.ops`) of the writer (``self._writer``), whose rule runs inside the
    batch transaction on the backend's :class:`~pocketbridge.store.rules.StoreTx`."""

    _writer: Writer

    async def admit_device(self, request: AdmitRequest, now_ms: int) -> Admission:
        return await self._writer.submit(AdmitOp(request))

    async def append_event(self, event: NewEvent) -> EventResult:
        if self.space_low():
            return EventResult(Outcome.STORAGE_FULL)
        return await self._writer.submit(AppendOp(event))

    async def start_append(self, event: NewEvent, chain: Chain, done: AppendDone) -> None:
        if self.space_low():
            done(EventResult(Outcome.STORAGE_FULL), None)
            return

        def then(pending: Pending[EventResult]) -> None:
            done(None if pending.error is not None else pending.result, pending.error)

        await self._writer.enqueue(AppendOp(event, chain, chain.next()), then)

    def space_low(self) -> bool:
        """Free disk below ``[storage] min_free_bytes`` (only the embedded store watches its disk)."""
        return False

    @property
    def write_failing(self) -> str | None:
        """None while writes work; "storage_full" or "write_failed" from a failed batch until one commits."""
        return self._writer.failing

    def on_write_failure(self, hook: Callable[[], None]) -> None:
        self._writer.on_failure = hook

    async def set_presence(self, device_id: str, connection_id: str, online: bool) -> int:
        return await self._writer.submit(PresenceOp(device_id, connection_id, online))

    async def beat(self, instance_id: str, stale_after_ms: int) -> int:
        """Record this instance as alive; set devices of instances silent for ``stale_after_ms`` offline."""
        return await self._writer.submit(BeatOp(instance_id, stale_after_ms))

    async def create_pairing_code(
        self, user_id: str, device_id: str, ttl_ms: int, max_devices: int
    ) -> tuple[str, int] | None:
        return await self._writer.submit(PairingCodeOp(user_id, device_id, ttl_ms, max_devices))

    async def complete_pairing(
        self, code: str, device_id: str, max_devices: int, peer: str, failure_limits: tuple[int, int]
    ) -> PairingResult:
        return await self._writer.submit(CompletePairingOp(code, device_id, max_devices, peer, failure_limits))

    async def revoke_device(self, device_id: str, reason: str, user_id: str | None = None) -> Device | None:
        return await self._writer.submit(RevokeOp(device_id, reason, user_id))

    async def mark_deleting(self, user_id: str) -> bool:
        return await self._writer.submit(MarkDeletingOp(user_id))

    async def delete_user(self, user_id: str) -> DeletedCounts:
        events = 0
        while n := await self._writer.submit(DeleteUserEventsOp(user_id)):
            events += n
        counts = await self._writer.submit(DeleteUserOp(user_id))
        return DeletedCounts(counts.devices, counts.events + events)

    async def purge(self, retention_ms: int, ttl_grace_ms: int, limit: int, audit_ms: int) -> int:
        return await self._writer.submit(PurgeOp(retention_ms, ttl_grace_ms, limit, audit_ms))

    async def rename_device(self, user_id: str, device_id: str, name: str) -> Rename:
        return await self._writer.submit(RenameOp(user_id, device_id, name))

    async def unrevoke_device(self, device_id: str, max_devices: int) -> Unrevoke:
        return await self._writer.submit(UnrevokeOp(device_id, max_devices))

    async def get_profile(self, user_id: str) -> Profile:
        return await self._writer.submit(GetProfileOp(user_id))

    async def update_profile(self, user_id: str, changes: dict[str, Any]) -> Profile:
        return await self._writer.submit(UpdateProfileOp(user_id, changes))

    async def remember_signature(self, signature: str, expires_ms: int) -> bool:
        return await self._writer.submit(SignatureOp(signature, expires_ms))

    def note_cursor(self, device_id: str, user_id: str, cursor: int) -> None:
        self._writer.note_cursor(device_id, user_id, cursor)

    def note_seen(self, device_id: str, user_id: str) -> None:
        self._writer.note_seen(device_id, user_id)

    def note_audit(
        self, at_ms: int, action: str, actor: str | None, target: str | None, peer: str | None, detail: str | None
    ) -> None:
        self._writer.note_audit((at_ms, action, actor, target, peer, detail))

    def observe_with(self, hook: Callable[[str, float], None]) -> None:
        self._writer.observe = hook
