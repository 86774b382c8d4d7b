"""The Store contract, run against every backend: MemoryStore, SqliteStore and PostgresStore.

The decisions live once in ``pocketbridge.store.rules``; the backends hold only rows, SQL and locks. These
tests pin what every backend must answer alike: admission order (deleting → key mismatch → revoked → limit),
registration and name dedupe, append outcomes (PostgreSQL runs them in ``pb_append_event``: these cases keep
it in step with the Python rule), per-user server_seq and per-(user, stream) stream_seq, replay pages,
presence, pairing and its failure limits, revoke/unrevoke/rename, profiles, deletion in chunks, purging,
signatures and the audit trail.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from pocketbridge.client import new_event_id
from pocketbridge.clock import Clock
from pocketbridge.protocol.events import NewEvent
from pocketbridge.store import (
    Admission,
    Admit,
    AdmitRequest,
    Chain,
    DeletedCounts,
    Device,
    EventResult,
    Outcome,
    Pairing,
    Quota,
    Rename,
    Store,
    StoredEvent,
    Unrevoke,
    rules,
)
from pocketbridge.store.memory import MemoryStore
from pocketbridge.store.ops import AppendOp
from pocketbridge.store.writer import Pending
from tests.conftest import make_config, temporary_database

MINUTE = 60_000
DAY = 86_400_000
TABLES = ("users, devices, streams, events, pairing_codes, profiles, seen_signatures, instances, audit_log,"
          " pairing_failures")


def key() -> str:
    return secrets.token_hex(32)


def dev() -> str:
    return str(uuid.uuid4())


class FixedClock(Clock):
    """Wall time the test sets."""

    def __init__(self) -> None:
        super().__init__()
        self.now = int(time.time() * 1000)

    def now_ms(self) -> int:
        return self.now


@attrs.define
class Harness:
    store: Store
    clock: FixedClock
    backend: str

    @property
    def now(self) -> int:
        return self.clock.now

    async def admit(
        self, user: str, device_id: str | None = None, *, name: str | None = None, device_type: str | None = None,
        max_devices: int = 5,
    ) -> Admission:
        request = AdmitRequest(user, device_id or dev(), name, device_type, max_devices)
        return await self.store.admit_device(request, self.now)

    async def device(self, user: str, **kwargs: Any) -> Device:
        admission = await self.admit(user, **kwargs)
        assert admission.outcome is Admit.OK and admission.device is not None, admission
        return admission.device

    async def send(
        self, device: Device, seq: int, *, event_id: str | None = None, user_id: str | None = None,
        stream: str = "notes:main", size: int = 10, ttl: int | None = None, type: str = "note:text",
    ) -> EventResult:
        event = NewEvent(event_id or new_event_id(), user_id or device.user_id, device.device_id, seq, stream, type,
                         "p" * size, size, ttl)
        return await self.store.append_event(event)

    async def stored(self, device: Device, seq: int, **kwargs: Any) -> StoredEvent:
        result = await self.send(device, seq, **kwargs)
        assert result.outcome is Outcome.STORED and result.event is not None, result
        return result.event

    async def flush(self, device: Device) -> None:
        """A handshake sees every cursor, activity and audit record noted before it (the writer flushes)."""
        assert (await self.admit(device.bound_key, device.device_id)).outcome is Admit.OK


@pytest.fixture(scope="module")
def contract_dsn() -> Iterator[str]:
    """A migrated database of this module's own (emptied before each test)."""
    with temporary_database("contract") as dsn:
        yield dsn


OpenStore = Callable[..., AbstractAsyncContextManager[Harness]]


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> OpenStore:
    """Opens a running store of the parametrized backend: ``async with open_store(quota=...) as h``."""
    backend: str = request.param
    dsn = request.getfixturevalue("contract_dsn") if backend == "postgres" else ""

    @asynccontextmanager
    async def opened(quota: Quota | None = None) -> AsyncIterator[Harness]:
        clock, quota = FixedClock(), quota or Quota()
        limits = {"max_stored_bytes_per_user": quota.max_bytes,
                  "stored_bytes_per_user_per_minute": quota.bytes_per_minute}
        store: Store
        if backend == "memory":
            store = MemoryStore(clock, quota)
        elif backend == "sqlite":
            from pocketbridge.store.sqlite import SqliteStore

            store = SqliteStore(make_config(tmp_path / f"data-{uuid.uuid4().hex[:6]}", limits=limits), clock)
        else:
            import psycopg

            from pocketbridge.store.postgres import PostgresStore

            with psycopg.connect(dsn, autocommit=True) as db:
                db.execute(f"TRUNCATE {TABLES}")
            config = make_config(tmp_path / "data", storage={"backend": "postgres", "dsn": dsn}, limits=limits)
            store = PostgresStore(config, clock, "contract")
        published: list[StoredEvent] = []

        async def on_commit(events: Any) -> None:
            published.extend(events)

        async with trio.open_nursery() as nursery:
            await nursery.start(store.run, on_commit)
            try:
                yield Harness(store, clock, backend)
            finally:
                nursery.cancel_scope.cancel()

    return opened


@pytest.fixture
async def h(open_store: OpenStore) -> AsyncIterator[Harness]:
    async with open_store() as harness:
        yield harness


# --- admission ------------------------------------------------------------------------------------------
async def test_admission_refusals_in_order(h: Harness) -> None:
    user = key()
    device = await h.device(user, name="Phone")
    assert (await h.admit(key(), device.device_id)).outcome is Admit.KEY_MISMATCH
    await h.store.revoke_device(device.device_id, "lost")
    assert (await h.admit(key(), device.device_id)).outcome is Admit.KEY_MISMATCH  # before revoked
    assert (await h.admit(user, device.device_id)).outcome is Admit.REVOKED
    await h.device(user)
    assert (await h.admit(user, device.device_id, max_devices=1)).outcome is Admit.REVOKED  # before the limit
    assert (await h.admit(user, max_devices=1)).outcome is Admit.LIMIT
    assert await h.store.mark_deleting(user)
    for outcome in (
        await h.admit(key(), device.device_id),  # before a key mismatch
        await h.admit(user, device.device_id),
        await h.admit(user, max_devices=1),  # before the limit
    ):
        assert outcome.outcome is Admit.DELETING


async def test_registration_and_name_dedupe(h: Harness) -> None:
    user = key()
    first = await h.admit(user, name="Laptop", device_type="desktop")
    assert first.created and first.device is not None
    expected = Device(first.device.device_id, user, user, "Laptop", "desktop", h.now, h.now, False, 0, 0, None)
    assert first.device == expected
    assert (await h.device(user, name="Laptop")).device_name == "Laptop (2)"
    assert (await h.device(user, name="Laptop (2)")).device_name == "Laptop (3)"
    assert (await h.device(key(), name="Laptop")).device_name == "Laptop"  # names are per account
    unnamed = await h.device(user)
    assert unnamed.device_name is None
    resumed = await h.admit(user, unnamed.device_id, name="Laptop", device_type="mobile")
    assert not resumed.created and resumed.device is not None
    assert (resumed.device.device_name, resumed.device.device_type) == ("Laptop (4)", "mobile")
    kept = await h.admit(user, first.device.device_id, name="Other")  # a name is only filled in, never replaced
    assert kept.device is not None and (kept.device.device_name, kept.device.device_type) == ("Laptop", "desktop")
    assert await h.store.get_device(unnamed.device_id) == resumed.device
    names = sorted(d.device_name or "" for d in await h.store.list_devices(user))
    assert names == ["Laptop", "Laptop (2)", "Laptop (3)", "Laptop (4)"]


# --- events ---------------------------------------------------------------------------------------------
async def test_append_outcomes(h: Harness) -> None:
    user = key()
    device = await h.device(user)
    first = await h.stored(device, 1, event_id=(e1 := new_event_id()))
    assert (first.server_seq, first.stream_seq, first.created_at, first.payload_size) == (1, 1, h.now, 10)
    assert (await h.send(device, 1, event_id=e1)) == EventResult(Outcome.DUPLICATE)
    assert (await h.send(device, 2, event_id=e1)).outcome is Outcome.DUPLICATE  # the same event_id elsewhere
    assert (await h.send(device, 1)).outcome is Outcome.CONFLICT  # the same device_seq, another event
    e2 = (await h.stored(device, 2)).event_id
    assert (await h.send(device, 1, event_id=e2)).outcome is Outcome.CONFLICT  # the device_seq decides first
    stored = await h.store.get_device(device.device_id)
    assert stored is not None and stored.last_ack_device_seq == 2
    other = await h.device(key())
    assert (await h.send(other, 1, user_id=user)).outcome is Outcome.REVOKED  # not a device of that user
    gone = attrs.evolve(device, device_id=dev())
    assert (await h.send(gone, 1)).outcome is Outcome.REVOKED  # no such device
    revoked = await h.device(user)
    await h.store.revoke_device(revoked.device_id, "lost")
    assert (await h.send(revoked, 1)).outcome is Outcome.REVOKED
    assert await h.store.mark_deleting(user)
    assert (await h.send(device, 3)).outcome is Outcome.DELETING
    assert await h.store.head_seq(user) == 2


async def test_stored_bytes_quota(open_store: OpenStore) -> None:
    async with open_store(Quota(max_bytes=100)) as h:
        device = await h.device(key())
        await h.stored(device, 1, size=60)
        assert (await h.send(device, 2, size=50)).outcome is Outcome.QUOTA_EXCEEDED
        await h.stored(device, 2, size=40)
        assert (await h.store.get_profile(device.user_id)).stored_bytes == 100
        assert (await h.send(device, 3, size=1)).outcome is Outcome.QUOTA_EXCEEDED


async def test_byte_rate_quota(open_store: OpenStore) -> None:
    async with open_store(Quota(bytes_per_minute=100)) as h:
        device = await h.device(key())
        await h.stored(device, 1, size=60)
        assert (await h.send(device, 2, size=50)).outcome is Outcome.QUOTA_EXCEEDED  # 40 left
        h.clock.now += 30_000  # + 50
        await h.stored(device, 2, size=90)
        assert (await h.send(device, 3, size=1)).outcome is Outcome.QUOTA_EXCEEDED
        h.clock.now += 10 * MINUTE  # never more than a minute's worth
        await h.stored(device, 3, size=100)
        assert (await h.send(device, 4, size=2)).outcome is Outcome.QUOTA_EXCEEDED


async def test_sequences_per_user_and_stream(h: Harness) -> None:
    u, v = key(), key()
    a, b = await h.device(u), await h.device(v)
    got = [
        await h.stored(a, 1, stream="notes:a"),
        await h.stored(b, 1, stream="notes:a"),
        await h.stored(a, 2, stream="notes:b"),
        await h.stored(a, 3, stream="notes:a"),
    ]
    assert [(e.user_id, e.server_seq, e.stream_id, e.stream_seq) for e in got] == [
        (u, 1, "notes:a", 1), (v, 1, "notes:a", 1), (u, 2, "notes:b", 1), (u, 3, "notes:a", 2),
    ]
    assert (await h.store.head_seq(u), await h.store.head_seq(key())) == (3, 0)
    assert await h.store.heads([u, v, key()]) == {u: 3, v: 1}
    assert await h.store.heads([]) == {}


async def test_read_events_pages(h: Harness) -> None:
    user = key()
    a, b = await h.device(user), await h.device(user)
    sent = [await h.stored(a, seq, size=100, ttl=h.now + 1000 if seq == 3 else None) for seq in range(1, 6)]
    await h.stored(b, 1)
    read = h.store.read_events
    page = await read(user, 0, 6, exclude_device=b.device_id, now_ms=h.now, limit=2, max_bytes=1 << 20)
    assert (page.events, page.has_more) == (sent[:2], True)
    page = await read(user, 2, 6, exclude_device=b.device_id, now_ms=h.now, limit=10, max_bytes=1 << 20)
    assert (page.events, page.has_more) == (sent[2:], False)  # b's own event is left out
    later = h.now + 2000  # the event with a ttl has expired
    page = await read(user, 0, 6, exclude_device=b.device_id, now_ms=later, limit=10, max_bytes=1 << 20)
    assert [e.device_seq for e in page.events] == [1, 2, 4, 5]
    page = await read(user, 0, 4, exclude_device=a.device_id, now_ms=h.now, limit=10, max_bytes=1 << 20)
    assert page.events == []  # b's event is seq 6, past upto
    page = await read(user, 0, 6, exclude_device=b.device_id, now_ms=h.now, limit=10, max_bytes=1)
    assert (page.events, page.has_more) == (sent[:1], True)  # at least one event, whatever its size
    assert await h.store.count_pending(user, b.device_id, 0, 6, h.now) == 5
    assert await h.store.count_pending(user, b.device_id, 1, 4, later) == 2
    assert await h.store.count_pending(user, a.device_id, 0, 6, h.now) == 1


async def test_file_events(h: Harness) -> None:
    device = await h.device(key())
    files = [await h.stored(device, seq, type="file:metadata", ttl=h.now + 1000 if seq == 2 else None)
             for seq in range(1, 5)]
    await h.stored(device, 5)
    assert await h.store.file_events(device.user_id, 10, 0, h.now) == (files[::-1], 4)
    assert await h.store.file_events(device.user_id, 1, 1, h.now + 2000) == ([files[2]], 3)


async def test_presence_and_heads(h: Harness) -> None:
    device = await h.device(key())
    await h.stored(device, 1)
    await h.stored(device, 2)
    h.clock.now += 1000
    assert await h.store.set_presence(device.device_id, "c1", True) == 2
    online = await h.store.get_device(device.device_id)
    assert online is not None and online.is_online and online.last_seen == h.now
    assert await h.store.set_presence(device.device_id, "c2", False) == 2  # another connection's goodbye
    assert (await h.store.get_device(device.device_id) or device).is_online
    await h.store.set_presence(device.device_id, "c1", False)
    assert not (await h.store.get_device(device.device_id) or online).is_online
    assert await h.store.set_presence(dev(), "c1", True) == 0  # unknown device
    assert await h.store.beat("instance", 90_000) == 0


# --- pairing --------------------------------------------------------------------------------------------
async def test_pairing_outcomes(h: Harness) -> None:
    owner = key()
    initiator = await h.device(owner, name="Phone")
    joiner = await h.device(key(), name="Phone")
    stranger = await h.device(key())
    create, complete = h.store.create_pairing_code, h.store.complete_pairing
    issued = await create(owner, initiator.device_id, 60_000, 5)
    assert issued is not None and len(issued[0]) == 6 and issued[0].isdigit() and issued[1] == h.now + 60_000
    replacement = await create(owner, initiator.device_id, 60_000, 5)
    assert replacement is not None
    assert (await complete(issued[0], joiner.device_id, 5, "peer", (0, 0))).outcome is Pairing.NOT_FOUND
    paired = await complete(replacement[0], joiner.device_id, 5, "peer", (0, 0))
    assert (paired.outcome, paired.user_id, paired.last_ack_device_seq) == (Pairing.OK, owner, 0)
    assert paired.device == attrs.evolve(joiner, user_id=owner, device_name="Phone (2)")
    assert await h.store.get_device(joiner.device_id) == paired.device
    assert len(await h.store.list_devices(owner)) == 2
    used = await complete(replacement[0], stranger.device_id, 5, "peer", (0, 0))
    assert used.outcome is Pairing.USED
    same = await create(owner, initiator.device_id, 60_000, 5)
    assert same is not None
    result = await complete(same[0], joiner.device_id, 5, "peer", (0, 0))
    assert (result.outcome, result.user_id, result.device) == (Pairing.SAME_ACCOUNT, owner, paired.device)
    assert (await complete(same[0], stranger.device_id, 5, "peer", (0, 0))).outcome is Pairing.USED
    assert await create(owner, initiator.device_id, 60_000, 2) is None  # the account is full
    full = await create(owner, initiator.device_id, 60_000, 5)
    assert full is not None
    limited = await complete(full[0], stranger.device_id, 2, "peer", (0, 0))
    assert (limited.outcome, limited.user_id) == (Pairing.LIMIT, owner)
    assert (await complete(full[0], stranger.device_id, 5, "peer", (0, 0))).outcome is Pairing.OK  # still valid
    # only NOT_FOUND is a failure of the peer
    assert await h.store.pairing_failures("peer", h.now - MINUTE, h.now - 60 * MINUTE) == (1, 1)


async def test_pairing_codes_expire_and_die_with_their_initiator(h: Harness) -> None:
    owner = key()
    initiator, other = await h.device(owner), await h.device(owner)
    joiner = await h.device(key())
    short = await h.store.create_pairing_code(owner, initiator.device_id, 1000, 5)
    assert short is not None
    h.clock.now += 1000
    result = await h.store.complete_pairing(short[0], joiner.device_id, 5, "p", (0, 0))
    assert result.outcome is Pairing.NOT_FOUND
    code = await h.store.create_pairing_code(owner, other.device_id, 60_000, 5)
    assert code is not None
    await h.store.revoke_device(other.device_id, "lost")
    assert (await h.store.complete_pairing(code[0], joiner.device_id, 5, "p", (0, 0))).outcome is Pairing.NOT_FOUND
    assert await h.store.pairing_failures("p", h.now - MINUTE, h.now - 60 * MINUTE) == (2, 2)


async def test_pairing_failure_limits_check_and_charge(h: Harness) -> None:
    owner = key()
    initiator = await h.device(owner)
    joiners = [await h.device(key()) for _ in range(3)]
    code = await h.store.create_pairing_code(owner, initiator.device_id, 180 * MINUTE, 5)
    assert code is not None
    complete = h.store.complete_pairing
    for _ in range(2):
        assert (await complete("000000", joiners[0].device_id, 5, "p1", (2, 0))).outcome is Pairing.NOT_FOUND
    # the address used up its failures: the right code is not even tried, and nothing more is counted
    assert (await complete(code[0], joiners[0].device_id, 5, "p1", (2, 0))).outcome is Pairing.LOCKED_PEER
    assert await h.store.pairing_failures("p1", h.now - MINUTE, h.now - 60 * MINUTE) == (2, 2)
    # deployment-wide: two failures in the last minute lock everyone out with a limit of 2
    assert (await complete(code[0], joiners[1].device_id, 5, "p2", (0, 2))).outcome is Pairing.LOCKED_DEPLOYMENT
    h.clock.now += MINUTE
    assert (await complete(code[0], joiners[1].device_id, 5, "p2", (2, 2))).outcome is Pairing.OK
    assert (await complete(code[0], joiners[2].device_id, 5, "p1", (2, 0))).outcome is Pairing.LOCKED_PEER
    h.clock.now += 60 * MINUTE
    assert (await complete(code[0], joiners[2].device_id, 5, "p1", (2, 0))).outcome is Pairing.USED


# --- device management ----------------------------------------------------------------------------------
async def test_revoke_rename_unrevoke(h: Harness) -> None:
    user = key()
    laptop, tablet = await h.device(user, name="Laptop"), await h.device(user, name="Tablet")
    rename = h.store.rename_device
    assert await rename(user, laptop.device_id, "Tablet") is Rename.TAKEN
    assert await rename(user, laptop.device_id, "Laptop") is Rename.OK  # its own name
    assert await rename(user, laptop.device_id, "Desk") is Rename.OK
    assert await rename(key(), laptop.device_id, "Other") is Rename.NOT_FOUND
    assert await rename(user, dev(), "Other") is Rename.NOT_FOUND
    assert await h.store.revoke_device(laptop.device_id, "lost", user_id=key()) is None
    assert await h.store.revoke_device(dev(), "lost") is None
    h.clock.now += 1000
    before = await h.store.revoke_device(laptop.device_id, "lost", user_id=user)
    assert before == attrs.evolve(laptop, device_name="Desk")  # as it was
    revoked_at = h.now
    h.clock.now += 1000
    again = await h.store.revoke_device(laptop.device_id, "other reason")  # idempotent: the first revocation stays
    assert again is not None and again.revoked_at == revoked_at
    [row] = await h.store.revoked_devices(user, 10)
    assert (row.device_id, row.user_id, row.revoked_at, row.reason) == (laptop.device_id, user, revoked_at, "lost")
    assert [r.device_id for r in await h.store.revoked_devices(None, 10)] == [laptop.device_id]
    assert await rename(user, laptop.device_id, "Other") is Rename.NOT_FOUND
    assert await h.store.list_devices(user) == [tablet]
    assert await rename(user, tablet.device_id, "Desk") is Rename.OK  # a revoked device's name is free
    assert await h.store.unrevoke_device(laptop.device_id, 5) is Unrevoke.OK
    back = await h.store.get_device(laptop.device_id)
    assert back is not None and (back.revoked_at, back.device_name) == (None, "Desk (2)")
    assert await h.store.revoked_devices(user, 10) == []
    assert await h.store.unrevoke_device(laptop.device_id, 5) is Unrevoke.OK  # not revoked
    assert await h.store.unrevoke_device(dev(), 5) is Unrevoke.NOT_FOUND
    await h.store.revoke_device(laptop.device_id, "lost")
    assert await h.store.unrevoke_device(laptop.device_id, 1) is Unrevoke.LIMIT


async def test_revoking_sets_offline_and_drops_its_pairing_code(h: Harness) -> None:
    user = key()
    device, joiner = await h.device(user), await h.device(key())
    await h.store.set_presence(device.device_id, "c1", True)
    code = await h.store.create_pairing_code(user, device.device_id, 60_000, 5)
    assert code is not None
    await h.store.revoke_device(device.device_id, "lost")
    revoked = await h.store.get_device(device.device_id)
    assert revoked is not None and not revoked.is_online and revoked.revoked_at == h.now
    assert (await h.store.complete_pairing(code[0], joiner.device_id, 5, "p", (0, 0))).outcome is Pairing.NOT_FOUND


async def test_profiles(h: Harness) -> None:
    device = await h.device(user := key())
    profile = await h.store.get_profile(user)
    assert (profile.display_name, profile.email, profile.preferences, profile.onboarding_completed) == (
        None, None, {}, False)
    assert (profile.created_at, profile.updated_at, profile.stored_bytes) == (h.now, h.now, 0)
    await h.stored(device, 1, size=25)
    h.clock.now += 1000
    changed = await h.store.update_profile(user, {"display_name": "Ann", "preferences": {"theme": "dark"}})
    assert (changed.display_name, changed.preferences, changed.updated_at) == ("Ann", {"theme": "dark"}, h.now)
    changed = await h.store.update_profile(user, {"preferences": {"lang": "en"}, "onboarding_completed": True})
    assert (changed.display_name, changed.preferences, changed.onboarding_completed) == (
        "Ann", {"theme": "dark", "lang": "en"}, True)
    assert (changed.created_at, changed.stored_bytes) == (profile.created_at, 25)
    assert await h.store.get_profile(user) == changed
    stranger = await h.store.get_profile(key())  # a profile without a user: created on first use
    assert stranger.stored_bytes == 0 and stranger.last_seen == h.now


# --- deletion, purging, signatures, audit ---------------------------------------------------------------
async def test_delete_user_in_chunks(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    chunks: list[int] = []
    original = rules.delete_user_events

    def spy(tx: Any, user_id: str) -> int:
        chunks.append(original(tx, user_id))
        return chunks[-1]

    monkeypatch.setattr(rules, "CHUNK_ROWS", 3)
    monkeypatch.setattr(rules, "delete_user_events", spy)
    user, other = key(), key()
    a, b, c = await h.device(user, name="A"), await h.device(user), await h.device(other)
    for seq in range(1, 5):
        await h.stored(a, seq)
    for seq in range(1, 4):
        await h.stored(b, seq)
    kept = await h.stored(c, 1)
    await h.store.get_profile(user)
    assert await h.store.create_pairing_code(user, a.device_id, 60_000, 5) is not None
    assert await h.store.mark_deleting(user)
    assert not await h.store.mark_deleting(key())
    assert await h.store.deleting_users() == [user]
    assert await h.store.delete_user(user) == DeletedCounts(2, 7)
    assert chunks == [3, 3, 1, 0]
    assert await h.store.get_device(a.device_id) is None and await h.store.list_devices(user) == []
    assert await h.store.head_seq(user) == 0 and await h.store.deleting_users() == []
    again = await h.device(user, name="A")  # the account can start over, from scratch
    assert (await h.stored(again, 1)).server_seq == 1
    page = await h.store.read_events(other, 0, 1, exclude_device="", now_ms=h.now, limit=10, max_bytes=1 << 20)
    assert page.events == [kept]


async def test_purge(h: Harness) -> None:
    device = await h.device(user := key())
    start = h.now
    h.clock.now = start - 10 * DAY
    old = await h.stored(device, 1, size=30)  # past retention
    h.clock.now = start
    soon = await h.stored(device, 2, size=20, ttl=start + 1000)  # past its ttl and the grace
    kept = await h.stored(device, 3, size=10, ttl=start + 10 * DAY)
    later = await h.stored(device, 4, size=5)
    assert await h.store.remember_signature("s" * 128, start + 1000)
    h.store.note_audit(start - 2 * DAY, "device_revoked", "a" * 8, None, None, None)
    h.store.note_audit(start, "device_paired", "b" * 8, None, None, None)
    await h.flush(device)
    h.clock.now = start + 5000
    assert await h.store.purge(7 * DAY, 2000, 1, DAY) == 1  # at most ``limit`` events
    assert await h.store.purge(7 * DAY, 2000, 1000, DAY) == 1
    assert await h.store.purge(7 * DAY, 2000, 1000, DAY) == 0
    page = await h.store.read_events(user, 0, 4, exclude_device="", now_ms=h.now, limit=10, max_bytes=1 << 20)
    assert page.events == [kept, later] and old not in page.events and soon not in page.events
    assert (await h.store.get_profile(user)).stored_bytes == 15  # the quota got the bytes back
    assert await h.store.remember_signature("s" * 128, h.now + 1000)  # the expired one was forgotten
    assert [r.action for r in await h.store.audit_log(10, None)] == ["device_paired"]


async def test_signatures(h: Harness) -> None:
    assert await h.store.remember_signature("a" * 128, h.now + 1000)
    assert not await h.store.remember_signature("a" * 128, h.now + 1000)
    assert await h.store.remember_signature("b" * 128, h.now + 1000)


async def test_audit_cursors_and_activity(h: Harness) -> None:
    device = await h.device(user := key())
    h.store.note_audit(h.now, "device_revoked", "aaaaaaaa", "bbbbbbbb", "127.0.0.1", "lost")
    h.store.note_audit(h.now + 1, "device_paired", "cccccccc", None, None, None)
    h.store.note_cursor(device.device_id, key(), 9)  # not its user
    h.store.note_cursor(device.device_id, user, 5)
    h.store.note_cursor(device.device_id, user, 3)  # never backwards
    h.clock.now += 1000
    h.store.note_seen(device.device_id, user)
    await h.flush(device)
    records = await h.store.audit_log(10, None)
    assert [(r.at, r.action, r.actor, r.target, r.peer, r.detail) for r in records] == [
        (h.now - 999, "device_paired", "cccccccc", None, None, None),
        (h.now - 1000, "device_revoked", "aaaaaaaa", "bbbbbbbb", "127.0.0.1", "lost"),
    ]
    assert [r.action for r in await h.store.audit_log(10, "device_revoked")] == ["device_revoked"]
    assert len(await h.store.audit_log(1, None)) == 1
    seen = await h.store.get_device(device.device_id)
    assert seen is not None and (seen.delivery_cursor, seen.last_seen) == (5, h.now)
    assert (await h.store.get_profile(user)).last_seen == h.now


async def test_inactive_users(h: Harness) -> None:
    idle, active = key(), key()
    gone = await h.device(idle)
    await h.device(active)
    await h.store.revoke_device(gone.device_id, "lost")
    assert await h.store.inactive_users(h.now + 1, 10) == [idle]
    assert await h.store.inactive_users(h.now, 10) == []


async def test_store_answers(h: Harness) -> None:
    await h.store.ping()
    assert h.store.write_failing is None and not h.store.space_low()
    assert set(h.store.stats()) >= {"pool_size", "pool_idle", "pool_waiting", "writer_queue", "breaker_open",
                                    "audit_dropped"}


async def test_a_chain_ends_at_its_first_conflict(h: Harness) -> None:
    """A connection's events queued without waiting (a Chain): answered in order, and after the one that
    ended the chain (a conflict) nothing of it commits, whether in the same batch or a later one."""
    device = await h.device(key())
    await h.stored(device, 1)
    answers: list[tuple[int, Outcome | None]] = []
    chain = Chain()
    for seq in (2, 1, 3, 4):  # seq 1 again, another event: a conflict
        event = NewEvent(new_event_id(), device.user_id, device.device_id, seq, "s", "t", "p", 1, None)
        await h.store.start_append(event, chain, lambda r, e, seq=seq: answers.append((seq, r and r.outcome)))
    with trio.fail_after(10):
        while len(answers) < 4:
            await trio.sleep(0.01)
    assert answers == [(2, Outcome.STORED), (1, Outcome.CONFLICT), (3, Outcome.ABANDONED), (4, Outcome.ABANDONED)]
    assert await h.store.head_seq(device.user_id) == 2
    stopped = Chain()
    stopped.stop()  # the connection closed: its queued events are not tried
    event = NewEvent(new_event_id(), device.user_id, device.device_id, 5, "s", "t", "p", 1, None)
    await h.store.start_append(event, stopped, lambda r, e: answers.append((5, r and r.outcome)))
    with trio.fail_after(10):
        while len(answers) < 5:
            await trio.sleep(0.01)
    assert answers[-1] == (5, Outcome.ABANDONED) and await h.store.head_seq(device.user_id) == 2


@pytest.mark.parametrize("open_store", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
                         indirect=True)
async def test_a_chain_ends_inside_one_batch(h: Harness) -> None:
    """The same, with the chain's events in one batch transaction (PostgreSQL sends them pipelined and
    reads the outcomes before the COMMIT: a stored event after the conflict rolls the batch back and it
    is redone without it)."""
    device = await h.device(key())
    await h.stored(device, 1)
    chain = Chain()
    batch = [
        Pending(AppendOp(NewEvent(new_event_id(), device.user_id, device.device_id, seq, "s", "t", "p", 1, None),
                         chain, chain.next()))
        for seq in (2, 1, 3)
    ]
    store: Any = h.store
    stored = store._apply_batch(batch, h.now)
    if h.backend == "sqlite":
        store._commit()
    assert [p.result.outcome for p in batch] == [Outcome.STORED, Outcome.CONFLICT, Outcome.ABANDONED]
    assert [e.device_seq for e in stored] == [2]
    assert await h.store.head_seq(device.user_id) == 2
