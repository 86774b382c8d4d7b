"""Background upkeep in the daemon's nursery: purge expired events and those past retention."""

from __future__ import annotations

import logging

import trio

from .config import Config
from .errors import StoreUnavailable
from .store import Store

log = logging.getLogger("pocketbridge.maintenance")

PURGE_BATCH = 1000
DAY_MS = 86_400_000


async def purge_once(store: Store, config: Config) -> int:
    """Delete expired (ttl + clock skew) and retention-expired events in batches; returns the count."""
    retention_ms = config.retention.event_days * DAY_MS
    grace_ms = int(config.limits.clock_skew * 1000)
    total = 0
    while True:
        n = await store.purge(retention_ms, grace_ms, PURGE_BATCH)
        total += n
        if n < PURGE_BATCH:
            return total
        await trio.sleep(0)  # let live traffic through between batches


async def run_purger(store: Store, config: Config) -> None:
    while True:
        try:
            purged = await purge_once(store, config)
            if purged:
                log.info("purged %d expired events", purged)
        except StoreUnavailable:
            log.warning("event purge skipped: store unavailable")
        await trio.sleep(config.retention.purge_interval)
