"""The batching writer's queue without waiting callers (``BatchWriter.enqueue``, pipelined ingest): the
``queued`` gauge counts exactly what waits or is in flight, whatever becomes of each operation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import trio

from pocketbridge.clock import Clock
from pocketbridge.errors import StoreUnavailable
from pocketbridge.store import StoredEvent
from pocketbridge.store.ops import ProbeOp
from pocketbridge.store.writer import BatchWriter, Breaker, Pending


def make_writer(apply: Any) -> BatchWriter:
    clock = Clock()
    clock.anchor()
    return BatchWriter(apply, batch_size=1, op_timeout=1.0, clock=clock, breaker=Breaker())  # a queue of 4


async def no_hook(events: Sequence[StoredEvent]) -> None:
    pass


async def until_drained(writer: BatchWriter) -> None:
    with trio.fail_after(5):
        while writer.queued:  # noqa: ASYNC110 (a gauge: nothing to wait on)
            await trio.sleep(0.01)


async def test_an_enqueue_given_up_while_the_queue_is_full_is_not_counted() -> None:
    """A connection closing while its event waits for room in the queue: the event was never queued."""
    writer = make_writer(lambda batch, now_ms: [])
    done: list[Pending[Any]] = []
    for _ in range(4):
        await writer.enqueue(ProbeOp(), done.append)
    with trio.move_on_after(0.1) as waited:
        await writer.enqueue(ProbeOp(), done.append)  # the queue is full: waits, then the connection closes
    assert waited.cancelled_caught
    assert writer.queued == 4
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run, no_hook)
        await until_drained(writer)
        nursery.cancel_scope.cancel()
    assert len(done) == 4 and writer.queued == 0


async def test_a_failed_batch_answers_its_operations_and_uncounts_them() -> None:
    def fail(batch: Sequence[Pending[Any]], now_ms: int) -> list[StoredEvent]:
        raise StoreUnavailable("down")

    writer = make_writer(fail)
    done: list[Pending[Any]] = []
    for _ in range(3):
        await writer.enqueue(ProbeOp(), done.append)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run, no_hook)
        await until_drained(writer)
        nursery.cancel_scope.cancel()
    assert len(done) == 3 and all(isinstance(p.error, StoreUnavailable) for p in done)

