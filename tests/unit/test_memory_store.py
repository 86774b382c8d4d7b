"""The in-memory store is a test double for the core: it answers at once under trio's MockClock (no worker
threads, timers or batching), publishes a stored event before its caller gets the result, and can be made
unavailable. Its answers are the contract's (tests/unit/test_store_contract.py)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import pytest
import trio
import trio.testing

from pocketbridge.errors import StoreUnavailable
from pocketbridge.protocol.events import NewEvent
from pocketbridge.store import Admit, AdmitRequest, Outcome, StoredEvent
from pocketbridge.store.memory import MemoryStore

USER = "ab" * 32


def event(device_id: str, seq: int) -> NewEvent:
    return NewEvent(str(uuid.uuid4()), USER, device_id, seq, "notes:main", "note:text", "cGF5bG9hZA", 7, None)


async def test_answers_at_once_on_a_mock_clock(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    device_id = str(uuid.uuid4())
    started = trio.current_time()
    admission = await store.admit_device(AdmitRequest(USER, device_id, "Phone", "mobile", 5), 0)
    assert admission.outcome is Admit.OK
    assert (await store.append_event(event(device_id, 1))).outcome is Outcome.STORED
    store.note_cursor(device_id, USER, 1)  # written when noted
    device = await store.get_device(device_id)
    assert device is not None and device.delivery_cursor == 1
    assert trio.current_time() == started  # nothing waited on a timer


async def test_publishes_before_the_caller_resumes() -> None:
    store = MemoryStore()
    published: list[StoredEvent] = []

    async def on_commit(events: Sequence[StoredEvent]) -> None:
        published.extend(events)

    device_id = str(uuid.uuid4())
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run, on_commit)
        await store.admit_device(AdmitRequest(USER, device_id, None, None, 5), 0)
        result = await store.append_event(event(device_id, 1))
        assert published == [result.event]
        assert (await store.append_event(event(device_id, 1))).outcome is Outcome.CONFLICT
        assert len(published) == 1
        nursery.cancel_scope.cancel()


async def test_unavailable() -> None:
    store = MemoryStore()
    store.unavailable = True
    with pytest.raises(StoreUnavailable):
        await store.admit_device(AdmitRequest(USER, str(uuid.uuid4()), None, None, 5), 0)
    with pytest.raises(StoreUnavailable):
        await store.head_seq(USER)
    store.unavailable = False
    assert await store.head_seq(USER) == 0
