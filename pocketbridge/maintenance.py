"""Background upkeep in the daemon's nursery: purging expired and old events, the instance
heartbeat (presence across instances) and the catch-up poll behind the bus."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .bus import Bus
from .config import Config
from .errors import StoreUnavailable
from .hub import Hub
from .store import Store

log = logging.getLogger("pocketbridge.maintenance")

PURGE_BATCH = 1000
INACTIVE_BATCH = 100
DAY_MS = 86_400_000


async def purge_once(store: Store, config: Config) -> int:
    """Delete expired (ttl + clock skew) and retention-expired events in batches; returns the count."""
    retention_ms = config.retention.event_days * DAY_MS
    grace_ms = int(config.limits.clock_skew * 1000)
    audit_ms = config.retention.audit_days * DAY_MS
    for user_id in await store.deleting_users():  # a deletion cut short (crash, restart) is finished here
        await store.delete_user(user_id)
    if config.retention.inactive_user_days:
        await purge_inactive_users(store, config.retention.inactive_user_days)
    total = 0
    while True:
        n = await store.purge(retention_ms, grace_ms, PURGE_BATCH, audit_ms)
        total += n
        if n == 0:
            return total
        await trio.lowlevel.checkpoint()  # let live traffic through between batches


async def purge_inactive_users(store: Store, days: int) -> int:
    """Delete the accounts whose every device is revoked and that had no activity for ``days`` days."""
    deleted = 0
    while users := await store.inactive_users(int(time.time() * 1000) - days * DAY_MS, INACTIVE_BATCH):
        for user_id in users:
            if await store.mark_deleting(user_id):
                store.note_audit(int(time.time() * 1000), "account_purged", None, user_id[:8], None,
                                 f"inactive for {days} days, every device revoked")
                await store.delete_user(user_id)
                deleted += 1
    if deleted:
        log.info("purged %d inactive accounts", deleted)
    return deleted


async def run_purger(store: Store, config: Callable[[], Config], reloaded: Wakeup | None = None) -> None:
    """Purge now and then every ``[retention] purge_interval``; a reload (SIGHUP) purges at once with the
    new settings and restarts the interval, so "applied: retention" is true when the log says it."""
    while True:
        try:
            purged = await purge_once(store, config())
            if purged:
                log.info("purged %d expired events", purged)
        except StoreUnavailable:
            log.warning("event purge skipped: store unavailable")
        with trio.move_on_after(config().retention.purge_interval):
            if reloaded is not None:
                await reloaded.wait()
            else:
                await trio.sleep_forever()


HEARTBEAT_SECONDS = 30.0
STALE_AFTER_MS = 90_000  # devices of an instance silent this long are shown offline (§4: within 2 min)
CATCH_UP_HEALTHY = 5.0
CATCH_UP_DEGRADED = 0.5
CATCH_UP_CHUNK = 500


async def run_heartbeat(store: Store, instance_id: str) -> None:
    """Keep this instance's presence rows trustworthy across instances."""
    while True:
        try:
            stale = await store.beat(instance_id, STALE_AFTER_MS)
            if stale:
                log.info("marked %d devices of stopped instances offline", stale)
        except StoreUnavailable:
            log.warning("instance heartbeat skipped: store unavailable")
        await trio.sleep(HEARTBEAT_SECONDS)


class Wakeup:
    """A nudge from synchronous code: ``set()`` any number of times; ``wait()`` returns once it was
    set and clears it."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = trio.Event()


async def _first_of(*waits: Callable[[], Awaitable[Any]]) -> None:
    async with trio.open_nursery() as nursery:
        for wait in waits:
            nursery.start_soon(_then_cancel, wait, nursery.cancel_scope)


async def _then_cancel(wait: Callable[[], Awaitable[Any]], scope: trio.CancelScope) -> None:
    await wait()
    scope.cancel()


async def run_catch_up(hub: Hub, store: Store, bus: Bus, wake: Wakeup) -> None:
    """The store is the truth: poll the heads of the users connected here and fill what the bus
    missed — every few seconds while it is healthy, twice a second while it is down, and at once
    when its state changes or a write batch failed (a batch whose COMMIT outcome is unknown may
    have committed: its events are then delivered from the store, never from the failed batch)."""
    while True:
        with trio.move_on_after(CATCH_UP_HEALTHY if bus.connected else CATCH_UP_DEGRADED):
            changed = getattr(bus, "changed", None)
            if changed is not None:
                await _first_of(changed.wait, wake.wait)
            else:
                await wake.wait()
        # what the bus may have lost: revocations, deletions, takeovers (checked first, so a revoked device is
        # closed before anything more is read for it)
        devices = [m.device_id for m in hub.members()]
        for i in range(0, len(devices), CATCH_UP_CHUNK):
            chunk = devices[i : i + CATCH_UP_CHUNK]
            try:
                states = await store.device_states(chunk)
            except StoreUnavailable:
                break
            closed = hub.enforce(chunk, states)
            if closed:
                log.info("closed %d sessions the store says are revoked, deleted or taken over", closed)
        users = hub.users
        for i in range(0, len(users), CATCH_UP_CHUNK):
            try:
                heads = await store.heads(users[i : i + CATCH_UP_CHUNK])
            except StoreUnavailable:
                break
            for user_id, head in heads.items():
                for member in hub.user_sessions(user_id):
                    member.catch_up(head)
